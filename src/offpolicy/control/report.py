"""Run outputs of a control run: metrics.jsonl (stable CleanRL-like names), a rich progress bar, returns.png.

Metric names: ``charts/episodic_return``, ``charts/episodic_length``, ``charts/SPS``, ``eval/return_mean``,
``losses/qf_loss``, ``losses/qf_values``, ``losses/actor_loss``, ``losses/alpha``, ``losses/alpha_loss``,
``losses/entropy`` (+ algorithm-specific ``losses/*``); every record carries ``global_step``.
"""

from __future__ import annotations

import json
from pathlib import Path

from offpolicy.report.metrics import MetricsLog, to_floats

__all__ = ["MetricsLog", "Progress", "plot_returns", "to_floats"]


class Progress:
    def __init__(self, total: int, done: int, enabled: bool, title: str) -> None:
        self._p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeRemainingColumn

            self._p = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._p.start()
            self._task = self._p.add_task(title, total=total, completed=done, info="")

    def update(self, done: int, info: str | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def plot_returns(run_dir: str | Path) -> Path | None:
    """returns.png: training episodic return (and evaluation return) against environment steps."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plotted = False
    for key, style in (("charts/episodic_return", "-"), ("eval/return_mean", "o-")):
        pts = [(r["global_step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3, linewidth=1)
            plotted = True
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    if plotted:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "returns.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
