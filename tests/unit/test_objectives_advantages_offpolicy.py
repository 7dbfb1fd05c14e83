"""reinforce_pp, gae, opmd_logavgexp, asymre, optimal_baseline: hand values, equivalences, loud failures."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from offpolicy.objectives.advantages import gae_advantages_and_returns, whiten

D = torch.float64
# as test_objectives_advantages.py: group 7 = [1, 0, 0, 1], group 3 = [5] (a singleton)
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0], dtype=D)
G = torch.tensor([7, 7, 7, 7, 3])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=D)


def seq(adv):
    return adv[:, 0]


# ---- reinforce_pp ------------------------------------------------------------------------------------
def test_reinforce_pp_group_baseline_then_global_token_normalisation():
    a = ADVANTAGES["reinforce_pp"](rewards=R, group_index=G, mask=MASK)
    # Ã = R − 0.5 on group 7's valid tokens: +0.5 on 2 + 3 = 5 tokens, −0.5 on 1 + 3 = 4 tokens (singleton left out)
    # mean = (2.5 − 2)/9 = 1/18; unbiased var = (5·(4/9)² + 4·(5/9)²)/8 = (80/81 + 100/81)/8 = 180/648 = 5/18
    sd = math.sqrt(5 / 18 + 1e-8)
    pos, neg = (0.5 - 1 / 18) / sd, (-0.5 - 1 / 18) / sd  # 0.843274, −1.054093
    assert torch.allclose(seq(a), torch.tensor([pos, neg, neg, pos, 0.0], dtype=D))
    assert torch.equal(a * (1 - MASK), torch.zeros_like(a))
    kept = MASK[:4].bool()
    assert abs(float(a[:4][kept].mean())) < 1e-12  # zero mean over the batch's tokens


def test_reinforce_pp_without_baseline_whitens_raw_rewards():
    a = ADVANTAGES["reinforce_pp"](rewards=R, group_index=G, mask=MASK, baseline="none")
    tokens = (R[:, None] * MASK)[MASK.bool()]  # 12 valid tokens: 1,1,0,0,0,0,1,1,1,5,5,5
    expected = (R - tokens.mean()) / torch.sqrt(tokens.var(unbiased=True) + 1e-8)
    assert torch.allclose(seq(a), expected)


def test_whiten_edge_cases_and_bad_baseline():
    assert torch.equal(whiten(torch.ones(2, 2, dtype=D), torch.zeros(2, 2, dtype=D)), torch.zeros(2, 2, dtype=D))
    one = whiten(torch.tensor([[3.0, 7.0]], dtype=D), torch.tensor([[1.0, 0.0]], dtype=D))
    assert torch.equal(one, torch.zeros_like(one))  # a single valid token: variance 0, value 0
    with pytest.raises(ValueError, match="baseline"):
        ADVANTAGES["reinforce_pp"](rewards=R, group_index=G, mask=MASK, baseline="mean")


# ---- gae ---------------------------------------------------------------------------------------------
def test_gae_hand_computed_with_a_tool_token():
    # one row: tokens 0, 2, 3 valid, token 1 is a tool token (mask 0); R = 1 on the last valid token
    # γ = 0.9, λ = 0.8, values [0.5, 9 (tool), 0.2, 0.1]
    #   t3: δ = 1 + 0 − 0.1 = 0.9                      A3 = 0.9
    #   t2: δ = 0 + 0.9·0.1 − 0.2 = −0.11             A2 = −0.11 + 0.72·0.9 = 0.538
    #   t1: tool token skipped (value and advantage carried over), output 0
    #   t0: δ = 0 + 0.9·0.2 − 0.5 = −0.32             A0 = −0.32 + 0.72·0.538 = 0.06736
    values = torch.tensor([[0.5, 9.0, 0.2, 0.1]], dtype=D)
    mask = torch.tensor([[1, 0, 1, 1]], dtype=D)
    a = ADVANTAGES["gae"](rewards=torch.tensor([1.0], dtype=D), group_index=torch.tensor([0]), mask=mask,
                          values=values, gamma=0.9, lam=0.8, normalize=False)
    assert torch.allclose(a, torch.tensor([[0.06736, 0.0, 0.538, 0.9]], dtype=D))
    _, ret = gae_advantages_and_returns(torch.tensor([[0, 0, 0, 1.0]], dtype=D), values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(ret, torch.tensor([[0.56736, 0.0, 0.738, 1.0]], dtype=D))  # A + V
    w = ADVANTAGES["gae"](rewards=torch.tensor([1.0], dtype=D), group_index=torch.tensor([0]), mask=mask,
                          values=values, gamma=0.9, lam=0.8)
    assert torch.allclose(w, whiten(a, mask))  # normalize=True (default) whitens over the batch


def test_gae_with_zero_values_and_gamma_lam_one_is_the_monte_carlo_return():
    a = ADVANTAGES["gae"](rewards=R, group_index=G, mask=MASK, values=torch.zeros(5, 3, dtype=D), normalize=False)
    b = ADVANTAGES["reinforce"](rewards=R, group_index=G, mask=MASK)
    assert torch.allclose(a, b)


def test_gae_without_a_critic_fails_loudly():
    with pytest.raises(ValueError, match="critic values"):
        ADVANTAGES["gae"](rewards=R, group_index=G, mask=MASK)
    with pytest.raises(ValueError, match="values/token_rewards"):
        ADVANTAGES["gae"](rewards=R, group_index=G, mask=MASK, values=torch.zeros(5, 2))


# ---- opmd_logavgexp / asymre -------------------------------------------------------------------------
def test_opmd_logavgexp_baseline():
    a = ADVANTAGES["opmd_logavgexp"](rewards=R, group_index=G, mask=MASK)
    b = math.log((2 * math.e + 2) / 4)  # τ log mean exp(R/τ), τ = 1: log((e + 1)/2) = 0.620115
    assert torch.allclose(seq(a), torch.tensor([1 - b, -b, -b, 1 - b, 0.0], dtype=D))
    # τ = 0.5: 0.5·log((2e² + 2)/4)
    a = ADVANTAGES["opmd_logavgexp"](rewards=R, group_index=G, mask=MASK, tau=0.5)
    b = 0.5 * math.log((2 * math.e ** 2 + 2) / 4)
    assert seq(a)[0].item() == pytest.approx(1 - b)


def test_opmd_logavgexp_limits_mean_and_max():
    big = ADVANTAGES["opmd_logavgexp"](rewards=R, group_index=G, mask=MASK, tau=1e6)
    assert torch.allclose(big, ADVANTAGES["dr_grpo"](rewards=R, group_index=G, mask=MASK), atol=1e-5)  # τ→∞: mean
    small = ADVANTAGES["opmd_logavgexp"](rewards=R, group_index=G, mask=MASK, tau=1e-3)
    assert torch.allclose(seq(small)[:4], R[:4] - 1.0, atol=1e-2)  # τ→0: baseline → max = 1
    with pytest.raises(ValueError, match="tau"):
        ADVANTAGES["opmd_logavgexp"](rewards=R, group_index=G, mask=MASK, tau=0.0)


def test_asymre_advantage_with_reinforce_equals_the_asymre_loss_with_dr_grpo():
    a = ADVANTAGES["asymre"](rewards=R, group_index=G, mask=MASK)
    assert torch.allclose(seq(a), torch.tensor([0.6, -0.4, -0.4, 0.6, 0.0], dtype=D))  # R − (0.5 − 0.1)
    logp = -torch.rand(4, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    m = MASK[:4]  # group 7 only (a singleton has advantage 0 here but −τ in the asymre loss)
    grads = []
    for name, adv in (("reinforce", a[:4]),
                      ("asymre", ADVANTAGES["dr_grpo"](rewards=R[:4], group_index=G[:4], mask=m))):
        lp = logp.clone().requires_grad_(True)
        loss, _ = POLICY_LOSSES[name](logp=lp, advantages=adv, mask=m)
        AGGREGATIONS["token-mean"](loss, m).backward()
        grads.append(lp.grad)
    assert torch.allclose(*grads)


# ---- optimal_baseline --------------------------------------------------------------------------------
def test_optimal_baseline_weights_rewards_by_squared_is_weight_times_squared_grad_norm():
    # group 7: w = [1, 2, 1, 1], ‖g‖ = [1, 1, 2, 1] → W = w²‖g‖² = [1, 4, 4, 1]
    # b* = (1·1 + 4·0 + 4·0 + 1·1)/10 = 0.2; population std of [1, 0, 0, 1] = 0.5
    # Â = (R − 0.2)/0.5 = [1.6, −0.4, −0.4, 1.6]; the singleton gets 0
    kw = dict(rewards=R, group_index=G, mask=MASK, log_weights=torch.tensor([0, math.log(2), 0, 0, 3.0], dtype=D),
              grad_norms=torch.tensor([1, 1, 2, 1, 7.0], dtype=D))
    a = ADVANTAGES["optimal_baseline"](**kw)
    assert torch.allclose(seq(a), torch.tensor([1.6, -0.4, -0.4, 1.6, 0.0], dtype=D))
    a = ADVANTAGES["optimal_baseline"](**kw, norm_by_std=False)
    assert torch.allclose(seq(a), torch.tensor([0.8, -0.2, -0.2, 0.8, 0.0], dtype=D))


def test_optimal_baseline_with_equal_weights_is_grpo_with_population_std():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 4, (9,), generator=g).to(D)
    gi = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    m = torch.ones(9, 2, dtype=D)
    a = ADVANTAGES["optimal_baseline"](rewards=r, group_index=gi, mask=m)
    b = ADVANTAGES["optimal_baseline"](rewards=r, group_index=gi, mask=m, grad_norms=torch.full((9,), 3.0, dtype=D),
                                       log_weights=torch.full((9,), -40.0, dtype=D))  # scale-free: same
    expected = torch.zeros(9, dtype=D)
    for k in range(3):  # naive loop
        x = r[3 * k:3 * k + 3]
        sd = x.std(unbiased=False)
        expected[3 * k:3 * k + 3] = (x - x.mean()) / sd if sd > 1e-8 else x - x.mean()
    assert torch.allclose(seq(a), expected) and torch.allclose(a, b)


def test_optimal_baseline_zero_grad_norms_fall_back_to_the_mean_and_bad_inputs_fail():
    a = ADVANTAGES["optimal_baseline"](rewards=R, group_index=G, mask=MASK, grad_norms=torch.zeros(5, dtype=D))
    assert torch.allclose(seq(a), torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0], dtype=D))
    with pytest.raises(ValueError, match="grad_norms"):
        ADVANTAGES["optimal_baseline"](rewards=R, group_index=G, mask=MASK, grad_norms=-torch.ones(5))
    with pytest.raises(ValueError, match="log_weights"):
        ADVANTAGES["optimal_baseline"](rewards=R, group_index=G, mask=MASK, log_weights=torch.zeros(4))


def test_declared_extra_inputs():
    assert ADVANTAGES["gae"].needs == ("values",)
    assert ADVANTAGES["optimal_baseline"].optional == ("log_weights", "grad_norms")
