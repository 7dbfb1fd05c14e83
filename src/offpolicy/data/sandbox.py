"""Run an untrusted program (a policy's answer) in a sandboxed subprocess, for the ``code`` verifier.

What stops what, and why each layer is there:

- **Namespaces** (``unshare --net --mount --pid --fork --kill-child``): a new network namespace has only a
  downed loopback, so every connect fails (*no network*); a new PID namespace makes the program PID 1 of
  its own tree, so killing it (or ``unshare``, via ``--kill-child``) kills everything it started, even
  processes that left its process group (*nothing outlives the run*); a private mount namespace where
  every mount is remounted read-only except the program's own temp folder, bind-mounted on itself
  (*writing outside its temp folder fails with EROFS*, including world-writable ``/tmp`` and ``/dev/shm``).
- **An unprivileged user** (``setpriv`` to ``nobody``, no groups, ``no_new_privs``): no capabilities, so it
  cannot undo the mounts or the namespaces, and files it may not read stay unread.
- **Resource limits** (``prlimit``, applied to the program only): CPU seconds (an infinite loop gets
  SIGKILL), address space (a memory bomb gets ``MemoryError``), file size (stdout/stderr and files are
  capped: SIGXFSZ), open files, and processes of the ``nobody`` user (a fork bomb's forks fail). A wall
  clock limit kills the whole tree of a program that sleeps instead of computing.
- **A scrubbed environment** (only ``PATH``, ``HOME`` = the temp folder, ``LANG``) and ``python -I``
  (no user site, no ``PYTHON*`` variables).

This needs Linux, root (to create the namespaces and drop to ``nobody``) and util-linux's ``unshare``,
``setpriv``, ``prlimit`` and ``mount``. Without them :func:`run_sandboxed` raises
:class:`SandboxUnavailable` naming what is missing: it fails closed, it never runs the program unsandboxed.
Note that the process limit counts every process of ``nobody`` on the machine, so concurrent sandboxes
share it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

TOOLS = ("unshare", "setpriv", "prlimit", "mount")
SANDBOX_USER = "nobody"

# Runs as root inside the new namespaces, then becomes the program. $WD is the program's temp folder.
_SETUP = r"""
set -e
mount --make-rprivate /
mount --bind "$WD" "$WD"
awk '{print $5}' /proc/self/mountinfo | while read -r mp; do
  [ "$mp" = "$WD" ] || mount -o remount,bind,ro "$mp" 2>/dev/null || echo "sandbox: cannot make $mp read-only" >&2
done
# a mount point listed twice is stacked: only the last (top) mount is reachable
if awk -v wd="$WD" '$5 != wd {opt[$5] = $6} END {for (m in opt) if (opt[m] ~ /(^|,)rw(,|$)/) {print "sandbox: " m " stayed writable; refusing to run"; bad = 1}; exit !bad}' /proc/self/mountinfo >&2; then
  exit 125
fi
cd "$WD"
exec prlimit --cpu="$CPU" --as="$AS" --fsize="$FSIZE" --nofile="$NOFILE" --nproc="$NPROC" -- \
  setpriv --reuid="$SUID" --regid="$SGID" --clear-groups --no-new-privs -- "$@"
"""


class SandboxUnavailable(RuntimeError):
    """This machine cannot sandbox a program (not Linux, not root, a tool missing): nothing was run."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``nproc`` counts all processes of the sandbox user, machine-wide."""

    cpu_s: int = 2  # CPU seconds (RLIMIT_CPU)
    wall_s: float = 5.0  # wall-clock seconds, then the whole tree is killed
    memory_mb: int = 256  # address space (RLIMIT_AS)
    file_mb: int = 1  # largest file it may write, stdout and stderr included (RLIMIT_FSIZE)
    nofile: int = 32  # open files (RLIMIT_NOFILE)
    nproc: int = 16  # processes of the sandbox user (RLIMIT_NPROC)


