"""Advantage estimators: outcome rewards (B,) + group index (B,) -> per-token advantages (B, T).

Registered in ``ADVANTAGES`` and called
``fn(*, rewards, group_index, mask, **hparams) -> (B, T)``: the sequence
advantage ``Â_i`` is broadcast to every token of response i and is exactly 0
where ``mask`` is 0. ``group_index`` holds arbitrary integers (responses to the
same prompt share one); groups may have different sizes. Rewards may be any
float dtype; advantages come back in ``mask``'s float dtype.

====================  ================================================  ==========================
``grpo``              ``(R_i − mean_G R) / (std_G R + ε)``              arXiv:2402.03300, ε = 1e-6
``dr_grpo``           ``R_i − mean_G R``                                 arXiv:2503.20783
``rloo``              ``R_i − mean_{j≠i, j∈G} R_j``                     arXiv:2402.14740
``reinforce``         ``R_i − b`` (constant b, default 0)                Williams 1992
``reinforce_pp``      ``R_i − mean_G R``, whitened over the batch        arXiv:2501.03262
``gae``               GAE(γ, λ) from critic ``values`` (token level)     arXiv:1506.02438
``opmd_logavgexp``    ``R_i − τ log mean_G exp(R/τ)``                    Trinity-RFT OPMD (code)
``asymre``            ``R_i − (mean_G R − β)``                           arXiv:2506.20520
``optimal_baseline``  ``(R_i − b*_G) / σ_G``, b* weighted by w²‖g‖²     arXiv:2602.17616 (VCPO)
``tempo``             grpo + ``V(y_{≤t}) − V(y_{<t})`` (prefix tree)    arXiv:2509.18314 (token level)
====================  ================================================  ==========================

Estimators that need more than rewards take it as keyword tensors declared in
their ``needs`` (must be given: ``gae`` needs ``values``) or ``optional``
(``optimal_baseline`` takes ``log_weights`` and ``grad_norms``; ``tempo`` needs ``response_ids``) attributes.

A group of size 1 has no baseline, so every group-relative estimator here
(``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``, ``opmd_logavgexp``, ``asymre``,
``optimal_baseline``) gives it advantage 0 (it contributes no gradient). verl instead treats a singleton as
mean 0 / std 1, i.e. advantage = raw reward; we do not, because a raw reward
is not on the same scale as the normalised advantages of the other groups.
``std_G`` is the unbiased (Bessel, n−1) standard deviation, as ``torch.std`` in
verl and TRL.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.aggregate import masked, masked_mean
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


def _group_ids(group_index: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """``inv`` (B,) in 0..G−1 (groups in ascending id order) and ``G``; checks the shape."""
    if group_index.shape != (n,):
        raise ValueError(f"group_index must be (B,) = ({n},), got {tuple(group_index.shape)}")
    groups, inv = torch.unique(group_index, return_inverse=True)
    return inv, groups.numel()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """verl's ``masked_whiten``: ``(x − mean) / sqrt(var + eps)`` over valid entries, unbiased (n−1) variance.

    0 on masked-out entries; an all-masked input gives zeros and a single valid
    entry gives 0 (its variance is taken as 0 instead of verl's division by zero).
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask) * n / (n - 1).clamp(min=1)  # Bessel, as verl's masked_var
    return masked((x - mean) * torch.rsqrt(var + eps), mask)


@ADVANTAGES.register("reinforce_pp", paper="arXiv:2501.03262",
                     summary="group-mean baseline (or none), then normalised over every valid token of the batch")
