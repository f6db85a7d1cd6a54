"""Sleeping replicas: the states, the levels and the pure decisions about them.

An engine with a sleep mode (vLLM `--enable-sleep-mode`, SGLang's memory saver, Corral's simulator) keeps its
process, compiled kernels and CUDA graphs alive while it gives its GPU memory back, and wakes in seconds instead of
the minute a cold start takes:

- level 1 offloads the weights to host memory (they cost host RAM while asleep; waking copies them back);
- level 2 discards them (no host memory; waking reloads them from disk: slower).

The KV cache is discarded at both levels. Corral records the state it wants (`desired`) before it asks the engine
(intent first), and reconciles what the engine reports (`GET /is_sleeping`) with it after a crash: `reconcile`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class SleepLevel(IntEnum):
    """vLLM's levels (`POST /sleep?level=N`)."""

    OFFLOAD = 1  # weights to host memory: costs host RAM, wakes fastest
    DISCARD = 2  # weights dropped: costs nothing while asleep, wakes by reloading them

    @classmethod
    def parse(cls, value: object) -> SleepLevel:
        """A level from user input; ValueError naming the allowed values otherwise."""
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"sleep level must be 1 or 2, got {str(value)[:20]!r}")
        try:
            return cls(int(value))
        except ValueError:
            raise ValueError(f"sleep level must be 1 (weights offloaded to host memory) or 2 (weights discarded), "
                             f"got {str(value)[:20]!r}") from None


class SleepState(StrEnum):
    """What the pods view shows (`sleep`): the replica's state as Corral last saw or drove it."""

    AWAKE = "awake"
    SLEEPING = "sleeping"
    WAKING = "waking"  # a wake was asked and has not completed: not a routing target yet


class SleepStep(StrEnum):
    """What reconciliation does to one replica."""

    NONE = "none"
    SLEEP = "sleep"
    WAKE = "wake"


def reconcile(desired: SleepLevel | None, engine_sleeping: bool | None) -> SleepStep:
    """The step that brings a replica to its desired state, from what its engine reports.

    `engine_sleeping` None: the engine could not be asked (not ready, no state endpoint): nothing is done now; the
    next round asks again. A replica found awake that should sleep is put to sleep and the other way round — after a
    crash between the recorded intent and the call, and after a restarted process (which always starts awake)."""
    if engine_sleeping is None:
        return SleepStep.NONE
    if desired is not None and not engine_sleeping:
        return SleepStep.SLEEP
    if desired is None and engine_sleeping:
        return SleepStep.WAKE
    return SleepStep.NONE


def shown_state(desired: SleepLevel | None, engine_sleeping: bool | None) -> SleepState:
    """The state the pods view shows: asleep when the engine is and should be; `waking` while an awake replica is
    wanted and the engine still sleeps (a wake under way or not yet done); `awake` otherwise (a replica wanted
    asleep but still awake serves until it sleeps)."""
    if engine_sleeping and desired is None:
        return SleepState.WAKING
    if engine_sleeping:
        return SleepState.SLEEPING
    return SleepState.AWAKE


# Modelled wake and sleep times (the simulator's defaults), fitted to the vLLM sleep-mode figures quoted in issue 31
# (A100: level 1 woke Qwen3-0.6B, ~1.2 GB of weights, in 0.26 s and a ~4B model, ~8 GB, in 0.82 s; level 2: 0.85 s
# and 2.58 s). A line through each pair: level 1 ≈ 0.16 s + weights / 12 GB/s (host → device copy), level 2 ≈
# 0.55 s + weights / 4 GB/s (reload from disk).
OFFLOAD_BANDWIDTH_GBPS = 12.0
OFFLOAD_FIXED_S = 0.16
RELOAD_BANDWIDTH_GBPS = 4.0
RELOAD_FIXED_S = 0.55


@dataclass(frozen=True)
class SleepTiming:
    """How long a sleep or a wake takes for `weights_gb` of weights. Pure: the simulator awaits these."""

    weights_gb: float = 1.0
    offload_bandwidth_gbps: float = OFFLOAD_BANDWIDTH_GBPS
    reload_bandwidth_gbps: float = RELOAD_BANDWIDTH_GBPS
    offload_fixed_s: float = OFFLOAD_FIXED_S
    reload_fixed_s: float = RELOAD_FIXED_S

    def __post_init__(self) -> None:
        if not 0 <= self.weights_gb <= 4096:
            raise ValueError(f"weights size must be 0-4096 GB, got {self.weights_gb:g}")
        for name in ("offload_bandwidth_gbps", "reload_bandwidth_gbps"):
            if not 0.01 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name.removesuffix('_gbps').replace('_', ' ')} must be 0.01-10000 GB/s, "
                                 f"got {getattr(self, name):g}")
        for name in ("offload_fixed_s", "reload_fixed_s"):
            if not 0 <= getattr(self, name) <= 600:
                raise ValueError(f"{name} must be 0-600 s, got {getattr(self, name):g}")

    def sleep_s(self, level: SleepLevel) -> float:
        """Level 1 copies the weights out to host memory; level 2 only frees them."""
        if level == SleepLevel.OFFLOAD:
            return self.offload_fixed_s + self.weights_gb / self.offload_bandwidth_gbps
        return self.offload_fixed_s

    def wake_s(self, level: SleepLevel, *, weights: bool = True, kv_cache: bool = True) -> float:
        """Waking the weights copies them back (level 1) or reloads them (level 2); the KV cache is only
        reallocated (the fixed part). Partial wakes (vLLM's `?tags=`) pay for what they wake."""
        total = 0.0
        if weights:
            total += (self.offload_fixed_s + self.weights_gb / self.offload_bandwidth_gbps if level == SleepLevel.OFFLOAD
                      else self.reload_fixed_s + self.weights_gb / self.reload_bandwidth_gbps)
        if kv_cache:
            total += 0.0 if weights else self.offload_fixed_s
        return total
