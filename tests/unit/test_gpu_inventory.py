"""NVML parsing with injected device lists (1, 2, 8 GPUs, MIG), and the real no-driver path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from corral.gpus.inventory import GIB, read_inventory


class FakeNVML:
    """The slice of pynvml that `read_inventory` calls, over a list of device dicts."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[dict], fail_init: bool = False) -> None:
        self.devices, self.fail_init, self.shutdown = devices, fail_init, False

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> bytes:  # noqa: N802
        return b"560.35.03"

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict:  # noqa: N802
        return self.devices[i]

    def nvmlDeviceGetName(self, h: dict) -> bytes:  # noqa: N802
        return h["name"].encode()

    def nvmlDeviceGetUUID(self, h: dict) -> str:  # noqa: N802
        return h.get("uuid", "GPU-x")

    def nvmlDeviceGetMemoryInfo(self, h: dict) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=h["total"], used=h.get("used", 0))

    def nvmlDeviceGetUtilizationRates(self, h: dict) -> SimpleNamespace:  # noqa: N802
        if "util" not in h:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=h["util"])

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict) -> list:  # noqa: N802
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in h.get("procs", [])]

    def nvmlDeviceGetMigMode(self, h: dict) -> tuple[int, int]:  # noqa: N802
        if "migs" not in h:
            raise self.NVMLError("Not Supported")
        return (1, 1) if h["migs"] else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict) -> int:  # noqa: N802
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict, slot: int) -> dict:  # noqa: N802
        if slot >= len(h["migs"]):
            raise self.NVMLError("Not Found")
        return h["migs"][slot]


def gpu(name: str = "NVIDIA H100 80GB HBM3", gb: float = 80, **extra: object) -> dict:
    return {"name": name, "total": int(gb * GIB), **extra}


def test_one_gpu_with_usage_and_processes() -> None:
    nvml = FakeNVML([gpu("NVIDIA GeForce RTX 3060", 12, used=3 * GIB, util=37, procs=[(4242, 2 * GIB)])])
    inventory = read_inventory(nvml)
    assert inventory.available and inventory.driver_version == "560.35.03" and nvml.shutdown
    (device,) = inventory.schedulable_units()
    assert (device.index, device.name, device.memory_free_bytes, device.utilization_percent) == (0, "NVIDIA GeForce RTX 3060", 9 * GIB, 37)
    assert device.processes[0].pid == 4242 and device.processes[0].used_memory_bytes == 2 * GIB


@pytest.mark.parametrize("count", [2, 8])
def test_several_gpus(count: int) -> None:
    inventory = read_inventory(FakeNVML([gpu(util=0) for _ in range(count)]))
    assert [d.index for d in inventory.schedulable_units()] == list(range(count))


def test_mig_instances_are_the_schedulable_units() -> None:
    migs = [gpu("NVIDIA H100 MIG 3g.40gb", 40), gpu("NVIDIA H100 MIG 3g.40gb", 40)]
    inventory = read_inventory(FakeNVML([gpu(migs=migs), gpu(migs=[]), gpu()]))
    units = inventory.schedulable_units()
    assert [u.id for u in units] == ["1", "2", "0/mig0", "0/mig1"]
    assert inventory.devices[0].mig_enabled and not inventory.devices[1].mig_enabled
    assert units[2].utilization_percent is None  # NVML does not report it on MIG instances


def test_driver_missing_is_cpu_only_mode() -> None:
    inventory = read_inventory(FakeNVML([], fail_init=True))
    assert not inventory.available and inventory.error == "NVML: NVML Shared Library Not Found"


def test_real_nvml_on_this_machine() -> None:
    inventory = read_inventory()
    if inventory.available:  # pragma: no cover - GPU machines
        assert inventory.driver_version and all(d.memory_total_bytes > 0 for d in inventory.devices)
    else:
        assert inventory.error and inventory.devices == ()
