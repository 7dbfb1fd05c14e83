"""remix_ppg: hand-computed values, gradient, and the on-policy equivalence with ppo_clip."""

from __future__ import annotations

import math

import torch

from offpolicy.objectives import POLICY_LOSSES

remix = POLICY_LOSSES["remix_ppg"]


def test_hand_computed_center_shifted_clip():
    # one token per row; behaviour logp 0 (μ = 1), proximal log c, current log r
    mask = torch.ones(3, 1)
    behavior = torch.zeros(3, 1)
    old = torch.log(torch.tensor([[1.5], [1.5], [1.0]]))  # centres c = 1.5, 1.5, 1.0
    logp = torch.log(torch.tensor([[2.0], [1.6], [0.5]]))  # ratios r = 2.0, 1.6, 0.5
    adv = torch.tensor([[1.0], [1.0], [-1.0]])
    loss, m = remix(logp=logp, advantages=adv, mask=mask, old_logp=old, behavior_logp=behavior, clip=0.2)
    # row 0: A>0, r=2.0 > c+ε=1.7 -> clipped to 1.7 -> loss = max(-2.0, -1.7) = -1.7
    # row 1: A>0, r=1.6 inside [1.3, 1.7] -> loss = -1.6
    # row 2: A<0, c=1, r=0.5 < 0.8 -> clipped to 0.8 -> loss = max(0.5, 0.8) = 0.8
    torch.testing.assert_close(loss, torch.tensor([[-1.7], [-1.6], [0.8]]))
    assert math.isclose(float(m["clip_frac"]), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(m["center_mean"]), (1.5 + 1.5 + 1.0) / 3, rel_tol=1e-6)


def test_gradient_flows_only_inside_the_shifted_trust_region():
    logp = torch.log(torch.tensor([[2.0, 1.6]])).requires_grad_()
    loss, _ = remix(logp=logp, advantages=torch.ones(1, 2), mask=torch.ones(1, 2),
                    old_logp=torch.log(torch.tensor([[1.5, 1.5]])), behavior_logp=torch.zeros(1, 2))
    loss.sum().backward()
    # clipped token: zero gradient; inside: d(-r)/dlogp = -r = -1.6
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.6]]))


def test_fresh_data_equals_ppo_clip():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 5, generator=g).requires_grad_()
    behavior = logp.detach() + 0.3 * torch.randn(4, 5, generator=g)
    adv, mask = torch.randn(4, 5, generator=g), (torch.rand(4, 5, generator=g) > 0.2).float()
    a, _ = remix(logp=logp, advantages=adv, mask=mask, old_logp=behavior, behavior_logp=behavior, clip=0.2)
    b, _ = POLICY_LOSSES["ppo_clip"](logp=logp, advantages=adv, mask=mask, old_logp=behavior, clip_low=0.2,
                                      clip_high=0.2)
    torch.testing.assert_close(a, b)


def test_extreme_log_ratios_and_masked_rows_stay_finite():
    logp = torch.tensor([[50.0, -50.0], [0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, m = remix(logp=logp, advantages=torch.ones(2, 2), mask=mask, old_logp=torch.zeros(2, 2),
                    behavior_logp=torch.full((2, 2), -50.0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    assert loss[1].abs().sum() == 0
