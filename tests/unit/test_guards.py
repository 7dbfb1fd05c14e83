"""Non-finite numbers never reach the weights; absurd rewards are zeroed; reward code is bounded in time.

Learner guard: a non-finite loss or gradient skips the step (weights, optimizer state and schedule
untouched) and is counted by metric; ``rl.max_skipped_steps`` consecutive skips stop the run. Rewards:
non-finite or beyond ``task.reward_bound`` -> 0 and counted. Process isolation: a reward that never
returns is killed, and nothing is left running.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch

from offpolicy.config import OptimConfig, TrainingDiverged, load_config
from offpolicy.data.rewards import RewardLimits, score_batch
from offpolicy.data.tasks import Problem
from offpolicy.rollout.engines import TinyEngine
from offpolicy.train.evaluate import evaluate
from offpolicy.train.guards import NonFiniteGuard
from offpolicy.train.learner import Learner

from test_learner import params_of, rl, rollout_batch


def learner_of(policy, **kw) -> Learner:
    return Learner(policy, rl(**kw), total_updates=10)


def poisoned(policy, reward: float):
    batch = rollout_batch(policy)
    batch.rewards[0] = reward  # (B,) one poisoned reward
    return batch


def opt_state(learner):
    return {k: v.clone() for s in learner.opt.state.values() for k, v in s.items() if torch.is_tensor(v)}


def assert_untouched(learner, before, state_before):
    assert all(torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))
    after = opt_state(learner)
    assert after.keys() == state_before.keys() and all(torch.equal(after[k], state_before[k]) for k in after)


@pytest.mark.parametrize("reward, kind, clip", [(float("nan"), "loss", 1.0), (float("inf"), "loss", 0.0),
                                                (1e30, "grad", 0.0), (1e30, "grad", 1.0)])
def test_non_finite_update_is_skipped_and_counted(tiny_policy, reward, kind, clip):
    """NaN/inf reward -> NaN loss; 1e30 -> a gradient norm that overflows (clip on: would be scaled to 0 or
    NaN; clip off: its square would poison Adam's second moment). Each is skipped, weights and state kept."""
    learner = learner_of(tiny_policy, loss="reinforce", advantage="reinforce", optim=OptimConfig(lr=1e-2, grad_clip=clip))
    learner.update(rollout_batch(tiny_policy))  # a good step first: the optimizer has state
    before, state_before, lr = params_of(tiny_policy), opt_state(learner), learner.sched.get_last_lr()
    metrics = learner.update(poisoned(tiny_policy, reward))
    assert_untouched(learner, before, state_before)
    assert learner.sched.get_last_lr() == lr and learner.version == 2
    assert metrics["train/skipped_steps"] == 1 and metrics[f"train/skipped_nonfinite_{kind}"] == 1
    good = learner.update(rollout_batch(tiny_policy))  # the next good batch trains again
    assert good["train/skipped_steps"] == 1 and learner.guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in tiny_policy.parameters())


def test_consecutive_skips_stop_with_the_metric_named(tiny_policy):
    learner = learner_of(tiny_policy, loss="reinforce", advantage="reinforce", max_skipped_steps=3)
    learner.update(poisoned(tiny_policy, float("nan")))
    learner.update(poisoned(tiny_policy, float("nan")))
    with pytest.raises(TrainingDiverged, match=r"rl.max_skipped_steps=3: 3 consecutive .* non-finite loss"):
        learner.update(poisoned(tiny_policy, float("nan")))
    assert all(torch.isfinite(p).all() for p in tiny_policy.parameters())


def test_guard_state_survives_a_checkpoint(tiny_policy):
    learner = learner_of(tiny_policy, loss="reinforce", advantage="reinforce")
    learner.update(poisoned(tiny_policy, float("nan")))
    other = learner_of(tiny_policy.copy(), loss="reinforce", advantage="reinforce")
    other.load_state_dict(learner.state_dict())
    assert other.guard.skipped["loss"] == 1 and other.guard.consecutive == 1


def test_overflowing_lr_stops_instead_of_saving_nan(tiny_policy):
    learner = learner_of(tiny_policy, optim=OptimConfig(lr=1e38))
    with pytest.raises(TrainingDiverged, match="non-finite after optimizer step .* rl.optim.lr"):
        for _ in range(3):
            learner.update(rollout_batch(tiny_policy))


