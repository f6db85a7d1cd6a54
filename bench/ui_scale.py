"""UI responsiveness with many pods: the inference page with 10 pods beside the same page with 1,000.

    python bench/ui_scale.py [--pods 10 1000] [--services 100] [--rounds 20]

Each size runs its own `corral` API + UI process whose backend is a *listing-only* backend: pods are
records, no engine processes (1,000 real replicas do not fit on one machine, and the UI's cost does
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
from collections.abc import Awaitable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import free_port, wait_until  # noqa: E402


def serve(pods: int, services: int, port: int, data_dir: Path) -> None:
    """The child process: the real app and UI over a listing-only backend."""
    import asyncio

    import uvicorn

    from corral.api.app import create_app
    from corral.backends.base import Backend
    from corral.config import Settings
    from corral.domain import labels as L
    from corral.domain.models import Deployment, Pod, PodPhase, Service
    from corral.runtime import Runtime

    now = datetime.now(timezone.utc)
    pools = [Deployment(f"pool-{i}", "simulator", "sim", f"model-{i}", True, pods // 10 or 1, created_at=now) for i in range(10)]

    class ListingBackend(Backend):
        def __init__(self) -> None:
            self.pods = {f"{d.name}-{j:04d}": Pod(f"{d.name}-{j:04d}", d.name, d.new_pod_labels(), PodPhase.RUNNING, True,
                                                   created_at=now) for d in pools for j in range(d.replicas)}
            self.services = {
                f"biz-{k}-nlb": Service(f"biz-{k}-nlb", f"model-{k % 10}", L.business_selector(f"model-{k % 10}", f"biz-{k}"),
                                        {L.BUSINESS: f"biz-{k}", L.MODEL: f"model-{k % 10}", L.SERVICE_TYPE: L.BUSINESS_SERVICE},
                                        deployment=f"pool-{k % 10}", created_at=now)
                for k in range(services)}

        async def start(self) -> None: ...
        async def close(self) -> None: ...
        def list_deployments(self) -> list[Deployment]: return pools
        def get_deployment(self, name: str) -> Deployment | None: return next((d for d in pools if d.name == name), None)
        def list_pods(self, deployment: str | None = None) -> list[Pod]:
            return [p for p in self.pods.values() if deployment in (None, p.deployment)]
        def get_pod(self, name: str) -> Pod | None: return self.pods.get(name)
        def list_services(self) -> list[Service]: return list(self.services.values())
        def get_service(self, name: str) -> Service | None: return self.services.get(name)
        async def create_deployment(self, deployment: Deployment, service: Service | None) -> list[Pod]: raise NotImplementedError
        async def delete_deployment(self, name: str) -> Awaitable[None]: raise NotImplementedError
        async def add_replicas(self, deployment: str, count: int) -> list[Pod]: raise NotImplementedError
        async def remove_replicas(self, deployment: str, pods: list[str]) -> Awaitable[None]: raise NotImplementedError
        async def set_businesses(self, businesses: Mapping[str, str]) -> None:
            for name, business in businesses.items():
                self.pods[name] = replace(self.pods[name], labels={**self.pods[name].labels, L.BUSINESS: business})
        async def create_service(self, service: Service) -> None: self.services[service.name] = service
        async def delete_service(self, name: str) -> None: self.services.pop(name, None)
        def pod_logs(self, name: str, tail: int) -> str | None: return ""
        def write_manifests(self, name: str, documents: list[dict]) -> str: return ""

    settings = Settings(data_dir=data_dir, port=port, gateway_port=free_port(), gateway_data_plane="python")
    runtime = Runtime(settings, backend=ListingBackend())
    asyncio.run(uvicorn.Server(uvicorn.Config(create_app(runtime=runtime), host="127.0.0.1", port=port, log_level="warning")).serve())


def measure(pods: int, services: int, rounds: int, browser) -> dict[str, float]:  # noqa: ANN001
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="corral-ui-bench-"))
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(pods), "--services", str(services), "--port", str(port),
                              "--data-dir", str(data_dir)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/api/health").status_code == 200, 60, "the UI server")
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
    parser.add_argument("--serve", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.services, args.port, args.data_dir)
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
