"""Usage metering: what each business used, per hour — requests and tokens from the data plane's counters, and
GPU-seconds integrated from the assignment history.

Two sources, two ways of being safe across a crash:

- **Traffic** (requests, prompt and completion tokens, errors, held and rejected requests) comes from the data
  plane's counters, which only grow from the plane's start (its *epoch*). The control plane flushes them as
  `usage_hourly` rows: `deltas` between the counters now and the *cursor* (the counters it last flushed, stored
  with their epoch in the same transaction as the rows). A restart reads the cursor back, so counts already
  written are never written again; a plane that restarted (a new epoch) starts from zero, so only what it
  counted after the last flush and before it died is lost (at most one flush period).
- **GPU-seconds** are not counted at all: they are the integral, over a window, of the GPUs of the replicas
  assigned to each business, computed from the history rows that record every assignment (`assignment_changes`
  turns them into `AssignmentChange`s, `assigned_intervals` into intervals, `gpu_seconds` integrates). The
  history is the record, so there is nothing to lose or to count twice. Finetune tasks add their runs (`runs_after`:
  every run, preempted or restarted, each with its GPUs), billed to the task's business tag or `FINETUNE`.

Rows are keyed (business, API key id or None): the data planes count a request under the key it was admitted with
(corral.gateway.tenants, the Lua `check_access`); requests to an open service, held and rejected requests (counted
per service) and GPU time (a business's) are on the key None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from corral.domain import labels as L
from corral.domain.errors import InvalidInput

HOUR_S = 3600
FINETUNE = "(finetune)"  # the business a finetune task without a businessTag is billed to (not a valid business name,
# so it never mixes with one)

UsageKey = tuple[str, str | None]  # (business, API key id or None)
# What the data plane counts under: (business service, API key id or None). Per service and key, never per replica:
# the plane drops a replica's counters when it leaves, and a sum that went back would be taken for a restart.
MeterKey = tuple[str, str | None]


class GroupBy(StrEnum):
    BUSINESS = "business"
    KEY = "key"
    HOUR = "hour"


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """Traffic counters: cumulative as read from a data plane, or a difference."""

    requests: int = 0  # forwarded to a replica
    prompt_tokens: int = 0  # of the responses that reported usage
    completion_tokens: int = 0
    errors: int = 0  # forwarded, and failed (5xx, unreachable, cut mid-response)
    held: int = 0  # waited in the gateway's hold for a free replica (counted when they left it)
    rejected: int = 0  # answered by the gateway itself (400, 404, 413, 429, 503, 504, ...)

    def __add__(self, other: UsageCounts) -> UsageCounts:
        return UsageCounts(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def values(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)

    @classmethod
    def of(cls, values: Sequence[int]) -> UsageCounts:
        return cls(*(int(v) for v in values))

    def since(self, earlier: UsageCounts) -> UsageCounts:
        """What was counted between `earlier` and these counters. Counters only grow within an epoch; one that went
        back was dropped and counted again from zero (the plane pruned a service that left and it came back), so
        everything in it is new."""
        now, then = self.values(), earlier.values()
        if any(a < b for a, b in zip(now, then, strict=True)):
            return self
        return UsageCounts(*(a - b for a, b in zip(now, then, strict=True)))

    def __bool__(self) -> bool:
        return any(self.values())


def deltas(cursor: Mapping[MeterKey, UsageCounts], now: Mapping[MeterKey, UsageCounts]) -> dict[MeterKey, UsageCounts]:
    """What to add to the hourly rows: the counters `now` less the `cursor` (the counters last flushed in the same
    epoch; empty for a new epoch), for the keys that moved."""
    out = {}
    for key, counts in now.items():
        moved = counts.since(cursor.get(key, UsageCounts()))
        if moved:
            out[key] = moved
    return out


def by_business(moved: Mapping[MeterKey, UsageCounts], business_of: Mapping[str, str]) -> dict[UsageKey, UsageCounts]:
    """Service counters as business counters: a service's business from `business_of`; a service with none (a
    standard deployment's own service) is billed under its own name."""
    out: dict[UsageKey, UsageCounts] = {}
    for (service, key_id), counts in moved.items():
        key = (business_of.get(service, service), key_id)
        out[key] = out[key] + counts if key in out else counts
    return out


