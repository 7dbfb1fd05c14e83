"""Compact prompt formats of reasoning-gym datasets and the suite definition (needs reasoning-gym)."""

import json

import pytest

pytest.importorskip("reasoning_gym")

from offpolicy.data.tasks import make_task  # noqa: E402
from offpolicy.data.tasks.compact import COMPACT_FORMATS  # noqa: E402
from offpolicy.policy.tokenizer import CharTokenizer  # noqa: E402
from offpolicy.suite import ALTERNATES, LADDER, SUITE, in_band, suite_task  # noqa: E402

# dataset -> (small config, a regex the compact prompt must match)
CASES = {
    "basic_arithmetic": ({"min_terms": 2, "max_terms": 2, "max_digits": 2, "operators": ["+", "-", "*"],
                          "allow_parentheses": False, "allow_negation": False}, r"\d+[-+*]\d+="),
    "chain_sum": ({"min_terms": 3, "max_terms": 3, "max_digits": 2}, r"\d+([-+]\d+){2}="),
    "count_bits": ({"max_n": 4095}, r"bits 1[01]*="),
    "spell_backward": ({"max_word_len": 6}, r"rev [A-Za-z]+="),
    "number_sorting": ({"min_numbers": 3, "max_numbers": 4, "max_decimals": 0, "min_value": 0, "max_value": 99},
                       r"(asc|desc)( \d+){3,4}="),
    "gcd": ({"max_value": 99}, r"gcd \d+ \d+="),
    "lcm": ({}, r"lcm \d+ \d+="),
    "letter_counting": ({"min_words": 2, "max_words": 3}, r"count [a-z]( \S+)+="),
    "base_conversion": ({"min_value": 1, "max_value": 100, "max_base": 9}, r"[0-9a-z]+ b\d>b\d="),
    "leg_counting": ({"min_animals": 1, "max_animals": 2, "max_instances": 5}, r"legs( \d+ [a-z ]+?)+="),
}


def test_every_format_is_tested():
    assert set(CASES) == set(COMPACT_FORMATS)


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_compact_prompt_round_trip(dataset):
    """Prompt shape, ASCII only (the char tokenizer knows every character), the stored solution scores 1.0
    with the dataset's own scorer, a wrong answer scores 0, train and eval prompts are disjoint."""
    import re

    params, shape = CASES[dataset]
    task = make_task(f"reasoning_gym:{dataset}", prompt_format="compact", **params)
    tok = CharTokenizer()
    train = task.problems(60, split="train", seed=0)
    for p in train:
        assert re.fullmatch(shape, p.prompt), p.prompt
        assert "\n" not in p.prompt and tok.encode(p.prompt + p.answer, strict=True)
        assert p.solution == p.answer
        assert task.score(p, p.solution) == 1.0
        assert task.score(p, f" {p.solution}\n") == 1.0
        assert task.score(p, f"{p.solution}9") == 0.0
        assert task.score(p, "") == 0.0
    evals = task.problems(20, split="eval", seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in evals}


def test_compact_examples():
    chain = make_task("reasoning_gym:chain_sum", prompt_format="compact", min_terms=2, max_terms=2)
    p = chain.problems(1, split="train", seed=0)[0]
    expr = p.meta["entry"]["metadata"]["expression"]
    assert p.prompt == expr.replace(" ", "") + "="
    sort = make_task("reasoning_gym:number_sorting", prompt_format="compact", max_decimals=0, min_value=0)
    for p in sort.problems(20, split="train", seed=0):
        numbers = [int(x) for x in p.prompt.split("=")[0].split()[1:]]
        descending = p.prompt.startswith("desc")
        assert p.answer == " ".join(map(str, sorted(numbers, reverse=descending)))
        assert sort.score(p, " ".join(map(str, sorted(numbers, reverse=not descending)))) == (len(set(numbers)) == 1)


def test_number_sorting_answer_maps_to_the_scorers_list():
    fmt = COMPACT_FORMATS["number_sorting"]
    assert json.loads(fmt.to_scorer("3 5 -9")) == ["3", "5", "-9"]


def test_compact_errors_name_the_dataset_and_key():
    with pytest.raises(ValueError, match="'figlet_font' has no compact prompt format; .*supports .*chain_sum"):
        make_task("reasoning_gym:figlet_font", prompt_format="compact")
    with pytest.raises(ValueError, match="prompt_format must be one of question, compact, got 'short'"):
        make_task("reasoning_gym:chain_sum", prompt_format="short")
    with pytest.raises(ValueError, match="instruction is not used with prompt_format: compact"):
        make_task("reasoning_gym:chain_sum", prompt_format="compact", instruction="Answer.")


def test_question_format_unchanged():
    task = make_task("reasoning_gym:chain_sum")
    p = task.problems(1, split="train", seed=0)[0]
    assert p.prompt.endswith("\nGive only the final answer.\n")


@pytest.mark.parametrize("entry", SUITE + ALTERNATES, ids=lambda t: t.name)
def test_suite_task_fits_its_context(entry):
    """Every prompt + answer + EOS of the suite task fits ``max_new_tokens`` and ``max_len``, and its start
    config validates."""
    from offpolicy.config import load_config

    cfg = load_config(None, entry.overrides(LADDER[0], "/tmp/unused"))
    assert cfg.sft.keep_best and cfg.rl.steps == 0
    task = make_task(entry.task, **entry.params)
    problems = task.problems(300, split="train", seed=0) + task.problems(entry.eval_problems, split="eval", seed=1)
    assert all(p.solution is not None for p in problems)
    assert max(len(p.answer) for p in problems) + 1 <= entry.max_new_tokens
    assert max(len(p.prompt) for p in problems) + entry.max_new_tokens <= entry.max_len


def test_suite_names_and_band():
    assert len(SUITE) >= 6 and len({t.name for t in SUITE + ALTERNATES}) == len(SUITE + ALTERNATES)
    assert suite_task("gcd").kind == "number theory"
    with pytest.raises(KeyError, match="unknown suite task 'nope'; valid names: addition"):
        suite_task("nope")
    assert in_band(0.2, 0.4) and not in_band(0.2, 0.3) and not in_band(0.5, 0.9) and not in_band(0.1, 0.5)
