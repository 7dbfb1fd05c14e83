"""REINFORCE, the regularised group-relative REINFORCE family (REC / OPMD / AsymRE) and mirror descent (MDPO).

See ``losses/common.py`` for the contract every loss follows.
"""

from __future__ import annotations

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.corrections import LOG_RATIO_CLAMP, token_log_ratio
from offpolicy.objectives.losses.common import POLICY_LOSSES, _check_clip, ratio_metrics, zero_advantage_rows


# ---- plain policy gradient -----------------------------------------------------------------
@POLICY_LOSSES.register("reinforce", needs=(), default_agg="token-mean", paper="Williams 1992 (no arXiv id)",
                        zero_rows=zero_advantage_rows,
                        summary="vanilla policy gradient −Â·ℓ: no ratio, no clip (on-policy only)")
def reinforce(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """REINFORCE: ``L_t = −Â_t ℓ_t``; gradient ``−Â ∇ℓ``. Unbiased only on-policy (no correction).

    With group-mean advantages this is the paper's "group-relative REINFORCE"
    (REC with clip_mode none, weight none). Returns no metrics.
    """
    check_shapes("reinforce", logp=logp, advantages=advantages, mask=mask)
    return masked(-advantages * logp, mask), {}


# ---- REC family (regularised group-relative REINFORCE) -------------------------------------
REC_CLIP_MODES = ("none", "one-side", "two-side", "ring", "gspo-one-side")
REC_WEIGHTS = ("none", "importance_sampling", "truncated_is", "gspo_importance_sampling", "advantage")
REC_REGULARIZERS = ("none", "k2", "forward-kl")


def _rec_mask(clip_mode: str, ratio: torch.Tensor, seq_ratio: torch.Tensor, adv: torch.Tensor, *,
              clip_low: float, clip_high: float, clip_low_prime: float, clip_high_prime: float) -> torch.Tensor:
    """REC's keep-mask M (B, T) bool; see ``rec``."""
    pos, neg = adv >= 0, adv <= 0
    inside = (ratio >= 1 - clip_low) & (ratio <= 1 + clip_high)
    if clip_mode == "none":
        return torch.ones_like(ratio, dtype=torch.bool)
    if clip_mode == "one-side":
        return (pos & (ratio <= 1 + clip_high)) | (neg & (ratio >= 1 - clip_low))
    if clip_mode == "two-side":
        return inside
    if clip_mode == "ring":
        return inside | (pos & (ratio <= 1 - clip_low_prime)) | (neg & (ratio >= 1 + clip_high_prime))
    # gspo-one-side: one-side on the length-normalised sequence ratio
    return (pos & (seq_ratio <= 1 + clip_high)) | (neg & (seq_ratio >= 1 - clip_low))


@POLICY_LOSSES.register("rec", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2509.24203",
                        summary="group-relative REINFORCE −w·Â·M·ℓ with a stop-grad ratio used only to "
                                "mask (clip modes) and weight, plus optional k2 / forward-KL regulariser")
def rec(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
        clip_mode: str = "one-side", weight: str = "none",
        clip_low: float = 0.2, clip_high: float = 0.2, clip_low_prime: float = 0.6, clip_high_prime: float = 2.0,
        temp: float = 1.0, regularizer: str = "none", regularizer_coef: float = 0.1) -> tuple[torch.Tensor, dict]:
    """REC / REP / RED: ``L_t = −w_t · Â · M_t · ℓ_t + Reg_t`` with ``ρ = sg[exp(ℓ − ℓ^old)]``.

    Masks M (``clip_mode``), with ε = (clip_low, clip_high), ε' = (clip_low_prime, clip_high_prime):
      none: 1;  one-side: ``1[Â≥0]1[ρ≤1+ε_h] + 1[Â≤0]1[ρ≥1−ε_l]``;
      two-side: ``1[1−ε_l ≤ ρ ≤ 1+ε_h]``;
      ring: two-side ∪ ``1[Â≥0]1[ρ≤1−ε'_l]`` ∪ ``1[Â≤0]1[ρ≥1+ε'_h]``;
      gspo-one-side: one-side on ``s = exp(mean_t(ℓ − ℓ^old))`` (use aggregation
      ``seq-mean-token-mean``, which Trinity forces for this mode).
    Weights w (``weight``): none: 1; importance_sampling: ρ; truncated_is:
      ``clip(ρ, 1−ε'_l, 1+ε'_h)``; gspo_importance_sampling: s; advantage (RED-Weight):
      ``exp(Â/temp)`` unnormalised (exponent clamped at 20).
    Regulariser (``regularizer``, coefficient τ = ``regularizer_coef``): k2 (OPMD):
      ``+τ (ℓ − ℓ^old)²`` (Kimi's ½ absorbed in τ); forward-kl (AsymRE): ``−τ ℓ``
      (baseline shifted down by τ). Added on every valid token, unmasked by M.
    Defaults: ε = (0.2, 0.2), ε' = (0.6, 2.0), temp 1.0, coefficient 0.1 [C];
    ``clip_mode="one-side", weight="none"`` (REC-OneSide-NoIS, the paper's headline
    variant; Trinity's ``default_args`` are none/none, i.e. plain REINFORCE).
    Use with the ``dr_grpo`` (mean-only) advantage. REC-OneSide-IS has exactly
    grpo's clipped-surrogate gradient. Metric ``clip_frac``: fraction of valid
    tokens with M = 0.
    """
    for key, value, allowed in (("clip_mode", clip_mode, REC_CLIP_MODES), ("weight", weight, REC_WEIGHTS),
                                ("regularizer", regularizer, REC_REGULARIZERS)):
        if value not in allowed:
            raise ValueError(f"rec {key}={value!r}; valid: {list(allowed)}")
    check_shapes("rec", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    _check_clip(clip_low, clip_high)
    if not 0 < clip_low_prime <= 1 or clip_high_prime <= 0 or temp <= 0 or regularizer_coef < 0:
        raise ValueError("rec needs 0 < clip_low_prime <= 1, clip_high_prime > 0, temp > 0, regularizer_coef >= 0")
    lr = token_log_ratio(logp, old_logp, mask)  # (B, T) with grad
    with torch.no_grad():
        ratio = lr.exp()  # ρ = sg[r]
        seq_ratio = masked_mean(lr, mask, dim=-1).exp()[:, None]  # (B, 1) s = sg[length-normalised ratio]
        keep = _rec_mask(clip_mode, ratio, seq_ratio, advantages, clip_low=clip_low, clip_high=clip_high,
                         clip_low_prime=clip_low_prime, clip_high_prime=clip_high_prime)
        w = {"none": torch.ones_like(ratio),
             "importance_sampling": ratio,
             "truncated_is": ratio.clamp(1 - clip_low_prime, 1 + clip_high_prime),
             "gspo_importance_sampling": seq_ratio.expand_as(ratio),
             "advantage": (advantages / temp).clamp(max=LOG_RATIO_CLAMP).exp()}[weight]
        coef = (w * advantages * keep.to(w.dtype)).detach()  # (B, T)
    loss = -coef * logp
    if regularizer == "k2":
        loss = loss + regularizer_coef * lr.square()
    elif regularizer == "forward-kl":
        loss = loss - regularizer_coef * logp
    metrics = {"clip_frac": masked_mean((~keep).float(), mask)}
    metrics.update(ratio_metrics(lr, mask))
    return masked(loss, mask), metrics


OPMD_PENALTIES = ("sequence", "token")


@POLICY_LOSSES.register("opmd", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2501.12599",
                        summary="group-relative REINFORCE + τ(Σ_t(ℓ − ℓ_old))² per sequence (Kimi k1.5's "
                                "OPMD); penalty='token': τ(ℓ − ℓ_old)² per token (REC's k2)")
def opmd(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         regularizer_coef: float = 0.1, penalty: str = "sequence") -> tuple[torch.Tensor, dict]:
    """OPMD: group-relative REINFORCE ``−Â ℓ`` plus a squared log-ratio penalty to π_old (coefficient τ).

    ``penalty`` (``D_i = Σ_t (ℓ_{i,t} − ℓ^old_{i,t})``, the sequence log-ratio of row i,
    ``|y_i|`` its valid tokens):

    * ``"sequence"`` (default): ``τ D_i²`` per sequence, written as ``τ D_i² / |y_i|`` on
      each valid token, so the token sum of row i is ``−Â_i Σ_t ℓ_{i,t} + τ D_i²``.
      This is Kimi k1.5's Eq. 3 surrogate: the gradient ``(r − r̄)∇log π(y) −
      (τ_K/2)∇(log π(y)/π_old(y))²`` with sequence probabilities, Kimi's ½ absorbed
      in τ (τ = τ_K / 2). With ``token-mean`` aggregation the whole loss is Kimi's
      per-sequence objective divided by the batch's token count.
    * ``"token"``: ``τ Σ_t (ℓ_{i,t} − ℓ^old_{i,t})²``, i.e.
      ``rec(clip_mode="none", weight="none", regularizer="k2")`` (REC's k2 and
      Trinity-RFT's implementation).

    They differ by the cross terms ``2τ Σ_{s≠t} δ_s δ_t`` (``δ = ℓ − ℓ^old``): per-token
    drifts that cancel along a sequence are free under "sequence" and penalised under
    "token"; a drift of one sign is penalised ~|y| times harder under "sequence".
    Both have zero penalty gradient on-policy. The default follows the paper the loss
    is named after (docs/algorithms.md). τ = ``regularizer_coef`` = 0.1 (Trinity
    ``examples/rec_gsm8k``, tuned for the token form). Metric ``seq_log_ratio_sq``:
    mean over rows of ``D_i²``. Delta vs reinforce: the penalty keeps π_θ near π_old.
    """
    if penalty not in OPMD_PENALTIES:
        raise ValueError(f"opmd penalty={penalty!r}; valid: {list(OPMD_PENALTIES)}")
    reg = "k2" if penalty == "token" else "none"
    loss, metrics = rec(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp, clip_mode="none",
                        weight="none", regularizer=reg, regularizer_coef=regularizer_coef)
    d = token_log_ratio(logp, old_logp, mask).sum(-1, keepdim=True)  # (B, 1) sequence log-ratio D_i
    if penalty == "sequence":
        n_tok = mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1) |y_i|; an empty row has D = 0
        loss = loss + masked(regularizer_coef * d.square() / n_tok, mask)
    metrics["seq_log_ratio_sq"] = d.detach().square().mean()
    return loss, metrics


@POLICY_LOSSES.register("asymre", needs=(), default_agg="token-mean", paper="arXiv:2506.20520",
                        summary="group-relative REINFORCE with the baseline lowered by τ: −(Â + τ)·ℓ")
def asymre(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
           regularizer_coef: float = 0.1) -> tuple[torch.Tensor, dict]:
    """AsymRE = ``rec(clip_mode="none", weight="none", regularizer="forward-kl")``: ``L = −Â ℓ − τ ℓ``.

    τ = 0.1. Equivalent to REINFORCE with baseline ``mean_G R − τ``; its expected
    extra gradient tends to ``τ ∇KL(π_old ‖ π_θ)`` (REC paper). Needs no old
    log-probs (nothing uses the ratio), so the learner skips that forward pass.
    """
    loss, _ = rec(logp=logp, advantages=advantages, mask=mask, old_logp=logp.detach(), clip_mode="none",
                  weight="none", regularizer="forward-kl", regularizer_coef=regularizer_coef)
    return loss, {}  # the ratio is 1 by construction: ratio metrics would say nothing


# ---- mirror descent -------------------------------------------------------------------------
@POLICY_LOSSES.register("mdpo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2005.09814",
                        summary="unclipped ratio surrogate plus (1/t_k)·KL(π_θ‖π_k) to the previous policy; "
                                "1/t_k is annealed by a controller")
def mdpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         kl_coef: float = 1.0) -> tuple[torch.Tensor, dict]:
    """On-policy MDPO: ``L = −r Â + (1/t_k) (r log r − r + 1)``, ``r = exp(ℓ − ℓ^old)``, ``π_k = π_old``.

    MDPO maximises ``E_{π_k}[(π_θ/π_k) Â] − (1/t_k) KL(π_θ ‖ π_k)`` (reverse KL) with
    m gradient steps on one batch, then sets ``π_k ← π_θ`` [C: mdpo_on]. Delta vs
    ppo_clip: a KL penalty to the previous policy replaces the clip. The KL is
    estimated per sampled token from ``π_k``'s samples as ``r log r − r + 1``
    (unbiased: ``E_{π_k}[r log r] = KL(π_θ‖π_k)``, ``E_{π_k}[r − 1] = 0``; and ≥ 0
    pointwise); the paper's Gaussian policies use the closed form instead.
    ``kl_coef = 1/t_k`` with ``t_k = 1 − (k − 1)/K`` (the KL weight grows from 1 to K):
    the learner's ``MdpoAnneal`` controller sets it every iteration (default 1.0 =
    iteration 1). ``old_logp`` must stay ``π_k`` for the m steps of an iteration.
    Paper defaults m = 5 steps, advantages standardised. Metric ``kl_prev``.
    """
    check_shapes("mdpo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if kl_coef < 0:
        raise ValueError(f"mdpo kl_coef must be >= 0, got {kl_coef}")
    lr = token_log_ratio(logp, old_logp, mask)
    r = lr.exp()
    kl = r * lr - r + 1  # (B, T), 0 at r = 1
    metrics = ratio_metrics(lr, mask)
    metrics["kl_prev"] = masked_mean(kl.detach(), mask)
    return masked(-advantages * r + kl_coef * kl, mask), metrics
