"""The off-policy training loop shared by sac, td3, dsac_t (and any agent with ``act`` / ``update``).

    act (random before learning_starts) -> env step -> buffer -> updates -> log -> eval -> checkpoint

An agent is a small class with ``Config`` (pydantic, extends :class:`OffPolicyConfig`), ``nets``
(an ``nn.ModuleDict`` holding every network, target and temperature), ``opts`` (name -> optimizer),
``act(obs, deterministic)`` returning actions in [-1, 1] and ``update(batch, step)`` returning detached
metric tensors. Everything the checkpoint needs is therefore ``nets``, ``opts``, the buffer, the envs, the
torch RNG state and two counters; resume is exact on CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.buffer import ReplayBuffer
from offpolicy.control.config import ControlConfig, Strict, dump_control_config
from offpolicy.control.envs import Envs, evaluate
from offpolicy.control.report import MetricsLog, Progress, plot_returns, to_floats


class OffPolicyConfig(Strict):
    """Hyperparameters every off-policy agent shares."""

    hidden: list[int] = Field(default_factory=lambda: [256, 256])  # hidden layer widths of actor and critics
    buffer_size: int = 1_000_000  # replay capacity (transitions)
    batch_size: int = 256  # transitions per gradient step
    learning_starts: int = 5000  # uniform-random environment steps before the first update
    gamma: float = 0.99  # discount
    n_step: int = Field(1, ge=1)  # n-step returns (1 = the papers' one-step target)
    updates_per_step: int = Field(1, ge=1)  # gradient steps per environment transition (replay ratio)


def agent_state(agent) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"nets/{k}": v.detach().clone() for k, v in agent.nets.state_dict().items()}
    meta = {}
    for name, opt in agent.opts.items():
        t, m = ckpt.optimizer_state(name, opt)
        tensors.update(t)
        meta[name] = m
    return tensors, {"optim": meta}


def load_agent_state(agent, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {k[len("nets/"):]: v for k, v in tensors.items() if k.startswith("nets/")}
    for name, buf in list(agent.nets.named_buffers()):  # buffers sized at run time (per-env state) take the saved shape
        if name in state and state[name].shape != buf.shape:
            owner, _, leaf = name.rpartition(".")
            agent.nets.get_submodule(owner)._buffers[leaf] = torch.empty_like(state[name])
    agent.nets.load_state_dict(state)
    for name, opt in agent.opts.items():
        ckpt.load_optimizer_state(name, opt, tensors, meta["optim"][name])


def build_agent(cfg: ControlConfig, obs_dim: int, act_dim: int):
    from offpolicy.control import ALGOS

    return ALGOS[cfg.algo](obs_dim, act_dim, cfg.hyperparams())


def train(cfg: ControlConfig) -> dict:
    """Train ``cfg.algo`` for ``cfg.run.total_steps`` env steps; returns a summary (also in summary.json)."""
    from offpolicy.control import ALGOS

    algo = ALGOS[cfg.algo]
    if getattr(algo, "train", None) is not None:  # on-policy algorithms bring their own loop
        return algo.train(cfg)
    run, hp = cfg.run, cfg.hyperparams()
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    envs = Envs(cfg.env, run.seed)
    agent = algo(envs.obs_dim, envs.act_dim, hp)
    buffer = ReplayBuffer(hp.buffer_size, envs.obs_dim, envs.act_dim, len(envs))
    obs, step, n_updates = envs.reset(), 0, 0
    found = ckpt.latest(out / "checkpoints") if run.resume else None
    if found is not None:
        tensors, meta = ckpt.load(found)
        load_agent_state(agent, tensors, meta["agent"])
        buffer.load_state_dict(tensors, meta["buffer"])
        obs = envs.load_state(tensors, meta["envs"])
        torch.set_rng_state(tensors["rng/torch"])
        step, n_updates = meta["step"], meta["n_updates"]
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run does not append to an old one's curve
    dump_control_config(cfg, out / "config.yaml")
    log, bar = MetricsLog(out), Progress(run.total_steps, step, run.progress, f"{cfg.algo} {cfg.env.id}")
    n, scale, last_ret, t0, s0 = len(envs), cfg.env.reward_scale, None, time.perf_counter(), step
    metrics: dict = {}
    eval_seconds = 0.0  # time spent in evaluations, so callers can report training speed without it

    def crossed(every: int) -> bool:
        return every > 0 and step // every > (step - n) // every

    while step < run.total_steps:
        if step < hp.learning_starts:
            action = torch.rand(n, envs.act_dim) * 2 - 1  # uniform exploration in [-1, 1]
        else:
            with torch.no_grad():
                action = agent.act(torch.from_numpy(obs), deterministic=False)
        res = envs.step(action.numpy())
        buffer.add(obs, action, res.reward * scale, res.next_obs, res.terminated, res.truncated)
        agent.observe(res.reward * scale, res.terminated, res.truncated)
        obs, step = res.obs, step + n
        for ret, length in res.episodes:
            last_ret = ret
            log.log({"global_step": step, "charts/episodic_return": ret, "charts/episodic_length": length})
        if step >= hp.learning_starts:
            for _ in range(n * hp.updates_per_step):
                metrics = agent.update(buffer.sample(hp.batch_size, hp.gamma, hp.n_step), n_updates)
                n_updates += 1
        if crossed(run.log_every) and metrics:
            sps = (step - s0) / (time.perf_counter() - t0)
            log.log({"global_step": step, **to_floats(metrics), "charts/SPS": sps})
            bar.update(step, f"return {last_ret:.1f}" if last_ret is not None else "")
        if crossed(run.eval_every):
            te = time.perf_counter()
            rets = evaluate(lambda o: agent.act(o, deterministic=True), cfg.env, run.eval_episodes, run.seed)
            eval_seconds += time.perf_counter() - te
            log.log({"global_step": step, "eval/return_mean": sum(rets) / len(rets)})
        if crossed(run.checkpoint_every) or step >= run.total_steps:
            save_run(out, agent, buffer, envs, step, n_updates)
    bar.close()
    log.close()
    plot_returns(out)
    summary = {"algo": cfg.algo, "env": cfg.env.id, "seed": run.seed, "steps": step,
               "last_episodic_return": last_ret, "seconds": time.perf_counter() - t0, "eval_seconds": eval_seconds}
    (out / "summary.json").write_text(__import__("json").dumps(summary, indent=1))
    return summary


def save_run(out: Path, agent, buffer: ReplayBuffer, envs: Envs, step: int, n_updates: int) -> Path:
    tensors, agent_meta = agent_state(agent)
    bt, bmeta = buffer.state_dict()
    et, emeta = envs.state()
    tensors.update(bt)
    tensors.update(et)
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"step": step, "n_updates": n_updates, "agent": agent_meta, "buffer": bmeta, "envs": emeta,
            "config": (out / "config.yaml").read_text()}
    return ckpt.save(out / "checkpoints", f"step_{step}", tensors, meta)
