"""Optional metric sinks beside ``metrics.jsonl``: TensorBoard and Weights & Biases (``run.loggers``).

``metrics.jsonl`` is the source of truth; a sink receives the same records as
``{metric name: float}`` scalars (the stable names, unchanged: ``reward/mean``,
``loss/clip_frac``, ...) at the global step that ``MetricsLog`` computes. Both
packages are in the extra ``offpolicy[tracking]``; a logger whose package is
missing fails when the run starts, naming the extra.

* ``tensorboard``: event files in ``<out>/tensorboard/`` (``tensorboard --logdir
  <out>/tensorboard``), written with ``torch.utils.tensorboard.SummaryWriter``.
  The run config is added as the text summary ``config``.
* ``wandb``: ``wandb.init(dir=<out>, mode="offline")`` by default: no network and
  no login; the run lands in ``<out>/wandb/offline-run-*`` and can be uploaded
  later with ``wandb sync <out>/wandb/offline-run-*``. ``wandb_mode="online"``
  streams instead (needs ``wandb login``). Project ``offpolicy``, run name =
  ``run_name``, config = the run config. stdout capture and system-stats
  sampling are off (the console is ours; metrics are what we log).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

LOGGERS = ("tensorboard", "wandb")
EXTRA_HINT = "pip install 'offpolicy[tracking]'"


class Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def require(package: str, logger: str) -> ModuleType:
    """Import ``package`` for the logger ``logger`` or fail with the extra to install."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"run.loggers: {logger!r} needs the package {package!r}, which is not installed; "
                          f"{EXTRA_HINT}") from e


class TensorBoardSink:
    """Scalars to ``<out>/tensorboard/events.out.tfevents.*``; tag = metric name, step = global step."""

    def __init__(self, out_dir: Path, config: dict[str, Any] | None = None) -> None:
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(out_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config:
            text = json.dumps(config, indent=2, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=0)  # code block

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """One W&B run per ``MetricsLog``; ``run.log(scalars, step=global step)``."""

    def __init__(self, out_dir: Path, run_name: str | None = None, config: dict[str, Any] | None = None,
                 mode: str = "offline", project: str = "offpolicy") -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode={mode!r}; valid: ['offline', 'online', 'disabled']")
        wandb = require("wandb", "wandb")
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                  save_code=False)
        self.run = wandb.init(project=project, name=run_name, dir=str(out_dir), mode=mode, config=config or {},
                              reinit="create_new", settings=settings)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def make_sink(name: str, out_dir: Path, *, run_name: str | None, config: dict[str, Any] | None,
              wandb_mode: str) -> Sink:
    if name == "tensorboard":
        return TensorBoardSink(out_dir, config)
    if name == "wandb":
        return WandbSink(out_dir, run_name, config, mode=wandb_mode)
    raise ValueError(f"run.loggers: unknown logger {name!r}; valid: {list(LOGGERS)}")
