"""Verifiers, user reward functions and the guarded batch scorer."""

import logging
import math
import threading
import time

import pytest

from offpolicy.data.rewards import (
    VERIFIERS,
    extract_answer,
    load_reward_fn,
    make_reward_fn,
    parse_number,
    score_batch,
)
from offpolicy.data.tasks import Problem, make_task


def probs(n, answer="1"):
    return [Problem(f"p{i}", "q", answer, answer) for i in range(n)]


# ----------------------------------------------------------------- verifiers

def test_extract_answer():
    assert extract_answer("  42 \n") == "42"
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>!") == "2"
    assert extract_answer("<answer>multi\nline</answer>") == "multi\nline"


def test_exact():
    exact = VERIFIERS["exact"]
    assert exact(" 12\n", "12") == 1.0
    assert exact("<answer>12</answer>", "12") == 1.0
    assert exact("123", "12") == 0.0


@pytest.mark.parametrize(
    "text, value",
    [("12", 12.0), ("-3.5", -3.5), ("1,234", 1234.0), ("3/4", 0.75), ("the answer is 7.", 7.0),
     ("1e3", 1000.0), ("x", None), ("1/0", None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numeric():
    numeric = VERIFIERS["numeric"]
    assert numeric("0.5", "1/2") == 1.0
    assert numeric("So it is 3.0000000001", "3") == 1.0
    assert numeric("3.01", "3") == 0.0
    assert numeric("3.01", "3", abs_tol=0.1) == 1.0
    assert numeric("no number", "3") == 0.0
    with pytest.raises(ValueError, match="reference answer 'abc' is not a number"):
        numeric("3", "abc")


def test_math_verify():
    mv = VERIFIERS["math_verify"]
    assert mv("The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert mv("\\boxed{3}", "3") == 1.0
    assert mv("$1+x$", "x+1") == 1.0
    assert mv("$4$", "3") == 0.0
    assert mv("nothing", "3") == 0.0


def test_math_verify_works_off_the_main_thread():
    mv = VERIFIERS["math_verify"]
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=mv("$\\frac{2}{4}$", "\\frac{1}{2}")))
    thread.start()
    thread.join(30)
    assert out == {"r": 1.0}
    reward = make_reward_fn("math_verify")
    res = score_batch(lambda p, c: reward(p.prompt, c, p.answer), probs(4, "2"), ["2", "$2$", "3", "\\boxed{2}"],
                      timeout_s=30)
    assert res.rewards == [1.0, 1.0, 0.0, 1.0] and res.n_errors == 0


def test_format():
    fmt = VERIFIERS["format"]
    assert fmt("think <answer>3</answer>", "3") == 1.0
    assert fmt("3", "3") == 0.0
    assert fmt("abc", "", pattern=r"[a-c]+", fullmatch=True) == 1.0
    assert fmt("abcd", "", pattern=r"[a-c]+", fullmatch=True) == 0.0


def test_make_reward_fn_binds_params_and_checks_them():
    fn = make_reward_fn("numeric", abs_tol=0.5)
    assert fn("prompt", "3.4", "3") == 1.0
    with pytest.raises(ValueError, match=r"verifier 'numeric': unknown parameter 'tolerance'; valid parameters: rel_tol, abs_tol"):
        make_reward_fn("numeric", tolerance=1)
    with pytest.raises(KeyError, match="unknown verifier 'nope'; valid names: code, exact, format, math_verify, numeric"):
        make_reward_fn("nope")


# ------------------------------------------------------- user reward functions

def test_load_reward_fn(tmp_path, monkeypatch):
    (tmp_path / "user_rw.py").write_text(
        "import math\nNOT_FN = 3\ndef reward(prompt, completion, answer):\n    return float(completion == answer)\n"
        "class Ns:\n    @staticmethod\n    def f(p, c, a):\n        return 0.5\n"
    )
    (tmp_path / "broken_rw.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("user_rw:reward")("p", "1", "1") == 1.0
    assert load_reward_fn("user_rw:Ns.f")("p", "1", "1") == 0.5
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_reward_fn("user_rw.reward")
    with pytest.raises(ValueError, match="module 'no_such_mod_xyz' not found"):
        load_reward_fn("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="importing 'broken_rw' failed.*not_a_real_dependency_xyz"):
        load_reward_fn("broken_rw:f")
    with pytest.raises(ValueError, match="module 'user_rw' has no attribute 'missing'"):
        load_reward_fn("user_rw:missing")
    with pytest.raises(ValueError, match="'NOT_FN' is a int, not callable"):
        load_reward_fn("user_rw:NOT_FN")


# -------------------------------------------------------------- score_batch

def test_fast_path_is_fast():
    task = make_task("arithmetic")
    problems = task.problems(1024, split="train", seed=0)
    completions = [p.answer if i % 2 else "0" for i, p in enumerate(problems)]
    start = time.perf_counter()
    res = score_batch(task.score, problems, completions)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.05, elapsed  # ~1 ms
    assert res.rewards == [task.score(p, c) for p, c in zip(problems, completions)]
    assert res.n_errors == res.n_timeouts == 0 and res.first_error is None


def flaky(problem, completion):
    if completion == "raise":
        raise RuntimeError("boom")
    if completion == "nan":
        return math.nan
    if completion == "inf":
        return -math.inf
    if completion == "str":
        return "1.0"
    if completion == "none":
        return None
    if completion == "sleep":
        time.sleep(3)
        return 1.0
    return float(completion)


@pytest.mark.parametrize("timeout_s", [None, 1.0])
def test_bad_rewards_become_zero_and_are_counted(timeout_s, caplog):
    completions = ["1", "raise", "nan", "0.5", "inf", "str", "none", "1"]
    with caplog.at_level(logging.WARNING, logger="offpolicy.data.rewards"):
        res = score_batch(flaky, probs(len(completions)), completions, timeout_s=timeout_s)
    assert res.rewards == [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0]
    assert res.n_errors == 5 and res.n_timeouts == 0
    assert res.first_error == "problem 'p1': RuntimeError: boom"
    assert len(caplog.records) == 1 and "5 errors" in caplog.records[0].getMessage()


def test_timeouts_give_zero_without_hanging_the_batch():
    completions = ["sleep", "1", "sleep", "sleep", "0.25", "1", "sleep", "1"]
    start = time.perf_counter()
    res = score_batch(flaky, probs(len(completions)), completions, timeout_s=0.2, max_workers=2)
    elapsed = time.perf_counter() - start
    # 4 sleepers, 2 workers: stuck workers are replaced, so ~2 rounds of 0.2 s, not 4 x 3 s
    assert elapsed < 1.5, elapsed
    assert res.rewards == [0.0, 1.0, 0.0, 0.0, 0.25, 1.0, 0.0, 1.0]
    assert res.n_timeouts == 4 and res.n_errors == 0


def test_score_batch_checks_lengths_and_timeout():
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        score_batch(flaky, probs(2), ["1"])
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        score_batch(flaky, probs(1), ["1"], timeout_s=0)
    assert score_batch(flaky, [], [], timeout_s=1.0).rewards == []