def reinforce_pp(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor, baseline: str = "group",
                 eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++: ``Â = (Ã − mean_batch Ã) / sqrt(var_batch Ã + eps)`` with ``Ã_i`` broadcast to tokens.

    ``baseline="group"`` (REINFORCE++-baseline, k > 1 samples per prompt):
    ``Ã_i = R_i − mean_G R``; ``baseline="none"`` (REINFORCE++, k ≥ 1): ``Ã_i = R_i``
    (the discounted return of an outcome reward with γ = 1). Delta vs grpo: the
    std divides by the *global* batch statistics, not the per-prompt ones (the
    paper's "global advantage normalization"). Mean and unbiased variance run
    over every valid token, as verl's ``masked_whiten`` [C: verl
    ``compute_reinforce_plus_plus_(baseline_)outcome_advantage``]; eps = 1e-8.
    Not here: plain REINFORCE++ also puts a per-token KL penalty into the reward;
    use the learner's ``rl.kl_coef`` instead (a loss term, not a reward term).
    Singleton groups get 0 with ``baseline="group"`` and are left out of the batch
    statistics (verl gives them baseline 0, i.e. their raw reward).
    """
    if baseline not in ("group", "none"):
        raise ValueError(f"reinforce_pp baseline={baseline!r}; valid: ['group', 'none']")
    n, dev, _ = group_stats(rewards, group_index)
    if baseline == "none":
        return whiten(_broadcast(rewards.detach().to(torch.float64), mask.to(torch.float64)), mask, eps).to(mask.dtype)
    keep = mask.to(torch.float64) * (n > 1).to(torch.float64)[:, None]  # (B, T) singletons out
    return whiten(dev[:, None] * keep, keep, eps).to(mask.dtype)


def gae_advantages_and_returns(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                               gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) over valid tokens (B, T): ``δ_t = r_t + γ V_{t'} − V_t``, ``A_t = δ_t + γλ A_{t'}``.

    ``t'`` is the next *valid* token (tool/environment tokens with mask 0 are
    skipped, carrying value and advantage across them, as verl); after the last
    valid token ``V = A = 0``. Returns ``(advantages, returns = A + V)``, 0 on
    masked-out tokens, not normalised.
    """
    m = mask.to(values.dtype)
    next_v = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    out = torch.zeros_like(values)
    for t in range(values.shape[1] - 1, -1, -1):  # backward recursion; (B,) per step
        delta = token_rewards[:, t] + gamma * next_v - values[:, t]
        cur = delta + gamma * lam * last
        next_v = torch.where(m[:, t] > 0, values[:, t], next_v)
        last = torch.where(m[:, t] > 0, cur, last)
        out[:, t] = last
    adv = masked(out, mask)
    return adv, masked(adv + values, mask)


def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome rewards (B,) placed on each row's last valid token -> (B, T) (rows without tokens get none)."""
    valid = mask.bool()
    T = mask.shape[-1]
    last = (T - 1) - valid.flip(-1).to(torch.int64).argmax(-1)  # (B,) index of the last valid token
    out = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = rewards.detach().to(torch.float64)
    return masked(out, valid.any(-1, keepdim=True).expand_as(valid))


@ADVANTAGES.register("gae", needs=("values",), paper="arXiv:1506.02438",
                     summary="token-level GAE(γ, λ) from a critic's values; outcome reward on the last token")
def gae(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None,
        token_rewards: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
        normalize: bool = True) -> torch.Tensor:
    """PPO's GAE: ``A_t = Σ_k (γλ)^k δ_{t+k}``, ``δ_t = r_t + γ V_{t+1} − V_t`` over valid tokens.

    Delta vs reinforce: a learned per-token baseline ``V_t`` and a bias–variance
    trade-off λ instead of one outcome minus a constant.
    **Needs a critic**: ``values`` (B, T) are the value head's per-token estimates;
    without them this raises (there is no critic-free GAE). The outcome reward
    ``R_i`` is the reward of the last valid token (``token_rewards`` (B, T)
    replaces that when given). Tokens with mask 0 inside a response (tool
    output) are skipped. ``normalize`` whitens over the batch (verl
    ``compute_gae_advantage_return`` [C], its default). Defaults γ = λ = 1 (verl's
    LLM defaults); the MDPO code uses γ = 0.99, λ = 0.98. ``group_index`` is unused.
    """
    if values is None:
        raise ValueError("advantage 'gae' needs per-token critic values (values, (B, T)); this run has no critic. "
                         "Use a critic-free estimator (grpo, rloo, reinforce_pp, ...) instead")
    if values.shape != mask.shape or (token_rewards is not None and token_rewards.shape != mask.shape):
        raise ValueError(f"gae: values/token_rewards must be (B, T) = {tuple(mask.shape)}")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gae needs 0 <= gamma, lam <= 1, got gamma={gamma}, lam={lam}")
    r = last_token_rewards(rewards, mask) if token_rewards is None else token_rewards.detach().to(torch.float64)
    adv, _ = gae_advantages_and_returns(r, values.detach().to(torch.float64), mask, gamma=gamma, lam=lam)
    return (whiten(adv, mask) if normalize else adv).to(mask.dtype)


@ADVANTAGES.register("opmd_logavgexp", paper="Trinity-RFT opmd_advantage.py (OPMD, arXiv:2501.12599)",
                     summary="baseline τ·log mean_G exp(R/τ) (soft maximum of the group) instead of the mean")
def opmd_logavgexp(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor,
                   tau: float = 1.0) -> torch.Tensor:
    """Trinity's OPMD advantage: ``Â_i = R_i − τ log((1/n) Σ_{j∈G} exp(R_j/τ))``.

    The baseline is the log-mean-exp of the group's rewards, between the mean
    (τ → ∞) and the maximum (τ → 0), so most responses get a negative advantage.
    τ = 1.0 (Trinity ``opmd_baseline="logavgexp"``, ``tau=1.0`` [C]). Delta vs
    dr_grpo: soft-max baseline instead of the mean. A singleton's baseline is
    its own reward, so it gets 0 (Trinity sets a singleton's baseline to 0).
    """
    if tau <= 0:
        raise ValueError(f"opmd_logavgexp tau must be > 0, got {tau}")
    n, _, _ = group_stats(rewards, group_index)
    inv, G = _group_ids(group_index, rewards.shape[0])
    x = rewards.detach().to(torch.float64) / tau  # (B,)
    gmax = torch.full((G,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amax")
    s = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, inv, (x - gmax[inv]).exp())
    base = tau * (gmax + s.log())[inv] - tau * n.log()  # τ(LSE − log n), (B,)
    adv = torch.where(n > 1, rewards.detach().to(torch.float64) - base, torch.zeros_like(base))
    return _broadcast(adv, mask)


@ADVANTAGES.register("asymre", paper="arXiv:2506.20520",
                     summary="dr_grpo with the baseline lowered by β: R − (mean_G R − β)")
def asymre(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """AsymRE: ``Â_i = R_i − (mean_G R − β)``, β = 0.1 (Trinity ``baseline_shift = −0.1`` [C]).

    Delta vs dr_grpo: the baseline is lowered by β, which tilts REINFORCE towards positive (asymmetric)
    updates; with the ``reinforce`` loss it gives exactly the gradient of the
    ``asymre`` *loss* (``−(Â + β) ℓ``) with ``dr_grpo`` advantages. Singletons get 0.
    """
    n, dev, _ = group_stats(rewards, group_index)
    return _broadcast(torch.where(n > 1, dev + beta, torch.zeros_like(dev)), mask)


def prefix_nodes(response_ids: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """(B, T) long: node of each token in its group's prefix tree (arXiv:2509.18314's Prefix-to-Tree).

    Rows i, j share ``node[:, t]`` iff they are in the same group and ``response_ids[i, :t+1]`` equals
    ``response_ids[j, :t+1]``. Exact (no hashing): node t is the pair (node t−1, token t) renumbered.
    Padding must be a value no real token has (the learner uses −1).
    """
    if response_ids.ndim != 2:
        raise ValueError(f"prefix_nodes: response_ids must be (B, T), got {tuple(response_ids.shape)}")
    node, _ = _group_ids(group_index, response_ids.shape[0])  # the root of each group's tree
    nodes, offset = [], 0
    for t in range(response_ids.shape[1]):
        _, local = torch.unique(torch.stack([node, response_ids[:, t].to(node.dtype)], dim=1), dim=0,
                                return_inverse=True)
        node = local + offset
        offset += int(local.max()) + 1
        nodes.append(node)
    return torch.stack(nodes, dim=1) if nodes else response_ids.new_zeros(response_ids.shape)


@ADVANTAGES.register("tempo", needs=("response_ids",), paper="arXiv:2509.18314",
                     summary="grpo plus branch-gated TD credit V(s_t) − V(s_{t−1}) from the group's prefix tree")
def tempo(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor,
          response_ids: torch.Tensor | None = None, outcome_coef: float = 1.0, td_coef: float = 1.0,
          norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """TEMPO: ``Â_{i,t} = outcome_coef · r̃_i + td_coef · (V(y_{i,≤t}) − V(y_{i,<t}))``.

    ``r̃_i = (R_i − mean_G R) / (std_G R + eps)`` (grpo; ``norm_by_std=False``: ``R_i − mean_G R``) and
    ``V(s)`` is the mean ``r̃`` of the group's responses that start with prefix ``s`` (Prefix-to-Tree), so
    ``V(∅) = 0``. The TD term is non-zero only at a branching token, where some of the group's responses
    that shared the prefix so far continue differently; elsewhere this is grpo. For a response whose tokens
    are all policy tokens the TD terms sum to ``r̃_i`` (they telescope), so ``outcome_coef=0`` spreads the
    sequence advantage over its branching tokens only: a wrong answer that shares its first digits with
    right ones is pushed down at the digit where it went wrong, not on the shared digits.
    ``response_ids`` (B, T): the responses, padding set to a value no token has. Singletons get 0.
    The paper gates the TD term to branch tokens and adds it to GRPO's; its weighting is ``td_coef``.
    """
    if response_ids is None or response_ids.shape != mask.shape:
        raise ValueError(f"tempo: response_ids must be (B, T) = {tuple(mask.shape)}, got "
                         f"{None if response_ids is None else tuple(response_ids.shape)}")
    n, dev, std = group_stats(rewards, group_index)
    r = torch.where(n > 1, dev / (std + eps) if norm_by_std else dev, torch.zeros_like(dev))  # (B,) r̃
    node = prefix_nodes(response_ids, group_index)  # (B, T)
    flat = node.reshape(-1)
    size = int(flat.max()) + 1 if flat.numel() else 0
    r_tok = r[:, None].expand_as(node).reshape(-1)
    total = torch.zeros(size, dtype=r.dtype, device=r.device).index_add_(0, flat, r_tok)
    count = torch.zeros(size, dtype=r.dtype, device=r.device).index_add_(0, flat, torch.ones_like(r_tok))
    value = (total / count.clamp(min=1))[node]  # (B, T): V(y_{≤t})
    before = torch.cat([torch.zeros_like(value[:, :1]), value[:, :-1]], dim=1)  # V(y_{<t}), V(∅) = 0
    td = (value - before).to(mask.dtype)
    return _broadcast(r, mask) * outcome_coef + td_coef * td * mask


@ADVANTAGES.register("optimal_baseline", optional=("log_weights", "grad_norms"), paper="arXiv:2602.17616",
                     summary="VCPO's off-policy optimal baseline: group reward mean weighted by w²‖g‖², / group std")
def optimal_baseline(*, rewards: torch.Tensor, group_index: torch.Tensor, mask: torch.Tensor,
                     log_weights: torch.Tensor | None = None, grad_norms: torch.Tensor | None = None,
                     norm_by_std: bool = True) -> torch.Tensor:
    """VCPO OPOB: ``Â_i = (R_i − b*_G) / σ_G``, ``b*_G = Σ_{j∈G} W_j R_j / Σ_{j∈G} W_j``, ``W_j = w_j² ‖g_j‖²``.

    ``log_weights`` (B,): ``log w_j = Σ_t (ℓ^old − ℓ^μ)``, the unclipped sequence IS
    weight (VCPO's default ``use_is_weights=True, use_clipped_is_ratios=False``);
    ``grad_norms`` (B,): ``‖g_j‖ = ‖∇_θ Σ_t log π(y_{j,t})‖``, one backward pass per
    trajectory (VCPO multiplies the SMTM gradient norm by ``|y|`` to get it).
    Delta vs grpo: the baseline is the variance-minimising weighted mean instead of
    the plain mean. Either may be omitted and is then taken as 1 for every trajectory; with both
    omitted ``b*`` is the group mean and this is GRPO with the population std.
    ``σ_G`` is the population (n) std, applied only when > 1e-8 and ``norm_by_std``
    [C: mit-han-lab/vcpo ``compute_opob_baseline``, ``_update_grad_buffers``].
    This module cannot compute ``‖g_j‖``: the learner must pass it (see
    ``docs/algorithms.md``). Weights are normalised in log space per group; a
    group whose ``W`` are all 0 falls back to the mean (the code's ``0/(0+ε)``
    gives 0). Singletons get 0. The TIS weighting ``min(w, 8)`` of the update is the
    ``vcpo`` loss's job.
    """
    n, dev, _ = group_stats(rewards, group_index)
    B = rewards.shape[0]
    inv, G = _group_ids(group_index, B)
    r = rewards.detach().to(torch.float64)
    log_W = torch.zeros(B, dtype=torch.float64, device=r.device)
    for name, v in (("log_weights", log_weights), ("grad_norms", grad_norms)):
        if v is not None and v.shape != (B,):
            raise ValueError(f"optimal_baseline: {name} must be (B,) = ({B},), got {tuple(v.shape)}")
    if log_weights is not None:
        log_W = log_W + 2 * log_weights.detach().to(torch.float64)
    if grad_norms is not None:
        if (grad_norms < 0).any():
            raise ValueError("optimal_baseline: grad_norms must be >= 0")
        log_W = log_W + 2 * grad_norms.detach().to(torch.float64).log()  # 0 -> -inf -> weight 0
    gmax = torch.full((G,), -math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, log_W, "amax")
    ok = torch.isfinite(gmax)  # (G,) some weight is positive
    W = torch.where(ok[inv], (log_W - torch.where(ok, gmax, torch.zeros_like(gmax))[inv]).exp(), torch.ones_like(r))
    num = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, W * r)
    den = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, W)
    adv = r - (num / den)[inv]
    if norm_by_std:
        sq = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, dev.square())
        sigma = (sq[inv] / n).sqrt()  # population std, (B,)
        adv = torch.where(sigma > 1e-8, adv / sigma.clamp(min=1e-8), adv)
    return _broadcast(torch.where(n > 1, adv, torch.zeros_like(adv)), mask)


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
