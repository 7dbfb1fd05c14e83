"""PPO (clipped surrogate, GAE) for continuous control, and the on-policy loop that PROPS reuses.

Paper: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347; the implementation
follows CleanRL's ``ppo_continuous_action.py`` (Huang et al., "The 37 Implementation Details of PPO").

Delta from SAC: on-policy. No replay: each iteration collects ``num_steps`` steps per env with the
current Gaussian policy (state-independent log-std, no tanh; the env clips), then runs ``update_epochs``
epochs of minibatch SGD on that batch only and discards it. No Q-functions: a state-value critic and GAE
advantages; no entropy temperature (a fixed ``ent_coef``).

    r_t     = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    L_clip  = -mean( min( r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t ) )            (A_t normalised per minibatch)
    L_V     = 0.5 mean( max( (V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2 ) )
    L       = L_clip + c_V L_V - c_H mean(H[pi_theta])
    A_t     = sum_k (gamma lambda)^k delta_{t+k},  delta_t = r_t + gamma (1 - term_t) V(s'_t) - V(s_t)

GAE here stops at every episode end but bootstraps truncated episodes from V of the real final observation
(CleanRL treats a truncation as a termination). Observations and rewards are normalised by running
statistics (CleanRL's NormalizeObservation / NormalizeReward wrappers, clipped to +-10); the statistics
are module buffers, so checkpoints and ``eval`` carry them.

Defaults (CleanRL): 2 x 64 tanh actor and critic, orthogonal init; Adam lr 3e-4 (eps 1e-5) annealed
linearly to 0; 2048 steps per iteration; 10 epochs x 32 minibatches; gamma 0.99; GAE lambda 0.95; clip 0.2
(also for the value); c_V 0.5; c_H 0; max grad norm 0.5.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn

from offpolicy.control import checkpoint as ckpt
from offpolicy.control.config import ControlConfig, Strict, dump_control_config
from offpolicy.control.envs import Envs, evaluate
from offpolicy.control.nets import activation
from offpolicy.control.report import MetricsLog, Progress, plot_returns, to_floats


class PPOConfig(Strict):
    hidden: list[int] = Field(default_factory=lambda: [64, 64])  # actor and critic widths
    activation: str = "tanh"  # hidden activation
    lr: float = 3e-4  # Adam learning rate (eps 1e-5)
    anneal_lr: bool = True  # linear decay to 0 over the run
    num_steps: int = Field(2048, ge=1)  # steps per env per iteration
    gamma: float = 0.99  # discount
    gae_lambda: float = 0.95  # GAE lambda
    num_minibatches: int = Field(32, ge=1)  # minibatches per epoch
    update_epochs: int = Field(10, ge=0)  # epochs per iteration
    norm_adv: bool = True  # normalise advantages per minibatch
    clip_coef: float = 0.2  # ratio clip eps
    clip_vloss: bool = True  # clip the value update as well
    ent_coef: float = 0.0  # entropy bonus c_H
    vf_coef: float = 0.5  # value loss weight c_V
    max_grad_norm: float = 0.5  # global gradient-norm clip
    target_kl: float | None = None  # stop the epochs early when approx KL exceeds this
    norm_obs: bool = True  # running observation normalisation (clipped to +-10)
    norm_reward: bool = True  # running return-scale reward normalisation (clipped to +-10)
    sampling_error_every: int = Field(0, ge=0)  # iterations between PROPS's sampling-error measurements (0 = off)
    sampling_error_epochs: int = Field(2000, ge=1)  # full-batch Adam steps fitting the empirical policy
    sampling_error_lr: float = 1e-3  # their Adam lr (linearly decayed to 0)


# ----- the math: pure functions of tensors -----
def gae(rew: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, term: torch.Tensor, end: torch.Tensor,
        gamma: float, lam: float) -> torch.Tensor:
    """GAE over (T, N) tensors ordered in time; ``next_values`` = V(real next obs); stops at every ``end``."""
    adv, last = torch.zeros_like(rew), torch.zeros_like(rew[0])
    for t in reversed(range(rew.shape[0])):
        delta = rew[t] + gamma * next_values[t] * (1.0 - term[t]) - values[t]
        last = delta + gamma * lam * (1.0 - end[t]) * last
        adv[t] = last
    return adv


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, value: torch.Tensor,
             old_value: torch.Tensor, ret: torch.Tensor, entropy: torch.Tensor, *, clip_coef: float,
             clip_vloss: bool, vf_coef: float, ent_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate + (clipped) value loss - entropy bonus; all (B,). ``adv`` is used as given."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    v_loss = (value - ret).pow(2)
    if clip_vloss:
        v_clipped = old_value + (value - old_value).clamp(-clip_coef, clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - ret).pow(2))
    v_loss = 0.5 * v_loss.mean()
    ent = entropy.mean()
    with torch.no_grad():
        stats = {"losses/policy_loss": pg_loss.detach(), "losses/value_loss": v_loss.detach(),
                 "losses/entropy": ent.detach(), "losses/approx_kl": ((ratio - 1) - logratio).mean(),
                 "losses/clipfrac": ((ratio - 1).abs() > clip_coef).float().mean()}
    return pg_loss - ent_coef * ent + vf_coef * v_loss, stats


# ----- networks -----
def _layer(d_in: int, d_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(sizes: list[int], act: str, last_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        layers.append(_layer(sizes[i], sizes[i + 1], last_std if last else math.sqrt(2)))
        if not last:
            layers.append(activation(act)())
    return nn.Sequential(*layers)


class GaussianPolicy(nn.Module):
    """N(mu(s), diag(exp(log_std))^2) with a state-independent log-std (CleanRL)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], act: str) -> None:
        super().__init__()
        self.mean = _mlp([obs_dim, *hidden, act_dim], act, 0.01)
        self.log_std = nn.Parameter(torch.zeros(1, act_dim))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mu = self.mean(obs)
        return torch.distributions.Normal(mu, self.log_std.expand_as(mu).exp())

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).log_prob(action).sum(-1)


