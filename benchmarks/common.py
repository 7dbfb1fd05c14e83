"""Helpers shared by the benchmark scripts: the machine's description, timing, and JSON output.

Benchmarks are numbers, not tests. Every script states its exact command at the top, writes
``benchmarks/results/<name>.json`` and prints a Markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Cores, torch version and the load at the moment of measuring (other jobs may share the cores)."""
    import torch

    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        # the commit the measured code came from; OFFPOLICY_BENCH_COMMIT names it when the code ran from a copy
        "offpolicy_commit": os.environ.get("OFFPOLICY_BENCH_COMMIT") or _git_head(),
    }


def _git_head() -> str | None:
    """The commit the measured code was taken from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over the next ``seconds`` (from /proc/stat; 0 where it is missing)."""
    def snap() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    if not Path("/proc/stat").exists():
        return 0.0
    idle0, total0 = snap()
    time.sleep(seconds)
    idle1, total1 = snap()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> tuple[bool, float]:
    """Wait (up to ``max_wait`` s) until other jobs leave the cores mostly idle; returns (quiet, waited s).

    Called between measurements, when this process itself is idle, so any busy time is someone else's.
    """
    start = time.perf_counter()
    while True:
        if cpu_busy() < threshold:
            return True, time.perf_counter() - start
        if time.perf_counter() - start > max_wait:
            return False, time.perf_counter() - start


def time_calls(fn: Callable[[], Any], min_seconds: float, min_calls: int = 3, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls, repeated for at least ``min_seconds`` and ``min_calls``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def settled(rounds: list[list[float]], tolerance: float = 1.15) -> bool:
    """At least two rounds whose median call time is within ``tolerance`` of the best round's."""
    meds = [statistics.median(r) for r in rounds]
    return sum(m <= tolerance * min(meds) for m in meds) >= 2


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, seconds_per_round: float,
                max_seconds: float = 90.0) -> dict[str, list[list[float]]]:
    """Seconds per call of every function in interleaved rounds: ``{name: [round][call]}``.

    After ``rounds`` rounds, more rounds run (up to ``max_seconds`` in all) until every function has
    two rounds that agree within 15% with its best one: on a machine shared with other jobs a round
    can be slowed 10–100x (two torch threads on two cores that another process also uses).
    """
    times: dict[str, list[list[float]]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for k, fn in fns.items():
            times[k].append(time_calls(fn, seconds_per_round, min_calls=2))
        done = len(next(iter(times.values()))) >= rounds and all(settled(r) for r in times.values())
        if done or time.perf_counter() - start > max_seconds:
            return times


def summarize(rounds: list[list[float]], work: float) -> dict[str, float]:
    """Work per second in the least disturbed round (lowest median call time), and over all calls.

    Other jobs on a shared machine only ever slow a measurement down, and with 2 threads on 2 busy
    cores a burst can slow one round 10x; the best round's median is the robust estimate of what
    the code costs, the all-calls median shows what it cost on the day.
    """
    round_medians = [statistics.median(r) for r in rounds]
    best = min(round_medians)
    all_med = statistics.median([t for r in rounds for t in r])
    return {"per_s": work / best, "all_calls_per_s": work / all_med, "median_s": best,
            "calls": sum(len(r) for r in rounds), "rounds": len(rounds),
            "round_spread": max(round_medians) / best, "settled": settled(rounds)}


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"date": _dt.date.today().isoformat(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
