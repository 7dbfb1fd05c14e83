"""The learner wiring of issue 3: controllers, corrections with extra inputs, RED-Drop, expert mixing.

Each configuration runs 2-3 RL steps of the tiny model; the checks are that the configured part
really acted (its metric moves, its state is checkpointed) and that the weights changed.
"""

from __future__ import annotations

import math

import torch

import pytest

from offpolicy.config import ConfigError
from offpolicy.objectives import CORRECTIONS
from offpolicy.policy.model import load_policy
from offpolicy.report.metrics import read_metrics
from offpolicy.train.checkpoint import load_checkpoint
from offpolicy.train.runner import train

from test_runner import assert_finite, initial_weights, weights_changed


def rl_rows(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "rl" and "reward/mean" in r]


def run(tmp_path, tiny_config, reward_spec, name, *extra, steps=3):
    out = tmp_path / name
    cfg = tiny_config(out, f"rl.steps={steps}", f"task.reward={reward_spec}", "rl.drop_uninformative_groups=false",
                      "eval.n_problems=2", "eval.samples=0", *extra)
    train(cfg)
    rows = rl_rows(out)
    assert len(rows) == steps
    for r in rows:
        assert_finite(r)
    assert weights_changed(initial_weights(cfg), load_policy(out / "checkpoints" / "final").model.state_dict())
    return out, rows


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_every_correction_trains(tmp_path, tiny_config, reward_spec, name):
    if "turn_ids" in getattr(CORRECTIONS[name], "needs", ()):  # single-turn rollouts carry no turn ids
        with pytest.raises(ValueError, match="needs turn_ids"):
            run(tmp_path, tiny_config, reward_spec, name, f"rl.correction={name}")
        return
    _, rows = run(tmp_path, tiny_config, reward_spec, name, f"rl.correction={name}", "rl.updates_per_step=2")
    assert any(k.startswith("correction/") for k in rows[-1])


def test_decoupled_correction_separates_mismatch_and_staleness(tmp_path, tiny_config, reward_spec):
    # the runner records the trainer's log-probs at the behaviour version (snapshot version tracking)
    _, rows = run(tmp_path, tiny_config, reward_spec, "dec", "rl.correction=decoupled", "rl.updates_per_step=3",
                  "rl.buffer.max_staleness=4")
    keys = [k for k in rows[-1] if k.startswith("correction/")]
    assert any("mismatch" in k for k in keys) and any("stale" in k for k in keys), keys


def test_chord_mu_schedule_with_expert_traces(tmp_path, tiny_config, reward_spec):
    out, rows = run(tmp_path, tiny_config, reward_spec, "chord", "rl.loss=chord", "rl.expert_per_group=1",
                    "rl.controllers={chord_mu: {warmup_steps: 0, decay_steps: 4, peak: 0.9, valley: 0.05}}",
                    "run.checkpoint_every=1")
    mus = [r["loss/chord_mu"] for r in rows]
    assert mus[0] > mus[-1] >= 0.05  # cosine decay from the peak towards the valley
    _, state = load_checkpoint(sorted((out / "checkpoints").glob("step_rl_*"))[-1])
    assert "chord_mu" in state["stage_state"]["learner"]["controllers"]


def test_luffy_mixes_one_expert_trace_per_group(tmp_path, tiny_config, reward_spec):
    run(tmp_path, tiny_config, reward_spec, "luffy", "rl.loss=luffy", "rl.expert_per_group=1")


def test_mdpo_anneal_raises_kl_coefficient(tmp_path, tiny_config, reward_spec):
    run(tmp_path, tiny_config, reward_spec, "mdpo", "rl.loss=mdpo", "rl.old_logp=behavior",
        "rl.controllers={mdpo_anneal: {}}")


def test_adaptive_kl_controls_the_reference_term(tmp_path, tiny_config, reward_spec):
    _, rows = run(tmp_path, tiny_config, reward_spec, "akl", "rl.controllers={adaptive_kl: {init_coef: 0.01}}")
    assert all("loss/kl_ref" in r and "loss/kl_coef" in r for r in rows)


def test_vcpo_scales_the_learning_rate_by_ess(tmp_path, tiny_config, reward_spec):
    _, rows = run(tmp_path, tiny_config, reward_spec, "vcpo", "rl.loss=vcpo", "rl.controllers={vcpo_lr: {}}",
                  "rl.updates_per_step=3", "rl.buffer.max_staleness=4")
    scales = [r["optim/lr_scale"] for r in rows]
    assert all(0 < s <= 1 for s in scales) and math.isfinite(sum(scales))


def test_ewma_proximal_policy(tmp_path, tiny_config, reward_spec):
    run(tmp_path, tiny_config, reward_spec, "ewma", "rl.loss=decoupled_ppo", "rl.controllers={ewma_proximal: {decay: 0.5}}",
        "rl.updates_per_step=2")


