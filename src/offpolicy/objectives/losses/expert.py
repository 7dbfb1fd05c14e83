"""Expert data and expert mixing: sft, sft_is, chord (+ its μ schedule), luffy.

See ``losses/common.py`` for the contract every loss follows.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.corrections import token_log_ratio
from offpolicy.objectives.losses.clipped import ppo_clip
from offpolicy.objectives.losses.common import POLICY_LOSSES, ratio_metrics


# ---- supervised ----------------------------------------------------------------------------
@POLICY_LOSSES.register("sft", needs=(), default_agg="token-mean", paper="(maximum likelihood; no arXiv id)",
                        summary="negative log-likelihood of the given tokens; advantages are ignored")
def sft(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SFT on expert traces: ``L_t = −ℓ_t``. Delta vs reinforce: every token has advantage 1.

    Metric: ``nll`` = mean ``−ℓ`` over valid tokens.
    """
    check_shapes("sft", logp=logp, mask=mask)
    loss = masked(-logp, mask)
    return loss, {"nll": masked_mean(loss.detach(), mask)}


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
