"""Offline-to-online on Pendulum-v1: RO2O vs the TD3+BC baseline vs SAC from scratch.

    PYTHONPATH=src python benchmarks/bench_o2o.py     # ~25 min on one busy core; writes results/control_o2o.json

1. Behaviour policy: ``sac`` trained for ``--behaviour-steps`` env steps (a partly trained, "medium" policy);
   its deterministic return is recorded.
2. Dataset: ``offpolicy control collect`` (the CLI) with ``random:E`` + ``<sac checkpoint>:E`` (stochastic)
   episodes: a mixed random / medium dataset.
3. For each seed: ``ro2o`` (K offline updates, then N online env steps), ``td3_bc`` (the same K offline
   updates, then N online env steps with the same losses), and ``sac`` from scratch for N env steps.
   ``offline_return`` = deterministic return right after the K offline updates; ``final_return`` = after the
   N online steps (10 episodes each, the same evaluation seeds for every algorithm).

Same for every algorithm: 2 x 64 ReLU, Adam lr 1e-3 (actor, critics, temperature), batch 128, gamma 0.99, one
update per env step online, the first update after ``--learning-starts`` online transitions (SAC acts uniformly
at random before it; the pre-trained agents act with their own stochastic policy). RO2O keeps the authors'
N = 10 critics, eps = 0.01, eta_1/2/3 = 1e-4 / 0.1 / 1.0 and alpha_ood 1.0 -> 0.1 (0.1 online), but uses
n = 5 perturbed states per state instead of 20 (CPU cost: an update at n = 20 costs ~30 SAC updates here).

Variant with the dataset kept in RO2O's online buffer (the behaviour policy and dataset are re-made with the
same seeds; writes results/control_o2o_keep.json):

    PYTHONPATH=src python benchmarks/bench_o2o.py --algos ro2o --ro2o-set online_keep_dataset=true \
        --work runs/bench_o2o_keep --out control_o2o_keep
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

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--behaviour-steps", type=int, default=4000)
    p.add_argument("--episodes", type=int, default=10, help="episodes per source (random, behaviour policy)")
    p.add_argument("--offline-updates", type=int, default=3000)
    p.add_argument("--online-steps", type=int, default=3000)
    p.add_argument("--learning-starts", type=int, default=1000)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sample-size", type=int, default=5, help="RO2O's n (authors: 20)")
    p.add_argument("--algos", nargs="+", default=["ro2o", "td3_bc", "sac"])
    p.add_argument("--ro2o-set", nargs="*", default=[], help="extra ro2o hp overrides: online_keep_dataset=true")
    p.add_argument("--work", default="runs/bench_o2o")
    p.add_argument("--out", default="control_o2o")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from offpolicy.control.cli import evaluate_checkpoint
    from offpolicy.control.config import load_control_config
    from offpolicy.control.loop import train

    work = Path(args.work)
    hidden = "[" + ",".join(map(str, args.hidden)) + "]"
    common = ["run.progress=false", "run.threads=1", f"env.id={args.env}", f"hp.hidden={hidden}",
              f"hp.batch_size={args.batch}", "run.eval_episodes=10", "run.log_every=500", "run.eval_every=0"]
    lrs = [f"hp.actor_lr={args.lr}", f"hp.critic_lr={args.lr}"]
    t_start = time.perf_counter()

    # 1. behaviour policy
    beh = work / "behaviour"
    train(load_control_config(None, [*common, *lrs, f"hp.alpha_lr={args.lr}", "algo=sac", "run.seed=100",
                                     f"run.total_steps={args.behaviour_steps}", "hp.learning_starts=1000",
                                     f"run.out_dir={beh}"]))
    beh_return = evaluate_checkpoint(beh / "checkpoints", 10)["return_mean"]
    print(f"behaviour policy ({args.behaviour_steps} SAC steps): return {beh_return:.1f}", flush=True)

    # 2. dataset, through the CLI
    data = work / "pendulum_mixed.jsonl"
    subprocess.run([sys.executable, "-c", "from offpolicy.control.cli import app; app()", "collect", str(data),
                    "--env", args.env, "--source", f"random:{args.episodes}",
                    "--source", f"{beh / 'checkpoints'}:{args.episodes}"], check=True, cwd=ROOT)
    rows_data = [json.loads(line) for line in data.read_text().splitlines()]
    by_src: dict[str, float] = {}
    for r in rows_data:
        by_src[r["source"]] = by_src.get(r["source"], 0.0) + r["reward"]
    data_returns = {k: v / args.episodes for k, v in by_src.items()}
    print(f"dataset: {len(rows_data)} transitions, mean episode return per source {data_returns}", flush=True)

    # 3. runs
    rows = []
    for seed in args.seeds:
        for algo in args.algos:
            out = work / f"{algo}_s{seed}"
            o = [*common, f"algo={algo}", f"run.seed={seed}", f"run.out_dir={out}", *lrs]
            if algo == "sac":
                o += [f"hp.alpha_lr={args.lr}", f"run.total_steps={args.online_steps}",
                      f"hp.learning_starts={args.learning_starts}"]
            else:
                o += [f"hp.dataset={data}", f"run.total_steps={args.offline_updates}",
                      f"hp.online_steps={args.online_steps}", f"hp.learning_starts={args.learning_starts}"]
                if algo == "ro2o":
                    o += [f"hp.alpha_lr={args.lr}", f"hp.sample_size={args.sample_size}",
                          *(f"hp.{kv}" for kv in args.ro2o_set)]
            t0 = time.perf_counter()
            s = train(load_control_config(None, o))
            secs = time.perf_counter() - t0
            if algo == "sac":
                final, offline = evaluate_checkpoint(out / "checkpoints", 10, seed)["return_mean"], None
            else:
                final, offline = s["eval_return"], s["offline_return"]
            row = {"env": args.env, "algo": algo, "seed": seed, "steps": args.online_steps,
                   "offline_updates": 0 if algo == "sac" else args.offline_updates,
                   "offline_return": offline, "final_return": final, "seconds": round(secs, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    table = []
    for algo in args.algos:
        rs = [r for r in rows if r["algo"] == algo]
        fin = [r["final_return"] for r in rs]
        off = [r["offline_return"] for r in rs if r["offline_return"] is not None]
        ms = lambda xs: f"{statistics.fmean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if xs else "—"  # noqa: E731
        table.append([f"`{algo}`", ms(off), ms(fin), ", ".join(f"{x:.0f}" for x in off) or "—",
                      ", ".join(f"{x:.0f}" for x in fin), f"{statistics.fmean(r['seconds'] for r in rs):.0f}"])
    md = markdown_table(["algo", f"after {args.offline_updates} offline updates",
                         f"after {args.online_steps} online steps", "offline per seed", "online per seed", "s / run"],
                        table)
    print(md)
    payload = {"machine": machine(), "args": vars(args), "behaviour_return": beh_return,
               "dataset": {"transitions": len(rows_data), "episode_return_by_source": data_returns},
               "rows": rows, "table_markdown": md, "seconds_total": round(time.perf_counter() - t_start, 1)}
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