def hour_of(t: datetime) -> datetime:
    return t.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


# GPU-seconds ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AssignmentChange:
    """From unix time `t`, `replica` (with `gpus` GPUs) is assigned to `business` (None: unassigned, or gone)."""

    t: float
    replica: str
    business: str | None
    gpus: int


@dataclass(frozen=True, slots=True)
class Interval:
    """`replica` assigned to `business` with `gpus` GPUs over [start, end)."""

    replica: str
    business: str
    gpus: int
    start: float
    end: float


def assigned_intervals(changes: Iterable[AssignmentChange], until: float) -> list[Interval]:
    """Each replica's time assigned to a business, from its changes (in any order; for one replica and time, the
    last given wins). An assignment still in effect runs to `until`; changes after `until` are ignored."""
    per_replica: dict[str, list[tuple[float, int, AssignmentChange]]] = {}
    for i, change in enumerate(changes):
        per_replica.setdefault(change.replica, []).append((change.t, i, change))
    out = []
    for replica, seq in per_replica.items():
        seq.sort(key=lambda item: (item[0], item[1]))
        for (_, _, change), nxt in zip(seq, [*seq[1:], None], strict=True):
            end = min(until, nxt[0] if nxt is not None else until)
            if change.business is not None and change.gpus >= 0 and end > change.t:
                out.append(Interval(replica, change.business, change.gpus, change.t, end))
    return out


def _overlap(interval: Interval, start: float, end: float) -> float:
    return max(0.0, min(interval.end, end) - max(interval.start, start))


@dataclass(frozen=True, slots=True)
class Held:
    """What a business held over a window: replica-seconds and GPU-seconds."""

    replica_seconds: float = 0.0
    gpu_seconds: float = 0.0

    def __add__(self, other: Held) -> Held:
        return Held(self.replica_seconds + other.replica_seconds, self.gpu_seconds + other.gpu_seconds)


def gpu_seconds(intervals: Iterable[Interval], start: float, end: float) -> dict[str, Held]:
    """Business → what its replicas held over [start, end)."""
    out: dict[str, Held] = {}
    for interval in intervals:
        seconds = _overlap(interval, start, end)
        if seconds > 0:
            out[interval.business] = out.get(interval.business, Held()) + Held(seconds, seconds * interval.gpus)
    return out


def gpu_seconds_by_hour(intervals: Iterable[Interval], start: float, end: float) -> dict[tuple[float, str], Held]:
    """(hour's start, business) → what its replicas held in that hour, within [start, end)."""
    out: dict[tuple[float, str], Held] = {}
    for interval in intervals:
        lo, hi = max(interval.start, start), min(interval.end, end)
        hour = lo - lo % HOUR_S
        while hour < hi:
            seconds = min(hi, hour + HOUR_S) - max(lo, hour)
            if seconds > 0:
                key = (hour, interval.business)
                out[key] = out.get(key, Held()) + Held(seconds, seconds * interval.gpus)
            hour += HOUR_S
    return out


def _unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def pool_of(replica: str) -> str:
    """A replica's pool from its name (`<pool>-<suffix>`), for rows written before they recorded it."""
    return replica.rsplit("-", 1)[0]


