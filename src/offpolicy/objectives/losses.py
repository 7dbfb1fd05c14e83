"""Policy losses: pure functions of per-token log-probs, registered in ``POLICY_LOSSES``.

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
  names (``clip_frac``, ``ratio_mean``, ...) to detached 0-d tensors.

Every ``L`` is a loss to *minimise*. ``r = exp(ℓ − ℓ^old)`` is the ratio to the
proximal policy, computed from a masked, clamped log-ratio (see
``corrections.token_log_ratio``) so padded tokens and log-ratios up to ±50
never give inf/NaN. Metrics common to ratio-based losses: ``ratio_mean`` and
``ratio_max`` of r over valid tokens, and ``approx_kl`` = mean k3 estimate of
KL(π_old ‖ π_θ), i.e. mean of ``(r − 1) − log r``.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_max, masked_mean
from offpolicy.objectives.corrections import LOG_RATIO_CLAMP, token_log_ratio
from offpolicy.objectives.kl import k3
from offpolicy.objectives.registry import Registry

POLICY_LOSSES = Registry("policy loss")


# ---- shared pieces -------------------------------------------------------------------------
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


# ---- supervised and plain policy gradient --------------------------------------------------
@POLICY_LOSSES.register("sft", needs=(), default_agg="token-mean", paper="(maximum likelihood; no arXiv id)",
                        summary="negative log-likelihood of the given tokens; advantages are ignored")
def sft(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SFT on expert traces: ``L_t = −ℓ_t``. Delta vs reinforce: every token has advantage 1.

    Metric: ``nll`` = mean ``−ℓ`` over valid tokens.
    """
    check_shapes("sft", logp=logp, mask=mask)
    loss = masked(-logp, mask)
    return loss, {"nll": masked_mean(loss.detach(), mask)}


@POLICY_LOSSES.register("reinforce", needs=(), default_agg="token-mean", paper="Williams 1992 (no arXiv id)",
                        summary="vanilla policy gradient −Â·ℓ: no ratio, no clip (on-policy only)")
def reinforce(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """REINFORCE: ``L_t = −Â_t ℓ_t``; gradient ``−Â ∇ℓ``. Unbiased only on-policy (no correction).

    With group-mean advantages this is the paper's "group-relative REINFORCE"
    (REC with clip_mode none, weight none). Returns no metrics.
    """
    check_shapes("reinforce", logp=logp, advantages=advantages, mask=mask)
    return masked(-advantages * logp, mask), {}


# ---- clipped surrogates (PPO family) -------------------------------------------------------
@POLICY_LOSSES.register("ppo_clip", needs=("old_logp",), default_agg="token-mean", paper="arXiv:1707.06347",
                        summary="clipped ratio surrogate; asymmetric clip bounds and optional dual clip")
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
                        summary="grpo without the 1/|y| length normalisation (constant L_max) and without KL")
