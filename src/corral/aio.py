"""Small asyncio helpers shared by the control plane's loops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """`asyncio.wait_for` without its Python 3.11 flaw: there, a cancellation that arrives just as the
    awaited thing completes is swallowed, so a loop around it never ends and whoever cancelled it (a
    shutdown) waits forever. `asyncio.timeout` has no such race. Raises TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        return await awaitable
