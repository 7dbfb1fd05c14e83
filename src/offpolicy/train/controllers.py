"""Stateful controllers: the few objective parts that change across steps, kept out of the pure losses.

Each controller is a small class with ``state_dict()`` / ``load_state_dict()`` (so a
checkpoint resumes it exactly) and no hidden globals. The learner talks to every
controller through the same five calls (:class:`Controller`), never by name:

* ``before_update(step, version) -> overrides`` — what the controller sets for this
  update, as keys from a small fixed vocabulary (:data:`OVERRIDES`): ``loss_params``
  (merged into the loss's hyperparameters), ``kl_coef``, ``kl_mix`` (weights of the
  KL to the reference and to the previous policy), ``proximal`` (a module that
  computes ``old_logp``);
* ``before_step(metrics) -> overrides`` — after the loss, before the optimizer step
  (``lr_scale``: VCPO needs the update's ESS);
* ``after_update(metrics) -> metrics`` to log;
* ``on_rollout_step(policy, anchors)`` — once per rollout step, with the learner's
  frozen anchors (``{"ref": Policy | None, "prev": Policy | None}``) it may reset;
* ``sampler_params(sampling) -> dict`` — replay-buffer sampling parameters it drives.

A class declares what it ``provides`` (a subset of :data:`OVERRIDES`) so the learner
decides at construction which passes and anchors an update needs. A new controller
is one class plus one line in :data:`CONTROLLERS`. Nothing here imports the
learner: composition, not hooks.

=====================  ========================================================  ==================
``ChordMuSchedule``    CHORD-μ expert weight μ(s) → ``loss_params = {"mu"}``     arXiv:2508.11408
``VcpoLrScale``        lr · √min(1, ρ_ess/ρ_base) around one optimizer step      arXiv:2602.17616
``MdpoAnneal``         KL weight 1/t_k, t_k = 1 − (k−1)/K → ``{"kl_coef"}``      arXiv:2005.09814
``AdaptiveKL``         KL coefficient driven towards a target KL                 arXiv:1909.08593
``ReMixSchedule``      KL-convex λ(t), off-policy mix, reincarnation step T      arXiv:2507.06892
``EwmaProximal``       EWMA copy of the policy weights as the proximal policy    arXiv:2110.00641
=====================  ========================================================  ==================
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import torch

from offpolicy.objectives.losses import chord_mu_schedule


OVERRIDES = frozenset({"loss_params", "kl_coef", "kl_mix", "proximal", "lr_scale"})


class Controller:
    """No-op defaults for the controller interface; a controller overrides the calls it uses."""

    provides: frozenset[str] = frozenset()  # override keys it may return (subset of OVERRIDES)
    loss_param: str | None = None  # the loss hyperparameter it drives, if any (checked against the loss)

    @classmethod
    def build(cls, params: dict[str, Any], *, model: torch.nn.Module, steps: int) -> "Controller":
        """Construct from ``rl.controllers.<name>`` (``model``: the policy's module; ``steps``: ``rl.steps``)."""
        return cls(**params)

    def before_update(self, step: int, version: int) -> dict[str, Any]:
        return {}

    def before_step(self, metrics: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {}

    def after_update(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def on_rollout_step(self, policy: Any, anchors: dict[str, Any]) -> None:
        return None

    def sampler_params(self, sampling: str) -> dict[str, Any]:
        return {}


def _check_keys(who: str, state: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"{who}.load_state_dict: missing keys {missing}")


def _scalar(x: float | torch.Tensor) -> float:
    """A Python float from a float or a 0-d tensor (one host sync, once per step)."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


# ---- CHORD ----------------------------------------------------------------------------------
class ChordMuSchedule(Controller):
    """CHORD-μ: the expert-loss weight μ at global step s (warm-up, cosine decay, then constant).

    ``μ(s) = peak·s/s_w`` for ``s < s_w``; cosine from ``peak`` to ``valley`` over
    ``s_d`` steps; ``valley`` after (``objectives.losses.chord_mu_schedule``).
    Defaults are CHORD-μ's yaml [C]: warm-up 0, decay 200, peak 0.9, valley 0.05.
    ``s`` counts learner updates; the first update uses s = 0.
    """

    def __init__(self, *, warmup_steps: int = 0, decay_steps: int = 200, peak: float = 0.9,
                 valley: float = 0.05) -> None:
        if warmup_steps < 0 or decay_steps <= 0 or not 0 <= valley <= peak <= 1:
            raise ValueError("ChordMuSchedule needs warmup_steps >= 0, decay_steps > 0, 0 <= valley <= peak <= 1")
        self.warmup_steps, self.decay_steps, self.peak, self.valley = warmup_steps, decay_steps, peak, valley
        self.steps = 0

    provides, loss_param = frozenset({"loss_params"}), "mu"

    def before_update(self, step: int, version: int) -> dict[str, Any]:
        return {"loss_params": self.loss_params()}

    def after_update(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.step()
        return {"loss/chord_mu": torch.tensor(self.mu)}  # the μ of the next update

    @property
    def mu(self) -> float:
        return chord_mu_schedule(self.steps, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                                 peak=self.peak, valley=self.valley)

    def loss_params(self) -> dict[str, float]:
        return {"mu": self.mu}

    def step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("ChordMuSchedule", state, ("steps",))
        self.steps = int(state["steps"])


# ---- VCPO -----------------------------------------------------------------------------------
class VcpoLrScale(Controller):
    """VCPO's ESS-scaled learning rate for one optimizer step (mit-han-lab/vcpo ``megatron_actor.py`` [C]).

    ``scale = √min(1, ρ_ess/ρ_base)`` (``rule="sqrt"``) or ``min(1, ρ_ess/ρ_base)``
    (``"linear"``), ``ρ_ess = ESS/B`` of the unclipped sequence IS weights
    ``w_i = exp Σ_t(ℓ^old − ℓ^μ)`` over the minibatch (the ``vcpo`` loss reports it
    as ``ess_ratio``). Every param group's lr is multiplied for the step and
    restored right after, so the lr schedule is untouched. ρ_base = 1.0. No
    cross-step state: ``state_dict`` only keeps the last scale (for logging).
    """

    def __init__(self, *, base_ess_ratio: float = 1.0, rule: str = "sqrt") -> None:
        if rule not in ("sqrt", "linear"):
            raise ValueError(f"VcpoLrScale rule={rule!r}; valid: ['sqrt', 'linear']")
        if base_ess_ratio <= 0:
            raise ValueError(f"VcpoLrScale base_ess_ratio must be > 0, got {base_ess_ratio}")
        self.base_ess_ratio, self.rule = base_ess_ratio, rule
        self.last_scale = 1.0

    provides = frozenset({"lr_scale"})

    def before_step(self, metrics: dict[str, torch.Tensor]) -> dict[str, Any]:
        """lr scale from the update's sequence ESS (``offpolicy/ess``); no ESS is an error, never ESS = 1."""
        if "offpolicy/ess" not in metrics:
            raise ValueError("rl.controllers.vcpo_lr: the batch has no rows with behaviour log-probs, so its "
                             "sequence ESS (offpolicy/ess) is undefined; vcpo_lr needs policy rollouts")
        self.last_scale = self.scale(metrics["offpolicy/ess"])
        return {"lr_scale": self.last_scale}

    def after_update(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"optim/lr_scale": torch.tensor(self.last_scale)}

    def scale(self, ess_ratio: float | torch.Tensor) -> float:
        frac = min(1.0, max(0.0, _scalar(ess_ratio)) / self.base_ess_ratio)
        return math.sqrt(frac) if self.rule == "sqrt" else frac

    @contextlib.contextmanager
    def scaled(self, optimizer: torch.optim.Optimizer, ess_ratio: float | torch.Tensor) -> Iterator[float]:
        """``with ctl.scaled(opt, ess_ratio): opt.step()`` — lr × scale inside, restored on exit."""
        s = self.scale(ess_ratio)
        base = [g["lr"] for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * s
        self.last_scale = s
        try:
            yield s
        finally:
            for g, lr in zip(optimizer.param_groups, base):
                g["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_scale": self.last_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("VcpoLrScale", state, ("last_scale",))
        self.last_scale = float(state["last_scale"])


# ---- MDPO -----------------------------------------------------------------------------------
class MdpoAnneal(Controller):
    """MDPO's annealed step size: ``t_k = 1 − (k − 1)/K`` at iteration k = 1..K; the loss gets ``kl_coef = 1/t_k``.

    The KL weight grows linearly in 1/t from 1 (k = 1) to K (k = K)
    [C: manantomar/Mirror-Descent-Policy-Optimization]. An *iteration* is one
    batch of rollouts with its m = 5 gradient steps (π_k is fixed inside it), so
    call ``step()`` once per rollout step, not per optimizer step. Past K the
    coefficient stays at K (t would reach 0).
    """

    def __init__(self, *, total_iterations: int) -> None:
        if total_iterations < 1:
            raise ValueError(f"MdpoAnneal total_iterations must be >= 1, got {total_iterations}")
        self.total_iterations = total_iterations
        self.iteration = 1

    provides, loss_param = frozenset({"loss_params"}), "kl_coef"

    @classmethod
    def build(cls, params: dict[str, Any], *, model: torch.nn.Module, steps: int) -> "MdpoAnneal":
        return cls(**{"total_iterations": steps, **params})  # K = the run's rollout steps unless set

    def before_update(self, step: int, version: int) -> dict[str, Any]:
        return {"loss_params": self.loss_params()}

    def on_rollout_step(self, policy: Any, anchors: dict[str, Any]) -> None:
        self.step()  # an MDPO iteration is one rollout step

    @property
    def t(self) -> float:
        k = min(self.iteration, self.total_iterations)
        return 1.0 - (k - 1) / self.total_iterations

    def loss_params(self) -> dict[str, float]:
        return {"kl_coef": 1.0 / self.t}

    def step(self) -> None:
        self.iteration += 1

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("MdpoAnneal", state, ("iteration",))
        self.iteration = int(state["iteration"])


# ---- adaptive KL --------------------------------------------------------------------------
class AdaptiveKL(Controller):
    """A KL-penalty coefficient adapted towards a target KL.

    ``rule="proportional"`` (Ziegler et al. 2019, arXiv:1909.08593; verl/TRL
    ``AdaptiveKLController`` [C]): ``e = clip(KL/target − 1, −0.2, 0.2)``,
    ``β ← β (1 + e · n_steps/horizon)``. ``rule="ppo"`` (PPO paper §4,
    arXiv:1707.06347): ``β ← β/2`` if ``KL < target/1.5``, ``β ← 2β`` if
    ``KL > 1.5·target``. Defaults (verl): β₀ = 0.001, target 0.1, horizon 10000.
    ``KL`` is the step's measured KL to the reference (e.g. ``loss/kl_ref``).
    """

    def __init__(self, *, init_coef: float = 0.001, target: float = 0.1, horizon: int = 10000,
                 rule: str = "proportional") -> None:
        if rule not in ("proportional", "ppo"):
            raise ValueError(f"AdaptiveKL rule={rule!r}; valid: ['proportional', 'ppo']")
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKL needs init_coef >= 0, target > 0, horizon > 0")
        self.target, self.horizon, self.rule = target, horizon, rule
        self.value = init_coef

    provides = frozenset({"kl_coef"})

    def before_update(self, step: int, version: int) -> dict[str, Any]:
        return {"kl_coef": self.value}

    def after_update(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.step(metrics["loss/kl_ref"])
        return {"loss/kl_coef": torch.tensor(self.value)}  # the coefficient of the next update

    def loss_params(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def step(self, kl: float | torch.Tensor, n_steps: int = 1) -> None:
        kl = _scalar(kl)
        if not math.isfinite(kl):
            raise ValueError(f"AdaptiveKL.step got a non-finite KL {kl}")
        if self.rule == "proportional":
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_steps / self.horizon
        elif kl < self.target / 1.5:
            self.value /= 2.0
        elif kl > self.target * 1.5:
            self.value *= 2.0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("AdaptiveKL", state, ("value",))
        self.value = float(state["value"])


# ---- ReMix ----------------------------------------------------------------------------------
class ReMixSchedule(Controller):
    """ReMix's schedules (arXiv:2507.06892; code not released, so everything is [S] from ALGORITHMS.md §9).

    * **Mix-PPG data**: each minibatch takes data of a historical policy ``π_{k−i}``
      (``i ∈ 1..N``) with probability ``p`` and current-policy data otherwise;
      ``draw_lag(g)`` returns that i (0 = current). ν, the law of i, is [NF]:
      uniform over 1..N here. p = 0.4, N = 2; each batch gets ``utd`` = 2 updates.
    * **KL-convex**: ``L_KLC = λ(t) KL(π_θ‖π_base) + (1 − λ(t)) KL(π_θ‖π_{k−1})`` with
      ``λ(t) = max(1 − 0.1⌈max(t − 50, 0)/10⌉, 0.5)``; ``kl_weights()`` = (λ, 1 − λ).
      β (its coefficient) and the entropy coefficient c are [NF].
    * **Reincarnation** at step T (50): ``should_reincarnate()`` is True exactly
      once, when t reaches T; the learner then sets ``π_base ← π_T`` and training
      becomes pure on-policy (``p`` → 0, ``draw_lag`` → 0).

    ``t`` counts training steps starting at 0; call ``step()`` after each one.
    The Mix-PPG surrogate's own clip (``clip(r, π_k/π_{k−i} ± ε)``) is a loss and
    is not implemented here.
    """

    def __init__(self, *, p_off: float = 0.4, window: int = 2, utd: int = 2, reincarnate_at: int = 50,
                 lam_start: int = 50, lam_every: int = 10, lam_decrement: float = 0.1, lam_min: float = 0.5) -> None:
        if not 0 <= p_off <= 1 or window < 1 or utd < 1 or reincarnate_at < 0:
            raise ValueError("ReMixSchedule needs 0 <= p_off <= 1, window >= 1, utd >= 1, reincarnate_at >= 0")
        if lam_every < 1 or not 0 <= lam_min <= 1 or lam_decrement < 0:
            raise ValueError("ReMixSchedule needs lam_every >= 1, 0 <= lam_min <= 1, lam_decrement >= 0")
        self.p_off, self.window, self.utd, self.reincarnate_at = p_off, window, utd, reincarnate_at
        self.lam_start, self.lam_every, self.lam_decrement, self.lam_min = lam_start, lam_every, lam_decrement, lam_min
        self.t = 0
        self.reincarnated = False

    provides = frozenset({"kl_mix"})  # the learner keeps a frozen π_{k−1} ("prev") when a KL term is on

    def before_update(self, step: int, version: int) -> dict[str, Any]:
        return {"kl_mix": self.kl_weights()}

    def on_rollout_step(self, policy: Any, anchors: dict[str, Any]) -> None:
        """π_{k−1} ← π_k; at step T, π_base ← π_T (reincarnation), then on-policy data only."""
        self.step()
        if anchors.get("prev") is not None:
            anchors["prev"].model.load_state_dict(policy.model.state_dict())
        if self.should_reincarnate():
            if anchors.get("ref") is not None:
                anchors["ref"].model.load_state_dict(policy.model.state_dict())
            self.reincarnate()

    def sampler_params(self, sampling: str) -> dict[str, Any]:
        """The Mix-PPG data mix drives the ``recent_mix`` sampler (p → 0 after reincarnation)."""
        return {"p_off": self.off_policy_prob, "window": self.window} if sampling == "recent_mix" else {}

    def lam(self, t: int | None = None) -> float:
        t = self.t if t is None else t
        k = math.ceil(max(t - self.lam_start, 0) / self.lam_every)
        return max(1.0 - self.lam_decrement * k, self.lam_min)

    def kl_weights(self) -> tuple[float, float]:
        """(weight of KL to π_base, weight of KL to π_{k−1}) at the current step."""
        lam = self.lam()
        return lam, 1.0 - lam

    @property
    def off_policy_prob(self) -> float:
        return 0.0 if self.reincarnated else self.p_off

    def draw_lag(self, generator: torch.Generator | None = None) -> int:
        """0 (current policy's data) or i ∈ 1..N (data of π_{k−i}), drawn with the schedule's probabilities."""
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        if u[0].item() >= self.off_policy_prob:
            return 0
        return 1 + min(int(u[1].item() * self.window), self.window - 1)

    def should_reincarnate(self) -> bool:
        return not self.reincarnated and self.t >= self.reincarnate_at

    def reincarnate(self) -> None:
        """Record that π_base ← π_T was done; from now on the data is on-policy only."""
        self.reincarnated = True

    def step(self) -> None:
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "reincarnated": self.reincarnated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("ReMixSchedule", state, ("t", "reincarnated"))
        self.t, self.reincarnated = int(state["t"]), bool(state["reincarnated"])


# ---- PPO-EWMA -------------------------------------------------------------------------------
class EwmaProximal(Controller):
    """PPO-EWMA's proximal policy: an exponentially weighted moving average of the policy's parameters.

    After each optimizer step ``update(model)`` folds the current weights in with
    the bias-corrected EWMA of openai/ppo-ewma's ``EwmaModel`` [C, via a copy]:
    ``W ← βW + 1``, ``θ_prox ← θ_prox·(βW_old/W) + θ/W``, W₀ = 1 — an average of all
    past weights with geometric decay β, exact from the first step (no warm-up
    bias). The learner computes ``old_logp`` with ``module`` instead of the
    current weights, decoupling the proximal policy (clip anchor) from the
    behaviour policy (IS correction, e.g. ``decoupled_ppo``'s ``π_prox/μ``).
    β = ``decay`` = 0.889 [S: a third-party config citing Hilton et al.]. Buffers
    (non-trained tensors) are copied as they are. The revised PPO-EWMA of
    arXiv:2605.12070 is [NF] and not implemented.
    """

    def __init__(self, model: torch.nn.Module, *, decay: float = 0.889) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EwmaProximal decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.total_weight = 1.0
        self.source = model  # the live weights folded in after each update

    provides = frozenset({"proximal"})

    @classmethod
    def build(cls, params: dict[str, Any], *, model: torch.nn.Module, steps: int) -> "EwmaProximal":
        return cls(model, **params)

    def before_update(self, step: int, version: int) -> dict[str, Any]:
        return {"proximal": self.module}

    def after_update(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.update(self.source)
        return {}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        new_total = self.decay * self.total_weight + 1.0
        keep = self.decay * self.total_weight / new_total
        for p_ewma, p in zip(self.module.parameters(), model.parameters(), strict=True):
            p_ewma.mul_(keep).add_(p.detach().to(p_ewma.dtype), alpha=1.0 / new_total)
        for b_ewma, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ewma.copy_(b)
        self.total_weight = new_total

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "total_weight": self.total_weight, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("EwmaProximal", state, ("decay", "total_weight", "module"))
        self.decay, self.total_weight = float(state["decay"]), float(state["total_weight"])
        self.module.load_state_dict(state["module"])


CONTROLLERS: dict[str, type[Controller]] = {  # recipe name (rl.controllers.<name>) -> class
    "chord_mu": ChordMuSchedule,  # loss_params["mu"] of `chord`, stepped every update
    "mdpo_anneal": MdpoAnneal,  # loss_params["kl_coef"] of `mdpo`, stepped every rollout step
    "adaptive_kl": AdaptiveKL,  # the coefficient of the learner's KL-to-reference term
    "vcpo_lr": VcpoLrScale,  # lr x sqrt(min(1, ESS ratio)) around each optimizer step
    "ewma_proximal": EwmaProximal,  # an EWMA copy of the weights computes old_logp (PPO-EWMA)
    "remix": ReMixSchedule,  # ReMix: KL-convex mix of KL to pi_base and to pi_{k-1}, reincarnation, data mix
}
