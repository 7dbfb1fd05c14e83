"""Held-out evaluation: greedy accuracy, sampled accuracy and pass@k on problems never trained on."""

from __future__ import annotations

from offpolicy.data.rewards import score_batch
from offpolicy.data.tasks import Problem
from offpolicy.rollout.engines import Engine, SamplingParams
from offpolicy.rollout.workflows import ScoreFn


def evaluate(
    engine: Engine,
    tokenizer,
    problems: list[Problem],
    score_fn: ScoreFn,
    *,
    max_new_tokens: int,
    samples: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """``eval/greedy_acc``; with ``samples > 0`` also ``eval/sampled_acc`` and ``eval/pass_at_k`` (k = samples).

    A problem counts as solved when its score is 1 (partial credit does not count as accuracy);
    ``eval/greedy_reward`` keeps the mean raw score.
    """
    tok = tokenizer
    prompts = [tok.encode(p.prompt) for p in problems]
    greedy = engine.sample(prompts, SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    g_scores = score_batch(score_fn, problems, [tok.decode(g.response_ids) for g in greedy]).rewards
    out = {"eval/greedy_acc": sum(s >= 1.0 for s in g_scores) / len(problems),
           "eval/greedy_reward": sum(g_scores) / len(problems)}
    if samples > 0:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
        gens = engine.sample([p for p in prompts for _ in range(samples)], params, seed=seed)
        flat = [p for p in problems for _ in range(samples)]
        s_scores = score_batch(score_fn, flat, [tok.decode(g.response_ids) for g in gens]).rewards
        solved = [s >= 1.0 for s in s_scores]
        out["eval/sampled_acc"] = sum(solved) / len(solved)
        out["eval/pass_at_k"] = sum(any(solved[i * samples:(i + 1) * samples]) for i in range(len(problems))) / len(problems)
    return out
