"""``offpolicy control train | eval | collect`` — the control command line (a typer sub-app).

The main CLI mounts it with ``app.add_typer(control_app, name="control")`` where
``from offpolicy.control.cli import app as control_app``. gymnasium is imported only when a command runs.
Bad input ends with one message and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Off-policy control (SAC, TD3, DSAC-T, ...) on gymnasium environments.")

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, ImportError)


def _fail(err: BaseException, debug: bool) -> None:
    if debug:
        raise err
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe (recipes/control/*.yaml)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. hp.gamma=0.98"),
    resume: bool = typer.Option(False, "--resume", help="continue from run.out_dir/checkpoints/latest"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Train an agent; writes config.yaml, metrics.jsonl, returns.png, checkpoints/ and summary.json."""
    from offpolicy.control.config import load_control_config
    from offpolicy.control.loop import train as run_train

    try:
        cfg = load_control_config(recipe, [*(overrides or []), *(["run.resume=true"] if resume else [])])
        summary = run_train(cfg)
    except USER_ERRORS as e:
        _fail(e, debug)
    typer.echo(json.dumps(summary))


@app.command("eval")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="a checkpoint folder, or a run's checkpoints/ folder (latest)"),
    episodes: int = typer.Option(10, "--episodes", help="deterministic evaluation episodes"),
    seed: int = typer.Option(0, "--seed"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Mean and std of the undiscounted return of the checkpoint's deterministic policy."""
    try:
        result = evaluate_checkpoint(checkpoint, episodes, seed)
    except USER_ERRORS as e:
        _fail(e, debug)
    typer.echo(json.dumps(result))


@app.command()
def collect(
    out: Path = typer.Argument(..., help="dataset to write (JSON lines)"),
    source: List[str] = typer.Option(..., "--source", help="'random:EPISODES' or 'CHECKPOINT:EPISODES'; repeatable"),
    env: Optional[str] = typer.Option(None, "--env", help="gymnasium id (needed when every source is random)"),
    seed: int = typer.Option(0, "--seed"),
    deterministic: bool = typer.Option(False, "--deterministic", help="checkpoint policies act by their mode"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Write an offline dataset from random and trained policies (D4RL-like; behaviour log-probs where known)."""
    from offpolicy.control.dataset import collect as run_collect

    try:
        sources = []
        for s in source:
            path, _, episodes = s.rpartition(":")
            if not path or not episodes.isdigit():
                raise ValueError(f"--source {s!r} must look like random:10 or runs/x/checkpoints:10")
            sources.append((path, int(episodes)))
        result = run_collect(sources, out, env_id=env, seed=seed, deterministic=deterministic)
    except USER_ERRORS as e:
        _fail(e, debug)
    typer.echo(json.dumps(result))


def load_agent(checkpoint: str | Path):
    """(agent, config) from a checkpoint written by ``train``."""
    import yaml

    from offpolicy.control import checkpoint as ckpt
    from offpolicy.control.config import ControlConfig
    from offpolicy.control.envs import make_env
    from offpolicy.control.loop import build_agent, load_agent_state

    tensors, meta = ckpt.load(checkpoint)
    cfg = ControlConfig.model_validate(yaml.safe_load(meta["config"]))
    env = make_env(cfg.env)
    obs_dim, act_dim = int(env.observation_space.shape[0]), int(env.action_space.shape[0])
    agent = build_agent(cfg, obs_dim, act_dim)
    load_agent_state(agent, tensors, meta["agent"])
    return agent, cfg


def evaluate_checkpoint(checkpoint: str | Path, episodes: int, seed: int = 0) -> dict:
    import statistics

    import torch

    from offpolicy.control.envs import evaluate

    agent, cfg = load_agent(checkpoint)
    with torch.no_grad():
        rets = evaluate(lambda o: agent.act(o, deterministic=True), cfg.env, episodes, seed)
    return {"env": cfg.env.id, "algo": cfg.algo, "episodes": episodes, "return_mean": statistics.fmean(rets),
            "return_std": statistics.pstdev(rets)}


def main() -> None:  # pragma: no cover
    app()
