"""The Shared GPUs tab in a real browser against a real `corral serve`: two models share one (fake) GPU, one awake
and one asleep; the tab shows which, the wake times measured, and follows a wake; the pods table says asleep."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.integration.conftest import SIM_ARGS, CorralServer, running_corral
from tests.ui.conftest import screenshot

FAKE_NVML = Path(__file__).parents[1] / "fake_nvml"
SLEEPY = [*SIM_ARGS, "--enable-sleep-mode", "--weights-gb", "0.6"]


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[CorralServer]:
    env = {"CORRAL_GATEWAY_DATA_PLANE": "python",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
           "CORRAL_TEST_NVML_DEVICES": json.dumps([{"name": "NVIDIA H100 80GB HBM3", "total": 80 * 1024**3,
                                                    "used": 0, "uuid": "GPU-0"}])}
    with running_corral(tmp_path / "data", env) as server:
        yield server


def deploy(corral: CorralServer, tag: str) -> str:
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag, "replicas": 1,
                                           "deployAsPool": True, "gpusPerReplica": 1, "sharedGpus": True,
                                           "engineArgs": SLEEPY})
    return corral.wait_ready(f"simulator-{tag}-pool", 1)[0]["name"]


def test_the_shared_gpus_tab_shows_who_is_awake_and_follows_a_wake(page: Page, corral: CorralServer) -> None:
    a = deploy(corral, "model-a")
    corral.ok("POST", f"/api/pods/{a}/sleep", json={"level": 1})
    b = deploy(corral, "model-b")  # on the same GPU, where the only replica sleeps

    page.goto(f"{corral.url}/")
    page.get_by_role("tab", name="Shared GPUs").click()
    gpus = page.get_by_test_id("shared-gpus")
    expect(gpus).to_contain_text(f"{b} (model-b)")
    expect(gpus).to_contain_text(f"{a} (model-a, 1)")
    expect(page.get_by_test_id("host-memory")).to_contain_text("0.6 GiB")  # model-a's weights, asleep at level 1

    corral.ok("POST", f"/api/pods/{b}/sleep", json={"level": 1})
    corral.ok("POST", f"/api/pods/{a}/wake")
    expect(gpus).to_contain_text(f"{a} (model-a)")
    expect(gpus).to_contain_text(f"{b} (model-b, 1)")
    expect(page.get_by_test_id("sleep-timings")).to_contain_text("1 / 1")  # model-a: its wake and its sleep, measured
    screenshot(page, "shared-gpus", page.get_by_test_id("status-monitor"))

    page.get_by_role("tab", name="Pods").click()
    expect(page.get_by_test_id("pods")).to_contain_text("sleeping (level 1)")
