"""Buffer sampling strategies: the law each one draws from (against hand-computed probabilities), the
sum tree against a naive cumulative sum, determinism, and parameter validation."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest

from offpolicy.data.buffer import Group, Pool, ReplayBuffer
from offpolicy.data.sampling import SAMPLERS, SumTree, draw_weighted, weighted_without_replacement
from offpolicy.experience import Experience


def group(rewards, version=0, uses=0, tag=""):
    exps = [Experience(prompt_ids=[5], response_ids=[6], reward=r, policy_version=version, group_id=tag)
            for r in rewards]
    return Group(exps, version, uses)


def draw(name, pool, n, rng, **params):
    """The groups a strategy picks from ``pool`` (it returns entry ids)."""
    return [pool.slots[e] for e in SAMPLERS[name](pool, n, rng, current_version=0, **params)]


def assert_law(counts: Counter, expected: dict, trials: int) -> None:
    """Every outcome's frequency within 4.5 standard errors of its exact probability; nothing unexpected."""
    assert set(counts) <= set(expected), set(counts) - set(expected)
    for outcome, p in expected.items():
        se = math.sqrt(p * (1 - p) / trials)
        assert abs(counts[outcome] / trials - p) <= 4.5 * se + 1e-9, (outcome, counts[outcome] / trials, p)


def successive_law(weights: list[float], k: int) -> dict[tuple, float]:
    """Exact probability of every ordered draw of ``k`` distinct indices, each next one ∝ weight among the rest."""
    law = {}
    for seq in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, sum(weights)
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        law[seq] = p
    return law


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


# ---- the sum tree (vectorised) against a naive cumulative sum -----------------------------------
def test_sum_tree_find_prefix_and_set_match_a_cumulative_sum():
    rng = np.random.default_rng(0)
    w = rng.random(37) * (rng.random(37) > 0.3)  # some zeros, a size that is not a power of two
    tree = SumTree(w)
    assert tree.size == 64 and tree.total == pytest.approx(w.sum())
    cum = np.concatenate([[0.0], np.cumsum(w)])
    pos = np.arange(38)
    np.testing.assert_allclose(tree.prefix(pos), cum[pos], atol=1e-12)
    u = rng.random(500) * w.sum()
    np.testing.assert_array_equal(tree.find(u), np.searchsorted(cum, u, side="right") - 1)
    assert (w[tree.find(u)] > 0).all()  # never a zero-weight leaf
    w[[3, 20, 36]] = [5.0, 0.0, 2.5]
    tree.set(np.array([3, 20, 36]), w[[3, 20, 36]])
    np.testing.assert_allclose(tree.t[1:], SumTree(w).t[1:], atol=1e-12)  # patched == rebuilt


# ---- uniform -------------------------------------------------------------------------------------
def test_uniform_draws_every_ordered_pair_equally_often():
    pool, rng = Pool(group([0, 1], tag=str(i)) for i in range(5)), random.Random(0)
    trials = 6000
    counts = Counter(tuple(g.experiences[0].group_id for g in draw("uniform", pool, 2, rng)) for _ in range(trials))
    assert_law(counts, {(a, b): 1 / 20 for a, b in itertools.permutations("01234", 2)}, trials)


def test_uniform_is_uniform_over_live_groups_whatever_holes_removals_left():
    pool, rng = Pool(group([0, 1], tag=str(i)) for i in range(9)), random.Random(1)
    for eid in (0, 3, 4, 8):
        pool.remove(eid)
    assert not pool.dense and len(pool) == 5
    trials = 5000
    counts = Counter(frozenset(g.experiences[0].group_id for g in draw("uniform", pool, 2, rng)) for _ in range(trials))
    assert_law(counts, {frozenset(p): 1 / 10 for p in itertools.combinations("12567", 2)}, trials)


# ---- fifo ----------------------------------------------------------------------------------------
def test_fifo_uses_least_used_then_oldest():
    gs = [group([0, 1], version=2), group([0, 1], version=0, uses=1), group([0, 1], version=1)]
    assert draw("fifo", Pool(gs), 2, random.Random(0)) == [gs[2], gs[0]]


def test_fifo_matches_a_full_sort_by_uses_then_version_through_use_and_removal():
    rng = random.Random(3)
    gs = [group([0, 1], version=rng.randrange(6), uses=rng.randrange(3)) for _ in range(40)]
    pool = Pool(gs)
    for step in range(60):
        live = pool.groups()
        expected = sorted(live, key=lambda g: (g.uses, g.version))[:7]  # stable: arrival order among equals
        ids = SAMPLERS["fifo"](pool, 7, rng, current_version=0)
        assert [pool.slots[e] for e in ids] == expected, step
        for e in ids:
            pool.slots[e].uses += 1
        if step % 3 == 0:  # groups leave (as with max_uses) and arrive
            pool.remove(ids[0])
            pool.add(group([1, 0], version=rng.randrange(6)))


# ---- weighted ------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,k", [([8.0, 1.0, 1.0, 2.0], 2), ([8.0, 1.0, 1.0], 3), ([0.0, 3.0, 0.0, 1.0], 3)])
def test_draw_weighted_is_successive_sampling(weights, k):
    # covers both paths: rejection on the tree, and keys over all entries once half the weight is taken;
    # zero-weight entries come last, in random order
    pool, rng = Pool(group([0, 1]) for _ in weights), random.Random(2)
    tree, trials = SumTree(np.array(weights)), 6000
    counts = Counter(tuple(draw_weighted(pool, tree, k, rng)) for _ in range(trials))
    law = successive_law([w if w > 0 else 1e-12 for w in weights], k)  # ~0: last, uniformly
    assert_law(counts, {s: p for s, p in law.items() if p > 1e-9}, trials)


