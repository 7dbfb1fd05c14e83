"""minpro, vcpo, copg, dpo, mdpo: hand-computed values and gradients, equivalences, naive loops; the package split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, CORRECTIONS, POLICY_LOSSES

L = math.log
D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def run(name, logp, agg=None, **kw):
    """(loss_tok, metrics, gradient of the sum of loss_tok, or of the aggregation ``agg`` when given)."""
    logp = logp.clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES[name](logp=logp, **kw)
    (AGGREGATIONS[agg](loss, kw["mask"]) if agg else loss.sum()).backward()
    return loss.detach(), metrics, logp.grad


def batch(seed, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=D) * 3
    mask = (torch.rand(B, T, generator=g) > 0.25).to(D)
    mask[:, 0] = 1
    rewards = torch.randint(0, 3, (B,), generator=g).to(D)
    group = torch.tensor([0, 0, 0, 1, 1, 2])[:B]
    return g, logp, mask, rewards, group


# ---- package split -----------------------------------------------------------------------------------
def test_losses_package_modules_stay_small_and_export_every_loss():
    import offpolicy.objectives.losses as pkg
    root = Path(pkg.__file__).parent
    for f in root.glob("*.py"):
        assert len(f.read_text().splitlines()) < 600, f"{f.name} is over the 600-line limit"
    for name in POLICY_LOSSES:
        assert getattr(pkg, name) is POLICY_LOSSES[name]  # every loss importable by its registry name


# ---- minpro ------------------------------------------------------------------------------------------
def test_minpro_uses_the_minimum_ratio_of_the_preceding_prefix():
    # μ = 1 (log 0): ρ = [2, 0.5, 4], Â = [1, 1, −1], last token padding
    #   t0: no prefix → M = 1:            L = −1·1·2   = −2,  dL/dℓ = −Â M ρ = −2
    #   t1: M = min(2) = 2:               L = −1·2·0.5 = −1,  grad −1
    #   t2: M = min(2, 0.5) = 0.5:        L = +1·0.5·4 =  2,  grad  2
    logp = t([L(2), L(0.5), L(4), 9.0])
    kw = dict(advantages=t([1, 1, -1, 0]), mask=t([1, 1, 1, 0]), behavior_logp=t([0, 0, 0, -9.0]))
    loss, m, g = run("minpro", logp, **kw)  # t([...]) is one row: (1, 4)
    assert torch.allclose(loss, t([-2, -1, 2, 0]))
    assert torch.allclose(g, t([-2, -1, 2, 0]))  # no gradient through the prefix minimum
    assert m["prefix_min_mean"].item() == pytest.approx((1 + 2 + 0.5) / 3)


def test_minpro_vectorised_matches_naive_loop():
    g, logp, mask, _, _ = batch(0)
    beh = logp + torch.randn(logp.shape, generator=g, dtype=D)
    adv = torch.randn(logp.shape, generator=g, dtype=D)
    loss, _, _ = run("minpro", logp, advantages=adv, mask=mask, behavior_logp=beh)
    expected = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        running = math.inf  # min log-ratio over the valid tokens seen so far
        for j in range(logp.shape[1]):
            if mask[i, j]:
                lr = float(logp[i, j] - beh[i, j])
                m = 0.0 if running == math.inf else running
                expected[i, j] = -adv[i, j] * math.exp(m + lr)
                running = min(running, lr)
    assert torch.allclose(loss, expected)


# ---- vcpo --------------------------------------------------------------------------------------------
# row 0: w = exp Σ(ℓ_old − ℓ_μ) = 2·3 = 6 < 8; row 1: 4·4·1 = 16 → truncated to 8
VC_OLD = t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
VC_BEH = t([-L(2), -L(3), 5.0], [-L(4), -L(4), 0.0])
VC_MASK = t([1, 1, 0], [1, 1, 1])
VC_ADV = t([1, 1, 0], [-0.5, -0.5, -0.5])


def test_vcpo_sequence_tis_on_an_unclipped_surrogate():
    loss, m, g = run("vcpo", VC_OLD.clone(), advantages=VC_ADV, mask=VC_MASK, old_logp=VC_OLD, behavior_logp=VC_BEH)
    # on-policy r = 1: L = sg[min(w, 8)]·(−Â): row 0 → 6·(−1) = −6; row 1 → 8·0.5 = 4; grad the same
    assert torch.allclose(loss, t([-6, -6, 0], [4, 4, 4]))
    assert torch.allclose(g, t([-6, -6, 0], [4, 4, 4]))
    assert m["is_trunc_frac"].item() == pytest.approx(0.5) and m["is_weight_mean"].item() == pytest.approx(7.0)
    assert m["ess_ratio"].item() == pytest.approx((6 + 16) ** 2 / (2 * (36 + 256)), rel=1e-5)  # unclipped w
    assert m["ess_ratio_clipped"].item() == pytest.approx((6 + 8) ** 2 / (2 * (36 + 64)), rel=1e-5)
    # a ratio of 3 is not clipped (clip_high = 1e9): L = −6·Â·r = −18 on row 0
    loss, _, _ = run("vcpo", VC_OLD + L(3), advantages=VC_ADV, mask=VC_MASK, old_logp=VC_OLD, behavior_logp=VC_BEH)
    assert loss[0, 0].item() == pytest.approx(-18.0)


def test_vcpo_is_tis_seq_cap_8_times_an_unclipped_ppo():
    g, logp, mask, _, _ = batch(1)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=D)
    beh = old + 0.5 * torch.randn(logp.shape, generator=g, dtype=D)
    adv = torch.randn(logp.shape, generator=g, dtype=D)
    v, _, gv = run("vcpo", logp, agg="seq-mean-token-mean", advantages=adv, mask=mask, old_logp=old, behavior_logp=beh)
    w, _ = CORRECTIONS["tis_seq"](old_logp=old, behavior_logp=beh, mask=mask, cap=8.0)
    lp = logp.clone().requires_grad_(True)
    p, _ = POLICY_LOSSES["ppo_clip"](logp=lp, advantages=adv, mask=mask, old_logp=old, clip_low=1.0, clip_high=1e9)
    AGGREGATIONS["seq-mean-token-mean"](p * w, mask).backward()
    assert torch.allclose(v, (p * w).detach()) and torch.allclose(gv, lp.grad)


# ---- copg --------------------------------------------------------------------------------------------
# β = 0.5, ref = 0 so h = Σ_t ℓ: h = [−1, −2, −1, −3]; R = [1, 0, 0.5, 2]; rows 0-2 one group, row 3 alone
# S = R − βh = [1.5, 1.0, 1.0, 3.5]; pairs Δ01 = 0.5, Δ02 = 0.5, Δ12 = 0, k − 1 = 2
# row loss L_i = ½ Σ_j Δ²_ij/(k−1): L0 = ½(0.25+0.25)/2 = 0.125, L1 = L2 = ½·0.25/2 = 0.0625, L3 = 0
CO_LOGP = t([-0.5, -0.5], [-2.0, 7.0], [-1.0, 7.0], [-1.5, -1.5])
CO_MASK = t([1, 1], [1, 0], [1, 0], [1, 1])
CO_KW = dict(advantages=torch.zeros(4, 2, dtype=D), mask=CO_MASK, ref_logp=torch.zeros(4, 2, dtype=D),
             rewards=t(1, 0, 0.5, 2), group_index=torch.tensor([4, 4, 4, 9]), beta=0.5)


def test_copg_pairwise_squared_regularised_reward_gaps():
    loss, m, g = run("copg", CO_LOGP, agg="seq-mean-token-mean", **CO_KW)
    assert torch.allclose(loss, t([0.125, 0.125], [0.0625, 0], [0.0625, 0], [0, 0]))
    assert AGGREGATIONS["seq-mean-token-mean"](loss, CO_MASK).item() == pytest.approx((0.25 + 0.25) / 2 / 4)
    # O = Σ_pairs Δ²/(k−1) / B; dO/dS0 = (Δ01 + Δ02)/B = 1/4, dS/dh = −β → dO/dh0 = −0.125 on each token of row 0
    # dO/dS1 = (−Δ01 + Δ12)/B = −1/8 → dO/dh1 = +0.0625; row 2 likewise; the singleton gets no gradient
    assert torch.allclose(g, t([-0.125, -0.125], [0.0625, 0], [0.0625, 0], [0, 0]))
    assert m["reg_reward_gap"].item() == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_copg_vectorised_matches_naive_pair_loop():
    g, logp, mask, rewards, group = batch(2)
    ref = logp + 0.2 * torch.randn(logp.shape, generator=g, dtype=D)
    loss, _, _ = run("copg", logp, advantages=torch.zeros_like(logp), mask=mask, ref_logp=ref, rewards=rewards,
                     group_index=group, beta=0.3)
    total = AGGREGATIONS["seq-mean-token-mean"](loss, mask)
    S = [float(rewards[i]) - 0.3 * float(((logp[i] - ref[i]) * mask[i]).sum()) for i in range(len(rewards))]
    naive = 0.0
    for gid in group.unique():
        idx = [i for i in range(len(S)) if group[i] == gid]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                naive += (S[idx[a]] - S[idx[b]]) ** 2 / (len(idx) - 1)
    assert total.item() == pytest.approx(naive / len(S))


@pytest.mark.parametrize("seed", range(2))
def test_copg_at_the_reference_is_2_beta_times_reinforce_with_rloo(seed):
    g, logp, mask, rewards, group = batch(seed)
    beta = 0.3
    _, _, gc = run("copg", logp, agg="seq-mean-token-mean", advantages=torch.zeros_like(logp), mask=mask,
                   ref_logp=logp.detach().clone(), rewards=rewards, group_index=group, beta=beta)
    adv = ADVANTAGES["rloo"](rewards=rewards, group_index=group, mask=mask)
    _, _, gr = run("reinforce", logp, agg="seq-mean-token-sum", advantages=adv, mask=mask)
    assert torch.allclose(gc, 2 * beta * gr)


# ---- dpo ---------------------------------------------------------------------------------------------
# group 0: rows 0-2 with R = [1, 0, 1]; group 1: rows 3-4 tie (no pair). ref = 0 so h = Σ_t ℓ
# best_worst: chosen row 0 (first max), rejected row 1: margin = β(h0 − h1) = 0.1·(−1 + 2) = 0.1
DP_LOGP = t([-0.5, -0.5], [-2.0, 9.0], [-1.0, -1.0], [-1.0, 9.0], [-3.0, 9.0])
DP_MASK = t([1, 1], [1, 0], [1, 1], [1, 0], [1, 0])
DP_KW = dict(advantages=torch.zeros(5, 2, dtype=D), mask=DP_MASK, ref_logp=torch.zeros(5, 2, dtype=D),
             rewards=t(1, 0, 1, 2, 2), group_index=torch.tensor([0, 0, 0, 1, 1]))


def test_dpo_best_vs_worst_pair_per_group():
    loss, m, g = run("dpo", DP_LOGP, agg="seq-mean-token-mean", **DP_KW)
    lp = math.log1p(math.exp(-0.1))  # −log σ(0.1) = 0.644397
    # one pair, B = 5: each of its rows carries ½·(5/1)·lp; SMTM = (1/5)(2·2.5·lp) = lp
    assert torch.allclose(loss, t([2.5 * lp, 2.5 * lp], [2.5 * lp, 0], [0, 0], [0, 0], [0, 0]))
    assert AGGREGATIONS["seq-mean-token-mean"](loss, DP_MASK).item() == pytest.approx(lp)
    # d lp/d margin = −σ(−0.1) = −0.475021; d margin/dh0 = β, d margin/dh1 = −β
    s = 1 / (1 + math.exp(0.1))
    assert torch.allclose(g, t([-0.1 * s, -0.1 * s], [0.1 * s, 0], [0, 0], [0, 0], [0, 0]))
    assert m["pair_frac"].item() == pytest.approx(2 / 5) and m["pair_accuracy"].item() == 1.0
    assert m["margin_mean"].item() == pytest.approx(0.1)


def test_dpo_all_pairs_and_naive_loop():
    loss, _, _ = run("dpo", DP_LOGP, pairing="all", **DP_KW)
    # pairs (0 ≻ 1) margin 0.1 and (2 ≻ 1) margin 0.1·(−2 + 2) = 0 → mean (softplus(−0.1) + log 2)/2
    expected = (math.log1p(math.exp(-0.1)) + math.log(2)) / 2
    assert AGGREGATIONS["seq-mean-token-mean"](loss, DP_MASK).item() == pytest.approx(expected)
    g, logp, mask, rewards, group = batch(3)
    ref = logp + 0.2 * torch.randn(logp.shape, generator=g, dtype=D)
    loss, _, _ = run("dpo", logp, advantages=torch.zeros_like(logp), mask=mask, ref_logp=ref, rewards=rewards,
                     group_index=group, pairing="all", beta=0.5)
    h = ((logp - ref) * mask).sum(-1)
    pairs = [(i, j) for i in range(len(h)) for j in range(len(h)) if group[i] == group[j] and rewards[i] > rewards[j]]
    naive = sum(math.log1p(math.exp(-0.5 * float(h[i] - h[j]))) for i, j in pairs) / len(pairs)
    assert AGGREGATIONS["seq-mean-token-mean"](loss, mask).item() == pytest.approx(naive)


def test_dpo_at_the_reference_is_log2_and_without_pairs_is_zero():
    logp = DP_LOGP.clone()
    loss, _, _ = run("dpo", logp, **{**DP_KW, "ref_logp": logp.clone()})
    assert AGGREGATIONS["seq-mean-token-mean"](loss, DP_MASK).item() == pytest.approx(math.log(2))
    loss, m, g = run("dpo", logp, **{**DP_KW, "rewards": t(1, 1, 1, 2, 2)})
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(g, torch.zeros_like(g))
    assert m["pair_frac"].item() == 0.0


# ---- mdpo --------------------------------------------------------------------------------------------
def test_mdpo_ratio_surrogate_plus_kl_to_the_previous_policy():
    # old = 0, r = [2, 0.5], Â = [1, −1], 1/t_k = 2; kl = r log r − r + 1 = [0.386294, 0.153426]
    # L = −Â r + 2 kl = [−2 + 0.772589, 0.5 + 0.306853]; dL/dℓ = −Â r + 2 r log r = [0.772589, −0.193147]
    loss, m, g = run("mdpo", t([L(2), L(0.5)]), advantages=t([1, -1]), mask=t([1, 1]), old_logp=t([0, 0]),
                     kl_coef=2.0)
    kl = [2 * L(2) - 1, 0.5 * L(0.5) + 0.5]
    assert torch.allclose(loss, t([-2 + 2 * kl[0], 0.5 + 2 * kl[1]]))
    assert torch.allclose(g, t([-2 + 4 * L(2), 0.5 + L(0.5)]))
    assert m["kl_prev"].item() == pytest.approx(sum(kl) / 2)


def test_mdpo_kl_estimator_is_unbiased_for_reverse_kl():
    # E_{a∼π_k}[r log r − r + 1] = KL(π_θ ‖ π_k) exactly, over a whole categorical distribution
    p_k = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=D), 0)
    p_t = torch.softmax(torch.tensor([1.0, 0.2, 1.5, -0.7], dtype=D), 0)
    r = p_t / p_k
    est = (p_k * (r * r.log() - r + 1)).sum()
    assert est.item() == pytest.approx(float((p_t * (p_t / p_k).log()).sum()))


# ---- on-policy equivalences ------------------------------------------------------------------------
@pytest.mark.parametrize("name,extra", [("minpro", {}), ("mdpo", {"kl_coef": 3.0}), ("vcpo", {})])
@pytest.mark.parametrize("seed", range(2))
def test_on_policy_gradient_equals_reinforce(name, extra, seed):
    g, logp, mask, rewards, group = batch(seed)
    adv = ADVANTAGES["grpo"](rewards=rewards, group_index=group, mask=mask)
    same = logp.detach().clone()
    kw = {"old_logp": same, "behavior_logp": same}
    kw = {k: v for k, v in kw.items() if k in POLICY_LOSSES[name].needs}
    _, _, ga = run(name, logp, agg="token-mean", advantages=adv, mask=mask, **kw, **extra)
    _, _, gb = run("reinforce", logp, agg="token-mean", advantages=adv, mask=mask)
    assert torch.allclose(ga, gb, atol=1e-12)


def test_minpro_on_length_one_sequences_is_the_unclipped_policy_gradient():
    g, logp, _, _, _ = batch(4, T=1)
    beh = logp + torch.randn(logp.shape, generator=g, dtype=D)
    adv = torch.randn(logp.shape, generator=g, dtype=D)
    mask = torch.ones_like(logp)
    a, _, ga = run("minpro", logp, advantages=adv, mask=mask, behavior_logp=beh)
    b, _, gb = run("ppo_clip", logp, advantages=adv, mask=mask, old_logp=beh, clip_low=1.0, clip_high=1e9)
    assert torch.allclose(a, b) and torch.allclose(ga, gb)


def test_mdpo_without_kl_is_the_unclipped_ratio_surrogate():
    g, logp, mask, _, _ = batch(5)
    old = logp + 0.5 * torch.randn(logp.shape, generator=g, dtype=D)
    adv = torch.randn(logp.shape, generator=g, dtype=D)
    a, _, ga = run("mdpo", logp, advantages=adv, mask=mask, old_logp=old, kl_coef=0.0)
    b, _, gb = run("ppo_clip", logp, advantages=adv, mask=mask, old_logp=old, clip_low=1.0, clip_high=1e9)
    assert torch.allclose(a, b) and torch.allclose(ga, gb)


def test_new_losses_fail_loudly_on_bad_hyperparameters():
    with pytest.raises(ValueError, match="pairing"):
        POLICY_LOSSES["dpo"](logp=DP_LOGP, **{**DP_KW, "pairing": "random"})
    with pytest.raises(ValueError, match="beta"):
        POLICY_LOSSES["copg"](logp=CO_LOGP, **{**CO_KW, "beta": 0.0})
    with pytest.raises(ValueError, match="kl_coef"):
        POLICY_LOSSES["mdpo"](logp=VC_OLD, advantages=VC_ADV, mask=VC_MASK, old_logp=VC_OLD, kl_coef=-1.0)
    with pytest.raises(ValueError, match="tis_cap"):
        POLICY_LOSSES["vcpo"](logp=VC_OLD, advantages=VC_ADV, mask=VC_MASK, old_logp=VC_OLD, behavior_logp=VC_BEH,
                              tis_cap=0.0)
    assert F.softplus(torch.tensor(0.0)).item() == pytest.approx(math.log(2))  # the −log σ(0) used above
