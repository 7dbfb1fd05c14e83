"""Typed run configuration: one YAML file describes a run; ``key.sub=value`` overrides it.

Unknown keys and wrong types are errors that name the key (pydantic, ``extra="forbid"``).
The resolved config is written next to the run's outputs as ``config.yaml``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


class TrainingDiverged(ValueError):
    """The numbers of a run stopped being usable (too many non-finite updates, non-finite weights or
    sampling probabilities): the run stops with one ``error:`` line (a ``ValueError``, exit 2); nothing
    non-finite was saved."""


class _YAMLLoader(yaml.SafeLoader):
    """Safe YAML, except that ``3e-4`` is a float: YAML 1.1 wants a dot (``3.0e-4``) and reads it as a string."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a SafeLoader subclass)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class RunConfig(_Strict):
    name: str = "run"  # shown in the console and summary
    out_dir: str = "runs/run"  # where config.yaml, metrics.jsonl, summary.json, checkpoints and plots go
    seed: int = Field(0, ge=0)  # seeds torch, task sampling and the rollout engine
    threads: int = Field(2, ge=1)  # torch intra-op threads (the CPU machine has 2 cores)
    checkpoint_every: int = Field(50, ge=0)  # RL steps between checkpoints (one is always written at the end)
    progress: bool = True  # rich progress bar and tables on the console
    save_experiences: bool = False  # append every RL rollout to experiences.jsonl (for offline RL and `offpolicy ope`)
    mode: Literal["sync", "async", "offline"] = "sync"  # the RL loop: alternate / concurrent Ray workers / a log
    device: str = Field("cpu", pattern=r"^(cpu|mps|cuda(:\d+)?)$")  # the learner's device ("cpu", "cuda", "cuda:1"); engines run where their worker runs
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the learner's parameter dtype
    ray_address: str | None = None  # async mode: join this Ray cluster (`ray start --head`); None = a local one
    loggers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)  # sinks beside metrics.jsonl
    keep_checkpoints: int = Field(2, ge=1)  # newest step checkpoints kept (the named sft / final ones always stay)


class PolicyConfig(_Strict):
    init: str = "tiny"  # "tiny" = fresh built-in model; else a checkpoint folder or Hugging Face id
    d_model: int = Field(160, ge=1)  # tiny model width
    n_layers: int = Field(3, ge=1)  # tiny model depth
    n_heads: int = Field(4, ge=1)  # tiny model attention heads
    max_len: int = Field(64, ge=2)  # tiny model context (prompt + response tokens)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # Hugging Face models only

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "PolicyConfig":
        if self.init == "tiny" and self.d_model % self.n_heads:
            raise ValueError(f"policy.d_model={self.d_model} must be divisible by policy.n_heads={self.n_heads}")
        return self


class TaskConfig(_Strict):
    name: str = "addition"  # a registered task (offpolicy.data.tasks.TASKS)
    params: dict[str, Any] = Field(default_factory=dict)  # passed to the task factory
    reward: str | None = None  # optional "module:function" replacing the task's verifier
    reward_timeout_s: float | None = Field(None, gt=0)  # per-call time limit for the reward (None = no limit)
    reward_isolation: Literal["thread", "process"] = "thread"  # where timed reward calls run: a thread is only abandoned on timeout, a process is killed
    reward_bound: float = Field(1e6, gt=0)  # |reward| above this (or non-finite) is counted as a reward error and scored 0


class SamplingConfig(_Strict):
    max_new_tokens: int = Field(8, ge=1)  # response length limit (tokens)
    temperature: float = Field(1.0, gt=0)  # rollout temperature; the learner scores with the same one
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling (engine only; shows up as train-inference mismatch)


class EvalConfig(_Strict):
    n_problems: int = Field(500, ge=1)  # held-out problems (disjoint from training prompts)
    every: int = Field(25, ge=0)  # RL steps between evaluations
    samples: int = Field(8, ge=0)  # samples per problem for sampled accuracy and pass@k
    temperature: float = Field(1.0, gt=0)  # temperature of the sampled evaluation


class OptimConfig(_Strict):
    lr: float = Field(1e-4, gt=0)  # peak learning rate (AdamW)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm (0 = off)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up, in optimizer steps
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up (step-based, never wall-clock)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # floor of cosine/linear decay as a fraction of lr


