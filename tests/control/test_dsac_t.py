"""DSAC-T: the critic gradient against the formula by hand, the reduction to distributional SAC, a smoke run."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.control.config import load_control_config
from offpolicy.control.dsac_t import dsac_t_critic_loss, dsac_t_targets
from offpolicy.control.loop import train


def test_critic_gradient_matches_the_formula_by_hand():
    mean = torch.tensor([[1.0]], requires_grad=True)
    std = torch.tensor([[2.0]], requires_grad=True)
    # y = 3, y_s = 10, omega = 1, b = 0.1: y_b = 1 + clip(9, -3, 3) = 4, weight = 1 + 0.1 = 1.1
    loss = dsac_t_critic_loss(mean, std, torch.tensor([3.0]), torch.tensor([10.0]), torch.tensor([1.0]), bias=0.1)
    loss.backward()
    assert mean.grad.item() == pytest.approx(1.1 * -(3 - 1) / (2**2 + 0.1))  # -(y - Q)/(sigma^2 + b)
    assert std.grad.item() == pytest.approx(1.1 * -((1 - 4) ** 2 - 2**2) / (2**3 + 0.1))  # -((Q - y_b)^2 - s^2)/(s^3 + b)


def test_each_critic_uses_its_own_omega_and_the_batch_mean():
    mean = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    std = torch.ones(2, 2, requires_grad=True)
    y = torch.tensor([1.0, 3.0])
    dsac_t_critic_loss(mean, std, y, y, torch.tensor([1.0, 2.0]), bias=0.0).backward()
    # dL/dQ = w_i * -(y - 0)/1 / B with w = omega_i^2: critic 0 weight 1, critic 1 weight 4
    assert mean.grad.tolist() == [[-0.5, -1.5], [-2.0, -6.0]]
    # y_b clipped to +- 3 omega_i: critic 0 sees min(y, 3) = (1, 3); dL/dsigma = -(y_b^2 - 1) w / B
    assert std.grad[0].tolist() == pytest.approx([0.0, -8 / 2])


def test_without_refinements_it_is_the_gaussian_nll_gradient_of_distributional_sac():
    torch.manual_seed(0)
    mean = torch.randn(2, 5, requires_grad=True)
    std = (torch.rand(2, 5) + 0.5).requires_grad_(True)
    y, y_s = torch.randn(5), torch.randn(5) * 3
    dsac_t_critic_loss(mean, std, y, y_s, torch.tensor([0.7, 1.3]), bias=0.0, expected_value=False,
                       adaptive_clip=False, grad_scaling=False).backward()
    m2, s2 = mean.detach().clone().requires_grad_(True), std.detach().clone().requires_grad_(True)
    nll = (torch.log(s2) + (y_s - m2).pow(2) / (2 * s2.pow(2))).mean(-1).sum()  # -log N(y_s; Q, sigma^2) + const
    nll.backward()
    assert torch.allclose(mean.grad, m2.grad, atol=1e-6) and torch.allclose(std.grad, s2.grad, atol=1e-6)


def test_targets_use_the_smaller_mean_critic_and_clip_z():
    mean_n = torch.tensor([[1.0, 5.0], [2.0, 3.0]])
    std_n = torch.tensor([[1e6, 0.0], [0.0, 1e6]])  # the chosen critic's std is huge in both columns
    torch.manual_seed(0)
    y, y_s = dsac_t_targets(mean_n, std_n, torch.zeros(2), torch.zeros(2), torch.ones(2), torch.tensor(0.0))
    assert y.tolist() == [1.0, 3.0]
    assert ((y_s - y).abs() <= 3e6 + 1).all()  # z clipped to +-3
    _, y_s0 = dsac_t_targets(mean_n, torch.zeros(2, 2), torch.zeros(2), torch.zeros(2), torch.ones(2),
                             torch.tensor(0.0))
    assert y_s0.tolist() == [1.0, 3.0]


def test_resume_parity(tmp_path, tiny):
    from offpolicy.control import checkpoint as ckpt

    base = [*tiny, "algo=dsac_t", "run.total_steps=80", "run.checkpoint_every=40", "env.max_episode_steps=30"]
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'a'}"]))
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'b'}", "run.total_steps=40"]))
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'b'}", "run.resume=true"]))
    a, _ = ckpt.load(tmp_path / "a" / "checkpoints")
    b, _ = ckpt.load(tmp_path / "b" / "checkpoints")
    assert all(torch.equal(a[k], b[k]) for k in a) and "nets/omega.omega" in a


@pytest.mark.slow
def test_pendulum_smoke(tmp_path, tiny):
    s = train(load_control_config(None, [*tiny, "algo=dsac_t", "run.total_steps=400", f"run.out_dir={tmp_path}"]))
    assert s["steps"] == 400 and math.isfinite(s["last_episodic_return"])
    assert "losses/omega" in (tmp_path / "metrics.jsonl").read_text()
