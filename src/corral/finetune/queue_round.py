"""The scheduling round: what starts now, on which GPUs, carried out. The pure queue policy (`domain.queue.schedule`)
decides; this module gathers what it decides on (the waiting tasks, the GPU ledger less what pools are owed and what
a preemption keeps for replicas, the preflight's room per unit, the CPU slots, the running tasks' estimated ends),
then starts the chosen tasks (`Lifecycle.spawn`), keeps easy-backfill's promises and the bypass counts, asks reclaim
for replicas, and words each waiting task's reason from the policy's typed `Wait`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from corral.config import Settings
from corral.domain import preflight
from corral.domain.gpu_ledger import GpuLedger, Holder
from corral.domain.memory import GIB
from corral.domain.queue import (
    Capacity,
    Demand,
    Priority,
    Reservation,
    RunningTask,
    Strategy,
    Unit,
    Wait,
    WaitingTask,
    WaitReason,
    carried_promises,
    estimated_end,
    released_units,
    schedule,
)
from corral.domain.tasks import ACTIVE, WAITING, TaskState
from corral.finetune.lifecycle import Lifecycle, preempted_reason
from corral.finetune.preemption import Preemption
from corral.finetune.reclaim import Reclaim
from corral.finetune.runners import TrainerRunner
from corral.finetune.store import TaskRecord, TaskStore
from corral.finetune.task_files import TaskFiles
from corral.views import QueueSummary

if TYPE_CHECKING:
    from corral.controller import Controller

log = logging.getLogger("corral.finetune")

_LAST_TIMESTAMP = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()


def queue_time(seconds: float) -> datetime:
    """A time of the queue policy (Unix seconds) as a date. Past the last date there is (a timeout of 1e300 s, which a
    database written before timeoutSeconds had a bound may hold): the last date, instead of an error every round."""
    return datetime.fromtimestamp(min(seconds, _LAST_TIMESTAMP), timezone.utc)


class QueueRound:
    def __init__(self, settings: Settings, tasks: TaskStore, lifecycle: Lifecycle, files: TaskFiles, runner: TrainerRunner,
                 ledger: Callable[[], GpuLedger], reclaim: Reclaim, preemption: Preemption,
                 controller: Controller | None) -> None:
        self.settings = settings
        self.tasks = tasks
        self.lifecycle = lifecycle
        self.files = files
        self.runner = runner  # only whether it admits tasks itself (Kueue)
        # The one GPU ledger (replicas + launched tasks, fresh free memory), read before every round.
        self.ledger = ledger
        self.reclaim = reclaim
        self.preemption = preemption
        self.controller = controller  # its queries: the replicas starting on GPUs (the preflight)

    def run(self) -> None:
        self.preemption.follow_task_preemptions()  # victims back in the queue: their rows completed
        waiting = [t for t in self.tasks.list(WAITING) if not t.pid_start]
        if not waiting:
            return
        if self.runner.admits_itself:  # Kueue admits against its quotas; every task's Job is created now
            for task in waiting:
                self.files.note(task.id, "creating its Job for Kueue to admit")
                self.lifecycle.spawn(task, units=[], visible=[])
            return
        running = self.lifecycle.launched()
        ledger = self.ledger()  # replicas' and launched tasks' units are held there
        if owed := self.reclaim.units_owed():  # kept for the replicas being restored, not for the next task
            restoring = Holder.replica("(pools being restored)")
            kept = tuple(u.id for u in ledger.free_units(whole_only=True))[:owed]  # where the restored replicas will go
            ledger = ledger.hold(restoring, kept)
        ledger = self.preemption.keep_for_replicas(ledger)
        # Preflight (domain.preflight): a unit's room is NVML's free memory now less what replicas starting there will
        # take; a task fits only if its estimate plus the margin fits that room.
        margin = self.settings.finetune_memory_margin_gb * GIB
        room = preflight.rooms([(u.id, u.memory_free_bytes) for u in ledger.free_units()], self._starting_replicas(ledger))
        cpu_slots = max(0, self.settings.cpu_training_slots - sum(1 for t in running if not t.units))
        now = time.time()  # easy-backfill: running tasks' estimated ends (timeout, or the trainer's ETA) and bounds
        offered = [WaitingTask(t.id, Priority.parse(t.priority), t.created_at.timestamp() if t.created_at else 0.0,
                               Demand(t.gpus, t.memory_gb * GIB), t.bypassed, estimated_s=t.timeout_s,
                               promised_start=t.promised_start.timestamp() if t.promised_start else None) for t in waiting]
        decision = schedule(
            offered,
            Capacity(preflight.admissible(room, margin), cpu_slots, now=now, running=tuple(
                RunningTask(t.id, tuple(Unit(u.id, max(0.0, u.free_bytes - margin)) for u in released_units(ledger, t.units)),
                            estimated_end(t.started_at.timestamp() if t.started_at else None, t.timeout_s,
                                          t.progress.get("etaAt"), now))
                for t in running if t.units)),
            Strategy(self.settings.queue_strategy), self.settings.max_bypass, self.settings.backfill_slack_s,
        )
        for task_id, chosen in decision.starts:  # the ledger refuses a unit that is not free: check all before starting any
            ledger = ledger.hold(Holder.task(task_id), chosen)
        for task_id in decision.bypassed:
            self.tasks.update(task_id, bypassed=self.lifecycle.get(task_id).bypassed + 1)
        by_id = {t.id: t for t in waiting}
        for task_id, promise in carried_promises(offered, decision).items():  # easy-backfill's promises, before acting
            by_id[task_id] = self.tasks.update(task_id, promised_start=None if promise is None else queue_time(promise))
        started = []
        for task_id, chosen in decision.starts:
            log.info("starting finetune task %s on %s", task_id, ", ".join(chosen) or "the CPU")
            self.files.note(task_id, f"starting on {', '.join(chosen) or 'the CPU'}")
            self.lifecycle.spawn(by_id[task_id], units=list(chosen), visible=[_visible(ledger, u) for u in chosen])
            started.append(task_id)
        running_ids = [t.id for t in running] + started
        self.reclaim.maybe_reclaim([by_id[t] for t in decision.waiting], ledger)
        self._preempt_for_head(decision.waiting, by_id, ledger, margin)
        leaving = self.preemption.leaving()
        for task_id, wait in decision.waiting.items():
            task = by_id[task_id]
            reason = self._reason(task, wait, room, margin, running_ids, decision.reservations.get(task_id),
                                  leaving.get(task_id, []))
            if task.status != TaskState.QUEUED or task.reason != reason:
                self.lifecycle.set_status(task_id, TaskState.QUEUED, reason)

    def _preempt_for_head(self, waiting: dict[str, Wait], by_id: dict[str, TaskRecord], ledger: GpuLedger, margin: float) -> None:
        """The first waiting task (the queue's order: the highest priority, then the oldest), when GPUs are what it
        waits for, takes them from lower-priority preemptible running tasks (`Preemption.for_waiting_task`); not while
        unassigned replicas are being reclaimed for it (that frees GPUs without stopping anyone's training)."""
        head = next(((task_id, wait) for task_id, wait in waiting.items() if by_id[task_id].gpus), None)
        if head is None or head[1].reason is not WaitReason.GPUS:
            return
        task = self.lifecycle.get(head[0])
        if not task.gpus or task.reclaimed:
            return
        self.preemption.for_waiting_task(by_id[task.id], ledger, task.memory_gb * GIB + margin)

    def _reason(self, task: TaskRecord, wait: Wait, room: tuple[preflight.UnitRoom, ...], margin: float,
                running_ids: list[str], held: Reservation | None, leaving: list[str]) -> str:
        """A waiting task's reason: why it waits, what runs, the GPUs reserved for it, its preemption and reclaim."""
        why = wait.describe()
        if wait.reason is WaitReason.GPUS:  # too few units with the memory: the numbers when memory is why
            why = preflight.shortfall(Demand(task.gpus, task.memory_gb * GIB), room, margin) or why
        reason = f"queued, {why} (currently running: {', '.join(running_ids) or 'none'})"
        if held:
            reason += f"; GPU {', '.join(held.units)} reserved for it" + (
                "" if held.promised_start is None else
                f": it starts by {queue_time(held.promised_start):%Y-%m-%d %H:%M} UTC at the latest")
        if task.preempted_by:
            reason = f"{preempted_reason(task.preempted_by)}; {reason}"
        if leaving:
            reason += f"; preempting {', '.join(leaving)} for it (they save a checkpoint, then give their GPUs)"
        if reclaimed := self.lifecycle.get(task.id).reclaimed:
            reason += f"; reclaiming unassigned replicas of {', '.join(f'{p} ({n})' for p, n in reclaimed.items())}"
        return reason

    def _starting_replicas(self, ledger: GpuLedger) -> list[preflight.StartingReplica]:
        """Replicas that hold GPUs and are not ready yet, with what each will take per unit (`domain.preflight`)."""
        if self.controller is None:
            return []
        deployments = {d.name: d for d in self.controller.deployments()}
        starting = []
        for pod in self.controller.pods():
            held = ledger.units_of(Holder.replica(pod.name))
            if pod.ready or not held or (deployment := deployments.get(pod.deployment)) is None:
                continue
            total = max((unit.memory_total_bytes for u in held if (unit := ledger.unit(u)) is not None), default=0.0)
            starting.append(preflight.StartingReplica(pod.name, held, preflight.expected_replica_bytes(
                deployment.engine, deployment.engine_args, total)))
        return starting

    def summary(self) -> QueueSummary:
        """The queue at a glance: how many wait, which run, the strategy, and a warning past the threshold."""
        waiting = self.tasks.list(WAITING)
        running = self.tasks.list(ACTIVE)
        threshold = self.settings.queue_warning_threshold
        warning = (f"{len(waiting)} tasks are waiting (more than {threshold}): consider more GPUs, lower priorities or "
                   "cancelling stale tasks") if len(waiting) > threshold else None
        return QueueSummary(waiting=len(waiting), running=[t.id for t in running], strategy=self.settings.queue_strategy,
                            backfillSlackSeconds=self.settings.backfill_slack_s, warning=warning)


def _visible(ledger: GpuLedger, unit_id: str) -> str:
    """What CUDA_VISIBLE_DEVICES names a unit by: a whole GPU by index, a MIG instance by its UUID."""
    unit = ledger.unit(unit_id)
    return unit.uuid if unit is not None and not unit.whole and unit.uuid else unit_id
