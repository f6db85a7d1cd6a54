"""The simulator's sleep mode (`--enable-sleep-mode`): vLLM's endpoints and answers, with modelled times.

    POST /sleep?level=1|2        → 200, empty body, once asleep (level 1: weights to host memory; 2: discarded)
    POST /wake_up[?tags=weights|kv_cache]  → 200, empty body, once awake (tags wake one part, as vLLM's do)
    POST /collective_rpc {"method": "reload_weights"} → 200 (vLLM's level-2 wake sequence calls it; the modelled
                                   reload is charged to waking the weights, as vLLM's published level-2 wake time is)
    GET  /is_sleeping            → {"is_sleeping": bool}: true from the end of a sleep until every part is awake

The times are `corral.domain.sleep.SleepTiming` (weights' size over a host↔device or disk bandwidth plus a fixed
part) and are awaited: the simulator stands for an engine doing the copy. Sleep and wake calls are taken one at a
time (vLLM's engine core runs them in order).

A request to a sleeping (or falling-asleep, or waking) simulator is refused at once with **503** in vLLM's error
shape. vLLM itself defines no answer for it (its docs: "a sleeping engine does not process any requests"; what a
request meets depends on the version: a hang or a failed forward pass); an immediate, named refusal is what a test
can tell apart from a slow engine, and Corral never routes to a replica it put to sleep (gateway/routing.py).
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corral.domain.sleep import SleepLevel, SleepTiming

TAGS = ("weights", "kv_cache")


def _error(message: str, status: int, err_type: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": err_type, "param": None, "code": status}},
                        status_code=status)


class SimSleep:
    """One simulator's sleep state: which parts sleep (vLLM's tags) and at what level."""

    def __init__(self, timing: SleepTiming) -> None:
        self.timing = timing
        self.level: SleepLevel | None = None
        self.sleeping_tags: set[str] = set()
        self.changing = False  # a sleep or wake is under way
        self._lock = asyncio.Lock()

    @property
    def is_sleeping(self) -> bool:
        return bool(self.sleeping_tags)

    @property
    def serving(self) -> bool:
        return not self.sleeping_tags and not self.changing

    def refusal(self) -> JSONResponse | None:
        """The 503 a completion request gets while the engine is not awake (module docstring)."""
        if self.serving:
            return None
        what = "waking up" if self.is_sleeping and self.changing else "sleeping" if self.is_sleeping else "going to sleep"
        return _error(f"The engine is {what} (sleep mode): it serves no request until POST /wake_up completes.", 503,
                      "ServiceUnavailableError")

    async def sleep(self, request: Request) -> Response:
        raw = request.query_params.get("level", "1")
        try:
            level = SleepLevel.parse(raw)
        except ValueError as exc:
            return _error(str(exc), 400)
        async with self._lock:
            if self.is_sleeping:  # already asleep: nothing to copy again
                return Response(status_code=200)
            self.changing = True
            try:
                await asyncio.sleep(self.timing.sleep_s(level))
                self.level, self.sleeping_tags = level, set(TAGS)
            finally:
                self.changing = False
        print(f"INFO [simulator] sleeping at level {int(level)} (weights "
              f"{'offloaded to host memory' if level == SleepLevel.OFFLOAD else 'discarded'})", flush=True)
        return Response(status_code=200)

    async def wake_up(self, request: Request) -> Response:
        tags = request.query_params.getlist("tags") or list(TAGS)
        if unknown := [t[:40] for t in tags if t not in TAGS]:
            return _error(f"unknown wake_up tags {unknown}: use weights and/or kv_cache", 400)
        async with self._lock:
            waking = self.sleeping_tags & set(tags)
            if not waking:
                return Response(status_code=200)
            level = self.level or SleepLevel.OFFLOAD
            self.changing = True
            try:
                await asyncio.sleep(self.timing.wake_s(level, weights="weights" in waking, kv_cache="kv_cache" in waking))
                self.sleeping_tags -= waking
                if not self.sleeping_tags:
                    self.level = None
            finally:
                self.changing = False
        if not self.sleeping_tags:
            print("INFO [simulator] awake", flush=True)
        return Response(status_code=200)

    async def state(self, _: Request) -> JSONResponse:
        return JSONResponse({"is_sleeping": self.is_sleeping})

    async def collective_rpc(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("request body must be JSON", 400)
        method = body.get("method") if isinstance(body, dict) else None
        if method != "reload_weights":
            return _error(f"the simulator answers collective_rpc for reload_weights only, not {str(method)[:40]!r}", 400)
        return JSONResponse({"results": [None]})

    def routes(self) -> list[Route]:
        return [
            Route("/sleep", self.sleep, methods=["POST"]),
            Route("/wake_up", self.wake_up, methods=["POST"]),
            Route("/is_sleeping", self.state, methods=["GET"]),
            Route("/collective_rpc", self.collective_rpc, methods=["POST"]),
        ]
