"""Soft Actor-Critic with automatic temperature — the baseline of offpolicy.control.

Paper: Haarnoja et al., "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905.

Delta from SAC: none (this is the reference the other algorithms state their deltas against).

Formulas (twin critics Q_1, Q_2, target critics Q'_i, tanh-Gaussian actor pi, alpha = exp(log_alpha)):

    y        = r + gamma^m (1 - term) * ( min_i Q'_i(s', a') - alpha * log pi(a'|s') ),   a' ~ pi(.|s')
    L_Q      = sum_i  mean_B ( Q_i(s, a) - y )^2
    L_pi     = mean_B ( alpha * log pi(a~|s) - min_i Q_i(s, a~) ),                          a~ ~ pi(.|s) (reparam.)
    L_alpha  = mean_B ( -alpha * ( log pi(a~|s) + H_target ) ),   H_target = -dim(A)         (paper eq. 18)
    Q'_i    <- (1 - tau) Q'_i + tau Q_i

Defaults (paper Table 1): Adam lr 3e-4 for actor, critics and temperature; 2 x 256 ReLU hidden layers;
batch 256; buffer 1e6; gamma 0.99; tau 0.005; one gradient step per environment step; target entropy
-dim(A); alpha starts at 1.0 (log_alpha = 0, as in SB3 and CleanRL). learning_starts 5000 random steps
(CleanRL's default; the paper does not fix it). The actor's log-std is clamped to [-20, 2] (authors' code).

Update order: the critic, actor and temperature gradients are all taken at the same parameters and applied
in one optimizer step (the original TF1 implementation ran its three train ops in one session call); SB3 and
CleanRL step the critic before taking the actor's loss. The difference is one step of critic staleness in
the actor's loss; the gain is one backward pass and one optimizer call per update.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from offpolicy.control.loop import OffPolicyConfig
from offpolicy.control.nets import Critics, TanhGaussianActor, Temperature, adam_groups, frozen, polyak


class SACConfig(OffPolicyConfig):
    actor_lr: float = 3e-4  # actor Adam learning rate
    critic_lr: float = 3e-4  # critics' Adam learning rate
    alpha_lr: float = 3e-4  # temperature Adam learning rate
    tau: float = 0.005  # Polyak step of the target critics
    autotune: bool = True  # learn alpha towards the target entropy; False keeps alpha fixed at alpha_init
    alpha_init: float = 1.0  # initial (or fixed) temperature
    target_entropy: float | None = None  # None = -dim(A)
    policy_frequency: int = Field(1, ge=1)  # actor and temperature step every this many critic steps
    target_frequency: int = Field(1, ge=1)  # target update every this many critic steps
    activation: str = "relu"  # hidden activation of actor and critics


# ----- the math: pure functions of tensors -----
def soft_target(q_next: torch.Tensor, logp_next: torch.Tensor, rew: torch.Tensor, discount: torch.Tensor,
                alpha: torch.Tensor) -> torch.Tensor:
    """y = r + discount * (min_i Q'_i(s', a') - alpha log pi(a'|s')).  q_next: (n, B); others (B,)."""
    return rew + discount * (q_next.min(0).values - alpha * logp_next)


def critic_mse(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over critics of the batch-mean squared TD error. q: (n, B), y: (B,)."""
    return (q - y).pow(2).mean(-1).sum()


def temperature_loss(log_alpha: torch.Tensor, logp: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """L(alpha) = mean(-alpha * (log pi + H_target)), alpha = exp(log_alpha); logp is treated as a constant."""
    return -(log_alpha.exp() * (logp.detach() + target_entropy)).mean()


class SAC:
    Config = SACConfig

    def __init__(self, obs_dim: int, act_dim: int, hp: SACConfig) -> None:
        self.hp = hp
        self.target_entropy = -float(act_dim) if hp.target_entropy is None else hp.target_entropy
        actor = TanhGaussianActor(obs_dim, act_dim, hp.hidden, hp.activation)
        critic = Critics(obs_dim, act_dim, hp.hidden, n=2, act=hp.activation)
        self.nets = nn.ModuleDict({"actor": actor, "critic": critic, "critic_target": copy.deepcopy(critic),
                                   "temperature": Temperature(hp.alpha_init)})
        self.nets["critic_target"].requires_grad_(False)
        self.opts = {"all": adam_groups([(list(actor.parameters()), hp.actor_lr),
                                          (list(critic.parameters()), hp.critic_lr),
                                          (list(self.nets["temperature"].parameters()), hp.alpha_lr)])}

    def observe(self, reward, terminated, truncated) -> None:
        """Per-step hook of the loop (unused: no running reward statistics)."""

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        actor = self.nets["actor"]
        return actor.mode(obs) if deterministic else actor.sample(obs)[0]

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        hp, actor, critic = self.hp, self.nets["actor"], self.nets["critic"]
        temp = self.nets["temperature"]
        alpha = temp.alpha.detach()
        with torch.no_grad():
            a2, logp2 = actor.sample(b["next_obs"])
            y = soft_target(self.nets["critic_target"](b["next_obs"], a2).squeeze(-1), logp2, b["rew"],
                            b["discount"], alpha)  # (B,)
        q = critic(b["obs"], b["act"]).squeeze(-1)  # (2, B)
        qf_loss = critic_mse(q, y)
        loss = qf_loss
        out = {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q.detach().mean(), "losses/alpha": alpha}
        if step % hp.policy_frequency == 0:
            with frozen(critic):  # the actor's loss reaches the actor only, through the action
                a, logp = actor.sample(b["obs"])
                actor_loss = (alpha * logp - critic(b["obs"], a).squeeze(-1).min(0).values).mean()
            loss = loss + actor_loss
            out.update({"losses/actor_loss": actor_loss.detach(), "losses/entropy": -logp.detach().mean()})
            if hp.autotune:
                alpha_loss = temperature_loss(temp.log_alpha, logp, self.target_entropy)
                loss = loss + alpha_loss
                out["losses/alpha_loss"] = alpha_loss.detach()
        # The three losses touch disjoint parameters (targets and logp are constants where they meet), so one
        # backward of their sum gives each module exactly its own gradient, and one optimizer step applies them.
        opt = self.opts["all"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % hp.target_frequency == 0:
            polyak(self.nets["critic_target"], critic, hp.tau)
        return out
