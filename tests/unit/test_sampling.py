"""Buffer sampling strategies: what each one prefers, determinism, and parameter validation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from offpolicy.data.buffer import Group, ReplayBuffer
from offpolicy.data.sampling import SAMPLERS, weighted_without_replacement
from offpolicy.experience import Experience


def group(rewards, version=0, uses=0, tag=""):
    exps = [Experience(prompt_ids=[5], response_ids=[6], reward=r, policy_version=version, group_id=tag) for r in rewards]
    return Group(exps, version, uses)


def test_registry_names_and_unknown_name():
    assert {"fifo", "uniform", "variance", "return_weighted", "recent_mix"} <= set(SAMPLERS)
    with pytest.raises(KeyError, match="valid names"):
        SAMPLERS["lifo"]


def test_weighted_without_replacement_is_distinct_and_prefers_heavy_items():
    rng = random.Random(0)
    counts = Counter()
    for _ in range(2000):
        picked = weighted_without_replacement(["a", "b", "c"], [8.0, 1.0, 1.0], 1, rng)
        counts[picked[0]] += 1
    # P(a first) = 8/10
    assert 0.76 < counts["a"] / 2000 < 0.84
    assert sorted(weighted_without_replacement(list("abcd"), [1, 2, 3, 0], 4, rng)) == list("abcd")


def test_fifo_uses_least_used_then_oldest():
    gs = [group([0, 1], version=2), group([0, 1], version=0, uses=1), group([0, 1], version=1)]
    assert SAMPLERS["fifo"](gs, 2, random.Random(0), current_version=3) == [gs[2], gs[0]]


def test_variance_with_lam_one_prefers_uncertain_groups():
    # p(1-p): 0.25 for a half-correct group, 0 for all-correct / all-wrong ones
    gs = [group([1, 1]), group([0, 0]), group([0, 1]), group([1, 0])]
    picked = SAMPLERS["variance"](gs, 2, random.Random(0), current_version=0, lam=1.0)
    assert {id(g) for g in picked} == {id(gs[2]), id(gs[3])}


def test_return_weighted_prefers_high_reward():
    gs = [group([0.0, 0.0]), group([1.0, 1.0])]
    rng = random.Random(1)
    # weights exp(0/0.1)=1 vs exp(1/0.1)=e^10: the rewarded group is drawn first almost surely
    firsts = Counter(id(SAMPLERS["return_weighted"](gs, 1, rng, current_version=0)[0]) for _ in range(200))
    assert firsts[id(gs[1])] >= 199


def test_recent_mix_extremes():
    new = [group([0, 1], version=5, tag=f"n{i}") for i in range(4)]
    old = [group([0, 1], version=v, tag=f"o{v}") for v in (3, 4)] + [group([0, 1], version=1, tag="ancient")]
    rng = random.Random(0)
    only_new = SAMPLERS["recent_mix"](new + old, 3, rng, current_version=5, p_off=0.0, window=2)
    assert all(g.version == 5 for g in only_new)
    mostly_old = SAMPLERS["recent_mix"](new + old, 3, rng, current_version=5, p_off=1.0, window=2)
    assert [g.version for g in mostly_old[:2]] and all(g.version in (3, 4) for g in mostly_old[:2])
    assert mostly_old[2].version == 5  # history (window 2 = versions 4, 3) ran out; the newest fills in
    assert all(g.version != 1 for g in mostly_old)  # outside the window


def test_buffer_validates_sampling_params():
    with pytest.raises(ValueError, match="buffer.sampling_params.gamma.*valid: \\['lam'\\]"):
        ReplayBuffer(sampling="variance", sampling_params={"gamma": 1})
    buf = ReplayBuffer(sampling="return_weighted", sampling_params={"alpha": 0.5}, max_staleness=None, seed=3)
    for r in (0.0, 1.0, 0.5):
        buf.add(group([r, r]))
    again = ReplayBuffer(sampling="return_weighted", sampling_params={"alpha": 0.5}, max_staleness=None, seed=3)
    for g in list(buf.groups):
        again.add(Group(g.experiences, g.version))
    assert [_m(g) for g in buf.sample(2, 0)] == [_m(g) for g in again.sample(2, 0)]  # same seed, same draw


def _m(g):
    return g.experiences[0].reward
