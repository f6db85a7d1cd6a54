"""LoRA adapters on running vLLM pools (multi-LoRA): desired state and a level-triggered reconciler.

A pool's adapters are recorded like every other change (corral.store: the adapter row and a pending
`adapter-add` history row in one transaction), then carried out. Carrying out is one rule, applied
both by the API call that adds or removes an adapter and by a loop every second: for each ready
replica of a LoRA-enabled vLLM pool, read what it has loaded (`GET /v1/models` lists LoRA modules
with a `parent`), and load (`POST /v1/load_lora_adapter`) or unload (`POST /v1/unload_lora_adapter`)
until it matches the desired set (`corral.domain.adapters.plan_sync`). So a replica that starts
later — a scale-up, a crash restart, a replica that lost its adapters — gets them without anyone
asking, and one that was unreachable during a removal unloads when it answers again.

The add itself is checked end to end: the adapter is loaded on every ready replica before the call
answers, and if a replica refuses it (a bad directory, a rank vLLM cannot take) the change is rolled
back (row removed, loaded copies unloaded, history `rolled_back` with vLLM's reason), so a desired
state that can never be reached is never left behind. A replica that cannot be reached is not a
refusal: the loop keeps trying it. Before anything is recorded, the adapter's files are checked against
the pool (`domain.adapters.check_adapter_files`): its base model, DoRA, its chat template and EOS. An add
or remove that a control-plane restart interrupted is judged at start by what the replicas then have
loaded (`judge_interrupted` here, `domain.history.judge_adapter`): a refused add is rolled back as above.

The gateway needs nothing for adapters: vLLM answers to adapter names itself, so requests with
`model: <adapter>` pass through a business service unchanged, and its `GET /v1/models` (answered by a
replica) lists the pool's tag and its adapters. Between a replica turning ready and the loop's next
pass (woken at once by the `replica_status` event) a request for an adapter may reach a replica that
has not loaded it yet and get vLLM's 404.

Backend-neutral: it reads deployments and pods from the backend and talks to pods' endpoints; on
Kubernetes the adapter directory must be readable at the same path inside the pods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from corral.aio import stop, woken_or_every
from corral.backends.base import Backend
from corral.domain.adapters import (
    Adapter,
    check_adapter_files,
    check_adapter_name,
    check_can_add,
    lora_enabled,
    parse_loaded,
    plan_sync,
    static_names,
)
from corral.domain.errors import Conflict, Hint, NotFound
from corral.domain.finetune_request import ADAPTER_METHODS
from corral.domain.history import Action, AdapterProbe, HistoryDraft, Intent, Observed, Outcome
from corral.domain.models import Deployment, Pod
from corral.domain.tasks import TaskState
from corral.events import EventBus, EventType
from corral.finetune.checks import adapter_files, resolved_model
from corral.intents import Intents
from corral.store.state import StateStore
from corral.views import AdapterRemoveResult, AdapterResult, AdapterView, FinetuneTask

log = logging.getLogger("corral.adapters")

LOAD_TIMEOUT_S = 120.0  # loading reads the adapter's weights from disk: seconds for a large one
RETRY_MAX_S = 60.0  # back-off cap of a replica that refuses an adapter the desired state lists
ADAPTER_ACTIONS = (Action.ADAPTER_ADD, Action.ADAPTER_REMOVE)  # the history rows this module writes and judges


class AdapterRefused(Exception):
    """The replica answered and said no (4xx): trying again the same way will not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ReplicaAdapters(Protocol):
    """How the reconciler asks a replica (an engine endpoint) about its adapters."""

    async def loaded(self, endpoint: str) -> dict[str, str]: ...
    async def load(self, endpoint: str, name: str, path: str) -> None: ...
    async def unload(self, endpoint: str, name: str) -> None: ...
    async def close(self) -> None: ...


