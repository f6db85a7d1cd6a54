"""Read the machine's GPUs through NVML; no driver means CPU-only mode, not an error."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    memory_total_bytes: int


def detect_gpus() -> list[GpuDevice]:
    """The GPUs NVML sees, or [] when there is no NVIDIA driver (NVMLError_LibraryNotFound, …)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            devices.append(GpuDevice(index, name, int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return devices
    finally:
        pynvml.nvmlShutdown()
