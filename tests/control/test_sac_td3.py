"""SAC / TD3 math with hand-computed values, resume parity, Pendulum smoke runs."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.config import load_control_config
from offpolicy.control.loop import train
from offpolicy.control.nets import TanhGaussianActor
from offpolicy.control.sac import critic_mse, soft_target, temperature_loss


def test_temperature_loss_and_its_gradient():
    log_alpha = torch.tensor(math.log(2.0), requires_grad=True)
    loss = temperature_loss(log_alpha, torch.tensor([-1.0, -3.0]), target_entropy=-1.0)
    # mean(logp + H) = mean(-2, -4) = -3  ->  L = -alpha * -3 = 6;  dL/dlog_alpha = 3 alpha = 6
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    assert log_alpha.grad.item() == pytest.approx(6.0)
    # entropy above target (logp + H < 0) pushes alpha down: a gradient step lowers log_alpha


def test_soft_target_takes_the_twin_minimum_and_respects_termination():
    y = soft_target(torch.tensor([[1.0, 5.0], [2.0, 3.0]]), torch.tensor([0.5, -1.0]), torch.tensor([1.0, 1.0]),
                    torch.tensor([0.9, 0.0]), torch.tensor(0.2))
    assert y.tolist() == pytest.approx([1 + 0.9 * (1 - 0.2 * 0.5), 1.0])


def test_critic_mse_sums_the_critics():
    assert critic_mse(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, 1.0])).item() == pytest.approx(7.0)


def test_tanh_gaussian_log_prob_matches_the_sampled_one():
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 2, [8])
    obs = torch.randn(5, 3)
    a, logp = actor.sample(obs)
    assert torch.allclose(actor.log_prob(obs, a), logp, atol=1e-3)


@pytest.mark.parametrize("algo", ["sac", "td3"])
def test_resume_equals_the_uninterrupted_run(tmp_path, algo, tiny):
    base = [*tiny, f"algo={algo}", "run.total_steps=100", "run.checkpoint_every=50", "env.max_episode_steps=50"]
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'full'}"]))
    part = [*base, f"run.out_dir={tmp_path / 'part'}"]
    train(load_control_config(None, [*part, "run.total_steps=50"]))  # "interrupted" at step 80
    train(load_control_config(None, [*part, "run.resume=true"]))
    full, _ = ckpt.load(tmp_path / "full" / "checkpoints")
    resumed, meta = ckpt.load(tmp_path / "part" / "checkpoints")
    assert meta["step"] == 100 and full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["sac", "td3"])
def test_pendulum_smoke(tmp_path, algo, tiny):
    s = train(load_control_config(None, [*tiny, f"algo={algo}", "run.total_steps=400", f"run.out_dir={tmp_path}",
                                         "run.eval_every=400", "run.eval_episodes=1"]))
    assert s["steps"] == 400 and math.isfinite(s["last_episodic_return"])
    assert (tmp_path / "returns.png").exists() and (tmp_path / "checkpoints" / "latest").exists()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "losses/qf_loss" in text and "eval/return_mean" in text


def test_td3_target_and_smoothing_clip():
    from offpolicy.control.td3 import smoothed_action, td3_target

    y = td3_target(torch.tensor([[1.0, 5.0], [2.0, 3.0]]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]))
    assert y.tolist() == [1.5, 1.0]
    torch.manual_seed(0)
    a = smoothed_action(torch.full((1000, 1), 0.9), noise_std=10.0, noise_clip=0.5)
    assert a.min().item() == pytest.approx(0.4) and a.max().item() == 1.0  # noise clipped to 0.5, action to 1
