"""Verifiers and the guarded batch scorer.

Verifiers are registered in ``VERIFIERS`` as ``fn(completion, answer, **params) -> float``;
:func:`make_reward_fn` turns a verifier name (or a user ``"module:function"``) into a
reward function ``(prompt, completion, answer) -> float``.

:func:`score_batch` is the only place the run calls scoring code, and it never lets
that code crash the run: an exception, a non-numeric or non-finite result gives reward
0.0 and is counted; with ``timeout_s`` an overrunning call gives 0.0 and is counted.

A reward whose magnitude exceeds ``bound`` (``task.reward_bound``) is counted and
zeroed the same way: one absurd reward (1e30) would otherwise dominate every
advantage of its batch and overflow the gradient.

Where timed calls run (``isolation``, ``task.reward_isolation``):

- ``"thread"`` (default): daemon threads. Python cannot kill a thread, so a call
  that overruns is only *abandoned* -- its thread keeps running (and burning CPU)
  until the call returns on its own (then exits, its result discarded) and a fresh
  worker takes its place, so the batch never waits on it. This needs no pickling
  and costs ~0.1 ms per call, but it cannot interrupt code that holds the GIL
  without releasing it (e.g. a catastrophic backtracking ``re`` match): such a
  call stalls the whole process. Pure-Python code, sympy (math-verify) and I/O
  are interrupted fine.
- ``"process"``: forked worker processes, each the leader of its own process
  group; a call that overruns is stopped with SIGKILL to that group (the reward
  and anything it started; a code sandbox dies with it), and a fresh worker replaces it. Nothing outlives the
  batch. Costs a fork per worker per batch (~ms) and a pickled result per call;
  the reward runs in a copy of this process (fork), so it must not use torch's
  thread pools there. Use it for rewards that are untrusted or may hang.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Sequence

from offpolicy.objectives.registry import Registry

if TYPE_CHECKING:
    from offpolicy.data.tasks.base import Problem

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str], float]  # (prompt, completion, answer) -> reward
VERIFIERS = Registry("verifier")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The content of the last ``<answer>...</answer>`` if there is one, else the completion; stripped."""
    tags = _ANSWER_TAG.findall(completion)
    return (tags[-1] if tags else completion).strip()


# ------------------------------------------------------------------ verifiers

@VERIFIERS.register("exact")
def exact(completion: str, answer: str) -> float:
    """1.0 iff the extracted answer equals ``answer`` (both stripped)."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_OR_FRACTION = re.compile(rf"({_NUMBER})(?:\s*/\s*({_NUMBER}))?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def parse_number(text: str) -> float | None:
    """The number ``text`` states: the whole text if it is one, else its last number; ``a/b`` is a fraction.

    Thousands separators (``1,234``) are removed. Returns ``None`` if there is no number.
    """
    text = _THOUSANDS.sub("", text.strip())
    whole = _NUMBER_OR_FRACTION.fullmatch(text)
    matches = [whole] if whole else list(_NUMBER_OR_FRACTION.finditer(text))
    if not matches:
        return None
    num, den = matches[-1].group(1), matches[-1].group(2)
    if den is None:
        return float(num)
    return float(Fraction(num) / Fraction(den)) if float(den) != 0 else None


@VERIFIERS.register("numeric")
def numeric(completion: str, answer: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1.0 iff the number in the extracted answer equals the reference within tolerance."""
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"numeric verifier: reference answer {answer!r} is not a number")
    pred = parse_number(extract_answer(completion))
    return 1.0 if pred is not None and math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("the 'math_verify' verifier needs math-verify: pip install 'offpolicy[tasks]'") from e
    return math_verify


_MATH_DELIMS = ("$", "\\(", "\\[", "\\boxed")


