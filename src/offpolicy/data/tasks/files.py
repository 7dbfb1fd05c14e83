"""Tasks read from a jsonl or parquet file of ``{"prompt", "answer", "solution"?, "id"?}`` rows."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator

from offpolicy.data.rewards import make_reward_fn
from offpolicy.data.tasks.base import (
    TASKS,
    Problem,
    Split,
    check_eval_fraction,
    check_split,
    split_of,
    stable_id,
)

logger = logging.getLogger(__name__)


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)``: ``where`` is ``"file:line N"`` (jsonl) or ``"file:row N"`` (parquet)."""
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'offpolicy[parquet]'") from e
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: "magic bytes not found"
            raise ValueError(f"task file {path}: not a readable parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row
        return
    if path.suffix != ".jsonl":
        raise ValueError(f"task file {path}: expected a .jsonl or .parquet file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise ValueError(f"task file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:line {lineno}: bad JSON: {e}") from None
        yield f"{path}:line {lineno}", row


def _field(where: str, row: dict, key: str, *, required: bool, numbers_ok: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"{where}: missing key {key!r} (keys: {', '.join(map(str, row)) or '(none)'})")
        return None
    value = row[key]
    if isinstance(value, str):
        return value
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    wanted = "a string or a number" if numbers_ok else "a string"
    raise ValueError(f"{where}: {key!r} must be {wanted}, got {type(value).__name__} {value!r}")


@TASKS.register("file")
class FileTask:
    """Problems from ``path`` (jsonl or parquet); eval from ``eval_path`` or a hashed split of ``path``.

    Row fields: ``prompt_key`` (string), ``answer_key`` (string or number),
    ``solution_key`` (optional string), ``id_key`` (optional string or number;
    default: a hash of prompt and answer). ``verifier`` is a name in
    ``VERIFIERS`` (``exact``, ``numeric``, ``math_verify``, ``format``) or a
    user ``"module:function"``; ``verifier_params`` are its keyword arguments.
    ``problems`` draws i.i.d. rows for ``train`` and distinct rows for ``eval``.
    """

    def __init__(
        self,
        *,
        path: str,
        eval_path: str | None = None,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        solution_key: str = "solution",
        id_key: str = "id",
        verifier: str = "exact",
        verifier_params: dict | None = None,
        eval_fraction: float = 0.1,
    ) -> None:
        self.name = "file"
        if not isinstance(path, (str, Path)):
            raise ValueError(f"task 'file': path must be a string, got {path!r}")
        self.path, self.eval_path = Path(path), None if eval_path is None else Path(eval_path)
        self.keys = dict(prompt=prompt_key, answer=answer_key, solution=solution_key, id=id_key)
        self.eval_fraction = check_eval_fraction(self.name, eval_fraction)
        if verifier_params is not None and not isinstance(verifier_params, dict):
            raise ValueError(f"task 'file': verifier_params must be a dict, got {verifier_params!r}")
        try:
            self._reward = make_reward_fn(verifier, **(verifier_params or {}))
        except KeyError as e:
            raise ValueError(f"task 'file': verifier: {e.args[0]}") from None
        self.verifier = verifier

        rows = self._load(self.path)
        if self.eval_path is None:
            self._rows = {"train": [], "eval": []}
            for p in rows:
                self._rows[split_of(p.prompt, self.eval_fraction)].append(p)
        else:
            self._rows = {"train": rows, "eval": self._load(self.eval_path)}
            overlap = {p.prompt for p in rows} & {p.prompt for p in self._rows["eval"]}
            if overlap:
                logger.warning("task 'file': %d prompts of %s also appear in %s", len(overlap), self.eval_path, self.path)

    def __repr__(self) -> str:
        return f"FileTask(path={str(self.path)!r}, eval_path={self.eval_path and str(self.eval_path)!r}, verifier={self.verifier!r})"

    def _load(self, path: Path) -> list[Problem]:
        problems, first_line = [], {}
        k = self.keys
        for where, row in _read_rows(path):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            prompt = _field(where, row, k["prompt"], required=True)
            answer = _field(where, row, k["answer"], required=True, numbers_ok=True)
            solution = _field(where, row, k["solution"], required=False)
            given_id = _field(where, row, k["id"], required=False, numbers_ok=True)
            pid = given_id if given_id is not None else stable_id("file", prompt, answer)
            if given_id is not None:
                if pid in first_line:
                    raise ValueError(f"{where}: duplicate id {pid!r} (first at {first_line[pid]})")
                first_line[pid] = where
            problems.append(Problem(pid, prompt, answer, solution, {"source": where}))
        if not problems:
            raise ValueError(f"task file {path} has no rows")
        return problems

    def problems(self, n: int, *, split: Split, seed: int) -> list[Problem]:
        check_split(self.name, n, split)
        pool = self._rows[split]
        rng = random.Random(f"file|{split}|{seed}")
        if split == "train":
            if not pool:
                raise ValueError(f"task 'file': {self.path} has no train rows")
            return [pool[rng.randrange(len(pool))] for _ in range(n)]
        if n > len(pool):
            source = self.eval_path or f"{self.path} (eval_fraction={self.eval_fraction})"
            raise ValueError(f"task 'file': the eval split of {source} has {len(pool)} rows; asked for {n}")
        return rng.sample(pool, n)

    def score(self, problem: Problem, completion: str) -> float:
        return float(self._reward(problem.prompt, completion, problem.answer))
