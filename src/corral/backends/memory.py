"""MemoryBackend: a test and benchmark double that keeps pods as records in memory.

No engine process runs and nothing is persisted: a deployment, its pods and the services exist only
in this object. It exists so that the controller (and the API over it) can be tested and measured
fast, with 1,000 replicas if need be — the backend contract suite (`tests/contract/`) runs the
same scenarios on it as on the real backends, and `bench/control_plane.py` measures the control
plane on it. **It is never used by `corral serve`** (`Runtime` builds the local or the Kubernetes
backend from the settings; this one only comes in by hand, `Runtime(settings, backend=...)`).

What it keeps of the real backends' behaviour:
- pods named like the local backend's, `<deployment>-<5 chars>`, ready at once (configurable:
  `ready=False` leaves new pods `Pending` until `set_ready`), each with a fake endpoint
  `http://127.0.0.1:<n>` that nothing listens on (`endpoints=False`: none, so the gateway routes
  to no pod; `endpoint=URL`: every pod's, one local server standing in for all the engines, as
  `bench/control_plane.py` serves the `/metrics` pages the autopilot scrapes);
- `set_businesses` is all or nothing; `remove_replicas` removes exactly the named pods;
- each change's intent (its pending history rows) is written right before the change, through the
  intent writer its controller gives it (`set_intent_writer`) — the desired state lives in memory,
  not in Corral's database, so (as for a cluster) the rows go first; the controller completes them;
- observations go through `report` (a `replica_status` event per pod created, removed or turned
  ready), never straight to the history or the event bus;
- GPUs are optional whole device ids (`gpu_ids`), never handed to two pods;
- `desired_assignment` is empty: in-memory pods are never replaced behind Corral's back.

Reads are cheap at 1,000 pods: pods are indexed by deployment, and the sorted listings are cached
until the next change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import string
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from corral.backends.base import Backend, save_manifests
from corral.domain import labels as L
from corral.domain.errors import Conflict, NotFound
from corral.domain.gpu_ledger import GpuLedger, Holder, whole_units
from corral.domain.history import Intent
from corral.domain.models import Deployment, Pod, PodPhase, Service
from corral.events import EventType

_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class MemoryBackend(Backend):
    """Pods as records in memory, for fast controller tests and benchmarks; never used by `corral serve`."""

    supports_secret_env = False  # no process is launched to give them to

    def __init__(self, *, ready: bool = True, endpoints: bool = True, gpu_ids: Sequence[int] = (),
                 manifests_dir: Path | None = None, first_port: int = 40000, seed: int | None = None,
                 endpoint: str | None = None) -> None:
        self.ready = ready  # whether new pods are ready at once
        self.endpoints = endpoints
        self.endpoint = endpoint  # every pod's endpoint, when given (else a port of its own)
        self.gpu_ids = list(gpu_ids)
        self.manifests_dir = manifests_dir
        self.manifests_written: dict[str, list[dict]] = {}
        self._ports = itertools.count(first_port)
        self._random = random.Random(seed)
        self._deployments: dict[str, Deployment] = {}
        self._pods: dict[str, Pod] = {}
        self._by_deployment: dict[str, dict[str, Pod]] = {}  # deployment → its pods by name
        self._services: dict[str, Service] = {}
        self._failures: dict[str, BaseException] = {}  # method → the error its next call raises (see `fail_next`)
        self._cache: dict[Any, list[Any]] = {}  # sorted listings, dropped on every change
        self.report = _no_report

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to recover: the state lives (and dies) with this object."""

    async def close(self) -> None:
        """Nothing to stop."""

    # test hooks ------------------------------------------------------------------------------
    def fail_next(self, method: str, error: BaseException) -> None:
        """Make the next call of a mutation (e.g. "set_businesses") raise `error` after its intent is
        written and before anything changes, like a cluster write that failed."""
        if not callable(getattr(self, method, None)):
            raise ValueError(f"MemoryBackend has no method {method!r}")
        self._failures[method] = error

    def set_ready(self, name: str, ready: bool = True) -> Pod:
        """Turn a pod ready (Running) or not ready, and report it, as a health probe would."""
        pod = self._pods.get(name)
        if pod is None:
            raise NotFound(f"pod '{name}' not found")
        phase = PodPhase.RUNNING if ready or pod.phase == PodPhase.RUNNING else PodPhase.PENDING
        updated = self._put(dataclasses.replace(pod, ready=ready, phase=phase))
        self._report_status(updated)
        return updated

    # reads -----------------------------------------------------------------------------------
    def list_deployments(self) -> list[Deployment]:
        return list(self._sorted(("deployments",), self._deployments))

    def get_deployment(self, name: str) -> Deployment | None:
        return self._deployments.get(name)

    def list_pods(self, deployment: str | None = None) -> list[Pod]:
        if deployment is None:
            return list(self._sorted(("pods",), self._pods))
        return list(self._sorted(("pods", deployment), self._by_deployment.get(deployment, {})))

    def get_pod(self, name: str) -> Pod | None:
        return self._pods.get(name)

    def list_services(self) -> list[Service]:
        return list(self._sorted(("services",), self._services))

    def get_service(self, name: str) -> Service | None:
        return self._services.get(name)

    # writes ----------------------------------------------------------------------------------
    async def create_deployment(self, deployment: Deployment, service: Service | None, intent: Intent | None = None) -> list[Pod]:
        if deployment.name in self._deployments:
            raise Conflict(f"deployment '{deployment.name}' already exists")
        if service is not None and service.name in self._services:
            raise Conflict(f"a service named '{service.name}' already exists")
        gpus = self._pick_gpus(deployment, deployment.replicas)  # refuse before anything is recorded as begun
        self._begin(intent, "create_deployment")
        self._deployments[deployment.name] = dataclasses.replace(deployment, created_at=deployment.created_at or _now())
        self._by_deployment[deployment.name] = {}
        if service is not None:
            self._services[service.name] = dataclasses.replace(service, created_at=service.created_at or _now())
        return self._add_pods(deployment, gpus)

    async def delete_deployment(self, name: str, intent: Intent | None = None) -> Awaitable[None]:
        """Gone at once, pods and (for a standard deployment) its own service with it."""
        deployment = self._deployments.get(name)
        if deployment is None:
            raise NotFound(f"deployment '{name}' not found")
        self._begin(intent, "delete_deployment")
        pods = list(self._by_deployment.pop(name, {}).values())
        for pod in pods:
            del self._pods[pod.name]
        del self._deployments[name]
        for service in [s for s in self._services.values() if s.deployment == name and not s.is_business_service]:
            del self._services[service.name]
        self._changed()
        for pod in pods:
            self._report_status(pod, deleted=True)
        return _done()

    async def add_replicas(self, deployment: str, count: int, intent: Intent | None = None) -> list[Pod]:
        spec = self._deployments.get(deployment)
        if spec is None:
            raise NotFound(f"deployment '{deployment}' not found")
        gpus = self._pick_gpus(spec, count)
        self._begin(intent, "add_replicas")
        return self._add_pods(spec, gpus)

    async def remove_replicas(self, deployment: str, pods: list[str], intent: Intent | None = None) -> Awaitable[None]:
        """Remove exactly these pods, at once (no drain: nothing serves through them)."""
        mine = self._by_deployment.get(deployment, {})
        strangers = [name for name in pods if name not in mine]
        if strangers:
            raise Conflict(f"pod(s) {', '.join(strangers)} are not replicas of '{deployment}'")
        self._begin(intent, "remove_replicas")
        removed = [mine.pop(name) for name in dict.fromkeys(pods)]
        for pod in removed:
            del self._pods[pod.name]
        self._resize(deployment)
        for pod in removed:
            self._report_status(pod, deleted=True)
        return _done()

    async def set_businesses(self, businesses: Mapping[str, str], intent: Intent | None = None) -> None:
        """All or nothing: every pod is checked before any label changes."""
        missing = [name for name in businesses if name not in self._pods]
        if missing:
            raise Conflict(f"pod(s) {', '.join(missing)} not found; nothing relabelled")
        self._begin(intent, "set_businesses")
        self._relabel(businesses)

    async def create_service(self, service: Service, intent: Intent | None = None) -> None:
        if service.name in self._services:
            raise Conflict(f"service '{service.name}' already exists")
        self._begin(intent, "create_service")
        self._services[service.name] = dataclasses.replace(service, created_at=service.created_at or _now())
        self._changed()

    async def delete_service(self, name: str, unassign: Mapping[str, str] | None = None, intent: Intent | None = None) -> None:
        if name not in self._services:
            raise NotFound(f"service '{name}' not found")
        missing = [pod for pod in (unassign or {}) if pod not in self._pods]
        if missing:
            raise Conflict(f"pod(s) {', '.join(missing)} not found; nothing changed")
        self._begin(intent, "delete_service")
        self._relabel(unassign or {})
        del self._services[name]
        self._changed()

    async def pod_logs(self, name: str, tail: int) -> str | None:
        if name not in self._pods:
            return None
        return f"memory backend: replica {name} runs no process and writes no log\n"

    def write_manifests(self, name: str, documents: list[dict]) -> str:
        """Kept in `manifests_written`; also saved under `manifests_dir` when one was given."""
        self.manifests_written[name] = documents
        if self.manifests_dir is not None:
            return save_manifests(self.manifests_dir, name, documents)
        return f"memory://deployments/{name}.yaml"

    # helpers ---------------------------------------------------------------------------------
    def _begin(self, intent: Intent | None, method: str) -> None:
        """The desired state lives in memory, so the intent's rows are written first, before the change
        (and before an injected failure, as a cluster write fails after them)."""
        self._write_intent(intent)
        failure = self._failures.pop(method, None)
        if failure is not None:
            raise failure

    def _pick_gpus(self, deployment: Deployment, count: int) -> list[tuple[int, ...]]:
        """Whole devices for `count` new pods from the GPU ledger, or a refusal that changes nothing."""
        ledger = GpuLedger.build(whole_units(self.gpu_ids), self.gpu_claims())
        picked = []
        for index in range(count):
            holder = Holder.replica(f"{deployment.name}#{index}")
            ledger, units = ledger.claim(holder, deployment.gpus_per_replica, whole_only=True,
                                         who=f"a new replica of {deployment.name}")
            picked.append(tuple(int(u) for u in units))
        return picked

    def _add_pods(self, deployment: Deployment, gpus: Iterable[tuple[int, ...]]) -> list[Pod]:
        phase = PodPhase.RUNNING if self.ready else PodPhase.PENDING
        created = []
        for gpu_ids in gpus:
            name = self._new_name(deployment.name)
            endpoint = (self.endpoint or f"http://127.0.0.1:{next(self._ports)}") if self.endpoints else None
            pod = Pod(name=name, deployment=deployment.name, labels=deployment.new_pod_labels(), phase=phase, ready=self.ready,
                      endpoint=endpoint, created_at=_now(), gpu_ids=gpu_ids)
            self._pods[name] = pod
            self._by_deployment[deployment.name][name] = pod
            created.append(pod)
        self._resize(deployment.name)
        for pod in created:
            self._report_status(pod)
        return created

    def _new_name(self, deployment: str) -> str:
        while True:
            name = f"{deployment}-{''.join(self._random.choices(_SUFFIX_ALPHABET, k=5))}"
            if name not in self._pods:
                return name

    def _relabel(self, businesses: Mapping[str, str]) -> None:
        for name, business in businesses.items():
            pod = self._pods[name]
            self._put(dataclasses.replace(pod, labels={**pod.labels, L.BUSINESS: business}))

    def _put(self, pod: Pod) -> Pod:
        self._pods[pod.name] = pod
        self._by_deployment[pod.deployment][pod.name] = pod
        self._changed()
        return pod

    def _resize(self, deployment: str) -> None:
        """A deployment's desired count is the pods it has (as the local backend keeps it)."""
        spec = self._deployments[deployment]
        self._deployments[deployment] = dataclasses.replace(spec, replicas=len(self._by_deployment[deployment]))
        self._changed()

    def _changed(self) -> None:
        self._cache.clear()

    def _sorted(self, key: Any, items: Mapping[str, Any]) -> list[Any]:
        listing = self._cache.get(key)
        if listing is None:
            listing = self._cache[key] = [items[name] for name in sorted(items)]
        return listing

    def _report_status(self, pod: Pod, deleted: bool = False) -> None:
        self.report(EventType.REPLICA_STATUS, {
            "name": pod.name, "deployment": pod.deployment,
            "phase": "Deleted" if deleted else pod.phase.value, "ready": pod.ready and not deleted,
            "restarts": pod.restarts, "business": pod.business})


def _no_report(event: EventType | None, data: dict[str, Any] | None = None, **_: Any) -> None:
    """Until a controller sets the report (`set_report`), observations go nowhere."""


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _now() -> datetime:
    return datetime.now(timezone.utc)
