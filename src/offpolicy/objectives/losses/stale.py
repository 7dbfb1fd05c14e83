"""Asynchronous and stale data: topr, decoupled_ppo, ctpo, minpro, vcpo.

See ``losses/common.py`` for the contract every loss follows.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.corrections import LOG_RATIO_CLAMP, prefix_min_log_ratio, token_log_ratio
from offpolicy.objectives.diagnostics import ess
from offpolicy.objectives.losses.common import GSPO_LOG_RATIO_MAX, POLICY_LOSSES, clipped_surrogate, ratio_metrics


# ---- stale / off-policy data ---------------------------------------------------------------
def topr_zero_rows(advantages: torch.Tensor, mask: torch.Tensor, *, pos_high: float = 1.0, neg_high: float = 1.0,
                   **_: object) -> torch.Tensor:
    """Rows where TOPR's coefficient ``w Â`` is 0 on every valid token whatever the ratio: ``Â = 0``, or a
    clip range ``[low, high]`` with ``high = 0`` on that side (``neg_high = 0``: positive-sample reinforcement)."""
    zero = (advantages == 0) | ((advantages > 0) & (pos_high == 0)) | ((advantages < 0) & (neg_high == 0))
    return (zero | (mask == 0)).all(-1)


@POLICY_LOSSES.register("topr", needs=("behavior_logp",), default_agg="seq-mean-token-mean", paper="arXiv:2503.14286",
                        zero_rows=topr_zero_rows,
                        summary="REINFORCE; negative sequences weighted by the truncated ratio [π/μ]_0^1, "
                                "positives by 1")
def topr(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, behavior_logp: torch.Tensor,
         ratio_level: str = "sequence", pos_low: float = 1.0, pos_high: float = 1.0,
         neg_low: float = 0.0, neg_high: float = 1.0) -> tuple[torch.Tensor, dict]:
    """TOPR: ``L_i = −sg[w_i] Â_i Σ_t ℓ_{i,t}`` (SMTM divides by ``|y_i|``), no clipping of the loss.

    ``w_i = clip(π(y_i)/μ(y_i), a, b)`` with ``[a, b] = [pos_low, pos_high] = [1, 1]``
    for ``Â ≥ 0`` (weight 1) and ``[neg_low, neg_high] = [0, 1]`` for ``Â < 0`` (the
    paper's canonical choice). ``π`` is the current policy (detached) and ``μ`` the
    behaviour policy. ``ratio_level``: ``sequence`` (paper: ``exp Σ_t(ℓ − ℓ^μ)``),
    ``geometric`` (length-normalised, a reference-framework variant [S]) or
    ``token`` (Trinity's code). Use with the ``reinforce`` advantage (``R − c``;
    the paper uses R = ±1, c = 0). Metrics: ``weight_mean``, ``pos_frac``.
    """
    check_shapes("topr", logp=logp, advantages=advantages, mask=mask, behavior_logp=behavior_logp)
    if ratio_level not in ("sequence", "geometric", "token"):
        raise ValueError(f"topr ratio_level={ratio_level!r}; valid: ['sequence', 'geometric', 'token']")
    if not (0 <= pos_low <= pos_high and 0 <= neg_low <= neg_high):
        raise ValueError("topr needs 0 <= pos_low <= pos_high and 0 <= neg_low <= neg_high")
    with torch.no_grad():
        diff = masked(logp.detach() - behavior_logp, mask)  # (B, T)
        log_w = {"sequence": lambda: diff.sum(-1, keepdim=True),
                 "geometric": lambda: masked_mean(diff, mask, dim=-1)[:, None],
                 "token": lambda: diff}[ratio_level]().expand_as(diff)
        w = log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        pos = advantages >= 0
        w = torch.where(pos, w.clamp(pos_low, pos_high), w.clamp(neg_low, neg_high))
        coef = w * advantages
        metrics = {"weight_mean": masked_mean(w, mask),
                   "pos_frac": masked_mean(pos.float(), mask)}
    return masked(-coef * logp, mask), metrics


@POLICY_LOSSES.register("decoupled_ppo", needs=("old_logp", "behavior_logp"), default_agg="token-mean",
                        paper="arXiv:2505.24298",
                        summary="ppo_clip against the proximal policy, times behaviour weight π_prox/μ "
                                "(masked above a cap)")
def decoupled_ppo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                  behavior_logp: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                  dual_clip: float | None = None,
                  behav_imp_weight_cap: float | None = None) -> tuple[torch.Tensor, dict]:
    """AReaL decoupled PPO: ``L = w^b · max(−Â u, −Â clip(u, 1 − ε, 1 + ε_h))``, ``u = exp(ℓ − ℓ^prox)``.

    ``w^b = exp(ℓ^prox − ℓ^μ)`` (detached) corrects the behaviour→proximal shift;
    tokens with ``w^b > behav_imp_weight_cap`` are *masked* (weight 0), not truncated
    (cap None = off; must be > 1; e.g. 5 [S]). ``old_logp`` is the proximal policy.
    Optional dual clip as ppo_clip. Token-mean over all valid tokens (masked tokens
    stay in the denominator) [C: areal/utils/functional.py]. Metrics add
    ``behav_weight_mean`` and ``behav_mask_frac``.
    """
    check_shapes("decoupled_ppo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                 behavior_logp=behavior_logp)
    if behav_imp_weight_cap is not None and behav_imp_weight_cap <= 1:
        raise ValueError(f"behav_imp_weight_cap must be > 1 (or None), got {behav_imp_weight_cap}")
    lr = token_log_ratio(logp, old_logp, mask)
    loss, metrics = clipped_surrogate(lr, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                      dual_clip=dual_clip)
    with torch.no_grad():
        log_wb = masked(old_logp - behavior_logp, mask)
        keep = mask.bool()
        if behav_imp_weight_cap is not None:
            keep = keep & (log_wb <= math.log(behav_imp_weight_cap))
        wb = torch.where(keep, log_wb.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp(), torch.zeros_like(log_wb))
        metrics["behav_weight_mean"] = masked_mean(wb, mask)
        metrics["behav_mask_frac"] = masked_mean((~keep).float(), mask)
    return loss * wb, metrics


@POLICY_LOSSES.register("ctpo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2605.07331",
                        summary="clip the cumulative prefix ratio (gradient through the current token only) with "
                                "log-space bounds growing as position^α")
def ctpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         mode: str = "cumprod", clip_low: float = 0.025, clip_high: float = 0.05, clip_dual: float = 0.05,
         alpha: float | None = None) -> tuple[torch.Tensor, dict]:
    """CTPO: ``λ_t = Σ_{j≤t} m_j (ℓ_j − ℓ^old_j)`` (``geomean``: divided by the valid count ``p_t``).

    ``log ρ̃_t = sg[λ_t] + ℓ_t − sg[ℓ_t]`` (≤ 10); ``ρ_c = exp(clamp(log ρ̃, −c_l p_t^α, c_h p_t^α))``
    with ``p_t`` the 1-indexed valid position; ``L = max(−Â ρ̃, −Â ρ_c)`` and, for
    ``Â < 0``, ``min(L, −Â e^{c_c p_t^α})``. Defaults c_l 0.025, c_h 0.05, c_c 0.05,
    α = 0.5 for ``cumprod`` and −0.5 for ``geomean`` [C: horizon-llm/CTPO
    ``cum-token-*-la``]. The script's extra sequence-TIS (threshold 5) is the
    learner's correction (``tis_seq`` with ``cap=5``).
    """
    check_shapes("ctpo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if mode not in ("cumprod", "geomean"):
        raise ValueError(f"ctpo mode={mode!r}; valid: ['cumprod', 'geomean']")
    alpha = (0.5 if mode == "cumprod" else -0.5) if alpha is None else alpha
    lr = token_log_ratio(logp, old_logp, mask)
    p_t = torch.cumsum(mask, dim=-1).clamp(min=1)  # (B, T) 1-indexed valid position
    lam = torch.cumsum(lr.detach(), dim=-1)  # masked lr are 0, so this sums valid tokens only
    if mode == "geomean":
        lam = lam / p_t
    lm = masked(logp, mask)
    log_rt = (lam + lm - lm.detach()).clamp(max=GSPO_LOG_RATIO_MAX)
    scale = p_t.pow(alpha)
    log_rc = torch.maximum(torch.minimum(log_rt, clip_high * scale), -clip_low * scale)
    loss = torch.maximum(-advantages * log_rt.exp(), -advantages * log_rc.exp())
    loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * (clip_dual * scale).exp()), loss)
    with torch.no_grad():
        metrics = {"clip_frac_high": masked_mean(((advantages > 0) & (log_rt > clip_high * scale)).float(), mask),
                   "clip_frac_low": masked_mean(((advantages < 0) & (log_rt < -clip_low * scale)).float(), mask)}
        metrics["clip_frac"] = metrics["clip_frac_high"] + metrics["clip_frac_low"]
        metrics["cum_log_ratio_mean"] = masked_mean(lam, mask)
    metrics.update(ratio_metrics(lr, mask))
    return masked(loss, mask), metrics


@POLICY_LOSSES.register("minpro", needs=("behavior_logp",), default_agg="token-mean", paper="arXiv:2601.22718",
                        summary="unclipped token ratio π/μ times sg[minimum token ratio of the preceding prefix] in "
                                "place of the cumulative prefix ratio (exact form [NF])")
def minpro(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
           behavior_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """MinPRO (as far as known): ``L_t = −Â · sg[min_{j<t} ρ_j] · ρ_t``, ``ρ = exp(ℓ − ℓ^μ)``.

    The exact off-policy gradient weights token t by the prefix ratio
    ``Π_{j≤t} ρ_j``; MinPRO "replaces the unstable cumulative prefix ratio with a
    non-cumulative surrogate based on the minimum token-level ratio observed in
    the preceding prefix" [P, abstract]. **[NF]**: the paper's exact objective:
    whether the minimum includes token t, where the stop-gradients sit, whether it
    is clipped, and its aggregation. Chosen here (and in the ``min_prefix``
    correction): ``Π_{j<t} ρ_j`` is replaced by ``min_{j<t} ρ_j`` (1 for the first
    valid token, no gradient), token t keeps its own ratio with gradient, no
    clipping, token-mean. μ is the sampling policy (``behavior_logp``), as in the
    paper's setting. Delta vs the exact prefix correction (``cumulative_prefix``):
    the product over the prefix becomes its minimum, so one drifted token cannot
    blow the weight up exponentially, only shrink it. The combined log-weight is clamped at ±20. On-policy (ρ ≡ 1)
    the gradient is reinforce's. Metrics: ratio metrics of ρ and
    ``prefix_min_mean`` (mean of the stop-gradient factor).
    """
    check_shapes("minpro", logp=logp, advantages=advantages, mask=mask, behavior_logp=behavior_logp)
    lr = token_log_ratio(logp, behavior_logp, mask)  # (B, T) log ρ
    log_min = prefix_min_log_ratio(lr.detach(), mask)  # (B, T) sg[log min_{j<t} ρ_j]
    w = (log_min + lr).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    metrics = ratio_metrics(lr, mask)
    metrics["prefix_min_mean"] = masked_mean(log_min.exp(), mask)
    return masked(-advantages * w, mask), metrics


@POLICY_LOSSES.register("vcpo", needs=("old_logp", "behavior_logp"), default_agg="seq-mean-token-mean",
                        paper="arXiv:2602.17616",
                        summary="sequence TIS min(w, 8) on an effectively unclipped ratio surrogate; reports the "
                                "ESS ratio that scales the learning rate")
def vcpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         behavior_logp: torch.Tensor, tis_cap: float = 8.0, clip_low: float = 1.0,
         clip_high: float = 1e9) -> tuple[torch.Tensor, dict]:
    """VCPO's loss: ``L_{i,t} = sg[min(w_i, 8)] · max(−Â r, −Â clip(r, 1 − 1, 1 + 1e9))``, SMTM.

    ``w_i = exp Σ_t (ℓ^old − ℓ^μ)`` is the sequence IS weight between the
    trainer-recomputed and the rollout-engine log-probs; ``r = exp(ℓ − ℓ^old)``.
    Delta vs ppo_clip: the clip is effectively off (``clip_low = 1.0``, ``clip_high = 1e9``)
    and relies on the TIS cap (8) and its two other parts, which are *not* in
    this function: the ESS-scaled learning rate ``lr · √min(1, ρ_ess/ρ_base)``
    (``train.controllers.VcpoLrScale``, fed with this loss's ``ess_ratio``
    metric: ``(Σw)²/(B Σw²)`` of the *unclipped* w) and the off-policy optimal
    baseline (the ``optimal_baseline`` advantage) [C: mit-han-lab/vcpo]. Do not
    also set a learner correction: the TIS weight is already here. Metrics add
    ``is_weight_mean``, ``is_trunc_frac``, ``ess_ratio``, ``ess_ratio_clipped``.
    """
    check_shapes("vcpo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                 behavior_logp=behavior_logp)
    if tis_cap <= 0:
        raise ValueError(f"vcpo tis_cap must be > 0, got {tis_cap}")
    lr = token_log_ratio(logp, old_logp, mask)
    loss, metrics = clipped_surrogate(lr, advantages, mask, clip_low=clip_low, clip_high=clip_high)
    with torch.no_grad():
        seq = mask.bool().any(-1)  # (B,) rows with tokens
        log_w = masked(old_logp - behavior_logp, mask).sum(-1)  # (B,) unclipped log w_i
        log_wc = log_w.clamp(max=math.log(tis_cap))
        w = log_wc.clamp(min=-LOG_RATIO_CLAMP).exp()  # (B,) min(w, cap)
        metrics.update({"is_weight_mean": masked_mean(w, seq),
                        "is_trunc_frac": masked_mean((log_w > math.log(tis_cap)).float(), seq),
                        "ess_ratio": ess(log_w, seq), "ess_ratio_clipped": ess(log_wc, seq)})
    return loss * w[:, None].to(loss.dtype), metrics


@POLICY_LOSSES.register("remix_ppg", needs=("old_logp", "behavior_logp"), default_agg="token-mean",
                        paper="arXiv:2507.06892",
                        summary="ppo_clip of π_θ/π_{k−i} with the clip range centred on π_k/π_{k−i} instead of 1 "
                                "(ReMix Mix-PPG)")
def remix_ppg(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
              behavior_logp: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """ReMix's Mix-PPG surrogate [S: ALGORITHMS.md §9, code not released]:

    ``L = −min(r Â, clip(r, c − ε, c + ε) Â)`` with ``r = π_θ/π_{k−i}`` (behaviour = the historical
    policy that generated the data) and ``c = sg[π_k/π_{k−i}]`` (the proximal policy ``old_logp``
    over the behaviour policy), so the trust region is centred where the current policy already
    is instead of at 1. Delta vs ``ppo_clip``: the centre ``c``; on fresh data (``π_k = π_{k−i}``,
    c = 1) it *is* ``ppo_clip`` with ``clip_low = clip_high = ε``. ε = 0.2 [S]; the lower bound
    is floored at 0. Pair with ``rl.buffer.sampling: recent_mix`` and the ``remix`` controller
    (KL-convex term, reincarnation); the paper's aggregation is [NF] (token-mean here).
    Metrics: ``clip_frac``, ``center_mean`` (mean c).
    """
    check_shapes("remix_ppg", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                 behavior_logp=behavior_logp)
    if clip < 0:
        raise ValueError(f"remix_ppg clip must be >= 0, got {clip}")
    ratio = token_log_ratio(logp, behavior_logp, mask).exp()  # (B, T)
    center = token_log_ratio(old_logp, behavior_logp, mask).exp().detach()  # (B, T)
    clipped = torch.minimum(torch.maximum(ratio, (center - clip).clamp(min=0)), center + clip)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    with torch.no_grad():
        cut = ((advantages > 0) & (ratio > center + clip)) | ((advantages < 0) & (ratio < center - clip))
        metrics = {"clip_frac": masked_mean(cut.float(), mask), "center_mean": masked_mean(center, mask),
                   **ratio_metrics(token_log_ratio(logp, behavior_logp, mask), mask)}
    return masked(loss, mask), metrics
