"""Atomic, verified checkpoints and exact resume; loading one never runs code.

A checkpoint is a folder ``checkpoints/<name>/`` holding

- the policy (``model.safetensors`` + ``config.json`` + tokenizer, loadable by
  :func:`~offpolicy.policy.model.load_policy`; for HF models ``from_pretrained``);
- the trainer state (optimizer, scheduler, replay buffer with its experiences,
  RNG states, counters) as ``state.json`` + ``state.safetensors``
  (:mod:`offpolicy.train.state_io`: data only, no pickle);
- ``manifest.json``: the sha256 and size of every other file, written last.

It is written into a temporary folder ``.<name>.tmp-*`` and renamed into place,
and ``checkpoints/latest`` (a text file naming the newest one) is replaced
atomically last, so a kill at any point leaves ``latest`` naming a complete
checkpoint. The manifest catches what atomicity cannot (a truncated copy, a
flipped byte, a file deleted by hand): such a checkpoint is refused with the
file named, and :func:`latest_checkpoint` falls back to the previous good one.
Old ``trainer_state.pt`` checkpoints (pickle) are refused, not unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from offpolicy.policy.model import CheckpointError, Policy, load_policy
from offpolicy.train.state_io import load_state, save_state

MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # pickle: refused
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")  # never in ours
FORMAT = "offpolicy-checkpoint"
FORMAT_VERSION = 1
STEP_NAME = re.compile(r"step_(?P<stage>.+)_(?P<step>\d+)")
STAGE_ORDER = {"sft": 0, "rl": 1}  # a run goes step_sft_* -> sft -> step_rl_* -> final
NAMED_ORDER = {"sft": (0, float("inf")), "final": (len(STAGE_ORDER), 0)}


class CheckpointFallback(UserWarning):
    """The newest checkpoint was bad and an older good one is used instead."""


# ---- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# ---- manifest ----------------------------------------------------------------------------------
def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(n for n in names if n != MANIFEST)


def _sha256(file: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if sync:  # durable before the rename that publishes it
            os.fsync(f.fileno())
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the sha256 and size of every file in ``directory``; call last, before publishing it."""
    files = {name: {"sha256": _sha256(directory / name, sync=True), "size": (directory / name).stat().st_size}
             for name in _files(directory)}
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "files": files}
    with open(directory / MANIFEST, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's file table; any malformation is an error naming manifest.json."""
    file = path / MANIFEST
    if not file.is_file():
        if (path / LEGACY_STATE_FILE).exists():
            raise CheckpointError(f"{path / LEGACY_STATE_FILE}: an old-format checkpoint (pickle), which cannot be "
                                  f"loaded safely; start a new run from its weights with policy.init={path}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder")
        raise CheckpointError(f"{file}: missing, so {path} is not a complete offpolicy checkpoint")
    try:
        doc = json.loads(file.read_text())
        files = doc["files"]
        if doc["format"] != FORMAT or doc["version"] != FORMAT_VERSION:
            raise ValueError(f"format {doc['format']!r} version {doc['version']!r}, expected {FORMAT!r} "
                             f"version {FORMAT_VERSION}")
        for name, entry in files.items():
            if name.startswith("/") or ".." in name.split("/") or name == MANIFEST:
                raise ValueError(f"bad file name {name!r}")
            if not (isinstance(entry["sha256"], str) and type(entry["size"]) is int):
                raise ValueError(f"bad entry for {name!r}")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: malformed ({type(e).__name__}: {e})") from None
    return files


def verify_checkpoint(path: str | Path) -> dict[str, dict]:
    """Check ``path`` against its manifest; return the file table. Raises CheckpointError naming the bad file.

    Refused: no manifest, a file listed but missing, a size or sha256 that differs
    (truncated, flipped byte), a file present but not listed (a planted pickle).
    Every call hashes every file (about 1 GB/s): a resume reads each file twice,
    once to choose the checkpoint and once to load it; no cache to go stale.
    """
    path = Path(path)
    files = _read_manifest(path)
    unlisted = sorted(set(_files(path)) - set(files))
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]}: not listed in {MANIFEST}; refusing a checkpoint with "
                              f"unaccounted files")
    pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(f"{path / pickles[0]}: a pickle file (by its name); offpolicy checkpoints hold none, "
                              f"refusing the folder")
    for name, entry in files.items():
        _verify_file(path / name, entry)
    return files


def _verify_file(file: Path, entry: dict) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
    size = file.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"{file}: {size} bytes, {MANIFEST} says {entry['size']} (truncated or overwritten)")
    if _sha256(file) != entry["sha256"]:
        raise CheckpointError(f"{file}: sha256 differs from {MANIFEST} (corrupted)")


def _looks_complete(path: Path) -> bool:
    """Manifest readable and every file of the right size: a cheap check, no hashing (for pruning)."""
    try:
        files = _read_manifest(path)
    except CheckpointError:
        return False
    return all((path / n).is_file() and (path / n).stat().st_size == e["size"] for n, e in files.items())


# ---- names and order ---------------------------------------------------------------------------
def _order(name: str) -> tuple | None:
    """Where ``name`` sits in a run (step_sft_* < sft < step_rl_* < final); None for names a run never writes."""
    if name in NAMED_ORDER:
        return NAMED_ORDER[name]
    m = STEP_NAME.fullmatch(name)
    if m is None:
        return None
    return STAGE_ORDER.get(m["stage"], 1.5), int(m["step"])  # an unknown stage: after rl, before final


