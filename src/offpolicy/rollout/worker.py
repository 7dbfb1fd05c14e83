"""A rollout worker: its own engine (own weights, own version), the task's verifier, and one method
that turns a :class:`Job` (a slice of one rollout step's problems) into scored groups.

It knows nothing of Ray: the async loop wraps it in a Ray actor, and the schedule replayer
(and the tests) call it in-process. Every token of what it returns carries the version of the
weights that produced it — the caller never stamps one on its behalf.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from offpolicy.data.tasks import Problem, make_task
from offpolicy.policy.model import Policy
from offpolicy.rollout.engines import ChunkHook, SamplingParams, make_engine
from offpolicy.data.rewards import RewardLimits
from offpolicy.rollout.workflows import add_expert_traces, make_score_fn, rollout_groups


@dataclass
class Job:
    """One request of rollout step ``step``: ``problems`` (its ``chunk``-th slice), sampled with ``seed``."""

    step: int
    chunk: int
    problems: list[Problem]
    seed: int
    prefix: str  # group ids start with it (unique per step and chunk)


@dataclass
class JobResult:
    step: int
    chunk: int
    groups: list  # list[list[Experience]]
    stats: dict[str, Any]  # RolloutStats as a dict
    start_version: int  # the engine's version when the job started
    step_versions: list[int] = field(default_factory=list)  # weights version at every decode step
    busy_s: float = 0.0  # wall time the worker spent on the job (generation + scoring)


@dataclass
class WorkerSpec:
    """What a worker needs to build itself (picklable: it crosses to Ray actors)."""

    task_name: str
    task_params: dict[str, Any]
    reward: str | None
    reward_limits: RewardLimits  # timeout, isolation and bound of reward calls
    sampling: SamplingParams
    group_size: int
    expert_per_group: int = 0
    threads: int = 1
    chunk_tokens: int = 0  # > 0: in-flight weight swaps between decode chunks of this many tokens


class RolloutWorker:
    def __init__(self, policy: Policy, spec: WorkerSpec, version: int = 0) -> None:
        self.spec = spec
        self.threads = spec.threads
        self.engine = make_engine(policy, version=version)
        self.tokenizer = policy.tokenizer
        self.task = make_task(spec.task_name, **spec.task_params)
        self.score_fn = make_score_fn(self.task, spec.reward)

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.engine.load_weights(state, version)

    def run(self, job: Job, on_chunk: ChunkHook | None = None) -> JobResult:
        """Generate and score ``job``; ``on_chunk`` (with ``spec.chunk_tokens``) may swap weights mid-way."""
        spec, t0 = self.spec, time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        start_version = self.engine.version

        def hook() -> None:
            if on_chunk is not None:
                on_chunk()

        try:
            groups, stats = rollout_groups(
                self.engine, self.tokenizer, job.problems, self.score_fn, group_size=spec.group_size,
                sampling=spec.sampling, seed=job.seed, reward_limits=spec.reward_limits,
                group_prefix=job.prefix, on_chunk=hook if spec.chunk_tokens else None,
                chunk_tokens=spec.chunk_tokens)
        finally:
            torch.set_num_threads(threads)
        if spec.expert_per_group:
            add_expert_traces(groups, job.problems, self.tokenizer, self.score_fn, spec.expert_per_group)
        longest = max((e for g in groups for e in g if e.source == "policy"), key=lambda e: len(e.response_ids))
        v = longest.policy_version
        versions = list(v) if isinstance(v, list) else [v] * len(longest.response_ids)
        return JobResult(job.step, job.chunk, groups, asdict(stats), start_version, versions,
                         time.perf_counter() - t0)
