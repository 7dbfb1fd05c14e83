"""Workflows turn problems into scored experiences. Single-turn for now.

``rollout_groups`` sends one request per problem (``group_size`` samples of its
prompt) to the engine, scores the responses with the task's verifier (or a user
reward), and returns one list of :class:`~offpolicy.experience.Experience` per
problem. Provenance comes from the engine, never from the caller: the policy
version of every token (as the engine's weights were when it sampled it), the
behaviour log-probs, the engine's name and dtype, and the sampling parameters.
The tokenizer is passed in explicitly: an engine does not carry the learner's policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from offpolicy.data.rewards import RewardLimits, load_reward_fn, score_batch
from offpolicy.data.tasks import Problem
from offpolicy.experience import Experience
from offpolicy.rollout.engines import ChunkHook, Engine, Generation, Request, SamplingParams

ScoreFn = Callable[[Problem, str], float]


def make_score_fn(task, reward: str | None) -> ScoreFn:
    """The task's verifier, or the user's ``"module:function"`` reward ``(prompt, completion, answer)``."""
    if reward is None:
        return task.score
    user_fn = load_reward_fn(reward)
    return lambda problem, completion: user_fn(problem.prompt, completion, problem.answer)


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
    tokenizer,
    problems: list[Problem],
    score_fn: ScoreFn,
    *,
    group_size: int,
    sampling: SamplingParams,
    seed: int | None = None,
    reward_limits: RewardLimits = RewardLimits(),
    group_prefix: str = "",
    on_chunk: ChunkHook | None = None,
    chunk_tokens: int = 0,
) -> tuple[list[list[Experience]], RolloutStats]:
    """``group_size`` scored responses per problem, one group (list of experiences) per problem.

    ``on_chunk``/``chunk_tokens`` let the caller swap the engine's weights between decode chunks
    (partial rollouts); the experiences then carry a per-token ``policy_version`` list.
    """
    prompt_ids = [tokenizer.encode(p.prompt) for p in problems]
    t0 = time.perf_counter()
    requests = [Request(ids, group_size) for ids in prompt_ids]
    gen_groups = engine.generate(requests, sampling, seed=seed, on_chunk=on_chunk, chunk_tokens=chunk_tokens)
    t1 = time.perf_counter()
    gens = [g for group in gen_groups for g in group]
    flat_problems = [p for p in problems for _ in range(group_size)]
    texts = [tokenizer.decode(g.response_ids) for g in gens]
    scores = score_batch(score_fn, flat_problems, texts, timeout_s=reward_limits.timeout_s,
                         isolation=reward_limits.isolation, bound=reward_limits.bound)
    t2 = time.perf_counter()
    now = time.time()
    provenance = {"engine": engine.name, "sampling": sampling.as_dict(), "dtype": engine.dtype}
    groups: list[list[Experience]] = []
    for i, problem in enumerate(problems):
        first = token_version(gens[i * group_size])[0]
        group = []
        for j in range(group_size):
            k = i * group_size + j
            group.append(Experience(
                prompt_ids=prompt_ids[i], response_ids=gens[k].response_ids, reward=float(scores.rewards[k]),
                behavior_logprobs=gens[k].logprobs, policy_version=token_version(gens[k])[1], source="policy",
                group_id=f"{group_prefix}v{first}:{i}:{problem.id}", task_id=problem.id, created_at=now,
                info={"truncated": not gens[k].finished}, **provenance,
            ))
        groups.append(group)
    stats = RolloutStats(
        n=len(gens), tokens=sum(len(g.response_ids) for g in gens), seconds=t1 - t0, reward_seconds=t2 - t1,
        reward_errors=scores.n_errors, reward_timeouts=scores.n_timeouts,
        truncated=sum(not g.finished for g in gens),
    )
    return groups, stats


def token_version(g: Generation) -> tuple[int, int | list[int]]:
    """(oldest version, the experience's ``policy_version``): an int when one version made every token,
    else the per-token list (a response that spans an in-flight weight update)."""
    if not g.versions:
        raise ValueError("the engine returned a generation without per-token versions")
    lo, hi = min(g.versions), max(g.versions)
    return lo, lo if lo == hi else list(g.versions)


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