def assignment_changes(rows: Iterable[Mapping[str, Any]], gpus_of_pool: Mapping[str, int],
                       present: Collection[str] | None = None) -> list[AssignmentChange]:
    """History rows (oldest first; `assign` and `delete` rows that succeeded) as assignment changes: an `assign` row
    moves its replica to `after.business` (`unassigned`: to none) with `after.gpus` GPUs (rows written before they
    recorded it: the pool's `gpus_of_pool`, else 0); a `delete` row of a pool ends every assignment of its replicas.

    A replica lost behind Corral's back (a crash that replaced it, a pod gone on a cluster) has no row of its own
    saying so. With `present` (the replicas that exist now), such a replica's last assignment ends where a
    replacement was given its business (the next `restored:` row of its pool for that business), else at the last
    row of its pool: the last time Corral is known to have looked."""
    out: list[AssignmentChange] = []
    pools: dict[str, set[str]] = {}
    pool_of_replica: dict[str, str] = {}
    restores: list[tuple[float, str, str]] = []  # (t, pool, business) of rows giving a replacement a business
    last_in_pool: dict[str, float] = {}
    for row in rows:
        t = _unix(row["timestamp"])
        after = row.get("after") if isinstance(row.get("after"), Mapping) else {}
        if row["action"] == "assign":
            replica = str(row["target"])
            pool = str(after.get("pool") or pool_of(replica))
            gpus = after.get("gpus")
            if not isinstance(gpus, int) or isinstance(gpus, bool):
                gpus = gpus_of_pool.get(pool, 0)
            business = after.get("business")
            business = None if business in (None, L.UNASSIGNED) else str(business)
            pools.setdefault(pool, set()).add(replica)
            pool_of_replica[replica] = pool
            last_in_pool[pool] = t
            if business is not None and str(row.get("message") or "").startswith("restored:"):
                restores.append((t, pool, business))
            out.append(AssignmentChange(t, replica, business, gpus))
        elif row["action"] == "delete":
            last_in_pool[str(row["target"])] = t
            out.extend(AssignmentChange(t, replica, None, 0) for replica in sorted(pools.pop(str(row["target"]), ())))
    if present is None:
        return out
    last: dict[str, AssignmentChange] = {}
    for change in out:
        last[change.replica] = change
    for replica, change in last.items():
        if change.business is None or replica in present:
            continue
        pool = pool_of_replica[replica]
        end = next((t for t, p, b in restores if t > change.t and p == pool and b == change.business),
                   last_in_pool.get(pool, change.t))
        out.append(AssignmentChange(max(end, change.t), replica, None, 0))
    return out


@dataclass(frozen=True, slots=True)
class TaskRun:
    """A finetune task's GPUs from `start` to `end` (None: still running), billed to `business`."""

    business: str
    gpus: int
    start: float
    end: float | None


# A finetune task's runs, kept on the task (its `runs` column): [{"startedAt", "endedAt", "gpus"}], ISO times, `endedAt`
# None while it runs. A run opens when the task turns preparing or training and closes when it leaves them (preempted
# back to the queue, completed, failed, cancelled) or when a trainer found dead is launched again; both are written in
# the same row update as the status change, so a run is never recorded twice nor lost by a crash between the two.
def runs_after(runs: Sequence[Mapping[str, Any]], active: bool, at: datetime, gpus: int,
               new_run: bool = False) -> list[dict[str, Any]]:
    """The runs once the task's status changes at `at`: the open run (the last, without `endedAt`) closes at `at` when
    the task is no longer `active` or a `new_run` starts (a trainer launched again); a run opens at `at` when the task
    is `active` and none is open. At most one run is open, always the last."""
    out = [dict(r) for r in runs]
    open_ = bool(out) and out[-1].get("endedAt") is None
    if open_ and (not active or new_run):
        started = datetime.fromisoformat(str(out[-1]["startedAt"]))
        out[-1]["endedAt"] = max(at, started).isoformat()  # never before its start (a clock set back)
        open_ = False
    if active and not open_:
        out.append({"startedAt": at.isoformat(), "endedAt": None, "gpus": gpus})
    return out


def legacy_runs(started_at: datetime | None, finished_at: datetime | None, active: bool, gpus: int) -> list[dict[str, Any]]:
    """The runs of a task written before runs were recorded (its `runs` NULL): its last start to its end, or still
    open while it runs (what was billed before); a task waiting again after a preemption has none."""
    if started_at is None or (finished_at is None and not active):
        return []
    return [{"startedAt": started_at.isoformat(), "endedAt": finished_at.isoformat() if finished_at else None, "gpus": gpus}]


def billed_runs(runs: Iterable[Mapping[str, Any]], business: str | None) -> list[TaskRun]:
    """A task's runs as `TaskRun`s, billed to its business tag, or to `FINETUNE` without one."""
    return [TaskRun(business or FINETUNE, int(r.get("gpus") or 0), _unix(str(r["startedAt"])),
                    _unix(str(r["endedAt"])) if r.get("endedAt") else None) for r in runs]


