"""Logged experiences (run.save_experiences) and `offpolicy ope` on them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from offpolicy.cli import app
from offpolicy.experience import Experience, read_experiences, write_experiences
from offpolicy.train.runner import train


def test_experience_log_round_trip_and_errors(tmp_path):
    path = tmp_path / "exp.jsonl"
    exps = [Experience(prompt_ids=[4, 5], response_ids=[6, 2], reward=1.0, behavior_logprobs=[-0.1, -0.2],
                       policy_version=3, group_id="g")]
    write_experiences(path, exps)
    back = read_experiences(path)
    assert back[0].to_dict() == exps[0].to_dict()
    path.write_text(path.read_text() + '{"prompt_ids": [1], "response_ids": [2], "rewrd": 1}\n')
    with pytest.raises(ValueError, match=r"exp.jsonl:line 2: unknown fields \['rewrd'\]"):
        read_experiences(path)
    (tmp_path / "bad.jsonl").write_text('{"prompt_ids": [1], "response_ids": [2, 3], "behavior_logprobs": [0.0]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:line 1: Experience.behavior_logprobs has 1 entries"):
        read_experiences(tmp_path / "bad.jsonl")


def test_ope_on_a_runs_logged_rollouts(tmp_path, tiny_config, reward_spec):
    out = tmp_path / "run"
    train(tiny_config(out, "rl.steps=2", "run.save_experiences=true", f"task.reward={reward_spec}"))
    logs = out / "experiences.jsonl"
    assert len(logs.read_text().splitlines()) == 2 * 4 * 4
    result = CliRunner().invoke(app, ["ope", str(out / "checkpoints" / "final"), "--experiences", str(logs),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["n"] == 32 and set(data["estimates"]) == {"is", "snis", "pdis", "dr", "sndr"}
    assert 0 < data["estimates"]["snis"]["ess"] <= 1


def test_ope_missing_log_file_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["ope", str(tmp_path), "--experiences", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "experience file not found" in result.output
