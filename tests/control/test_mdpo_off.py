"""Off-policy MDPO: the actor loss by hand, its SAC special case, resume, smoke."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.control.config import load_control_config
from offpolicy.control.loop import train
from offpolicy.control.mdpo_off import mdpo_actor_loss
from offpolicy.control.nets import TanhGaussianActor


def test_actor_loss_by_hand():
    # t = 1, lambda = 0.2: 1 * (-1) + (0.2 - 1) * (-2) - 3 = -2.4
    loss = mdpo_actor_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([3.0]), kl_coef=1.0, lam=0.2)
    assert loss.item() == pytest.approx(-2.4)


def test_with_the_old_policy_equal_to_the_current_one_it_is_sacs_actor_loss():
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 2, [8])
    obs, q = torch.randn(6, 3), torch.randn(6)
    a, logp, u, _, _ = actor.sample_u(obs)
    logp_old = actor.log_prob_u(obs, u)
    assert torch.allclose(logp_old, logp, atol=1e-5)
    mdpo = mdpo_actor_loss(logp, logp_old, q, kl_coef=5.0, lam=0.2)
    assert mdpo.item() == pytest.approx((0.2 * logp - q).mean().item(), abs=1e-5)  # SAC with alpha = lambda


def test_kl_gradient_pulls_towards_the_old_policy():
    torch.manual_seed(0)
    actor = TanhGaussianActor(1, 1, [4])
    old = TanhGaussianActor(1, 1, [4])
    obs = torch.zeros(512, 1)
    a, logp, u, _, _ = actor.sample_u(obs)
    kl = (logp - old.log_prob_u(obs, u)).mean()  # Monte-Carlo KL(pi || pi_k) >= 0 in expectation
    assert kl.item() > 0


@pytest.mark.slow
def test_pendulum_smoke(tmp_path, tiny):
    s = train(load_control_config(None, [*tiny, "algo=mdpo_off", "run.total_steps=300", "hp.old_policy_every=50",
                                         f"run.out_dir={tmp_path}"]))
    assert s["steps"] == 300 and math.isfinite(s["last_episodic_return"])
    assert "losses/kl_old" in (tmp_path / "metrics.jsonl").read_text()
