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
from offpolicy.experience import Batch
from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
from offpolicy.objectives.diagnostics import ess, ratio_quantiles, staleness_stats
from offpolicy.policy.model import Policy


def check_params(fn: Callable, params: dict[str, Any], key: str, reserved: set[str]) -> None:
    """Reject hyperparameters the function does not take, naming the recipe key and the valid ones."""
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


TENSOR_INPUTS = {"logp", "old_logp", "behavior_logp", "ref_logp", "advantages", "mask", "is_expert", "rewards", "group_index"}


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    """AdamW with a step-based schedule: linear warm-up, then constant / cosine / linear decay."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

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


class Learner:
    """Policy-gradient updates on batches of experiences, as configured by ``rl`` in the recipe."""

    def __init__(self, policy: Policy, cfg: RLConfig, *, total_updates: int, temperature: float = 1.0,
                 max_len: int | None = None, ref_policy: Policy | None = None) -> None:
        self.policy, self.cfg, self.temperature, self.max_len = policy, cfg, temperature, max_len
        self.loss_fn = lookup(POLICY_LOSSES, cfg.loss, "rl.loss")
        self.adv_fn = lookup(ADVANTAGES, cfg.advantage, "rl.advantage")
        self.agg_fn = lookup(AGGREGATIONS, cfg.aggregation or self.loss_fn.default_agg, "rl.aggregation")
        self.corr_fn = lookup(CORRECTIONS, cfg.correction, "rl.correction") if cfg.correction else None
        self.kl_fn = lookup(KL_ESTIMATORS, cfg.kl_estimator, "rl.kl_estimator") if cfg.kl_coef else None
        check_params(self.loss_fn, cfg.loss_params, "rl.loss_params", TENSOR_INPUTS)
        check_params(self.adv_fn, cfg.advantage_params, "rl.advantage_params", TENSOR_INPUTS)
        if self.corr_fn:
            check_params(self.corr_fn, cfg.correction_params, "rl.correction_params", TENSOR_INPUTS)
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
        self.opt, self.sched = make_optimizer(policy.parameters(), cfg.optim, total_updates)
        self.version = 0  # policy version = optimizer steps taken in this stage

    # ---- the update ----------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Advantages, loss and one optimizer step on ``batch``; returns detached metric tensors."""
        cfg = self.cfg
        advantages = self.adv_fn(rewards=batch.rewards, group_index=batch.group_index, mask=batch.mask,
                                 **cfg.advantage_params)  # (B, T)
        old_logp, ref_logp = self._anchor_logprobs(batch)
        logp, entropy = self.policy.response_logprobs(
            batch.input_ids, batch.attention_mask, batch.prompt_len, self.temperature, with_entropy=True)
        inputs = {"old_logp": old_logp, "behavior_logp": batch.behavior_logp, "ref_logp": ref_logp,
                  "is_expert": batch.is_expert, "rewards": batch.rewards, "group_index": batch.group_index}
        inputs = {k: v for k, v in inputs.items() if k in self.needs or (k in self.optional and v is not None)}
        loss_tok, metrics = self.loss_fn(logp=logp, advantages=advantages, mask=batch.mask, **inputs,
                                         **cfg.loss_params)  # (B, T)
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        if self.corr_fn is not None:
            weights, cm = self.corr_fn(old_logp=old_logp, behavior_logp=batch.behavior_logp, mask=batch.mask,
                                       **cfg.correction_params)
            loss_tok = loss_tok * weights
            metrics.update({f"correction/{k}": v for k, v in cm.items()})
        if self.kl_fn is not None:
            kl = self.kl_fn(logp, ref_logp) * batch.mask  # (B, T)
            loss_tok = loss_tok + cfg.kl_coef * kl
            metrics["loss/kl_ref"] = (kl.sum() / batch.mask.sum().clamp(min=1)).detach()
        loss = self.agg_fn(loss_tok, batch.mask, max_len=self.max_len)
        metrics.update(self._diagnostics(batch, logp, entropy, advantages))
        grad_norm = optimizer_step(self.policy, loss, self.opt, self.sched, cfg.optim.grad_clip)
        self.version += 1
        metrics.update({"loss/policy": loss.detach(), "loss/grad_norm": grad_norm,
                        "optim/lr": torch.tensor(self.sched.get_last_lr()[0])})
        return metrics

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
                old, _ = self.policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                                       self.temperature)
        if self.ref_policy is not None:
            ref, _ = self.ref_policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                                       self.temperature)
        if "behavior_logp" in self.needs and batch.behavior_logp is None:
            raise ValueError(f"loss {self.cfg.loss!r} needs behaviour log-probs, which expert/offline traces lack")
        return old, ref

    @torch.no_grad()
    def _diagnostics(self, batch, logp, entropy, advantages) -> dict[str, torch.Tensor]:
        mask = batch.mask
        n = mask.sum().clamp(min=1)
        out = {"policy/entropy": (entropy * mask).sum() / n, "adv/abs_mean": (advantages.abs() * mask).sum() / n,
               "reward/train_batch_mean": batch.rewards.mean()}
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
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.version = state["version"]


def sft_update(policy: Policy, batch: Batch, opt, sched, grad_clip: float) -> dict[str, torch.Tensor]:
    """One supervised step on expert traces: token-mean negative log-likelihood (the ``sft`` loss)."""
    logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len)
    loss_tok, _ = POLICY_LOSSES["sft"](logp=logp, advantages=torch.zeros_like(logp), mask=batch.mask)
    loss = AGGREGATIONS["token-mean"](loss_tok, batch.mask)
    grad_norm = optimizer_step(policy, loss, opt, sched, grad_clip)
    return {"sft/loss": loss.detach(), "sft/grad_norm": grad_norm, "optim/lr": torch.tensor(sched.get_last_lr()[0])}
