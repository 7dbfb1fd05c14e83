"""``offpolicy compare --suite``: recipes on suite tasks from recorded start checkpoints, one table and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from offpolicy.cli import app

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_addition_sft"
SMALL = {"run": {"progress": False, "threads": 1, "checkpoint_every": 0},
         "eval": {"samples": 0},
         "rl": {"prompts_per_step": 4, "group_size": 4, "groups_per_update": 4, "updates_per_step": 2,
                "old_logp": "behavior", "optim": {"lr": 1e-3}}}


@pytest.fixture
def setup(tmp_path):
    starts = tmp_path / "suite_starts.json"
    starts.write_text(json.dumps({"tasks": {"addition": {"checkpoint": str(FIXTURE)}}}))
    recipe = tmp_path / "default.yaml"
    recipe.write_text(yaml.safe_dump(SMALL))
    return starts, recipe


@pytest.mark.slow
def test_suite_runs_every_recipe_from_the_start_and_writes_rows(tmp_path, setup):
    starts, recipe = setup
    out = tmp_path / "suite"
    args = ["compare", str(recipe), "--suite", "addition", "--seeds", "2", "--out", str(out), "--starts", str(starts),
            "--rollouts", "48", "--eval-every", "1", "--eval-problems", "20"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "suite.json").read_text())
    assert [(r["task"], r["system"], r["seed"]) for r in doc["rows"]] == [("addition", "default", 0),
                                                                         ("addition", "default", 1)]
    for r in doc["rows"]:
        assert r["rollouts"] == 48  # ceil(48 / 16) = 3 steps of 4 prompts x 4 responses
        assert len(r["curve"]["acc"]) == 4  # the start and one evaluation per step
        assert 0 < r["start_acc"] < 1  # the fixture scores above zero on 20 problems of each seed's eval set
    assert doc["summary"]["default_system"] == "default"
    assert doc["summary"]["worst_final_minus_start"] is not None
    assert (out / "suite_addition.png").exists() and "| addition | default | 2 |" in (out / "suite.md").read_text()
    config = yaml.safe_load((out / "addition" / "default" / "seed0" / "config.yaml").read_text())
    assert config["policy"]["init"] == str(FIXTURE) and config["sft"]["steps"] == 0
    again = CliRunner().invoke(app, args)  # finished runs are read back, not run again
    assert again.exit_code == 0 and "finished earlier, skipped" in again.output


@pytest.mark.parametrize("suite, starts_doc, message", [
    ("nope", {"tasks": {}}, "unknown suite task 'nope'"),
    ("gcd", {"tasks": {}}, "suite task 'gcd' has no start checkpoint"),
    ("addition", {"tasks": {"addition": {"checkpoint": "/does/not/exist"}}}, "is missing"),
])
def test_bad_suite_input_is_one_error_line(tmp_path, setup, suite, starts_doc, message):
    starts, recipe = setup
    starts.write_text(json.dumps(starts_doc))
    result = CliRunner().invoke(app, ["compare", str(recipe), "--suite", suite, "--out", str(tmp_path / "o"),
                                      "--starts", str(starts)])
    assert result.exit_code == 2 and message in result.output


def test_missing_starts_file_says_how_to_make_it(tmp_path, setup):
    _, recipe = setup
    result = CliRunner().invoke(app, ["compare", str(recipe), "--suite", "all", "--out", str(tmp_path / "o"),
                                      "--starts", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "suite_starts.py" in result.output
