"""A finetune task's lifecycle states and their groupings: pure names, shared by the manager, the store, the
views and every front end (so none of them compares a status with a string literal)."""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    """A finetune task's lifecycle: pending → queued → preparing → training → completed | failed | cancelled."""

    PENDING = "pending"  # submitted, not yet considered by a scheduling round
    QUEUED = "queued"  # waiting for GPUs (or a CPU slot), or launched and waiting for Kueue's admission
    PREPARING = "preparing"  # trainer started: loading the model and dataset
    TRAINING = "training"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by request, or timed out


# Groupings (like SkyPilot's status groupings); tuples of str values, usable in SQL `IN` and with `in`.
ACTIVE: tuple[TaskState, ...] = (TaskState.PREPARING, TaskState.TRAINING)
WAITING: tuple[TaskState, ...] = (TaskState.PENDING, TaskState.QUEUED)
FINISHED: tuple[TaskState, ...] = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


class StopCause(StrEnum):
    """Why Corral cancelled a task it stopped: a fact passed along with the state change (History's outcome of a
    timeout is `timeout`, of a request `success`), never read back from the reason's text."""

    REQUEST = "request"  # cancelled by a user (the API, the CLI, the UI)
    TIMEOUT = "timeout"  # ran past its timeoutSeconds
