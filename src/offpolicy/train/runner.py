"""The synchronous runner: (SFT on expert traces) → (off-policy RL from a replay buffer).

Read top to bottom, one RL step is:
  sample prompts → rollout (engine, version v) → reward → buffer (staleness-bounded)
  → ``updates_per_step`` × [sample groups → advantages → loss → step] → log → eval → checkpoint.

Everything a run produces goes to ``run.out_dir``: ``config.yaml``, ``metrics.jsonl``,
``summary.json``, ``learning_curve.png`` and ``checkpoints/``. A killed run resumes
from its latest checkpoint with ``resume=True`` (policy, optimizer, replay buffer with
its experiences, RNG and counters are restored).
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

from offpolicy.config import Config, ConfigError, dump_config
from offpolicy.data.buffer import Group, ReplayBuffer
from offpolicy.data.rewards import load_reward_fn
from offpolicy.data.tasks import make_task
from offpolicy.experience import collate, write_experiences
from offpolicy.policy.model import Policy, build_tiny, load_policy
from offpolicy.policy.tiny import TinyConfig
from offpolicy.report.console import Console
from offpolicy.report.metrics import MetricsLog, to_floats
from offpolicy.rollout.engines import Engine, SamplingParams, make_engine
from offpolicy.rollout.workflows import ScoreFn, add_expert_traces, expert_experiences, rollout_groups
from offpolicy.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from offpolicy.train.evaluate import evaluate
from offpolicy.train.learner import Learner, make_optimizer, sft_update, validate_rl_config


@dataclass
class Run:
    """Everything one training run holds (no globals)."""

    cfg: Config
    out: Path
    policy: Policy
    engine: Engine
    score_fn: ScoreFn
    task: Any
    eval_problems: list
    log: MetricsLog
    console: Console
    state: dict[str, Any] = field(default_factory=dict)  # stage, step, rollouts, evals, elapsed, stage states
    t_start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.state["elapsed"] + time.perf_counter() - self.t_start


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run the recipe's stages and return the summary (also written to ``summary.json``)."""
    run = setup(cfg, resume)
    try:
        if run.state["stage"] == "start":
            record_eval(run, "before_sft")
            run.state["stage"] = "sft"
        if run.state["stage"] == "sft":
            run_sft(run)
        if run.state["stage"] == "rl":
            run_rl(run)
        return finish(run)
    finally:
        run.log.close()
        run.console.close()


# ---- setup -----------------------------------------------------------------------------------
def setup(cfg: Config, resume: bool) -> Run:
    out = Path(cfg.run.out_dir)
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if not resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"run.out_dir={out} already holds a run; pass --resume to continue it, or choose another out_dir")
    loaded = load_checkpoint(ckpt) if ckpt else None
    if loaded and loaded[1]["stage"] == "done" and loaded[1]["step"] < cfg.rl.steps:
        # a finished run keeps no optimizer or buffer state: it cannot be extended exactly, and must not look so
        raise ConfigError(f"{ckpt} ends a finished run of {loaded[1]['step']} RL steps; --resume cannot extend it to "
                          f"rl.steps={cfg.rl.steps}. Start a new run from it with policy.init={ckpt}")
    if cfg.rl.steps:
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
    eval_problems = task.problems(cfg.eval.n_problems, split="eval", seed=cfg.run.seed + 10_007)
    console = Console(cfg.run.name, enabled=cfg.run.progress)
    if ckpt:
        console.print(f"resuming from {ckpt} (stage {state['stage']}, step {state['step']})")
    return Run(cfg, out, policy, make_engine(policy), score_fn, task, eval_problems, MetricsLog(out), console, state)


def new_state() -> dict[str, Any]:
    return {"stage": "start", "step": 0, "rollouts": 0, "elapsed": 0.0, "evals": {}, "stage_state": None,
            "rl_tokens": 0, "rl_gen_seconds": 0.0}


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


def make_score_fn(task, reward: str | None) -> ScoreFn:
    if reward is None:
        return task.score
    user_fn = load_reward_fn(reward)
    return lambda problem, completion: user_fn(problem.prompt, completion, problem.answer)


