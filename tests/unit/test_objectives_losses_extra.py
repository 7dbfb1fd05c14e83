"""Hand-computed values for the extended checklist losses, and their on-policy reductions."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from offpolicy.objectives.losses import chord_mu_schedule

L = math.log
D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def sig(x):
    return 1 / (1 + math.exp(-x))


def run(name, logp, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES[name](logp=logp, **kw)
    loss.sum().backward()
    return loss.detach(), metrics, logp.grad


def close(a, b, tol=1e-6):
    assert torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol), (a, b)


# ---- sapo --------------------------------------------------------------------------------------------
def test_sapo_soft_gate():
    # t0: r = 1, Â = +1, τ = 1:    f = 4σ(0) = 2 → loss −2;  d/dℓ = −Â·4σ(1−σ)r = −1
    # t1: r = 2, Â = −1, τ = 1.05: f = (4/1.05)σ(1.05) = 2.821999 → loss +2.821999;
    #     d/dℓ = −Â·4σ(1.05)(1−σ(1.05))·2 = 1.536176
    s = sig(1.05)
    loss, m, g = run("sapo", t([0.0, L(2.0)]), advantages=t([1.0, -1.0]), mask=t([1, 1]), old_logp=t([0.0, 0.0]))
    close(loss, [[-2.0, 4 / 1.05 * s]])
    close(g, [[-1.0, 4 * s * (1 - s) * 2]])
    assert m["gate_weight_mean"].item() == pytest.approx((1 + 4 * s * (1 - s) * 2) / 2)


# ---- gspo / gspo_token ---------------------------------------------------------------------------------
def test_gspo_sequence_ratio():
    # log-ratios [log 1.1, log 1.3] → mean 0.178837 → s = 1.195826; Â = +1
    s = math.exp((L(1.1) + L(1.3)) / 2)
    kw = dict(advantages=t([1.0, 1.0]), mask=t([1, 1]), old_logp=t([0.0, 0.0]))
    logp = t([L(1.1), L(1.3)])
    # ε = 0.2: s inside [0.8, 1.2] → each token carries −s; Σ over 2 tokens of −s, ∂s/∂ℓ_t = s/2 → grad −s
    loss, _, g = run("gspo", logp, clip_low=0.2, clip_high=0.2, **kw)
    close(loss, [[-s, -s]])
    close(g, [[-s, -s]])
    # default ε_h = 4e-4: s > 1.0004 → clipped to −1.0004, no gradient
    loss, m, g = run("gspo", logp, **kw)
    close(loss, [[-1.0004, -1.0004]])
    close(g, [[0.0, 0.0]])
    assert m["clip_frac"].item() == 1.0
    # gspo_token: same values; each token's own loss depends only on its ℓ_t → grad −s (not −s summed)
    loss, _, g = run("gspo_token", logp, clip_low=0.2, clip_high=0.2, **kw)
    close(loss, [[-s, -s]])
    close(g, [[-s, -s]])


# ---- cispo -------------------------------------------------------------------------------------------
def test_cispo_keeps_gradient_of_clipped_tokens():
    # t0: r = 1.5, Â = +1 → w = clip(1.5, 0, 1.28) = 1.28 → loss −1.28ℓ, grad −1.28 (ppo would give 0)
    # t1: r = 0.5, Â = −1 → w = 0.5 → grad +0.5
    logp, old = t([L(1.5), L(0.5)]), t([0.0, 0.0])
    kw = dict(advantages=t([1.0, -1.0]), mask=t([1, 1]), old_logp=old)
    loss, m, g = run("cispo", logp, **kw)
    close(loss, [[-1.28 * L(1.5), 0.5 * L(0.5)]])
    close(g, [[-1.28, 0.5]])
    assert m["clip_frac"].item() == pytest.approx(0.5)
    _, _, g = run("cispo", logp, mask_clipped=True, **kw)  # Eq. 7: Â > 0 and r > 1.28 → masked
    close(g, [[0.0, 0.5]])


# ---- gmpo --------------------------------------------------------------------------------------------
def test_gmpo_geometric_mean_with_log_space_clip():
    # row 0, Â = +1: lr = [log 1.1, log 2] → pessimistic clip: [0.095310, min(0.693147, 0.4) = 0.4]
    #   ρ = exp((0.095310 + 0.4)/2) = 1.281004 → both tokens carry −1.281004
    #   grad: Σ of 2 copies, ∂ρ/∂ℓ_0 = ρ/2 → −ρ; token 1 clipped → 0
    # row 1, Â = −1: lr = [log 0.5, log 1.1] → max(lr, clamp): [−0.4 (clipped), 0.095310]
    #   ρ = exp((−0.4 + 0.095310)/2) = 0.858691 → loss +ρ; grad token 1 = +ρ, token 0 = 0
    rho0 = math.exp((L(1.1) + 0.4) / 2)
    rho1 = math.exp((-0.4 + L(1.1)) / 2)
    logp = t([L(1.1), L(2.0)], [L(0.5), L(1.1)])
    adv = t([1.0, 1.0], [-1.0, -1.0])
    loss, m, g = run("gmpo", logp, advantages=adv, mask=torch.ones(2, 2, dtype=D), old_logp=torch.zeros(2, 2, dtype=D))
    close(loss, [[-rho0, -rho0], [rho1, rho1]])
    close(g, [[-rho0, 0.0], [0.0, rho1]])
    assert m["clip_frac_high"].item() == pytest.approx(0.25) and m["clip_frac_low"].item() == pytest.approx(0.25)


# ---- topr --------------------------------------------------------------------------------------------
def test_topr_truncates_only_negative_sequences():
    # row 0: Â = −1, ℓ − ℓ^μ = [log 0.5, log 0.8] → π/μ = 0.4 → w = clip(0.4, 0, 1) = 0.4 → grad +0.4
    # row 1: Â = +1, π/μ = 3 → w = clip(3, 1, 1) = 1 → grad −1
    logp = t([-1.0, -2.0], [-1.0, -1.0])
    beh = logp - t([L(0.5), L(0.8)], [L(3.0), 0.0])
    adv = t([-1.0, -1.0], [1.0, 1.0])
    mask = torch.ones(2, 2, dtype=D)
    loss, m, g = run("topr", logp, advantages=adv, mask=mask, behavior_logp=beh)
    close(g, [[0.4, 0.4], [-1.0, -1.0]])
    close(loss, 0.4 * logp * t([1, 1], [0, 0]) + t([0, 0], [1, 1]) * -logp)
    assert m["pos_frac"].item() == pytest.approx(0.5)
    _, _, g = run("topr", logp, advantages=adv, mask=mask, behavior_logp=beh, ratio_level="geometric")
    close(g[0], [math.sqrt(0.4)] * 2)  # geometric mean 0.4^(1/2)
    _, _, g = run("topr", logp, advantages=adv, mask=mask, behavior_logp=beh, ratio_level="token")
    close(g[0], [0.5, 0.8])


# ---- decoupled ppo -----------------------------------------------------------------------------------
def test_decoupled_ppo_behaviour_weight_and_cap():
    # u = π/π_prox = 1 (on the proximal policy), Â = +1 → L_tok = −1
    # w^b = π_prox/μ: token 0 → 2, token 1 → 8 > cap 5 → masked
    old = t([-1.0, -1.0])
    beh = old - t([L(2.0), L(8.0)])
    loss, m, g = run("decoupled_ppo", old.clone(), advantages=t([1.0, 1.0]), mask=t([1, 1]), old_logp=old,
                     behavior_logp=beh, behav_imp_weight_cap=5.0)
    close(loss, [[-2.0, 0.0]])
    close(g, [[-2.0, 0.0]])
    assert m["behav_mask_frac"].item() == pytest.approx(0.5)
    loss, _, _ = run("decoupled_ppo", old.clone(), advantages=t([1.0, 1.0]), mask=t([1, 1]), old_logp=old,
                     behavior_logp=beh)  # no cap → weight 8 kept
    close(loss, [[-2.0, -8.0]])
    with pytest.raises(ValueError, match="behav_imp_weight_cap"):
        POLICY_LOSSES["decoupled_ppo"](logp=old, advantages=old, mask=old, old_logp=old, behavior_logp=beh,
                                       behav_imp_weight_cap=0.5)


# ---- expert losses -----------------------------------------------------------------------------------
def test_sft_is():
    # ℓ = log 0.5: −sg[p]·ℓ = −0.5·(−0.693147) = 0.346574; grad −p = −0.5
    loss, _, g = run("sft_is", t([L(0.5)]), advantages=t([0.0]), mask=t([1.0]))
    close(loss, [[0.5 * math.log(2)]])
    close(g, [[-0.5]])


def test_chord_mixes_part_token_means():
    # row 0 policy (2 tokens, on-policy, Â = 1 → ppo −1 each); row 1 expert (1 token, p = 0.5)
    # φ = p(1−p) = 0.25 → SFT = −0.25·log 0.5 = 0.173287
    # TM of the returned matrix = (1−μ)·(−1) + μ·0.173287 = −0.882671 with μ = 0.1
    logp = t([-1.0, -2.0], [L(0.5), 0.0])
    mask = t([1, 1], [1, 0])
    kw = dict(advantages=t([1.0, 1.0], [0.0, 0.0]), mask=mask, old_logp=logp.clone(),
              is_expert=torch.tensor([False, True]))
    loss, m, _ = run("chord", logp, **kw)
    sft = 0.25 * math.log(2)
    assert AGGREGATIONS["token-mean"](loss, mask).item() == pytest.approx(-0.9 + 0.1 * sft)
    close(loss, [[-0.9 * 1.5, -0.9 * 1.5], [0.1 * 3 * sft, 0.0]])  # rescaled by N/N_part = 3/2 and 3/1
    assert m["expert_token_frac"].item() == pytest.approx(1 / 3) and m["mu"].item() == pytest.approx(0.1)
    loss, _, _ = run("chord", logp, phi=False, mu=0.5, **kw)
    assert AGGREGATIONS["token-mean"](loss, mask).item() == pytest.approx(0.5 * -1 + 0.5 * math.log(2))


def test_chord_mu_schedule():
    assert chord_mu_schedule(0) == pytest.approx(0.9)  # cos(0) = 1 → peak
    assert chord_mu_schedule(100) == pytest.approx(0.05 + 0.85 * 0.5)  # half-way: 0.475
    assert chord_mu_schedule(200) == pytest.approx(0.05) and chord_mu_schedule(10**6) == pytest.approx(0.05)
    assert chord_mu_schedule(5, warmup_steps=10) == pytest.approx(0.45)  # linear warm-up


def test_luffy_policy_shaping():
    # row 0 on-policy: r = 1.5, Â = 1 → −1.5 (no clip), grad −1.5
    # row 1 expert: p = 0.1 → f = 0.1/(0.1 + 0.1) = 0.5 → −0.5; grad −Â·γp/(p+γ)² = −0.1·0.1/0.04 = −0.25
    logp = t([L(1.5)], [L(0.1)])
    loss, m, g = run("luffy", logp, advantages=t([1.0], [1.0]), mask=t([1.0], [1.0]), old_logp=t([0.0], [-9.0]),
                     is_expert=torch.tensor([False, True]))
    close(loss, [[-1.5], [-0.5]])
    close(g, [[-1.5], [-0.25]])


# ---- adaptive clipping -------------------------------------------------------------------------------
def test_bapo_abs_sum_lets_negatives_outweigh_positives():
    # rho_denominator="abs_sum" (Eq. 8 as printed): one positive token r = 3 (Â = +1) and five negative
    # on-policy tokens (Â = −1, r = 1). ρ(c_h) = c_h / |c_h − 5|: c_h = 1.40 → 0.389 < 0.4;
    # c_h = 1.45 → 0.408 ≥ 0.4 → bounds (0.6, 1.45), accepted with negatives 5 : 1.45 ≈ 3.45 : 1
    logp = t([L(3.0)] + [0.0] * 5)
    adv = t([1.0] + [-1.0] * 5)
    loss, m, g = run("bapo", logp, advantages=adv, mask=torch.ones(1, 6, dtype=D), old_logp=torch.zeros(1, 6, dtype=D),
                     rho_denominator="abs_sum")
    assert m["c_high"].item() == pytest.approx(1.45) and m["c_low"].item() == pytest.approx(0.6)
    assert m["rho"].item() == pytest.approx(1.45 / 3.55)
    close(loss, [[-1.45] + [1.0] * 5])  # positive token clipped at 1.45; negatives −Â·1
    close(g, [[0.0] + [1.0] * 5])


def test_bapo_exhausts_the_path():
    # 100 negatives: even c_h = 3 gives ρ = 3/97 (abs_sum) or 3/103 (sum_abs) → Algorithm 1 ends at
    # (b⁻, b⁺) = (0.9, 3.0)
    logp = t([L(3.0)] + [0.0] * 100)
    adv = t([1.0] + [-1.0] * 100)
    for denominator in ("abs_sum", "sum_abs"):
        _, m, _ = run("bapo", logp, advantages=adv, mask=torch.ones(1, 101, dtype=D),
                      old_logp=torch.zeros(1, 101, dtype=D), rho_denominator=denominator)
        assert m["c_low"].item() == pytest.approx(0.9) and m["c_high"].item() == pytest.approx(3.0)


def test_bapo_sum_abs_is_the_default_positive_share():
    # One positive token r = 2.5 (Â = +1), five negatives r = 1 (Â = −1). Default "sum_abs": ρ = P / (P + N),
    # P = min(2.5, c_h), N = 5·max(1, c_l) = 5: ρ ≤ 2.5 / 7.5 = 1/3 < 0.4 on the whole path, so Algorithm 1
    # ends at (b⁻, b⁺) = (0.9, 3.0) with ρ = 1/3. ("abs_sum" stops at c_h = 1.45: 1.45 / 3.55 = 0.408.)
    logp = t([L(2.5)] + [0.0] * 5)
    adv = t([1.0] + [-1.0] * 5)
    kw = dict(advantages=adv, mask=torch.ones(1, 6, dtype=D), old_logp=torch.zeros(1, 6, dtype=D))
    loss, m, g = run("bapo", logp, **kw)
    assert m["c_low"].item() == pytest.approx(0.9) and m["c_high"].item() == pytest.approx(3.0)
    assert m["rho"].item() == pytest.approx(1 / 3)
    # r = 2.5 < c_h: loss −Â·r = −2.5, gradient −Â·r = −2.5; negatives r = 1 ∈ [0.9, 3]: loss 1,
    # gradient 1
    close(loss, [[-2.5] + [1.0] * 5])
    close(g, [[-2.5] + [1.0] * 5])
    loss2, m2, g2 = run("bapo", logp, rho_denominator="sum_abs", **kw)
    assert torch.equal(loss, loss2) and torch.equal(g, g2)
    _, m3, _ = run("bapo", logp, rho_denominator="abs_sum", **kw)
    assert m3["c_high"].item() == pytest.approx(1.45)


def test_bapo_sum_abs_widens_where_abs_sum_stops_at_the_start():
    # positive r = 3 (Â = +1), two negatives r = 1 (Â = −1).
    # abs_sum: ρ = 1.2 / |1.2 − 2| = 1.5 ≥ 0.4 at the start → (0.6, 1.2), positive clipped at 1.2.
    # sum_abs: ρ = c_h / (c_h + 2): 1.30 → 0.394 < 0.4; 1.35 → 0.403 → (0.6, 1.35), positive clipped at 1.35.
    logp = t([L(3.0), 0.0, 0.0])
    kw = dict(advantages=t([1.0, -1.0, -1.0]), mask=torch.ones(1, 3, dtype=D), old_logp=torch.zeros(1, 3, dtype=D))
    loss, m, g = run("bapo", logp, rho_denominator="abs_sum", **kw)
    assert m["c_high"].item() == pytest.approx(1.2) and m["rho"].item() == pytest.approx(1.5)
    close(loss, [[-1.2, 1.0, 1.0]])
    loss, m, g = run("bapo", logp, rho_denominator="sum_abs", **kw)
    assert m["c_low"].item() == pytest.approx(0.6) and m["c_high"].item() == pytest.approx(1.35)
    assert m["rho"].item() == pytest.approx(1.35 / 3.35)
    close(loss, [[-1.35, 1.0, 1.0]])
    close(g, [[0.0, 1.0, 1.0]])  # the clipped positive has no gradient
    with pytest.raises(ValueError, match="rho_denominator='abs'; valid"):
        run("bapo", logp, rho_denominator="abs", **kw)


# ---- opmd: sequence vs token penalty ------------------------------------------------------------------
# row 0 (Â = +1, 2 valid tokens): ℓ − ℓ_old = [−1 − (−1.5), −2 − (−1.5)] = [0.5, −0.5], D_0 = 0
# row 1 (Â = −0.5, 3 valid tokens): ℓ − ℓ_old = [0.2, 0.3, 0], D_1 = 0.5;  τ = 0.1
OPMD_LOGP = t([-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0])
OPMD_KW = dict(old_logp=t([-1.5, -1.5, 0.0], [-1.2, -1.3, -1.0]), advantages=t([1.0] * 3, [-0.5] * 3),
               mask=t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0]), regularizer_coef=0.1)


def test_opmd_sequence_penalty_is_kimi_eq3():
    # sequence (default): each valid token carries −Â ℓ + τ D²/|y|
    #   row 0: D = 0 → [1, 2, 0];  gradient −Â = −1 on valid tokens
    #   row 1: 0.5·(−1) + 0.1·0.25/3 = −0.4916667;  gradient −Â + 2τD = 0.5 + 0.1 = 0.6 on every token
    loss, m, g = run("opmd", OPMD_LOGP, **OPMD_KW)
    close(loss, [[1.0, 2.0, 0.0], [-0.5 + 0.025 / 3] * 3])
    close(g, [[-1.0, -1.0, 0.0], [0.6, 0.6, 0.6]])
    close(loss.sum(-1), [3.0, -1.5 + 0.1 * 0.25])  # the row sums: −Â Σ_t ℓ + τ D²
    assert m["seq_log_ratio_sq"].item() == pytest.approx((0.0 + 0.25) / 2)
    loss2, _, g2 = run("opmd", OPMD_LOGP, penalty="sequence", **OPMD_KW)
    assert torch.equal(loss, loss2) and torch.equal(g, g2)


def test_opmd_token_penalty_is_rec_k2():
    # token: −Â ℓ + τ δ², gradient −Â + 2τδ
    #   row 0: [1 + 0.025, 2 + 0.025, 0]; gradient [−1 + 0.1, −1 − 0.1, 0]   (D = 0 but each δ is penalised)
    #   row 1: [−0.5 + 0.004, −0.5 + 0.009, −0.5]; gradient [0.5 + 0.04, 0.5 + 0.06, 0.5]
    loss, _, g = run("opmd", OPMD_LOGP, penalty="token", **OPMD_KW)
    close(loss, [[1.025, 2.025, 0.0], [-0.496, -0.491, -0.5]])
    close(g, [[-0.9, -1.1, 0.0], [0.54, 0.56, 0.5]])
    with pytest.raises(ValueError, match="penalty='seq'; valid"):
        run("opmd", OPMD_LOGP, penalty="seq", **OPMD_KW)


def test_opmd_sequence_penalty_ignores_padding_and_empty_rows():
    mask = t([1.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    logp = t([-1.0, -2.0, float("nan")], [float("inf")] * 3)
    kw = dict(OPMD_KW, mask=mask, old_logp=t([-1.5, -1.5, float("-inf")], [0.0] * 3))
    loss, m, g = run("opmd", logp, **kw)
    close(loss, [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    close(g, [[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])


def test_ctpo_cumulative_ratio_position_adaptive_clip():
    # row 0 (Â = +1): lr = [log 1.02, log 1.03, log 0.9]; λ = cumulative = [log 1.02, log 1.0506, log 0.94554]
    #   bounds c·p^0.5: upper 0.05·[1, 1.414, 1.732] = [0.05, 0.0707, 0.0866]
    #                   lower −0.025·[1, 1.414, 1.732] = [−0.025, −0.0354, −0.0433]
    #   t0, t1 inside → −e^λ = −1.02, −1.0506 (grad = same); t2: λ = −0.056 below, but Â > 0 keeps the
    #   unclipped branch → −0.94554 (grad −0.94554)
    # row 1 (Â = −1): lr = [log 1.2] → λ = 0.18232 > 0.05 → max(1.2, e^0.05) = 1.2 → dual cap e^{0.05} = 1.051271
    logp = t([L(1.02), L(1.03), L(0.9)], [L(1.2), 0.0, 0.0])
    mask = t([1, 1, 1], [1, 0, 0])
    adv = t([1.0, 1.0, 1.0], [-1.0, 0.0, 0.0])
    loss, m, g = run("ctpo", logp, advantages=adv, mask=mask, old_logp=torch.zeros(2, 3, dtype=D))
    c = [1.02, 1.02 * 1.03, 1.02 * 1.03 * 0.9]
    close(loss, [[-c[0], -c[1], -c[2]], [math.exp(0.05), 0.0, 0.0]])
    close(g, [[-c[0], -c[1], -c[2]], [0.0, 0.0, 0.0]])
    # geomean mode: λ_t / p_t, α = −0.5: t1 log-ratio mean = log(1.0506)/2
    loss, _, _ = run("ctpo", logp, advantages=adv, mask=mask, old_logp=torch.zeros(2, 3, dtype=D), mode="geomean")
    assert loss[0, 1].item() == pytest.approx(-math.sqrt(c[1]))  # 0.0246 < 0.05·2^−0.5 = 0.0354: inside


def test_kl_cov_penalises_top_covariance_tokens():
    # Â = [1, 1, −1, −1] (mean 0); ℓ = [−0.5, −3, −1, −2.5] (mean −1.75)
    # Cov = Â·(ℓ + 1.75) = [1.25, −1.25, −0.75, 0.75]; ratio 0.25·4 tokens → 1 token: t0
    # lr = 0.1 everywhere: r = e^0.1 = 1.105171; t0: −1.105171 + 1·0.1 = −1.005171, grad −r + 1 = −0.105171
    logp = t([-0.5, -3.0, -1.0, -2.5])
    kw = dict(advantages=t([1.0, 1.0, -1.0, -1.0]), mask=torch.ones(1, 4, dtype=D), old_logp=logp - 0.1)
    r = math.exp(0.1)
    loss, m, g = run("kl_cov", logp, kl_cov_ratio=0.25, **kw)
    close(loss, [[-r + 0.1, -r, r, r]])
    close(g, [[-r + 1, -r, r, r]])
    assert m["kl_cov_frac"].item() == pytest.approx(0.25)
    loss, _, _ = run("kl_cov", logp, kl_cov_ratio=0.5, **kw)  # 2 tokens: t0 and t3 (Cov 0.75)
    close(loss, [[-r + 0.1, -r, r, r + 0.1]])


def test_clip_cov_drops_random_covariance_tokens():
    logp = t([-0.5, -3.0, -1.0, -2.5])  # Cov = [1.25, −1.25, −0.75, 0.75] as above; on-policy, nothing ppo-clipped
    kw = dict(advantages=t([1.0, 1.0, -1.0, -1.0]), mask=torch.ones(1, 4, dtype=D), old_logp=logp.clone(),
              clip_cov_lb=0.0, clip_cov_ub=5.0)
    # candidates (0 < Cov < 5): t0, t3; ratio 0.5 → ⌊0.5·4⌋ = 2 picks → both dropped
    loss, m, g = run("clip_cov", logp, clip_cov_ratio=0.5, seed=0, **kw)
    close(loss, [[0.0, -1.0, 1.0, 0.0]])
    close(g, [[0.0, -1.0, 1.0, 0.0]])
    assert m["cov_clip_frac"].item() == pytest.approx(0.5)
    # default ratio → max(⌊2e-4·4⌋, 1) = 1 pick among {t0, t3}; a seed makes it reproducible
    a, _, _ = run("clip_cov", logp, seed=3, **kw)
    b, _, _ = run("clip_cov", logp, seed=3, **kw)
    assert torch.equal(a, b)
    dropped = (a == 0).nonzero()[:, 1].tolist()
    assert len(dropped) == 1 and dropped[0] in (0, 3)


def test_m2po_second_moment_mask():
    # lr = [0.1, 0.3, −0.2, 0.5], Â = [1, 1, −1, −1]; trust region: t0, t1, t2 (t3 has Â < 0, r > 1)
    # sorted (lr)² = [0.01, 0.04, 0.09]; prefix means 0.01, 0.025, 0.0467 → keep 2 → drop t1
    lr = t([0.1, 0.3, -0.2, 0.5])
    logp = t([-1.0, -1.0, -1.0, -1.0])
    loss, m, g = run("m2po", logp, advantages=t([1.0, 1.0, -1.0, -1.0]), mask=torch.ones(1, 4, dtype=D),
                     behavior_logp=logp - lr)
    r = [math.exp(x) for x in (0.1, 0.3, -0.2, 0.5)]
    close(loss, [[-r[0], 0.0, r[2], r[3]]])
    close(g, [[-r[0], 0.0, r[2], r[3]]])
    assert m["m2_before"].item() == pytest.approx(0.14 / 3)
    assert m["m2_after"].item() == pytest.approx(0.025)
    assert m["m2_masked_frac"].item() == pytest.approx(0.25)
    assert m["trust_region_frac"].item() == pytest.approx(0.75)


# ---- on-policy reductions ----------------------------------------------------------------------------
def grad(name, logp, agg, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES[name](logp=logp, **kw)
    AGGREGATIONS[agg](loss, kw["mask"]).backward()
    return logp.grad


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 6, generator=g, dtype=D) * 3
    mask = (torch.rand(4, 6, generator=g) > 0.25).to(D)
    mask[:, 0] = 1
    adv = ADVANTAGES["dr_grpo"](rewards=torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D),
                                group_index=torch.tensor([0, 0, 1, 1]), mask=mask)
    return g, logp, mask, adv


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "gmpo"])
@pytest.mark.parametrize("seed", range(2))
def test_sequence_level_losses_on_policy_equal_grpo(name, seed):
    _, logp, mask, adv = batch(seed)
    kw = dict(advantages=adv, mask=mask, old_logp=logp.detach().clone())
    ref = grad("grpo", logp, "seq-mean-token-mean", **kw)
    assert torch.allclose(grad(name, logp, "seq-mean-token-mean", **kw), ref, atol=1e-12)


@pytest.mark.parametrize("name", ["sapo", "cispo", "ctpo", "bapo", "kl_cov", "dapo", "decoupled_ppo", "m2po", "topr",
                                  "luffy", "rec", "opmd"])
@pytest.mark.parametrize("seed", range(2))
def test_token_level_losses_on_policy_equal_reinforce(name, seed):
    _, logp, mask, adv = batch(seed)
    same = logp.detach().clone()
    kw = dict(advantages=adv, mask=mask, old_logp=same, behavior_logp=same,
              is_expert=torch.zeros(4, dtype=torch.bool))
    fn = POLICY_LOSSES[name]
    kw = {k: v for k, v in kw.items() if k in fn.needs or k in ("advantages", "mask")}
    ref = grad("reinforce", logp, "token-mean", advantages=adv, mask=mask)
    assert torch.allclose(grad(name, logp, "token-mean", **kw), ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(2))
def test_gspo_token_gradient_equals_gspo_off_policy_with_sequence_advantages(seed):
    g, logp, mask, adv = batch(seed)
    old = logp + torch.randn(logp.shape, generator=g, dtype=D) * 0.1
    kw = dict(advantages=adv, mask=mask, old_logp=old, clip_low=0.2, clip_high=0.2)
    a = grad("gspo", logp, "seq-mean-token-mean", **kw)
    b = grad("gspo_token", logp, "seq-mean-token-mean", **kw)
    assert torch.allclose(a, b, atol=1e-12)


def test_chord_limits():
    _, logp, mask, adv = batch(0)
    old = logp.detach().clone() + 0.05
    pol = torch.zeros(4, dtype=torch.bool)
    a = grad("chord", logp, "token-mean", advantages=adv, mask=mask, old_logp=old, is_expert=pol, mu=0.0)
    b = grad("ppo_clip", logp, "token-mean", advantages=adv, mask=mask, old_logp=old)
    assert torch.allclose(a, b)
    a = grad("chord", logp, "token-mean", advantages=adv, mask=mask, old_logp=old, is_expert=~pol, mu=1.0, phi=False)
    b = grad("sft", logp, "token-mean", advantages=adv, mask=mask)
    assert torch.allclose(a, b)
