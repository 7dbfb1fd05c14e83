"""A run, top to bottom: (SFT on expert traces) → (RL in one of three loops) → final evaluation.

``run.mode`` picks the RL loop, each a short function over the same pieces
(``offpolicy.train.rl``: learner, buffer, write-ahead log, evaluation, checkpoints):

- ``sync`` (:mod:`~offpolicy.train.sync_loop`): generate, learn, sync weights, repeat;
- ``async`` (:mod:`~offpolicy.train.async_loop`): Ray rollout workers generate while the learner
  learns; admission control keeps every token within ``rl.buffer.max_staleness`` versions;
- ``offline`` (:mod:`~offpolicy.train.offline_loop`): learn from a logged experience file.

Everything a run produces goes to ``run.out_dir`` (see :mod:`offpolicy.train.context`). A killed
run resumes from its latest checkpoint with ``resume=True``: policy, optimizer, replay buffer with
its experiences, RNG and counters are restored, and rollouts collected after the checkpoint are
read back from the write-ahead log instead of being generated again.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from offpolicy.config import TrainingDiverged
from offpolicy.experience import collate
from offpolicy.report.metrics import to_floats
from offpolicy.rollout.workflows import expert_experiences
from offpolicy.train import context
from offpolicy.train.context import Run, finish, record_eval, setup, step_seed
from offpolicy.train.learner import make_optimizer, sft_update


def train(cfg, resume: bool = False) -> dict[str, Any]:
    """Run the recipe's stages and return the summary (also written to ``summary.json``)."""
    run = setup(cfg, resume)
    try:
        if run.state["stage"] == "start":
            record_eval(run, "before_sft")
            run.state["stage"] = "sft"
        if run.state["stage"] == "sft":
            run_sft(run)
        if run.state["stage"] == "rl" and cfg.rl.steps:
            run_loop(run)
        return finish(run)
    except TrainingDiverged as e:  # one line for the CLI, naming what the user keeps
        raise context.stopped(run, e) from None
    finally:
        run.log.close()
        run.console.close()


LOOPS = {"sync": "sync_loop", "async": "async_loop", "offline": "offline_loop"}  # run.mode -> module


def run_loop(run: Run) -> None:
    """The RL loop ``run.mode`` names, imported only when used (async brings Ray in)."""
    mode = run.cfg.run.mode
    getattr(importlib.import_module(f"offpolicy.train.{LOOPS[mode]}"), f"run_{mode}")(run)


# ---- stage 1: supervised fine-tuning on expert traces ----------------------------------------
def run_sft(run: Run) -> None:
    """SFT for ``sft.steps`` steps (or until ``sft.stop_at_accuracy``); with ``sft.keep_best`` RL starts from
    the evaluated weights with the best held-out greedy accuracy (also what ``checkpoints/sft`` holds)."""
    cfg, sft = run.cfg, run.cfg.sft
    best: dict[str, Any] | None = None  # {"step", "greedy_acc", "weights"}: the best SFT evaluation so far
    if sft.steps > 0:
        opt, sched = make_optimizer(run.policy.parameters(), sft.optim, sft.steps)
        if run.state["stage_state"]:
            opt.load_state_dict(run.state["stage_state"]["opt"])
            sched.load_state_dict(run.state["stage_state"]["sched"])
            best = run.state["stage_state"].get("best")
        tok = run.policy.tokenizer
        run.console.start_stage("SFT", sft.steps, run.state["step"])
        for step in range(run.state["step"], sft.steps):
            t0 = time.perf_counter()
            problems = run.task.problems(sft.batch_size, split="train", seed=step_seed(cfg, "sft", step))
            batch = collate(expert_experiences(problems, tok), tok.pad_id)
            metrics = to_floats(sft_update(run.policy, batch, opt, sched, sft.optim.grad_clip))
            run.state["step"] = step + 1
            metrics["time/step_s"] = time.perf_counter() - t0
            run.log.log({"stage": "sft", "step": step + 1, "rollouts": 0, **metrics})
            run.console.advance(metrics)
            if sft.eval_every and (step + 1) % sft.eval_every == 0 and step + 1 < sft.steps:
                acc = record_eval(run, f"sft_step_{step + 1}")["eval/greedy_acc"]
                best = keep_if_best(run, best, acc)
                if sft.stop_at_accuracy is not None and acc >= sft.stop_at_accuracy:
                    run.console.print(f"SFT reached held-out greedy accuracy {acc:.3f} >= sft.stop_at_accuracy "
                                      f"after {step + 1} steps: stopping SFT")
                    break
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                context.checkpoint(run, {"opt": opt.state_dict(), "sched": sched.state_dict(), "best": best})
        run.console.end_stage()
    if sft.keep_best and sft.steps > 0:
        best = end_on_best(run, best)
    record_eval(run, "before_rl", {"sft/best_step": best["step"]} if best else None)
    run.state.update(stage="rl", step=0, stage_state=None)
    context.checkpoint(run, None, name="sft")


def keep_if_best(run: Run, best: dict[str, Any] | None, acc: float) -> dict[str, Any] | None:
    """With ``sft.keep_best``, a copy of the weights if ``acc`` beats ``best`` (the earliest of equals stays)."""
    if not run.cfg.sft.keep_best or (best is not None and acc <= best["greedy_acc"]):
        return best
    weights = {k: v.detach().to("cpu", copy=True) for k, v in run.policy.model.state_dict().items()}
    return {"step": run.state["step"], "greedy_acc": acc, "weights": weights}


def end_on_best(run: Run, best: dict[str, Any] | None) -> dict[str, Any]:
    """Evaluate the last SFT weights (unless just done) and load the best evaluated ones into the policy."""
    point = f"sft_step_{run.state['step']}"
    if point not in run.state["evals"]:
        best = keep_if_best(run, best, record_eval(run, point)["eval/greedy_acc"])
    assert best is not None  # keep_if_best keeps the first evaluation
    if best["step"] != run.state["step"]:
        run.console.print(f"sft.keep_best: held-out greedy accuracy {best['greedy_acc']:.3f} at SFT step "
                          f"{best['step']} is the best: RL starts from those weights, not step {run.state['step']}'s")
        run.policy.model.load_state_dict(best["weights"])
    run.state["sft_best_step"] = best["step"]
    return best