class VllmAdapterClient:
    """vLLM's runtime LoRA API (the server needs `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""

    def __init__(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(LOAD_TIMEOUT_S, connect=2.0))

    async def loaded(self, endpoint: str) -> dict[str, str]:
        response = await self._http.get(f"{endpoint}/v1/models", timeout=10.0)
        response.raise_for_status()
        return parse_loaded(response.json())

    async def load(self, endpoint: str, name: str, path: str) -> None:
        response = await self._http.post(f"{endpoint}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if response.status_code == 400 and "already been loaded" in response.text:
            return  # loaded meanwhile (another pass): the state wanted
        if 400 <= response.status_code < 500:
            raise AdapterRefused(_error_message(response))
        response.raise_for_status()

    async def unload(self, endpoint: str, name: str) -> None:
        response = await self._http.post(f"{endpoint}/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 404:
            return  # not loaded: the state wanted
        if 400 <= response.status_code < 500:
            raise AdapterRefused(_error_message(response))
        response.raise_for_status()

    async def close(self) -> None:
        await self._http.aclose()


def _error_message(response: httpx.Response) -> str:
    """vLLM's error text (`{"error": {"message"}}`, or its plain body), cut to a readable length."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else str(body.get("error") or body)
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text
    return f"{response.status_code}: {message.strip()[:500]}"


@dataclass(frozen=True)
class _Problem:
    replica: str
    adapter: str | None  # None: the replica could not be asked at all
    message: str
    refused: bool  # the replica answered no (vs. could not be reached)


@dataclass
class _Seen:
    """A replica's adapters at the last look, and which incarnation of it that was."""

    identity: tuple[Any, ...]
    loaded: dict[str, str]
    desired: tuple[tuple[str, str], ...]  # the desired set it was last brought to (a fingerprint)
    at: float  # monotonic time of that look
    synced: bool  # it matched the desired set then


