"""Replay buffer of experience *groups* (all responses to one prompt), bounded by staleness.

A group is the unit of storage and sampling because group-relative advantages
need the whole group. Every group remembers the policy version that produced
it; ``staleness = current_version - version``. Groups older than
``max_staleness`` versions, groups over ``capacity`` and groups used
``max_uses`` times leave the buffer — each such exit is counted in
:attr:`ReplayBuffer.stats`, never silent.

Every operation costs O(log N) or less per group added, evicted or drawn, N the
number of stored groups — not O(N) per call: the groups sit in a :class:`Pool`
in arrival order, a heap by version finds the stale ones, and the samplers read
indexes kept up to date as groups come and go (``offpolicy.data.sampling``). The
O(N) parts are amortised: a sampler's index is built on its first draw, and the
pool renumbers itself (:meth:`Pool.compact_if_sparse`) once per N removals.
"""

from __future__ import annotations

import heapq
import inspect
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Protocol, Sequence, TypeVar

import numpy as np

from offpolicy.data.sampling import SAMPLERS, SumTree
from offpolicy.experience import Experience



@dataclass
class Group:
    experiences: list[Experience]
    version: int  # oldest policy version among its tokens
    uses: int = 0

    @classmethod
    def of(cls, experiences: list[Experience]) -> "Group":
        return cls(experiences, min(e.min_version for e in experiences))

    @cached_property
    def mean_reward(self) -> float:
        """Mean reward of its responses (the pass rate for 0/1 rewards), computed once: the weighted samplers' input."""
        return sum(e.reward for e in self.experiences) / len(self.experiences)


class PoolIndex(Protocol):
    """What a sampler's index (``offpolicy.data.sampling``) hears from its :class:`Pool`: every arrival and exit."""

    def add(self, eid: int, group: Group) -> None: ...

    def remove(self, eid: int, group: Group) -> None: ...


Index = TypeVar("Index", bound=PoolIndex)


@dataclass
class BufferStats:
    added: int = 0
    evicted_stale: int = 0
    evicted_capacity: int = 0
    retired_used: int = 0
    sampled: int = 0


class Pool:
    """The stored groups in arrival order, with what the samplers need to draw from them in O(log N).

    Entry ids are arrival positions: ``slots[eid]`` is a group, or None once it left. Samplers address
    groups by *rank* (0 = the oldest live one) and :meth:`select` maps ranks to entry ids — directly
    while no group left out of order, through a sum tree of live counts otherwise — so what is drawn
    depends on the live groups in arrival order only, not on where removals left holes. When holes
    outnumber live groups, :meth:`compact_if_sparse` renumbers (amortised O(1) per removal).
    """

    def __init__(self, groups: Iterable[Group] = ()) -> None:
        self._refill(list(groups))

    def _refill(self, groups: list[Group]) -> None:
        self.slots: list[Group | None] = []
        self.head = 0  # every slot before it is None
        self.n = 0  # live groups
        self._by_version: list[tuple[int, int]] = []  # heap of (version, eid), removed entries dropped lazily
        self._counts: SumTree | None = None  # live count per slot, built when the first hole needs it
        self._pending: dict[int, float] = {}  # count changes not yet in the tree
        self._indexes: dict[type, PoolIndex] = {}
        for g in groups:
            self.add(g)

    def __len__(self) -> int:
        return self.n

    def groups(self) -> list[Group]:
        """The live groups, oldest first (O(N))."""
        return [g for g in self.slots[self.head :] if g is not None]

    def add(self, group: Group) -> int:
        eid = len(self.slots)
        self.slots.append(group)
        self.n += 1
        heapq.heappush(self._by_version, (group.version, eid))  # O(1) when versions arrive in order
        if self._counts is not None:
            self._pending[eid] = 1.0
        for index in self._indexes.values():
            index.add(eid, group)
        return eid

    def remove(self, eid: int) -> None:
        group, self.slots[eid] = self.slots[eid], None
        self.n -= 1
        while self.head < len(self.slots) and self.slots[self.head] is None:
            self.head += 1
        if self._counts is not None:
            self._pending[eid] = 0.0
        for index in self._indexes.values():
            index.remove(eid, group)

    def oldest(self) -> int:
        return self.head

    def remove_older_than(self, version: int) -> int:
        """Remove every group whose version is below ``version``; O(removed · log N). Returns how many."""
        removed = 0
        while self._by_version and self._by_version[0][0] < version:
            _, eid = heapq.heappop(self._by_version)
            if self.slots[eid] is not None:
                self.remove(eid)
                removed += 1
        return removed

    def compact_if_sparse(self) -> None:
        """Renumber the live groups 0..N-1 once holes outnumber them; indexes rebuild on their next use."""
        if len(self.slots) > 2 * self.n + 64:
            self._refill(self.groups())

    def index(self, kind: type[Index]) -> Index:
        """This pool's ``kind`` index (``kind(pool)`` on first use, then told of every add and remove)."""
        if kind not in self._indexes:
            self._indexes[kind] = kind(self)
        return self._indexes[kind]  # type: ignore[return-value]

    # ---- ranks: position among the live groups in arrival order ------------------------------
    @property
    def dense(self) -> bool:
        """No hole after the oldest live group: rank r is entry ``head + r``."""
        return len(self.slots) - self.head == self.n

    def select(self, ranks: Sequence[int]) -> list[int]:
        """Entry ids of the live groups at these ranks (each < len(self))."""
        if self.dense or not ranks:
            return [self.head + r for r in ranks]
        return self._count_tree().find(np.asarray(ranks, dtype=np.float64) + 0.5).tolist()

    def rank(self, eids: Sequence[int]) -> list[int]:
        """Live groups before each entry id (0 <= eid <= len(slots))."""
        if self.dense:
            return [max(e - self.head, 0) for e in eids]
        return self._count_tree().prefix(np.asarray(eids, dtype=np.int64)).astype(np.int64).tolist()

    def live_ids(self) -> np.ndarray:
        """Entry ids of the live groups, oldest first, (N,)."""
        if self.dense:
            return np.arange(self.head, len(self.slots))
        return np.flatnonzero(self._count_tree().leaves(np.arange(len(self.slots))))

    def _count_tree(self) -> SumTree:
        if self._counts is None or len(self.slots) > self._counts.size:
            self._counts = SumTree(np.fromiter((g is not None for g in self.slots), np.float64, len(self.slots)))
        elif self._pending:
            pos = np.fromiter(self._pending, np.int64, len(self._pending))
            self._counts.set(pos, np.fromiter(self._pending.values(), np.float64, len(self._pending)))
        self._pending.clear()
        return self._counts


