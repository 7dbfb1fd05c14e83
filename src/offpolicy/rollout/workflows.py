"""Workflows turn problems into scored experiences. Single-turn for now.

``rollout_groups`` samples ``group_size`` responses per problem, scores them with
the task's verifier (or a user reward), and returns one list of
:class:`~offpolicy.experience.Experience` per problem, stamped with the engine's
policy version and behaviour log-probs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from offpolicy.data.rewards import score_batch
from offpolicy.data.tasks import Problem
from offpolicy.experience import Experience
from offpolicy.rollout.engines import Engine, SamplingParams

ScoreFn = Callable[[Problem, str], float]


@dataclass
class RolloutStats:
    n: int  # responses generated
    tokens: int  # response tokens generated
    seconds: float  # generation time (scoring excluded)
    reward_seconds: float
    reward_errors: int
    reward_timeouts: int
    truncated: int  # responses that hit max_new_tokens without EOS


def rollout_groups(
    engine: Engine,
    problems: list[Problem],
    score_fn: ScoreFn,
    *,
    group_size: int,
    sampling: SamplingParams,
    version: int,
    seed: int | None = None,
    reward_timeout_s: float | None = None,
    group_prefix: str = "",
) -> tuple[list[list[Experience]], RolloutStats]:
    tok = engine.policy.tokenizer
    prompt_ids = [tok.encode(p.prompt) for p in problems]
    flat_prompts = [ids for ids in prompt_ids for _ in range(group_size)]
    t0 = time.perf_counter()
    gens = engine.generate(flat_prompts, sampling, seed=seed)
    t1 = time.perf_counter()
    flat_problems = [p for p in problems for _ in range(group_size)]
    texts = [tok.decode(g.response_ids) for g in gens]
    scores = score_batch(score_fn, flat_problems, texts, timeout_s=reward_timeout_s)
    t2 = time.perf_counter()
    now = time.time()
    groups: list[list[Experience]] = []
    for i, problem in enumerate(problems):
        group = []
        for j in range(group_size):
            k = i * group_size + j
            group.append(Experience(
                prompt_ids=prompt_ids[i], response_ids=gens[k].response_ids, reward=float(scores.rewards[k]),
                behavior_logprobs=gens[k].logprobs, policy_version=version, source="policy",
                group_id=f"{group_prefix}v{version}:{i}:{problem.id}", task_id=problem.id, created_at=now,
                info={"truncated": not gens[k].finished},
            ))
        groups.append(group)
    stats = RolloutStats(
        n=len(gens), tokens=sum(len(g.response_ids) for g in gens), seconds=t1 - t0, reward_seconds=t2 - t1,
        reward_errors=scores.n_errors, reward_timeouts=scores.n_timeouts,
        truncated=sum(not g.finished for g in gens),
    )
    return groups, stats


def expert_experiences(problems: list[Problem], tokenizer, version: int = 0) -> list[Experience]:
    """Expert traces (prompt + the task's solution + EOS): no behaviour log-probs, source ``expert``."""
    out = []
    for p in problems:
        if p.solution is None:
            raise ValueError(f"problem {p.id} has no expert solution; SFT needs a task that provides them")
        out.append(Experience(
            prompt_ids=tokenizer.encode(p.prompt), response_ids=tokenizer.encode(p.solution) + [tokenizer.eos_id],
            reward=1.0, policy_version=version, source="expert", group_id=f"expert:{p.id}", task_id=p.id,
        ))
    return out


def add_expert_traces(groups: list[list[Experience]], problems: list[Problem], tokenizer, score_fn: ScoreFn,
                      per_group: int) -> None:
    """Append ``per_group`` expert traces (the task's solution) to each group, in place (LUFFY/CHORD mixing).

    The traces are scored by the same verifier as the policy's responses, carry no behaviour
    log-probs and have ``source="expert"``; they share the group's id, so group-relative
    advantages compare them with the policy's own attempts at the same prompt.
    """
    for group, problem in zip(groups, problems):
        expert = expert_experiences([problem], tokenizer, version=group[0].min_version)[0]
        expert.reward = float(score_fn(problem, problem.solution or ""))
        expert.group_id = group[0].group_id
        group.extend(Experience(**{**expert.to_dict(), "info": {}}) for _ in range(per_group))
