"""offpolicy.control vs Stable-Baselines3: final return and wall-clock per 1k environment steps.

Short version (what fits a few minutes on the 2-core machine; writes benchmarks/results/control.json):

    PYTHONPATH=src python benchmarks/bench_control.py --short

DSAC-T's robustness to reward scale (ours only; rewards x 0.01 / 0.1 / 1 / 10 before the learner, returns
measured on the raw reward; writes benchmarks/results/control_reward_scale.json):

    PYTHONPATH=src python benchmarks/bench_control.py --short --reward-scales 0.01 0.1 1 10 --algos sac dsac_t --seeds 0

PPO vs SB3 PPO (speed; 3 iterations of 2048 steps, SB3's defaults on both sides, 2 x 64 tanh):

    PYTHONPATH=src python benchmarks/bench_control.py --algos ppo --steps 6144 --hidden 64 64 --seeds 0 1 2 \
        --out benchmarks/results/control_ppo.json

Longer:  ... --env Pendulum-v1 --steps 20000 --seeds 0 1 2 --hidden 256 256
         ... --env HalfCheetah-v5 --steps 100000 --learning-starts 5000 --lr 3e-4 --hidden 256 256  (needs mujoco)

Both libraries get the same environment, steps, network sizes (actor and critics), learning rate, batch,
buffer, warm-up, replay ratio (1 gradient step per env step), gamma, tau and seeds; one torch thread each;
the runs alternate (ours, SB3, ours, ...) so load from other jobs hits both alike. ``final_return`` is the
mean undiscounted return of 10 deterministic episodes after training, on the same evaluation seeds for
both; seconds per 1k env steps cover the whole run (warm-up included). ``dsac_t`` (ours only) runs with the
same sizes and learning rate as ``sac``; ``flashsac`` keeps its block architecture at the same width (1 block) and
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
             "flashsac": [f"hp.actor_hidden={a.hidden[0]}", f"hp.critic_hidden={a.hidden[0]}", "hp.actor_blocks=1",
                          "hp.critic_blocks=1"]}.get(algo, [])
    if algo == "flashsac":  # one lr for all three optimizers; its own block architecture at the same width
        lr, hidden = [f"hp.lr={a.lr}"], []
    return [*hidden, *lr, *extra, f"hp.learning_starts={a.learning_starts}", f"hp.buffer_size={a.steps}",
            "hp.batch_size=256"]


def run_ours(algo: str, a, seed: int, out: Path, reward_scale: float = 1.0) -> dict:
    common = [f"algo={algo}", f"env.id={a.env}", f"env.reward_scale={reward_scale}", f"run.total_steps={a.steps}",
              f"run.seed={seed}", "run.progress=false", f"run.out_dir={out}", "run.log_every=100000"]
    if algo == "ppo":  # SB3 PPO's defaults: constant lr, no value clipping, no obs / reward normalisation
        cfg = load_control_config(None, [*common, "hp.anneal_lr=false", "hp.clip_vloss=false", "hp.norm_obs=false",
                                         "hp.norm_reward=false", f"hp.hidden={a.hidden}"])
    else:
        cfg = load_control_config(None, [*common, *off_policy_overrides(algo, a)])
    from offpolicy.control.cli import load_agent

    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    agent, _ = load_agent(out / "checkpoints")
    rets = evaluate(lambda o: agent.act(o, deterministic=True), EnvConfig(id=a.env), 10, seed)
    return {"final_return": statistics.fmean(rets), "seconds": seconds}


def run_sb3(algo: str, a, seed: int) -> dict:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO, SAC, TD3
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
    t0 = time.perf_counter()
    model.learn(total_timesteps=a.steps)
    seconds = time.perf_counter() - t0

    def policy(obs):  # SB3 predicts env-scale actions; our evaluator takes [-1, 1]
        return torch.as_tensor(model.policy.scale_action(model.predict(obs.numpy(), deterministic=True)[0]))

    rets = evaluate(policy, EnvConfig(id=a.env), 10, seed)
    return {"final_return": statistics.fmean(rets), "seconds": seconds}


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
    p.add_argument("--reward-scales", type=float, nargs="+", default=None,
                   help="sweep env.reward_scale for our algorithms instead of the SB3 comparison")
    a = p.parse_args()
    if a.short:
        a.env, a.steps, a.hidden = "Pendulum-v1", 5000, [64, 64]
    a.hidden = list(a.hidden)
    torch.set_num_threads(1)
    if a.reward_scales:
        reward_scale_sweep(a)
        return
    rows, work = [], Path("runs/bench_control")
    for seed in a.seeds:
        for algo in a.algos:
            for lib in (["ours", "sb3"] if algo in ("sac", "td3", "ppo") else ["ours"]):
                r = (run_ours(algo, a, seed, work / f"{algo}_{a.env}_{seed}") if lib == "ours"
                     else run_sb3(algo, a, seed))
                row = {"env": a.env, "algo": algo if lib == "ours" else f"sb3_{algo}", "seed": seed, "steps": a.steps,
                       "final_return": round(r["final_return"], 2),
                       "seconds_per_1k_steps": round(1000 * r["seconds"] / a.steps, 3)}
                print(json.dumps(row), flush=True)
                rows.append(row)

    def per_1k(name):
        xs = [r["seconds_per_1k_steps"] for r in rows if r["algo"] == name]
        return statistics.fmean(xs) if xs else None

    result = {"benchmark": "control_vs_sb3", "short": a.short, "machine": machine(),
              "settings": {"env": a.env, "steps": a.steps, "learning_starts": a.learning_starts, "lr": a.lr,
                           "hidden": a.hidden, "batch_size": 256, "seeds": a.seeds, "updates_per_step": 1,
                           "eval_episodes": 10}, "rows": rows}
    for algo in ("sac", "td3", "ppo"):
        if per_1k(algo) and per_1k(f"sb3_{algo}"):
            result[f"{algo}_speed_ratio_vs_sb3"] = round(per_1k(f"sb3_{algo}") / per_1k(algo), 3)
    summary = {}
    for name in dict.fromkeys(r["algo"] for r in rows):
        fr = [r["final_return"] for r in rows if r["algo"] == name]
        summary[name] = {"return_mean": round(statistics.fmean(fr), 1),
                         "return_std": round(statistics.pstdev(fr), 1), "seconds_per_1k_steps": round(per_1k(name), 3)}
    result["summary"] = summary
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print("| algo | return (mean ± std over seeds) | s / 1k env steps |\n|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['return_mean']} ± {s['return_std']} | {s['seconds_per_1k_steps']} |")
    for algo in ("sac", "td3", "ppo"):
        if f"{algo}_speed_ratio_vs_sb3" in result:
            print(f"{algo}_speed_ratio_vs_sb3 = {result[f'{algo}_speed_ratio_vs_sb3']}")


def reward_scale_sweep(a) -> None:
    rows = []
    for seed in a.seeds:
        for scale in a.reward_scales:
            for algo in a.algos:
                r = run_ours(algo, a, seed, Path("runs/bench_control") / f"{algo}_scale{scale}_{seed}", scale)
                row = {"env": a.env, "algo": algo, "seed": seed, "steps": a.steps, "reward_scale": scale,
                       "final_return": round(r["final_return"], 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(a.out).with_name("control_reward_scale.json") if a.out == str(RESULTS / "control.json") else Path(a.out)
    out.write_text(json.dumps({"benchmark": "control_reward_scale", "short": a.short, "machine": machine(),
                               "settings": {"env": a.env, "steps": a.steps, "lr": a.lr, "hidden": a.hidden,
                                            "learning_starts": a.learning_starts, "seeds": a.seeds},
                               "rows": rows}, indent=1))
    print("| reward scale | " + " | ".join(a.algos) + " |\n|---|" + "---|" * len(a.algos))
    for scale in a.reward_scales:
        cells = [statistics.fmean(r["final_return"] for r in rows if r["algo"] == al and r["reward_scale"] == scale)
                 for al in a.algos]
        print(f"| {scale} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
