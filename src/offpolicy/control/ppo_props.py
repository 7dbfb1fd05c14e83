"""PPO + PROPS: Proximal Robust On-Policy Sampling — an adaptive behaviour policy and reuse of old batches.

Paper: Corrado & Hanna, "On-Policy Policy Gradient Reinforcement Learning Without On-Policy Sampling",
arXiv:2311.08290. Authors' code: github.com/NicholasCorrado/PROPS (CleanRL-based; ``update_props``).

Delta from PPO (and so from SAC: see ``ppo``): the data buffer keeps the last ``buffer_batches`` batches
of ``num_steps`` steps, and PPO trains on all of them as if on-policy (log-probs and values recomputed
under the current target policy pi_theta). The data are collected by a behaviour policy pi_phi that is reset
to pi_theta and then adapted every ``props_num_steps`` steps to make *under-sampled* actions more likely,
so that the buffer's empirical action distribution moves towards pi_theta (lower sampling error):

    r_phi    = pi_phi(a|s) / pi_theta(a|s)                 over (s, a) in the buffer
    L_PROPS  = mean( max( r_phi, clip(r_phi, 1 - eps_P, 1 + eps_P) ) ) + lambda_P mean( log pi_theta - log pi_phi )

(PPO's clipped objective with every advantage set to -1: lower the probability of actions already in the
buffer, but not beyond 1 - eps_P.) Each behaviour update trains on exactly the rows the next PPO update will
see that exist so far: the newest (b - 1) batches plus the part of the current batch collected so far (the
authors roll the oldest batch out of the slice they train on). After each gradient step the update stops if
the approximate KL(pi_theta || pi_phi) measured on that step's minibatch exceeds ``props_target_kl``.

Zero adaptation (``props_lr = 0``) with ``buffer_batches = 1`` is PPO exactly (tested bit for bit): the
behaviour policy then always equals the target policy, and PROPS's minibatch shuffles draw from their own
generator.

Sampling error (the paper's measure, for ``ppo`` and ``ppo_props`` alike): ``hp.sampling_error_every = k`` logs
``props/sampling_error`` every k iterations on the data PPO is about to train on — KL(pi_D || pi_theta) with
pi_D the maximum-likelihood policy of that data (:func:`offpolicy.control.ppo.sampling_error`).

Defaults (authors' ``ppo_continuous.py``, every version that has PROPS): props_num_steps 8, props lr 1e-3,
16 epochs, eps_P 0.3, target KL 0.1, lambda_P 0 (the KL regulariser is estimated here as mean(log pi_theta -
log pi_phi) on buffer actions; their code weights a density by probabilities, and is off by default);
buffer_batches 2 (their script's default is 1; the paper's gains come from reusing b > 1 batches). Their
script sets 16 minibatches but computes the minibatch size as ``max(B // 16, B) = B``, so each epoch is one
full-batch step; ``props_num_minibatches`` defaults to 1, which is what runs there (their later discrete script
uses real minibatches: set it to 4 for that). PPO settings as ``ppo``.
Deviation: the behaviour policy is also reset to the target right after every PPO update and adapted on the
(b - 1) retained batches (the authors' reset happens at the next PROPS update, 8 steps later, so their first 8
steps of a batch come from a behaviour policy adapted to the previous target).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from offpolicy.control.ppo import GaussianPolicy, PPOConfig


class PROPSConfig(PPOConfig):
    buffer_batches: int = Field(2, ge=1)  # b: batches of num_steps kept and trained on
    props_num_steps: int = Field(8, ge=1)  # steps between behaviour updates (must divide num_steps)
    props_lr: float = 1e-3  # behaviour Adam learning rate (0 = no adaptation: PPO with a b-batch buffer)
    props_update_epochs: int = Field(16, ge=0)  # epochs per behaviour update
    props_num_minibatches: int = Field(1, ge=1)  # minibatches per behaviour epoch (1 = full batch, as theirs)
    props_clip_coef: float = 0.3  # eps_P
    props_target_kl: float | None = 0.1  # stop when approx KL(pi_theta || pi_phi) exceeds this
    props_lambda: float = 0.0  # lambda_P: KL regulariser weight
    props_max_grad_norm: float = 0.5  # gradient-norm clip of the behaviour update


def props_loss(logp_behaviour: torch.Tensor, logp_target: torch.Tensor, *, clip_coef: float,
               lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PROPS behaviour objective on buffer actions; both (B,), ``logp_target`` a constant."""
    logratio = logp_behaviour - logp_target.detach()
    ratio = logratio.exp()
    loss = torch.max(ratio, ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean() + lam * (-logratio).mean()
    with torch.no_grad():
        stats = {"props/loss": loss.detach(), "props/approx_kl": ((ratio - 1) - logratio).mean(),
                 "props/clipfrac": ((ratio - 1).abs() > clip_coef).float().mean()}
    return loss, stats


def props_update(behaviour: GaussianPolicy, opt: torch.optim.Optimizer, obs: torch.Tensor, act: torch.Tensor,
                 logp_target: torch.Tensor, hp: PROPSConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Adapt pi_phi (already reset to pi_theta) on the buffer rows; minibatch order from ``gen``."""
    n = obs.shape[0]
    mb = max(1, n // hp.props_num_minibatches)
    stats: dict[str, torch.Tensor] = {}
    for _ in range(hp.props_update_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, mb):
            idx = perm[start:start + mb]
            loss, stats = props_loss(behaviour.log_prob(obs[idx], act[idx]), logp_target[idx],
                                     clip_coef=hp.props_clip_coef, lam=hp.props_lambda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(behaviour.parameters()), hp.props_max_grad_norm)
            opt.step()
            if hp.props_target_kl is not None and stats["props/approx_kl"] > hp.props_target_kl:
                return stats  # authors: the step is taken, then the epochs stop
    return stats