def sampling_error(policy: GaussianPolicy, obs: torch.Tensor, act: torch.Tensor, epochs: int = 2000,
                   lr: float = 1e-3) -> torch.Tensor:
    """PROPS's sampling error of the data (obs, act) w.r.t. ``policy``: an estimate of KL(pi_D || pi_theta).

    pi_D, the empirical policy, is the maximum-likelihood fit of the data within ``policy``'s family started
    from ``policy`` itself, with the hidden (feature) layers frozen: only the mean's last linear layer and the
    log-std move (full-batch Adam, lr linearly decayed to 0 over ``epochs``). Then

        sampling_error = mean over the data of  log pi_D(a|s) - log pi_theta(a|s).

    0 means the data look exactly like pi_theta's own samples; on-policy sampling of a finite batch is never
    0. This is the authors' ``compute_se`` (github.com/NicholasCorrado/PROPS, ``ppo_continuous.py``; 2000
    epochs, Adam 1e-3 with linear decay, frozen features as in ROS). For a state-independent Gaussian the
    fitted pi_D is the sample mean / (biased) std and the estimate equals the closed-form KL between the two
    Gaussians exactly (tested). Uses no random numbers: training is unaffected.
    """
    with torch.no_grad():
        feats = policy.mean[:-1](obs)  # frozen features, computed once
        logp_target = policy.log_prob(obs, act)
    last = policy.mean[-1]
    w, b = last.weight.detach().clone().requires_grad_(), last.bias.detach().clone().requires_grad_()
    log_std = policy.log_std.detach().clone().requires_grad_()
    opt = torch.optim.Adam([w, b, log_std], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=epochs)

    def logp_empirical() -> torch.Tensor:
        mu = torch.nn.functional.linear(feats, w, b)
        return torch.distributions.Normal(mu, log_std.expand_as(mu).exp()).log_prob(act).sum(-1)

    with torch.enable_grad():
        for _ in range(epochs):
            loss = -logp_empirical().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (logp_empirical() - logp_target).mean()


class RunningMeanStd(nn.Module):
    """Running mean / variance (parallel update, float64 buffers, checkpointed with the nets)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        b_mean, b_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, tot = b_mean - self.mean, self.count + n
        m2 = self.var * self.count + b_var * n + delta.pow(2) * self.count * n / tot
        self.mean += delta * n / tot
        self.var.copy_(m2 / tot)
        self.count.copy_(tot)


class PPOAgent:
    """Actor, critic and the observation / reward normalisers. ``act`` takes raw observations."""

    def __init__(self, obs_dim: int, act_dim: int, hp: PPOConfig) -> None:
        self.hp = hp
        actor = GaussianPolicy(obs_dim, act_dim, hp.hidden, hp.activation)
        critic = _mlp([obs_dim, *hp.hidden, 1], hp.activation, 1.0)
        self.nets = nn.ModuleDict({"actor": actor, "critic": critic, "obs_rms": RunningMeanStd((obs_dim,)),
                                   "ret_rms": RunningMeanStd(())})
        self.opts = {"ppo": torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=hp.lr, eps=1e-5)}

    def normalize_obs(self, obs: np.ndarray | torch.Tensor, update: bool) -> torch.Tensor:
        x = torch.as_tensor(obs, dtype=torch.float32)
        if not self.hp.norm_obs:
            return x
        rms = self.nets["obs_rms"]
        if update:
            rms.update(x)
        return ((x - rms.mean) / torch.sqrt(rms.var + 1e-8)).clamp(-10, 10).float()

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        x = self.normalize_obs(obs, update=False)
        d = self.nets["actor"].dist(x)
        return (d.mean if deterministic else d.sample()).clamp(-1.0, 1.0)


def ppo_update(agent: PPOAgent, data: dict[str, torch.Tensor], hp: PPOConfig) -> dict[str, torch.Tensor]:
    """``update_epochs`` epochs of minibatch SGD on a flattened batch (obs, act, logp, adv, ret, value)."""
    actor, critic, opt = agent.nets["actor"], agent.nets["critic"], agent.opts["ppo"]
    params = [*actor.parameters(), *critic.parameters()]
    n = data["obs"].shape[0]
    mb = max(1, n // hp.num_minibatches)
    stats: dict[str, torch.Tensor] = {}
    for _ in range(hp.update_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, mb):
            idx = perm[start:start + mb]
            adv = data["adv"][idx]
            if hp.norm_adv and len(idx) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            dist = actor.dist(data["obs"][idx])
            loss, stats = ppo_loss(dist.log_prob(data["act"][idx]).sum(-1), data["logp"][idx], adv,
                                   critic(data["obs"][idx]).squeeze(-1), data["value"][idx], data["ret"][idx],
                                   dist.entropy().sum(-1), clip_coef=hp.clip_coef, clip_vloss=hp.clip_vloss,
                                   vf_coef=hp.vf_coef, ent_coef=hp.ent_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
        if hp.target_kl is not None and stats["losses/approx_kl"] > hp.target_kl:
            break
    return stats
