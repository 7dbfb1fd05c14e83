"""Diagnostics of off-policyness: ESS, ratio quantiles, entropy, staleness.

Pure functions of tensors; every result is a detached 0-d tensor (or a dict of
them) so the learner can sync all metrics once per step. Registered in
``DIAGNOSTICS`` under their function names.

Empty inputs (nothing valid under the mask) never give NaN: ESS is 1 (no
evidence of weight degeneracy) and every other statistic is 0.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import masked_max, masked_mean
from offpolicy.objectives.registry import Registry

DIAGNOSTICS = Registry("diagnostic")


@DIAGNOSTICS.register("ess", summary="normalised effective sample size of importance weights")
@torch.no_grad()
def ess(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised ESS ``(Σw)² / (n Σw²)`` in (0, 1] of the weights ``w = exp(log_w)``.

    ``log_w`` is (B, T) per token or (B,) per sequence, ``mask`` has the same shape
    and selects the ``n`` weights that count. Computed in log space,
    ``exp(2·LSE(log_w) − LSE(2·log_w) − log n)``, so weights of ``e^{±50}`` (or
    more) neither overflow nor underflow. 1 when all weights are equal; ``1/n``
    when one weight dominates; 1 when nothing is selected.
    """
    sel = mask.bool()
    lw = torch.where(sel, log_w.detach().to(torch.float64), torch.full(log_w.shape, -math.inf, dtype=torch.float64,
                                                                        device=log_w.device))  # float64: exact
    n = sel.sum().to(torch.float64)
    log_ess = 2 * torch.logsumexp(lw.flatten(), 0) - torch.logsumexp(2 * lw.flatten(), 0) - n.clamp(min=1).log()
    one = torch.ones((), dtype=torch.float64, device=log_w.device)
    return torch.where(n > 0, log_ess.exp().clamp(max=1.0), one).to(torch.float32)  # no host sync


def _quantile(sorted_vals: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of the first ``n`` entries of an ascending 1-D tensor (n a 0-d tensor)."""
    pos = q * (n - 1).clamp(min=0).to(torch.float64)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo).to(sorted_vals.dtype)


@DIAGNOSTICS.register("ratio_quantiles", summary="p50/p90/p99/max of a log importance ratio over valid tokens")
@torch.no_grad()
def ratio_quantiles(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantiles ``p50, p90, p99, max`` of ``log_ratio`` over valid entries (log scale).

    Returned on the log scale (what the learner logs as ``offpolicy/log_ratio_*``);
    ``exp`` of each value is the corresponding quantile of the ratio itself, since
    ``exp`` is monotone. All zeros when nothing is valid. Sort-based (``torch.quantile``
    caps its input size) and free of host syncs: invalid entries sort last as +inf.
    """
    sel = mask.bool().flatten()
    if sel.numel() == 0:
        zero = torch.zeros((), device=log_ratio.device)
        return {"p50": zero, "p90": zero.clone(), "p99": zero.clone(), "max": zero.clone()}
    x = log_ratio.detach().float().flatten()
    s = torch.sort(torch.where(sel, x, torch.full_like(x, math.inf))).values
    n = sel.sum()
    out = {"p50": _quantile(s, n, 0.5), "p90": _quantile(s, n, 0.9), "p99": _quantile(s, n, 0.99),
           "max": _quantile(s, n, 1.0)}
    return {k: torch.where(n > 0, v, torch.zeros_like(v)) for k, v in out.items()}


@DIAGNOSTICS.register("masked_entropy_from_logits", summary="mean per-token entropy of the softmax over valid tokens")
@torch.no_grad()
def masked_entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of ``H_t = −Σ_v p_v log p_v`` with ``p = softmax(logits)``; logits (B, T, V).

    ``-inf`` logits (masked vocabulary) contribute 0, not NaN.
    """
    logp = torch.log_softmax(logits.detach().float(), dim=-1)  # (B, T, V)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # (B, T)
    return masked_mean(h, mask)


@DIAGNOSTICS.register("staleness_stats", summary="mean/max policy-version lag of valid tokens")
@torch.no_grad()
def staleness_stats(versions: torch.Tensor, current_version: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``current_version − versions`` over valid tokens: ``{"mean", "max"}`` (float, 0 when empty).

    ``versions`` (B, T) long is the policy version that sampled each token; 0 means
    on-policy. Negative values (a token from the future) are reported as they are,
    so a bookkeeping bug shows up instead of being clamped away.
    """
    lag = (current_version - versions).to(torch.float32)  # (B, T)
    return {"mean": masked_mean(lag, mask), "max": masked_max(lag, mask)}
