"""One learner update, in a fixed order: anchors → advantages → rows → log-probs → loss → correction → KL
→ aggregate → step.

The learner computes only the log-probabilities the configured loss declares it
needs (``fn.needs``): the proximal ``old_logp`` (one no-grad forward pass at the
start of the update, the update's own pass detached, or the engine's behaviour
log-probs when ``old_logp="behavior"``), and ``ref_logp`` from a frozen reference
model only when a KL term or the loss asks for it. Which of these an update runs,
and whether zero-loss rows are skipped, is decided once at construction; the
update itself has no optional branches. ``rl.micro_batch_size`` splits every
forward pass into micro-batches whose gradients add up to the whole batch's
(:func:`accumulate_grads`). Controllers (``train/controllers.py``) change
hyperparameters through one interface and are never named here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Any, Callable, Iterator

import torch

from offpolicy.config import ConfigError, OptimConfig, RLConfig, TrainingDiverged
from offpolicy.data.buffer import ReplayBuffer
from offpolicy.experience import Batch
from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
from offpolicy.objectives.diagnostics import ess, ratio_quantiles, staleness_stats
from offpolicy.objectives.shaping import red_drop
from offpolicy.policy.model import Policy
from offpolicy.train.controllers import CONTROLLERS
from offpolicy.train.guards import NonFiniteGuard


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
    """One supervised step. SFT learns the task's own expert traces, so a non-finite loss or gradient is
    not one bad sample to skip but a setting that cannot work: it stops the run before the step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    bad = NonFiniteGuard.check_update(loss, norm, grad_clip)
    if bad is not None:
        raise TrainingDiverged(f"sft: non-finite {bad} (sft.optim.lr={opt.defaults['lr']}); the step was not taken")
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    opt.step()
    sched.step()
    return norm.detach()


def has_active_dropout(model: torch.nn.Module) -> bool:
    """True if a forward pass is random (a dropout layer with p > 0 in training mode)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
               for m in model.modules())


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"run.dtype: {dtype!r} is not a parameter dtype; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]


def forward(policy: Policy, batch: Batch, rows: torch.Tensor | None, temperature: float,
            with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (R, T) (and entropies) of ``rows`` of the batch; every row when ``rows`` is None."""
    if rows is None:
        return policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len, temperature,
                                        with_entropy=with_entropy)
    return policy.response_logprobs(batch.input_ids[rows], batch.attention_mask[rows], batch.prompt_len,
                                    temperature, with_entropy=with_entropy)


