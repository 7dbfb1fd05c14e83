"""Loading is not executing, and a bad checkpoint is refused by name.

The trainer state goes through safetensors + JSON (never pickle) and round-trips
exactly; a planted pickle or crafted state file is refused without being run;
the manifest catches truncated, missing, garbled and flipped files; ``latest``
falls back to the previous good checkpoint; pruning and orphan cleanup keep the
right folders.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from offpolicy.config import OptimConfig, RLConfig
from offpolicy.data.buffer import Group, ReplayBuffer
from offpolicy.experience import Experience
from offpolicy.policy.model import CheckpointError
from offpolicy.train.checkpoint import (LEGACY_STATE_FILE, MANIFEST, STATE_JSON, STATE_TENSORS, CheckpointFallback,
                                        clean_orphans, latest_checkpoint, load_checkpoint, rng_state,
                                        save_checkpoint, set_rng_state, verify_checkpoint, write_manifest)
from offpolicy.train.learner import Learner
from offpolicy.train.state_io import load_state, save_state

from test_learner import rollout_batch


# ---- exact comparison ----------------------------------------------------------------------------
def assert_same(a, b, path="state"):
    """Equal values *and* types (tuples stay tuples, int keys stay ints, NaN equals NaN, dtypes kept)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert type(k) is type(list(b)[list(a).index(k)]), f"{path} key {k!r}"
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        return
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.cpu().numpy().tobytes() == b.numpy().tobytes(), path  # bit-exact, NaN included
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def trainer_state(policy):
    """A run state as the runner builds it: learner (optimizer, anchors, controllers), buffer with experiences."""
    cfg = RLConfig(optim=OptimConfig(lr=1e-2),
                   controllers={"remix": {}, "adaptive_kl": {}, "ewma_proximal": {}})
    learner = Learner(policy, cfg, total_updates=4)
    batch = rollout_batch(policy)
    learner.update(batch)  # optimizer state is filled (int-keyed, with 0-dim step tensors)
    buffer = ReplayBuffer(capacity=8, seed=3)
    for g in range(2):
        exps = [Experience([1, 2, 3], [4, 5], reward=0.5 * i, behavior_logprobs=[-0.1, -2.5], group_id=f"g{g}",
                           sampling={"temperature": 1.0, "top_p": 1.0}, engine="tiny", info={"note": [1, (2, 3)]})
                for i in range(2)]
        buffer.add(Group.of(exps))
    buffer.sample(1, current_version=0)
    return {"stage": "rl", "step": 3, "rollouts": 48, "elapsed": 1.25, "rl_tokens": 10**20,
            "evals": {"before_rl": {"accuracy": float("nan"), "pass@k": float("inf"), "n": np.int64(6),
                                    "mean": np.float32(0.25)}},
            "stage_state": {"learner": learner.state_dict(), "buffer": buffer.state_dict()},
            "odd": {1: "int key", (2, "x"): None, "@": -0.0, "neg": float("-inf"), "flag": True, "none": None},
            "rng": rng_state()}


