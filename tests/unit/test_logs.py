"""Experience logs: the schema, .jsonl/.parquet round trips, row-by-row errors, groups, loss checks."""

from __future__ import annotations

import json

import pytest

from offpolicy.data.logs import check_learnable, group_log, read_log, summarize, validate, write_log
from offpolicy.experience import Experience


def _exps() -> list[Experience]:
    return [
        Experience(prompt_ids=[4, 5], response_ids=[6, 2], reward=1.0, behavior_logprobs=[-0.1, -0.2],
                   behavior_train_logprobs=[-0.1, -0.3], policy_version=3, group_id="a", task_id="t1",
                   engine="tiny", sampling={"temperature": 1.0}, dtype="float32", created_at=10.0),
        Experience(prompt_ids=[4, 5], response_ids=[7, 8, 2], reward=0.0, behavior_logprobs=[-1.0, -0.5, 0.0],
                   policy_version=[1, 2, 2], group_id="a", token_rewards=[0.0, 0.5, -0.5], turn_ids=[0, 0, 1],
                   response_mask=[1, 0, 1], created_at=11.0, info={"note": "x"}),
        Experience(prompt_ids=[9], response_ids=[3], reward=1.0, source="expert", group_id="b", created_at=12.0),
    ]


def _line(**overrides) -> str:
    row = {"prompt_ids": [1], "response_ids": [2, 3], "reward": 1.0, "source": "policy"}
    row.update(overrides)
    return json.dumps(row)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"log{suffix}"
    write_log(path, _exps())
    back = read_log(path, vocab_size=10)
    assert [e.to_dict() for e in back] == [e.to_dict() for e in _exps()]
    assert not (tmp_path / f"log{suffix}.tmp").exists()


def test_parquet_one_token_version_list_reads_as_the_int(tmp_path):
    """[v] for a one-token response and v mean the same; parquet cannot tell them apart."""
    path = tmp_path / "log.parquet"
    write_log(path, [Experience(prompt_ids=[1], response_ids=[2], reward=0.0, policy_version=[5])])
    assert read_log(path)[0].policy_version == 5


def test_run_log_written_by_write_experiences_reads(tmp_path):
    from offpolicy.experience import write_experiences

    write_experiences(tmp_path / "experiences.jsonl", _exps())
    assert len(read_log(tmp_path / "experiences.jsonl")) == 3


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("{not json", "not valid JSON"),
    (_line(rewrd=1), r"unknown field\(s\) \['rewrd'\]"),
    (json.dumps({"prompt_ids": [1], "response_ids": [2]}), r"missing required field\(s\) \['reward', 'source'\]"),
    (_line(prompt_ids=[1, "a"]), r"prompt_ids\[1\] = 'a' is not an int token id"),
    (_line(response_ids=[2, 99]), r"response_ids\[1\] = 99 is outside the vocabulary \[0, 50\)"),
    (_line(response_ids=[2, -1]), r"response_ids\[1\] = -1 is outside the vocabulary"),
    (_line(behavior_logprobs=[-0.1, 0.7]), r"behavior_logprobs\[1\] = 0.7 is positive; a log-probability is <= 0"),
    (_line(behavior_logprobs=[-0.1]), "behavior_logprobs has 1 entries for 2 response tokens"),
    (_line(behavior_train_logprobs=[-0.1, float("nan")]), r"behavior_train_logprobs\[1\] = nan is not a finite"),
    (_line(reward=float("inf")), "reward must be a finite number, got inf"),
    (_line(reward=True), "reward must be a finite number, got True"),
    (_line(source="teacher"), "source must be one of"),
    (_line(policy_version=[1]), "policy_version has 1 entries for 2 response tokens"),
    (_line(policy_version=-1), "policy_version must be an int >= 0"),
    (_line(response_mask=[1, 2]), r"response_mask\[1\] = 2 is not 0 or 1"),
    (_line(group_id=3), "group_id must be a string, got int"),
    (_line(sampling="t=1"), "sampling must be an object or null, got str"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "log.jsonl"
    path.write_text(_line() + "\n\n" + line + "\n")  # the bad row is on line 3 (blank lines are skipped)
    with pytest.raises(ValueError, match=rf"log.jsonl:line 3: {message}"):
        read_log(path, vocab_size=50)


def test_tiny_positive_logprob_is_float_rounding(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(_line(behavior_logprobs=[-0.1, 1e-7]) + "\n")
    assert read_log(path)[0].behavior_logprobs == [-0.1, 1e-7]


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="experience file not found"):
        read_log(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no experiences"):
        read_log(tmp_path / "empty.jsonl")
    (tmp_path / "log.csv").write_text("x")
    with pytest.raises(ValueError, match=r"unknown log format '.csv'"):
        read_log(tmp_path / "log.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="bad.parquet: not a readable parquet file"):
        read_log(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no experiences to write"):
        write_log(tmp_path / "out.jsonl", [])


def test_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"prompt_ids": [[1], [1], [1]], "response_ids": [[2], [120], [3]],
                             "reward": [1.0, 0.0, None], "source": ["offline"] * 3}), path)
    with pytest.raises(ValueError, match=r"foreign.parquet:row 2: response_ids\[0\] = 120 is outside"):
        read_log(path, vocab_size=99)
    with pytest.raises(ValueError, match=r"foreign.parquet:row 3: missing required field\(s\) \['reward'\]"):
        read_log(path)


def test_defaults_fill_missing_fields_only(tmp_path):
    path = tmp_path / "foreign.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1], "response_ids": [2], "reward": 0.5}) + "\n"
                    + _line(source="expert") + "\n")
    exps = read_log(path, defaults={"source": "offline"})
    assert [e.source for e in exps] == ["offline", "expert"]


