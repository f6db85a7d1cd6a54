"""The GPU ledger: one account of which GPU unit is held by whom, read by every placement. Pure.

Corral places two kinds of work on the same GPUs — model-pool replicas (whole devices, through
`CUDA_VISIBLE_DEVICES`) and finetune tasks (whole GPUs or MIG instances). When each kept its own
books (integer device ids for replicas, unit ids for tasks, invented indices on a cluster), a replica
could be given GPU 0 while a task trained on a MIG slice of GPU 0. Here there is one snapshot, built
from the inventory's units and everyone's holdings, and every consumer (replica placement, the
finetune queue, the reclaim planner) reads it.

The rule the ledger keeps: a unit is held at most once, and a whole GPU and a MIG slice of it are
never both held — a whole GPU is free only if neither it nor any of its slices is held, a slice only
if neither it nor its parent GPU is. Unit ids are the inventory's (`GpuDevice.id`): `"0"` for
GPU 0, `"0/mig1"` for MIG instance 1 carved from GPU 0.

Snapshots are values: `hold`, `release` and `claim` return a new ledger, so a planner can try
"what if" without touching what others read.

Shared units (issue 31): replicas of pools deployed with `sharedGpus: true` may hold the *same* unit when at most
one of them is awake there; the others sleep (corral.domain.sleep). The awake one uses the unit's GPU memory; a
level-1 sleeper's weights sit in host memory, counted against the host budget (`host_budget_bytes`, the setting
CORRAL_SLEEP_HOST_MEMORY_GB); a level-2 sleeper costs neither. Sharing is by exact unit id only (never a whole GPU
with a slice of it), and a holder that is not shared never shares a unit. `hold_shared`, `set_sleep`,
`place_shared` keep these rules; `awake_on`, `sleepers_on`, `host_bytes_used` read them (the swap decision does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from corral.domain.errors import Conflict
from corral.domain.sleep import SleepLevel

GIB = 1024**3


class HolderKind(StrEnum):
    REPLICA = "replica"
    TASK = "task"


@dataclass(frozen=True, order=True)
class Holder:
    """Who holds units: a model-pool (or standard) replica, or a finetune task, by name."""

    kind: HolderKind
    name: str

    @classmethod
    def replica(cls, name: str) -> Holder:
        return cls(HolderKind.REPLICA, name)

    @classmethod
    def task(cls, name: str) -> Holder:
        return cls(HolderKind.TASK, name)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name}"


def parse_unit_id(unit_id: str) -> tuple[int, int | None]:
    """`"0"` → (0, None); `"0/mig1"` → (0, 1). ValueError for anything else."""
    device, sep, rest = unit_id.partition("/")
    if not sep:
        return int(device), None
    if not rest.startswith("mig"):
        raise ValueError(f"not a GPU unit id: {unit_id!r}")
    return int(device), int(rest.removeprefix("mig"))


def units_overlap(a: str, b: str) -> bool:
    """True when holding `a` keeps `b` from being free: the same unit, or a whole GPU and one of its
    MIG slices. Ids that are not unit ids overlap only with themselves."""
    if a == b:
        return True
    try:
        (device_a, mig_a), (device_b, mig_b) = parse_unit_id(a), parse_unit_id(b)
    except ValueError:
        return False
    return device_a == device_b and (mig_a is None or mig_b is None)


@dataclass(frozen=True)
class GpuUnit:
    """One schedulable unit: a whole GPU (`mig` None) or a MIG instance of GPU `device`."""

    device: int  # the parent device index (the GPU itself for a whole one)
    mig: int | None = None  # the MIG instance's index on its parent; None for a whole GPU
    memory_total_bytes: float = 0.0
    memory_free_bytes: float = 0.0
    uuid: str = ""  # what CUDA_VISIBLE_DEVICES names a MIG instance by

    @property
    def id(self) -> str:
        return str(self.device) if self.mig is None else f"{self.device}/mig{self.mig}"

    @property
    def whole(self) -> bool:
        return self.mig is None

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lowest first: by device, a whole GPU before its slices, slices by index."""
        return (self.device, 0 if self.mig is None else 1, self.mig or 0)

    def overlaps(self, other: GpuUnit) -> bool:
        return self.device == other.device and (self.mig is None or other.mig is None or self.mig == other.mig)

    @classmethod
    def parse(cls, unit_id: str, memory_total_bytes: float = 0.0, memory_free_bytes: float | None = None,
              uuid: str = "") -> GpuUnit:
        device, mig = parse_unit_id(unit_id)
        free = memory_total_bytes if memory_free_bytes is None else memory_free_bytes
        return cls(device, mig, float(memory_total_bytes), float(free), uuid)


