"""In-process event bus: every change is published once and fanned out to WebSocket subscribers.

Bounded queues: a slow subscriber loses its oldest messages rather than slowing the control plane
(it can always re-read state from the REST API).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

QUEUE_SIZE = 1000


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def listen(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `callback` synchronously on every publish: state derived from events (the gateway's routing
        table) is current before the publishing request returns."""
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def publish(self, type_: str, data: dict[str, Any]) -> None:
        for callback in tuple(self._listeners):
            callback(type_, data)
        message = {"type": type_, "data": data, "timestamp": datetime.now(timezone.utc).isoformat()}
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
