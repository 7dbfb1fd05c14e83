"""Every shipped recipe validates and runs 3 RL steps (after 3 SFT steps) on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from offpolicy.config import load_config
from offpolicy.report.metrics import read_metrics
from offpolicy.train.runner import train

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
SMALL = ["run.progress=false", "run.threads=1", "run.checkpoint_every=0", "policy.d_model=32", "policy.n_layers=1",
         "policy.n_heads=2", "sft.steps=3", "sft.batch_size=8", "rl.steps=3", "rl.prompts_per_step=8",
         "rl.groups_per_update=4", "eval.n_problems=8", "eval.samples=2", "eval.every=0"]


def test_recipes_exist():
    assert len(RECIPES) >= 3


def offline_log(tmp_path, reward_spec) -> list[str]:
    """An experience log from a tiny sync run, for the offline recipe (which ships pointing at a quickstart run)."""
    quick = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    train(load_config(quick, [*SMALL, f"run.out_dir={tmp_path / 'logged'}", f"task.reward={reward_spec}",
                              "run.save_experiences=true", "rl.drop_uninformative_groups=false"]))
    return [f"offline.path={tmp_path / 'logged' / 'experiences.jsonl'}", "policy.init=tiny"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_three_steps(recipe, tmp_path, reward_spec):
    # the digit-fraction reward gives an untrained model varied rewards, so updates really happen
    offline = load_config(recipe).run.mode == "offline"
    extra = offline_log(tmp_path, reward_spec) if offline else []
    cfg = load_config(recipe, [*SMALL, f"run.out_dir={tmp_path / 'run'}", f"task.reward={reward_spec}", *extra])
    summary = train(cfg)
    assert summary["rollouts"] == (0 if offline else 3 * 8 * cfg.rl.group_size)
    tmp_path = tmp_path / "run"
    rl_rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("stage") == "rl" and "train/version" in r]
    assert len(rl_rows) == 3
    assert sum(r["train/updates"] for r in rl_rows) > 0
    for r in rl_rows:
        for key in ("loss/policy", "offpolicy/ess", "offpolicy/staleness_mean"):
            if key in r:
                assert r[key] is not None and math.isfinite(r[key]), (key, r)