class DeviceLike(Protocol):
    """What the ledger reads of an inventory device (`corral.gpus.inventory.GpuDevice`), without
    importing the I/O side into the domain."""

    @property
    def index(self) -> int: ...
    @property
    def parent_index(self) -> int | None: ...
    @property
    def memory_total_bytes(self) -> int: ...
    @property
    def memory_free_bytes(self) -> int: ...
    @property
    def uuid(self) -> str: ...


def units_from_devices(devices: Iterable[DeviceLike]) -> tuple[GpuUnit, ...]:
    """Ledger units from inventory devices: pass `GpuInventory.schedulable_units()` (whole GPUs without
    MIG, plus every MIG instance — a MIG-enabled GPU cannot be handed out whole)."""
    return tuple(
        GpuUnit(d.index if d.parent_index is None else d.parent_index, None if d.parent_index is None else d.index,
                float(d.memory_total_bytes), float(d.memory_free_bytes), d.uuid)
        for d in devices
    )


def whole_units(indices: Iterable[int]) -> tuple[GpuUnit, ...]:
    """Whole GPUs known only by index (memory unknown): a backend given device ids and no inventory."""
    return tuple(GpuUnit(i) for i in sorted(set(indices)))


@dataclass(frozen=True)
class GpuClaim:
    """What a holder holds, as reported by whoever placed it.

    `units`: the exact unit ids (Corral chose them: local replicas, finetune tasks). `count`: units
    whose identity a cluster scheduler chose (a Kubernetes pod's `nvidia.com/gpu` limit); the ledger
    books them on the lowest free whole GPUs, so counts are right even where identities are not known.
    """

    holder: Holder
    units: tuple[str, ...] = ()
    count: int = 0
    shared: bool = False  # of a pool with sharedGpus: may share its units with other shared holders
    sleeping: SleepLevel | None = None  # asleep at this level (None: awake)
    host_bytes: float = 0.0  # its weights' bytes: what a level-1 sleep keeps in host memory


