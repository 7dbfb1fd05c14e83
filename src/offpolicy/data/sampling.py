"""Which stored groups an update trains on: a registry of buffer sampling strategies.

Every strategy is a function ``fn(pool, n, rng, *, current_version, **params) -> list[int]`` that picks
up to ``n`` distinct entries (no replacement within one update) of the buffer's
:class:`~offpolicy.data.buffer.Pool` — its live groups in arrival order, already staleness-bounded —
and returns their entry ids, using only ``rng`` (a ``random.Random`` the buffer checkpoints) for
randomness. Strategies address groups by *rank* in arrival order, never by where earlier removals
left holes, so a buffer restored from its ``state_dict`` draws what the original would have drawn
(for the weighted strategies, up to the rounding of float weight sums).

Weighted strategies draw *successively*: each next group ∝ its weight among those not drawn yet —
the law of Efraimidis–Spirakis keys ``u^(1/w)`` (Efraimidis & Spirakis, "Weighted random sampling
with a reservoir", IPL 2006; :func:`weighted_without_replacement` is the plain O(N log N) reference).

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

Cost of one draw of k groups from N stored ones: ``uniform``, ``fifo`` and ``recent_mix`` O(k log N)
(O(k) while nothing was removed out of arrival order); ``variance`` and ``return_weighted``
O(k log N) in numpy on a sum tree of weights — O(N) in numpy only when the groups already drawn
hold half of all the weight, or when ``return_weighted``'s min/max reward or α changed since the
last draw (the tree is rebuilt). The indexes behind this (:class:`UsesIndex`, :class:`WeightIndex`,
:class:`VersionIndex`) are built on a strategy's first draw and kept up to date after.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np

from offpolicy.objectives.registry import Registry

if TYPE_CHECKING:
    from offpolicy.data.buffer import Group, Pool

SAMPLERS = Registry("buffer sampling strategy")


def weighted_without_replacement(items: list, weights: list[float], n: int, rng: random.Random) -> list:
    """``n`` distinct items, item i with weight ``weights[i]`` (> 0; zero-weight items come last, at random).

    The plain reference (a key per item, one sort): the samplers draw from the same law in O(n log N).
    """
    keys = []
    for item, w in zip(items, weights):
        u = rng.random() or 1e-300
        keys.append((math.log(u) / w if w > 0 else -math.inf, rng.random(), item))
    keys.sort(key=lambda k: (k[0], k[1]), reverse=True)
    return [k[2] for k in keys[:n]]


# ---- a sum tree: draws ∝ weight in O(log N), batched in numpy ----------------------------------
class SumTree:
    """Leaf weights and all subtree sums in one array: node i holds nodes 2i + 2i+1, ``t[1]`` is the total.

    Leaves sit at ``t[size:2*size]`` (``size`` a power of two). Every operation takes a batch and runs
    ~log2(size) numpy calls, so drawing 64 leaves costs about the same at 100 or 10⁶ leaves.
    """

    def __init__(self, leaves: np.ndarray) -> None:
        self.size = 1 << max(len(leaves) - 1, 0).bit_length()  # a power of two >= len(leaves)
        self.t = np.zeros(2 * self.size)
        self.t[self.size : self.size + len(leaves)] = leaves
        lo = self.size
        while lo > 1:  # level by level, bottom up
            self.t[lo // 2 : lo] = self.t[lo : 2 * lo : 2] + self.t[lo + 1 : 2 * lo : 2]
            lo //= 2

    @property
    def total(self) -> float:
        return float(self.t[1])

    def leaves(self, pos: np.ndarray) -> np.ndarray:
        return self.t[self.size + pos]

    def set(self, pos: np.ndarray, values: np.ndarray) -> None:
        """Set the leaves at ``pos`` (distinct, < size) and recompute their ancestors (sums, not deltas: no drift)."""
        i = pos + self.size
        self.t[i] = values
        while i[0] > 1:  # every index is on the same level
            i = np.unique(i >> 1)
            self.t[i] = self.t[2 * i] + self.t[2 * i + 1]

    def find(self, u: np.ndarray) -> np.ndarray:
        """For each ``u`` in [0, total), the leaf whose cumulative-sum interval holds it."""
        i = np.ones(len(u), dtype=np.int64)
        while i[0] < self.size:
            left = self.t[2 * i]
            right = u >= left
            u = np.where(right, u - left, u)
            i = 2 * i + right
        return i - self.size

    def prefix(self, pos: np.ndarray) -> np.ndarray:
        """Sum of the leaves before each position (0 <= pos <= size)."""
        i = pos + self.size
        acc = np.zeros(len(i))
        while i[0] > 1:  # a right child adds its left sibling's whole subtree
            acc += np.where(i & 1, self.t[i - 1], 0.0)
            i = i >> 1
        return np.where(pos >= self.size, self.total, acc)


# ---- indexes a strategy builds on its first draw (the pool keeps them up to date) ---------------
class UsesIndex:
    """Live entries bucketed by ``uses``, each bucket a heap by (version, arrival): fifo's order.

    An entry moves to its next bucket lazily, when a scan finds it under its old ``uses``; removed
    entries are dropped when they surface. A bucket is read only after every lower one ran dry, so by
    then each entry that belongs in it has been moved there.
    """

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.heaps: dict[int, list[tuple[int, int]]] = {}
        for eid in pool.live_ids().tolist():
            self.add(eid, pool.slots[eid])

    def add(self, eid: int, g: "Group") -> None:
        heapq.heappush(self.heaps.setdefault(g.uses, []), (g.version, eid))

    def remove(self, eid: int, g: "Group") -> None:
        pass  # dropped when it surfaces

    def least_used(self, n: int) -> list[int]:
        """Up to ``n`` entries, least used first, then lowest version, then oldest. Changes no ``uses``."""
        out: list[int] = []
        uses = -1
        while len(out) < n:
            higher = [u for u in self.heaps if u > uses]
            if not higher:
                break
            uses = min(higher)
            out += self._take(uses, n - len(out))
        return out

    def _take(self, uses: int, n: int) -> list[int]:
        heap, taken = self.heaps[uses], []
        while heap and len(taken) < n:
            version, eid = heapq.heappop(heap)
            g = self.pool.slots[eid]
            if g is None:
                continue  # removed
            if g.uses != uses:
                self.add(eid, g)  # used since it was filed: move it up
                continue
            taken.append((version, eid))
        for item in taken:  # drawing is not using: they stay filed here until their uses change
            heapq.heappush(heap, item)
        if not heap:
            del self.heaps[uses]
        return [eid for _, eid in taken]


class WeightIndex:
    """Each entry's mean reward (cached when it arrives) and a sum tree of weights ``w(mean)``.

    Samplers ask for the tree under a ``key`` naming their weight function; the tree is rebuilt (O(N)
    in numpy) only when the key changes, else patched where entries came or went. Two lazy heaps keep
    the min and max mean reward over live entries.
    """

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.mean = np.full(max(2 * len(pool.slots), 1024), np.nan)  # by entry id; NaN: no live entry
        ids = pool.live_ids().tolist()
        means = [pool.slots[e].mean_reward for e in ids]
        self.mean[ids] = means
        self._lo = list(zip(means, ids))
        self._hi = [(-m, e) for m, e in self._lo]
        heapq.heapify(self._lo)
        heapq.heapify(self._hi)
        self.tree: SumTree | None = None
        self.key: Hashable = None
        self.pending: set[int] = set()  # entry ids changed since the tree was last brought up to date

    def add(self, eid: int, g: "Group") -> None:
        if eid >= len(self.mean):
            self.mean = np.concatenate([self.mean, np.full(len(self.mean), np.nan)])
        m = g.mean_reward
        self.mean[eid] = m
        self.pending.add(eid)
        heapq.heappush(self._lo, (m, eid))
        heapq.heappush(self._hi, (-m, eid))

    def remove(self, eid: int, g: "Group") -> None:
        self.mean[eid] = np.nan
        self.pending.add(eid)

    def extremes(self) -> tuple[float, float]:
        """(min, max) mean reward over live entries."""
        for heap in (self._lo, self._hi):
            while self.pool.slots[heap[0][1]] is None:
                heapq.heappop(heap)
        return float(self._lo[0][0]), float(-self._hi[0][0])

    def tree_for(self, key: Hashable, weight: Callable[[np.ndarray], np.ndarray]) -> SumTree:
        """The sum tree of ``weight(mean)`` over entry ids (0 where no live entry), up to date."""
        n = len(self.pool.slots)
        if self.tree is None or key != self.key or n > self.tree.size or len(self.pending) > self.tree.size // 8:
            self.tree, self.key = SumTree(self._weights(weight, np.arange(n))), key
        elif self.pending:
            pos = np.fromiter(self.pending, np.int64, len(self.pending))
            self.tree.set(pos, self._weights(weight, pos))
        self.pending.clear()
        return self.tree

    def _weights(self, weight: Callable[[np.ndarray], np.ndarray], pos: np.ndarray) -> np.ndarray:
        m = self.mean[pos]
        return np.where(np.isnan(m), 0.0, weight(np.nan_to_num(m)))


class VersionIndex:
    """Where each policy version's groups start, for ``recent_mix``.

    While versions arrive in order (the runner's case: rollouts carry the learner's version, which
    only grows), one version's groups are consecutive entries, so the live groups of a few versions
    are one interval of ranks. Out-of-order arrivals switch to a scan of the pool (O(N)) until the
    next compaction finds the entries in order again.
    """

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.runs: list[tuple[int, int]] = []  # (version, first entry id), versions increasing
        self.in_order = True
        for eid in pool.live_ids().tolist():
            self.add(eid, pool.slots[eid])

    def add(self, eid: int, g: "Group") -> None:
        if not self.runs or g.version > self.runs[-1][0]:
            self.runs.append((g.version, eid))
        elif g.version < self.runs[-1][0]:
            self.in_order = False

    def remove(self, eid: int, g: "Group") -> None:
        pass  # runs stay; a run with no live entry is skipped

    def recent(self, window: int) -> tuple[Sequence[int], Sequence[int]]:
        """Ranks of the newest present version's live groups, and of the ``window`` present versions before it."""
        if not self.in_order:
            return self._recent_by_scan(window)
        gone = 0
        while gone + 1 < len(self.runs) and self.runs[gone + 1][1] <= self.pool.head:
            gone += 1  # runs that ended before the oldest live entry
        del self.runs[:gone]
        k = window + 1
        while True:  # look back over more runs only when recent ones were emptied
            tail = self.runs[-k:]
            ranks = self.pool.rank([eid for _, eid in tail] + [len(self.pool.slots)])
            nonempty = [j for j in range(len(tail)) if ranks[j + 1] > ranks[j]]
            if len(nonempty) > window or k >= len(self.runs):
                break
            k *= 2
        newest, past = nonempty[-1], nonempty[-1 - window : -1]
        current = range(ranks[newest], ranks[newest + 1])
        return current, range(ranks[past[0]] if past else ranks[newest], ranks[newest])

    def _recent_by_scan(self, window: int) -> tuple[list[int], list[int]]:
        versions = [self.pool.slots[e].version for e in self.pool.live_ids().tolist()]
        present = sorted(set(versions), reverse=True)
        newest, past = present[0], set(present[1 : 1 + window])
        return ([r for r, v in enumerate(versions) if v == newest],
                [r for r, v in enumerate(versions) if v in past])


