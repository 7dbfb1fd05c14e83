"""Built-in tasks: registry, arithmetic, splits. (reasoning-gym: test_tasks_reasoning_gym.py; files: test_tasks_files.py)"""

import time

import pytest

from offpolicy.data.tasks import TASKS, Problem, Task, make_task
from offpolicy.data.tasks.arithmetic import evaluate, format_answer
from offpolicy.data.tasks.base import split_of


def prompts(problems):
    return {p.prompt for p in problems}


# ------------------------------------------------------------------ registry

def test_registry_names_and_protocol():
    assert {"arithmetic", "addition", "file", "reasoning_gym"} <= set(TASKS)
    task = make_task("arithmetic")
    assert isinstance(task, Task) and task.name == "arithmetic"


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError, match=r"unknown task 'nope'.*addition, arithmetic, file.*reasoning_gym:<dataset>"):
        make_task("nope")
    with pytest.raises(KeyError, match="valid names"):
        make_task("gym:chain_sum")


@pytest.mark.parametrize(
    "params, match",
    [
        ({"digits": 3}, r"task 'arithmetic': unknown parameter 'digits'; valid parameters: min_digits"),
        ({"ops": "+/"}, r"task 'arithmetic': ops must be"),
        ({"min_digits": 3, "max_digits": 2}, r"max_digits \(2\) must be >= min_digits \(3\)"),
        ({"n_terms": 1}, r"n_terms must be an int >= 2"),
        ({"reverse_answer": "yes"}, r"reverse_answer must be a bool"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be a number in \(0, 1\)"),
    ],
)
def test_invalid_params_name_param_and_task(params, match):
    with pytest.raises(ValueError, match=match):
        make_task("arithmetic", **params)


def test_missing_required_param():
    with pytest.raises(ValueError, match=r"task 'file': missing required parameter 'path'"):
        make_task("file")


def test_problem_equality_ignores_meta():
    a = Problem("x", "1+1=", "2", "2", meta={"k": 1})
    b = Problem("x", "1+1=", "2", "2", meta={"k": 2})
    assert a == b and hash(a) == hash(b)


# ---------------------------------------------------------------- arithmetic

def test_evaluate_precedence_and_reverse_format():
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4], ["-", "*"]) == -10
    assert evaluate([2, 3, 4], ["*", "-"]) == 2
    assert evaluate([3, 15], ["-"]) == -12
    assert format_answer(120, reverse=True) == "021"
    assert format_answer(-123, reverse=True) == "-321"
    assert format_answer(-123, reverse=False) == "-123"


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"reverse_answer": True},
        {"ops": "-", "min_digits": 1, "max_digits": 3},
        {"ops": "+-*", "n_terms": 3, "reverse_answer": True},
    ],
)
def test_arithmetic_solutions_score_one_wrong_zero(params):
    task = make_task("arithmetic", **params)
    problems = task.problems(300, split="train", seed=1)
    for p in problems:
        value = eval(p.prompt[:-1])  # the prompt is a plain Python expression + "="
        assert p.meta["value"] == value
        assert p.answer == format_answer(value, params.get("reverse_answer", False))
        assert p.solution == p.answer
        assert task.score(p, p.solution) == 1.0
        assert task.score(p, f"  {p.solution}\n") == 1.0
        assert task.score(p, str(value + 1)) == 0.0
        assert task.score(p, "") == 0.0


def test_subtraction_gives_negative_answers():
    task = make_task("arithmetic", ops="-")
    problems = task.problems(200, split="train", seed=0)
    negative = [p for p in problems if p.meta["value"] < 0]
    assert negative and all(p.answer.startswith("-") for p in negative)
    assert all(task.score(p, p.answer) == 1.0 for p in negative)
    rev = make_task("arithmetic", ops="-", reverse_answer=True)
    p = next(p for p in rev.problems(200, split="train", seed=0) if p.meta["value"] <= -10)
    assert p.answer == "-" + str(-p.meta["value"])[::-1]


