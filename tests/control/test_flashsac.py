"""FlashSAC: the categorical target by hand, the norm bounds, the reward scale, resume, smoke."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.config import load_control_config
from offpolicy.control.flashsac import FlashSAC, FlashSACConfig, UnitBatchNorm, UnitLinear, categorical_target
from offpolicy.control.loop import train

SMALL = ["hp.actor_hidden=8", "hp.critic_hidden=8", "hp.actor_blocks=1", "hp.critic_blocks=1", "hp.num_bins=11"]


def test_categorical_target_projects_onto_the_atoms_by_hand():
    atoms = torch.tensor([-1.0, 0.0, 1.0])
    p_next = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]).log()
    # row 0: all mass at z = 0 -> 0.5 + 0.5 * (0 - 0) = 0.5 -> split between atoms 0 and 1
    # row 1: terminal (discount 0): all mass at r = -0.25 -> 0.25 on -1, 0.75 on 0
    t = categorical_target(p_next, torch.tensor([0.5, -0.25]), torch.tensor([0.5, 0.0]), torch.zeros(2), atoms)
    assert t.tolist() == [pytest.approx([0.0, 0.5, 0.5]), pytest.approx([0.25, 0.75, 0.0])]
    # entropy term and clipping: z - soft = 1 - 3 = -2 -> 0.5 * -2 = -1 (atom -1); beyond the support clips
    t = categorical_target(torch.tensor([[0.0, 0.0, 1.0]]).log(), torch.zeros(1), torch.tensor([0.5]),
                           torch.tensor([3.0]), atoms)
    assert t.tolist() == [pytest.approx([1.0, 0.0, 0.0])]


def test_updates_keep_weight_and_feature_norms_bounded():
    torch.manual_seed(0)
    hp = FlashSACConfig(actor_hidden=8, critic_hidden=8, actor_blocks=1, critic_blocks=1, num_bins=11,
                        actor_update_period=1)
    agent = FlashSAC(3, 1, hp)
    b = {"obs": torch.randn(32, 3) * 5, "act": torch.rand(32, 1) * 2 - 1, "rew": torch.randn(32) * 10,
         "next_obs": torch.randn(32, 3), "discount": torch.full((32,), 0.99)}
    for i in range(3):
        agent.update(b, i)
    for m in [*agent.nets["actor"].modules(), *agent.nets["critic"].modules()]:
        if isinstance(m, UnitLinear):
            assert torch.allclose(m.weight.norm(dim=-1), torch.ones(()), atol=1e-5)
        if isinstance(m, UnitBatchNorm):
            d = m.weight.shape[-1]
            assert torch.allclose((m.weight.pow(2) + m.bias.pow(2)).sum(-1).sqrt(), torch.tensor(math.sqrt(d)),
                                  atol=1e-4)


def test_reward_scale_keeps_returns_inside_the_support():
    agent = FlashSAC(3, 1, FlashSACConfig(actor_hidden=8, critic_hidden=8, g_max=5.0))
    for _ in range(50):
        agent.observe([10.0], [False], [False])  # G -> 10 (1 - 0.99^50) / 0.01 ~ 395
    g_max = agent.nets["state"].g_abs_max.item()
    assert agent.reward_scale().item() >= g_max / 5.0 - 1e-4  # |G| / scale <= G_max
    assert agent.target_entropy == pytest.approx(0.5 * math.log(2 * math.pi * math.e * 0.15 ** 2))


def test_resume_parity(tmp_path, tiny):
    base = [*tiny, *SMALL, "algo=flashsac", "run.total_steps=80", "run.checkpoint_every=40",
            "env.max_episode_steps=30"]
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'a'}"]))
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'b'}", "run.total_steps=40"]))
    train(load_control_config(None, [*base, f"run.out_dir={tmp_path / 'b'}", "run.resume=true"]))
    a, _ = ckpt.load(tmp_path / "a" / "checkpoints")
    b, _ = ckpt.load(tmp_path / "b" / "checkpoints")
    assert all(torch.equal(a[k], b[k]) for k in a) and "nets/state.noise" in a


@pytest.mark.slow
def test_pendulum_smoke(tmp_path, tiny):
    s = train(load_control_config(None, [*tiny, *SMALL, "algo=flashsac", "run.total_steps=400",
                                         f"run.out_dir={tmp_path}"]))
    assert s["steps"] == 400 and math.isfinite(s["last_episodic_return"])
    assert "losses/reward_scale" in (tmp_path / "metrics.jsonl").read_text()
