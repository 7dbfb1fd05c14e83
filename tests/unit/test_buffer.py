"""Replay buffer: every exit (stale, over capacity, used up) is counted; fifo vs uniform; persistence."""

from __future__ import annotations

import random

import pytest
import torch

from offpolicy.data.buffer import BufferStats, Group, ReplayBuffer
from offpolicy.experience import Experience


def group(version, tag="", n=2):
    return Group.of([Experience([1, 2], [3, 4], reward=float(i), behavior_logprobs=[-0.5, -1.0],
                                policy_version=version, group_id=f"{tag}v{version}") for i in range(n)])


def test_group_version_is_the_oldest_token_version():
    g = Group.of([Experience([1], [2, 3], policy_version=[4, 5]), Experience([1], [2], policy_version=6)])
    assert g.version == 4 and g.uses == 0


def test_staleness_eviction_is_counted():
    buf = ReplayBuffer(max_staleness=2)
    for v in range(5):
        buf.add(group(v))
    assert buf.evict_stale(current_version=4) == 2  # versions 0 and 1 are 4 and 3 versions old
    assert [g.version for g in buf.groups] == [2, 3, 4]
    assert buf.stats.evicted_stale == 2
    # sampling evicts first, so nothing older than the bound is ever returned
    chosen = buf.sample(10, current_version=6)
    assert {g.version for g in chosen} == {4} and buf.stats.evicted_stale == 4


def test_no_staleness_bound_keeps_everything():
    buf = ReplayBuffer(max_staleness=None)
    buf.add(group(0))
    assert buf.evict_stale(1000) == 0 and len(buf) == 1


def test_capacity_evicts_the_oldest_and_counts_it():
    buf = ReplayBuffer(capacity=3, max_staleness=None)
    for v in range(5):
        buf.add(group(v))
    assert len(buf) == 3 and [g.version for g in buf.groups] == [2, 3, 4]
    assert buf.stats.added == 5 and buf.stats.evicted_capacity == 2


def test_max_uses_retires_groups_and_counts_them():
    buf = ReplayBuffer(sampling="fifo", max_uses=2, max_staleness=None)
    for v in range(3):
        buf.add(group(v))
    first = buf.sample(2, 0)
    assert [g.uses for g in first] == [1, 1] and len(buf) == 3
    second = buf.sample(3, 0)  # fifo prefers the least used: version 2 first, then 0 and 1
    assert [g.version for g in second] == [2, 0, 1]
    assert len(buf) == 1 and buf.stats.retired_used == 2  # 0 and 1 reached 2 uses
    assert buf.groups[0].version == 2
    assert buf.stats.sampled == 5


def test_fifo_takes_least_used_then_oldest():
    buf = ReplayBuffer(sampling="fifo", max_staleness=None)
    for v in (3, 1, 2):
        buf.add(group(v))
    assert [g.version for g in buf.sample(2, 3)] == [1, 2]
    assert [g.version for g in buf.sample(2, 3)] == [3, 1]


def test_uniform_is_seeded_and_samples_without_replacement():
    def draws(seed):
        buf = ReplayBuffer(sampling="uniform", max_staleness=None, seed=seed)
        for v in range(20):
            buf.add(group(v))
        return [[g.version for g in buf.sample(5, 20)] for _ in range(4)]

    a, b, c = draws(0), draws(0), draws(1)
    assert a == b and a != c
    assert all(len(set(d)) == 5 for d in a)
    assert len({v for d in a for v in d}) > 5  # not always the same groups


def test_sample_returns_fewer_when_the_buffer_holds_fewer():
    buf = ReplayBuffer()
    assert buf.sample(4, 0) == []
    buf.add(group(0))
    assert len(buf.sample(4, 0)) == 1


def test_unknown_sampling_is_rejected():
    with pytest.raises(ValueError, match="buffer.sampling"):
        ReplayBuffer(sampling="priority")


def test_state_dict_round_trip_restores_groups_stats_and_rng():
    buf = ReplayBuffer(capacity=6, sampling="uniform", max_staleness=3, seed=5)
    for v in range(8):
        buf.add(Group.of([Experience([1], [2, 3], reward=0.5, behavior_logprobs=[-0.1, -0.2],
                                     policy_version=[v, v + 1], group_id=f"g{v}", info={"truncated": v % 2 == 0})]))
    buf.sample(2, current_version=7)
    state = buf.state_dict()
    restored = ReplayBuffer(capacity=6, sampling="uniform", max_staleness=3, seed=999)
    restored.load_state_dict(state)
    assert [g.experiences for g in restored.groups] == [g.experiences for g in buf.groups]
    assert [(g.version, g.uses) for g in restored.groups] == [(g.version, g.uses) for g in buf.groups]
    assert restored.stats == buf.stats and isinstance(restored.stats, BufferStats)
    # the sampling RNG continues where it was: both draw the same groups next
    assert [g.experiences[0].group_id for g in restored.sample(3, 8)] == [g.experiences[0].group_id
                                                                           for g in buf.sample(3, 8)]


def test_state_dict_survives_torch_save(tmp_path):
    buf = ReplayBuffer(max_staleness=None)
    buf.add(group(1, n=3))
    torch.save(buf.state_dict(), tmp_path / "buf.pt")
    restored = ReplayBuffer(max_staleness=None)
    restored.load_state_dict(torch.load(tmp_path / "buf.pt", weights_only=False))
    assert restored.groups[0].experiences == buf.groups[0].experiences


