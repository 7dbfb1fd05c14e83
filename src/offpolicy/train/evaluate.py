"""Held-out evaluation: greedy accuracy, sampled accuracy and pass@k on problems never trained on."""

from __future__ import annotations

from offpolicy.data.rewards import RewardLimits, score_batch
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
    reward_limits: RewardLimits = RewardLimits(),
) -> dict[str, float]:
    """``eval/greedy_acc``; with ``samples > 0`` also ``eval/sampled_acc`` and ``eval/pass_at_k`` (k = samples).

    A problem counts as solved when its score is 1 (partial credit does not count as accuracy);
    ``eval/greedy_reward`` keeps the mean raw score. Scoring is bounded as in training
    (``reward_limits``: timeout, isolation, bound), so a hanging reward cannot hang an evaluation;
    ``eval/reward_errors`` counts the calls that failed, timed out or were out of bounds (scored 0).
    """
    score = lambda ps, texts: score_batch(score_fn, ps, texts, timeout_s=reward_limits.timeout_s,  # noqa: E731
                                          isolation=reward_limits.isolation, bound=reward_limits.bound)
    tok = tokenizer
    prompts = [tok.encode(p.prompt) for p in problems]
    greedy = engine.sample(prompts, SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    scored = score(problems, [tok.decode(g.response_ids) for g in greedy])
    g_scores, errors = scored.rewards, scored.n_errors + scored.n_timeouts
    out = {"eval/greedy_acc": sum(s >= 1.0 for s in g_scores) / len(problems),
           "eval/greedy_reward": sum(g_scores) / len(problems)}
    if samples > 0:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
        gens = engine.sample([p for p in prompts for _ in range(samples)], params, seed=seed)
        flat = [p for p in problems for _ in range(samples)]
        scored = score(flat, [tok.decode(g.response_ids) for g in gens])
        s_scores, errors = scored.rewards, errors + scored.n_errors + scored.n_timeouts
        solved = [s >= 1.0 for s in s_scores]
        out["eval/sampled_acc"] = sum(solved) / len(solved)
        out["eval/pass_at_k"] = sum(any(solved[i * samples:(i + 1) * samples]) for i in range(len(problems))) / len(problems)
    out["eval/reward_errors"] = float(errors)
    return out
