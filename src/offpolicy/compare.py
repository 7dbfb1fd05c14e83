"""``offpolicy compare``: several recipes (or one recipe swept over a key) × seeds, side by side.

Each (label, seed) is an ordinary run of :func:`offpolicy.train.runner.train` writing into
``OUT/<label>/seed<k>`` with ``run.seed=k``. A run whose ``summary.json`` exists is finished and is
never re-run; a killed run continues from its latest checkpoint (or starts over when it wrote
none), so ``compare`` can be interrupted and called again with the same arguments.

Then, from every run's ``metrics.jsonl`` and ``summary.json``:

- ``OUT/compare.json`` — per label, the mean, standard deviation, 95% confidence interval of the
  mean (Student t, ``ci95``) and min / max over seeds of the final held-out greedy accuracy, the
  rollouts and RL wall-clock used, and (with a target) the rollouts, RL wall-clock and learner
  steps at the first evaluation that reached the target;
- ``OUT/compare_accuracy.png`` — held-out greedy accuracy vs rollouts, vs RL wall-clock and vs
  learner steps: the mean over seeds with its 95% confidence band (none for a single seed);
- ``OUT/compare_offpolicy.png`` — staleness and effective sample size of the training batches.

Curves start at the evaluation that opens the RL stage. "RL wall-clock" is the sum of
``time/step_s`` of the RL steps (rollout + learning + logging), so evaluation and checkpoint
time, which depend on how often one evaluates, are not charged to a recipe.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from offpolicy.config import ConfigError, load_config, parse_override
from offpolicy.report.metrics import read_metrics
from offpolicy.train.checkpoint import latest_checkpoint
from offpolicy.train.runner import train


@dataclass
class Variant:
    """One curve of the comparison: a recipe plus overrides, run once per seed."""

    label: str
    recipe: Path
    overrides: list[str]


# ---- what to run -----------------------------------------------------------------------------
def split_args(args: list[str]) -> tuple[list[Path], list[str]]:
    """Separate recipe paths from ``key=value`` overrides (a recipe ends in .yaml/.yml or exists)."""
    recipes, overrides = [], []
    for a in args:
        if a.endswith((".yaml", ".yml")) or Path(a).is_file():
            recipes.append(Path(a))
        elif "=" in a:
            overrides.append(a)
        else:
            raise ConfigError(f"{a!r} is neither a recipe (.yaml) nor a key=value override")
    return recipes, overrides


def plan(recipes: list[Path], overrides: list[str], sweep: str | None = None) -> list[Variant]:
    """One variant per recipe, or with ``sweep="key=v1,v2"`` one per value of ``key`` for a single recipe."""
    if not recipes:
        raise ConfigError("compare needs at least one recipe")
    for r in recipes:
        if not r.exists():
            raise ConfigError(f"recipe {r} does not exist")
    for o in overrides:
        parse_override(o)  # fails loudly on a malformed override
    if sweep is not None:
        if len(recipes) != 1:
            raise ConfigError(f"--sweep takes exactly one recipe, got {len(recipes)}")
        key, values = _parse_sweep(sweep)
        variants = [Variant(f"{key}={v}", recipes[0], [*overrides, f"{key}={v}"]) for v in values]
    else:
        variants = [Variant(r.stem, r, list(overrides)) for r in recipes]
        labels = [v.label for v in variants]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise ConfigError(f"two recipes share the name {dupes[0]!r}: labels come from file names, rename one")
    for v in variants:  # validate every config before the first run starts
        load_config(v.recipe, v.overrides)
    return variants


def _parse_sweep(sweep: str) -> tuple[str, list[str]]:
    if "=" not in sweep:
        raise ConfigError(f"--sweep {sweep!r} must look like key.sub=v1,v2")
    key, raw = sweep.split("=", 1)
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not key or len(values) < 2:
        raise ConfigError(f"--sweep {sweep!r} needs a key and at least two comma-separated values")
    if "/" in "".join(values):
        raise ConfigError(f"--sweep {sweep!r}: values become folder names and cannot contain '/'")
    return key, values


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / label / f"seed{seed}"


# ---- running (resumable) -----------------------------------------------------------------------
def in_subprocess(recipe: Path, overrides: list[str], resume: bool) -> None:
    """Run ``offpolicy train RECIPE OVERRIDES [--resume]`` in a fresh Python process (its own peak RSS)."""
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", str(recipe), *overrides, *(["--resume"] if resume else [])]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}")


def run_all(variants: list[Variant], seeds: int, out: Path, say: Callable[[str], None] = print,
            isolate: bool = False) -> dict[str, int]:
    """Run every (variant, seed) that has no ``summary.json`` yet; returns counts of ran / skipped / resumed.
    ``isolate`` runs each in its own process (:func:`in_subprocess`), so a run's peak RSS is its own."""
    counts = {"ran": 0, "skipped": 0, "resumed": 0}
    for v in variants:
        for seed in range(seeds):
            d = run_dir(out, v.label, seed)
            if (d / "summary.json").exists():
                say(f"[compare] {v.label} seed {seed}: finished earlier, skipped ({d})")
                counts["skipped"] += 1
                continue
            resume = (d / "metrics.jsonl").exists() and latest_checkpoint(d / "checkpoints") is not None
            if (d / "metrics.jsonl").exists() and not resume:
                say(f"[compare] {v.label} seed {seed}: an unfinished run without a checkpoint, starting it over")
                shutil.rmtree(d)
            say(f"[compare] {v.label} seed {seed}: {'resuming' if resume else 'running'} -> {d}")
            keys = [*v.overrides, f"run.seed={seed}", f"run.out_dir={d}", f"run.name={v.label}/seed{seed}"]
            if isolate:
                in_subprocess(v.recipe, keys, resume)
            else:
                train(load_config(v.recipe, keys), resume=resume)
            counts["resumed" if resume else "ran"] += 1
    return counts