@torch.no_grad()
def no_grad_logprobs(policy: Policy, batch: Batch, rows: torch.Tensor | None, temperature: float,
                     micro: int | None, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (R, T) of ``rows`` without a graph, ``micro`` rows per forward pass (None: one pass)."""
    if micro is None:
        return forward(policy, batch, rows, temperature, with_entropy)
    idx = rows if rows is not None else torch.arange(batch.size, device=batch.input_ids.device)
    parts = [forward(policy, batch, r, temperature, with_entropy) for r in idx.split(micro)]
    entropy = torch.cat([e for _, e in parts]) if with_entropy else None
    return torch.cat([lp for lp, _ in parts]), entropy


def accumulate_grads(loss: torch.Tensor, *, policy: Policy, batch: Batch, rows: torch.Tensor | None,
                     leaf: torch.Tensor | None, micro: int | None, temperature: float) -> None:
    """Backward pass of ``loss`` into the policy's ``.grad``, whole batch or micro-batch by micro-batch.

    Every loss, correction, KL term and aggregation depends on the weights only through the
    log-probs (anchors are no-grad, entropy is a diagnostic), so ``dL/dθ = Σ_{b,t} g_bt ∂logp_bt/∂θ``
    with ``g = dL/dlogp``. Micro-batched, ``logp`` was computed without a graph and made a leaf:
    ``loss.backward()`` gives ``g`` (R, T) with every batch-wide statistic (M2PO's masking,
    Clip-Cov's selection, group baselines, ESS) taken over the whole update; then each
    micro-batch's forward is redone with a graph and ``logp_mb.backward(g[rows_mb])``
    accumulates exactly the whole batch's gradient.
    """
    loss.backward()
    if leaf is None:  # one pass: the graph reached the weights already
        return
    idx = rows if rows is not None else torch.arange(batch.size, device=batch.input_ids.device)
    for r, g in zip(idx.split(micro), leaf.grad.split(micro)):
        logp_mb, _ = forward(policy, batch, r, temperature)  # (m, T)
        logp_mb.backward(g)


@contextlib.contextmanager
def scaled_lr(opt: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Every param group's lr × ``scale`` for one optimizer step, restored after (the schedule is untouched)."""
    base = [g["lr"] for g in opt.param_groups]
    for g, lr in zip(opt.param_groups, base):
        g["lr"] = lr * scale
    try:
        yield
    finally:
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr


def merge_overrides(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict of controller overrides; ``loss_params`` dicts merge (keys are disjoint, checked at build)."""
    out: dict[str, Any] = {"loss_params": {}}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out[key], **value} if key == "loss_params" else value
    return out


class Learner:
    """Policy-gradient updates on batches of experiences, as configured by ``rl`` in the recipe.

    ``device`` / ``dtype`` (``run.device`` / ``run.dtype``): the policy and its anchors move there
    once, here; each batch moves once per update. The same code runs on CPU and CUDA.
    """

    def __init__(self, policy: Policy, cfg: RLConfig, *, total_updates: int, temperature: float = 1.0,
                 max_len: int | None = None, ref_policy: Policy | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> None:
        validate_rl_config(cfg)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        policy.model.to(device=self.device, dtype=self.dtype)
        self.policy, self.cfg, self.temperature, self.max_len = policy, cfg, temperature, max_len
        self.loss_fn = lookup(POLICY_LOSSES, cfg.loss, "rl.loss")
        self.adv_fn = lookup(ADVANTAGES, cfg.advantage, "rl.advantage")
        self.agg_fn = lookup(AGGREGATIONS, cfg.aggregation or self.loss_fn.default_agg, "rl.aggregation")
        self.corr_fn = lookup(CORRECTIONS, cfg.correction, "rl.correction") if cfg.correction else None
        self.controllers = build_controllers(cfg, policy, total_updates)
        provides = set().union(*(type(c).provides for c in self.controllers.values()))
        kl_on = bool(cfg.kl_coef) or "kl_coef" in provides
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
        self.adv_inputs = set(getattr(self.adv_fn, "needs", ())) | set(getattr(self.adv_fn, "optional", ()))
        self.micro_batch_size = check_micro_batching(cfg, policy)
        self.old_logp_from = self._old_logp_source(provides)
        if (self.kl_fn or "ref_logp" in self.needs) and ref_policy is None:
            ref_policy = policy.copy()  # frozen reference = the policy as RL starts
        self.ref_policy = ref_policy
        if ref_policy is not None:
            ref_policy.model.to(device=self.device, dtype=self.dtype)
        # a KL mix (ReMix's KL-convex term) also needs the policy of the previous rollout step, pi_{k-1}
        self.prev_policy = policy.copy() if self.kl_fn is not None and "kl_mix" in provides else None
        # rows the loss declares exactly zero are skipped, unless a KL term, a reference or a correction reads them
        reads_every_row = self.kl_fn is not None or self.ref_policy is not None or self.corr_fn is not None
        self.zero_rows = None if reads_every_row or not cfg.skip_zero_rows else getattr(self.loss_fn, "zero_rows", None)
        self.opt, self.sched = make_optimizer(policy.parameters(), cfg.optim, total_updates)
        self.version = 0  # policy version = updates taken in this stage (a skipped one keeps the weights)
        self.guard = NonFiniteGuard(cfg.max_skipped_steps)
        self.drop_gen = torch.Generator().manual_seed(seed)  # RED-Drop's randomness (checkpointed)

    def _old_logp_source(self, provides: set[str]) -> str | None:
        """Where ``old_logp`` comes from, decided once: ``behavior`` (the engine's), ``proximal`` (a no-grad
        pass of the current or a controller's proximal weights), ``current`` (the update's own pass,
        detached: same weights, no dropout) or None (nothing reads it)."""
        if not ("old_logp" in self.needs or self.corr_fn is not None or "log_weights" in self.adv_inputs):
            return None
        if self.cfg.old_logp == "behavior":
            return "behavior"
        # the advantages read old_logp (log_weights) before the update's own pass exists
        separate = "proximal" in provides or has_active_dropout(self.policy.model) or "log_weights" in self.adv_inputs
        return "proximal" if separate else "current"

    @property
    def needs_behavior_train_logp(self) -> bool:
        """The decoupled correction needs the trainer's log-probs at the behaviour version (snapshot)."""
        return self.corr_fn is not None and "behavior_train_logp" in getattr(self.corr_fn, "needs", ())

    # ---- the update ----------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``, in a fixed order; returns detached metric tensors."""
        batch = batch.to(self.device)
        self._check_inputs(batch)
        ov = merge_overrides([c.before_update(self.version, self.version) for c in self.controllers.values()])
        old_logp, ref_logp, prev_logp = self._anchors(batch, ov)  # (B, T) each, no grad, or None
        advantages = self._advantages(batch, old_logp)  # (B, T)
        rows = self._contributing_rows(batch, advantages)  # (R,) kept rows, or None for all
        logp, entropy, backward = self._logprobs(batch, rows)  # (B, T)
        if self.old_logp_from == "current":
            old_logp = logp.detach()
        loss_tok, metrics = self._loss(batch, logp, old_logp, ref_logp, advantages, ov)  # (B, T)
        loss_tok = self._correct(batch, loss_tok, old_logp, metrics)
        loss_tok = self._add_kl(batch, loss_tok, logp, ref_logp, prev_logp, ov, metrics)
        loss = self.agg_fn(loss_tok, batch.mask, max_len=self.max_len)
        metrics.update(self._diagnostics(batch, logp, entropy, advantages, rows))
        grad_norm, skipped = self._step(loss, backward, metrics)
        self.version += 1  # a skipped update keeps its number: the loops' schedules count updates
        for c in self.controllers.values() if not skipped else ():  # NaN metrics must not steer a controller
            metrics.update(c.after_update(metrics))
        metrics.update(self.guard.metrics())
        metrics.update({"loss/policy": loss.detach(), "loss/grad_norm": grad_norm,
                        "optim/lr": torch.tensor(self.sched.get_last_lr()[0])})
        return metrics

    def _check_inputs(self, batch: Batch) -> None:
        """Refuse a batch that lacks an input this configuration reads (no silent zeros)."""
        lacking = not bool(batch.has_behavior.all())  # expert / offline rows without behaviour log-probs
        if lacking and self.old_logp_from == "behavior":
            raise ValueError("rl.old_logp='behavior' needs behaviour log-probs, but the batch has "
                             "expert/offline traces without them")
        if lacking and "behavior_logp" in self.needs and "is_expert" not in self.needs:
            raise ValueError(f"rl.loss: {self.cfg.loss!r} needs behaviour log-probs, which expert/offline "
                             "traces lack (it does not treat expert rows separately)")
        if lacking and self.corr_fn is not None:
            raise ValueError(f"rl.correction: {self.cfg.correction!r} needs behaviour log-probs, which "
                             "expert/offline traces lack")
        if lacking and "log_weights" in self.adv_inputs:
            raise ValueError(f"rl.advantage: {self.cfg.advantage!r} weights rows by old/behaviour importance "
                             "weights, which expert/offline traces lack")
        corr_needs = getattr(self.corr_fn, "needs", ())
        if "turn_ids" in corr_needs and batch.turn_ids is None:
            raise ValueError(f"rl.correction: {self.cfg.correction!r} needs turn_ids on every experience")
        if self.needs_behavior_train_logp and batch.behavior_train_logp is None:
            raise ValueError("the decoupled correction needs the trainer's log-probs at the behaviour version; "
                             "expert/offline traces have none")

    def _micro(self, rows: int) -> int | None:
        """Rows per forward pass for ``rows`` rows; None = one pass (no micro-batching needed)."""
        m = self.micro_batch_size
        return m if m is not None and rows > m else None

    @torch.no_grad()
    def _anchors(self, batch: Batch, ov: dict[str, Any]) -> tuple[torch.Tensor | None, ...]:
        """old_logp (unless the update's own pass gives it), ref_logp and prev_logp (B, T), no grad."""
        micro = self._micro(batch.size)

        def run(policy: Policy | None) -> torch.Tensor | None:
            return None if policy is None else no_grad_logprobs(policy, batch, None, self.temperature, micro)[0]

        old = batch.behavior_logp if self.old_logp_from == "behavior" else None
        if self.old_logp_from == "proximal":
            module = ov.get("proximal")
            old = run(Policy(module, self.policy.tokenizer, self.policy.kind) if module is not None else self.policy)
        return old, run(self.ref_policy), run(self.prev_policy)

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
        return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=self.device)

    def _logprobs(self, batch: Batch, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        """Log-probs and entropies (B, T), and the backward pass that goes with them.

        One pass with a graph when the kept rows fit one micro-batch; otherwise a no-grad pass per
        micro-batch whose result is a leaf (see :func:`accumulate_grads`). With ``rows``, only those
        rows are computed and the others hold the behaviour log-probs (ratio 1; no gradient) and entropy 0.
        """
        micro = self._micro(batch.size if rows is None else rows.numel())
        if micro is None:
            logp, entropy = forward(self.policy, batch, rows, self.temperature, with_entropy=True)
            leaf = None
        else:
            logp, entropy = no_grad_logprobs(self.policy, batch, rows, self.temperature, micro, with_entropy=True)
            leaf = logp.requires_grad_()
        backward = functools.partial(accumulate_grads, policy=self.policy, batch=batch, rows=rows, leaf=leaf,
                                     micro=micro, temperature=self.temperature)
        if rows is None:
            return logp, entropy, backward
        base = batch.behavior_logp if batch.behavior_logp is not None else torch.zeros_like(batch.mask)
        return base.index_copy(0, rows, logp), torch.zeros_like(batch.mask).index_copy(0, rows, entropy), backward

    def _loss(self, batch: Batch, logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, ov: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss (B, T) and its metrics; the loss gets only the inputs it declares."""
        available = {"old_logp": old_logp, "behavior_logp": batch.behavior_logp, "ref_logp": ref_logp,
                     "is_expert": batch.is_expert, "rewards": batch.rewards, "group_index": batch.group_index}
        inputs = {k: v for k, v in available.items() if k in self.needs or (k in self.optional and v is not None)}
        loss_tok, metrics = self.loss_fn(logp=logp, advantages=advantages, mask=batch.mask, **inputs,
                                         **self.cfg.loss_params, **ov["loss_params"])  # (B, T)
        return loss_tok, {f"loss/{k}": v for k, v in metrics.items()}

    def _correct(self, batch: Batch, loss_tok: torch.Tensor, old_logp: torch.Tensor | None,
                 metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token loss × the correction's importance weights (B, T), when ``rl.correction`` is set."""
        if self.corr_fn is None:
            return loss_tok
        extra = {"turn_ids": batch.turn_ids, "behavior_train_logp": batch.behavior_train_logp}
        extra = {k: v for k, v in extra.items() if k in getattr(self.corr_fn, "needs", ())}
        weights, cm = self.corr_fn(old_logp=old_logp, behavior_logp=batch.behavior_logp, mask=batch.mask,
                                   **extra, **self.cfg.correction_params)
        metrics.update({f"correction/{k}": v for k, v in cm.items()})
        return loss_tok * weights

    def _add_kl(self, batch: Batch, loss_tok: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None,
                prev_logp: torch.Tensor | None, ov: dict[str, Any], metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token loss + coef × KL to the reference (B, T); with a KL mix (ReMix's KL-convex term),
        ``lam KL(.||pi_base) + (1 - lam) KL(.||pi_{k-1})``."""
        if self.kl_fn is None:
            return loss_tok
        kl = self.kl_fn(logp, ref_logp) * batch.mask  # (B, T)
        metrics["loss/kl_ref"] = (kl.sum() / batch.mask.sum().clamp(min=1)).detach()
        if prev_logp is not None:
            lam, rest = ov["kl_mix"]
            kl = lam * kl + rest * self.kl_fn(logp, prev_logp) * batch.mask
        return loss_tok + ov.get("kl_coef", self.cfg.kl_coef) * kl

    def _advantages(self, batch: Batch, old_logp: torch.Tensor | None) -> torch.Tensor:
        cfg, keep = self.cfg, None
        extra: dict[str, Any] = {}
        wanted = self.adv_inputs
        if "log_weights" in wanted:
            extra["log_weights"] = ((old_logp - batch.behavior_logp) * batch.mask).sum(-1)  # (B,) sequence IS
        if "token_rewards" in wanted and batch.token_rewards is not None:
            extra["token_rewards"] = batch.token_rewards
        if "response_ids" in wanted:  # padding -> -1, which no token has
            extra["response_ids"] = batch.response_ids.masked_fill(~batch.attention_mask[:, batch.prompt_len:], -1)
        rewards, group_index, mask = batch.rewards, batch.group_index, batch.mask
        if cfg.red_drop:  # (B,) balance negatives per group; drawn on the CPU generator wherever the batch is
            keep = red_drop(rewards.cpu(), group_index.cpu(), self.drop_gen).to(self.device)
            rewards, group_index, mask = rewards[keep], group_index[keep], mask[keep]
            extra = {k: v[keep] for k, v in extra.items()}
        adv = self.adv_fn(rewards=rewards, group_index=group_index, mask=mask, **extra, **cfg.advantage_params)
        if keep is None:
            return adv
        full = torch.zeros_like(batch.mask)
        full[keep] = adv
        return full

    def _step(self, loss: torch.Tensor, backward: Callable,
              metrics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Backward (whole batch or accumulated micro-batches), the finite check, clip, one optimizer step
        (lr × a controller's ``lr_scale``), one scheduler step. A non-finite loss or gradient skips the
        step (see :class:`NonFiniteGuard`); returns the gradient norm and whether the step was skipped."""
        ov = merge_overrides([c.before_step(metrics) for c in self.controllers.values()])
        self.opt.zero_grad(set_to_none=True)
        backward(loss)
        params = [p for p in self.policy.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # grads untouched
        bad = self.guard.check_update(loss, norm, clip)
        if bad is None:
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
            with scaled_lr(self.opt, ov.get("lr_scale", 1.0)):
                self.opt.step()
            if not self.guard.params_finite(params):
                raise TrainingDiverged(f"a parameter became non-finite after optimizer step {self.version + 1} with "
                                       f"finite gradients: rl.optim.lr={self.cfg.optim.lr} (× weight_decay="
                                       f"{self.cfg.optim.weight_decay}) overflows the weights")
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)  # a skipped step's gradients never reach a later one
        self.guard.record(bad)
        return norm.detach(), bad is not None

    def end_rollout_step(self) -> None:
        """Once per rollout step: controllers advance (MDPO's iteration, ReMix's pi_{k-1} and reincarnation)."""
        anchors = {"ref": self.ref_policy, "prev": self.prev_policy}
        for c in self.controllers.values():
            c.on_rollout_step(self.policy, anchors)

    def sampler_params(self) -> dict[str, Any]:
        """Replay-buffer sampling parameters the controllers drive for ``rl.buffer.sampling`` (e.g. ReMix's
        data mix for ``recent_mix``); the runner merges them into the buffer after each rollout step."""
        out: dict[str, Any] = {}
        for c in self.controllers.values():
            out.update(c.sampler_params(self.cfg.buffer.sampling))
        return out

    @torch.no_grad()
    def _diagnostics(self, batch, logp, entropy, advantages, rows=None) -> dict[str, torch.Tensor]:
        """Batch diagnostics. When zero-loss rows were skipped, entropy, ESS, log-ratios and staleness
        describe the rows the update learned from; ``train/active_row_frac`` says what share that was.
        ESS and log-ratios cover the rows with behaviour log-probs, staleness the rows a policy version
        sampled (not expert traces, whose version field means nothing)."""
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
            bmask = mask * batch.has_behavior[:, None].to(mask.dtype)  # (B, T) rows with behaviour log-probs
            log_w = (logp.detach() - batch.behavior_logp) * bmask  # (B, T)
            out["offpolicy/ess"] = ess(log_w.sum(-1), bmask.any(-1).float())
            out["offpolicy/ess_token"] = ess(log_w, bmask)
            out.update({f"offpolicy/log_ratio_{k}": v for k, v in ratio_quantiles(log_w, bmask).items()})
        sampled = mask * (~batch.is_expert)[:, None].to(mask.dtype)  # (B, T) expert traces have no version
        stale = staleness_stats(batch.versions, self.version, sampled)
        out.update({f"offpolicy/staleness_{k}": v for k, v in stale.items()})
        return out

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "version": self.version,
                "drop_gen": self.drop_gen.get_state(), "guard": self.guard.state_dict(),
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
        if "guard" in state:  # checkpoints written before the guard existed have none
            self.guard.load_state_dict(state["guard"])
        for name, c in self.controllers.items():
            c.load_state_dict(state.get("controllers", {})[name])
        for anchor, key in ((self.ref_policy, "ref_model"), (self.prev_policy, "prev_model")):
            if anchor is not None and state.get(key) is not None:
                anchor.model.load_state_dict(state[key])


def check_micro_batching(cfg: RLConfig, policy: Policy) -> int | None:
    """``rl.micro_batch_size`` if valid. The two-pass gradient accumulation recomputes each forward pass,
    so it must be deterministic: active dropout would give the second pass different log-probs."""
    m = cfg.micro_batch_size
    if m is None:
        return None
    if m < 1:
        raise ConfigError(f"rl.micro_batch_size: must be >= 1 (or null for the whole batch), got {m}")
    if has_active_dropout(policy.model):
        raise ConfigError("rl.micro_batch_size: the policy has active dropout, so the recomputed micro-batch "
                          "forward passes would not match; put the model in eval mode or unset micro_batch_size")
    return m


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
    unknown = sorted(set(cfg.controllers) - set(CONTROLLERS))
    if unknown:
        raise ConfigError(f"rl.controllers.{unknown[0]}: unknown controller; valid: {sorted(CONTROLLERS)}")
    if cfg.kl_coef or any("kl_coef" in CONTROLLERS[n].provides for n in cfg.controllers):
        lookup(KL_ESTIMATORS, cfg.kl_estimator, "rl.kl_estimator")
    check_params(loss_fn, cfg.loss_params, "rl.loss_params")
    for name, params in cfg.controllers.items():
        sig = inspect.signature(CONTROLLERS[name].__init__).parameters
        valid = sorted(k for k, p in sig.items() if p.kind is p.KEYWORD_ONLY)
        for key in params or {}:
            if key not in valid:
                raise ConfigError(f"rl.controllers.{name}.{key}: not a parameter of {name}; valid: {valid}")
        drives = CONTROLLERS[name].loss_param
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
    """The stateful controllers named in ``rl.controllers`` (name -> constructor keyword arguments).

    Two controllers may not set the same thing (an override key other than ``loss_params``, or the
    same loss hyperparameter): the second would silently win."""
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}  # what is set -> the controller that sets it
    for name, params in cfg.controllers.items():
        cls = CONTROLLERS.get(name)
        if cls is None:
            raise ConfigError(f"rl.controllers.{name}: unknown controller; valid: {sorted(CONTROLLERS)}")
        for what in [k for k in cls.provides if k != "loss_params"] + ([f"loss_params.{cls.loss_param}"]
                                                                        if cls.loss_param else []):
            if what in owner:
                raise ConfigError(f"rl.controllers.{name}: sets {what}, which {owner[what]} already sets")
            owner[what] = name
        try:
            out[name] = cls.build(dict(params or {}), model=policy.model, steps=cfg.steps)
        except TypeError as e:
            raise ConfigError(f"rl.controllers.{name}: {e}") from None
    if "kl_coef" in owner and cfg.kl_coef:
        raise ConfigError(f"rl.kl_coef: the {owner['kl_coef']} controller sets the KL coefficient; "
                          "leave rl.kl_coef at 0")
    return out


def sft_update(policy: Policy, batch: Batch, opt, sched, grad_clip: float) -> dict[str, torch.Tensor]:
    """One supervised step on expert traces: token-mean negative log-likelihood (the ``sft`` loss)."""
    batch = batch.to(next(iter(policy.parameters())).device)  # no copy when already there
    logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len)
    loss_tok, _ = POLICY_LOSSES["sft"](logp=logp, advantages=torch.zeros_like(logp), mask=batch.mask)
    loss = AGGREGATIONS["token-mean"](loss_tok, batch.mask)
    grad_norm = optimizer_step(policy, loss, opt, sched, grad_clip)
    return {"sft/loss": loss.detach(), "sft/grad_norm": grad_norm, "optim/lr": torch.tensor(sched.get_last_lr()[0])}
