"""The data plane's reconciler: the routing table has a version, and the data plane acknowledges it.

Every serving event marks the table dirty (`mark_dirty`: a flag, no rebuild). `sync()` rebuilds once,
coalescing every change marked so far, gives a table that differs from the last one the next version,
pushes it and waits until the data plane serves that version or a newer one. The controller awaits
`sync()` at the end of every mutation, so an API call returns once its change routes traffic; if the
data plane does not confirm in time, `DataPlaneLagging` (503) says so and the change stays recorded.

A background loop (`start`/`close`) pushes what events marked outside a mutation (a replica became
ready, died), retries failed pushes with exponential back-off, and re-verifies every
`verify_interval_s` that the data plane still serves the latest version: an nginx restarted with
empty shared memory gets the table again, and an nginx that exited is restarted by the push.

One push at a time: concurrent `sync()` callers wait for the same push, and a push always carries
the newest table, so a burst of changes costs one push (see `status()["pushes"]`).

A data plane that serves a version above the one desired here serves a table this control plane never pushed
(something else reached the control channel, or a bug): a fault, not an acknowledgement. It is counted and
shown (`status()["faults"]`, `lastFault`, in `/api/system/data-plane`), and repaired at once by replacing the
table with the desired one (`push(..., replace=True)`: the data plane's rule that versions only go forward would
otherwise keep the foreign table for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from corral.aio import within
from corral.domain.errors import Unavailable
from corral.gateway.routing import RoutingTable

log = logging.getLogger("corral.gateway.sync")


class DataPlane(Protocol):
    """What the reconciler needs of a data plane (`proxy.Gateway`, `nginx_plane.NginxGateway`)."""

    async def push(self, table: RoutingTable, version: int, replace: bool = False) -> int:
        """Serve `table` as `version`; return the version now served (a newer one is never replaced, unless
        `replace`)."""
        ...

    async def served_version(self) -> int:
        """The version served now (0: none, e.g. a data plane restarted with an empty table)."""
        ...


class DataPlaneLagging(Unavailable):
    """503: the change is recorded; the gateway has not applied it yet and Corral keeps retrying."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RoutingSync:
    def __init__(self, build: Callable[[], RoutingTable], plane: DataPlane, *, timeout_s: float = 3.0,
                 verify_interval_s: float = 1.0, push_timeout_s: float = 10.0, backoff_initial_s: float = 0.05,
                 backoff_max_s: float = 2.0) -> None:
        self._build = build
        self.plane = plane
        self.timeout_s = timeout_s  # how long sync() waits for the data plane's acknowledgement
        self.verify_interval_s = verify_interval_s
        self.push_timeout_s = push_timeout_s  # one push or version read; a slower one counts as failed
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.pushes = 0
        self._dirty = True  # nothing built yet
        self._table: RoutingTable | None = None
        self._desired = 0  # version of `_table`
        self._applied = 0  # highest version the data plane acknowledged
        self._last_error: str | None = None
        self.faults = 0  # versions served above the desired one (see the module's docstring)
        self._last_fault: str | None = None
        self._failures = 0  # consecutive; drives the back-off
        self._wake = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[int]]] = []
        self._push_task: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # the interface -----------------------------------------------------------------------------
    def mark_dirty(self) -> None:
        """Something that may change routing happened (cheap: the rebuild happens in `sync`)."""
        self._dirty = True
        if self._loop is None or _running_loop() is self._loop:
            self._wake.set()
        else:  # published from another thread
            self._loop.call_soon_threadsafe(self._wake.set)

    async def sync(self, timeout_s: float | None = None) -> int:
        """Apply every change marked so far; return the version the data plane acknowledged.

        Raises `DataPlaneLagging` when the data plane has not acknowledged it within `timeout_s`
        (default: the `timeout_s` given at construction); the background loop keeps pushing."""
        try:
            self._rebuild()
        except Exception as exc:  # a bug in building the table: retried by the loop, reported like a lag
            log.exception("could not build the routing table")
            self._failed(f"building the routing table failed: {exc!r}")
            raise self._lagging(self._desired) from exc
        target = self._desired
        if self._applied >= target:
            return self._applied
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        self._start_push()
        try:
            return await within(self.timeout_s if timeout_s is None else timeout_s, waiter)
        except TimeoutError:
            raise self._lagging(target) from None
        finally:
            self._waiters = [(v, w) for v, w in self._waiters if w is not waiter]

    def status(self) -> dict[str, Any]:
        return {"desiredVersion": self._desired, "appliedVersion": self._applied, "lastError": self._last_error,
                "pushes": self.pushes, "faults": self.faults, "lastFault": self._last_fault}

    def start(self) -> None:
        if self._loop_task is None:
            self._loop = asyncio.get_running_loop()
            self._loop_task = self._loop.create_task(self._run(), name="routing-sync")

    async def close(self) -> None:
        for task in (self._loop_task, self._push_task):
            if task and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._loop_task = self._push_task = None
        for target, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(self._lagging(target))

    # internals ---------------------------------------------------------------------------------
    def _lagging(self, target: int) -> DataPlaneLagging:
        why = f": {self._last_error}" if self._last_error else ""
        return DataPlaneLagging(
            f"the change is recorded, but the gateway has not applied it yet (routing table version {target}, "
            f"the gateway serves version {self._applied}{why}); Corral keeps retrying",
            desiredVersion=target, appliedVersion=self._applied,
        )

    def _rebuild(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        try:
            table = self._build()
        except BaseException:
            self._dirty = True
            raise
        if table != self._table:  # an event that changed nothing routing-wise costs no push
            self._table = table
            self._desired += 1

    def _start_push(self) -> asyncio.Task:
        if self._push_task is None or self._push_task.done():
            self._push_task = asyncio.get_running_loop().create_task(self._push_latest(), name="routing-push")
        return self._push_task

    async def _push_latest(self) -> None:
        """Push the newest table until the data plane serves it; stop at the first failure (the loop retries)."""
        while self._applied < self._desired:
            version, table = self._desired, self._table
            assert table is not None
            self.pushes += 1
            try:
                served = await within(self.push_timeout_s, self.plane.push(table, version))
            except Exception as exc:
                self._failed(f"push of routing table version {version} failed: {exc.__class__.__name__}: {exc}")
                return
            if served < version:
                self._failed(f"the gateway answered version {served} to the push of version {version}")
                return
            if served > self._desired:
                await self._repair(served, table, version)
                return
            self._acknowledged(served)

    async def _repair(self, served: int, table: RoutingTable, version: int) -> None:
        """The data plane serves `served`, above every version pushed from here: replace its table with ours."""
        self.faults += 1
        self._last_fault = (f"the gateway served routing table version {served}, above the desired {version}: "
                            "a table Corral never pushed; replaced")
        log.error("%s", self._last_fault)
        try:
            served = await within(self.push_timeout_s, self.plane.push(table, version, replace=True))
        except Exception as exc:
            self._failed(f"replacing routing table version {version} failed: {exc.__class__.__name__}: {exc}")
            return
        if served != version:
            self._failed(f"the gateway answered version {served} to the replacement by version {version}")
            return
        self._acknowledged(served)

    def _acknowledged(self, served: int) -> None:
        if self._failures:
            log.info("the gateway serves routing table version %d again", served)
        self._applied = max(self._applied, served)
        self._failures, self._last_error = 0, None
        for target, waiter in self._waiters:
            if target <= self._applied and not waiter.done():
                waiter.set_result(self._applied)

    def _failed(self, message: str) -> None:
        self._failures += 1
        self._last_error = message
        if self._failures == 1 or self._failures % 20 == 0:
            log.warning("%s (attempt %d; retrying)", message, self._failures)

    async def _run(self) -> None:
        next_verify = time.monotonic() + self.verify_interval_s
        while True:
            if self._failures:  # back off; changes marked meanwhile go with the retry
                await asyncio.sleep(min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self._failures - 1)))
            elif not self._wake.is_set():
                with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a cancel racing the event
                    async with asyncio.timeout(max(0.0, next_verify - time.monotonic())):
                        await self._wake.wait()
            self._wake.clear()
            try:
                self._rebuild()
                if self._applied < self._desired:
                    await asyncio.shield(self._start_push())  # records its own failure
                elif self._failures or time.monotonic() >= next_verify:
                    next_verify = time.monotonic() + self.verify_interval_s
                    await self._verify()
            except Exception as exc:  # never let the reconciler die
                log.exception("routing reconciler")
                self._failed(f"{exc.__class__.__name__}: {exc}")

    async def _verify(self) -> None:
        """Does the data plane still serve the latest version? (An nginx restarted serves version 0.)"""
        applied = self._applied
        try:
            served = await within(self.push_timeout_s, self.plane.served_version())
        except Exception as exc:
            self._failed(f"the gateway did not report its routing table version: {exc.__class__.__name__}: {exc}")
            return
        pushing = self._push_task is not None and not self._push_task.done()
        if served > self._desired and not pushing and self._table is not None:
            await self._repair(served, self._table, self._desired)
        elif served < applied and self._applied == applied and not pushing:
            log.warning("the gateway serves routing table version %d, not %d (restarted?); pushing it again", served, applied)
            self._applied = served
            self._wake.set()
        elif served >= applied:
            if self._failures:
                log.info("the gateway serves routing table version %d again", served)
            self._failures, self._last_error = 0, None