# ---- reading runs ------------------------------------------------------------------------------
def dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed run logs again the steps after its checkpoint: keep the last record of each step."""
    last: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r.get("stage"), r.get("step"), r.get("eval_point"), "eval/greedy_acc" in r)
        last.pop(key, None)
        last[key] = r
    return list(last.values())


def rl_curve(run: Path) -> dict[str, list[float]]:
    """Per RL evaluation (from ``before_rl`` on): greedy accuracy, rollouts, RL seconds, learner steps."""
    rows = dedupe(read_metrics(run / "metrics.jsonl"))
    evals = [r for r in rows if "eval/greedy_acc" in r]
    opening = [i for i, r in enumerate(evals) if r.get("eval_point") == "before_rl"]
    evals = evals[opening[-1]:] if opening else evals
    rl_rows = [r for r in rows if r.get("stage") == "rl" and "reward/mean" in r]
    seconds, steps, total = {0: 0.0}, {0: 0.0}, 0.0
    for r in rl_rows:
        total += r.get("time/step_s") or 0.0
        seconds[r["step"]] = total
        steps[r["step"]] = r.get("train/version", 0.0)
    curve: dict[str, list[float]] = {"acc": [], "rollouts": [], "seconds": [], "learner_steps": [], "rl_step": []}
    for e in evals:
        step = e.get("step", 0) if e.get("eval_point") != "before_rl" else 0
        curve["acc"].append(e["eval/greedy_acc"])
        curve["rollouts"].append(e.get("rollouts", 0))
        curve["seconds"].append(seconds.get(step, total))
        curve["learner_steps"].append(steps.get(step, 0.0))
        curve["rl_step"].append(step)
    curve["trace_step"] = [r["step"] for r in rl_rows]
    for key in ("offpolicy/staleness_mean", "offpolicy/ess"):
        curve[key] = [r.get(key) for r in rl_rows]
    return curve


def first_reach(curve: dict[str, list[float]], target: float) -> dict[str, float] | None:
    """Rollouts, RL seconds, learner steps and RL step at the first evaluation with greedy accuracy >= target."""
    for i, acc in enumerate(curve["acc"]):
        if acc >= target:
            return {"rollouts": curve["rollouts"][i], "rl_seconds": curve["seconds"][i],
                    "learner_steps": curve["learner_steps"][i], "rl_step": curve["rl_step"][i], "accuracy": acc}
    return None


# two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; beyond, z + (z³ + z) / (4 df) (Cornish–Fisher)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"t975 needs df >= 1, got {df}")
    z = 1.959964
    return _T975[df - 1] if df <= len(_T975) else z + (z**3 + z) / (4 * df)


def ci95(vals: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean of ``vals`` (``mean ± t975(n−1) · sd / √n``); None below 2 values."""
    n = len(vals)
    if n < 2:
        return None
    mean = sum(vals) / n
    half = t975(n - 1) * statistics.stdev(vals) / math.sqrt(n)
    return mean - half, mean + half


