"""The console view: a rich progress bar per stage, eval lines and the final table."""

from __future__ import annotations

from typing import Any

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

SHOWN = (("reward/mean", "reward"), ("sft/loss", "loss"), ("offpolicy/ess", "ess"),
         ("offpolicy/staleness_mean", "stale"), ("rollout/tokens_per_s", "tok/s"))


class Console:
    """Progress and results on the terminal; ``enabled=False`` keeps tests quiet."""

    def __init__(self, name: str, enabled: bool = True) -> None:
        self.name, self.enabled = name, enabled
        self.rich = RichConsole(highlight=False)
        self.progress: Progress | None = None
        self.task = None

    def print(self, text: str) -> None:
        if self.enabled:
            self.rich.print(text)

    def start_stage(self, stage: str, total: int, done: int) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{self.name} {stage}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.rich, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(stage, total=total, completed=done, info="")

    def advance(self, metrics: dict[str, float]) -> None:
        if self.progress is None:
            return
        info = "  ".join(f"{label} {metrics[k]:.3g}" for k, label in SHOWN if metrics.get(k) is not None)
        self.progress.update(self.task, advance=1, info=info)

    def end_stage(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def eval_line(self, name: str, result: dict[str, float]) -> None:
        text = "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in result.items())
        if self.progress is not None:
            self.progress.console.print(f"  eval {name}: {text}")
        else:
            self.print(f"  eval {name}: {text}")

    def summary_table(self, s: dict[str, Any]) -> None:
        if not self.enabled:
            return
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        t = Table(title=f"{self.name}: held-out greedy accuracy ({s['eval_problems']} problems)")
        for col in ("before SFT", "after SFT", "after RL", "RL gain", "rollouts", "time", "rollout tok/s", "peak RSS"):
            t.add_column(col, justify="right")
        gain = "-" if s["gain_points"] is None else f"{s['gain_points']:+.1f} pts"
        tps = "-" if s["rollout_tokens_per_s"] is None else f"{s['rollout_tokens_per_s']:,.0f}"
        t.add_row(pct(s["accuracy_before_sft"]), pct(s["accuracy_before_rl"]), pct(s["accuracy_after_rl"]), gain,
                  f"{s['rollouts']:,}", f"{s['wall_seconds'] / 60:.1f} min", tps, f"{s['peak_rss_mb']:.0f} MB")
        self.rich.print(t)
        self.rich.print(f"outputs: {s['checkpoint']}, {s.get('plot', '')}")

    def close(self) -> None:
        self.end_stage()
