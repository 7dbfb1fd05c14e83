"""End-to-end: the quickstart's two stages really learn (held-out accuracy rises).

Stage 2 starts from a shipped SFT checkpoint (tests/fixtures/tiny_addition_sft, 27.6% greedy)
so the test spends its budget on RL; stage 1 is checked separately from a fresh model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offpolicy.config import load_config
from offpolicy.train.runner import train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
SFT_CKPT = ROOT / "tests" / "fixtures" / "tiny_addition_sft"


def test_quickstart_recipe_is_valid():
    cfg = load_config(RECIPE)
    assert cfg.sft.steps > 0 and cfg.rl.steps > 0
    assert cfg.rl.updates_per_step * cfg.rl.groups_per_update > cfg.rl.prompts_per_step  # reuse: UTD > 1
    assert cfg.rl.buffer.max_staleness >= 1


@pytest.mark.slow
def test_rl_stage_raises_heldout_greedy_accuracy(tmp_path):
    # The quickstart's RL settings, fewer steps, one thread, a smaller held-out set.
    cfg = load_config(RECIPE, [
        f"run.out_dir={tmp_path}", "run.progress=false", "run.threads=1", "run.checkpoint_every=0",
        f"policy.init={SFT_CKPT}", "sft.steps=0", "rl.steps=24", "eval.every=0", "eval.n_problems=300",
    ])
    summary = train(cfg)
    before, after = summary["accuracy_before_rl"], summary["accuracy_after_rl"]
    assert 0.1 < before < 0.5, "the fixture should start at a modest accuracy"
    assert after - before >= 0.10, f"RL should raise held-out greedy accuracy: {before:.3f} -> {after:.3f}"
    assert summary["rollouts"] == 24 * 128 * 8
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["accuracy_after_rl"] == after


@pytest.mark.slow
def test_sft_stage_learns_from_expert_solutions(tmp_path):
    cfg = load_config(RECIPE, [
        f"run.out_dir={tmp_path}", "run.progress=false", "run.threads=1", "run.checkpoint_every=0",
        "sft.steps=250", "rl.steps=0", "eval.n_problems=200",
    ])
    summary = train(cfg)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before_rl = next(r for r in evals if r.get("eval_point") == "before_rl")
    assert summary["accuracy_before_sft"] == 0.0
    assert before_rl["eval/pass_at_k"] >= 0.15, before_rl  # a random model solves ~nothing


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["topr_reuse", "psr_reuse"])
def test_heavy_reuse_recipes_learn_from_two_rollout_steps(tmp_path, recipe):
    """32 small updates per rollout step gain >= 10 points of held-out accuracy from 2 x 1,024 rollouts."""
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml", [
        f"run.out_dir={tmp_path}", "run.progress=false", "run.threads=1", "run.checkpoint_every=0",
        f"policy.init={SFT_CKPT}", "sft.steps=0", "rl.steps=2", "eval.every=0", "eval.n_problems=300",
        "eval.samples=0",
    ])
    summary = train(cfg)
    before, after = summary["accuracy_before_rl"], summary["accuracy_after_rl"]
    assert summary["rollouts"] == 2 * 128 * 8
    assert after - before >= 0.10, f"{before:.3f} -> {after:.3f}"
