"""A run's cost vs the number of rollouts it has collected: step time, memory, buffer, checkpoints.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_run_scale.py            # full: 200 RL steps, 204,800 rollouts
    PYTHONPATH=src .venv/bin/python benchmarks/bench_run_scale.py --short    # make bench: 40 steps, 40,960 rollouts

The quickstart's RL stage (``recipes/quickstart.yaml``: 128 prompts × 8 responses per step, 4
updates of 64 groups) from the shipped SFT checkpoint, with one change that makes it a worst case
for growth: nothing ever leaves the replay buffer (``max_staleness`` and ``capacity`` far above
the run's size), so every sample, every checkpoint (which stores the buffer with its experiences:
nothing collected is lost on a crash) and the process's memory see all rollouts collected so far.
A checkpoint is written every ``--checkpoint-every`` steps. From the run's own ``metrics.jsonl``
(``time/rollout_s``, ``time/learn_s``, ``buffer/size``, ``mem/rss_mb``) and timed checkpoint
writes, the script reports these per window of steps as rollouts accumulate: does a step cost the
same at 200k rollouts as at 1k? What grows, and how fast?

Writes ``benchmarks/results/run_scale.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "tests" / "fixtures" / "tiny_addition_sft"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(steps: int, checkpoint_every: int, out: Path, threads: int) -> tuple[list[dict], list[dict], dict]:
    """Train and return the per-step metrics, the timed checkpoint writes and the summary."""
    import offpolicy.train.runner as runner_mod
    from offpolicy.config import load_config
    from offpolicy.report.metrics import read_metrics

    saves: list[dict] = []
    original = runner_mod.save_checkpoint

    def timed_save(root, name, policy, state, keep=2):
        t0 = time.perf_counter()
        path = original(root, name, policy, state, keep)
        saves.append({"name": name, "step": state.get("step"), "rollouts": state.get("rollouts"),
                      "seconds": round(time.perf_counter() - t0, 4), "bytes": dir_bytes(path)})
        return path

    runner_mod.save_checkpoint = timed_save
    big = 10 * steps * 128 * 8
    cfg = load_config(ROOT / "recipes" / "quickstart.yaml", [
        f"policy.init={SFT}", "sft.steps=0", f"rl.steps={steps}", "eval.every=0", "eval.n_problems=100",
        "eval.samples=0", f"run.checkpoint_every={checkpoint_every}", "run.progress=false",
        f"run.threads={threads}", f"run.out_dir={out}", f"rl.buffer.max_staleness={big}",
        f"rl.buffer.capacity={big}"])
    summary = runner_mod.train(cfg)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "rl" and "reward/mean" in r]
    return rows, [s for s in saves if str(s["name"]).startswith("step_")], summary


def windows(rows: list[dict], n: int) -> list[dict]:
    """Median step costs over ``n`` equal windows of the run."""
    size = max(1, len(rows) // n)
    out = []
    for i in range(0, len(rows), size):
        w = rows[i:i + size]
        out.append({"steps": f"{w[0]['step']}-{w[-1]['step']}", "rollouts_at_end": int(w[-1]["rollouts"]),
                    "buffer_experiences": int(w[-1]["buffer/size"]) * 8,
                    "rollout_s": statistics.median(r["time/rollout_s"] for r in w),
                    "learn_s": statistics.median(r["time/learn_s"] for r in w),
                    "step_s": statistics.median(r["time/step_s"] for r in w),
                    "rss_mb_at_end": round(w[-1]["mem/rss_mb"], 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="40 steps (make bench)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_run_scale")
    a = ap.parse_args()
    steps = a.steps or (40 if a.short else 200)
    every = a.checkpoint_every or max(1, steps // 8)
    if a.out.exists():
        import shutil

        shutil.rmtree(a.out)
    t0 = time.perf_counter()
    rows, saves, summary = run(steps, every, a.out, a.threads)
    win = windows(rows, 8 if steps >= 8 else steps)
    first, last = win[0], win[-1]
    payload = {
        "benchmark": "run_scale", "short": a.short, "machine": machine(),
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/bench_run_scale.py" + (" --short" if a.short else ""),
        "setup": {"recipe": "recipes/quickstart.yaml", "init": str(SFT.relative_to(ROOT)), "rl_steps": steps,
                  "checkpoint_every": every, "buffer": "never evicts (max_staleness, capacity > run size)",
                  "threads": a.threads},
        "rollouts": summary["rollouts"], "peak_rss_mb": summary["peak_rss_mb"],
        "windows": win, "checkpoints": saves,
        "step_s_growth_first_to_last_window": round(last["step_s"] / first["step_s"], 3),
        "learn_s_growth_first_to_last_window": round(last["learn_s"] / first["learn_s"], 3),
        "rss_mb_per_1k_rollouts": round((last["rss_mb_at_end"] - first["rss_mb_at_end"])
                                        / max(1, (last["rollouts_at_end"] - first["rollouts_at_end"]) / 1000), 2),
        "checkpoint_bytes_per_experience": round((saves[-1]["bytes"] - saves[0]["bytes"])
                                                 / max(1, saves[-1]["rollouts"] - saves[0]["rollouts"]), 1)
        if len(saves) > 1 else None,
        "checkpoint_s_per_100k_rollouts": round((saves[-1]["seconds"] - saves[0]["seconds"])
                                                / max(1, saves[-1]["rollouts"] - saves[0]["rollouts"]) * 1e5, 3)
        if len(saves) > 1 else None,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_json("run_scale", payload)
    print(markdown_table(["steps", "rollouts (end)", "experiences in buffer", "rollout s", "learn s", "step s",
                          "RSS MB (end)"],
                         [[w["steps"], f"{w['rollouts_at_end']:,}", f"{w['buffer_experiences']:,}",
                           f"{w['rollout_s']:.3f}", f"{w['learn_s']:.3f}", f"{w['step_s']:.3f}",
                           w["rss_mb_at_end"]] for w in win]))
    print()
    print(markdown_table(["checkpoint", "rollouts", "seconds", "MB"],
                         [[s["name"], f"{s['rollouts']:,}", s["seconds"], round(s["bytes"] / 2**20, 1)] for s in saves]))
    print(f"\n[bench_run_scale] wrote {path} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
