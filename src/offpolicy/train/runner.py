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
    cfg, sft = run.cfg, run.cfg.sft
    if sft.steps > 0:
        opt, sched = make_optimizer(run.policy.parameters(), sft.optim, sft.steps)
        if run.state["stage_state"]:
            opt.load_state_dict(run.state["stage_state"]["opt"])
            sched.load_state_dict(run.state["stage_state"]["sched"])
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
                if sft.stop_at_accuracy is not None and acc >= sft.stop_at_accuracy:
                    run.console.print(f"SFT reached held-out greedy accuracy {acc:.3f} >= sft.stop_at_accuracy "
                                      f"after {step + 1} steps: stopping SFT")
                    break
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                context.checkpoint(run, {"opt": opt.state_dict(), "sched": sched.state_dict()})
        run.console.end_stage()
    record_eval(run, "before_rl")
    run.state.update(stage="rl", step=0, stage_state=None)
    context.checkpoint(run, None, name="sft")
