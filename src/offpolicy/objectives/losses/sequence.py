"""Sequence-level ratios: gspo, gspo_token (length-normalised sequence ratio) and gmpo (geometric mean).

See ``losses/common.py`` for the contract every loss follows.
"""

from __future__ import annotations

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.corrections import token_log_ratio
from offpolicy.objectives.losses.common import GSPO_LOG_RATIO_MAX, POLICY_LOSSES, clipped_surrogate, ratio_metrics


@POLICY_LOSSES.register("gspo", needs=("old_logp",), default_agg="seq-mean-token-mean", paper="arXiv:2507.18071",
                        summary="ppo clip on the length-normalised sequence ratio s_i instead of token ratios")
def gspo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, dict]:
    """GSPO: ``L_i = max(−Â_i s_i, −Â_i clip(s_i, 1 − ε_l, 1 + ε_h))``, ``s_i = exp(mean_t(ℓ − ℓ^old))``.

    ``s_i`` carries the gradient of every token of the sequence; the sequence loss
    is written on each valid token so SMTM gives ``(1/G) Σ_i L_i``. ε = (3e-4, 4e-4)
    [S]; ``log s`` clamped at ≤ 10 (verl). Assumes a per-sequence Â (constant over a
    row); with token advantages use ``gspo_token``.
    """
    check_shapes("gspo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    lr = token_log_ratio(logp, old_logp, mask)
    log_s = masked_mean(lr, mask, dim=-1).clamp(max=GSPO_LOG_RATIO_MAX)[:, None]  # (B, 1) with grad
    return clipped_surrogate(log_s.expand_as(lr), advantages, mask, clip_low=clip_low, clip_high=clip_high)


@POLICY_LOSSES.register("gspo_token", needs=("old_logp",), default_agg="seq-mean-token-mean",
                        paper="arXiv:2507.18071",
                        summary="gspo whose ratio value is s_i but whose gradient is per token (token advantages)")
def gspo_token(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
               clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, dict]:
    """GSPO-token: ``s_{i,t} = sg[s_i] · exp(ℓ_t − sg[ℓ_t])`` in the ppo clip, ``log s_{i,t}`` clamped ≤ 10.

    Same value as ``gspo``; the gradient of token t flows only through ℓ_t, which
    allows token-level advantages. With a per-sequence Â its gradient equals
    gspo's. verl ``log s_{i,t} = sg[mean(ℓ − ℓ^old)] + ℓ − sg[ℓ]`` [C].
    """
    check_shapes("gspo_token", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    lr = token_log_ratio(logp, old_logp, mask)
    log_s = masked_mean(lr.detach(), mask, dim=-1)[:, None]  # (B, 1) sg[log s_i]
    lm = masked(logp, mask)
    log_st = masked((log_s + lm - lm.detach()).clamp(max=GSPO_LOG_RATIO_MAX), mask)
    return clipped_surrogate(log_st, advantages, mask, clip_low=clip_low, clip_high=clip_high)


@POLICY_LOSSES.register("gmpo", needs=("old_logp",), default_agg="seq-mean-token-mean", paper="arXiv:2507.20673",
                        summary="geometric instead of arithmetic mean of token ratios, clipped per token in log space")
def gmpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         clip_low: float = 0.4, clip_high: float = 0.4) -> tuple[torch.Tensor, dict]:
    """GMPO: ``L_i = −Â_i · exp(mean_t sgn(Â) min(sgn(Â) lr_t, sgn(Â) clamp(lr_t, −ε_l, ε_h)))``.

    ``lr = ℓ − ℓ^old``; the clip is per token *in log space* (ratios within
    ``(e^{−0.4}, e^{0.4})``, the paper's wider range) and pessimistic by the sign of
    Â, before the geometric mean. Written on every valid token so SMTM gives
    ``(1/B) Σ_i L_i`` (verl ``geo_mean`` [C]). Per-sequence Â = the row's mean advantage.
    Metrics: ``clip_frac_high`` (Â > 0, lr > ε_h), ``clip_frac_low`` (Â < 0, lr < −ε_l).
    """
    check_shapes("gmpo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"gmpo needs clip_low, clip_high >= 0, got {clip_low}, {clip_high}")
    lr = token_log_ratio(logp, old_logp, mask)
    sgn = torch.sign(advantages)
    lr_min = sgn * torch.minimum(sgn * lr, sgn * lr.clamp(-clip_low, clip_high))  # (B, T)
    log_rho = masked_mean(lr_min, mask, dim=-1)  # (B,)
    adv = masked_mean(advantages, mask, dim=-1)  # (B,)
    seq_loss = -adv * log_rho.exp()  # (B,)
    with torch.no_grad():
        metrics = {"clip_frac_high": masked_mean(((advantages > 0) & (lr > clip_high)).float(), mask),
                   "clip_frac_low": masked_mean(((advantages < 0) & (lr < -clip_low)).float(), mask)}
        metrics["clip_frac"] = metrics["clip_frac_high"] + metrics["clip_frac_low"]
    metrics.update(ratio_metrics(lr, mask))
    return masked(seq_loss[:, None].expand_as(lr), mask), metrics
