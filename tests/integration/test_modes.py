"""The three loops over the same pieces: async on a local Ray equals sync at max_staleness 0, a recorded
async schedule replays exactly without Ray, a dead worker is restarted, offline learns from a log, and a
kill between checkpoints loses and duplicates no experience (the write-ahead log).

Ray starts once per module (~5 s); each async run takes a few seconds on one thread.
"""

from __future__ import annotations

import json

import pytest
import torch

from offpolicy.config import ConfigError
from offpolicy.data.wal import WAL_FILE
from offpolicy.policy.model import load_policy
from offpolicy.report.metrics import read_metrics
from offpolicy.train import rl as rl_mod
from offpolicy.train.runner import train

pytestmark = pytest.mark.slow

# ~1 s runs; the conftest's digit-fraction reward gives an untrained model varied rewards (Ray workers import
# the reward module too: the driver's sys.path travels to them)
SMALL = ("rl.steps=4", "rl.prompts_per_step=8", "rl.group_size=4", "rl.groups_per_update=8",
         "rl.drop_uninformative_groups=false", "eval.samples=0", "eval.n_problems=4", "task.name=addition",
         "task.params={min_digits: 1, max_digits: 1}", "rl.loss=reinforce", "rl.advantage=grpo")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found here
    yield ray
    ray.shutdown()


def rl_rows(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "rl" and "train/version" in r]


def weights(out):
    return load_policy(out / "checkpoints" / "final").model.state_dict()


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_async_at_staleness_zero_is_the_sync_run(tmp_path, tiny_config, ray_local, reward_spec):
    """One worker, one request per step, max_staleness 0: the same batches, versions and weights as sync."""
    extra = (*SMALL, f"task.reward={reward_spec}", "rl.buffer.max_staleness=0", "rl.updates_per_step=1")
    train(tiny_config(tmp_path / "sync", *extra))
    train(tiny_config(tmp_path / "async", *extra, "run.mode=async", "async.num_workers=1",
                      "async.groups_per_request=8"))
    s, a = rl_rows(tmp_path / "sync"), rl_rows(tmp_path / "async")
    assert [r["train/version"] for r in s] == [r["train/version"] for r in a] == [1.0, 2.0, 3.0, 4.0]
    for rs, ra in zip(s, a):
        for key in ("reward/mean", "loss/policy", "loss/grad_norm", "offpolicy/staleness_max"):
            assert rs[key] == ra[key], (rs["step"], key)
        assert ra["offpolicy/staleness_max"] == 0
    assert same_weights(weights(tmp_path / "sync"), weights(tmp_path / "async"))
    assert "time/learner_idle_frac" in a[0] and "async/weight_sync_s" in a[0]


