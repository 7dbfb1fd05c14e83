"""Stateful controllers: values at given steps (worked out in comments) and exact state round trips."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.train.controllers import (AdaptiveKL, ChordMuSchedule, EwmaProximal, MdpoAnneal, ReMixSchedule,
                                         VcpoLrScale)


def advance(ctl, n, *args):
    for _ in range(n):
        ctl.step(*args)
    return ctl


def test_chord_mu_schedule_values_and_state():
    ctl = ChordMuSchedule(warmup_steps=10, decay_steps=20, peak=0.8, valley=0.1)
    assert ctl.mu == 0.0  # s = 0: peak·0/10
    assert advance(ctl, 5).mu == pytest.approx(0.4)  # s = 5: 0.8·5/10
    assert advance(ctl, 5).mu == pytest.approx(0.8)  # s = 10: start of the cosine, cos 0 = 1
    assert advance(ctl, 10).loss_params() == {"mu": pytest.approx(0.45)}  # s = 20: 0.1 + 0.7·½(1 + cos π/2)
    assert advance(ctl, 10).mu == pytest.approx(0.1)  # s = 30: valley
    other = ChordMuSchedule(warmup_steps=10, decay_steps=20, peak=0.8, valley=0.1)
    other.load_state_dict(ctl.state_dict())
    assert other.mu == ctl.mu and other.steps == 30
    assert ChordMuSchedule().mu == pytest.approx(0.9)  # CHORD-μ defaults: no warm-up, starts at the peak


def test_vcpo_lr_scale_sqrt_rule_and_restore():
    ctl = VcpoLrScale()
    assert ctl.scale(0.25) == pytest.approx(0.5)  # √min(1, 0.25/1)
    assert ctl.scale(torch.tensor(2.0)) == 1.0  # ESS ratio above the base: no change
    assert VcpoLrScale(rule="linear").scale(0.25) == pytest.approx(0.25)
    assert VcpoLrScale(base_ess_ratio=0.5).scale(0.25) == pytest.approx(math.sqrt(0.5))
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.tensor([1.0])
    with ctl.scaled(opt, torch.tensor(0.25)) as s:
        assert s == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
        opt.step()
    assert p.item() == pytest.approx(0.95)  # 1 − 0.05·1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # restored
    other = VcpoLrScale()
    other.load_state_dict(ctl.state_dict())
    assert other.last_scale == pytest.approx(0.5)


def test_mdpo_anneal_linear_t():
    ctl = MdpoAnneal(total_iterations=4)
    # t_k = 1 − (k − 1)/4: k = 1 → 1, k = 2 → 0.75, k = 4 → 0.25; kl_coef = 1/t_k
    assert ctl.loss_params() == {"kl_coef": 1.0}
    assert advance(ctl, 1).loss_params()["kl_coef"] == pytest.approx(4 / 3)
    assert advance(ctl, 2).loss_params()["kl_coef"] == pytest.approx(4.0)
    assert advance(ctl, 3).loss_params()["kl_coef"] == pytest.approx(4.0)  # past K: held at K
    other = MdpoAnneal(total_iterations=4)
    other.load_state_dict(ctl.state_dict())
    assert other.iteration == 7 and other.t == ctl.t


def test_adaptive_kl_rules():
    ctl = AdaptiveKL(init_coef=0.001, target=0.1, horizon=100)
    ctl.step(0.15)  # e = clip(0.15/0.1 − 1, ±0.2) = 0.2 → β·(1 + 0.2·1/100)
    assert ctl.value == pytest.approx(0.001 * 1.002)
    ctl.step(torch.tensor(0.09), n_steps=10)  # e = −0.1 → β·(1 − 0.1·10/100)
    assert ctl.value == pytest.approx(0.001 * 1.002 * 0.99)
    ppo = AdaptiveKL(init_coef=1.0, target=0.1, rule="ppo")
    ppo.step(0.2)  # > 1.5·target: double
    assert ppo.value == 2.0
    ppo.step(0.05)  # < target/1.5: halve
    ppo.step(0.1)  # in between: unchanged
    assert ppo.loss_params() == {"kl_coef": 1.0}
    other = AdaptiveKL()
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    with pytest.raises(ValueError, match="non-finite"):
        ctl.step(float("nan"))


def test_remix_kl_convex_weight_and_reincarnation():
    ctl = ReMixSchedule()
    # λ(t) = max(1 − 0.1⌈max(t − 50, 0)/10⌉, 0.5)
    for t, lam in ((0, 1.0), (50, 1.0), (51, 0.9), (60, 0.9), (61, 0.8), (90, 0.6), (91, 0.5), (500, 0.5)):
        assert ctl.lam(t) == pytest.approx(lam), t
    assert ctl.kl_weights() == (1.0, 0.0)
    g = torch.Generator().manual_seed(0)
    lags = [ctl.draw_lag(g) for _ in range(2000)]
    assert set(lags) == {0, 1, 2} and abs(sum(x > 0 for x in lags) / 2000 - 0.4) < 0.05  # p = 0.4, N = 2
    advance(ctl, 49)
    assert not ctl.should_reincarnate()
    advance(ctl, 1)  # t = T = 50
    assert ctl.should_reincarnate()
    ctl.reincarnate()
    assert not ctl.should_reincarnate() and ctl.off_policy_prob == 0.0
    assert all(ctl.draw_lag(g) == 0 for _ in range(50))  # pure on-policy after reincarnation
    advance(ctl, 11)  # t = 61
    assert ctl.kl_weights() == (pytest.approx(0.8), pytest.approx(0.2))
    other = ReMixSchedule()
    other.load_state_dict(ctl.state_dict())
    assert other.t == 61 and other.reincarnated and other.lam() == ctl.lam()


def test_ewma_proximal_bias_corrected_average_and_state():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ewma = EwmaProximal(model, decay=0.5)
    assert not any(p.requires_grad for p in ewma.module.parameters())
    with torch.no_grad():
        model.weight.fill_(1.0)
    ewma.update(model)
    # W = 0.5·1 + 1 = 1.5; θ = 0·(0.5/1.5) + 1/1.5 = 2/3
    assert ewma.module.weight.item() == pytest.approx(2 / 3)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ewma.update(model)
    # = (0.25·0 + 0.5·1 + 4)/(0.25 + 0.5 + 1) = 4.5/1.75 = 18/7
    assert ewma.module.weight.item() == pytest.approx(18 / 7)
    fresh = EwmaProximal(torch.nn.Linear(1, 1, bias=False))
    fresh.load_state_dict(ewma.state_dict())
    assert fresh.module.weight.item() == pytest.approx(18 / 7) and fresh.total_weight == ewma.total_weight
    assert fresh.decay == 0.5
    with pytest.raises(ValueError, match="decay"):
        EwmaProximal(model, decay=1.0)


def test_load_state_dict_names_missing_keys():
    with pytest.raises(KeyError, match="steps"):
        ChordMuSchedule().load_state_dict({})
