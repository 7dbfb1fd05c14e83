"""Micro-batching with gradient accumulation: the accumulated gradient equals the whole batch's.

For every registered loss and every aggregation, ``rl.micro_batch_size`` = 1 and 3 give the same
parameter gradients (to 2e-6 of the largest entry; the log-probs are float32) as one whole-batch
pass, including losses with batch-wide statistics or selections (M2PO's second-moment masking,
Clip-Cov / KL-Cov, BAPO's bounds, group baselines).
"""

from __future__ import annotations

import pytest
import torch

from offpolicy.config import ConfigError, OptimConfig, RLConfig
from offpolicy.objectives import AGGREGATIONS, POLICY_LOSSES
from offpolicy.train.learner import Learner

from test_learner import rollout_batch

MICRO = (1, 3)
# hyperparameters that make a loss's batch-wide selection active (or deterministic) on the tiny batch
PARAMS = {"clip_cov": {"seed": 0, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9, "clip_cov_ratio": 0.3},
          "kl_cov": {"kl_cov_ratio": 0.3}}


def small_batch(policy, *, expert_rows: int = 0, shift: float = -0.3):
    """Sampled groups with distinct rewards (``test_learner.rollout_batch``) whose behaviour log-probs are
    moved by a different amount on every token (up to ``shift``), so ratios and M2PO's log-ratios² vary,
    and optionally expert traces without behaviour log-probs."""
    batch = rollout_batch(policy, expert_rows=expert_rows)
    noise = shift * torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    batch.behavior_logp = batch.behavior_logp + noise * batch.has_behavior[:, None]
    return batch


def step_grads(policy, batch, **cfg):
    """The parameter gradients the optimizer receives in one update, and the update's metrics."""
    cfg.setdefault("optim", OptimConfig(lr=1e-2, grad_clip=0.0))  # the raw gradients, not clipped ones
    learner = Learner(policy.copy(requires_grad=True), RLConfig(**cfg), total_updates=1)
    grads = []
    learner.opt.register_step_pre_hook(
        lambda opt, args, kwargs: grads.extend(p.grad.clone() for g in opt.param_groups for p in g["params"]))
    metrics = learner.update(batch)
    return grads, metrics


def assert_same_grads(a, b, rtol=2e-6):
    """Equal to ``rtol`` × the largest gradient entry. ``Policy.response_logprobs`` computes log-probs in
    float32 whatever the model's dtype, and one pass and several sum in different orders: the measured
    worst case over every loss × aggregation is ~5e-7 relative (1.2e-6 absolute for entries up to ~2.4);
    a wrong accumulation (one micro-batch's g off by 1e-4) is far outside."""
    assert len(a) == len(b)
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.abs().max()) for y in b)
    assert worst <= rtol * max(scale, 1.0), f"max |Δgrad| = {worst:.3g} for max |grad| = {scale:.3g}"


def loss_case(name):
    fn = POLICY_LOSSES[name]
    expert = 2 if "is_expert" in fn.needs else 0  # LUFFY / CHORD mix expert rows themselves
    return expert, dict(PARAMS.get(name, {}))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_micro_batches_accumulate_the_whole_batch_gradient_for_every_loss_and_aggregation(tiny_policy, name):
    expert, params = loss_case(name)
    batch = small_batch(tiny_policy, expert_rows=expert)
    for agg in sorted(AGGREGATIONS):
        cfg = dict(loss=name, loss_params=params, aggregation=agg, skip_zero_rows=False)
        whole, m_whole = step_grads(tiny_policy, batch, **cfg)
        assert any(float(g.abs().max()) > 0 for g in whole), f"{name}/{agg}: no gradient to compare"
        for micro in MICRO:
            grads, m = step_grads(tiny_policy, batch, micro_batch_size=micro, **cfg)
            assert_same_grads(grads, whole)
            for key in ("loss/policy", "loss/grad_norm"):
                assert m[key].item() == pytest.approx(m_whole[key].item(), rel=1e-5, abs=1e-7), (agg, micro, key)


