"""One learner update: log-probs → advantages → loss → correction → KL → aggregate → step.

The learner computes only the log-probabilities the configured loss declares it
needs (``fn.needs``): the proximal ``old_logp`` (one no-grad forward pass at the
start of the update, or the engine's behaviour log-probs when
``old_logp="behavior"``), and ``ref_logp`` from a frozen reference model only when
a KL term or the loss asks for it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from offpolicy.config import ConfigError, OptimConfig, RLConfig
from offpolicy.data.buffer import ReplayBuffer
from offpolicy.experience import Batch
from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
from offpolicy.objectives.diagnostics import ess, ratio_quantiles, staleness_stats
from offpolicy.objectives.shaping import red_drop
from offpolicy.policy.model import Policy
from offpolicy.train.controllers import (AdaptiveKL, ChordMuSchedule, EwmaProximal, MdpoAnneal, ReMixSchedule,
                                         VcpoLrScale)


def check_params(fn: Callable, params: dict[str, Any], key: str, reserved: frozenset[str] | None = None) -> None:
    """Reject hyperparameters the function does not take, naming the recipe key and the valid ones."""
    reserved = TENSOR_INPUTS if reserved is None else reserved
    sig = inspect.signature(fn).parameters
    valid = sorted(n for n, p in sig.items() if p.default is not inspect.Parameter.empty and n not in reserved)
    for name in params:
        if name not in valid:
            raise ConfigError(f"{key}.{name}: not a hyperparameter of {fn.registry_name!r}; valid: {valid}")


def _param(fn: Callable, params: dict[str, Any], name: str) -> Any:
    """The value a loss will use for hyperparameter ``name``: the recipe's, else the function's default."""
    return params.get(name, inspect.signature(fn).parameters[name].default)


def lookup(registry, name: str, key: str):
    try:
        return registry[name]
    except KeyError as e:
        raise ConfigError(f"{key}: {e.args[0]}") from None


TENSOR_INPUTS = frozenset({  # tensors the learner supplies; never recipe hyperparameters
    "logp", "old_logp", "behavior_logp", "ref_logp", "advantages", "mask", "is_expert", "rewards", "group_index",
    "values", "token_rewards", "log_weights", "grad_norms", "turn_ids", "behavior_train_logp"})


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    """AdamW with a step-based schedule: linear warm-up, then constant / cosine / linear decay.

    The fused AdamW kernel (one pass over all parameters) is used when every parameter is a float
    tensor on CPU or CUDA: same update rule, ~2.5x less optimizer time for the tiny model on CPU.
    """
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(policy: Policy, loss: torch.Tensor, opt, sched, grad_clip: float) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    sched.step()
    return norm.detach()


PROXIMAL_IS_CURRENT = object()  # marker: old_logp = the update's own log-probs, detached


def has_active_dropout(model: torch.nn.Module) -> bool:
    """True if a forward pass is random (a dropout layer with p > 0 in training mode)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
               for m in model.modules())


CONTROLLERS = {  # recipe name -> (class, what it drives)
    "chord_mu": ChordMuSchedule,  # loss_params["mu"] of `chord`, stepped every update
    "mdpo_anneal": MdpoAnneal,  # loss_params["kl_coef"] of `mdpo`, stepped every rollout step
    "adaptive_kl": AdaptiveKL,  # the coefficient of the learner's KL-to-reference term
    "vcpo_lr": VcpoLrScale,  # lr x sqrt(min(1, ESS ratio)) around each optimizer step
    "ewma_proximal": EwmaProximal,  # an EWMA copy of the weights computes old_logp (PPO-EWMA)
    "remix": ReMixSchedule,  # ReMix: KL-convex mix of KL to pi_base and to pi_{k-1}, reincarnation, data mix
}


LOSS_PARAM_CONTROLLERS = {"chord_mu": "mu", "mdpo_anneal": "kl_coef"}  # controller -> loss hyperparameter


