"""Issue 26 item 5: a change a restart interrupted is judged by what its action changes, never "applied" by default
(`domain.history.judge_interrupted`); and item 6's scale-out recorded with its preemption is left to be carried out
again (`ScaleRedo`)."""

from __future__ import annotations

from typing import Any

import pytest

from corral.domain import labels as L
from corral.domain.history import (
    PREEMPTING,
    Action,
    Observed,
    Outcome,
    ScaleRedo,
    TaskSeen,
    judge_interrupted,
)
from corral.domain.models import Deployment, Pod
from corral.domain.tasks import TaskState

POOL = "simulator-m-pool"


def pod(name: str, business: str = L.UNASSIGNED) -> Pod:
    return Pod(name, POOL, L.pool_labels(model_tag="m", pool=POOL, engine="simulator") | {L.BUSINESS: business})


def seen(pods: list[Pod] = (), tasks: dict[str, TaskSeen] | None = None, pool: bool = True) -> Observed:  # type: ignore[assignment]
    deployments = {POOL: Deployment(POOL, "simulator", "sim", "m", True, len(pods), gpus_per_replica=1)} if pool else {}
    return Observed(deployments=deployments, pods=list(pods), services={}, tasks=tasks)


def row(action: Action, target: str, before: Any = None, after: Any = None) -> dict[str, Any]:
    return {"id": 1, "action": action, "target": target, "before": before, "after": after, "message": ""}


@pytest.mark.parametrize("action", [Action.POLICY, Action.PIN, Action.CUTOVER, Action.CRASH])
def test_an_action_nobody_judges_is_not_applied_by_default(action: Action) -> None:
    outcome, message = judge_interrupted(row(action, POOL, after={"anything": 1}), seen())
    assert outcome is Outcome.FAILED and f"cannot tell whether this {action} change took effect" in message


def test_an_autopilot_decision_is_applied_only_when_its_replicas_moved() -> None:
    decision = row(Action.AUTOPILOT, POOL, before={"unassigned": 2}, after={"a": "production", "b": "testing"})
    assert judge_interrupted(decision, seen([pod("a", "production"), pod("b", "testing")]))[0] is Outcome.SUCCESS
    assert judge_interrupted(decision, seen([pod("a", "production"), pod("b")]))[0] is Outcome.FAILED
    assert judge_interrupted(decision, seen([pod("a", "production")]))[0] is Outcome.FAILED  # b is gone


def test_a_preemption_is_judged_by_the_task() -> None:
    asked = row(Action.FINETUNE, "t1", before={"status": "training", "units": ["0"]},
                after={"status": "queued", "preemptedBy": {"pool": POOL}})

    def judged(task: TaskSeen | None, observed: bool = True) -> tuple[Outcome, str]:
        tasks = ({"t1": task} if task is not None else {}) if observed else None
        return judge_interrupted(asked, seen(tasks=tasks))

    assert judged(TaskSeen(TaskState.QUEUED, (), preempted=True))[0] is Outcome.SUCCESS  # checkpointed and left
    outcome, message = judged(TaskSeen(TaskState.TRAINING, ("0",), preempted=True))
    assert outcome is Outcome.SUCCESS and "saves its checkpoint and stops by itself" in message  # asked, still saving
    outcome, message = judged(TaskSeen(TaskState.TRAINING, ("0",), preempted=False))
    assert outcome is Outcome.FAILED and "before the trainer was asked" in message  # the restart came first
    assert judged(TaskSeen(TaskState.TRAINING, ("1",), preempted=False))[0] is Outcome.SUCCESS  # left, started again
    assert judged(None)[0] is Outcome.FAILED
    assert judged(None, observed=False)[0] is Outcome.FAILED


def test_a_scale_out_recorded_with_its_preemption_is_carried_out_again() -> None:
    scale = row(Action.SCALE, POOL, before={"replicas": 1},
                after={"replicas": 2, PREEMPTING: {"business": "production", "priority": 10}})
    assert ScaleRedo.of(scale) == ScaleRedo(POOL, 2, "production", 10)
    assert judge_interrupted(scale, seen([pod("a", "production")]))[0] is Outcome.PENDING  # the controller redoes it
    assert judge_interrupted(scale, seen([pod("a"), pod("b")]))[0] is Outcome.SUCCESS
    assert judge_interrupted(scale, seen(pool=False))[0] is Outcome.FAILED
    # A scale of its own is judged as ever: no redo.
    plain = row(Action.SCALE, POOL, before={"replicas": 1}, after={"replicas": 2})
    assert ScaleRedo.of(plain) is None
    assert judge_interrupted(plain, seen([pod("a")]))[0] is Outcome.FAILED
