"""Tensor ring replay buffer: uniform sampling, optional n-step returns, checkpointable.

Rows are written ``num_envs`` at a time, so the successor of row ``j`` in the same env is row ``j + num_envs``.
Each row keeps ``terminated`` (no bootstrap) and ``end`` (terminated or truncated: the episode stops here).
A sample returns ``discount`` = gamma^m * (1 - terminated_last) so every algorithm's target is simply::

    y = reward + discount * V(next_obs)      # reward: the m-step discounted sum, m <= n_step

An n-step sum stops at an episode end and at the newest row written (no successor yet); a truncated
episode bootstraps from its real final observation.
"""

from __future__ import annotations

import torch

FIELDS = ("obs", "act", "rew", "next_obs", "term", "end")


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int, num_envs: int = 1) -> None:
        if capacity % num_envs:
            capacity += num_envs - capacity % num_envs  # whole env-steps, so successors line up across the wrap
        self.capacity, self.num_envs = capacity, num_envs
        self.obs = torch.zeros(capacity, obs_dim)
        self.act = torch.zeros(capacity, act_dim)
        self.rew = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.term = torch.zeros(capacity)  # 1.0 where the MDP terminated
        self.end = torch.zeros(capacity, dtype=torch.bool)  # terminated or truncated
        self.ptr, self.size = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs, act, rew, next_obs, term, trunc) -> None:
        """One env step: every argument has leading dimension num_envs (tensors or numpy arrays)."""
        n = self.num_envs
        sl = slice(self.ptr, self.ptr + n)
        self.obs[sl] = torch.as_tensor(obs, dtype=torch.float32)
        self.act[sl] = torch.as_tensor(act, dtype=torch.float32)
        self.rew[sl] = torch.as_tensor(rew, dtype=torch.float32)
        self.next_obs[sl] = torch.as_tensor(next_obs, dtype=torch.float32)
        term_t = torch.as_tensor(term, dtype=torch.bool)
        self.term[sl] = term_t.float()
        self.end[sl] = term_t | torch.as_tensor(trunc, dtype=torch.bool)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def extend(self, obs, act, rew, next_obs, term, trunc) -> None:
        """Append whole episodes of one env in time order (offline datasets; needs num_envs == 1 and room)."""
        if self.num_envs != 1 or self.size + len(obs) > self.capacity:
            raise ValueError("buffer.extend: needs num_envs == 1 and capacity for every row")
        sl = slice(self.ptr, self.ptr + len(obs))
        self.obs[sl], self.act[sl], self.rew[sl], self.next_obs[sl] = obs, act, rew, next_obs
        self.term[sl] = torch.as_tensor(term).float()
        self.end[sl] = torch.as_tensor(term, dtype=torch.bool) | torch.as_tensor(trunc, dtype=torch.bool)
        self.ptr = (self.ptr + len(obs)) % self.capacity
        self.size += len(obs)

    def sample(self, batch_size: int, gamma: float, n_step: int = 1) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (batch_size,))  # (B,) uniform over stored rows
        if n_step == 1:
            return {"obs": self.obs[idx], "act": self.act[idx], "rew": self.rew[idx],
                    "next_obs": self.next_obs[idx], "discount": gamma * (1.0 - self.term[idx])}
        age = (self.ptr - 1 - idx) % self.capacity  # (B,) rows written after idx
        ret, disc = torch.zeros(batch_size), torch.ones(batch_size)
        last, alive = idx.clone(), torch.ones(batch_size, dtype=torch.bool)
        for k in range(n_step):
            cur = (idx + k * self.num_envs) % self.capacity
            valid = alive & (k * self.num_envs <= age)
            ret = ret + valid * disc * self.rew[cur]
            last = torch.where(valid, cur, last)
            disc = torch.where(valid, disc * gamma, disc)
            alive = valid & ~self.end[cur]
        return {"obs": self.obs[idx], "act": self.act[idx], "rew": ret,
                "next_obs": self.next_obs[last], "discount": disc * (1.0 - self.term[last])}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"buffer/{f}": getattr(self, f)[: self.size].clone() for f in FIELDS}
        return tensors, {"ptr": self.ptr, "size": self.size, "capacity": self.capacity, "num_envs": self.num_envs}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["capacity"] != self.capacity or meta["num_envs"] != self.num_envs:
            raise ValueError(f"buffer: checkpoint has capacity {meta['capacity']} / num_envs {meta['num_envs']}, "
                             f"this run {self.capacity} / {self.num_envs}")
        self.ptr, self.size = meta["ptr"], meta["size"]
        for f in FIELDS:
            getattr(self, f)[: self.size] = tensors[f"buffer/{f}"]
