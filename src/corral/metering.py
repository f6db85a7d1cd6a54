"""Metering: what each business used, per hour, kept in SQLite (`usage_hourly`) and reported by `GET /api/usage`.

Every `usage_flush_s` seconds (at most 60) the gateway's counters (per business service and API key: `TrafficStats.
meter`, the same on both data planes) are read and what moved since the last flush is added to the current hour's
rows, in the same transaction as the counters themselves (the cursor, with the data
plane's epoch): a control plane that crashes and starts again reads the cursor back and adds only what is new, so
nothing is counted twice, and at most one flush period of traffic is lost (the counts of a data plane that died
with it, after its last flush). A graceful stop flushes once more. GPU-seconds are integrated from the assignment
history when a report is asked for (corral.domain.usage), so they need no flush at all. Rows older than
`usage_retention_days` are pruned once an hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta, timezone
from typing import Protocol

from corral.aio import stop
from corral.domain.usage import (
    GroupBy,
    Held,
    MeterKey,
    UsageCounts,
    UsageKey,
    UsageRow,
    assigned_intervals,
    assignment_changes,
    gpu_seconds,
    gpu_seconds_by_hour,
    report,
    task_intervals,
)
from corral.gateway.routing import RoutingTable
from corral.store.state import StateStore
from corral.store.usage import UsageStore

log = logging.getLogger("corral.metering")
# How often the Prometheus GPU-seconds counter is integrated again: it reads every assignment row of the history
# (10,000 rows: about 0.5 s off the loop on two busy cores), which a report does only when asked.
GPU_COUNTER_EVERY_S = 300.0


class Counters(Protocol):
    """A data plane's counters (`TrafficStats` or `NginxStats.snapshot()`'s): cumulative within `epoch`."""

    epoch: str

    def meter(self) -> dict[MeterKey, UsageCounts]: ...


class StatsSource(Protocol):
    async def refresh(self) -> None: ...

    def snapshot(self) -> Counters: ...


class Metering:
    def __init__(self, store: StateStore, stats: Callable[[], StatsSource], routes: Callable[[], RoutingTable],
                 replicas: Callable[[], Collection[str]], flush_s: float, retention_days: int) -> None:
        """`stats`: the data plane's counters; `routes`: its routing table (a service's business); `replicas`: the
        replicas that exist now (an assignment of one that vanished ends: `assignment_changes`)."""
        self.usage = UsageStore(store)
        self._stats, self._routes, self._replicas = stats, routes, replicas
        self.flush_s, self.retention = flush_s, timedelta(days=retention_days)
        self._business_of: dict[str, str] = {}  # service → business, kept after the service leaves the table
        self._task: asyncio.Task | None = None
        self._pruned_at = 0.0
        self._started = time.time()
        # Prometheus counters: what this control plane flushed since it started, per (business, key id)
        self.flushed: dict[UsageKey, UsageCounts] = {}
        self._held_since_start: dict[str, Held] = {}
        self._held_at = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="metering")

    async def close(self) -> None:
        if self._task is not None:
            await stop(self._task)
            self._task = None
            await self.flush()  # a graceful stop loses nothing

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 (a busy database, a data plane restarting: the next flush covers it)
                log.exception("metering could not flush the gateway's counters; the next flush adds them")

    async def flush(self) -> dict[UsageKey, UsageCounts]:
        """Add what the gateway counted since the last flush to the hourly rows (the database work off the loop)."""
        source = self._stats()
        await source.refresh()
        counters = source.snapshot()
        if not counters.epoch:
            # Not read from the data plane yet: flushing would replace the cursor of an nginx that outlived a crash
            # (and still holds those counters) with an empty one, and its counters would then be added again.
            return {}
        for name, route in self._routes().items():
            if route.business is not None:
                self._business_of[name] = route.business
        now = datetime.now(timezone.utc)
        added = await asyncio.to_thread(self.usage.flush, counters.epoch, counters.meter(), dict(self._business_of), now)
        for key, counts in added.items():
            self.flushed[key] = self.flushed.get(key, UsageCounts()) + counts
        if time.time() - self._held_at >= GPU_COUNTER_EVERY_S:
            self._held_at = time.time()
            present = set(self._replicas())
            self._held_since_start = await asyncio.to_thread(
                self._held, datetime.fromtimestamp(self._started, timezone.utc), now, present)
        if time.time() - self._pruned_at >= 3600:
            self._pruned_at = time.time()
            gone = await asyncio.to_thread(self.usage.prune, now - self.retention)
            if gone:
                log.info("metering pruned %d hourly usage rows older than %s", gone, self.retention)
        return added

    def _intervals(self, start: datetime, end: datetime, present: Collection[str]) -> list:
        until = min(end, datetime.now(timezone.utc)).timestamp()
        changes = assignment_changes(self.usage.assignment_rows(end), self.usage.gpus_of_pools(), present)
        return [*assigned_intervals(changes, until), *task_intervals(self.usage.task_runs(start, end), until)]

    def _held(self, start: datetime, end: datetime, present: Collection[str]) -> dict[str, Held]:
        return gpu_seconds(self._intervals(start, end, present), start.timestamp(), end.timestamp())

    def report(self, start: datetime, end: datetime, group_by: GroupBy, present: Collection[str]) -> list[UsageRow]:
        """The usage of [start, end) grouped (blocking: reads the database; call it off the loop). Traffic counts
        are hourly: an hour is included whole when it overlaps the window; GPU-seconds are exact to the window."""
        held = gpu_seconds_by_hour(self._intervals(start, end, present), start.timestamp(), end.timestamp())
        return report(self.usage.traffic(start, end), held, group_by)

    async def report_now(self, start: datetime, end: datetime, group_by: GroupBy) -> list[UsageRow]:
        return await asyncio.to_thread(self.report, start, end, group_by, set(self._replicas()))

    def metrics(self) -> list[str]:
        """`corral_usage_*` counters for `/api/metrics`: since this control plane started (a restart resets them, as
        Prometheus expects of counters). Key ids only, never keys."""
        lines: list[str] = []
        names = ("requests", "prompt_tokens", "completion_tokens", "errors", "held", "rejected")
        helps = ("Requests forwarded to a replica", "Prompt tokens of responses that reported usage",
                 "Completion tokens of responses that reported usage", "Forwarded requests that failed",
                 "Requests held for a free replica", "Requests answered by the gateway itself")
        for i, (name, text) in enumerate(zip(names, helps, strict=True)):
            lines += [f"# HELP corral_usage_{name}_total {text}, per business and key, as flushed by metering.",
                      f"# TYPE corral_usage_{name}_total counter"]
            lines += [f'corral_usage_{name}_total{{business="{b}",key_id="{k or ""}"}} {c.values()[i]}'
                      for (b, k), c in sorted(self.flushed.items(), key=lambda item: (item[0][0], item[0][1] or ""))]
        lines += ["# HELP corral_usage_gpu_seconds_total GPU-seconds of the replicas assigned to a business (and of "
                  "finetune tasks), integrated from the assignment history.", "# TYPE corral_usage_gpu_seconds_total counter"]
        lines += [f'corral_usage_gpu_seconds_total{{business="{b}"}} {h.gpu_seconds:.3f}'
                  for b, h in sorted(self._held_since_start.items())]
        return lines


def rows_total(rows: Iterable[UsageRow]) -> tuple[UsageCounts, Held]:
    counts, held = UsageCounts(), Held()
    for r in rows:
        counts, held = counts + r.counts, held + r.held
    return counts, held
