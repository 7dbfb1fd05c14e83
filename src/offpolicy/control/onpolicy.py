"""The on-policy loop of ``ppo`` and ``ppo_props``:

    collect num_steps per env (behaviour policy; PROPS adapts it every props_num_steps)
    -> GAE over the data buffer -> PPO epochs -> (PROPS: reset + adapt the behaviour) -> log -> checkpoint

For ``ppo`` the buffer holds one batch and the behaviour policy is the target policy itself. Checkpoints
are written at iteration boundaries and hold everything (nets with the normalisers, both optimizers, the
data buffer, the envs, the torch RNG and PROPS's generator): resume is exact on CPU.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.config import ControlConfig, dump_control_config
from offpolicy.control.envs import Envs, evaluate
from offpolicy.control.loop import agent_state, load_agent_state
from offpolicy.control.ppo import PPOAgent, PPOConfig, gae, ppo_update, sampling_error
from offpolicy.control.ppo_props import PROPSConfig, props_update
from offpolicy.control.report import MetricsLog, Progress, plot_returns, to_floats

FIELDS = ("obs", "act", "rew", "term", "end", "next_obs")


def build_on_policy_agent(obs_dim: int, act_dim: int, hp) -> PPOAgent:
    agent = PPOAgent(obs_dim, act_dim, hp)
    if isinstance(hp, PROPSConfig):
        if hp.num_steps % hp.props_num_steps:
            raise ValueError(f"hp.props_num_steps ({hp.props_num_steps}) must divide hp.num_steps ({hp.num_steps})")
        agent.nets["behaviour"] = copy.deepcopy(agent.nets["actor"])
        agent.opts["props"] = torch.optim.Adam(agent.nets["behaviour"].parameters(), lr=hp.props_lr, eps=1e-5)
    return agent


def train_on_policy(cfg: ControlConfig) -> dict:
    run, hp = cfg.run, cfg.hyperparams()
    props = hp if isinstance(hp, PROPSConfig) else None
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    envs = Envs(cfg.env, run.seed)
    n_env = len(envs)
    agent = build_on_policy_agent(envs.obs_dim, envs.act_dim, hp)
    actor, critic = agent.nets["actor"], agent.nets["critic"]
    gen = torch.Generator().manual_seed(run.seed + 1)  # PROPS's own shuffles: PPO's RNG stream is untouched
    cap = hp.num_steps * (props.buffer_batches if props else 1)
    shapes = {"obs": (envs.obs_dim,), "act": (envs.act_dim,), "next_obs": (envs.obs_dim,)}
    store = {f: torch.zeros(cap, n_env, *shapes.get(f, ())) for f in FIELDS}
    ret_acc = torch.zeros(n_env, dtype=torch.float64)  # discounted return for reward normalisation
    iters = max(1, run.total_steps // (hp.num_steps * n_env))
    raw_obs, step, it, pos, filled = envs.reset(), 0, 0, 0, 0
    found = ckpt.latest(out / "checkpoints") if run.resume else None
    if found is not None:
        tensors, meta = ckpt.load(found)
        load_agent_state(agent, tensors, meta["agent"])
        for f in FIELDS:
            store[f].copy_(tensors[f"store/{f}"])
        ret_acc.copy_(tensors["ret_acc"])
        raw_obs = envs.load_state(tensors, meta["envs"])
        torch.set_rng_state(tensors["rng/torch"])
        gen.set_state(tensors["rng/props"])
        step, it, pos, filled = meta["step"], meta["iteration"], meta["pos"], meta["filled"]
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    dump_control_config(cfg, out / "config.yaml")
    log, bar = MetricsLog(out), Progress(iters * hp.num_steps * n_env, step, run.progress, f"{cfg.algo} {cfg.env.id}")
    t0, s0, last_ret = time.perf_counter(), step, None
    eval_seconds = 0.0  # time in evaluations and sampling-error measurements (callers leave it out of speed numbers)

    def ordered() -> torch.Tensor:  # buffer rows, oldest first
        return (torch.arange(cap) + pos) % cap if filled == cap else torch.arange(filled)

    def behaviour_step(t: int) -> dict:
        """PROPS: pi_phi <- pi_theta, then adapt it on the rows the next PPO update will train on that exist
        now: the newest (b - 1) batches plus the t rows of the current batch (the oldest batch is on its way out)."""
        agent.nets["behaviour"].load_state_dict(actor.state_dict())
        keep = min(filled, (props.buffer_batches - 1) * hp.num_steps + t)
        if keep == 0 or props.props_lr == 0:  # props_lr 0: no adaptation, so skip the no-op Adam epochs
            return {}
        rows = ordered()[-keep:]
        obs, act = store["obs"][rows].flatten(0, 1), store["act"][rows].flatten(0, 1)
        with torch.no_grad():
            logp_t = actor.log_prob(obs, act)
        return props_update(agent.nets["behaviour"], agent.opts["props"], obs, act, logp_t, props, gen)

    while it < iters:
        if hp.anneal_lr:
            agent.opts["ppo"].param_groups[0]["lr"] = hp.lr * (1.0 - it / iters)
        policy = agent.nets["behaviour"] if props else actor
        props_stats: dict = {}
        for t in range(hp.num_steps):
            obs_n = agent.normalize_obs(raw_obs, update=True)
            with torch.no_grad():
                action = policy.dist(obs_n).sample()  # (N, A), unclipped (the env clips)
            res = envs.step(action.numpy())
            rew = torch.as_tensor(res.reward, dtype=torch.float64)
            done = torch.as_tensor(res.terminated | res.truncated)
            if hp.norm_reward:
                ret_acc = ret_acc * hp.gamma + rew
                agent.nets["ret_rms"].update(ret_acc)
                rew = (rew / torch.sqrt(agent.nets["ret_rms"].var + 1e-8)).clamp(-10, 10)
                ret_acc = torch.where(done, torch.zeros_like(ret_acc), ret_acc)
            row = {"obs": obs_n, "act": action, "rew": rew.float() * cfg.env.reward_scale,
                   "term": torch.as_tensor(res.terminated, dtype=torch.float32), "end": done.float(),
                   "next_obs": agent.normalize_obs(res.next_obs, update=False)}
            for f in FIELDS:
                store[f][pos] = row[f]
            pos, filled, step, raw_obs = (pos + 1) % cap, min(filled + 1, cap), step + n_env, res.obs
            for ret, length in res.episodes:
                last_ret = ret
                log.log({"global_step": step, "charts/episodic_return": ret, "charts/episodic_length": length})
            if props and (t + 1) % props.props_num_steps == 0 and t + 1 < hp.num_steps:
                props_stats = behaviour_step(t + 1) or props_stats
        rows = ordered()
        data = {f: store[f][rows] for f in FIELDS}  # (L, N, ...)
        with torch.no_grad():
            value = critic(data["obs"]).squeeze(-1)
            adv = gae(data["rew"], value, critic(data["next_obs"]).squeeze(-1), data["term"], data["end"],
                      hp.gamma, hp.gae_lambda)
            flat = {"obs": data["obs"].flatten(0, 1), "act": data["act"].flatten(0, 1), "adv": adv.flatten(),
                    "ret": (adv + value).flatten(), "value": value.flatten()}
            flat["logp"] = actor.log_prob(flat["obs"], flat["act"])  # recomputed under pi_theta
        se_stats = {}
        if hp.sampling_error_every and (it + 1) % hp.sampling_error_every == 0:  # the data PPO is about to train on
            te = time.perf_counter()
            se_stats["props/sampling_error"] = sampling_error(actor, flat["obs"], flat["act"],
                                                              hp.sampling_error_epochs, hp.sampling_error_lr)
            eval_seconds += time.perf_counter() - te
        stats = ppo_update(agent, flat, hp)
        if props:
            props_stats = behaviour_step(0) or props_stats
        it += 1
        sps = (step - s0) / (time.perf_counter() - t0)
        log.log({"global_step": step, **to_floats({**stats, **props_stats, **se_stats}), "charts/SPS": sps,
                 "charts/learning_rate": agent.opts["ppo"].param_groups[0]["lr"]})
        bar.update(step, f"return {last_ret:.1f}" if last_ret is not None else "")
        per_iter = hp.num_steps * n_env
        if run.eval_every > 0 and step // run.eval_every > (step - per_iter) // run.eval_every:
            te = time.perf_counter()
            rets = evaluate(lambda o: agent.act(o, deterministic=True), cfg.env, run.eval_episodes, run.seed)
            eval_seconds += time.perf_counter() - te
            log.log({"global_step": step, "eval/return_mean": sum(rets) / len(rets)})
        every = run.checkpoint_every
        if it == iters or (every > 0 and step // every > (step - per_iter) // every):
            tensors, agent_meta = agent_state(agent)
            et, emeta = envs.state()
            tensors.update(et)
            tensors.update({f"store/{f}": store[f] for f in FIELDS})
            tensors.update({"ret_acc": ret_acc, "rng/torch": torch.get_rng_state(), "rng/props": gen.get_state()})
            meta = {"step": step, "iteration": it, "pos": pos, "filled": filled, "agent": agent_meta,
                    "envs": emeta, "config": (out / "config.yaml").read_text()}
            ckpt.save(out / "checkpoints", f"step_{step}", tensors, meta)
    bar.close()
    log.close()
    plot_returns(out)
    summary = {"algo": cfg.algo, "env": cfg.env.id, "seed": run.seed, "steps": step,
               "last_episodic_return": last_ret, "seconds": time.perf_counter() - t0, "eval_seconds": eval_seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


class PPO:
    """Registry entry for ``ppo``: its own loop (``train``); calling it builds the agent (for ``eval``)."""

    Config = PPOConfig
    train = staticmethod(train_on_policy)

    def __new__(cls, obs_dim: int, act_dim: int, hp):
        return build_on_policy_agent(obs_dim, act_dim, hp)


class PPOPROPS:
    """Registry entry for ``ppo_props`` (same loop; the config type switches PROPS on)."""

    Config = PROPSConfig
    train = staticmethod(train_on_policy)

    def __new__(cls, obs_dim: int, act_dim: int, hp):
        return build_on_policy_agent(obs_dim, act_dim, hp)
