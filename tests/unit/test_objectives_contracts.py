"""Registry contracts, on-policy equivalences and hypothesis property tests over every registered objective."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offpolicy.objectives import (ADVANTAGES, AGGREGATIONS, CORRECTIONS, DIAGNOSTICS, KL_ESTIMATORS,
                                  POLICY_LOSSES)
from offpolicy.objectives.losses import REC_CLIP_MODES, REC_REGULARIZERS, REC_WEIGHTS

OPTIONAL_INPUTS = {"old_logp", "behavior_logp", "ref_logp", "is_expert", "rewards", "group_index"}
TENSOR_INPUTS = OPTIONAL_INPUTS | {"logp", "advantages", "mask"}
D = torch.float64


# ---- registries --------------------------------------------------------------------------------------
@pytest.mark.parametrize("registry,valid", [(POLICY_LOSSES, "ppo_clip"), (ADVANTAGES, "grpo"),
                                            (CORRECTIONS, "tis_token"), (AGGREGATIONS, "token-mean"),
                                            (KL_ESTIMATORS, "k3"), (DIAGNOSTICS, "ess")])
def test_unknown_name_lists_valid_names(registry, valid):
    with pytest.raises(KeyError, match=f"unknown .*'nope'; valid names: .*{valid}"):
        registry["nope"]


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_loss_contract(name):
    fn = POLICY_LOSSES[name]
    assert isinstance(fn.needs, tuple) and set(fn.needs) <= OPTIONAL_INPUTS
    assert set(getattr(fn, "optional", ())) <= OPTIONAL_INPUTS - set(fn.needs)
    assert fn.default_agg in AGGREGATIONS
    assert fn.paper and fn.summary and fn.__doc__
    params = inspect.signature(fn).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), "keyword-only inputs"
    assert {"logp", "advantages", "mask"} <= set(params) and set(fn.needs) <= set(params)
    for n in fn.needs + ("logp", "advantages", "mask"):
        assert params[n].default is inspect.Parameter.empty, f"{n} is required"
    for n in getattr(fn, "optional", ()):
        assert params[n].default is None
    for n, p in params.items():
        if n not in TENSOR_INPUTS:
            assert p.default is not inspect.Parameter.empty, f"hyperparameter {n} needs the paper's default"
            assert isinstance(p.default, (int, float, str, bool, type(None)))


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantage_contract(name):
    fn = ADVANTAGES[name]
    assert fn.paper and fn.summary and fn.__doc__
    params = inspect.signature(fn).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert {"rewards", "group_index", "mask"} <= set(params)
    assert all(p.default is not inspect.Parameter.empty for n, p in params.items()
               if n not in {"rewards", "group_index", "mask"})


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_correction_contract(name):
    fn = CORRECTIONS[name]
    assert fn.paper and fn.summary and fn.__doc__
    params = inspect.signature(fn).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert {"old_logp", "behavior_logp", "mask"} <= set(params)


def test_package_exports():
    import offpolicy.objectives as o
    assert set(o.__all__) == {"POLICY_LOSSES", "ADVANTAGES", "CORRECTIONS", "AGGREGATIONS", "KL_ESTIMATORS",
                              "DIAGNOSTICS"}
    assert {"sft", "reinforce", "ppo_clip", "grpo", "dr_grpo", "rec", "opmd", "asymre"} <= set(POLICY_LOSSES)
    assert {"grpo", "dr_grpo", "rloo", "reinforce"} <= set(ADVANTAGES)
    assert {"tis_token", "tis_seq", "mis_token", "mis_seq", "mis_geo"} <= set(CORRECTIONS)
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"}
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


# ---- equivalences ------------------------------------------------------------------------------------
def grad(name, logp, agg="token-mean", **kw):
    logp = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES[name](logp=logp, **kw)
    AGGREGATIONS[agg](loss, kw["mask"]).backward()
    return logp.grad


def batch(seed, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=D) * 3
    mask = (torch.rand(B, T, generator=g) > 0.25).to(D)
    rewards = torch.randint(0, 2, (B,), generator=g).to(D)
    group = torch.tensor([0, 0, 1, 1])[:B]
    return g, logp, mask, rewards, group


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("seed", range(3))
def test_ppo_clip_on_policy_gradient_equals_reinforce(seed, agg):
    g, logp, mask, rewards, group = batch(seed)
    adv = ADVANTAGES["grpo"](rewards=rewards, group_index=group, mask=mask)
    ppo = grad("ppo_clip", logp, agg, advantages=adv, mask=mask, old_logp=logp.detach().clone())
    rf = grad("reinforce", logp, agg, advantages=adv, mask=mask)
    assert torch.allclose(ppo, rf, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_rec_one_side_is_on_policy_equals_grpo_with_mean_only_advantages(seed):
    g, logp, mask, rewards, group = batch(seed)
    adv = ADVANTAGES["dr_grpo"](rewards=rewards, group_index=group, mask=mask)
    agg = POLICY_LOSSES["grpo"].default_agg
    grpo = grad("grpo", logp, agg, advantages=adv, mask=mask, old_logp=logp.detach().clone())
    rec = grad("rec", logp, agg, advantages=adv, mask=mask, old_logp=logp.detach().clone(),
               clip_mode="one-side", weight="importance_sampling")
    assert torch.allclose(grpo, rec, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_rec_one_side_is_off_policy_gradient_equals_ppo_clip(seed):
    # the one-side mask is exactly PPO's "not clipped" set and w = ρ is PPO's ratio: same gradient off-policy too
    g, logp, mask, _, _ = batch(seed)
    old = logp + torch.randn(logp.shape, generator=g, dtype=D) * 0.5  # ratios spread around 1
    adv = torch.randn(logp.shape, generator=g, dtype=D)
    ppo = grad("ppo_clip", logp, advantages=adv, mask=mask, old_logp=old)
    rec = grad("rec", logp, advantages=adv, mask=mask, old_logp=old, weight="importance_sampling")
    assert torch.allclose(ppo, rec, atol=1e-12)
    assert (ppo == 0).any() and (ppo != 0).any()  # the clip was active on some tokens, not all


@pytest.mark.parametrize("seed", range(2))
def test_rec_none_none_is_reinforce_at_any_staleness(seed):
    g, logp, mask, _, _ = batch(seed)
    adv = torch.randn(logp.shape, generator=g, dtype=D)
    old = logp + torch.randn(logp.shape, generator=g, dtype=D) * 5
    a = grad("rec", logp, advantages=adv, mask=mask, old_logp=old, clip_mode="none")
    b = grad("reinforce", logp, advantages=adv, mask=mask)
    assert torch.allclose(a, b)


def test_rloo_is_scaled_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0])
    group = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.ones(5, 2)
    r = ADVANTAGES["rloo"](rewards=rewards, group_index=group, mask=mask)
    d = ADVANTAGES["dr_grpo"](rewards=rewards, group_index=group, mask=mask)
    n = torch.tensor([3.0, 3, 3, 2, 2])[:, None]
    assert torch.allclose(r, d * n / (n - 1))


# ---- hypothesis properties ---------------------------------------------------------------------------
LOGP = st.floats(-50.0, 0.0, allow_nan=False, width=32)  # log-ratios between two of these span ±50
ADV = st.floats(-10.0, 10.0, allow_nan=False, width=32)


@st.composite
def loss_batches(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 5))

    def mat(elems):
        return torch.tensor(draw(st.lists(st.lists(elems, min_size=T, max_size=T), min_size=B, max_size=B)))

    mask = mat(st.sampled_from([0.0, 1.0]))
    if draw(st.booleans()):
        mask[draw(st.integers(0, B - 1))] = 0.0  # an all-masked row
    if draw(st.integers(0, 9)) == 0:
        mask.zero_()  # an all-masked batch
    return {"logp": mat(LOGP), "old_logp": mat(LOGP), "ref_logp": mat(LOGP), "behavior_logp": mat(LOGP),
            "advantages": mat(ADV) * mask, "mask": mask,
            "is_expert": torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B))),
            "rewards": mat(ADV)[:, 0],
            "group_index": torch.tensor(draw(st.lists(st.integers(0, 1), min_size=B, max_size=B)))}


def check_loss_finite(name, data, **hp):
    fn = POLICY_LOSSES[name]
    logp = data["logp"].clone().requires_grad_(True)
    kw = {k: data[k] for k in fn.needs + getattr(fn, "optional", ())}
    loss, metrics = fn(logp=logp, advantages=data["advantages"], mask=data["mask"], **kw, **hp)
    assert loss.shape == logp.shape and torch.isfinite(loss).all()
    assert torch.equal(loss.detach() * (1 - data["mask"]), torch.zeros_like(loss))
    total = sum(agg(loss, data["mask"], max_len=8) for agg in AGGREGATIONS.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad * (1 - data["mask"]), torch.zeros_like(logp.grad))
    for k, v in metrics.items():
        assert v.ndim == 0 and not v.requires_grad and torch.isfinite(v), k


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@FAST
@given(data=loss_batches())
def test_every_loss_finite_for_extreme_log_ratios_and_empty_masks(name, data):
    check_loss_finite(name, data)


@FAST
@given(data=loss_batches(), mode=st.sampled_from(REC_CLIP_MODES), weight=st.sampled_from(REC_WEIGHTS),
       reg=st.sampled_from(REC_REGULARIZERS))
def test_rec_every_configuration_finite(data, mode, weight, reg):
    check_loss_finite("rec", data, clip_mode=mode, weight=weight, regularizer=reg)


VARIANTS = [("ppo_clip", {"dual_clip": 3.0}), ("dapo", {"dual_clip": 10.0}), ("ctpo", {"mode": "geomean"}),
            ("topr", {"ratio_level": "geometric"}), ("topr", {"ratio_level": "token"}),
            ("cispo", {"mask_clipped": True}), ("decoupled_ppo", {"behav_imp_weight_cap": 5.0, "dual_clip": 3.0}),
            ("chord", {"phi": False, "mu": 0.7}), ("clip_cov", {"clip_cov_lb": -1e9, "clip_cov_ub": 1e9,
                                                               "clip_cov_ratio": 0.5, "seed": 1}),
            ("kl_cov", {"kl_cov_ratio": 0.5}), ("m2po", {"m2_threshold": 0.0}), ("grpo", {"kl_coef": 1.0}),
            ("bapo", {"rho_target": 0.99}), ("bapo", {"rho_denominator": "abs_sum"}), ("opmd", {"penalty": "token"}), ("dpo", {"pairing": "all"}), ("mdpo", {"kl_coef": 10.0}),
            ("vcpo", {"tis_cap": 2.0, "clip_low": 0.2, "clip_high": 0.2}), ("copg", {"beta": 1.0})]


@pytest.mark.parametrize("name,hp", VARIANTS, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in VARIANTS])
@FAST
@given(data=loss_batches())
def test_loss_variants_finite(name, hp, data):
    check_loss_finite(name, data, **hp)


ZERO_ROW_CASES = [(n, {}) for n in sorted(POLICY_LOSSES) if getattr(POLICY_LOSSES[n], "zero_rows", None)] + [
    ("topr", {"neg_low": 0.0, "neg_high": 0.0}), ("topr", {"pos_low": 0.0, "pos_high": 0.0}),
    ("topr", {"neg_low": 0.0, "neg_high": 0.0, "ratio_level": "token"})]


@pytest.mark.parametrize("name,hp", ZERO_ROW_CASES, ids=[f"{n}-{h}" for n, h in ZERO_ROW_CASES])
@FAST
@given(data=loss_batches(), zero_adv_rows=st.lists(st.booleans(), min_size=4, max_size=4))
def test_zero_rows_have_zero_loss_and_gradient_for_any_logprobs(name, hp, data, zero_adv_rows):
    """A row a loss's ``zero_rows`` names must contribute exactly nothing, whatever the log-probs: the
    learner skips it (``rl.skip_zero_rows``), so naming a contributing row would silently change training."""
    fn = POLICY_LOSSES[name]
    adv = data["advantages"].clone()
    adv[torch.tensor(zero_adv_rows[: adv.shape[0]])] = 0.0
    zero = fn.zero_rows(adv, data["mask"], **hp)
    assert zero.shape == (adv.shape[0],) and zero.dtype == torch.bool
    assert zero[torch.tensor(zero_adv_rows[: adv.shape[0]])].all()  # Â = 0 rows are always zero rows
    logp = data["logp"].clone().requires_grad_(True)
    kw = {k: data[k] for k in fn.needs + getattr(fn, "optional", ())}
    loss, _ = fn(logp=logp, advantages=adv, mask=data["mask"], **kw, **hp)
    loss.sum().backward()
    assert torch.equal(loss.detach()[zero], torch.zeros_like(loss[zero]))
    assert torch.equal(logp.grad[zero], torch.zeros_like(logp.grad[zero]))


def test_psr_names_exactly_the_negative_rows():
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0], [2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    zero_rows = POLICY_LOSSES["topr"].zero_rows
    assert zero_rows(adv, mask, neg_low=0.0, neg_high=0.0).tolist() == [False, True, True, False]
    assert zero_rows(adv, mask).tolist() == [False, False, True, False]  # canonical TOPR: negatives count


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@FAST
@given(rewards=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8),
       seed=st.integers(0, 2**16))
def test_advantages_finite_masked_and_centred(name, rewards, seed):
    g = torch.Generator().manual_seed(seed)
    B = len(rewards)
    group = torch.randint(0, 3, (B,), generator=g)
    mask = (torch.rand(B, 4, generator=g) > 0.3).float()
    need = getattr(ADVANTAGES[name], "needs", ())
    extra = {"values": torch.randn(B, 4, generator=g) * 100} if "values" in need else {}
    if "response_ids" in need:  # few distinct tokens, so the group's responses share prefixes
        extra["response_ids"] = torch.randint(0, 2, (B, 4), generator=g).masked_fill(mask == 0, -1)
    a = ADVANTAGES[name](rewards=torch.tensor(rewards), group_index=group, mask=mask, **extra)
    assert a.shape == (B, 4) and torch.isfinite(a).all()
    assert torch.equal(a * (1 - mask), torch.zeros_like(a))
    if name in ("grpo", "dr_grpo", "rloo"):
        seq_adv = ADVANTAGES[name](rewards=torch.tensor(rewards), group_index=group, mask=torch.ones(B, 1))[:, 0]
        for gid in group.unique():  # group-relative advantages sum to 0 within each group
            sel = group == gid
            scale = max(1.0, float(torch.tensor(rewards)[sel].abs().max()))
            assert abs(float(seq_adv[sel].sum())) <= 1e-3 * scale * int(sel.sum())
            if int(sel.sum()) == 1:
                assert float(seq_adv[sel]) == 0.0  # singleton: no baseline, no signal


@FAST
@given(rewards=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8),
       log_w=st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=8, max_size=8),
       norms=st.lists(st.floats(0, 1e3, allow_nan=False, width=32), min_size=8, max_size=8),
       seed=st.integers(0, 2**16))
def test_optimal_baseline_finite_with_extreme_weights_and_zero_norms(rewards, log_w, norms, seed):
    g = torch.Generator().manual_seed(seed)
    B = len(rewards)
    group = torch.randint(0, 3, (B,), generator=g)
    mask = (torch.rand(B, 4, generator=g) > 0.3).float()
    a = ADVANTAGES["optimal_baseline"](rewards=torch.tensor(rewards), group_index=group, mask=mask,
                                       log_weights=torch.tensor(log_w[:B]), grad_norms=torch.tensor(norms[:B]))
    assert torch.isfinite(a).all() and torch.equal(a * (1 - mask), torch.zeros_like(a))


def correction_extras(name, data):
    """The extra inputs a correction declares in ``needs``: turn ids (two tokens per turn), old logits."""
    need = getattr(CORRECTIONS[name], "needs", ())
    out = {}
    if "turn_ids" in need:
        T = data["mask"].shape[-1]
        out["turn_ids"] = (torch.arange(T) // 2).expand_as(data["mask"])
    if "behavior_train_logp" in need:
        out["behavior_train_logp"] = data["ref_logp"]  # another ±50 matrix: both factors extreme
    return out


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
@FAST
@given(data=loss_batches())
def test_corrections_finite_nonnegative_and_masked(name, data):
    w, metrics = CORRECTIONS[name](old_logp=data["old_logp"], behavior_logp=data["behavior_logp"], mask=data["mask"],
                                   **correction_extras(name, data))
    assert torch.isfinite(w).all() and (w >= 0).all() and not w.requires_grad
    assert torch.equal(w * (1 - data["mask"]), torch.zeros_like(w))
    if name.startswith("tis"):
        assert (w <= 2.0 + 1e-6).all()
    for v in metrics.values():
        assert torch.isfinite(v)


@FAST
@given(data=loss_batches())
def test_diagnostics_finite(data):
    from offpolicy.objectives.diagnostics import ess, ratio_quantiles
    lw = data["logp"] - data["old_logp"]
    e = ess(lw, data["mask"])
    assert 0 < e.item() <= 1
    assert all(torch.isfinite(v) for v in ratio_quantiles(lw, data["mask"]).values())


def test_every_registered_name_is_documented():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "algorithms.md").read_text()
    for registry in (POLICY_LOSSES, ADVANTAGES, CORRECTIONS, AGGREGATIONS):
        for name in registry:
            assert f"`{name}`" in doc, f"{registry.kind} {name!r} has no row in docs/algorithms.md"
