"""Per-token estimators of KL(π_θ ‖ π_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

``KL_ESTIMATORS[name](logp, ref_logp) -> (B, T)``; the gradient flows through
``logp`` only (``ref_logp`` is a frozen anchor and is detached). With
``δ = ℓ^ref − ℓ`` on tokens sampled from π_θ:

======  ==========================  ============================================
``k1``  ``ℓ − ℓ^ref = −δ``          unbiased, can be negative, high variance
``k2``  ``½ (ℓ − ℓ^ref)²``          biased, ≥ 0, low variance; its gradient is
                                    the true reverse-KL gradient on-policy
``k3``  ``exp(δ) − δ − 1``          unbiased, ≥ 0, low variance (GRPO's D_{i,t})
======  ==========================  ============================================

No mask argument: the caller masks (the learner multiplies by ``mask``). To keep
``kl * mask`` free of ``inf * 0 = NaN`` on padding, ``k3`` exponentiates ``δ``
clamped to ±LOG_RATIO_CLAMP (= 20, as verl's ``low_var_kl``); the clamp has zero
gradient beyond it. k1/k2 are finite for finite inputs and are not clamped.
Source: http://joschu.net/blog/kl-approx.html; GRPO arXiv:2402.03300 Eq. 4 (k3).
"""

from __future__ import annotations

import torch

from offpolicy.objectives.corrections import LOG_RATIO_CLAMP
from offpolicy.objectives.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")


@KL_ESTIMATORS.register("k1", summary="log-ratio ℓ − ℓ_ref (unbiased, signed)")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``ℓ − ℓ^ref`` (B, T)."""
    return logp - ref_logp.detach()


@KL_ESTIMATORS.register("k2", summary="half squared log-ratio (biased, non-negative)")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``½ (ℓ − ℓ^ref)²`` (B, T)."""
    return 0.5 * (logp - ref_logp.detach()).square()


@KL_ESTIMATORS.register("k3", paper="arXiv:2402.03300", summary="exp(δ) − δ − 1 with δ = ℓ_ref − ℓ (unbiased, ≥ 0)")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(ℓ^ref − ℓ) − (ℓ^ref − ℓ) − 1`` (B, T), δ clamped to ±20 before ``exp``."""
    delta = (ref_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return delta.exp() - delta - 1