@VERIFIERS.register("math_verify")
def math_verify_(completion: str, answer: str) -> float:
    """1.0 iff math-verify finds the completion's answer equivalent to the reference.

    math-verify's own timeouts use ``signal.alarm``, which raises outside the main
    thread; they are switched off here. Bound the time with ``score_batch(timeout_s=...)``.
    A reference without math delimiters is read as ``$answer$``.
    """
    mv = _math_verify()
    gold_text = answer if any(d in answer for d in _MATH_DELIMS) else f"${answer}$"
    gold = mv.parse(gold_text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math_verify verifier: could not parse the reference answer {answer!r}")
    pred = mv.parse(completion, parsing_timeout=None)
    return 1.0 if pred and mv.verify(gold, pred, timeout_seconds=None) else 0.0


@VERIFIERS.register("format")
def format_(completion: str, answer: str, *, pattern: str = r"<answer>.*?</answer>", fullmatch: bool = False) -> float:
    """1.0 iff ``pattern`` matches the completion (``re.search``, or ``re.fullmatch``; DOTALL). Ignores ``answer``."""
    match = re.fullmatch if fullmatch else re.search
    return 1.0 if match(pattern, completion, re.DOTALL) else 0.0


_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The program in a completion: its last fenced code block if it has one, else :func:`extract_answer`."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else extract_answer(completion)


def code_tests(answer: str) -> list[tuple[str, str]]:
    """``[(stdin, expected stdout)]`` from a ``code`` reference: a JSON list of ``{"stdin", "stdout"}``
    objects, or any other text = the expected stdout of a run with empty stdin."""
    text = answer.strip()
    if text.startswith("["):
        try:
            cases = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"code verifier: reference answer looks like a JSON test list but is not: {e}") from None
        if not cases or not all(isinstance(c, dict) and isinstance(c.get("stdout"), str) for c in cases):
            raise ValueError('code verifier: a JSON reference must be a non-empty list of {"stdin", "stdout"} objects')
        return [(c.get("stdin", ""), c["stdout"]) for c in cases]
    return [("", answer)]


@VERIFIERS.register("code")
def code(completion: str, answer: str, *, cpu_s: int = 2, wall_s: float = 5.0, memory_mb: int = 256,
         file_mb: int = 1, nofile: int = 32, nproc: int = 16) -> float:
    """The fraction of test cases (see :func:`code_tests`) whose stdout the completion's Python program
    reproduces (compared with surrounding whitespace stripped), each run in a fresh sandbox
    (``data/sandbox.py``: no network, read-only filesystem but its temp folder, an unprivileged user,
    CPU / memory / file-size / open-file / process limits). A program that crashes, overruns or is killed
    scores 0 on that case. A machine that cannot sandbox raises (fails closed): nothing runs unsandboxed.
    """
    from offpolicy.data.sandbox import Limits, run_sandboxed  # lazy: only code tasks need it

    limits = Limits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb, file_mb=file_mb, nofile=nofile, nproc=nproc)
    program, cases = extract_program(completion), code_tests(answer)
    passed = 0
    for stdin, expected in cases:
        result = run_sandboxed(program, stdin, limits)
        passed += result.ok and result.stdout.strip() == expected.strip()
    return passed / len(cases)


# ------------------------------------------------------------ reward functions

def load_reward_fn(spec: str) -> RewardFn:
    """Import a user reward function ``fn(prompt, completion, answer) -> float`` from ``"package.module:function"``."""
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"reward function {spec!r}: module {module_name!r} not found") from e
        raise ValueError(f"reward function {spec!r}: importing {module_name!r} failed: {e}") from e
    fn = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


def make_reward_fn(spec: str, **params: Any) -> RewardFn:
    """A reward function ``(prompt, completion, answer) -> float`` from a verifier name or ``"module:function"``.

    ``params`` are bound as keyword arguments (unknown ones are a ``ValueError``).
    """
    if isinstance(spec, str) and ":" in spec:
        fn = load_reward_fn(spec)
        if not params:
            return fn
        return lambda prompt, completion, answer: fn(prompt, completion, answer, **params)
    from offpolicy.data.tasks.base import check_params  # lazy: the tasks package imports this module

    verifier = VERIFIERS[spec]
    check_params(f"verifier {spec!r}", verifier, params, n_positional=2)
    return lambda prompt, completion, answer: verifier(completion, answer, **params)


# ----------------------------------------------------------------- batch scoring

@dataclass
class ScoreResult:
    rewards: list[float]
    n_errors: int = 0  # exceptions, non-numeric or non-finite results (each scored 0.0)
    n_timeouts: int = 0  # calls that overran timeout_s (each scored 0.0)
    first_error: str | None = None


