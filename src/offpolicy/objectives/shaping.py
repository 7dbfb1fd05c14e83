"""Data shaping: which responses (or prompts) to keep or sample, as pure functions of rewards.

These do not change a loss; they decide what the loss sees. None is registered:
the buffer / sampler or the learner calls them directly.

======================================  ===================================================================
``red_drop(rewards, group_index, g)``   REC's RED-Drop: per group, drop random surplus negatives (keep mask)
``pass_rate_variance(correct, gi)``     MMR1's outcome variance score ``OVS = P(1 − P)`` per prompt
``variance_aware_scores(ovs, tds)``     MMR1's ``VPS = α·OVS + β·TDS``
``mixed_sampling_probs(scores, λ)``     probability of each prompt when ``λB`` are drawn ∝ score, the rest uniformly
``return_weights(returns, α)``          return-weighted (RW) resampling probabilities, arXiv:2306.13085
``advantage_weights(returns, gi, α)``   advantage-weighted (AW) resampling with a per-prompt baseline
======================================  ===================================================================
"""

from __future__ import annotations

import torch


def _group_inverse(group_index: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    if group_index.shape != (n,):
        raise ValueError(f"group_index must be (B,) = ({n},), got {tuple(group_index.shape)}")
    groups, inv = torch.unique(group_index, return_inverse=True)
    return inv, groups.numel()


def red_drop(rewards: torch.Tensor, group_index: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """RED-Drop (arXiv:2509.24203): a (B,) bool keep mask that balances each group's negatives.

    In each group, responses with ``R ≥ mean_G R`` are positives and the rest
    negatives; if there are more negatives than positives, ``#neg − #pos``
    negatives chosen uniformly at random are dropped [C: Trinity
    ``rec_advantage.py``, ``drop="balance"``]. Recompute the advantages on the kept
    rows only (``ADVANTAGES[name](rewards=rewards[keep], ...)``); dropped rows get
    advantage 0. Trinity then uses the population std and gives a group left with
    one response baseline 0; our estimators keep their own conventions (Bessel
    std, singleton → 0). Randomness comes only from ``generator`` (or torch's
    global RNG when None), so a checkpointed generator reproduces the drop.
    """
    if rewards.ndim != 1:
        raise ValueError(f"red_drop: rewards must be (B,), got {tuple(rewards.shape)}")
    B = rewards.shape[0]
    inv, G = _group_inverse(group_index, B)
    r = rewards.detach().to(torch.float64)
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    neg = r < mean[inv]  # (B,)
    n_neg = torch.zeros(G, dtype=torch.int64, device=r.device).index_add_(0, inv, neg.to(torch.int64))
    n_drop = (2 * n_neg - count.to(torch.int64)).clamp(min=0)  # #neg − #pos when positive, (G,)
    keys = torch.rand(B, generator=generator, dtype=torch.float64, device=r.device)
    # rank of each negative among its group's negatives, in random key order
    order = torch.argsort(keys)
    order = order[torch.argsort(inv[order] * 2 + (~neg[order]).to(torch.int64), stable=True)]
    seg = inv[order] * 2 + (~neg[order]).to(torch.int64)  # sorted segment ids
    pos_in_sorted = torch.arange(B, device=r.device)
    first = torch.zeros(2 * G, dtype=torch.int64, device=r.device).scatter_reduce(
        0, seg, pos_in_sorted, "amin", include_self=False)
    rank = torch.empty(B, dtype=torch.int64, device=r.device)
    rank[order] = pos_in_sorted - first[seg]
    return ~(neg & (rank < n_drop[inv]))


def pass_rate_variance(correct: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MMR1 outcome variance score (arXiv:2509.21268): ``OVS = P(1 − P)``, ``P = (1/N) Σ_i V(x, y_i)``.

    ``correct`` (B,) is the verifier outcome ``V ∈ {0, 1}`` (bool or float) of each
    response, ``group_index`` (B,) its prompt. Returns ``(ovs, groups)``: one score
    per prompt (G,) in ascending ``groups`` order (the ids, (G,)). Largest (0.25)
    at P = ½; 0 for prompts always or never solved.
    """
    v = correct.detach().to(torch.float64)
    if v.ndim != 1 or ((v < 0) | (v > 1)).any():
        raise ValueError("pass_rate_variance: correct must be (B,) with values in [0, 1]")
    groups = torch.unique(group_index)
    inv, G = _group_inverse(group_index, v.shape[0])
    n = torch.zeros(G, dtype=v.dtype, device=v.device).index_add_(0, inv, torch.ones_like(v))
    p = torch.zeros(G, dtype=v.dtype, device=v.device).index_add_(0, inv, v) / n
    return p * (1 - p), groups


def variance_aware_scores(ovs: torch.Tensor, tds: torch.Tensor | None = None, *, alpha: float = 0.8,
                          beta: float = 0.2) -> torch.Tensor:
    """MMR1 variance-promotion score ``VPS = α·OVS + β·TDS`` per prompt (α = 0.8, β = 0.2 [P]).

    ``tds`` (trajectory diversity, e.g. inverse self-BLEU or distinct-n of the
    prompt's responses, scaled to [0, 1]) is computed outside this module (it
    needs the texts); None drops the term (VPS = α·OVS).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"variance_aware_scores needs alpha, beta >= 0, got {alpha}, {beta}")
    score = alpha * ovs.to(torch.float64)
    if tds is not None:
        if tds.shape != ovs.shape:
            raise ValueError(f"variance_aware_scores: tds {tuple(tds.shape)} must match ovs {tuple(ovs.shape)}")
        score = score + beta * tds.to(torch.float64)
    return score


def mixed_sampling_probs(scores: torch.Tensor, *, lam: float = 0.5) -> torch.Tensor:
    """Per-prompt probability when ``⌊λB⌋`` of a batch are drawn ∝ ``scores`` and the rest uniformly (λ = 0.5 [P]).

    ``p_k = λ·s_k/Σs + (1 − λ)/K``. When every score is 0 (no prompt has varied
    outcomes) the proportional part has nothing to prefer and the result is
    uniform. Scores must be ≥ 0. (K,) -> (K,) summing to 1.
    """
    if not 0 <= lam <= 1:
        raise ValueError(f"mixed_sampling_probs lam must be in [0, 1], got {lam}")
    s = scores.detach().to(torch.float64)
    if s.ndim != 1 or s.numel() == 0 or (s < 0).any():
        raise ValueError("mixed_sampling_probs: scores must be a non-empty (K,) tensor of values >= 0")
    K = s.numel()
    total = s.sum()
    prop = torch.where(total > 0, s / total.clamp(min=1e-300), torch.full_like(s, 1.0 / K))
    return lam * prop + (1 - lam) / K


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-300), torch.zeros_like(x))


