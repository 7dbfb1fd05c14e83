"""Replay buffer: every exit (stale, over capacity, used up) is counted; fifo vs uniform; persistence."""

from __future__ import annotations

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
