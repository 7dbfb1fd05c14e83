"""Experience logs on disk: one schema, read and written as ``.jsonl`` or ``.parquet``, checked row by row.

A log is the only thing offline training and off-policy evaluation know about the policy that
produced it, so nothing in it is trusted: a token id outside the model's vocabulary ends in an
``IndexError`` deep inside an embedding, and a positive "log-probability" gives plausible-looking
but meaningless importance weights. :func:`read_log` therefore checks every row (types, per-token
lengths, token ids against ``vocab_size``, log-probs finite and ≤ 0, the source) and names the
file and line (``.jsonl``) or row (``.parquet``, 1-based) of the first bad one, with the field.

The schema is documented in ``docs/experiences.md``. Parquet stores the same columns; per-token
fields are list columns, ``policy_version`` is a list column (an int ``v`` is stored as ``[v]``,
and a one-element list reads back as the int: the two mean the same), and ``sampling``/``info``
are JSON strings.

API for the offline loop::

    exps = read_log(path, vocab_size=policy.tokenizer.vocab_size)
    check_learnable(exps, loss=cfg.rl.loss, correction=cfg.rl.correction, old_logp=cfg.rl.old_logp)
    groups = group_log(exps)
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from offpolicy.experience import SOURCES, Experience

SUFFIXES = (".jsonl", ".parquet")
REQUIRED = ("prompt_ids", "response_ids", "reward", "source")
PER_TOKEN = ("response_mask", "behavior_logprobs", "behavior_train_logprobs", "token_rewards", "turn_ids")
JSON_COLUMNS = ("sampling", "info")  # dict fields, stored as JSON strings in parquet
NULLABLE = PER_TOKEN + ("engine", "sampling", "dtype")  # null is a value; elsewhere a parquet null = absent
# log_softmax in float32 can round a probability of 1 to a log-prob of +1e-7; anything above this is
# not rounding but a wrong field (probabilities, logits, or a sign error).
LOGP_TOLERANCE = 1e-5


class _Bad(ValueError):
    """A field-level problem; the reader adds the file and line."""


# ---- field checks -------------------------------------------------------------------------------
INT, NUM = frozenset({int}), frozenset({int, float})  # exact types: a JSON true is not a number


def _list(name: str, v: Any, types: frozenset, what: str, ok: Callable[[Any], bool] | None = None) -> list:
    """``v`` as a list of values of ``types`` that pass ``ok``; otherwise the first bad entry, by index.
    The fast path (a set of types, ``map`` of a C function) keeps a million tokens to about a second."""
    if not isinstance(v, list):
        raise _Bad(f"{name} must be a list of {what}, got {type(v).__name__}")
    if not {type(x) for x in v} <= types or (ok is not None and not all(map(ok, v))):
        i = next(i for i, x in enumerate(v) if type(x) not in types or (ok is not None and not ok(x)))
        raise _Bad(f"{name}[{i}] = {v[i]!r} is not {what}")
    return v


def _token_ids(name: str, v: Any, vocab_size: int | None) -> list[int]:
    v = _list(name, v, INT, "an int token id")
    if v and (min(v) < 0 or (vocab_size is not None and max(v) >= vocab_size)):
        i = next(i for i, x in enumerate(v) if x < 0 or (vocab_size is not None and x >= vocab_size))
        bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise _Bad(f"{name}[{i}] = {v[i]} is outside the vocabulary {bound}")
    return v


def _finite(name: str, v: Any) -> float:
    if type(v) not in NUM or not math.isfinite(v):
        raise _Bad(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _floats(name: str, v: Any) -> list[float] | None:
    if v is None:
        return None
    v = _list(name, v, NUM, "a finite number", math.isfinite)
    return v if {type(x) for x in v} <= {float} else [float(x) for x in v]


def _logprobs(name: str, v: Any) -> list[float] | None:
    v = _floats(name, v)
    if v and max(v) > LOGP_TOLERANCE:
        i = next(i for i, x in enumerate(v) if x > LOGP_TOLERANCE)
        raise _Bad(f"{name}[{i}] = {v[i]} is positive; a log-probability is <= 0")
    return v


def _ints(name: str, v: Any) -> list[int] | None:
    return None if v is None else _list(name, v, INT, "an int")


def _mask(name: str, v: Any) -> list[int] | None:
    if v is None:
        return None
    v = _list(name, v, NUM, "0 or 1", {0, 1}.__contains__)
    return v if {type(x) for x in v} <= INT else [int(x) for x in v]


def _version(name: str, v: Any) -> int | list[int]:
    if type(v) is int and v >= 0:
        return v
    if isinstance(v, list):
        return _list(name, v, INT, "a version (int >= 0)", (0).__le__)
    raise _Bad(f"{name} must be an int >= 0 or a list of them (one per response token), got {v!r}")


def _source(name: str, v: Any) -> str:
    if v not in SOURCES:
        raise _Bad(f"{name} must be one of {list(SOURCES)}, got {v!r}")
    return v


def _str(name: str, v: Any, optional: bool = False) -> str | None:
    if (v is None and optional) or isinstance(v, str):
        return v
    raise _Bad(f"{name} must be a string{' or null' if optional else ''}, got {type(v).__name__}")


def _dict(name: str, v: Any, optional: bool = False) -> dict | None:
    if (v is None and optional) or isinstance(v, dict):
        return v
    raise _Bad(f"{name} must be an object{' or null' if optional else ''}, got {type(v).__name__}")


CHECKS: dict[str, Callable[[str, Any, int | None], Any]] = {
    "prompt_ids": _token_ids,
    "response_ids": _token_ids,
    "reward": lambda n, v, _: _finite(n, v),
    "response_mask": lambda n, v, _: _mask(n, v),
    "behavior_logprobs": lambda n, v, _: _logprobs(n, v),
    "behavior_train_logprobs": lambda n, v, _: _logprobs(n, v),
    "policy_version": lambda n, v, _: _version(n, v),
    "source": lambda n, v, _: _source(n, v),
    "group_id": lambda n, v, _: _str(n, v),
    "task_id": lambda n, v, _: _str(n, v),
    "token_rewards": lambda n, v, _: _floats(n, v),
    "turn_ids": lambda n, v, _: _ints(n, v),
    "created_at": lambda n, v, _: _finite(n, v),
    "engine": lambda n, v, _: _str(n, v, optional=True),
    "sampling": lambda n, v, _: _dict(n, v, optional=True),
    "dtype": lambda n, v, _: _str(n, v, optional=True),
    "info": lambda n, v, _: _dict(n, v),
}
assert set(CHECKS) == set(Experience.__dataclass_fields__), "logs.CHECKS must cover every Experience field"


def row_to_experience(row: Any, *, vocab_size: int | None = None,
                      defaults: dict[str, Any] | None = None) -> Experience:
    """One log row (a dict of schema fields) as a checked :class:`Experience`; raises ``ValueError``
    with a short message naming the field. ``defaults`` fill fields the row lacks (e.g. ``source``)."""
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(CHECKS))
    if unknown:
        raise _Bad(f"unknown field(s) {unknown}; valid: {sorted(CHECKS)}")
    row = {**(defaults or {}), **row}
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise _Bad(f"missing required field(s) {missing}")
    kw = {k: CHECKS[k](k, v, vocab_size) for k, v in row.items()}
    n = len(kw["response_ids"])
    for k in PER_TOKEN:
        if kw.get(k) is not None and len(kw[k]) != n:
            raise _Bad(f"{k} has {len(kw[k])} entries for {n} response tokens")
    if isinstance(kw.get("policy_version"), list) and len(kw["policy_version"]) != n:
        raise _Bad(f"policy_version has {len(kw['policy_version'])} entries for {n} response tokens")
    return Experience(**kw)


def _fields(e: Experience) -> dict[str, Any]:
    """The experience's fields, not copied (``asdict`` deep-copies every token: slow on big logs)."""
    return {k: getattr(e, k) for k in CHECKS}