def test_trainer_state_round_trips_exactly_without_pickle(tiny_policy, tmp_path):
    state = trainer_state(tiny_policy)
    written = save_state(state, tmp_path, STATE_JSON, STATE_TENSORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
    assert_same(state, load_state(tmp_path, STATE_JSON, STATE_TENSORS))
    doc = json.loads((tmp_path / STATE_JSON).read_text())  # readable JSON: plain objects where keys are strings
    assert doc["tree"]["stage"] == "rl" and doc["tree"]["stage_state"]["learner"]["version"] == 1


def test_restored_learner_and_buffer_continue_identically(tiny_policy, tmp_path):
    state = trainer_state(tiny_policy)
    save_state(state, tmp_path, STATE_JSON, STATE_TENSORS)
    back = load_state(tmp_path, STATE_JSON, STATE_TENSORS)
    a, b = ReplayBuffer(capacity=8), ReplayBuffer(capacity=8)
    a.load_state_dict(state["stage_state"]["buffer"])
    b.load_state_dict(back["stage_state"]["buffer"])
    assert [g.experiences for g in a.sample(2, 0)] == [g.experiences for g in b.sample(2, 0)]
    set_rng_state(back["rng"])
    x = (torch.rand(2), random.random(), np.random.rand())
    set_rng_state(state["rng"])
    assert torch.equal(x[0], torch.rand(2)) and x[1:] == (random.random(), np.random.rand())


def test_unsupported_object_is_refused_at_save_naming_its_path(tiny_policy, tmp_path):
    state = {"stage_state": {"learner": {"fn": lambda: 0}}}
    with pytest.raises(TypeError, match=r"state\['stage_state'\]\['learner'\]\['fn'\].*function"):
        save_checkpoint(tmp_path, "step_rl_000001", tiny_policy, state)
    assert not list(tmp_path.iterdir())  # nothing published, no temp folder left
    with pytest.raises(TypeError, match="dtype object"):
        save_state({"a": np.array([object()])}, tmp_path, STATE_JSON, STATE_TENSORS)


# ---- hostile checkpoints ----------------------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker``: stands for any command a crafted pickle would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_payload_would_run_if_unpickled(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))  # so the tests below mean something
    assert (tmp_path / "ran").exists()


def test_an_old_format_pickle_checkpoint_is_refused_without_running_it(tiny_policy, tmp_path):
    root, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    tiny_policy.save(root / "step_rl_000001")
    (root / "step_rl_000001" / LEGACY_STATE_FILE).write_bytes(pickle.dumps({"step": 1, "x": Payload(marker)}))
    (root / "latest").write_text("step_rl_000001")
    with pytest.raises(CheckpointError, match=rf"{LEGACY_STATE_FILE}: an old-format checkpoint .*loaded safely"):
        load_checkpoint(root / "step_rl_000001")
    with pytest.raises(CheckpointError, match=f"no loadable checkpoint.*{LEGACY_STATE_FILE}"):
        latest_checkpoint(root)
    assert not marker.exists()


def test_a_pickle_planted_in_a_good_checkpoint_is_refused(tiny_policy, tmp_path):
    path, marker = save_checkpoint(tmp_path, "step_rl_000001", tiny_policy, {"step": 1}), tmp_path / "pwned"
    (path / LEGACY_STATE_FILE).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=f"{LEGACY_STATE_FILE}: not listed in {MANIFEST}"):
        load_checkpoint(path)
    write_manifest(path)  # the attacker rewrites the manifest too: the pickle is refused by its kind
    with pytest.raises(CheckpointError, match=f"{LEGACY_STATE_FILE}: a pickle file"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("tree, message", [
    ({"@": "pickle", "data": "gASV"}, "unknown tag 'pickle'"),
    ({"a": {"@": "ndarray", "key": "a", "dtype": "|O", "shape": [1]}}, "numpy dtype object is not allowed"),
    ({"a": {"@": "tensor", "key": "nope"}}, "tensor 'nope' is missing"),
    ({"a": {"@": "float", "value": "__import__('os')"}}, "bad float"),
])
def test_a_crafted_state_file_is_refused_naming_it(tiny_policy, tmp_path, tree, message):
    path = save_checkpoint(tmp_path, "step_rl_000001", tiny_policy, {"step": 1})
    (path / STATE_JSON).write_text(json.dumps({"format": "offpolicy-state", "version": 1, "tree": tree}))
    write_manifest(path)  # consistent checksums: only the content is hostile
    with pytest.raises(CheckpointError, match=rf"{STATE_JSON}: .*{message}"):
        load_checkpoint(path)


def test_a_crafted_safetensors_header_is_refused_naming_it(tiny_policy, tmp_path):
    path = save_checkpoint(tmp_path, "step_rl_000001", tiny_policy, {"step": 1})
    (path / STATE_TENSORS).write_bytes((2**40).to_bytes(8, "little") + b"{}")
    write_manifest(path)
    with pytest.raises(CheckpointError, match=f"{STATE_TENSORS}: not a readable safetensors file"):
        load_checkpoint(path)


# ---- manifest -----------------------------------------------------------------------------------
def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def garble(f):
    f.write_text(f.read_text()[:-7] + "}}{")


@pytest.mark.parametrize("file, damage, message", [
    ("model.safetensors", truncate, "truncated"),
    (STATE_TENSORS, truncate, "truncated"),
    ("model.safetensors", flip, "sha256 differs"),
    (STATE_JSON, flip, "sha256 differs"),
    ("config.json", lambda f: f.unlink(), "missing"),
    (STATE_JSON, garble, "truncated|sha256 differs"),
    (MANIFEST, garble, "malformed"),
    (MANIFEST, lambda f: f.unlink(), "missing"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tiny_policy, tmp_path, file, damage, message):
    path = save_checkpoint(tmp_path, "step_rl_000001", tiny_policy, {"step": 1})
    verify_checkpoint(path)
    damage(path / file)
    with pytest.raises(CheckpointError, match=rf"{path / file}: .*({message})"):
        load_checkpoint(path)


def test_the_manifest_lists_every_file_with_sha256_and_size(tiny_policy, tmp_path):
    path = save_checkpoint(tmp_path, "final", tiny_policy, {"step": 1})
    doc = json.loads((path / MANIFEST).read_text())
    assert doc["format"] == "offpolicy-checkpoint" and doc["version"] == 1
    assert sorted(doc["files"]) == sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert doc["files"][STATE_JSON]["size"] == (path / STATE_JSON).stat().st_size


# ---- latest, fallback, pruning, orphans ---------------------------------------------------------
def save_steps(root, policy, steps, keep=0):
    return [save_checkpoint(root, f"step_rl_{s:06d}", policy, {"step": s}, keep=keep) for s in steps]


def test_latest_falls_back_to_the_previous_good_checkpoint_saying_so(tiny_policy, tmp_path):
    *_, second, third = save_steps(tmp_path, tiny_policy, [1, 2, 3])
    flip(third / "model.safetensors")
    said = []
    assert latest_checkpoint(tmp_path, warn=said.append) == second
    assert len(said) == 1 and "step_rl_000003" in said[0] and "sha256" in said[0] and str(second) in said[0]
    with pytest.warns(CheckpointFallback, match="previous good one"):  # the default: a warning
        assert latest_checkpoint(tmp_path) == second
    assert load_checkpoint(second)[1]["step"] == 2


def test_no_good_checkpoint_is_an_error_not_none(tiny_policy, tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    for path in save_steps(tmp_path, tiny_policy, [1, 2]):
        truncate(path / STATE_TENSORS)
    with pytest.raises(CheckpointError, match="no loadable checkpoint.*step_rl_000002.*step_rl_000001"):
        latest_checkpoint(tmp_path)


def test_a_kill_before_latest_is_written_uses_the_newest_complete_one(tiny_policy, tmp_path):
    (first,) = save_steps(tmp_path, tiny_policy, [1])
    (tmp_path / "latest").unlink()
    with pytest.warns(CheckpointFallback):
        assert latest_checkpoint(tmp_path) == first


def test_pruning_orders_by_step_number_not_mtime_and_keeps_named_ones(tiny_policy, tmp_path):
    save_checkpoint(tmp_path, "sft", tiny_policy, {})
    save_steps(tmp_path, tiny_policy, [10, 9, 100])  # written out of order: 9 is the newest by mtime
    save_steps(tmp_path, tiny_policy, [101], keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["sft", "step_rl_000100", "step_rl_000101"]
    save_checkpoint(tmp_path, "final", tiny_policy, {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["final", "sft", "step_rl_000101"]


def test_pruning_skips_bad_checkpoints_and_never_deletes_latest(tiny_policy, tmp_path):
    first, second = save_steps(tmp_path, tiny_policy, [1, 2])
    (second / STATE_JSON).unlink()  # bad: does not count towards keep
    third = save_checkpoint(tmp_path, "step_rl_000003", tiny_policy, {"step": 3}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_rl_000001", "step_rl_000003"]
    # a resume from an older checkpoint saves a step checkpoint older than the kept ones: it stays (latest)
    save_steps(tmp_path, tiny_policy, [5, 6])
    older = save_checkpoint(tmp_path, "step_rl_000004", tiny_policy, {"step": 4}, keep=1)
    assert older.exists() and latest_checkpoint(tmp_path) == older and (tmp_path / "step_rl_000006").exists()
    assert not third.exists() and not first.exists()


def test_orphan_temp_folders_are_removed_at_the_next_save(tiny_policy, tmp_path):
    save_steps(tmp_path, tiny_policy, [1])
    (tmp_path / ".step_rl_000002.tmp-abc123").mkdir()
    (tmp_path / ".step_rl_000002.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".latest.xyz").write_text("step_rl_000002")
    save_steps(tmp_path, tiny_policy, [2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_rl_000001", "step_rl_000002"]


def test_a_kill_while_replacing_a_checkpoint_restores_the_old_copy(tiny_policy, tmp_path):
    final = save_checkpoint(tmp_path, "final", tiny_policy, {"step": 7})
    (tmp_path / ".final.tmp-q").mkdir()
    final.rename(tmp_path / ".final.old")  # killed between moving the old one aside and moving the new one in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        touched = clean_orphans(tmp_path)
        assert {p.name for p in touched} == {".final.old", ".final.tmp-q"}
        assert latest_checkpoint(tmp_path) == final and load_checkpoint(final)[1]["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest"]


def test_load_policy_checks_a_training_checkpoints_manifest(tiny_policy, tmp_path):
    """`offpolicy eval` and `policy.init` load weights with load_policy: a damaged checkpoint is refused there too."""
    from offpolicy.policy.model import load_policy

    path = save_checkpoint(tmp_path, "final", tiny_policy, {"step": 1})
    load_policy(path)
    flip(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{path / 'model.safetensors'}: .*sha256 differs"):
        load_policy(path)