class SFTConfig(_Strict):
    steps: int = Field(0, ge=0)  # optimizer steps of supervised fine-tuning on expert solutions (0 = skip the stage)
    batch_size: int = Field(64, ge=1)  # expert traces per step
    eval_every: int = Field(0, ge=0)  # SFT steps between evaluations (0 = only before and after)
    stop_at_accuracy: float | None = None  # end SFT at the first evaluation whose held-out greedy accuracy reaches this
    keep_best: bool = False  # SFT ends on the evaluated weights with the best held-out greedy accuracy, not the last
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, schedule="cosine"))

    @model_validator(mode="after")
    def _stop_needs_evaluations(self) -> "SFTConfig":
        if self.stop_at_accuracy is not None:
            if not 0.0 < self.stop_at_accuracy <= 1.0:
                raise ValueError(f"sft.stop_at_accuracy={self.stop_at_accuracy} must be in (0, 1]")
            if self.eval_every <= 0:
                raise ValueError("sft.stop_at_accuracy needs sft.eval_every > 0 (it is checked at those evaluations)")
        if self.keep_best and (self.eval_every <= 0 or self.steps <= 0):
            raise ValueError(f"sft.keep_best needs sft.steps > 0 and sft.eval_every > 0 (it keeps the best of those "
                             f"evaluations), got steps={self.steps}, eval_every={self.eval_every}")
        return self


class BufferConfig(_Strict):
    capacity: int = Field(4096, ge=1)  # groups kept at most (oldest evicted first, counted)
    sampling: str = "uniform"  # which stored groups an update trains on: fifo, uniform, variance, return_weighted, recent_mix
    sampling_params: dict[str, Any] = Field(default_factory=dict)  # hyperparameters of the sampling strategy
    max_staleness: int | None = Field(4, ge=0)  # groups older than this many policy versions are evicted (counted); None = no bound
    max_uses: int | None = Field(None, ge=1)  # a group retires after this many updates used it (None = no limit)


class RLConfig(_Strict):
    steps: int = Field(0, ge=0)  # rollout steps (0 = skip the stage); each is followed by `updates_per_step` updates
    prompts_per_step: int = Field(128, ge=1)  # prompts sampled per rollout step
    group_size: int = Field(8, ge=1)  # responses per prompt (a group)
    updates_per_step: int = Field(1, ge=1)  # optimizer updates after each rollout step (at most, with min_ess)
    min_ess: float | None = Field(None, gt=0, le=1)  # end a step's updates once a batch's ESS (behaviour -> current) is below this
    groups_per_update: int = Field(128, ge=1)  # groups sampled from the buffer for one update
    loss: str = "ppo_clip"  # a name in POLICY_LOSSES
    loss_params: dict[str, Any] = Field(default_factory=dict)  # hyperparameters of the loss
    advantage: str = "grpo"  # a name in ADVANTAGES
    advantage_params: dict[str, Any] = Field(default_factory=dict)
    aggregation: str | None = None  # a name in AGGREGATIONS (None = the loss's default)
    old_logp: Literal["proximal", "behavior"] = "proximal"  # what `old_logp` is: recomputed, or the engine's
    correction: str | None = None  # a name in CORRECTIONS (train-inference/staleness IS weights)
    correction_params: dict[str, Any] = Field(default_factory=dict)
    kl_coef: float = Field(0.0, ge=0)  # weight of KL(policy || reference) added to the loss (0 = no reference model)
    kl_estimator: str = "k3"  # a name in KL_ESTIMATORS
    drop_uninformative_groups: bool = True  # groups whose rewards are all equal carry no signal: counted, not stored
    skip_zero_rows: bool = True  # skip the forward/backward of rows the loss declares exactly zero (same gradient)
    red_drop: bool = False  # RED-Drop (arXiv:2509.24203): drop surplus negatives per group before advantages
    micro_batch_size: int | None = Field(None, ge=1)  # rows per forward/backward; gradients accumulate to the whole batch's
    max_skipped_steps: int = Field(5, ge=1)  # consecutive updates skipped for a non-finite loss/gradient before the run stops
    expert_per_group: int = Field(0, ge=0)  # expert traces (task solutions) added to every group: LUFFY/CHORD-style mixing
    controllers: dict[str, dict[str, Any]] = Field(default_factory=dict)  # stateful schedules, see train/learner.py
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)


