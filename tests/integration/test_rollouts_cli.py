"""`offpolicy rollouts export|import|inspect` and `offpolicy ope` on logs it must refuse."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from offpolicy.cli import app
from offpolicy.data.logs import read_log
from offpolicy.experience import Experience, write_experiences


def _run_log(folder):
    """A run folder with an experiences.jsonl as run.save_experiences writes it."""
    folder.mkdir()
    exps = [Experience(prompt_ids=[4, 5], response_ids=[6, 2], reward=float(i % 2), behavior_logprobs=[-0.5, -0.1],
                       policy_version=i // 2, group_id=f"g{i // 2}", engine="tiny",
                       sampling={"temperature": 1.0}) for i in range(4)]
    write_experiences(folder / "experiences.jsonl", exps)
    return exps


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_export_to_parquet_and_inspect(tmp_path):
    exps = _run_log(tmp_path / "run")
    out = tmp_path / "log.parquet"
    result = _invoke("rollouts", "export", tmp_path / "run", "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote 4 experiences" in result.output
    assert [e.to_dict() for e in read_log(out)] == [e.to_dict() for e in exps]
    result = _invoke("rollouts", "export", tmp_path / "run", "--out", out)
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    result = _invoke("rollouts", "inspect", out, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert (s["rows"], s["groups"], s["sources"], s["with_behavior_logprobs"]) == (4, 2, {"policy": 4}, 1.0)
    assert s["policy_version"]["histogram"] == {"0": 2, "1": 2} and s["reward"]["mean"] == 0.5
    result = _invoke("rollouts", "inspect", tmp_path / "run")
    assert result.exit_code == 0 and "policy versions" in result.output and "tiny: 4" in result.output


def test_import_foreign_log_fills_source_and_checks_vocab(tmp_path):
    foreign = tmp_path / "traces.jsonl"
    foreign.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3], "reward": 1.0}) + "\n")
    out = tmp_path / "ours.jsonl"
    result = _invoke("rollouts", "import", foreign, "--out", out, "--vocab-size", 10)
    assert result.exit_code == 0, result.output
    assert read_log(out)[0].source == "offline" and read_log(out)[0].behavior_logprobs is None
    result = _invoke("rollouts", "import", foreign, "--out", tmp_path / "x.jsonl", "--vocab-size", 3)
    assert result.exit_code == 2 and "traces.jsonl:line 1: response_ids[0] = 3 is outside" in result.output
    assert "Traceback" not in result.output
    result = _invoke("rollouts", "import", foreign, "--out", tmp_path / "x.jsonl", "--source", "teacher")
    assert result.exit_code == 2 and "--source must be one of" in result.output


@pytest.mark.parametrize("args, message", [
    (["inspect", "{tmp}/none.jsonl"], "error: experience file not found"),
    (["inspect", "{tmp}/log.txt"], "unknown log format '.txt'"),
    (["export", "{tmp}", "--out", "{tmp}/x.jsonl"], "experience file not found"),  # a folder without a log
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "log.txt").write_text("x")
    result = _invoke("rollouts", *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.fixture
def checkpoint(tmp_path, tiny_policy):
    tiny_policy.save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_ope_refuses_ids_outside_the_vocabulary(tmp_path, checkpoint, tiny_policy):
    """Issue 11: this used to end in an IndexError traceback."""
    V = tiny_policy.tokenizer.vocab_size
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"prompt_ids": [5], "response_ids": [6, V + 7], "reward": 1.0, "source": "policy",
                               "behavior_logprobs": [-1.0, -2.0]}) + "\n")
    result = _invoke("ope", checkpoint, "--experiences", log, "--threads", 1)
    assert result.exit_code == 2, result.output
    assert f"log.jsonl:line 1: response_ids[1] = {V + 7} is outside the vocabulary [0, {V})" in result.output
    assert "Traceback" not in result.output


def test_ope_refuses_positive_behaviour_logprobs(tmp_path, checkpoint):
    """Issue 11: positive log-probs were accepted and gave plausible-looking estimates."""
    log = tmp_path / "log.jsonl"
    rows = [{"prompt_ids": [5], "response_ids": [6, 7], "reward": 1.0, "source": "policy", "group_id": "g",
             "behavior_logprobs": [-1.0, lp]} for lp in (-0.5, 2.3)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _invoke("ope", checkpoint, "--experiences", log, "--threads", 1)
    assert result.exit_code == 2, result.output
    assert "log.jsonl:line 2: behavior_logprobs[1] = 2.3 is positive" in result.output


def test_a_runs_saved_log_reads_groups_and_is_learnable(tmp_path, tiny_config, reward_spec):
    from offpolicy.data.logs import check_learnable, group_log
    from offpolicy.train.runner import train

    out = tmp_path / "run"
    train(tiny_config(out, "rl.steps=2", "run.save_experiences=true", f"task.reward={reward_spec}"))
    from offpolicy.policy.model import load_policy

    vocab_size = load_policy(out / "checkpoints" / "final").tokenizer.vocab_size
    exps = read_log(out / "experiences.jsonl", vocab_size=vocab_size)
    assert [len(g) for g in group_log(exps)] == [4] * 8  # 2 steps x 4 prompts, group_size 4
    for loss in ("ppo_clip", "topr", "reinforce"):
        check_learnable(exps, loss=loss, old_logp="behavior")
    assert _invoke("rollouts", "export", out, "--out", tmp_path / "log.parquet").exit_code == 0
    assert [e.to_dict() for e in read_log(tmp_path / "log.parquet")] == [e.to_dict() for e in exps]
