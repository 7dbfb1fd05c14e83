"""A resume through the new checkpoint format is exact, also after falling back past a corrupted checkpoint."""

from __future__ import annotations

import pytest

from offpolicy.policy.model import CheckpointError, load_policy
from offpolicy.train.checkpoint import LEGACY_STATE_FILE, MANIFEST, CheckpointFallback, latest_checkpoint
from offpolicy.train.runner import train

from test_runner import run_killed_after, weights_changed

EXTRA = ("sft.steps=2", "rl.steps=4", "run.checkpoint_every=1", "rl.drop_uninformative_groups=false",
         "rl.buffer.max_staleness=10", "eval.samples=0")


def test_resume_falls_back_past_a_corrupted_checkpoint_and_ends_bit_identical(tmp_path, tiny_config, reward_spec,
                                                                              monkeypatch):
    straight = tmp_path / "straight"
    train(tiny_config(straight, *EXTRA, f"task.reward={reward_spec}"))

    resumed = tmp_path / "resumed"
    cfg = tiny_config(resumed, *EXTRA, f"task.reward={reward_spec}")
    run_killed_after(monkeypatch, cfg, step=3)
    root = resumed / "checkpoints"
    bad = root / "step_rl_000003" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the weights
    bad.write_bytes(bytes(data))
    (root / ".step_rl_000004.tmp-killed").mkdir()  # and the orphan of a save killed midway
    with pytest.warns(CheckpointFallback, match=r"step_rl_000003.*sha256.*step_rl_000002"):
        train(cfg, resume=True)
    assert not (root / ".step_rl_000004.tmp-killed").exists()
    w1 = load_policy(straight / "checkpoints" / "final").model.state_dict()
    w2 = load_policy(root / "final").model.state_dict()
    assert not weights_changed(w1, w2)  # bit-identical to the uninterrupted run


def test_resume_from_checkpoints_that_are_all_bad_is_an_error(tmp_path, tiny_config, reward_spec, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(out, *EXTRA, f"task.reward={reward_spec}")
    run_killed_after(monkeypatch, cfg, step=1)
    for path in (out / "checkpoints").iterdir():
        if path.is_dir():
            (path / MANIFEST).unlink()
            (path / LEGACY_STATE_FILE).write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=f"no loadable checkpoint.*{LEGACY_STATE_FILE}.*loaded safely"):
        latest_checkpoint(out / "checkpoints")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        train(cfg, resume=True)  # not a silent fresh start
