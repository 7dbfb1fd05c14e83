"""Async vs sync: wall-clock to the same held-out target, idle fractions, and Ray's overhead.

Command (~6 min on 2 idle cores):

    .venv/bin/python benchmarks/bench_async.py            # seeds 0 1 2, 30 RL steps each
    .venv/bin/python benchmarks/bench_async.py --short    # seed 0, 15 steps

Both systems run ``recipes/async.yaml`` (PPO clip + the decoupled correction, 128 prompts x 8 per
step, 4 updates of 64 groups, ``max_staleness`` 8) from the same SFT checkpoint
(``tests/fixtures/tiny_addition_sft``, 0.41M parameters, 2-digit addition), differing only in
``run.mode``:

- ``sync``: one process alternates generation and learning with 2 torch threads;
- ``async``: one Ray rollout worker (1 thread) generates while the learner (1 thread) learns.

Held-out greedy accuracy on 300 problems every 2 steps. The target is the SFT start + 0.20 (the
TRL comparison's); "seconds to target" is the training wall-clock at the first evaluation at or above
it, evaluation time excluded (both sides evaluate the same way; async workers keep generating while
the driver evaluates, so excluding it is the conservative choice for async). Ray's start-up (~5-10 s,
once per process) is excluded too and reported apart. Idle fractions: sync's learner idles while it
generates (rollout_s / step_s) and its generator while it learns; async reports
``time/learner_idle_frac`` and ``time/rollout_idle_frac``.

Ray overhead: the seconds per weight broadcast (``ray.put`` of the state dict) from the async runs,
and a round trip through an echo actor of (a) the state dict and (b) one request's result (32
groups of 8 experiences), minus an empty call's.

Writes benchmarks/results/async.json (key ``speedup_vs_sync``: mean over seeds of sync seconds to
target / async seconds to target) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "tests" / "fixtures" / "tiny_addition_sft"
RUNS = ROOT / "runs" / "bench_async"


def overrides(mode: str, seed: int, steps: int, out: Path, extra: list[str], async_threads: int) -> list[str]:
    common = [*extra, f"run.out_dir={out}", f"run.seed={seed}", "run.progress=false", f"policy.init={START}",
              "sft.steps=0", f"rl.steps={steps}", "eval.every=2", "eval.samples=0", "eval.n_problems=300",
              "run.checkpoint_every=0"]
    if mode == "sync":
        return [*common, "run.mode=sync", "run.threads=2"]
    return [*common, "run.mode=async", f"run.threads={async_threads}", "async.num_workers=1",
            "async.worker_threads=1"]


def run_one(mode: str, seed: int, steps: int, extra: list[str], async_threads: int, name: str,
            reuse: bool = False) -> dict:
    out = RUNS / f"{name}_{mode}_seed{seed}"
    if reuse and (out / "summary.json").exists():  # summarise a finished run again (same command, no rerun)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return summarize(mode, seed, rows, float("nan"))
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", str(ROOT / "recipes" / "async.yaml"),
           *overrides(mode, seed, steps, out, extra, async_threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{mode} seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarize(mode, seed, rows, wall)


def summarize(mode: str, seed: int, rows: list[dict], wall: float) -> dict:
    rl = [r for r in rows if r.get("stage") == "rl" and "train/version" in r]
    evals = [r for r in rows if "eval_point" in r and r["eval_point"] != "before_sft"]
    start = next(r["eval/greedy_acc"] for r in evals if r["eval_point"] == "before_rl")
    first_rl = rl[0]["time/elapsed_s"] - rl[0]["time/step_s"]  # RL starts here (Ray's start-up before it)
    curve, eval_s = [], 0.0
    for r in evals:
        if r["eval_point"] == "before_rl":
            continue
        eval_s += r.get("time/eval_s", 0.0)
        curve.append({"step": r["step"], "rollouts": r["rollouts"], "acc": r["eval/greedy_acc"],
                      "train_s": r["time/elapsed_s"] - first_rl - eval_s})
    steady = rl[2:] or rl
    out = {"mode": mode, "seed": seed, "start_acc": start, "final_acc": curve[-1]["acc"] if curve else None,
           "curve": curve, "process_wall_s": round(wall, 2), "setup_s": round(first_rl, 2),
           "step_s_median": statistics.median(r["time/step_s"] for r in steady)}
    if mode == "sync":
        out["learner_idle_frac"] = statistics.mean(r["time/rollout_s"] / r["time/step_s"] for r in steady)
        out["rollout_idle_frac"] = statistics.mean(r["time/learn_s"] / r["time/step_s"] for r in steady)
    else:
        out["learner_idle_frac"] = statistics.mean(r["time/learner_idle_frac"] for r in steady)
        out["rollout_idle_frac"] = statistics.mean(r["time/rollout_idle_frac"] for r in steady)
        syncs = sum(r["async/weight_syncs"] for r in rl)
        out["weight_sync_s_per_sync"] = sum(r["async/weight_sync_s"] for r in rl) / max(syncs, 1)
        out["staleness_mean"] = statistics.mean(r["offpolicy/staleness_mean"] for r in rl)
    return out


def seconds_to(curve: list[dict], target: float) -> float | None:
    return next((p["train_s"] for p in curve if p["acc"] >= target), None)


def ray_overhead() -> dict:
    """Round trips through an echo actor: the state dict, one request's result, and an empty call."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from offpolicy.policy.model import load_policy
    from offpolicy.config import load_config
    from offpolicy.rollout.worker import Job, RolloutWorker

    from offpolicy.train.async_loop import spec_of

    policy = load_policy(START)
    spec = spec_of(load_config(ROOT / "recipes" / "async.yaml"))
    problems = __import__("offpolicy.data.tasks", fromlist=["make_task"]).make_task(
        "addition", min_digits=2, max_digits=2).problems(32, split="train", seed=1)
    result = RolloutWorker(policy, spec).run(Job(0, 0, problems, 1, "s0:"))
    state = {k: v.detach() for k, v in policy.model.state_dict().items()}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Echo:
        def echo(self, x):
            return x

    echo = Echo.remote()
    ray.get(echo.echo.remote(None))

    def timed(make, n=30):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(echo.echo.remote(make()))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    empty = timed(lambda: None)
    put = []
    for _ in range(30):
        t0 = time.perf_counter()
        ray.put(state)
        put.append(time.perf_counter() - t0)
    out = {"empty_call_ms": 1e3 * empty,
           "weights_mb": sum(v.numel() * v.element_size() for v in state.values()) / 2**20,
           "weights_put_ms": 1e3 * statistics.median(put),
           "weights_round_trip_ms": 1e3 * (timed(lambda: state) - empty),
           "result_round_trip_ms": 1e3 * (timed(lambda: result) - empty),
           "result_groups": len(result.groups)}
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for both systems, e.g. rl.updates_per_step=1")
    ap.add_argument("--async-threads", type=int, default=1, help="the async learner's torch threads")
    ap.add_argument("--name", default="async", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--reuse", action="store_true", help="summarise finished runs in runs/bench_async again")
    args = ap.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.short else [0, 1, 2])
    steps = args.steps or (15 if args.short else 30)
    runs = []
    for seed in seeds:  # interleaved, so a change in the machine's load hits both systems alike
        for mode in ("sync", "async"):
            runs.append(run_one(mode, seed, steps, args.set, args.async_threads, args.name, args.reuse))
            print(f"{mode} seed {seed}: final {runs[-1]['final_acc']}, step {runs[-1]['step_s_median']:.2f} s",
                  flush=True)
    per_seed = []
    for seed in seeds:
        s, a = (next(r for r in runs if r["mode"] == m and r["seed"] == seed) for m in ("sync", "async"))
        target = round(s["start_acc"] + 0.20, 4)
        ts, ta = seconds_to(s["curve"], target), seconds_to(a["curve"], target)
        per_seed.append({"seed": seed, "target": target, "sync_s_to_target": ts, "async_s_to_target": ta,
                         "speedup": ts / ta if ts and ta else None,
                         "step_speedup": s["step_s_median"] / a["step_s_median"]})
    speedups = [p["speedup"] for p in per_seed if p["speedup"]]
    command = " ".join(["python benchmarks/bench_async.py", *sys.argv[1:]])
    payload = {"benchmark": "async", "short": args.short, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "command": command, "overrides_both": args.set, "async_learner_threads": args.async_threads,
               "recipe": "recipes/async.yaml", "start": str(START.relative_to(ROOT)), "steps": steps,
               "speedup_vs_sync": statistics.mean(speedups) if speedups else None,
               "speedup_vs_sync_per_seed": per_seed,
               "step_speedup_vs_sync": statistics.mean(p["step_speedup"] for p in per_seed),
               "ray_overhead": ray_overhead(), "runs": runs}
    write_json(args.name, payload)
    rows = [[r["mode"], r["seed"], f"{r['start_acc']:.3f}", f"{r['final_acc']:.3f}", f"{r['step_s_median']:.2f}",
             f"{r['learner_idle_frac']:.2f}", f"{r['rollout_idle_frac']:.2f}", f"{r['setup_s']:.1f}"] for r in runs]
    print(markdown_table(["mode", "seed", "start", "final", "s/step (median)", "learner idle", "rollout idle",
                          "setup s"], rows))
    print(markdown_table(["seed", "target", "sync s", "async s", "speed-up", "per-step speed-up"],
                         [[p["seed"], p["target"], p["sync_s_to_target"], p["async_s_to_target"], p["speedup"],
                           round(p["step_speedup"], 2)] for p in per_seed]))
    print(json.dumps({k: payload[k] for k in ("speedup_vs_sync", "step_speedup_vs_sync", "ray_overhead")},
                     indent=1))


if __name__ == "__main__":
    main()
