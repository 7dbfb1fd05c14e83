"""PPO and PROPS: hand-computed losses and GAE, PROPS with zero adaptation == PPO, resume, smoke."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.config import load_control_config
from offpolicy.control.loop import train
from offpolicy.control.ppo import GaussianPolicy, gae, ppo_loss, sampling_error
from offpolicy.control.ppo_props import props_loss

ON = ["run.progress=false", "run.threads=1", "hp.hidden=[8,8]", "hp.num_steps=32", "hp.num_minibatches=4",
      "hp.update_epochs=2", "env.max_episode_steps=20"]


def test_gae_stops_at_terminations_and_bootstraps_truncations():
    ones, v0, vn = torch.ones(3, 1), torch.zeros(3, 1), torch.full((3, 1), 0.5)
    term = torch.tensor([[0.0], [0.0], [1.0]])
    adv = gae(ones, v0, vn, term, term, gamma=0.9, lam=0.5)
    # delta = (1.45, 1.45, 1.0); A2 = 1.0, A1 = 1.45 + 0.45 * 1.0, A0 = 1.45 + 0.45 * 1.9
    assert adv.flatten().tolist() == pytest.approx([2.305, 1.9, 1.0])
    trunc_end = torch.tensor([[0.0], [1.0], [0.0]])  # truncated at t=1: bootstrap V(s'_1) = 0.5, cut the sum
    adv = gae(ones, v0, vn, torch.zeros(3, 1), trunc_end, gamma=0.9, lam=0.5)
    assert adv.flatten().tolist() == pytest.approx([1.45 + 0.45 * 1.45, 1.45, 1.45])


def test_ppo_clipped_surrogate_by_hand():
    # ratio e, advantage 1, clip 0.2 -> min(e, 1.2) = 1.2 -> policy loss -1.2 (value and entropy terms off)
    z = torch.zeros(1)
    loss, stats = ppo_loss(torch.ones(1), z, torch.ones(1), z, z, z, z, clip_coef=0.2, clip_vloss=True,
                           vf_coef=0.0, ent_coef=0.0)
    assert loss.item() == pytest.approx(-1.2) and stats["losses/clipfrac"].item() == 1.0
    # negative advantage: max(-e * -1, ...) picks the unclipped e -> loss e
    loss, _ = ppo_loss(torch.ones(1), z, -torch.ones(1), z, z, z, z, clip_coef=0.2, clip_vloss=True, vf_coef=0.0,
                       ent_coef=0.0)
    assert loss.item() == pytest.approx(math.e)


def test_props_objective_and_gradient_by_hand():
    logp_b = torch.tensor([0.5, -0.5], requires_grad=True)
    loss, _ = props_loss(logp_b, torch.zeros(2), clip_coef=0.3, lam=0.0)
    # ratios e^0.5 = 1.6487 (kept: max(1.6487, 1.3)) and e^-0.5 = 0.6065 (floored at 0.7: no gradient)
    assert loss.item() == pytest.approx((math.exp(0.5) + 0.7) / 2)
    loss.backward()
    assert logp_b.grad.tolist() == pytest.approx([math.exp(0.5) / 2, 0.0])  # pushes over-sampled actions down
    logp_b = torch.tensor([0.1], requires_grad=True)
    loss, _ = props_loss(logp_b, torch.zeros(1), clip_coef=0.3, lam=2.0)  # + lambda mean(log pi_t - log pi_b)
    assert loss.item() == pytest.approx(math.exp(0.1) - 2.0 * 0.1)


def test_props_with_zero_adaptation_is_ppo(tmp_path):
    base = [*ON, "run.total_steps=96"]
    train(load_control_config(None, [*base, "algo=ppo", f"run.out_dir={tmp_path / 'ppo'}"]))
    train(load_control_config(None, [*base, "algo=ppo_props", f"run.out_dir={tmp_path / 'props'}", "hp.props_lr=0",
                                     "hp.buffer_batches=1", "hp.props_num_steps=8"]))
    a, _ = ckpt.load(tmp_path / "ppo" / "checkpoints")
    b, _ = ckpt.load(tmp_path / "props" / "checkpoints")
    for k in ("nets/actor.log_std", "nets/actor.mean.0.weight", "nets/critic.0.weight", "nets/obs_rms.mean"):
        assert torch.equal(a[k], b[k]), k


def test_props_adapts_the_behaviour_policy(tmp_path):
    train(load_control_config(None, [*ON, "run.total_steps=96", "algo=ppo_props", f"run.out_dir={tmp_path}",
                                     "hp.props_num_steps=8", "hp.props_target_kl=null"]))
    t, _ = ckpt.load(tmp_path / "checkpoints")
    assert not torch.equal(t["nets/behaviour.mean.0.weight"], t["nets/actor.mean.0.weight"])
    assert "props/approx_kl" in (tmp_path / "metrics.jsonl").read_text()


def test_sampling_error_is_the_kl_of_the_fitted_gaussian_by_hand():
    # Identical observations: the mean is the last layer's bias alone, so pi_D is the maximum-likelihood Gaussian
    # of the actions (sample mean m, biased std s) and the estimate mean(log pi_D - log pi_theta) equals
    # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 exactly (pi_theta = N(0, 1) at initialisation).
    torch.manual_seed(0)
    pi = GaussianPolicy(1, 1, [4], "tanh")
    obs, act = torch.zeros(400, 1), 0.3 + 0.6 * torch.randn(400, 1)
    m, s = act.mean().item(), act.std(unbiased=False).item()
    assert pi.dist(obs[:1]).mean.item() == pytest.approx(0.0, abs=1e-6) and pi.log_std.item() == 0.0
    kl = -math.log(s) + (s * s + m * m) / 2 - 0.5
    assert sampling_error(pi, obs, act, epochs=3000, lr=1e-2).item() == pytest.approx(kl, abs=1e-4)
    assert pi.log_std.item() == 0.0  # the policy itself is untouched


def test_sampling_error_shrinks_with_more_on_policy_samples():
    torch.manual_seed(1)
    pi = GaussianPolicy(3, 2, [8], "tanh")
    errors = []
    for n in (64, 4096):
        obs = torch.randn(n, 3)
        with torch.no_grad():
            act = pi.dist(obs).sample()
        errors.append(sampling_error(pi, obs, act, epochs=500, lr=1e-2).item())
    assert 0.0 <= errors[1] < errors[0]  # finite on-policy batches are never exactly on-policy; more data, less error


def test_sampling_error_is_logged_for_ppo_and_props(tmp_path):
    for algo in ("ppo", "ppo_props"):
        train(load_control_config(None, [*ON, "run.total_steps=96", f"algo={algo}", f"run.out_dir={tmp_path / algo}",
                                         "hp.sampling_error_every=1", "hp.sampling_error_epochs=10"]
                                  + (["hp.props_num_steps=8"] if algo == "ppo_props" else [])))
        assert (tmp_path / algo / "metrics.jsonl").read_text().count("props/sampling_error") == 3


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("algo", ["ppo", "ppo_props"])
def test_resume_parity(tmp_path, algo, monkeypatch):
    base = [*ON, f"algo={algo}", "run.checkpoint_every=64", "run.total_steps=128"]
    base += ["hp.props_num_steps=8"] if algo == "ppo_props" else []
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'a'}"]))
    real_save = ckpt.save

    def save_then_die(*args, **kwargs):  # the process dies right after its first checkpoint
        real_save(*args, **kwargs)
        raise _Interrupted

    monkeypatch.setattr(ckpt, "save", save_then_die)
    with pytest.raises(_Interrupted):
        train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'b'}"]))
    monkeypatch.setattr(ckpt, "save", real_save)
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'b'}", "run.resume=true"]))
    a, _ = ckpt.load(tmp_path / "a" / "checkpoints")
    b, meta = ckpt.load(tmp_path / "b" / "checkpoints")
    assert meta["step"] == 128 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "ppo_props"])
def test_pendulum_smoke(tmp_path, algo):
    extra = ["hp.props_num_steps=16"] if algo == "ppo_props" else []
    s = train(load_control_config(None, [*ON, *extra, f"algo={algo}", "run.total_steps=320", "env.max_episode_steps=200",
                                         f"run.out_dir={tmp_path}", "run.eval_every=320", "run.eval_episodes=1",
                                         "hp.num_steps=160"]))
    assert s["steps"] == 320 and math.isfinite(s["last_episodic_return"])
    from offpolicy.control.cli import evaluate_checkpoint

    r = evaluate_checkpoint(tmp_path / "checkpoints", episodes=1)
    assert r["algo"] == algo and math.isfinite(r["return_mean"])


def test_props_trains_on_the_rows_the_next_ppo_update_will_see(tmp_path, monkeypatch):
    # b = 2 batches of 32 steps, behaviour update every 8: inside a batch it sees the previous batch (once one
    # exists) plus the t rows collected so far; right after PPO it sees the one batch that stays
    import offpolicy.control.onpolicy as onpolicy

    seen, real = [], onpolicy.props_update

    def record(behaviour, opt, obs, act, logp, hp, gen):
        seen.append(obs.shape[0])
        return real(behaviour, opt, obs, act, logp, hp, gen)

    monkeypatch.setattr(onpolicy, "props_update", record)
    train(load_control_config(None, [*ON, "run.total_steps=96", "algo=ppo_props", f"run.out_dir={tmp_path}",
                                     "hp.props_num_steps=8", "hp.props_target_kl=null", "hp.buffer_batches=2"]))
    assert seen == [8, 16, 24, 32, 40, 48, 56, 32, 40, 48, 56, 32]
