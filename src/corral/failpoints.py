"""Failpoints: named places where this process kills itself, so tests can prove crash safety.

A crash test starts `corral serve` with `CORRAL_FAILPOINTS=deploy.intent-recorded` (names separated
by commas); when the process reaches that point it sends itself SIGKILL — no cleanup, no finally
blocks, exactly like `kill -9` or a power cut at that instant. Unset (always, outside tests), every
call is a dictionary lookup and nothing else. Modelled on etcd's gofail and FoundationDB's buggify.
"""

from __future__ import annotations

import os
import signal

ENV = "CORRAL_FAILPOINTS"
_ARMED = frozenset(filter(None, (os.environ.get(ENV) or "").split(",")))


def reached(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
