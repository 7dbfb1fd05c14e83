"""Advantage estimators: outcome rewards (B,) + group index (B,) -> per-token advantages (B, T).

Registered in ``ADVANTAGES`` and called
``fn(*, rewards, group_index, mask, **hparams) -> (B, T)``: the sequence
advantage ``Â_i`` is broadcast to every token of response i and is exactly 0
where ``mask`` is 0. ``group_index`` holds arbitrary integers (responses to the
same prompt share one); groups may have different sizes. Rewards may be any
float dtype; advantages come back in ``mask``'s float dtype.

==============  ========================================  ==========================
``grpo``        ``(R_i − mean_G R) / (std_G R + ε)``      arXiv:2402.03300, ε = 1e-6
``dr_grpo``     ``R_i − mean_G R``                         arXiv:2503.20783
``rloo``        ``R_i − mean_{j≠i, j∈G} R_j``             arXiv:2402.14740
``reinforce``   ``R_i − b`` (constant b, default 0)        Williams 1992
==============  ========================================  ==========================

A group of size 1 has no baseline, so ``grpo``, ``dr_grpo`` and ``rloo`` give it
advantage 0 (it contributes no gradient). verl instead treats a singleton as
mean 0 / std 1, i.e. advantage = raw reward; we do not, because a raw reward
is not on the same scale as the normalised advantages of the other groups.
``std_G`` is the unbiased (Bessel, n−1) standard deviation, as ``torch.std`` in
verl and TRL.
"""

from __future__ import annotations

import torch

from offpolicy.objectives.registry import Registry

ADVANTAGES = Registry("advantage estimator")


def group_stats(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group size ``n``, deviation ``R − mean_G R`` and unbiased std (0 for n = 1); each (B,) float64."""
    if rewards.ndim != 1 or group_index.shape != rewards.shape:
        raise ValueError(f"rewards and group_index must both be (B,), got {tuple(rewards.shape)} "
                         f"and {tuple(group_index.shape)}")
    r = rewards.detach().to(torch.float64)  # float64: group means of large rewards stay exact
    groups, inv = torch.unique(group_index, return_inverse=True)  # inv: (B,) in 0..G-1
    G = groups.numel()
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    dev = r - mean[inv]  # (B,)
    sq = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, dev.square())
    n = count[inv]  # (B,)
    std = torch.where(n > 1, (sq[inv] / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(r))
    return n, dev, std


def _broadcast(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T) in mask's dtype, zero on masked-out tokens."""
    return adv.to(mask.dtype)[:, None] * mask


@ADVANTAGES.register("grpo", paper="arXiv:2402.03300", summary="group mean baseline, divided by group std")
def grpo(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``Â_i = (R_i − mean_G R) / (std_G R + eps)``, eps = 1e-6; 0 for singleton groups.

    A group whose rewards are all equal gets 0 (std 0, deviation 0).
    """
    n, dev, std = group_stats(rewards, group_index)
    adv = torch.where(n > 1, dev / (std + eps), torch.zeros_like(dev))
    return _broadcast(adv, mask)


@ADVANTAGES.register("dr_grpo", paper="arXiv:2503.20783", summary="grpo without the std division (mean-only)")
def dr_grpo(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO / REC: ``Â_i = R_i − mean_G R``. Delta vs grpo: no ``/std`` (removes the difficulty bias)."""
    _, dev, _ = group_stats(rewards, group_index)
    return _broadcast(dev, mask)  # singleton: R − R = 0


@ADVANTAGES.register("rloo", paper="arXiv:2402.14740", summary="leave-one-out group mean baseline")
def rloo(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO: ``Â_i = R_i − (1/(n−1)) Σ_{j≠i} R_j = n/(n−1) · (R_i − mean_G R)``; 0 for singleton groups.

    Delta vs dr_grpo: the baseline excludes the sample itself, so it is unbiased;
    the advantage is the mean-only one scaled by ``n/(n−1)``.
    """
    n, dev, _ = group_stats(rewards, group_index)
    adv = torch.where(n > 1, dev * n / (n - 1).clamp(min=1), torch.zeros_like(dev))
    return _broadcast(adv, mask)


@ADVANTAGES.register("reinforce", paper="Williams 1992 (no arXiv id)", summary="raw reward minus a constant baseline")
def reinforce(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor,
              baseline: float = 0.0) -> torch.Tensor:
    """REINFORCE: ``Â_i = R_i − baseline`` (constant, default 0); ``group_index`` is ignored."""
    return _broadcast(rewards.detach().to(torch.float64) - baseline, mask)


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, cache_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward (arXiv:2503.14476; verl recipe [C]).

    ``R_len = min(−(|y| − (L_max − L_cache)) / L_cache · factor, 0)``: 0 up to
    ``L_max − L_cache`` tokens, then linearly down to ``−factor`` at ``L_max``.
    DAPO uses L_max 20480, L_cache 4096, factor 1.0. ``lengths`` (B,) -> (B,) float.
    Not registered: it shapes rewards before an advantage estimator runs.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty needs 0 < cache_len <= max_len, "
                         f"got cache_len={cache_len}, max_len={max_len}")
    over = lengths.to(torch.float32) - (max_len - cache_len)
    return (-over / cache_len * factor).clamp(max=0.0)
