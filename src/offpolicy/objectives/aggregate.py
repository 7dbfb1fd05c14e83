"""Loss aggregation: a per-token loss matrix (B, T) and its mask -> one scalar.

Every aggregation is registered in ``AGGREGATIONS`` and called as
``AGGREGATIONS[name](loss_tok, mask, *, max_len=None)``. Names follow verl's
``agg_loss`` (``loss_agg_mode``):

==========================  ==========================================================
``token-mean``              ``Σ_{i,t} m·L / Σ_{i,t} m``            (DAPO, PPO; TM)
``seq-mean-token-mean``     ``(1/B) Σ_i Σ_t m·L / Σ_t m``          (GRPO; SMTM)
``seq-mean-token-sum``      ``(1/B) Σ_i Σ_t m·L``                  (SMTS)
``seq-mean-token-sum-norm`` ``(1/B) Σ_i Σ_t m·L / L_max``          (Dr. GRPO; CN)
==========================  ==========================================================

Choices made here (and why):

* ``B`` is the number of rows, **including** rows whose mask is all zero. This is
  GRPO's ``1/G`` (an empty response is still one of the G responses) and what
  current verl does (``seq_denominator = local_bsz``). An all-masked row adds 0.
* ``seq-mean-token-sum-norm`` divides by ``L_max = max_len`` (the generation
  budget, constant over training) when given, else by ``T = mask.shape[-1]``, and
  then by ``B``. Dr. GRPO's objective keeps the ``1/G`` and replaces ``1/|y_i|`` by
  a constant (the paper's code uses MAX_TOKENS). verl's older ``agg_loss``
  omitted the ``1/B``, which makes the loss scale grow with the micro-batch size;
  keeping ``1/B`` makes every aggregation here batch-size independent. Pass
  ``max_len`` so the normaliser does not depend on how much padding a batch got.
* An all-masked batch aggregates to exactly 0 (never NaN): every division below
  uses a denominator that is replaced by 1 where it would be 0, and the masked
  loss is selected with ``torch.where`` so inf/NaN in padded positions cannot leak.

The module also holds the small masked helpers the other objective modules use.
"""

from __future__ import annotations

import math

import torch

from offpolicy.objectives.registry import Registry

AGGREGATIONS = Registry("aggregation")


# ---- masked helpers (shared by the objective modules) --------------------------------------
def check_shapes(who: str, **tensors: torch.Tensor | None) -> None:
    """Fail loudly, naming the tensor, if the given per-token tensors do not all share one (B, T) shape."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"{who}: per-token inputs must all be (B, T); got {shapes}")


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is set, exactly 0 elsewhere (even if ``x`` is inf/NaN there)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (no NaN, no inf, finite gradient)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    xm = masked(x, mask) * mask.to(x.dtype)  # mask may be fractional; masked() removes inf*0
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over set mask entries (0 if there are none)."""
    den = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return safe_div(masked_sum(x, mask, dim), den)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` over set mask entries (0 if there are none); no host sync."""
    if x.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    sel = mask.bool()
    m = torch.where(sel, x, torch.full_like(x, -math.inf)).max()
    return torch.where(sel.any(), m, torch.zeros_like(m))


# ---- registered aggregations --------------------------------------------------------------
@AGGREGATIONS.register("token-mean", paper="arXiv:2503.14476", summary="every valid token weighs the same (DAPO)")
def token_mean(loss_tok: torch.Tensor, mask: torch.Tensor, *, max_len: int | None = None) -> torch.Tensor:
    """TM: ``Σ_{i,t} m·L / Σ_{i,t} m``; 0 for an all-masked batch. ``max_len`` is ignored."""
    return masked_mean(loss_tok, mask)


@AGGREGATIONS.register("seq-mean-token-mean", paper="arXiv:2402.03300",
                       summary="mean over tokens of each response, then over responses (GRPO)")
def seq_mean_token_mean(loss_tok: torch.Tensor, mask: torch.Tensor, *, max_len: int | None = None) -> torch.Tensor:
    """SMTM: ``(1/B) Σ_i (Σ_t m·L / Σ_t m)``; an all-masked row contributes 0. ``max_len`` is ignored."""
    per_seq = masked_mean(loss_tok, mask, dim=-1)  # (B,)
    return per_seq.sum() / max(loss_tok.shape[0], 1)


@AGGREGATIONS.register("seq-mean-token-sum", paper="", summary="sum over tokens of each response, mean over responses")
def seq_mean_token_sum(loss_tok: torch.Tensor, mask: torch.Tensor, *, max_len: int | None = None) -> torch.Tensor:
    """SMTS: ``(1/B) Σ_i Σ_t m·L``. ``max_len`` is ignored."""
    return masked_sum(loss_tok, mask) / max(loss_tok.shape[0], 1)


@AGGREGATIONS.register("seq-mean-token-sum-norm", paper="arXiv:2503.20783",
                       summary="token sum over a constant L_max, mean over responses (Dr. GRPO)")
def seq_mean_token_sum_norm(loss_tok: torch.Tensor, mask: torch.Tensor, *, max_len: int | None = None) -> torch.Tensor:
    """CN: ``Σ_{i,t} m·L / (B · L_max)`` with ``L_max = max_len`` if given, else ``T``.

    The normaliser is a constant, not the response length: long and short
    responses get per-token gradients of the same scale (Dr. GRPO's fix of GRPO's
    length bias). See the module docstring for why ``1/B`` is kept.
    """
    norm = max_len if max_len is not None else loss_tok.shape[-1]
    if norm <= 0:
        raise ValueError(f"seq-mean-token-sum-norm needs max_len > 0, got {norm}")
    return masked_sum(loss_tok, mask) / (max(loss_tok.shape[0], 1) * norm)
