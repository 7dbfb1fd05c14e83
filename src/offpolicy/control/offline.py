"""The offline loop (``td3_bc``): fill a replay buffer from a dataset, then gradient steps only.

    load + validate the dataset -> buffer -> updates -> log -> deterministic evaluation -> checkpoint

``run.total_steps`` counts gradient steps; ``charts/episodic_return`` is not logged (there is no
interaction), ``eval/return_mean`` is. Checkpoints hold the nets, optimizers, RNG and step count; the dataset
is re-read on resume (its size and a checksum are checked), so resume is exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.buffer import ReplayBuffer
from offpolicy.control.config import ConfigError, ControlConfig, dump_control_config
from offpolicy.control.dataset import read_dataset
from offpolicy.control.envs import evaluate, make_env
from offpolicy.control.loop import agent_state, load_agent_state
from offpolicy.control.report import MetricsLog, Progress, plot_returns, to_floats


def train_offline(cfg: ControlConfig) -> dict:
    from offpolicy.control import ALGOS

    run, hp = cfg.run, cfg.hyperparams()
    if not hp.dataset:
        raise ConfigError("hp.dataset: an offline algorithm needs a dataset (offpolicy control collect)")
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    env = make_env(cfg.env)
    obs_dim, act_dim = int(env.observation_space.shape[0]), int(env.action_space.shape[0])
    data = read_dataset(hp.dataset, obs_dim, act_dim)
    digest = hashlib.sha256(Path(hp.dataset).read_bytes()).hexdigest()[:16]
    n = data["obs"].shape[0]
    buffer = ReplayBuffer(n, obs_dim, act_dim)
    trunc = data["end"] & (data["term"] == 0)
    buffer.extend(data["obs"], data["act"], data["rew"] * cfg.env.reward_scale, data["next_obs"], data["term"] > 0,
                  trunc)
    agent = ALGOS[cfg.algo](obs_dim, act_dim, hp)
    agent.set_obs_stats(data["obs"])
    step = 0
    found = ckpt.latest(out / "checkpoints") if run.resume else None
    if found is not None:
        tensors, meta = ckpt.load(found)
        if meta["dataset_sha256"] != digest:
            raise ConfigError(f"hp.dataset: {hp.dataset} changed since the checkpoint was written")
        load_agent_state(agent, tensors, meta["agent"])
        torch.set_rng_state(tensors["rng/torch"])
        step = meta["step"]
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    dump_control_config(cfg, out / "config.yaml")
    log, bar = MetricsLog(out), Progress(run.total_steps, step, run.progress, f"{cfg.algo} {hp.dataset}")
    t0, last_eval = time.perf_counter(), None
    while step < run.total_steps:
        metrics = agent.update(buffer.sample(hp.batch_size, hp.gamma, hp.n_step), step)
        step += 1
        if run.log_every > 0 and step % run.log_every == 0:
            log.log({"global_step": step, **to_floats(metrics)})
            bar.update(step)
        if (run.eval_every > 0 and step % run.eval_every == 0) or step == run.total_steps:
            rets = evaluate(lambda o: agent.act(o, deterministic=True), cfg.env, run.eval_episodes, run.seed)
            last_eval = sum(rets) / len(rets)
            log.log({"global_step": step, "eval/return_mean": last_eval})
        if (run.checkpoint_every > 0 and step % run.checkpoint_every == 0) or step == run.total_steps:
            tensors, agent_meta = agent_state(agent)
            tensors["rng/torch"] = torch.get_rng_state()
            ckpt.save(out / "checkpoints", f"step_{step}", tensors,
                      {"step": step, "agent": agent_meta, "dataset_sha256": digest, "transitions": n,
                       "config": (out / "config.yaml").read_text()})
    bar.close()
    log.close()
    plot_returns(out)
    summary = {"algo": cfg.algo, "env": cfg.env.id, "seed": run.seed, "steps": step, "dataset": hp.dataset,
               "transitions": n, "eval_return": last_eval, "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
