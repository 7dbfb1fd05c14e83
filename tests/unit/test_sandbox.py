"""The ``code`` verifier's sandbox: each attack is stopped, scored 0, and leaves the host as it was.

Needs Linux, root and util-linux (this machine has them); elsewhere the sandbox refuses to run anything
(fails closed) and these tests are skipped, except the one that checks that refusal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from offpolicy.data import sandbox
from offpolicy.data.rewards import VERIFIERS, code_tests, extract_program
from offpolicy.data.sandbox import Limits, SandboxUnavailable, run_sandboxed

try:
    sandbox.check_available()
    AVAILABLE, WHY = True, ""
except SandboxUnavailable as e:
    AVAILABLE, WHY = False, str(e)
needs_sandbox = pytest.mark.skipif(not AVAILABLE, reason=WHY)

FAST = dict(cpu_s=1, wall_s=1.5)  # verifier params: keep every attack about a second


def nobody_processes() -> list[int]:
    return [p.pid for p in psutil.process_iter(["username"]) if p.info["username"] == sandbox.SANDBOX_USER]


def score(program: str, answer: str = "42") -> float:
    return VERIFIERS["code"](f"```python\n{program}\n```", answer, **FAST)


@pytest.fixture
def host_unaffected():
    """No sandbox process survives the test."""
    before = set(nobody_processes())
    yield
    deadline = time.monotonic() + 2
    while set(nobody_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(nobody_processes()) - before, "a sandboxed process outlived its run"


def test_refuses_without_root(monkeypatch):
    """Fail closed: a machine that cannot sandbox runs nothing."""
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="root"):
        run_sandboxed("print(1)")


def test_answer_formats():
    assert extract_program("text\n```python\nprint(1)\n```\nmore ```py\nprint(2)\n```") == "print(2)\n"
    assert extract_program("<answer>print(3)</answer>") == "print(3)"
    assert code_tests("42") == [("", "42")]
    assert code_tests(json.dumps([{"stdin": "1", "stdout": "2"}, {"stdout": "x"}])) == [("1", "2"), ("", "x")]
    with pytest.raises(ValueError, match="JSON"):
        code_tests("[not json")


@needs_sandbox
def test_correct_program_scores_one(host_unaffected):
    assert score("print(6 * 7)") == 1.0
    tests = json.dumps([{"stdin": "1 2\n", "stdout": "3"}, {"stdin": "5 5\n", "stdout": "10"},
                        {"stdin": "0 0\n", "stdout": "1"}])
    assert VERIFIERS["code"]("print(sum(map(int, input().split())))", tests, **FAST) == pytest.approx(2 / 3)


@needs_sandbox
def test_infinite_loop_is_killed(host_unaffected):
    t0 = time.monotonic()
    assert score("while True:\n    pass") == 0.0
    assert time.monotonic() - t0 < 5


@needs_sandbox
def test_sleeping_program_is_killed_at_the_wall_clock(host_unaffected):
    r = run_sandboxed("import time\ntime.sleep(60)", limits=Limits(wall_s=0.5))
    assert r.timed_out and not r.ok


@needs_sandbox
def test_fork_bomb_is_contained(host_unaffected):
    t0 = time.monotonic()
    assert score("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass") == 0.0
    assert time.monotonic() - t0 < 5


@needs_sandbox
def test_memory_bomb_fails(host_unaffected):
    r = run_sandboxed("x = bytearray(10**10)\nprint(42)", limits=Limits(**FAST))
    assert "MemoryError" in r.stderr and not r.ok
    assert score("x = []\nwhile True:\n    x.append(' ' * 10**7)") == 0.0


@needs_sandbox
@pytest.mark.parametrize("target", ["/tmp", "/var/tmp", "/dev/shm", "HOST"])
def test_cannot_write_outside_its_folder(tmp_path, target, host_unaffected):
    folder = tmp_path if target == "HOST" else Path(target)
    victim = folder / f"offpolicy-sandbox-escape-{time.time_ns()}"
    r = run_sandboxed(f"open({str(victim)!r}, 'w').write('x')\nprint(42)", limits=Limits(**FAST))
    assert not victim.exists()
    assert not r.ok and ("Read-only file system" in r.stderr or "Permission denied" in r.stderr), r.stderr
    ok = run_sandboxed("open('inside.txt', 'w').write('x')\nprint(open('inside.txt').read())", limits=Limits(**FAST))
    assert ok.ok and ok.stdout.strip() == "x"  # its own temp folder is writable


@needs_sandbox
def test_no_network(host_unaffected):
    program = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\nprint(42)"
    r = run_sandboxed(program, limits=Limits(**FAST))
    assert "Network is unreachable" in r.stderr and not r.ok
    assert score(program) == 0.0


@needs_sandbox
def test_output_flood_is_capped(host_unaffected):
    r = run_sandboxed("while True:\n    print('x' * 1000)", limits=Limits(**FAST, file_mb=1), max_output=100)
    assert not r.ok and len(r.stdout) == 100


@needs_sandbox
def test_environment_is_scrubbed(monkeypatch, host_unaffected):
    monkeypatch.setenv("OFFPOLICY_SECRET", "hunter2")
    r = run_sandboxed("import os\nprint(sorted(os.environ), os.getuid())", limits=Limits(**FAST))
    assert "OFFPOLICY_SECRET" not in r.stdout and r.stdout.strip().endswith("65534")


@needs_sandbox
def test_a_killed_reward_process_takes_its_sandbox_with_it(host_unaffected):
    """Process isolation kills a reward worker on timeout; the sandbox it started must not outlive it."""
    from offpolicy.data.rewards import score_batch
    from offpolicy.data.tasks import Problem

    sleeper = "```python\nimport time\ntime.sleep(60)\n```"
    code = lambda problem, completion: VERIFIERS["code"](completion, "42", wall_s=30)  # noqa: E731
    r = score_batch(code, [Problem(id="p", prompt="", answer="42")], [sleeper], timeout_s=0.5, isolation="process")
    assert r.n_timeouts == 1
