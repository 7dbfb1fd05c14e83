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

=====================  =========================================================
``tis_token``          ``min(w_t, C)``                           (TIS, C = 2)
``tis_seq``            ``min(Π_t w_t, C)`` for every token of the sequence
``mis_token``          ``w_t · 1[1/C ≤ w_t ≤ C]``                (masked IS)
``mis_seq``            ``Π_t w_t · 1[1/C ≤ Π_t w_t ≤ C]``
``mis_geo``            ``1[1/C ≤ (Π_t w_t)^{1/|y|} ≤ C]``        (geometric-mean rejection)
``cumulative_prefix``  ``Π_{j≤t} w_j``                           (exact per-decision prefix ratio)
``min_prefix``         ``min_{j<t} w_j · w_t``                   (MinPRO-style surrogate, [NF] details)
``turn_level``         one weight per turn, shared by its tokens (needs ``turn_ids``)
``decoupled``          mismatch ``π^train_v/μ`` × staleness ``π_old/π^train_v``, separately
=====================  =========================================================

A correction that needs more than ``old_logp``, ``behavior_logp`` and ``mask``
declares it in ``needs`` (``turn_level``: ``turn_ids``; ``decoupled``:
``behavior_train_logp``) and raises without it.

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


# ---- prefix ratios (per-decision correction) ----------------------------------------------
def prefix_min_log_ratio(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``min_{j<t, m_j=1} log_w_j`` (B, T); 0 where no valid token precedes t (empty minimum = ratio 1)."""
    big = torch.full_like(log_w, math.inf)
    cm = torch.cummin(torch.where(mask.bool(), log_w, big), dim=-1).values  # inclusive running min
    prev = torch.cat([big[:, :1], cm[:, :-1]], dim=-1)  # shift right: strictly preceding tokens
    return torch.where(prev == math.inf, torch.zeros_like(prev), prev)


@CORRECTIONS.register("cumulative_prefix", paper="arXiv:2601.22718 (prefix ratio); arXiv:2605.07331 (CTPO)",
                      summary="per-decision prefix IS weight Π_{j≤t} w_j, optionally truncated")
@torch.no_grad()
def cumulative_prefix(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                      cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prefix ratio: ``W_t = Π_{j≤t, valid} w_j = exp(Σ_{j≤t} m_j (ℓ^old_j − ℓ^μ_j))``; ``min(W_t, cap)`` if ``cap``.

    The exact importance weight of token t's policy-gradient term (the state
    distribution of its prefix times the action), which MinPRO's paper shows is
    the rigorous off-policy correction [P, abstract]. High variance on long
    responses: cap = None (exact) by default. Delta vs tis_seq: token t uses only
    its prefix, not the whole sequence. ``trunc_frac`` counts truncated tokens.
    """
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    log_W = torch.cumsum(log_w, dim=-1)  # masked log_w are 0, so only valid tokens count
    if cap is not None:
        if cap <= 0:
            raise ValueError(f"cumulative_prefix cap must be > 0 (or None), got {cap}")
        log_W_c = log_W.clamp(max=math.log(cap))
    else:
        log_W_c = log_W
    w = masked(_safe_exp(log_W_c), mask)
    metrics = _weight_metrics(w, mask, log_W, mask)
    metrics["trunc_frac"] = (masked_mean((log_W > math.log(cap)).float(), mask) if cap is not None
                             else torch.zeros((), device=mask.device))
    return w, metrics


@CORRECTIONS.register("min_prefix", paper="arXiv:2601.22718 (MinPRO; formula details [NF])",
                      summary="prefix ratio replaced by the minimum token ratio of the preceding prefix")
@torch.no_grad()
def min_prefix(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MinPRO-style weight: ``w̃_t = min_{j<t} w_j · w_t`` (``min_{j<t}`` over valid tokens, 1 for the first).

    MinPRO "replaces the unstable cumulative prefix ratio with a non-cumulative
    surrogate based on the minimum token-level ratio observed in the preceding
    prefix" [P, abstract of arXiv:2601.22718]. **[NF]**: the paper's exact form
    (whether the minimum includes token t, stop-gradients, clipping) was not
    found. Delta vs ``cumulative_prefix``: a minimum instead of a product over the
    prefix. Chosen here: the cumulative product ``Π_{j<t} w_j`` of the preceding
    prefix is replaced by its minimum factor, and token t's own ratio is kept,
    so ``w̃_t ≤ Π_{j≤t} w_j`` whenever every preceding ratio is ≤ 1 and one tiny
    ratio anywhere in the prefix down-weights everything after it. The
    ``minpro`` loss uses the same definition for ``π_θ/π_old``.
    """
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    log_wt = prefix_min_log_ratio(log_w, mask) + log_w
    w = masked(_safe_exp(log_wt), mask)
    metrics = _weight_metrics(w, mask, log_wt, mask)
    metrics["prefix_min_mean"] = masked_mean(_safe_exp(prefix_min_log_ratio(log_w, mask)), mask)
    return w, metrics


# ---- turn-level ratio (multi-turn) ---------------------------------------------------------
def turn_log_ratio(log_w: torch.Tensor, mask: torch.Tensor, turn_ids: torch.Tensor, *,
                   mode: str = "geometric") -> torch.Tensor:
    """Per-turn log-ratio shared by the turn's valid tokens (B, T): mean (``geometric``) or sum (``product``).

    A turn is the set of tokens of one row with the same ``turn_ids`` value
    (any integers; tool/environment tokens have mask 0 and do not count). 0 on
    masked-out tokens. Differentiable in ``log_w`` (losses may use it with grad).
    """
    if mode not in ("geometric", "product"):
        raise ValueError(f"turn ratio mode={mode!r}; valid: ['geometric', 'product']")
    if turn_ids.shape != log_w.shape:
        raise ValueError(f"turn_ids must be (B, T) = {tuple(log_w.shape)}, got {tuple(turn_ids.shape)}")
    B, T = log_w.shape
    rows = torch.arange(B, device=log_w.device)[:, None].expand(B, T)
    keys = torch.stack([rows.reshape(-1), turn_ids.reshape(-1).to(rows.dtype)], dim=-1)  # (B·T, 2)
    _, inv = torch.unique(keys, dim=0, return_inverse=True)  # one id per (row, turn)
    m = mask.reshape(-1).to(log_w.dtype)
    K = B * T  # an upper bound on the number of (row, turn) pairs: no host sync
    total = torch.zeros(K, dtype=log_w.dtype, device=log_w.device).index_add(0, inv, masked(log_w, mask).reshape(-1))
    if mode == "geometric":
        count = torch.zeros(K, dtype=log_w.dtype, device=log_w.device).index_add_(0, inv, m)
        total = total / count.clamp(min=1)
    return masked(total[inv].view(B, T), mask)


@CORRECTIONS.register("turn_level", needs=("turn_ids",), paper="arXiv:2511.20718 (ST-PPO; ratio definition [NF])",
                      summary="one mismatch IS weight per turn (geometric mean of its token ratios), shared by "
                              "the turn's tokens")
@torch.no_grad()
def turn_level(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
               turn_ids: torch.Tensor | None = None, mode: str = "geometric",
               cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Turn-level weight: every valid token of turn k gets ``w_k = exp(mean_{t∈k} (ℓ^old_t − ℓ^μ_t))``.

    ST-PPO's Turn-PPO computes "the importance ratio per turn and shares it by
    the turn's tokens" [P, abstract]. **[NF]**: whether that ratio is the product
    or the geometric mean of the token ratios. Delta vs ``tis_token``/``tis_seq``: the
    unit of the weight is the turn, not the token or the whole response. Chosen default: the geometric
    mean (``mode="geometric"``, length-independent like GSPO's sequence ratio);
    ``mode="product"`` gives ``Π_{t∈k} w_t``. ``cap`` truncates the weight
    (None = off). **Needs** ``turn_ids`` (B, T): equal ids within a row mark one
    turn (``Experience.turn_ids``). Without them it raises rather than treating
    the response as a single turn.
    """
    if turn_ids is None:
        raise ValueError("correction 'turn_level' needs turn_ids (B, T) (Experience.turn_ids); "
                         "this batch has none")
    if cap is not None and cap <= 0:
        raise ValueError(f"turn_level cap must be > 0 (or None), got {cap}")
    log_w = _mismatch_log_w(old_logp, behavior_logp, mask)
    log_turn = turn_log_ratio(log_w, mask, turn_ids, mode=mode)
    log_c = log_turn if cap is None else log_turn.clamp(max=math.log(cap))
    w = masked(_safe_exp(log_c), mask)
    return w, _weight_metrics(w, mask, log_turn, mask)


# ---- decoupled: mismatch and staleness separately ------------------------------------------
@CORRECTIONS.register("decoupled", needs=("behavior_train_logp",), paper="arXiv:2605.12070; arXiv:2505.24298",
                      summary="mismatch π_train/μ at the behaviour version (truncated or masked) times "
                              "staleness π_old/π_train (masked above a cap), reported separately")
@torch.no_grad()
def decoupled(*, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
              behavior_train_logp: torch.Tensor | None = None, mismatch_cap: float = 2.0,
              mismatch_mode: str = "truncate",
              staleness_cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled correction: ``π_old/μ_v = [π^train_v/μ_v] × [π_old/π^train_v]``, each factor handled on its own.

    ``behavior_train_logp`` is ``ℓ^train_v``: the *trainer's* log-probs under the
    weights of the version v that sampled each token (the "old logits" of
    arXiv:2605.12070). Then

    * mismatch ``m_t = exp(ℓ^train_v − ℓ^μ)`` (same weights, different engines):
      ``truncate`` → ``min(m_t, C)`` (TIS), ``mask`` → ``m_t·1[1/C ≤ m_t ≤ C]`` (MIS), C = 2;
    * staleness ``s_t = exp(ℓ^old − ℓ^train_v)`` (version v → the proximal policy):
      AReaL's behaviour weight, set to 0 above ``staleness_cap`` (None = off);

    and the loss's clip handles ``π_θ/π_old``. The weight is ``m̃_t · s̃_t``.
    **Needs** ``behavior_train_logp``: without the old logits the two factors
    cannot be told apart, and this raises instead of collapsing them (use
    ``tis_token`` to treat all of ``π_old/μ`` as mismatch). With no staleness
    (``ℓ^train_v = ℓ^old``) it equals ``tis_token`` / ``mis_token``. Metrics:
    ``mismatch_weight_mean``, ``mismatch_clip_frac``, ``mismatch_ess``,
    ``staleness_weight_mean``, ``staleness_mask_frac``, ``staleness_ess``, and
    ``weight_mean``, ``weight_max``, ``ess`` of the product.
    """
    if behavior_train_logp is None:
        raise ValueError("correction 'decoupled' needs behavior_train_logp: the trainer's log-probs under the "
                         "behaviour version's weights; without them mismatch and staleness cannot be separated "
                         "(use 'tis_token' to treat π_old/μ as mismatch only)")
    if mismatch_mode not in ("truncate", "mask"):
        raise ValueError(f"decoupled mismatch_mode={mismatch_mode!r}; valid: ['truncate', 'mask']")
    if mismatch_cap <= 1:
        raise ValueError(f"decoupled mismatch_cap must be > 1, got {mismatch_cap}")
    if staleness_cap is not None and staleness_cap <= 1:
        raise ValueError(f"decoupled staleness_cap must be > 1 (or None), got {staleness_cap}")
    log_m = _mismatch_log_w(behavior_train_logp, behavior_logp, mask)  # ℓ^train_v − ℓ^μ
    log_s = masked(old_logp.detach() - behavior_train_logp.detach(), mask)  # ℓ^old − ℓ^train_v
    log_c = math.log(mismatch_cap)
    if mismatch_mode == "truncate":
        m = _safe_exp(log_m.clamp(max=log_c))
        cut = log_m > log_c
    else:
        cut = (log_m > log_c) | (log_m < -log_c)
        m = torch.where(cut, torch.zeros_like(log_m), _safe_exp(log_m))
    s_keep = mask.bool() if staleness_cap is None else mask.bool() & (log_s <= math.log(staleness_cap))
    s = torch.where(s_keep, _safe_exp(log_s), torch.zeros_like(log_s))
    w = masked(m * s, mask)
    metrics = _weight_metrics(w, mask, log_m + log_s, mask)
    metrics.update({"mismatch_weight_mean": masked_mean(m, mask), "mismatch_clip_frac": masked_mean(cut.float(), mask),
                    "mismatch_ess": ess(log_m, mask), "staleness_weight_mean": masked_mean(s, mask),
                    "staleness_mask_frac": masked_mean((~s_keep).float(), mask), "staleness_ess": ess(log_s, mask)})
    return w, metrics
