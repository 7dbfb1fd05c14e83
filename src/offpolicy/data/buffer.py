"""Replay buffer of experience *groups* (all responses to one prompt), bounded by staleness.

A group is the unit of storage and sampling because group-relative advantages
need the whole group. Every group remembers the policy version that produced
it; ``staleness = current_version - version``. Groups older than
``max_staleness`` versions, groups over ``capacity`` and groups used
``max_uses`` times leave the buffer — each such exit is counted in
:attr:`ReplayBuffer.stats`, never silent.
"""

from __future__ import annotations

import inspect
import random
from collections import deque
from dataclasses import dataclass, field

from offpolicy.data.sampling import SAMPLERS
from offpolicy.experience import Experience


@dataclass
class Group:
    experiences: list[Experience]
    version: int  # oldest policy version among its tokens
    uses: int = 0

    @classmethod
    def of(cls, experiences: list[Experience]) -> "Group":
        return cls(experiences, min(e.min_version for e in experiences))


@dataclass
class BufferStats:
    added: int = 0
    evicted_stale: int = 0
    evicted_capacity: int = 0
    retired_used: int = 0
    sampled: int = 0


@dataclass
class ReplayBuffer:
    capacity: int = 4096
    sampling: str = "uniform"  # a name in offpolicy.data.sampling.SAMPLERS
    max_staleness: int | None = 4
    max_uses: int | None = None
    seed: int = 0
    sampling_params: dict = field(default_factory=dict)
    groups: deque = field(default_factory=deque)
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

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: Group) -> None:
        self.groups.append(group)
        self.stats.added += 1
        while len(self.groups) > self.capacity:
            self.groups.popleft()
            self.stats.evicted_capacity += 1

    def evict_stale(self, current_version: int) -> int:
        """Drop groups older than ``max_staleness`` versions; return how many left."""
        if self.max_staleness is None:
            return 0
        keep = deque(g for g in self.groups if current_version - g.version <= self.max_staleness)
        n = len(self.groups) - len(keep)
        self.groups = keep
        self.stats.evicted_stale += n
        return n

    def sample(self, n: int, current_version: int) -> list[Group]:
        """Up to ``n`` groups within the staleness bound (fewer if the buffer holds fewer)."""
        self.evict_stale(current_version)
        pool = list(self.groups)
        chosen = self._sample_fn(pool, n, self.rng, current_version=current_version, **self.sampling_params) if pool else []
        for g in chosen:
            g.uses += 1
        self.stats.sampled += len(chosen)
        if self.max_uses is not None:
            used_up = {id(g) for g in chosen if g.uses >= self.max_uses}
            if used_up:
                self.groups = deque(g for g in self.groups if id(g) not in used_up)
                self.stats.retired_used += len(used_up)
        return chosen

    # ---- persistence (part of every checkpoint: a resumed run keeps its experiences) -------
    def state_dict(self) -> dict:
        return {
            "groups": [{"experiences": [e.to_dict() for e in g.experiences], "version": g.version, "uses": g.uses}
                       for g in self.groups],
            "stats": vars(self.stats).copy(),
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.groups = deque(
            Group([Experience.from_dict(e) for e in g["experiences"]], g["version"], g["uses"]) for g in state["groups"]
        )
        self.stats = BufferStats(**state["stats"])
        self.rng.setstate(state["rng"])