def dr_grpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
            clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Dr. GRPO: the ppo_clip token loss, aggregated as ``Σ_{i,t} m·L / (B·L_max)`` (CN).

    Use with the ``dr_grpo`` (mean-only) advantage. Delta vs grpo: no ``1/|y_i|``
    (removes the length bias), no std in the advantage, no KL. ε = 0.2.
    """
    return ppo_clip(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp,
                    clip_low=clip_low, clip_high=clip_high)


@POLICY_LOSSES.register("dapo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2503.14476",
                        summary="ppo_clip with clip-higher (ε_h = 0.28), token-mean, no KL")
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


@POLICY_LOSSES.register("opmd", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2501.12599",
                        summary="group-relative REINFORCE + τ(ℓ − ℓ_old)² (Kimi k1.5's OPMD, REP family)")
def opmd(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
         regularizer_coef: float = 0.1) -> tuple[torch.Tensor, dict]:
    """OPMD = ``rec(clip_mode="none", weight="none", regularizer="k2")``: ``L = −Â ℓ + τ (ℓ − ℓ^old)²``.

    τ = ``regularizer_coef`` = 0.1 (Trinity ``examples/rec_gsm8k``; Kimi's ½ is in τ).
    Delta vs reinforce: a squared log-ratio penalty keeps π_θ near π_old.
    """
    return rec(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp, clip_mode="none",
               weight="none", regularizer="k2", regularizer_coef=regularizer_coef)


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


# ---- soft gate and sequence-level ratios ---------------------------------------------------
GSPO_LOG_RATIO_MAX = 10.0  # verl clamps GSPO's (token-)sequence log-ratio at 10


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


@POLICY_LOSSES.register("cispo", needs=("old_logp",), default_agg="token-mean", paper="arXiv:2506.13585",
                        summary="REINFORCE weighted by the stop-grad clipped ratio: clipped tokens keep a gradient")
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


# ---- stale / off-policy data ---------------------------------------------------------------
@POLICY_LOSSES.register("topr", needs=("behavior_logp",), default_agg="seq-mean-token-mean", paper="arXiv:2503.14286",
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


# ---- expert data -------------------------------------------------------------------------
@POLICY_LOSSES.register("sft_is", needs=(), default_agg="token-mean", paper="arXiv:2508.11408",
                        summary="sft with each token's NLL weighted by sg[p_t] (down-weights unlikely tokens)")
def sft_is(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SFT-IS: ``L_t = −sg[p_t] ℓ_t`` with ``p_t = exp(ℓ_t)`` (Trinity ``sft_is`` [C]); advantages ignored."""
    check_shapes("sft_is", logp=logp, mask=mask)
    lm = masked(logp, mask)
    return masked(-lm.detach().exp() * lm, mask), {"nll": masked_mean(-lm.detach(), mask)}


def chord_mu_schedule(step: int, *, warmup_steps: int = 0, decay_steps: int = 200, peak: float = 0.9,
                      valley: float = 0.05) -> float:
    """CHORD-μ's expert weight at global ``step`` (for the learner's controller; defaults are CHORD-μ [C]).

    Linear warm-up to ``peak`` over ``warmup_steps``, cosine decay to ``valley`` over
    ``decay_steps``, then constant ``valley``.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step >= warmup_steps + decay_steps:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


@POLICY_LOSSES.register("chord", needs=("old_logp", "is_expert"), default_agg="token-mean", paper="arXiv:2508.11408",
                        summary="(1−μ)·ppo_clip on policy rows + μ·φ-weighted SFT on expert rows, each token-mean")
def chord(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
          is_expert: torch.Tensor, mu: float = 0.1, phi: bool = True, clip_low: float = 0.2,
          clip_high: float = 0.2) -> tuple[torch.Tensor, dict]:
    """CHORD: ``L = (1 − μ) L_GRPO(policy rows) + μ L_SFT(expert rows)``; ``L_SFT = −mean_t sg[φ(p_t)] ℓ_t``.

    ``φ(p) = p(1 − p)`` (CHORD-φ, ``phi=True``) or 1 (plain SFT). ``L_GRPO`` is
    ppo_clip (ε = 0.2, no KL). Defaults are CHORD-φ: μ ≡ 0.1, φ on [C]; for CHORD-μ
    the learner's controller sets ``mu`` each step from ``chord_mu_schedule``.
    Each part is a token-mean over its own tokens: tokens are rescaled by
    ``N/N_part`` so the default ``token-mean`` aggregation yields exactly
    ``(1−μ)·TM_policy + μ·TM_expert`` (Trinity additionally rescales by configured
    per-part batch sizes; that is 1 when a batch has the configured mix).
    Metrics: ppo's over policy rows, ``mu``, ``expert_token_frac``, ``sft_nll``.
    """
    check_shapes("chord", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if not 0 <= mu <= 1:
        raise ValueError(f"chord mu must be in [0, 1], got {mu}")
    e = is_expert.bool()[:, None].expand_as(mask)  # (B, T)
    m_pol, m_exp = mask * (~e).to(mask.dtype), mask * e.to(mask.dtype)
    rl, metrics = ppo_clip(logp=logp, advantages=advantages, mask=m_pol, old_logp=old_logp,
                           clip_low=clip_low, clip_high=clip_high)
    lm = masked(logp, m_exp)
    p = lm.detach().exp()
    sft = -(p * (1 - p) if phi else torch.ones_like(p)) * lm
    n, n_pol, n_exp = mask.sum(), m_pol.sum(), m_exp.sum()
    scale_pol = torch.where(n_pol > 0, n / n_pol.clamp(min=1), torch.zeros_like(n))
    scale_exp = torch.where(n_exp > 0, n / n_exp.clamp(min=1), torch.zeros_like(n))
    loss = torch.where(e, mu * scale_exp * sft, (1 - mu) * scale_pol * rl)
    metrics.update({"mu": torch.tensor(float(mu), device=logp.device),
                    "expert_token_frac": masked_mean(e.to(mask.dtype), mask),
                    "sft_nll": masked_mean(-lm.detach(), m_exp)})
    return masked(loss, mask), metrics


@POLICY_LOSSES.register("luffy", needs=("old_logp", "is_expert"), default_agg="seq-mean-token-sum-norm",
                        paper="arXiv:2504.14945",
                        summary="expert tokens use the shaped probability p/(p+γ) in place of the ratio; no clip")
def luffy(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
          is_expert: torch.Tensor, gamma: float = 0.1) -> tuple[torch.Tensor, dict]:
    """LUFFY: on-policy tokens ``L = −Â r`` (no clip), expert tokens ``L = −Â f(p_t)``, ``f(p) = p/(p + γ)``.

    The expert's behaviour probability is taken as 1, so its "ratio" is ``p_t = π_θ``
    shaped by ``f`` (γ = 0.1), which keeps gradients on low-probability expert
    tokens. Advantages are group-relative over the mixed group (use ``dr_grpo``:
    the released script sets ``grpo_use_std=False``). Follows the released script
    (``loss_remove_clip=True``, CN aggregation) [C]; whether the paper clips the
    on-policy part is not checked here.
    """
    check_shapes("luffy", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
    if gamma <= 0:
        raise ValueError(f"luffy gamma must be > 0, got {gamma}")
    e = is_expert.bool()[:, None].expand_as(mask)
    m_pol = mask * (~e).to(mask.dtype)
    lr = token_log_ratio(logp, old_logp, m_pol)
    p = masked(logp, mask).clamp(max=0).exp()  # π_θ(y_t); log-probs > 0 are not probabilities
    on = -advantages * lr.exp()
    off = -advantages * p / (p + gamma)
    metrics = ratio_metrics(lr, m_pol)
    metrics["expert_token_frac"] = masked_mean(e.to(mask.dtype), mask)
    return masked(torch.where(e, off, on), mask), metrics


# ---- adaptive clipping / token selection ---------------------------------------------------
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
         high_max: float = 3.0, high_step: float = 0.05, low_step: float = 0.02) -> tuple[torch.Tensor, dict]:
    """BAPO (paper version [P]): ``L = max(−Â r, −Â clip(r, c_low, c_high))`` with bounds chosen on this batch.

    ``ρ(c_l, c_h) = |Σ_{Â>0} min(rÂ, clip(r, 0, c_h)Â)| / |Σ_t min(rÂ, clip(r, c_l, c_h)Â)|``.
    Algorithm 1: start at ``(c_l, c_h) = (a⁻, a⁺) = (0.6, 1.2)``; while ``ρ < ρ0 = 0.4``
    and ``c_l + δ₂ ≤ b⁻ = 0.9``: raise ``c_h`` by ``δ₁ = 0.05`` up to ``b⁺ = 3.0``, after
    that raise ``c_l`` by ``δ₂ = 0.02``. Bounds are recomputed from the start values
    every call (no state), evaluated for every step of the path without a host
    sync. The official code's variant (pos/neg ratio target 1, c_low raised first,
    dual clip 3, all-reduced sums) is not implemented. Metrics add ``c_low``,
    ``c_high``, ``rho``.
    """
    check_shapes("bapo", logp=logp, advantages=advantages, mask=mask, old_logp=old_logp)
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
            den = (m * torch.minimum(r * A, r.clamp(c_l, c_h) * A)).sum().abs()
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