def test_arithmetic_prompt_shape_and_digits():
    task = make_task("arithmetic", min_digits=2, max_digits=3, n_terms=3, ops="+-")
    for p in task.problems(200, split="train", seed=3):
        assert p.prompt.endswith("=") and p.prompt.isascii()
        assert all(10 <= x <= 999 for x in p.meta["operands"])
        assert len(p.meta["ops"]) == 2


def test_addition_preset_and_overrides():
    task = make_task("addition")
    assert task.name == "addition"
    problems = task.problems(100, split="train", seed=0)
    assert all(p.id.startswith("addition:") for p in problems)
    assert all(10 <= x <= 999 for p in problems for x in p.meta["operands"])
    assert all("+" in p.prompt and "-" not in p.prompt for p in problems)
    wide = make_task("addition", max_digits=4, reverse_answer=True)
    assert max(x for p in wide.problems(200, split="train", seed=0) for x in p.meta["operands"]) >= 1000
    with pytest.raises(ValueError, match="task 'addition': unknown parameter 'digits'"):
        make_task("addition", digits=3)
    with pytest.raises(ValueError, match="task 'addition': ops must be"):
        make_task("addition", ops="/")


@pytest.mark.parametrize("name, params", [("arithmetic", {}), ("addition", {"eval_fraction": 0.2})])
def test_splits_disjoint_and_deterministic(name, params):
    task = make_task(name, **params)
    train = task.problems(5000, split="train", seed=0)
    train2 = task.problems(5000, split="train", seed=1)
    evals = task.problems(500, split="eval", seed=0)
    assert not prompts(train) & prompts(evals)
    assert not prompts(train2) & prompts(evals)
    assert len(prompts(evals)) == 500  # eval problems are distinct
    assert task.problems(5000, split="train", seed=0) == train
    assert task.problems(500, split="eval", seed=0) == evals
    assert [p.id for p in train] == [p.id for p in task.problems(5000, split="train", seed=0)]
    assert train != train2
    # the split depends on the content only (not on the seed or the other settings),
    # and a smaller eval_fraction holds out a subset of a larger one
    other = make_task("arithmetic", min_digits=1, max_digits=3, ops="+-", eval_fraction=0.1)
    for p in other.problems(100, split="eval", seed=5):
        assert split_of(p.prompt, 0.1) == split_of(p.prompt, 0.2) == "eval"
    for p in other.problems(300, split="train", seed=5):
        assert split_of(p.prompt, 0.1) == "train"


def test_eval_fraction_roughly_respected():
    task = make_task("arithmetic", eval_fraction=0.25)
    # of all 10^4 prompts "a+b=" with a, b < 100, ~25 % go to eval
    n_eval = sum(split_of(f"{a}+{b}=", 0.25) == "eval" for a in range(100) for b in range(100))
    assert 2300 < n_eval < 2700
    assert len(task.problems(n_eval // 2, split="eval", seed=0)) == n_eval // 2


def test_same_problem_same_id_and_distinct_ids():
    task = make_task("arithmetic", max_digits=3)
    problems = task.problems(2000, split="train", seed=0)
    by_prompt = {}
    for p in problems:
        assert by_prompt.setdefault(p.prompt, p.id) == p.id
    assert len(set(by_prompt.values())) == len(by_prompt)
    assert make_task("arithmetic", max_digits=3, reverse_answer=True).problems(1, split="train", seed=0)[0].id != problems[0].id


def test_eval_exhaustion_raises():
    task = make_task("arithmetic", min_digits=1, max_digits=1)  # 100 prompts, ~10 in eval
    with pytest.raises(ValueError, match=r"found only \d+ distinct eval problems of the 50"):
        task.problems(50, split="eval", seed=0)
    assert len(task.problems(500, split="train", seed=0)) == 500  # train draws i.i.d.


def test_bad_split_and_n():
    task = make_task("arithmetic")
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        task.problems(3, split="test", seed=0)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        task.problems(-1, split="train", seed=0)
    assert task.problems(0, split="eval", seed=0) == []


def test_ten_thousand_problems_fast():
    task = make_task("addition")
    start = time.perf_counter()
    problems = task.problems(10_000, split="train", seed=0)
    elapsed = time.perf_counter() - start
    assert len(problems) == 10_000
    assert elapsed < 1.0, elapsed  # ~0.1 s on one core
