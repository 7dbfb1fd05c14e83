"""Which stored groups an update trains on: a registry of buffer sampling strategies.

Every strategy is a function ``fn(groups, n, rng, *, current_version, **params) -> list[Group]``
that picks up to ``n`` distinct groups (no replacement within one update) from the
staleness-bounded pool, using only ``rng`` (a ``random.Random`` the buffer checkpoints) for
randomness. Weighted strategies draw without replacement with Efraimidis–Spirakis keys
``u^(1/w)`` (Efraimidis & Spirakis, "Weighted random sampling with a reservoir", IPL 2006).

=================  ==========================================================================
``fifo``           least-used first, then oldest first (each group consumed in arrival order)
``uniform``        uniformly at random
``variance``       MMR1 variance-aware sampling (arXiv:2509.21268): a fraction ``lam`` of the
                   draws ∝ the group's outcome variance p(1−p), the rest uniform
``return_weighted``  ∝ exp(Ĝ/α) with Ĝ the min-max normalised group mean reward
                   (arXiv:2306.13085, α = 0.1)
``recent_mix``     ReMix's data mix (arXiv:2507.06892, [S]): each draw comes from the newest
                   policy version's groups with probability 1 − ``p_off`` and from the
                   ``window`` previous versions' groups with probability ``p_off``
=================  ==========================================================================
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from offpolicy.objectives.registry import Registry

if TYPE_CHECKING:
    from offpolicy.data.buffer import Group

SAMPLERS = Registry("buffer sampling strategy")


def weighted_without_replacement(items: list, weights: list[float], n: int, rng: random.Random) -> list:
    """``n`` distinct items, item i with weight ``weights[i]`` (> 0; zero-weight items come last, at random)."""
    keys = []
    for item, w in zip(items, weights):
        u = rng.random() or 1e-300
        keys.append((math.log(u) / w if w > 0 else -math.inf, rng.random(), item))
    keys.sort(key=lambda k: (k[0], k[1]), reverse=True)
    return [k[2] for k in keys[:n]]


def _mean_reward(g: "Group") -> float:
    return sum(e.reward for e in g.experiences) / len(g.experiences)


@SAMPLERS.register("fifo")
def fifo(groups: list["Group"], n: int, rng: random.Random, *, current_version: int) -> list["Group"]:
    """Least-used groups first, oldest first among equals: every group is used once before any twice."""
    return sorted(groups, key=lambda g: (g.uses, g.version))[:n]


@SAMPLERS.register("uniform")
def uniform(groups: list["Group"], n: int, rng: random.Random, *, current_version: int) -> list["Group"]:
    """Uniformly at random, without replacement."""
    return rng.sample(groups, min(n, len(groups)))


@SAMPLERS.register("variance")
def variance(groups: list["Group"], n: int, rng: random.Random, *, current_version: int,
             lam: float = 0.5) -> list["Group"]:
    """MMR1 VAS (arXiv:2509.21268 [P]): ``⌊lam·n⌋`` draws ∝ the outcome variance, the rest uniform.

    The per-prompt score is OVS = p(1 − p) with p the group's mean reward (the pass rate for 0/1
    rewards); the diversity term TDS of the paper is left out (β = 0 here). lam = 0.5 [P].
    """
    if not 0 <= lam <= 1:
        raise ValueError(f"buffer.sampling_params.lam must be in [0, 1], got {lam}")
    k = int(lam * n)
    scores = [max(0.0, p * (1 - p)) for p in map(_mean_reward, groups)]
    first = weighted_without_replacement(groups, scores, k, rng) if k else []
    chosen = {id(g) for g in first}
    rest = [g for g in groups if id(g) not in chosen]
    return first + rng.sample(rest, min(n - len(first), len(rest)))


@SAMPLERS.register("return_weighted")
def return_weighted(groups: list["Group"], n: int, rng: random.Random, *, current_version: int,
                    alpha: float = 0.1) -> list["Group"]:
    """RW (arXiv:2306.13085 [C]): draw ∝ exp(Ĝ/α), Ĝ = min-max normalised group mean reward, α = 0.1."""
    if alpha <= 0:
        raise ValueError(f"buffer.sampling_params.alpha must be > 0, got {alpha}")
    means = [_mean_reward(g) for g in groups]
    lo, hi = min(means), max(means)
    weights = [math.exp(((m - lo) / (hi - lo) if hi > lo else 0.0) / alpha) for m in means]
    return weighted_without_replacement(groups, weights, n, rng)


@SAMPLERS.register("recent_mix")
def recent_mix(groups: list["Group"], n: int, rng: random.Random, *, current_version: int,
               p_off: float = 0.4, window: int = 2) -> list["Group"]:
    """ReMix's Mix-PPG data (arXiv:2507.06892 [S]): newest version w.p. 1 − p_off, else the ``window`` before it.

    p = 0.4 and N = 2 are the paper's values; the law of the lag within the window is [NF]
    (uniform here). When one side runs out, the other fills the batch.
    """
    if not 0 <= p_off <= 1 or window < 1:
        raise ValueError("buffer.sampling_params need 0 <= p_off <= 1 and window >= 1")
    versions = sorted({g.version for g in groups}, reverse=True)
    newest, past = versions[0], set(versions[1 : 1 + window])
    current = [g for g in groups if g.version == newest]
    history = [g for g in groups if g.version in past]
    rng.shuffle(current)
    rng.shuffle(history)
    out = []
    while len(out) < n and (current or history):
        side = history if (rng.random() < p_off and history) or not current else current
        out.append(side.pop())
    return out
