"""The Task protocol, the Problem record, the task registry and the hashed train/eval split.

A task hands out :class:`Problem` s (prompt + reference answer + optional expert
solution) and scores completions in [0, 1]. Train and eval splits are disjoint
by construction: a stable hash of each problem's *content* (its canonical
question text, never its position or the seed) sends a fixed ~``eval_fraction``
of the problem space to ``eval``; :func:`sample_split` rejection-samples
candidates from the requested side. Because the hash ignores the seed and the
task's other parameters, a held-out problem stays held out across runs, seeds
and configs, and a smaller ``eval_fraction`` gives a subset of a larger one.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol, TypeVar, runtime_checkable

from offpolicy.objectives.registry import Registry

Split = Literal["train", "eval"]
T = TypeVar("T")

_SPLIT_SALT = b"offpolicy-split-v1"
_ID_SALT = b"offpolicy-id-v1"


@dataclass(frozen=True)
class Problem:
    """One verifiable prompt."""

    id: str  # stable unique id: same problem -> same id across runs
    prompt: str  # exact text given to the model
    answer: str  # reference answer the verifier checks against
    solution: str | None = None  # expert completion (no EOS); None if the task has none
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@runtime_checkable
class Task(Protocol):
    name: str

    def problems(self, n: int, *, split: Split, seed: int) -> list[Problem]: ...

    def score(self, problem: Problem, completion: str) -> float: ...  # in [0, 1]


TASKS = Registry("task")


def make_task(name: str, **params: Any) -> Task:
    """Build a registered task; ``"reasoning_gym:<dataset>"`` selects a reasoning-gym dataset.

    Unknown names raise ``KeyError`` listing the valid ones; unknown or invalid
    parameters raise ``ValueError`` naming the parameter and the task.
    """
    base, sep, sub = name.partition(":")
    if sep:
        if base != "reasoning_gym" or not sub:
            raise KeyError(f"unknown task {name!r}; valid names: {_valid_task_names()}")
        if "dataset" in params:
            raise ValueError(f"task {name!r}: give the dataset in the name or as `dataset`, not both")
        params = {"dataset": sub, **params}
        name = base
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid names: {_valid_task_names()}")
    factory = TASKS[name]
    check_params(f"task {name!r}", factory, params)
    return factory(**params)


def _valid_task_names() -> str:
    names = sorted(TASKS)
    if "reasoning_gym" in names:
        names.append("reasoning_gym:<dataset>")
    return ", ".join(names)


def check_params(what: str, fn: Callable[..., Any], params: dict[str, Any], *, n_positional: int = 0) -> None:
    """Raise ``ValueError`` if ``params`` has a key ``fn`` does not accept or lacks a required one.

    The first ``n_positional`` parameters of ``fn`` are supplied by the caller and
    not checked. Functions taking ``**kwargs`` check their own extra keywords.
    """
    sig = list(inspect.signature(fn).parameters.values())[n_positional:]
    named = [p for p in sig if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not any(p.kind is p.VAR_KEYWORD for p in sig):
        for key in params:
            if key not in [p.name for p in named]:
                valid = ", ".join(p.name for p in named) or "(none)"
                raise ValueError(f"{what}: unknown parameter {key!r}; valid parameters: {valid}")
    for p in named:
        if p.default is p.empty and p.name not in params:
            raise ValueError(f"{what}: missing required parameter {p.name!r}")


# --------------------------------------------------------------------- hashing

def content_hash(text: str) -> int:
    """A stable 64-bit hash of ``text`` (blake2b; identical across runs, machines and Python versions)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "big")


def split_of(key: str, eval_fraction: float) -> Split:
    """Which split the problem with canonical content ``key`` belongs to."""
    return "eval" if content_hash(key) < eval_fraction * 2.0**64 else "train"


def stable_id(task_name: str, prompt: str, answer: str) -> str:
    """``"<task>:<16 hex>"`` from the prompt and the answer."""
    digest = hashlib.blake2b(f"{prompt}\x00{answer}".encode(), digest_size=8, key=_ID_SALT).hexdigest()
    return f"{task_name}:{digest}"


def check_eval_fraction(task: str, eval_fraction: Any) -> float:
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise ValueError(f"task {task!r}: eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    return float(eval_fraction)


def check_split(task: str, n: int, split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"task {task!r}: split must be 'train' or 'eval', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"task {task!r}: n must be an int >= 0, got {n!r}")


def sample_split(
    candidates: Iterable[tuple[str, T]],
    n: int,
    *,
    split: Split,
    eval_fraction: float,
    distinct: bool,
    task: str,
    max_draws: int | None = None,
) -> list[T]:
    """Keep the first ``n`` candidates ``(key, item)`` whose ``key`` hashes into ``split``.

    With ``distinct=True`` a key is kept at most once. Gives up with a
    ``ValueError`` after ``max_draws`` candidates (default: 50x the expected
    number) -- the split is then (nearly) exhausted.
    """
    threshold = eval_fraction * 2.0**64
    want_eval = split == "eval"
    p_side = eval_fraction if want_eval else 1.0 - eval_fraction
    if max_draws is None:
        max_draws = int(50 * (n + 10) / p_side)
    out: list[T] = []
    seen: set[str] = set()
    draws = 0
    for key, item in candidates:
        if len(out) >= n:
            break
        if draws >= max_draws:
            break
        draws += 1
        if (content_hash(key) < threshold) != want_eval:
            continue
        if distinct:
            if key in seen:
                continue
            seen.add(key)
        out.append(item)
    if len(out) < n:
        kind = "distinct " if distinct else ""
        raise ValueError(
            f"task {task!r}: found only {len(out)} {kind}{split} problems of the {n} asked for "
            f"after {draws} draws; the {split} split is (nearly) exhausted -- ask for fewer, "
            f"make the task larger, or change eval_fraction ({eval_fraction})"
        )
    return out
