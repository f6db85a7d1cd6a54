"""An emulated cluster for contract tests: an API server with the semantics Corral relies on, served
over real HTTP by kmock, and the controllers and kubelet behaviour a cluster adds.

`ClusterEmulator` (the API server; kmock serves HTTP, parses requests and answers discovery):
- every object carries `metadata.resourceVersion` (one increasing counter, as etcd's revision),
  `uid`, `creationTimestamp` and, for Deployments, Jobs and HPAs, a `generation` bumped on spec changes;
- lists answer at a resourceVersion; watches start from one (`resourceVersion` unset or "0": the
  current objects as ADDED first), send BOOKMARKs when `allowWatchBookmarks=true` (unless
  `send_bookmarks` is off: a server without the watch cache), end cleanly after
  `timeoutSeconds`, answer an ERROR event with a 410 `Expired` Status for a version older than the
  retained history (`compact()`), and filter by `labelSelector` the way the watch cache does (an
  object that stops matching arrives as DELETED); `cut_watches()` drops every open watch connection,
  `stall_watches()` keeps them open and silent (a half-open connection);
- writes: create (409 AlreadyExists, `generateName`), merge/strategic patches (RFC 7386) with
  `metadata.resourceVersion` as a precondition (409 Conflict), the `status` and `scale`
  subresources (a main-resource write never changes `status`, as for every resource with a status
  subresource), and deletes — pods are deleted gracefully (deletionTimestamp, then removed by the
  kubelet), unscheduled or terminal pods at once. `conflict_once(plural, name)` makes another actor
  write the object just before Corral's next conditional write of it;
- as the real API server where the emulator once differed: a Scale omits `spec.replicas` at 0
  (`omitempty`), lists and watches honour `fieldSelector` (on old and new objects, as label
  selectors), `refuse_watches` answers watches 429 (with `Retry-After`) or 5xx, and `delays`
  slows every answer to one client (by its bearer token, `kubeconfig(..., token=)`) both ways.
- the AWS Load Balancer Controller's TargetGroupBinding kind is served (stored as given; no controller).

`MiniControllers` (kube-controller-manager, scheduler and kubelet, in-process on the same store):
- ReplicaSet/Deployment: keeps each Deployment's *active* pods (not Failed/Succeeded, not being
  deleted: client-go's `IsPodActive`) at `spec.replicas`; removes pods in the real
  `ActivePodsWithRanks` order (unscheduled, Pending < Unknown < Running, not-ready, lower
  `pod-deletion-cost`, more colocated, ready for less time, more restarts, newer — times on a
  logarithmic scale, ties by UID); rolls out a changed template one pod at a time (maxSurge 0,
  maxUnavailable 1); keeps `status` (observedGeneration, replicas, updatedReplicas, readyReplicas…).
  `ignore_deletion_cost` makes it delete the oldest pods instead, as a ReplicaSet deciding from a
  stale cache may; `paused` freezes every controller;
- scheduler + kubelet: pods go Pending → scheduled → Running → Ready; `crash_pod`, `fail_pod`
  (Failed, e.g. `Evicted`), `set_ready`; a deleted pod stops being ready at once and is removed after
  its grace period (capped by `termination_s`);
- EndpointSlices: one per Service, with ready / serving / terminating conditions;
- Jobs: a pod per attempt whose container command runs here as a process (the real trainer), retried
  with exponential back-off until `backoffLimit`, `podFailurePolicy` (Ignore on DisruptionTarget:
  `disrupt_job_pod`), `activeDeadlineSeconds`, terminal `Complete` / `Failed` conditions, suspend;
- garbage collection: pods and EndpointSlices whose owner is gone are deleted.
Sources: kube-apiserver's watch cache and API conventions (resourceVersion, 409/410), and
pkg/controller/controller_utils.go (`ActivePodsWithRanks`, `IsPodActive`) in kubernetes/kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import random
import re
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml

NAMESPACE = "corral"
COST = "controller.kubernetes.io/pod-deletion-cost"
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet (no vowels, no 0/1/3)


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    namespaced: bool = True
    status: bool = False  # has a status subresource: main-resource writes keep status
    generation: bool = False  # metadata.generation counts spec changes


KINDS: dict[str, Kind] = {
    "/v1/pods": Kind("Pod", "v1", status=True),
    "/v1/services": Kind("Service", "v1", status=True),
    "/v1/nodes": Kind("Node", "v1", namespaced=False, status=True),
    "apps/v1/deployments": Kind("Deployment", "apps/v1", status=True, generation=True),
    "batch/v1/jobs": Kind("Job", "batch/v1", status=True, generation=True),
    "discovery.k8s.io/v1/endpointslices": Kind("EndpointSlice", "discovery.k8s.io/v1"),
    "autoscaling/v2/horizontalpodautoscalers": Kind("HorizontalPodAutoscaler", "autoscaling/v2", status=True, generation=True),
    "coordination.k8s.io/v1/leases": Kind("Lease", "coordination.k8s.io/v1"),
    "/v1/persistentvolumeclaims": Kind("PersistentVolumeClaim", "v1", status=True),
    "policy/v1/poddisruptionbudgets": Kind("PodDisruptionBudget", "policy/v1", status=True, generation=True),
    # The AWS Load Balancer Controller's custom resource (a Service's target group); no controller acts on it here.
    "elbv2.k8s.aws/v1beta1/targetgroupbindings": Kind("TargetGroupBinding", "elbv2.k8s.aws/v1beta1", generation=True),
}
PODS, DEPLOYMENTS, SERVICES, JOBS, SLICES = ("/v1/pods", "apps/v1/deployments", "/v1/services", "batch/v1/jobs",
                                             "discovery.k8s.io/v1/endpointslices")


class StatusError(Exception):
    """An API error, answered as a `Status` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "code": self.code}


def now_iso(offset_s: float = 0.0) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset_s)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def matches(selector: str | None, labels: dict[str, str]) -> bool:
    """A label selector string (equality, inequality, existence and `in` terms)."""
    if not selector:
        return True
    terms, depth, current = [], 0, ""
    for char in selector:  # split on commas outside parentheses
        depth += char == "("
        depth -= char == ")"
        if char == "," and not depth:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    for term in filter(None, (t.strip() for t in terms)):
        if found := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = found.groups()
            if (labels.get(key) in {v.strip() for v in values.split(",")}) != (op == "in"):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def fields_match(selector: str | None, obj: dict[str, Any]) -> bool:
    """A field selector (`spec.nodeName!=,status.phase!=Failed`: `=`, `==` and `!=` on dotted paths; a missing
    field is the empty string), as the API server applies it to pods."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        negate = "!=" in term
        path, value = term.split("!=" if negate else ("==" if "==" in term else "="), 1)
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if ((current or "") == value) == negate:
            return False
    return True


def labels_of(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key; lists and scalars replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def is_active(pod: dict[str, Any]) -> bool:
    """client-go's IsPodActive: not Succeeded, not Failed, not being deleted."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp")


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or [])


