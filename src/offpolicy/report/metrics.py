"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step) and the console.

Metric names are stable and namespaced (``reward/mean``, ``eval/greedy_acc``,
``loss/policy``, ``loss/clip_frac``, ``offpolicy/ess``,
``offpolicy/staleness_mean``, ``time/step_s``, ``rollout/tokens_per_s``).
Tensors are synced to Python floats once per logged step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Detached tensors and numbers -> floats, with a single device sync for all tensors."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


class MetricsLog:
    """Appends to ``metrics.jsonl`` (appending keeps the history of a resumed run)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a half-written last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