def validate(experiences: Sequence[Experience], *, vocab_size: int | None = None) -> None:
    """Check in-memory experiences against the schema (what :func:`read_log` checks on disk); the
    error names the row (1-based). Used before writing and before scoring logs (``offpolicy.ope``)."""
    for i, e in enumerate(experiences, 1):
        try:
            row_to_experience(_fields(e), vocab_size=vocab_size)
        except ValueError as err:
            raise ValueError(f"experience {i}: {err}") from None


# ---- files --------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown log format {path.suffix!r}; use one of {list(SUFFIXES)}")
    return path.suffix


def read_log(path: str | Path, *, vocab_size: int | None = None,
             defaults: dict[str, Any] | None = None) -> list[Experience]:
    """All experiences of a ``.jsonl`` or ``.parquet`` log, checked row by row.

    ``vocab_size``: token ids must lie in ``[0, vocab_size)`` (pass the policy's). ``defaults``:
    values for fields a row lacks (``{"source": "offline"}`` when importing foreign logs). The
    first bad row raises ``ValueError("FILE:line N: field ...")`` (``FILE:row N`` for parquet); a
    missing file raises ``FileNotFoundError``; an empty log is an error."""
    path = Path(path)
    kind = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"experience file not found: {path}")
    rows = _jsonl_rows(path) if kind == ".jsonl" else _parquet_rows(path)
    label = "line" if kind == ".jsonl" else "row"
    out = []
    for n, row in rows:
        try:
            out.append(row_to_experience(row, vocab_size=vocab_size, defaults=defaults))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}:{label} {n}: {err}") from None
    if not out:
        raise ValueError(f"{path}: no experiences (empty log)")
    return out