def ready_since(pod: dict[str, Any]) -> float | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            return parse_time(c.get("lastTransitionTime"))
    return None


class Watcher:
    def __init__(self, plural: str, namespace: str | None, selector: str | None, fields: str | None = None) -> None:
        self.plural, self.namespace, self.selector, self.fields = plural, namespace, selector, fields
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.stalled = False
        self.ended = False  # ended cleanly (timeout) rather than cut
        self.transport: asyncio.BaseTransport | None = None

    def visible(self, obj: dict[str, Any]) -> bool:
        return self.namespace is None or obj["metadata"].get("namespace") == self.namespace

    def translate(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
        """The event this watcher sees: the watch cache filters by selector on both the old and the new object."""
        if not self.visible(new):
            return None
        was = old is not None and matches(self.selector, labels_of(old)) and fields_match(self.fields, old)
        now = matches(self.selector, labels_of(new)) and fields_match(self.fields, new)
        if kind == "DELETED":
            return {"type": "DELETED", "object": new} if was or (old is None and now) else None
        if kind == "ADDED":
            return {"type": "ADDED", "object": new} if now else None
        if was and now:
            return {"type": "MODIFIED", "object": new}
        if now:
            return {"type": "ADDED", "object": new}
        if was:
            return {"type": "DELETED", "object": new}
        return None


@dataclass
class Logged:
    rv: int
    kind: str  # ADDED | MODIFIED | DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


class ClusterEmulator(kmock.KubernetesEmulator):
    """The API server. kmock serves HTTP and discovery; every resource request is answered here."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, kind in KINDS.items():
            self.resources[key.lstrip("/")] = kmock.ResourceInfo(kind=kind.kind, namespaced=kind.namespaced)
        self.rv = 1000
        self.store: dict[str, dict[tuple[str, str], dict[str, Any]]] = {key: {} for key in KINDS}
        self.history: dict[str, deque[Logged]] = {key: deque() for key in KINDS}
        self.history_limit = 5000  # events kept per resource (the watch cache's window)
        self.floor: dict[str, int] = dict.fromkeys(KINDS, 0)  # watches from before this version get 410
        self.watchers: dict[str, set[Watcher]] = {key: set() for key in KINDS}
        self.bookmark_interval_s = 0.5
        self.send_bookmarks = True  # False: an API server without the watch cache, which sends none
        self.default_watch_timeout_s = 60.0
        self.logs: dict[str, str] = {}
        self.writes: list[tuple[str, str, str, dict | None]] = []  # (verb, plural, name, body): for assertions
        self._conflicts: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.watch_requests: list[tuple[str, dict[str, str]]] = []  # (resource, query) of every watch
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # continue token → (version, items)
        # A slow API server, per client (its bearer token → seconds): each request waits this long before it is
        # handled and again before its answer is sent (watch streams excepted). `kubeconfig(..., token=)` names a client.
        self.delays: dict[str, float] = {}
        self._refusals: dict[str, list[tuple[int, float | None, str | None]]] = {}  # plural → (code, Retry-After, selector)

    # ---- the store -------------------------------------------------------------------------
    def _commit(self, plural: str, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        new = copy.deepcopy(new)
        new["metadata"]["resourceVersion"] = str(self.rv)
        key = (new["metadata"].get("namespace") or "", new["metadata"]["name"])
        if kind == "DELETED":
            self.store[plural].pop(key, None)
        else:
            self.store[plural][key] = new
        history = self.history[plural]
        history.append(Logged(self.rv, kind, old, new))
        while len(history) > self.history_limit:
            self.floor[plural] = history.popleft().rv
        for watcher in list(self.watchers[plural]):
            event = watcher.translate(kind, old, new)
            if event is not None:
                watcher.queue.put_nowait(event)
        return new

    def compact(self) -> None:
        """Forget every retained event (etcd compaction): watches from an older version get 410 Gone."""
        for plural, history in self.history.items():
            history.clear()
            self.floor[plural] = self.rv

    def get(self, plural: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any]:
        obj = self.store[plural].get((namespace if KINDS[plural].namespaced else "", name))
        if obj is None:
            resource = plural.rsplit("/", 1)[1]
            raise StatusError(404, "NotFound", f'{resource} "{name}" not found')
        return obj

    def find(self, plural: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
        return self.store[plural].get((namespace if KINDS[plural].namespaced else "", name))

    def items(self, plural: str, namespace: str | None = None, selector: str | None = None, fields: str | None = None) -> list[dict[str, Any]]:
        return [o for (ns, _), o in sorted(self.store[plural].items())
                if (namespace is None or ns == namespace) and matches(selector, labels_of(o)) and fields_match(fields, o)]

    def create(self, plural: str, body: dict[str, Any], namespace: str | None = NAMESPACE) -> dict[str, Any]:
        kind = KINDS[plural]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise StatusError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choice(NAME_CHARS) for _ in range(5))
        if kind.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if self.find(plural, meta["name"], meta.get("namespace")) is not None:
            raise StatusError(409, "AlreadyExists", f'{plural.rsplit("/", 1)[1]} "{meta["name"]}" already exists')
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=meta.get("creationTimestamp") or now_iso())
        meta.pop("resourceVersion", None)
        meta.pop("deletionTimestamp", None)
        if kind.generation:
            meta["generation"] = 1
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        if plural == PODS:
            obj["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]}
        elif plural == "autoscaling/v2/horizontalpodautoscalers":
            obj["status"] = {"desiredReplicas": 0}  # serialised without omitempty by the API server
        elif kind.status and plural != "/v1/nodes":
            obj["status"] = {}
        return self._commit(plural, "ADDED", None, obj)

    def _precondition(self, plural: str, current: dict[str, Any], wanted: str | None) -> dict[str, Any]:
        name = current["metadata"]["name"]
        if wanted is not None and (plural, name) in self._conflicts:  # another actor wins the race
            change = self._conflicts.pop((plural, name))
            raced = merge_patch(current, change or {"metadata": {"annotations": {"emulator.corral.dev/concurrent-writer": str(self.rv)}}})
            current = self._update(plural, current, raced)
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            resource = plural.rsplit("/", 1)[1]
            raise StatusError(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                                               "modified; please apply your changes to the latest version and try again")
        return current

    def conflict_once(self, plural: str, name: str, change: dict[str, Any] | None = None) -> None:
        """Another actor writes the object (`change`, a merge patch) just before the next conditional write of it."""
        self._conflicts[(plural, name)] = change

    def patch(self, plural: str, name: str, patch: dict[str, Any], namespace: str | None = NAMESPACE,
              subresource: str | None = None) -> dict[str, Any]:
        kind = KINDS[plural]
        current = self.get(plural, name, namespace)
        current = self._precondition(plural, current, ((patch.get("metadata") or {}).get("resourceVersion")))
        if subresource == "status":
            new = copy.deepcopy(current)
            new["status"] = merge_patch(current.get("status") or {}, patch.get("status") or {})
        elif subresource == "scale":
            new = copy.deepcopy(current)
            replicas = (patch.get("spec") or {}).get("replicas")
            if replicas is not None:
                new["spec"]["replicas"] = int(replicas)
        elif subresource is None:
            body = {k: v for k, v in patch.items() if not (kind.status and k == "status")}
            new = merge_patch(current, body)
            for immutable in ("uid", "creationTimestamp", "deletionTimestamp", "generation", "name", "namespace"):
                if immutable in current["metadata"]:
                    new["metadata"][immutable] = current["metadata"][immutable]
            if plural == PODS:  # a pod's spec is immutable but for a few fields (not modelled)
                new["spec"] = current["spec"]
        else:
            raise StatusError(404, "NotFound", f"subresource {subresource} not served")
        return self._update(plural, current, new)

    def _update(self, plural: str, current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current:
            return current  # a no-op write is not stored and bumps no version
        if KINDS[plural].generation and new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = int(current["metadata"].get("generation") or 1) + 1
        return self._commit(plural, "MODIFIED", current, new)

    def replace(self, plural: str, name: str, body: dict[str, Any], namespace: str | None = NAMESPACE) -> dict[str, Any]:
        current = self.get(plural, name, namespace)
        current = self._precondition(plural, current, (body.get("metadata") or {}).get("resourceVersion"))
        new = copy.deepcopy(body)
        new["metadata"] = {**new.get("metadata", {}), **{k: current["metadata"][k] for k in ("uid", "creationTimestamp", "name")}}
        if "namespace" in current["metadata"]:
            new["metadata"]["namespace"] = current["metadata"]["namespace"]
        if KINDS[plural].status:
            new["status"] = current.get("status") or {}
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        return self._commit(plural, "MODIFIED", current, new)

    def delete(self, plural: str, name: str, namespace: str | None = NAMESPACE, grace_s: float | None = None,
               preconditions: dict[str, Any] | None = None) -> dict[str, Any]:
        current = self.get(plural, name, namespace)
        if preconditions and preconditions.get("resourceVersion"):
            self._precondition(plural, current, preconditions["resourceVersion"])
        if plural == PODS:
            # Graceful deletion: a scheduled, non-terminal pod is marked and the kubelet removes it after
            # its grace period; an unscheduled or terminal one goes at once (podStrategy.CheckGracefulDelete).
            grace = grace_s if grace_s is not None else float((current.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            scheduled = bool((current.get("spec") or {}).get("nodeName"))
            terminal = (current.get("status") or {}).get("phase") in ("Failed", "Succeeded")
            if grace > 0 and scheduled and not terminal:
                if current["metadata"].get("deletionTimestamp"):
                    return current
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = now_iso(grace)
                marked["metadata"]["deletionGracePeriodSeconds"] = int(grace)
                return self._commit(plural, "MODIFIED", current, marked)
        return self._commit(plural, "DELETED", current, current)

    @staticmethod
    def scale_of(obj: dict[str, Any]) -> dict[str, Any]:
        """The `scale` subresource's view of a Deployment: an autoscaling/v1 Scale with the Deployment's version."""
        meta = obj["metadata"]
        selector = ",".join(f"{k}={v}" for k, v in sorted(obj["spec"]["selector"].get("matchLabels", {}).items()))
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta},
                # ScaleSpec.replicas is an int32 with `omitempty`: the real API omits it at 0.
                "spec": {"replicas": replicas} if (replicas := obj["spec"].get("replicas", 1)) else {},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", 0), "selector": selector}}

    def list_page(self, plural: str, namespace: str | None, params: dict[str, str]) -> dict[str, Any]:
        """A list, or one page of it (`limit`, `continue`): every page of one list is served from the
        snapshot taken at its first page, at that resourceVersion, as the API server does."""
        token = params.get("continue")
        if token:
            snapshot = self._snapshots.get(token.split(":")[0])
            if snapshot is None:
                raise StatusError(410, "Expired", "the provided continue parameter is too old")
            version, items = snapshot
            offset = int(token.split(":")[1])
        else:
            version, items, offset = self.rv, self.items(plural, namespace, params.get("labelSelector"), params.get("fieldSelector")), 0
        limit = int(params.get("limit") or 0) or len(items) or 1
        page = items[offset:offset + limit]
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if offset + limit < len(items):
            key = f"{plural.replace('/', '_')}-{version}-{secrets.token_hex(4)}"
            self._snapshots[key] = (version, items)
            meta["continue"] = f"{key}:{offset + limit}"
            meta["remainingItemCount"] = len(items) - offset - limit
        return {"apiVersion": KINDS[plural].api_version, "kind": KINDS[plural].kind + "List", "metadata": meta, "items": page}

    # ---- faults ------------------------------------------------------------------------------
    def cut_watches(self) -> int:
        """Drop every open watch connection (an API server restart, a network blip). Returns how many."""
        cut = 0
        for watchers in self.watchers.values():
            for watcher in list(watchers):
                if watcher.transport is not None:
                    watcher.transport.abort()
                watcher.queue.put_nowait(None)
                cut += 1
        return cut

    def end_watches(self) -> int:
        """End every open watch cleanly, as when its timeoutSeconds runs out. Returns how many."""
        ended = 0
        for watchers in self.watchers.values():
            for watcher in list(watchers):
                watcher.ended = True
                watcher.queue.put_nowait(None)
                ended += 1
        return ended

    def stall_watches(self) -> int:
        """Keep every open watch connection open but silent from now on (a half-open connection)."""
        stalled = 0
        for watchers in self.watchers.values():
            for watcher in watchers:
                watcher.stalled = True
                stalled += 1
        return stalled

    def refuse_watches(self, plural: str, count: int = 1, code: int = 429, retry_after: float | None = None,
                       selector: str | None = None) -> None:
        """Answer the next `count` watch requests of `plural` (with that label selector, if given) with an HTTP error:
        429 Too Many Requests (with a `Retry-After`, as API Priority and Fairness sends it), a 5xx ..."""
        self._refusals.setdefault(plural, []).extend([(code, retry_after, selector)] * count)

    def open_watches(self, plural: str | None = None) -> int:
        return sum(len(w) for p, w in self.watchers.items() if plural in (None, p))

    # ---- HTTP --------------------------------------------------------------------------------
    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        raw: aiohttp.web.BaseRequest = request._raw_request
        if raw.path.startswith("/_emulator/"):
            return await self._control(raw.path.removeprefix("/_emulator/"), dict(raw.query))
        parsed = _parse_path(raw.path)
        if parsed is None:
            return await super()._handle(request)  # discovery: /api, /apis, /version
        plural, namespace, name, subresource = parsed
        delay = 0.0 if raw.query.get("watch") in ("true", "1") else self.delays.get(
            raw.headers.get("Authorization", "").removeprefix("Bearer "), 0.0)
        if delay:
            await asyncio.sleep(delay)  # on the way in: the request is handled (and a write committed) only now
        try:
            if plural not in KINDS:
                raise StatusError(404, "NotFound", f"the server could not find the requested resource ({raw.path})")
            answer = await self._serve(request, raw, plural, namespace, name, subresource)
        except StatusError as error:
            answer = _json(error.status(), error.code)
        if delay:
            await asyncio.sleep(delay)  # on the way out
        return answer

    async def _serve(self, request: Any, raw: aiohttp.web.BaseRequest, plural: str, namespace: str | None, name: str | None,
                     subresource: str | None) -> aiohttp.web.StreamResponse:
        params = dict(raw.query)
        body = json.loads(request.body) if request.body else None
        method = raw.method
        if method == "GET" and params.get("watch") in ("true", "1"):
            return await self._watch(raw, plural, namespace, params)
        if method == "GET" and name is None:
            return _json(self.list_page(plural, namespace, params))
        if method == "GET" and subresource == "scale":
            return _json(self.scale_of(self.get(plural, name, namespace)))  # type: ignore[arg-type]
        if method == "GET" and subresource == "log":
            self.get(plural, name, namespace)  # type: ignore[arg-type]
            lines = self.logs.get(name or "", "").splitlines(keepends=True)
            tail = int(params.get("tailLines") or len(lines) or 1)
            return aiohttp.web.Response(text="".join(lines[-tail:]), content_type="text/plain")
        if method == "GET":
            return _json(self.get(plural, name, namespace))  # type: ignore[arg-type]
        self.writes.append((method, plural, name or (body or {}).get("metadata", {}).get("name", ""), body))
        if method == "POST":
            return _json(self.create(plural, body or {}, namespace), 201)
        if method == "PATCH":
            content_type = raw.headers.get("Content-Type", "")
            if "json-patch" in content_type or "apply-patch" in content_type:
                raise StatusError(415, "UnsupportedMediaType", f"the emulator serves merge and strategic patches, not {content_type}")
            patched = self.patch(plural, name, body or {}, namespace, subresource)  # type: ignore[arg-type]
            return _json(self.scale_of(patched) if subresource == "scale" else patched)
        if method == "PUT":
            return _json(self.replace(plural, name, body or {}, namespace))  # type: ignore[arg-type]
        if method == "DELETE":
            options = body or {}
            grace = params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            return _json(self.delete(plural, name, namespace, None if grace is None else float(grace),  # type: ignore[arg-type]
                                     options.get("preconditions")))
        raise StatusError(405, "MethodNotAllowed", f"{method} is not supported")

    async def _watch(self, raw: aiohttp.web.BaseRequest, plural: str, namespace: str | None,
                     params: dict[str, str]) -> aiohttp.web.StreamResponse:
        self.watch_requests.append((plural, params))
        refusals = self._refusals.get(plural) or []
        if refusals and refusals[0][2] in (None, params.get("labelSelector")):
            code, retry_after, _ = refusals.pop(0)
            reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}.get(code, "InternalError")
            refusal = _json(StatusError(code, reason, "too many requests, please try again later" if code == 429
                                        else "the server is unavailable").status(), code)
            if retry_after is not None:
                refusal.headers["Retry-After"] = str(int(retry_after))
            return refusal
        watcher = Watcher(plural, namespace, params.get("labelSelector"), params.get("fieldSelector"))
        since = params.get("resourceVersion")
        backlog: list[dict[str, Any]] = []
        expired = False
        if not since or since == "0":  # "start at most recent": the current objects first, as ADDED
            backlog = [{"type": "ADDED", "object": o} for o in self.items(plural, namespace, watcher.selector, watcher.fields)]
        elif int(since) < self.floor[plural]:
            expired = True
        else:
            backlog = [e for e in (watcher.translate(x.kind, x.old, x.new) for x in self.history[plural] if x.rv > int(since)) if e]
        self.watchers[plural].add(watcher)  # in the same step as the backlog: no event falls in between
        timeout = float(params.get("timeoutSeconds") or self.default_watch_timeout_s)
        bookmarks = params.get("allowWatchBookmarks") == "true" and self.send_bookmarks
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            watcher.transport = raw.transport
            if expired:
                error = StatusError(410, "Expired", f"too old resource version: {since} ({self.floor[plural]})")
                await response.write(json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n")
                await response.write_eof()
                return response
            for event in backlog:
                await response.write(json.dumps(event).encode() + b"\n")
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if raw.transport is None or raw.transport.is_closing():  # the client went away
                    return response
                if watcher.stalled:  # half-open: nothing more is ever sent, and the stream never ends
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(watcher.queue.get(), 0.2) is None:
                            return response
                    continue
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), min(remaining, self.bookmark_interval_s))
                except TimeoutError:
                    if bookmarks and watcher.queue.empty() and not watcher.stalled:
                        mark = {"kind": KINDS[plural].kind, "apiVersion": KINDS[plural].api_version,
                                "metadata": {"resourceVersion": str(self.rv)}}
                        await response.write(json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")
                    continue
                if event is None:  # cut, or ended early
                    if watcher.ended:
                        break
                    return response
                if not watcher.stalled:
                    await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self.watchers[plural].discard(watcher)
        return response

    async def _control(self, operation: str, query: dict[str, str]) -> aiohttp.web.Response:
        """Test controls over HTTP, for an emulator in another process (bench/control_plane.py --emulator)."""
        from corral.domain.manifests import ClusterOptions, deployment_manifest
        from corral.domain.models import Deployment

        if operation == "seed":  # ?pools=10&replicas=100: ready vLLM pools, written straight into the store
            pools, replicas = int(query.get("pools", 10)), int(query.get("replicas", 100))
            self.history_limit = max(self.history_limit, 4 * pools * replicas)
            for i in range(pools):
                pool = Deployment(f"vllm-model-{i}-pool", "vllm", "Qwen/Qwen2.5-7B", f"model-{i}", True, replicas, gpus_per_replica=1)
                seed_pods(self, deployment_manifest(pool, ["--model", pool.model_id], ClusterOptions(namespace=NAMESPACE)), replicas)
            return _json({"pods": len(self.store[PODS])})
        if operation == "cut":  # ?delete_every=10: cut every watch, and delete every n-th pod while they are down
            every = int(query.get("delete_every", 0))
            cut = self.cut_watches()
            gone = [p["metadata"]["name"] for p in self.items(PODS)][::every] if every else []
            for name in gone:
                self.delete(PODS, name, grace_s=0)
            return _json({"cut": cut, "deleted": gone})
        if operation == "restart-all":  # every pod's restart count goes up by one: one watch event per pod
            for pod in self.items(PODS):
                statuses = [{**c, "restartCount": int(c.get("restartCount") or 0) + 1} for c in pod["status"].get("containerStatuses") or []]
                self.patch(PODS, pod["metadata"]["name"], {"status": {"containerStatuses": statuses}}, subresource="status")
                await asyncio.sleep(0)  # the watches stream while the writes go on
            return _json({"pods": len(self.store[PODS])})
        raise StatusError(404, "NotFound", f"no emulator control {operation}")

    async def __aexit__(self, *exc: Any) -> None:
        self.cut_watches()
        await super().__aexit__(*exc)


def _json(payload: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(body=json.dumps(payload).encode(), status=status, headers={"Content-Type": "application/json"})


def _parse_path(path: str) -> tuple[str, str | None, str | None, str | None] | None:
    """/api/v1/namespaces/ns/pods/name/log → ("/v1/pods", "ns", "name", "log"); None for discovery paths."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    elif rest[0] == "namespaces":
        return None
    plural = f"{group}/{version}/{rest[0]}"
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return plural, namespace, name, subresource


def kubeconfig(url: str, path: Path, token: str = "emulated") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": token}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": NAMESPACE}}],
    }))
    return path


