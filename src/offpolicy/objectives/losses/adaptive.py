"""Adaptive clipping and token selection: bapo, kl_cov, clip_cov, m2po.

See ``losses/common.py`` for the contract every loss follows.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.corrections import token_log_ratio
from offpolicy.objectives.losses.common import POLICY_LOSSES, clipped_surrogate, ratio_metrics


# ---- adaptive clipping / token selection ---------------------------------------------------
BAPO_RHO_DENOMINATORS = ("sum_abs", "abs_sum")


def _absolute_clip(ratio: torch.Tensor, advantages: torch.Tensor, c_low: torch.Tensor | float,
                   c_high: torch.Tensor | float) -> torch.Tensor:
    """``max(−Â r, −Â clamp(r, c_low, c_high))`` with absolute ratio bounds (may be 0-d tensors)."""
    lo = torch.as_tensor(c_low, dtype=ratio.dtype, device=ratio.device)
    hi = torch.as_tensor(c_high, dtype=ratio.dtype, device=ratio.device)
    return torch.maximum(-advantages * ratio, -advantages * torch.minimum(torch.maximum(ratio, lo), hi))


@POLICY_LOSSES.register("bapo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2510.18927",
                        summary="ppo clip with absolute bounds widened per batch until positive tokens carry ≥ ρ0 "
                                "of the objective")
def bapo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         rho_target: float = 0.4, low_start: float = 0.6, low_max: float = 0.9, high_start: float = 1.2,
         high_max: float = 3.0, high_step: float = 0.05, low_step: float = 0.02,
         rho_denominator: str = "sum_abs") -> tuple[torch.Tensor, dict]:
    """BAPO (paper version [P]): ``L = max(−Â r, −Â clip(r, c_low, c_high))`` with bounds chosen on this batch.

    With the per-token contribution ``u_t = min(r Â, clip(r, c_l, c_h) Â)`` (for Â > 0
    it equals the numerator's ``min(rÂ, clip(r, 0, c_h)Â) = Â min(r, c_h)``; for Â < 0
    it is ``Â max(r, c_l)``), the positive share ρ is (``rho_denominator``):

    * ``"sum_abs"`` (default): ``ρ = Σ_{Â>0} u_t / Σ_t |u_t|`` = P / (P + N), the
      positive fraction of the total loss magnitude, in [0, 1];
    * ``"abs_sum"``: ``ρ = |Σ_{Â>0} u_t| / |Σ_t u_t|`` = P / |P − N|, Eq. 8 as printed.

    Why ``sum_abs`` is the default: Eq. 8 calls ρ0 "the target contribution of
    positive signals to the policy gradient loss", and the authors' code
    (``recipe/bapo/policy_loss.py``) compares the *sums of magnitudes* of the two
    signs (``pos/neg ≥ 1``, i.e. P / (P + N) ≥ 0.5, the README's ρ0 = 0.5). As
    printed, negatives cancel positives in the denominator: ρ0 = 0.4 is met with
    N = 3.5 P (negatives outweigh positives 3.5:1), and ρ can exceed 1. The
    paper's ``π_rollout(y_t)`` factor is the sampling expectation, i.e. the sum
    over sampled tokens here.

    Algorithm 1: start at ``(c_l, c_h) = (a⁻, a⁺) = (0.6, 1.2)``; while ``ρ < ρ0 = 0.4``
    and ``c_l + δ₂ ≤ b⁻ = 0.9``: raise ``c_h`` by ``δ₁ = 0.05`` up to ``b⁺ = 3.0``, after
    that raise ``c_l`` by ``δ₂ = 0.02``. Bounds are recomputed from the start values
    every call (no state), evaluated for every step of the path without a host
    sync. The official code's other differences (c_low raised first, dual clip 3,
    all-reduced sums) are not implemented. Metrics add ``c_low``, ``c_high``, ``rho``.
    """
    check_shapes("bapo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if rho_denominator not in BAPO_RHO_DENOMINATORS:
        raise ValueError(f"bapo rho_denominator={rho_denominator!r}; valid: {list(BAPO_RHO_DENOMINATORS)}")
    if not (0 <= low_start <= low_max <= 1 <= high_start <= high_max and high_step > 0 and low_step > 0):
        raise ValueError("bapo needs 0 <= low_start <= low_max <= 1 <= high_start <= high_max and positive steps")
    lr = token_log_ratio(logp, old_logp, mask)
    with torch.no_grad():
        r, A, m = lr.exp(), advantages, mask.to(lr.dtype)
        n_low = int(math.floor((low_max - low_start) / low_step + 1e-9))
        n_high = int(math.floor((high_max - high_start) / high_step + 1e-9)) if n_low > 0 else 0
        path = [(low_start, high_start + k * high_step) for k in range(n_high + 1)]
        path += [(low_start + k * low_step, path[-1][1]) for k in range(1, n_low + 1)]
        pos = m * (A > 0).to(m.dtype)
        rhos = []
        for c_l, c_h in path:  # ≤ ~52 cheap passes; no .item()
            num = (pos * torch.minimum(r * A, r.clamp(0, c_h) * A)).sum().abs()
            u = m * torch.minimum(r * A, r.clamp(c_l, c_h) * A)  # (B, T) per-token contribution
            den = u.abs().sum() if rho_denominator == "sum_abs" else u.sum().abs()
            rhos.append(torch.where(den > 0, num / den.clamp(min=1e-30), torch.full_like(num, math.inf)))
        rho = torch.stack(rhos)  # (K,)
        ok = rho >= rho_target
        k = torch.where(ok.any(), ok.to(torch.int64).argmax(), torch.tensor(len(path) - 1, device=rho.device))
        bounds = torch.tensor(path, dtype=lr.dtype, device=lr.device)[k]  # (2,)
    loss = _absolute_clip(lr.exp(), advantages, bounds[0], bounds[1])
    with torch.no_grad():
        metrics = {"clip_frac_high": masked_mean(((A > 0) & (r > bounds[1])).float(), mask),
                   "clip_frac_low": masked_mean(((A < 0) & (r < bounds[0])).float(), mask)}
        metrics["clip_frac"] = metrics["clip_frac_high"] + metrics["clip_frac_low"]
        metrics.update({"c_low": bounds[0], "c_high": bounds[1], "rho": rho[k].clamp(max=1e6)})
    metrics.update(ratio_metrics(lr, mask))
    return masked(loss, mask), metrics


def _token_cov(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(Â − mean Â)(sg[ℓ] − mean sg[ℓ])`` with means over valid tokens; −inf on padding. (B, T)."""
    a, l = advantages.detach(), masked(logp.detach(), mask)
    cov = (a - masked_mean(a, mask)) * (l - masked_mean(l, mask))
    return torch.where(mask.bool(), cov, torch.full_like(cov, -math.inf))