@dataclass(frozen=True)
class GpuLedger:
    """A snapshot: the units that exist and who holds what. Build it with `GpuLedger.build`."""

    units: tuple[GpuUnit, ...] = ()
    holdings: Mapping[Holder, tuple[str, ...]] = field(default_factory=dict)
    shared: frozenset[Holder] = frozenset()  # holders that may share a unit (module docstring)
    sleeping: Mapping[Holder, SleepLevel] = field(default_factory=dict)  # holders asleep, and at what level
    host_bytes: Mapping[Holder, float] = field(default_factory=dict)  # each holder's weights (level-1 host cost)
    host_budget_bytes: float | None = None  # host memory level-1 sleepers may use; None: not limited
    _by_unit: Mapping[str, Holder] = field(init=False, repr=False, compare=False)
    _index: Mapping[str, GpuUnit] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lowest first, so every reader (and `place`) sees the same deterministic order; read-only views.
        object.__setattr__(self, "units", tuple(sorted(self.units, key=lambda u: u.sort_key)))
        holdings = {h: tuple(u) for h, u in sorted(self.holdings.items()) if u}
        object.__setattr__(self, "holdings", MappingProxyType(holdings))
        by_unit: dict[str, Holder] = {}
        for holder, ids in holdings.items():
            for unit_id in ids:
                by_unit.setdefault(unit_id, holder)
        object.__setattr__(self, "_by_unit", MappingProxyType(by_unit))
        object.__setattr__(self, "_index", MappingProxyType({u.id: u for u in self.units}))

    # building ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, units: Iterable[GpuUnit], claims: Iterable[GpuClaim] = (), *,
              host_budget_bytes: float | None = None) -> GpuLedger:
        """The snapshot of what is observed. Lenient on purpose: what is running holds its units even
        when the books disagree (a unit gone from the inventory, two holders from before this ledger
        existed) — such units are simply not free; `conflicts()` lists them. Exact claims first, then
        counted ones on what is left."""
        claims = list(claims)
        holdings: dict[Holder, tuple[str, ...]] = {}
        for claim in claims:
            if claim.units:
                holdings[claim.holder] = tuple(dict.fromkeys(holdings.get(claim.holder, ()) + claim.units))
        ledger = cls(tuple(units), holdings, frozenset(c.holder for c in claims if c.shared),
                     {c.holder: c.sleeping for c in claims if c.sleeping is not None},
                     {c.holder: c.host_bytes for c in claims if c.host_bytes}, host_budget_bytes)
        for claim in claims:
            if claim.count > 0:
                free = ledger._pick(ledger.free_units(whole_only=True), claim.count, 0.0)
                if free:
                    ledger = ledger._with(claim.holder, tuple(u.id for u in free))
        return ledger

    # reading -----------------------------------------------------------------------------------
    def unit(self, unit_id: str) -> GpuUnit | None:
        return self._index.get(unit_id)

    def units_of(self, holder: Holder) -> tuple[str, ...]:
        return self.holdings.get(holder, ())

    def held(self) -> frozenset[str]:
        return frozenset(self._by_unit)

    def holder_of(self, unit_id: str) -> Holder | None:
        """Who keeps `unit_id` from being free: its own holder, else the holder of its parent GPU, else
        of one of its slices (lowest first); None when it is free."""
        by_unit = self._by_unit
        if unit_id in by_unit:
            return by_unit[unit_id]
        blocking = sorted((u for u in by_unit if units_overlap(u, unit_id)), key=_id_key)
        return by_unit[blocking[0]] if blocking else None

    def is_free(self, unit_id: str) -> bool:
        return unit_id in self._index and self.holder_of(unit_id) is None

    def free_units(self, *, whole_only: bool = False, min_free_bytes: float = 0.0) -> tuple[GpuUnit, ...]:
        """Units nobody holds, directly or through an overlapping unit, lowest first."""
        held_ids = self.held()
        held_whole, held_slices = set(), set()
        for unit_id in held_ids:
            try:
                device, mig = parse_unit_id(unit_id)
            except ValueError:
                continue
            (held_whole if mig is None else held_slices).add(device)
        return tuple(
            u for u in self.units
            if (u.whole or not whole_only) and u.memory_free_bytes >= min_free_bytes and u.id not in held_ids
            and u.device not in held_whole and (not u.whole or u.device not in held_slices)
        )

    def conflicts(self) -> list[tuple[str, str]]:
        """Pairs of held units that overlap (should never happen; observed state can still show it). Two shared
        holders on the same unit are no conflict unless both are awake."""
        pairs = []
        for holder, ids in self.holdings.items():
            for other, other_ids in self.holdings.items():
                if other <= holder:
                    continue
                sharing = holder in self.shared and other in self.shared and (holder in self.sleeping or other in self.sleeping)
                pairs += [(a, b) for a in ids for b in other_ids if units_overlap(a, b) and not (sharing and a == b)]
        return pairs

    # sharing (issue 31) -------------------------------------------------------------------------
    def holders_on(self, unit_id: str) -> tuple[Holder, ...]:
        """Every holder of exactly `unit_id` (several only on a shared unit)."""
        return tuple(h for h, ids in self.holdings.items() if unit_id in ids)

    def awake_on(self, unit_id: str) -> Holder | None:
        """The holder of `unit_id` that is awake (uses its GPU memory), or None."""
        return next((h for h in self.holders_on(unit_id) if h not in self.sleeping), None)

    def sleepers_on(self, unit_id: str) -> tuple[Holder, ...]:
        return tuple(h for h in self.holders_on(unit_id) if h in self.sleeping)

    def sleep_level(self, holder: Holder) -> SleepLevel | None:
        return self.sleeping.get(holder)

    def host_bytes_used(self) -> float:
        """Host memory held by level-1 sleepers' weights."""
        return sum(self.host_bytes.get(h, 0.0) for h, level in self.sleeping.items() if level == SleepLevel.OFFLOAD)

    def host_bytes_free(self) -> float | None:
        """What the host budget has left; None when there is no budget."""
        return None if self.host_budget_bytes is None else self.host_budget_bytes - self.host_bytes_used()

    def hold_shared(self, holder: Holder, unit_ids: Iterable[str], *, sleeping: SleepLevel | None = None,
                    host_bytes: float = 0.0) -> GpuLedger:
        """A ledger where `holder`, a shared holder, also holds `unit_ids`: each free, or held (that exact id) by
        shared holders only, none of them awake if `holder` is. Conflict naming what stands in the way otherwise."""
        ids = tuple(unit_ids)
        ledger = self._replace(shared=self.shared | {holder}, host_bytes={**self.host_bytes, holder: float(host_bytes)})
        ledger = ledger._set_level(holder, sleeping)
        ledger._check_host_budget(holder)
        for unit_id in ids:
            if (why := ledger._cannot_share(holder, unit_id, sleeping)) is not None:
                raise Conflict(f"GPU {unit_id} cannot go to {holder}: {why}")
            ledger = ledger._with(holder, (unit_id,))
        return ledger

    def set_sleep(self, holder: Holder, level: SleepLevel | None) -> GpuLedger:
        """A ledger where `holder` sleeps at `level` (None: awake). Conflict if waking it would make two awake on one
        unit, or a level-1 sleep would exceed the host budget."""
        if level is None:
            for unit_id in self.units_of(holder):
                awake = self.awake_on(unit_id)
                if awake is not None and awake != holder:
                    raise Conflict(f"{holder} cannot wake on GPU {unit_id}: {awake} is awake there; put it to sleep first")
        ledger = self._set_level(holder, level)
        ledger._check_host_budget(holder)
        return ledger

    def place_shared(self, holder: Holder, count: int, *, sleeping: SleepLevel | None = None, host_bytes: float = 0.0,
                     who: str | None = None) -> tuple[str, ...]:
        """Units for a new shared holder: free whole units first (lowest first), then units held only by shared
        holders with none awake there when `holder` starts awake. Conflict naming the awake replica to put to sleep
        (the swap decision orchestrates that; placement does not) or the host budget."""
        if count <= 0:
            return ()
        probe = self._replace(shared=self.shared | {holder},
                              host_bytes={**self.host_bytes, holder: float(host_bytes)})._set_level(holder, sleeping)
        probe._check_host_budget(holder, who)
        chosen = [u.id for u in self.free_units(whole_only=True)][:count]
        blocked: list[str] = []
        for unit in self.units:
            if len(chosen) >= count:
                break
            if not unit.whole or unit.id in chosen or not self.holders_on(unit.id):
                continue
            why = probe._cannot_share(holder, unit.id, sleeping)
            if why is None:
                chosen.append(unit.id)
            elif (awake := self.awake_on(unit.id)) is not None and awake in self.shared:
                blocked.append(f"GPU {unit.id} ({awake} is awake there: put it to sleep first)")
        if len(chosen) < count:
            where = "; ".join(blocked) or "no free GPU and no GPU shared only by sleeping replicas of sharedGpus pools"
            raise Conflict(f"{who or holder} needs {count} GPU(s) to share but found {len(chosen)}: {where}")
        return tuple(chosen)

    def _cannot_share(self, holder: Holder, unit_id: str, sleeping: SleepLevel | None) -> str | None:
        if self.unit(unit_id) is None:
            return "it is not a detected GPU unit"
        others = [h for h in self.holders_on(unit_id) if h != holder]
        blocking = self.holder_of(unit_id)
        if blocking is not None and blocking != holder and blocking not in others:
            return f"it overlaps a unit held by {blocking}"  # a whole GPU and a slice are never shared
        if unshared := [h for h in others if h not in self.shared]:
            return f"it is held by {unshared[0]}, which does not share GPUs (sharedGpus is off)"
        if sleeping is None and (awake := next((h for h in others if h not in self.sleeping), None)) is not None:
            return f"{awake} is awake there; at most one replica is awake on a shared GPU: put it to sleep first"
        return None

    def _check_host_budget(self, holder: Holder, who: str | None = None) -> None:
        free = self.host_bytes_free()
        if free is not None and free < 0 and self.sleeping.get(holder) == SleepLevel.OFFLOAD:
            raise Conflict(f"{who or holder} cannot sleep at level 1: its weights ({self.host_bytes.get(holder, 0) / GIB:.1f}GB) "
                           f"would take host memory to {self.host_bytes_used() / GIB:.1f}GB, beyond the budget "
                           f"CORRAL_SLEEP_HOST_MEMORY_GB={self.host_budget_bytes / GIB:g}; use level 2 or raise the budget")

    def _set_level(self, holder: Holder, level: SleepLevel | None) -> GpuLedger:
        sleeping = {h: v for h, v in self.sleeping.items() if h != holder}
        if level is not None:
            sleeping[holder] = SleepLevel(level)
        return self._replace(sleeping=sleeping)

    def _replace(self, **changes: object) -> GpuLedger:
        fields = {"units": self.units, "holdings": self.holdings, "shared": self.shared, "sleeping": self.sleeping,
                  "host_bytes": self.host_bytes, "host_budget_bytes": self.host_budget_bytes} | changes
        return GpuLedger(**fields)  # type: ignore[arg-type]

    # placing -----------------------------------------------------------------------------------
    def place(self, holder: Holder, count: int, *, whole_only: bool = False, min_free_bytes: float = 0.0,
              who: str | None = None) -> tuple[str, ...]:
        """The `count` lowest free units to give `holder` (no two of them overlapping), or a Conflict
        that says how many are free. Does not change the ledger: `hold` the result (or use `claim`)."""
        if count <= 0:
            return ()
        free = self.free_units(whole_only=whole_only, min_free_bytes=min_free_bytes)
        chosen = self._pick(free, count, min_free_bytes)
        if len(chosen) < count:
            raise Conflict(self._refusal(holder, count, len(self._pick(free, len(free), 0.0)), whole_only,
                                         min_free_bytes, who))
        return tuple(u.id for u in chosen)

    def hold(self, holder: Holder, unit_ids: Iterable[str]) -> GpuLedger:
        """A ledger where `holder` also holds `unit_ids`; Conflict if any is unknown or not free (or two
        of them overlap) — the one check that keeps the ledger's rule."""
        ids = tuple(unit_ids)
        ledger = self
        for unit_id in ids:
            if not ledger.is_free(unit_id):
                reason = "is not a detected GPU unit" if ledger.unit(unit_id) is None else f"is held by {ledger.holder_of(unit_id)}"
                raise Conflict(f"GPU {unit_id} cannot go to {holder}: it {reason}")
            ledger = ledger._with(holder, (unit_id,))
        return ledger

    def claim(self, holder: Holder, count: int, *, whole_only: bool = False, min_free_bytes: float = 0.0,
              who: str | None = None) -> tuple[GpuLedger, tuple[str, ...]]:
        """`place` then `hold`: the new ledger and the units given."""
        chosen = self.place(holder, count, whole_only=whole_only, min_free_bytes=min_free_bytes, who=who)
        return self.hold(holder, chosen), chosen

    def release(self, holder: Holder) -> GpuLedger:
        """A ledger without `holder`'s units. Their memory counts as free again (its total): what the
        holder used is given back once it is gone, whatever the last reading said."""
        # A shared unit's memory is the awake holder's: given back only when nobody holds the unit any more.
        ids = {u for u in self.units_of(holder) if all(h == holder for h in self.holders_on(u))}
        units = tuple(GpuUnit(u.device, u.mig, u.memory_total_bytes, u.memory_total_bytes, u.uuid) if u.id in ids else u
                      for u in self.units)
        return self._replace(units=units, holdings={h: u for h, u in self.holdings.items() if h != holder},
                             shared=self.shared - {holder}, sleeping={h: v for h, v in self.sleeping.items() if h != holder},
                             host_bytes={h: v for h, v in self.host_bytes.items() if h != holder})

    # helpers -----------------------------------------------------------------------------------
    def _with(self, holder: Holder, unit_ids: tuple[str, ...]) -> GpuLedger:
        holdings = dict(self.holdings)
        holdings[holder] = tuple(dict.fromkeys(holdings.get(holder, ()) + unit_ids))
        return self._replace(holdings=holdings)

    @staticmethod
    def _pick(free: Iterable[GpuUnit], count: int, min_free_bytes: float) -> list[GpuUnit]:
        chosen: list[GpuUnit] = []
        for unit in free:
            if len(chosen) >= count:
                break
            if unit.memory_free_bytes >= min_free_bytes and not any(unit.overlaps(c) for c in chosen):
                chosen.append(unit)
        return chosen

    def _refusal(self, holder: Holder, count: int, free: int, whole_only: bool, min_free_bytes: float,
                 who: str | None) -> str:
        who = who or str(holder)
        total = sum(1 for u in self.units if u.whole or not whole_only)
        memory = f" with {min_free_bytes / 1024**3:.1f}GB free" if min_free_bytes else ""
        if holder.kind == HolderKind.REPLICA:  # the API's message since the first release; tests and users rely on it
            return (f"{who} needs {count} GPU(s){memory} but only {free} of {total} detected GPU(s) are free; "
                    "set gpusPerReplica to 0 for a CPU engine (simulator, transformers) or free GPUs first")
        return f"{who} needs {count} GPU unit(s){memory} but only {free} of {total} detected unit(s) are free"


def _id_key(unit_id: str) -> tuple[int, int, int, str]:
    try:
        device, mig = parse_unit_id(unit_id)
    except ValueError:
        return (1 << 30, 0, 0, unit_id)
    return (device, 0 if mig is None else 1, mig or 0, unit_id)
