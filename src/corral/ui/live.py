"""How pages stay live, and how they change things.

Live: each browser gets one bus listener that only counts events by type. A page section declares
which event types concern it; a short timer redraws it when those counts moved. A burst of events
(a distribution moving 500 pods) therefore costs one redraw, never one per event, and nothing is
redrawn while nothing happens. The listener also keeps the newest data of the types in KEPT (the
`load` event: the load monitor's snapshot, built once a second for every watcher), so a section that
shows load redraws from the data the event carried instead of building it again (corral.ui.load).

Act: every mutation goes through `act`, which enforces the API token when one is configured (the UI
never bypasses what the REST API enforces) and turns a refusal into its message, for the page to show
next to the control that caused it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from nicegui import app, ui

from corral.auth import token_accepted
from corral.domain.errors import CorralError
from corral.events import EventType

if TYPE_CHECKING:
    from corral.runtime import Runtime

_runtime: Runtime | None = None
REDRAW_INTERVAL_S = 0.1
KEPT = frozenset({EventType.LOAD.value})  # event types whose newest data the listener keeps (a reference, no copy)


def bind(runtime: Runtime) -> None:
    """The runtime the pages work on (one per `corral serve` process)."""
    global _runtime
    _runtime = runtime


def runtime() -> Runtime:
    assert _runtime is not None, "corral.ui.live.bind(runtime) was not called"
    return _runtime


class ClientEvents:
    """Counts the bus's events for one browser; removed from the bus when the browser goes away."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.latest: dict[str, dict[str, Any]] = {}  # type → the newest data, for the types in KEPT
        bus = runtime().bus
        bus.listen(self._on_event)
        ui.context.client.on_delete(lambda: bus.unlisten(self._on_event))

    def _on_event(self, type_: str, data: dict[str, Any]) -> None:
        self.counts[type_] += 1
        if type_ in KEPT:
            self.latest[type_] = data

    def version(self, types: Iterable[str]) -> int:
        return sum(self.counts[t] for t in types)


def live(events: ClientEvents, types: Iterable[str], redraw: Callable[[], Any]) -> None:
    """Call `redraw` (a refreshable's `refresh`, usually) whenever events of `types` have arrived."""
    wanted = tuple(types)
    seen = [events.version(wanted)]

    def check() -> None:
        now = events.version(wanted)
        if now != seen[0]:
            seen[0] = now
            redraw()

    ui.timer(REDRAW_INTERVAL_S, check)


def token_ok() -> bool:
    return token_accepted(str(app.storage.user.get("token", "")), runtime().settings.api_token)


async def act(action: Callable[[], Awaitable[Any]]) -> tuple[Any, str | None]:
    """(result, None) or (None, the message to show): a refusal's problem with its hints in plain words
    (`domain.errors.PLAIN`: the page shows what to list or create; no API path or command)."""
    if not token_ok():
        return None, "this Corral requires an API token: enter it in the header (key icon)"
    try:
        return await action(), None
    except CorralError as exc:
        return None, str(exc)


def notify(message: str, kind: str = "positive") -> None:
    """Top-right, away from the tables an operator is working in."""
    ui.notify(message, type=kind, position="top-right")  # type: ignore[arg-type]