def test_async_schedule_replays_exactly_without_ray(tmp_path, tiny_config, ray_local, reward_spec):
    """Two workers, stale data, in-flight weight swaps: the recorded schedule reproduces the run bit for bit."""
    extra = (*SMALL, f"task.reward={reward_spec}", "rl.buffer.max_staleness=3", "rl.updates_per_step=2", "rl.groups_per_update=4",
             "async.num_workers=2", "async.groups_per_request=2", "async.partial_rollout=true",
             "async.chunk_tokens=1", "run.mode=async")
    live = tmp_path / "live"
    train(tiny_config(live, *extra))
    requests = [json.loads(l) for l in (live / "schedule.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "request" for r in requests) == 4 * 4  # 4 steps x 4 requests of 2 groups
    assert sum(r["kind"] == "update" for r in requests) == 4 * 2
    replayed = tmp_path / "replayed"
    train(tiny_config(replayed, *extra, f"async.replay_schedule={live / 'schedule.jsonl'}"))
    for a, b in zip(rl_rows(live), rl_rows(replayed)):
        assert a["loss/policy"] == b["loss/policy"] and a["reward/mean"] == b["reward/mean"], a["step"]
    assert same_weights(weights(live), weights(replayed))
    hist = json.loads((live / "staleness.json").read_text())["tokens_by_staleness"]
    assert max(int(k) for k in hist) <= 3


def test_a_dead_worker_is_restarted_and_its_request_redone(tmp_path, tiny_config, ray_local, monkeypatch,
                                                            reward_spec):
    from offpolicy.train import async_loop

    original = async_loop.RayRollouts._fill
    killed = []

    def fill_then_kill(self):
        original(self)
        if not killed and self.in_flight:  # the first request started: kill its worker mid-generation
            i, _ = next(iter(self.in_flight.values()))
            self.ray.kill(self.workers[i])
            killed.append(i)

    monkeypatch.setattr(async_loop.RayRollouts, "_fill", fill_then_kill)
    out = tmp_path / "run"
    train(tiny_config(out, *SMALL, f"task.reward={reward_spec}", "run.mode=async", "async.num_workers=2", "async.groups_per_request=4",
                      "rl.buffer.max_staleness=2"))
    rows = rl_rows(out)
    assert len(rows) == 4 and rows[-1]["rollouts"] == 4 * 8 * 4  # nothing lost: every step complete
    assert rows[-1]["async/worker_restarts"] == 1 and rows[-1]["async/lost_requests"] == 1  # run totals


def test_offline_learns_from_a_logged_run(tmp_path, tiny_config, reward_spec):
    log_run = tmp_path / "logged"
    train(tiny_config(log_run, *SMALL, f"task.reward={reward_spec}", "run.save_experiences=true"))
    log = log_run / "experiences.jsonl"
    assert len(log.read_text().splitlines()) == 4 * 8 * 4
    out = tmp_path / "offline"
    train(tiny_config(out, *SMALL, f"task.reward={reward_spec}", "run.mode=offline", f"offline.path={log}", "rl.buffer.max_staleness=null",
                      f"policy.init={log_run / 'checkpoints' / 'sft'}", "policy.d_model=32", "policy.n_layers=1",
                      "policy.n_heads=2", "policy.max_len=32"))
    rows = rl_rows(out)
    assert len(rows) == 4 and all(r["train/updates"] == 1 for r in rows)
    assert rows[0]["offline/groups"] == 32 and rows[-1]["rollouts"] == 0
    before = load_policy(log_run / "checkpoints" / "sft").model.state_dict()
    assert not same_weights(before, weights(out))


def test_offline_refuses_a_loss_the_log_cannot_feed(tmp_path, tiny_config, reward_spec):
    log = tmp_path / "expert.jsonl"
    row = {"prompt_ids": [5, 6], "response_ids": [7, 2], "reward": 1.0, "source": "expert", "group_id": "g"}
    log.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="behavior_logprobs.*topr"):
        train(tiny_config(tmp_path / "out", *SMALL, f"task.reward={reward_spec}", "run.mode=offline", f"offline.path={log}",
                          "rl.buffer.max_staleness=null", "rl.loss=topr"))


class Killed(Exception):
    pass


def test_a_kill_between_checkpoints_loses_and_duplicates_nothing(tmp_path, tiny_config, monkeypatch, reward_spec):
    """Killed in step 3's updates (checkpoint at step 2): step 3's groups come back from the write-ahead log,
    experiences.jsonl and metrics.jsonl are cut back to the checkpoint, and the run ends as an uninterrupted one."""
    extra = (*SMALL, f"task.reward={reward_spec}", "run.checkpoint_every=2", "run.save_experiences=true", "rl.buffer.max_staleness=4")
    straight = tmp_path / "straight"
    train(tiny_config(straight, *extra))

    out = tmp_path / "killed"
    original, calls = rl_mod.learn, []

    def learn_then_die(run, parts, after_update=None):
        calls.append(run.state["step"])
        if run.state["step"] == 2 and len(calls) == 3:
            raise Killed
        return original(run, parts, after_update)

    from offpolicy.train import sync_loop

    monkeypatch.setattr(sync_loop, "learn", learn_then_die)
    with pytest.raises(Killed):
        train(tiny_config(out, *extra))
    wal = [json.loads(l) for l in (out / WAL_FILE).read_text().splitlines()]
    assert [w["step"] for w in wal] == [2]  # step 3's rollout survived; steps 1-2 are in the checkpoint
    monkeypatch.setattr(sync_loop, "learn", original)
    generated = []
    real_rollout = sync_loop.rollout_step
    monkeypatch.setattr(sync_loop, "rollout_step", lambda run, parts, step: generated.append(step)
                        or real_rollout(run, parts, step))
    train(tiny_config(out, *extra), resume=True)
    assert generated == [3]  # step 3 (index 2) was read back, not generated again
    ids = lambda p: [(r["group_id"], r["response_ids"]) for r in map(json.loads, p.read_text().splitlines())]
    assert ids(out / "experiences.jsonl") == ids(straight / "experiences.jsonl")  # 0 lost, 0 duplicated
    assert [r["step"] for r in rl_rows(out)] == [1, 2, 3, 4]
    assert same_weights(weights(straight), weights(out))
