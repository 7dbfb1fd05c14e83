"""kill -9 harness: SIGKILL `offpolicy train` at random moments, resume it, compare with an uninterrupted run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_crash.py --kills 50     # ~3 min on 2 busy cores

(``--async-kills 3``, the default, then kills the driver of an async run 3 times: :func:`async_series`.)

One *series* is a tiny sync run (d_model 32, 1 layer, 6 SFT steps, 10 RL steps, a checkpoint every
2 steps, evaluations inside SFT and RL, ``run.save_experiences=true``, a fixed seed) started as a
process, killed with SIGKILL after a random delay, started again with ``--resume``, and so on until
one start runs to the end. Series follow each other until ``--kills`` kills have landed. Each series
is then compared with one uninterrupted run of the same recipe and seed (a plain
``python -m offpolicy.cli train``, so a fresh interpreter with its own hash seed):

- every start exits 0 or dies by our SIGKILL (a resume that errors is a failure);
- ``metrics.jsonl``: SFT steps 1..S and RL steps 1..N each exactly once, every row equal to the
  uninterrupted run's but for the timing fields (``time/*``, ``mem/*``, ``rollout/tokens_per_s``);
- ``experiences.jsonl``: lost / duplicated experiences = the multiset difference of
  ``(group_id, response_ids)`` with the uninterrupted run's; every row also equal but ``created_at``;
- the buffer: before each resume, the checkpoint it will load (:func:`latest_checkpoint`) is compared
  with the uninterrupted run's checkpoint of the same name (that run keeps all of them): weights equal,
  and the buffer's experiences as a multiset of ``(group_id, response_ids)`` (lost / duplicated),
  with versions, use counts and stats equal;
- ``checkpoints/final``: weights bit-identical (``torch.equal`` on every tensor); no orphan
  temporary folders left; the write-ahead log empty.

**Where a kill lands.** Just before the SIGKILL the harness sends SIGUSR1, on which
``faulthandler`` writes the Python stack of the run to a file; the SIGKILL follows as soon as the dump
is there (a few ms). The innermost frame with a known name gives the stage (``sft``, ``rollout``,
``wal``, ``update``, ``weight_sync``, ``eval``, ``log``, ``checkpoint``, ``setup`` — a resume's own
loading —, ``finish``, ``startup`` — the CLI reading its arguments and the recipe —; ``other`` for the
glue between them). Most kills come after a uniformly random
delay (see :func:`kill_series`); one in four is *aimed at checkpoint writing*: the harness polls
``checkpoints/`` every ~1 ms
and kills as soon as a temporary ``.<name>.tmp-*`` folder appears.

**A kill before the first checkpoint.** ``--resume`` then refuses ("no checkpoint"; exit 2), and the
runner refuses a fresh start in a folder holding ``metrics.jsonl``. The harness always tries
``--resume`` first (so that refusal is exercised too), and on exactly that error clears the run folder
and starts afresh without ``--resume`` (counted as ``fresh_restarts``, not as resumes): with no
checkpoint nothing was kept, so nothing can be lost.

**Processes.** Importing torch costs ~3 s a process on these busy cores, about as long as the run
itself, so the killed starts are forked from a *zygote*: one Python process that imports offpolicy (and
torch) once, then forks one child per start; the child runs ``offpolicy.cli.main`` with the usual argv
and is what gets the SIGKILL. ``--exec`` starts each one as ``python -m offpolicy.cli train`` instead
(slower, same checks). Forked children share the zygote's hash seed; the uninterrupted run does not,
so equal results also say the run does not depend on it.

Writes ``benchmarks/results/crash.json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"

REWARD_MODULE = '''
def digit_fraction(prompt, completion, answer):
    """Fraction of digit characters: varied rewards (so real updates) even for an untrained model."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))
