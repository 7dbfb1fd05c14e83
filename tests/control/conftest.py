"""Control tests: gymnasium is needed (the ``dev`` extra installs it); a tiny terminating env for bootstrap tests."""

from __future__ import annotations

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

# Tiny-network settings: a run of a few hundred steps takes about a second on one thread.
TINY_SETTINGS = ["run.progress=false", "run.threads=1", "run.log_every=50", "hp.hidden=[16,16]", "hp.batch_size=16",
        "hp.learning_starts=30", "hp.buffer_size=1000"]


class Line(gym.Env):
    """x starts at 0; action in [-1, 1] moves it; reward = action; terminates when x >= 1.5."""

    observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.1, 0.1))
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x += float(action[0])
        return np.array([self.x], np.float32), float(action[0]), self.x >= 1.5, False, {}


if "offpolicy-test/Line-v0" not in gym.registry:
    gym.register("offpolicy-test/Line-v0", entry_point=Line, max_episode_steps=5)


@pytest.fixture
def tiny() -> list[str]:
    """Overrides for a run with tiny networks (about a second for a few hundred steps)."""
    return list(TINY_SETTINGS)
