"""Pairwise (contrastive / preference) losses over responses to the same prompt: copg, dpo.

Pairs are formed inside each group (``group_index``); the sequence log-ratio to
the reference, ``h_i = Σ_t m (ℓ − ℓ^ref)``, carries the gradient. A pair's loss
is split over its two rows and written on every valid token of each, so the
default ``seq-mean-token-mean`` aggregation returns the paper's objective (other
aggregations weight rows by length and change it). Advantages are ignored:
these losses read ``rewards`` directly. See ``losses/common.py`` for the contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offpolicy.objectives.aggregate import check_shapes, masked, masked_mean
from offpolicy.objectives.losses.common import POLICY_LOSSES


def _same_group(group_index: torch.Tensor, B: int) -> torch.Tensor:
    if group_index.shape != (B,):
        raise ValueError(f"group_index must be (B,) = ({B},), got {tuple(group_index.shape)}")
    return group_index[:, None] == group_index[None, :]  # (B, B)


@POLICY_LOSSES.register("copg", needs=("ref_logp", "rewards", "group_index"), default_agg="seq-mean-token-mean",
                        paper="arXiv:2406.19185",
                        summary="squared difference of KL-regularised sequence rewards over all pairs of a group; "
                                "no ratio, no clip, no critic")
def copg(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor,
         rewards: torch.Tensor, group_index: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """CoPG: ``(1/(k−1)) Σ_{i<j} (R^π_β(y_i) − R^π_β(y_j))²`` per group of k, ``R^π_β(y) = R(y) − β h(y)``.

    ``h(y) = Σ_t (ℓ − ℓ^ref)`` (sequence log-ratio to the reference). Its gradient
    is ``∝ (R^π_β(y) − R^π_β(y'))(∇log π(y) − ∇log π(y'))`` for every pair, from
    any behaviour policy: no IS, no clip, no value network. Delta vs reinforce with
    RLOO: the baseline of each response is its partner's *regularised* reward, which
    makes the estimator consistent off-policy. At ``π = π_ref`` the
    gradient is ``2β`` times REINFORCE with the RLOO advantage (sequence sums);
    on preference pairs it reduces to IPO. Row i carries ``½ Σ_{j∈G} (ΔR^π_β)²/(k−1)``,
    so SMTM gives ``(1/B) Σ_groups Σ_{i<j} (·)²/(k−1)``. Sources: ALGORITHMS.md §17
    [S] (the original equations were not reached); **β is [NF]**: 0.1 is our
    default, not the paper's. Groups of one give 0. Metrics: ``seq_log_ratio_mean``,
    ``reg_reward_gap`` (mean |ΔR^π_β| over pairs).
    """
    check_shapes("copg", logp=logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    if beta <= 0:
        raise ValueError(f"copg beta must be > 0, got {beta}")
    B = logp.shape[0]
    same = _same_group(group_index, B) & ~torch.eye(B, dtype=torch.bool, device=logp.device)  # (B, B) pairs
    h = masked(logp - ref_logp.detach(), mask).sum(-1)  # (B,) with grad
    S = rewards.detach().to(h.dtype) - beta * h  # (B,) R^π_β
    diff = S[:, None] - S[None, :]  # (B, B)
    k = same.sum(-1).to(h.dtype)  # (B,) k − 1 partners
    sq = torch.where(same, diff.square(), torch.zeros_like(diff))
    per_row = 0.5 * sq.sum(-1) / k.clamp(min=1)  # (B,) ½ Σ_j Δ²/(k−1)
    with torch.no_grad():
        n_pairs = same.sum()
        metrics = {"seq_log_ratio_mean": masked_mean(h.detach(), mask.bool().any(-1)),
                   "reg_reward_gap": torch.where(n_pairs > 0, (diff.detach().abs() * same).sum()
                                                 / n_pairs.clamp(min=1), torch.zeros((), dtype=h.dtype))}
    return masked(per_row[:, None].expand_as(logp), mask), metrics


def _dpo_pairs(rewards: torch.Tensor, same: torch.Tensor, pairing: str) -> torch.Tensor:
    """(B, B) bool: ``P[i, j]`` = (chosen i, rejected j)."""
    r = rewards.detach()
    better = same & (r[:, None] > r[None, :])
    if pairing == "all":
        return better
    B = r.shape[0]
    idx = torch.arange(B, device=r.device)
    big = torch.full((B, B), B, device=r.device)
    gmax = torch.where(same, r[None, :], torch.full_like(better, -torch.inf, dtype=r.dtype)).amax(-1)  # (B,)
    gmin = torch.where(same, r[None, :], torch.full_like(better, torch.inf, dtype=r.dtype)).amin(-1)
    first_max = torch.where(same & (r[None, :] == gmax[:, None]), idx[None, :], big).amin(-1)  # per row's group
    first_min = torch.where(same & (r[None, :] == gmin[:, None]), idx[None, :], big).amin(-1)
    best, worst = idx == first_max, idx == first_min  # (B,) the group's first best / first worst row
    return better & best[:, None] & worst[None, :]


@POLICY_LOSSES.register("dpo", needs=("ref_logp", "rewards", "group_index"), default_agg="seq-mean-token-mean",
                        paper="arXiv:2305.18290",
                        summary="−log σ(β[h_chosen − h_rejected]) on the best-vs-worst reward pair of each group")
def dpo(*, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor,
        rewards: torch.Tensor, group_index: torch.Tensor, beta: float = 0.1,
        pairing: str = "best_worst") -> tuple[torch.Tensor, dict]:
    """DPO: ``L = −log σ(β [h(y_w) − h(y_l)])``, ``h(y) = Σ_t (ℓ − ℓ^ref)``, mean over pairs. β = 0.1.

    **Pairing convention** (groups of sampled responses have rewards, not
    preferences): ``best_worst`` (default) makes one pair per group, chosen =
    the first response with the group's highest reward, rejected = the first
    with its lowest, and none when all rewards tie; ``all`` pairs every
    ``(i, j)`` of a group with ``R_i > R_j``. Delta vs copg: a logistic loss on
    the reward *ordering* (a Bradley–Terry preference), not a squared loss on the
    reward *values*. Each pair's loss is split over its two rows and rescaled by
    ``B / #pairs`` so that SMTM is the mean over pairs; no pair → 0. Metrics:
    ``pair_frac`` (rows in at least one pair), ``margin_mean`` (β Δh over pairs),
    ``pair_accuracy`` (pairs with margin > 0).
    """
    check_shapes("dpo", logp=logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if pairing not in ("best_worst", "all"):
        raise ValueError(f"dpo pairing={pairing!r}; valid: ['best_worst', 'all']")
    B = logp.shape[0]
    pairs = _dpo_pairs(rewards, _same_group(group_index, B), pairing)  # (B, B) chosen i, rejected j
    h = masked(logp - ref_logp.detach(), mask).sum(-1)  # (B,)
    margin = beta * (h[:, None] - h[None, :])  # (B, B)
    pair_loss = torch.where(pairs, F.softplus(-margin), torch.zeros_like(margin))  # −log σ(margin)
    n_pairs = pairs.sum()
    scale = torch.where(n_pairs > 0, B / n_pairs.clamp(min=1).to(h.dtype), torch.zeros((), dtype=h.dtype))
    per_row = 0.5 * scale * (pair_loss.sum(-1) + pair_loss.sum(0))  # (B,) half to chosen, half to rejected
    with torch.no_grad():
        in_pair = pairs.any(-1) | pairs.any(0)
        m = margin.detach()
        denom = n_pairs.clamp(min=1).to(h.dtype)
        metrics = {"pair_frac": in_pair.to(h.dtype).mean(),
                   "margin_mean": (m * pairs).sum() / denom,
                   "pair_accuracy": ((m > 0) & pairs).sum().to(h.dtype) / denom}
    return masked(per_row[:, None].expand_as(logp), mask), metrics
