"""One learner update: parameters move, metrics are finite, hyperparameters are checked, inputs are routed."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.config import ConfigError, OptimConfig, RLConfig
from offpolicy.experience import Experience, collate
from offpolicy.objectives import POLICY_LOSSES
from offpolicy.rollout.engines import SamplingParams, TinyEngine
from offpolicy.train.learner import Learner, make_optimizer, sft_update

PROMPTS = ["12+34=", "5+6=", "70+8="]
GROUP = 4


def rl(**kw) -> RLConfig:
    kw.setdefault("optim", OptimConfig(lr=1e-2))
    return RLConfig(**kw)


def rollout_batch(policy, *, shift: float = 0.0, expert_rows: int = 0, version: int = 0):
    """Sampled groups with distinct rewards (so group advantages are non-zero) and behaviour log-probs.

    ``shift`` is added to every behaviour log-prob (a stand-in for an engine that disagrees with the learner).
    """
    tok = policy.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS for _ in range(GROUP)]
    gens = TinyEngine(policy).sample(prompts, SamplingParams(max_new_tokens=5), seed=0)
    exps = [Experience(p, g.response_ids, reward=float(i % GROUP) / GROUP,
                       behavior_logprobs=[lp + shift for lp in g.logprobs], policy_version=version,
                       group_id=f"g{i // GROUP}")
            for i, (p, g) in enumerate(zip(prompts, gens))]
    for j in range(expert_rows):
        exps.append(Experience(tok.encode(PROMPTS[j]), tok.encode("46") + [tok.eos_id], reward=1.0, source="expert",
                               group_id=f"g{j}"))
    return collate(exps, tok.pad_id)


def params_of(policy):
    return [p.detach().clone() for p in policy.parameters()]


def changed(before, policy):
    return any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def all_finite(metrics):
    return all(torch.isfinite(v).all() for v in metrics.values())


def test_update_changes_parameters_and_reports_finite_metrics(tiny_policy):
    learner = Learner(tiny_policy, rl(), total_updates=2)
    before = params_of(tiny_policy)
    metrics = learner.update(rollout_batch(tiny_policy))
    assert changed(before, tiny_policy)
    assert learner.version == 1
    assert all_finite(metrics) and all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    for key in ("loss/policy", "loss/grad_norm", "loss/clip_frac", "loss/ratio_mean", "optim/lr", "policy/entropy",
                "adv/abs_mean", "offpolicy/ess", "offpolicy/ess_token", "offpolicy/staleness_mean",
                "offpolicy/staleness_max"):
        assert key in metrics, key
    # fresh rollouts from the same weights: on-policy, ratio 1, full ESS, staleness 0
    assert metrics["loss/ratio_mean"].item() == pytest.approx(1.0, abs=1e-4)
    assert metrics["offpolicy/ess"].item() == pytest.approx(1.0, abs=1e-3)
    assert metrics["offpolicy/staleness_mean"].item() == 0.0
    assert metrics["optim/lr"].item() == pytest.approx(1e-2)


def test_staleness_is_measured_against_the_learner_version(tiny_policy):
    learner = Learner(tiny_policy, rl(), total_updates=4)
    learner.version = 3
    metrics = learner.update(rollout_batch(tiny_policy, version=1))
    assert metrics["offpolicy/staleness_mean"].item() == pytest.approx(2.0)
    assert metrics["offpolicy/staleness_max"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("section,key", [("loss_params", "clip_hi"), ("advantage_params", "temperature")])
def test_unknown_hyperparameter_names_the_recipe_key(tiny_policy, section, key):
    with pytest.raises(ConfigError, match=rf"rl\.{section}\.{key}: not a hyperparameter of .*valid: \[") as err:
        Learner(tiny_policy, rl(**{section: {key: 0.3}}), total_updates=1)
    if section == "loss_params":
        assert "'clip_high'" in str(err.value) and "'old_logp'" not in str(err.value)  # tensors are not hyperparameters


def test_tensor_inputs_are_not_hyperparameters(tiny_policy):
    with pytest.raises(ConfigError, match=r"rl\.loss_params\.old_logp"):
        Learner(tiny_policy, rl(loss_params={"old_logp": 0.0}), total_updates=1)


@pytest.mark.parametrize("field,value,key", [("loss", "ppo_clipp", "rl.loss"), ("advantage", "gaee", "rl.advantage"),
                                             ("aggregation", "sum", "rl.aggregation"),
                                             ("correction", "tis", "rl.correction")])
def test_unknown_names_raise_config_errors_listing_valid_names(tiny_policy, field, value, key):
    with pytest.raises(ConfigError, match=rf"{key}: unknown .*valid names"):
        Learner(tiny_policy, rl(**{field: value}), total_updates=1)


def test_loss_params_reach_the_loss(tiny_policy):
    batch = rollout_batch(tiny_policy, shift=-1.0)  # behaviour ratio e^1 = 2.7 > 1 + clip_high on every token
    learner = Learner(tiny_policy, rl(old_logp="behavior", loss_params={"clip_high": 5.0, "clip_low": 0.2}),
                      total_updates=1)
    assert learner.update(batch)["loss/clip_frac_high"].item() == 0.0
    learner = Learner(tiny_policy, rl(old_logp="behavior", loss_params={"clip_high": 0.1}), total_updates=1)
    assert learner.update(batch)["loss/clip_frac_high"].item() > 0.0


def test_old_logp_behavior_uses_the_engines_logprobs(tiny_policy):
    batch = rollout_batch(tiny_policy, shift=-0.5)  # the engine claims every token is e^0.5 times less likely
    proximal = Learner(tiny_policy.copy(requires_grad=True), rl(), total_updates=1).update(batch)
    behaviour = Learner(tiny_policy.copy(requires_grad=True), rl(old_logp="behavior"), total_updates=1).update(batch)
    assert proximal["loss/ratio_mean"].item() == pytest.approx(1.0, abs=1e-4)
    assert behaviour["loss/ratio_mean"].item() == pytest.approx(math.exp(0.5), rel=1e-3)
    # the diagnostics always compare the current policy to the behaviour policy
    assert proximal["offpolicy/log_ratio_p50"].item() == pytest.approx(0.5, abs=1e-3)


def test_old_logp_behavior_refuses_expert_rows(tiny_policy):
    learner = Learner(tiny_policy, rl(old_logp="behavior"), total_updates=1)
    with pytest.raises(ValueError, match="old_logp='behavior'"):
        learner.update(rollout_batch(tiny_policy, expert_rows=2))


def test_loss_needing_behaviour_logprobs_refuses_expert_rows(tiny_policy, monkeypatch):
    def needs_behaviour(*, logp, advantages, mask, behavior_logp):
        return -(advantages * logp) * mask, {}

    monkeypatch.setitem(POLICY_LOSSES, "_needs_behaviour", needs_behaviour)
    for attr, value in (("needs", ("behavior_logp",)), ("default_agg", "token-mean"),
                        ("registry_name", "_needs_behaviour")):
        setattr(needs_behaviour, attr, value)
    learner = Learner(tiny_policy, rl(loss="_needs_behaviour"), total_updates=1)
    with pytest.raises(ValueError, match="needs behaviour log-probs"):
        learner.update(rollout_batch(tiny_policy, expert_rows=1))
    learner.update(rollout_batch(tiny_policy))  # fine without expert rows


def test_only_the_needed_forward_passes_run(tiny_policy, monkeypatch):
    calls = []
    original = type(tiny_policy).response_logprobs

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_policy), "response_logprobs", counting)
    batch = rollout_batch(tiny_policy)
    Learner(tiny_policy, rl(loss="reinforce"), total_updates=1).update(batch)
    assert len(calls) == 1  # no proximal pass, no reference model
    calls.clear()
    Learner(tiny_policy, rl(loss="ppo_clip"), total_updates=1).update(batch)
    assert len(calls) == 1  # the proximal policy is the current one: its log-probs are the update's, detached
    calls.clear()
    learner = Learner(tiny_policy, rl(loss="ppo_clip", old_logp="behavior"), total_updates=1)
    learner.update(batch)
    assert len(calls) == 1  # the engine's log-probs stand in for the proximal pass
    calls.clear()
    learner = Learner(tiny_policy, rl(loss="reinforce", kl_coef=0.1), total_updates=1)
    learner.update(batch)
    assert len(calls) == 2 and calls[0] is learner.ref_policy  # + the frozen reference


def test_kl_to_reference(tiny_policy):
    learner = Learner(tiny_policy, rl(kl_coef=0.1), total_updates=3)
    assert learner.ref_policy is not None and not any(p.requires_grad for p in learner.ref_policy.parameters())
    batch = rollout_batch(tiny_policy)
    first = learner.update(batch)
    assert first["loss/kl_ref"].item() == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    second = learner.update(batch)
    assert second["loss/kl_ref"].item() > 0.0 and all_finite(second)


def test_grpo_gets_its_optional_reference(tiny_policy):
    # grpo takes ref_logp optionally and adds β·KL itself (kl_coef=0.04 by default): the learner must provide it
    learner = Learner(tiny_policy, rl(loss="grpo"), total_updates=2)
    assert learner.ref_policy is not None
    batch = rollout_batch(tiny_policy)
    learner.update(batch)
    metrics = learner.update(batch)
    assert metrics["loss/kl_ref"].item() > 0.0


def test_grpo_without_its_kl_needs_no_reference(tiny_policy):
    learner = Learner(tiny_policy, rl(loss="grpo", loss_params={"kl_coef": 0.0}), total_updates=1)
    assert learner.ref_policy is None
    assert "loss/kl_ref" not in learner.update(rollout_batch(tiny_policy))


def test_grpo_kl_and_the_learners_kl_are_not_both_counted(tiny_policy):
    with pytest.raises(ConfigError, match="rl.kl_coef"):
        Learner(tiny_policy, rl(loss="grpo", kl_coef=0.1), total_updates=1)
    Learner(tiny_policy, rl(loss="grpo", kl_coef=0.1, loss_params={"kl_coef": 0.0}), total_updates=1)


def test_correction_weights_are_applied_and_reported(tiny_policy):
    learner = Learner(tiny_policy, rl(correction="tis_token"), total_updates=1)
    metrics = learner.update(rollout_batch(tiny_policy, shift=-0.3))
    assert any(k.startswith("correction/") for k in metrics) and all_finite(metrics)


def test_state_dict_round_trip(tiny_policy):
    learner = Learner(tiny_policy, rl(optim=OptimConfig(lr=1e-2, warmup_steps=3)), total_updates=5)
    learner.update(rollout_batch(tiny_policy))
    state = learner.state_dict()
    other = Learner(tiny_policy.copy(requires_grad=True), rl(optim=OptimConfig(lr=1e-2, warmup_steps=3)),
                    total_updates=5)
    other.load_state_dict(state)
    assert other.version == 1
    assert other.sched.get_last_lr() == learner.sched.get_last_lr()
    assert other.opt.state_dict()["state"].keys() == learner.opt.state_dict()["state"].keys()


def test_sft_update_lowers_the_nll(tiny_policy):
    tok = tiny_policy.tokenizer
    exps = [Experience(tok.encode(f"{a}+{a}="), tok.encode(str(2 * a)) + [tok.eos_id], source="expert")
            for a in range(10, 18)]
    batch = collate(exps, tok.pad_id)
    opt, sched = make_optimizer(tiny_policy.parameters(), OptimConfig(lr=1e-2), 10)
    losses = [sft_update(tiny_policy, batch, opt, sched, 1.0)["sft/loss"].item() for _ in range(5)]
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.775, 0.55, 0.325]),  # peak at the end of warm-up, floor at total_steps
    ("cosine", [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318]),
])
def test_schedules_are_step_based(tiny_policy, schedule, expected):
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    opt, sched = make_optimizer(tiny_policy.parameters(), cfg, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected, abs=1e-4)


def test_proximal_old_logp_reuses_the_update_forward_pass(tiny_policy, monkeypatch):
    """Skipping the separate proximal pass changes nothing: same loss, ratio, gradient step."""
    batch = rollout_batch(tiny_policy, shift=-0.3)
    fast = Learner(tiny_policy.copy(requires_grad=True), rl(loss="ppo_clip"), total_updates=1)
    monkeypatch.setattr("offpolicy.train.learner.has_active_dropout", lambda model: True)  # forces the 2nd pass
    slow = Learner(tiny_policy.copy(requires_grad=True), rl(loss="ppo_clip"), total_updates=1)  # decided here
    monkeypatch.undo()
    assert (fast.old_logp_from, slow.old_logp_from) == ("current", "proximal")
    m_slow = slow.update(batch)
    m_fast = fast.update(batch)
    for key in ("loss/policy", "loss/ratio_mean", "loss/grad_norm"):
        assert m_fast[key].item() == pytest.approx(m_slow[key].item(), rel=1e-5, abs=1e-7)
    for a, b in zip(fast.policy.parameters(), slow.policy.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_dropout_in_training_mode_keeps_the_proximal_pass():
    from offpolicy.train.learner import has_active_dropout

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    assert has_active_dropout(model)
    assert not has_active_dropout(model.eval())
    assert not has_active_dropout(torch.nn.Sequential(torch.nn.Dropout(0.0)).train())


PSR = {"neg_low": 0.0, "neg_high": 0.0}  # TOPR with negative weight 0: negatives' loss is exactly 0


@pytest.mark.parametrize("loss,params,uninformative", [("topr", PSR, False), ("reinforce", {}, True),
                                                        ("ppo_clip", {}, True), ("cispo", {}, True)])
def test_skipping_zero_loss_rows_gives_the_same_step(tiny_policy, monkeypatch, loss, params, uninformative):
    """Rows the loss declares zero (PSR's negatives, Â = 0 rows) are not forwarded; loss, gradient and
    the optimizer step equal the full batch's."""
    batch = rollout_batch(tiny_policy, shift=-0.2)
    if uninformative:  # group 0 gets equal rewards: Â = 0 on its rows
        batch.rewards[:GROUP] = 0.5
    rows_seen = []
    original = type(tiny_policy).response_logprobs

    def counting(self, input_ids, *args, **kwargs):
        rows_seen.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(tiny_policy), "response_logprobs", counting)
    fast = Learner(tiny_policy.copy(requires_grad=True), rl(loss=loss, loss_params=params), total_updates=1)
    full = Learner(tiny_policy.copy(requires_grad=True), rl(loss=loss, loss_params=params, skip_zero_rows=False),
                   total_updates=1)
    grads = {}
    for name, lrn in (("fast", fast), ("full", full)):  # the gradients the optimizer receives
        lrn.opt.register_step_pre_hook(
            lambda opt, args, kwargs, _n=name: grads.__setitem__(_n, [p.grad.clone() for g in opt.param_groups
                                                                       for p in g["params"]]))
    m_fast, m_full = fast.update(batch), full.update(batch)
    n = batch.input_ids.shape[0]
    expected = n - GROUP if uninformative else n // 2  # rewards 0, .25, .5, .75 per group: two negatives each
    assert rows_seen == [expected, n]
    assert m_fast["train/active_row_frac"].item() == pytest.approx(expected / n)
    assert m_full["train/active_row_frac"].item() == 1.0
    assert m_full["train/active_tokens"].item() == batch.mask.sum().item()
    assert m_fast["train/active_tokens"].item() < m_full["train/active_tokens"].item()
    for key in ("loss/policy", "loss/grad_norm"):
        assert m_fast[key].item() == pytest.approx(m_full[key].item(), rel=1e-5, abs=1e-7)
    for a, b in zip(grads["fast"], grads["full"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_all_rows_zero_still_takes_the_same_optimizer_step(tiny_policy):
    """Adam moves weights on zero gradients too (momentum): one row is kept so the step matches."""
    batch = rollout_batch(tiny_policy)
    learners = [Learner(tiny_policy.copy(requires_grad=True), rl(loss="reinforce", skip_zero_rows=skip),
                        total_updates=2) for skip in (True, False)]
    for lrn in learners:
        lrn.update(batch)  # momentum from a real step
    batch.rewards[:] = 1.0  # every group uninformative: Â = 0 everywhere
    metrics = [lrn.update(batch) for lrn in learners]
    assert metrics[0]["train/active_row_frac"].item() == pytest.approx(1 / batch.input_ids.shape[0])
    assert metrics[0]["loss/grad_norm"].item() == 0.0
    for a, b in zip(learners[0].policy.parameters(), learners[1].policy.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_rows_are_not_skipped_when_a_kl_term_reads_them(tiny_policy):
    learner = Learner(tiny_policy.copy(requires_grad=True), rl(loss="topr", loss_params=PSR, kl_coef=0.1),
                      total_updates=1)
    assert learner.update(rollout_batch(tiny_policy))["train/active_row_frac"].item() == 1.0


def test_zero_rows_with_the_proximal_old_logp_keep_every_metric(tiny_policy):
    """ppo_clip with old_logp = the update's own pass: skipped Â = 0 rows have ratio 1 either way, so the
    loss metrics match the full batch's too."""
    batch = rollout_batch(tiny_policy, shift=-0.2)
    batch.rewards[:GROUP] = 0.5  # group 0 uninformative
    fast = Learner(tiny_policy.copy(requires_grad=True), rl(loss="ppo_clip"), total_updates=1)
    full = Learner(tiny_policy.copy(requires_grad=True), rl(loss="ppo_clip", skip_zero_rows=False), total_updates=1)
    m_fast, m_full = fast.update(batch), full.update(batch)
    assert m_fast["train/active_row_frac"].item() < 1.0
    for key in ("loss/policy", "loss/grad_norm", "loss/ratio_mean", "loss/clip_frac", "loss/approx_kl"):
        if key in m_full:
            assert m_fast[key].item() == pytest.approx(m_full[key].item(), rel=1e-5, abs=1e-6), key


def test_tempo_gets_the_responses_with_padding_marked(tiny_policy, monkeypatch):
    from offpolicy.objectives import ADVANTAGES
    seen = {}
    real = ADVANTAGES["tempo"]

    def spy(**kw):
        seen.update(kw)
        return real(**kw)
    for attr in ("needs", "paper", "summary"):
        setattr(spy, attr, getattr(real, attr))
    monkeypatch.setitem(ADVANTAGES, "tempo", spy)
    learner = Learner(tiny_policy, rl(advantage="tempo"), total_updates=1)
    tok = tiny_policy.tokenizer
    answers = ["46", "47", "4", "5"]  # different lengths, shared prefixes
    batch = collate([Experience(tok.encode("12+34="), tok.encode(a) + [tok.eos_id], reward=float(a == "46"),
                                behavior_logprobs=[-1.0] * (len(a) + 1), group_id="g") for a in answers], tok.pad_id)
    metrics = learner.update(batch)
    assert all_finite(metrics)
    ids, pad = seen["response_ids"], ~batch.attention_mask[:, batch.prompt_len:]
    assert pad.any()  # some responses are shorter than others
    assert torch.equal(ids[pad], torch.full_like(ids[pad], -1)) and torch.equal(ids[~pad], batch.response_ids[~pad])


# ---- device / dtype ----------------------------------------------------------------------------------
def test_bfloat16_learner_step_runs_with_finite_metrics(tiny_policy):
    learner = Learner(tiny_policy, rl(), total_updates=2, device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in tiny_policy.parameters())
    before = params_of(tiny_policy)
    metrics = learner.update(rollout_batch(tiny_policy))
    assert changed(before, tiny_policy) and all_finite(metrics)


def test_device_and_dtype_move_the_anchors_and_name_the_key(tiny_policy):
    learner = Learner(tiny_policy, rl(kl_coef=0.1), total_updates=1, device=torch.device("cpu"), dtype="float64")
    assert all(p.dtype == torch.float64 for p in learner.ref_policy.parameters())
    assert all_finite(learner.update(rollout_batch(tiny_policy)))
    with pytest.raises(ConfigError, match="run.dtype"):
        Learner(tiny_policy, rl(), total_updates=1, dtype="float8")


def test_batch_to_its_own_device_is_no_copy(tiny_policy):
    batch = rollout_batch(tiny_policy)
    assert batch.to("cpu") is batch


# ---- no silent fallbacks -------------------------------------------------------------------------------
def test_one_expert_row_keeps_the_batchs_behaviour_logprobs_and_diagnostics(tiny_policy):
    batch = rollout_batch(tiny_policy, expert_rows=1)
    assert batch.behavior_logp is not None
    assert batch.has_behavior.tolist() == [True] * (len(PROMPTS) * GROUP) + [False]
    assert batch.is_expert.tolist() == [False] * (len(PROMPTS) * GROUP) + [True]
    metrics = Learner(tiny_policy, rl(loss="chord"), total_updates=1).update(batch)
    # fresh rollouts: ESS over the policy's rows is 1; the expert row (no behaviour policy) is left out
    assert metrics["offpolicy/ess"].item() == pytest.approx(1.0, abs=1e-3)
    assert metrics["offpolicy/log_ratio_max"].item() == pytest.approx(0.0, abs=1e-3)


def test_offline_rows_with_behaviour_logprobs_are_not_expert_rows(tiny_policy):
    tok = tiny_policy.tokenizer
    rows = [Experience(tok.encode("1+1="), tok.encode("2"), source="offline", behavior_logprobs=[-1.0]),
            Experience(tok.encode("1+1="), tok.encode("2"), source="offline"),
            Experience(tok.encode("1+1="), tok.encode("2"), source="expert")]
    batch = collate(rows, tok.pad_id)
    assert batch.is_expert.tolist() == [False, True, True]
    assert batch.has_behavior.tolist() == [True, False, False]
    assert collate(rows[1:], tok.pad_id).behavior_logp is None  # no row has them: nothing to keep


def test_a_correction_needing_turn_ids_refuses_data_without_them(tiny_policy):
    learner = Learner(tiny_policy, rl(correction="turn_level"), total_updates=2)
    with pytest.raises(ValueError, match="rl.correction: 'turn_level' needs turn_ids"):
        learner.update(rollout_batch(tiny_policy))
    tok = tiny_policy.tokenizer
    batch = collate([Experience(tok.encode("1+1="), tok.encode("2+3"), reward=float(i), group_id="g",
                                behavior_logprobs=[-1.0, -2.0, -1.5], turn_ids=[0, 1, 1]) for i in range(2)],
                    tok.pad_id)
    assert any(k.startswith("correction/") for k in learner.update(batch))


def test_a_correction_refuses_rows_without_behaviour_logprobs(tiny_policy):
    learner = Learner(tiny_policy, rl(loss="chord", correction="tis_token"), total_updates=1)
    with pytest.raises(ValueError, match="rl.correction"):
        learner.update(rollout_batch(tiny_policy, expert_rows=1))


def test_vcpo_lr_never_assumes_full_ess(tiny_policy):
    tok = tiny_policy.tokenizer
    experts = collate([Experience(tok.encode("1+1="), tok.encode("2"), reward=float(i), source="expert",
                                  group_id="g") for i in range(2)], tok.pad_id)
    learner = Learner(tiny_policy, rl(loss="chord", controllers={"vcpo_lr": {}}), total_updates=1)
    with pytest.raises(ValueError, match="rl.controllers.vcpo_lr"):
        learner.update(experts)


# ---- controllers ---------------------------------------------------------------------------------------
def test_a_new_controller_is_one_class_and_one_registry_line(tiny_policy, monkeypatch):
    from offpolicy.train.controllers import CONTROLLERS, Controller

    class HalfLr(Controller):  # lr x 0.5 on every step; clip_high from a schedule
        provides, loss_param = frozenset({"lr_scale", "loss_params"}), "clip_high"

        def __init__(self, *, clip_high: float = 0.3) -> None:
            self.clip_high, self.updates = clip_high, 0

        def before_update(self, step, version):
            return {"loss_params": {"clip_high": self.clip_high}}

        def before_step(self, metrics):
            return {"lr_scale": 0.5}

        def after_update(self, metrics):
            self.updates += 1
            return {"ctl/updates": torch.tensor(float(self.updates))}

        def state_dict(self):
            return {"updates": self.updates}

        def load_state_dict(self, state):
            self.updates = state["updates"]

    monkeypatch.setitem(CONTROLLERS, "half_lr", HalfLr)
    batch = rollout_batch(tiny_policy, shift=-0.3)
    plain = Learner(tiny_policy.copy(requires_grad=True), rl(loss_params={"clip_high": 0.3}), total_updates=1)
    half = Learner(tiny_policy.copy(requires_grad=True), rl(controllers={"half_lr": {}}), total_updates=1)
    start = params_of(plain.policy)
    m_plain, m_half = plain.update(batch), half.update(batch)
    assert m_half["ctl/updates"].item() == 1.0 and half.state_dict()["controllers"]["half_lr"] == {"updates": 1}
    assert m_half["loss/clip_frac"].item() == pytest.approx(m_plain["loss/clip_frac"].item())
    assert half.opt.param_groups[0]["lr"] == plain.opt.param_groups[0]["lr"]  # restored after the step
    for s, a, b in zip(start, plain.policy.parameters(), half.policy.parameters()):  # Adam: step ∝ lr
        assert torch.allclose(b - s, 0.5 * (a - s), atol=1e-6)
    with pytest.raises(ConfigError, match="rl.loss_params.clip_high: set by the half_lr controller"):
        Learner(tiny_policy, rl(loss_params={"clip_high": 0.3}, controllers={"half_lr": {}}), total_updates=1)
    with pytest.raises(ConfigError, match="rl.controllers.vcpo_lr: sets lr_scale, which half_lr already sets"):
        Learner(tiny_policy, rl(controllers={"half_lr": {}, "vcpo_lr": {}}), total_updates=1)


def test_no_controller_is_named_in_the_learner():
    import inspect as _inspect

    import offpolicy.train.learner as learner_module
    from offpolicy.train.controllers import CONTROLLERS
    source = _inspect.getsource(learner_module)
    assert not [name for name in CONTROLLERS if name in source]


def test_sampler_params_come_from_the_controllers(tiny_policy):
    from offpolicy.config import BufferConfig
    cfg = rl(loss="remix_ppg", kl_coef=0.05, controllers={"remix": {"reincarnate_at": 1, "p_off": 0.4}},
             buffer=BufferConfig(sampling="recent_mix", sampling_params={"p_off": 0.4, "window": 2}))
    learner = Learner(tiny_policy, cfg, total_updates=2)
    assert learner.sampler_params() == {"p_off": 0.4, "window": 2}
    learner.update(rollout_batch(tiny_policy))
    learner.end_rollout_step()  # t reaches reincarnate_at: pi_base <- pi_T, on-policy data from now on
    assert learner.sampler_params() == {"p_off": 0.0, "window": 2}
    assert Learner(tiny_policy, rl(), total_updates=1).sampler_params() == {}


def test_expert_rows_do_not_count_as_stale(tiny_policy):
    learner = Learner(tiny_policy, rl(loss="chord"), total_updates=4)
    learner.version = 3
    metrics = learner.update(rollout_batch(tiny_policy, expert_rows=2, version=3))
    assert metrics["offpolicy/staleness_max"].item() == 0.0  # the expert rows' version 0 is not a lag of 3
