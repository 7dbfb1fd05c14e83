"""Off-policy evaluation: hand-computed estimates, exact unbiasedness, CI coverage, numerics, scoring logs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from offpolicy.experience import Experience
from offpolicy.ope import (
    ESTIMATORS, dr_estimate, evaluate_offline, is_estimate, loo_baseline, pdis_estimate, snis_estimate,
    sndr_estimate, to_metrics,
)

L = math.log
D = torch.float64
approx = pytest.approx

# Four logged responses to two prompts.
#   w      = [2, 0.5, 1, 0.25]        Σw = 3.75, Σw² = 4 + 0.25 + 1 + 0.0625 = 5.3125
#   R      = [1, 0,   1, 1   ]        wR = [2, 0, 1, 0.25], ΣwR = 3.25
#   prompt = [0, 0,   1, 1   ]
LOG_W = torch.tensor([L(2.0), L(0.5), 0.0, L(0.25)], dtype=D)
R = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=D)
PROMPT = torch.tensor([0, 0, 1, 1])
ESS_ABS = 3.75**2 / 5.3125  # 2.6471


def test_is_and_snis_hand_computed():
    est = is_estimate(LOG_W, R)
    # IS = ΣwR / n = 3.25 / 4 = 0.8125; one prompt per row, so se = s(wR)/√4 with
    # s² = [(2−.8125)² + .8125² + .1875² + .5625²] / 3 = 2.421875 / 3
    assert est.value == approx(0.8125)
    assert est.stderr == approx(math.sqrt(2.421875 / 3 / 4))
    assert (est.ci_low, est.ci_high) == approx((0.8125 - 1.959964 * est.stderr, 0.8125 + 1.959964 * est.stderr))
    assert est.ess_abs == approx(ESS_ABS, rel=1e-6) and est.ess == approx(ESS_ABS / 4, rel=1e-6)
    assert (est.max_weight, est.weight_mean, est.n, est.n_prompts) == approx((2.0, 3.75 / 4, 4, 4))

    sn = snis_estimate(LOG_W, R)
    # SNIS = 3.25 / 3.75 = 0.8667. Delta-method se² = n/(n−1) Σ w²(R − V̂)² / (Σw)²
    #   Σ w²(R−V̂)² = 4(.1333)² + .25(.8667)² + 1(.1333)² + .0625(.1333)² = 0.26333
    v = 3.25 / 3.75
    s2 = (4 * (1 - v) ** 2 + 0.25 * v**2 + (1 - v) ** 2 + 0.0625 * (1 - v) ** 2) / 3.75**2 * 4 / 3
    assert sn.value == approx(v) and sn.stderr == approx(math.sqrt(s2))
    assert sn.ess == approx(est.ess)


def test_dr_and_sndr_hand_computed_with_leave_one_out_baseline():
    # b_i = mean reward of the *other* responses to the same prompt: [R1, R0, R3, R2] = [0, 1, 1, 1]
    assert loo_baseline(R, PROMPT).tolist() == [0.0, 1.0, 1.0, 1.0]
    dr = dr_estimate(LOG_W, R, prompt_ids=PROMPT)
    # b + w(R − b) = [0 + 2·1, 1 + .5·(−1), 1 + 0, 1 + 0] = [2, .5, 1, 1] → mean 1.125
    # per-prompt influence sums: prompt 0: (2 − 1.125) + (.5 − 1.125) = .25, prompt 1: −.25
    # se² = G/(G−1) · Σψ_g² / n² = 2 · .125 / 16 → se = .125
    assert dr.value == approx(1.125) and dr.stderr == approx(0.125) and dr.n_prompts == 2
    sndr = sndr_estimate(LOG_W, R, prompt_ids=PROMPT)
    # mean(b) + Σw(R−b)/Σw = .75 + (2 − .5)/3.75 = .75 + .4 = 1.15
    assert sndr.value == approx(1.15) and sndr.estimator == "sndr"
    assert dr.info == {"n_no_baseline": 0}


def test_dr_removes_weight_noise_on_prompts_with_constant_reward():
    # Every response to prompt 0 scores 1 and every response to prompt 1 scores 0: b_i = R_i, so each
    # DR term is b + w(R − b) = R exactly → DR = SNDR = .5 with zero spread, whatever the weights.
    # IS = (2·1 + .5·1 + 0 + 0)/4 = .625 pays the weight noise w·R on the solved prompt.
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D)
    dr, sndr = dr_estimate(LOG_W, rewards, prompt_ids=PROMPT), sndr_estimate(LOG_W, rewards, prompt_ids=PROMPT)
    assert (dr.value, sndr.value) == approx((0.5, 0.5)) and is_estimate(LOG_W, rewards).value == approx(0.625)
    # ψ_i = R_i − .5, per-prompt sums ψ_g = ±1: se = √(G/(G−1)·Σψ_g²)/n = √(2·2)/4 = .5, all from x
    assert dr.stderr == approx(0.5)


def test_loo_baseline_lone_response_gets_zero():
    # prompts [7, 7, 7, 9]: b_0 = (4 + 6)/2 = 5, b_1 = (2 + 6)/2 = 4, b_2 = (2 + 4)/2 = 3, lone prompt 9 → 0
    b = loo_baseline(torch.tensor([2.0, 4.0, 6.0, 8.0]), torch.tensor([7, 7, 7, 9]))
    assert b.tolist() == [5.0, 4.0, 3.0, 0.0]
    dr = dr_estimate(torch.zeros(4), torch.tensor([2.0, 4.0, 6.0, 8.0]), prompt_ids=torch.tensor([7, 7, 7, 9]))
    assert dr.info["n_no_baseline"] == 1 and dr.value == approx(5.0)  # on-policy: DR = mean R


@pytest.mark.parametrize("name", ["is", "snis", "dr", "sndr", "pdis"])
def test_on_policy_every_estimator_is_the_sample_mean_with_ess_one(name):
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.2], dtype=D)
    prompts = torch.tensor([0, 0, 1, 1, 2])
    if name == "pdis":
        est = pdis_estimate(torch.zeros(5, 3, dtype=D), torch.ones(5, 3), rewards, prompt_ids=prompts)
    else:
        est = ESTIMATORS[name](torch.zeros(5, dtype=D), rewards, prompt_ids=prompts)
    assert est.value == approx(0.54) and est.ess == approx(1.0) and est.ess_abs == approx(5.0)
    assert est.max_weight == approx(1.0) and est.weight_mean == approx(1.0)
    # same standard error too: every estimator's influence is R_i − R̄ when w ≡ 1
    sums = torch.tensor([1.0 - 2 * 0.54, 1.5 - 2 * 0.54, 0.2 - 0.54])
    assert est.stderr == approx(math.sqrt(3 / 2 * float((sums**2).sum())) / 5)


def test_estimators_are_exactly_unbiased_by_enumeration():
    # One prompt, arms a ∈ {0, 1}: μ = (.5, .5), π = (.8, .2), R(a) = (1, 0); V(π) = .8, V(μ) = .5.
    # Two logged responses: enumerate the 4 equally likely action pairs and average the estimates.
    mu, pi, reward = [0.5, 0.5], [0.8, 0.2], [1.0, 0.0]
    mean = {"is": 0.0, "dr": 0.0, "dr_in_sample": 0.0}
    for a in itertools.product([0, 1], repeat=2):
        log_w = torch.tensor([L(pi[i] / mu[i]) for i in a], dtype=D)
        rew = torch.tensor([reward[i] for i in a], dtype=D)
        mean["is"] += 0.25 * is_estimate(log_w, rew).value
        mean["dr"] += 0.25 * dr_estimate(log_w, rew, prompt_ids=torch.tensor([0, 0])).value
        b = rew.mean()  # the in-sample baseline contains R_i itself
        mean["dr_in_sample"] += 0.25 * float((b + log_w.exp() * (rew - b)).mean())
    # leave-one-out: unbiased; in-sample: V(π) − (V(π) − V(μ))/k = .8 − .3/2 = .65
    assert mean == approx({"is": 0.8, "dr": 0.8, "dr_in_sample": 0.65})


def test_pdis_token_rewards_hand_computed_and_outcome_reduces_to_is():
    # row 0: ρ = [2, (tool token, ratio 1 whatever logged), .5], r = [.5, 0, 1]
    #        cumulative weights [2, 2, 1] → Σ r_t W_t = 1 + 1 = 2
    # row 1: ρ = [.5, 4, (pad)],  r = [1, 0, 0]: cumulative [.5, 2, 2] → .5
    # PDIS = (2 + .5)/2 = 1.25, whereas IS with R = Σ_t r_t: (1·1.5 + 2·1)/2 = 1.75
    lr = torch.tensor([[L(2.0), 9.0, L(0.5)], [L(0.5), L(4.0), -9.0]], dtype=D)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    r_tok = torch.tensor([[0.5, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=D)
    est = pdis_estimate(lr, mask, token_rewards=r_tok)
    assert est.value == approx(1.25) and est.info == {"rewards": "token"}
    assert est.max_weight == approx(2.0)  # diagnostics of the full-sequence weights [1, 2]
    assert is_estimate(torch.tensor([0.0, L(2.0)]), r_tok.sum(1)).value == approx(1.75)
    # outcome rewards only: the single reward sits on the last token, weighted by the full product = IS
    g = torch.Generator().manual_seed(0)
    lr, mask, rew = torch.randn(6, 5, generator=g, dtype=D), torch.rand(6, 5, generator=g) > 0.3, torch.rand(6, dtype=D)
    out = pdis_estimate(lr, mask, rew)
    ref = is_estimate(torch.where(mask, lr, 0.0).sum(1), rew)
    assert (out.value, out.stderr, out.ess) == approx((ref.value, ref.stderr, ref.ess))


def test_pdis_is_unbiased_for_token_rewards_by_enumeration():
    # Two binary decisions; μ uniform, π(1) = .7 at each step, r_1 = y_1 and r_2 = y_1·y_2.
    # V(π) = E_π[y_1 + y_1 y_2] = .7 + .49 = 1.19. Exact expectation over the 4 sequences under μ.
    total = 0.0
    for y in itertools.product([0, 1], repeat=2):
        lr = torch.tensor([[L((0.7 if t else 0.3) / 0.5) for t in y]], dtype=D)
        r = torch.tensor([[y[0], y[0] * y[1]]], dtype=D)
        total += 0.25 * pdis_estimate(lr, torch.ones(1, 2), token_rewards=r).value
    assert total == approx(1.19)


def test_extreme_log_ratios_stay_finite():
    log_w = torch.tensor([50.0, -50.0, 0.0, 3.0])  # float32 input: e^50 squared would overflow float32
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5])
    prompts = torch.tensor([0, 0, 1, 1])
    for name in ("is", "snis", "dr", "sndr"):
        est = ESTIMATORS[name](log_w, rewards, prompt_ids=prompts, bootstrap=50)
        vals = [est.value, est.stderr, est.ci_low, est.ci_high, est.ess, est.boot_ci_low, est.boot_ci_high]
        assert all(math.isfinite(v) for v in vals), (name, est)
        assert est.ess == approx(0.25, rel=1e-4)  # one weight dominates: ESS → 1/n
    assert is_estimate(log_w, rewards).value == approx(math.exp(50) * 1.0 / 4, rel=1e-6)
    assert snis_estimate(log_w, rewards).value == approx(1.0)  # all the mass on row 0
    tok = torch.tensor([[25.0, 25.0], [-25.0, -25.0], [0.0, 0.0], [1.5, 1.5]])
    assert math.isfinite(pdis_estimate(tok, torch.ones(4, 2), rewards).stderr)
    # self-normalised ones are shift-invariant: finite for any finite log-ratio
    sn = snis_estimate(torch.tensor([1000.0, 999.0, -1000.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert sn.value == approx(1 / (1 + math.exp(-1))) and math.isfinite(sn.stderr)
    # a zero target probability (−inf) is a weight of 0, not an error
    assert is_estimate(torch.tensor([-math.inf, 0.0]), torch.tensor([5.0, 1.0])).value == approx(0.5)


def test_clip_caps_weights_and_is_reported():
    # clip = 1.5: w = [2, .5, 1, .25] → [1.5, .5, 1, .25]; IS = (1.5 + 0 + 1 + .25)/4 = .6875
    est = is_estimate(LOG_W, R, clip=1.5)
    assert est.value == approx(0.6875) and est.clip == 1.5 and est.n_clipped == 1
    assert est.max_weight == approx(1.5)
    assert is_estimate(LOG_W, R).clip is None and is_estimate(LOG_W, R).n_clipped == 0
    with pytest.raises(ValueError, match="clip"):
        is_estimate(LOG_W, R, clip=0.0)


def test_errors_are_clear():
    for name in ("is", "snis", "dr", "sndr"):
        with pytest.raises(ValueError, match="empty input"):
            ESTIMATORS[name](torch.zeros(0), torch.zeros(0), prompt_ids=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        pdis_estimate(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="prompt_ids"):
        dr_estimate(LOG_W, R)
    with pytest.raises(ValueError, match="NaN"):
        is_estimate(torch.tensor([0.0, math.nan]), torch.ones(2))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        snis_estimate(LOG_W, torch.ones(3))
    with pytest.raises(ValueError, match="every importance weight is 0"):
        snis_estimate(torch.full((2,), -math.inf), torch.ones(2))
    with pytest.raises(KeyError, match="valid names: dr, is, pdis, sndr, snis"):
        ESTIMATORS["wis"]
    assert math.isnan(is_estimate(LOG_W, R, prompt_ids=torch.zeros(4)).stderr)  # one prompt: no spread


def test_bootstrap_is_seeded_and_agrees_with_the_normal_interval():
    g = torch.Generator().manual_seed(1)
    log_w, rewards = 0.3 * torch.randn(400, generator=g, dtype=D), torch.rand(400, generator=g, dtype=D)
    prompts = torch.arange(100).repeat_interleave(4)
    a = snis_estimate(log_w, rewards, prompt_ids=prompts, bootstrap=500, seed=3)
    b = snis_estimate(log_w, rewards, prompt_ids=prompts, bootstrap=500, seed=3)
    c = snis_estimate(log_w, rewards, prompt_ids=prompts, bootstrap=500, seed=4)
    assert (a.boot_ci_low, a.boot_ci_high) == (b.boot_ci_low, b.boot_ci_high) != (c.boot_ci_low, c.boot_ci_high)
    assert a.n_boot == 500 and a.boot_ci_low < a.value < a.boot_ci_high
    width = a.ci_high - a.ci_low
    assert abs(a.boot_ci_low - a.ci_low) < 0.15 * width and abs(a.boot_ci_high - a.ci_high) < 0.15 * width


def test_two_armed_bandit_ci_covers_the_true_value():
    # Contexts x ∈ {0, 1} equally likely; 50 prompts × 4 logged responses per repetition, 200 repetitions.
    #   μ(a|x) = [[.5, .5], [.7, .3]],  π(a|x) = [[.8, .2], [.4, .6]],  P(R=1|x,a) = [[.2, .7], [.9, .4]]
    #   V(π) = .5(.8·.2 + .2·.7) + .5(.4·.9 + .6·.4) = .5·.30 + .5·.60 = .45   (V(μ) = .5·.45 + .5·.75 = .60)
    reps, G, k = 200, 50, 4
    mu, pi = torch.tensor([[0.5, 0.5], [0.7, 0.3]], dtype=D), torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=D)
    p_r = torch.tensor([[0.2, 0.7], [0.9, 0.4]], dtype=D)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(reps, G, 1, generator=g) < 0.5).long().expand(reps, G, k)  # (reps, G, k)
    a = (torch.rand(reps, G, k, generator=g, dtype=D) >= mu[x, 0]).long()  # arm 1 with prob μ(1|x)
    rewards = (torch.rand(reps, G, k, generator=g, dtype=D) < p_r[x, a]).to(D).reshape(reps, -1)
    log_w = (pi[x, a].log() - mu[x, a].log()).reshape(reps, -1)  # (reps, G·k)
    prompts = torch.arange(G).repeat_interleave(k)
    values: dict[str, list[float]] = {n: [] for n in ("is", "snis", "dr", "sndr", "pdis")}
    covered = dict.fromkeys(values, 0)
    for i in range(reps):
        for name in values:
            if name == "pdis":  # the action's log-ratio spread over 2 tokens
                est = pdis_estimate(log_w[i, :, None].expand(-1, 2) / 2, torch.ones(G * k, 2), rewards[i],
                                    prompt_ids=prompts)
            else:
                est = ESTIMATORS[name](log_w[i], rewards[i], prompt_ids=prompts)
            values[name].append(est.value)
            covered[name] += est.ci_low <= 0.45 <= est.ci_high
    for name in values:
        assert covered[name] / reps >= 0.9, (name, covered[name])
        assert abs(sum(values[name]) / reps - 0.45) < 0.02, name  # unbiased (or O(1/n)) on average


# ---- scoring logged experiences --------------------------------------------------------------------
def _logs(policy, n_prompts=3, k=2, shift=0.0):
    """Policy-sourced experiences whose behaviour log-probs are the policy's own minus ``shift`` per token."""
    from offpolicy.experience import collate

    exps = []
    for p in range(n_prompts):
        for j in range(k):
            prompt = policy.tokenizer.encode(f"{p}+{p}=")
            resp = policy.tokenizer.encode(str(p + j) * (1 + j))
            exps.append(Experience(prompt, resp, reward=float(j == 0), group_id=f"g{p}", task_id=f"t{p}"))
    batch = collate(exps, policy.tokenizer.pad_id)
    with torch.no_grad():
        logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len)
    for i, e in enumerate(exps):
        e.behavior_logprobs = (logp[i, : len(e.response_ids)] - shift).tolist()
    return exps


