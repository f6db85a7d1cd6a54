"""In-process event bus: every change is published once and fanned out to WebSocket subscribers.

Bounded queues: a slow subscriber loses its oldest messages rather than slowing the control plane
(it can always re-read state from the REST API).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

QUEUE_SIZE = 1000


class EventType(StrEnum):
    """The `type` of every message on the bus (and on `/ws`); its value is the wire name."""

    DEPLOYMENT = "deployment"  # {action: created, deployment: <deployment view>} | {action: deleted, name}
    SERVICE_DEPLOYMENT = "service_deployment"  # {action: created|updated, service: <service view>} | {action: deleted, name}
    POD_ASSIGNMENT = "pod_assignment"  # {podName, deployment, modelName, from, to, reason?}
    DISTRIBUTION = "distribution"  # the distribute result
    SCALE = "scale"  # the scale result
    REPLICA_STATUS = "replica_status"  # a replica changed phase or readiness, was replaced or deleted
    ASSIGNMENT_COMPLETE = "assignment_complete"  # kubernetes: traffic follows a relabel {podName, from, to, delayMs}
    HISTORY = "history"  # a history row was written or completed (its HistoryEntry)
    FINETUNE_TASK = "finetune_task"  # a task changed (its FinetuneTask view)
    GPU_INVENTORY = "gpu_inventory"  # the detected GPUs changed (GpuInfo)
    ADAPTERS = "adapters"  # a pool's LoRA adapters changed or were loaded somewhere {pool, adapters: [AdapterView]}
    LOAD = "load"  # once a second while watched: the load of every business service (LoadOverview, window 30 s)
    AUTOPILOT = "autopilot"  # an autopilot decision carried out {pool, moves, scale, reason}

    @property
    def may_change_routing(self) -> bool:
        """Whether the event may change which replicas a business service selects (labels, readiness, services):
        the gateway's routing table is marked dirty on these, and only on these."""
        return self not in _NOT_ROUTING


# Events about something else than which replica serves which business (history, tasks, GPUs, load, adapters).
_NOT_ROUTING = frozenset({EventType.HISTORY, EventType.FINETUNE_TASK, EventType.GPU_INVENTORY, EventType.LOAD,
                          EventType.ADAPTERS})


def _plain(value: Any) -> Any:
    """Event data as JSON-ready values: typed views (pydantic models) become their wire form."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._listeners: list[Callable[[EventType, dict[str, Any]], None]] = []

    def listen(self, callback: Callable[[EventType, dict[str, Any]], None]) -> None:
        """Call `callback` synchronously on every publish: state derived from events (the gateway's routing
        table) is current before the publishing request returns."""
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[EventType, dict[str, Any]], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def publish(self, type_: EventType, data: dict[str, Any] | BaseModel) -> None:
        """Announce `data` (a dict, or a view model) as an event of `type_`. Listeners and subscribers receive
        JSON-ready dicts; the message's `type` is the enum's wire name."""
        type_ = EventType(type_)  # an unknown name fails here, at its publisher, not in a listener
        data = _plain(data)
        for callback in tuple(self._listeners):
            callback(type_, data)
        message = {"type": type_.value, "data": data, "timestamp": datetime.now(timezone.utc).isoformat()}
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
