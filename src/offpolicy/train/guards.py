"""Non-finite numbers never reach the weights: the learner's check around its optimizer step.

Where the check sits and why (the fused AdamW kernel updates every parameter and its moments in one
pass, so nothing can be rolled back after ``opt.step()``): the loss and the gradient norm are checked
*before* the step; a step they fail is skipped whole. The parameters are checked after the step, where
only an overflowing learning rate can have made them non-finite, and that stops the run.
"""

from __future__ import annotations

import math

import torch

from offpolicy.config import TrainingDiverged


class NonFiniteGuard:
    """Keeps non-finite numbers out of the weights: checks one update's loss and gradient norm before the
    optimizer step, and the parameters after it.

    - loss or gradient norm non-finite -> the step is skipped (gradients dropped; weights, optimizer
      state and schedule untouched) and counted by the offending metric. With clipping off, a gradient
      norm above ``sqrt(finfo.max)`` counts as non-finite too: its square overflows Adam's second moment
      to inf, after which that parameter silently never moves again. With clipping on, an inf norm would
      make ``clip_grad_norm_`` scale every gradient by 0 (or NaN): skipped, not silently zeroed.
    - a parameter non-finite *after* the step cannot be undone without a copy of every weight each step
      (1x the model's memory): with finite, square-safe gradients AdamW's step is bounded by about
      ``lr`` per element, so only an lr (or lr × weight decay) big enough to overflow gets there, and
      then no later step can recover: the run stops at once (:class:`TrainingDiverged`).
    - ``max_skipped`` consecutive skips stop the run, naming the metric.

    One host sync per update (the decision must be known before ``opt.step()``).
    """

    KINDS = ("loss", "grad")  # a non-finite parameter stops the run at once: never a skip

    def __init__(self, max_skipped: int) -> None:
        self.max_skipped = max_skipped
        self.skipped = dict.fromkeys(self.KINDS, 0)  # cumulative, per offending metric
        self.consecutive = 0

    @staticmethod
    def check_update(loss: torch.Tensor, norm: torch.Tensor, clip: float) -> str | None:
        """``"loss"`` / ``"grad"`` if that one is non-finite (grad: or its square overflows, clipping off)."""
        limit = math.sqrt(torch.finfo(norm.dtype).max) if clip <= 0 else math.inf
        loss_ok, grad_ok = torch.stack([loss.detach().isfinite().all(), norm.isfinite() & (norm < limit)]).tolist()
        return None if loss_ok and grad_ok else ("loss" if not loss_ok else "grad")

    @staticmethod
    def params_finite(params: list[torch.Tensor]) -> bool:
        """All parameters finite (one fused norm; a norm that overflows means weights past ~1e19: lost too)."""
        return bool(torch.nn.utils.get_total_norm([p.detach() for p in params]).isfinite())

    def record(self, bad: str | None) -> None:
        """Count the update; stop the run after ``max_skipped`` consecutive skips."""
        if bad is None:
            self.consecutive = 0
            return
        self.skipped[bad] += 1
        self.consecutive += 1
        if self.consecutive >= self.max_skipped:
            raise TrainingDiverged(f"rl.max_skipped_steps={self.max_skipped}: {self.consecutive} consecutive updates "
                                   f"skipped, the last for a non-finite {bad} ({self.describe()})")

    def describe(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.skipped.items() if v) or "none"

    def metrics(self) -> dict[str, torch.Tensor]:
        out = {f"train/skipped_nonfinite_{k}": torch.tensor(float(v)) for k, v in self.skipped.items()}
        out["train/skipped_steps"] = torch.tensor(float(sum(self.skipped.values())))
        return out

    def state_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped.update(state["skipped"])
        self.consecutive = state["consecutive"]
