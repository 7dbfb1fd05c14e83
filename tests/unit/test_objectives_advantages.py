"""Advantage estimators: hand-computed values, naive-loop equivalence, singleton groups, masking."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import ADVANTAGES
from offpolicy.objectives.advantages import overlong_penalty

D = torch.float64
# five responses: group 7 = [1, 0, 0, 1], group 3 = [5] (a singleton); arbitrary, non-contiguous ids
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0], dtype=D)
G = torch.tensor([7, 7, 7, 7, 3])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=D)


def seq(adv):  # the per-sequence value, read off the first (always valid) token
    return adv[:, 0]


def test_grpo_std_normalised():
    a = ADVANTAGES["grpo"](rewards=R, group_index=G, mask=MASK)
    # group 7: mean 0.5, deviations ±0.5, unbiased var = 4·0.25/3 = 1/3 → std 0.577350
    # Â = ±0.5 / (0.577350 + 1e-6) = ±0.866024; singleton → 0
    z = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(seq(a), torch.tensor([z, -z, -z, z, 0.0], dtype=D))
    assert torch.equal(a * (1 - MASK), torch.zeros_like(a))  # zero on padding
    assert torch.allclose(a, seq(a)[:, None] * MASK)  # broadcast to every valid token


def test_dr_grpo_mean_only():
    a = ADVANTAGES["dr_grpo"](rewards=R, group_index=G, mask=MASK)
    assert torch.allclose(seq(a), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0], dtype=D))  # R − 0.5; singleton R − R


def test_rloo_leave_one_out():
    a = ADVANTAGES["rloo"](rewards=R, group_index=G, mask=MASK)
    # R_0 = 1, others (0, 0, 1) mean 1/3 → 2/3; R_1 = 0, others (1, 0, 1) mean 2/3 → −2/3; singleton 0
    assert torch.allclose(seq(a), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0], dtype=D))


def test_reinforce_constant_baseline():
    a = ADVANTAGES["reinforce"](rewards=R, group_index=G, mask=MASK, baseline=0.5)
    assert torch.allclose(seq(a), R - 0.5)
    b = ADVANTAGES["reinforce"](rewards=R, group_index=G, mask=MASK)
    assert torch.allclose(seq(b), R)  # default baseline 0


def test_equal_rewards_give_zero_not_nan():
    r = torch.tensor([1.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0])
    m = torch.ones(3, 2)
    for name in ("grpo", "dr_grpo", "rloo"):
        assert torch.equal(ADVANTAGES[name](rewards=r, group_index=g, mask=m), torch.zeros(3, 2))


def naive(name, rewards, groups, eps=1e-6):
    """Per-row loops: the reference the vectorised estimators must match."""
    out = []
    for i in range(len(rewards)):
        mates = [float(rewards[j]) for j in range(len(rewards)) if groups[j] == groups[i]]
        n, r = len(mates), float(rewards[i])
        mean = sum(mates) / n
        if n == 1:
            out.append(0.0)
        elif name == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in mates) / (n - 1))
            out.append((r - mean) / (std + eps))
        elif name == "dr_grpo":
            out.append(r - mean)
        else:  # rloo
            out.append(r - (sum(mates) - r) / (n - 1))
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_vectorised_matches_naive_with_uneven_groups(name):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(13, generator=gen, dtype=D)
    groups = torch.tensor([4, 4, 4, 9, 9, -2, 0, 0, 0, 0, 0, 11, 4])  # sizes 4, 2, 1, 5, 1
    a = ADVANTAGES[name](rewards=rewards, group_index=groups, mask=torch.ones(13, 1, dtype=D))
    assert torch.allclose(a[:, 0], naive(name, rewards, groups.tolist()))


def test_output_dtype_follows_mask_and_float32_rewards_ok():
    a = ADVANTAGES["grpo"](rewards=R.float(), group_index=G, mask=MASK.float())
    assert a.dtype == torch.float32 and a.shape == MASK.shape


def test_bad_shapes_fail_loudly():
    with pytest.raises(ValueError, match="group_index"):
        ADVANTAGES["grpo"](rewards=R, group_index=G[:3], mask=MASK)


def test_overlong_penalty():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then −(|y| − 6)/4: 8 → −0.5, 10 → −1, 12 → −1.5
    lengths = torch.tensor([3, 6, 8, 10, 12])
    p = overlong_penalty(lengths, max_len=10, cache_len=4)
    assert torch.allclose(p, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.5]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=10, cache_len=0)


# ---- tempo (prefix-tree TD credit) ---------------------------------------------------------------
def test_prefix_nodes_match_a_naive_prefix_comparison():
    from offpolicy.objectives.advantages import prefix_nodes
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (24, 5), generator=g)  # 3 tokens: many shared prefixes
    group = torch.randint(0, 3, (24,), generator=g) * 10
    node = prefix_nodes(ids, group)
    for t in range(5):
        for i in range(24):
            for j in range(24):
                same = bool(group[i] == group[j]) and torch.equal(ids[i, :t + 1], ids[j, :t + 1])
                assert same == bool(node[i, t] == node[j, t]), (i, j, t)
    assert len({int(n) for n in node[:, 0]} & {int(n) for n in node[:, 1]}) == 0  # ids differ across t


def test_tempo_hand_computed_branch_credit():
    # one group answering "57": two right, one wrong in the 2nd digit ("58"), one wrong in the 1st ("42")
    ids = torch.tensor([[5, 7, 1], [5, 8, 1], [5, 7, 1], [4, 2, 1]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    mask = torch.ones(4, 3, dtype=D)
    z = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # grpo's ±r̃ for rewards [1, 0, 1, 0]
    v5 = (z - z + z) / 3  # V("5") = mean r̃ of the three responses starting with 5
    td = ADVANTAGES["tempo"](rewards=rewards, group_index=torch.zeros(4), mask=mask, response_ids=ids, outcome_coef=0.0)
    expected = torch.tensor([[v5, z - v5, 0], [v5, -z - v5, 0], [v5, z - v5, 0], [-z, 0, 0]], dtype=D)
    assert torch.allclose(td, expected)  # the shared "5" gets V("5") − V(∅); "8" is where "58" went wrong
    full = ADVANTAGES["tempo"](rewards=rewards, group_index=torch.zeros(4), mask=mask, response_ids=ids)
    grpo = ADVANTAGES["grpo"](rewards=rewards, group_index=torch.zeros(4), mask=mask)
    assert torch.allclose(full, grpo + expected)  # TEMPO = grpo + branch-gated TD


@pytest.mark.parametrize("norm_by_std,base", [(True, "grpo"), (False, "dr_grpo")])
def test_tempo_td_terms_telescope_to_the_outcome_advantage(norm_by_std, base):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2, (12, 6), generator=g)
    rewards = torch.randint(0, 2, (12,), generator=g).to(D)
    group = torch.arange(12) // 4
    mask = torch.ones(12, 6, dtype=D)
    td = ADVANTAGES["tempo"](rewards=rewards, group_index=group, mask=mask, response_ids=ids, outcome_coef=0.0,
                             norm_by_std=norm_by_std)
    outcome = ADVANTAGES[base](rewards=rewards, group_index=group, mask=mask)[:, 0]
    assert torch.allclose(td.sum(-1), outcome)  # Σ_t (V(y≤t) − V(y<t)) = V(y) − V(∅) = r̃_i
    off = ADVANTAGES["tempo"](rewards=rewards, group_index=group, mask=mask, response_ids=ids, td_coef=0.0,
                              norm_by_std=norm_by_std)
    assert torch.allclose(off, ADVANTAGES[base](rewards=rewards, group_index=group, mask=mask))


def test_tempo_without_shared_prefixes_puts_all_credit_on_the_first_token_and_needs_ids():
    ids = torch.tensor([[1, 9], [2, 9], [3, 9]])
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=D)
    td = ADVANTAGES["tempo"](rewards=rewards, group_index=torch.zeros(3), mask=mask,
                             response_ids=ids.masked_fill(mask == 0, -1), outcome_coef=0.0)
    r = ADVANTAGES["grpo"](rewards=rewards, group_index=torch.zeros(3), mask=mask)[:, 0]
    assert torch.allclose(td[:, 0], r) and torch.equal(td[:, 1], torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="tempo: response_ids"):
        ADVANTAGES["tempo"](rewards=rewards, group_index=torch.zeros(3), mask=mask)
