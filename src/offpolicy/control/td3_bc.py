"""TD3+BC: the offline baseline — TD3 with a behaviour-cloning term, trained on a fixed dataset.

Paper: Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", arXiv:2106.06860.

Delta from SAC: everything TD3 changes (see ``td3``), plus: no environment interaction (transitions come
from a dataset written by ``offpolicy control collect``; ``run.total_steps`` counts gradient steps);
observations are normalised by the dataset's mean and std; the actor's loss adds behaviour cloning and
rescales the Q term by the batch's mean |Q|:

    L_mu = -lambda mean_B Q_1(s, mu(s)) + mean_B (mu(s) - a)^2,     lambda = alpha / mean_B |Q_1(s, mu(s))|

Defaults (paper): alpha 2.5; TD3's (lr 3e-4, batch 256, 2 x 256, policy noise 0.2 clipped at 0.5, delay 2,
tau 0.005, gamma 0.99); 1M gradient steps in the paper (recipes use fewer).

Online fine-tuning (``hp.online_steps``, not in the paper): the same losses (BC term included) continue on a
buffer of new transitions collected with the actor plus TD3's Gaussian exploration noise; the loop is
``offpolicy.control.offline``. It is the simplest "+ N online steps" baseline, not a tuned O2O method.
"""

from __future__ import annotations

import torch
from pydantic import Field

from offpolicy.control.nets import ObsNorm
from offpolicy.control.offline import OfflineAgent
from offpolicy.control.td3 import TD3, TD3Config


class TD3BCConfig(TD3Config):
    dataset: str = ""  # JSON-lines dataset (offpolicy control collect)
    bc_alpha: float | None = 2.5  # alpha: weight of the RL term relative to behaviour cloning
    learning_starts: int = 0  # online phase only: online transitions before the first online update
    normalize_obs: bool = True  # normalise observations by the dataset's statistics
    online_steps: int = Field(0, ge=0)  # env steps of online fine-tuning after run.total_steps offline updates
    online_keep_dataset: bool = False  # online buffer starts with the dataset (False: online data only)


class TD3BC(OfflineAgent):
    """TD3 with the BC actor loss, and observations normalised inside ``act`` and ``update``."""

    Config = TD3BCConfig

    def __init__(self, obs_dim: int, act_dim: int, hp: TD3BCConfig) -> None:
        self.hp, self.td3 = hp, TD3(obs_dim, act_dim, hp)
        self.nets, self.opts = self.td3.nets, self.td3.opts
        self.nets["obs_norm"] = ObsNorm(obs_dim)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return self.td3.act(self._norm(obs), deterministic)

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        return self.td3.update({**b, "obs": self._norm(b["obs"]), "next_obs": self._norm(b["next_obs"])}, step)