def _log_rank(moment: float | None, now: float) -> int:
    """controller_utils.go logarithmicRankDiff: log2 of the age in nanoseconds (LogarithmicScaleDown)."""
    if moment is None:
        return -1
    age_ns = (now - moment) * 1e9
    return int(math.log2(age_ns)) if age_ns > 0 else -1


def removal_order(pods: list[dict[str, Any]], related: Iterable[dict[str, Any]], use_cost: bool = True,
                  now: float | None = None) -> list[dict[str, Any]]:
    """Which pods a ReplicaSet deletes first: `ActivePodsWithRanks.Less` (pkg/controller/controller_utils.go)."""
    now = time.time() if now is None else now
    on_node: dict[str, int] = {}
    for pod in related:
        if is_active(pod):
            node = (pod.get("spec") or {}).get("nodeName") or ""
            on_node[node] = on_node.get(node, 0) + 1
    phase_order = {"Pending": 0, "Unknown": 1, "Running": 2}

    def key(pod: dict[str, Any]) -> tuple:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        ready = is_ready(pod)
        cost = int((meta.get("annotations") or {}).get(COST, "0") or 0) if use_cost else 0
        restarts = max([int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or []] or [0])
        return (bool(spec.get("nodeName")),                                    # 1. unscheduled first
                phase_order.get(status.get("phase", ""), 0),                    # 2. Pending < Unknown < Running
                ready,                                                          # 3. not ready first
                cost,                                                           # 4. lower deletion cost first
                -on_node.get(spec.get("nodeName") or "", 0),                    # 5. more colocated first
                _log_rank(ready_since(pod), now) if ready else 0,               # 6. ready for less time first
                -restarts,                                                      # 7. more restarts first
                _log_rank(parse_time(meta.get("creationTimestamp")), now),      # 8. newer first
                meta.get("uid", ""))                                            #    ties: by UID
    return sorted(pods, key=key)


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Trainer:
    process: asyncio.subprocess.Process
    pod: str


