"""Atomic checkpoints without pickle: ``state.safetensors`` (every tensor) + ``state.json`` (everything else).

A checkpoint is ``out_dir/checkpoints/step_<N>/``. It is written into a temporary folder and renamed into
place; ``checkpoints/latest`` (a text file naming the newest one) is replaced atomically last, so a crash
leaves the previous checkpoint intact. Optimizer states are flattened into tensors (``optim/<name>/<i>/<k>``)
plus JSON param groups; the torch RNG state is a uint8 tensor. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS, META = "state.safetensors", "state.json"


def optimizer_state(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{name}/{i}/{k}"] = v.detach().clone()
            else:
                scalars[f"{i}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim/{name}/"
    for key, v in tensors.items():
        if key.startswith(prefix):
            i, k = key[len(prefix):].split("/", 1)
            state.setdefault(int(i), {})[k] = v
    for key, v in meta["scalars"].items():
        i, k = key.split("/", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2) -> Path:
    """Write ``root/name`` atomically, point ``root/latest`` at it, keep the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / "latest", name)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: str | Path) -> Path | None:
    p = Path(root) / "latest"
    if not p.exists():
        return None
    path = Path(root) / p.read_text().strip()
    return path if (path / META).exists() else None


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if path.name == "checkpoints" or (path / "latest").exists():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"checkpoint: {path} has no complete checkpoint")
        path = found
    if not (path / META).exists():
        raise FileNotFoundError(f"checkpoint: {path / META} does not exist")
    return load_file(str(path / TENSORS)), json.loads((path / META).read_text())
