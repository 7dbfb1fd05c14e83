"""Shared fixtures: one torch thread, no hub access, a tiny policy and tiny run configs.

The machine has 2 cores shared with running experiments, so every test uses one
thread, models with d_model <= 64 and a handful of steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds loopback only (127.0.0.1), never eth0
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# A reward with signal for an untrained model: the fraction of digit characters in the completion.
# Group-relative advantages are then non-zero, so RL updates really move the parameters.
REWARD_MODULE = '''
def digit_fraction(prompt, completion, answer):
    return sum(c.isdigit() for c in completion) / max(1, len(completion))
'''

# Settings of a run that takes about a second on one thread (d_model=32, a few prompts, tiny evals).
TINY_RUN = [
    "run.progress=false", "run.threads=1", "run.checkpoint_every=0",
    "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "policy.max_len=32",
    "sampling.max_new_tokens=6",
    "eval.n_problems=6", "eval.samples=2", "eval.every=0",
    "sft.batch_size=8", "sft.optim.warmup_steps=0",
    "rl.prompts_per_step=4", "rl.group_size=4", "rl.groups_per_update=4", "rl.optim.lr=1e-2",
    "task.name=addition",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Runs set ``torch.set_num_threads(run.threads)``: put one thread back after every test."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def tiny_policy():
    """A fresh tiny GPT (d_model=32, 2 layers) with the character tokenizer."""
    from offpolicy.policy.model import build_tiny
    from offpolicy.policy.tiny import TinyConfig

    return build_tiny(TinyConfig(d_model=32, n_layers=2, n_heads=2, max_len=48), seed=0)


@pytest.fixture
def reward_spec(tmp_path, monkeypatch) -> str:
    """``"module:function"`` of the digit-fraction reward, importable for the duration of the test."""
    mod_dir = tmp_path / "reward_mod"
    mod_dir.mkdir()
    (mod_dir / "offpolicy_test_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(mod_dir))
    return "offpolicy_test_reward:digit_fraction"


@pytest.fixture
def tiny_overrides(tmp_path):
    """``tiny_overrides(out_dir, *extra)``: the override list of a ~1 s run writing into ``out_dir``."""

    def make(out_dir, *extra: str) -> list[str]:
        return [*TINY_RUN, f"run.out_dir={out_dir}", *extra]

    return make


@pytest.fixture
def tiny_config(tiny_overrides):
    """``tiny_config(out_dir, *extra)``: a validated :class:`~offpolicy.config.Config` for a ~1 s run."""
    from offpolicy.config import load_config

    def make(out_dir, *extra: str):
        return load_config(None, tiny_overrides(out_dir, *extra))

    return make
