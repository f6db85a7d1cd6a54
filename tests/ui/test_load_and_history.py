"""The load view under real traffic, the history page at 1280 px, and the engine drop-down's default, in a real
browser against a real `corral serve` (simulator replicas; the traffic goes through the gateway)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from corral.ui.inference import engine_choices
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer
from tests.integration.test_finetune import dataset, tiny_model  # noqa: F401 (fixtures)
from tests.ui.conftest import screenshot

POOL = "simulator-qwen-06b-pool"
SERVICE = "production-chat-nlb"
CHART_SERIES = "el => getElement(el).chart.getOption().series.map(s => s.data)"  # the chart's data, as ECharts has it


def setup_pool(corral: CorralServer) -> None:
    """A pool of 3 simulator replicas: 2 for production, 1 for testing."""
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 3,
                                           "deployAsPool": True, "engineArgs": "--ttft-ms 20 --tokens-per-second 400"})
    corral.wait_ready(POOL, 3)
    for business in ("production", "testing"):
        corral.ok("POST", "/api/deploy-service", json={"serviceName": f"{business}-chat", "modelPool": POOL,
                                                        "businessTag": business, "isExternal": False})
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 2, "testing": 1}})


@contextmanager
def traffic(base_url: str, clients: int = 3) -> Iterator[list[int]]:
    """`clients` threads sending streamed chat requests (usage included) through a business service until the
    block ends; yields the count of answers, which the test reads to know traffic flows."""
    done = threading.Event()
    answered = [0]
    body = {"model": "qwen-06b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
                    for _ in response.iter_lines():
                        pass
                answered[0] += response.status_code == 200

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield answered
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)


def test_load_view_follows_traffic(corral: CorralServer, page: Page) -> None:
    setup_pool(corral)
    service = next(s for s in corral.ok("GET", "/api/business-services") if s["name"] == SERVICE)
    production = sorted(p["name"] for p in corral.pods(POOL) if p["business"] == "production")
    page.goto(corral.url + "/")
    block = page.get_by_test_id(f"service-{SERVICE}")
    expect(block.get_by_test_id(f"service-ready-{SERVICE}")).to_have_text("2 ready of 2 assigned")
    figure = lambda key: block.get_by_test_id(f"load-{SERVICE}-{key}")  # noqa: E731
    expect(figure("rps")).to_have_text("0.00 req/s")  # nothing yet
    expect(figure("latency")).to_have_text("– / – / –")

    with traffic(service["baseUrl"]) as answered:
        wait_for(lambda: answered[0] >= 5, what="answers through the gateway")
        # Live, without a reload: the figures move, once a second.
        expect(figure("rps")).not_to_have_text("0.00 req/s", timeout=15_000)
        expect(figure("latency")).not_to_have_text("– / – / –")
        expect(figure("ttfb")).not_to_have_text("– / –")  # streamed responses: time to first byte
        expect(figure("tokens")).not_to_have_text("–")  # the usage chunk the clients asked for
        first = figure("rps").inner_text()
        expect(figure("rps")).not_to_have_text(first, timeout=15_000)  # and keep moving
        testing = page.get_by_test_id("load-testing-chat-nlb-rps")
        expect(testing).to_have_text("0.00 req/s")  # only the service that gets traffic

        # The chart: points of requests/s above zero, and capacity = the 2 ready replicas.
        chart = page.get_by_test_id(f"load-chart-{SERVICE}")
        wait_for(lambda: sum(1 for _, rps in chart.evaluate(CHART_SERIES)[0] if rps > 0) >= 3, timeout=40,
                 what="three chart points with traffic")
        assert {capacity for _, capacity in chart.evaluate(CHART_SERIES)[2][-3:]} == {2}

        # The pods table: in-flight and requests/s per replica (the production ones only).
        for name in production:
            row = page.get_by_test_id("pods").get_by_role("row").filter(has_text=name)
            expect(row.locator("td").nth(6)).not_to_have_text("0", timeout=10_000)  # Req/s
        testing_pod = next(p["name"] for p in corral.pods(POOL) if p["business"] == "testing")
        expect(page.get_by_test_id("pods").get_by_role("row").filter(has_text=testing_pod).locator("td").nth(6)).to_have_text("0")
        screenshot(page, "load", page.get_by_test_id("business-services"))

        # The assignment board: each business's load next to its replicas.
        page.get_by_role("tab", name="Assignment board").click()
        expect(page.get_by_test_id("board-load-production")).to_contain_text("p95")
        expect(page.get_by_test_id("board-load-production")).not_to_contain_text("0.00 req/s")
        expect(page.get_by_test_id("board-load-testing")).to_have_text("0.00 req/s · 0 in flight")
        expect(page.get_by_test_id(f"card-{production[0]}")).not_to_contain_text("0.00 req/s")

    # Deleting a service: its block goes, and the test panel no longer offers it.
    block.get_by_test_id(f"delete-service-{SERVICE}").click()
    page.get_by_test_id("confirm").click()
    expect(block).to_have_count(0)
    page.get_by_test_id("test-service").click()
    expect(page.get_by_role("option", name="testing-chat → qwen-06b (1 ready)")).to_be_visible()
    expect(page.get_by_role("option")).to_have_count(1)


def test_engine_drop_down_defaults_to_an_installed_engine(corral: CorralServer, page: Page) -> None:
    labels, default = engine_choices("local")
    page.goto(corral.url + "/")
    expect(page.get_by_test_id("engine")).to_contain_text(labels[default])
    assert "not installed here" not in labels[default]
    page.get_by_test_id("engine").click()
    for name, label in labels.items():
        expect(page.get_by_role("option", name=label, exact=True)).to_be_visible()
        assert ("not installed here" in label) == (name in ("vllm", "sglang") and not _importable(name))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.usefixtures("tiny_model", "dataset")
def test_history_at_1280_px(corral: CorralServer, browser: object, tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    setup_pool(corral)
    pod = next(p["name"] for p in corral.pods(POOL) if p["business"] == "testing")
    corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "unassigned"})
    refused = corral.http.post("/api/scale-pool-deployment", json={"deploymentName": POOL, "targetReplicas": 0})
    assert refused.status_code == 409
    # A finetune task that fails at run time (no such module to put LoRA on): submit, failure in History.
    task = corral.ok("POST", "/api/finetune/tasks", json={"baseModel": str(tiny_model), "datasetPath": str(dataset),
                                                          "hyperparameters": {"epochs": 1, "loraTarget": "no_such_proj"}})
    wait_for(lambda: corral.ok("GET", f"/api/finetune/tasks/{task['id']}")["status"] == "failed", timeout=120,
             what="the finetune task to fail")

    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    try:
        page.goto(corral.url + "/history")
        table = page.get_by_test_id("history")
        expect(table).to_contain_text("failed: ")
        headers = table.locator("thead th")
        expect(headers).to_have_count(6)
        for i in range(6):  # every column header inside the viewport, none cut off
            box = headers.nth(i).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 1280, (headers.nth(i).inner_text(), box)
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no horizontal scroll

        # before → after summarised, the full JSON on hover.
        assignment = table.get_by_role("row").filter(has_text=pod).filter(has_text="assign").first
        expect(assignment).to_contain_text("business: testing → unassigned")
        assignment.get_by_text("business: testing → unassigned").hover()
        expect(page.get_by_role("tooltip").filter(has_text='"business": "unassigned"')).to_be_visible()
        # Refused and failed rows stand out; no row is taller than two lines of text.
        expect(table.get_by_role("row").filter(has_text="Cannot scale down")).to_have_class(_has("bg-amber-1"))
        failed = table.get_by_role("row").filter(has_text=task["id"]).filter(has_text="failed:")
        expect(failed).to_have_class(_has("bg-red-1"))
        for text in ("submitted:", "started on the CPU", "failed:"):  # its lifecycle, in History
            expect(table.get_by_role("row").filter(has_text=task["id"]).filter(has_text=text)).to_have_count(1)
        message = failed.get_by_text("NoMatchingPeftModuleError")  # cut to two lines; all of it on hover
        message.hover()
        expect(page.get_by_role("tooltip").filter(has_text="not found in the base model")).to_be_visible()
        heights = [box["height"] for row in table.locator("tbody tr").all() if (box := row.bounding_box())]
        assert max(heights) <= 2 * min(heights), heights  # at most two lines of text: no tall rows
        page.mouse.move(0, 0)
        expect(page.get_by_role("tooltip")).to_have_count(0)
        screenshot(page, "history")
    finally:
        context.close()


def _has(css_class: str) -> object:
    import re

    return re.compile(rf"(^|\s){css_class}(\s|$)")
