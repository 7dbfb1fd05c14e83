"""The reasoning-gym adapter (needs the optional reasoning-gym package)."""

import sys

import pytest

pytest.importorskip("reasoning_gym")

from offpolicy.data.tasks import make_task  # noqa: E402

EASY = ["chain_sum", "basic_arithmetic", "leg_counting"]


@pytest.mark.parametrize("dataset", EASY)
def test_solution_scores_one_wrong_scores_zero(dataset):
    task = make_task(f"reasoning_gym:{dataset}")
    assert task.name == f"reasoning_gym:{dataset}"
    for p in task.problems(40, split="train", seed=0):
        assert p.id.startswith(f"reasoning_gym:{dataset}:")
        assert p.prompt.endswith("\nGive only the final answer.\n")
        assert p.prompt.startswith(p.meta["entry"]["question"].rstrip())
        assert p.solution == p.answer
        assert task.score(p, p.solution) == 1.0
        assert task.score(p, f"  {p.solution}\n") == 1.0
        assert task.score(p, f"thinking... <answer>{p.solution}</answer>") == 1.0
        assert task.score(p, "<answer>-999999</answer>") == 0.0
        assert task.score(p, "") == 0.0


@pytest.mark.parametrize("dataset", EASY)
def test_splits_disjoint_and_deterministic(dataset):
    task = make_task(f"reasoning_gym:{dataset}")
    train = task.problems(600, split="train", seed=0)
    evals = task.problems(60, split="eval", seed=0)
    questions = lambda ps: {p.meta["entry"]["question"] for p in ps}  # noqa: E731
    assert not questions(train) & questions(evals)
    assert len(questions(evals)) == 60
    fresh = make_task(f"reasoning_gym:{dataset}")
    assert fresh.problems(600, split="train", seed=0) == train
    assert fresh.problems(60, split="eval", seed=0) == evals
    assert fresh.problems(600, split="train", seed=1) != train


def test_partial_credit_off_by_default():
    strict = make_task("reasoning_gym:chain_sum")
    lenient = make_task("reasoning_gym:chain_sum", partial_credit=True)
    p = strict.problems(1, split="train", seed=0)[0]
    wordy = f"The answer is {p.answer}"
    assert strict.score(p, wordy) == 0.0
    assert 0.0 < lenient.score(p, wordy) < 1.0
    assert lenient.score(p, p.answer) == 1.0


def test_dataset_config_passes_through():
    task = make_task("reasoning_gym:chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    for p in task.problems(50, split="train", seed=0):
        expr = p.meta["entry"]["metadata"]["expression"]
        assert len(expr.split()) == 3
        assert task.score(p, p.answer) == 1.0


def test_instruction_param():
    task = make_task("reasoning_gym:chain_sum", instruction="")
    p = task.problems(1, split="train", seed=0)[0]
    assert p.prompt == p.meta["entry"]["question"]
    assert make_task("reasoning_gym", dataset="chain_sum").problems(1, split="train", seed=0)[0].answer == p.answer


def test_errors():
    with pytest.raises(KeyError, match=r"unknown reasoning-gym dataset 'chain_summ'.*did you mean chain_sum.*leg_counting"):
        make_task("reasoning_gym:chain_summ")
    with pytest.raises(ValueError, match=r"task 'reasoning_gym:chain_sum': unknown parameter 'max_term'.*max_terms"):
        make_task("reasoning_gym:chain_sum", max_term=3)
    with pytest.raises(ValueError, match=r"'seed' is set by problems"):
        make_task("reasoning_gym:chain_sum", seed=3)
    with pytest.raises(ValueError, match=r"task 'reasoning_gym:chain_sum': invalid dataset config"):
        make_task("reasoning_gym:chain_sum", min_terms=5, max_terms=2)
    with pytest.raises(ValueError, match="partial_credit must be a bool"):
        make_task("reasoning_gym:chain_sum", partial_credit="no")


def test_stored_answer_rejected_by_own_scorer_gives_no_solution():
    task = make_task("reasoning_gym:propositional_logic")  # needs its validator (see NOTES.md)
    assert all(p.solution is None for p in task.problems(5, split="train", seed=0))


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(ImportError, match=r"pip install 'offpolicy\[tasks\]'"):
        make_task("reasoning_gym:chain_sum")