class Learner:
    """Policy-gradient updates on batches of experiences, as configured by ``rl`` in the recipe."""

    def __init__(self, policy: Policy, cfg: RLConfig, *, total_updates: int, temperature: float = 1.0,
                 max_len: int | None = None, ref_policy: Policy | None = None, seed: int = 0) -> None:
        validate_rl_config(cfg)
        self.policy, self.cfg, self.temperature, self.max_len = policy, cfg, temperature, max_len
        self.loss_fn = lookup(POLICY_LOSSES, cfg.loss, "rl.loss")
        self.adv_fn = lookup(ADVANTAGES, cfg.advantage, "rl.advantage")
        self.agg_fn = lookup(AGGREGATIONS, cfg.aggregation or self.loss_fn.default_agg, "rl.aggregation")
        self.corr_fn = lookup(CORRECTIONS, cfg.correction, "rl.correction") if cfg.correction else None
        self.controllers = build_controllers(cfg, policy, total_updates)
        kl_on = bool(cfg.kl_coef) or "adaptive_kl" in self.controllers
        self.kl_fn = lookup(KL_ESTIMATORS, cfg.kl_estimator, "rl.kl_estimator") if kl_on else None
        if "values" in getattr(self.adv_fn, "needs", ()):
            raise ConfigError(f"rl.advantage: {cfg.advantage!r} needs a value model (critic); offpolicy does not "
                              "train one yet — use a critic-free estimator such as grpo, rloo or reinforce_pp")
        self.needs = set(self.loss_fn.needs)
        self.optional = set(getattr(self.loss_fn, "optional", ()))  # given to the loss when computed
        if "ref_logp" in self.optional and _param(self.loss_fn, cfg.loss_params, "kl_coef"):
            if self.kl_fn is not None:
                raise ConfigError(f"rl.kl_coef: loss {cfg.loss!r} adds its own KL term (rl.loss_params.kl_coef); "
                                  "set one of them to 0 so the KL is not counted twice")
            self.needs.add("ref_logp")  # the loss's own KL (grpo's k3 term) is active
        if (self.kl_fn or "ref_logp" in self.needs) and ref_policy is None:
            ref_policy = policy.copy()  # frozen reference = the policy as RL starts
        self.ref_policy = ref_policy
        # ReMix's KL-convex term also needs the policy of the previous rollout step, pi_{k-1}
        self.prev_policy = policy.copy() if self.kl_fn is not None and "remix" in self.controllers else None
        self.adv_inputs = set(getattr(self.adv_fn, "needs", ())) | set(getattr(self.adv_fn, "optional", ()))
        # rows the loss declares exactly zero are skipped, unless a KL term, a reference or a correction reads them
        reads_every_row = self.kl_fn is not None or self.ref_policy is not None or self.corr_fn is not None
        self.zero_rows = None if reads_every_row or not cfg.skip_zero_rows else getattr(self.loss_fn, "zero_rows", None)
        self.opt, self.sched = make_optimizer(policy.parameters(), cfg.optim, total_updates)
        self.version = 0  # policy version = optimizer steps taken in this stage
        self.drop_gen = torch.Generator().manual_seed(seed)  # RED-Drop's randomness (checkpointed)

    @property
    def needs_behavior_train_logp(self) -> bool:
        """The decoupled correction needs the trainer's log-probs at the behaviour version (snapshot)."""
        return self.corr_fn is not None and "behavior_train_logp" in getattr(self.corr_fn, "needs", ())

    # ---- the update ----------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Advantages, loss and one optimizer step on ``batch``; returns detached metric tensors."""
        cfg = self.cfg
        old_logp, ref_logp = self._anchor_logprobs(batch)
        proximal = old_logp is PROXIMAL_IS_CURRENT  # same weights, no dropout: the update's own log-probs
        advantages = rows = None
        if not (proximal and "log_weights" in self.adv_inputs):  # advantages first: they pick the rows
            advantages = self._advantages(batch, None if proximal else old_logp)  # (B, T)
            rows = self._contributing_rows(batch, advantages)
        logp, entropy = self._logprobs(batch, rows)
        if proximal:
            old_logp = logp.detach()
        if advantages is None:
            advantages = self._advantages(batch, old_logp)
        available = {"old_logp": old_logp, "behavior_logp": batch.behavior_logp, "ref_logp": ref_logp,
                     "is_expert": batch.is_expert, "rewards": batch.rewards, "group_index": batch.group_index}
        inputs = {k: v for k, v in available.items() if k in self.needs or (k in self.optional and v is not None)}
        loss_tok, metrics = self.loss_fn(logp=logp, advantages=advantages, mask=batch.mask, **inputs,
                                         **cfg.loss_params, **self._controller_loss_params())  # (B, T)
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        if self.corr_fn is not None:
            turn_ids = batch.turn_ids if batch.turn_ids is not None else torch.zeros_like(batch.response_ids)
            extra = {"turn_ids": turn_ids, "behavior_train_logp": batch.behavior_train_logp}  # single-turn = turn 0
            extra = {k: v for k, v in extra.items() if k in getattr(self.corr_fn, "needs", ())}
            weights, cm = self.corr_fn(old_logp=old_logp, behavior_logp=batch.behavior_logp, mask=batch.mask,
                                       **extra, **cfg.correction_params)
            loss_tok = loss_tok * weights
            metrics.update({f"correction/{k}": v for k, v in cm.items()})
        if self.kl_fn is not None:
            kl = self._kl(batch, logp, ref_logp)  # (B, T)
            loss_tok = loss_tok + self._kl_coef() * kl
            metrics["loss/kl_ref"] = (kl.sum() / batch.mask.sum().clamp(min=1)).detach()
        loss = self.agg_fn(loss_tok, batch.mask, max_len=self.max_len)
        metrics.update(self._diagnostics(batch, logp, entropy, advantages, rows))
        grad_norm = self._step(loss, metrics)
        self.version += 1
        self._after_update(metrics)
        metrics.update({"loss/policy": loss.detach(), "loss/grad_norm": grad_norm,
                        "optim/lr": torch.tensor(self.sched.get_last_lr()[0])})
        return metrics

    def _contributing_rows(self, batch: Batch, advantages: torch.Tensor) -> torch.Tensor | None:
        """Indices of the rows that can move the weights, or None for all of them.

        A loss registered with ``zero_rows`` names the rows whose loss is exactly 0 whatever the
        log-probs (e.g. negatives when TOPR's negative weight is 0). Their forward and backward passes
        would add exact zeros to the gradient, so they are skipped, unless something else reads every
        row's log-probs: a KL term, a reference or a correction. A skipped row's log-prob is the
        behaviour one, and with the proximal ``old_logp`` of the update's own pass its ratio is 1, as
        it would be unskipped. At least one row is kept, so an update whose every row is zero still
        gives the optimizer zero gradients, as the full batch would.
        """
        if self.zero_rows is None:
            return None
        zero = self.zero_rows(advantages, batch.mask, **self.cfg.loss_params)  # (B,) bool
        if not bool(zero.any()):
            return None
        keep = (~zero).nonzero().squeeze(-1)
        return keep if keep.numel() else torch.zeros(1, dtype=torch.long)

    def _logprobs(self, batch: Batch, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies (B, T) of the responses; with ``rows``, only those rows are computed
        and the others hold the behaviour log-probs (ratio 1; no gradient) and entropy 0."""
        if rows is None:
            return self.policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                                 self.temperature, with_entropy=True)
        logp, entropy = self.policy.response_logprobs(batch.input_ids[rows], batch.attention_mask[rows],
                                                      batch.prompt_len, self.temperature, with_entropy=True)
        base = batch.behavior_logp if batch.behavior_logp is not None else torch.zeros_like(batch.mask)
        return base.index_copy(0, rows, logp), torch.zeros_like(batch.mask).index_copy(0, rows, entropy)

    def end_rollout_step(self) -> None:
        """Once per rollout step: an MDPO iteration ends; ReMix moves pi_{k-1} and may reincarnate."""
        if "mdpo_anneal" in self.controllers:
            self.controllers["mdpo_anneal"].step()
        remix = self.controllers.get("remix")
        if remix is not None:
            remix.step()
            if self.prev_policy is not None:
                self.prev_policy.model.load_state_dict(self.policy.model.state_dict())
            if remix.should_reincarnate():  # pi_base <- pi_T, then on-policy data only
                if self.ref_policy is not None:
                    self.ref_policy.model.load_state_dict(self.policy.model.state_dict())
                remix.reincarnate()

    def _kl(self, batch: Batch, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        """KL to the reference (B, T); with ReMix, the KL-convex mix lam KL(.||pi_base) + (1-lam) KL(.||pi_{k-1})."""
        kl = self.kl_fn(logp, ref_logp) * batch.mask
        if self.prev_policy is None:
            return kl
        with torch.no_grad():
            prev_logp, _ = self.prev_policy.response_logprobs(batch.input_ids, batch.attention_mask,
                                                              batch.prompt_len, self.temperature)
        lam, rest = self.controllers["remix"].kl_weights()
        return lam * kl + rest * self.kl_fn(logp, prev_logp) * batch.mask

    def _advantages(self, batch: Batch, old_logp: torch.Tensor | None) -> torch.Tensor:
        cfg, keep = self.cfg, None
        extra: dict[str, Any] = {}
        wanted = self.adv_inputs
        if "log_weights" in wanted and old_logp is not None and batch.behavior_logp is not None:
            extra["log_weights"] = ((old_logp - batch.behavior_logp) * batch.mask).sum(-1)  # (B,) sequence IS
        if "token_rewards" in wanted and batch.token_rewards is not None:
            extra["token_rewards"] = batch.token_rewards
        if "response_ids" in wanted:  # padding -> -1, which no token has
            extra["response_ids"] = batch.response_ids.masked_fill(~batch.attention_mask[:, batch.prompt_len:], -1)
        rewards, group_index, mask = batch.rewards, batch.group_index, batch.mask
        if cfg.red_drop:
            keep = red_drop(rewards, group_index, self.drop_gen)  # (B,) balance negatives per group
            rewards, group_index, mask = rewards[keep], group_index[keep], mask[keep]
            extra = {k: v[keep] for k, v in extra.items()}
        adv = self.adv_fn(rewards=rewards, group_index=group_index, mask=mask, **extra, **cfg.advantage_params)
        if keep is None:
            return adv
        full = torch.zeros_like(batch.mask)
        full[keep] = adv
        return full

    def _controller_loss_params(self) -> dict[str, Any]:
        return {k: v for name in LOSS_PARAM_CONTROLLERS if name in self.controllers
                for k, v in self.controllers[name].loss_params().items()}

    def _kl_coef(self) -> float:
        ctl = self.controllers.get("adaptive_kl")
        return ctl.value if ctl is not None else self.cfg.kl_coef

    def _step(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        vcpo = self.controllers.get("vcpo_lr")
        if vcpo is None:
            return optimizer_step(self.policy, loss, self.opt, self.sched, self.cfg.optim.grad_clip)
        ratio = metrics.get("offpolicy/ess", torch.tensor(1.0))  # normalised sequence ESS of pi_old / mu
        with vcpo.scaled(self.opt, ratio) as scale:
            norm = optimizer_step(self.policy, loss, self.opt, self.sched, self.cfg.optim.grad_clip)
        metrics["optim/lr_scale"] = torch.tensor(scale)
        return norm

    def _after_update(self, metrics: dict[str, torch.Tensor]) -> None:
        if "chord_mu" in self.controllers:
            self.controllers["chord_mu"].step()
            metrics["loss/chord_mu"] = torch.tensor(self.controllers["chord_mu"].mu)
        if "adaptive_kl" in self.controllers:
            self.controllers["adaptive_kl"].step(metrics["loss/kl_ref"])
            metrics["loss/kl_coef"] = torch.tensor(self.controllers["adaptive_kl"].value)
        if "ewma_proximal" in self.controllers:
            self.controllers["ewma_proximal"].update(self.policy.model)

    @torch.no_grad()
    def _anchor_logprobs(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        old = ref = None
        if "old_logp" in self.needs or self.corr_fn is not None:
            if self.cfg.old_logp == "behavior":
                if batch.behavior_logp is None:
                    raise ValueError("rl.old_logp='behavior' needs behaviour log-probs, but the batch has "
                                     "expert/offline traces without them")
                old = batch.behavior_logp
            else:
                ewma = self.controllers.get("ewma_proximal")
                if ewma is None and not has_active_dropout(self.policy.model):
                    old = PROXIMAL_IS_CURRENT  # the update's own forward pass gives it (see update)
                else:
                    prox = Policy(ewma.module, self.policy.tokenizer, self.policy.kind) if ewma else self.policy
                    old, _ = prox.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                                    self.temperature)
        if self.ref_policy is not None:
            ref, _ = self.ref_policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                                       self.temperature)
        if "behavior_logp" in self.needs and batch.behavior_logp is None:
            raise ValueError(f"loss {self.cfg.loss!r} needs behaviour log-probs, which expert/offline traces lack")
        if self.needs_behavior_train_logp and batch.behavior_train_logp is None:
            raise ValueError("the decoupled correction needs the trainer's log-probs at the behaviour version; "
                             "expert/offline traces have none")
        return old, ref

    @torch.no_grad()
    def _diagnostics(self, batch, logp, entropy, advantages, rows=None) -> dict[str, torch.Tensor]:
        """Batch diagnostics. When zero-loss rows were skipped, entropy, ESS, log-ratios and staleness
        describe the rows the update learned from; ``train/active_row_frac`` says what share that was."""
        n_all = batch.mask.sum().clamp(min=1)
        out = {"adv/abs_mean": (advantages.abs() * batch.mask).sum() / n_all,
               "reward/train_batch_mean": batch.rewards.mean(),
               "train/active_row_frac": torch.tensor(1.0 if rows is None else rows.numel() / batch.mask.shape[0])}
        mask = batch.mask
        if rows is not None:
            mask = torch.zeros_like(mask).index_copy(0, rows, mask[rows])
        n = mask.sum().clamp(min=1)
        out["train/active_tokens"] = mask.sum()  # response tokens this update learned from
        out["policy/entropy"] = (entropy * mask).sum() / n
        if batch.behavior_logp is not None:
            # behaviour -> current policy (before this step): staleness and mismatch together
            log_w = (logp.detach() - batch.behavior_logp) * mask  # (B, T)
            out["offpolicy/ess"] = ess(log_w.sum(-1), mask.any(-1).float())
            out["offpolicy/ess_token"] = ess(log_w, mask)
            out.update({f"offpolicy/log_ratio_{k}": v for k, v in ratio_quantiles(log_w, mask).items()})
        stale = staleness_stats(batch.versions, self.version, mask)
        out.update({f"offpolicy/staleness_{k}": v for k, v in stale.items()})
        return out

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "version": self.version,
                "drop_gen": self.drop_gen.get_state(),
                "controllers": {name: c.state_dict() for name, c in self.controllers.items()},
                # anchors are part of the run's state: a resumed run keeps its reference, not a new one
                "ref_model": self.ref_policy.model.state_dict() if self.ref_policy is not None else None,
                "prev_model": self.prev_policy.model.state_dict() if self.prev_policy is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.version = state["version"]
        if "drop_gen" in state:
            self.drop_gen.set_state(state["drop_gen"])
        for name, c in self.controllers.items():
            c.load_state_dict(state.get("controllers", {})[name])
        for anchor, key in ((self.ref_policy, "ref_model"), (self.prev_policy, "prev_model")):
            if anchor is not None and state.get(key) is not None:
                anchor.model.load_state_dict(state[key])


def validate_rl_config(cfg: RLConfig) -> None:
    """Check every registry name and hyperparameter of ``rl`` before any training starts (fail fast).

    Builds nothing heavy: no model copies, no optimizer. Raises :class:`ConfigError` naming the key.
    """
    loss_fn = lookup(POLICY_LOSSES, cfg.loss, "rl.loss")
    lookup(AGGREGATIONS, cfg.aggregation or loss_fn.default_agg, "rl.aggregation")
    adv_fn = lookup(ADVANTAGES, cfg.advantage, "rl.advantage")
    check_params(adv_fn, cfg.advantage_params, "rl.advantage_params")
    if cfg.correction:
        check_params(lookup(CORRECTIONS, cfg.correction, "rl.correction"), cfg.correction_params,
                     "rl.correction_params")
    if cfg.kl_coef or "adaptive_kl" in cfg.controllers:
        lookup(KL_ESTIMATORS, cfg.kl_estimator, "rl.kl_estimator")
    unknown = sorted(set(cfg.controllers) - set(CONTROLLERS))
    if unknown:
        raise ConfigError(f"rl.controllers.{unknown[0]}: unknown controller; valid: {sorted(CONTROLLERS)}")
    check_params(loss_fn, cfg.loss_params, "rl.loss_params")
    for name, params in cfg.controllers.items():
        sig = inspect.signature(CONTROLLERS[name].__init__).parameters
        valid = sorted(k for k, p in sig.items() if p.kind is p.KEYWORD_ONLY)
        for key in params or {}:
            if key not in valid:
                raise ConfigError(f"rl.controllers.{name}.{key}: not a parameter of {name}; valid: {valid}")
        drives = LOSS_PARAM_CONTROLLERS.get(name)
        if drives and drives not in inspect.signature(loss_fn).parameters:
            raise ConfigError(f"rl.controllers.{name}: it drives the loss hyperparameter {drives!r}, which "
                              f"loss {cfg.loss!r} does not take")
        if drives and drives in cfg.loss_params:
            raise ConfigError(f"rl.loss_params.{drives}: set by the {name} controller; remove it from loss_params")
    try:
        ReplayBuffer(sampling=cfg.buffer.sampling, sampling_params=cfg.buffer.sampling_params)
    except ValueError as e:
        raise ConfigError(f"rl.{e}") from None


def build_controllers(cfg: RLConfig, policy: Policy, total_updates: int) -> dict[str, Any]:
    """The stateful controllers named in ``rl.controllers`` (name -> constructor keyword arguments)."""
    out: dict[str, Any] = {}
    for name, params in cfg.controllers.items():
        cls = CONTROLLERS.get(name)
        if cls is None:
            raise ConfigError(f"rl.controllers.{name}: unknown controller; valid: {sorted(CONTROLLERS)}")
        params = dict(params or {})
        if name == "mdpo_anneal":
            params.setdefault("total_iterations", cfg.steps)
        try:
            out[name] = cls(policy.model, **params) if name == "ewma_proximal" else cls(**params)
        except TypeError as e:
            raise ConfigError(f"rl.controllers.{name}: {e}") from None
    if "adaptive_kl" in out and cfg.kl_coef:
        raise ConfigError("rl.kl_coef: the adaptive_kl controller sets the KL coefficient; leave rl.kl_coef at 0")
    return out


def sft_update(policy: Policy, batch: Batch, opt, sched, grad_clip: float) -> dict[str, torch.Tensor]:
    """One supervised step on expert traces: token-mean negative log-likelihood (the ``sft`` loss)."""
    logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len)
    loss_tok, _ = POLICY_LOSSES["sft"](logp=logp, advantages=torch.zeros_like(logp), mask=batch.mask)
    loss = AGGREGATIONS["token-mean"](loss_tok, batch.mask)
    grad_norm = optimizer_step(policy, loss, opt, sched, grad_clip)
    return {"sft/loss": loss.detach(), "sft/grad_norm": grad_norm, "optim/lr": torch.tensor(sched.get_last_lr()[0])}
