"""Sleeping replicas (issue 31): put a replica to sleep or wake it, intent first, and keep every replica in the sleep
state recorded for it.

A request (`POST /api/pods/{name}/sleep|wake`) records the desired state (the replica row's `sleep_level`) with a
pending `sleep`/`wake` history row in one transaction, takes the replica out of routing (a replica wanted asleep is
no target: gateway/routing.py), then calls the engine (`corral.engines.SleepSupport`), records what it reports and
completes the row. The loop (`reconcile_once`, every `interval_s`) asks each ready replica whose state may differ
from its desired one (`GET /is_sleeping`) and drives it there: after a crash between the intent and the call, and
after a restarted process, which always starts awake (the supervisor records it awake). The rows a crash left
pending are completed by the loop once the replica is where the row wanted it, or failed when the replica is gone.

Sleep state lives in the local backend's replica rows; other backends answer 409 for now.

`wake_for_demand(service)` is the hook for the gateway's hold queue (issue 31 item 4, not built yet): it wakes a
sleeping replica of a service whose replicas are all asleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from corral import failpoints
from corral.aio import stop
from corral.backends.base import Backend
from corral.domain import labels as L
from corral.domain.errors import Conflict, Hint, NotFound
from corral.domain.gpu_ledger import GpuLedger, Holder, HolderKind
from corral.domain.history import Action, HistoryDraft, Intent, Outcome
from corral.domain.models import PodPhase
from corral.domain.sleep import SleepLevel, SleepState, SleepStep, reconcile, shown_state
from corral.engines import HttpCall, SleepSupport, get_engine
from corral.events import EventBus, EventType
from corral.intents import Intents
from corral.store.state import ReplicaRecord, StateStore

log = logging.getLogger("corral.sleeping")

SLEEP_ACTIONS = (Action.SLEEP, Action.WAKE)
CALL_TIMEOUT_S = 300.0
TIMINGS_KEPT = 200  # per model and action: the percentiles are over the last this many calls  # a level-2 wake of a large model reloads its weights from disk: minutes at worst


class SleepCallFailed(Exception):
    pass


class SleepManager:
    def __init__(self, backend: Backend, store: StateStore, bus: EventBus, *,
                 gpu_ledger: Callable[[], GpuLedger] | None = None,
                 routes_applied: Callable[[], Awaitable[Any]] | None = None, interval_s: float = 1.0) -> None:
        self.backend = backend
        self.store = store
        self.bus = bus
        self.intents = Intents(store)
        self.gpu_ledger = gpu_ledger
        self.routes_applied = routes_applied  # awaits the data plane serving the current routing table
        self.interval_s = interval_s
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(CALL_TIMEOUT_S, connect=2.0))
        self._locks: dict[str, asyncio.Lock] = {}
        # (model, "sleep" | "wake") → the last engine call times (seconds), for the percentiles the views show
        self.timings: dict[tuple[str, str], deque[float]] = {}
        self._task: asyncio.Task | None = None

    @property
    def supported(self) -> bool:
        return getattr(self.backend, "supports_sleep", False)

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.supported:
            self._task = asyncio.create_task(self._run(), name="sleep-reconciler")

    async def close(self) -> None:
        await stop(self._task)
        await self._http.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception:  # one bad pass must not end reconciliation
                log.exception("sleep reconciliation failed")
            await asyncio.sleep(self.interval_s)

    # requests ----------------------------------------------------------------------------------
    async def sleep(self, name: str, level: SleepLevel, *, reason: str | None = None,
                    before_call: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
        """`reason`: why, for the history row (a model hand-over says which); `before_call`: awaited once the replica
        is out of routing, before the engine sleeps (the hand-over drains its requests in flight there)."""
        return await self._request(name, level, reason, before_call)

    async def wake(self, name: str, *, reason: str | None = None) -> dict[str, Any]:
        return await self._request(name, None, reason)

    async def wake_for_demand(self, service: str) -> str | None:
        """Issue 31 item 4's hook: wake one sleeping replica selected by `service` (the gateway holds its requests
        meanwhile); the replica's name, or None when there is none to wake or one is awake or waking already."""
        found = self.backend.get_service(service)
        if found is None:
            return None
        pods = [p for p in self.backend.list_pods() if found.selects(p)]
        if any(p.sleep_level is None for p in pods):
            return None  # awake or waking already
        asleep = sorted(pods, key=lambda p: (p.sleep_level or 0, p.name))
        if not asleep:
            return None
        await self.wake(asleep[0].name)
        return asleep[0].name

    async def _request(self, name: str, level: SleepLevel | None, reason: str | None = None,
                       before_call: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
        if not self.supported:
            raise Conflict("sleeping replicas need the local backend for now (their sleep state is kept in its "
                           "replica rows); the kubernetes backend does not offer it yet")
        record = self._record(name)
        support = self._support(record)
        if level is not None and (refusal := support.refusal(level)) is not None:
            raise Conflict(f"pod '{name}' cannot sleep at level {int(level)}: {refusal}")
        async with self._lock(name):
            record = self._record(name)
            if record.sleep_level == level and record.sleep_state == shown_state(level, level is not None):
                return self._answer(record, 0.0, None)  # already there: nothing to record
            if level is not None and record.sleep_level not in (None, level):
                raise Conflict(f"pod '{name}' sleeps at level {int(record.sleep_level)}: wake it first, then put it to "
                               f"sleep at level {int(level)}")
            previous = record.sleep_level
            if self.gpu_ledger is not None:
                # At most one awake replica per shared GPU unit, and level-1 sleepers within the host budget.
                self.gpu_ledger().set_sleep(Holder.replica(name), level)
            action = Action.WAKE if level is None else Action.SLEEP
            before = {"sleep": record.sleep_state.value, "sleepLevel": int(record.sleep_level) if record.sleep_level else None}
            after = {"sleep": (SleepState.AWAKE if level is None else SleepState.SLEEPING).value,
                     "sleepLevel": int(level) if level else None}
            why = self._why(action, level) + (f": {reason}" if reason else "")
            intent = Intent([HistoryDraft(action, name, before=before, after=after, message=why)])
            self.store.set_sleep_intent(name, level, intent)  # intent first: desired state + pending row
            failpoints.reached("sleep.intent-recorded")
            record = record.replace(sleep_level=level)
            if level is None:
                self._observed(record, SleepState.WAKING)
            else:
                self._observed(record, record.sleep_state)  # out of routing now: a replica wanted asleep is no target
            if self.routes_applied is not None and level is not None:
                with contextlib.suppress(Exception):  # a lagging data plane: the sleep goes on, the table follows
                    await self.routes_applied()
            if before_call is not None and level is not None:
                await before_call(name)
            started = time.monotonic()
            try:
                state = await self._drive(record, support, level, previous)
            except SleepCallFailed as exc:
                # The engine refused or could not be reached: the desired state goes back to what it was, so the loop
                # does not retry a call that fails; the row says why.
                self.store.update_replica(name, sleep_level=int(previous) if previous else None)
                reported = await self._ask(record, support)
                self._observed(record.replace(sleep_level=previous), shown_state(previous, reported))
                self.intents.fail(intent, exc)
                raise Conflict(f"pod '{name}': {exc}") from None
            seconds = time.monotonic() - started
            model = record.labels.get(L.MODEL, record.deployment)
            self.timings.setdefault((model, "wake" if level is None else "sleep"), deque(maxlen=TIMINGS_KEPT)).append(seconds)
            record = self._observed(record, state)
            self.intents.complete(intent, Outcome.SUCCESS, message=f"{why}: {seconds:.2f} s")
            return self._answer(record, seconds, intent.ids[-1] if intent.ids else None)

    # views -------------------------------------------------------------------------------------
    def timing_percentiles(self) -> dict[str, dict[str, float | int | None]]:
        """Model → its sleep and wake times measured here (p50, p95 in seconds, and how many), from the last calls."""
        models: dict[str, dict[str, float | int | None]] = {}
        for (model, action), seconds in sorted(self.timings.items()):
            ordered = sorted(seconds)
            entry = models.setdefault(model, {f"{a}{k}": None for a in ("sleep", "wake") for k in ("P50S", "P95S")}
                                      | {"sleeps": 0, "wakes": 0})
            entry[f"{action}P50S"] = round(ordered[(len(ordered) - 1) // 2], 3)
            entry[f"{action}P95S"] = round(ordered[max(0, -(-95 * len(ordered) // 100) - 1)], 3)
            entry[f"{action}s"] = len(ordered)
        return models

    def sharing(self, ledger: GpuLedger) -> dict[str, Any]:
        """Each GPU unit of `ledger` with its awake replica and those asleep on it, the times measured per model and
        the host memory level-1 sleepers use (`GET /api/gpus/sharing`, the UI's Shared GPUs tab)."""
        models = {p.name: p.model or "?" for p in self.backend.list_pods()}
        gpus = []
        for unit in ledger.units:
            awake = ledger.awake_on(unit.id)
            awake_name = awake.name if awake is not None and awake.kind is HolderKind.REPLICA else None
            sleepers = [{"pod": h.name, "model": models.get(h.name, "?"), "level": int(ledger.sleep_level(h) or 1)}
                        for h in ledger.sleepers_on(unit.id) if h.kind is HolderKind.REPLICA]
            gpus.append({"unit": unit.id, "awake": awake_name,
                         "awakeModel": models.get(awake_name, "?") if awake_name else None, "sleeping": sleepers})
        return {"gpus": gpus, "models": [{"model": m, **t} for m, t in self.timing_percentiles().items()],
                "hostBytesUsed": ledger.host_bytes_used(), "hostBytesBudget": ledger.host_budget_bytes}

    def metrics(self) -> list[str]:
        """`/api/metrics`: replicas asleep per model, and the sleep and wake times measured (p50 and p95)."""
        asleep: dict[str, int] = {}
        for record in self.store.list_replicas():
            if record.sleep_state == SleepState.SLEEPING:
                model = record.labels.get(L.MODEL, record.deployment)
                asleep[model] = asleep.get(model, 0) + 1
        lines = ["# HELP corral_replicas_asleep Replicas asleep now (sleep mode), per model.",
                 "# TYPE corral_replicas_asleep gauge"]
        lines += [f'corral_replicas_asleep{{model="{m}"}} {n}' for m, n in sorted(asleep.items())]
        lines += ["# HELP corral_sleep_seconds Engine sleep and wake times measured by Corral (the last calls).",
                  "# TYPE corral_sleep_seconds gauge"]
        for model, entry in self.timing_percentiles().items():
            for action in ("sleep", "wake"):
                for q, key in (("0.5", "P50S"), ("0.95", "P95S")):
                    if entry[f"{action}{key}"] is not None:
                        lines.append(f'corral_sleep_seconds{{model="{model}",action="{action}",quantile="{q}"}} '
                                     f"{entry[f'{action}{key}']}")
        return lines

    # reconciliation ----------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """Drive every ready replica to its recorded sleep state; complete or fail the rows a crash left pending."""
        pending = [row for row in self.store.pending_history() if row["action"] in SLEEP_ACTIONS]
        records = {r.name: r for r in self.store.list_replicas()}
        for row in pending:
            record = records.get(row["target"])
            if record is None or record.phase == PodPhase.TERMINATING:
                self.store.complete_rows([row["id"]], Outcome.FAILED, message="the replica is gone")
        waiting = {row["target"] for row in pending}
        for record in records.values():
            if not record.ready or record.phase != PodPhase.RUNNING:
                continue
            if record.sleep_level is None and record.sleep_state == SleepState.AWAKE and record.name not in waiting:
                continue  # wanted awake, seen awake, nothing pending: nothing to ask
            lock = self._lock(record.name)
            if lock.locked():
                continue  # a request is driving it
            async with lock:
                await self._reconcile(record, [row for row in pending if row["target"] == record.name])

    async def _reconcile(self, record: ReplicaRecord, rows: list[dict[str, Any]]) -> None:
        try:
            support = self._support(record)
        except Conflict:
            return
        reported = await self._ask(record, support)
        step = reconcile(record.sleep_level, reported)
        if reported is None:
            return
        if step != SleepStep.NONE:
            log.info("replica %s is %s but should be %s: %s", record.name, "asleep" if reported else "awake",
                     "awake" if record.sleep_level is None else f"asleep (level {int(record.sleep_level)})", step.value)
            woken_from = [(row.get("before") or {}).get("sleepLevel") for row in rows if row["action"] == Action.WAKE]
            asleep_at = SleepLevel(woken_from[-1]) if woken_from and woken_from[-1] in (1, 2) else None
            try:
                state = await self._drive(record, support, record.sleep_level, asleep_at)
            except SleepCallFailed as exc:
                log.warning("replica %s: %s", record.name, exc)
                return
        else:
            state = shown_state(record.sleep_level, reported)
        if state != record.sleep_state:
            self._observed(record, state)
        for row in rows:
            wanted = (row.get("after") or {}).get("sleepLevel")
            done = (wanted or None) == (int(record.sleep_level) if record.sleep_level else None)
            self.store.complete_rows([row["id"]], Outcome.SUCCESS if done else Outcome.ROLLED_BACK,
                                     message=f"{row.get('message') or row['action']}: completed by the reconciler after "
                                             "a control-plane restart" if done else "a later request replaced it")

    # engine calls ------------------------------------------------------------------------------
    async def _drive(self, record: ReplicaRecord, support: SleepSupport, level: SleepLevel | None,
                     asleep_at: SleepLevel | None) -> SleepState:
        """Sleep at `level`, or wake (None) from `asleep_at` (level 1 when not known: one plain wake_up call)."""
        calls = (support.wake_calls(asleep_at or SleepLevel.OFFLOAD) if level is None else (support.sleep_call(level),))
        for call in calls:
            await self._call(record, call)
        return SleepState.AWAKE if level is None else SleepState.SLEEPING

    async def _call(self, record: ReplicaRecord, call: HttpCall) -> httpx.Response:
        url = f"http://127.0.0.1:{record.port}{call.path}"
        try:
            response = await self._http.request(call.method, url, params=dict(call.params), json=call.json)
        except httpx.HTTPError as exc:
            raise SleepCallFailed(f"{call.method} {call.path} failed: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise SleepCallFailed(f"{call.method} {call.path} answered {response.status_code}: {response.text[:200]}")
        return response

    async def _ask(self, record: ReplicaRecord, support: SleepSupport) -> bool | None:
        """Whether the engine sleeps; None when it cannot be asked. An engine without a state endpoint (SGLang) is
        taken to be as last recorded."""
        if support.state is None:
            return record.sleep_state != SleepState.AWAKE
        try:
            response = await self._call(record, support.state)
            return SleepSupport.is_sleeping(response.json())
        except (SleepCallFailed, ValueError):
            return None

    # helpers -----------------------------------------------------------------------------------
    def _record(self, name: str) -> ReplicaRecord:
        record = self.store.get_replica(name)
        if record is None or record.phase == PodPhase.TERMINATING:
            raise L.unknown_name(name, "pod", NotFound(f"pod '{name}' not found", Hint.LIST_PODS))
        return record

    def _support(self, record: ReplicaRecord) -> SleepSupport:
        deployment = self.store.get_deployment(record.deployment)
        if deployment is None:
            raise NotFound(f"pod '{record.name}' not found (its deployment is gone)")
        engine = get_engine(deployment.engine)
        support = engine.sleep_support(list(deployment.engine_args))
        if support is None:
            raise Conflict(f"pod '{record.name}' cannot sleep: {engine.sleep_refusal(list(deployment.engine_args))}")
        return support

    def _observed(self, record: ReplicaRecord, state: SleepState) -> ReplicaRecord:
        self.store.update_replica(record.name, sleep_state=state.value)
        record = record.replace(sleep_state=state)
        self.bus.publish(EventType.REPLICA_STATUS, {
            "name": record.name, "deployment": record.deployment, "phase": record.phase.value, "ready": record.ready,
            "restarts": record.restarts, "business": record.labels.get(L.BUSINESS), "sleep": state.value,
            "sleepLevel": int(record.sleep_level) if record.sleep_level else None})
        return record

    @staticmethod
    def _why(action: Action, level: SleepLevel | None) -> str:
        if action == Action.WAKE:
            return "woken"
        return ("put to sleep at level 1 (weights offloaded to host memory)" if level == SleepLevel.OFFLOAD
                else "put to sleep at level 2 (weights discarded)")

    @staticmethod
    def _answer(record: ReplicaRecord, seconds: float, history_id: int | None) -> dict[str, Any]:
        return {"pod": record.name, "sleep": record.sleep_state.value,
                "sleepLevel": int(record.sleep_level) if record.sleep_level else None,
                "seconds": round(seconds, 3), "historyId": history_id}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())