# ---- against the old O(N)-per-call buffer, kept here as the reference ---------------------------
class ReferenceBuffer:
    """The buffer as it was: one list in arrival order, filtered and re-sorted on every call."""

    def __init__(self, capacity, max_staleness, max_uses):
        self.capacity, self.max_staleness, self.max_uses = capacity, max_staleness, max_uses
        self.groups, self.stats = [], BufferStats()

    def add(self, g):
        self.groups.append(g)
        self.stats.added += 1
        while len(self.groups) > self.capacity:
            self.groups.pop(0)
            self.stats.evicted_capacity += 1

    def evict_stale(self, current_version):
        keep = [g for g in self.groups if current_version - g.version <= self.max_staleness]
        self.stats.evicted_stale += len(self.groups) - len(keep)
        self.groups = keep

    def retire(self, chosen):
        self.stats.sampled += len(chosen)
        used_up = {id(g) for g in chosen if g.uses >= self.max_uses}
        self.groups = [g for g in self.groups if id(g) not in used_up]
        self.stats.retired_used += len(used_up)


@pytest.mark.parametrize("sampling", ["fifo", "uniform", "variance", "return_weighted", "recent_mix"])
def test_every_sampler_keeps_the_buffer_invariants_against_the_reference(sampling):
    """Random adds (some out of version order), version bumps and samples: the same groups stay, every exit
    is counted the same way, no draw breaks the staleness bound or max_uses, fifo draws exactly the same."""
    rng = random.Random(sum(map(ord, sampling)))
    buf = ReplayBuffer(capacity=12, sampling=sampling, max_staleness=3, max_uses=3, seed=1)
    ref = ReferenceBuffer(12, 3, 3)
    version, serial = 0, 0
    for _ in range(600):
        op = rng.random()
        if op < 0.6:
            late = rng.random() < 0.15  # e.g. a group whose rollout started before the last update
            g = Group.of([Experience([1], [2], reward=float(rng.random() < 0.5), policy_version=version - late * 2,
                                     group_id=f"g{serial}") for _ in range(2)])
            serial += 1
            buf.add(g)
            ref.add(g)
        elif op < 0.65:
            version += 1
        else:
            n = rng.randrange(1, 9)
            ref.evict_stale(version)
            uses_before = {id(g): g.uses for g in ref.groups}
            chosen = buf.sample(n, version)
            assert {id(g) for g in chosen} <= set(uses_before)  # stored and within the staleness bound
            assert all(version - g.version <= 3 and g.uses <= 3 for g in chosen)
            eligible = ref.groups
            if sampling == "recent_mix":
                allowed = sorted({g.version for g in ref.groups}, reverse=True)[:3]  # newest + window 2
                eligible = [g for g in ref.groups if g.version in allowed]
            assert len(chosen) == min(n, len(eligible)) and len({id(g) for g in chosen}) == len(chosen)
            assert {id(g) for g in chosen} <= {id(g) for g in eligible}
            if sampling == "fifo":
                assert chosen == sorted(ref.groups, key=lambda g: (uses_before[id(g)], g.version))[:n]
            ref.retire(chosen)
        assert [id(g) for g in buf.groups] == [id(g) for g in ref.groups]
        assert buf.stats == ref.stats
    assert buf.stats.retired_used and buf.stats.evicted_stale and buf.stats.evicted_capacity


@pytest.mark.parametrize("sampling", ["fifo", "uniform", "variance", "return_weighted", "recent_mix"])
def test_a_restored_buffer_draws_what_the_original_draws_despite_holes(sampling):
    """Draws depend on the live groups in arrival order, not on where removals left holes: resume parity."""
    def fill(buf, versions, start):
        for i, v in enumerate(versions):
            buf.add(Group.of([Experience([1], [2], reward=float((start + i) % 3 == 0), policy_version=v,
                                         group_id=f"g{start + i}"), Experience([1], [2], policy_version=v)]))

    kwargs = dict(capacity=50, sampling=sampling, max_staleness=4, max_uses=2)
    buf = ReplayBuffer(**kwargs, seed=7)
    fill(buf, [1 if i == 30 else i // 6 for i in range(40)], 0)  # #30 arrives late, from version 1
    for _ in range(5):
        buf.sample(5, 6)  # evicts #30 and retires some (max_uses 2): holes in the middle
    assert not buf.pool.dense
    restored = ReplayBuffer(**kwargs, seed=123)
    restored.load_state_dict(buf.state_dict())
    assert restored.pool.dense
    for step in range(6):
        fill(buf, [7 + step] * 4, 100 + 4 * step)
        fill(restored, [7 + step] * 4, 100 + 4 * step)
        ids = [[g.experiences[0].group_id for g in b.sample(6, 8 + step)] for b in (buf, restored)]
        assert ids[0] == ids[1], step
    assert buf.stats == restored.stats


# ---- cost, structurally: what a call reads, not how long it takes --------------------------------
class CountingList(list):
    reads = 0

    def __getitem__(self, i):
        CountingList.reads += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("sampling", ["fifo", "uniform", "variance", "return_weighted", "recent_mix"])
def test_staleness_eviction_and_draws_read_only_the_groups_they_touch(sampling):
    buf = ReplayBuffer(capacity=10_000, sampling=sampling, max_staleness=50, seed=0)
    for i in range(3_000):
        buf.add(group(i // 20))  # 150 versions of 20 groups
    buf.sample(8, current_version=150)  # builds the sampler's index (one O(N) pass), evicts versions < 100
    buf.pool.slots = CountingList(buf.pool.slots)
    CountingList.reads = 0
    assert buf.evict_stale(current_version=150) == 0 and CountingList.reads == 0  # nothing stale: nothing read
    assert buf.evict_stale(current_version=151) == 20 and CountingList.reads <= 5 * 20  # O(evicted)
    CountingList.reads = 0
    assert len(buf.sample(8, current_version=151)) == 8
    assert CountingList.reads <= 64  # of the 980 stored groups: the k drawn, and removed ones dropped lazily