@dataclass(frozen=True)
class RewardLimits:
    """How reward calls are bounded (``task.reward_timeout_s``, ``task.reward_isolation``, ``task.reward_bound``)."""

    timeout_s: float | None = None
    isolation: str = "thread"  # "thread" | "process", see the module docstring
    bound: float | None = None  # |reward| above this is an error (scored 0, counted)

    @classmethod
    def of(cls, task_cfg) -> "RewardLimits":
        return cls(task_cfg.reward_timeout_s, task_cfg.reward_isolation, task_cfg.reward_bound)


def as_reward(value: Any, bound: float | None = None) -> float:
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"reward must be a number, got {type(value).__name__}")
    try:
        reward = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward must be a number, got {type(value).__name__}") from e
    if not math.isfinite(reward):
        raise ValueError(f"reward is not finite: {reward}")
    if bound is not None and abs(reward) > bound:
        raise ValueError(f"|reward| = {abs(reward):g} exceeds task.reward_bound={bound:g}")
    return reward


def score_batch(
    score_fn: Callable[[Problem, str], float],
    problems: Sequence[Problem],
    completions: Sequence[str],
    *,
    timeout_s: float | None = None,
    isolation: str = "thread",
    bound: float | None = None,
    max_workers: int = 4,
) -> ScoreResult:
    """Score ``completions[i]`` against ``problems[i]`` with ``score_fn`` (e.g. ``task.score``), never raising.

    ``isolation="thread"`` with ``timeout_s=None`` calls ``score_fn`` directly in this thread (the fast
    path); with a timeout, up to ``max_workers`` daemon threads run the calls and each call gets
    ``timeout_s`` seconds from its start. ``isolation="process"`` runs them in up to ``max_workers``
    worker processes that are killed on timeout (see the module docstring). Failures are logged once per batch.
    """
    if len(problems) != len(completions):
        raise ValueError(f"score_batch: {len(problems)} problems but {len(completions)} completions")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"score_batch: timeout_s must be > 0 or None, got {timeout_s!r}")
    if isolation not in ("thread", "process"):
        raise ValueError(f"task.reward_isolation: {isolation!r}; valid: ['process', 'thread']")
    if isolation == "process":
        outcomes = _run_in_processes(score_fn, problems, completions, timeout_s, max_workers)
    elif timeout_s is None:
        outcomes = []
        for problem, completion in zip(problems, completions):
            try:
                outcomes.append(("ok", score_fn(problem, completion)))
            except Exception as e:  # noqa: BLE001 -- reward code must not crash the run
                outcomes.append(("error", e))
    else:
        outcomes = _run_timed(score_fn, problems, completions, timeout_s, max_workers)

    result = ScoreResult(rewards=[0.0] * len(outcomes))
    for i, (status, value) in enumerate(outcomes):
        if status == "timeout":
            result.n_timeouts += 1
            continue
        try:
            if status == "error":
                raise value
            result.rewards[i] = as_reward(value, bound)
        except Exception as e:  # noqa: BLE001
            result.n_errors += 1
            if result.first_error is None:
                result.first_error = f"problem {problems[i].id!r}: {type(e).__name__}: {e}"
    if result.n_errors or result.n_timeouts:
        logger.warning(
            "score_batch: %d of %d reward calls scored 0.0: %d errors (first: %s), %d timeouts (limit %s s)",
            result.n_errors + result.n_timeouts, len(outcomes), result.n_errors, result.first_error,
            result.n_timeouts, timeout_s,
        )
    return result


def _run_timed(
    score_fn: Callable[[Problem, str], float],
    problems: Sequence[Problem],
    completions: Sequence[str],
    timeout_s: float,
    max_workers: int,
) -> list[tuple[str, Any]]:
    """Run the calls on daemon worker threads; abandon (and replace) any worker whose call overruns."""
    n = len(problems)
    outcomes: list[tuple[str, Any] | None] = [None] * n
    cond = threading.Condition()
    state = {"next": 0, "done": 0}
    running: dict[int, float] = {}  # index -> monotonic start time
    abandoned: set[int] = set()

    def worker() -> None:
        while True:
            with cond:
                i = state["next"]
                if i >= n:
                    return
                state["next"] = i + 1
                running[i] = time.monotonic()
            try:
                outcome: tuple[str, Any] = ("ok", score_fn(problems[i], completions[i]))
            except Exception as e:  # noqa: BLE001
                outcome = ("error", e)
            with cond:
                if i in abandoned:
                    return  # overran: the main thread already scored it and started a replacement
                running.pop(i)
                outcomes[i] = outcome
                state["done"] += 1
                cond.notify_all()

    def spawn() -> None:
        threading.Thread(target=worker, name="offpolicy-reward", daemon=True).start()

    with cond:
        for _ in range(max(1, min(max_workers, n))):
            spawn()
        while state["done"] < n:
            now = time.monotonic()
            for i, started in list(running.items()):
                if now - started >= timeout_s:
                    del running[i]
                    abandoned.add(i)
                    outcomes[i] = ("timeout", None)
                    state["done"] += 1
                    spawn()
            if state["done"] >= n:
                break
            # A call may start right after we look; waiting at most timeout_s re-checks it in time.
            wake = min((s + timeout_s for s in running.values()), default=now + timeout_s)
            cond.wait(timeout=max(wake - now, 1e-4))
    return outcomes  # type: ignore[return-value]


