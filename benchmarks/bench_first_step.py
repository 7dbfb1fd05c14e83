"""What one rollout step can teach: held-out accuracy after psr_reuse's first (and second) rollout step.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_first_step.py               # 17 variants x 6 seeds, ~6 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_first_step.py --seeds 2 --variants shipped,tempo_td_only

The TRL comparison (bench_trl.py) counts rollouts to a target accuracy in whole rollout steps of
128 prompts x 8 responses = 1,024 rollouts, the batch the issue holds equal for every system. At the
pre-declared target (start of RL + 0.20, ~0.505 pooled), psr_reuse needs one step on some seeds and
two on others, so its rollouts ratio to TRL is set by where the first step lands. This script
measures that landing point: it starts every variant from the shipped SFT checkpoint
(``tests/fixtures/tiny_addition_sft``), runs 2 rollout steps with bench_trl's settings (128 x 8,
6 new tokens, temperature 1, held-out greedy accuracy on 300 problems after every step, fixed per
seed) and changes one thing per variant:

- updates and minibatch (``UxG``: U updates of G groups per rollout step; shipped 32x8),
- the advantage (``dr_grpo``, ``tempo`` with and without its outcome term),
- the loss (TOPR with its negatives, RAFT-like reinforce keeping all-correct groups),
- the learning rate (diagnostic only: the comparison holds lr = 1e-4 for every system).

Writes ``benchmarks/results/first_step.json``: per variant the mean held-out accuracy at the start
and after steps 1 and 2, the per-seed values, and how many seeds' first step reached the pooled
+0.20 target of ``trl_comparison_pooled_untouched.json`` (read from that file, not recomputed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trl import LR, MAX_NEW_TOKENS, SFT, TEMPERATURE  # noqa: E402  (the comparison's settings)
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from offpolicy.compare import rl_curve  # noqa: E402
from offpolicy.config import load_config  # noqa: E402
from offpolicy.train.runner import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "psr_reuse.yaml"
# bench_trl's shared settings (one rollout step = 128 prompts x 8 responses), evaluation after every step
COMMON = [f"policy.init={SFT}", "sft.steps=0", "rl.prompts_per_step=128", "rl.group_size=8",
          f"sampling.max_new_tokens={MAX_NEW_TOKENS}", f"sampling.temperature={TEMPERATURE}", f"rl.optim.lr={LR}",
          "eval.every=1",
          "eval.n_problems=300", "eval.samples=0", "run.checkpoint_every=0", "run.progress=false", "run.threads=2"]
TOPR_NEGATIVES = "rl.loss_params.neg_high=1"  # TOPR's canonical [0, 1] weight for negatives (topr_reuse's loss)
VARIANTS: dict[str, list[str]] = {
    "shipped": [],  # psr_reuse.yaml: 32 x 8, topr positives only, grpo advantages
    "8x8": ["rl.updates_per_step=8"],
    "16x8": ["rl.updates_per_step=16"],
    "64x8": ["rl.updates_per_step=64"],
    "96x8": ["rl.updates_per_step=96"],
    "48x16": ["rl.updates_per_step=48", "rl.groups_per_update=16"],
    "64x16": ["rl.updates_per_step=64", "rl.groups_per_update=16"],
    "dr_grpo": ["rl.advantage=dr_grpo"],
    "tempo": ["rl.advantage=tempo"],
    "tempo_td_only": ["rl.advantage=tempo", "rl.advantage_params.outcome_coef=0"],
    "topr_negatives": [TOPR_NEGATIVES],
    "tempo_negatives": ["rl.advantage=tempo", TOPR_NEGATIVES],
    "tempo_td_only_negatives": ["rl.advantage=tempo", "rl.advantage_params.outcome_coef=0", TOPR_NEGATIVES],
    "raft_keep_all_correct": ["rl.advantage=reinforce", "rl.drop_uninformative_groups=false"],
    "lr_3e-5": ["rl.optim.lr=0.00003"],
    "lr_3e-4": ["rl.optim.lr=0.0003"],
    "lr_1e-3": ["rl.optim.lr=0.001"],
}


def run_variant(name: str, seed: int, steps: int, out_root: Path) -> dict:
    """One fresh run of ``steps`` rollout steps; its held-out accuracies and RL seconds per step."""
    out = out_root / name / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    overrides = COMMON + [f"rl.steps={steps}", f"run.seed={seed}", f"run.out_dir={out}", f"run.name={name}"]
    train(load_config(RECIPE, overrides + VARIANTS[name]))
    curve = rl_curve(out)
    return {"acc": [round(a, 4) for a in curve["acc"]], "rl_seconds": [round(s, 3) for s in curve["seconds"]]}


def pooled_target() -> float | None:
    path = RESULTS / "trl_comparison_pooled_untouched.json"
    return json.loads(path.read_text())["target_accuracy"] if path.exists() else None


def summarise(runs: dict[int, dict], target: float | None) -> dict:
    at = [[r["acc"][k] for r in runs.values()] for k in range(len(next(iter(runs.values()))["acc"]))]
    out = {f"mean_acc_step{k}": round(statistics.mean(v), 4) for k, v in enumerate(at)}
    out["step1_per_seed"] = {s: r["acc"][1] for s, r in runs.items()}
    out["step1_sd_over_seeds"] = round(statistics.stdev(at[1]), 4) if len(at[1]) > 1 else None
    if target is not None:
        out["step1_reached_target"] = sum(a >= target for a in at[1])
    out["seeds"] = len(runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_first_step"))
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; valid: {list(VARIANTS)}")
    target, start = pooled_target(), time.perf_counter()
    results = {}
    for name in names:
        runs = {seed: run_variant(name, seed, args.steps, Path(args.out)) for seed in range(args.seeds)}
        results[name] = {"overrides": VARIANTS[name], **summarise(runs, target), "runs": runs}
        print(f"{name}: {results[name]['mean_acc_step1']} after step 1", flush=True)
    rows = [[name, r["mean_acc_step0"], r["mean_acc_step1"], r.get("mean_acc_step2", ""), r["step1_sd_over_seeds"],
             f"{r.get('step1_reached_target', '')}/{r['seeds']}"] for name, r in results.items()]
    table = markdown_table(["variant", "start", "after step 1", "after step 2", "sd step 1",
                            "step 1 >= target"], rows)
    path = write_json("first_step", {
        "benchmark": "first_step", "command": "benchmarks/bench_first_step.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "recipe": "recipes/psr_reuse.yaml", "common_overrides": COMMON,
        "seeds": args.seeds, "steps": args.steps, "rollouts_per_step": 1024,
        "target_accuracy": target, "target_source": "trl_comparison_pooled_untouched.json (start of RL + 0.20)",
        "variants": results, "table": table, "total_seconds": round(time.perf_counter() - start, 1)})
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
