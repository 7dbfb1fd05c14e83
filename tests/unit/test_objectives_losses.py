"""Hand-computed values and gradients of every policy loss (torchtune style: the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import AGGREGATIONS, POLICY_LOSSES
from offpolicy.objectives.kl import k3

L = math.log
D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def run(name, logp, **kw):
    """Call a loss with a leaf copy of ``logp``; return (loss_tok, metrics, d(sum loss)/d logp)."""
    logp = logp.clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES[name](logp=logp, **kw)
    loss.sum().backward()
    return loss.detach(), metrics, logp.grad


# ---- sft / reinforce -------------------------------------------------------------------------------
def test_sft_is_negative_log_likelihood():
    logp = t([-0.5, -1.5, -9.0])
    mask = t([1, 1, 0])
    loss, m, g = run("sft", logp, advantages=torch.zeros_like(logp), mask=mask)
    # −ℓ on valid tokens: [0.5, 1.5], padding 0
    assert torch.allclose(loss, t([0.5, 1.5, 0.0]))
    assert torch.allclose(m["nll"], torch.tensor(1.0, dtype=D))  # (0.5 + 1.5) / 2
    assert torch.allclose(g, t([-1.0, -1.0, 0.0]))  # d(−ℓ)/dℓ = −1, 0 on padding


def test_reinforce_values_and_gradient():
    logp = t([-1.0, -2.0, -3.0])
    adv = t([2.0, -1.0, 5.0])
    mask = t([1, 1, 0])
    loss, m, g = run("reinforce", logp, advantages=adv, mask=mask)
    # −Â·ℓ: −2·(−1) = 2, −(−1)·(−2) = −2, padding 0
    assert torch.allclose(loss, t([2.0, -2.0, 0.0]))
    assert torch.allclose(g, t([-2.0, 1.0, 0.0]))  # −Â
    assert m == {}


# ---- ppo_clip ----------------------------------------------------------------------------------------
# four tokens, ℓ^old = 0 so r = exp(ℓ):
#   t0: r = 1.5, Â = +1 → pg1 = −1.5, pg2 = −1.2 → max −1.2 (clipped high, no grad)
#   t1: r = 0.5, Â = −1 → pg1 = 0.5,  pg2 = 0.8  → max 0.8  (clipped low, no grad)
#   t2: r = 1.1, Â = +1 → pg1 = −1.1, pg2 = −1.1 → −1.1     (inside, grad −Â r = −1.1)
#   t3: r = 4.0, Â = −1 → pg1 = 4.0,  pg2 = 1.2  → 4.0      (unbounded for Â < 0, grad −Â r = 4)
#   t4: padding with log-ratio 100 → loss 0, grad 0
PPO_LOGP = t([L(1.5), L(0.5), L(1.1), L(4.0), 50.0])
PPO_OLD = t([0.0, 0.0, 0.0, 0.0, -50.0])
PPO_ADV = t([1.0, -1.0, 1.0, -1.0, 1.0])
PPO_MASK = t([1, 1, 1, 1, 0])


def test_ppo_clip_values_gradient_and_metrics():
    loss, m, g = run("ppo_clip", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD)
    assert torch.allclose(loss, t([-1.2, 0.8, -1.1, 4.0, 0.0]))
    assert torch.allclose(g, t([0.0, 0.0, -1.1, 4.0, 0.0]))
    assert m["clip_frac_high"].item() == pytest.approx(0.25)  # t0
    assert m["clip_frac_low"].item() == pytest.approx(0.25)  # t1
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 4.0) / 4)  # padding excluded
    assert m["ratio_max"].item() == pytest.approx(4.0)
    # approx_kl = mean of (r − 1 − log r)
    kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 4.0)) / 4
    assert m["approx_kl"].item() == pytest.approx(kl)
    for v in m.values():
        assert v.ndim == 0 and not v.requires_grad


def test_ppo_clip_dual_clip_caps_negative_advantage_tokens():
    loss, m, g = run("ppo_clip", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD, dual_clip=3.0)
    # t3: Â = −1, loss 4.0 > −c·Â = 3 → capped at 3, grad 0; other tokens unchanged
    assert torch.allclose(loss, t([-1.2, 0.8, -1.1, 3.0, 0.0]))
    assert torch.allclose(g, t([0.0, 0.0, -1.1, 0.0, 0.0]))
    assert m["clip_frac_dual"].item() == pytest.approx(0.25)


def test_ppo_clip_asymmetric_bounds():
    # r = 1.25, Â = +1: clip_high 0.2 → −1.2 (clipped); clip_high 0.3 → −1.25 (inside)
    logp, old, adv, mask = t([L(1.25)]), t([0.0]), t([1.0]), t([1.0])
    lo, _, _ = run("ppo_clip", logp, advantages=adv, mask=mask, old_logp=old)
    hi, _, _ = run("ppo_clip", logp, advantages=adv, mask=mask, old_logp=old, clip_high=0.3)
    assert lo.item() == pytest.approx(-1.2) and hi.item() == pytest.approx(-1.25)
    # r = 0.7, Â = −1: clip_low 0.2 → 0.8 (clipped); clip_low 0.4 → 0.7 (inside)
    logp, adv = t([L(0.7)]), t([-1.0])
    a, _, _ = run("ppo_clip", logp, advantages=adv, mask=mask, old_logp=old)
    b, _, _ = run("ppo_clip", logp, advantages=adv, mask=mask, old_logp=old, clip_low=0.4)
    assert a.item() == pytest.approx(0.8) and b.item() == pytest.approx(0.7)


def test_ppo_clip_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="dual_clip"):
        POLICY_LOSSES["ppo_clip"](logp=PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        POLICY_LOSSES["ppo_clip"](logp=PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD, clip_low=1.5)


# ---- grpo / dr_grpo / dapo ---------------------------------------------------------------------------
def test_grpo_adds_k3_kl_to_reference():
    # on-policy: r = 1, Â = 1 → clipped part −1, grad −1
    # ref: δ = ℓ_ref − ℓ = log 0.25 − log 0.5 = log 0.5 → D = 0.5 + 0.693147 − 1 = 0.193147
    # loss = −1 + 0.04 · 0.193147 = −0.992274; dD/dℓ = 1 − e^δ = 0.5 → grad = −1 + 0.04·0.5 = −0.98
    logp = t([L(0.5)])
    loss, m, g = run("grpo", logp, advantages=t([1.0]), mask=t([1.0]), old_logp=logp.clone(), ref_logp=t([L(0.25)]))
    assert loss.item() == pytest.approx(-1 + 0.04 * (0.5 + math.log(2) - 1))
    assert g.item() == pytest.approx(-0.98)
    assert m["kl_ref"].item() == pytest.approx(0.5 + math.log(2) - 1)


def test_grpo_without_reference_or_with_zero_coef_is_ppo_clip():
    ppo, _, gp = run("ppo_clip", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD)
    no_ref, m, g1 = run("grpo", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD)
    zero, _, g2 = run("grpo", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD,
                      ref_logp=PPO_LOGP - 1, kl_coef=0.0)
    assert torch.equal(ppo, no_ref) and torch.equal(ppo, zero)
    assert torch.equal(gp, g1) and torch.equal(gp, g2)
    assert "kl_ref" not in m


def test_grpo_kl_matches_ppo_clip_plus_k3():
    torch.manual_seed(0)
    logp, old, ref = torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D)
    adv, mask = torch.randn(3, 5, dtype=D), (torch.rand(3, 5) > 0.3).to(D)
    g, _ = POLICY_LOSSES["grpo"](logp=logp, advantages=adv, mask=mask, old_logp=old, ref_logp=ref, kl_coef=0.1)
    p, _ = POLICY_LOSSES["ppo_clip"](logp=logp, advantages=adv, mask=mask, old_logp=old)
    assert torch.allclose(g, (p + 0.1 * k3(logp, ref)) * mask)


def test_registration_attributes_of_baselines():
    assert POLICY_LOSSES["grpo"].default_agg == "seq-mean-token-mean"
    assert POLICY_LOSSES["grpo"].needs == ("old_logp",) and POLICY_LOSSES["grpo"].optional == ("ref_logp",)
    assert POLICY_LOSSES["dr_grpo"].default_agg == "seq-mean-token-sum-norm"
    assert POLICY_LOSSES["dapo"].default_agg == "token-mean"
    assert POLICY_LOSSES["ppo_clip"].needs == ("old_logp",)
    assert POLICY_LOSSES["sft"].needs == () and POLICY_LOSSES["reinforce"].needs == ()
    assert POLICY_LOSSES["asymre"].needs == () and POLICY_LOSSES["opmd"].needs == ("old_logp",)


def test_dr_grpo_token_loss_is_ppo_clip():
    a, _, ga = run("dr_grpo", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD)
    b, _, gb = run("ppo_clip", PPO_LOGP, advantages=PPO_ADV, mask=PPO_MASK, old_logp=PPO_OLD)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_dapo_clip_higher():
    # r = 1.25, Â = +1: inside DAPO's [0.8, 1.28] → loss −1.25, grad −1.25
    # r = 1.5,  Â = +1: clipped at 1.28 → −1.28, grad 0
    logp = t([L(1.25), L(1.5)])
    loss, m, g = run("dapo", logp, advantages=t([1.0, 1.0]), mask=t([1, 1]), old_logp=t([0.0, 0.0]))
    assert torch.allclose(loss, t([-1.25, -1.28]))
    assert torch.allclose(g, t([-1.25, 0.0]))
    assert m["clip_frac_high"].item() == pytest.approx(0.5)


# ---- REC family --------------------------------------------------------------------------------------
# seven tokens with ℓ^old = 0, so ρ = exp(ℓ) and ℓ = log ρ:
#   (ρ, Â):   t0 (1.5,+1) t1 (1.5,−1) t2 (0.5,+1) t3 (0.5,−1) t4 (1.0,+1) t5 (0.3,+1) t6 (3.5,−1)
# one-side  M = [0,1,1,0,1,1,1]   (Â≥0 keeps ρ ≤ 1.2; Â≤0 keeps ρ ≥ 0.8)
# two-side  M = [0,0,0,0,1,0,0]   (0.8 ≤ ρ ≤ 1.2)
# ring      M = [0,0,0,0,1,1,1]   (two-side ∪ Â≥0&ρ≤0.4 (t5) ∪ Â≤0&ρ≥3.0 (t6))
REC_RHO = [1.5, 1.5, 0.5, 0.5, 1.0, 0.3, 3.5]
REC_LOGP = t([L(r) for r in REC_RHO])
REC_OLD = torch.zeros(1, 7, dtype=D)
REC_ADV = t([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0])
REC_MASK = torch.ones(1, 7, dtype=D)
MASKS = {"none": [1] * 7, "one-side": [0, 1, 1, 0, 1, 1, 1], "two-side": [0, 0, 0, 0, 1, 0, 0],
         "ring": [0, 0, 0, 0, 1, 1, 1]}


@pytest.mark.parametrize("mode", sorted(MASKS))
def test_rec_clip_modes_no_is(mode):
    loss, m, g = run("rec", REC_LOGP, advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD, clip_mode=mode)
    M = t(MASKS[mode])
    # L = −Â·M·ℓ (ρ only masks); e.g. one-side t1: −(−1)·1·log 1.5 = 0.405465
    assert torch.allclose(loss, -REC_ADV * M * REC_LOGP)
    assert torch.allclose(g, -REC_ADV * M)  # gradient −Â·M
    assert m["clip_frac"].item() == pytest.approx(1 - sum(MASKS[mode]) / 7)


def test_rec_one_side_no_is_worked_example():
    loss, _, _ = run("rec", REC_LOGP, advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD)  # defaults
    # [0, log1.5, −log0.5, 0, 0, −log0.3, log3.5] = [0, 0.405465, 0.693147, 0, 0, 1.203973, 1.252763]
    assert torch.allclose(loss, t([0, 0.405465, 0.693147, 0, 0, 1.203973, 1.252763]), atol=1e-6)


def test_rec_weights():
    rho = t(REC_RHO)
    kw = dict(advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD, clip_mode="none")
    _, _, g = run("rec", REC_LOGP, weight="importance_sampling", **kw)
    assert torch.allclose(g, -REC_ADV * rho)  # w = ρ: [−1.5, 1.5, −0.5, 0.5, −1, −0.3, 3.5]
    _, _, g = run("rec", REC_LOGP, weight="truncated_is", **kw)
    # w = clip(ρ, 1 − 0.6, 1 + 2.0) = clip(ρ, 0.4, 3.0): [1.5, 1.5, 0.5, 0.5, 1.0, 0.4, 3.0]
    assert torch.allclose(g, -REC_ADV * t([1.5, 1.5, 0.5, 0.5, 1.0, 0.4, 3.0]))
    _, _, g = run("rec", REC_LOGP, weight="advantage", temp=2.0, **kw)
    assert torch.allclose(g, -REC_ADV * torch.exp(REC_ADV / 2.0))  # w = exp(Â/τ): e^{±0.5}


def test_rec_regularizers():
    kw = dict(advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD, clip_mode="none")
    base, _, gb = run("rec", REC_LOGP, **kw)
    k2, _, gk = run("rec", REC_LOGP, regularizer="k2", regularizer_coef=0.5, **kw)
    # + τ (ℓ − ℓ_old)² = 0.5 ℓ²; gradient + 2·0.5·ℓ = ℓ
    assert torch.allclose(k2, base + 0.5 * REC_LOGP**2) and torch.allclose(gk, gb + REC_LOGP)
    fk, _, gf = run("rec", REC_LOGP, regularizer="forward-kl", regularizer_coef=0.5, **kw)
    # − τ ℓ; gradient − τ
    assert torch.allclose(fk, base - 0.5 * REC_LOGP) and torch.allclose(gf, gb - 0.5)


def test_rec_regularizer_applies_to_clipped_tokens_too():
    # Trinity adds Reg on every valid token, independent of M: t0 is masked by one-side (M = 0)
    loss, _, g = run("rec", REC_LOGP, advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD,
                     regularizer="k2", regularizer_coef=1.0)
    assert loss[0, 0].item() == pytest.approx(L(1.5) ** 2)
    assert g[0, 0].item() == pytest.approx(2 * L(1.5))


def test_rec_gspo_one_side_uses_length_normalised_sequence_ratio():
    # row 0: log-ratios [log1.5, log1.5] → s = 1.5 > 1.2, Â = +1 → whole row masked
    # row 1: log-ratios [log1.5, log0.5] → mean −0.143841 → s = 0.866 ≤ 1.2 → kept
    logp = t([L(1.5), L(1.5)], [L(1.5), L(0.5)])
    old, adv, mask = torch.zeros(2, 2, dtype=D), torch.ones(2, 2, dtype=D), torch.ones(2, 2, dtype=D)
    _, m, g = run("rec", logp, advantages=adv, mask=mask, old_logp=old, clip_mode="gspo-one-side")
    assert torch.allclose(g, t([0.0, 0.0], [-1.0, -1.0]))
    assert m["clip_frac"].item() == pytest.approx(0.5)
    _, _, g = run("rec", logp, advantages=adv, mask=mask, old_logp=old, clip_mode="gspo-one-side",
                  weight="gspo_importance_sampling")
    s = math.exp((L(1.5) + L(0.5)) / 2)  # 0.866025
    assert torch.allclose(g, t([0.0, 0.0], [-s, -s]))


def test_rec_rejects_unknown_modes():
    with pytest.raises(ValueError, match="clip_mode='sideways'; valid"):
        POLICY_LOSSES["rec"](logp=REC_LOGP, advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD, clip_mode="sideways")
    with pytest.raises(ValueError, match="weight"):
        POLICY_LOSSES["rec"](logp=REC_LOGP, advantages=REC_ADV, mask=REC_MASK, old_logp=REC_OLD, weight="x")


def test_opmd_and_asymre_are_rec_presets():
    kw = dict(advantages=REC_ADV, mask=REC_MASK)
    opmd, _, g1 = run("opmd", REC_LOGP, old_logp=REC_OLD - 0.1, penalty="token", **kw)
    ref, _, g2 = run("rec", REC_LOGP, old_logp=REC_OLD - 0.1, clip_mode="none", weight="none", regularizer="k2",
                     regularizer_coef=0.1, **kw)
    assert torch.equal(opmd, ref) and torch.equal(g1, g2)
    # asymre: −Â ℓ − 0.1 ℓ = −(Â + 0.1) ℓ: REINFORCE with the baseline lowered by 0.1
    asym, m, g = run("asymre", REC_LOGP, **kw)
    assert torch.allclose(asym, -(REC_ADV + 0.1) * REC_LOGP)
    assert torch.allclose(g, -(REC_ADV + 0.1))
    assert m == {}


# ---- masked tokens never leak ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_extreme_values_on_padding_do_not_leak(name):
    # padding token carries ±inf log-probs; valid tokens are ordinary
    logp = t([-1.0, float("inf")], [-2.0, float("-inf")])
    old = t([-1.5, float("-inf")], [-1.0, float("inf")])
    mask = t([1, 0], [1, 0])
    adv = t([1.0, 1.0], [-1.0, -1.0])
    fn = POLICY_LOSSES[name]
    extra = {"old_logp": old, "ref_logp": old, "behavior_logp": old, "is_expert": torch.zeros(2, dtype=torch.bool),
             "rewards": torch.zeros(2, dtype=D), "group_index": torch.zeros(2, dtype=torch.long)}
    kw = {k: extra[k] for k in fn.needs + getattr(fn, "optional", ())}
    loss, metrics, g = run(name, logp, advantages=adv, mask=mask, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert (loss[:, 1] == 0).all() and (g[:, 1] == 0).all()
    for v in metrics.values():
        assert torch.isfinite(v)
    for agg in AGGREGATIONS.values():
        assert torch.isfinite(agg(loss, mask))