def stats(values: list[float | None]) -> dict[str, Any]:
    """Mean, sd, 95% CI of the mean (Student t), min and max of the values that are not None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "ci95": None, "min": None, "max": None, "values": values}
    ci = ci95(vals)
    return {"mean": sum(vals) / len(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "ci95": list(ci) if ci else None, "min": min(vals), "max": max(vals), "values": values}


def resolve_target(target: str | None, curves: dict[str, list[dict]]) -> float | None:
    """``"0.5"`` is an accuracy; ``"+0.2"`` is 0.2 above the mean accuracy at the start of RL over all runs."""
    if target is None:
        return None
    try:
        value = float(target)
    except ValueError:
        raise ConfigError(f"--target {target!r} must be an accuracy (0.5) or a gain over the RL start (+0.2)") from None
    if target.strip().startswith("+"):
        starts = [c["acc"][0] for runs in curves.values() for c in runs if c["acc"]]
        return sum(starts) / len(starts) + value
    return value


def summarize(variants: list[Variant], seeds: int, out: Path, target: str | None = None) -> dict[str, Any]:
    """Read every run of the comparison and write ``OUT/compare.json`` and the plots."""
    curves = {v.label: [rl_curve(run_dir(out, v.label, s)) for s in range(seeds)] for v in variants}
    goal = resolve_target(target, curves)
    labels: dict[str, Any] = {}
    for v in variants:
        runs = [run_dir(out, v.label, s) for s in range(seeds)]
        sums = [json.loads((r / "summary.json").read_text()) for r in runs]
        entry: dict[str, Any] = {
            "recipe": str(v.recipe), "overrides": v.overrides, "runs": [str(r) for r in runs],
            "start_greedy_acc": stats([c["acc"][0] if c["acc"] else None for c in curves[v.label]]),
            "final_greedy_acc": stats([s["accuracy_after_rl"] for s in sums]),
            "rollouts": stats([s["rollouts"] for s in sums]),
            "rl_seconds": stats([c["seconds"][-1] if c["seconds"] else None for c in curves[v.label]]),
            "wall_seconds": stats([s["wall_seconds"] for s in sums]),
            "rollout_tokens_per_s": stats([s.get("rollout_tokens_per_s") for s in sums]),
        }
        if goal is not None:
            hits = [first_reach(c, goal) for c in curves[v.label]]
            entry["to_target"] = {"reached": sum(h is not None for h in hits), "of": len(hits),
                                  **{k: stats([h[k] if h else None for h in hits])
                                     for k in ("rollouts", "rl_seconds", "learner_steps")}}
        labels[v.label] = entry
    result = {"seeds": seeds, "target_accuracy": goal, "target": target, "labels": labels,
              "plots": [str(p) for p in plot_comparison(curves, out, goal)]}
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare(recipes: list[Path], overrides: list[str], *, seeds: int, out: Path, sweep: str | None = None,
            target: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, run what is missing, summarise. Returns the content of ``compare.json`` plus run counts."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    resolve_target(target, {"check": [{"acc": [0.0]}]})  # a malformed target fails before any run starts
    variants = plan(recipes, overrides, sweep)
    out.mkdir(parents=True, exist_ok=True)
    counts = run_all(variants, seeds, out, say)
    result = summarize(variants, seeds, out, target)
    return {**result, "counts": counts}


# ---- plots -------------------------------------------------------------------------------------
def _band(runs: list[dict[str, list]], xkey: str, ykey: str):
    """Mean x, mean y and y's 95% confidence band over seeds, aligned by index (seeds share the eval schedule).

    With one seed the band collapses onto the mean."""
    pts = [[(x, y) for x, y in zip(c[xkey], c[ykey]) if y is not None] for c in runs]
    n = min((len(p) for p in pts), default=0)
    if n == 0:
        return None
    cols = [[p[i] for p in pts] for i in range(n)]
    xs = [sum(x for x, _ in col) / len(col) for col in cols]
    ys = [[y for _, y in col] for col in cols]
    means = [sum(y) / len(y) for y in ys]
    cis = [ci95(y) or (m, m) for y, m in zip(ys, means)]
    return xs, means, [lo for lo, _ in cis], [hi for _, hi in cis]


def _draw(ax, curves, xkey, ykey) -> bool:
    drawn = False
    for label, runs in curves.items():
        band = _band(runs, xkey, ykey)
        if band is None:
            continue
        xs, mean, lo, hi = band
        (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(runs)})")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        drawn = True
    return drawn


def plot_comparison(curves: dict[str, list[dict]], out: Path, target: float | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (xkey, xlabel) in zip(axes, (("rollouts", "RL rollouts (responses sampled)"),
                                         ("seconds", "RL wall-clock (s, excluding evaluation)"),
                                         ("learner_steps", "learner steps (optimizer updates)"))):
        _draw(ax, curves, xkey, "acc")
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
        ax.set(xlabel=xlabel, ylabel="held-out greedy accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    acc_png = _save(fig, axes, "Held-out greedy accuracy: mean over seeds, band = 95% CI of the mean (Student t)",
                    out / "compare_accuracy.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, ylabel) in zip(axes, (("offpolicy/staleness_mean", "mean staleness (policy versions)"),
                                        ("offpolicy/ess", "ESS of behaviour → current (fraction)"))):
        if not _draw(ax, curves, "trace_step", key):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="RL step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    off_png = _save(fig, axes, "Training batches: staleness and effective sample size (mean over seeds, 95% CI band)",
                    out / "compare_offpolicy.png")
    return [acc_png, off_png]


def _save(fig, axes, title: str, path: Path) -> Path:
    """Legend on the first panel, title, layout, PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
