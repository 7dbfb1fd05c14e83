"""The bad input catalogue through ``offpolicy train``: exit code 2, one ``error:`` line, no traceback, no output.

The cases live in ``tests/unit/test_bad_inputs.py`` (one list for the unit test, this test and docs/errors.md).
Real bugs are not user errors: they still end in a traceback.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offpolicy.cli import app

_CATALOGUE = Path(__file__).resolve().parents[1] / "unit" / "test_bad_inputs.py"
_spec = importlib.util.spec_from_file_location("bad_inputs", _CATALOGUE)
bad_inputs = importlib.util.module_from_spec(_spec)
sys.modules["bad_inputs"] = bad_inputs  # dataclasses look their module up there
_spec.loader.exec_module(bad_inputs)
CASES = bad_inputs.CASES


def run_cli(case, tmp: Path):
    overrides = bad_inputs.build(case, tmp)
    recipe = bad_inputs.recipe_arg(case, tmp)
    if recipe is None:  # train needs a recipe: an empty one is the defaults
        recipe = tmp / "defaults.yaml"
        recipe.write_text("{}\n")
    sys.path.insert(0, str(tmp / "mods"))
    try:
        return CliRunner().invoke(app, ["train", str(recipe), *overrides, *(["--resume"] if case.resume else [])])
    finally:
        sys.path.remove(str(tmp / "mods"))
        sys.modules.pop("bad_rewards", None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_error_line(case, tmp_path):
    result = run_cli(case, tmp_path)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()


def test_a_bug_is_not_a_user_error(tmp_path, monkeypatch, tiny_overrides):
    """A TypeError inside training is a bug: it propagates (traceback), exit code 1, not a tidy line."""
    import offpolicy.train.runner as runner

    def broken(cfg, resume=False):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(runner, "train", broken)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    result = CliRunner().invoke(app, ["train", str(recipe), *tiny_overrides(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, TypeError)


def test_permission_error_while_training_is_one_line(tmp_path, monkeypatch, tiny_overrides):
    """An out_dir that turns unwritable mid-run (PermissionError) is the user's, not a traceback."""
    import offpolicy.train.runner as runner

    def denied(cfg, resume=False):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(runner, "train", denied)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    result = CliRunner().invoke(app, ["train", str(recipe), *tiny_overrides(tmp_path / "run")])
    assert result.exit_code == 2 and "Permission denied" in result.stderr and "metrics.jsonl" in result.stderr


FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny_addition_sft")


@pytest.mark.parametrize("args, message", [
    (["eval", FIXTURE, "--task", "addition", "--n", "0"], "--n"),
    (["eval", FIXTURE, "--task", "addition", "--samples", "-1"], "--samples"),
    (["eval", FIXTURE, "--task", "addition", "--temperature", "0"], "--temperature must be > 0"),
    (["eval", FIXTURE, "--task", "addition", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["ope", FIXTURE, "--experiences", "x.jsonl", "--level", "1"], "--level must be in \\(0, 1\\)"),
    (["ope", FIXTURE, "--experiences", "x.jsonl", "--clip", "0"], "--clip must be > 0"),
    (["ope", FIXTURE, "--experiences", "x.jsonl", "--bootstrap", "-2"], "--bootstrap"),
])
def test_eval_and_ope_flags_out_of_range_are_refused_naming_the_flag(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert re.search(message, result.output)
