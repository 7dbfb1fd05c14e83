"""The benchmark suite (issue 12): every system on every suite task, from the task's start checkpoint.

    PYTHONPATH=src python benchmarks/suite_starts.py        # the start checkpoints (once; ~10 min, cached)
    PYTHONPATH=src python benchmarks/bench_suite.py         # ~45 min on 2 cores: 3 recipes + TRL, 6 tasks, 3 seeds
    PYTHONPATH=src python benchmarks/bench_suite.py --recipes psr_reuse topr_reuse rec_replay   # more systems, same runs kept

This is ``offpolicy compare --suite all --trl`` with the settings below, plus the machine, the date and
the command in the result, and the per-task plots copied to ``docs/``. Every run is its own process
(its own peak RSS) with one torch thread (TRL too: on 2 shared cores, 2 threads per process made steps
20-30x slower), 128 prompts x 8 completions per step, lr 1e-4, the same rollout budget for every
system (``--rollouts``), held-out greedy accuracy on 300 problems every 2 steps (no sampled accuracy:
it would cost more than training). Runs are cached in ``--out``: a finished run is read back, a killed
one resumes. Writes ``benchmarks/results/suite.json`` and ``docs/suite_<task>.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from offpolicy.suite_compare import compare_suite, suite_runs, trl_runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("default", "grpo_onpolicy", "quickstart")  # our recipes in the headline run; TRL is added with --trl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=list(SYSTEMS), help="recipe names under recipes/")
    ap.add_argument("--tasks", nargs="*", default=None, help="suite task names (default: the whole suite)")
    ap.add_argument("--no-trl", action="store_true", help="leave TRL out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=12288, help="RL rollouts per run (12 steps of 128 x 8)")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-problems", type=int, default=300)
    ap.add_argument("--out", default="runs/suite")
    a = ap.parse_args()
    recipes = [ROOT / "recipes" / f"{r}.yaml" for r in a.recipes]
    tasks = suite_runs(a.tasks, ROOT / "benchmarks" / "results" / "suite_starts.json")
    external = None if a.no_trl else {"trl": trl_runner(a.eval_problems, a.eval_every, threads=1)}
    budgets = [a.rollouts // 4, a.rollouts // 2, a.rollouts]
    result = compare_suite(recipes, tasks, seeds=a.seeds, out=Path(a.out), budget=a.rollouts, budgets=budgets,
                           eval_every=a.eval_every, n_eval=a.eval_problems,
                           overrides=["run.threads=1", "eval.samples=0"], external=external)
    plots = []
    for p in result["plots"]:
        dest = ROOT / "docs" / Path(p).name
        shutil.copyfile(p, dest)
        plots.append(str(dest.relative_to(ROOT)))
    doc = {"benchmark": "suite", "date": time.strftime("%Y-%m-%d"), "command": "PYTHONPATH=src python benchmarks/bench_suite.py " + " ".join(sys.argv[1:]),
           "machine": machine(), **{k: v for k, v in result.items() if k != "plots"}, "plots": plots}
    (RESULTS / "suite.json").write_text(json.dumps(doc, indent=1) + "\n")
    print((Path(a.out) / "suite.md").read_text())
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
