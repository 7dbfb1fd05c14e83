"""`run.ray_address` joins a running cluster: `ray start --head` on this machine, then `offpolicy train` in
async mode against it (slow tier: a cluster start is ~10 s)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        ray_bin = shutil.which("ray")
    port = free_port()
    start = [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    subprocess.run(start, check=True, capture_output=True, timeout=120)  # loopback only (conftest's RAY_ env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)


def test_async_training_joins_a_running_cluster(tmp_path, ray_cluster):
    out = tmp_path / "run"
    overrides = [*TINY_RUN, f"run.out_dir={out}", "run.mode=async", f"run.ray_address={ray_cluster}",
                 "rl.steps=3", "rl.drop_uninformative_groups=false", "eval.samples=0", "eval.n_problems=4",
                 "async.num_workers=1", "async.groups_per_request=2", "rl.buffer.max_staleness=2"]
    env = {**os.environ, "RAY_AUTH_MODE": "token",  # an explicit address does not turn Ray's token auth on by itself
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "offpolicy.cli", "train", "recipes/quickstart.yaml", *overrides],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "async" and summary["rollouts"] == 3 * 4 * 4
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "rl" and "train/version" in r] == [1, 2, 3]
