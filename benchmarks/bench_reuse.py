"""Rollout reuse: our on-policy GRPO recipe vs the quickstart's off-policy recipe, rollouts to a target.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_reuse.py            # full: 2 seeds × 60 RL steps, ~10 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_reuse.py --short --fresh  # make bench: 2 seeds × 30 steps, ~3 min

Both recipes start RL from the shipped SFT checkpoint ``tests/fixtures/tiny_addition_sft``
(0.41M-parameter tiny GPT after 500 SFT steps on 2-digit addition, ~28% held-out greedy) with
``sft.steps=0``, and differ only in how they use rollouts (same model, task, 128 prompts × 8
responses per step, lr 1e-4):

- ``grpo_onpolicy``: one update per rollout step on the 128 fresh groups (staleness 0);
- ``quickstart``:    4 updates × 64 groups per step from a replay buffer (staleness <= 4, PPO clip
                     against the behaviour log-probs), i.e. each stored group is used ~2×.

They run through ``offpolicy compare`` (resumable: finished runs in ``runs/bench_reuse*/`` are not
re-run), with held-out greedy evaluation on 300 problems after every RL step (greedy only:
``eval.samples=0``; ~0.1 s per evaluation, and the off-policy recipe reaches +20 points within
about 5 steps, so a coarser grid would decide the ratio by its spacing). The problems are fixed per
seed, so step-to-step changes are the model's, not resampling noise. The headline target is the mean
held-out greedy accuracy at the start of RL + 0.20; the same runs are also read at +0.10, +0.30 and
+0.40. Wall-clock is RL time (sum of ``time/step_s``: rollout + learning), evaluations excluded;
since other jobs on a shared machine stretch single steps up to 10x, the JSON also gives a steady
estimate, steps to target × the run's median step time (``steady_wallclock_ratio_vs_onpolicy``).

Writes ``benchmarks/results/reuse.json`` (``rollouts_ratio_vs_onpolicy`` = on-policy rollouts to
target / off-policy rollouts to target, mean over seeds; > 1 means reuse needs fewer) and copies the
two comparison plots next to it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from offpolicy.compare import compare, first_reach, rl_curve, run_dir  # noqa: E402
from offpolicy.report.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "tests" / "fixtures" / "tiny_addition_sft"
RECIPES = [ROOT / "recipes" / "grpo_onpolicy.yaml", ROOT / "recipes" / "quickstart.yaml"]
ONPOLICY, OFFPOLICY = "grpo_onpolicy", "quickstart"


def run_facts(run: Path) -> dict:
    """One run's learning curve, its total budget, and its median RL step time (robust to other jobs' bursts)."""
    curve = rl_curve(run)
    steps = [r["time/step_s"] for r in read_metrics(run / "metrics.jsonl")
             if r.get("stage") == "rl" and "reward/mean" in r]
    return {"curve": curve, "median_step_s": statistics.median(steps), "total_rollouts": curve["rollouts"][-1],
            "total_seconds": curve["seconds"][-1], "total_steps": curve["rl_step"][-1]}


def cost_to(facts: dict, target: float) -> dict:
    """Rollouts, measured RL seconds and steps × median step time to ``target``; the whole budget if never reached."""
    hit = first_reach(facts["curve"], target)
    if hit is None:
        return {"reached": False, "rollouts": facts["total_rollouts"], "rl_seconds": facts["total_seconds"],
                "steady_seconds": facts["total_steps"] * facts["median_step_s"]}
    return {"reached": True, "rollouts": hit["rollouts"], "rl_seconds": hit["rl_seconds"],
            "steady_seconds": hit["rl_step"] * facts["median_step_s"]}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def at_target(facts: dict[str, list[dict]], target: float) -> dict:
    """Per recipe costs to ``target`` and the on-policy / off-policy ratios (mean over seeds).

    An on-policy seed that never reached the target counts with its whole budget, so the ratio is a
    lower bound (``lower_bound``); if an off-policy seed never reached it there is no ratio.
    """
    costs = {label: [cost_to(f, target) for f in runs] for label, runs in facts.items()}
    entry: dict = {"target_accuracy": round(target, 4)}
    for label, cs in costs.items():
        entry[label] = {"reached": sum(c["reached"] for c in cs),
                        **{k: [round(c[k], 1) if c["reached"] else None for c in cs]
                           for k in ("rollouts", "rl_seconds", "steady_seconds")}}
    on, off = costs[ONPOLICY], costs[OFFPOLICY]
    ok = all(c["reached"] for c in off)
    for key, name in (("rollouts", "rollouts_ratio_vs_onpolicy"), ("rl_seconds", "wallclock_ratio_vs_onpolicy"),
                      ("steady_seconds", "steady_wallclock_ratio_vs_onpolicy")):
        den = mean([c[key] for c in off]) if ok else 0
        entry[name] = round(mean([c[key] for c in on]) / den, 2) if den > 0 else None
    entry["lower_bound"] = ok and not all(c["reached"] for c in on)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="30 RL steps per run (for `make bench`)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default 60, --short 30)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--gain", type=float, default=0.20, help="target = mean RL-start greedy accuracy + gain")
    ap.add_argument("--out", type=Path, default=None, help="compare folder (default runs/bench_reuse[_short])")
    ap.add_argument("--fresh", action="store_true", help="delete earlier runs in --out and measure again")
    args = ap.parse_args()
    steps = args.steps or (30 if args.short else 60)
    out = args.out or ROOT / "runs" / ("bench_reuse_short" if args.short else "bench_reuse")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    overrides = [f"policy.init={SFT}", "sft.steps=0", f"rl.steps={steps}", "eval.every=1", "eval.n_problems=300",
                 "eval.samples=0", "run.checkpoint_every=0", "run.progress=false", "run.threads=2"]
    t0 = time.perf_counter()
    result = compare(RECIPES, overrides, seeds=args.seeds, out=out, target=f"+{args.gain}")
    elapsed = time.perf_counter() - t0
    facts = {label: [run_facts(run_dir(out, label, s)) for s in range(args.seeds)] for label in (ONPOLICY, OFFPOLICY)}
    start = mean([f["curve"]["acc"][0] for runs in facts.values() for f in runs])
    by_gain = [{"gain": g, **at_target(facts, start + g)} for g in (0.1, 0.2, 0.3, 0.4)]
    head = at_target(facts, result["target_accuracy"])
    plots = []
    for src in result["plots"]:
        dst = RESULTS / f"reuse_{Path(src).stem.removeprefix('compare_')}.png"
        shutil.copyfile(src, dst)
        plots.append(str(dst.relative_to(ROOT)))
    summary = {
        "benchmark": "reuse",
        "short": args.short,
        "machine": machine(),
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/bench_reuse.py" + (" --short" if args.short else ""),
        "seeds": args.seeds,
        "rl_steps": steps,
        "overrides": overrides,
        "target_accuracy": result["target_accuracy"],
        "target_rule": f"mean held-out greedy accuracy at the start of RL + {args.gain}",
        "rollouts_ratio_vs_onpolicy": head["rollouts_ratio_vs_onpolicy"],
        "wallclock_ratio_vs_onpolicy": head["wallclock_ratio_vs_onpolicy"],
        "steady_wallclock_ratio_vs_onpolicy": head["steady_wallclock_ratio_vs_onpolicy"],
        "ratios_are_lower_bounds": head["lower_bound"],
        "median_step_s": {label: [round(f["median_step_s"], 3) for f in runs] for label, runs in facts.items()},
        "at_target": head,
        "by_gain": by_gain,
        "labels": {k: {kk: vv for kk, vv in v.items() if kk not in ("runs", "recipe")}
                   for k, v in result["labels"].items()},
        "compare_dir": str(out),
        "plots": plots,
        "bench_seconds": round(elapsed, 1),  # of this invocation: finished runs are read, not re-run
        "runs": result["counts"],  # ran / resumed / skipped (finished earlier)
    }
    path = write_json("reuse", summary)  # --short writes the same file; its "short" field says which
    print(f"\nwrote {path} in {elapsed:.0f} s\n")
    print_tables(result, facts, by_gain, steps)
    print(f"\ntarget {result['target_accuracy']:.3f}: "
          f"rollouts_ratio_vs_onpolicy {summary['rollouts_ratio_vs_onpolicy']}, "
          f"wall-clock ratio {summary['wallclock_ratio_vs_onpolicy']} measured, "
          f"{summary['steady_wallclock_ratio_vs_onpolicy']} at the median step time")


def print_tables(result: dict, facts: dict, by_gain: list[dict], steps: int) -> None:
    def cell(st, f):
        if st["mean"] is None:
            return "—"
        return f"{f.format(st['mean'])} ({f.format(st['min'])}–{f.format(st['max'])})"

    rows = []
    for label, e in result["labels"].items():
        t = e["to_target"]
        med = [f["median_step_s"] for f in facts[label]]
        rows.append([label, cell(e["start_greedy_acc"], "{:.3f}"), cell(e["final_greedy_acc"], "{:.3f}"),
                     f"{t['reached']}/{t['of']}", cell(t["rollouts"], "{:,.0f}"), cell(t["learner_steps"], "{:.0f}"),
                     cell(t["rl_seconds"], "{:.1f}"), f"{mean(med):.2f} ({min(med):.2f}–{max(med):.2f})"])
    print(markdown_table(["recipe", "start greedy", f"final greedy ({steps} steps)", "reached target",
                          "rollouts to target", "learner steps to target", "RL s to target (measured)",
                          "median RL step s"], rows))
    print()

    def show(g, label):
        r = g[label]
        values = ", ".join("—" if v is None else f"{v:,.0f}" for v in r["rollouts"])
        return f"{r['reached']}/{len(r['rollouts'])}: {values}"

    print(markdown_table(
        ["target (start + gain)", "on-policy rollouts", "off-policy rollouts", "rollouts ratio",
         "wall-clock ratio (measured)", "wall-clock ratio (median step)"],
        [[f"{g['target_accuracy']:.3f} (+{g['gain']:.2f})", show(g, ONPOLICY), show(g, OFFPOLICY),
          f"{'≥ ' if g['lower_bound'] else ''}{g['rollouts_ratio_vs_onpolicy']}",
          f"{'≥ ' if g['lower_bound'] else ''}{g['wallclock_ratio_vs_onpolicy']}",
          f"{'≥ ' if g['lower_bound'] else ''}{g['steady_wallclock_ratio_vs_onpolicy']}"] for g in by_gain]))


if __name__ == "__main__":
    main()
