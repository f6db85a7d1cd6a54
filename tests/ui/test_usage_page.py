"""The usage page in a real browser against a real `corral serve`: a business's requests through the gateway show in
its row and its chart (simulator replica; metering flushes every second here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral
from tests.ui.conftest import screenshot

POOL = "simulator-m-pool"
CHART_SERIES = "el => getElement(el).chart.getOption().series.map(s => s.data)"


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[CorralServer]:
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": "python", "CORRAL_USAGE_FLUSH_S": "1"}) as server:
        yield server


def test_the_usage_page_shows_each_business_requests_and_chart(page: Page, corral: CorralServer) -> None:
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "m", "replicas": 1,
                                           "deployAsPool": True, "engineArgs": ["--ttft-ms", "1"]})
    replica = corral.wait_ready(POOL, 1)[0]["name"]
    service = corral.ok("POST", "/api/deploy-service", json={"serviceName": "production-chat", "modelPool": POOL,
                                                             "businessTag": "production"})["service"]["name"]  # type: ignore[index]
    corral.ok("POST", "/api/assign-pod", json={"podName": replica, "businessTag": "production"})
    for _ in range(3):
        answer = httpx.post(f"{corral.gateway_url}/s/{service}/v1/chat/completions", timeout=30,
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert answer.status_code == 200
    wait_for(lambda: [r["requests"] for r in corral.ok("GET", "/api/usage")["rows"]] == [3],  # type: ignore[index]
             timeout=20, what="the 3 requests flushed")

    page.goto(corral.url + "/usage")
    row = page.get_by_test_id("usage").locator("tbody tr").filter(has_text="production")
    expect(row).to_contain_text("3")
    chart = page.get_by_test_id("usage-chart-production")
    expect(chart).to_be_visible()
    wait_for(lambda: sum(point[1] for point in chart.evaluate(CHART_SERIES)[0]) == 3, timeout=10,
             what="the chart's requests")
    screenshot(page, "usage-page")
