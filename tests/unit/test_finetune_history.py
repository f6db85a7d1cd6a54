"""Which finetune lifecycle steps become History rows (corral.finetune.manager._history_event)."""

from __future__ import annotations

import pytest

from corral.domain.history import Outcome
from corral.finetune.manager import _history_event


@pytest.mark.parametrize(("before", "after", "reason", "admission", "expected"), [
    ("queued", "preparing", "loading the model and dataset", False, ("started", Outcome.SUCCESS)),
    ("pending", "preparing", "loading the model and dataset", False, ("started", Outcome.SUCCESS)),
    ("preparing", "training", "training", False, None),  # started already, at launch
    # Kueue: a Job passes `preparing` before admission (and may wait queued): started once it trains.
    ("pending", "preparing", "loading the model and dataset", True, None),
    ("preparing", "queued", "waiting for Kueue admission (queue q)", True, None),
    ("preparing", "training", "training", True, ("started", Outcome.SUCCESS)),
    ("training", "queued", "waiting for Kueue admission (queue q)", True, ("preempted:", Outcome.RESTARTING)),
    ("training", "completed", "completed; output in /x", False, ("completed:", Outcome.SUCCESS)),
    ("preparing", "failed", "trainer exited (code 1): boom", False, ("failed:", Outcome.FAILED)),
    ("queued", "cancelled", "cancelled by request", False, ("cancelled:", Outcome.SUCCESS)),
    ("training", "cancelled", "timed out after 60 s (timeoutSeconds)", False, ("cancelled:", Outcome.TIMEOUT)),
    ("queued", "queued", "queued, waiting for a CPU training slot", False, None),  # a new queue reason is no step
    ("pending", "queued", "queued, waiting for GPU", False, None),
])
def test_history_rows_for_lifecycle_steps(before: str, after: str, reason: str, admission: bool,
                                          expected: tuple[str, Outcome] | None) -> None:
    assert _history_event(before, after, reason, admission) == expected