# ---- drawing -------------------------------------------------------------------------------------
def draw_uniform(pool: "Pool", k: int, rng: random.Random, exclude: set[int] | None = None) -> list[int]:
    """Up to ``k`` distinct live entries not in ``exclude``, uniformly: random ranks, redrawn when excluded."""
    exclude = exclude or set()
    k = min(k, len(pool) - len(exclude))
    if k <= 0:
        return []
    if not exclude:
        return pool.select(rng.sample(range(len(pool)), k))
    if 2 * (len(exclude) + k) > len(pool):  # few left to choose from: list them (O(k))
        rest = [e for e in pool.live_ids().tolist() if e not in exclude]
        return rng.sample(rest, k)
    out, seen = [], set(exclude)
    while len(out) < k:  # each draw is accepted with probability > 1/2
        for eid in pool.select([rng.randrange(len(pool)) for _ in range(k - len(out))]):
            if eid not in seen:
                seen.add(eid)
                out.append(eid)
    return out


def draw_weighted(pool: "Pool", tree: SumTree, k: int, rng: random.Random) -> list[int]:
    """Up to ``k`` distinct entries, each next one ∝ its weight in ``tree`` among those not drawn yet.

    Draws from the tree and redraws what was taken already, O(k log N), while the taken entries hold
    under half the weight; the rest then comes from Efraimidis–Spirakis keys over all live entries
    (O(N) in numpy). With no weight left, the rest is uniform (zero-weight entries come last, at random).
    """
    k = min(k, len(pool))
    out: list[int] = []
    seen: set[int] = set()
    total, taken = tree.total, 0.0
    for _ in range(64):  # each batch accepts more than half its draws in expectation
        if len(out) >= k or taken >= total / 2:
            break
        found = tree.find(np.array([rng.random() for _ in range(k - len(out))]) * total)
        for eid, w in zip(found.tolist(), tree.leaves(found).tolist()):
            if w > 0 and eid not in seen and len(out) < k:  # w == 0 only through float rounding
                seen.add(eid)
                out.append(eid)
                taken += w
    if len(out) < k and total <= 0:
        out += draw_uniform(pool, k - len(out), rng, seen)
    elif len(out) < k:
        out += _successive_by_keys(pool, tree, k - len(out), rng, seen)
    return out


