"""The pieces the sync, async and offline RL loops share, in the order a step uses them.

``build_rl`` (learner, buffer, write-ahead log) → ``collect`` (new groups made durable) →
``store`` (into the buffer) → ``learn`` (``updates_per_step`` updates on groups drawn from the buffer)
→ ``end_step`` (log, evaluate, checkpoint). A loop only decides where groups come from
and when the engine's weights change.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from offpolicy.config import ConfigError
from offpolicy.data.buffer import Group, ReplayBuffer
from offpolicy.data.wal import RolloutWAL
from offpolicy.experience import Experience, collate, write_experiences
from offpolicy.policy.model import Policy
from offpolicy.report.metrics import to_floats
from offpolicy.rollout.engines import SamplingParams
from offpolicy.rollout.workflows import RolloutStats
from offpolicy.train import context
from offpolicy.train.context import Run, current_rss_mb
from offpolicy.train.learner import Learner


@dataclass
class RLParts:
    learner: Learner
    buffer: ReplayBuffer
    wal: RolloutWAL
    sampling: SamplingParams
    snapshots: "WeightSnapshots | None"  # trainer weights of recent versions (decoupled correction)
    staleness: Counter = field(default_factory=Counter)  # trained tokens per staleness, -> staleness.json


def build_rl(run: Run) -> RLParts:
    cfg, rl = run.cfg, run.cfg.rl
    learner = Learner(run.policy, rl, total_updates=rl.steps * rl.updates_per_step,
                      temperature=cfg.sampling.temperature, max_len=cfg.sampling.max_new_tokens, seed=cfg.run.seed,
                      device=cfg.run.device, dtype=cfg.run.dtype)
    try:
        buffer = ReplayBuffer(rl.buffer.capacity, rl.buffer.sampling, rl.buffer.max_staleness, rl.buffer.max_uses,
                              seed=cfg.run.seed, sampling_params=rl.buffer.sampling_params)
    except ValueError as e:
        raise ConfigError(f"rl.{e}") from None
    snapshots = WeightSnapshots(run.policy, rl.buffer.max_staleness) if learner.needs_behavior_train_logp else None
    parts = RLParts(learner, buffer, RolloutWAL(run.out), sampling_params(cfg), snapshots)
    saved = run.state["stage_state"]
    if saved:
        learner.load_state_dict(saved["learner"])
        buffer.load_state_dict(saved["buffer"])
        parts.staleness = Counter({int(k): v for k, v in saved.get("staleness", {}).items()})
    if snapshots is not None:
        snapshots.record(learner.version, run.policy)
    return parts


def sampling_params(cfg) -> SamplingParams:
    return SamplingParams(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p)


# ---- 1. collected groups -> write-ahead log -> buffer ------------------------------------------
def collect(run: Run, parts: RLParts, groups: list[list[Experience]], stats: dict[str, Any], *,
            step: int, chunk: int = 0) -> None:
    """Make newly generated groups durable: the trainer's log-probs at the behaviour version where the
    decoupled correction needs them, then the write-ahead log — before anything learns from them."""
    if parts.snapshots is not None:
        parts.snapshots.attach_train_logprobs(groups, run.cfg.sampling.temperature)
    parts.wal.append(step, chunk, groups, stats)


def store(run: Run, parts: RLParts, groups: list[list[Experience]], stats: dict[str, Any]) -> None:
    """Hand collected groups to the learner's side: experiences.jsonl, counters, then the buffer. Groups
    whose rewards are all equal carry no group-relative signal and are counted, not stored
    (``rl.drop_uninformative_groups``)."""
    if run.cfg.run.save_experiences:
        write_experiences(run.out / "experiences.jsonl", [e for g in groups for e in g])
    run.state["rollouts"] += stats["n"]
    run.state["rl_tokens"] += stats["tokens"]
    run.state["rl_gen_seconds"] += stats["seconds"]
    keep_all = not run.cfg.rl.drop_uninformative_groups
    for g in groups:
        if keep_all or len({e.reward for e in g}) > 1:
            parts.buffer.add(Group.of(g))


def rollout_metrics(groups: list[list[Experience]], stats: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What the step's new groups looked like. ``reward/mean`` counts the policy's own responses only;
    expert traces mixed into groups are reported apart (``reward/expert_mean``)."""
    own = torch.tensor([e.reward for g in groups for e in g if e.source == "policy"])
    expert = [e.reward for g in groups for e in g if e.source == "expert"]
    n = max(stats["n"], 1)
    out = {
        "reward/mean": own.mean() if len(own) else torch.tensor(float("nan")),
        "reward/std": own.std() if len(own) > 1 else torch.tensor(0.0),
        "rollout/tokens_per_s": torch.tensor(stats["tokens"] / max(stats["seconds"], 1e-9)),
        "rollout/response_len": torch.tensor(stats["tokens"] / n),
        "rollout/truncated_frac": torch.tensor(stats["truncated"] / n),
        "rollout/informative_group_frac": torch.tensor(
            sum(len({e.reward for e in g}) > 1 for g in groups) / max(len(groups), 1)),
        "reward/errors": torch.tensor(float(stats["reward_errors"] + stats["reward_timeouts"])),
    }
    if expert:
        out["reward/expert_mean"] = torch.tensor(sum(expert) / len(expert))
    return out


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Several requests' :class:`RolloutStats` (as dicts) summed into one step's."""
    keys = asdict(RolloutStats(0, 0, 0.0, 0.0, 0, 0, 0)).keys()
    return {k: sum(s[k] for s in stats) for k in keys}


# ---- 2. the updates of one step ---------------------------------------------------------------
def learn(run: Run, parts: RLParts,
          after_update: Callable[[list[Group]], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """``rl.updates_per_step`` updates, each on ``rl.groups_per_update`` groups drawn from the buffer
    (fewer if it holds fewer; none if it is empty; fewer once a batch's ESS is below ``rl.min_ess``).
    ``after_update(groups)`` runs after each optimizer
    step with the groups it learned from (the async loop records them and broadcasts weights there)."""
    rl, learner, buffer = run.cfg.rl, parts.learner, parts.buffer
    per_update = []
    for _ in range(rl.updates_per_step):
        chosen = buffer.sample(rl.groups_per_update, learner.version)
        if not chosen:
            break
        batch = collate([e for g in chosen for e in g.experiences], run.tokenizer.pad_id)
        count_staleness(parts.staleness, batch.versions, batch.mask, learner.version, rl.buffer.max_staleness)
        per_update.append(learner.update(batch))
        if parts.snapshots is not None:
            parts.snapshots.record(learner.version, run.policy)
        if after_update is not None:
            after_update(chosen)
        if reuse_spent(rl.min_ess, per_update[-1]):
            break
    learner.end_rollout_step()
    buffer.sampling_params.update(learner.sampler_params())  # a controller may drive the data mix (ReMix)
    return per_update


def reuse_spent(min_ess: float | None, metrics: dict[str, torch.Tensor]) -> bool:
    """Whether the step's remaining updates are skipped: the last batch's sequence-level ESS of the
    behaviour -> current weights fell below ``min_ess``, so the stored groups no longer describe the
    policy well (reuse adapts to how far the updates moved it, not to a fixed count)."""
    return min_ess is not None and "offpolicy/ess" in metrics and float(metrics["offpolicy/ess"]) < min_ess


def count_staleness(hist: Counter, versions: torch.Tensor, mask: torch.Tensor, version: int,
                    bound: int | None) -> None:
    """Add the batch's trained tokens to ``hist`` by staleness (learner version − token version), and
    refuse a token past the bound: the buffer's eviction must have removed it (an invariant, not a filter)."""
    stale = (version - versions)[mask > 0]  # (N,)
    if bound is not None and stale.numel() and int(stale.max()) > bound:
        raise RuntimeError(f"a token {int(stale.max())} versions stale reached the learner (bound {bound})")
    hist.update(dict(zip(*[t.tolist() for t in torch.unique(stale, return_counts=True)])))


# ---- 3. log, evaluate, checkpoint -------------------------------------------------------------
def end_step(run: Run, parts: RLParts, step: int, metrics: dict[str, torch.Tensor | float]) -> None:
    """Log step ``step`` (0-based) with the learner/buffer counters, then evaluate and checkpoint on schedule."""
    cfg, rl, learner, buffer = run.cfg, run.cfg.rl, parts.learner, parts.buffer
    metrics = to_floats({
        **metrics,
        "buffer/size": torch.tensor(float(len(buffer))),
        "buffer/evicted_stale": torch.tensor(float(buffer.stats.evicted_stale)),
        "train/version": torch.tensor(float(learner.version)),
        "mem/rss_mb": torch.tensor(current_rss_mb()),
    })
    run.state["step"] = step + 1
    run.state["version"] = learner.version
    run.log.log({"stage": "rl", "step": step + 1, "rollouts": run.state["rollouts"],
                 "time/elapsed_s": run.elapsed(), **metrics})
    run.console.advance(metrics)
    if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < rl.steps:
        context.record_eval(run, f"rl_step_{step + 1}")
    if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
        save(run, parts)


def save(run: Run, parts: RLParts) -> None:
    """Checkpoint the RL stage, then drop the write-ahead log entries the checkpoint covers."""
    write_staleness(run, parts)
    context.checkpoint(run, {"learner": parts.learner.state_dict(), "buffer": parts.buffer.state_dict(),
                             "staleness": {str(k): v for k, v in parts.staleness.items()}})
    parts.wal.retain_from(run.state["step"])
    parts.wal.sync()


def write_staleness(run: Run, parts: RLParts) -> None:
    """``staleness.json``: how many trained tokens were how many versions stale, over the whole run."""
    hist = {str(k): parts.staleness[k] for k in sorted(parts.staleness)}
    (run.out / "staleness.json").write_text(json.dumps({"tokens_by_staleness": hist}, indent=1))


CUMULATIVE = ("train/skipped_",)  # counters over the whole stage: a step reports its last value, not a mean


def step_metrics(update_metrics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average each metric over the updates of one step (keys missing from some updates are skipped);
    cumulative counters keep the step's last value."""
    if not update_metrics:
        return {"train/updates": torch.tensor(0.0)}
    keys = set.intersection(*(set(m) for m in update_metrics))
    out = {k: update_metrics[-1][k].float() if k.startswith(CUMULATIVE) else
           torch.stack([m[k].float() for m in update_metrics]).mean() for k in sorted(keys)}
    out["train/updates"] = torch.tensor(float(len(update_metrics)))
    return out


# ---- the decoupled correction's snapshots ----------------------------------------------------
class WeightSnapshots:
    """The trainer's weights at recent versions, so the decoupled correction gets the trainer's log-probs
    at each token's behaviour version (snapshot version tracking, arXiv:2605.12070): train–inference
    mismatch (these vs the engine's) is then reported apart from staleness (current vs these).

    Holds versions ``>= newest - keep`` (``keep`` = the staleness bound; all of them when unbounded is
    not allowed: a None bound keeps the last 64). Asking for an older one is an error, not a guess.
    """

    def __init__(self, policy: Policy, keep: int | None) -> None:
        self.keep = 64 if keep is None else keep
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.scratch = policy.copy()  # a frozen model the snapshots are loaded into

    def record(self, version: int, policy: Policy) -> None:
        self.weights[version] = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
        for old in [v for v in self.weights if v < version - self.keep]:
            del self.weights[old]

    @torch.no_grad()
    def attach_train_logprobs(self, groups: list[list[Experience]], temperature: float) -> None:
        """Set ``behavior_train_logprobs`` of every policy response from the snapshot of each token's version."""
        rows = [e for g in groups for e in g if e.behavior_logprobs is not None]
        if not rows:
            return
        batch = collate(rows, self.scratch.tokenizer.pad_id)
        result = torch.zeros(batch.mask.shape)  # (B, T)
        for version in torch.unique(batch.versions[batch.mask > 0]).tolist():
            if version not in self.weights:
                raise RuntimeError(f"no trainer snapshot of policy version {version} (kept: {sorted(self.weights)})")
            self.scratch.model.load_state_dict(self.weights[version])
            logp, _ = self.scratch.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                                     temperature)
            result = torch.where(batch.versions == version, logp, result)
        for e, row in zip(rows, result):
            e.behavior_train_logprobs = row[: len(e.response_ids)].tolist()
