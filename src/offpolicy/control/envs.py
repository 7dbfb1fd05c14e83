"""Gymnasium environments, stepped together, with exact time-limit semantics and replayable state.

* ``terminated`` (the MDP ended: no bootstrap) and ``truncated`` (a time limit cut the episode: bootstrap
  from the real final observation) are kept apart. :meth:`Envs.step` returns the real next observation of
  every env for the replay buffer, and separately the observation to act on next (a fresh reset where an
  episode ended). Gymnasium's own vector envs either hide the final observation in ``info`` or spend a step
  on the reset; stepping a list of envs ourselves keeps both explicit.
* Every episode is reset with its own seed, derived from (run seed, env index, episode index), and the
  actions of the current episode are recorded. :meth:`Envs.state` / :meth:`Envs.load_state` rebuild an env
  mid-episode by resetting with that seed and replaying the actions: exact for any env that is deterministic
  given its reset seed (all gymnasium classic-control and MuJoCo tasks), without pickling simulator state.
* Agents act in [-1, 1]^d; actions are rescaled to the Box bounds here.

gymnasium is imported lazily: ``offpolicy.control`` imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offpolicy.control.config import ConfigError, EnvConfig


def episode_seed(seed: int, env_index: int, episode: int) -> int:
    return int(np.random.SeedSequence([seed, env_index, episode]).generate_state(1)[0])


def make_env(cfg: EnvConfig):
    try:
        import gymnasium as gym
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("offpolicy.control needs gymnasium: pip install 'offpolicy[control]'") from e
    try:
        env = gym.make(cfg.id, max_episode_steps=cfg.max_episode_steps, **cfg.kwargs)
    except gym.error.Error as e:
        raise ConfigError(f"env.id: gymnasium cannot make {cfg.id!r} ({e})") from None
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ConfigError(f"env.id: {cfg.id!r} has a {type(env.action_space).__name__} action space; control "
                          "algorithms need a continuous Box")
    return env


@dataclass
class StepResult:
    next_obs: np.ndarray  # (N, obs_dim) the real next observations (final ones where an episode ended): for the buffer
    reward: np.ndarray  # (N,) raw environment rewards
    terminated: np.ndarray  # (N,) bool: no bootstrap
    truncated: np.ndarray  # (N,) bool: time limit; bootstrap from next_obs
    obs: np.ndarray  # (N, obs_dim) what to act on next (reset observations where an episode ended)
    episodes: list[tuple[float, int]]  # (return, length) of every episode that ended at this step


class Envs:
    """``num_envs`` copies of one gymnasium env, each reset with per-episode seeds."""

    def __init__(self, cfg: EnvConfig, seed: int, num_envs: int | None = None) -> None:
        self.seed = seed
        self.envs = [make_env(cfg) for _ in range(num_envs or cfg.num_envs)]
        space = self.envs[0].action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.obs_dim = int(np.prod(self.envs[0].observation_space.shape))
        self.act_dim = int(np.prod(space.shape))
        n = len(self.envs)
        self.episode = [0] * n  # index of the current episode of each env
        self.ep_actions: list[list[np.ndarray]] = [[] for _ in range(n)]  # actions of the current episode
        self.ep_return = [0.0] * n
        self.ep_len = [0] * n
        self.obs = np.zeros((n, self.obs_dim), np.float32)

    def __len__(self) -> int:
        return len(self.envs)

    def _reset_one(self, i: int) -> None:
        obs, _ = self.envs[i].reset(seed=episode_seed(self.seed, i, self.episode[i]))
        self.obs[i] = np.asarray(obs, np.float32).reshape(-1)
        self.ep_actions[i], self.ep_return[i], self.ep_len[i] = [], 0.0, 0

    def reset(self) -> np.ndarray:
        for i in range(len(self.envs)):
            self._reset_one(i)
        return self.obs.copy()

    def scale(self, action: np.ndarray) -> np.ndarray:
        """[-1, 1] -> [low, high]."""
        return self.low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)

    def step(self, action: np.ndarray) -> StepResult:
        """``action``: (N, act_dim) in [-1, 1]."""
        n = len(self.envs)
        next_obs = np.zeros((n, self.obs_dim), np.float32)
        rew, term, trunc = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
        episodes = []
        for i, env in enumerate(self.envs):
            a = np.asarray(action[i], np.float32)
            o, r, te, tr, _ = env.step(self.scale(a).reshape(env.action_space.shape))
            next_obs[i] = np.asarray(o, np.float32).reshape(-1)
            rew[i], term[i], trunc[i] = float(r), bool(te), bool(tr)
            self.ep_actions[i].append(a)
            self.ep_return[i] += float(r)
            self.ep_len[i] += 1
            self.obs[i] = next_obs[i]
            if te or tr:
                episodes.append((self.ep_return[i], self.ep_len[i]))
                self.episode[i] += 1
                self._reset_one(i)
        return StepResult(next_obs, rew, term, trunc, self.obs.copy(), episodes)

    # ----- checkpoint state: episode indices + actions of the current episodes (replayed on load) -----
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"env/{i}/actions": torch.from_numpy(np.stack(acts).astype(np.float32)) if acts
                   else torch.zeros(0, self.act_dim) for i, acts in enumerate(self.ep_actions)}
        return tensors, {"episode": list(self.episode), "seed": self.seed}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> np.ndarray:
        if meta["seed"] != self.seed or len(meta["episode"]) != len(self.envs):
            raise ConfigError("checkpoint: env seed / num_envs differ from the run's config")
        for i, env in enumerate(self.envs):
            self.episode[i] = meta["episode"][i]
            self._reset_one(i)
            for a in tensors[f"env/{i}/actions"].numpy():
                o, r, _, _, _ = env.step(self.scale(a).reshape(env.action_space.shape))
                self.obs[i] = np.asarray(o, np.float32).reshape(-1)
                self.ep_actions[i].append(a)
                self.ep_return[i] += float(r)
                self.ep_len[i] += 1
        return self.obs.copy()


def evaluate(policy_fn, cfg: EnvConfig, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of ``episodes`` deterministic episodes; ``policy_fn``: (1, obs_dim) tensor -> action."""
    envs = Envs(cfg, seed=seed + 10_000_019, num_envs=1)  # evaluation seeds never meet training seeds
    obs, returns = envs.reset(), []
    while len(returns) < episodes:
        with torch.no_grad():
            a = policy_fn(torch.from_numpy(obs)).numpy()
        res = envs.step(a)
        obs = res.obs
        returns += [r for r, _ in res.episodes]
    return returns
