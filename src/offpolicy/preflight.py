"""Everything a run can check before it writes a byte: ``preflight(cfg)``.

The config's own validators check each key's range and the rules tying two keys
together; this module checks what needs the outside world: the output folder,
the checkpoint in ``policy.init``, the task and its data files, the reward
function, whether the prompts fit the context, the loss hyperparameters and the
offline experience file. It builds no optimizer, samples nothing from a model
and writes nothing, so a typo costs a second, not an SFT stage. Every failure is
a :class:`~offpolicy.config.ConfigError` (or a
:class:`~offpolicy.policy.model.CheckpointError`) naming the key, file or task.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any

from offpolicy.config import Config, ConfigError

TINY_SIZE_KEYS = ("d_model", "n_layers", "n_heads", "max_len")  # policy.* keys that shape a fresh tiny model
N_PROBE_PROMPTS = 256  # train prompts drawn to measure the longest prompt (a file task with fewer rows: all seen)
N_PROBE_REWARDS = 4  # reference answers scored to check that the reward runs and returns a number


def preflight(cfg: Config, *, resume: bool = False) -> None:
    """Raise ``ConfigError`` / ``CheckpointError`` naming the culprit if ``cfg`` cannot run; write nothing."""
    check_out_dir(Path(cfg.run.out_dir), resume)
    if cfg.rl.steps:
        from offpolicy.train.learner import validate_rl_config

        validate_rl_config(cfg.rl)
        check_loss_params(cfg.rl.loss, cfg.rl.loss_params)
    max_len, tokenizer = check_policy_init(cfg)
    task = make_task_checked(cfg)
    seed = cfg.run.seed
    try:
        eval_problems = task.problems(cfg.eval.n_problems, split="eval", seed=seed + 10_007)
        train_problems = task.problems(N_PROBE_PROMPTS, split="train", seed=seed)
    except ValueError as e:
        raise ConfigError(f"{e} (eval.n_problems={cfg.eval.n_problems})") from None
    if tokenizer is not None:
        check_context(cfg, train_problems + eval_problems, tokenizer, max_len)
    if cfg.sft.steps or cfg.rl.expert_per_group:
        key = "sft.steps" if cfg.sft.steps else "rl.expert_per_group"
        missing = next((p for p in train_problems if p.solution is None), None)
        if missing is not None:
            raise ConfigError(f"{key}: task {cfg.task.name!r} has no expert solution for problem {missing.id!r} "
                              f"({missing.meta.get('source', 'no source')}); SFT and expert mixing need one per problem")
    check_reward(cfg, task, train_problems[:N_PROBE_REWARDS])
    if cfg.run.mode == "offline":
        check_offline(cfg)


# ---- out_dir ----------------------------------------------------------------------------------
def check_out_dir(out: Path, resume: bool) -> None:
    """``out`` can be created and written (nothing is created here), and ``--resume`` has a run to resume."""
    key = f"run.out_dir={out}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}: exists and is a file, not a folder")
    node = out
    while not node.exists():  # the nearest existing ancestor must be a folder we can write into
        node = node.parent
    if not node.is_dir():
        raise ConfigError(f"{key}: {node} is a file, so the folder cannot be created")
    if not os.access(node, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {node} is not writable")
    if not resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"{key} already holds a run; pass --resume to continue it, or choose another out_dir")
    if resume and not any((out / name).exists() for name in ("checkpoints", "config.yaml", "metrics.jsonl")):
        raise ConfigError(f"--resume: {key} holds no run to resume (no checkpoints/, config.yaml or metrics.jsonl); "
                          "drop --resume to start a new run")


# ---- policy.init ------------------------------------------------------------------------------
def check_policy_init(cfg: Config) -> tuple[int | None, Any]:
    """``(max_len, tokenizer)`` of the policy the run will start from; (None, None) for Hugging Face models.

    A checkpoint in ``policy.init`` must be a tiny checkpoint whose weights fit its config, or a
    Hugging Face folder with weights. Tiny size keys set in the recipe must agree with it: the
    checkpoint's shape wins, and a differing value would be ignored yet recorded in config.yaml.
    """
    from offpolicy.policy.tokenizer import CharTokenizer

    p = cfg.policy
    if p.init == "tiny":
        return p.max_len, CharTokenizer()
    explicit = [k for k in TINY_SIZE_KEYS if k in p.model_fields_set]
    path = Path(p.init)
    if not path.is_dir():
        if explicit:
            raise ConfigError(f"policy.{explicit[0]}: sizes a fresh tiny model, but policy.init={p.init!r} is a "
                              "Hugging Face model; remove the key")
        if path.exists() or p.init.startswith((".", "/")):
            from offpolicy.policy.model import load_policy

            load_policy(p.init)  # raises CheckpointError naming the file
        return None, None  # a hub id: checked when it is loaded
    from offpolicy.policy.model import CheckpointError, load_policy

    config_file = path / "config.json"
    try:
        shape = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"policy.init: {config_file} is not valid JSON ({e})") from None
    if not isinstance(shape, dict):
        raise CheckpointError(f"policy.init: {config_file} must hold a JSON object")
    if shape.get("model_type") != "offpolicy-tiny":
        if explicit:
            raise ConfigError(f"policy.{explicit[0]}: sizes a fresh tiny model, but policy.init={p.init} is a "
                              "Hugging Face checkpoint; remove the key")
        if not config_file.is_file():
            raise CheckpointError(f"policy.init: {path} has no config.json: not a tiny or Hugging Face checkpoint")
        if "model_type" not in shape:
            raise CheckpointError(f"policy.init: {config_file} has no model_type: not a checkpoint config")
        weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        if not any((path / w).exists() for w in weights):
            raise CheckpointError(f"policy.init: {path} holds no weights (none of {', '.join(weights)})")
        return None, None
    for key in explicit:
        if shape.get(key) != getattr(p, key):
            raise ConfigError(f"policy.{key}={getattr(p, key)} differs from {config_file} ({key}={shape.get(key)}); "
                              f"a checkpoint keeps its shape: remove policy.{key} or set it to {shape.get(key)}")
    try:
        policy = load_policy(path)  # the tiny model is small: loading checks that the weights fit
    except CheckpointError as e:
        raise CheckpointError(f"policy.init: {e}") from None
    return policy.model.cfg.max_len, policy.tokenizer


# ---- task, context and reward -----------------------------------------------------------------
def make_task_checked(cfg: Config):
    from offpolicy.data.tasks import make_task

    try:
        return make_task(cfg.task.name, **cfg.task.params)
    except KeyError as e:
        raise ConfigError(f"task.name: {e.args[0] if e.args else e}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"task.params: {e}") from None


def check_context(cfg: Config, problems: list, tokenizer, max_len: int) -> None:
    """Longest prompt + ``sampling.max_new_tokens`` fits the context, and so does every expert trace SFT trains on."""
    new = cfg.sampling.max_new_tokens
    longest = max(problems, key=lambda p: len(p.prompt))
    n = len(tokenizer.encode(longest.prompt))
    where = longest.meta.get("source") or f"problem {longest.id!r}"
    if n + new > max_len:
        raise ConfigError(f"the prompt of {where} has {n} tokens; with sampling.max_new_tokens={new} it needs a "
                          f"context of {n + new} but the model's max_len is {max_len} (policy.max_len)")
    if cfg.sft.steps or cfg.rl.expert_per_group:
        for p in problems:
            if p.solution is not None and len(tokenizer.encode(p.prompt + p.solution)) + 1 > max_len:
                raise ConfigError(f"the expert trace (prompt + solution + EOS) of "
                                  f"{p.meta.get('source') or repr(p.id)} is longer than the model's max_len={max_len}")


def check_reward(cfg: Config, task, problems: list) -> None:
    """The reward (``task.reward`` or the task's verifier) runs on reference answers and returns a finite number."""
    from offpolicy.data.rewards import as_reward, load_reward_fn

    if cfg.task.reward is not None:
        key = f"task.reward={cfg.task.reward!r}"
        try:
            user_fn = load_reward_fn(cfg.task.reward)
        except ValueError as e:
            raise ConfigError(f"task.reward: {e}") from None

        def score(problem, completion):
            return user_fn(problem.prompt, completion, problem.answer)
    else:
        key, score = f"task {cfg.task.name!r}: its verifier", task.score
    for p in problems:
        completion = p.solution if p.solution is not None else p.answer
        where = f"{key} on {p.meta.get('source') or repr(p.id)}"
        value = _call_with_timeout(score, (p, completion), cfg.task.reward_timeout_s, where)
        try:
            as_reward(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None


def _call_with_timeout(fn, args: tuple, timeout_s: float | None, key: str) -> Any:
    """``fn(*args)``; its exception becomes a ConfigError naming ``key``; past ``timeout_s`` it is one too."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001 -- user code: any exception is the user's error to report
            box["error"] = e

    if timeout_s is None:
        call()
    else:
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise ConfigError(f"{key}: did not return within task.reward_timeout_s={timeout_s} on a reference answer")
    if "error" in box:
        e = box["error"]
        raise ConfigError(f"{key}: raised {type(e).__name__}: {e}") from None
    return box["value"]


# ---- rl.loss_params ---------------------------------------------------------------------------
EPS_CLIPS = ("clip_low", "clip_high", "clip_low_prime", "clip_high_prime")  # distances from 1: ratio in [1 - l, 1 + h]


def check_loss_params(loss: str, params: dict[str, Any]) -> None:
    """Generic rules for clip bounds, so a loss's own check does not first fire after SFT and an evaluation.

    * every numeric hyperparameter named like a bound (``clip``, ``low``, ``high``, ``cap``, ``eps``) is >= 0;
    * ``clip_low`` / ``clip_low_prime`` are distances below 1, so at most 1;
    * other ``*low*`` / ``*high*`` pairs (``pos_low``/``pos_high``, ``low_start``/``high_start``) are absolute
      bounds: low <= high.
    """
    from offpolicy.objectives import POLICY_LOSSES

    sig = inspect.signature(POLICY_LOSSES[loss]).parameters
    value = {n: params.get(n, p.default) for n, p in sig.items() if p.default is not inspect.Parameter.empty}

    def numeric(name: str) -> bool:
        return isinstance(value.get(name), (int, float)) and not isinstance(value.get(name), bool)

    for name in params:
        if not numeric(name) and isinstance(sig[name].default, (int, float)) and params[name] is not None:
            raise ConfigError(f"rl.loss_params.{name}={params[name]!r}: must be a number (loss {loss!r})")
        if numeric(name) and any(w in name for w in ("clip", "low", "high", "cap", "eps")) and params[name] < 0:
            raise ConfigError(f"rl.loss_params.{name}={params[name]}: must be >= 0 (loss {loss!r})")
    for name in ("clip_low", "clip_low_prime"):
        if name in params and numeric(name) and value[name] > 1:
            high = name.replace("low", "high")
            raise ConfigError(f"rl.loss_params.{name}={value[name]}: clip bounds are distances from 1 (the ratio "
                              f"is kept in [1 - {name}, 1 + {high}]), so {name} must be in [0, 1]; reversed or "
                              f"absolute bounds? (loss {loss!r})")
    for low in value:
        high = low.replace("low", "high")
        if low in EPS_CLIPS or "low" not in low or high not in value or not (numeric(low) and numeric(high)):
            continue
        if (low in params or high in params) and value[low] > value[high]:
            raise ConfigError(f"rl.loss_params: {low}={value[low]} > {high}={value[high]}: reversed bounds "
                              f"(loss {loss!r})")


# ---- offline experiences ----------------------------------------------------------------------
def check_offline(cfg: Config) -> None:
    """``offline.path`` exists, reads as experiences, and carries behaviour log-probs if the loss needs them."""
    path = Path(cfg.offline.path)
    if not path.is_file():
        raise ConfigError(f"offline.path={path}: no such file")
    if path.suffix != ".jsonl":
        return  # parquet logs are read by the offline loop
    from offpolicy.experience import read_experiences

    logs = read_experiences(path)  # raises ValueError naming file:line
    if cfg.rl.steps:
        from offpolicy.objectives import POLICY_LOSSES

        needs = POLICY_LOSSES[cfg.rl.loss].needs
        if "behavior_logp" in needs or cfg.rl.old_logp == "behavior":
            missing = next((i for i, e in enumerate(logs) if e.behavior_logprobs is None), None)
            if missing is not None:
                why = f"rl.loss={cfg.rl.loss!r}" if "behavior_logp" in needs else "rl.old_logp=behavior"
                raise ConfigError(f"offline.path={path}: experience {missing + 1} has no behavior_logprobs, "
                                  f"which {why} needs (log them with the sampling engine, or pick a loss without)")
