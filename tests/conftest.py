"""Shared helpers: polling with a deadline (never bare sleeps as synchronisation)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# The tests' datasets live under pytest's temporary directories: allow them as dataset roots for every
# Corral the tests build, in-process or as a `corral serve` child (it inherits the environment).
os.environ.setdefault("CORRAL_DATASET_ROOTS", json.dumps([tempfile.gettempdir()]))


class _Poll(Generic[T]):
    """One deadline for repeated checks of `predicate`; the caller chooses how to wait between them."""

    def __init__(self, predicate: Callable[[], T], timeout: float, what: str) -> None:
        self.predicate, self.what, self.timeout = predicate, what, timeout
        self.deadline = time.monotonic() + timeout

    def check(self) -> T | None:
        value = self.predicate()
        if value:
            return value
        if time.monotonic() > self.deadline:
            raise AssertionError(f"timed out after {self.timeout:.0f} s waiting for {self.what} (last value: {value!r})")
        return None


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.check()) is None:
        time.sleep(interval)
    return value


async def wait_for_async(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> T:
    """`wait_for` for async tests: yields to the event loop (and so to the code under test) while polling."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.check()) is None:
        await asyncio.sleep(interval)
    return value