def _jsonl_rows(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed JSON) per non-blank line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:line {n}: not valid JSON ({err.msg})") from None


def _parquet_rows(path: Path) -> Iterable[tuple[int, Any]]:
    """(1-based row, dict in the jsonl representation) per parquet row."""
    pq = _pyarrow()[1]
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        try:
            yield n, _from_parquet(row)
        except ValueError as err:
            raise ValueError(f"{path}:row {n}: {err}") from None


def _from_parquet(row: dict[str, Any]) -> dict[str, Any]:
    """Undo the parquet representation: JSON-string dict fields, ``[v]`` for an int version. A null
    in a non-nullable column means the row lacks the field (its default, or "missing" if required)."""
    out = {}
    for k, v in row.items():
        if v is None and k not in NULLABLE:
            continue
        if k in JSON_COLUMNS and isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as err:
                raise ValueError(f"{k} is not a valid JSON string ({err.msg})") from None
        if k == "policy_version" and isinstance(v, list) and len(v) == 1:
            v = v[0]
        out[k] = v
    return out


def write_log(path: str | Path, experiences: Sequence[Experience]) -> None:
    """Write ``experiences`` to a new ``.jsonl`` or ``.parquet`` file (replacing it), after checking
    them, so that everything written reads back. The file appears whole or not at all."""
    path = Path(path)
    kind = _suffix(path)
    if not experiences:
        raise ValueError(f"{path}: no experiences to write")
    validate(experiences)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if kind == ".jsonl":
        with open(tmp, "w") as f:
            for e in experiences:
                f.write(json.dumps(_fields(e)) + "\n")
    else:
        _pyarrow()[1].write_table(_to_table(experiences), tmp)
    os.replace(tmp, path)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("parquet logs need pyarrow: pip install 'offpolicy[parquet]'") from None
    return pa, pq


def _to_table(experiences: Sequence[Experience]):
    """A pyarrow table with an explicit schema (columns typed even when every value is null)."""
    pa = _pyarrow()[0]
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float64())
    schema = pa.schema([
        ("prompt_ids", ints), ("response_ids", ints), ("reward", pa.float64()), ("response_mask", ints),
        ("behavior_logprobs", floats), ("behavior_train_logprobs", floats), ("policy_version", ints),
        ("source", pa.string()), ("group_id", pa.string()), ("task_id", pa.string()), ("token_rewards", floats),
        ("turn_ids", ints), ("created_at", pa.float64()), ("engine", pa.string()), ("sampling", pa.string()),
        ("dtype", pa.string()), ("info", pa.string()),
    ])
    rows = []
    for e in experiences:
        d = _fields(e)
        d["policy_version"] = d["policy_version"] if isinstance(d["policy_version"], list) else [d["policy_version"]]
        for k in JSON_COLUMNS:
            d[k] = None if d[k] is None else json.dumps(d[k])
        rows.append(d)
    return pa.Table.from_pylist(rows, schema=schema)


# ---- groups and loss compatibility --------------------------------------------------------------
def group_log(experiences: Sequence[Experience]) -> list[list[Experience]]:
    """Experiences grouped by ``group_id``, groups in order of first appearance, rows in log order.

    A row with an empty ``group_id`` is a group of its own, as in :func:`offpolicy.experience.collate`
    (expert traces often have no group); group-relative advantages give such a row zero advantage."""
    groups: dict[Any, list[Experience]] = {}
    for i, e in enumerate(experiences):
        groups.setdefault(e.group_id or ("__row", i), []).append(e)
    return list(groups.values())


