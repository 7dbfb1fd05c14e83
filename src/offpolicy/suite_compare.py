"""``offpolicy compare --suite``: every system on every suite task, from the task's start checkpoint.

For each task of the suite (:mod:`offpolicy.data.tasks.suite`) and each system — a recipe
(``OUT/<task>/<recipe stem>/seed<k>``, an ordinary resumable run with the task's overrides,
``policy.init=<start checkpoint>`` and ``sft.steps=0``) or TRL's GRPOTrainer
(:mod:`offpolicy.baselines.trl_grpo`, same start, same prompts per step, same evaluation) —
the run is made once per seed and read back from its ``metrics.jsonl`` / ``summary.json``:

- one row per task × system × seed: held-out greedy accuracy at the start, at the end, at its
  best and after each rollout budget; rollouts to start + 0.10 and + 0.20 (``None`` if never);
  seconds per RL step; peak RSS;
- ``summary``: ``min_rollouts_ratio_vs_trl`` (over tasks where TRL reached + 0.10: TRL's mean
  rollouts to + 0.10 over the default recipe's; a seed that never reached it is charged its whole
  budget, so the ratio is then a bound, flagged) and ``worst_final_minus_start`` of the default
  recipe, with whether any of its runs ended more than two standard errors below its start;
- ``OUT/suite.json``, ``OUT/suite.md`` (the table) and one accuracy-vs-rollouts plot per task.

Every system gets the same rollout budget (``--rollouts``): ``rl.steps`` is set to
``ceil(budget / (prompts_per_step · group_size))`` from each recipe's own batch.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from offpolicy.compare import Variant, _draw, rl_curve, run_all
from offpolicy.config import ConfigError, load_config

DEFAULT_SYSTEM = "default"  # the recipe whose safety the suite checks (recipes/default.yaml)
GAINS = (0.10, 0.20)


Runner = Callable[["SuiteRun", int, Path, int], None]  # (task, seed, run dir, rollout budget) -> writes the run


@dataclass(frozen=True)
class SuiteRun:
    """What every system shares on one task: the task, its response length and the start weights."""

    task: str  # the suite's label for the task (a folder name)
    task_name: str  # registered task name
    params: dict[str, Any]
    max_new_tokens: int
    start: Path  # checkpoint RL starts from (a tiny-model folder with config.json)

    @property
    def overrides(self) -> tuple[str, ...]:
        """Keys applied on top of every recipe: the task, the response length and the start's shape
        (a recipe's ``policy.*`` sizes must match the checkpoint it starts from)."""
        shape = json.loads((self.start / "config.json").read_text())
        return (f"task.name={self.task_name}", f"task.params={json.dumps(self.params)}",
                f"sampling.max_new_tokens={self.max_new_tokens}",
                *(f"policy.{k}={shape[k]}" for k in ("d_model", "n_layers", "n_heads", "max_len")))


def suite_runs(names: list[str] | None, starts: Path) -> list[SuiteRun]:
    """The suite tasks called ``names`` (all of :data:`offpolicy.suite.SUITE` when None) with the start
    checkpoints ``benchmarks/suite_starts.py`` recorded in ``starts``."""
    from offpolicy.suite import SUITE, start_checkpoint, suite_task

    tasks = list(SUITE) if names is None else [suite_task(n) for n in names]
    if not starts.exists():
        raise FileNotFoundError(f"{starts} does not exist: make the suite's start checkpoints first "
                                f"(PYTHONPATH=src python benchmarks/suite_starts.py)")
    out = []
    for t in tasks:
        start = start_checkpoint(t.name, starts)
        if not (start / "config.json").exists():
            raise FileNotFoundError(f"start checkpoint {start} of suite task {t.name!r} (from {starts}) is missing: "
                                    f"rebuild it with benchmarks/suite_starts.py --tasks {t.name}")
        out.append(SuiteRun(t.name, t.task, dict(t.params), t.max_new_tokens, start))
    return out


def trl_runner(n_eval: int, eval_every: int, prompts_per_step: int = 128, group_size: int = 8,
               threads: int = 2) -> "Runner":
    """TRL's GRPOTrainer as a suite system (:mod:`offpolicy.baselines.trl_grpo`): same start, prompts per
    step, completions per prompt, completion length, learning rate (1e-4), torch threads and evaluation
    as our recipes."""
    def run(task: SuiteRun, seed: int, out: Path, budget: int) -> None:
        s = {"init": str(task.start), "task": {"name": task.task_name, "params": task.params},
             "prompts_per_step": prompts_per_step, "group_size": group_size, "max_new_tokens": task.max_new_tokens,
             "trl_max_steps": math.ceil(budget / (prompts_per_step * group_size)), "trl_budget_s": math.inf,
             "eval_problems": n_eval, "eval_every": eval_every, "threads": threads}
        cmd = [sys.executable, "-m", "offpolicy.baselines.trl_grpo", json.dumps(s), str(seed), str(out), str(n_eval)]
        if subprocess.run(cmd).returncode != 0:  # its own process: its own peak RSS, TRL's imports stay out of ours
            raise RuntimeError(f"TRL on {task.task} seed {seed} failed: {' '.join(cmd)}")

    return run


def system_variants(recipes: list[Path], task: SuiteRun, budget: int, eval_every: int,
                    extra: list[str]) -> list[Variant]:
    """One :class:`Variant` per recipe on ``task`` with a rollout budget of ``budget``."""
    out = []
    for r in recipes:
        base = [*task.overrides, *extra, f"policy.init={task.start}", "sft.steps=0", f"eval.every={eval_every}"]
        cfg = load_config(r, base)
        per_step = cfg.rl.prompts_per_step * cfg.rl.group_size
        out.append(Variant(r.stem, r, [*base, f"rl.steps={math.ceil(budget / per_step)}"]))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two recipes share a file name among {labels}: systems are named after files")
    return out


# ---- reading one run --------------------------------------------------------------------------
def first_gain(curve: dict[str, list[float]], gain: float) -> float | None:
    """Rollouts at the first evaluation with accuracy >= start + gain (``None`` if never)."""
    start = curve["acc"][0]
    for acc, n in zip(curve["acc"], curve["rollouts"]):
        if acc >= start + gain - 1e-9:
            return n
    return None


def acc_at(curve: dict[str, list[float]], budget: int) -> float | None:
    """Accuracy at the last evaluation that had used at most ``budget`` rollouts."""
    seen = [a for a, n in zip(curve["acc"], curve["rollouts"]) if n <= budget]
    return seen[-1] if seen else None


def run_row(task: str, system: str, seed: int, run: Path, budgets: list[int], n_eval: int) -> dict[str, Any]:
    """The suite row of one finished run."""
    curve = rl_curve(run)
    if not curve["acc"]:
        raise ConfigError(f"{run}/metrics.jsonl has no evaluation: cannot score {system} on {task} seed {seed}")
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [m["time/step_s"] for m in metrics if m.get("stage") == "rl" and "time/step_s" in m]
    start, final = curve["acc"][0], curve["acc"][-1]
    se = math.sqrt(max(start * (1 - start), 1e-12) / n_eval)
    return {
        "task": task, "system": system, "seed": seed, "start_acc": start, "final_acc": final,
        "best_acc": max(curve["acc"]), "start_se": se, "below_start_2se": final < start - 2 * se,
        "rollouts": curve["rollouts"][-1],
        "rollouts_to_plus10": first_gain(curve, GAINS[0]), "rollouts_to_plus20": first_gain(curve, GAINS[1]),
        "acc_at_budget": {str(b): acc_at(curve, b) for b in budgets},
        "seconds_per_step": statistics.median(step_s) if step_s else None,
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "curve": {"rollouts": curve["rollouts"], "acc": curve["acc"]},
    }


# ---- the summary ------------------------------------------------------------------------------
def mean_rollouts_to(rows: list[dict[str, Any]], key: str) -> tuple[float | None, bool]:
    """Mean rollouts to a gain over seeds, charging a seed that never got there its whole run;
    the flag says whether any seed was charged (the mean is then a lower bound)."""
    if not rows:
        return None, False
    vals = [r[key] if r[key] is not None else r["rollouts"] for r in rows]
    return sum(vals) / len(vals), any(r[key] is None for r in rows)


def summarize_suite(rows: list[dict[str, Any]], default: str = DEFAULT_SYSTEM) -> dict[str, Any]:
    """``min_rollouts_ratio_vs_trl`` and ``worst_final_minus_start`` (see the module docstring), per task too."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    per_task, ratios = {}, []
    for t in tasks:
        trl = [r for r in rows if r["task"] == t and r["system"] == "trl"]
        ours = [r for r in rows if r["task"] == t and r["system"] == default]
        entry: dict[str, Any] = {}
        if trl and ours and any(r["rollouts_to_plus10"] is not None for r in trl):
            trl_mean, trl_bound = mean_rollouts_to(trl, "rollouts_to_plus10")
            our_mean, our_bound = mean_rollouts_to(ours, "rollouts_to_plus10")
            entry = {"trl_rollouts_to_plus10": trl_mean, "default_rollouts_to_plus10": our_mean,
                     "ratio": trl_mean / our_mean, "trl_is_lower_bound": trl_bound,
                     "default_is_lower_bound": our_bound}
            ratios.append(entry["ratio"])
        per_task[t] = entry
    mine = [r for r in rows if r["system"] == default]
    worst = min(mine, key=lambda r: r["final_acc"] - r["start_acc"]) if mine else None
    return {
        "default_system": default,
        "min_rollouts_ratio_vs_trl": min(ratios) if ratios else None,
        "tasks_where_trl_reached_plus10": sum(1 for e in per_task.values() if e),
        "worst_final_minus_start": None if worst is None else worst["final_acc"] - worst["start_acc"],
        "worst_run": None if worst is None else {k: worst[k] for k in ("task", "seed", "start_acc", "final_acc")},
        "default_runs_below_start_2se": sum(r["below_start_2se"] for r in mine),
        "per_task": per_task,
    }


# ---- the table and plots ----------------------------------------------------------------------
def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def table(rows: list[dict[str, Any]], budgets: list[int]) -> str:
    """Markdown: one line per task × system, means over seeds (``n/k`` = seeds that reached a gain)."""
    head = ["task", "system", "seeds", "start", *[f"acc @ {b:,}" for b in budgets], "final", "best",
            "rollouts to +10", "rollouts to +20", "s / step", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["task"], r["system"]) for r in rows))
    for task, system in keys:
        rs = [r for r in rows if r["task"] == task and r["system"] == system]

        def f(x, fmt="{:.3f}"):
            return "—" if x is None else fmt.format(x)

        def reach(key):
            hit = [r[key] for r in rs if r[key] is not None]
            return f"{f(_mean(hit), '{:,.0f}')} ({len(hit)}/{len(rs)})"

        cells = [task, system, str(len(rs)), f(_mean([r["start_acc"] for r in rs])),
                 *[f(_mean([r["acc_at_budget"][str(b)] for r in rs])) for b in budgets],
                 f(_mean([r["final_acc"] for r in rs])), f(_mean([r["best_acc"] for r in rs])),
                 reach("rollouts_to_plus10"), reach("rollouts_to_plus20"),
                 f(_mean([r["seconds_per_step"] for r in rs]), "{:.2f}"),
                 f(_mean([r["peak_rss_mb"] for r in rs]), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_task(rows: list[dict[str, Any]], task: str, path: Path) -> Path:
    """Held-out greedy accuracy vs rollouts for every system on ``task`` (mean over seeds, 95% CI band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r["task"] == task:
            curves.setdefault(r["system"], []).append(r["curve"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _draw(ax, curves, "rollouts", "acc")
    start = _mean([r["start_acc"] for r in rows if r["task"] == task])
    for gain in GAINS:
        ax.axhline(start + gain, color="grey", ls=":", lw=1)
    ax.set(xlabel="RL rollouts", ylabel="held-out greedy accuracy", title=f"suite: {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the whole thing --------------------------------------------------------------------------


def compare_suite(recipes: list[Path], tasks: list[SuiteRun], *, seeds: int, out: Path, budget: int,
                  budgets: list[int], eval_every: int, n_eval: int, overrides: list[str] | None = None,
                  external: dict[str, Runner] | None = None,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (resumably) and score every system on every task; writes ``OUT/suite.json`` / ``suite.md`` / plots."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    extra = [*(overrides or []), f"eval.n_problems={n_eval}"]
    plans = {t.task: system_variants(recipes, t, budget, eval_every, extra) for t in tasks}  # validate all first
    rows: list[dict[str, Any]] = []
    for t in tasks:
        run_all(plans[t.task], seeds, out / t.task, say, isolate=True)
        for name, runner in (external or {}).items():
            for seed in range(seeds):
                d = out / t.task / name / f"seed{seed}"
                if not (d / "summary.json").exists():
                    say(f"[suite] {name} on {t.task} seed {seed} -> {d}")
                    runner(t, seed, d, budget)
        systems = [v.label for v in plans[t.task]] + list(external or {})
        rows += [run_row(t.task, s, seed, out / t.task / s / f"seed{seed}", budgets, n_eval)
                 for s in systems for seed in range(seeds)]
    plots = [str(plot_task(rows, t.task, out / f"suite_{t.task}.png")) for t in tasks]
    result = {"benchmark": "suite", "seeds": seeds, "rollout_budget": budget, "budgets": budgets,
              "eval_problems": n_eval, "tasks": [t.task for t in tasks], "rows": rows,
              "summary": summarize_suite(rows), "plots": plots}
    (out / "suite.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "suite.md").write_text(table(rows, budgets) + "\n")
    return result