def test_evaluate_offline_on_policy_logs_and_skipped_rows(tiny_policy):
    exps = _logs(tiny_policy)
    expert = Experience([5, 6], [7, 8], reward=1.0, source="expert")
    offline = Experience([5, 6], [7], reward=1.0, source="offline")
    out = evaluate_offline(tiny_policy, [*exps, expert, offline], batch_size=4)
    assert (out["n"], out["n_skipped"], out["skipped"]) == (6, 2, {"expert": 1, "offline": 1})
    assert out["n_prompts"] == 3 and out["pdis_rewards"] == "outcome" and out["behavior_reward_mean"] == 0.5
    for name, est in out["estimates"].items():
        assert est.value == approx(0.5, abs=1e-5) and est.ess == approx(1.0, abs=1e-5), name
    assert evaluate_offline(tiny_policy, exps, group_by="group_id")["n_prompts"] == 3
    metrics = to_metrics(out)
    assert metrics["ope/snis/value"] == approx(0.5, abs=1e-5) and metrics["ope/n_skipped"] == 2.0


def test_evaluate_offline_weights_tool_tokens_and_temperature(tiny_policy):
    # behaviour log-probs lower by .1 per token → log w = .1·|y|; a tool token's bogus log-prob is ignored
    exps = _logs(tiny_policy, shift=0.1)
    exps[1].response_mask = [1] * (len(exps[1].response_ids) - 1) + [0]
    exps[1].behavior_logprobs[-1] = -50.0
    lengths = torch.tensor([sum(e.response_mask) for e in exps], dtype=D)
    rewards = torch.tensor([e.reward for e in exps], dtype=D)
    out = evaluate_offline(tiny_policy, exps, batch_size=5, estimators=("is", "dr"))
    assert set(out["estimates"]) == {"is", "dr"}
    assert out["estimates"]["is"].value == approx(float((torch.exp(0.1 * lengths) * rewards).mean()), rel=1e-4)
    hot = evaluate_offline(tiny_policy, _logs(tiny_policy), temperature=2.0, estimators=("snis",))
    assert hot["estimates"]["snis"].ess < 1.0  # logs sampled at T=1 are off-policy for T=2
    with pytest.raises(KeyError, match="valid names"):
        evaluate_offline(tiny_policy, exps, estimators=("nope",))


def test_evaluate_offline_needs_behaviour_logprobs(tiny_policy):
    with pytest.raises(ValueError, match="no experience has behaviour log-probs.*'expert': 1"):
        evaluate_offline(tiny_policy, [Experience([5], [6], source="expert")])
    with pytest.raises(ValueError, match="group_by"):
        evaluate_offline(tiny_policy, _logs(tiny_policy), group_by="user")


def test_evaluate_offline_refuses_untrustworthy_logs(tiny_policy):
    """Issue 11: ids outside the vocabulary used to end in an IndexError, positive log-probs were accepted."""
    V = tiny_policy.tokenizer.vocab_size
    with pytest.raises(ValueError, match=rf"experience 2: response_ids\[1\] = {V} is outside the vocabulary"):
        evaluate_offline(tiny_policy, [Experience([5], [6], behavior_logprobs=[-1.0]),
                                       Experience([5], [6, V], behavior_logprobs=[-1.0, -1.0])])
    with pytest.raises(ValueError, match=r"experience 1: behavior_logprobs\[0\] = 0.5 is positive"):
        evaluate_offline(tiny_policy, [Experience([5], [6], behavior_logprobs=[0.5])])