# What each objective input is called in the log, for inputs that come from the log.
LOG_FIELD = {"behavior_logp": "behavior_logprobs", "behavior_train_logp": "behavior_train_logprobs",
             "turn_ids": "turn_ids", "token_rewards": "token_rewards"}


def learnable_needs(*, loss: str, correction: str | None = None, old_logp: str = "proximal") -> dict[str, str]:
    """``{log field: who needs it}`` for a training objective, mirroring what the learner reads:
    the loss's ``needs``; ``old_logp='behavior'`` (the engine's log-probs stand in for the proximal
    ones); a correction (every one compares π_old with μ, so needs behaviour log-probs) and its ``needs``."""
    from offpolicy.objectives import CORRECTIONS, POLICY_LOSSES

    if old_logp not in ("proximal", "behavior"):
        raise ValueError(f"rl.old_logp must be 'proximal' or 'behavior', got {old_logp!r}")
    fn = POLICY_LOSSES[loss]
    needs: dict[str, str] = {}
    for k in fn.needs:
        if k in LOG_FIELD:
            needs.setdefault(LOG_FIELD[k], f"loss {loss!r}")
    if correction is not None:
        corr = CORRECTIONS[correction]
        needs.setdefault("behavior_logprobs", f"correction {correction!r}")
        for k in getattr(corr, "needs", ()):
            if k in LOG_FIELD:
                needs.setdefault(LOG_FIELD[k], f"correction {correction!r}")
    if old_logp == "behavior" and ("old_logp" in fn.needs or correction is not None):
        needs.setdefault("behavior_logprobs", "rl.old_logp='behavior'")
    return needs


def check_learnable(experiences: Sequence[Experience], *, loss: str, correction: str | None = None,
                    old_logp: str = "proximal") -> None:
    """Fail before training when the objective needs a field some rows lack.

    A batch has behaviour log-probs only when every row has them (``collate``), so one expert trace
    in a log makes ``topr`` fail mid-run; this says so up front, naming the loss (or correction,
    or ``rl.old_logp``), the field, how many rows lack it and the first one (1-based)."""
    if not experiences:
        raise ValueError("no experiences to learn from")
    for field, who in learnable_needs(loss=loss, correction=correction, old_logp=old_logp).items():
        lacking = [i for i, e in enumerate(experiences, 1) if getattr(e, field) is None]
        if lacking:
            first = experiences[lacking[0] - 1]
            raise ValueError(f"{who} needs {field}, which {len(lacking)} of {len(experiences)} logged experiences "
                             f"lack (first: row {lacking[0]}, source {first.source!r}); choose an objective "
                             f"that does not need it, or drop those rows")


# ---- summary (offpolicy rollouts inspect) -------------------------------------------------------
def _stats(xs: Sequence[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def summarize(experiences: Sequence[Experience]) -> dict[str, Any]:
    """What is in a log: counts, sources, behaviour log-prob coverage, versions, rewards, lengths,
    provenance. Plain JSON-able values (``offpolicy rollouts inspect --json``)."""
    n = len(experiences)
    groups = group_log(experiences)
    versions = [e.min_version for e in experiences]
    sampling = Counter(json.dumps(e.sampling, sort_keys=True) for e in experiences if e.sampling is not None)
    return {
        "rows": n,
        "groups": len(groups),
        "group_size": _stats([len(g) for g in groups]),
        "rows_without_group_id": sum(1 for e in experiences if not e.group_id),
        "sources": dict(Counter(e.source for e in experiences)),
        "with_behavior_logprobs": sum(e.behavior_logprobs is not None for e in experiences) / n,
        "with_behavior_train_logprobs": sum(e.behavior_train_logprobs is not None for e in experiences) / n,
        "per_token_versions": sum(isinstance(e.policy_version, list) for e in experiences),
        "policy_version": {"min": min(versions), "max": max(versions),
                           "histogram": {str(v): c for v, c in sorted(Counter(versions).items())}},
        "reward": _stats([e.reward for e in experiences]),
        "response_length": _stats([len(e.response_ids) for e in experiences]),
        "prompt_length": _stats([len(e.prompt_ids) for e in experiences]),
        "engines": dict(Counter(str(e.engine) for e in experiences)),
        "dtypes": dict(Counter(str(e.dtype) for e in experiences)),
        "sampling": dict(sampling),
        "created_at": {"min": min(e.created_at for e in experiences), "max": max(e.created_at for e in experiences)},
    }
