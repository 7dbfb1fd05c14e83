"""RO2O: the regularisers by hand, the SAC special case, offline -> online resume parity, a Pendulum smoke run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.config import load_control_config
from offpolicy.control.loop import train
from offpolicy.control.ro2o import (RO2O, RO2OConfig, ood_loss, ood_reg_at, perturb, policy_smooth_loss,
                                    q_smooth_loss)
from offpolicy.control.sac import critic_mse, soft_target


def test_ensemble_target_takes_the_minimum_of_all_critics():
    q_next = torch.tensor([[1.0, 5.0], [3.0, -2.0], [0.5, 4.0]])  # N = 3 critics, B = 2
    y = soft_target(q_next, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.0]),
                    torch.tensor(0.5))
    assert y.tolist() == pytest.approx([1 + 0.9 * 0.5, 1.0])  # min 0.5; the terminal row ignores min(-2) - 0.5


def test_q_smooth_loss_is_asymmetric_and_takes_the_worst_perturbation():
    q = torch.tensor([[1.0], [2.0]], requires_grad=True)  # N = 2, B = 1
    # n = 2 perturbations: diffs critic 1: +1, -2; critic 2: +3, 0
    q_n = torch.tensor([[[2.0, -1.0]], [[5.0, 2.0]]], requires_grad=True)
    tau = 0.2
    # sample 1: mean_i (0.8 * 1, 0.8 * 9) = 4.0; sample 2: mean_i (0.2 * 4, 0) = 0.4 -> max 4.0
    loss = q_smooth_loss(q_n, q, tau)
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    # d/dq_n[i, 0, 0] = 0.8 * 2 d / 2 (mean over the two critics): critic 1: 0.8, critic 2: 2.4; sample 2 gets nothing
    assert q_n.grad[:, 0, 0].tolist() == pytest.approx([0.8, 2.4]) and q_n.grad[:, 0, 1].tolist() == [0.0, 0.0]
    assert q.grad[:, 0].tolist() == pytest.approx([-0.8, -2.4])  # both sides carry gradient


def test_policy_smooth_loss_is_the_symmetric_gaussian_kl():
    mu, log_std = torch.tensor([[0.0]]), torch.tensor([[0.0]])
    mu_n = torch.tensor([[[1.0], [0.5]]])  # n = 2 perturbations, same std
    log_std_n = torch.zeros(1, 2, 1)
    # KL(N(0,1)||N(m,1)) = m^2/2 each way: the worst sample m = 1 gives 0.5 + 0.5
    assert policy_smooth_loss(mu, log_std, mu_n, log_std_n).item() == pytest.approx(1.0)
    # different stds, no mean shift: KL(N(0,1)||N(0,e^2)) + KL(N(0,e^2)||N(0,1)) = (1 + e^-2/2 - 1/2 - 1) + ...
    s = math.e
    kl = (math.log(s) + 1 / (2 * s * s) - 0.5) + (-math.log(s) + s * s / 2 - 0.5)
    got = policy_smooth_loss(mu, log_std, torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    assert got.item() == pytest.approx(kl)


def test_ood_loss_pushes_each_critic_down_by_reg_times_the_ensemble_std():
    q = torch.tensor([[1.0, 0.0], [3.0, 0.0]], requires_grad=True)  # N = 2, M = 2; std over critics: sqrt(2), 0
    loss = ood_loss(q, reg=0.5)
    assert loss.item() == pytest.approx((0.5 * math.sqrt(2)) ** 2 / 2)  # mean over the 4 entries of (reg std)^2
    loss.backward()
    # gradient 2 (q - target) / 4 = reg std / 2 on the first state, 0 on the second (std is a constant)
    g = 0.5 * math.sqrt(2) / 2
    assert q.grad.flatten().tolist() == pytest.approx([g, 0.0, g, 0.0])


def test_perturbations_share_offsets_and_stay_in_the_box():
    torch.manual_seed(0)
    obs = torch.tensor([[0.0, 10.0], [5.0, -5.0]])
    p = perturb(obs, 0.01, 7)
    assert p.shape == (2, 7, 2)
    d = p - obs.unsqueeze(1)
    assert d.abs().max() <= 0.01 and torch.allclose(d[0], d[1], atol=1e-5)  # the same n offsets for every state


def test_ood_reg_decays_offline_and_sits_at_its_floor_online():
    hp = RO2OConfig(ood_reg=1.0, ood_reg_min=0.1, ood_reg_decay=0.1)
    assert [ood_reg_at(hp, u, False) for u in (0, 1, 5, 100)] == pytest.approx([1.0, 0.9, 0.5, 0.1])
    assert ood_reg_at(hp, 0, True) == 0.1


def test_with_the_regularisers_off_and_two_critics_the_critic_loss_is_sacs():
    hp = RO2OConfig(hidden=[8, 8], n_critics=2, beta_q_smooth=0.0, beta_ood=0.0, beta_policy=0.0)
    torch.manual_seed(0)
    agent = RO2O(3, 1, hp)
    b = {"obs": torch.randn(16, 3), "act": torch.rand(16, 1) * 2 - 1, "rew": torch.randn(16),
         "next_obs": torch.randn(16, 3), "discount": torch.full((16,), 0.99)}
    alpha = torch.tensor(0.3)
    torch.manual_seed(1)
    loss, out = agent.critic_loss(b["obs"], b["act"], b["rew"], b["next_obs"], b["discount"], alpha, 1.0, True)
    assert set(out) == {"losses/qf_loss", "losses/qf_values", "losses/q_std"}  # no regulariser was computed
    torch.manual_seed(1)  # SAC's clipped double-Q loss on the same nets and the same a' draw
    with torch.no_grad():
        a2, logp2 = agent.nets["actor"].sample(b["next_obs"])
        y = soft_target(agent.nets["critic_target"](b["next_obs"], a2).squeeze(-1), logp2, b["rew"], b["discount"],
                        alpha)
    sac = critic_mse(agent.nets["critic"](b["obs"], b["act"]).squeeze(-1), y)
    assert torch.equal(loss, sac)
    # and with the regularisers on, the loss adds exactly eta_1 * smooth + eta_2 * ood
    agent.hp = RO2OConfig(hidden=[8, 8], n_critics=2, sample_size=3)
    torch.manual_seed(1)
    loss2, out2 = agent.critic_loss(b["obs"], b["act"], b["rew"], b["next_obs"], b["discount"], alpha, 1.0, True)
    expect = sac + 1e-4 * out2["losses/q_smooth_loss"] + 0.1 * out2["losses/ood_loss"]
    assert loss2.item() == pytest.approx(expect.item(), rel=1e-6)


def test_online_regularize_false_drops_the_regularisers_online_only():
    hp = RO2OConfig(hidden=[8], n_critics=3, sample_size=2, online_regularize=False)
    agent = RO2O(3, 1, hp)
    b = {"obs": torch.randn(8, 3), "act": torch.rand(8, 1) * 2 - 1, "rew": torch.randn(8),
         "next_obs": torch.randn(8, 3), "discount": torch.full((8,), 0.99)}
    assert "losses/ood_loss" in agent.update(b, 0) and "losses/policy_smooth_loss" in agent.update(b, 1)
    agent.start_online()
    out = agent.update(b, 2)
    assert not {"losses/ood_loss", "losses/q_smooth_loss", "losses/policy_smooth_loss"} & set(out)


def _dataset(tmp_path):
    """A small Pendulum dataset: one random episode (200 transitions), no SAC needed."""
    from offpolicy.control.dataset import collect

    data = tmp_path / "data.jsonl"
    collect([("random", 1)], data, env_id="Pendulum-v1", seed=0)
    return data


def test_resume_offline_then_online_equals_the_uninterrupted_run(tmp_path):
    data = _dataset(tmp_path)
    base = ["algo=ro2o", "run.progress=false", "run.threads=1", "hp.hidden=[8,8]", "hp.n_critics=3",
            "hp.sample_size=2", "hp.batch_size=16", f"hp.dataset={data}", "run.eval_episodes=1",
            "env.max_episode_steps=20", "run.checkpoint_every=30", "hp.learning_starts=10", "run.log_every=10"]
    train(load_control_config(None, [*base, "run.total_steps=20", "hp.online_steps=60",
                                     f"run.out_dir={tmp_path / 'full'}"]))
    part = [*base, f"run.out_dir={tmp_path / 'part'}"]
    train(load_control_config(None, [*part, "run.total_steps=10"]))  # stopped in the offline phase
    train(load_control_config(None, [*part, "run.total_steps=20", "hp.online_steps=30", "run.resume=true"]))  # online
    s = train(load_control_config(None, [*part, "run.total_steps=20", "hp.online_steps=60", "run.resume=true"]))
    full, fmeta = ckpt.load(tmp_path / "full" / "checkpoints")
    resumed, meta = ckpt.load(tmp_path / "part" / "checkpoints")
    # online updates from env step 16 (a full batch) to 60
    assert meta["phase"] == "online" and meta["env_step"] == 60 and meta["n_updates"] == 20 + 45
    assert full.keys() == resumed.keys() and "buffer/obs" in full
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert s["offline_return"] == fmeta["offline_return"] and s["online_steps"] == 60


@pytest.mark.slow
def test_ro2o_and_td3_bc_offline_to_online_smoke(tmp_path):
    data = _dataset(tmp_path)
    for algo in ("ro2o", "td3_bc"):
        out = tmp_path / algo
        s = train(load_control_config(None, [f"algo={algo}", "run.progress=false", "run.threads=1",
                                             "hp.hidden=[16,16]", "hp.batch_size=32", f"hp.dataset={data}",
                                             "run.total_steps=50", "hp.online_steps=250", "hp.learning_starts=50",
                                             "hp.online_keep_dataset=true", "run.eval_episodes=1",
                                             "run.log_every=50", f"run.out_dir={out}"]))
        assert s["steps"] == 50 and s["online_steps"] == 250 and s["transitions"] == 200
        assert math.isfinite(s["offline_return"]) and math.isfinite(s["eval_return"])
        assert s["last_episodic_return"] is not None  # one online episode of 200 steps finished
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("charts/episodic_return" in x for x in lines) and (out / "returns.png").exists()
        if algo == "ro2o":
            assert any("losses/ood_loss" in x and x["global_step"] > 50 for x in lines)  # regularised online
    from offpolicy.control.cli import evaluate_checkpoint

    assert math.isfinite(evaluate_checkpoint(tmp_path / "ro2o" / "checkpoints", 1)["return_mean"])


def test_recipe_loads():
    cfg = load_control_config("recipes/control/ro2o_pendulum.yaml")
    hp = cfg.hyperparams()
    assert cfg.algo == "ro2o" and hp.online_steps == 5000 and hp.n_critics == 10 and hp.sample_size == 20
