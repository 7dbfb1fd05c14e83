"""Offline datasets: D4RL-like transitions as JSON lines, written by ``collect`` and read by offline training.

One line per transition::

    {"obs": [...], "action": [...], "reward": r, "next_obs": [...], "terminal": false, "timeout": false,
     "behavior_logp": -1.23 | null, "source": "random" | "<checkpoint>", "episode": 0}

``action`` is in the agent's [-1, 1] scale; ``terminal`` ends the MDP (no bootstrap), ``timeout`` is a
time-limit truncation (bootstrap from ``next_obs``) — D4RL's ``terminals`` / ``timeouts``. ``behavior_logp``
is log pi_b(action|obs) where the behaviour policy is known (uniform random; tanh-Gaussian actors), else null.
A malformed row fails with ``file:line: what is wrong``. Hub datasets (D4RL, Minari) cannot be downloaded
here; datasets are generated from trained checkpoints with ``offpolicy control collect``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from offpolicy.control.config import ConfigError

KEYS = {"obs", "action", "reward", "next_obs", "terminal", "timeout", "behavior_logp", "source", "episode"}


def _vector(value, name: str, where: str, dim: int | None) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in value):
        raise ConfigError(f"{where}: {name} must be a list of finite numbers")
    if dim is not None and len(value) != dim:
        raise ConfigError(f"{where}: {name} has {len(value)} values, expected {dim}")
    return value


def read_dataset(path: str | Path, obs_dim: int | None = None, act_dim: int | None = None) -> dict[str, torch.Tensor]:
    """All transitions as tensors: obs, act, rew, next_obs, term, end (terminal or timeout), behavior_logp (nan)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"dataset {path} does not exist")
    cols: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next_obs", "term", "end", "behavior_logp")}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            where = f"{path}:{i}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or set(row) != KEYS:
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(f"{where}: expected keys {sorted(KEYS)}, got {got}")
            obs = _vector(row["obs"], "obs", where, obs_dim)
            obs_dim = obs_dim or len(obs)
            act = _vector(row["action"], "action", where, act_dim)
            act_dim = act_dim or len(act)
            if any(abs(a) > 1 + 1e-6 for a in act):
                raise ConfigError(f"{where}: action outside [-1, 1] (actions are stored in the agent's scale)")
            nxt = _vector(row["next_obs"], "next_obs", where, obs_dim)
            if not isinstance(row["reward"], (int, float)) or not math.isfinite(row["reward"]):
                raise ConfigError(f"{where}: reward must be a finite number")
            if not isinstance(row["terminal"], bool) or not isinstance(row["timeout"], bool):
                raise ConfigError(f"{where}: terminal and timeout must be true/false")
            logp = row["behavior_logp"]
            if logp is not None and not isinstance(logp, (int, float)):
                raise ConfigError(f"{where}: behavior_logp must be a number or null")
            cols["obs"].append(obs)
            cols["act"].append(act)
            cols["rew"].append(float(row["reward"]))
            cols["next_obs"].append(nxt)
            cols["term"].append(float(row["terminal"]))
            cols["end"].append(row["terminal"] or row["timeout"])
            cols["behavior_logp"].append(float("nan") if logp is None else float(logp))
    if not cols["obs"]:
        raise ConfigError(f"dataset {path} has no transitions")
    return {"obs": torch.tensor(cols["obs"]), "act": torch.tensor(cols["act"]), "rew": torch.tensor(cols["rew"]),
            "next_obs": torch.tensor(cols["next_obs"]), "term": torch.tensor(cols["term"]),
            "end": torch.tensor(cols["end"]), "behavior_logp": torch.tensor(cols["behavior_logp"])}


def collect(sources: list[tuple[str, int]], out: str | Path, env_id: str | None = None, seed: int = 0,
            deterministic: bool = False) -> dict:
    """Roll out each (source, episodes): ``random`` (uniform actions) or a checkpoint; write JSON lines.

    Reproducible: the actions are drawn from torch's RNG seeded with ``seed`` (forked, so the caller's RNG state
    is untouched) and the episodes are reset with seeds derived from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _collect(sources, out, env_id, seed, deterministic)


def _collect(sources: list[tuple[str, int]], out: str | Path, env_id: str | None, seed: int,
             deterministic: bool) -> dict:
    from offpolicy.control.cli import load_agent
    from offpolicy.control.config import EnvConfig
    from offpolicy.control.envs import Envs
    from offpolicy.control.nets import TanhGaussianActor

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    with open(out, "w") as f:
        for k, (source, episodes) in enumerate(sources):
            agent, env_cfg = None, EnvConfig(id=env_id or "Pendulum-v1")
            if source != "random":
                agent, cfg = load_agent(source)
                env_cfg = cfg.env
            if env_id is not None and env_cfg.id != env_id:
                raise ConfigError(f"collect: {source} was trained on {env_cfg.id}, not {env_id}")
            env_id = env_cfg.id
            envs = Envs(env_cfg, seed=seed * 1000 + k, num_envs=1)
            obs, done_eps = envs.reset(), 0
            actor = agent.nets["actor"] if agent is not None and "actor" in agent.nets else None
            gaussian = isinstance(actor, TanhGaussianActor)
            while done_eps < episodes:
                o = torch.from_numpy(obs)
                with torch.no_grad():
                    if agent is None:
                        a = torch.rand(1, envs.act_dim) * 2 - 1
                        logp = -envs.act_dim * math.log(2.0)
                    else:
                        a = agent.act(o, deterministic=deterministic)
                        logp = float(actor.log_prob(o, a)[0]) if gaussian and not deterministic else None
                res = envs.step(a.numpy())
                f.write(json.dumps({"obs": obs[0].tolist(), "action": a[0].tolist(), "reward": float(res.reward[0]),
                                    "next_obs": res.next_obs[0].tolist(), "terminal": bool(res.terminated[0]),
                                    "timeout": bool(res.truncated[0]), "behavior_logp": logp, "source": source,
                                    "episode": done_eps}) + "\n")
                obs = res.obs
                done_eps += len(res.episodes)
            counts[source] = episodes
    return {"out": str(out), "env": env_id, "episodes": counts}