def test_guard_check_is_exact():
    ok = torch.tensor(1.0)
    assert NonFiniteGuard.check_update(ok, torch.tensor(3.0), clip=0) is None
    assert NonFiniteGuard.check_update(torch.tensor(float("nan")), torch.tensor(3.0), clip=1) == "loss"
    assert NonFiniteGuard.check_update(ok, torch.tensor(float("inf")), clip=1) == "grad"
    assert NonFiniteGuard.check_update(ok, torch.tensor(2e19), clip=0) == "grad"  # its square overflows fp32
    assert NonFiniteGuard.check_update(ok, torch.tensor(2e19), clip=1) is None  # clipping brings it down


# ---- rewards -----------------------------------------------------------------------------------
PROBLEMS = [Problem(id=f"p{i}", prompt="1+1=", answer="2") for i in range(4)]


def test_absurd_and_non_finite_rewards_are_zeroed_and_counted():
    values = iter([1e30, float("nan"), -2e6, 0.5])
    r = score_batch(lambda p, c: next(values), PROBLEMS, ["x"] * 4, bound=1e6)
    assert r.rewards == [0.0, 0.0, 0.0, 0.5] and r.n_errors == 3
    assert "task.reward_bound" in r.first_error


def test_reward_bound_key():
    assert load_config(None, []).task.reward_bound == 1e6
    assert RewardLimits.of(load_config(None, ["task.reward_isolation=process"]).task).isolation == "process"


def spin(problem, completion):
    """A reward that never returns and burns CPU."""
    if completion == "hang":
        while True:
            pass
    return 1.0


def children() -> list[psutil.Process]:
    return [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


def test_process_isolation_kills_a_hung_reward():
    t0 = time.monotonic()
    r = score_batch(spin, PROBLEMS, ["hang", "ok", "hang", "ok"], timeout_s=0.3, isolation="process", max_workers=2)
    assert r.rewards == [0.0, 1.0, 0.0, 1.0] and r.n_timeouts == 2
    assert time.monotonic() - t0 < 3
    assert not children(), "a reward process outlived its batch"


def test_process_isolation_reports_errors_and_crashes():
    def bad(problem, completion):
        if completion == "raise":
            raise KeyError("boom")
        if completion == "die":
            os._exit(3)
        return 0.25

    r = score_batch(bad, PROBLEMS, ["raise", "die", "ok", "ok"], timeout_s=5, isolation="process")
    assert r.rewards == [0.0, 0.0, 0.25, 0.25] and r.n_errors == 2 and "KeyError" in r.first_error
    assert not children()


def test_evaluation_scores_with_the_timeout(tiny_policy):
    """Evaluation used to call the reward without a timeout: a hanging reward hung the run."""
    problems = [Problem(id=f"e{i}", prompt="1+1=", answer="2") for i in range(2)]
    hang = lambda p, c: spin(p, "hang")  # noqa: E731
    t0 = time.monotonic()
    out = evaluate(TinyEngine(tiny_policy), tiny_policy.tokenizer, problems, hang, max_new_tokens=3, samples=1,
                   reward_limits=RewardLimits(timeout_s=0.2, isolation="process"))
    assert out["eval/reward_errors"] == 4 and out["eval/greedy_acc"] == 0.0
    assert time.monotonic() - t0 < 5 and not children()


def test_step_metrics_keep_the_last_cumulative_count():
    from offpolicy.train.rl import step_metrics

    ups = [{"train/skipped_steps": torch.tensor(1.0), "loss/policy": torch.tensor(2.0)},
           {"train/skipped_steps": torch.tensor(2.0), "loss/policy": torch.tensor(4.0)}]
    out = step_metrics(ups)
    assert out["train/skipped_steps"] == 2.0 and out["loss/policy"] == 3.0


def test_sft_stops_before_a_non_finite_step(tiny_policy):
    from offpolicy.train.learner import make_optimizer, optimizer_step

    opt, sched = make_optimizer(tiny_policy.parameters(), OptimConfig(lr=1e-2), 10)
    before = params_of(tiny_policy)
    loss = sum(p.sum() for p in tiny_policy.parameters()) * float("nan")
    with pytest.raises(TrainingDiverged, match="sft: non-finite loss"):
        optimizer_step(tiny_policy, loss, opt, sched, grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_policy.parameters()))
