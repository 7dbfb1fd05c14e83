"""The suite table's arithmetic on hand-built curves and rows (no training)."""

import pytest

from offpolicy.suite_compare import acc_at, first_gain, summarize_suite, table


CURVE = {"acc": [0.20, 0.25, 0.31, 0.28, 0.45], "rollouts": [0, 1024, 2048, 3072, 4096]}


def test_first_gain_uses_the_runs_own_start():
    assert first_gain(CURVE, 0.10) == 2048  # 0.31 >= 0.30 at 2,048 rollouts
    assert first_gain(CURVE, 0.20) == 4096
    assert first_gain(CURVE, 0.30) is None


def test_acc_at_budget_is_the_last_evaluation_within_it():
    assert acc_at(CURVE, 3000) == 0.31
    assert acc_at(CURVE, 3072) == 0.28
    assert acc_at(CURVE, 10**6) == 0.45


def _row(task, system, seed, start, final, to10, rollouts=8192):
    return {"task": task, "system": system, "seed": seed, "start_acc": start, "final_acc": final,
            "best_acc": max(start, final), "below_start_2se": final < start - 0.05, "rollouts": rollouts,
            "rollouts_to_plus10": to10, "rollouts_to_plus20": None, "acc_at_budget": {"4096": final},
            "seconds_per_step": 1.0, "peak_rss_mb": 400.0, "curve": {"acc": [start, final], "rollouts": [0, rollouts]}}


def test_summary_ratio_and_worst_drop():
    rows = [
        _row("a", "trl", 0, 0.2, 0.35, 8000), _row("a", "trl", 1, 0.2, 0.33, 6000),
        _row("a", "default", 0, 0.2, 0.40, 1000), _row("a", "default", 1, 0.2, 0.38, 2000),
        _row("b", "trl", 0, 0.3, 0.31, None), _row("b", "default", 0, 0.3, 0.27, 3000),
        _row("b", "grpo_onpolicy", 0, 0.3, 0.10, None),  # not the default: does not count as worst
    ]
    s = summarize_suite(rows)
    assert s["per_task"]["a"]["ratio"] == pytest.approx(7000 / 1500)
    assert s["per_task"]["b"] == {}  # TRL never reached +0.10 there
    assert s["min_rollouts_ratio_vs_trl"] == pytest.approx(7000 / 1500)
    assert s["worst_final_minus_start"] == pytest.approx(-0.03)
    assert s["worst_run"]["task"] == "b"
    assert s["default_runs_below_start_2se"] == 0


def test_a_seed_that_never_reached_is_charged_its_budget_and_flagged():
    rows = [_row("a", "trl", 0, 0.2, 0.35, 4000), _row("a", "default", 0, 0.2, 0.25, None, rollouts=8192),
            _row("a", "default", 1, 0.2, 0.40, 1024)]
    e = summarize_suite(rows)["per_task"]["a"]
    assert e["default_rollouts_to_plus10"] == pytest.approx((8192 + 1024) / 2)
    assert e["default_is_lower_bound"] is True


def test_table_has_one_line_per_task_and_system():
    rows = [_row("a", "trl", 0, 0.2, 0.35, 8000), _row("a", "default", 0, 0.2, 0.4, 1000),
            _row("a", "default", 1, 0.2, 0.4, None)]
    md = table(rows, [4096]).splitlines()
    assert len(md) == 4
    assert "| a | default | 2 |" in md[3] and "1,000 (1/2)" in md[3]


def test_a_trl_result_reads_back_like_one_of_our_runs(tmp_path):
    """write_run stores TRL's curve so that compare's reader (rl_curve) and the suite rows see it as ours."""
    from offpolicy.baselines.trl_grpo import write_run
    from offpolicy.suite_compare import run_row

    result = {"curve": [{"step": 0, "rollouts": 0, "acc": 0.2}, {"step": 2, "rollouts": 2048, "acc": 0.26},
                        {"step": 4, "rollouts": 4096, "acc": 0.33}],
              "steps": 4, "rollouts": 4096, "step_seconds": [1.0, 2.0, 1.5, 1.5],
              "reward_mean_per_step": [0.1, 0.2, 0.2, 0.3], "peak_rss_mb": 900.0,
              "wall_seconds_excluding_eval": 6.0, "stop_reason": "max_steps", "versions": {"trl": "x"}}
    write_run(result, tmp_path / "trl" / "seed0", n_eval=300)
    row = run_row("a", "trl", 0, tmp_path / "trl" / "seed0", [2048, 4096], 300)
    assert row["start_acc"] == 0.2 and row["final_acc"] == 0.33 and row["best_acc"] == 0.33
    assert row["rollouts_to_plus10"] == 4096 and row["rollouts_to_plus20"] is None
    assert row["acc_at_budget"] == {"2048": 0.26, "4096": 0.33}
    assert row["seconds_per_step"] == 1.5 and row["peak_rss_mb"] == 900.0
