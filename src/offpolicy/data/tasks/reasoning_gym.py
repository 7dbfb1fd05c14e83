"""Adapter for reasoning-gym's procedurally generated datasets (``make_task("reasoning_gym:chain_sum")``).

reasoning-gym is optional (``pip install 'offpolicy[tasks]'``) and imported only when
such a task is built. Items are generated in chunks from seeds derived from
``(dataset, split, seed, chunk)`` and split by a hash of the question text, so the
eval split costs ~``1/eval_fraction`` generated items per problem; the last few
results are cached, so asking for the same eval set again is free.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections import OrderedDict
from typing import Any, Iterator

from offpolicy.data.rewards import extract_answer
from offpolicy.data.tasks.compact import CompactFormat, compact_format
from offpolicy.data.tasks.base import (
    TASKS,
    Problem,
    Split,
    check_eval_fraction,
    check_split,
    sample_split,
    stable_id,
)

DEFAULT_INSTRUCTION = "Give only the final answer."
PROMPT_FORMATS = ("question", "compact")
# Easy for a tiny model (docs: NOTES.md); shown when a dataset name is unknown.
EASY_DATASETS = (
    "basic_arithmetic", "chain_sum", "leg_counting", "count_bits", "gcd", "lcm",
    "number_sorting", "spell_backward", "letter_counting", "base_conversion",
)
_CHUNK = 512  # items generated per derived seed
_CACHE = 4  # (n, split, seed) results kept per task


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
        import reasoning_gym.factory
    except ImportError as e:
        raise ImportError("reasoning-gym tasks need reasoning-gym: pip install 'offpolicy[tasks]'") from e
    return reasoning_gym


def _derived_seed(*parts: object) -> int:
    text = "|".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % 2**31


@TASKS.register("reasoning_gym")
class ReasoningGymTask:
    """One reasoning-gym dataset; extra keyword params are that dataset's config fields.

    Prompt (``prompt_format="question"``): the question, then ``instruction``
    (default ``DEFAULT_INSTRUCTION``) on its own line, then a newline
    (``instruction=""`` gives the bare question). ``prompt_format="compact"``
    writes prompt and answer in the dataset's compact format instead
    (:mod:`offpolicy.data.tasks.compact`: ``"gcd 12 18="`` -> ``"6"``; no
    instruction) and splits train/eval by the compact prompt, so no prompt is on
    both sides. ``solution`` is the dataset's stored answer (compact form), or
    ``None`` where the dataset's own scorer does not accept it (boxnet,
    graph_color, propositional_logic, rubiks_cube, rush_hour need their
    validator). Score: the completion is stripped, reduced to the content of its
    last ``<answer>...</answer>`` if any, mapped back from the compact form, and
    scored by the dataset's ``score_answer`` given the entry; without
    ``partial_credit`` any score < 1 becomes 0 (the default scorer gives
    substring partial credit: ``' 30'`` -> 0.67).
    """

    def __init__(
        self,
        dataset: str,
        *,
        partial_credit: bool = False,
        eval_fraction: float = 0.1,
        instruction: str | None = None,
        prompt_format: str = "question",
        **config: Any,
    ) -> None:
        rg = _reasoning_gym()
        datasets = rg.factory.DATASETS
        if dataset not in datasets:
            close = difflib.get_close_matches(str(dataset), list(datasets), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise KeyError(
                f"unknown reasoning-gym dataset {dataset!r}; {hint}valid names include "
                f"{', '.join(EASY_DATASETS)} ({len(datasets)} in all: reasoning_gym.factory.DATASETS)"
            )
        self.dataset = dataset
        self.name = f"reasoning_gym:{dataset}"
        if not isinstance(partial_credit, bool):
            raise ValueError(f"task {self.name!r}: partial_credit must be a bool, got {partial_credit!r}")
        self.prompt_format = prompt_format
        self.compact = self._check_format(prompt_format, instruction)
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.partial_credit = partial_credit
        self.eval_fraction = check_eval_fraction(self.name, eval_fraction)

        fields = [f.name for f in dataclasses.fields(datasets[dataset][1]) if f.name not in ("seed", "size")]
        for key in config:
            if key in ("seed", "size"):
                raise ValueError(f"task {self.name!r}: {key!r} is set by problems(n, seed=...), not by the task")
            if key not in fields:
                raise ValueError(
                    f"task {self.name!r}: unknown parameter {key!r}; valid parameters: partial_credit, "
                    f"eval_fraction, instruction, prompt_format and the dataset config fields {', '.join(fields) or '(none)'}"
                )
        self.config = config
        self._scorer = self._create(seed=0, size=1)  # also validates the config now, not at the first batch
        self._cache: OrderedDict[tuple[int, str, int], list[Problem]] = OrderedDict()

    def _check_format(self, prompt_format: Any, instruction: Any) -> CompactFormat | None:
        """The compact format (``None`` for ``"question"``); errors name the key and the allowed values."""
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"task {self.name!r}: prompt_format must be one of {', '.join(PROMPT_FORMATS)}, "
                             f"got {prompt_format!r}")
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"task {self.name!r}: instruction must be a string, got {instruction!r}")
        if prompt_format == "question":
            return None
        if instruction is not None:
            raise ValueError(f"task {self.name!r}: instruction is not used with prompt_format: compact "
                             "(compact prompts carry no instruction); remove it")
        try:
            return compact_format(self.dataset)
        except KeyError as e:
            raise ValueError(f"task {self.name!r}: {e.args[0]}") from None

    def __repr__(self) -> str:
        return (
            f"ReasoningGymTask({self.dataset!r}, prompt_format={self.prompt_format!r}, "
            f"partial_credit={self.partial_credit}, "
            f"eval_fraction={self.eval_fraction}, config={self.config!r})"
        )

    def _create(self, *, seed: int, size: int) -> Any:
        rg = _reasoning_gym()
        try:
            return rg.create_dataset(self.dataset, seed=seed, size=size, **self.config)
        except (AssertionError, TypeError, ValueError) as e:
            raise ValueError(f"task {self.name!r}: invalid dataset config {self.config!r}: {e}") from e

    def _candidates(self, split: Split, seed: int) -> Iterator[tuple[str, dict]]:
        chunk = 0
        while True:
            ds = self._create(seed=_derived_seed(self.dataset, split, seed, chunk), size=_CHUNK)
            for i in range(_CHUNK):
                entry = ds[i]
                yield (self.compact.prompt(entry) if self.compact else entry["question"]), entry
            chunk += 1

    def problems(self, n: int, *, split: Split, seed: int) -> list[Problem]:
        """``n`` problems of ``split``: i.i.d. for ``train``, distinct questions for ``eval``."""
        check_split(self.name, n, split)
        key = (n, split, seed)
        if key in self._cache:
            self._cache.move_to_end(key)
            return list(self._cache[key])
        entries = sample_split(
            self._candidates(split, seed),
            n,
            split=split,
            eval_fraction=self.eval_fraction,
            distinct=split == "eval",
            task=self.name,
        )
        out = [self._problem(entry) for entry in entries]
        self._cache[key] = out
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return list(out)

    def _problem(self, entry: dict) -> Problem:
        question = entry["question"]
        stored = entry["answer"]
        if self.compact:
            prompt, answer = self.compact.prompt(entry), self.compact.answer(entry)
        else:
            prompt = f"{question.rstrip()}\n{self.instruction}\n" if self.instruction else question
            answer = "" if stored is None else str(stored)
        accepted = stored is not None and self._score(answer, entry) >= 1.0
        meta = {"entry": entry, "dataset": self.dataset}
        return Problem(stable_id(self.name, prompt, answer), prompt, answer, answer if accepted else None, meta)

    def score(self, problem: Problem, completion: str) -> float:
        entry = problem.meta.get("entry")
        if entry is None:
            raise ValueError(
                f"task {self.name!r}: problem {problem.id!r} has no reasoning-gym entry in meta['entry']; "
                "score only problems made by this task"
            )
        reward = min(max(self._score(extract_answer(completion), entry), 0.0), 1.0)
        if not self.partial_credit and reward < 1.0:
            return 0.0
        return reward

    def _score(self, answer: str, entry: dict) -> float:
        """The dataset's own ``score_answer`` of ``answer`` (compact answers mapped back first)."""
        if self.compact:
            answer = self.compact.to_scorer(answer)
        return float(self._scorer.score_answer(answer, entry))
