"""Mismatch corrections (TIS / MIS) and diagnostics (ESS, quantiles, entropy, staleness)."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import CORRECTIONS, DIAGNOSTICS
from offpolicy.objectives.diagnostics import ess, masked_entropy_from_logits, ratio_quantiles, staleness_stats

L = math.log
D = torch.float64
# token weights w = exp(ℓ_old − ℓ_μ); ℓ_μ = 0 so w = exp(ℓ_old)
#   row 0: w = [3, 1.5, 0.25, (pad)]      Π = 1.125, geometric mean 1.125^(1/3) = 1.0400
#   row 1: w = [4, 4, (pad), (pad)]       Π = 16,    geometric mean 4
OLD = torch.tensor([[L(3.0), L(1.5), L(0.25), 77.0], [L(4.0), L(4.0), -77.0, 0.0]], dtype=D)
BEH = torch.zeros(2, 4, dtype=D)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=D)


def call(name, **hp):
    w, m = CORRECTIONS[name](old_logp=OLD, behavior_logp=BEH, mask=MASK, **hp)
    assert not w.requires_grad and torch.equal(w * (1 - MASK), torch.zeros_like(w))  # zero on padding
    for v in m.values():
        assert v.ndim == 0 and torch.isfinite(v)
    return w, m


def test_tis_token():
    w, m = call("tis_token")
    # min(w, 2): [2, 1.5, 0.25] and [2, 2]; truncated 3 of 5 valid tokens
    assert torch.allclose(w, torch.tensor([[2, 1.5, 0.25, 0], [2, 2, 0, 0]], dtype=D))
    assert m["trunc_frac"].item() == pytest.approx(3 / 5)
    assert m["weight_mean"].item() == pytest.approx(7.75 / 5)
    assert m["weight_max"].item() == pytest.approx(2.0)


def test_tis_token_normalize_to_mean_one():
    w, _ = call("tis_token", normalize=True)
    assert (w * MASK).sum().item() / MASK.sum().item() == pytest.approx(1.0)


def test_tis_seq():
    w, m = call("tis_seq")
    # row 0: Π = 1.125 < 2 on every valid token; row 1: Π = 16 → 2
    assert torch.allclose(w, torch.tensor([[1.125, 1.125, 1.125, 0], [2, 2, 0, 0]], dtype=D))
    assert m["trunc_frac"].item() == pytest.approx(0.5)  # 1 of 2 sequences


def test_mis_token():
    w, m = call("mis_token")
    # keep 1/2 ≤ w ≤ 2: only the 1.5 token; 3, 0.25, 4, 4 rejected (4 of 5)
    assert torch.allclose(w, torch.tensor([[0, 1.5, 0, 0], [0, 0, 0, 0]], dtype=D))
    assert m["reject_frac"].item() == pytest.approx(4 / 5)
    w, _ = call("mis_token", is_weight=False)
    assert torch.allclose(w, torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=D))
    w, _ = call("mis_token", upper=5.0, lower=0.2)  # everything inside [0.2, 5]
    assert torch.allclose(w, torch.tensor([[3, 1.5, 0.25, 0], [4, 4, 0, 0]], dtype=D))


def test_mis_seq():
    w, m = call("mis_seq")
    # row 0: Π = 1.125 ∈ [0.5, 2] → kept with weight 1.125; row 1: Π = 16 → rejected
    assert torch.allclose(w, torch.tensor([[1.125, 1.125, 1.125, 0], [0, 0, 0, 0]], dtype=D))
    assert m["reject_frac"].item() == pytest.approx(0.5)
    w, _ = call("mis_seq", is_weight=False)
    assert torch.allclose(w, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=D))


def test_mis_geo():
    w, m = call("mis_geo")
    # row 0: geometric mean 1.04 ∈ [0.5, 2] → 1; row 1: 4 → rejected
    assert torch.allclose(w, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=D))
    w, _ = call("mis_geo", upper=1.01)  # 1.04 > 1.01 → row 0 rejected too
    assert torch.equal(w, torch.zeros_like(w))


def test_veto_rejects_sequences_with_a_catastrophic_token():
    # row 0 holds a token with w = 0.25 < veto 0.3 → whole row 0 rejected
    w, _ = call("mis_token", upper=5.0, lower=0.2, veto=0.3)
    assert torch.allclose(w, torch.tensor([[0, 0, 0, 0], [4, 4, 0, 0]], dtype=D))
    w, _ = call("mis_seq", upper=20.0, veto=0.3)
    assert torch.allclose(w, torch.tensor([[0, 0, 0, 0], [16, 16, 0, 0]], dtype=D))


def test_corrections_fail_loudly():
    with pytest.raises(ValueError, match="behaviour log-probs"):
        CORRECTIONS["tis_token"](old_logp=OLD, behavior_logp=None, mask=MASK)
    with pytest.raises(ValueError, match="lower <= upper"):
        CORRECTIONS["mis_token"](old_logp=OLD, behavior_logp=BEH, mask=MASK, upper=2.0, lower=3.0)


def extras(name, old, train):
    """Inputs beyond old/behaviour/mask that a correction declares in ``needs``."""
    need = getattr(CORRECTIONS[name], "needs", ())
    out = {"turn_ids": torch.tensor([[0, 0, 1, 1]])[:, :old.shape[-1]].expand_as(old)} if "turn_ids" in need else {}
    if "behavior_train_logp" in need:
        out["behavior_train_logp"] = train
    return out


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_corrections_finite_for_huge_log_ratios(name):
    old = torch.tensor([[50.0, -50.0, 50.0], [-50.0, -50.0, -50.0]])
    w, m = CORRECTIONS[name](old_logp=old, behavior_logp=-old, mask=torch.ones(2, 3),
                             **extras(name, old, torch.zeros(2, 3)))  # log w = ±100 (±50 + ±50 for decoupled)
    assert torch.isfinite(w).all() and all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_corrections_on_identical_policies_are_one(name):
    w, _ = CORRECTIONS[name](old_logp=OLD, behavior_logp=OLD.clone(), mask=MASK, **extras(name, OLD, OLD.clone()))
    assert torch.allclose(w, MASK)


# ---- diagnostics -------------------------------------------------------------------------------------
def test_ess_hand_values():
    ones = torch.ones(4)
    assert ess(torch.zeros(4), ones).item() == pytest.approx(1.0)  # equal weights
    # w = [2, 1, 1]: (Σw)² / (n Σw²) = 16 / (3 · 6) = 0.888889
    assert ess(torch.tensor([L(2.0), 0.0, 0.0]), torch.ones(3)).item() == pytest.approx(16 / 18)
    # one dominant weight out of 4 → ≈ 1/4
    assert ess(torch.tensor([0.0, -50.0, -50.0, -50.0]), ones).item() == pytest.approx(0.25, abs=1e-6)
    # log w = [100, 0]: e^100 overflows float32 but log-space gives 1/2
    assert ess(torch.tensor([100.0, 0.0]), torch.ones(2)).item() == pytest.approx(0.5)
    assert ess(torch.tensor([50.0, 50.0]), torch.ones(2)).item() == pytest.approx(1.0)


def test_ess_token_level_respects_mask_and_empty_is_one():
    log_w = torch.tensor([[L(2.0), 0.0, 99.0], [0.0, -99.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert ess(log_w, mask).item() == pytest.approx(16 / 18)  # w = [2, 1, 1] as above
    assert ess(log_w, torch.zeros(2, 3)).item() == 1.0


def test_ratio_quantiles():
    vals = torch.arange(101, dtype=torch.float32)[None, :]  # 0..100 → p50 50, p90 90, p99 99, max 100
    mask = torch.ones(1, 101)
    q = ratio_quantiles(torch.cat([vals, torch.full((1, 101), 1e6)]), torch.cat([mask, torch.zeros(1, 101)]))
    assert {k: v.item() for k, v in q.items()} == pytest.approx({"p50": 50, "p90": 90, "p99": 99, "max": 100})
    # interpolation: [0, 10] → p50 = 5, p90 = 9
    q = ratio_quantiles(torch.tensor([[0.0, 10.0]]), torch.ones(1, 2))
    assert q["p50"].item() == pytest.approx(5.0) and q["p90"].item() == pytest.approx(9.0)
    q = ratio_quantiles(torch.ones(2, 2), torch.zeros(2, 2))
    assert all(v.item() == 0 for v in q.values())


def test_entropy():
    # token 0: uniform over 4 → log 4 = 1.386294; token 1: one-hot via −inf → 0; token 2 padded
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -float("inf"), -float("inf"), -float("inf")],
                            [9.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    h = masked_entropy_from_logits(logits, torch.tensor([[1.0, 1.0, 0.0]]))
    assert h.item() == pytest.approx(math.log(4) / 2)
    assert not h.requires_grad


def test_staleness_stats():
    versions = torch.tensor([[3, 3, 2], [0, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    s = staleness_stats(versions, 3, mask)  # lags [0, 0, 1, 3] → mean 1, max 3
    assert s["mean"].item() == pytest.approx(1.0) and s["max"].item() == pytest.approx(3.0)
    e = staleness_stats(versions, 3, torch.zeros(2, 3))
    assert e["mean"].item() == 0 and e["max"].item() == 0


def test_diagnostics_registered():
    assert set(DIAGNOSTICS) == {"ess", "ratio_quantiles", "masked_entropy_from_logits", "staleness_stats"}
