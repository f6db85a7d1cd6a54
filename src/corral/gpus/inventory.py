"""Read the machine's GPUs through NVML (nvidia-ml-py); the control plane never needs torch for it.

No driver (NVMLError_LibraryNotFound, …) is not an error: it is CPU-only mode, reported as
`available: false` with the reason. With MIG enabled, each MIG instance is a schedulable unit
of its own and its parent GPU is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int = 0
    uuid: str = ""
    utilization_percent: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    mig_enabled: bool = False
    parent_index: int | None = None  # set on a MIG instance: the GPU it is carved from

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)

    @property
    def id(self) -> str:
        """Schedulable unit id: "0", or "0/mig1" for a MIG instance."""
        return str(self.index) if self.parent_index is None else f"{self.parent_index}/mig{self.index}"


@dataclass(frozen=True)
class GpuInventory:
    devices: tuple[GpuDevice, ...] = ()
    driver_version: str | None = None
    error: str | None = None  # why no GPU is available, when none is
    mig_instances: tuple[GpuDevice, ...] = field(default=())

    @property
    def available(self) -> bool:
        return bool(self.devices)

    def schedulable_units(self) -> tuple[GpuDevice, ...]:
        """Whole GPUs without MIG, plus every MIG instance."""
        whole = tuple(d for d in self.devices if not d.mig_enabled)
        return whole + self.mig_instances


def read_inventory(nvml: Any = None) -> GpuInventory:
    """Everything NVML reports; `nvml` is the pynvml module (a stand-in in tests of this parsing)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuInventory(error="nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return GpuInventory(error=f"NVML: {exc}")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        devices, migs = [], []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mig_enabled = _mig_enabled(nvml, handle)
            devices.append(_device(nvml, handle, index, mig_enabled=mig_enabled))
            if mig_enabled:
                for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                    try:
                        mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                    except nvml.NVMLError:
                        continue  # an empty slot
                    migs.append(_device(nvml, mig, slot, parent=index))
        return GpuInventory(devices=tuple(devices), driver_version=driver, mig_instances=tuple(migs))
    finally:
        nvml.nvmlShutdown()


def _device(nvml: Any, handle: Any, index: int, *, mig_enabled: bool = False, parent: int | None = None) -> GpuDevice:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:  # not supported on MIG instances and some boards
        utilization = None
    try:
        running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        processes = tuple(GpuProcess(int(p.pid), int(p.usedGpuMemory or 0)) for p in running)
    except nvml.NVMLError:
        processes = ()
    return GpuDevice(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        utilization_percent=utilization,
        processes=processes,
        mig_enabled=mig_enabled,
        parent_index=parent,
    )


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # GPUs without MIG support
        return False
    return current == nvml.NVML_DEVICE_MIG_ENABLE


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
