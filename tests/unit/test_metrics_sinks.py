"""metrics.jsonl with non-finite values, and the TensorBoard / W&B sinks (``run.loggers``)."""

from __future__ import annotations

import json
import time
import math
import struct
import sys

import pytest

from offpolicy.report.metrics import MetricsLog, read_metrics

NAN, INF = float("nan"), float("inf")

# an SFT stage of 2 steps, then 2 RL steps: the sinks' global step is 1, 2, then 2 + 1, 2 + 2
RECORDS = [
    {"stage": "sft", "step": 1, "rollouts": 0, "sft/loss": 2.5, "time/step_s": 0.1},
    {"stage": "sft", "step": 2, "rollouts": 0, "sft/loss": 2.0, "time/step_s": 0.1},
    {"stage": "rl", "step": 0, "rollouts": 0, "eval_point": "before_rl", "eval/greedy_acc": 0.25},
    {"stage": "rl", "step": 1, "rollouts": 64, "reward/mean": 0.5, "loss/clip_frac": 0.125, "loss/policy": NAN},
    {"stage": "rl", "step": 2, "rollouts": 128, "reward/mean": 0.75, "loss/clip_frac": 0.0, "offpolicy/ess": -INF,
     "loss/policy": 0.5},
]
GLOBAL = [1, 2, 2, 3, 4]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def expected_scalars() -> dict[str, list[tuple[int, float]]]:
    """What a sink should hold: every numeric field but ``step``, at the global step."""
    want: dict[str, list[tuple[int, float]]] = {}
    for g, r in zip(GLOBAL, RECORDS):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                want.setdefault(k, []).append((g, float(v)))
    return want


def write(tmp_path, **kw):
    log = MetricsLog(tmp_path, **kw)
    for r in RECORDS:
        log.log(r)
    log.close()
    return read_metrics(tmp_path / "metrics.jsonl")


# ---- metrics.jsonl ------------------------------------------------------------------------------------
def test_nonfinite_values_round_trip_and_are_flagged(tmp_path):
    rows = write(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 0, 1, 2]
    assert "nonfinite" not in rows[0] and "nonfinite" not in rows[2]
    assert rows[3]["nonfinite"] == ["loss/policy"] and math.isnan(rows[3]["loss/policy"])
    assert rows[4]["nonfinite"] == ["offpolicy/ess"] and rows[4]["offpolicy/ess"] == -INF
    text = (tmp_path / "metrics.jsonl").read_text()
    assert '"loss/policy": NaN' in text and '"offpolicy/ess": -Infinity' in text and "null" not in text
    for got, want in zip(rows, RECORDS):  # every value comes back as it was logged
        assert all(same(got[k], v) if isinstance(v, float) else got[k] == v for k, v in want.items())
    assert json.loads('{"a": Infinity}') == {"a": INF}  # the tokens Python's json reads back


def test_plain_metricslog_writes_only_the_file(tmp_path):
    write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_unknown_logger_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['mlflow'\]; valid: \['tensorboard', 'wandb'\]"):
        MetricsLog(tmp_path, loggers=["mlflow"])
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("logger,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes ``import package`` raise ImportError
    hint = rf"'{logger}' needs the package '{package}'.*pip install 'offpolicy\[tracking\]'"
    with pytest.raises(ImportError, match=hint):
        MetricsLog(tmp_path, loggers=[logger])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_readers_accept_nonfinite_files(tmp_path):
    """plots and compare read files with NaN / Infinity (and the older null) without failing."""
    from offpolicy.compare import rl_curve
    from offpolicy.report.plot import plot_learning_curve

    log = MetricsLog(tmp_path)
    for r in RECORDS + [{"stage": "rl", "step": 2, "rollouts": 128, "eval_point": "final", "eval/greedy_acc": NAN,
                         "time/step_s": INF}]:
        log.log(r)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a record from before this change
        f.write('{"stage": "rl", "step": 3, "rollouts": 192, "reward/mean": null, "time/step_s": 0.2}\n')
    curve = rl_curve(tmp_path)
    assert curve["acc"][0] == 0.25 and math.isnan(curve["acc"][1])
    assert plot_learning_curve(tmp_path).exists()


# ---- TensorBoard ------------------------------------------------------------------------------------
def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = write(tmp_path, loggers=["tensorboard"], config={"rl": {"loss": "grpo"}})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    want = expected_scalars()
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(same(a, b) or math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got, points)), \
            (tag, got, points)  # TensorBoard stores float32
    # ... and metrics.jsonl holds the same values
    assert [r.get("reward/mean") for r in rows if r["stage"] == "rl" and "reward/mean" in r] == \
        [v for _, v in want["reward/mean"]]


def test_resume_keeps_the_global_step(tmp_path):
    log = MetricsLog(tmp_path)
    for r in RECORDS[:3]:
        log.log(r)
    log.close()
    resumed = MetricsLog(tmp_path)  # a new process on the same run folder
    assert resumed.sft_steps == 2 and resumed.global_step({"stage": "rl", "step": 5}) == 7
    resumed.close()


# ---- Weights & Biases (offline, no network, no login) ----------------------------------------------------
def _wandb_records(path):
    """Records of a ``.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB-log chunks in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_run_folder_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    write(out, loggers=["wandb"], run_name="unit", config={"rl": {"loss": "grpo"}})
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    for _ in range(100):  # wandb's writer process may still be flushing under load: poll, at most ~10 s
        records = _wandb_records(next(runs[0].glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "run" for r in records):
            break
        time.sleep(0.1)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "unit" and run.project == "offpolicy"
    assert {u.key: json.loads(u.value_json) for u in run.config.update}["rl"] == {"loss": "grpo"}
    got: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    got.setdefault(k, []).append((r.history.step.num, float(v)))
    # W&B keeps one row per step: the two records at global step 2 (last SFT step, before_rl eval) merge
    want = {k: list(dict(points).items()) for k, points in expected_scalars().items()}
    assert sorted(got) == sorted(want)
    for k, points in want.items():
        assert [s for s, _ in got[k]] == [s for s, _ in points], k
        assert all(same(a, b) for (_, a), (_, b) in zip(got[k], points)), (k, got[k], points)
