"""TD3: Twin Delayed Deep Deterministic policy gradient — the second baseline.

Paper: Fujimoto, van Hoof, Meger, "Addressing Function Approximation Error in Actor-Critic Methods",
arXiv:1802.09477.

Delta from SAC: a deterministic actor mu(s) explored with Gaussian action noise instead of a stochastic
max-entropy policy (no temperature, no log-probabilities); target policy smoothing; the actor and the
targets are updated every ``policy_frequency`` critic steps; the actor maximises Q_1 only; the actor also
has a Polyak-averaged target.

    a'    = clip( mu'(s') + clip(eps, -c, c), -1, 1 ),   eps ~ N(0, sigma^2)
    y     = r + gamma^m (1 - term) * min_i Q'_i(s', a')
    L_Q   = sum_i mean_B ( Q_i(s, a) - y )^2
    L_mu  = -mean_B Q_1(s, mu(s))                         (every d-th step, with the target updates)

Defaults (authors' code, github.com/sfujim/TD3): Adam lr 3e-4; 2 x 256 ReLU; batch 256; gamma 0.99;
tau 0.005; policy noise sigma 0.2, noise clip c 0.5, delay d 2 (in units of max_action = 1 here);
exploration noise 0.1; 25k random start steps (the recipes use fewer on Pendulum).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from offpolicy.control.loop import OffPolicyConfig
from offpolicy.control.nets import Critics, DeterministicActor, adam, frozen, polyak


class TD3Config(OffPolicyConfig):
    learning_starts: int = 25_000  # authors' start_timesteps
    actor_lr: float = 3e-4  # actor Adam learning rate
    critic_lr: float = 3e-4  # critics' Adam learning rate
    tau: float = 0.005  # Polyak step of actor and critic targets
    policy_noise: float = 0.2  # std of the target-policy smoothing noise
    noise_clip: float = 0.5  # its clip
    exploration_noise: float = 0.1  # std of the Gaussian exploration noise
    policy_frequency: int = Field(2, ge=1)  # actor and target updates every d critic steps
    activation: str = "relu"  # hidden activation
    bc_alpha: float | None = None  # TD3+BC's alpha (None = plain TD3): see offpolicy.control.td3_bc


def td3_target(q_next: torch.Tensor, rew: torch.Tensor, discount: torch.Tensor) -> torch.Tensor:
    """y = r + discount * min_i Q'_i(s', a').  q_next: (n, B)."""
    return rew + discount * q_next.min(0).values


def td3_actor_loss(q1: torch.Tensor, pi: torch.Tensor, act: torch.Tensor, bc_alpha: float | None) -> torch.Tensor:
    """-mean Q_1(s, mu(s)); with ``bc_alpha`` (TD3+BC): -alpha/mean|Q_1| * mean Q_1 + mean (mu(s) - a)^2."""
    if bc_alpha is None:
        return -q1.mean()
    return -(bc_alpha / q1.abs().mean().detach()) * q1.mean() + (pi - act).pow(2).mean()


def smoothed_action(mu_next: torch.Tensor, noise_std: float, noise_clip: float) -> torch.Tensor:
    eps = (torch.randn_like(mu_next) * noise_std).clamp(-noise_clip, noise_clip)
    return (mu_next + eps).clamp(-1.0, 1.0)


class TD3:
    Config = TD3Config

    def __init__(self, obs_dim: int, act_dim: int, hp: TD3Config) -> None:
        self.hp = hp
        actor = DeterministicActor(obs_dim, act_dim, hp.hidden, hp.activation)
        critic = Critics(obs_dim, act_dim, hp.hidden, n=2, act=hp.activation)
        self.nets = nn.ModuleDict({"actor": actor, "actor_target": copy.deepcopy(actor), "critic": critic,
                                   "critic_target": copy.deepcopy(critic)})
        self.nets["actor_target"].requires_grad_(False)
        self.nets["critic_target"].requires_grad_(False)
        self.opts = {"actor": adam(actor.parameters(), hp.actor_lr),
                     "critic": adam(critic.parameters(), hp.critic_lr)}

    def observe(self, reward, terminated, truncated) -> None:
        """Per-step hook of the loop (unused: no running reward statistics)."""

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        mu = self.nets["actor"](obs)
        if deterministic:
            return mu
        return (mu + torch.randn_like(mu) * self.hp.exploration_noise).clamp(-1.0, 1.0)

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        hp, actor, critic = self.hp, self.nets["actor"], self.nets["critic"]
        with torch.no_grad():
            a2 = smoothed_action(self.nets["actor_target"](b["next_obs"]), hp.policy_noise, hp.noise_clip)
            y = td3_target(self.nets["critic_target"](b["next_obs"], a2).squeeze(-1), b["rew"], b["discount"])
        q = critic(b["obs"], b["act"]).squeeze(-1)  # (2, B)
        qf_loss = (q - y).pow(2).mean(-1).sum()
        self.opts["critic"].zero_grad(set_to_none=True)
        qf_loss.backward()
        self.opts["critic"].step()
        out = {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q.detach().mean()}
        if step % hp.policy_frequency == 0:
            with frozen(critic):
                pi = actor(b["obs"])
                q1 = critic(b["obs"], pi)[0].squeeze(-1)  # Q_1 only
                actor_loss = td3_actor_loss(q1, pi, b["act"], hp.bc_alpha)
                self.opts["actor"].zero_grad(set_to_none=True)
                actor_loss.backward()
            self.opts["actor"].step()
            polyak(self.nets["actor_target"], actor, hp.tau)
            polyak(self.nets["critic_target"], critic, hp.tau)
            out["losses/actor_loss"] = actor_loss.detach()
        return out
