"""The tasks of a task instance as the framework tracks them while it claims, runs and records them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from astra_provider.database.astradb import Base, DataProduct, Task
from astra_provider.database.recording import DataProductSpec

STAGES = ("pre_execute", "execute", "post_execute")


@dataclass(eq=False)
class TaskItem:
    """One task of a task instance: its parameters and inputs, its row once recorded, and its run."""

    parameters: dict[str, Any]
    inputs: list[DataProductSpec | DataProduct | int]
    task: Task | None = None
    data_products: list[DataProduct] = field(default_factory=list)
    already_done: bool = False
    elsewhere: str | None = None  # held by another live run (its lease, described): not run here
    failed: bool = False
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    result: Any = None
    error: tuple[str, str, str] | None = None  # (stage, message, traceback)
    recorded: bool = False  # its outcome is in the database
    lost: bool = False  # its claim was taken over while it ran: its outcome was not recorded here

    def reset(self) -> None:
        """Forget the outcome of a previous execution."""
        self.failed, self.error, self.result = False, None, None
        self.already_done, self.elsewhere, self.recorded, self.lost = False, None, False, False
        self.times = dict.fromkeys(STAGES, 0.0)

    @property
    def runnable(self) -> bool:
        """Claimed by this run and not finished: it still has stages to run."""
        return not (self.already_done or self.elsewhere or self.failed or self.lost or self.recorded)


ResultRow = tuple[TaskItem, type[Base], dict[str, Any]]
"""A row of a result table written by a task: ``(task, model, columns)``."""

OutputFile = tuple[TaskItem, DataProductSpec]
"""A file written by a task: ``(task, data product)``."""


__all__ = ["STAGES", "OutputFile", "ResultRow", "TaskItem"]
