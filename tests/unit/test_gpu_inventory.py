"""NVML parsing with injected device lists (1, 2, 8 GPUs, MIG), and the real no-driver path."""

from __future__ import annotations

import pytest

from corral.gpus.inventory import GIB, read_inventory
from tests.fake_nvml.pynvml import FakeNVML


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
