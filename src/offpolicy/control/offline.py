"""The offline(-to-online) loop (``td3_bc``, ``ro2o``): gradient steps on a dataset, then optional fine-tuning.

    load + validate the dataset -> buffer -> updates -> log -> deterministic evaluation -> checkpoint
    [hp.online_steps > 0]  -> envs -> act (the pre-trained policy, stochastic) -> online buffer -> updates -> ...

``run.total_steps`` counts offline gradient steps; ``hp.online_steps`` environment steps follow them. Online,
the buffer holds the new transitions only (``hp.online_keep_dataset`` puts the dataset in first), updates start
after ``hp.learning_starts`` online transitions, ``hp.updates_per_step`` per env step, and ``run.eval_every`` /
``run.checkpoint_every`` count env steps. The agent's ``start_online()`` hook (if any) is called when the phase
begins. Logged ``global_step`` is total_steps + online env steps. ``summary.json`` holds ``offline_return`` (the
evaluation at the end of the offline phase) and ``eval_return`` (the last evaluation).

Checkpoints hold the nets, optimizers, RNG and counters, plus (online) the buffer and the envs; the dataset is
re-read on resume (its checksum is checked), so resume is exact in either phase.
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
from offpolicy.control.envs import Envs, evaluate, make_env
from offpolicy.control.loop import agent_state, load_agent_state
from offpolicy.control.report import MetricsLog, Progress, plot_returns, to_floats


def train_offline(cfg: ControlConfig) -> dict:
    from offpolicy.control import ALGOS

    run, hp = cfg.run, cfg.hyperparams()
    if not hp.dataset:
        raise ConfigError("hp.dataset: an offline algorithm needs a dataset (offpolicy control collect)")
    online_steps = getattr(hp, "online_steps", 0)
    if online_steps and getattr(hp, "online_keep_dataset", False) and cfg.env.num_envs != 1:
        raise ConfigError("hp.online_keep_dataset: needs env.num_envs == 1")
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    env = make_env(cfg.env)
    obs_dim, act_dim = int(env.observation_space.shape[0]), int(env.action_space.shape[0])
    data = read_dataset(hp.dataset, obs_dim, act_dim)
    digest = hashlib.sha256(Path(hp.dataset).read_bytes()).hexdigest()[:16]
    n = data["obs"].shape[0]
    buffer = _dataset_buffer(data, n, obs_dim, act_dim, cfg.env.reward_scale)
    agent = ALGOS[cfg.algo](obs_dim, act_dim, hp)
    agent.set_obs_stats(data["obs"])
    st = {"step": 0, "env_step": 0, "n_updates": 0, "offline_return": None, "last_eval": None, "last_ret": None}
    tensors, meta = None, None
    found = ckpt.latest(out / "checkpoints") if run.resume else None
    if found is not None:
        tensors, meta = ckpt.load(found)
        if meta["dataset_sha256"] != digest:
            raise ConfigError(f"hp.dataset: {hp.dataset} changed since the checkpoint was written")
        load_agent_state(agent, tensors, meta["agent"])
        torch.set_rng_state(tensors["rng/torch"])
        st.update({k: meta[k] for k in st if k in meta})
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    dump_control_config(cfg, out / "config.yaml")
    log, t0 = MetricsLog(out), time.perf_counter()
    extra = {"dataset_sha256": digest, "transitions": n}

    def save(phase: str, buf=None, envs=None) -> None:
        t, agent_meta = agent_state(agent)
        m = {**st, **extra, "phase": phase, "agent": agent_meta, "config": (out / "config.yaml").read_text()}
        if buf is not None:
            bt, m["buffer"] = buf.state_dict()
            et, m["envs"] = envs.state()
            t.update(bt)
            t.update(et)
        t["rng/torch"] = torch.get_rng_state()
        ckpt.save(out / "checkpoints", f"step_{st['step'] + st['env_step']}", t, m)

    def evaluate_now(global_step: int) -> float:
        rets = evaluate(lambda o: agent.act(o, deterministic=True), cfg.env, run.eval_episodes, run.seed)
        st["last_eval"] = sum(rets) / len(rets)
        log.log({"global_step": global_step, "eval/return_mean": st["last_eval"]})
        return st["last_eval"]

    # ----- offline phase: gradient steps on the dataset -----
    bar = Progress(run.total_steps, st["step"], run.progress, f"{cfg.algo} {hp.dataset}")
    while st["step"] < run.total_steps:
        metrics = agent.update(buffer.sample(hp.batch_size, hp.gamma, hp.n_step), st["step"])
        st["step"] += 1
        step = st["step"]
        if run.log_every > 0 and step % run.log_every == 0:
            log.log({"global_step": step, **to_floats(metrics)})
            bar.update(step)
        if (run.eval_every > 0 and step % run.eval_every == 0) or step == run.total_steps:
            evaluate_now(step)
            if step == run.total_steps:
                st["offline_return"] = st["last_eval"]
        if (run.checkpoint_every > 0 and step % run.checkpoint_every == 0) or step == run.total_steps:
            save("offline")
    bar.close()

    # ----- online phase: fine-tune the pre-trained agent with new transitions -----
    if online_steps > 0 and st["env_step"] < online_steps:
        if st["n_updates"] == 0:
            st["n_updates"] = st["step"]  # the update counter continues from the offline phase
        envs = Envs(cfg.env, run.seed)
        keep = getattr(hp, "online_keep_dataset", False)
        online = ReplayBuffer(hp.buffer_size + (n if keep else 0), obs_dim, act_dim, len(envs))
        obs = envs.reset()
        if keep:
            online.extend(buffer.obs[:n], buffer.act[:n], buffer.rew[:n], buffer.next_obs[:n], buffer.term[:n] > 0,
                          buffer.end[:n] & (buffer.term[:n] == 0))
        if meta is not None and meta.get("phase") == "online":
            online.load_state_dict(tensors, meta["buffer"])
            obs = envs.load_state(tensors, meta["envs"])
        agent.start_online()
        ne, base, s0 = len(envs), run.total_steps, st["env_step"]
        bar = Progress(online_steps, s0, run.progress, f"{cfg.algo} online {cfg.env.id}")
        metrics: dict = {}

        def crossed(every: int) -> bool:
            return every > 0 and st["env_step"] // every > (st["env_step"] - ne) // every

        while st["env_step"] < online_steps:
            with torch.no_grad():
                action = agent.act(torch.from_numpy(obs), deterministic=False)
            res = envs.step(action.numpy())
            online.add(obs, action, res.reward * cfg.env.reward_scale, res.next_obs, res.terminated, res.truncated)
            agent.observe(res.reward * cfg.env.reward_scale, res.terminated, res.truncated)
            obs, st["env_step"] = res.obs, st["env_step"] + ne
            gstep = base + st["env_step"]
            for ret, length in res.episodes:
                st["last_ret"] = ret
                log.log({"global_step": gstep, "charts/episodic_return": ret, "charts/episodic_length": length})
            if st["env_step"] >= hp.learning_starts and len(online) >= hp.batch_size:
                for _ in range(ne * hp.updates_per_step):
                    metrics = agent.update(online.sample(hp.batch_size, hp.gamma, hp.n_step), st["n_updates"])
                    st["n_updates"] += 1
            if crossed(run.log_every) and metrics:
                sps = (st["env_step"] - s0) / (time.perf_counter() - t0)
                log.log({"global_step": gstep, **to_floats(metrics), "charts/SPS": sps})
                bar.update(st["env_step"])
            if crossed(run.eval_every) or st["env_step"] >= online_steps:
                evaluate_now(gstep)
            if crossed(run.checkpoint_every) or st["env_step"] >= online_steps:
                save("online", online, envs)
        bar.close()
    log.close()
    plot_returns(out)
    summary = {"algo": cfg.algo, "env": cfg.env.id, "seed": run.seed, "steps": st["step"],
               "online_steps": st["env_step"], "dataset": hp.dataset, "transitions": n,
               "offline_return": st["offline_return"], "eval_return": st["last_eval"],
               "last_episodic_return": st["last_ret"], "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _dataset_buffer(data: dict, n: int, obs_dim: int, act_dim: int, reward_scale: float) -> ReplayBuffer:
    buffer = ReplayBuffer(n, obs_dim, act_dim)
    trunc = data["end"] & (data["term"] == 0)
    buffer.extend(data["obs"], data["act"], data["rew"] * reward_scale, data["next_obs"], data["term"] > 0, trunc)
    return buffer


class OfflineAgent:
    """Hooks every agent of this loop shares (``td3_bc``, ``ro2o``): the loop itself as ``train``, observations
    normalised by ``nets["obs_norm"]`` (fitted on the dataset when ``hp.normalize_obs``), no per-step hook."""

    @staticmethod
    def train(cfg: ControlConfig) -> dict:
        return train_offline(cfg)

    def set_obs_stats(self, obs: torch.Tensor) -> None:
        if self.hp.normalize_obs:
            self.nets["obs_norm"].fit(obs)

    def _norm(self, obs: torch.Tensor) -> torch.Tensor:
        return self.nets["obs_norm"](obs)

    def start_online(self) -> None:
        """Called once when the online phase begins."""

    def observe(self, reward, terminated, truncated) -> None:
        """Per-step hook of the online phase (unused)."""