def _checkpoints(root: Path, steps_only: bool = False) -> list[Path]:
    """The checkpoint folders a run writes, newest first by their place in the run (not by mtime)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _order(p.name) is not None
             and (not steps_only or STEP_NAME.fullmatch(p.name))]
    return sorted(found, key=lambda p: _order(p.name), reverse=True)


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or name == "latest":
        raise ValueError(f"checkpoint name {name!r}: must be a plain folder name")


# ---- saving ------------------------------------------------------------------------------------
def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, name: str, policy: Policy, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/name`` atomically, point ``root/latest`` at it, prune to the newest ``keep`` step checkpoints.

    ``state`` may hold what :mod:`offpolicy.train.state_io` supports (an unsupported
    object is a TypeError naming its path, before anything is published). Orphans of
    a save killed earlier are removed first. ``keep=0`` keeps every checkpoint.
    """
    _check_name(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_orphans(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        policy.save(tmp)
        save_state({**state, "rng": rng_state()}, tmp, STATE_JSON, STATE_TENSORS)
        write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (disk full, bad state) leaves no half-written copy
        raise
    final = _publish(tmp, root / name)
    _write_text_atomic(root / "latest", name)
    prune_checkpoints(root, keep)
    return final


def _publish(tmp: Path, final: Path) -> Path:
    """Rename ``tmp`` to ``final``; an existing ``final`` goes aside as ``.<name>.old`` until the new one is in."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # a kill right here leaves .old, which clean_orphans puts back
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete step checkpoints; return what went.

    Named stage checkpoints (``sft``, ``final``) always stay, and so does the one
    ``latest`` names. Incomplete step checkpoints do not count towards ``keep`` and
    are deleted. Order is the step number in the name, not the mtime.
    """
    root = Path(root)
    if not keep:
        return []
    protected = _pointer(root)
    kept, removed = 0, []
    for path in _checkpoints(root, steps_only=True):
        if kept < keep and _looks_complete(path):
            kept += 1
        elif path.name != protected:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


ORPHAN_TMP = re.compile(r"\..+\.tmp-.*")
ORPHAN_OLD = re.compile(r"\.(?P<name>.+)\.old")
ORPHAN_POINTER = re.compile(r"\.latest\..+")


def clean_orphans(root: str | Path) -> list[Path]:
    """Remove what a save killed midway leaves in ``root``; return the paths removed or restored.

    ``.<name>.tmp-*`` folders (an unpublished save) and ``.latest.*`` files go. A
    ``.<name>.old`` folder whose ``<name>`` is missing (killed while replacing a
    same-named checkpoint) is the last good copy: it is renamed back, not deleted.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    touched = []
    for p in sorted(root.iterdir()):
        old = ORPHAN_OLD.fullmatch(p.name)
        if p.is_dir() and old and not (root / old["name"]).exists():
            os.replace(p, root / old["name"])
        elif p.is_dir() and (old or ORPHAN_TMP.fullmatch(p.name)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and ORPHAN_POINTER.fullmatch(p.name):
            p.unlink(missing_ok=True)
        else:
            continue
        touched.append(p)
    return touched


# ---- finding and loading -----------------------------------------------------------------------
def _pointer(root: Path) -> str | None:
    """The name in ``root/latest`` if it is a plain folder name, else None."""
    try:
        name = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and "/" not in name and not name.startswith(".") else None


def _warn(message: str) -> None:
    warnings.warn(message, CheckpointFallback, stacklevel=3)


def latest_checkpoint(root: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from: the one ``root/latest`` names if it verifies, else the newest good one.

    Returns None when ``root`` holds no checkpoint at all. Falling back to an older
    checkpoint calls ``warn`` with one line saying which were skipped and why
    (default: a :class:`CheckpointFallback` warning). When checkpoints exist but
    none verifies, raises CheckpointError listing each failure.
    """
    root, warn = Path(root), warn or _warn
    named = _pointer(root)
    order = [*([root / named] if named else []), *(p for p in _checkpoints(root) if p.name != named)]
    pointer_exists = (root / "latest").exists()
    if not order and not pointer_exists:
        return None
    failures = [] if named else [f"{root / 'latest'}: {'does not name a checkpoint' if pointer_exists else 'missing'}"]
    for path in order:
        try:
            _require_state(path)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        if failures:
            warn(f"skipping bad checkpoint(s): {'; '.join(failures)}. Resuming from the previous good one: {path}")
        return path
    raise CheckpointError(f"{root}: no loadable checkpoint: {'; '.join(failures)}")


def _require_state(path: Path) -> None:
    """Verify ``path`` and check it is a training checkpoint, not a policy-only folder."""
    files = verify_checkpoint(path)
    if STATE_JSON not in files or STATE_TENSORS not in files:
        raise CheckpointError(f"{path}: holds a policy but no trainer state ({STATE_JSON}): not resumable")


def load_checkpoint(path: str | Path) -> tuple[Policy, dict[str, Any]]:
    """The policy and the trainer state saved by :func:`save_checkpoint`, after verifying the manifest."""
    path = Path(path)
    _require_state(path)
    policy = load_policy(path)
    return policy, load_state(path, STATE_JSON, STATE_TENSORS)
