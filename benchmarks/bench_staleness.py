"""Staleness sweep: held-out accuracy after a fixed rollout budget when every group is exactly
``max_staleness`` versions stale at its first use, for seven objectives.

Command (~12 min on 2 idle cores; --short ~4 min):

    .venv/bin/python benchmarks/bench_staleness.py
    .venv/bin/python benchmarks/bench_staleness.py --short     # max_staleness 0, 4, 64; 12 steps

Each run is the async loop replaying a *synthetic* schedule (``async.replay_schedule`` with
``"lag": S`` records; no Ray, deterministic): every request of step k is generated on the learner's
weights of version ``max(0, v_k − S)``, v_k the version at which step k is first learned from — the
most stale data the admission bound S allows, so the sweep measures the objectives, not a race
between processes. Same SFT start (``tests/fixtures/tiny_addition_sft``), 128 prompts x 8 per
step, 4 updates of 64 groups per step (groups retire once S versions stale), lr 1e-4, 20 steps =
20,480 rollouts, held-out greedy accuracy on 300 problems at the end.

Objectives: ``ppo_clip`` (token PPO clipped against the behaviour policy, old_logp=behavior: the
naive way to use stale data), ``decoupled_ppo`` (clip vs the proximal policy, behaviour IS weight),
``m2po`` (second-moment token masking), ``topr``, ``vcpo`` (with its ESS-scaled lr controller),
``rec`` (REC-OneSide-NoIS: no importance weight by design) and ``cispo`` (clipped IS weight to the
rollout policy, old_logp=behavior), each with its defaults. ``--losses`` reruns some and merges them
into the existing JSON. Reported per run: final accuracy,
mean sequence ESS (``offpolicy/ess``), mean clip fraction (``loss/clip_frac`` where the loss has one),
mean staleness.

Writes benchmarks/results/staleness_sweep.json (a list ``rows`` of {loss, max_staleness, accuracy,
...}) and benchmarks/results/staleness_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "tests" / "fixtures" / "tiny_addition_sft"
RUNS = ROOT / "runs" / "bench_staleness"
LOSSES = {  # loss -> its overrides
    "ppo_clip": ["rl.loss=ppo_clip", "rl.old_logp=behavior"],
    "decoupled_ppo": ["rl.loss=decoupled_ppo", "rl.old_logp=proximal"],
    "m2po": ["rl.loss=m2po", "rl.old_logp=proximal"],
    "topr": ["rl.loss=topr", "rl.old_logp=proximal"],
    "vcpo": ["rl.loss=vcpo", "rl.old_logp=proximal", "rl.controllers={vcpo_lr: {}}"],
    "rec": ["rl.loss=rec", "rl.old_logp=proximal"],
    "cispo": ["rl.loss=cispo", "rl.old_logp=behavior"],  # its ratio is to the rollout policy (MiniMax-M1)
}


def schedule(path: Path, steps: int, lag: int, requests_per_step: int) -> Path:
    with open(path, "w") as f:
        for k in range(steps):
            for c in range(requests_per_step):
                f.write(json.dumps({"kind": "request", "step": k, "chunk": c, "lag": lag}) + "\n")
    return path


def run_one(loss: str, lag: int, steps: int, seed: int) -> dict:
    out = RUNS / f"{loss}_s{lag}_seed{seed}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    sched = schedule(out.parent / f"lag{lag}_{steps}.jsonl", steps, lag, 1)
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
           f"run.out_dir={out}", f"run.seed={seed}", "run.progress=false", "run.checkpoint_every=0",
           "run.mode=async", f"async.replay_schedule={sched}", "async.groups_per_request=128",
           f"policy.init={START}", "sft.steps=0", f"rl.steps={steps}", f"rl.buffer.max_staleness={lag}",
           "eval.every=0", "eval.samples=0", "eval.n_problems=300", *LOSSES[loss]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"loss": loss, "max_staleness": lag, "seed": seed, "error": proc.stderr.strip().splitlines()[-1]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r.get("stage") == "rl" and "train/version" in r]
    evals = {r["eval_point"]: r["eval/greedy_acc"] for r in rows if "eval_point" in r}

    def mean(key):
        vals = [r[key] for r in rl if isinstance(r.get(key), (int, float))]
        return statistics.mean(vals) if vals else None

    return {"loss": loss, "max_staleness": lag, "seed": seed, "start_accuracy": evals.get("before_rl"),
            "accuracy": evals.get("final"), "ess": mean("offpolicy/ess"), "clip_frac": mean("loss/clip_frac"),
            "staleness_mean": mean("offpolicy/staleness_mean"), "staleness_max": max(
                (r.get("offpolicy/staleness_max", 0) for r in rl), default=None),
            "skipped_steps": rl[-1].get("train/skipped_steps") if rl else None,
            "rollouts": rl[-1]["rollouts"] if rl else 0, "seconds": round(time.perf_counter() - t0, 1)}


def plot(rows: list[dict], lags: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for loss in LOSSES:
        pts = [(r["max_staleness"], r["accuracy"]) for r in rows if r["loss"] == loss and r.get("accuracy") is not None]
        if pts:
            ax.plot([lags.index(x) for x, _ in pts], [y for _, y in pts], marker="o", label=loss)
    start = next((r["start_accuracy"] for r in rows if r.get("start_accuracy") is not None), None)
    if start is not None:
        ax.axhline(start, color="grey", ls=":", label="start (SFT)")
    ax.set_xticks(range(len(lags)), [str(x) for x in lags])
    ax.set_xlabel("staleness of every group at first use (versions)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("Accuracy after a fixed rollout budget vs staleness")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = ROOT / "benchmarks" / "results" / "staleness_sweep.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--losses", nargs="*", default=None, help="rerun only these; other rows kept from the JSON")
    args = ap.parse_args()
    lags = [0, 4, 64] if args.short else [0, 1, 4, 16, 64]
    steps = args.steps or (12 if args.short else 20)
    rows, wanted = [], args.losses or list(LOSSES)
    previous = ROOT / "benchmarks" / "results" / "staleness_sweep.json"
    if args.losses and previous.exists():
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["loss"] not in wanted]
    for lag in lags:
        for loss in wanted:
            rows.append(run_one(loss, lag, steps, args.seed))
            r = rows[-1]
            print(f"{loss:14s} S={lag:3d}: acc {r.get('accuracy')}  ess {r.get('ess')}  {r.get('error', '')}",
                  flush=True)
    payload = {"benchmark": "staleness_sweep", "short": args.short, "date": time.strftime("%Y-%m-%d"),
               "machine": machine(), "command": "python benchmarks/bench_staleness.py" + (" --short" if args.short else ""),
               "steps": steps, "rollouts_per_run": steps * 1024, "seed": args.seed, "lags": lags,
               "rerun": args.losses, "rows": sorted(rows, key=lambda r: (list(LOSSES).index(r["loss"]),
                                                                         r["max_staleness"]))}
    write_json("staleness_sweep", payload)
    plot(rows, lags)
    table = []
    for loss in LOSSES:
        cells = [loss]
        for lag in lags:
            r = next(x for x in rows if x["loss"] == loss and x["max_staleness"] == lag)
            cells.append("error" if "error" in r else f"{r['accuracy']:.3f} (ESS {r['ess']:.2f})"
                         if r.get("ess") is not None else f"{r['accuracy']:.3f}")
        table.append(cells)
    print(markdown_table(["loss", *[f"S={x}" for x in lags]], table))


if __name__ == "__main__":
    main()
