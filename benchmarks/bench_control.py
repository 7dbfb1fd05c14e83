"""offpolicy.control vs Stable-Baselines3: final return and wall-clock per 1k environment steps.

Short version (what fits a few minutes on the 2-core machine; writes benchmarks/results/control.json):

    PYTHONPATH=src python benchmarks/bench_control.py --short

DSAC-T's robustness to reward scale (ours only; rewards x 0.01 / 0.1 / 1 / 10 before the learner, returns
measured on the raw reward; writes benchmarks/results/control_reward_scale.json):

    PYTHONPATH=src python benchmarks/bench_control.py --short --reward-scales 0.01 0.1 1 10 --algos sac dsac_t --seeds 0

PPO vs SB3 PPO (speed; 3 iterations of 2048 steps, SB3's defaults on both sides, 2 x 64 tanh):

    PYTHONPATH=src python benchmarks/bench_control.py --algos ppo --steps 6144 --hidden 64 64 --seeds 0 1 2 \
        --out benchmarks/results/control_ppo.json

MuJoCo with returns-vs-steps curves (what ran on 2026-12-07; ~45 / ~18 min on the shared 2-core machine;
writes the JSON and a PNG of the curves beside it):

    PYTHONPATH=src python benchmarks/bench_control.py --env HalfCheetah-v5 --steps 15000 --learning-starts 5000 \
        --lr 3e-4 --hidden 256 256 --seeds 0 1 2 --eval-every 2500 --eval-episodes 5 --algos sac dsac_t \
        --out benchmarks/results/control_halfcheetah.json
    ... --env Hopper-v5 --steps 10000 --learning-starts 2500 ... --out benchmarks/results/control_hopper.json
    ... --env Hopper-v5 --steps 30000 --learning-starts 2500 --eval-every 5000 ... --out .../control_hopper_30k.json
    ... --algos flashsac --no-sb3 --flashsac-hidden 128 --append     # FlashSAC rows added to any of the above

PROPS's sampling error vs PPO and PPO-Buffer (``ppo_buffer`` = ``ppo_props`` with ``props_lr=0``):

    PYTHONPATH=src python benchmarks/bench_control.py --algos ppo ppo_props ppo_buffer --no-sb3 --steps 12288 \
        --hidden 64 64 --eval-every 2048 --sampling-error-every 1 --out benchmarks/results/control_props.json

``--eval-every N`` evaluates every N env steps (``--eval-episodes`` deterministic episodes, the same evaluation
seeds for both libraries: ours through the loop's ``run.eval_every``, SB3 through a callback calling the same
``evaluate``); the time spent there is subtracted from seconds per 1k steps on both sides. ``--append`` adds
algorithms or seeds to an existing result file (rows of the same algorithm and seed are replaced); the file is rewritten after every run, so a cut-off benchmark keeps
what finished.

Both libraries get the same environment, steps, network sizes (actor and critics), learning rate, batch,
buffer, warm-up, replay ratio (1 gradient step per env step), gamma, tau and seeds; one torch thread each;
the runs alternate (ours, SB3, ours, ...) so load from other jobs hits both alike. ``final_return`` is the
mean undiscounted return of 10 deterministic episodes after training, on the same evaluation seeds for
both; seconds per 1k env steps cover the whole run (warm-up included, evaluations excluded). ``dsac_t`` (ours only) runs with the
same sizes and learning rate as ``sac``; ``flashsac`` keeps its block architecture at the same width (1 block;
``--flashsac-hidden`` / ``--flashsac-blocks`` change it) and
batch. The budget is small: read the returns as "learned / did not learn yet", not as a ranking. Rows for SB3 are prefixed ``sb3_``. Nothing here is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from offpolicy.control.config import EnvConfig, load_control_config  # noqa: E402
from offpolicy.control.envs import evaluate  # noqa: E402
from offpolicy.control.loop import train  # noqa: E402


def off_policy_overrides(algo: str, a) -> list[str]:
    lr = [f"hp.actor_lr={a.lr}", f"hp.critic_lr={a.lr}"] + ([f"hp.alpha_lr={a.lr}"] if algo != "td3" else [])
    hidden = [f"hp.hidden={a.hidden}"]
    extra = {"dsac_t": ["hp.activation=relu", "hp.alpha_init=1.0"],
             "flashsac": [f"hp.actor_hidden={a.flashsac_hidden or a.hidden[0]}",
                          f"hp.critic_hidden={a.flashsac_hidden or a.hidden[0]}", f"hp.actor_blocks={a.flashsac_blocks}",
                          f"hp.critic_blocks={a.flashsac_blocks}"]}.get(algo, [])
    if algo == "flashsac":  # one lr for all three optimizers; its own block architecture at the same width
        lr, hidden = [f"hp.lr={a.lr}"], []
    return [*hidden, *lr, *extra, f"hp.learning_starts={a.learning_starts}", f"hp.buffer_size={a.steps}",
            "hp.batch_size=256"]


def run_ours(algo: str, a, seed: int, out: Path, reward_scale: float = 1.0) -> dict:
    variant = []
    if algo == "ppo_buffer":  # PROPS's "PPO-Buffer" control: PROPS's b-batch buffer, on-policy sampling (no adaptation)
        algo, variant = "ppo_props", ["hp.props_lr=0"]
    common = [f"algo={algo}", f"env.id={a.env}", f"env.reward_scale={reward_scale}", f"run.total_steps={a.steps}",
              f"run.seed={seed}", "run.progress=false", f"run.out_dir={out}", "run.log_every=100000",
              f"run.eval_every={a.eval_every}", f"run.eval_episodes={a.eval_episodes}"]
    if algo in ("ppo", "ppo_props"):  # SB3 PPO's defaults: constant lr, no value clipping, no obs / reward normalisation
        cfg = load_control_config(None, [*common, "hp.anneal_lr=false", "hp.clip_vloss=false", "hp.norm_obs=false",
                                         "hp.norm_reward=false", f"hp.hidden={a.hidden}",
                                         f"hp.sampling_error_every={a.sampling_error_every}", *variant])
    else:
        cfg = load_control_config(None, [*common, *off_policy_overrides(algo, a)])
    from offpolicy.control.cli import load_agent

    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0 - summary.get("eval_seconds", 0.0)  # evaluations are not training time
    agent, _ = load_agent(out / "checkpoints")
    rets = evaluate(lambda o: agent.act(o, deterministic=True), EnvConfig(id=a.env), 10, seed)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["global_step"], round(r["eval/return_mean"], 2)] for r in records if "eval/return_mean" in r]
    se = [[r["global_step"], round(r["props/sampling_error"], 5)] for r in records if "props/sampling_error" in r]
    return {"final_return": statistics.fmean(rets), "seconds": seconds, "curve": curve,
            **({"sampling_error": se} if se else {})}


def run_sb3(algo: str, a, seed: int) -> dict:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO, SAC, TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise

    env = gym.make(a.env)
    kw = dict(learning_rate=a.lr, buffer_size=a.steps, learning_starts=a.learning_starts, batch_size=256, tau=0.005,
              gamma=0.99, train_freq=1, gradient_steps=1, policy_kwargs={"net_arch": a.hidden}, seed=seed, verbose=0,
              device="cpu")
    if algo == "ppo":
        model = PPO("MlpPolicy", env, n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.99,
                    gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=seed,
                    policy_kwargs={"net_arch": a.hidden}, verbose=0, device="cpu")
    elif algo == "sac":
        model = SAC("MlpPolicy", env, **kw)
    else:
        d = env.action_space.shape[0]
        model = TD3("MlpPolicy", env, action_noise=NormalActionNoise(np.zeros(d), 0.1 * np.ones(d)), **kw)

    def policy(obs):  # SB3 predicts env-scale actions; our evaluator takes [-1, 1]
        return torch.as_tensor(model.policy.scale_action(model.predict(obs.numpy(), deterministic=True)[0]))

    curve, eval_seconds = [], [0.0]

    class EvalCallback(BaseCallback):
        """Every ``eval_every`` env steps: the same deterministic evaluation (function, episodes, seeds) as ours."""

        def _on_step(self) -> bool:
            if a.eval_every > 0 and self.num_timesteps % a.eval_every == 0:
                te = time.perf_counter()
                r = evaluate(policy, EnvConfig(id=a.env), a.eval_episodes, seed)
                eval_seconds[0] += time.perf_counter() - te
                curve.append([self.num_timesteps, round(statistics.fmean(r), 2)])
            return True

    t0 = time.perf_counter()
    model.learn(total_timesteps=a.steps, callback=EvalCallback())
    seconds = time.perf_counter() - t0 - eval_seconds[0]
    rets = evaluate(policy, EnvConfig(id=a.env), 10, seed)
    return {"final_return": statistics.fmean(rets), "seconds": seconds, "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--short", action="store_true", help="Pendulum-v1, 5000 steps, 64x64, seeds 0 1 2")
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--learning-starts", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=["sac", "td3", "dsac_t", "flashsac"])
    p.add_argument("--out", default=str(RESULTS / "control.json"))
    p.add_argument("--eval-every", type=int, default=0,
                   help="env steps between deterministic evaluations (returns-vs-steps curves; 0 = final only)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per curve point")
    p.add_argument("--plot", default=None, help="PNG of the curves (default: --out with .png; only with --eval-every)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other algorithms already in --out (add an algorithm to an earlier run)")
    p.add_argument("--flashsac-hidden", type=int, default=None, help="flashsac block width (default: --hidden[0])")
    p.add_argument("--flashsac-blocks", type=int, default=1, help="flashsac blocks of actor and critics")
    p.add_argument("--no-sb3", action="store_true", help="ours only (e.g. ppo vs ppo_props)")
    p.add_argument("--sampling-error-every", type=int, default=0,
                   help="ppo / ppo_props: log PROPS's sampling error every this many iterations (0 = off)")
    p.add_argument("--redraw", action="store_true", help="only redraw the PNG from an existing --out JSON")
    p.add_argument("--reward-scales", type=float, nargs="+", default=None,
                   help="sweep env.reward_scale for our algorithms instead of the SB3 comparison")
    a = p.parse_args()
    if a.short:
        a.env, a.steps, a.hidden = "Pendulum-v1", 5000, [64, 64]
    a.hidden = list(a.hidden)
    torch.set_num_threads(1)
    if a.redraw:
        res = json.loads(Path(a.out).read_text())
        plot_curves(res["rows"], a.plot or str(Path(a.out).with_suffix(".png")), res["settings"])
        return
    if a.reward_scales:
        reward_scale_sweep(a)
        return
    rows, work = [], Path("runs/bench_control")
    prior = []  # --append: rows of other (algorithm, seed) pairs already in --out (their settings stay as recorded)
    if a.append and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        rerun = {(n, s) for al in a.algos for n in (al, f"sb3_{al}") for s in a.seeds}
        prior = [r for r in old["rows"] if (r["algo"], r["seed"]) not in rerun]
        a.prior_settings = old.get("settings")
        a.prior_appended = old.get("settings_appended", [])
    for seed in a.seeds:
        for algo in a.algos:
            for lib in (["ours", "sb3"] if algo in ("sac", "td3", "ppo") and not a.no_sb3 else ["ours"]):
                r = (run_ours(algo, a, seed, work / f"{algo}_{a.env}_{seed}") if lib == "ours"
                     else run_sb3(algo, a, seed))
                row = {"env": a.env, "algo": algo if lib == "ours" else f"sb3_{algo}", "seed": seed, "steps": a.steps,
                       "final_return": round(r["final_return"], 2),
                       "seconds_per_1k_steps": round(1000 * r["seconds"] / a.steps, 3), "net": net_name(algo, a),
                       "learning_starts": a.learning_starts, "curve": r["curve"]}
                if "sampling_error" in r:  # PROPS's measure, every --sampling-error-every PPO iterations
                    row["sampling_error_mean"] = round(statistics.fmean(v for _, v in r["sampling_error"]), 5)
                    row["sampling_error"] = r["sampling_error"]
                print(json.dumps(row), flush=True)
                rows.append(row)
                result = write_result(a, prior + rows)  # after every run: a cut-off benchmark keeps what finished
    print("| algo | return (mean ± std over seeds) | s / 1k env steps |\n|---|---|---|")
    for name, s in result["summary"].items():
        print(f"| {name} | {s['return_mean']} ± {s['return_std']} | {s['seconds_per_1k_steps']} |")
    for algo in ("sac", "td3", "ppo"):
        if f"{algo}_speed_ratio_vs_sb3" in result:
            print(f"{algo}_speed_ratio_vs_sb3 = {result[f'{algo}_speed_ratio_vs_sb3']}")


def net_name(algo: str, a) -> str:
    if algo == "flashsac":
        return f"flashsac {a.flashsac_blocks} block(s) x {a.flashsac_hidden or a.hidden[0]} (4x inside), batch 256"
    return "x".join(map(str, a.hidden)) + (" tanh" if algo in ("ppo", "ppo_props", "ppo_buffer") else " relu")


def write_result(a, rows: list[dict]) -> dict:
    def per_1k(name):
        xs = [r["seconds_per_1k_steps"] for r in rows if r["algo"] == name]
        return statistics.fmean(xs) if xs else None

    settings = {"env": a.env, "steps": a.steps, "learning_starts": a.learning_starts, "lr": a.lr, "hidden": a.hidden,
                "batch_size": 256, "seeds": a.seeds, "updates_per_step": 1, "eval_episodes": 10,
                "eval_every": a.eval_every, "curve_eval_episodes": a.eval_episodes}
    result = {"benchmark": "control_vs_sb3", "short": a.short, "machine": machine(),
              "settings": getattr(a, "prior_settings", None) or settings, "rows": rows}
    if getattr(a, "prior_settings", None):  # one entry per --append run, oldest first
        earlier = a.prior_appended if isinstance(a.prior_appended, list) else [a.prior_appended]
        result["settings_appended"] = [*earlier, {**settings, "algos": a.algos}]
    for algo in ("sac", "td3", "ppo"):
        if per_1k(algo) and per_1k(f"sb3_{algo}"):
            result[f"{algo}_speed_ratio_vs_sb3"] = round(per_1k(f"sb3_{algo}") / per_1k(algo), 3)
    summary = {}
    for name in dict.fromkeys(r["algo"] for r in rows):
        fr = [r["final_return"] for r in rows if r["algo"] == name]
        summary[name] = {"return_mean": round(statistics.fmean(fr), 1), "return_std": round(statistics.pstdev(fr), 1),
                         "seeds": len(fr), "seconds_per_1k_steps": round(per_1k(name), 3)}
        se = [r["sampling_error_mean"] for r in rows if r["algo"] == name and "sampling_error_mean" in r]
        if se:
            summary[name]["sampling_error_mean"] = round(statistics.fmean(se), 5)
            summary[name]["sampling_error_std"] = round(statistics.pstdev(se), 5)
    result["summary"] = summary
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    if a.eval_every:
        plot_curves(rows, a.plot or str(Path(a.out).with_suffix(".png")), result["settings"])
    return result


def plot_curves(rows: list[dict], path: str, settings: dict) -> None:
    """Evaluation return vs environment steps: mean over seeds per algorithm, band = min..max over seeds
    (and a second panel with PROPS's sampling error where the rows have it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", f"eval return ({settings.get('curve_eval_episodes', 5)} episodes)")]
    if any(r.get("sampling_error") for r in rows):
        panels.append(("sampling_error", "sampling error KL(pi_D || pi)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for name in dict.fromkeys(r["algo"] for r in rows):
            curves = [dict(map(tuple, r[key])) for r in rows if r["algo"] == name and r.get(key)]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            vals = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [statistics.fmean(v) for v in vals], marker="o", markersize=3, linewidth=1.2,
                    label=f"{name} ({len(curves)} seeds)", linestyle="--" if name.startswith("sb3_") else "-")
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{rows[0]['env']}: mean over seeds, band = min..max", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def reward_scale_sweep(a) -> None:
    rows = []
    out = Path(a.out).with_name("control_reward_scale.json") if a.out == str(RESULTS / "control.json") else Path(a.out)
    for seed in a.seeds:
        for scale in a.reward_scales:
            for algo in a.algos:
                r = run_ours(algo, a, seed, Path("runs/bench_control") / f"{algo}_scale{scale}_{seed}", scale)
                row = {"env": a.env, "algo": algo, "seed": seed, "steps": a.steps, "reward_scale": scale,
                       "final_return": round(r["final_return"], 2), **({"curve": r["curve"]} if r["curve"] else {})}
                print(json.dumps(row), flush=True)
                rows.append(row)
                out.write_text(json.dumps({"benchmark": "control_reward_scale", "short": a.short, "machine": machine(),
                                           "settings": {"env": a.env, "steps": a.steps, "lr": a.lr, "hidden": a.hidden,
                                                        "learning_starts": a.learning_starts, "seeds": a.seeds},
                                           "rows": rows}, indent=1))  # after every run: partial sweeps survive
    print("| reward scale | " + " | ".join(a.algos) + " |\n|---|" + "---|" * len(a.algos))
    for scale in a.reward_scales:
        cells = [statistics.fmean(r["final_return"] for r in rows if r["algo"] == al and r["reward_scale"] == scale)
                 for al in a.algos]
        print(f"| {scale} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
