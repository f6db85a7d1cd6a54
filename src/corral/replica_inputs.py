"""The inputs of replica picking that only the engines know, fed to the data plane every second.

A prefix-aware business service (domain/replica_picking.py) weighs each replica's engine queue (waiting requests)
and KV-cache usage: this loop scrapes the `/metrics` of those services' replicas (`corral.signals`, the
autopilot's parser: cut down and parsed off the event loop) and pushes the figures to the data plane, with every
replica's loaded LoRA adapters (corral/adapters.py, read on its own loop), so that a request naming an adapter goes
only to replicas that have it. Least-load services cost nothing here: no scrape, and nothing pushed for them
unless their replicas report adapters. A figure older than `signals.FRESH_FOR_S` counts as unknown (0 in the
scores), so a replica whose `/metrics` stopped answering is judged on the gateway's own in-flight count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from corral.aio import stop
from corral.domain.models import Pod
from corral.domain.replica_picking import ReplicaInputs, RoutingPolicy
from corral.gateway.routing import RoutingTable
from corral.signals import EngineSignals

log = logging.getLogger("corral.replica_inputs")


class ReplicaInputsFeed:
    def __init__(self, table: Callable[[], RoutingTable], pods: Callable[[], Iterable[Pod]],
                 adapters: Callable[[], Mapping[str, frozenset[str]]],
                 push: Callable[[Mapping[str, ReplicaInputs]], Awaitable[None]], *, interval_s: float = 1.0,
                 signals: EngineSignals | None = None) -> None:
        self._table, self._pods, self._adapters, self._push = table, pods, adapters, push
        self.interval_s = interval_s
        self.signals = signals or EngineSignals()
        self._pushed: Mapping[str, ReplicaInputs] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="replica-inputs")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
        await self.signals.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one failed round must not stop picking's inputs; the next one tries again
                log.exception("replica inputs round failed")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> Mapping[str, ReplicaInputs]:
        """Scrape the replicas of prefix-aware services, and push their figures and every replica's adapters."""
        scored = {t.name for route in self._table().values() if route.routing.policy is RoutingPolicy.PREFIX_AWARE
                  for t in route.targets}
        if scored or self._pushed:  # (a scrape of none forgets what was scraped before)
            await self.signals.scrape([p for p in self._pods() if p.name in scored] if scored else [])
        loaded = self._adapters()
        inputs: dict[str, ReplicaInputs] = {}
        for name in sorted(scored | loaded.keys()):
            signal = self.signals.of(name) if name in scored else None
            inputs[name] = ReplicaInputs(waiting=signal.waiting if signal else None,
                                         kv_cache_usage=signal.kv_cache_usage if signal else None,
                                         adapters=loaded.get(name, frozenset()))
        if inputs or self._pushed:  # (an empty push once clears what the data plane had)
            await self._push(inputs)
        self._pushed = inputs
        return inputs
