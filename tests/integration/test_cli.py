"""The command line through typer's CliRunner: bad input is one line and exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from offpolicy.cli import app
from offpolicy.objectives import POLICY_LOSSES
from offpolicy.policy.model import CheckpointError


@pytest.fixture
def cli():
    return CliRunner()


@pytest.fixture
def recipe(tmp_path, tiny_overrides):
    """A recipe file holding the tiny-run settings as YAML sections (no overrides needed)."""
    data: dict = {}
    for text in tiny_overrides(tmp_path / "default_out"):
        key, value = text.split("=", 1)
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    return lines[0]


def test_train_with_overrides(cli, recipe, tmp_path):
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", str(recipe), f"run.out_dir={out}", "rl.steps=1", "sft.steps=1",
                              "eval.samples=0", "rl.optim.lr=3e-4"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rl"]["steps"] == 1 and saved["rl"]["optim"]["lr"] == pytest.approx(3e-4)
    assert saved["policy"]["d_model"] == 32  # from the recipe
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 16
    # a second train into the same folder is refused; --resume continues it (here: nothing left to do)
    again = cli.invoke(app, ["train", str(recipe), f"run.out_dir={out}", "rl.steps=1", "sft.steps=1",
                             "eval.samples=0"])
    one_error_line(again, "--resume")
    resumed = cli.invoke(app, ["train", str(recipe), f"run.out_dir={out}", "rl.steps=1", "sft.steps=1",
                               "eval.samples=0", "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_wrong_recipe_key(cli, recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text() + "trainer:\n  steps: 3\n")
    one_error_line(cli.invoke(app, ["train", str(bad)]), "trainer", "unknown key", str(bad))
    one_error_line(cli.invoke(app, ["train", str(recipe), "rl.optim.lrr=0.1"]), "rl.optim.lrr", "unknown key")


def test_wrong_override_type(cli, recipe):
    one_error_line(cli.invoke(app, ["train", str(recipe), "rl.steps=lots"]), "rl.steps", "'lots'")


def test_missing_recipe(cli, tmp_path):
    one_error_line(cli.invoke(app, ["train", str(tmp_path / "nope.yaml")]), "nope.yaml", "does not exist")


def test_unknown_loss_param(cli, recipe, tmp_path):
    result = cli.invoke(app, ["train", str(recipe), f"run.out_dir={tmp_path / 'run'}", "rl.steps=1",
                              "rl.loss_params.clip=0.3"])
    one_error_line(result, "rl.loss_params.clip", "clip_high")


def test_unknown_task_lists_valid_names(cli, recipe, tmp_path):
    result = cli.invoke(app, ["train", str(recipe), f"run.out_dir={tmp_path / 'run'}", "task.name=additon"])
    one_error_line(result, "'additon'", "addition", "arithmetic")
    result = cli.invoke(app, ["eval", str(tmp_path), "--task", "additon", "--threads", "1"])
    one_error_line(result, "'additon'", "addition", "arithmetic")


def test_debug_shows_the_exception(cli, tmp_path):
    result = cli.invoke(app, ["train", str(tmp_path / "nope.yaml"), "--debug"])
    assert result.exit_code not in (0, 2) and isinstance(result.exception, ValueError)


def test_eval_prints_json(cli, tiny_policy, tmp_path):
    tiny_policy.save(tmp_path / "ckpt")
    result = cli.invoke(app, ["eval", str(tmp_path / "ckpt"), "--task", "addition", "--n", "4", "-k", "2",
                              "--max-new-tokens", "6", "--threads", "1", "--param", "max_digits=2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "addition" and data["n"] == 4 and data["k"] == 2
    for key in ("eval/greedy_acc", "eval/pass_at_k", "eval/sampled_acc"):
        assert 0.0 <= data[key] <= 1.0


def test_eval_of_a_missing_checkpoint(cli, tmp_path):
    one_error_line(cli.invoke(app, ["eval", str(tmp_path / "nope"), "--task", "addition", "--threads", "1"]),
                   "does not exist")


def test_eval_of_an_incompatible_checkpoint(cli, tiny_policy, tmp_path):
    tiny_policy.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    line = one_error_line(cli.invoke(app, ["eval", str(tmp_path), "--task", "addition", "--threads", "1"]),
                          "does not fit", "shape mismatch")
    assert issubclass(CheckpointError, ValueError) and "model.safetensors" in line


def test_eval_bad_task_param(cli, tiny_policy, tmp_path):
    tiny_policy.save(tmp_path)
    result = cli.invoke(app, ["eval", str(tmp_path), "--task", "addition", "--param", "digits=2", "--threads", "1"])
    one_error_line(result, "'digits'")


def test_algorithms_lists_the_registered_losses(cli):
    result = CliRunner(env={"COLUMNS": "240"}).invoke(app, ["algorithms"])
    assert result.exit_code == 0, result.output
    assert "ppo_clip" in result.stdout and "arXiv:1707.06347" in result.stdout
    for name in POLICY_LOSSES:
        assert name in result.stdout, name
    for title in ("policy losses", "advantages", "corrections", "aggregations", "KL estimators"):
        assert title in result.stdout


def test_no_arguments_shows_help(cli):
    result = cli.invoke(app, [])
    assert "train" in result.output and "eval" in result.output and "algorithms" in result.output
