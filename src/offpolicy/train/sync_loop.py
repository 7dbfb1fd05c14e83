"""The synchronous loop (``run.mode: sync``): generate with version v, learn, hand the engine v + k.

One step, top to bottom:
  sample prompts → rollout (the engine's own weights, version v) → write-ahead log → buffer
  → ``updates_per_step`` × [sample groups → advantages → loss → step] → engine.load_weights(v + k)
  → log → eval → checkpoint.

Staleness comes from reuse only (a group stays in the buffer for up to ``max_staleness``
versions). A step collected before a kill is read back from the write-ahead log, not generated
again.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from offpolicy.data.rewards import RewardLimits
from offpolicy.rollout.workflows import add_expert_traces, rollout_groups
from offpolicy.train import context
from offpolicy.train.context import Run, step_seed
from offpolicy.train.rl import (RLParts, build_rl, collect, end_step, learn, rollout_metrics, step_metrics, store,
                                write_staleness)


def run_sync(run: Run) -> None:
    rl = run.cfg.rl
    parts = build_rl(run)
    logged = {e.step: e for e in parts.wal.entries(from_step=run.state["step"])}  # collected before a kill
    context.sync_engine(run, parts.learner.version)
    run.console.start_stage("RL", rl.steps, run.state["step"])
    for step in range(run.state["step"], rl.steps):
        t0 = time.perf_counter()
        # 1. rollout with the engine's weights (version = learner.version), made durable before use
        if step in logged:
            groups, stats = logged[step].groups, logged[step].stats
        else:
            groups, stats = rollout_step(run, parts, step)
            collect(run, parts, groups, stats, step=step)
        store(run, parts, groups, stats)
        # 2. learn: several updates per rollout step reuse stored groups (UTD > 1)
        t1 = time.perf_counter()
        updates = learn(run, parts)
        # 3. the engine gets a copy of the new weights and their version
        context.sync_engine(run, parts.learner.version)
        t2 = time.perf_counter()
        # 4. log, evaluate, checkpoint
        end_step(run, parts, step, {**step_metrics(updates), **rollout_metrics(groups, stats),
                                    "time/rollout_s": torch.tensor(t1 - t0), "time/learn_s": torch.tensor(t2 - t1),
                                    "time/step_s": torch.tensor(time.perf_counter() - t0)})
    run.console.end_stage()
    write_staleness(run, parts)
    run.state.update(stage="done", stage_state=None)


def rollout_step(run: Run, parts: RLParts, step: int) -> tuple[list, dict]:
    """``rl.prompts_per_step`` problems, ``rl.group_size`` responses each (plus expert traces if asked)."""
    cfg, rl = run.cfg, run.cfg.rl
    problems = run.task.problems(rl.prompts_per_step, split="train", seed=step_seed(cfg, "rl", step))
    groups, stats = rollout_groups(run.engine, run.tokenizer, problems, run.score_fn, group_size=rl.group_size,
                                   sampling=parts.sampling, seed=step_seed(cfg, "rl", step),
                                   reward_limits=RewardLimits.of(cfg.task), group_prefix=f"s{step}:")
    if rl.expert_per_group:
        add_expert_traces(groups, problems, run.tokenizer, run.score_fn, rl.expert_per_group)
    return groups, asdict(stats)
