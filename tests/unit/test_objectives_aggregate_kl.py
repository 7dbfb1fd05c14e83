"""Aggregations and KL estimators: hand-computed values, empty masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import AGGREGATIONS, KL_ESTIMATORS

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_token_mean():
    assert AGGREGATIONS["token-mean"](LOSS, MASK).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3


def test_seq_mean_token_mean():
    assert AGGREGATIONS["seq-mean-token-mean"](LOSS, MASK).item() == pytest.approx(2.75)  # (1.5 + 4) / 2


def test_seq_mean_token_sum():
    assert AGGREGATIONS["seq-mean-token-sum"](LOSS, MASK).item() == pytest.approx(3.5)  # (3 + 4) / 2


def test_seq_mean_token_sum_norm():
    agg = AGGREGATIONS["seq-mean-token-sum-norm"]
    assert agg(LOSS, MASK).item() == pytest.approx(7 / 6)  # 7 / (B=2 · T=3)
    assert agg(LOSS, MASK, max_len=10).item() == pytest.approx(0.35)  # 7 / (2 · 10)
    with pytest.raises(ValueError, match="max_len"):
        agg(LOSS, MASK, max_len=0)


def test_all_masked_row_counts_in_B_but_adds_zero():
    loss = torch.cat([LOSS, torch.full((1, 3), 9.0)])
    mask = torch.cat([MASK, torch.zeros(1, 3)])
    assert AGGREGATIONS["token-mean"](loss, mask).item() == pytest.approx(7 / 3)  # tokens unchanged
    assert AGGREGATIONS["seq-mean-token-mean"](loss, mask).item() == pytest.approx(5.5 / 3)  # (1.5 + 4 + 0) / 3
    assert AGGREGATIONS["seq-mean-token-sum"](loss, mask).item() == pytest.approx(7 / 3)  # (3 + 4 + 0) / 3
    assert AGGREGATIONS["seq-mean-token-sum-norm"](loss, mask).item() == pytest.approx(7 / 9)  # 7 / (3 · 3)


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_all_masked_batch_is_zero_with_zero_gradient_even_over_nan(name):
    loss = torch.tensor([[float("nan"), float("inf")], [1.0, -float("inf")]], requires_grad=True)
    out = AGGREGATIONS[name](loss, torch.zeros(2, 2))
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(loss.grad, torch.zeros(2, 2))


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_aggregation_gradients(name):
    loss = LOSS.clone().requires_grad_(True)
    AGGREGATIONS[name](loss, MASK, max_len=4).backward()
    expected = {"token-mean": MASK / 3,  # each valid token 1/3
                "seq-mean-token-mean": torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]),  # 1/(B·|y_i|)
                "seq-mean-token-sum": MASK / 2,  # 1/B
                "seq-mean-token-sum-norm": MASK / 8}[name]  # 1/(B·L_max)
    assert torch.allclose(loss.grad, expected)


def test_empty_batch_dimension():
    for agg in AGGREGATIONS.values():
        assert agg(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


# ---- KL ----------------------------------------------------------------------------------------------
# ℓ = log 0.5, ℓ_ref = log 0.25, δ = ℓ_ref − ℓ = log 0.5 = −0.693147
#   k1 = ℓ − ℓ_ref = 0.693147                 d/dℓ = 1
#   k2 = ½ 0.693147² = 0.240227               d/dℓ = ℓ − ℓ_ref = 0.693147
#   k3 = e^δ − δ − 1 = 0.5 + 0.693147 − 1 = 0.193147   d/dℓ = 1 − e^δ = 0.5
KL_CASES = {"k1": (math.log(2), 1.0), "k2": (0.5 * math.log(2) ** 2, math.log(2)), "k3": (math.log(2) - 0.5, 0.5)}


@pytest.mark.parametrize("name", sorted(KL_CASES))
def test_kl_values_and_gradients(name):
    value, grad = KL_CASES[name]
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64, requires_grad=True)
    out = KL_ESTIMATORS[name](logp, ref)
    out.sum().backward()
    assert out.item() == pytest.approx(value)
    assert logp.grad.item() == pytest.approx(grad)
    assert ref.grad is None or ref.grad.abs().sum() == 0  # the reference is a frozen anchor


def test_kl_zero_when_policies_agree_and_k3_nonnegative():
    torch.manual_seed(0)
    logp = torch.randn(4, 6)
    for name in ("k1", "k2", "k3"):
        assert torch.allclose(KL_ESTIMATORS[name](logp, logp), torch.zeros(4, 6))
    assert (KL_ESTIMATORS["k3"](logp, torch.randn(4, 6)) >= 0).all()


def test_k3_finite_for_extreme_log_ratios():
    logp = torch.tensor([[-60.0, 0.0, -1000.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -60.0, 0.0]])
    out = KL_ESTIMATORS["k3"](logp, ref)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logp.grad).all()
