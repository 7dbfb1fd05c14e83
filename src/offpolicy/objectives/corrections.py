"""Importance-ratio helpers and training–inference mismatch corrections.

Decoupled correction (ALGORITHMS.md §14–15): the ratio between the current
policy and the engine that sampled a token splits into two factors,

    π_θ / μ  =  [π_old / μ]  ×  [π_θ / π_old]
               mismatch term    staleness term (PPO-clipped inside the loss)

A *correction* handles the first factor. It is registered in ``CORRECTIONS`` and
called ``fn(*, old_logp, behavior_logp, mask, **hp) -> (weights, metrics)``; the
learner multiplies the per-token loss by ``weights`` (B, T). Weights are
detached (they change the measure, not the objective), and exactly 0 on
masked-out or rejected tokens. With ``w_t = exp(ℓ^old_t − ℓ^μ_t)``:

=============  =================================================================
``tis_token``  ``min(w_t, C)``                                   (TIS, C = 2)
``tis_seq``    ``min(Π_t w_t, C)`` for every token of the sequence
``mis_token``  ``w_t · 1[1/C ≤ w_t ≤ C]``                        (masked IS)
``mis_seq``    ``Π_t w_t · 1[1/C ≤ Π_t w_t ≤ C]``
``mis_geo``    ``1[1/C ≤ (Π_t w_t)^{1/|y|} ≤ C]``                (geometric-mean rejection)
=============  =================================================================

Everything is computed in log space; only the final ``exp`` sees a clamped
log-ratio (``|·| ≤ LOG_RATIO_CLAMP = 20``, verl's ``SAFETY_BOUND``), so
log-ratios of ±50 (or sums over long sequences) stay finite.

Sources: verl ``rollout_corr_helper.py`` [C] (TIS, rejection modes, veto);
Yao et al., "Your efficient RL framework secretly brings you off-policy RL
training" (fengyao.notion.site/off-policy-rl; blog, no arXiv id) for TIS;
Liu, Li et al., "When speed kills stability" (richardli.xyz/rl-collapse; blog,
no arXiv id) for MIS.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import masked, masked_max, masked_mean, masked_sum
from offpolicy.objectives.diagnostics import ess
from offpolicy.objectives.registry import Registry

CORRECTIONS = Registry("correction")

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 4.9e8: the largest importance ratio ever exponentiated


# ---- ratio helpers shared with the losses --------------------------------------------------
def token_log_ratio(num_logp: torch.Tensor, den_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``ℓ_num − ℓ_den`` on valid tokens, 0 elsewhere, clamped to ±LOG_RATIO_CLAMP. (B, T).

    Masked positions are zeroed *before* any ``exp``, so garbage there (even
    ±inf) cannot produce inf/NaN values or gradients. The clamp has zero
    gradient beyond ±20: a token whose ratio exceeds e^20 no longer moves.
    """
    return masked(num_logp - den_logp, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def seq_log_ratio(num_logp: torch.Tensor, den_logp: torch.Tensor, mask: torch.Tensor,
                  *, mean: bool = False) -> torch.Tensor:
    """Per-sequence ``Σ_t m (ℓ_num − ℓ_den)`` (or the mean over valid tokens if ``mean``), unclamped. (B,)."""
    diff = masked(num_logp - den_logp, mask)
    return masked_mean(diff, mask, dim=-1) if mean else masked_sum(diff, mask, dim=-1)


def _safe_exp(log_x: torch.Tensor) -> torch.Tensor:
    return log_x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


def _mismatch_log_w(old_logp: torch.Tensor | None, behavior_logp: torch.Tensor | None,
                    mask: torch.Tensor) -> torch.Tensor:
    """``ℓ^old − ℓ^μ`` on valid tokens (B, T), detached and unclamped; fails loudly without behaviour log-probs."""
    if behavior_logp is None:
        raise ValueError("a mismatch correction needs behaviour log-probs (behavior_logp), "
                         "which expert/offline traces lack")
    if old_logp is None:
        raise ValueError("a mismatch correction needs the proximal log-probs (old_logp)")
    return masked(old_logp.detach() - behavior_logp.detach(), mask)


def _bounds(upper: float, lower: float | None) -> tuple[float, float]:
    if upper <= 0:
        raise ValueError(f"upper must be > 0, got {upper}")
    lower = 1.0 / upper if lower is None else lower
    if not 0 <= lower <= upper:
        raise ValueError(f"need 0 <= lower <= upper, got lower={lower}, upper={upper}")
    return math.log(upper), (math.log(lower) if lower > 0 else -math.inf)


def _veto_keep(log_w: torch.Tensor, mask: torch.Tensor, veto: float | None) -> torch.Tensor:
    """(B, 1) bool: False for sequences with any valid token ratio below ``veto`` (verl's catastrophic veto)."""
    if veto is None:
        return torch.ones(log_w.shape[0], 1, dtype=torch.bool, device=log_w.device)
    if veto <= 0:
        raise ValueError(f"veto must be > 0, got {veto}")
    bad = (log_w < math.log(veto)) & mask.bool()
    return ~bad.any(-1, keepdim=True)


def _weight_metrics(weights: torch.Tensor, mask: torch.Tensor, log_w_level: torch.Tensor,
                    level_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight_mean": masked_mean(weights, mask), "weight_max": masked_max(weights, mask),
            "ess": ess(log_w_level, level_mask)}


# ---- truncated importance sampling ---------------------------------------------------------
@CORRECTIONS.register("tis_token", paper="fengyao.notion.site/off-policy-rl (blog, no arXiv id)",
                      summary="token IS weight old/behaviour truncated at C")
@torch.no_grad()
def tis_token(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
              cap: float = 2.0, normalize: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIS, token level: ``w_t = min(exp(ℓ^old_t − ℓ^μ_t), C)``, C = ``cap`` = 2 (verl default).

    ``normalize`` rescales the weights to mean 1 over valid tokens (verl's
    ``rollout_is_batch_normalize``). Metrics: ``trunc_frac`` = fraction of valid
    tokens whose weight was truncated; ``ess`` of the untruncated token weights.
    """
    if cap <= 0:
        raise ValueError(f"tis_token cap must be > 0, got {cap}")
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)  # (B, T)
    w = masked(_safe_exp(log_w.clamp(max=math.log(cap))), mask)
    if normalize:
        w = w / masked_mean(w, mask).clamp(min=1e-8)
    metrics = _weight_metrics(w, mask, log_w, mask)
    metrics["trunc_frac"] = masked_mean((log_w > math.log(cap)).float(), mask)
    return w, metrics


@CORRECTIONS.register("tis_seq", paper="fengyao.notion.site/off-policy-rl (blog, no arXiv id)",
                      summary="sequence IS weight (product over tokens) truncated at C")
@torch.no_grad()
def tis_seq(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
            cap: float = 2.0, normalize: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIS, sequence level: every token of sequence i gets ``min(exp(Σ_t m(ℓ^old − ℓ^μ)), C)``.

    Unbiased-er but higher variance than ``tis_token``. ``normalize`` rescales to
    mean 1 over non-empty sequences. ``trunc_frac`` counts sequences.
    """
    if cap <= 0:
        raise ValueError(f"tis_seq cap must be > 0, got {cap}")
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    log_W = log_w.sum(-1)  # (B,)
    seq_mask = mask.bool().any(-1)  # (B,)
    W = _safe_exp(log_W.clamp(max=math.log(cap)))  # (B,)
    if normalize:
        W = W / masked_mean(W, seq_mask).clamp(min=1e-8)
    w = masked(W[:, None].expand_as(log_w), mask)
    metrics = _weight_metrics(w, mask, log_W, seq_mask)
    metrics["trunc_frac"] = masked_mean((log_W > math.log(cap)).float(), seq_mask)
    return w, metrics


# ---- masked importance sampling (rejection) ------------------------------------------------
@CORRECTIONS.register("mis_token", paper="richardli.xyz/rl-collapse (blog, no arXiv id)",
                      summary="token IS weight, zeroed (rejected) outside [1/C, C] instead of truncated")
@torch.no_grad()
def mis_token(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
              upper: float = 2.0, lower: float | None = None, is_weight: bool = True,
              veto: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MIS, token level: ``w_t · 1[lower ≤ w_t ≤ upper]``, ``lower = 1/upper`` by default (C = 2).

    ``is_weight=False`` keeps only the 0/1 rejection mask (verl ``rollout_rs="token"``
    alone). ``veto`` (None = off) rejects a whole sequence if any of its tokens has
    ``w_t < veto`` (verl ``rollout_token_veto_threshold``). ``reject_frac`` = fraction
    of valid tokens given weight 0.
    """
    log_up, log_lo = _bounds(upper, lower)
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    keep = (log_w >= log_lo) & (log_w <= log_up) & _veto_keep(log_w, mask, veto) & mask.bool()
    w = _safe_exp(log_w) if is_weight else torch.ones_like(log_w)
    w = torch.where(keep, w, torch.zeros_like(w))
    metrics = _weight_metrics(w, mask, log_w, mask)
    metrics["reject_frac"] = masked_mean((~keep).float(), mask)
    return w, metrics


@CORRECTIONS.register("mis_seq", paper="richardli.xyz/rl-collapse (blog, no arXiv id)",
                      summary="sequence IS weight, whole sequence rejected outside [1/C, C]")
@torch.no_grad()
def mis_seq(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
            upper: float = 2.0, lower: float | None = None, is_weight: bool = True,
            veto: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MIS, sequence level: ``W_i · 1[lower ≤ W_i ≤ upper]`` with ``W_i = Π_t w_t`` on all its tokens.

    ``is_weight=False`` gives the 0/1 mask only (verl ``rollout_rs="sequence"``).
    ``reject_frac`` counts sequences.
    """
    log_up, log_lo = _bounds(upper, lower)
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    log_W = log_w.sum(-1, keepdim=True)  # (B, 1)
    seq_mask = mask.bool().any(-1)
    keep = (log_W >= log_lo) & (log_W <= log_up) & _veto_keep(log_w, mask, veto)  # (B, 1)
    W = _safe_exp(log_W) if is_weight else torch.ones_like(log_W)
    w = masked(torch.where(keep, W, torch.zeros_like(W)).expand_as(log_w), mask)
    metrics = _weight_metrics(w, mask, log_W[:, 0], seq_mask)
    metrics["reject_frac"] = masked_mean((~keep[:, 0]).float(), seq_mask)
    return w, metrics


@CORRECTIONS.register("mis_geo", paper="richardli.xyz/rl-collapse (blog, no arXiv id)",
                      summary="whole sequence rejected when its geometric-mean ratio leaves [1/C, C]")
@torch.no_grad()
def mis_geo(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
            upper: float = 2.0, lower: float | None = None,
            veto: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Geometric-mean rejection: weight ``1[lower ≤ exp(mean_t(ℓ^old − ℓ^μ)) ≤ upper]`` on every token.

    Rejection only (verl ``rollout_rs="geometric"``): kept tokens get weight 1; the
    geometric mean is a length-independent *filter*, not an IS estimator.
    Defaults follow the brief (C = 2); ROLL and verl recipes use much tighter
    geometric bounds in practice (upper ≈ 1.0001–1.001).
    """
    log_up, log_lo = _bounds(upper, lower)
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    log_g = masked_mean(log_w, mask, dim=-1)[:, None]  # (B, 1) mean log-ratio
    seq_mask = mask.bool().any(-1)
    keep = (log_g >= log_lo) & (log_g <= log_up) & _veto_keep(log_w, mask, veto)
    w = masked(keep.to(log_w.dtype).expand_as(log_w), mask)
    metrics = _weight_metrics(w, mask, log_w.sum(-1), seq_mask)
    metrics["reject_frac"] = masked_mean((~keep[:, 0]).float(), seq_mask)
    return w, metrics
