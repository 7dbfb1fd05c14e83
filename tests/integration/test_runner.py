"""The synchronous runner end to end on a d_model=32 model: outputs, every registered loss, exact resume.

Runs use the digit-fraction reward of ``conftest.py`` (an untrained model earns varied rewards, so group
advantages are non-zero and updates move the weights) and take about a second each.
"""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch
import yaml

from offpolicy.config import ConfigError, load_config
from offpolicy.objectives import POLICY_LOSSES
from offpolicy.policy.model import build_tiny, load_policy
from offpolicy.policy.tiny import TinyConfig
from offpolicy.report.metrics import read_metrics
from offpolicy.train import context as runner  # checkpoint() lives in the shared context
from offpolicy.train.checkpoint import latest_checkpoint, load_checkpoint
from offpolicy.train.runner import train

RL_KEYS = ("reward/mean", "loss/policy", "offpolicy/ess", "offpolicy/staleness_mean", "time/step_s",
           "rollout/tokens_per_s", "loss/grad_norm", "buffer/size", "train/version")
SUMMARY_KEYS = ("accuracy_before_rl", "accuracy_after_rl", "rollouts", "wall_seconds", "peak_rss_mb")

# what a batch of policy rollouts gives a loss (besides logp, advantages and mask)
BATCH_INPUTS = {"old_logp", "behavior_logp", "ref_logp", "rewards", "group_index", "is_expert"}
RUNNABLE_LOSSES = sorted(name for name, fn in POLICY_LOSSES.items() if set(fn.needs) <= BATCH_INPUTS)


def rl_rows(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "rl" and "reward/mean" in r]


def initial_weights(cfg):
    p = cfg.policy
    policy = build_tiny(TinyConfig(d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads, max_len=p.max_len),
                        seed=cfg.run.seed)
    return policy.model.state_dict()


def weights_changed(before, after):
    return any(not torch.equal(before[k], after[k]) for k in before)


def assert_finite(row):
    # MetricsLog writes non-finite floats as null
    bad = [k for k, v in row.items() if v is None or (isinstance(v, float) and not math.isfinite(v))]
    assert not bad, f"non-finite metrics: {bad}"


def test_sft_then_rl_writes_every_output(tmp_path, tiny_config, reward_spec):
    out = tmp_path / "run"
    cfg = tiny_config(out, "sft.steps=3", "rl.steps=2", f"task.reward={reward_spec}",
                      "rl.drop_uninformative_groups=false", "run.name=two-stage")
    summary = train(cfg)

    assert load_config(out / "config.yaml") == cfg  # the resolved config, reloadable as is
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["name"] == "two-stage"

    rows = read_metrics(out / "metrics.jsonl")
    sft = [r for r in rows if r.get("stage") == "sft" and "sft/loss" in r]
    rl = rl_rows(out)
    evals = [r for r in rows if "eval/greedy_acc" in r]
    assert [r["step"] for r in sft] == [1, 2, 3] and [r["step"] for r in rl] == [1, 2]
    assert [r["eval_point"] for r in evals] == ["before_sft", "before_rl", "final"]
    for r in rl:
        assert all(k in r for k in RL_KEYS), [k for k in RL_KEYS if k not in r]
        assert_finite(r)
    assert [r["train/version"] for r in rl] == [1.0, 2.0]
    assert rl[-1]["rollouts"] == 2 * 4 * 4
    assert all("eval/pass_at_k" in r for r in evals)

    saved = json.loads((out / "summary.json").read_text())
    assert all(k in saved for k in SUMMARY_KEYS)
    assert saved["rollouts"] == 32 and saved["wall_seconds"] > 0 and saved["peak_rss_mb"] > 0
    assert saved["accuracy_after_rl"] == evals[-1]["eval/greedy_acc"]
    assert summary["accuracy_before_rl"] == saved["accuracy_before_rl"]

    png = out / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = out / "checkpoints" / "final"
    assert latest_checkpoint(out / "checkpoints") == final
    assert (out / "checkpoints" / "sft").is_dir()
    policy = load_policy(final)
    assert weights_changed(initial_weights(cfg), policy.model.state_dict())


def test_an_existing_run_is_not_overwritten(tmp_path, tiny_config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(out))


