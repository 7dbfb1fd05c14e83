"""Off-policy evaluation (OPE): the value of a target policy π estimated from logs of a behaviour policy μ.

Setting. Prompts ``x`` are drawn from a fixed distribution, a response ``y ~ μ(·|x)`` was sampled
by the engine, which logged ``ℓ^μ_t`` for every generated token, and a verifier gave a reward
``R``. We want ``V(π) = E_x E_{y~π(·|x)}[R]`` without sampling from π. Each logged response has
the sequence importance weight

    w = π(y|x) / μ(y|x) = exp(log_w),   log_w = Σ_t m_t (ℓ^π_t − ℓ^μ_t)        (m: generated tokens)

Tool / environment tokens (``m_t = 0``) have the same probability under π and μ and cancel.
Every estimator below needs *coverage*: π(y|x) > 0 only where μ(y|x) > 0. If the engine used
top-p, μ has no mass outside the nucleus while π (scored as ``softmax(logits / temperature)``) has;
then ``E_μ[w] < 1``, IS is biased towards 0 and the self-normalised estimators estimate π
restricted to the nucleus. ``weight_mean`` (≈ 1 under coverage) is the symptom to watch.

Estimators (``n`` logged responses, ``b_i`` the leave-one-out per-prompt baseline, see
:func:`loo_baseline`):

======  ==================================================  =====================================
name    formula                                             reference
======  ==================================================  =====================================
is      ``(1/n) Σ w_i R_i``                                  Horvitz & Thompson 1952 (unbiased)
snis    ``Σ w_i R_i / Σ w_i``                                Owen 2013, ch. 9 (consistent, bias O(1/n))
pdis    ``(1/n) Σ_i Σ_t r_{i,t} Π_{j≤t} ρ_{i,j}``            Precup, Sutton & Singh, ICML 2000
dr      ``(1/n) Σ [b_i + w_i (R_i − b_i)]``                  Dudík et al. arXiv:1103.4601;
                                                            Jiang & Li arXiv:1511.03722
sndr    ``(1/n) Σ b_i + Σ w_i (R_i − b_i) / Σ w_i``           Thomas & Brunskill arXiv:1604.00923
======  ==================================================  =====================================

Uncertainty. Prompts are the independent unit (responses to one prompt share ``x``), so standard
errors are cluster-robust over prompts: with per-prompt sums ``ψ_g`` of each response's linearised
contribution (delta method for the ratio estimators), ``se² = G/(G−1) · Σ_g ψ_g² / n²``. With one
response per prompt this is the usual ``s/√n`` (``s`` with Bessel's correction); for snis it is
``n/(n−1)`` times Owen's ``Σ w_i²(R_i − V̂)² / (Σ w_i)²``. The normal interval is
``V̂ ± z_{(1+level)/2} · se``; ``bootstrap=B`` adds a percentile interval from ``B`` resamples of
whole prompts drawn with a seeded generator. With a single prompt the spread is not identified
and ``stderr`` and the normal interval are NaN.

ESS (Kong 1992; Owen 2013 §9.3): ``ess_abs = (Σw)² / Σw²`` and ``ess = ess_abs / n`` in (0, 1],
computed in log space by :func:`offpolicy.objectives.diagnostics.ess`. It is 1 when every weight
is equal (on-policy) and ``1/n`` when one response carries all the weight. When ``ess_abs`` is a
handful, the normal interval is not to be trusted, however narrow it looks.

Numerics. Everything runs in float64 on CPU (weights ``e^{±50}`` and their squares are
representable). Self-normalised estimators and ESS shift ``log_w`` by its maximum first, so they
stay finite for any finite ``log_w``; the unnormalised ones overflow only when a weight itself
exceeds float64 (``log_w > 709``), where the estimate is not representable (use ``clip``).
``clip=c`` truncates every weight at ``c`` (in log space, ``log_w ≤ log c``); this trades bias
(towards 0 for non-negative rewards) for variance and is reported as ``clip`` and ``n_clipped``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Sequence

import torch

from offpolicy.data.logs import validate as validate_log
from offpolicy.experience import Experience, collate
from offpolicy.objectives.diagnostics import ess as _ess
from offpolicy.objectives.registry import Registry
from offpolicy.policy.model import Policy

ESTIMATORS = Registry("OPE estimator")
DEFAULT_ESTIMATORS: tuple[str, ...] = ("is", "snis", "pdis", "dr", "sndr")
F64 = torch.float64


@dataclass(frozen=True)
class OpeEstimate:
    """One estimate of ``V(π)`` with its uncertainty and weight diagnostics (plain Python numbers)."""

    estimator: str
    value: float
    stderr: float  # cluster-robust over prompts; NaN with a single prompt
    ci_low: float  # normal approximation at `level`
    ci_high: float
    level: float
    ess: float  # (Σw)² / (n Σw²) in (0, 1], of the weights actually used (after clipping)
    ess_abs: float  # (Σw)² / Σw²
    max_weight: float  # largest weight used (e^{max log_w}; may be huge, that is the point)
    weight_mean: float  # (1/n) Σ w; ≈ 1 when μ covers π's support (E_μ[w] = 1)
    n: int  # logged responses
    n_prompts: int  # independent units of the standard error
    clip: float | None = None  # max weight when clipping was requested
    n_clipped: int = 0  # weights that clipping changed
    boot_ci_low: float | None = None  # percentile bootstrap over prompts (bootstrap > 0)
    boot_ci_high: float | None = None
    n_boot: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # estimator-specific notes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- shared pieces ------------------------------------------------------------------------------
def _vec(name: str, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``x`` as a float64 CPU vector (N,), after checking its shape."""
    x = torch.as_tensor(x).detach().to("cpu", F64)
    if x.ndim != 1 or (n is not None and x.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return x


def _check_inputs(who: str, log_w: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_w = _vec(f"{who}: log_w", log_w)
    n = log_w.shape[0]
    if n == 0:
        raise ValueError(f"{who}: no logged samples to evaluate (empty input)")
    rewards = _vec(f"{who}: rewards", rewards, n)
    if torch.isnan(log_w).any() or (log_w == math.inf).any():
        raise ValueError(f"{who}: log-ratios contain NaN or +inf (−inf, a zero target probability, is allowed)")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{who}: rewards must be finite")
    return log_w, rewards


def _clusters(prompt_ids: torch.Tensor | None, n: int) -> tuple[torch.Tensor, int]:
    """Index (N,) of each row's prompt in 0..G-1 and G; every row is its own prompt when ``None``."""
    if prompt_ids is None:
        return torch.arange(n), n
    ids = torch.as_tensor(prompt_ids).detach().cpu()
    if ids.shape != (n,):
        raise ValueError(f"prompt_ids must have shape ({n},), got {tuple(ids.shape)}")
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, len(uniq)


def _clip(log_w: torch.Tensor, clip: float | None) -> tuple[torch.Tensor, int]:
    """``min(log_w, log clip)`` and how many entries it changed."""
    if clip is None:
        return log_w, 0
    if not clip > 0:
        raise ValueError(f"clip must be a positive maximum weight, got {clip}")
    cap = math.log(clip)
    return log_w.clamp(max=cap), int((log_w > cap).sum())


def _shifted_exp(who: str, log_w: torch.Tensor) -> torch.Tensor:
    """``exp(log_w − max log_w)`` (max 1): the weights up to the constant factor self-normalisation ignores."""
    top = float(log_w.max())
    if top == -math.inf:
        raise ValueError(f"{who}: every importance weight is 0; the self-normalised estimate is undefined")
    return (log_w - top).exp()


def _level_z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _norm(x: torch.Tensor) -> float:
    """Euclidean norm without overflow of the squares (scale by the largest entry first)."""
    s = float(x.abs().max()) if x.numel() else 0.0
    if s == 0 or not math.isfinite(s):
        return s
    return s * math.sqrt(float(((x / s) ** 2).sum()))


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.78 else math.inf


def _weight_stats(log_w: torch.Tensor) -> dict[str, float]:
    """ESS (normalised and absolute), max and mean of ``w = exp(log_w)`` from log space."""
    n = log_w.shape[0]
    if bool((log_w == -math.inf).all()):
        return {"ess": 0.0, "ess_abs": 0.0, "max_weight": 0.0, "weight_mean": 0.0}
    e = float(_ess(log_w, torch.ones_like(log_w)))
    return {"ess": e, "ess_abs": e * n, "max_weight": _exp(float(log_w.max())),
            "weight_mean": _exp(float(torch.logsumexp(log_w, 0)) - math.log(n))}


def _bootstrap(sums: torch.Tensor, level: float, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile interval of ``A/N + U/V`` over ``n_boot`` resamples of the G prompts.

    ``sums`` (G, 4) holds each prompt's ``[Σa, Σu, Σv, n_g]``; a resample draws G prompts with
    replacement, i.e. multiplies each row by its multinomial count.
    """
    gen = torch.Generator().manual_seed(seed)
    G = sums.shape[0]
    chunk = max(1, (1 << 22) // G)  # bound the (chunk, G) count matrix to ~32 MB
    stats = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = torch.randint(G, (b, G), generator=gen)
        counts = torch.zeros(b, G, dtype=F64).scatter_add_(1, draws, torch.ones(b, G, dtype=F64))
        s = counts @ sums  # (b, 4)
        stats.append(s[:, 0] / s[:, 3] + s[:, 1] / s[:, 2])  # v sums to 0 only if every drawn w is 0
    vals = torch.cat(stats)
    vals = torch.where(torch.isfinite(vals), vals, torch.full_like(vals, math.nan))
    lo, hi = torch.nanquantile(vals, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64)).tolist()
    return lo, hi


def _estimate(
    name: str, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None, log_w_used: torch.Tensor,
    prompt_ids: torch.Tensor | None, *, n_clipped: int, clip: float | None, level: float,
    bootstrap: int, seed: int, info: dict[str, Any] | None = None,
) -> OpeEstimate:
    """``V̂ = mean(a) + Σu / Σv`` (``Σv = n`` when ``v`` is None) with its cluster-robust interval.

    Every estimator of this module has this form: is (a=0, u=wR), snis (a=0, u=wR, v=w), pdis
    (a=0, u=Σ_t r_t w_t), dr (a=b, u=w(R−b)), sndr (a=b, u=w(R−b), v=w). The linearised
    contribution of row i is ``(a_i − ā) + (u_i − θ v_i) / v̄`` with ``θ = Σu/Σv``.
    """
    z = _level_z(level)
    n = a.shape[0]
    idx, G = _clusters(prompt_ids, n)
    v = torch.ones(n, dtype=F64) if v is None else v
    sums = torch.zeros(G, 4, dtype=F64).index_add_(0, idx, torch.stack([a, u, v, torch.ones(n, dtype=F64)], 1))
    A, U, V, N = sums.unbind(1)
    a_bar, v_bar, theta = float(A.sum()) / n, float(V.sum()) / n, float(U.sum() / V.sum())
    value = a_bar + theta
    psi = (A - N * a_bar) + (U - theta * V) / v_bar  # (G,) per-prompt influence sums
    stderr = math.sqrt(G / (G - 1)) * _norm(psi) / n if G > 1 else math.nan
    boot = _bootstrap(sums, level, bootstrap, seed) if bootstrap > 0 else (None, None)
    return OpeEstimate(
        estimator=name, value=value, stderr=stderr, ci_low=value - z * stderr, ci_high=value + z * stderr,
        level=level, **_weight_stats(log_w_used), n=n, n_prompts=G, clip=clip, n_clipped=n_clipped,
        boot_ci_low=boot[0], boot_ci_high=boot[1], n_boot=max(bootstrap, 0), info=info or {},
    )


# ---- estimators ---------------------------------------------------------------------------------
@ESTIMATORS.register("is", inputs="sequence", summary="ordinary importance sampling (unbiased)")
def is_estimate(log_w: torch.Tensor, rewards: torch.Tensor, *, prompt_ids: torch.Tensor | None = None,
                clip: float | None = None, level: float = 0.95, bootstrap: int = 0, seed: int = 0) -> OpeEstimate:
    """Ordinary (trajectory-wise) importance sampling ``V̂ = (1/n) Σ_i w_i R_i``.

    ``log_w`` (N,) sequence log-ratios ``Σ_t m_t(ℓ^π_t − ℓ^μ_t)``, ``rewards`` (N,),
    ``prompt_ids`` (N,) optional cluster ids for the standard error. Unbiased under coverage
    (without clipping); its variance grows with ``E_μ[w²]``, i.e. exponentially in the per-token
    divergence times the response length. Delta from on-policy: with ``π = μ`` it is the sample mean.
    """
    log_w, rewards = _check_inputs("is", log_w, rewards)
    lw, n_clipped = _clip(log_w, clip)
    u = torch.where(rewards != 0, lw.exp() * rewards, torch.zeros_like(rewards))  # (N,) w·R, 0·e^{big} = 0
    return _estimate("is", torch.zeros_like(u), u, None, lw, prompt_ids, n_clipped=n_clipped, clip=clip,
                     level=level, bootstrap=bootstrap, seed=seed)


@ESTIMATORS.register("snis", inputs="sequence", summary="self-normalised (weighted) importance sampling")
def snis_estimate(log_w: torch.Tensor, rewards: torch.Tensor, *, prompt_ids: torch.Tensor | None = None,
                  clip: float | None = None, level: float = 0.95, bootstrap: int = 0, seed: int = 0) -> OpeEstimate:
    """Self-normalised IS ``V̂ = Σ_i w_i R_i / Σ_i w_i = Σ_i softmax(log_w)_i R_i``.

    Delta from ``is``: divides by ``Σ w`` instead of ``n``. Biased by O(1/n) but consistent, always
    inside ``[min R, max R]``, invariant to a constant factor in the weights (so ``log_w`` is shifted
    by its maximum: finite for any finite log-ratios) and often of much lower variance
    (Owen 2013, *Monte Carlo theory, methods and examples*, ch. 9). Its standard error is the delta
    method one, ``√(Σ w_i²(R_i − V̂)²) / Σ w_i`` up to the ``G/(G−1)`` and prompt-cluster terms.
    """
    log_w, rewards = _check_inputs("snis", log_w, rewards)
    lw, n_clipped = _clip(log_w, clip)
    w = _shifted_exp("snis", lw)  # (N,) weights / max weight
    return _estimate("snis", torch.zeros_like(w), w * rewards, w, lw, prompt_ids, n_clipped=n_clipped,
                     clip=clip, level=level, bootstrap=bootstrap, seed=seed)


@ESTIMATORS.register("pdis", inputs="token", summary="per-decision importance sampling (Precup et al. 2000)")
def pdis_estimate(log_ratio: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor | None = None, *,
                  token_rewards: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
                  clip: float | None = None, level: float = 0.95, bootstrap: int = 0,
                  seed: int = 0) -> OpeEstimate:
    """Per-decision IS ``V̂ = (1/n) Σ_i Σ_t r_{i,t} Π_{j≤t} ρ_{i,j}`` with ``ρ = exp(ℓ^π − ℓ^μ)`` on the mask.

    Precup, Sutton & Singh, "Eligibility traces for off-policy policy evaluation", ICML 2000.
    ``log_ratio`` and ``mask`` are (N, T); ``token_rewards`` (N, T) are used when given (the
    estimate is then of ``E_π[Σ_t r_t]``), else the outcome ``rewards`` (N,) sit on the last token.
    Delta from ``is``: a reward at token t is weighted only by the ratios of tokens up to t. The
    later ratios have conditional mean 1 under μ given the prefix (``E_μ[Π_{j>t} ρ_j | y_{≤t}] = 1``),
    so dropping them removes variance without adding bias.

    For outcome rewards (``r_t = 0`` for ``t < |y|``, ``r_{|y|} = R``) the inner sum has one term,
    ``R_i Π_{j≤|y_i|} ρ_{i,j} = w_i R_i``: **per-decision IS reduces exactly to ordinary IS**. It
    helps only with rewards that arrive before the end (process / per-turn rewards). Tokens with
    ``mask = 0`` (tool / environment, padding) have ratio 1. Clipping caps each cumulative weight
    ``Π_{j≤t} ρ_{i,j}``. The weight diagnostics (ESS, max, mean) are those of the full-sequence
    weights ``Π_j ρ_{i,j}``, i.e. of the longest products the estimator uses.
    """
    if log_ratio.ndim != 2 or mask.shape != log_ratio.shape:
        raise ValueError(f"pdis: log_ratio and mask must both be (N, T); got {tuple(log_ratio.shape)}, "
                         f"{tuple(mask.shape)}")
    if log_ratio.shape[0] == 0 or log_ratio.shape[1] == 0:
        raise ValueError(f"pdis: no logged samples to evaluate (empty input of shape {tuple(log_ratio.shape)})")
    lr = log_ratio.detach().to("cpu", F64)
    m = mask.detach().cpu().bool()
    cum = torch.where(m, lr, torch.zeros_like(lr)).cumsum(1)  # (N, T) log Π_{j≤t} ρ_j; ratio 1 off the mask
    if token_rewards is not None:
        r = token_rewards.detach().to("cpu", F64)
        if r.shape != lr.shape or not torch.isfinite(r).all():
            raise ValueError(f"pdis: token_rewards must be finite and {tuple(lr.shape)}, got {tuple(r.shape)}")
        source = "token"
    elif rewards is not None:
        r = torch.zeros_like(lr)
        r[:, -1] = _vec("pdis: rewards", rewards, lr.shape[0])  # the last column holds the full product
        source = "outcome"
    else:
        raise ValueError("pdis needs rewards (N,) or token_rewards (N, T)")
    _check_inputs("pdis", cum[:, -1], r[:, -1])  # NaN / +inf ratios, non-finite outcome rewards
    capped, _ = _clip(cum, clip)
    n_clipped = int(((r != 0) & (capped < cum)).sum())  # weighted terms that clipping changed
    u = torch.where(r != 0, r * capped.exp(), torch.zeros_like(r)).sum(1)  # (N,) Σ_t r_t Π_{j≤t} ρ_j
    return _estimate("pdis", torch.zeros_like(u), u, None, capped[:, -1], prompt_ids, n_clipped=n_clipped,
                     clip=clip, level=level, bootstrap=bootstrap, seed=seed, info={"rewards": source})


def loo_baseline(rewards: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out per-prompt baseline ``b_i = mean{R_j : j ≠ i, x_j = x_i}`` (N,); 0 for a lone response.

    Leaving row i out makes ``b_i`` independent of ``(y_i, R_i)`` given ``x_i`` (the other
    responses were sampled independently), which is what keeps DR unbiased. With the in-sample
    mean over a prompt's k responses, ``b_i`` contains ``R_i/k`` and
    ``E[b_i + w_i(R_i − b_i)] = V(π) − (V(π) − V(μ))/k``: biased towards the behaviour value.
    """
    rewards = _vec("rewards", rewards)
    idx, G = _clusters(prompt_ids, rewards.shape[0])
    total = torch.zeros(G, dtype=F64).index_add_(0, idx, rewards)[idx]  # (N,) prompt sums
    count = torch.bincount(idx, minlength=G).to(F64)[idx]  # (N,)
    return torch.where(count > 1, (total - rewards) / (count - 1).clamp(min=1), torch.zeros_like(rewards))


@ESTIMATORS.register("dr", inputs="sequence", summary="doubly robust with a leave-one-out per-prompt baseline")
def dr_estimate(log_w: torch.Tensor, rewards: torch.Tensor, *, prompt_ids: torch.Tensor | None = None,
                self_normalized: bool = False, clip: float | None = None, level: float = 0.95,
                bootstrap: int = 0, seed: int = 0) -> OpeEstimate:
    """Doubly robust ``V̂ = (1/n) Σ_i [b_i + w_i (R_i − b_i)]`` with ``b_i`` = :func:`loo_baseline`.

    Dudík, Langford & Li 2011 (arXiv:1103.4601) for bandits; Jiang & Li 2016 (arXiv:1511.03722)
    for sequences, whose one-step case this is. DR is ``V̂_DM + IS correction`` with a reward model
    ``Q̂(x, y)``; here ``Q̂(x, y) = b(x)`` does not depend on the response, so the direct-method term
    ``E_{y~π}[Q̂(x, y)] = b(x)`` is exact for any π and the estimator needs no model. Delta from
    ``is``: each row's term changes by ``b_i (1 − w_i)``, a control variate with mean 0 (because
    ``E_μ[w | x] = 1`` and ``b_i`` is independent of row i given ``x_i``), so DR stays unbiased.
    It removes the weight noise that IS multiplies by the prompt's reward level: a prompt whose
    responses all score R contributes exactly R, whatever the weights (IS contributes ``w·R``).
    It does *not* remove the between-prompt variance of ``V_π(x)`` (nothing can), and with few
    responses per prompt and weights near 1 its noisy baseline can cost a little variance instead
    (the two-armed bandit test shows DR ≈ IS there). Rows whose prompt has a single response get
    ``b = 0``: their term is their IS term (counted in ``info["n_no_baseline"]``).

    ``self_normalized=True`` is the weighted DR of Thomas & Brunskill 2016 (arXiv:1604.00923) in
    its one-step form, ``(1/n) Σ b_i + Σ w_i (R_i − b_i) / Σ w_i`` (registered as ``sndr``).
    ``prompt_ids`` (N,) is required: it defines both the baseline and the standard-error clusters.
    """
    name = "sndr" if self_normalized else "dr"
    log_w, rewards = _check_inputs(name, log_w, rewards)
    if prompt_ids is None:
        raise ValueError(f"{name} needs prompt_ids (N,) for its per-prompt baseline")
    b = loo_baseline(rewards, prompt_ids)  # (N,)
    lw, n_clipped = _clip(log_w, clip)
    w = _shifted_exp(name, lw) if self_normalized else lw.exp()  # (N,)
    u = torch.where(rewards != b, w * (rewards - b), torch.zeros_like(b))
    info = {"n_no_baseline": int((torch.bincount(_clusters(prompt_ids, len(b))[0]) == 1).sum())}
    return _estimate(name, b, u, w if self_normalized else None, lw, prompt_ids, n_clipped=n_clipped, clip=clip,
                     level=level, bootstrap=bootstrap, seed=seed, info=info)


@ESTIMATORS.register("sndr", inputs="sequence", summary="self-normalised (weighted) doubly robust")
def sndr_estimate(log_w: torch.Tensor, rewards: torch.Tensor, **kwargs: Any) -> OpeEstimate:
    """:func:`dr_estimate` with ``self_normalized=True``."""
    return dr_estimate(log_w, rewards, self_normalized=True, **kwargs)


# ---- scoring logged experiences with the target policy --------------------------------------------
@dataclass
class LoggedRatios:
    """Target-vs-behaviour log-ratios of the usable logged experiences (everything float64, CPU)."""

    log_ratio: torch.Tensor  # (N, T) ℓ^π − ℓ^μ, 0 where mask is 0
    mask: torch.Tensor  # (N, T) bool, True on policy-generated response tokens
    rewards: torch.Tensor  # (N,)
    token_rewards: torch.Tensor | None  # (N, T) when every used experience has them
    prompt_ids: torch.Tensor  # (N,) long, one id per distinct prompt key
    n_skipped: int  # experiences without behaviour log-probs
    skipped: dict[str, int]  # ... by source

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_ratio.sum(1)  # (N,) sequence log-ratio (masked entries are 0)


def _prompt_key(e: Experience, group_by: str, i: int) -> Any:
    if group_by == "prompt":
        return tuple(e.prompt_ids)
    key = e.group_id if group_by == "group_id" else e.task_id
    return key or ("__row", i)  # an empty id is a prompt of its own, as in collate


@torch.no_grad()
def score_logged(policy: Policy, experiences: Sequence[Experience], *, temperature: float = 1.0,
                 batch_size: int = 256, group_by: str = "prompt") -> LoggedRatios:
    """Score the responses of ``experiences`` under the target ``policy`` and subtract the logged ``ℓ^μ``.

    Only experiences with ``behavior_logprobs`` can be evaluated; the others (expert / offline
    traces) are counted by source in ``skipped``. The target is ``softmax(logits / temperature)``
    with no top-p. ``group_by`` decides which responses share a prompt (baseline and standard
    error): ``"prompt"`` (identical prompt token ids), ``"group_id"`` or ``"task_id"``. Every
    experience is first checked against the schema (:func:`offpolicy.data.logs.validate`): token ids
    in the policy's vocabulary, behaviour log-probs finite and ≤ 0; a bad one raises ``ValueError``.
    """
    if group_by not in ("prompt", "group_id", "task_id"):
        raise ValueError(f"group_by must be 'prompt', 'group_id' or 'task_id', got {group_by!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # A log is not trusted: token ids outside the vocabulary would fail inside the embedding, and
    # positive "log-probs" would give plausible-looking but meaningless weights (issue 11).
    validate_log(experiences, vocab_size=policy.tokenizer.vocab_size)
    used = [e for e in experiences if e.behavior_logprobs is not None]
    skipped: dict[str, int] = {}
    for e in experiences:
        if e.behavior_logprobs is None:
            skipped[e.source] = skipped.get(e.source, 0) + 1
    if not used:
        raise ValueError(f"no experience has behaviour log-probs to evaluate against "
                         f"({len(experiences)} given, skipped by source: {skipped})")
    device = next(iter(policy.parameters())).device
    was_training = policy.model.training
    policy.model.eval()
    try:
        T = max(1, max(len(e.response_ids) for e in used))
        log_ratio, mask = torch.zeros(len(used), T, dtype=F64), torch.zeros(len(used), T, dtype=torch.bool)
        for start in range(0, len(used), batch_size):
            batch = collate(used[start:start + batch_size], policy.tokenizer.pad_id).to(device)
            logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                               temperature=temperature)  # (b, t)
            m = batch.mask.bool()
            lr = torch.where(m, logp.double() - batch.behavior_logp.double(), torch.zeros_like(logp, dtype=F64))
            b, t = lr.shape
            log_ratio[start:start + b, :t], mask[start:start + b, :t] = lr.cpu(), m.cpu()
    finally:
        policy.model.train(was_training)
    keys: dict[Any, int] = {}
    prompt_ids = torch.tensor([keys.setdefault(_prompt_key(e, group_by, i), len(keys)) for i, e in enumerate(used)])
    token_rewards = None
    if all(e.token_rewards is not None for e in used):
        token_rewards = torch.zeros(len(used), T, dtype=F64)
        for i, e in enumerate(used):
            token_rewards[i, :len(e.token_rewards)] = torch.tensor(e.token_rewards, dtype=F64)
    rewards = torch.tensor([float(e.reward) for e in used], dtype=F64)
    return LoggedRatios(log_ratio=log_ratio, mask=mask, rewards=rewards, token_rewards=token_rewards,
                        prompt_ids=prompt_ids, n_skipped=len(experiences) - len(used), skipped=skipped)


def estimate_all(data: LoggedRatios, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                 **kwargs: Any) -> dict[str, OpeEstimate]:
    """Run the named estimators on scored logs; ``kwargs`` (clip, level, bootstrap, seed) go to each."""
    out = {}
    for name in estimators:
        fn = ESTIMATORS[name]
        if fn.inputs == "token":
            out[name] = fn(data.log_ratio, data.mask, data.rewards, token_rewards=data.token_rewards,
                           prompt_ids=data.prompt_ids, **kwargs)
        else:
            out[name] = fn(data.log_w, data.rewards, prompt_ids=data.prompt_ids, **kwargs)
    return out


def evaluate_offline(policy: Policy, experiences: Sequence[Experience], *, temperature: float = 1.0,
                     batch_size: int = 256, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                     clip: float | None = None, level: float = 0.95, bootstrap: int = 0, seed: int = 0,
                     group_by: str = "prompt") -> dict[str, Any]:
    """Estimate the value of ``policy`` from logged ``experiences`` with every named estimator.

    Returns ``{"n", "n_skipped", "skipped" (by source), "n_prompts", "temperature",
    "behavior_reward_mean" (the logged mean: an estimate of V(μ)), "pdis_rewards" ("token" or
    "outcome"), "estimates": {name: OpeEstimate}}``. See :func:`to_metrics` for flat metric names.
    """
    for name in estimators:
        ESTIMATORS[name]  # noqa: B018 -- an unknown name fails here, before any scoring
    data = score_logged(policy, experiences, temperature=temperature, batch_size=batch_size, group_by=group_by)
    return {
        "n": int(data.rewards.shape[0]), "n_skipped": data.n_skipped, "skipped": data.skipped,
        "n_prompts": int(data.prompt_ids.max()) + 1, "temperature": temperature,
        "behavior_reward_mean": float(data.rewards.mean()),
        "pdis_rewards": "token" if data.token_rewards is not None else "outcome",
        "estimates": estimate_all(data, estimators, clip=clip, level=level, bootstrap=bootstrap, seed=seed),
    }


def to_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``ope/...`` metric names for a result of :func:`evaluate_offline` (e.g. ``ope/snis/value``)."""
    out = {f"ope/{k}": float(result[k]) for k in ("n", "n_skipped", "n_prompts", "behavior_reward_mean")}
    for name, est in result["estimates"].items():
        for k in ("value", "stderr", "ci_low", "ci_high", "ess", "ess_abs", "max_weight", "weight_mean", "n_clipped"):
            out[f"ope/{name}/{k}"] = float(getattr(est, k))
        if est.n_boot:
            out[f"ope/{name}/boot_ci_low"], out[f"ope/{name}/boot_ci_high"] = est.boot_ci_low, est.boot_ci_high
    return out