def test_write_refuses_what_it_could_not_read(tmp_path):
    bad = Experience(prompt_ids=[1], response_ids=[2], behavior_logprobs=[0.3])
    with pytest.raises(ValueError, match=r"experience 1: behavior_logprobs\[0\] = 0.3 is positive"):
        write_log(tmp_path / "out.jsonl", [bad])
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match=r"experience 1: prompt_ids\[0\] = 1 is outside the vocabulary \[0, 1\)"):
        validate([bad], vocab_size=1)


def test_group_log_by_group_id_in_order_of_first_appearance():
    exps = _exps() + [Experience(prompt_ids=[1], response_ids=[2], group_id="a"),
                      Experience(prompt_ids=[1], response_ids=[2]), Experience(prompt_ids=[1], response_ids=[3])]
    groups = group_log(exps)
    assert [len(g) for g in groups] == [3, 1, 1, 1]  # a, b, then each row without a group id on its own
    assert groups[0] == [exps[0], exps[1], exps[3]]


def test_check_learnable_without_behaviour_logprobs():
    exps = _exps()  # row 3 is an expert trace without behaviour log-probs
    for loss in ("reinforce", "rec", "sft", "ppo_clip"):  # the proximal old_logp is recomputed, not logged
        check_learnable(exps, loss=loss)
    with pytest.raises(ValueError, match=r"loss 'topr' needs behavior_logprobs, which 1 of 3 logged experiences "
                                         r"lack \(first: row 3, source 'expert'\)"):
        check_learnable(exps, loss="topr")
    with pytest.raises(ValueError, match="rl.old_logp='behavior' needs behavior_logprobs"):
        check_learnable(exps, loss="ppo_clip", old_logp="behavior")
    with pytest.raises(ValueError, match="correction 'tis_token' needs behavior_logprobs"):
        check_learnable(exps, loss="ppo_clip", correction="tis_token")


def test_check_learnable_decoupled_needs_behaviour_train_logprobs():
    exps = _exps()[:2]
    check_learnable(exps, loss="topr")
    check_learnable(exps[1:], loss="ppo_clip", correction="turn_level")
    with pytest.raises(ValueError, match="correction 'turn_level' needs turn_ids, which 1 of 2"):
        check_learnable(exps, loss="ppo_clip", correction="turn_level")
    with pytest.raises(ValueError, match=r"correction 'decoupled' needs behavior_train_logprobs, which 1 of 2 "
                                         r"logged experiences lack \(first: row 2"):
        check_learnable(exps, loss="ppo_clip", correction="decoupled")
    with pytest.raises(KeyError, match="unknown policy loss 'nope'"):
        check_learnable(exps, loss="nope")
    with pytest.raises(ValueError, match="rl.old_logp must be"):
        check_learnable(exps, loss="ppo_clip", old_logp="engine")


def test_summarize():
    s = summarize(_exps())
    assert s["rows"] == 3 and s["groups"] == 2 and s["sources"] == {"policy": 2, "expert": 1}
    assert s["with_behavior_logprobs"] == pytest.approx(2 / 3)
    assert s["policy_version"] == {"min": 0, "max": 3, "histogram": {"0": 1, "1": 1, "3": 1}}
    assert s["reward"]["mean"] == pytest.approx(2 / 3) and s["response_length"]["max"] == 3
    assert s["engines"] == {"tiny": 1, "None": 2}
    json.dumps(s)
