"""What every stage and loop of a run shares: the :class:`Run` it holds, setup, evaluation,
checkpoints and the end of a run.

A run's folder (``run.out_dir``) holds ``config.yaml``, ``metrics.jsonl``, ``summary.json``,
``learning_curve.png``, ``checkpoints/``, the rollout write-ahead log
(``rollouts.wal.jsonl``) and, with ``run.save_experiences``, ``experiences.jsonl``.
A checkpoint records how long ``metrics.jsonl`` and ``experiences.jsonl`` were when it was
written; a resumed run cuts both back to that length, so the steps it does again are
logged once, not twice.
"""

from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offpolicy.config import Config, ConfigError, TrainingDiverged, dump_config
from offpolicy.data.rewards import RewardLimits
from offpolicy.data.tasks import make_task
from offpolicy.policy.model import Policy, build_tiny, load_policy
from offpolicy.policy.tiny import TinyConfig
from offpolicy.report.console import Console
from offpolicy.report.metrics import MetricsLog
from offpolicy.rollout.engines import Engine, make_engine
from offpolicy.rollout.workflows import ScoreFn, make_score_fn
from offpolicy.preflight import preflight
from offpolicy.train.checkpoint import (clean_orphans, latest_checkpoint, load_checkpoint, save_checkpoint,
                                        set_rng_state)
from offpolicy.train.evaluate import evaluate
from offpolicy.train.guards import NonFiniteGuard

LOGGED_FILES = ("metrics.jsonl", "experiences.jsonl", "schedule.jsonl")  # cut back to their checkpointed length on resume


@dataclass
class Run:
    """Everything one training run holds (no globals)."""

    cfg: Config
    out: Path
    policy: Policy  # the learner's weights
    engine: Engine  # the evaluation (and, in sync mode, rollout) engine: its own copy of the weights
    score_fn: ScoreFn
    task: Any
    eval_problems: list
    log: MetricsLog
    console: Console
    state: dict[str, Any] = field(default_factory=dict)  # stage, step, rollouts, evals, elapsed, stage states
    t_start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.state["elapsed"] + time.perf_counter() - self.t_start

    @property
    def tokenizer(self):
        return self.policy.tokenizer


def setup(cfg: Config, resume: bool) -> Run:
    out = Path(cfg.run.out_dir)
    preflight(cfg, resume=resume)  # everything that can be checked before a byte is written
    if resume and (out / "checkpoints").is_dir():
        clean_orphans(out / "checkpoints")
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None  # a bad one is skipped with a warning
    if resume and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start afresh")
    if not resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"run.out_dir={out} already holds a run; pass --resume to continue it, or choose another out_dir")
    loaded = load_checkpoint(ckpt) if ckpt else None
    if loaded and loaded[1]["stage"] == "done" and loaded[1]["step"] < cfg.rl.steps:
        # a finished run keeps no optimizer or buffer state: it cannot be extended exactly, and must not look so
        raise ConfigError(f"{ckpt} ends a finished run of {loaded[1]['step']} RL steps; --resume cannot extend it to "
                          f"rl.steps={cfg.rl.steps}. Start a new run from it with policy.init={ckpt}")
    if cfg.rl.steps:
        from offpolicy.train.learner import validate_rl_config

        validate_rl_config(cfg.rl)  # before anything is written or trained
    task = make_task(cfg.task.name, **cfg.task.params)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    score_fn = make_score_fn(task, cfg.task.reward)
    policy, state = loaded if loaded else (init_policy(cfg), new_state())
    if ckpt:
        set_rng_state(state["rng"])
        cut_logs_to(out, state.get("log_sizes", {}))
    eval_problems = task.problems(cfg.eval.n_problems, split="eval", seed=cfg.run.seed + 10_007)
    console = Console(cfg.run.name, enabled=cfg.run.progress)
    if ckpt:
        console.print(f"resuming from {ckpt} (stage {state['stage']}, step {state['step']})")
    engine = make_engine(policy, version=state.get("version", 0))
    log = MetricsLog(out, loggers=cfg.run.loggers, run_name=cfg.run.name, config=cfg.model_dump(mode="json"))
    return Run(cfg, out, policy, engine, score_fn, task, eval_problems, log, console, state)


def new_state() -> dict[str, Any]:
    return {"stage": "start", "step": 0, "rollouts": 0, "elapsed": 0.0, "evals": {}, "stage_state": None,
            "rl_tokens": 0, "rl_gen_seconds": 0.0, "version": 0, "log_sizes": {}}


def cut_logs_to(out: Path, sizes: dict[str, int]) -> None:
    """Cut each logged file back to its length at the checkpoint (what came after is logged again)."""
    for name in LOGGED_FILES:
        path = out / name
        if path.exists():
            size = sizes.get(name, 0)
            if path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)