def return_weights(returns: torch.Tensor, *, alpha: float = 0.1,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Return-weighted resampling (RW, arXiv:2306.13085): probability of each trajectory (N,) -> (N,).

    ``Ĝ_i = (G_i − min G)/(max G − min G)``; each *transition* of trajectory i is
    drawn ∝ ``exp(Ĝ_i/α)``, so trajectory i's mass is ∝ ``T_i exp(Ĝ_i/α)`` with
    ``T_i = lengths`` (None: every trajectory counts as one unit, e.g. one LLM
    response with ``G = R``). α = 0.1 [C: harness-offline-rl]. Uses the
    normalised returns (the README's fix; the stored code softmaxes raw G).
    Equal returns give probabilities ∝ T_i. Computed as a softmax in log space.
    """
    if alpha <= 0:
        raise ValueError(f"return_weights alpha must be > 0, got {alpha}")
    g = returns.detach().to(torch.float64)
    if g.ndim != 1 or g.numel() == 0:
        raise ValueError("return_weights: returns must be a non-empty (N,) tensor")
    logits = _minmax(g) / alpha
    if lengths is not None:
        if lengths.shape != g.shape or (lengths <= 0).any():
            raise ValueError("return_weights: lengths must match returns and be > 0")
        logits = logits + lengths.to(torch.float64).log()
    return torch.softmax(logits, 0)


def advantage_weights(returns: torch.Tensor, group_index: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """Advantage-weighted resampling (AW, arXiv:2306.13085) with a per-prompt baseline, (N,) -> (N,).

    ``A_i = G_i − V̂(s_0)``; for LLM responses the initial state is the prompt, so
    the linear regression of G on it is the prompt's mean return. A is min-max
    normalised, then sampled ∝ ``exp(Â_i/α)``, α = 0.1.
    """
    g = returns.detach().to(torch.float64)
    inv, G = _group_inverse(group_index, g.shape[0])
    n = torch.zeros(G, dtype=g.dtype, device=g.device).index_add_(0, inv, torch.ones_like(g))
    mean = torch.zeros(G, dtype=g.dtype, device=g.device).index_add_(0, inv, g) / n
    return return_weights(g - mean[inv], alpha=alpha)
