"""The ``file`` task: jsonl / parquet rows, hashed or explicit eval split, precise row errors."""

import importlib.util
import json
import sys

import pytest

from offpolicy.data.tasks import make_task


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows(n, start=0):
    return [{"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1), "solution": str(2 * a + 1)} for a in range(start, start + n)]


def test_solutions_score_one_and_split_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows(400))
    task = make_task("file", path=str(path), eval_fraction=0.2)
    train = task.problems(1000, split="train", seed=0)
    n_eval = len(task._rows["eval"])
    assert 40 < n_eval < 120
    evals = task.problems(n_eval, split="eval", seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    assert len({p.prompt for p in evals}) == n_eval
    assert task.problems(1000, split="train", seed=0) == train
    for p in train[:50] + evals:
        assert task.score(p, p.solution) == 1.0
        assert task.score(p, "nope") == 0.0
    with pytest.raises(ValueError, match=rf"eval split of .*t.jsonl .*has {n_eval} rows; asked for {n_eval + 1}"):
        task.problems(n_eval + 1, split="eval", seed=0)


def test_eval_path_custom_keys_ids_and_numeric_verifier(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "half of 3?", "a": 1.5, "uid": 7}, {"q": "2*2?", "a": 4}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"q": "1/4 as decimal?", "a": "0.25"}])
    task = make_task("file", path=str(train), eval_path=str(evals), prompt_key="q", answer_key="a", id_key="uid",
                     verifier="numeric")
    ps = task.problems(20, split="train", seed=0)
    assert {p.answer for p in ps} == {"1.5", "4"} and all(p.solution is None for p in ps)
    assert "7" in {p.id for p in ps}
    (e,) = task.problems(1, split="eval", seed=0)
    assert task.score(e, "It is 1/4") == 1.0
    assert task.score(e, "<answer>0.250000001</answer>") == 1.0
    assert task.score(e, "0.3") == 0.0


def test_math_verify_verifier_and_user_verifier(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "x?", "answer": "\\frac{1}{2}"}])
    task = make_task("file", path=str(path), verifier="math_verify", eval_fraction=0.01)
    (p,) = task._rows["train"] + task._rows["eval"]  # one row, whichever side it hashed to
    assert task.score(p, "The answer is $0.5$") == 1.0
    assert task.score(p, "$\\frac{2}{3}$") == 0.0

    (tmp_path / "my_rewards.py").write_text("def length(prompt, completion, answer, scale=1.0):\n    return scale * len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user = make_task("file", path=str(path), verifier="my_rewards:length", verifier_params={"scale": 0.5})
    assert user.score(p, "abcd") == 2.0


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ('{"prompt": "a", "answer": ', r"bad\.jsonl:line 3: bad JSON"),
        ('{"prompt": "a"}', r"bad\.jsonl:line 3: missing key 'answer'"),
        ('{"prompt": 5, "answer": "1"}', r"bad\.jsonl:line 3: 'prompt' must be a string, got int 5"),
        ('{"prompt": "a", "answer": ["1"]}', r"bad\.jsonl:line 3: 'answer' must be a string or a number, got list"),
        ('{"prompt": "a", "answer": "1", "solution": 1}', r"bad\.jsonl:line 3: 'solution' must be a string"),
        ('["a", "1"]', r"bad\.jsonl:line 3: expected a JSON object, got list"),
        ('{"prompt": "a", "answer": "1", "id": "x"}', r"bad\.jsonl:line 3: duplicate id 'x' \(first at .*line 1\)"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "1", "id": "x"}, "", bad_line])
    with pytest.raises(ValueError, match=match):
        make_task("file", path=str(path))


def test_missing_file_and_bad_verifier(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"task file not found: .*nope\.jsonl"):
        make_task("file", path=str(missing))
    path = write_jsonl(tmp_path / "t.jsonl", rows(3))
    with pytest.raises(ValueError, match=r"unknown verifier 'fuzzy'; valid names: code, exact, format, math_verify, numeric"):
        make_task("file", path=str(path), verifier="fuzzy")
    with pytest.raises(ValueError, match=r"verifier 'numeric': unknown parameter 'tol'"):
        make_task("file", path=str(path), verifier="numeric", verifier_params={"tol": 1})
    with pytest.raises(ValueError, match=r"t\.json: expected a \.jsonl or \.parquet file"):
        make_task("file", path=str(write_jsonl(tmp_path / "t.json", rows(3))))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="has no rows"):
        make_task("file", path=str(empty))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install 'offpolicy\[parquet\]'"):
        make_task("file", path=str(path))


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows(50)), path)
    task = make_task("file", path=str(path))
    p = task.problems(1, split="train", seed=0)[0]
    assert task.score(p, p.solution) == 1.0