@dataclass
class ReplayBuffer:
    capacity: int = 4096
    sampling: str = "uniform"  # a name in offpolicy.data.sampling.SAMPLERS
    max_staleness: int | None = 4
    max_uses: int | None = None
    seed: int = 0
    sampling_params: dict = field(default_factory=dict)
    stats: BufferStats = field(default_factory=BufferStats)

    def __post_init__(self) -> None:
        try:
            self._sample_fn = SAMPLERS[self.sampling]
        except KeyError as e:
            raise ValueError(f"buffer.sampling: {e.args[0]}") from None
        params = inspect.signature(self._sample_fn).parameters
        valid = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "current_version")
        for key in self.sampling_params:
            if key not in valid:
                raise ValueError(f"buffer.sampling_params.{key}: not a parameter of {self.sampling!r}; valid: {valid}")
        self.rng = random.Random(self.seed)
        self.pool = Pool()

    def __len__(self) -> int:
        return len(self.pool)

    @property
    def groups(self) -> tuple[Group, ...]:
        """The stored groups, oldest first (a read-only copy, O(N): for inspection, not for the hot path)."""
        return tuple(self.pool.groups())

    def add(self, group: Group) -> None:
        self.pool.add(group)
        self.stats.added += 1
        while len(self.pool) > self.capacity:
            self.pool.remove(self.pool.oldest())
            self.stats.evicted_capacity += 1
        self.pool.compact_if_sparse()

    def evict_stale(self, current_version: int) -> int:
        """Drop groups older than ``max_staleness`` versions; return how many left. O(evicted · log N)."""
        if self.max_staleness is None:
            return 0
        n = self.pool.remove_older_than(current_version - self.max_staleness)
        self.stats.evicted_stale += n
        return n

    def sample(self, n: int, current_version: int) -> list[Group]:
        """Up to ``n`` groups within the staleness bound (fewer if the buffer holds fewer)."""
        self.evict_stale(current_version)
        self.pool.compact_if_sparse()
        pool, params = self.pool, self.sampling_params
        ids = self._sample_fn(pool, n, self.rng, current_version=current_version, **params) if len(pool) else []
        chosen = [pool.slots[eid] for eid in ids]
        for g in chosen:
            g.uses += 1
        self.stats.sampled += len(chosen)
        if self.max_uses is not None:
            for eid, g in zip(ids, chosen):
                if g.uses >= self.max_uses and pool.slots[eid] is not None:
                    pool.remove(eid)
                    self.stats.retired_used += 1
        return chosen

    # ---- persistence (part of every checkpoint: a resumed run keeps its experiences) -------
    def state_dict(self) -> dict:
        return {
            "groups": [{"experiences": [e.to_dict() for e in g.experiences], "version": g.version, "uses": g.uses}
                       for g in self.pool.groups()],
            "stats": vars(self.stats).copy(),
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pool = Pool(
            Group([Experience.from_dict(e) for e in g["experiences"]], g["version"], g["uses"]) for g in state["groups"]
        )
        self.stats = BufferStats(**state["stats"])
        self.rng.setstate(state["rng"])
