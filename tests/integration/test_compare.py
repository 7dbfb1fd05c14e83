"""``offpolicy compare``: 2 tiny recipes × 2 seeds, compare.json and plots, resumable; sweeps; bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import offpolicy.compare as compare_mod
from offpolicy.cli import app
from offpolicy.compare import ci95, dedupe, first_reach, plan, resolve_target, split_args, stats, t975
from offpolicy.config import ConfigError

# 3 RL steps with an evaluation after each: a ~1 s run with a 4-point learning curve
CURVE = ["sft.steps=1", "rl.steps=3", "eval.every=1"]


def write_recipe(path, overrides):
    data: dict = {}
    for text in overrides:
        key, value = text.split("=", 1)
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def recipes(tmp_path, tiny_overrides, reward_spec):
    base = [*tiny_overrides(tmp_path / "unused"), *CURVE, f"task.reward={reward_spec}"]
    onpolicy = write_recipe(tmp_path / "onpolicy.yaml", [*base, "rl.updates_per_step=1"])
    reuse = write_recipe(tmp_path / "reuse.yaml", [*base, "rl.updates_per_step=2", "rl.groups_per_update=2",
                                                   "rl.old_logp=behavior"])
    return onpolicy, reuse


def test_two_recipes_two_seeds_then_nothing_reruns(recipes, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    cli = CliRunner()
    args = ["compare", *map(str, recipes), "--seeds", "2", "--target", "0.0", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert data["seeds"] == 2 and data["target_accuracy"] == 0.0
    assert set(data["labels"]) == {"onpolicy", "reuse"}
    for label, entry in data["labels"].items():
        for seed in (0, 1):
            assert (out / label / f"seed{seed}" / "summary.json").exists()
        acc = entry["final_greedy_acc"]
        assert len(acc["values"]) == 2 and acc["min"] <= acc["mean"] <= acc["max"]
        assert acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1]
        assert entry["rollouts"]["values"] == [3 * 4 * 4, 3 * 4 * 4]  # steps × prompts × group size
        assert entry["to_target"]["reached"] == 2  # accuracy >= 0 at the first evaluation
        assert entry["to_target"]["rollouts"]["values"] == [0, 0]
    seeds_used = {yaml.safe_load((out / "reuse" / f"seed{s}" / "config.yaml").read_text())["run"]["seed"]
                  for s in (0, 1)}
    assert seeds_used == {0, 1}
    for name in ("compare_accuracy.png", "compare_offpolicy.png"):
        png = out / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "4 run(s) ran" in result.stdout

    # a second invocation finds every summary.json and trains nothing
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/seed*/summary.json")}

    def no_training(*a, **k):
        raise AssertionError("compare re-ran a finished run")

    monkeypatch.setattr(compare_mod, "train", no_training)
    again = cli.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "0 run(s) ran, 0 resumed, 4 skipped" in again.stdout
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert json.loads((out / "compare.json").read_text())["labels"].keys() == data["labels"].keys()


def test_sweep_makes_one_label_per_value(recipes, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["compare", str(recipes[0]), "--seeds", "1", "--sweep",
                                      "rl.optim.lr=1e-2,1e-3", "--target", "+0.0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert list(data["labels"]) == ["rl.optim.lr=1e-2", "rl.optim.lr=1e-3"]
    lr = yaml.safe_load((out / "rl.optim.lr=1e-3" / "seed0" / "config.yaml").read_text())["rl"]["optim"]["lr"]
    assert lr == pytest.approx(1e-3)
    starts = [e["start_greedy_acc"]["mean"] for e in data["labels"].values()]
    assert data["target_accuracy"] == pytest.approx(sum(starts) / 2)


def test_unfinished_run_without_checkpoint_starts_over(recipes, tmp_path):
    out = tmp_path / "cmp"
    stale = out / "onpolicy" / "seed0"
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    result = CliRunner().invoke(app, ["compare", str(recipes[0]), "--seeds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "starting it over" in result.stderr
    assert (stale / "summary.json").exists()


def test_killed_run_with_a_checkpoint_resumes(recipes, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(recipes[0]), "--seeds", "1", "--out", str(out), "run.checkpoint_every=1"]
    assert CliRunner().invoke(app, args).exit_code == 0
    run = out / "onpolicy" / "seed0"
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "resuming" in again.stderr and "0 run(s) ran, 1 resumed, 0 skipped" in again.stdout
    assert (run / "summary.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--sweep", "rl.optim.lr=1e-3"], "at least two"),
    (["--sweep", "rl.optim.lr"], "key.sub=v1,v2"),
    (["rl.nonsense=1"], "unknown key"),
    (["--seeds", "0"], "--seeds"),
    (["--target", "high"], "--target"),
])
def test_bad_input_is_one_line(recipes, tmp_path, args, needle):
    result = CliRunner().invoke(app, ["compare", str(recipes[0]), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.stderr


def test_plan_and_helpers(recipes, tmp_path):
    paths, overrides = split_args([str(recipes[0]), "rl.steps=2", str(recipes[1])])
    assert paths == list(recipes) and overrides == ["rl.steps=2"]
    with pytest.raises(ConfigError, match="neither a recipe"):
        split_args(["oops"])
    with pytest.raises(ConfigError, match="exactly one recipe"):
        plan(list(recipes), [], sweep="rl.steps=1,2")
    with pytest.raises(ConfigError, match="share the name"):
        plan([recipes[0], recipes[0]], [])
    # a resumed run logs steps after its checkpoint again: the later record wins
    rows = [{"stage": "rl", "step": 1, "x": 1}, {"stage": "rl", "step": 2, "x": 2}, {"stage": "rl", "step": 2, "x": 3}]
    assert [r["x"] for r in dedupe(rows)] == [1, 3]
    curve = {"acc": [0.2, 0.3, 0.5], "rollouts": [0, 10, 20], "seconds": [0, 1, 2], "learner_steps": [0, 2, 4],
             "rl_step": [0, 1, 2]}
    assert first_reach(curve, 0.45) == {"rollouts": 20, "rl_seconds": 2, "learner_steps": 4, "rl_step": 2,
                                        "accuracy": 0.5}
    assert first_reach(curve, 0.9) is None
    assert resolve_target("+0.1", {"a": [curve, {**curve, "acc": [0.4]}]}) == pytest.approx(0.4)


def test_confidence_interval_of_the_mean_over_seeds():
    # [1, 2, 3]: mean 2, sd 1, t_{0.975, 2} = 4.303 -> 2 ± 4.303 / sqrt(3) = 2 ± 2.4843
    lo, hi = ci95([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 2.48434, abs=1e-4) and hi == pytest.approx(2 + 2.48434, abs=1e-4)
    assert ci95([0.5]) is None and stats([0.5, None])["ci95"] is None and stats([None])["mean"] is None
    s = stats([0.4, 0.6, None])
    assert s["mean"] == pytest.approx(0.5) and s["sd"] == pytest.approx(0.141421, abs=1e-6)
    assert s["ci95"] == pytest.approx([0.5 - 12.706 * 0.1, 0.5 + 12.706 * 0.1])  # df 1: sd/sqrt(2) = 0.1
    # the table ends at df 30; the Cornish-Fisher expansion continues it (t_{0.975, 40} = 2.021, 120: 1.980)
    assert t975(30) == 2.042 and t975(40) == pytest.approx(2.021, abs=2e-3)
    assert t975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="df >= 1"):
        t975(0)