@POLICY_LOSSES.register("kl_cov", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2505.22617",
                        summary="unclipped −Â r, plus β|ℓ − ℓ_old| on the top-k·N tokens by Cov(ℓ, Â)")
def kl_cov(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
           kl_cov_ratio: float = 2e-4, ppo_kl_coef: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KL-Cov: ``L = −Â r + β |ℓ − ℓ^old|`` on the ``max(1, ⌊k N⌋)`` valid tokens with the largest
    ``Cov = (Â − mean Â)(ℓ − mean ℓ)``; ``L = −Â r`` (no clip) elsewhere. k = 2e-4, β = 1 (verl [C]).
    Metric ``kl_cov_frac``: fraction of valid tokens penalised.
    """
    check_shapes("kl_cov", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    lr = token_log_ratio(logp, old_logp, mask)
    base = -advantages * lr.exp()
    with torch.no_grad():
        cov = _token_cov(advantages, logp, mask).flatten()
        n_valid = mask.bool().sum()
        k = min(max(1, int(kl_cov_ratio * mask.numel())), mask.numel())  # static upper bound for topk
        top = torch.topk(cov, k).indices  # padding is −inf, so valid tokens come first
        k_eff = (kl_cov_ratio * n_valid).floor().clamp(min=1).to(torch.int64)  # max(1, ⌊kN⌋) of the valid
        keep = torch.arange(k, device=cov.device) < torch.minimum(k_eff, n_valid)
        sel = torch.zeros_like(cov, dtype=torch.bool).scatter_(0, top, keep)  # no boolean indexing: no host sync
        sel = sel.view_as(mask) & mask.bool()
    loss = torch.where(sel, base + ppo_kl_coef * lr.abs(), base)
    metrics = {"kl_cov_frac": masked_mean(sel.float(), mask)}
    metrics.update(ratio_metrics(lr, mask))
    return masked(loss, mask), metrics


@POLICY_LOSSES.register("clip_cov", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2505.22617",
                        summary="ppo_clip plus zero gradient on a random r·N of unclipped tokens with Cov in (lb, ub)")
def clip_cov(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
             clip_low: float = 0.2, clip_high: float = 0.2, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0,
             clip_cov_ub: float = 5.0, seed: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clip-Cov: ppo_clip, then among valid tokens *not* already clipped with ``lb < Cov < ub``
    pick ``max(1, ⌊r N⌋)`` at random and drop them from the loss (zero gradient).

    Defaults r = 2e-4, (lb, ub) = (1, 5), ε = 0.2 (verl [C]). The random pick uses
    torch's global RNG like verl (so the learner's RNG checkpointing covers it), or
    a private generator seeded with ``seed`` when given (tests). Metric
    ``cov_clip_frac``: fraction of valid tokens dropped.
    """
    check_shapes("clip_cov", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    lr = token_log_ratio(logp, old_logp, mask)
    loss, metrics = clipped_surrogate(lr, advantages, mask, clip_low=clip_low, clip_high=clip_high)
    with torch.no_grad():
        ratio = lr.exp()
        clipped = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
        cov = _token_cov(advantages, logp, mask)
        cand = mask.bool() & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        gen = torch.Generator(device=cov.device).manual_seed(seed) if seed is not None else None
        keys = torch.rand(mask.shape, generator=gen, dtype=torch.float64, device=mask.device)
        keys = torch.where(cand, keys, torch.full_like(keys, math.inf))  # only candidates can be picked
        rank = keys.flatten().argsort().argsort().view_as(mask)  # random order of the candidates
        n_pick = (clip_cov_ratio * mask.sum()).floor().clamp(min=1)  # verl: max(int(r · N), 1)
        drop = cand & (rank < n_pick)  # a uniform random subset of min(n_pick, #candidates); no host sync
        metrics["cov_clip_frac"] = masked_mean(drop.float(), mask)
    return torch.where(drop, torch.zeros_like(loss), loss), metrics


@POLICY_LOSSES.register("m2po", needs=("behavior_logp",), default_agg="token-mean", paper="arXiv:2510.01161",
                        summary="unclipped −Â r vs the behaviour policy; drop the largest (log r)² trust-region "
                                "tokens until their second moment ≤ τ")
def m2po(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, behavior_logp: torch.Tensor,
         m2_threshold: float = 0.04) -> tuple[torch.Tensor, dict]:
    """M2PO (final paper formulation, Trinity [C]): ``L = −M·r·Â``, ``r = π_θ/π_behav``, token-mean over
    *all* valid tokens (dropped tokens stay in the denominator).

    Trust-region tokens ``{Â > 0, r > 1} ∪ {Â < 0, r < 1}``: sort their ``(log r)²``
    ascending and keep the longest prefix whose mean is ≤ τ = 0.04; the rest get
    ``M = 0``; other tokens ``M = 1``. The mask is computed over the whole batch
    given (pass the full minibatch). The official repo's variant (solve for τ,
    then clip every ratio to ``[e^{−τ}, e^{τ}]``) is not implemented. Metrics:
    ``m2_before``, ``m2_after``, ``m2_masked_frac``, ``trust_region_frac``.
    """
    check_shapes("m2po", logp=logp, advantages=advantages, mask=mask, behavior_logp=behavior_logp)
    if not m2_threshold >= 0:
        raise ValueError(f"m2po m2_threshold must be >= 0, got {m2_threshold}")
    lr = token_log_ratio(logp, behavior_logp, mask)
    with torch.no_grad():
        sq = lr.square()  # (B, T)
        trust = mask.bool() & (((advantages > 0) & (lr > 0)) | ((advantages < 0) & (lr < 0)))
        vals, order = torch.sort(torch.where(trust, sq, torch.full_like(sq, math.inf)).flatten(), stable=True)
        pos = torch.arange(vals.numel(), device=vals.device)
        in_trust = pos < trust.sum()  # sorted: trust-region values first, ascending
        prefix_mean = torch.cumsum(torch.where(in_trust, vals, torch.zeros_like(vals)), 0) / (pos + 1)
        n_keep = ((prefix_mean <= m2_threshold) & in_trust).sum()  # prefix means are non-decreasing
        rank = torch.empty_like(pos).scatter_(0, order, pos).view_as(mask)
        drop = trust & (rank >= n_keep)
        kept = trust & ~drop
        metrics = {"m2_before": masked_mean(sq, trust), "m2_after": masked_mean(sq, kept),
                   "m2_masked_frac": masked_mean(drop.float(), mask),
                   "trust_region_frac": masked_mean(trust.float(), mask)}
    loss = torch.where(drop, torch.zeros_like(lr), -advantages * lr.exp())
    metrics.update(ratio_metrics(lr, mask))
    return masked(loss, mask), metrics
