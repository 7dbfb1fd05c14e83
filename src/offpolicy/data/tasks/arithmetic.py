"""Integer arithmetic (``"12+345="`` -> ``"357"``): the built-in task for the tiny model. Pure Python."""

from __future__ import annotations

import random
from typing import Any, Iterator

from offpolicy.data.tasks.base import (
    TASKS,
    Problem,
    Split,
    check_eval_fraction,
    check_split,
    sample_split,
    stable_id,
)

_OPS = "+-*"


def _check_int(task: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"task {task!r}: {key} must be an int >= {low}, got {value!r}")
    return value


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with the usual precedence (``*`` before ``+ -``)."""
    total, term = 0, operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            term *= x
        else:
            total += term
            term = x if op == "+" else -x
    return total + term


def format_answer(value: int, reverse: bool) -> str:
    """``str(value)``; with ``reverse`` the digits least-significant first, sign kept in front.

    ``format_answer(120, True) == "021"``, ``format_answer(-123, True) == "-321"``.
    """
    if not reverse:
        return str(value)
    sign = "-" if value < 0 else ""
    return sign + str(abs(value))[::-1]


class ArithmeticTask:
    """``n_terms`` non-negative integers joined by operators drawn from ``ops``; the answer is the exact value.

    Each operand first draws its digit count uniformly from
    ``[min_digits, max_digits]`` and then a number with exactly that many
    digits (1 digit includes 0), so short operands are not swamped by long
    ones. Results of ``-`` may be negative (``"3-15="`` -> ``"-12"``).
    ``reverse_answer`` writes the answer least-significant digit first
    (sign still in front), which makes addition much easier for small
    transformers (Lee et al. 2023, arXiv:2307.03381). Score: exact match after
    stripping whitespace. The split hashes the prompt, so ``"12+34="`` and
    ``"34+12="`` are split independently.
    """

    def __init__(
        self,
        name: str,
        *,
        min_digits: int,
        max_digits: int,
        n_terms: int,
        ops: str,
        reverse_answer: bool,
        eval_fraction: float,
    ) -> None:
        self.name = task = name
        self.min_digits = _check_int(task, "min_digits", min_digits, 1)
        self.max_digits = _check_int(task, "max_digits", max_digits, 1)
        if max_digits < min_digits:
            raise ValueError(f"task {task!r}: max_digits ({max_digits}) must be >= min_digits ({min_digits})")
        self.n_terms = _check_int(task, "n_terms", n_terms, 2)
        if not isinstance(ops, str) or not ops or any(c not in _OPS for c in ops):
            raise ValueError(f"task {task!r}: ops must be a non-empty string of characters from {_OPS!r}, got {ops!r}")
        self.ops = "".join(sorted(set(ops), key=_OPS.index))
        if not isinstance(reverse_answer, bool):
            raise ValueError(f"task {task!r}: reverse_answer must be a bool, got {reverse_answer!r}")
        self.reverse_answer = reverse_answer
        self.eval_fraction = check_eval_fraction(task, eval_fraction)

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(name={self.name!r}, min_digits={self.min_digits}, max_digits={self.max_digits}, "
            f"n_terms={self.n_terms}, ops={self.ops!r}, reverse_answer={self.reverse_answer}, "
            f"eval_fraction={self.eval_fraction})"
        )

    def _candidates(self, rng: random.Random) -> Iterator[tuple[str, tuple[str, list[int], list[str]]]]:
        randint, choice = rng.randint, rng.choice
        lo, hi, k, ops = self.min_digits, self.max_digits, self.n_terms, self.ops
        bounds = {d: (0 if d == 1 else 10 ** (d - 1), 10**d - 1) for d in range(lo, hi + 1)}
        while True:
            operands = [randint(*bounds[randint(lo, hi)]) for _ in range(k)]
            chosen = [choice(ops) for _ in range(k - 1)]
            parts = [str(operands[0])]
            for op, x in zip(chosen, operands[1:]):
                parts += (op, str(x))
            prompt = "".join(parts) + "="
            yield prompt, (prompt, operands, chosen)

    def problems(self, n: int, *, split: Split, seed: int) -> list[Problem]:
        """``n`` problems of ``split``: i.i.d. for ``train``, distinct for ``eval``; deterministic in ``seed``."""
        check_split(self.name, n, split)
        rng = random.Random(f"arithmetic|{split}|{seed}")  # same stream for presets
        drawn = sample_split(
            self._candidates(rng),
            n,
            split=split,
            eval_fraction=self.eval_fraction,
            distinct=split == "eval",
            task=self.name,
        )
        out = []
        for prompt, operands, ops in drawn:
            value = evaluate(operands, ops)
            answer = format_answer(value, self.reverse_answer)
            meta = {"operands": operands, "ops": ops, "value": value}
            out.append(Problem(stable_id(self.name, prompt, answer), prompt, answer, answer, meta))
        return out

    def score(self, problem: Problem, completion: str) -> float:
        return 1.0 if completion.strip() == problem.answer else 0.0


@TASKS.register("arithmetic")
def arithmetic(
    *,
    min_digits: int = 1,
    max_digits: int = 2,
    n_terms: int = 2,
    ops: str = "+",
    reverse_answer: bool = False,
    eval_fraction: float = 0.1,
) -> ArithmeticTask:
    """Integer arithmetic; see :class:`ArithmeticTask`."""
    return ArithmeticTask(
        "arithmetic", min_digits=min_digits, max_digits=max_digits, n_terms=n_terms, ops=ops,
        reverse_answer=reverse_answer, eval_fraction=eval_fraction,
    )


@TASKS.register("addition")
def addition(
    *,
    min_digits: int = 2,
    max_digits: int = 3,
    n_terms: int = 2,
    ops: str = "+",
    reverse_answer: bool = False,
    eval_fraction: float = 0.1,
) -> ArithmeticTask:
    """Preset: ``arithmetic`` with 2-3-digit addition (every parameter can be overridden)."""
    return ArithmeticTask(
        "addition", min_digits=min_digits, max_digits=max_digits, n_terms=n_terms, ops=ops,
        reverse_answer=reverse_answer, eval_fraction=eval_fraction,
    )
