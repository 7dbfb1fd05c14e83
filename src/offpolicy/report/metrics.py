"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step), optional TensorBoard / W&B, the console.

Metric names are stable and namespaced (``reward/mean``, ``eval/greedy_acc``,
``loss/policy``, ``loss/clip_frac``, ``offpolicy/ess``,
``offpolicy/staleness_mean``, ``time/step_s``, ``rollout/tokens_per_s``).
Tensors are synced to Python floats once per logged step.

``metrics.jsonl`` is the source of truth. **Non-finite values** are written as
they are, with the JSON extension tokens ``NaN``, ``Infinity`` and ``-Infinity``
that Python's ``json`` writes and reads back (``read_metrics`` returns them as
floats), and the record gets a key ``nonfinite``: the sorted list of the
metric names whose value is not finite. A strict JSON parser (``jq``,
``JSON.parse``) rejects those tokens; read the file with ``read_metrics`` (or
any parser that accepts them, e.g. pandas ``read_json(lines=True)``). Files
written before this change hold ``null`` for such values; readers accept both.

**Sinks** (``loggers``, see ``report/sinks.py``) receive every numeric field of
a record except ``step`` under its own name, at a *global step*: the record's
``step`` for the stages before RL (``start``, ``sft``, or no stage), and
``sft_steps + step`` for every later stage (``rl``, ``done``), where
``sft_steps`` is the last SFT step logged in this run folder (recovered from
``metrics.jsonl`` when a run resumes). So one axis orders SFT then RL, and an
RL step ``s`` appears at ``sft_steps + s``. Sinks also get non-finite values
as they are (TensorBoard and W&B both plot NaN/inf).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from offpolicy.report.sinks import LOGGERS, Sink, make_sink


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Detached tensors and numbers -> floats, with a single device sync for all tensors."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


PRE_RL_STAGES = (None, "start", "sft")  # stages whose records keep their own step on the sinks' axis
NOT_SCALARS = ("step", "nonfinite")  # record fields never sent to a sink as a metric


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricsLog:
    """Appends to ``metrics.jsonl`` (appending keeps the history of a resumed run) and feeds the optional sinks.

    ``MetricsLog(out_dir)`` writes the file only. ``loggers`` (``run.loggers``:
    ``"tensorboard"``, ``"wandb"``) adds sinks; ``run_name`` names the W&B run,
    ``config`` (a plain dict, e.g. ``cfg.model_dump()``) is attached to both,
    ``wandb_mode`` is ``"offline"`` (default, no network) or ``"online"``.
    ``close()`` flushes and closes the file and every sink.
    """

    def __init__(self, out_dir: str | Path, *, loggers: Sequence[str] = (), run_name: str | None = None,
                 config: dict[str, Any] | None = None, wandb_mode: str = "offline") -> None:
        unknown = [name for name in loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"run.loggers: unknown logger(s) {unknown}; valid: {list(LOGGERS)}")
        out = Path(out_dir)
        self.path = out / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sft_steps = max((r["step"] for r in read_metrics(self.path) if r.get("stage") in PRE_RL_STAGES
                              and _is_number(r.get("step"))), default=0) if self.path.exists() else 0
        self.sinks: list[Sink] = []
        try:
            for name in dict.fromkeys(loggers):  # each sink once, in the given order
                self.sinks.append(make_sink(name, out, run_name=run_name, config=config, wandb_mode=wandb_mode))
        except BaseException:
            for sink in self.sinks:
                sink.close()
            raise
        self._file = open(self.path, "a", buffering=1)

    def global_step(self, record: dict[str, Any]) -> int:
        """The sinks' step of ``record`` (see the module docstring)."""
        step = int(record.get("step", 0))
        if record.get("stage") in PRE_RL_STAGES:
            self.sft_steps = max(self.sft_steps, step)
            return step
        return self.sft_steps + step

    def log(self, record: dict[str, Any]) -> None:
        nonfinite = sorted(k for k, v in record.items() if _is_number(v) and not math.isfinite(v))
        line = {k: v for k, v in record.items() if k != "nonfinite"}
        if nonfinite:
            line["nonfinite"] = nonfinite
        self._file.write(json.dumps(line, allow_nan=True) + "\n")  # the source of truth is written first
        if self.sinks:
            scalars = {k: float(v) for k, v in line.items() if k not in NOT_SCALARS and _is_number(v)}
            step = self.global_step(record)
            for sink in self.sinks:
                sink.log(scalars, step)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a half-written last line from a crash is skipped).

    Non-finite values come back as ``float('nan')`` / ``±float('inf')``, listed in the record's ``nonfinite``.
    """
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
