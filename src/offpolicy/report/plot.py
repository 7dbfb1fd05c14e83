"""Learning-curve PNGs from ``metrics.jsonl`` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from offpolicy.report.metrics import read_metrics


def plot_learning_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Held-out greedy accuracy (and sampled accuracy, pass@k) vs rollouts, plus training reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/greedy_acc" in r]
    # RL curve: from the evaluation that opens the RL stage onwards (SFT evals all sit at 0 rollouts)
    opening = [i for i, r in enumerate(evals) if r.get("eval_point") == "before_rl"]
    sft_evals, evals = (evals[: opening[0]], evals[opening[0]:]) if opening else ([], evals)
    train = [r for r in rows if "reward/mean" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("eval/greedy_acc", "greedy"), ("eval/sampled_acc", "sampled"), ("eval/pass_at_k", "pass@k")):
        pts = [(r.get("rollouts", 0), r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", ms=3, label=label)
    title = "Held-out accuracy during RL"
    if sft_evals:
        title += f" (before SFT: greedy {sft_evals[0]['eval/greedy_acc']:.2f})"
    ax1.set(xlabel="RL rollouts (responses sampled)", ylabel="held-out accuracy", title=title, ylim=(0, 1))
    ax1.legend()
    ax1.grid(alpha=0.3)
    if train:
        ax2.plot([r.get("rollouts", 0) for r in train], [r["reward/mean"] for r in train], lw=1)
    ax2.set(xlabel="RL rollouts", ylabel="mean reward of fresh rollouts", title="Training reward", ylim=(0, 1))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
