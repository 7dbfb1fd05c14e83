"""TRL's ``GRPOTrainer`` as a baseline system, run on the built-in tiny model from an offpolicy checkpoint.

Needs the ``bench`` extra (``pip install 'offpolicy[bench]'``: trl, datasets, transformers). Used by
``benchmarks/bench_trl.py`` and by ``offpolicy compare --suite`` (system ``trl``).

:func:`run_trl` exports the start checkpoint as an equivalent ``transformers`` GPT-2
(:func:`offpolicy.policy.export.export_hf`), gives TRL a model that numbers left-padded positions
from the attention mask (:func:`~offpolicy.policy.export.positions_from_mask`; TRL's log-prob forward
passes no ``position_ids``), rewards through the task's own ``task.score`` on the original
:class:`~offpolicy.data.tasks.Problem` (looked up by a ``problem_id`` dataset column), and measures
held-out greedy accuracy with offpolicy's ``evaluate`` on the eval set a run with the same seed uses.
Settings (``s``): ``init``, ``task`` ({name, params}), ``prompts_per_step``, ``group_size``,
``max_new_tokens``, ``trl_max_steps``, ``trl_budget_s``, ``eval_problems``, ``eval_every``, and
optionally ``lr`` (1e-4), ``temperature`` (1.0) and ``threads`` (torch threads, 2). ``beta=0`` (no KL, no reference model),
``loss_type="grpo"``, group-std-scaled rewards, one optimizer step per generation batch.
:func:`write_run` stores a result as a run folder (``metrics.jsonl`` + ``summary.json``) that
:mod:`offpolicy.compare` reads like one of ours.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def eval_seed(seed: int) -> int:
    return seed + 10_007  # the runner's held-out set for run.seed = seed (offpolicy.train.context.setup)


def run_trl(seed: int, s: dict[str, Any], out: Path, target: float | None) -> dict[str, Any]:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from offpolicy.data.tasks import make_task
    from offpolicy.policy.export import export_hf, positions_from_mask
    from offpolicy.policy.hf import HFTokenizer
    from offpolicy.policy.model import Policy
    from offpolicy.rollout.engines import HFEngine
    from offpolicy.train.evaluate import evaluate

    torch.set_num_threads(s.get("threads", 2))
    if out.exists():
        shutil.rmtree(out)
    hf_dir = export_hf(Path(s["init"]), out / "exported_sft")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    # TRL scores completions with a forward given no position_ids: number left-padded prompts from the mask
    model = positions_from_mask(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32))
    task = make_task(s["task"]["name"], **s["task"]["params"])
    P, G = s["prompts_per_step"], s["group_size"]
    train_problems = task.problems(P * s["trl_max_steps"], split="train", seed=seed)
    eval_problems = task.problems(s["eval_problems"], split="eval", seed=eval_seed(seed))
    by_id = {p.id: p for p in train_problems}  # TRL hands extra dataset columns to the reward as keywords
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in train_problems],
                                 "problem_id": [p.id for p in train_problems]})
    counts = {"completions": 0, "tokens": 0, "reward_calls": 0}

    def task_reward(prompts, completions, completion_ids, problem_id, **_):
        """The task's own verifier on the original Problem, as our runner calls it (``task.score``)."""
        counts["completions"] += len(completions)
        counts["tokens"] += sum(len(c) for c in completion_ids)  # includes EOS, like our engines' counts
        counts["reward_calls"] += 1
        return [task.score(by_id[i], c) for i, c in zip(problem_id, completions)]

    args = GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=P * G, num_generations=G,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=s["max_new_tokens"], temperature=s.get("temperature", 1.0), top_p=1.0, top_k=0,
        learning_rate=s.get("lr", 1e-4), lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        max_steps=s["trl_max_steps"], logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False,
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    torch.set_num_threads(s.get("threads", 2))
    model = trainer.model
    gen = {"seconds": 0.0, "calls": 0, "evaluating": False}
    original_generate = model.generate

    def timed_generate(*a, **k):  # TRL's rollouts only: held-out evaluation is not charged to TRL
        t0 = time.perf_counter()
        res = original_generate(*a, **k)
        if not gen["evaluating"]:
            gen["seconds"] += time.perf_counter() - t0
            gen["calls"] += 1
        return res

    model.generate = timed_generate

    def held_out(m) -> float:
        was = m.training
        gen["evaluating"] = True
        m.eval()
        policy = Policy(m, HFTokenizer(tokenizer), "hf")
        engine = HFEngine(policy, max_batch=len(eval_problems))  # a copy of TRL's current weights
        acc = evaluate(engine, policy.tokenizer, eval_problems, task.score, max_new_tokens=s["max_new_tokens"],
                       samples=0)["eval/greedy_acc"]
        m.train(was)
        gen["evaluating"] = False
        return acc

    class Bench(TrainerCallback):
        def __init__(self) -> None:
            self.curve: list[dict] = []
            self.step_times: list[float] = []
            self.rollout_rates: list[float] = []
            self.learner_rates: list[float] = []
            self.train_s = 0.0
            self.eval_s = 0.0
            self.t_step = 0.0
            self.rewards: list[float] = []
            self.reached = False
            self.stop_reason = "max_steps"

        def on_train_begin(self, args, state, control, **kw):
            t0 = time.perf_counter()
            self.curve.append({"step": 0, "rollouts": 0, "seconds": 0.0, "acc": held_out(kw["model"])})
            self.eval_s += time.perf_counter() - t0
            self.t_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.t_step = time.perf_counter()
            self.at_begin = (gen["seconds"], counts["tokens"])

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(round(time.perf_counter() - self.t_step, 4))
            g_s, n = gen["seconds"] - self.at_begin[0], counts["tokens"] - self.at_begin[1]
            if g_s > 0:
                self.rollout_rates.append(round(n / g_s, 1))
                self.learner_rates.append(round(n / max(self.step_times[-1] - g_s, 1e-9), 1))
            self.train_s += self.step_times[-1]
            self.threads = torch.get_num_threads()
            if state.global_step % s["eval_every"] == 0:
                t0 = time.perf_counter()
                acc = held_out(kw["model"])
                self.eval_s += time.perf_counter() - t0
                self.curve.append({"step": state.global_step, "rollouts": counts["completions"],
                                   "seconds": round(self.train_s, 3), "acc": acc})
                if target is not None and acc >= target and not self.reached:
                    self.reached = True
                    control.should_training_stop = True
                    self.stop_reason = "target"
            if self.train_s >= s["trl_budget_s"] and not control.should_training_stop:
                control.should_training_stop = True
                self.stop_reason = "budget"

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])

    bench = Bench()
    trainer.add_callback(bench)
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; the rewards are kept in the JSON
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0 - bench.eval_s
    steps = trainer.state.global_step
    learner_s = bench.train_s - gen["seconds"]
    trained_tokens = counts["tokens"]  # TRL trains on every completion (uninformative groups have advantage 0)
    return {"system": "trl", "seed": seed, "curve": bench.curve, "steps": steps, "rollouts": counts["completions"],
            "train_seconds": round(bench.train_s, 2), "step_seconds": bench.step_times,
            "wall_seconds_excluding_eval": round(wall, 2),
            "stop_reason": bench.stop_reason, "torch_threads": bench.threads, "budget_s": s["trl_budget_s"],
            "rollout_tokens": counts["tokens"], "rollout_seconds": round(gen["seconds"], 2),
            "rollout_tokens_per_s": counts["tokens"] / gen["seconds"] if gen["seconds"] else None,
            "learner_tokens": trained_tokens, "learner_seconds": round(learner_s, 2),
            "learner_tokens_per_s": trained_tokens / learner_s if learner_s > 0 else None,
            "rollout_tokens_per_s_per_step": bench.rollout_rates,
            "learner_tokens_per_s_per_update": bench.learner_rates,
            "reward_mean_per_step": [round(r, 4) for r in bench.rewards],
            "trl_config": {k: getattr(args, k) for k in (
                "per_device_train_batch_size", "num_generations", "max_completion_length", "learning_rate",
                "lr_scheduler_type", "beta", "loss_type", "scale_rewards", "num_iterations", "epsilon",
                "temperature", "top_k", "top_p", "max_grad_norm")},
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def write_run(result: dict[str, Any], out: Path, n_eval: int) -> None:
    """``result`` of :func:`run_trl` as a run folder in offpolicy's format: eval rows (``before_rl`` then
    one per evaluated step, with ``rollouts``), one RL row per step (``reward/mean``, ``time/step_s``)
    and a ``summary.json``; written last, so a folder with a summary is complete."""
    rows = []
    for point in result["curve"]:
        step = point["step"]
        rows.append({"stage": "rl" if step else "sft", "step": step, "rollouts": point["rollouts"],
                     "eval_point": f"rl_step_{step}" if step else "before_rl", "eval/greedy_acc": point["acc"]})
    per_step = result["rollouts"] / max(result["steps"], 1)
    for k, (sec, rew) in enumerate(zip(result["step_seconds"], result["reward_mean_per_step"]), start=1):
        rows.append({"stage": "rl", "step": k, "rollouts": round(k * per_step), "reward/mean": rew, "time/step_s": sec})
    rows.sort(key=lambda r: (r["step"], "eval/greedy_acc" in r))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"name": "trl", "accuracy_before_rl": result["curve"][0]["acc"],
               "accuracy_after_rl": result["curve"][-1]["acc"], "eval_problems": n_eval,
               "rollouts": result["rollouts"], "peak_rss_mb": result["peak_rss_mb"],
               "wall_seconds": result["wall_seconds_excluding_eval"], "stop_reason": result["stop_reason"],
               "versions": result["versions"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m offpolicy.baselines.trl_grpo SETTINGS_JSON SEED OUT N_EVAL``: one TRL run written as a run folder."""
    import sys

    settings, seed, out, n_eval = (argv if argv is not None else sys.argv[1:])
    write_run(run_trl(int(seed), json.loads(settings), Path(out), target=None), Path(out), int(n_eval))


if __name__ == "__main__":
    main()
