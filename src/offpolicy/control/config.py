"""Typed config of a control run: one YAML recipe, ``key.sub=value`` overrides, unknown keys rejected.

A recipe has four sections::

    algo: sac                # a registered algorithm (offpolicy.control.ALGOS)
    env: {id: Pendulum-v1}   # EnvConfig
    run: {total_steps: 20000, seed: 0}   # RunConfig
    hp: {gamma: 0.99}        # the algorithm's own hyperparameters (its ``Config`` class)

``hp`` is validated against the chosen algorithm's config, so ``hp.gama=0.9`` fails naming ``hp.gama``.
YAML loading and override parsing are the shared helpers of :mod:`offpolicy.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from offpolicy.config import ConfigError, read_recipe

__all__ = ["ConfigError", "ControlConfig", "EnvConfig", "RunConfig", "Strict", "load_control_config"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(Strict):
    id: str = "Pendulum-v1"  # any gymnasium id with a Box action space (Pendulum-v1, HalfCheetah-v5, Hopper-v5, ...)
    num_envs: int = Field(1, ge=1)  # environments stepped together (one transition each per env step)
    max_episode_steps: int | None = None  # overrides the id's time limit (truncation, never termination)
    reward_scale: float = 1.0  # rewards are multiplied by this before they reach the learner (logged returns are raw)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to gymnasium.make


class RunConfig(Strict):
    out_dir: str = "runs/control"  # config.yaml, metrics.jsonl, checkpoints/, returns.png
    seed: int = 0  # seeds torch, network init and the per-episode environment resets
    total_steps: int = Field(20_000, ge=1)  # environment steps (summed over the vectorised envs)
    threads: int = 1  # torch intra-op threads
    log_every: int = 1000  # env steps between training-metric records
    eval_every: int = 0  # env steps between deterministic evaluations (0 = none)
    eval_episodes: int = 5  # episodes per evaluation
    checkpoint_every: int = 0  # env steps between checkpoints (0 = only the final one)
    resume: bool = False  # continue from out_dir/checkpoints/latest if it exists (exact on CPU)
    progress: bool = True  # rich progress bar


class ControlConfig(Strict):
    algo: str = "sac"  # offpolicy.control.ALGOS key
    env: EnvConfig = Field(default_factory=EnvConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    hp: dict[str, Any] = Field(default_factory=dict)  # validated by the algorithm's Config (see hyperparams())

    def hyperparams(self) -> BaseModel:
        """``hp`` validated against the algorithm's own Config; an unknown key is named ``hp.<key>``."""
        from offpolicy.control import ALGOS

        if self.algo not in ALGOS:
            raise ConfigError(f"algo: unknown algorithm {self.algo!r}; valid: {sorted(ALGOS)}")
        try:
            return ALGOS[self.algo].Config.model_validate(self.hp)
        except ValidationError as e:
            raise ConfigError(_describe(e, prefix="hp", algo=self.algo)) from None


def _describe(err: ValidationError, prefix: str = "", algo: str = "", path=None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key" + (f" for algo {algo!r}" if algo else ""))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    where = f" in {path}" if path else ""
    return f"invalid control config{where}: " + "; ".join(lines)


def load_control_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ControlConfig:
    """Read a YAML recipe (or defaults), apply ``key=value`` overrides, validate (hp included)."""
    data = read_recipe(path, overrides)
    try:
        cfg = ControlConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path=path)) from None
    cfg.hyperparams()  # fail now, not after the environment is built
    return cfg


def dump_control_config(cfg: ControlConfig, path: str | Path) -> None:
    data = cfg.model_dump(mode="json")
    data["hp"] = cfg.hyperparams().model_dump(mode="json")  # the resolved defaults, for the record
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
