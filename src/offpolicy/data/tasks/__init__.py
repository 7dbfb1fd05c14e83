"""Verifiable tasks: ``make_task(name, **params)`` -> a :class:`Task` handing out :class:`Problem` s.

Built-in: ``arithmetic``, ``addition`` (a 2-3-digit preset), ``file`` (jsonl / parquet)
and ``reasoning_gym:<dataset>`` (optional dependency, imported when used).
"""

from offpolicy.data.tasks import arithmetic, files, reasoning_gym  # noqa: F401  (register the tasks)
from offpolicy.data.tasks.base import TASKS, Problem, Task, make_task

__all__ = ["Problem", "Task", "TASKS", "make_task"]
