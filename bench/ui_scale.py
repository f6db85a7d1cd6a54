"""UI responsiveness with many pods: the inference page with 10 pods beside the same page with 1,000.

    python bench/ui_scale.py [--pods 10 1000] [--services 100] [--rounds 20]

Each size runs its own `corral` API + UI process over the in-memory backend
(`corral.backends.memory`): pods are records, no engine processes (1,000 real replicas do not fit on one machine, and the UI's cost does
not depend on what runs behind a pod). The controller, event bus, pages and browser are the real
ones. Measured with Debian's Chromium through Playwright:

- load: from navigation to the pods table showing its row count;
- assign → row: from the POST /api/assign-pod request to the pod's row showing its new business
  (event → redraw → websocket → DOM), the figure an operator feels;
- websocket KB/assign: what the page receives per assignment (every section's redraw), median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import free_port, wait_until  # noqa: E402


def serve(port: int, data_dir: Path) -> None:
    """The child process: the real app and UI over the in-memory backend (pods as records)."""
    import asyncio

    import uvicorn

    from corral.api.app import create_app
    from corral.config import Settings
    from corral.runtime import memory_runtime

    settings = Settings(data_dir=data_dir, port=port, gateway_port=free_port(), gateway_data_plane="python")
    runtime = memory_runtime(settings)
    asyncio.run(uvicorn.Server(uvicorn.Config(create_app(runtime=runtime), host="127.0.0.1", port=port, log_level="warning")).serve())


def populate(url: str, pods: int, services: int) -> None:
    """10 pools of `pods / 10` replicas and `services` business services, through the real API."""
    for i in range(10):
        httpx.post(url + "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": f"model-{i}",
                                              "replicas": pods // 10 or 1, "deployAsPool": True}, timeout=60).raise_for_status()
    for k in range(services):
        httpx.post(url + "/api/deploy-service", json={"serviceName": f"biz-{k}", "modelPool": f"simulator-model-{k % 10}-pool",
                                                      "businessTag": f"biz-{k}"}, timeout=60).raise_for_status()


def measure(pods: int, services: int, rounds: int, browser) -> dict[str, float]:  # noqa: ANN001
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="corral-ui-bench-"))
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--data-dir", str(data_dir)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/api/health").status_code == 200, 60, "the UI server")
        populate(url, pods, services)
        names = sorted(p["name"] for p in httpx.get(url + "/api/pods").json())
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        received = [0]  # bytes the page received over NiceGUI's websocket

        def count(frame: object) -> None:
            received[0] += len(frame if isinstance(frame, (bytes, str)) else b"")

        page.on("websocket", lambda ws: ws.on("framereceived", count))
        started = time.perf_counter()
        page.goto(url + "/")
        page.get_by_text(f"of {len(names)}").wait_for()
        load_ms = (time.perf_counter() - started) * 1000
        row_ms, frame_bytes = [], []
        page.wait_for_timeout(1000)  # let the first redraws settle before counting
        for i in range(rounds):
            before = received[0]
            pod = names[i % 10]  # on the first page of the table
            business = f"biz-{int(pod.split('-')[1])}" if i % 2 == 0 else "unassigned"
            started = time.perf_counter()
            httpx.post(url + "/api/assign-pod", json={"podName": pod, "businessTag": business}).raise_for_status()
            page.locator(f'[data-testid="business-{pod}"]').filter(has_text=business).wait_for()
            row_ms.append((time.perf_counter() - started) * 1000)
            page.wait_for_timeout(300)  # the redraws of this assignment, all of them, before the next
            frame_bytes.append(received[0] - before)
        page.close()
        return {"pods": len(names), "load_ms": load_ms, "row_p50_ms": statistics.median(row_ms),
                "row_max_ms": max(row_ms), "payload_kb": statistics.median(frame_bytes) / 1024}
    finally:
        child.terminate()
        child.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--serve", action="store_true", help="(internal) be the server process")
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.data_dir)
        return
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        results = [measure(n, args.services, args.rounds, browser) for n in args.pods]
        browser.close()
    print(f"\nInference page, {args.services} business services, {args.rounds} assignments each (Chromium, this machine)\n")
    print(f"{'pods':>6} {'page load ms':>13} {'assign→row p50 ms':>18} {'max ms':>8} {'websocket KB/assign':>20}")
    for r in results:
        print(f"{r['pods']:>6} {r['load_ms']:>13.0f} {r['row_p50_ms']:>18.0f} {r['row_max_ms']:>8.0f} {r['payload_kb']:>20.1f}")


if __name__ == "__main__":
    main()