def _successive_by_keys(pool: "Pool", tree: SumTree, k: int, rng: random.Random, exclude: set[int]) -> list[int]:
    """The next ``k`` of a successive weighted draw after ``exclude``: top keys log(u)/w over all live entries."""
    ids = pool.live_ids()  # (N,) arrival order
    ids = ids[~np.isin(ids, np.fromiter(exclude, np.int64, len(exclude)))]
    w = tree.leaves(ids)
    gen = np.random.default_rng(rng.getrandbits(64))
    u, tie = 1.0 - gen.random(len(ids)), gen.random(len(ids))  # u in (0, 1]
    keys = np.full(len(ids), -np.inf)
    keys[w > 0] = np.log(u[w > 0]) / w[w > 0]
    order = np.lexsort((tie, keys))[::-1][:k]  # key descending, then the random tie-break
    return ids[order].tolist()


# ---- the strategies --------------------------------------------------------------------------------
@SAMPLERS.register("fifo")
def fifo(pool: "Pool", n: int, rng: random.Random, *, current_version: int) -> list[int]:
    """Least-used groups first, oldest first among equals: every group is used once before any twice."""
    return pool.index(UsesIndex).least_used(n)


@SAMPLERS.register("uniform")
def uniform(pool: "Pool", n: int, rng: random.Random, *, current_version: int) -> list[int]:
    """Uniformly at random, without replacement."""
    return draw_uniform(pool, n, rng)


