"""Data shaping: RED-Drop, MMR1 variance-aware scores, return- and advantage-weighted resampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offpolicy.objectives import ADVANTAGES
from offpolicy.objectives.shaping import (advantage_weights, mixed_sampling_probs, pass_rate_variance, red_drop,
                                          return_weights, variance_aware_scores)

# group 0: one positive (1), four negatives → drop 3 negatives; group 1: mean 2/3, 2 pos 1 neg → keep all;
# group 2: [3, 0, 0], mean 1 → 1 pos 2 neg → drop 1
R = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 0, 3, 0, 0])
GI = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_red_drop_balances_negatives_per_group():
    keep = red_drop(R, GI, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == R.shape
    assert keep[0] and keep[5] and keep[6] and keep[7] and keep[8]  # positives (and balanced groups) stay
    assert int(keep[1:5].sum()) == 1 and int(keep[9:].sum()) == 1  # #neg kept = #pos
    # the same generator state drops the same rows; other seeds drop other negatives
    assert torch.equal(keep, red_drop(R, GI, torch.Generator().manual_seed(0)))
    kept_negatives = {tuple(red_drop(R, GI, torch.Generator().manual_seed(s))[1:5].tolist()) for s in range(20)}
    assert len(kept_negatives) > 1


def test_red_drop_then_recompute_advantages_on_kept_rows():
    keep = red_drop(R, GI, torch.Generator().manual_seed(3))
    mask = torch.ones(len(R), 2)
    adv = torch.zeros(len(R), 2)
    adv[keep] = ADVANTAGES["dr_grpo"](rewards=R[keep], group_index=GI[keep], mask=mask[keep])
    # group 0 keeps [1, 0]: mean 0.5 → ±0.5; dropped rows get 0
    assert adv[0, 0].item() == pytest.approx(0.5) and float(adv[1:5, 0].sum()) == pytest.approx(-0.5)
    assert (adv[~keep] == 0).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rewards=st.lists(st.sampled_from([0.0, 0.5, 1.0, -3.0]), min_size=1, max_size=12),
       seed=st.integers(0, 2**16))
def test_red_drop_keeps_every_positive_and_min_of_negatives(rewards, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.tensor(rewards)
    gi = torch.randint(0, 3, (len(rewards),), generator=g)
    keep = red_drop(r, gi, g)
    for k in gi.unique():  # naive per-group check
        sel = gi == k
        pos = r[sel] >= r[sel].mean()
        assert keep[sel][pos].all()
        assert int(keep[sel][~pos].sum()) == min(int((~pos).sum()), int(pos.sum()))


def test_pass_rate_variance_and_vps():
    ovs, groups = pass_rate_variance(torch.tensor([1, 0, 1, 1.0]), torch.tensor([5, 5, 2, 2]))
    assert groups.tolist() == [2, 5] and torch.allclose(ovs, torch.tensor([0.0, 0.25], dtype=torch.float64))
    vps = variance_aware_scores(ovs, torch.tensor([0.5, 1.0]))  # 0.8·OVS + 0.2·TDS
    assert torch.allclose(vps, torch.tensor([0.1, 0.4], dtype=torch.float64))
    assert torch.allclose(variance_aware_scores(ovs), 0.8 * ovs)
    with pytest.raises(ValueError, match="correct"):
        pass_rate_variance(torch.tensor([2.0]), torch.tensor([0]))


def test_mixed_sampling_probs():
    p = mixed_sampling_probs(torch.tensor([0.25, 0.0, 0.0]), lam=0.5)
    assert torch.allclose(p, torch.tensor([0.5 + 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64))
    u = mixed_sampling_probs(torch.zeros(4))  # nothing informative: uniform
    assert torch.allclose(u, torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="scores"):
        mixed_sampling_probs(torch.tensor([-1.0]))


def test_return_and_advantage_weights():
    p = return_weights(torch.tensor([0.0, 1.0, 0.5]), alpha=0.1)  # Ĝ = [0, 1, 0.5] → softmax([0, 10, 5])
    z = 1 + math.exp(10) + math.exp(5)
    assert torch.allclose(p, torch.tensor([1 / z, math.exp(10) / z, math.exp(5) / z], dtype=torch.float64))
    q = return_weights(torch.tensor([2.0, 2.0]), lengths=torch.tensor([1.0, 3.0]))  # equal returns: ∝ T_i
    assert torch.allclose(q, torch.tensor([0.25, 0.75], dtype=torch.float64))
    extreme = return_weights(torch.tensor([-1e30, 0.0, 1e30]), alpha=1e-3)
    assert torch.isfinite(extreme).all() and extreme.sum().item() == pytest.approx(1.0)
    a = advantage_weights(torch.tensor([1.0, 0.0, 5.0, 4.0]), torch.tensor([0, 0, 1, 1]))
    # advantages vs the prompt mean: [0.5, −0.5, 0.5, −0.5] → the same as return-weighting them
    assert torch.allclose(a, return_weights(torch.tensor([0.5, -0.5, 0.5, -0.5])))
    with pytest.raises(ValueError, match="alpha"):
        return_weights(torch.tensor([1.0]), alpha=0.0)