def test_red_drop(tmp_path, tiny_config, reward_spec):
    run(tmp_path, tiny_config, reward_spec, "red", "rl.loss=rec", "rl.advantage=dr_grpo", "rl.red_drop=true")


@pytest.mark.parametrize("overrides, message", [
    (["rl.controllers={nope: {}}"], "unknown controller"),
    (["rl.loss=chord", "rl.loss_params={mu: 0.5}", "rl.controllers={chord_mu: {}}"], "set by the chord_mu controller"),
    (["rl.kl_coef=0.1", "rl.controllers={adaptive_kl: {}}"], "adaptive_kl"),
    (["rl.advantage=gae"], "value model"),
    (["rl.controllers={chord_mu: {peek: 1}}"], "rl.controllers.chord_mu"),
])
def test_bad_wiring_is_a_config_error(tmp_path, tiny_config, overrides, message):
    cfg = tiny_config(tmp_path / "bad", "rl.steps=1", *overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize("sampling, params", [
    ("variance", "{lam: 0.5}"), ("return_weighted", "{alpha: 0.1}"), ("recent_mix", "{p_off: 0.4, window: 2}"),
])
def test_buffer_sampling_strategies_train(tmp_path, tiny_config, reward_spec, sampling, params):
    run(tmp_path, tiny_config, reward_spec, sampling, f"rl.buffer.sampling={sampling}",
        f"rl.buffer.sampling_params={params}", "rl.updates_per_step=2")


@pytest.mark.parametrize("override, message", [
    ("rl.buffer.sampling=lifo", "rl.buffer.sampling: unknown"),
    ("rl.loss=ppo", "rl.loss: unknown"),
    ("rl.loss_params={clip: 0.1}", "rl.loss_params.clip"),
    ("rl.buffer.sampling_params={lam: 0.5}", "rl.buffer.sampling_params.lam"),
])
def test_rl_mistakes_fail_before_sft_runs(tmp_path, tiny_config, override, message):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(out, "sft.steps=50", "rl.steps=1", override))
    assert not (out / "config.yaml").exists()  # nothing was written, no SFT time was spent


def test_remix_kl_convex_reincarnation_and_data_mix(tmp_path, tiny_config, reward_spec):
    out, rows = run(tmp_path, tiny_config, reward_spec, "remix", "rl.loss=remix_ppg", "rl.kl_coef=0.05",
                    "rl.buffer.sampling=recent_mix", "rl.buffer.max_staleness=8", "rl.updates_per_step=2",
                    "rl.controllers={remix: {reincarnate_at: 2, window: 2}}", "run.checkpoint_every=1", steps=3)
    assert all("loss/kl_ref" in r for r in rows)
    _, state = load_checkpoint(sorted((out / "checkpoints").glob("step_rl_*"))[-1])
    learner_state = state["stage_state"]["learner"]
    assert learner_state["controllers"]["remix"]["reincarnated"] is True
    assert learner_state["ref_model"] is not None and learner_state["prev_model"] is not None


def test_resume_keeps_the_kl_reference(tmp_path, tiny_config, reward_spec):
    # the reference is the policy at RL start; a resumed run must not re-anchor it to the resumed weights
    out, _ = run(tmp_path, tiny_config, reward_spec, "ref", "rl.kl_coef=0.1", "run.checkpoint_every=1", steps=2)
    _, state = load_checkpoint(sorted((out / "checkpoints").glob("step_rl_*"))[-1])
    ref = state["stage_state"]["learner"]["ref_model"]
    _, sft_state = load_checkpoint(out / "checkpoints" / "sft")
    start = load_policy(out / "checkpoints" / "sft").model.state_dict()
    assert all(torch.equal(ref[k], start[k]) for k in start)


def test_min_ess_ends_a_steps_updates_early(tmp_path, tiny_config, reward_spec):
    """With lr 1e-2 the first update moves the policy off the stored groups; a strict rl.min_ess then ends
    the step's updates after the first batch whose ESS is below it, while no bound runs all of them."""
    _, free = run(tmp_path, tiny_config, reward_spec, "free", "rl.updates_per_step=6", "rl.old_logp=behavior",
                  "rl.buffer.max_staleness=32")
    assert all(r["train/updates"] == 6 for r in free)
    _, capped = run(tmp_path, tiny_config, reward_spec, "capped", "rl.updates_per_step=6", "rl.old_logp=behavior",
                    "rl.min_ess=0.9999", "rl.buffer.max_staleness=32")
    assert all(1 <= r["train/updates"] < 6 for r in capped)
    assert all(r["offpolicy/ess"] < 1.0 for r in capped)


def test_min_ess_is_refused_in_async_mode(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="rl.min_ess"):
        tiny_config(tmp_path, "rl.min_ess=0.5", "run.mode=async")