'''

# ~3 s of run on one busy thread: 8 SFT steps (evals at 3, 6), 10 RL steps of 2 updates (evals at 3, 6, 9)
RUN = [
    "run.progress=false", "run.threads=1", "run.checkpoint_every=2", "run.save_experiences=true",
    "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "policy.max_len=32",
    "sampling.max_new_tokens=6", "eval.n_problems=24", "eval.samples=2", "eval.every=3",
    "sft.steps=8", "sft.eval_every=3", "sft.stop_at_accuracy=null", "sft.batch_size=64", "sft.optim.warmup_steps=0",
    "rl.steps=10", "rl.prompts_per_step=8", "rl.group_size=8", "rl.groups_per_update=8", "rl.updates_per_step=2",
    "rl.optim.lr=1e-2", "rl.buffer.max_staleness=4", "task.name=addition", "task.params={min_digits: 1, max_digits: 2}",
    "task.reward=crash_reward:digit_fraction",
]
TIMING_KEYS = ("time/", "mem/", "rollout/tokens_per_s")

# innermost known function on the stack -> stage of the run at the kill
STAGES = {
    "save_checkpoint": "checkpoint", "write_manifest": "checkpoint", "_publish": "checkpoint",
    "prune_checkpoints": "checkpoint", "checkpoint": "checkpoint", "save": "checkpoint", "save_state": "checkpoint",
    "retain_from": "checkpoint", "write_staleness": "checkpoint",
    "append": "wal", "collect": "wal",
    "evaluate": "eval", "record_eval": "eval",
    "sft_update": "sft", "run_sft": "sft",
    "rollout_step": "rollout", "rollout_groups": "rollout", "store": "rollout",
    "learn": "update", "update": "update",
    "sync_engine": "weight_sync",
    "end_step": "log",
    "setup": "setup", "load_checkpoint": "setup", "latest_checkpoint": "setup", "build_rl": "setup",
    "finish": "finish",
    "main": "startup", "load_config": "startup",  # the CLI parsing its arguments and the recipe
}

# The zygote: import once, then fork a child per start; the child runs the CLI with the given argv.
ZYGOTE = r'''
import faulthandler, json, os, signal, sys, traceback
import offpolicy.cli, offpolicy.train.runner, offpolicy.train.sync_loop, offpolicy.report.plot
import torch._dynamo, matplotlib  # imported lazily by the first optimizer and by the plot: seconds each
matplotlib.use("Agg"); import matplotlib.pyplot
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    if msg["op"] == "run":
        trace = open(msg["trace"], "w")
        faulthandler.register(signal.SIGUSR1, file=trace, all_threads=True, chain=False)
        pid = os.fork()
        if pid == 0:
            fd = os.open(msg["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1); os.dup2(fd, 2); os.close(0)
            sys.argv = ["offpolicy", *msg["argv"]]
            code = 1
            try:
                offpolicy.cli.main(); code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        faulthandler.unregister(signal.SIGUSR1); trace.close()
        reply = {"pid": pid}
    else:
        done, status = os.waitpid(msg["pid"], 0 if msg["op"] == "wait" else os.WNOHANG)
        reply = {"rc": os.waitstatus_to_exitcode(status) if done else None}
    print(json.dumps(reply), flush=True)
'''

# an exec'd start: the same faulthandler hook, then the CLI (``--exec``)
EXEC_ENTRY = r'''
import faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1, file=open(sys.argv.pop(1), "w"), all_threads=True, chain=False)
from offpolicy.cli import main
sys.argv[0] = "offpolicy"
main()
'''


# ---- starting runs -----------------------------------------------------------------------------
def run_env(work: Path) -> dict[str, str]:
    """The environment of every start: this tree's sources, the reward module, one thread."""
    mod = work / "reward_mod"
    mod.mkdir(parents=True, exist_ok=True)
    (mod / "crash_reward.py").write_text(REWARD_MODULE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(mod)]), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def train_argv(out: Path, seed: int, resume: bool, *extra: str) -> list[str]:
    return ["train", str(RECIPE), *RUN, f"run.seed={seed}", f"run.out_dir={out}", *extra,
            *(["--resume"] if resume else [])]


class Zygote:
    """A process that has imported offpolicy; :meth:`start` forks a child running ``offpolicy <argv>``."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (rc {self.proc.wait()})")
        return json.loads(line)

    def _ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, argv: list[str], log: Path, trace: Path) -> "Child":
        return Child(self, self._ask(op="run", argv=argv, log=str(log), trace=str(trace))["pid"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    """One start: a forked child of the zygote, or (zygote None) an exec'd process."""

    def __init__(self, zygote: Zygote | None, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.zygote, self.pid, self.popen = zygote, pid, popen

    def poll(self) -> int | None:
        return self.popen.poll() if self.popen else self.zygote._ask(op="poll", pid=self.pid)["rc"]

    def wait(self) -> int:
        return self.popen.wait() if self.popen else self.zygote._ask(op="wait", pid=self.pid)["rc"]


def exec_start(env: dict[str, str], argv: list[str], log: Path, trace: Path) -> Child:
    with open(log, "w") as f:
        popen = subprocess.Popen([sys.executable, "-c", EXEC_ENTRY, str(trace), *argv], env=env, cwd=ROOT,
                                 stdout=f, stderr=subprocess.STDOUT)
    return Child(None, popen.pid, popen)


# ---- killing ------------------------------------------------------------------------------------
def kill_at(child: Child, trace: Path, delay: float, out: Path, aim_checkpoint: bool) -> int | None:
    """Wait ``delay`` s (or, aimed, until a checkpoint is being written), then dump the stack and SIGKILL.
    Returns the exit code if the run ended first, else None."""
    deadline = time.perf_counter() + delay
    ckpts, next_poll = out / "checkpoints", 0.0
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        if aim_checkpoint and ckpts.is_dir() and any(n.startswith(".") for n in os.listdir(ckpts)):
            break
        if now >= next_poll:
            rc = child.poll()
            if rc is not None:
                return rc
            next_poll = now + 0.02
        time.sleep(0.001 if aim_checkpoint else 0.005)
    try:
        os.kill(child.pid, signal.SIGUSR1)
        t = time.perf_counter()
        while trace.stat().st_size == 0 and time.perf_counter() - t < 0.2:
            time.sleep(0.0005)
        time.sleep(0.002)  # the rest of the dump (it takes well under a millisecond)
        os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    rc = child.wait()
    return None if rc in (-signal.SIGKILL, -signal.SIGUSR1) else rc


QUOTE = '"'


def stage_of(trace_text: str) -> tuple[str, str | None]:
    """(stage, innermost offpolicy frame) from a faulthandler dump of the current thread: the stage is
    named by the innermost frame whose function has a known name."""
    block = trace_text.split("Current thread", 1)[-1].split("\n\n", 1)[0]
    frames = [f for f in (line.strip()[len("File "):].rsplit(" in ", 1) for line in block.splitlines()
                          if line.strip().startswith("File ")) if len(f) == 2]  # a torn last line is skipped
    ours = next((f"{Path(f.split(',')[0].strip(QUOTE)).name}:{func}" for f, func in frames
                 if "/offpolicy/" in f), None)
    stage = next((STAGES[func] for _, func in frames if func in STAGES), "other" if ours else "startup")
    return stage, ours


# ---- comparing ----------------------------------------------------------------------------------
def jsonl(path: Path) -> list[dict]:
    """Every line parsed strictly: a torn line anywhere is an error, not skipped."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def strip(row: dict, drop_prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(drop_prefixes)}


def exp_key(e: dict) -> tuple:
    return e["group_id"], tuple(e["response_ids"])


def multiset_diff(got: list, want: list) -> tuple[int, int]:
    """(lost, duplicated): items of ``want`` missing from ``got``, and items of ``got`` beyond ``want``."""
    g, w = collections.Counter(got), collections.Counter(want)
    return sum((w - g).values()), sum((g - w).values())


def load_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def compare_checkpoint(got: Path, ref: Path) -> dict[str, Any]:
    """A checkpoint a resume will load vs the uninterrupted run's of the same name."""
    from offpolicy.train.checkpoint import STATE_JSON, STATE_TENSORS
    from offpolicy.train.state_io import load_state

    sa, sb = load_state(got, STATE_JSON, STATE_TENSORS), load_state(ref, STATE_JSON, STATE_TENSORS)
    keys = ("stage", "step", "rollouts", "version", "rl_tokens")
    out = {"name": got.name, "elapsed": sa["elapsed"], "weights_equal": same_weights(got, ref), "counters_equal":
           all(sa.get(k) == sb.get(k) for k in keys), "buffer_lost": 0, "buffer_duplicated": 0, "buffer_equal": True}
    buf_a, buf_b = [(s.get("stage_state") or {}).get("buffer") for s in (sa, sb)]
    if buf_a is not None or buf_b is not None:
        exps = lambda buf: [exp_key(e) for g in buf["groups"] for e in g["experiences"]]  # noqa: E731
        out["buffer_lost"], out["buffer_duplicated"] = multiset_diff(exps(buf_a), exps(buf_b))
        rows = lambda buf: [(g["version"], g["uses"], [strip(e, ("created_at",)) for e in g["experiences"]])
                            for g in buf["groups"]]  # noqa: E731
        out["buffer_equal"] = rows(buf_a) == rows(buf_b) and buf_a["stats"] == buf_b["stats"]
    return out


def compare_runs(out: Path, ref: Path) -> dict[str, Any]:
    """The end of a killed series vs the uninterrupted run."""
    got_m, ref_m = jsonl(out / "metrics.jsonl"), jsonl(ref / "metrics.jsonl")
    steps = lambda rows, stage: [r["step"] for r in rows if r["stage"] == stage and "eval_point" not in r]  # noqa: E731
    got_e, ref_e = jsonl(out / "experiences.jsonl"), jsonl(ref / "experiences.jsonl")
    lost, dup = multiset_diff([exp_key(e) for e in got_e], [exp_key(e) for e in ref_e])
    wal = out / "rollouts.wal.jsonl"
    return {
        "sft_steps": steps(got_m, "sft"), "rl_steps": steps(got_m, "rl"),
        "rl_steps_continuous": steps(got_m, "rl") == steps(ref_m, "rl") == list(range(1, len(steps(ref_m, "rl")) + 1)),
        "sft_steps_continuous": steps(got_m, "sft") == steps(ref_m, "sft"),
        "eval_points": [r["eval_point"] for r in got_m if "eval_point" in r],
        "metrics_equal": [strip(r, TIMING_KEYS) for r in got_m] == [strip(r, TIMING_KEYS) for r in ref_m],
        "experiences": len(got_e), "lost_experiences": lost, "duplicated_experiences": dup,
        "experiences_equal": [strip(e, ("created_at",)) for e in got_e] == [strip(e, ("created_at",)) for e in ref_e],
        "final_weights_equal": same_weights(out / "checkpoints" / "final", ref / "checkpoints" / "final"),
        "staleness_equal": (out / "staleness.json").read_text() == (ref / "staleness.json").read_text(),
        "orphans": sorted(n for n in os.listdir(out / "checkpoints") if n.startswith(".")),
        "wal_lines": len(wal.read_text().splitlines()) if wal.exists() else 0,
    }


# ---- a series and a campaign --------------------------------------------------------------------
def uninterrupted(work: Path, env: dict[str, str], seed: int) -> tuple[Path, float]:
    """The reference: one plain ``python -m offpolicy.cli train``, keeping every checkpoint."""
    ref = work / f"reference_seed{seed}"
    shutil.rmtree(ref, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "offpolicy.cli", *train_argv(ref, seed, False,
                                                                            "run.keep_checkpoints=1000")],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return ref, time.perf_counter() - t


def kill_series(start, out: Path, ref: Path, seed: int, rng: random.Random, max_kills: int, run_seconds: float,
                aim_frac: float) -> dict[str, Any]:
    """Start, kill, resume ... until a start runs to the end (no kill after ``max_kills``).

    The delay of a kill is uniform over the run time left after the checkpoint it starts from (the
    checkpoint's ``elapsed`` vs ``run_seconds``, the whole run's), stretched by 20% and 0.3 s, so kills
    spread over the stages still to come and some land in setup and in the end of the run. A start that
    resumes from ``checkpoints/final`` (only the summary and the plot left) is not killed: more kills there
    would only repeat the same few lines."""
    shutil.rmtree(out, ignore_errors=True)
    from offpolicy.train.checkpoint import latest_checkpoint

    kills, resumed, fresh, failures, checks, attempt, resume, done = [], 0, 0, [], [], 0, False, 0.0
    at_final = False  # resuming from checkpoints/final: only the summary and the plot are left
    while True:
        attempt += 1
        log, trace = out.parent / f"{out.name}.{attempt}.log", out.parent / f"{out.name}.{attempt}.trace"
        child = start(train_argv(out, seed, resume), log, trace)
        resumed += resume
        if len(kills) < max_kills and not at_final:  # one kill in the last lap is enough: the next one finishes
            aimed = rng.random() < aim_frac
            rc = kill_at(child, trace, rng.uniform(0.0, 1.2 * max(run_seconds - done, 0.0) + 0.3), out, aimed)
        else:
            aimed, rc = False, child.wait()
        if rc == 0:
            break
        if rc is not None:  # it exited by itself with an error
            text = log.read_text()
            if resume and rc == 2 and "no checkpoint" in text:  # killed before the first checkpoint
                shutil.rmtree(out, ignore_errors=True)
                fresh, resume, done = fresh + 1, False, 0.0
                continue
            failures.append({"attempt": attempt, "rc": rc, "resume": resume, "log_tail": text[-2000:]})
            break
        dump = trace.read_text()
        last = (jsonl_tolerant(out / "metrics.jsonl") or [{}])[-1]
        stage, frame = stage_of(dump)
        kills.append({"stage": stage, "frame": frame, "aimed_at_checkpoint": aimed, "resume": resume,
                      "after": {k: last.get(k) for k in ("stage", "step", "eval_point")}})
        found, ckpt = [], resume_source(out / "checkpoints")
        if ckpt is None and (out / "checkpoints").is_dir():
            ckpt = latest_checkpoint(out / "checkpoints", warn=found.append)
        if ckpt is not None:
            name = ckpt.name[1:-len(".old")] if ckpt.name.endswith(".old") else ckpt.name
            checks.append({**compare_checkpoint(ckpt, ref / "checkpoints" / name), "fallback": bool(found)})
            done, at_final = checks[-1]["elapsed"], name == "final"
        resume = True
    return {"kills": kills, "resumed": resumed, "fresh_restarts": fresh, "failures": failures,
            "checkpoint_checks": checks, "starts": attempt}


def resume_source(root: Path) -> Path | None:
    """The checkpoint a resume will load when a kill landed while a same-named checkpoint was being
    replaced (``latest`` names ``N``, only ``.N.old`` is there): the resume's ``clean_orphans`` puts
    ``.N.old`` back first. None otherwise (then :func:`latest_checkpoint` says; it does not clean)."""
    try:
        name = (root / "latest").read_text().strip()
    except OSError:
        return None
    old = root / f".{name}.old"
    return old if name and not (root / name).exists() and old.is_dir() else None


def jsonl_tolerant(path: Path) -> list[dict]:
    """For the label only: a killed run may have torn its last line (a resume cuts it off)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def campaign(work: Path, kills: int, seed: int = 0, max_per_series: int = 8, aim_frac: float = 0.25,
             use_exec: bool = False) -> dict[str, Any]:
    """Series of killed runs until ``kills`` kills have landed; every series checked against the reference."""
    work.mkdir(parents=True, exist_ok=True)
    env = run_env(work)
    rng = random.Random(seed)
    ref, ref_seconds = uninterrupted(work, env, seed)
    zygote = None if use_exec else Zygote(env)
    start = (lambda argv, log, trace: exec_start(env, argv, log, trace)) if use_exec else zygote.start
    series, t0 = [], time.perf_counter()
    try:
        # one start left alone: how long a start lasts (the kill delays are drawn up to that), and that a
        # start of this kind (forked or exec'd) gives the reference's results
        plain, t = work / "plain", time.perf_counter()
        rc = start(train_argv(plain, seed, False), work / "plain.log", work / "plain.trace").wait()
        start_seconds = time.perf_counter() - t
        run_seconds = json.loads((plain / "summary.json").read_text())["wall_seconds"]
        if rc != 0:
            raise RuntimeError(f"an uninterrupted start failed (rc {rc}): {(work / 'plain.log').read_text()[-3000:]}")
        plain_check = compare_runs(plain, ref)
        while sum(len(s["kills"]) for s in series) < kills:
            out = work / f"series_{len(series)}"
            left = kills - sum(len(s["kills"]) for s in series)
            s = kill_series(start, out, ref, seed, rng, min(max_per_series, left), run_seconds, aim_frac)
            if not s["failures"]:
                s["final"] = compare_runs(out, ref)
            series.append(s)
    finally:
        if zygote is not None:
            zygote.close()
    return {**summarize(series, seed, run_seconds, start_seconds, ref_seconds, time.perf_counter() - t0, use_exec),
            "uninterrupted_start_equal": plain_check}


def summarize(series: list[dict], seed: int, run_seconds: float, start_seconds: float, ref_seconds: float,
              seconds: float, use_exec: bool) -> dict[str, Any]:
    kills = [k for s in series for k in s["kills"]]
    finals = [s.get("final") for s in series]
    checks = [c for s in series for c in s["checkpoint_checks"]]
    ok = all(f is not None for f in finals)
    return {
        "kills": len(kills),
        "resumed": sum(s["resumed"] for s in series),
        "resume_failures": sum(len(s["failures"]) for s in series),
        "fresh_restarts": sum(s["fresh_restarts"] for s in series),
        "series": len(series),
        "lost_experiences": sum(f["lost_experiences"] for f in finals if f),
        "duplicated_experiences": sum(f["duplicated_experiences"] for f in finals if f),
        "buffer_lost_experiences": sum(c["buffer_lost"] for c in checks),
        "buffer_duplicated_experiences": sum(c["buffer_duplicated"] for c in checks),
        "final_weights_equal": ok and all(f["final_weights_equal"] for f in finals),
        "rl_steps_continuous": ok and all(f["rl_steps_continuous"] and f["sft_steps_continuous"] for f in finals),
        "metrics_equal": ok and all(f["metrics_equal"] for f in finals),
        "experiences_equal": ok and all(f["experiences_equal"] for f in finals),
        "staleness_equal": ok and all(f["staleness_equal"] for f in finals),
        "orphans_left": sum(len(f["orphans"]) for f in finals if f),
        "wal_lines_left": sum(f["wal_lines"] for f in finals if f),
        "checkpoints_checked": len(checks),
        "checkpoints_equal": all(c["weights_equal"] and c["counters_equal"] and c["buffer_equal"] for c in checks),
        "checkpoint_fallbacks": sum(c["fallback"] for c in checks),
        "kills_by_stage": dict(collections.Counter(k["stage"] for k in kills).most_common()),
        "kills_aimed_at_checkpoint": sum(k["aimed_at_checkpoint"] for k in kills),
        "kills_during_resume": sum(k["resume"] for k in kills),
        "seed": seed,
        "spawn": "exec" if use_exec else "fork (zygote)",
        "kill_delay_s": f"uniform(0, 1.2 * ({run_seconds:.2f} - elapsed at the checkpoint resumed from) + 0.3)",
        "uninterrupted_exec_s": round(ref_seconds, 2),
        "uninterrupted_start_s": round(start_seconds, 2),
        "seconds": round(seconds, 1),
        "series_detail": series,
    }


# ---- async: kill the driver ------------------------------------------------------------------
ASYNC = ["run.mode=async", "async.num_workers=1", "async.num_cpus=2", "async.groups_per_request=2", "rl.steps=24"]


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the driver's, started with ``start_new_session``): Ray's too."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
                pids.append(int(d))
    return pids


def reap_session(sid: int, grace: float = 5.0) -> list[str]:
    """Wait up to ``grace`` s for the session's processes to go by themselves; SIGKILL the rest.
    Returns the names of those still there after the grace period (left behind by the dead driver)."""
    t = time.perf_counter()
    while session_pids(sid) and time.perf_counter() - t < grace:
        time.sleep(0.1)
    left, names = session_pids(sid), []
    for pid in left:
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
    return names


def async_series(work: Path, kills: int, seed: int = 0, timeout: float = 240.0) -> dict[str, Any]:
    """Kill an async run's driver (SIGKILL, mid-RL: after a random number of logged RL steps plus up to
    0.3 s), resume, repeat; then let it finish. Async runs are not bit-reproducible across a kill (a request
    generated again runs on other weights), so what is checked is the consumed experiences: each step's
    groups in ``experiences.jsonl`` exactly once, and everything the write-ahead log held at a kill
    (collected, not yet covered by a checkpoint) consumed after the resume, not generated again."""
    from offpolicy.train.checkpoint import STATE_JSON, STATE_TENSORS, latest_checkpoint
    from offpolicy.train.state_io import load_state

    env, rng = {**run_env(work), "RAY_raylet_start_wait_time_s": "120"}, random.Random(seed)  # busy cores
    out = work / "async_run"
    ray_start_failures = []  # Ray itself failing to start (not a resume failing): retried, counted
    shutil.rmtree(out, ignore_errors=True)
    steps = int(next(o for o in ASYNC if o.startswith("rl.steps=")).split("=")[1])
    killed, left_behind, resume, starts, t0 = [], [], False, 0, time.perf_counter()
    wal_groups, buffer_groups = {}, []  # group_id -> responses, as the write-ahead log / a resumed buffer held them
    done_step, logged_bytes = 0, 0  # RL steps and metrics.jsonl bytes the checkpoint resumed from covers
    while True:
        starts += 1
        with open(work / f"async.{starts}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "offpolicy.cli", *train_argv(out, seed, resume, *ASYNC)],
                                    env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        target = None if len(killed) >= kills or done_step >= steps - 1 else rng.randint(done_step + 1, steps - 1)
        metrics, fresh = out / "metrics.jsonl", False  # rows count once the resume has cut the file back
        while proc.poll() is None and target is not None:
            fresh = fresh or not metrics.exists() or metrics.stat().st_size <= logged_bytes
            rows = [r for r in jsonl_tolerant(metrics) if r.get("stage") == "rl" and "eval_point" not in r]
            if fresh and rows and rows[-1]["step"] >= target:
                time.sleep(rng.uniform(0.0, 0.1))
                os.kill(proc.pid, signal.SIGKILL)
                break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"async series: over {timeout} s")
            time.sleep(0.02)
        rc = proc.wait()
        left_behind.append(reap_session(proc.pid))
        if rc == 0:
            break
        text = (work / f"async.{starts}.log").read_text()
        ray_failed = rc == 1 and len(ray_start_failures) < 2 and (
            "timed out during startup" in text or "Raylet is terminated" in text)
        if ray_failed:
            ray_start_failures.append(text[-500:])
        elif rc != -signal.SIGKILL:
            raise RuntimeError(f"async start {starts} failed (rc {rc}): {text[-3000:]}")
        ckpt = latest_checkpoint(out / "checkpoints", warn=lambda m: None)
        state = load_state(ckpt, STATE_JSON, STATE_TENSORS)
        done_step = state["step"] if state["stage"] == "rl" else 0
        logged_bytes = state["log_sizes"].get("metrics.jsonl", 0)
        buf = (state.get("stage_state") or {}).get("buffer") or {"groups": []}
        buffer_groups.append([(g["experiences"][0]["group_id"], [e["response_ids"] for e in g["experiences"]])
                              for g in buf["groups"]])
        wal = [json.loads(line) for line in (out / "rollouts.wal.jsonl").read_text().splitlines() if line.strip()]
        pending = [w for w in wal if w["step"] >= state["step"]]
        wal_groups.update((g[0]["group_id"], [e["response_ids"] for e in g]) for w in pending for g in w["groups"])
        if not ray_failed:
            killed.append({"after_rl_step": target, "checkpoint": ckpt.name, "wal_requests_pending": len(pending)})
        resume = True
    # a group's responses may repeat (same tokens sampled twice), so experiences are counted per group:
    # each group id once, with group_size responses; each step with prompts_per_step groups
    logged: dict[str, list] = collections.defaultdict(list)
    for e in jsonl(out / "experiences.jsonl"):
        logged[e["group_id"]].append(e["response_ids"])
    size = lambda key: int(next(o for o in RUN if o.startswith(key)).split("=")[1])  # noqa: E731
    group_size, per_step_want = size("rl.group_size="), size("rl.prompts_per_step=")
    per_step = collections.Counter(gid.split(":", 1)[0].split("c")[0] for gid in logged)
    rl_steps = [r["step"] for r in jsonl(out / "metrics.jsonl") if r["stage"] == "rl" and "eval_point" not in r]
    buffer_ids = [[gid for gid, _ in b] for b in buffer_groups]
    return {
        "kills": len(killed), "resumed": starts - 1 - len(ray_start_failures), "kill_detail": killed,
        "rl_steps_continuous": rl_steps == list(range(1, steps + 1)),
        "experiences": sum(map(len, logged.values())),
        "duplicated_experiences": sum(max(0, len(v) - group_size) for v in logged.values()),
        "lost_experiences": sum(max(0, group_size - len(v)) for v in logged.values()) +
                            group_size * sum(max(0, per_step_want - per_step.get(f"s{i}", 0)) for i in range(steps)),
        "steps_with_wrong_count": sorted(f"s{i}" for i in range(steps) if per_step.get(f"s{i}") != per_step_want),
        "wal_experiences_at_kills": sum(map(len, wal_groups.values())),
        "wal_experiences_not_consumed": sum(len(v) for gid, v in wal_groups.items() if logged.get(gid) != v),
        "buffer_duplicated_groups": sum(len(b) - len(set(b)) for b in buffer_ids),
        "buffer_experiences_not_logged": sum(len(v) for b in buffer_groups for gid, v in b if logged.get(gid) != v),
        "processes_left_after_driver_kill": left_behind[:-1], "processes_left_after_finish": left_behind[-1],
        "orphans": sorted(n for n in os.listdir(out / "checkpoints") if n.startswith(".")),
        "ray_start_failures": ray_start_failures,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exec", dest="use_exec", action="store_true", help="exec every start instead of forking")
    ap.add_argument("--async-kills", type=int, default=3, help="driver kills of an async run (0: none)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crash.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine

    with tempfile.TemporaryDirectory(prefix="offpolicy_crash_") as work:
        result = campaign(Path(work), args.kills, args.seed, use_exec=args.use_exec)
        if args.async_kills:
            result["async"] = async_series(Path(work), args.async_kills, args.seed)
    result = {**{k: v for k, v in result.items() if k != "series_detail"},
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "command": f"PYTHONPATH=src .venv/bin/python benchmarks/bench_crash.py --kills {args.kills}"
                         f" --seed {args.seed} --async-kills {args.async_kills}" + (" --exec" if args.use_exec else ""),
              "series_detail": result["series_detail"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "series_detail"}, indent=1))


if __name__ == "__main__":
    main()
