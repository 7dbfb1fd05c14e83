"""Atomic checkpoints: ``latest`` always names a complete one, a crash mid-save changes nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from offpolicy.policy.model import CheckpointError
from offpolicy.train import checkpoint as ckpt_mod
from offpolicy.train.checkpoint import (MANIFEST, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                        set_rng_state)


def _weights(policy):
    return {k: v.clone() for k, v in policy.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_round_trip(tiny_policy, tmp_path):
    root = tmp_path / "checkpoints"
    path = save_checkpoint(root, "step_rl_000001", tiny_policy, {"step": 1, "stage": "rl"})
    assert path == root / "step_rl_000001"
    assert latest_checkpoint(root) == path
    policy, state = load_checkpoint(path)
    assert _same(_weights(policy), _weights(tiny_policy))
    assert state["step"] == 1 and state["stage"] == "rl" and "rng" in state
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_no_checkpoint_yet(tmp_path):
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_load_of_a_folder_that_is_not_a_training_checkpoint(tiny_policy, tmp_path):
    tiny_policy.save(tmp_path / "policy_only")
    with pytest.raises(CheckpointError, match=MANIFEST):
        load_checkpoint(tmp_path / "policy_only")


def test_latest_pointing_at_an_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_rl_000009")
    with pytest.raises(CheckpointError, match="no loadable checkpoint.*step_rl_000009"):
        latest_checkpoint(tmp_path)


def test_crash_mid_save_leaves_the_previous_checkpoint_and_latest_intact(tiny_policy, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root, "step_rl_000001", tiny_policy, {"step": 1})
    before = _weights(tiny_policy)
    with torch.no_grad():
        for p in tiny_policy.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_state", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, "step_rl_000002", tiny_policy, {"step": 2})
    monkeypatch.undo()
    assert not (root / "step_rl_000002").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_rl_000001"]  # no half-written copy left
    assert latest_checkpoint(root) == first
    policy, state = load_checkpoint(latest_checkpoint(root))
    assert state["step"] == 1 and _same(_weights(policy), before)
    # the next save works and moves `latest`
    second = save_checkpoint(root, "step_rl_000003", tiny_policy, {"step": 3})
    assert latest_checkpoint(root) == second


def test_crash_while_replacing_a_same_named_checkpoint_keeps_the_old_one(tiny_policy, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, "final", tiny_policy, {"step": 1})

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(ckpt_mod, "save_state", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(root, "final", tiny_policy, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(latest_checkpoint(root))[1]["step"] == 1


def test_replacing_a_same_named_checkpoint(tiny_policy, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, "final", tiny_policy, {"step": 1})
    save_checkpoint(root, "final", tiny_policy, {"step": 2})
    assert load_checkpoint(root / "final")[1]["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["final", "latest"]


def test_keep_only_the_newest_step_checkpoints(tiny_policy, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, "sft", tiny_policy, {"step": 0})
    for step in range(1, 5):
        save_checkpoint(root, f"step_rl_{step:06d}", tiny_policy, {"step": step}, keep=2)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["sft", "step_rl_000003", "step_rl_000004"]  # named (non-step) checkpoints are kept
    assert latest_checkpoint(root).name == "step_rl_000004"


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_checkpoint_restores_the_rng(tiny_policy, tmp_path):
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path, "step_rl_000001", tiny_policy, {})
    expected = torch.rand(4)
    _, state = load_checkpoint(path)
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(4), expected)