def outcome_variance(mean: np.ndarray) -> np.ndarray:
    """MMR1's OVS = p(1 − p), p a group's mean reward (its pass rate for 0/1 rewards)."""
    return np.maximum(0.0, mean * (1 - mean))


@SAMPLERS.register("variance")
def variance(pool: "Pool", n: int, rng: random.Random, *, current_version: int,
             lam: float = 0.5) -> list[int]:
    """MMR1 VAS (arXiv:2509.21268 [P]): ``⌊lam·n⌋`` draws ∝ the outcome variance, the rest uniform.

    The per-prompt score is OVS = p(1 − p) with p the group's mean reward (the pass rate for 0/1
    rewards); the diversity term TDS of the paper is left out (β = 0 here). lam = 0.5 [P].
    """
    if not 0 <= lam <= 1:
        raise ValueError(f"buffer.sampling_params.lam must be in [0, 1], got {lam}")
    k = int(lam * n)
    first = draw_weighted(pool, pool.index(WeightIndex).tree_for("ovs", outcome_variance), k, rng) if k else []
    return first + draw_uniform(pool, n - len(first), rng, set(first))


@SAMPLERS.register("return_weighted")
def return_weighted(pool: "Pool", n: int, rng: random.Random, *, current_version: int,
                    alpha: float = 0.1) -> list[int]:
    """RW (arXiv:2306.13085 [C]): draw ∝ exp(Ĝ/α), Ĝ = min-max normalised group mean reward, α = 0.1.

    Computed as exp((Ĝ − 1)/α), the same law divided by exp(1/α), so that no weight overflows.
    """
    if alpha <= 0:
        raise ValueError(f"buffer.sampling_params.alpha must be > 0, got {alpha}")
    index = pool.index(WeightIndex)
    lo, hi = index.extremes()
    if hi > lo:
        tree = index.tree_for(("rw", lo, hi, alpha), lambda m: np.exp((m - hi) / ((hi - lo) * alpha)))
    else:
        tree = index.tree_for("flat", np.ones_like)
    return draw_weighted(pool, tree, n, rng)


def mix_sides(n: int, n_current: int, n_history: int, p_off: float, rng: random.Random) -> list[bool]:
    """ReMix's side of each of up to ``n`` draws (True: history w.p. ``p_off``); a side that ran out yields."""
    sides: list[bool] = []
    while len(sides) < n and (n_current or n_history):
        off = (rng.random() < p_off and n_history > 0) or not n_current
        sides.append(off)
        n_history -= off
        n_current -= not off
    return sides


@SAMPLERS.register("recent_mix")
def recent_mix(pool: "Pool", n: int, rng: random.Random, *, current_version: int,
               p_off: float = 0.4, window: int = 2) -> list[int]:
    """ReMix's Mix-PPG data (arXiv:2507.06892 [S]): newest version w.p. 1 − p_off, else the ``window`` before it.

    p = 0.4 and N = 2 are the paper's values; the law of the lag within the window is [NF]
    (uniform here). When one side runs out, the other fills the batch.
    """
    if not 0 <= p_off <= 1 or window < 1:
        raise ValueError("buffer.sampling_params need 0 <= p_off <= 1 and window >= 1")
    current, history = pool.index(VersionIndex).recent(window)  # ranks
    sides = mix_sides(n, len(current), len(history), p_off, rng)
    from_current = iter(rng.sample(current, sides.count(False)))
    from_history = iter(rng.sample(history, sides.count(True)))
    return pool.select([next(from_history) if off else next(from_current) for off in sides])
