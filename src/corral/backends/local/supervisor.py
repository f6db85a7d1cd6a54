"""The replica supervisor: keeps every local replica's process alive and its readiness current.

One loop, every `health_interval_s`: a replica whose process died goes to CrashLoopBackOff and is
restarted after an exponential back-off, keeping its name, port (when still free) and business;
a live one is probed on its engine's health endpoint. On start it re-adopts replicas left running
by an earlier control plane (pid + process start time), restarts the ones that died meanwhile and
finishes removals that a crash interrupted. Only process columns are written here, never labels,
so supervision cannot undo a concurrent assignment.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from corral import failpoints
from corral.aio import within
from corral.backends.base import Report
from corral.backends.local import process
from corral.config import Settings
from corral.domain.history import Action, HistoryDraft, Outcome
from corral.domain.models import PodPhase
from corral.domain.outliers import OutlierPolicy, Readiness, readiness
from corral.domain.sleep import SleepState
from corral.engines import get_engine
from corral.events import EventType
from corral.store.state import ReplicaRecord, StateStore

log = logging.getLogger("corral.supervisor")

Drain = Callable[[str, float], Awaitable[None]]


class ReplicaSupervisor:
    def __init__(self, settings: Settings, store: StateStore, report: Report) -> None:
        self.settings = settings
        self.store = store
        self.report = report
        self._handles: dict[str, subprocess.Popen] = {}
        self._user = process.child_user(settings.replica_user)  # as root, replicas run unprivileged
        self._failures: dict[str, int] = {}
        # Readiness from health checks in a row, not one check (domain/outliers.py): CORRAL_HEALTH_*_THRESHOLD.
        self._readiness: dict[str, Readiness] = {}
        self._probes = OutlierPolicy(failed_probes=settings.health_failure_threshold,
                                     passed_probes=settings.health_success_threshold)
        self._restart_at: dict[str, float] = {}
        self._stopping: set[str] = set()
        self._http = httpx.AsyncClient(timeout=2.0)
        self._task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        # Waits until the data plane has no request in flight on a replica (set by the runtime).
        self.drain: Drain | None = None

    # lifecycle -------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Make the processes match the rows: one process per replica, none that no row lists."""
        records = {r.name: r for r in self.store.list_replicas()}
        for name, found in process.find_replicas(self.settings.data_dir).items():
            record = records.get(name)
            keep = None
            if record is not None and record.phase != PodPhase.TERMINATING:
                keep = next((f for f in found if (f.pid, f.pid_start) == (record.pid, record.pid_start)), found[0])
                if (keep.pid, keep.pid_start) != (record.pid, record.pid_start):
                    log.info("adopting replica %s's process %d (started before its pid was recorded)", name, keep.pid)
                    self.store.update_replica(name, pid=keep.pid, pid_start=keep.pid_start)
            for extra in found:
                if extra is not keep and (record is None or (extra.pid, extra.pid_start) != (record.pid, record.pid_start)):
                    await process.stop_group(extra.pid, extra.pid_start, None, self.settings.stop_grace_s)
                    why = ("a second copy of the replica" if keep else "the replica is being removed" if record
                           else "no replica of that name is desired")
                    self.report(None, history=HistoryDraft(Action.STRAY, name, before={"pid": extra.pid},
                                                           message=f"stopped stray process {extra.pid}: {why}"))
        for record in self.store.list_replicas():
            if record.phase == PodPhase.TERMINATING:
                log.info("finishing the removal of %s", record.name)
                await self.stop(record)
            elif process.is_alive(record.pid, record.pid_start):
                log.info("re-adopted replica %s (pid %s)", record.name, record.pid)
            elif record.pid is None:
                log.info("starting replica %s, recorded but never started", record.name)
                self.launch(record)
            else:
                log.info("replica %s died while the control plane was down; restarting it", record.name)
                process.kill_leftovers(record.name, self.settings.data_dir)
                self.launch(record, restart=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-supervisor")

    async def close(self) -> None:
        # Retirements still draining are cut short: the next start finishes them (they are Terminating).
        for task in [self._task, *self._retiring]:
            if task:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self._http.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not end supervision
                log.exception("supervision tick failed")
            await asyncio.sleep(self.settings.health_interval_s)

    # processes -------------------------------------------------------------------------------
    def launch(self, record: ReplicaRecord, *, restart: bool = False) -> ReplicaRecord:
        deployment = self.store.get_deployment(record.deployment)
        assert deployment is not None, record.deployment
        port = record.port if process.port_is_free(record.port) else process.free_port()
        spec = get_engine(deployment.engine).launch(
            model_id=deployment.model_id,
            model_tag=deployment.model_tag,
            port=port,
            host="127.0.0.1",
            gpus=len(record.gpu_ids),
            extra=list(deployment.engine_args),
            replica=record.name,
        )
        # The deployment's secretEnv first, so nothing of Corral's own (GPUs, identity) can be replaced by it;
        # it goes into the process's environment only, never into its command line or a log.
        env = {**self.store.secret_env(deployment.name), **spec.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, record.gpu_ids)),
               **process.identity_env(record.name, self.settings.data_dir)}
        started = process.spawn(spec.argv, env, Path(record.log_path), self._user)
        failpoints.reached("replica.spawned")  # before its pid is recorded: found again by its environment
        self._handles[record.name] = started.handle  # type: ignore[assignment]
        restarts = record.restarts + (1 if restart else 0)
        updated = record.replace(
            pid=started.pid, pid_start=started.pid_start, port=port, phase=PodPhase.PENDING, ready=False, restarts=restarts,
            sleep_state=SleepState.AWAKE,
        )
        # A new process starts awake, whatever its predecessor's sleep state: the sleep reconciler (corral.sleeping)
        # puts it back to sleep once it is ready if that is what is desired.
        self.store.update_replica(
            record.name, pid=started.pid, pid_start=started.pid_start, port=port, phase=PodPhase.PENDING,
            ready=False, restarts=restarts, sleep_state=SleepState.AWAKE.value,
        )
        self._publish(updated)
        return updated

    def retire(self, records: list[ReplicaRecord], then: Callable[[], None] | None = None) -> asyncio.Task:
        """Take replicas out of service now, and in the background let them drain, then stop them.

        Marking them Terminating (one publish each) removes them from routing and listings before
        this returns, so new requests never reach them; requests already in flight finish, bounded
        by `drain_timeout_s`, before SIGTERM. `then` runs once all are stopped.
        """
        for record in records:
            self._mark_terminating(record)

        async def drain_and_stop() -> None:
            await asyncio.gather(*(self._drain_and_stop(r) for r in records))
            if then is not None:
                then()

        task = asyncio.create_task(drain_and_stop(), name=f"retire-{len(records)}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain_and_stop(self, record: ReplicaRecord) -> None:
        if self.drain is not None:
            try:  # bounded: a data plane that cannot say whether requests are in flight must not keep a replica alive
                await within(self.settings.drain_timeout_s + 5, self.drain(record.name, self.settings.drain_timeout_s))
            except Exception as exc:
                log.warning("draining %s failed (%s); stopping it anyway", record.name, exc)
        await self.stop(record)

    def _mark_terminating(self, record: ReplicaRecord) -> None:
        self._stopping.add(record.name)
        self.store.update_replica(record.name, phase=PodPhase.TERMINATING, ready=False)
        self._publish(record.replace(phase=PodPhase.TERMINATING, ready=False))

    async def stop(self, record: ReplicaRecord) -> None:
        """Stop the process (SIGTERM, then SIGKILL after the grace period) and forget the replica."""
        self._stopping.add(record.name)
        try:
            if record.phase != PodPhase.TERMINATING:
                self._mark_terminating(record)
            await process.stop_group(record.pid, record.pid_start, self._handles.get(record.name), self.settings.stop_grace_s)
            self.store.delete_replica(record.name)
            self.report(EventType.REPLICA_STATUS, {"name": record.name, "deployment": record.deployment,
                                                   "phase": "Deleted", "ready": False})
        finally:
            self._stopping.discard(record.name)
            self._handles.pop(record.name, None)
            self._failures.pop(record.name, None)
            self._readiness.pop(record.name, None)
            self._restart_at.pop(record.name, None)

    # supervision -----------------------------------------------------------------------------
    async def tick(self) -> None:
        health_paths = {d.name: get_engine(d.engine).health_path for d in self.store.list_deployments()}
        records = [r for r in self.store.list_replicas() if r.name not in self._stopping and r.phase != PodPhase.TERMINATING]
        await asyncio.gather(*(self._check(r, health_paths.get(r.deployment, "/health")) for r in records))

    async def _check(self, record: ReplicaRecord, health_path: str) -> None:
        if not process.is_alive(record.pid, record.pid_start, self._handles.get(record.name)):
            self._on_dead(record)
            return
        ok = await self._probe(record, health_path)
        if record.name in self._stopping:
            return
        state = self._readiness.get(record.name) or Readiness(ready=record.ready, was_ready=record.ready)
        state = self._readiness[record.name] = readiness(state, ok, self._probes)
        ready = state.ready
        phase = PodPhase.RUNNING if ready or record.phase == PodPhase.RUNNING else PodPhase.PENDING
        if ok:
            self._failures.pop(record.name, None)
        if (phase, ready) != (record.phase, record.ready):
            self.store.update_replica(record.name, phase=phase, ready=ready)
            self._publish(record.replace(phase=phase, ready=ready))

    def _on_dead(self, record: ReplicaRecord) -> None:
        now = time.monotonic()
        self._readiness.pop(record.name, None)  # a restarted process is ready at its first passed check
        if record.phase != PodPhase.CRASH_LOOP:
            failures = self._failures.get(record.name, 0)
            delay = min(self.settings.restart_backoff_max_s, 2.0**failures)
            self._failures[record.name] = failures + 1
            self._restart_at[record.name] = now + delay
            code = process.exit_code(self._handles.get(record.name))
            reason = f"process exited (code {code})" if code is not None else "process exited"
            if leftovers := process.kill_leftovers(record.name, self.settings.data_dir):  # before a restart starts beside them
                log.warning("replica %s: stopped %d process(es) it left behind: %s", record.name, len(leftovers), leftovers)
            log.warning("replica %s: %s; restarting in %.0f s", record.name, reason, delay)
            self.store.update_replica(record.name, phase=PodPhase.CRASH_LOOP, ready=False)
            self._publish(record.replace(phase=PodPhase.CRASH_LOOP, ready=False), history=HistoryDraft(
                Action.CRASH, record.name, before={"phase": record.phase.value}, after={"phase": PodPhase.CRASH_LOOP.value},
                message=f"{reason}; restart #{record.restarts + 1} in {delay:.0f} s; log: {record.log_path}"),
                outcome=Outcome.RESTARTING)
        elif now >= self._restart_at.get(record.name, 0.0):
            self.launch(record, restart=True)

    async def _probe(self, record: ReplicaRecord, health_path: str) -> bool:
        try:
            response = await self._http.get(f"http://127.0.0.1:{record.port}{health_path}")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _publish(self, record: ReplicaRecord, **history: Any) -> None:
        self.report(
            EventType.REPLICA_STATUS,
            {
                "name": record.name, "deployment": record.deployment, "phase": record.phase.value,
                "ready": record.ready, "restarts": record.restarts, "business": record.labels.get("business"),
            },
            **history,
        )
