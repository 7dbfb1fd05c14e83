"""Poisoned numbers on real training runs (d_model=32, about a second each): every run either trains with
finite weights (and the guard that caught the poison counted it) or stops with one clear message, and no
checkpoint it wrote holds a non-finite weight.

Poisons: a reward of 1e30 (``reinforce`` advantage, no gradient clipping), the same with the reward bound
lifted (so it reaches the learner), a learning rate of 1e3, a temperature of 1e-6, and loss
hyperparameters at their edge (a PPO clip of 0, a KL coefficient of 1e30).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offpolicy.cli import app
from offpolicy.report.metrics import read_metrics
from offpolicy.train.checkpoint import latest_checkpoint, load_checkpoint
from offpolicy.config import TrainingDiverged
from offpolicy.train.runner import train

HUGE_REWARD = '''
def digits(prompt, completion, answer):  # signal for an untrained model: non-zero advantages, real gradients
    return sum(c.isdigit() for c in completion) / max(1, len(completion))

def huge(prompt, completion, answer):
    return 1e30 * digits(prompt, completion, answer)
'''

BASE = ("rl.steps=3", "run.checkpoint_every=1", "rl.drop_uninformative_groups=false",
        "task.reward=offpolicy_poison_reward:digits")
REINFORCE_NO_CLIP = ("rl.loss=reinforce", "rl.advantage=reinforce", "rl.optim.grad_clip=0")
POISONS = {
    "reward_1e30": ("task.reward=offpolicy_poison_reward:huge", *REINFORCE_NO_CLIP),
    "lr_1e3": ("rl.optim.lr=1e3",),
    "lr_1e3_no_clip": ("rl.optim.lr=1e3", *REINFORCE_NO_CLIP),
    "temperature_1e-6": ("sampling.temperature=1e-6",),
    "ppo_clip_0": ("rl.loss_params.clip_low=0", "rl.loss_params.clip_high=0"),
    "kl_coef_1e30": ("rl.kl_coef=1e30",),
    "lr_1e3_weight_decay": ("rl.optim.lr=1e3", "rl.optim.weight_decay=0.1"),  # |1 - lr·wd| = 99: weights explode
}


@pytest.fixture
def poison_reward(tmp_path, monkeypatch):
    mod = tmp_path / "poison_mod"
    mod.mkdir()
    (mod / "offpolicy_poison_reward.py").write_text(HUGE_REWARD)
    monkeypatch.syspath_prepend(str(mod))


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())


def assert_checkpoints_finite(out: Path) -> int:
    """Load every checkpoint the run left and check each weight; returns how many there were."""
    found = checkpoints(out)
    for path in found:
        policy, _ = load_checkpoint(path)
        bad = [n for n, p in policy.model.state_dict().items() if not torch.isfinite(p).all()]
        assert not bad, f"{path.name}: non-finite {bad[:3]}"
    return len(found)


def rl_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "rl" and "train/version" in r]


SLOW = {"kl_coef_1e30"}  # a reference model and skipped updates: ~5 s


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(POISONS)])
def test_poison_is_stopped(name, tmp_path, tiny_config, poison_reward):
    out = tmp_path / name
    cfg = tiny_config(out, *BASE, *POISONS[name])
    try:
        train(cfg)
        stopped = None
    except TrainingDiverged as e:
        stopped = str(e)
    assert assert_checkpoints_finite(out) >= 1
    rows = rl_rows(out)
    if stopped is None:  # it trained: the weights are finite and the last row is the last step
        final, _ = load_checkpoint(out / "checkpoints" / "final")
        assert all(torch.isfinite(p).all() for p in final.parameters())
        assert rows[-1]["step"] == 3
    else:
        assert any(k in stopped for k in ("rl.max_skipped_steps", "rl.optim.lr", "not finite")), stopped
        assert "stays latest" in stopped or "no checkpoint" in stopped
    assert all("train/skipped_steps" in r for r in rows)
    if name == "kl_coef_1e30":  # a KL of ~1e30 x a small divergence overflows: those updates are skipped
        assert rows[-1]["train/skipped_steps"] > 0
    if name == "reward_1e30":  # the reward guard zeroed it: counted as reward errors, nothing skipped
        assert stopped is None and sum(r["reward/errors"] for r in rows) > 0
        assert all(r["train/skipped_steps"] == 0 for r in rows)


def test_poisoned_reward_past_the_bound_stops_with_the_last_good_checkpoint(tmp_path, tiny_config, poison_reward):
    """With ``task.reward_bound`` lifted, 1e30 rewards reach the learner: every update's gradient overflows,
    each is skipped and counted, and the run stops after ``rl.max_skipped_steps``; the SFT checkpoint
    written before stays ``latest``."""
    out = tmp_path / "run"
    cfg = tiny_config(out, *BASE, *POISONS["reward_1e30"], "task.reward_bound=1e38", "rl.max_skipped_steps=2",
                      "sft.steps=1", "rl.steps=4")
    with pytest.raises(TrainingDiverged, match=r"rl.max_skipped_steps=2: 2 consecutive .* non-finite grad .*"
                                               r"Stopped in rl step 2; .*checkpoints/step_rl_000001, stays latest"):
        train(cfg)
    # step 1's update was skipped, so its checkpoint holds the SFT weights: a good state, and latest
    assert latest_checkpoint(out / "checkpoints").name == "step_rl_000001"
    assert assert_checkpoints_finite(out) >= 2
    sft, rl1 = (load_checkpoint(out / "checkpoints" / n)[0].model.state_dict() for n in ("sft", "step_rl_000001"))
    assert all(torch.equal(sft[k], rl1[k]) for k in sft)
    rows = rl_rows(out)
    assert [r["train/skipped_nonfinite_grad"] for r in rows] == [1.0]  # step 1 logged; step 2 stopped the run


def test_cli_prints_one_line_and_exits_2(tmp_path, tiny_overrides, poison_reward):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), *tiny_overrides(out, *BASE, *POISONS["reward_1e30"],
                                                                            "task.reward_bound=1e38",
                                                                            "rl.max_skipped_steps=1")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rl.max_skipped_steps=1") and "Traceback" not in result.output


HANGING_REWARD = '''
def mostly_hangs(prompt, completion, answer):
    if not completion.strip().isdigit():  # the untrained policy's answers never return, burning CPU (references do)
        while True:
            pass
    return sum(c.isdigit() for c in completion) / max(1, len(completion))
'''


@pytest.mark.slow  # ~5 s: a fork per reward worker per batch, and the killed calls' timeouts
def test_hanging_reward_in_a_process_is_killed(tmp_path, tiny_config, monkeypatch):
    """``task.reward_isolation=process``: a reward that never returns is killed at ``task.reward_timeout_s``
    in training and in evaluation; the run finishes, the timeouts are counted, nothing is left running."""
    import os

    import psutil

    mod = tmp_path / "hang_mod"
    mod.mkdir()
    (mod / "offpolicy_hanging_reward.py").write_text(HANGING_REWARD)
    monkeypatch.syspath_prepend(str(mod))
    out = tmp_path / "run"
    cfg = tiny_config(out, "rl.steps=1", "task.reward=offpolicy_hanging_reward:mostly_hangs",
                      "task.reward_timeout_s=0.1", "task.reward_isolation=process", "eval.samples=1",
                      "eval.n_problems=2", "rl.prompts_per_step=2", "rl.drop_uninformative_groups=false")
    train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert sum(r["reward/errors"] for r in rows if "reward/errors" in r) > 0
    assert sum(r["eval/reward_errors"] for r in rows if "eval/reward_errors" in r) > 0
    alive = [p for p in psutil.Process(os.getpid()).children(recursive=True)
             if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"reward processes left running: {alive}"
