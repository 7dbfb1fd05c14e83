"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/<name>/`` holding the policy (safetensors,
loadable by :func:`~offpolicy.policy.model.load_policy` and, for HF models, by
``from_pretrained``) and ``trainer_state.pt`` (optimizer, scheduler, replay
buffer with its experiences, RNG states, counters). It is written into a
temporary folder and renamed into place, and ``checkpoints/latest`` (a text file
naming the newest one) is replaced atomically last — a crash at any point leaves
the previous checkpoint intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offpolicy.policy.model import CheckpointError, Policy, load_policy

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, name: str, policy: Policy, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/name`` atomically, point ``root/latest`` at it, keep the newest ``keep`` step checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        policy.save(tmp)
        torch.save({**state, "rng": rng_state()}, tmp / STATE_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (disk full, killed) leaves no half-written copy
        raise
    final = root / name
    if final.exists():  # replacing a same-named checkpoint: move the old one aside first
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_text_atomic(root / "latest", name)
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=lambda p: p.stat().st_mtime)
    for stale in steps[:-keep] if keep else []:
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | Path) -> tuple[Policy, dict[str, Any]]:
    """The policy and the trainer state saved by :func:`save_checkpoint`."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{path} is not an offpolicy training checkpoint (no {STATE_FILE})")
    policy = load_policy(path)
    state = torch.load(state_file, weights_only=False)
    return policy, state
