"""The offline loop (``run.mode: offline``): learn from a logged experience file, generate nothing.

Top to bottom:
  read ``offline.path`` (validated row by row: file:line errors) → check the loss can learn from
  what the log holds (a loss that needs behaviour log-probs on a log without them fails here,
  naming the loss and the field) → every group into the buffer → ``rl.steps`` ×
  [``updates_per_step`` updates on groups drawn by the buffer's sampler → log → eval → checkpoint].

The log's policy versions belong to whoever produced it, not to this learner, so a staleness
bound means nothing here: ``rl.buffer.max_staleness`` must be null. Rows without behaviour
log-probs (expert traces, logs of unknown policies) train losses that do not need them.
"""

from __future__ import annotations

import time

import torch

from offpolicy.config import ConfigError
from offpolicy.data.logs import check_learnable, group_log, read_log
from offpolicy.train.context import Run
from offpolicy.train.rl import build_rl, end_step, learn, step_metrics, store, write_staleness


def run_offline(run: Run) -> None:
    cfg, rl = run.cfg, run.cfg.rl
    groups = load_groups(run)
    parts = build_rl(run)
    if not run.state["stage_state"]:  # a resumed run has them in its checkpointed buffer
        store(run, parts, groups, {"n": 0, "tokens": 0, "seconds": 0.0})
    data = {"offline/groups": torch.tensor(float(len(groups))),
            "offline/experiences": torch.tensor(float(sum(len(g) for g in groups)))}
    run.console.start_stage("RL offline", rl.steps, run.state["step"])
    for step in range(run.state["step"], rl.steps):
        t0 = time.perf_counter()
        updates = learn(run, parts)
        end_step(run, parts, step, {**step_metrics(updates), **data, "time/step_s": torch.tensor(time.perf_counter() - t0)})
    run.console.end_stage()
    write_staleness(run, parts)
    run.state.update(stage="done", stage_state=None)


def load_groups(run: Run) -> list[list]:
    cfg, rl = run.cfg, run.cfg.rl
    if cfg.offline.path is None:
        raise ConfigError("offline.path: run.mode=offline needs an experience file (.jsonl or .parquet)")
    if rl.buffer.max_staleness is not None:
        raise ConfigError(f"rl.buffer.max_staleness={rl.buffer.max_staleness}: a log's policy versions are not "
                          "this learner's; set it to null in offline mode")
    experiences = read_log(cfg.offline.path, vocab_size=run.tokenizer.vocab_size)
    try:
        check_learnable(experiences, loss=rl.loss, correction=rl.correction, old_logp=rl.old_logp)
    except ValueError as e:
        raise ConfigError(f"offline.path={cfg.offline.path}: {e}") from None
    groups = group_log(experiences)
    if len(groups) > rl.buffer.capacity:
        raise ConfigError(f"rl.buffer.capacity={rl.buffer.capacity} is below the {len(groups)} groups of "
                          f"{cfg.offline.path}: raise it so no logged group is evicted")
    return groups