@dataclass
class Timings:
    schedule_s: float = 0.0  # created → bound to a node
    start_s: float = 0.02  # bound → Running (containers started)
    ready_s: float = 0.05  # Running → Ready (readiness probe passes)
    termination_s: float = 0.1  # graceful deletion → removed (the grace period, capped)
    job_backoff_s: float = 0.2  # the Job controller's back-off base (10 s on a cluster), doubled per failure
    nodes: tuple[str, ...] = ("gpu-node-a", "gpu-node-b", "gpu-node-c")


@dataclass
class MiniControllers:
    """kube-controller-manager, scheduler and kubelet for the emulated cluster (in-process, on its store)."""

    api: ClusterEmulator
    ignore_deletion_cost: bool = False
    paused: bool = False  # a frozen cluster (to hold a Deployment mid-rollout, say)
    timings: Timings = field(default_factory=Timings)
    trainers: dict[str, Trainer] = field(default_factory=dict)  # job → its running pod's process
    removed: list[str] = field(default_factory=list)  # pods the ReplicaSet chose to delete, in order
    _ips: Any = field(default_factory=lambda: itertools.count(10))
    _since: dict[str, float] = field(default_factory=dict)  # pod uid → monotonic time of its last transition
    _task: asyncio.Task | None = None
    _not_ready: set[str] = field(default_factory=set)

    async def __aenter__(self) -> MiniControllers:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for trainer in self.trainers.values():
            if trainer.process.returncode is None:
                trainer.process.kill()
                await trainer.process.wait()

    async def _run(self) -> None:
        while True:  # the emulated cluster's control loop (its own pace; tests wait on outcomes)
            if not self.paused:
                with contextlib.suppress(StatusError):
                    self.tick()
                    await self._jobs()
            await asyncio.sleep(0.03)

    def tick(self) -> None:
        self._garbage_collect()
        self._deployments()
        self._kubelet()
        self._endpoint_slices()

    # ---- test controls -----------------------------------------------------------------------
    def crash_pod(self, name: str) -> None:
        """The engine exits: the kubelet restarts the container with back-off (CrashLoopBackOff, not ready)."""
        pod = self.api.get(PODS, name)
        status = copy.deepcopy(pod["status"])
        status["containerStatuses"] = [{**c, "ready": False, "restartCount": int(c.get("restartCount") or 0) + 1,
                                        "state": {"waiting": {"reason": "CrashLoopBackOff"}}} for c in status.get("containerStatuses") or []]
        status["conditions"] = _set_condition(status.get("conditions"), "Ready", "False")
        self.api.patch(PODS, name, {"status": status}, subresource="status")
        self._not_ready.add(name)

    def set_ready(self, name: str, ready: bool) -> None:
        """The readiness probe starts failing (or passes again)."""
        (self._not_ready.discard if ready else self._not_ready.add)(name)
        pod = self.api.get(PODS, name)
        conditions = _set_condition(pod["status"].get("conditions"), "Ready", "True" if ready else "False")
        self.api.patch(PODS, name, {"status": {"conditions": conditions}}, subresource="status")

    def fail_pod(self, name: str, reason: str = "Evicted", message: str = "The node was low on resource: memory.") -> None:
        """The kubelet ends the pod: phase Failed (an eviction for node pressure, say). The object stays."""
        pod = self.api.get(PODS, name)
        conditions = _set_condition(pod["status"].get("conditions"), "Ready", "False")
        if reason in ("Evicted", "PreemptionByScheduler", "DeletionByTaintManager"):
            conditions = _set_condition(conditions, "DisruptionTarget", "True", reason)
        containers = [{**c, "ready": False, "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}
                      for c in pod["status"].get("containerStatuses") or []]
        self.api.patch(PODS, name, {"status": {"phase": "Failed", "reason": reason, "message": message, "conditions": conditions,
                                               "containerStatuses": containers}}, subresource="status")

    # ---- controllers -------------------------------------------------------------------------
    def _garbage_collect(self) -> None:
        owners = {o["metadata"]["uid"] for plural in (DEPLOYMENTS, JOBS, SERVICES) for o in self.api.items(plural)}
        for plural in (PODS, SLICES, "policy/v1/poddisruptionbudgets"):
            for obj in self.api.items(plural):
                refs = obj["metadata"].get("ownerReferences") or []
                if refs and not any(r.get("uid") in owners for r in refs) and not obj["metadata"].get("deletionTimestamp"):
                    with contextlib.suppress(StatusError):
                        self.api.delete(plural, obj["metadata"]["name"], obj["metadata"].get("namespace"))

    def _deployments(self) -> None:
        pods = self.api.items(PODS)
        for d in self.api.items(DEPLOYMENTS):
            meta, spec = d["metadata"], d["spec"]
            selector = spec["selector"]["matchLabels"]
            mine = [p for p in pods if all(labels_of(p).get(k) == v for k, v in selector.items())
                    and any(r.get("uid") == meta["uid"] for r in p["metadata"].get("ownerReferences") or [])]
            active = [p for p in mine if is_active(p)]
            current = template_hash(spec["template"])
            wanted = int(spec.get("replicas") if spec.get("replicas") is not None else 1)
            if len(active) < wanted:
                for _ in range(wanted - len(active)):
                    self._create_pod(d, current)
            elif len(active) > wanted:
                use_cost = not self.ignore_deletion_cost
                ordered = (sorted(active, key=lambda p: p["metadata"]["creationTimestamp"]) if self.ignore_deletion_cost
                           else removal_order(active, mine, use_cost))
                for victim in ordered[: len(active) - wanted]:
                    self.removed.append(victim["metadata"]["name"])
                    self.api.delete(PODS, victim["metadata"]["name"])
            else:
                old = [p for p in active if labels_of(p).get("pod-template-hash") != current]
                if old and all(is_ready(p) for p in active):  # RollingUpdate, maxSurge 0 / maxUnavailable 1
                    victim = removal_order(old, mine)[0]
                    self.api.delete(PODS, victim["metadata"]["name"])
            active = [p for p in self.api.items(PODS) if is_active(p)
                      and any(r.get("uid") == meta["uid"] for r in p["metadata"].get("ownerReferences") or [])]
            ready = sum(is_ready(p) for p in active)
            status = {"observedGeneration": meta.get("generation", 1), "replicas": len(active),
                      "updatedReplicas": sum(labels_of(p).get("pod-template-hash") == current for p in active),
                      "readyReplicas": ready, "availableReplicas": ready, "unavailableReplicas": max(0, wanted - ready)}
            if any((d.get("status") or {}).get(k) != v for k, v in status.items()):
                self.api.patch(DEPLOYMENTS, meta["name"], {"status": status}, subresource="status")

    def _create_pod(self, owner: dict[str, Any], pod_hash: str) -> None:
        template = owner["spec"]["template"]
        meta = template.get("metadata") or {}
        name = owner["metadata"]["name"]
        self.api.create(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{name}-", "labels": {**(meta.get("labels") or {}), "pod-template-hash": pod_hash},
                         "annotations": dict(meta.get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-{pod_hash}",
                                              "uid": owner["metadata"]["uid"], "controller": True}]},
            "spec": copy.deepcopy(template["spec"]),
        })

    def _kubelet(self) -> None:
        t, clock = self.timings, time.monotonic()
        for pod in self.api.items(PODS):
            meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
            name, uid = meta["name"], meta["uid"]
            since = self._since.setdefault(uid, clock)
            if meta.get("deletionTimestamp"):
                if is_ready(pod):
                    conditions = _set_condition(status.get("conditions"), "Ready", "False")
                    self.api.patch(PODS, name, {"status": {"conditions": conditions}}, subresource="status")
                    self._since[uid] = clock
                elif clock - since >= min(t.termination_s, float(meta.get("deletionGracePeriodSeconds") or 0)):
                    self._stop_trainer_of(name)
                    with contextlib.suppress(StatusError):
                        self.api.delete(PODS, name, grace_s=0)
                    self._since.pop(uid, None)
                continue
            phase = status.get("phase")
            if phase in ("Failed", "Succeeded"):
                continue
            if not spec.get("nodeName"):
                if clock - since >= t.schedule_s:
                    bound = copy.deepcopy(pod)
                    bound["spec"]["nodeName"] = t.nodes[hash(uid) % len(t.nodes)]
                    bound["status"]["conditions"] = _set_condition(status.get("conditions"), "PodScheduled", "True")
                    self.api._commit(PODS, "MODIFIED", pod, bound)  # the binding subresource
                    self._since[uid] = clock
            elif phase == "Pending" and clock - since >= t.start_s:
                n = next(self._ips)
                containers = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                               "state": {"running": {"startedAt": now_iso()}}} for c in spec.get("containers") or []]
                conditions = _set_condition(status.get("conditions"), "Ready", "False")
                self.api.patch(PODS, name, {"status": {"phase": "Running", "podIP": f"10.0.{n // 250}.{n % 250}", "startTime": now_iso(),
                                                       "containerStatuses": containers, "conditions": conditions}}, subresource="status")
                self._since[uid] = clock
            elif (phase == "Running" and not is_ready(pod) and name not in self._not_ready
                  and not _job_of(pod) and clock - since >= t.ready_s):
                containers = [{**c, "ready": True, "state": {"running": {"startedAt": now_iso()}}}
                              for c in status.get("containerStatuses") or []]
                conditions = _set_condition(status.get("conditions"), "Ready", "True")
                self.api.patch(PODS, name, {"status": {"containerStatuses": containers, "conditions": conditions}}, subresource="status")
                self._since[uid] = clock

    def _endpoint_slices(self) -> None:
        pods = self.api.items(PODS)
        existing = {s["metadata"]["name"]: s for s in self.api.items(SLICES)}
        for s in self.api.items(SERVICES):
            selector = (s.get("spec") or {}).get("selector") or {}
            endpoints = []
            for p in pods:
                if not selector or not all(labels_of(p).get(k) == v for k, v in selector.items()):
                    continue
                status = p.get("status") or {}
                if not status.get("podIP") or status.get("phase") in ("Failed", "Succeeded"):
                    continue
                terminating = bool(p["metadata"].get("deletionTimestamp"))
                endpoints.append({"addresses": [status["podIP"]],
                                  "conditions": {"ready": is_ready(p) and not terminating, "serving": is_ready(p),
                                                 "terminating": terminating},
                                  "nodeName": p["spec"].get("nodeName"),
                                  "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": NAMESPACE,
                                                "uid": p["metadata"]["uid"]}})
            name = f"{s['metadata']['name']}-eps"
            if name in existing:
                if (existing[name].get("endpoints") or []) != endpoints:
                    self.api.patch(SLICES, name, {"endpoints": endpoints})
            else:
                self.api.create(SLICES, {
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                    "metadata": {"name": name, "labels": {"kubernetes.io/service-name": s["metadata"]["name"],
                                                          "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                                 "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": s["metadata"]["name"],
                                                      "uid": s["metadata"]["uid"], "controller": True}]},
                    "endpoints": endpoints, "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]})

    # ---- the Job controller ------------------------------------------------------------------
    def disrupt_job_pod(self, job: str, reason: str = "PreemptionByScheduler") -> str:
        """Preempt (or evict) the running pod of a Job: its process is killed and the pod fails with a
        DisruptionTarget condition, which a `podFailurePolicy` rule may ignore."""
        pod = next(p for p in self.api.items(PODS, selector=f"job-name={job}") if is_active(p))
        trainer = self.trainers.pop(job, None)
        if trainer is not None and trainer.process.returncode is None:
            trainer.process.kill()
        self.fail_pod(pod["metadata"]["name"], reason, "preempted to make room for a higher-priority pod")
        return pod["metadata"]["name"]

    def _stop_trainer_of(self, pod: str) -> None:
        for job, trainer in list(self.trainers.items()):
            if trainer.pod == pod:
                del self.trainers[job]
                if trainer.process.returncode is None:
                    trainer.process.kill()

    async def _jobs(self) -> None:
        for j in self.api.items(JOBS):
            meta, spec, status = j["metadata"], j["spec"], j.get("status") or {}
            name = meta["name"]
            if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in status.get("conditions") or []):
                continue
            pods = [p for p in self.api.items(PODS, selector=f"job-name={name}")
                    if any(r.get("uid") == meta["uid"] for r in p["metadata"].get("ownerReferences") or [])]
            await self._job_pods(name, pods)
            pods = [p for p in self.api.items(PODS, selector=f"job-name={name}")
                    if any(r.get("uid") == meta["uid"] for r in p["metadata"].get("ownerReferences") or [])]
            active = [p for p in pods if is_active(p)]
            if spec.get("suspend"):
                for p in active:
                    self.api.delete(PODS, p["metadata"]["name"])
                if status.get("active"):
                    self.api.patch(JOBS, name, {"status": {"active": 0}}, subresource="status")
                continue
            started = parse_time(status.get("startTime")) or time.time()
            deadline = spec.get("activeDeadlineSeconds")
            counted, ignored, fail_job = [], 0, None
            for p in pods:
                if (p.get("status") or {}).get("phase") == "Failed":
                    action = _failure_policy(spec.get("podFailurePolicy"), p)
                    if action == "Ignore":
                        ignored += 1
                    elif action == "FailJob":
                        fail_job = p
                    else:
                        counted.append(p)
            succeeded = sum((p.get("status") or {}).get("phase") == "Succeeded" for p in pods)
            base = {"active": len(active), "failed": len(counted), "succeeded": succeeded,
                    "startTime": status.get("startTime") or now_iso()}
            if succeeded:
                self._finish(j, base, "Complete", None, None)
            elif fail_job is not None:
                self._finish(j, base, "Failed", "PodFailurePolicy", f"pod {fail_job['metadata']['name']} matched a FailJob rule")
            elif len(counted) > int(spec.get("backoffLimit", 6)):
                self._finish(j, base, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            elif deadline and time.time() - started > float(deadline):
                for p in active:
                    self.api.delete(PODS, p["metadata"]["name"])
                self._finish(j, {**base, "active": 0}, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            else:
                if not active:
                    last = max((parse_time(((p.get("status") or {}).get("containerStatuses") or [{}])[0].get("state", {})
                                           .get("terminated", {}).get("finishedAt")) or 0.0 for p in pods), default=0.0)
                    wait = self.timings.job_backoff_s * 2 ** (len(counted) - 1) if counted else 0.0
                    if time.time() - last >= wait:
                        self._create_job_pod(j)
                        base["active"] = 1
                if any(status.get(k) != v for k, v in base.items()):
                    self.api.patch(JOBS, name, {"status": base}, subresource="status")

    def _finish(self, job: dict[str, Any], status: dict[str, Any], condition: str, reason: str | None, message: str | None) -> None:
        now = now_iso()
        interim = "SuccessCriteriaMet" if condition == "Complete" else "FailureTarget"  # Kubernetes 1.31+: the interim condition first
        conditions = [{"type": interim, "status": "True", "lastTransitionTime": now, **({"reason": reason, "message": message} if reason else {})},
                      {"type": condition, "status": "True", "lastTransitionTime": now, **({"reason": reason, "message": message} if reason else {})}]
        extra = {"completionTime": now} if condition == "Complete" else {}
        self.api.patch(JOBS, job["metadata"]["name"], {"status": {**status, **extra, "conditions": conditions}}, subresource="status")

    def _create_job_pod(self, job: dict[str, Any]) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        labels = {**((template.get("metadata") or {}).get("labels") or {}), "job-name": meta["name"],
                  "batch.kubernetes.io/job-name": meta["name"], "batch.kubernetes.io/controller-uid": meta["uid"]}
        self.api.create(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{meta['name']}-", "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                                              "controller": True}]},
            "spec": copy.deepcopy(template["spec"]),
        })

    async def _job_pods(self, job: str, pods: list[dict[str, Any]]) -> None:
        """The kubelet's part for Job pods: a Running pod runs its container's command as a process here."""
        for pod in pods:
            status = pod.get("status") or {}
            if status.get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
                continue
            trainer = self.trainers.get(job)
            if trainer is None or trainer.pod != pod["metadata"]["name"]:
                container = pod["spec"]["containers"][0]
                argv = [sys.executable if i == 0 and a == "python" else a for i, a in enumerate(container["command"])]
                env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env") or []}}
                process = await asyncio.create_subprocess_exec(*argv, env=env)
                self.trainers[job] = Trainer(process, pod["metadata"]["name"])
                conditions = _set_condition(status.get("conditions"), "Ready", "True")
                self.api.patch(PODS, pod["metadata"]["name"], {"status": {"conditions": conditions}}, subresource="status")
            elif trainer.process.returncode is not None:
                code = trainer.process.returncode
                del self.trainers[job]
                containers = [{"name": pod["spec"]["containers"][0]["name"], "image": pod["spec"]["containers"][0].get("image", ""),
                               "imageID": "", "ready": False, "restartCount": 0,
                               "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                                        "finishedAt": now_iso()}}}]
                conditions = _set_condition(status.get("conditions"), "Ready", "False")
                self.api.patch(PODS, pod["metadata"]["name"], {"status": {"phase": "Succeeded" if code == 0 else "Failed",
                                                                          "containerStatuses": containers, "conditions": conditions}},
                               subresource="status")


def _job_of(pod: dict[str, Any]) -> str | None:
    return labels_of(pod).get("job-name")


def _failure_policy(policy: dict[str, Any] | None, pod: dict[str, Any]) -> str:
    """The first `podFailurePolicy` rule a failed pod matches: its action (Ignore, FailJob, Count); else Count."""
    status = pod.get("status") or {}
    conditions = {(c.get("type"), c.get("status")) for c in status.get("conditions") or []}
    codes = [((c.get("state") or {}).get("terminated") or {}).get("exitCode") for c in status.get("containerStatuses") or []]
    for rule in (policy or {}).get("rules") or []:
        on_conditions = rule.get("onPodConditions") or []
        if any((c.get("type"), c.get("status", "True")) in conditions for c in on_conditions):
            return rule["action"]
        on_codes = rule.get("onExitCodes")
        if on_codes:
            values = set(on_codes.get("values") or [])
            hit = any(code is not None and (code in values) == (on_codes.get("operator") == "In") for code in codes)
            if hit:
                return rule["action"]
    return "Count"


def _set_condition(conditions: list[dict[str, Any]] | None, kind: str, value: str, reason: str | None = None) -> list[dict[str, Any]]:
    result = [dict(c) for c in conditions or [] if c.get("type") != kind]
    previous = next((c for c in conditions or [] if c.get("type") == kind), None)
    moment = previous["lastTransitionTime"] if previous and previous.get("status") == value and previous.get("lastTransitionTime") else now_iso()
    result.append({"type": kind, "status": value, "lastTransitionTime": moment, **({"reason": reason} if reason else {})})
    return result


def seed_pods(api: ClusterEmulator, deployment: dict[str, Any], count: int) -> None:
    """`count` ready pods of a Deployment written straight into the store (benchmarks: no controller pace)."""
    owner = api.find(DEPLOYMENTS, deployment["metadata"]["name"]) or api.create(DEPLOYMENTS, deployment)
    pod_hash = template_hash(owner["spec"]["template"])
    template = owner["spec"]["template"]
    for i in range(count):
        pod = api.create(PODS, {
            "metadata": {"generateName": f"{owner['metadata']['name']}-",
                         "labels": {**template["metadata"]["labels"], "pod-template-hash": pod_hash},
                         "annotations": dict(template["metadata"].get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{owner['metadata']['name']}-{pod_hash}",
                                              "uid": owner["metadata"]["uid"], "controller": True}]},
            "spec": {**copy.deepcopy(template["spec"]), "nodeName": f"gpu-node-{i % 50}"},
        })
        n = 10 + i
        api.patch(PODS, pod["metadata"]["name"], {"status": {
            "phase": "Running", "podIP": f"10.1.{n // 250}.{n % 250}", "startTime": now_iso(),
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True", "lastTransitionTime": now_iso()}],
            "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "restartCount": 0,
                                   "state": {"running": {}}}
                                  for c in template["spec"]["containers"]]}}, subresource="status")


async def serve(port: int) -> None:
    """An emulated API server on `port` until killed (its controls under /_emulator/)."""
    async with ClusterEmulator() as api, kmock.Server(api, port=port) as server:
        print(f"emulator serving on {server.url}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":  # python -m tests.k8s.cluster PORT
    asyncio.run(serve(int(sys.argv[1])))


__all__ = ["ClusterEmulator", "MiniControllers", "NAMESPACE", "COST", "kubeconfig", "removal_order", "seed_pods"]
