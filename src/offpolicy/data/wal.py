"""The rollout write-ahead log: experiences collected since the last checkpoint survive a kill -9.

Every batch of groups a loop collects (a sync rollout step, one request of an async
worker) is appended to ``rollouts.wal.jsonl`` in the run folder — written through to
the OS — *before* anything learns from it (fsynced at each checkpoint). A checkpoint holds the replay buffer
and the step counter; after it is written the log keeps only entries the
checkpoint does not cover (steps not yet consumed). A resumed run reads the
entries of the steps it has not consumed yet and feeds them to the learner instead
of generating them again: nothing generated is generated twice or lost.

One line per entry: ``{"step": k, "chunk": c, "groups": [[experience, ...], ...],
"stats": {...}}``. A half-written last line (the kill landed inside the write) is
ignored: that chunk was never collected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offpolicy.experience import Experience

WAL_FILE = "rollouts.wal.jsonl"


@dataclass
class WalEntry:
    step: int  # the rollout step the groups belong to (0-based)
    chunk: int  # which request of that step (0 in sync mode: one request per step)
    groups: list[list[Experience]]
    stats: dict[str, Any]


class RolloutWAL:
    """Append-only, fsynced log of collected groups; :meth:`retain_from` drops what a checkpoint covers."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / WAL_FILE

    def append(self, step: int, chunk: int, groups: list[list[Experience]], stats: dict[str, Any]) -> None:
        """One line, written through to the OS before returning: a killed process (kill -9) loses nothing
        the OS holds. ``fsync`` (surviving a machine crash too) runs in :meth:`sync` at each checkpoint,
        not per append: it cost ~3 of the ~18 ms a 1,024-experience append takes."""
        line = json.dumps({"step": step, "chunk": chunk, "stats": stats,
                           "groups": [[e.to_dict() for e in g] for g in groups]},
                          separators=(",", ":"), check_circular=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def sync(self) -> None:
        """fsync the log (a checkpoint calls it): what it holds then survives a machine crash too."""
        if self.path.exists():
            with open(self.path, "a") as f:
                os.fsync(f.fileno())

    def entries(self, from_step: int = 0) -> list[WalEntry]:
        """Complete entries of steps >= ``from_step``, in file order (a torn last line is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn write of a killed process: never collected
            if row["step"] >= from_step:
                groups = [[Experience.from_dict(e) for e in g] for g in row["groups"]]
                out.append(WalEntry(row["step"], row["chunk"], groups, row["stats"]))
        return out

    def retain_from(self, step: int) -> None:
        """Keep only entries of steps >= ``step`` (called after a checkpoint of ``step`` steps is on disk)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _step_of(line) >= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return -1  # a torn line: drop it