def log_sizes(out: Path) -> dict[str, int]:
    return {name: (out / name).stat().st_size for name in LOGGED_FILES if (out / name).exists()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_policy(cfg: Config) -> Policy:
    p = cfg.policy
    if p.init == "tiny":
        return build_tiny(TinyConfig(d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads, max_len=p.max_len),
                          seed=cfg.run.seed)
    return load_policy(p.init, dtype=p.dtype)


def step_seed(cfg: Config, stage: str, step: int) -> int:
    """A distinct, reproducible seed per (run seed, stage, step)."""
    return (cfg.run.seed * 1_000_003 + {"sft": 1, "rl": 2, "eval": 3}[stage] * 10_007 + step) % (2**31)


def sync_engine(run: Run, version: int) -> None:
    """Give the run's engine the learner's current weights, labelled ``version`` (a copy, never a share)."""
    run.engine.load_weights(run.policy.model.state_dict(), version)
    run.state["version"] = version


# ---- evaluation ------------------------------------------------------------------------------
def record_eval(run: Run, name: str, extra: dict[str, Any] | None = None) -> dict[str, float]:
    cfg, t0 = run.cfg, time.perf_counter()
    sync_engine(run, run.state.get("version", 0))
    result = evaluate(run.engine, run.tokenizer, run.eval_problems, run.score_fn,
                      max_new_tokens=cfg.sampling.max_new_tokens, samples=cfg.eval.samples,
                      temperature=cfg.eval.temperature, seed=step_seed(cfg, "eval", run.state["step"]),
                      reward_limits=RewardLimits.of(cfg.task))
    run.state["evals"][name] = result
    record = {"stage": run.state["stage"], "step": run.state["step"], "rollouts": run.state["rollouts"],
              "time/elapsed_s": run.elapsed(), "time/eval_s": time.perf_counter() - t0, "eval_point": name,
              **result, **(extra or {})}
    run.log.log(record)
    run.console.eval_line(name, result)
    return result


# ---- checkpoints and the end of a run --------------------------------------------------------
def checkpoint(run: Run, stage_state: dict | None, name: str | None = None) -> Path:
    """Save the run; refuse weights that are not finite, so ``latest`` always names a usable state (the
    learner's guard keeps them finite; this is the last line, also for SFT)."""
    if not NonFiniteGuard.params_finite(list(run.policy.parameters())):
        raise TrainingDiverged(f"the weights are not finite at {run.state['stage']} step {run.state['step']}: "
                               "no checkpoint written; the last good one stays latest")
    run.state["stage_state"] = stage_state
    run.log.flush()
    state = {**run.state, "elapsed": run.elapsed(), "log_sizes": log_sizes(run.out)}
    name = name or f"step_{run.state['stage']}_{run.state['step']:06d}"
    return save_checkpoint(run.out / "checkpoints", name, run.policy, state, keep=run.cfg.run.keep_checkpoints)


def stopped(run: Run, err: TrainingDiverged) -> TrainingDiverged:
    """``err`` with where the run stopped and which checkpoint it leaves as ``latest`` (none is ever
    written from a non-finite state)."""
    ckpt = latest_checkpoint(run.out / "checkpoints", warn=lambda _: None)
    # "finite", not "good": weights can be finite yet so large that sampling overflows (lr x weight decay)
    keeps = f"the last checkpoint with finite weights, {ckpt}, stays latest" if ckpt else "no checkpoint was written"
    return TrainingDiverged(f"{err}. Stopped in {run.state['stage']} step {run.state['step'] + 1}; {keeps}")


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finish(run: Run) -> dict[str, Any]:
    from offpolicy.report.plot import plot_learning_curve

    evals = run.state["evals"]
    if "final" not in evals:
        record_eval(run, "final")
    run.state["stage"] = "done"
    checkpoint(run, None, name="final")
    acc = lambda name, key="eval/greedy_acc": evals.get(name, {}).get(key)  # noqa: E731
    s = run.state
    summary = {
        "name": run.cfg.run.name,
        "mode": run.cfg.run.mode,
        "accuracy_before_sft": acc("before_sft"),
        "accuracy_before_rl": acc("before_rl"),
        "sft_best_step": s.get("sft_best_step"),  # with sft.keep_best: the SFT step RL started from
        "accuracy_after_rl": acc("final"),
        "gain_points": None if acc("before_rl") is None else round(100 * (acc("final") - acc("before_rl")), 1),
        "pass_at_k_before_rl": acc("before_rl", "eval/pass_at_k"),
        "pass_at_k_after_rl": acc("final", "eval/pass_at_k"),
        "sampled_acc_after_rl": acc("final", "eval/sampled_acc"),
        "eval_problems": len(run.eval_problems),
        "rollouts": s["rollouts"],
        "rollout_tokens_per_s": s["rl_tokens"] / s["rl_gen_seconds"] if s["rl_gen_seconds"] else None,
        "wall_seconds": round(run.elapsed(), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "params": run.policy.num_params(),
        "checkpoint": str(run.out / "checkpoints" / "final"),
    }
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["plot"] = str(plot_learning_curve(run.out))
    run.console.summary_table(summary)
    return summary

