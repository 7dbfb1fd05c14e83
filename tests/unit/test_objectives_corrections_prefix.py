"""cumulative_prefix, min_prefix, turn_level, decoupled: hand values, naive loops, equivalences, loud failures."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import CORRECTIONS
from offpolicy.objectives.corrections import turn_log_ratio

L = math.log
D = torch.float64
# one row, ℓ_μ = 0, w = exp(ℓ_old) = [2, 0.5, 4, (pad)]
OLD = torch.tensor([[L(2), L(0.5), L(4), 50.0]], dtype=D)
BEH = torch.zeros(1, 4, dtype=D)
MASK = torch.tensor([[1, 1, 1, 0]], dtype=D)


def call(name, old=OLD, beh=BEH, mask=MASK, **hp):
    w, m = CORRECTIONS[name](old_logp=old, behavior_logp=beh, mask=mask, **hp)
    assert not w.requires_grad and torch.equal(w * (1 - mask), torch.zeros_like(w))
    assert all(v.ndim == 0 and torch.isfinite(v) for v in m.values())
    return w, m


def rand(seed, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=D)
    beh = old + torch.randn(B, T, generator=g, dtype=D)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(D)
    return g, old, beh, mask


# ---- prefix ratios -----------------------------------------------------------------------------------
def test_cumulative_prefix():
    w, m = call("cumulative_prefix")
    assert torch.allclose(w, torch.tensor([[2, 1, 4, 0]], dtype=D))  # 2, 2·0.5, 2·0.5·4
    w, m = call("cumulative_prefix", cap=3.0)
    assert torch.allclose(w, torch.tensor([[2, 1, 3, 0]], dtype=D)) and m["trunc_frac"].item() == pytest.approx(1 / 3)


def test_min_prefix():
    # w̃_t = min_{j<t} w_j · w_t: t0 = 2 (no prefix), t1 = min(2)·0.5 = 1, t2 = min(2, 0.5)·4 = 2
    w, m = call("min_prefix")
    assert torch.allclose(w, torch.tensor([[2, 1, 2, 0]], dtype=D))
    assert m["prefix_min_mean"].item() == pytest.approx((1 + 2 + 0.5) / 3)


def test_prefix_corrections_match_naive_loops():
    _, old, beh, mask = rand(0)
    cum, _ = call("cumulative_prefix", old, beh, mask)
    mn, _ = call("min_prefix", old, beh, mask)
    for i in range(old.shape[0]):
        total, low = 0.0, math.inf
        for j in range(old.shape[1]):
            if not mask[i, j]:
                continue
            lw = float(old[i, j] - beh[i, j])
            total += lw
            assert cum[i, j].item() == pytest.approx(math.exp(total))
            assert mn[i, j].item() == pytest.approx(math.exp((0.0 if low == math.inf else low) + lw))
            low = min(low, lw)


# ---- turn level --------------------------------------------------------------------------------------
def test_turn_level_shares_one_weight_per_turn():
    # w = [2, 2, (tool), 4, 8] with turns [0, 0, 1, 1, 1]; the tool token (mask 0) does not count
    old = torch.tensor([[L(2), L(2), 33.0, L(4), L(8)]], dtype=D)
    beh = torch.zeros(1, 5, dtype=D)
    mask = torch.tensor([[1, 1, 0, 1, 1]], dtype=D)
    turns = torch.tensor([[0, 0, 1, 1, 1]])
    w, _ = call("turn_level", old, beh, mask, turn_ids=turns)
    # geometric: turn 0 √(2·2) = 2; turn 1 √(4·8) = √32
    assert torch.allclose(w, torch.tensor([[2, 2, 0, math.sqrt(32), math.sqrt(32)]], dtype=D))
    w, _ = call("turn_level", old, beh, mask, turn_ids=turns, mode="product")
    assert torch.allclose(w, torch.tensor([[4, 4, 0, 32, 32]], dtype=D))
    w, _ = call("turn_level", old, beh, mask, turn_ids=turns, mode="product", cap=10.0)
    assert torch.allclose(w, torch.tensor([[4, 4, 0, 10, 10]], dtype=D))


def test_turn_level_special_cases():
    _, old, beh, mask = rand(1)
    B, T = old.shape
    every_token = torch.arange(T).expand(B, T)  # each token its own turn: the plain token weight
    w, _ = call("turn_level", old, beh, mask, turn_ids=every_token)
    assert torch.allclose(w, torch.exp(old - beh) * mask)
    one_turn = torch.zeros(B, T, dtype=torch.long)  # one turn per row, product: tis_seq
    w, _ = call("turn_level", old, beh, mask, turn_ids=one_turn, mode="product", cap=2.0)
    ref, _ = call("tis_seq", old, beh, mask, cap=2.0)
    assert torch.allclose(w, ref)
    lr = (old - beh).requires_grad_(True)  # the helper is differentiable for losses
    turn_log_ratio(lr, mask, one_turn).sum().backward()
    assert torch.isfinite(lr.grad).all()


def test_turn_level_needs_turn_ids():
    assert CORRECTIONS["turn_level"].needs == ("turn_ids",)
    with pytest.raises(ValueError, match="turn_ids"):
        CORRECTIONS["turn_level"](old_logp=OLD, behavior_logp=BEH, mask=MASK)
    with pytest.raises(ValueError, match="mode"):
        call("turn_level", turn_ids=torch.zeros(1, 4, dtype=torch.long), mode="sum")


# ---- decoupled ---------------------------------------------------------------------------------------
# ℓ_μ = 0; trainer at the behaviour version: m = exp(ℓ_train − ℓ_μ) = [3, 1.5, 0.25]
# proximal: s = exp(ℓ_old − ℓ_train) = [2, 1, 0.5]
TRAIN = torch.tensor([[L(3), L(1.5), L(0.25), 0.0]], dtype=D)
PROX = TRAIN + torch.tensor([[L(2), 0.0, L(0.5), 0.0]], dtype=D)


def test_decoupled_treats_mismatch_and_staleness_separately():
    w, m = call("decoupled", PROX, BEH, MASK, behavior_train_logp=TRAIN)
    # truncate m at 2: [2, 1.5, 0.25]; times s: [4, 1.5, 0.125]
    assert torch.allclose(w, torch.tensor([[4, 1.5, 0.125, 0]], dtype=D))
    assert m["mismatch_weight_mean"].item() == pytest.approx((2 + 1.5 + 0.25) / 3)
    assert m["mismatch_clip_frac"].item() == pytest.approx(1 / 3)
    assert m["staleness_weight_mean"].item() == pytest.approx((2 + 1 + 0.5) / 3)
    w, m = call("decoupled", PROX, BEH, MASK, behavior_train_logp=TRAIN, staleness_cap=1.5)
    assert torch.allclose(w, torch.tensor([[0, 1.5, 0.125, 0]], dtype=D))  # s = 2 > 1.5 masked (AReaL)
    assert m["staleness_mask_frac"].item() == pytest.approx(1 / 3)
    w, m = call("decoupled", PROX, BEH, MASK, behavior_train_logp=TRAIN, mismatch_mode="mask")
    # keep 1/2 ≤ m ≤ 2: only 1.5 → [0, 1.5·1, 0]
    assert torch.allclose(w, torch.tensor([[0, 1.5, 0, 0]], dtype=D))
    assert m["mismatch_clip_frac"].item() == pytest.approx(2 / 3)


def test_decoupled_without_staleness_is_tis_or_mis():
    _, old, beh, mask = rand(2)
    w, _ = call("decoupled", old, beh, mask, behavior_train_logp=old.clone())
    ref, _ = call("tis_token", old, beh, mask)
    assert torch.allclose(w, ref)
    w, _ = call("decoupled", old, beh, mask, behavior_train_logp=old.clone(), mismatch_mode="mask")
    ref, _ = call("mis_token", old, beh, mask)
    assert torch.allclose(w, ref)


def test_decoupled_refuses_to_collapse_the_two_factors():
    assert CORRECTIONS["decoupled"].needs == ("behavior_train_logp",)
    with pytest.raises(ValueError, match="cannot be separated"):
        CORRECTIONS["decoupled"](old_logp=PROX, behavior_logp=BEH, mask=MASK)
    with pytest.raises(ValueError, match="mismatch_mode"):
        call("decoupled", behavior_train_logp=TRAIN, mismatch_mode="clip")
    with pytest.raises(ValueError, match="staleness_cap"):
        call("decoupled", behavior_train_logp=TRAIN, staleness_cap=0.5)