# ------------------------------------------------------------ process isolation

class _Worker:
    """One forked scoring process, leader of its own process group, talking over a pipe."""

    def __init__(self, ctx, score_fn, problems, completions) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, score_fn, problems, completions),
                                name="offpolicy-reward", daemon=True)
        self.proc.start()
        child.close()
        try:  # also set here: a kill may come before the child's own setpgid
            os.setpgid(self.proc.pid, self.proc.pid)
        except OSError:
            pass
        self.index: int | None = None
        self.started = 0.0

    def submit(self, i: int) -> None:
        self.index, self.started = i, time.monotonic()
        self.conn.send(i)

    def kill(self) -> None:
        """SIGKILL the worker's process group (the reward and whatever it started), then reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def _worker_main(conn, score_fn, problems, completions) -> None:
    """Score the indices sent over ``conn`` until it closes; results go back as picklable outcomes."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    while True:
        try:
            i = conn.recv()
        except EOFError:
            return
        try:
            outcome: tuple[str, Any] = ("ok", score_fn(problems[i], completions[i]))
        except Exception as e:  # noqa: BLE001
            outcome = ("error", e)
        try:
            conn.send(outcome)  # pickled whole before a byte is written
        except Exception as e:  # noqa: BLE001 -- an unpicklable result or exception
            conn.send(("error", TypeError(f"reward result could not be sent back: {type(e).__name__}: {e}")))


def _run_in_processes(
    score_fn: Callable[[Problem, str], float],
    problems: Sequence[Problem],
    completions: Sequence[str],
    timeout_s: float | None,
    max_workers: int,
) -> list[tuple[str, Any]]:
    """Run the calls on forked workers; kill (and replace) any worker whose call overruns. Every worker
    is killed before returning, so no reward code outlives the batch."""
    ctx = multiprocessing.get_context("fork")
    n = len(problems)
    outcomes: list[tuple[str, Any] | None] = [None] * n
    todo = deque(range(n))
    new = lambda: _Worker(ctx, score_fn, problems, completions)  # noqa: E731
    idle = [new() for _ in range(max(1, min(max_workers, n)))]
    busy: dict[Any, _Worker] = {}  # connection -> worker with a call in flight
    try:
        while todo or busy:
            while todo and idle:
                w = idle.pop()
                w.submit(todo.popleft())
                busy[w.conn] = w
            wake = None if timeout_s is None else min(w.started for w in busy.values()) + timeout_s
            ready = multiprocessing.connection.wait(
                list(busy), timeout=None if wake is None else max(wake - time.monotonic(), 0.0))
            for conn in ready:
                w = busy.pop(conn)
                try:
                    outcomes[w.index] = conn.recv()
                    idle.append(w)
                except (EOFError, OSError):  # the worker died (os._exit, a signal, out of memory)
                    outcomes[w.index] = ("error", RuntimeError(f"reward process died (exit code {w.proc.exitcode})"))
                    w.kill()
                    if todo:
                        idle.append(new())
            for conn, w in list(busy.items()):
                if timeout_s is not None and time.monotonic() - w.started >= timeout_s:
                    del busy[conn]
                    outcomes[w.index] = ("timeout", None)
                    w.kill()
                    if todo:
                        idle.append(new())
    finally:
        for w in [*idle, *busy.values()]:
            w.kill()
    return outcomes  # type: ignore[return-value]
