"""Off-policy MDPO: Mirror Descent Policy Optimization with SAC-like critics.

Paper: Tomar, Shani, Efroni, Ghavamzadeh, "Mirror Descent Policy Optimization", arXiv:2005.09814.
Authors' code: github.com/manantomar/Mirror-Descent-Policy-Optimization (``mdpo_off/mdpo.py``).

Delta from SAC: the actor's loss adds a KL trust region to the *previous* policy pi_k — a frozen copy of
the actor refreshed every ``old_policy_every`` updates (the mirror-descent iteration) — and the entropy
weight lambda is fixed (no temperature learning). With a~ = tanh(u), u ~ N(mu_theta(s), sigma_theta(s)),
reparameterised, and t the KL weight (1/step size):

    L_pi = mean_B[ t log pi_theta(a~|s) + (lambda - t) log pi_k(a~|s) - Q_1(s, a~) ] + 1e-3 (mean mu^2 + mean log_std^2)
         = mean_B[ t (log pi_theta - log pi_k)(a~|s)  +  lambda log pi_k(a~|s)  -  Q_1(s, a~) ] + reg

i.e. t KL(pi_theta || pi_k) plus the entropy term scored under pi_k, exactly the authors' reparameterised
loss with ``tsallis_q = 1``; Q_1 only, as in their code. When pi_k = pi_theta the actor loss is SAC's with
alpha = lambda and Q_1 in place of min(Q_1, Q_2) (tested). Critics: SAC's twin Q with target Q's and the
soft target with alpha = lambda (the authors' code keeps SAC-v1's separate V network; this is the change).

Defaults (authors' ``run_mujoco.py`` / README command for off-policy MDPO): t = ``klcoeff`` = 1.0 (constant;
the paper's annealed t_k is commented out in their code), lambda = 0.2, m = ``sgd_steps`` = 1000 env steps
between pi_k refreshes, Adam lr 3e-4, batch 256, tau 0.005, gamma 0.99, buffer 1e6, 10k warm-up steps.
Hidden sizes 2 x 256 here (their stable-baselines MlpPolicy default is 2 x 64), for like-for-like with ``sac``.
All gradients are taken at the same parameters and applied in one step (as ``sac``).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from offpolicy.control.loop import OffPolicyConfig
from offpolicy.control.nets import Critics, TanhGaussianActor, adam_groups, frozen, polyak
from offpolicy.control.sac import critic_mse, soft_target


class MDPOConfig(OffPolicyConfig):
    learning_starts: int = 10_000  # authors' learning_starts
    actor_lr: float = 3e-4  # actor Adam learning rate
    critic_lr: float = 3e-4  # critics' Adam learning rate
    tau: float = 0.005  # Polyak step of the target critics
    lam: float = 0.2  # lambda: fixed entropy weight
    kl_coef: float = 1.0  # t: weight of KL(pi_theta || pi_k) (1 / mirror-descent step size)
    old_policy_every: int = Field(1000, ge=1)  # m: updates between refreshes of pi_k
    reg: float = 1e-3  # weight of the mean^2 and log_std^2 regularisers of the actor
    activation: str = "relu"  # hidden activation


def mdpo_actor_loss(logp: torch.Tensor, logp_old: torch.Tensor, q: torch.Tensor, *, kl_coef: float,
                    lam: float) -> torch.Tensor:
    """mean( t log pi + (lambda - t) log pi_k - Q ), all (B,) at the same reparameterised action."""
    return (kl_coef * logp + (lam - kl_coef) * logp_old - q).mean()


class MDPOOff:
    Config = MDPOConfig

    def __init__(self, obs_dim: int, act_dim: int, hp: MDPOConfig) -> None:
        self.hp = hp
        actor = TanhGaussianActor(obs_dim, act_dim, hp.hidden, hp.activation)
        critic = Critics(obs_dim, act_dim, hp.hidden, n=2, act=hp.activation)
        self.nets = nn.ModuleDict({"actor": actor, "actor_old": copy.deepcopy(actor), "critic": critic,
                                   "critic_target": copy.deepcopy(critic)})
        self.nets["actor_old"].requires_grad_(False)
        self.nets["critic_target"].requires_grad_(False)
        self.opts = {"all": adam_groups([(list(actor.parameters()), hp.actor_lr),
                                         (list(critic.parameters()), hp.critic_lr)])}

    def observe(self, reward, terminated, truncated) -> None:
        """Per-step hook of the loop (unused: no running reward statistics)."""

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        actor = self.nets["actor"]
        return actor.mode(obs) if deterministic else actor.sample(obs)[0]

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        hp, actor, critic, old = self.hp, self.nets["actor"], self.nets["critic"], self.nets["actor_old"]
        if step % hp.old_policy_every == 0:  # a new mirror-descent iteration: pi_k <- pi_theta
            old.load_state_dict(actor.state_dict())
        with torch.no_grad():
            a2, logp2 = actor.sample(b["next_obs"])
            y = soft_target(self.nets["critic_target"](b["next_obs"], a2).squeeze(-1), logp2, b["rew"],
                            b["discount"], torch.tensor(hp.lam))
        q = critic(b["obs"], b["act"]).squeeze(-1)  # (2, B)
        qf_loss = critic_mse(q, y)
        with frozen(critic):
            a, logp, u, mu, log_std = actor.sample_u(b["obs"])
            logp_old = old.log_prob_u(b["obs"], u)  # pi_k's density of the same action; gradient flows via u
            actor_loss = mdpo_actor_loss(logp, logp_old, critic(b["obs"], a)[0].squeeze(-1), kl_coef=hp.kl_coef,
                                         lam=hp.lam)
            reg = hp.reg * (mu.pow(2).mean() + log_std.pow(2).mean())
        opt = self.opts["all"]
        opt.zero_grad(set_to_none=True)
        (qf_loss + actor_loss + reg).backward()
        opt.step()
        polyak(self.nets["critic_target"], critic, hp.tau)
        return {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q.detach().mean(),
                "losses/actor_loss": actor_loss.detach(), "losses/entropy": -logp.detach().mean(),
                "losses/kl_old": (logp - logp_old).detach().mean()}
