"""Shared pieces of the policy losses: the ``POLICY_LOSSES`` registry, ratio metrics and PPO's clipped surrogate.

Contract (the learner relies on it exactly):

* registered with ``needs`` (optional inputs it must be given, from
  ``old_logp, behavior_logp, ref_logp, is_expert, rewards, group_index``),
  ``default_agg`` (a name in ``AGGREGATIONS``), ``paper`` and ``summary`` (the
  one-line delta from its baseline); ``optional`` lists inputs it accepts but
  does not require (``grpo`` takes ``ref_logp`` when a reference model exists);
* called with keyword tensors only: ``logp`` (B, T) with grad, ``advantages``
  (B, T), ``mask`` (B, T) float 0/1, the inputs in ``needs``, and keyword scalar
  hyperparameters whose defaults are the paper's;
* returns ``(loss_tok (B, T), metrics)``: ``loss_tok`` is exactly 0 where
  ``mask`` is 0 and is aggregated by a separate step; ``metrics`` maps unprefixed
  names (``clip_frac``, ``ratio_mean``, ...) to detached 0-d tensors;
* may be registered with ``zero_rows``: a pure function ``(advantages, mask,
  **hyperparameters) -> (B,) bool`` naming the rows whose loss is exactly 0 for
  *any* log-probs (so their gradient is 0). The learner then skips their forward
  and backward pass (``rl.skip_zero_rows``); it must never name a row that could
  contribute.

Every ``L`` is a loss to *minimise*. ``r = exp(ℓ − ℓ^old)`` is the ratio to the
proximal policy, computed from a masked, clamped log-ratio (see
``corrections.token_log_ratio``) so padded tokens and log-ratios up to ±50
never give inf/NaN. Metrics common to ratio-based losses: ``ratio_mean`` and
``ratio_max`` of r over valid tokens, and ``approx_kl`` = mean k3 estimate of
KL(π_old ‖ π_θ), i.e. mean of ``(r − 1) − log r``.
"""

from __future__ import annotations

import torch

from offpolicy.objectives.aggregate import masked, masked_max, masked_mean
from offpolicy.objectives.registry import Registry


POLICY_LOSSES = Registry("policy loss")

GSPO_LOG_RATIO_MAX = 10.0  # verl clamps GSPO's (token-)sequence log-ratio at 10 (also used by ctpo)


# ---- shared pieces -------------------------------------------------------------------------
def zero_advantage_rows(advantages: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """``zero_rows`` of a loss that is ``Â`` times something finite: rows whose valid tokens all have ``Â = 0``."""
    return ((advantages == 0) | (mask == 0)).all(-1)


@torch.no_grad()
def ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``ratio_mean``, ``ratio_max`` and ``approx_kl`` (k3 of KL(old‖θ)) over valid tokens."""
    lr = log_ratio.detach()
    r = lr.exp()
    return {"ratio_mean": masked_mean(r, mask), "ratio_max": masked_max(r, mask),
            "approx_kl": masked_mean(r - 1 - lr, mask)}


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0 <= clip_low <= 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                      clip_low: float, clip_high: float,
                      dual_clip: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's pessimistic clipped surrogate on a given (masked, clamped) log-ratio.

    ``L = max(−Â r, −Â clip(r, 1 − clip_low, 1 + clip_high))``; with ``dual_clip = c``,
    tokens with ``Â < 0`` take ``min(L, −c Â)`` (the loss of a negative token is
    capped at ``c|Â|``, so a huge ratio cannot blow it up).
    Metrics: ``clip_frac_high`` (Â > 0 and r > 1 + clip_high), ``clip_frac_low``
    (Â < 0 and r < 1 − clip_low), ``clip_frac`` = their sum (tokens whose gradient
    is cut by the clip), and ``clip_frac_dual`` when dual clip is on.
    """
    _check_clip(clip_low, clip_high)
    ratio = log_ratio.exp()  # (B, T), ≤ e^20 by the clamp
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(pg1, pg2)
    with torch.no_grad():
        high = (advantages > 0) & (ratio > 1 + clip_high)
        low = (advantages < 0) & (ratio < 1 - clip_low)
        metrics = {"clip_frac_high": masked_mean(high.float(), mask), "clip_frac_low": masked_mean(low.float(), mask)}
        metrics["clip_frac"] = metrics["clip_frac_high"] + metrics["clip_frac_low"]
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (it caps ratios above 1 + clip_high), got {dual_clip}")
        pg3 = -advantages * dual_clip
        with torch.no_grad():
            metrics["clip_frac_dual"] = masked_mean(((advantages < 0) & (pg3 < loss)).float(), mask)
        loss = torch.where(advantages < 0, torch.minimum(loss, pg3), loss)
    metrics.update(ratio_metrics(log_ratio, mask))
    return masked(loss, mask), metrics
