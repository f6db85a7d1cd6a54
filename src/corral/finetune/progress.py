"""The trainer's progress lines (TASK_DIR/progress.jsonl): their `event` names and how a task's progress reads them.

The contract between the trainer (a child process, which writes them) and the task manager (which follows them).
Pure and light: the trainer imports it before torch, the manager without torch.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any


class ProgressEvent(StrEnum):
    """The `event` of a progress line, in the order a run writes them."""

    PREPARING = "preparing"  # started: loading the model and dataset (`resume`: from a checkpoint)
    DATASET = "dataset"  # the examples' counts: truncated, dropped, train and eval examples, the format
    TRAINING = "training"  # the first step is about to run (`step`, `totalSteps`)
    STEP = "step"  # a logged step: loss, learning rate, epoch, ETA
    EVAL = "eval"  # an evaluation: its loss at `step`
    PREEMPTED = "preempted"  # asked to give its GPUs: a checkpoint saved, the trainer exits to be resumed
    COMPLETED = "completed"  # the result is in `output`; the trainer exits


# What a line's fields add to a task's `progress` (the view's TaskProgress).
PROGRESS_KEYS = ("step", "totalSteps", "loss", "learningRate", "epoch", "eta", "evalLoss", "truncated", "turnsCut", "dropped",
                 "trainExamples", "evalExamples", "packedRows", "padTokens", "batchTokens", "logDir",
                 "earlyStopped")


def parse(line: str) -> dict[str, Any] | None:
    """One progress line as its fields; None for a blank or unreadable line (one the trainer was cut off writing)."""
    if not line.strip():
        return None
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def event_of(fields: dict[str, Any] | None) -> ProgressEvent | None:
    """The line's event; None when it has none Corral knows (a newer trainer's, or no line at all)."""
    try:
        return ProgressEvent(fields.get("event")) if fields else None
    except ValueError:
        return None


def progress_update(previous: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A task's progress after one more line."""
    update = {k: fields[k] for k in PROGRESS_KEYS if k in fields}
    if "eta" in fields:  # a time, not a duration: it stays right however late it is read
        update["etaAt"] = fields["time"] + fields["eta"] if fields["eta"] is not None and "time" in fields else None
    if event_of(fields) is ProgressEvent.EVAL:  # an evaluation reports its loss, not the training step's progress
        update = {"evalLoss": fields.get("evalLoss")}
    if "format" in fields:
        update["datasetFormat"] = fields["format"]
    return {**previous, **update}
