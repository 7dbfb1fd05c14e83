"""Make the suite's RL start checkpoints by procedure (issue 12): SFT up a model-size ladder per task.

For each suite task (``offpolicy.suite.SUITE``), SFT the tiny GPT on each rung of ``LADDER``
(smallest first) with ``sft.stop_at_accuracy`` and ``sft.keep_best``, and take the first rung whose
start lands in the band (held-out greedy accuracy in ``BAND``, pass@8 >= greedy + ``PASS_MARGIN``).
A task gets at most ``--budget-s`` seconds of SFT over all its rungs; a task that ends outside the
band is reported with the reason (replace it with one of ``ALTERNATES``: ``--tasks lcm``).
Runs are deterministic from ``--seed`` and cached: a rung whose run folder holds a
``summary.json`` is read back, not trained again (delete the folder to rebuild it).

    PYTHONPATH=src python benchmarks/suite_starts.py            # all suite tasks, one thread
    PYTHONPATH=src python benchmarks/suite_starts.py --tasks gcd lcm

Writes ``benchmarks/results/suite_starts.json`` (merged per task with what is there) and
checkpoints under ``runs/suite_starts/<task>/<rung>/checkpoints/sft``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table  # noqa: E402

from offpolicy.config import load_config  # noqa: E402
from offpolicy.report.metrics import read_metrics  # noqa: E402
from offpolicy.suite import BAND, LADDER, PASS_MARGIN, STARTS_JSON, SUITE, in_band, suite_task  # noqa: E402
from offpolicy.train.runner import train  # noqa: E402


def run_rung(task, rung, root: Path, seed: int) -> dict:
    """SFT ``task`` on ``rung`` (or read the cached run) and describe its start."""
    out = root / task.name / rung.name
    cfg = load_config(None, task.overrides(rung, out, seed=seed))
    cached = (out / "summary.json").exists()
    if cached and load_config(out / "config.yaml") != cfg:
        raise SystemExit(f"{out} holds a start made with another config than offpolicy.suite's {task.name!r} "
                         f"on rung {rung.name!r} now: delete the folder to rebuild it")
    t0 = time.perf_counter()
    if not cached:
        train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    rows = read_metrics(out / "metrics.jsonl")
    start = next(r for r in rows if r.get("eval_point") == "before_rl")
    sft_rows = [r for r in rows if r.get("stage") == "sft" and "sft/loss" in r]
    greedy, pass8 = start["eval/greedy_acc"], start["eval/pass_at_k"]
    return {
        "rung": rung.name, "d_model": rung.d_model, "n_layers": rung.n_layers, "params": summary["params"],
        "sft_steps_run": len(sft_rows), "start_step": summary["sft_best_step"],
        "seconds": round(summary["wall_seconds"], 1), "cached": cached,
        "seconds_this_call": round(time.perf_counter() - t0, 1),
        "sft_s_per_step": round(sum(r["time/step_s"] for r in sft_rows) / max(1, len(sft_rows)), 4),
        "greedy_acc": greedy, "pass_at_8": pass8, "sampled_acc": start["eval/sampled_acc"],
        "in_band": in_band(greedy, pass8), "checkpoint": str(out / "checkpoints" / "sft"),
    }


def prompt_length(task) -> int:
    """Longest prompt (characters = tokens) of 500 training problems."""
    from offpolicy.data.tasks import make_task

    problems = make_task(task.task, **task.params).problems(500, split="train", seed=0)
    return max(len(p.prompt) for p in problems)


def make_start(task, root: Path, seed: int, budget_s: float) -> dict:
    """Climb the ladder until a start lands in the band or the task's budget is spent."""
    tried, spent = [], 0.0
    for rung in LADDER:
        if spent >= budget_s:
            break
        result = run_rung(task, rung, root, seed)
        tried.append(result)
        spent += result["seconds"]
        print(f"  {task.name} rung {rung.name}: greedy {result['greedy_acc']:.3f} pass@8 {result['pass_at_8']:.3f} "
              f"after {result['sft_steps_run']} steps, {result['seconds']:.0f} s", flush=True)
        if result["in_band"]:
            return {**describe(task), **result, "tried": tried[:-1], "sft_seconds_total": round(spent, 1),
                    "budget_s": budget_s}
    return {**describe(task), "checkpoint": None, "tried": tried, "sft_seconds_total": round(spent, 1),
            "budget_s": budget_s, "reason": failure(tried, spent, budget_s)}


def describe(task) -> dict:
    return {"kind": task.kind, "task": task.task, "params": task.params, "example": task.example,
            "max_len": task.max_len, "max_new_tokens": task.max_new_tokens, "prompt_length": prompt_length(task)}


def failure(tried: list[dict], spent: float, budget_s: float) -> str:
    last = tried[-1] if tried else None
    where = "" if last is None else (f"; last rung {last['rung']}: greedy {last['greedy_acc']:.3f}, "
                                     f"pass@8 {last['pass_at_8']:.3f}")
    limit = "budget spent" if spent >= budget_s else "ladder exhausted"
    return f"no rung in the band (greedy {BAND[0]}-{BAND[1]}, pass@8 >= greedy + {PASS_MARGIN}): {limit}{where}"


def table(tasks: dict) -> str:
    header = ["task", "kind", "rung", "params", "SFT steps", "s/step", "seconds", "greedy", "pass@8", "sampled",
              "prompt len", "status"]
    rows = []
    for name, r in tasks.items():
        ok = r.get("checkpoint") is not None
        best = r if ok else (r["tried"][-1] if r["tried"] else {})
        acc = lambda key: "-" if key not in best else f"{best[key]:.3f}"  # noqa: E731
        rows.append([name, r["kind"], best.get("rung", "-"), best.get("params", "-"), best.get("start_step", "-"),
                     best.get("sft_s_per_step", "-"), r["sft_seconds_total"], acc("greedy_acc"),
                     acc("pass_at_8"), acc("sampled_acc"), r["prompt_length"],
                     "in band" if ok else r["reason"]])
    return markdown_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", help="suite task names (default: the whole suite)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=420.0, help="SFT seconds per task over all its rungs")
    ap.add_argument("--root", default="runs/suite_starts")
    args = ap.parse_args()
    tasks = [suite_task(n) for n in args.tasks] if args.tasks else list(SUITE)
    results = json.loads(STARTS_JSON.read_text())["tasks"] if STARTS_JSON.exists() else {}
    for task in tasks:
        print(f"{task.name}:", flush=True)
        results[task.name] = make_start(task, Path(args.root), args.seed, args.budget_s)
        write(results, args)
    print(table(results))


def write(results: dict, args) -> None:
    payload = {"command": "PYTHONPATH=src python benchmarks/suite_starts.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "machine": machine(), "seed": args.seed, "budget_s": args.budget_s,
               "band": BAND, "pass_margin": PASS_MARGIN,
               "ladder": [{"rung": r.name, "d_model": r.d_model, "n_layers": r.n_layers} for r in LADDER],
               "tasks": results}
    STARTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    STARTS_JSON.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
