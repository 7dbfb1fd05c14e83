"""Clipped and soft-gated ratio surrogates (PPO family): ppo_clip, grpo, dr_grpo, dapo, sapo, cispo.

See ``losses/common.py`` for the contract every loss follows.
"""

from __future__ import annotations

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.corrections import token_log_ratio
from offpolicy.objectives.kl import k3
from offpolicy.objectives.losses.common import (POLICY_LOSSES, _check_clip, clipped_surrogate, ratio_metrics,
                                               zero_advantage_rows)


# ---- clipped surrogates (PPO family) -------------------------------------------------------
@POLICY_LOSSES.register("ppo_clip", needs=("old_logp",), default_agg="token-mean", paper="arXiv:1707.06347",
                        summary="clipped ratio surrogate; asymmetric clip bounds and optional dual clip",
                        zero_rows=zero_advantage_rows)
def ppo_clip(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
             clip_low: float = 0.2, clip_high: float = 0.2,
             dual_clip: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO-clip: ``L = max(−Â r, −Â clip(r, 1 − ε_l, 1 + ε_h))``, ``r = exp(ℓ − ℓ^old)``.

    Defaults ε_l = ε_h = 0.2 (PPO). ``dual_clip`` = c (None = off; 3.0 in verl,
    arXiv:1912.09729) caps the loss of ``Â < 0`` tokens at ``−c Â``. On-policy
    (``ℓ^old = sg[ℓ]``) the gradient is exactly reinforce's ``−Â ∇ℓ``.
    """
    check_shapes("ppo_clip", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    lr = token_log_ratio(logp, old_logp, mask)
    return clipped_surrogate(lr, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


@POLICY_LOSSES.register("grpo", needs=("old_logp",), optional=("ref_logp",), default_agg="seq-mean-token-mean",
                        paper="arXiv:2402.03300",
                        summary="ppo_clip + β·k3 KL to a frozen reference added to the loss; per-response mean")
def grpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         ref_logp: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
         kl_coef: float = 0.04) -> tuple[torch.Tensor, dict]:
    """GRPO: ``L = max(−Â r, −Â clip(r, 1 − ε, 1 + ε)) + β D``, ``D = exp(ℓ^ref − ℓ) − (ℓ^ref − ℓ) − 1``.

    Defaults ε = 0.2 ([S]: the paper never states ε), β = ``kl_coef`` = 0.04 [P];
    aggregation SMTM (``1/|y_i|`` then ``1/G``). Use with the ``grpo`` advantage.
    The KL term is added only when ``ref_logp`` is given and ``kl_coef > 0``;
    ``ref_logp`` is optional (``optional=("ref_logp",)``), so without a reference
    model GRPO runs as ppo_clip with SMTM. Do not also set the learner's own
    ``rl.kl_coef`` or the KL is counted twice. Metric ``kl_ref``: mean D.
    """
    loss, metrics = ppo_clip(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                             clip_low=clip_low, clip_high=clip_high)
    if ref_logp is not None and kl_coef > 0:
        check_shapes("grpo", logp=logp, ref_logp=ref_logp)
        kl = masked(k3(logp, ref_logp), mask)  # (B, T)
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = masked_mean(kl.detach(), mask)
    return loss, metrics


@POLICY_LOSSES.register("dr_grpo", needs=("old_logp",), default_agg="seq-mean-token-sum-norm",
                        paper="arXiv:2503.20783",
                        summary="grpo without the 1/|y| length normalisation (constant L_max) and without KL",
                        zero_rows=zero_advantage_rows)
def dr_grpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
            clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Dr. GRPO: the ppo_clip token loss, aggregated as ``Σ_{i,t} m·L / (B·L_max)`` (CN).

    Use with the ``dr_grpo`` (mean-only) advantage. Delta vs grpo: no ``1/|y_i|``
    (removes the length bias), no std in the advantage, no KL. ε = 0.2.
    """
    return ppo_clip(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                    clip_low=clip_low, clip_high=clip_high)


@POLICY_LOSSES.register("dapo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2503.14476",
                        summary="ppo_clip with clip-higher (ε_h = 0.28), token-mean, no KL",
                        zero_rows=zero_advantage_rows)
def dapo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         clip_low: float = 0.2, clip_high: float = 0.28,
         dual_clip: float | None = None) -> tuple[torch.Tensor, dict]:
    """DAPO's loss: ``L = max(−Â r, −Â clip(r, 1 − 0.2, 1 + 0.28))``, aggregated token-mean.

    Delta vs grpo: decoupled clip-higher ε_h = 0.28 (keeps low-probability tokens
    rising: less entropy collapse), token-level mean over the whole batch, no KL.
    DAPO's other two parts are not losses: dynamic sampling (keep groups with
    ``0 < #correct < G``) is the recipe's ``rl.drop_uninformative_groups``, and
    overlong shaping is ``advantages.overlong_penalty`` added to the reward.
    """
    return ppo_clip(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                    clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


# ---- soft gate and clipped weights ---------------------------------------------------------
@POLICY_LOSSES.register("sapo", needs=("old_logp",), default_agg="seq-mean-token-mean", paper="arXiv:2511.20347",
                        summary="soft sigmoid gate (4/τ)σ(τ(r−1)) replaces ppo's hard clip; τ_neg > τ_pos")
def sapo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         tau_pos: float = 1.0, tau_neg: float = 1.05) -> tuple[torch.Tensor, dict]:
    """SAPO: ``L = −f(r) Â`` with ``f(r) = (4/τ) σ(τ (r − 1))``, ``τ = τ_pos if Â > 0 else τ_neg``.

    ``∂f/∂ℓ = 4σ(1−σ) r`` is 1 at r = 1 (plain policy gradient on-policy) and decays
    smoothly as r leaves 1, instead of dropping to 0 at the clip edge. Defaults
    τ_pos = 1.0, τ_neg = 1.05 [C/S]. Aggregation SMTM: verl's implementation quotes
    the paper's Eq. 5 with ``1/|y_i|`` (ALGORITHMS.md lists the paper's choice as
    [NF] and Trinity/AReaL use token-mean; pass ``token-mean`` to match those).
    Metric ``gate_weight_mean``: mean gradient weight ``4σ(1−σ)r`` (1 = no damping).
    """
    check_shapes("sapo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"sapo needs tau_pos, tau_neg > 0, got {tau_pos}, {tau_neg}")
    lr = token_log_ratio(logp, old_logp, mask)
    ratio = lr.exp()
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    sig = torch.sigmoid(tau * (ratio - 1))
    loss = -(4 / tau) * sig * advantages
    metrics = ratio_metrics(lr, mask)
    metrics["gate_weight_mean"] = masked_mean((4 * sig * (1 - sig) * ratio).detach(), mask)
    return masked(loss, mask), metrics


@POLICY_LOSSES.register("cispo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2506.13585",
                        summary="REINFORCE weighted by the stop-grad clipped ratio: clipped tokens keep a gradient",
                        zero_rows=zero_advantage_rows)
def cispo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
          clip_low: float = 1.0, clip_high: float = 0.28, mask_clipped: bool = False) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1): ``L = −sg[clip(r, 1 − ε_l, 1 + ε_h)] Â ℓ``, token-mean.

    Delta vs ppo_clip: the *weight* is clipped, not the surrogate, so no token loses
    its gradient. The paper sets no lower bound (ε_l = 1 → clip at 0) and tunes only
    ε_h; 0.28 is Trinity's default [C] (the paper's value is [NF]).
    ``mask_clipped=True`` is the paper's unified form (Eq. 7, and Trinity's code):
    also zero tokens with ``Â > 0, r > 1 + ε_h`` or ``Â < 0, r < 1 − ε_l``.
    Metric ``clip_frac``: tokens whose weight was clipped.
    """
    check_shapes("cispo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    _check_clip(clip_low, clip_high)
    lr = token_log_ratio(logp, old_logp, mask)
    with torch.no_grad():
        ratio = lr.exp()
        w = ratio.clamp(1 - clip_low, 1 + clip_high)
        if mask_clipped:
            cut = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
            w = torch.where(cut, torch.zeros_like(w), w)
        coef = w * advantages
    metrics = {"clip_frac": masked_mean((ratio != ratio.clamp(1 - clip_low, 1 + clip_high)).float(), mask)}
    metrics.update(ratio_metrics(lr, mask))
    return masked(-coef * logp, mask), metrics