@pytest.mark.parametrize("loss", RUNNABLE_LOSSES)
def test_every_registered_loss_trains(tmp_path, tiny_config, reward_spec, loss):
    out = tmp_path / loss
    cfg = tiny_config(out, "rl.steps=2", f"rl.loss={loss}", f"task.reward={reward_spec}",
                      "rl.drop_uninformative_groups=false", "eval.n_problems=2", "eval.samples=0")
    train(cfg)
    rows = rl_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert r["train/updates"] == 1.0 and "loss/policy" in r
        assert_finite(r)
    after = load_policy(out / "checkpoints" / "final").model.state_dict()
    assert weights_changed(initial_weights(cfg), after), f"{loss}: two RL steps left the parameters unchanged"


class Killed(Exception):
    """Stands in for the process being killed right after a checkpoint."""


def run_killed_after(monkeypatch, cfg, step: int):
    original = runner.checkpoint

    def checkpoint_then_die(run, stage_state, name=None):
        path = original(run, stage_state, name)
        if run.state["stage"] == "rl" and run.state["step"] == step and name is None:
            raise Killed
        return path

    monkeypatch.setattr(runner, "checkpoint", checkpoint_then_die)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(runner, "checkpoint", original)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, tiny_config, reward_spec, monkeypatch):
    extra = ("sft.steps=2", "rl.steps=4", "run.checkpoint_every=1", f"task.reward={reward_spec}",
             "rl.drop_uninformative_groups=false", "rl.buffer.max_staleness=10", "eval.samples=2")
    straight = tmp_path / "straight"
    train(tiny_config(straight, *extra))

    resumed = tmp_path / "resumed"
    cfg = tiny_config(resumed, *extra)
    run_killed_after(monkeypatch, cfg, step=2)
    ckpt = latest_checkpoint(resumed / "checkpoints")
    assert ckpt.name == "step_rl_000002"
    _, state = load_checkpoint(ckpt)
    saved_groups = state["stage_state"]["buffer"]["groups"]
    assert len(saved_groups) == 8  # 2 steps x 4 prompts
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)  # without resume the folder is refused
    train(cfg, resume=True)

    rows = rl_rows(resumed)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the step counter continues (history appended)
    assert [r["rollouts"] for r in rows] == [16, 32, 48, 64]
    assert [r["train/version"] for r in rows] == [1.0, 2.0, 3.0, 4.0]  # learner state restored
    # the replay buffer came back with its 8 stored groups: 8 + 4 new ones at step 3
    assert rows[2]["buffer/size"] == 12.0
    # and the resumed run is the uninterrupted one, number for number
    for a, b in zip(rl_rows(straight), rows):
        for key in ("reward/mean", "loss/policy", "loss/grad_norm", "offpolicy/ess", "buffer/size"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    w1 = load_policy(straight / "checkpoints" / "final").model.state_dict()
    w2 = load_policy(resumed / "checkpoints" / "final").model.state_dict()
    assert not weights_changed(w1, w2)
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((resumed / "summary.json").read_text())
    for key in ("accuracy_before_rl", "accuracy_after_rl", "pass_at_k_after_rl", "rollouts"):
        assert s1[key] == s2[key], key


def test_resume_in_the_middle_of_sft(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(out, "sft.steps=3", "run.checkpoint_every=1", "eval.samples=0")
    original = runner.checkpoint

    def die_at_sft_step_2(run, stage_state, name=None):
        path = original(run, stage_state, name)
        if run.state["stage"] == "sft" and run.state["step"] == 2:
            raise Killed
        return path

    monkeypatch.setattr(runner, "checkpoint", die_at_sft_step_2)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(runner, "checkpoint", original)
    train(cfg, resume=True)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "sft/loss" in r]
    assert steps == [1, 2, 3]


def test_a_finished_run_is_not_silently_extended(tmp_path, tiny_config, reward_spec):
    out = tmp_path / "run"
    extra = ("eval.samples=0", f"task.reward={reward_spec}", "rl.drop_uninformative_groups=false")
    train(tiny_config(out, "rl.steps=2", *extra))
    train(tiny_config(out, "rl.steps=2", *extra), resume=True)  # the same config again: nothing left to do
    assert len(rl_rows(out)) == 2
    with pytest.raises(ConfigError, match=r"finished run of 2 RL steps.*policy.init="):
        train(tiny_config(out, "rl.steps=4", *extra), resume=True)
    assert load_config(out / "config.yaml").rl.steps == 2  # config.yaml still describes the run
    # what the error suggests works: a new run starting from the final weights
    final = out / "checkpoints" / "final"
    train(tiny_config(tmp_path / "more", "rl.steps=1", f"policy.init={final}", *extra))
    assert len(rl_rows(tmp_path / "more")) == 1



def test_sft_stops_at_the_target_accuracy(tmp_path, tiny_config):
    """sft.stop_at_accuracy ends SFT at the first periodic evaluation that reaches it (here: the shipped
    27.6% checkpoint, which is above 10% from the start), and RL then starts from that model."""
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_addition_sft"
    cfg = tiny_config(tmp_path, f"policy.init={fixture}", "policy.d_model=128", "policy.n_layers=2",
                      "policy.n_heads=4", "eval.n_problems=200", "eval.samples=0", "sft.steps=40",
                      "sft.eval_every=5", "sft.stop_at_accuracy=0.1", "sft.optim.lr=1e-5", "rl.steps=1",
                      "task.params={min_digits: 2, max_digits: 2}")
    train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    sft_steps = [r["step"] for r in rows if r.get("stage") == "sft" and "eval_point" not in r]
    assert sft_steps == [1, 2, 3, 4, 5]
    stop = next(r for r in rows if r.get("eval_point") == "sft_step_5")
    assert stop["eval/greedy_acc"] >= 0.1
    assert any(r.get("stage") == "rl" and "reward/mean" in r for r in rows)


def test_sft_runs_all_its_steps_when_the_target_is_not_reached(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, "sft.steps=6", "sft.eval_every=2", "sft.stop_at_accuracy=1.0", "rl.steps=0")
    train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert max(r["step"] for r in rows if r.get("stage") == "sft") == 6


def scripted_evals(monkeypatch, greedy: dict[str, float]) -> dict[str, dict]:
    """Make the runner's SFT evaluations report ``greedy[point]`` as held-out greedy accuracy; returns the
    policy weights seen at every evaluation point (a copy)."""
    from offpolicy.train import runner as runner_module

    real, seen = runner.record_eval, {}

    def fake(run, name, extra=None):
        result = real(run, name, extra)
        if name in greedy:
            result = {**result, "eval/greedy_acc": greedy[name]}
            run.state["evals"][name] = result
        seen[name] = {k: v.clone() for k, v in run.policy.model.state_dict().items()}
        return result

    monkeypatch.setattr(runner_module, "record_eval", fake)
    return seen


@pytest.mark.parametrize("keep_best", [True, False])
def test_sft_keep_best_starts_rl_from_the_best_evaluation(tmp_path, tiny_config, monkeypatch, keep_best):
    """The best SFT evaluation (step 4 of 6) is not the last: with sft.keep_best the sft checkpoint, the
    before_rl evaluation and RL start from step 4's weights; without it, from step 6's."""
    seen = scripted_evals(monkeypatch, {"sft_step_2": 0.1, "sft_step_4": 0.5, "sft_step_6": 0.2})
    cfg = tiny_config(tmp_path, "sft.steps=6", "sft.eval_every=2", f"sft.keep_best={str(keep_best).lower()}",
                      "rl.steps=0", "eval.samples=0", "sft.optim.lr=1e-2")
    summary = train(cfg)
    sft_weights, _ = load_checkpoint(tmp_path / "checkpoints" / "sft")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    points = [r["eval_point"] for r in rows if "eval_point" in r]
    start = sft_weights.model.state_dict()
    assert not weights_changed(seen["before_rl"], start)
    assert weights_changed(seen["sft_step_4"], seen["sft_step_6" if keep_best else "before_rl"])
    assert weights_changed(seen["sft_step_4"], start) is not keep_best  # step 4's weights iff keep_best
    if keep_best:
        assert points == ["before_sft", "sft_step_2", "sft_step_4", "sft_step_6", "before_rl", "final"]
        assert summary["sft_best_step"] == 4
        assert next(r for r in rows if r.get("eval_point") == "before_rl")["sft/best_step"] == 4
    else:
        assert points == ["before_sft", "sft_step_2", "sft_step_4", "before_rl", "final"]
        assert summary["sft_best_step"] is None