def test_return_weighted_is_proportional_to_exp_of_normalised_mean_reward():
    means = [0.0, 0.25, 0.5, 1.0]  # min-max normalised: the same; alpha 0.5 keeps every weight visible
    pool, rng, trials = Pool(group([m, m]) for m in means), random.Random(4), 6000
    weights = [math.exp(m / 0.5) for m in means]
    counts = Counter(tuple(means.index(g.mean_reward) for g in draw("return_weighted", pool, 2, rng, alpha=0.5))
                     for _ in range(trials))
    assert_law(counts, successive_law(weights, 2), trials)


def test_return_weighted_follows_the_pool_as_min_and_max_change():
    pool, rng = Pool([group([0.0, 0.0]), group([1.0, 1.0])]), random.Random(1)
    # weights exp(0/0.1)=1 vs exp(1/0.1)=e^10: the rewarded group is drawn first almost surely
    assert sum(draw("return_weighted", pool, 1, rng)[0].mean_reward == 1.0 for _ in range(200)) >= 199
    pool.add(group([4.0, 4.0]))  # new max: 1.0 now normalises to 0.25, and 4.0 is drawn first
    assert sum(draw("return_weighted", pool, 1, rng)[0].mean_reward == 4.0 for _ in range(200)) >= 199
    pool.remove(2)
    pool.remove(1)  # one group left: min == max, every weight 1
    assert [g.mean_reward for g in draw("return_weighted", pool, 3, rng)] == [0.0]


def test_variance_with_lam_one_prefers_uncertain_groups():
    # p(1-p): 0.25 for a half-correct group, 0 for all-correct / all-wrong ones
    gs = [group([1, 1]), group([0, 0]), group([0, 1]), group([1, 0])]
    picked = draw("variance", Pool(gs), 2, random.Random(0), lam=1.0)
    assert {id(g) for g in picked} == {id(gs[2]), id(gs[3])}


def test_variance_mixes_weighted_and_uniform_draws():
    # n = 2, lam = 0.5: the first ∝ p(1-p), the second uniform among the other three
    gs = [group([1, 1, 1, 0]), group([1, 0]), group([0, 0]), group([1, 0, 0, 0, 0, 0, 0, 0])]
    w = [0.1875, 0.25, 0.0, 0.109375]
    pool, rng, trials = Pool(gs), random.Random(5), 6000
    counts = Counter(tuple(gs.index(g) for g in draw("variance", pool, 2, rng, lam=0.5)) for _ in range(trials))
    assert_law(counts, {(i, j): w[i] / sum(w) / 3 for i, j in itertools.permutations(range(4), 2)}, trials)


# ---- recent_mix ----------------------------------------------------------------------------------
def test_recent_mix_extremes():
    new = [group([0, 1], version=5, tag=f"n{i}") for i in range(4)]
    old = [group([0, 1], version=v, tag=f"o{v}") for v in (3, 4)] + [group([0, 1], version=1, tag="ancient")]
    rng = random.Random(0)
    only_new = draw("recent_mix", Pool(old[::-1] + new), 3, rng, p_off=0.0, window=2)
    assert all(g.version == 5 for g in only_new)
    mostly_old = draw("recent_mix", Pool(old[::-1] + new), 3, rng, p_off=1.0, window=2)
    assert [g.version for g in mostly_old[:2]] and all(g.version in (3, 4) for g in mostly_old[:2])
    assert mostly_old[2].version == 5  # history (window 2 = versions 4, 3) ran out; the newest fills in
    assert all(g.version != 1 for g in mostly_old)  # outside the window
    # out of arrival order (a scan instead of rank intervals): the same sides
    scrambled = Pool(new[:2] + old + new[2:])
    assert {g.version for g in draw("recent_mix", scrambled, 6, rng, p_off=0.5, window=2)} == {3, 4, 5}


@pytest.mark.parametrize("in_order", [True, False])
def test_recent_mix_draws_newest_with_prob_1_minus_p_off_uniform_within_sides(in_order):
    versions = [0, 1, 1, 2, 3, 3, 3] if in_order else [3, 0, 1, 3, 2, 1, 3]
    pool = Pool(group([0, 1], version=v, tag=str(i)) for i, v in enumerate(versions))
    rng, trials = random.Random(6), 6000
    pool.remove(versions.index(2))  # version 2 is gone: the one present version before 3 is 1
    first = Counter(draw("recent_mix", pool, 1, rng, p_off=0.3, window=1)[0].experiences[0].group_id
                    for _ in range(trials))
    newest = [str(i) for i, v in enumerate(versions) if v == 3]
    previous = [str(i) for i, v in enumerate(versions) if v == 1]
    assert_law(first, {**{t: 0.7 / 3 for t in newest}, **{t: 0.3 / 2 for t in previous}}, trials)


# ---- through the buffer --------------------------------------------------------------------------
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


@pytest.mark.parametrize("bad", [{"lam": 1.5}, {"alpha": 0.0}, {"p_off": 2.0}])
def test_bad_parameter_values_name_the_parameter(bad):
    name = {"lam": "variance", "alpha": "return_weighted", "p_off": "recent_mix"}[next(iter(bad))]
    buf = ReplayBuffer(sampling=name, sampling_params=bad, max_staleness=None)
    buf.add(group([0, 1]))
    with pytest.raises(ValueError, match="buffer.sampling_params"):
        buf.sample(1, 0)


def _m(g):
    return g.experiences[0].reward
