"""Small asyncio helpers shared by the control plane's loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """`asyncio.wait_for` without its Python 3.11 flaw: there, a cancellation that arrives just as the
    awaited thing completes is swallowed, so a loop around it never ends and whoever cancelled it (a
    shutdown) waits forever. `asyncio.timeout` has no such race. Raises TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def stop(task: asyncio.Task | None) -> None:
    """Cancel a loop's task and wait until it has ended: the way every background loop here is stopped on close."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def woken_or_every(wake: asyncio.Event, interval_s: float) -> None:
    """The pace of a level-triggered loop: return when `wake` is set (a change asks for a pass now) or after
    `interval_s` (a pass anyway), with `wake` cleared."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(interval_s):
            await wake.wait()
    wake.clear()