def step_seed(cfg: Config, stage: str, step: int) -> int:
    """A distinct, reproducible seed per (run seed, stage, step)."""
    return (cfg.run.seed * 1_000_003 + {"sft": 1, "rl": 2, "eval": 3}[stage] * 10_007 + step) % (2**31)


# ---- evaluation ------------------------------------------------------------------------------
def record_eval(run: Run, name: str, extra: dict[str, Any] | None = None) -> dict[str, float]:
    cfg = run.cfg
    result = evaluate(run.engine, run.eval_problems, run.score_fn, max_new_tokens=cfg.sampling.max_new_tokens,
                      samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                      seed=step_seed(cfg, "eval", run.state["step"]))
    run.state["evals"][name] = result
    record = {"stage": run.state["stage"], "step": run.state["step"], "rollouts": run.state["rollouts"],
              "time/elapsed_s": run.elapsed(), "eval_point": name, **result, **(extra or {})}
    run.log.log(record)
    run.console.eval_line(name, result)
    return result


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
                checkpoint(run, {"opt": opt.state_dict(), "sched": sched.state_dict()})
        run.console.end_stage()
    record_eval(run, "before_rl")
    run.state.update(stage="rl", step=0, stage_state=None)
    checkpoint(run, None, name="sft")


# ---- stage 2: off-policy RL from a staleness-bounded replay buffer ---------------------------
def run_rl(run: Run) -> None:
    cfg, rl = run.cfg, run.cfg.rl
    if rl.steps == 0:
        return
    learner = Learner(run.policy, rl, total_updates=rl.steps * rl.updates_per_step,
                      temperature=cfg.sampling.temperature, max_len=cfg.sampling.max_new_tokens, seed=cfg.run.seed)
    try:
        buffer = ReplayBuffer(rl.buffer.capacity, rl.buffer.sampling, rl.buffer.max_staleness, rl.buffer.max_uses,
                              seed=cfg.run.seed, sampling_params=rl.buffer.sampling_params)
    except ValueError as e:
        raise ConfigError(f"rl.{e}") from None
    if run.state["stage_state"]:
        learner.load_state_dict(run.state["stage_state"]["learner"])
        buffer.load_state_dict(run.state["stage_state"]["buffer"])
    sampling = SamplingParams(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p)
    tok = run.policy.tokenizer
    run.console.start_stage("RL", rl.steps, run.state["step"])
    for step in range(run.state["step"], rl.steps):
        t0 = time.perf_counter()
        # 1. rollout with the current weights (policy version = learner.version)
        problems = run.task.problems(rl.prompts_per_step, split="train", seed=step_seed(cfg, "rl", step))
        groups, rs = rollout_groups(run.engine, problems, run.score_fn, group_size=rl.group_size, sampling=sampling,
                                    version=learner.version, seed=step_seed(cfg, "rl", step),
                                    reward_timeout_s=cfg.task.reward_timeout_s, group_prefix=f"s{step}:")
        if rl.expert_per_group:
            add_expert_traces(groups, problems, tok, run.score_fn, rl.expert_per_group)
        if learner.needs_behavior_train_logp:
            attach_train_logprobs(run.policy, groups, cfg.sampling.temperature)
        if cfg.run.save_experiences:
            write_experiences(run.out / "experiences.jsonl", [e for g in groups for e in g])
        run.state["rollouts"] += rs.n
        run.state["rl_tokens"] += rs.tokens
        run.state["rl_gen_seconds"] += rs.seconds
        rewards = torch.tensor([e.reward for g in groups for e in g])
        # 2. store (groups with identical rewards have zero group-relative advantage: counted, not stored)
        informative = [g for g in groups if len({e.reward for e in g}) > 1]
        for g in informative if rl.drop_uninformative_groups else groups:
            buffer.add(Group.of(g))
        # 3. learn: several updates per rollout step reuse stored groups (UTD > 1)
        t1 = time.perf_counter()
        update_metrics = []
        for _ in range(rl.updates_per_step):
            chosen = buffer.sample(rl.groups_per_update, learner.version)
            if not chosen:
                break
            batch = collate([e for g in chosen for e in g.experiences], tok.pad_id)
            update_metrics.append(learner.update(batch))
        learner.end_rollout_step()
        if "remix" in learner.controllers and rl.buffer.sampling == "recent_mix":
            remix = learner.controllers["remix"]  # its data mix drives the sampler (p -> 0 after reincarnation)
            buffer.sampling_params.update(p_off=remix.off_policy_prob, window=remix.window)
        t2 = time.perf_counter()
        # 4. log
        metrics = mean_metrics(update_metrics)
        metrics.update({
            "reward/mean": rewards.mean(), "reward/std": rewards.std() if len(rewards) > 1 else torch.tensor(0.0),
            "rollout/tokens_per_s": torch.tensor(rs.tokens / max(rs.seconds, 1e-9)),
            "rollout/response_len": torch.tensor(rs.tokens / max(rs.n, 1)),
            "rollout/truncated_frac": torch.tensor(rs.truncated / max(rs.n, 1)),
            "rollout/informative_group_frac": torch.tensor(len(informative) / max(len(groups), 1)),
            "reward/errors": torch.tensor(float(rs.reward_errors + rs.reward_timeouts)),
            "buffer/size": torch.tensor(float(len(buffer))), "buffer/evicted_stale": torch.tensor(float(buffer.stats.evicted_stale)),
            "train/updates": torch.tensor(float(len(update_metrics))), "train/version": torch.tensor(float(learner.version)),
            "time/rollout_s": torch.tensor(t1 - t0), "time/learn_s": torch.tensor(t2 - t1),
            "time/step_s": torch.tensor(time.perf_counter() - t0),
            "mem/rss_mb": torch.tensor(current_rss_mb()),
        })
        metrics = to_floats(metrics)
        run.state["step"] = step + 1
        run.log.log({"stage": "rl", "step": step + 1, "rollouts": run.state["rollouts"],
                     "time/elapsed_s": run.elapsed(), **metrics})
        run.console.advance(metrics)
        # 5. evaluate and checkpoint
        if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < rl.steps:
            record_eval(run, f"rl_step_{step + 1}")
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
            checkpoint(run, {"learner": learner.state_dict(), "buffer": buffer.state_dict()})
    run.console.end_stage()
    run.state.update(stage="done", stage_state=None)