@pytest.mark.parametrize("threshold", [0.04, 1e-4])
def test_m2po_batch_wide_masking_is_computed_over_the_whole_update(tiny_policy, threshold):
    """M2PO masks the tokens with the largest log-ratio² until the batch's second moment is below the
    threshold: a selection over the whole batch, which per-micro-batch losses would get wrong."""
    batch = small_batch(tiny_policy, shift=-1.5)
    whole, m_whole = step_grads(tiny_policy, batch, loss="m2po", loss_params={"m2_threshold": threshold})
    masked = [v for k, v in m_whole.items() if "mask" in k and "frac" in k]
    assert masked and 0 < masked[0].item() < 1, m_whole  # the selection is active, not all-or-nothing
    for micro in MICRO:
        grads, m = step_grads(tiny_policy, batch, loss="m2po", loss_params={"m2_threshold": threshold},
                              micro_batch_size=micro)
        assert_same_grads(grads, whole)
        for k in masked and [k for k in m_whole if "mask" in k]:
            assert m[k].item() == pytest.approx(m_whole[k].item())


@pytest.mark.parametrize("cfg", [
    dict(loss="reinforce", kl_coef=0.1),  # reference anchor, micro-batched, KL on the whole batch
    dict(loss="ppo_clip", correction="tis_token"),
    dict(loss="decoupled_ppo", controllers={"ewma_proximal": {"decay": 0.5}}),  # proximal pass micro-batched
    dict(loss="remix_ppg", kl_coef=0.05, controllers={"remix": {}}),  # previous-policy anchor too
    dict(loss="vcpo", controllers={"vcpo_lr": {}}),
    dict(loss="ppo_clip", advantage="optimal_baseline"),  # advantages read old_logp (a separate pass)
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "controllers") + str(list(c.get("controllers", {}))))
def test_micro_batching_with_anchors_corrections_and_controllers(tiny_policy, cfg):
    batch = small_batch(tiny_policy)
    whole, m_whole = step_grads(tiny_policy, batch, **cfg)
    for micro in MICRO:
        grads, m = step_grads(tiny_policy, batch, micro_batch_size=micro, **cfg)
        assert_same_grads(grads, whole)
        assert set(m) == set(m_whole)


@pytest.mark.parametrize("micro", [1, 3, 100])
def test_micro_batching_after_zero_row_skipping(tiny_policy, monkeypatch, micro):
    """Rows filter first, then the kept rows are micro-batched: no forward pass sees a skipped row or
    more than ``micro`` rows, and the gradient is the full batch's."""
    batch = small_batch(tiny_policy)
    psr = {"neg_low": 0.0, "neg_high": 0.0}  # TOPR without negatives: negative rows are exactly zero
    full, _ = step_grads(tiny_policy, batch, loss="topr", loss_params=psr, skip_zero_rows=False)
    seen = []
    original = type(tiny_policy).response_logprobs

    def counting(self, input_ids, *args, **kwargs):
        seen.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(tiny_policy), "response_logprobs", counting)
    grads, m = step_grads(tiny_policy, batch, loss="topr", loss_params=psr, micro_batch_size=micro)
    kept = round(m["train/active_row_frac"].item() * batch.size)
    assert 0 < kept < batch.size
    assert max(seen) <= min(micro, kept)
    assert sum(seen) == (kept if micro >= kept else 2 * kept)  # one pass, or no-grad pass + grad pass
    assert_same_grads(grads, full)


def test_micro_batching_is_a_single_pass_when_the_batch_fits(tiny_policy, monkeypatch):
    batch = small_batch(tiny_policy)
    calls = []
    original = type(tiny_policy).response_logprobs
    monkeypatch.setattr(type(tiny_policy), "response_logprobs",
                        lambda self, *a, **k: calls.append(a[0].shape[0]) or original(self, *a, **k))
    step_grads(tiny_policy, batch, loss="ppo_clip", micro_batch_size=batch.size)
    assert calls == [batch.size]


def test_micro_batch_size_is_checked(tiny_policy):
    with pytest.raises(ValueError, match="micro_batch_size"):  # ConfigError here, or the config's own bound
        Learner(tiny_policy, RLConfig(micro_batch_size=0), total_updates=1)
    model = tiny_policy.model
    model.add_module("drop", torch.nn.Dropout(0.1))  # active dropout: recomputed passes would differ
    with pytest.raises(ConfigError, match="rl.micro_batch_size.*dropout"):
        Learner(tiny_policy, RLConfig(micro_batch_size=2), total_updates=1)