class AdapterManager:
    """Adds and removes pools' adapters (API) and keeps every ready replica's loaded set equal to them (loop)."""

    def __init__(self, backend: Backend, store: StateStore, bus: EventBus, client: ReplicaAdapters | None = None,
                 interval_s: float = 1.0, recheck_s: float = 10.0) -> None:
        self.backend = backend
        self.store = store
        self.intents = Intents(store)  # the history rows of adds and removes
        self.bus = bus
        self.client: ReplicaAdapters = client or VllmAdapterClient()
        self.interval_s = interval_s  # how often the loop looks
        self.recheck_s = recheck_s  # a replica in sync is asked again after this long (someone may have unloaded by hand)
        self._locks: dict[str, asyncio.Lock] = {}
        self._desired: dict[str, list[Adapter]] = {}  # pool → adapters (a cache of the store, for views)
        self._seen: dict[str, _Seen] = {}  # replica → what it had loaded
        self._retry_at: dict[tuple[str, str], tuple[int, float]] = {}  # (replica, adapter) → (failures, when to retry)
        self._wake = asyncio.Event()
        self._interrupted = False  # adapter rows a stopped control plane left pending, still to judge
        self._task: asyncio.Task | None = None
        bus.listen(self._on_event)

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._refresh()
        await self.judge_interrupted()
        self._task = asyncio.create_task(self._run(), name="adapter-reconciler")

    async def judge_interrupted(self) -> None:
        """The adds and removes a stopped control plane left pending, judged by what the replicas have loaded
        (`domain.history.judge_adapter`) once each pool's ready replicas were brought to its desired adapters: an add a
        replica refuses is rolled back as a live add is (removed from the desired state, unloaded where it loaded),
        never left desired and retried forever under a success. One whose replicas have not answered yet stays pending
        and is judged on a later pass."""
        pending = [row for row in self.store.pending_history() if row["action"] in ADAPTER_ACTIONS]
        if not pending:
            self._interrupted = False
            return
        self._interrupted = True
        probes: dict[tuple[str, str], AdapterProbe] = {}
        for pool in sorted({row["target"] for row in pending}):
            deployment = self.backend.get_deployment(pool)
            if deployment is None:
                continue  # gone: judged without a probe
            async with self._lock(pool):
                problems = await self._sync_pool(deployment, self._desired.get(pool, []), force=True)
                ready = self._ready(pool)
                answered = [p for p in ready if p.name in self._seen and self._seen[p.name].identity == _identity(p)]
                desired = {a.name for a in self._desired.get(pool, [])}
                for row in pending:
                    name = ((row.get("after") if row["action"] == Action.ADAPTER_ADD else row.get("before")) or {}).get("adapter")
                    if row["target"] != pool or not isinstance(name, str):
                        continue
                    refused = next((p.message for p in problems if p.refused and p.adapter == name), None)
                    probes[(pool, name)] = AdapterProbe(desired=name in desired, ready=len(ready), answered=len(answered),
                                                        loaded_on=sum(1 for p in answered if name in self._seen[p.name].loaded),
                                                        refused=refused)
                    if refused is not None and name in desired:  # rolled back as `add` does: forgotten, then unloaded
                        self.store.remove_adapter(pool, name)
                        self._refresh()
                        await self._sync_pool(deployment, self._desired.get(pool, []), force=True)
        self.intents.complete_interrupted(lambda: Observed(deployments={}, pods=[], services={}, adapters=probes),
                                          actions=ADAPTER_ACTIONS)
        self._interrupted = any(row["action"] in ADAPTER_ACTIONS for row in self.store.pending_history())

    async def close(self) -> None:
        self.bus.unlisten(self._on_event)
        await stop(self._task)
        await self.client.close()

    def _on_event(self, type_: EventType, data: dict[str, Any]) -> None:
        if type_ == EventType.REPLICA_STATUS and data.get("ready"):
            self._wake.set()  # a replica turned ready: give it its adapters now, not within the second
        elif (type_ == EventType.DEPLOYMENT and data.get("action") == "deleted"
              and data.get("name") in self._desired):
            # A deleted pool's adapters go with it (the local store deletes them with its rows; a cluster's does not).
            for adapter in self._desired.pop(data["name"]):
                self.store.remove_adapter(adapter.pool, adapter.name)

    async def _run(self) -> None:
        while True:
            await woken_or_every(self._wake, self.interval_s)
            try:
                await self.reconcile()
            except Exception:  # one bad pass must not end the loop
                log.exception("adapter reconciliation failed")

    # the rule ----------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """One pass over every LoRA-enabled vLLM pool (level-triggered: whatever happened since the last one)."""
        self._refresh()
        if self._interrupted:  # adapter changes a restart interrupted, not judged yet (no replica had answered)
            await self.judge_interrupted()
        for deployment in self.backend.list_deployments():
            if not lora_enabled(deployment):
                continue
            async with self._lock(deployment.name):
                problems = await self._sync_pool(deployment, self._desired.get(deployment.name, []))
            for problem in problems:
                log.warning("replica %s: adapter %s: %s", problem.replica, problem.adapter or "(any)", problem.message)

    async def _sync_pool(self, deployment: Deployment, adapters: list[Adapter], force: bool = False) -> list[_Problem]:
        """Bring each ready replica of the pool to `adapters`; returns what could not be done. `force`: ask every
        replica now, even one checked a moment ago (an API call, which answers with the outcome)."""
        keep = static_names(deployment)
        pods = self.backend.list_pods(deployment.name)
        for pod in pods:
            if not (pod.ready and pod.endpoint):
                self._seen.pop(pod.name, None)  # asked again from scratch once it is ready (it may be a new process)
        ready = [p for p in pods if p.ready and p.endpoint]
        before = self._loaded_counts(deployment.name, ready)
        results = await asyncio.gather(*(self._sync_replica(p, adapters, keep, force) for p in ready))
        if self._loaded_counts(deployment.name, ready) != before:
            self._publish(deployment.name, ready)
        return [problem for found in results for problem in found]

    async def _sync_replica(self, pod: Pod, adapters: list[Adapter], keep: set[str], force: bool) -> list[_Problem]:
        assert pod.endpoint is not None
        now = time.monotonic()
        identity = _identity(pod)
        wanted = tuple(sorted((a.name, a.path) for a in adapters))
        seen = self._seen.get(pod.name)
        if (not force and seen is not None and seen.synced and seen.identity == identity and seen.desired == wanted
                and now - seen.at < self.recheck_s):
            return []
        try:
            loaded = await self.client.loaded(pod.endpoint)
        except (httpx.HTTPError, ValueError) as exc:
            self._seen.pop(pod.name, None)
            return [_Problem(pod.name, None, f"could not list its adapters ({type(exc).__name__}: {exc})", refused=False)]
        plan = plan_sync(adapters, loaded, keep)
        problems: list[_Problem] = []
        for name in plan.unload:
            problems += await self._act(pod, name, loaded, lambda n=name: self.client.unload(pod.endpoint, n), None)
        for name, path in plan.load:
            retry_at = self._retry_at.get((pod.name, name), (0, 0.0))[1]
            if not force and retry_at > now:
                problems.append(_Problem(pod.name, name, "refused before; retrying later", refused=True))
                continue
            problems += await self._act(pod, name, loaded, lambda n=name, p=path: self.client.load(pod.endpoint, n, p), path)
        self._seen[pod.name] = _Seen(identity, loaded, wanted, time.monotonic(), synced=not problems)
        return problems

    async def _act(self, pod: Pod, name: str, loaded: dict[str, str], call: Any, path: str | None) -> list[_Problem]:
        """One load (`path` set) or unload on one replica, keeping `loaded` and the back-off current."""
        try:
            await call()
        except AdapterRefused as exc:
            failures = self._retry_at.get((pod.name, name), (0, 0.0))[0] + 1
            self._retry_at[(pod.name, name)] = (failures, time.monotonic() + min(RETRY_MAX_S, 2.0**failures))
            return [_Problem(pod.name, name, exc.message, refused=True)]
        except httpx.HTTPError as exc:
            return [_Problem(pod.name, name, f"{type(exc).__name__}: {exc}", refused=False)]
        self._retry_at.pop((pod.name, name), None)
        if path is None:
            loaded.pop(name, None)
        else:
            loaded[name] = path
        return []

    # API ---------------------------------------------------------------------------------------
    async def add(self, pool: str, name: str, *, path: str, task_id: str | None, rank: int) -> AdapterResult:
        """Record the adapter (desired state + pending history), load it on every ready replica, and answer with how
        many have it. A replica's refusal rolls the whole change back (409 with its reason)."""
        name = check_adapter_name(name)
        async with self._lock(pool):
            deployment = self._pool(pool)
            check_can_add(deployment, name, rank, self.store.list_adapters(pool))
            # Trained for this pool? Its base model, DoRA, its chat template and EOS against the pool's (read from the files
            # where they are here; on a cluster the replicas' paths may not be).
            files = await asyncio.to_thread(adapter_files, Path(path), deployment.model_id, list(deployment.engine_args))
            check_adapter_files(deployment, resolved_model(deployment.model_id), files)
            adapter = Adapter(pool=pool, name=name, path=path, task_id=task_id, rank=rank)
            intent = Intent([HistoryDraft(Action.ADAPTER_ADD, pool, after={"adapter": name, "taskId": task_id, "path": path},
                                          message=f"LoRA adapter '{name}' added" + (f" from task {task_id}" if task_id else ""))])
            self.store.add_adapter(adapter, intent)
            try:
                self._refresh()
                problems = await self._sync_pool(deployment, self._desired.get(pool, []), force=True)
                refused = [p for p in problems if p.refused and p.adapter == name]
                if refused:
                    self.store.remove_adapter(pool, name)
                    self._refresh()
                    await self._sync_pool(deployment, self._desired.get(pool, []), force=True)  # unload where it loaded
                    raise Conflict(f"replica {refused[0].replica} could not load adapter '{name}' from {path}: "
                                   f"{refused[0].message}; nothing was added")
            except BaseException as exc:
                self.intents.fail(intent, exc)
                raise
            view = self._view(adapter, self._ready(pool))
            message = f"adapter '{name}' loaded on {view.loadedOn} of {view.readyReplicas} ready replica(s) of {pool}"
            if view.loadedOn < view.readyReplicas:
                message += "; the others get it as soon as they answer (the adapter reconciler retries every second)"
            if not view.readyReplicas:
                message += "; replicas load it when they become ready"
            self.intents.complete(intent, Outcome.SUCCESS, message=message)
        return AdapterResult(success=True, pool=pool, adapter=view, message=message)

    async def remove(self, pool: str, name: str) -> AdapterRemoveResult:
        """Forget the adapter and unload it from every ready replica (one that cannot be reached now is unloaded by
        the loop once it answers)."""
        async with self._lock(pool):
            deployment = self._pool(pool)
            adapter = next((a for a in self.store.list_adapters(pool) if a.name == name), None)
            if adapter is None:
                raise NotFound(f"pool '{pool}' has no adapter named '{name[:80]}'", Hint.LIST_ADAPTERS, pool=pool)
            intent = Intent([HistoryDraft(Action.ADAPTER_REMOVE, pool, before={"adapter": name, "taskId": adapter.task_id,
                                                                               "path": adapter.path},
                                          message=f"LoRA adapter '{name}' removed")])
            self.store.remove_adapter(pool, name, intent)
            try:
                self._refresh()
                problems = await self._sync_pool(deployment, self._desired.get(pool, []), force=True)
            except BaseException as exc:  # the sync broke (a replica's refusal is a problem it returns)
                self.intents.fail(intent, exc)
                raise
            still = sorted({p.replica for p in problems})
            message = f"adapter '{name}' removed from {pool}" + (
                f"; {', '.join(still)} will unload it once reachable" if still else "")
            self.intents.complete(intent, Outcome.SUCCESS, message=message)
        return AdapterRemoveResult(success=True, pool=pool, removed=name)

    def list(self, pool: str) -> list[AdapterView]:
        self._pool(pool)
        return self.views(pool, self.backend.list_pods(pool))

    def views(self, pool: str, pods: Iterable[Pod]) -> list[AdapterView]:
        """The pool's adapters with how many ready replicas have each loaded now (for `GET /api/deployments`)."""
        ready = [p for p in pods if p.ready]
        return [self._view(a, ready) for a in self._desired.get(pool, [])]

    def loaded(self) -> dict[str, frozenset[str]]:
        """Replica → the adapters it had loaded at the last look (replica picking's LoRA filter, corral.replica_inputs)."""
        return {name: frozenset(seen.loaded) for name, seen in self._seen.items() if seen.loaded}

    # helpers -----------------------------------------------------------------------------------
    def _view(self, adapter: Adapter, ready: list[Pod]) -> AdapterView:
        loaded_on = sum(1 for p in ready if (seen := self._seen.get(p.name)) is not None and seen.identity == _identity(p)
                        and adapter.name in seen.loaded)
        return AdapterView(name=adapter.name, taskId=adapter.task_id, path=adapter.path, rank=adapter.rank, loadedOn=loaded_on,
                           readyReplicas=len(ready))

    def _loaded_counts(self, pool: str, ready: list[Pod]) -> dict[str, int]:
        return {v.name: v.loadedOn for v in self.views(pool, ready)}

    def _publish(self, pool: str, ready: list[Pod]) -> None:
        self.bus.publish(EventType.ADAPTERS,
                         {"pool": pool, "adapters": [v.wire() for v in self.views(pool, ready)]})

    def _ready(self, pool: str) -> list[Pod]:
        return [p for p in self.backend.list_pods(pool) if p.ready]

    def _refresh(self) -> None:
        grouped: dict[str, list[Adapter]] = {}
        for adapter in self.store.list_adapters():
            grouped.setdefault(adapter.pool, []).append(adapter)
        self._desired = grouped

    def _pool(self, pool: str) -> Deployment:
        deployment = self.backend.get_deployment(pool)
        if deployment is None:
            raise NotFound(f"pool '{pool[:80]}' not found", Hint.LIST_DEPLOYMENTS)
        return deployment

    def _lock(self, pool: str) -> asyncio.Lock:
        return self._locks.setdefault(pool, asyncio.Lock())


def _identity(pod: Pod) -> tuple[Any, ...]:
    """Which incarnation of a replica this is: a restart (same name, new process) must be asked again."""
    return (pod.endpoint, pod.restarts, pod.created_at)


def task_adapter(task: FinetuneTask) -> tuple[str, int]:
    """(adapter directory, LoRA rank) of a finetune task that can be added to a pool: a completed LoRA or QLoRA
    task (a full finetune has no adapter: deploy it as its own pool)."""
    from corral.model_files import adapter_rank

    if task.status != TaskState.COMPLETED or not task.output:
        raise Conflict(f"task {task.id} is {task.status}; only a completed task's adapter can be added to a pool")
    if task.method not in ADAPTER_METHODS:
        raise Conflict(f"task {task.id} is a {task.method} finetune and has no LoRA adapter", Hint.DEPLOY_AS_POOL,
                       task=task.id)
    path = Path(task.output)
    return str(path), adapter_rank(path)
