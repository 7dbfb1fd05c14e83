"""What the runtime costs the sync loop: seconds per RL step before and after it, same recipe, same seed.

Command (~4 min on 2 idle cores):

    .venv/bin/python benchmarks/bench_sync_overhead.py --base 8b864b9 --rounds 3 --steps 20

``--base`` is the commit before the runtime (engines sharing the learner's weights, no write-ahead
log); a temporary ``git worktree`` of it runs with this venv (PYTHONPATH). Both sides run
``recipes/quickstart.yaml``'s RL stage from ``tests/fixtures/tiny_addition_sft`` (128 prompts x 8,
4 updates of 64 groups), no evaluation and no checkpoints inside the timed steps, alternating
base / new for ``--rounds`` rounds so load changes hit both. Per run: the median ``time/step_s`` over
steps 3..N. The new side pays for the engine's own copy of the weights (``load_weights`` after
every step), the fsynced write-ahead log of every rollout and per-token provenance.

Also checks that both sides end with the same held-out accuracy (same seed: the sync loop must
reproduce the old one). Writes benchmarks/results/sync_overhead.json (``step_time_ratio`` = new / base,
goal <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "tests" / "fixtures" / "tiny_addition_sft"


def run(src: Path, out: Path, steps: int) -> dict:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
           f"run.out_dir={out}", "run.progress=false", "run.checkpoint_every=0", f"policy.init={START}",
           "sft.steps=0", f"rl.steps={steps}", "eval.every=0", "eval.samples=0", "eval.n_problems=300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src,
                          env={**os.environ, "PYTHONPATH": str(src / "src")})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r]
    final = next(r["eval/greedy_acc"] for r in rows if r.get("eval_point") == "final")
    return {"step_s": statistics.median(r["time/step_s"] for r in rl[2:]), "final_acc": final,
            "rollout_s": statistics.median(r["time/rollout_s"] for r in rl[2:]),
            "learn_s": statistics.median(r["time/learn_s"] for r in rl[2:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="8b864b9")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="offpolicy_base_")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        results = {"base": [], "new": []}
        for i in range(args.rounds):
            for side, src in (("base", base), ("new", ROOT)):
                results[side].append(run(src, ROOT / "runs" / "bench_sync_overhead" / f"{side}{i}", args.steps))
                print(side, i, results[side][-1], flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    med = {s: statistics.median(r["step_s"] for r in rs) for s, rs in results.items()}
    payload = {"benchmark": "sync_overhead", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "command": f"python benchmarks/bench_sync_overhead.py --base {args.base} --rounds {args.rounds} "
                          f"--steps {args.steps}",
               "base_commit": args.base, "steps": args.steps, "base_step_s": med["base"], "new_step_s": med["new"],
               "step_time_ratio": med["new"] / med["base"],
               "same_final_accuracy": len({r["final_acc"] for rs in results.values() for r in rs}) == 1,
               "runs": results}
    write_json("sync_overhead", payload)
    print(markdown_table(["side", "s/step (median of runs)", "rollout s", "learn s", "final acc"],
                         [[s, f"{med[s]:.3f}", f"{statistics.median(r['rollout_s'] for r in rs):.3f}",
                           f"{statistics.median(r['learn_s'] for r in rs):.3f}", rs[0]["final_acc"]]
                          for s, rs in results.items()]))
    print(f"step_time_ratio {payload['step_time_ratio']:.3f}, same final accuracy: {payload['same_final_accuracy']}")


if __name__ == "__main__":
    main()
