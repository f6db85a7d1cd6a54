"""A stand-in for pynvml (nvidia-ml-py) over a list of device dicts: GPU machines, simulated.

In-process tests pass a `FakeNVML` to `read_inventory`. A `corral serve` subprocess gets this
directory first on PYTHONPATH, so its `import pynvml` finds this module, whose functions serve the
devices in the CORRAL_TEST_NVML_DEVICES environment variable (JSON) — everything else is real. With
CORRAL_TEST_NVML_FILE instead, the devices are read from that JSON file at every `nvmlInit`, so a test
can change a GPU's used memory while Corral runs (another program taking memory, then giving it back).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any


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


class FileNVML(FakeNVML):
    """A machine whose devices are re-read from a JSON file at each init (what a test writes is what NVML says)."""

    def __init__(self, path: str) -> None:
        super().__init__([])
        self.path = path

    def nvmlInit(self) -> None:  # noqa: N802
        with open(self.path, encoding="utf-8") as f:
            self.devices = json.load(f)


_machine = (FileNVML(os.environ["CORRAL_TEST_NVML_FILE"]) if os.environ.get("CORRAL_TEST_NVML_FILE")
            else FakeNVML(json.loads(os.environ.get("CORRAL_TEST_NVML_DEVICES", "[]"))))
NVMLError = FakeNVML.NVMLError


def __getattr__(name: str) -> Any:  # `pynvml.nvmlInit()` etc. on the simulated machine
    return getattr(_machine, name)