def task_intervals(runs: Iterable[TaskRun], until: float) -> list[Interval]:
    """Finetune runs as intervals (a run's replica name is its position: intervals are only summed)."""
    return [Interval(f"task-{i}", r.business, r.gpus, r.start, min(until, r.end if r.end is not None else until))
            for i, r in enumerate(runs) if r.gpus > 0 and min(until, r.end if r.end is not None else until) > r.start]


# the answer of GET /api/usage --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UsageRow:
    """One row of a usage report: a group (business, key and/or hour) and what it used."""

    business: str | None
    key_id: str | None
    hour: float | None
    counts: UsageCounts
    held: Held


def report(traffic: Mapping[tuple[float, str, str | None], UsageCounts], held: Mapping[tuple[float, str], Held],
           group_by: GroupBy) -> list[UsageRow]:
    """Hourly traffic ((hour, business, key id) → counts) and hourly GPU time ((hour, business) → held) grouped:
    per business (all keys and hours), per (business, key) (GPU time is a business's, so it goes on the key None
    row), or per (hour, business). Sorted by hour, business, key."""
    groups: dict[tuple[float | None, str | None, str | None], tuple[UsageCounts, Held]] = {}

    def add(key: tuple[float | None, str | None, str | None], counts: UsageCounts, h: Held) -> None:
        c0, h0 = groups.get(key, (UsageCounts(), Held()))
        groups[key] = (c0 + counts, h0 + h)

    for (hour, business, key_id), counts in traffic.items():
        add(_group(group_by, hour, business, key_id), counts, Held())
    for (hour, business), h in held.items():
        add(_group(group_by, hour, business, None), UsageCounts(), h)
    rows = [UsageRow(business, key_id, hour, c, h) for (hour, business, key_id), (c, h) in groups.items()]
    rows.sort(key=lambda r: (r.hour or 0.0, r.business or "", r.key_id or ""))
    return rows


def _group(group_by: GroupBy, hour: float, business: str, key_id: str | None
           ) -> tuple[float | None, str | None, str | None]:
    if group_by is GroupBy.HOUR:
        return (hour, business, None)
    if group_by is GroupBy.KEY:
        return (None, business, key_id)
    return (None, business, None)


# the window of a report -----------------------------------------------------------------------------------------
MAX_WINDOW_DAYS = 366
DEFAULT_WINDOW_HOURS = 24
TIME_TEXT_MAX = 64
# the times a report may name: unix times, with room for a window's arithmetic on either side
EARLIEST = datetime(1971, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)


def parse_time(text: str, field: str) -> datetime:
    """An ISO 8601 time (`2026-12-07T10:00:00Z`, `2026-12-07T10:00`, `2026-12-07`); without a zone, UTC."""
    if len(text) > TIME_TEXT_MAX:
        raise InvalidInput(f"{field} must be an ISO 8601 time of at most {TIME_TEXT_MAX} characters")
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{field} must be an ISO 8601 time such as 2026-12-07T10:00:00Z, not '{L.shown(text)}'") from None
    value = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if not EARLIEST <= value <= LATEST:
        raise InvalidInput(f"{field} must be between {EARLIEST.year} and {LATEST.year}, not {value.isoformat()}")
    return value


def usage_window(start: str | None, end: str | None, now: datetime) -> tuple[datetime, datetime]:
    """A report's [from, to): `to` defaults to now, `from` to `DEFAULT_WINDOW_HOURS` before `to`; `from` must come
    before `to`, and the window may span at most `MAX_WINDOW_DAYS` days."""
    to = parse_time(end, "to") if end else now
    frm = parse_time(start, "from") if start else to - timedelta(hours=DEFAULT_WINDOW_HOURS)
    if frm >= to:
        raise InvalidInput(f"from ({frm.isoformat()}) must be before to ({to.isoformat()})")
    if to - frm > timedelta(days=MAX_WINDOW_DAYS):
        raise InvalidInput(f"from and to may be at most {MAX_WINDOW_DAYS} days apart; ask for several windows")
    return frm, to