class AsyncConfig(_Strict):
    num_workers: int = Field(1, ge=1)  # rollout workers (Ray actors), each with its own engine and copy of the weights
    num_cpus: int | None = Field(None, ge=1)  # CPUs of the local Ray instance (None = Ray's own count); ignored with run.ray_address
    worker_threads: int = Field(1, ge=1)  # torch threads inside each rollout worker
    groups_per_request: int = Field(16, ge=1)  # prompts (groups) a worker generates per call
    sync_every: int = Field(1, ge=1)  # learner updates between weight broadcasts through Ray's object store
    partial_rollout: bool = False  # swap weights between decode chunks inside a generation (in-flight updates)
    chunk_tokens: int = Field(2, ge=1)  # decode steps per chunk when partial_rollout is on
    replay_schedule: str | None = None  # a recorded schedule.jsonl: reproduce that async run exactly, without Ray


class OfflineConfig(_Strict):
    path: str | None = None  # experiences to learn from (.jsonl as run.save_experiences writes, or .parquet)


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")  # run.mode=async
    offline: OfflineConfig = Field(default_factory=OfflineConfig)  # run.mode=offline

    @model_validator(mode="after")
    def _check(self) -> "Config":
        """Rules that tie two keys together (one key's range is its Field's)."""
        rl, p = self.rl, self.policy
        if rl.steps and rl.group_size < 2:
            if group_relative(rl.advantage, rl.advantage_params):
                raise ValueError(f"rl.group_size=1: the group-relative advantage rl.advantage={rl.advantage!r} "
                                 "gives every response 0 (no learning); use rl.group_size >= 2")
            if rl.drop_uninformative_groups:
                raise ValueError("rl.group_size=1 with rl.drop_uninformative_groups=true drops every group "
                                 "(one reward is always 'all equal'); use rl.group_size >= 2")
        if p.init == "tiny" and self.sampling.max_new_tokens >= p.max_len:
            raise ValueError(f"sampling.max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in "
                             f"the context policy.max_len={p.max_len}")
        if self.run.mode == "offline" and not self.offline.path:
            raise ValueError("run.mode=offline needs offline.path (the experiences to learn from)")
        if rl.min_ess is not None and self.run.mode == "async":
            raise ValueError("rl.min_ess (ending a step's updates early) is not supported with run.mode=async: "
                             "its admission control plans exactly rl.updates_per_step updates per step")
        if self.run.ray_address is not None and self.run.mode != "async":
            raise ValueError(f"run.ray_address is only used with run.mode=async (got run.mode={self.run.mode})")
        return self


# Advantages that compare a response with the others of its group: with one response per group they are 0.
GROUP_RELATIVE = ("grpo", "dr_grpo", "rloo", "opmd_logavgexp", "asymre", "tempo", "optimal_baseline")


def group_relative(advantage: str, params: dict[str, Any]) -> bool:
    if advantage == "reinforce_pp":
        return params.get("baseline", "group") == "group"
    return advantage in GROUP_RELATIVE


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """``(":line L", "what went wrong")`` of a YAML error, on one line (PyYAML's own message spans several)."""
    mark = getattr(e, "problem_mark", None)  # MarkedYAMLError has it; the base class does not
    where = f":line {mark.line + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    return where, problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rl.optim.lr=3e-4"`` -> (["rl", "optim", "lr"], 0.0003); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({_yaml_problem(e)[1]})") from None
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def read_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A YAML recipe (or nothing) as a dict with ``key=value`` overrides applied, not yet validated.
    Shared by :func:`load_config` and ``offpolicy.control``'s config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"recipe {p} does not exist")
        try:
            data = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            where, problem = _yaml_problem(e)
            raise ConfigError(f"recipe {p}{where} is not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p} must be a mapping of sections, got {type(data).__name__}")
    for text in overrides:
        apply_override(data, *parse_override(text))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or defaults), apply ``key=value`` overrides, validate."""
    data = read_recipe(path, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, path)) from None


def describe_validation_error(err: ValidationError, path) -> str:
    """One line per problem, each naming its key."""
    where = f" in {path}" if path else ""
    lines = [f"invalid config{where}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key or '(top level)'}: unknown key")
        elif e["type"] == "value_error":  # our own validators: the message names its keys
            lines.append(f"  {e['ctx']['error'] if 'ctx' in e else e['msg']}")
        else:
            key = key or "(top level)"
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    if len(lines) == 2:  # one problem: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
