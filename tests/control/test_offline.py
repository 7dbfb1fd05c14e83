"""collect -> dataset validation (file:line errors) -> td3_bc; the TD3+BC actor loss by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from offpolicy.control.config import ConfigError, load_control_config
from offpolicy.control.dataset import collect, read_dataset
from offpolicy.control.loop import train


def test_dataset_errors_name_file_and_line(tmp_path):
    good = {"obs": [0.0, 1.0, 0.0], "action": [0.5], "reward": -1.0, "next_obs": [0.0, 1.0, 0.1], "terminal": False,
            "timeout": True, "behavior_logp": None, "source": "random", "episode": 0}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "action": [3.0]}) + "\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: action outside \[-1, 1\]"):
        read_dataset(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "obs": [0.0]}) + "\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: obs has 1 values, expected 3"):
        read_dataset(p)
    p.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:1: not valid JSON"):
        read_dataset(p)
    p.write_text(json.dumps(good) + "\n")
    d = read_dataset(p)
    assert d["end"].tolist() == [True] and d["term"].tolist() == [0.0] and math.isnan(d["behavior_logp"][0])


def test_td3_bc_actor_loss_by_hand():
    from offpolicy.control.td3 import td3_actor_loss

    q1 = torch.tensor([2.0, -4.0], requires_grad=True)
    pi, a = torch.tensor([[0.5], [0.0]]), torch.tensor([[0.0], [0.0]])
    # lambda = 2.5 / mean|Q| = 2.5 / 3 (a constant); -lambda * mean Q = -(2.5/3)(-1); BC = mean(0.25, 0) = 0.125
    loss = td3_actor_loss(q1, pi, a, bc_alpha=2.5)
    assert loss.item() == pytest.approx(2.5 / 3 + 0.125)
    loss.backward()
    assert q1.grad.tolist() == pytest.approx([-2.5 / 3 / 2] * 2)  # lambda carries no gradient
    assert td3_actor_loss(q1, pi, a, bc_alpha=None).item() == pytest.approx(1.0)  # plain TD3: -mean Q


@pytest.mark.slow
def test_collect_then_td3_bc_then_eval(tmp_path, tiny):
    ckpt_dir = tmp_path / "sac"
    train(load_control_config(None, [*tiny, "run.total_steps=60", f"run.out_dir={ckpt_dir}"]))
    data = tmp_path / "data.jsonl"
    info = collect([("random", 1), (str(ckpt_dir / "checkpoints"), 1)], data, env_id="Pendulum-v1", seed=0)
    assert info["episodes"] == {"random": 1, str(ckpt_dir / "checkpoints"): 1}
    d = read_dataset(data)
    assert d["obs"].shape == (400, 3) and not torch.isnan(d["behavior_logp"]).any()  # random + SAC: both known
    assert d["end"].sum().item() == 2 and d["term"].sum().item() == 0  # Pendulum only times out
    s = train(load_control_config(None, ["algo=td3_bc", "run.progress=false", "run.threads=1", "hp.hidden=[16,16]",
                                         "hp.batch_size=32", f"hp.dataset={data}", "run.total_steps=50",
                                         "run.eval_episodes=1", f"run.out_dir={tmp_path / 'bc'}"]))
    assert s["steps"] == 50 and s["transitions"] == 400 and math.isfinite(s["eval_return"])
    from offpolicy.control.cli import evaluate_checkpoint

    assert math.isfinite(evaluate_checkpoint(tmp_path / "bc" / "checkpoints", 1)["return_mean"])


def test_collect_is_reproducible(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    torch.manual_seed(123)
    collect([("random", 1)], a, env_id="Pendulum-v1", seed=4)
    state = torch.get_rng_state()
    collect([("random", 1)], b, env_id="Pendulum-v1", seed=4)
    assert a.read_bytes() == b.read_bytes()  # the same seed gives the same dataset ...
    assert torch.equal(torch.get_rng_state(), state)  # ... and the caller's RNG is left alone
