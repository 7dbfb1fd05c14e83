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
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST or p.is_symlink())


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


_VERIFIED: dict[str, tuple] = {}  # folder -> stat signature at its last full verification


def _signature(path: Path, names: list[str]) -> tuple:
    stats = [(n, os.stat(path / n)) for n in names if (path / n).exists()]
    return tuple((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats)


def verify_checkpoint(path: str | Path) -> dict[str, dict]:
    """Check ``path`` against its manifest; return the file table. Raises CheckpointError naming the bad file.

    Refused: no manifest, a file listed but missing, a size or sha256 that differs
    (truncated, flipped byte), a file present but not listed (a planted pickle).
    The hashes are recomputed only when a file changed since the last verification
    in this process, so ``latest_checkpoint`` then ``load_checkpoint`` hash once.
    """
    path = Path(path)
    files = _read_manifest(path)
    unlisted = sorted(set(_files(path)) - set(files))
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]}: not listed in {MANIFEST}; refusing a checkpoint with "
                              f"unaccounted files")
    key, signature = str(path.resolve()), _signature(path, [*files, MANIFEST])
    if _VERIFIED.get(key) == signature:
        return files
    for name, entry in files.items():
        _verify_file(path / name, entry)
    _VERIFIED[key] = signature
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
