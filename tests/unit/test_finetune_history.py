"""Which finetune lifecycle steps become History rows (corral.finetune.lifecycle._history_event)."""

from __future__ import annotations

import pytest

from corral.domain.history import Outcome
from corral.domain.tasks import StopCause, TaskState
from corral.finetune.lifecycle import _history_event

S = TaskState


@pytest.mark.parametrize(("before", "after", "cause", "admission", "expected"), [
    (S.QUEUED, S.PREPARING, None, False, ("started", Outcome.SUCCESS)),
    (S.PENDING, S.PREPARING, None, False, ("started", Outcome.SUCCESS)),
    (S.PREPARING, S.TRAINING, None, False, None),  # started already, at launch
    # Kueue: a Job passes `preparing` before admission (and may wait queued): started once it trains.
    (S.PENDING, S.PREPARING, None, True, None),
    (S.PREPARING, S.QUEUED, None, True, None),  # waiting for Kueue admission
    (S.PREPARING, S.TRAINING, None, True, ("started", Outcome.SUCCESS)),
    (S.TRAINING, S.QUEUED, None, True, ("preempted:", Outcome.RESTARTING)),  # Kueue suspended its Job again
    (S.TRAINING, S.COMPLETED, None, False, ("completed:", Outcome.SUCCESS)),
    (S.PREPARING, S.FAILED, None, False, ("failed:", Outcome.FAILED)),
    (S.QUEUED, S.CANCELLED, StopCause.REQUEST, False, ("cancelled:", Outcome.SUCCESS)),
    (S.TRAINING, S.CANCELLED, StopCause.TIMEOUT, False, ("cancelled:", Outcome.TIMEOUT)),  # timed out (timeoutSeconds)
    (S.QUEUED, S.QUEUED, None, False, None),  # a new queue reason is no step
    (S.PENDING, S.QUEUED, None, False, None),
])
def test_history_rows_for_lifecycle_steps(before: TaskState, after: TaskState, cause: StopCause | None, admission: bool,
                                          expected: tuple[str, Outcome] | None) -> None:
    assert _history_event(before, after, admission, cause) == expected