@torch.no_grad()
def attach_train_logprobs(policy: Policy, groups: list[list], temperature: float) -> None:
    """Record the trainer's log-probs of each new response at the behaviour version (snapshot version
    tracking, arXiv:2605.12070): the decoupled correction then separates train-inference mismatch
    (these vs the engine's) from staleness (current policy vs these)."""
    experiences = [e for g in groups for e in g if e.behavior_logprobs is not None]
    if not experiences:
        return
    batch = collate(experiences, policy.tokenizer.pad_id)
    logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len, temperature)
    for e, row in zip(experiences, logp):
        e.behavior_train_logprobs = row[: len(e.response_ids)].tolist()


def mean_metrics(per_update: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average each metric over the updates of one step (keys missing from some updates are skipped)."""
    if not per_update:
        return {}
    keys = set.intersection(*(set(m) for m in per_update))
    return {k: torch.stack([m[k].float() for m in per_update]).mean() for k in sorted(keys)}


# ---- checkpoints and the end of a run --------------------------------------------------------
def checkpoint(run: Run, stage_state: dict | None, name: str | None = None) -> Path:
    run.state["stage_state"] = stage_state
    state = {**run.state, "elapsed": run.elapsed()}
    name = name or f"step_{run.state['stage']}_{run.state['step']:06d}"
    return save_checkpoint(run.out / "checkpoints", name, run.policy, state)


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
        "accuracy_before_sft": acc("before_sft"),
        "accuracy_before_rl": acc("before_rl"),
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