@dataclass
class SandboxResult:
    returncode: int | None  # None: killed at the wall-clock limit; < 0: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def check_available() -> dict[str, str]:
    """Absolute paths of the tools; :class:`SandboxUnavailable` naming what is missing."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the code sandbox needs Linux namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise SandboxUnavailable("the code sandbox needs root to create namespaces and run the program as nobody")
    paths = {t: shutil.which(t, path="/usr/bin:/bin:/usr/sbin:/sbin") for t in TOOLS}
    missing = [t for t, p in paths.items() if p is None]
    if missing:
        raise SandboxUnavailable(f"the code sandbox needs util-linux's {', '.join(missing)} (not found)")
    return paths  # type: ignore[return-value]


def default_python() -> str:
    """A system interpreter the sandbox user can run (a virtualenv under /root is not readable by nobody)."""
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(path, os.X_OK):
            return path
    raise SandboxUnavailable("no system python3 in /usr/bin or /usr/local/bin for the code sandbox")


def run_sandboxed(source: str, stdin: str = "", limits: Limits = Limits(), python: str | None = None,
                  max_output: int = 1 << 16) -> SandboxResult:
    """Run the Python program ``source`` with ``stdin`` in a fresh sandbox; its temp folder is removed after."""
    tools = check_available()
    user = pwd.getpwnam(SANDBOX_USER)
    with tempfile.TemporaryDirectory(prefix="offpolicy-sbx-") as root:
        wd = Path(root) / "work"  # the program's folder; stdout/stderr files sit beside it, out of its reach
        wd.mkdir()
        (wd / "main.py").write_text(source)
        os.chown(wd, user.pw_uid, user.pw_gid)
        os.chmod(root, 0o711)  # nobody may pass through to work/, not list or write root/
        env = {"PATH": "/usr/bin:/bin", "HOME": str(wd), "LANG": "C.UTF-8", "WD": str(wd),
               "CPU": str(limits.cpu_s), "AS": str(limits.memory_mb << 20), "FSIZE": str(limits.file_mb << 20),
               "NOFILE": str(limits.nofile), "NPROC": str(limits.nproc),
               "SUID": str(user.pw_uid), "SGID": str(user.pw_gid)}
        # setpriv --pdeathsig: unshare dies with whatever started it (a killed reward process, a killed
        # trainer); unshare --kill-child then kills the sandbox's PID 1, and with it the whole namespace
        cmd = [tools["setpriv"], "--pdeathsig", "KILL", "--",
               tools["unshare"], "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
               "/bin/sh", "-c", _SETUP, "sandbox", python or default_python(), "-I", "-B", "main.py"]
        return _run(cmd, env, stdin, Path(root), limits.wall_s, max_output)


def _run(cmd: list[str], env: dict[str, str], stdin: str, root: Path, wall_s: float,
         max_output: int) -> SandboxResult:
    """Start the sandbox, wait at most ``wall_s``, then kill ``unshare`` (and so, through ``--kill-child``,
    the sandbox's PID namespace: every process in it). Output goes to files (capped by RLIMIT_FSIZE), not
    pipes, so a program that prints forever cannot fill this process's memory."""
    with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=root)
        timed_out = False
        try:
            proc.communicate(stdin.encode(), timeout=wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop(proc)
        out.seek(0)
        err.seek(0)
        return SandboxResult(None if timed_out else proc.returncode, out.read(max_output).decode(errors="replace"),
                             err.read(max_output).decode(errors="replace"), timed_out)


def _stop(proc: subprocess.Popen) -> None:
    """Kill the sandbox's PID 1 (its namespace dies with it) and let ``unshare`` reap it and exit, so no
    zombie is left to the host's init; kill ``unshare`` too if it does not."""
    if proc.poll() is None:
        try:
            for child in psutil.Process(proc.pid).children():
                child.kill()
        except psutil.NoSuchProcess:
            pass
        try:
            proc.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
