"""Config, buffer, environments (termination vs truncation), checkpoints: hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offpolicy.control.buffer import ReplayBuffer
from offpolicy.control.config import ConfigError, EnvConfig, load_control_config
from offpolicy.control.envs import Envs


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"hp\.gama: unknown key for algo 'sac'"):
        load_control_config(None, ["hp.gama=0.9"])
    with pytest.raises(ConfigError, match=r"env\.idd: unknown key"):
        load_control_config(None, ["env.idd=Hopper-v5"])
    with pytest.raises(ConfigError, match=r"algo: unknown algorithm 'sacc'; valid: \["):
        load_control_config(None, ["algo=sacc"])
    cfg = load_control_config("recipes/control/sac_pendulum.yaml", ["hp.gamma=0.9", "run.seed=3"])
    assert cfg.hyperparams().gamma == 0.9 and cfg.run.seed == 3 and cfg.env.id == "Pendulum-v1"


def _fill(buf, rows):
    for r, term, trunc in rows:
        buf.add([[r]], [[0.0]], [r], [[r + 0.5]], [term], [trunc])


def test_one_step_discount_separates_termination_from_truncation():
    buf = ReplayBuffer(8, 1, 1)
    _fill(buf, [(1.0, False, False), (2.0, True, False), (3.0, False, True)])
    torch.manual_seed(0)
    b = buf.sample(64, gamma=0.9)
    disc = {float(o): float(d) for o, d in zip(b["obs"][:, 0], b["discount"])}
    assert disc == {1.0: pytest.approx(0.9), 2.0: 0.0, 3.0: pytest.approx(0.9)}  # truncation bootstraps


def test_n_step_returns_stop_at_episode_ends_and_the_newest_row():
    buf = ReplayBuffer(8, 1, 1)
    # episode A: r=1, 2 (terminated); episode B: r=3, 4 (truncated), then r=5 still running
    _fill(buf, [(1.0, False, False), (2.0, True, False), (3.0, False, False), (4.0, False, True), (5.0, False, False)])
    torch.manual_seed(0)
    b = buf.sample(200, gamma=0.5, n_step=3)
    got = {float(o): (float(r), float(d), float(n)) for o, r, d, n in zip(b["obs"][:, 0], b["rew"], b["discount"],
                                                                         b["next_obs"][:, 0])}
    assert got[1.0] == (1 + 0.5 * 2, 0.0, 2.5)  # stops at the termination: no bootstrap
    assert got[2.0] == (2.0, 0.0, 2.5)
    assert got[3.0] == (3 + 0.5 * 4, 0.25, 4.5)  # stops at the truncation: bootstrap gamma^2 from the final obs
    assert got[4.0] == (4.0, 0.5, 4.5)
    assert got[5.0] == (5.0, 0.5, 5.5)  # newest row: no successor yet


def test_n_step_with_two_envs_and_wraparound():
    buf = ReplayBuffer(4, 1, 1, num_envs=2)  # 2 env-steps of 2 envs
    for t in range(3):  # the third step overwrites the first
        buf.add([[10.0 * t], [10.0 * t + 1]], [[0.0], [0.0]], [t, 100 + t], [[0.0], [0.0]], [False, False],
                [False, False])
    torch.manual_seed(0)
    b = buf.sample(100, gamma=0.5, n_step=2)
    got = {float(o): float(r) for o, r in zip(b["obs"][:, 0], b["rew"])}
    assert got == {10.0: 1 + 0.5 * 2, 11.0: 101 + 0.5 * 102, 20.0: 2.0, 21.0: 102.0}


def test_buffer_state_dict_round_trip():
    buf = ReplayBuffer(8, 1, 1)
    _fill(buf, [(1.0, False, False), (2.0, True, False)])
    t, m = buf.state_dict()
    other = ReplayBuffer(8, 1, 1)
    other.load_state_dict(t, m)
    assert other.size == 2 and other.ptr == 2 and torch.equal(other.rew, buf.rew) and torch.equal(other.end, buf.end)


def test_envs_return_the_real_final_observation_and_keep_truncation_apart():
    envs = Envs(EnvConfig(id="offpolicy-test/Line-v0"), seed=0)
    envs.reset()
    res = [envs.step(np.array([[a]])) for a in (1.0, 1.0)]  # x: ~0 -> ~1 -> ~2: terminates
    assert res[1].terminated[0] and not res[1].truncated[0]
    assert res[1].next_obs[0, 0] == pytest.approx(2.0, abs=0.11) and abs(res[1].obs[0, 0]) <= 0.1  # reset obs
    assert res[1].episodes == [(2.0, 2)]
    for _ in range(5):  # x stays near 0: the time limit (5) truncates
        last = envs.step(np.array([[0.0]]))
    assert last.truncated[0] and not last.terminated[0] and last.episodes == [(0.0, 5)]


def test_env_state_replays_to_the_same_observation():
    cfg = EnvConfig(id="Pendulum-v1")
    a, b = Envs(cfg, seed=3), Envs(cfg, seed=3)
    a.reset()
    for _ in range(205):  # one full episode (200) and 5 steps into the next
        obs = a.step(np.array([[0.3]])).obs
    tensors, meta = a.state()
    assert np.array_equal(b.load_state(tensors, meta), obs)
    assert np.array_equal(a.step(np.array([[-0.5]])).obs, b.step(np.array([[-0.5]])).obs)


def test_cli_train_then_eval(tmp_path, tiny):
    from typer.testing import CliRunner

    from offpolicy.control.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "recipes/control/sac_pendulum.yaml", *tiny, "run.total_steps=60",
                            f"run.out_dir={tmp_path}", "run.eval_every=0", "run.checkpoint_every=0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "checkpoints"), "--episodes", "1"])
    assert r.exit_code == 0, r.output
    assert '"algo": "sac"' in r.output and '"return_mean"' in r.output
    r = runner.invoke(app, ["train", "recipes/control/sac_pendulum.yaml", "hp.gama=1"])
    assert r.exit_code == 2 and "hp.gama: unknown key" in r.output


def test_the_lm_package_does_not_import_control():
    import subprocess
    import sys

    # the language-model stack (everything but the CLI umbrella, which mounts `offpolicy control`) never imports it
    code = ("import sys, offpolicy.config, offpolicy.train.runner, offpolicy.train.sync_loop, offpolicy.ope; "
            "assert not [m for m in sys.modules if m.startswith('offpolicy.control')]")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    # and mounting `offpolicy control` in the CLI does not import gymnasium
    code = "import sys, offpolicy.cli; assert 'gymnasium' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize("algo", ["sac", "ppo"])
def test_vectorised_envs_run(tmp_path, tiny, algo):
    from offpolicy.control.loop import train

    extra = ["hp.num_steps=16", "hp.num_minibatches=2", "hp.update_epochs=1", "hp.hidden=[8]"] if algo == "ppo" else tiny
    s = train(load_control_config(None, [*extra, f"algo={algo}", "env.num_envs=2", "run.total_steps=64",
                                         "run.progress=false", "env.max_episode_steps=10", f"run.out_dir={tmp_path}"]))
    assert s["steps"] == 64 and s["last_episodic_return"] is not None
