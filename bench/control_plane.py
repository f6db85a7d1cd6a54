"""Control-plane latency at scale: 1,000 replicas in 10 pools, 100 business services.

    python bench/control_plane.py [--pools 10] [--replicas 100] [--services 100] [--rounds 200]
                                  [--distributions 10] [--profile read|assign|distribute]
    python bench/control_plane.py --emulator [--pools 10] [--replicas 100]

`--emulator` measures the Kubernetes backend instead, against the emulated API server of tests/k8s
(kmock, real HTTP): 1,000 pods already in the cluster at start (list + cache), all of them replayed
by a relist after a cut watch, a burst of 1,000 pod events, and reads — with the worst event-loop
block during each (a 1,000-pod replay must not stall the loop for seconds).

The real API (FastAPI app, `create_app`) served by uvicorn over real HTTP on a free loopback port,
the real Runtime (Controller, StateStore in a temporary SQLite file, event bus, Python gateway and
its routing sync) over the **in-memory backend** (`corral.backends.memory`: pods are records, no
engine processes — 1,000 real replicas do not fit on one machine, and the control plane's cost
does not depend on what runs behind a pod). The server runs in a thread of this process so that
the gateway's routing table can be watched directly; the HTTP client (httpx) runs in the main
thread and shares the interpreter (GIL) with the server, so each figure includes the client's
own cost (about 0.2-0.5 ms a request here).

Measured, after a warm-up:
- reads: GET /api/pods (all 1,000), GET /api/deployments, GET /api/pool-status/{pool};
- assign: POST /api/assign-pod (one pod back and forth between two businesses);
- distribution: POST /api/distribute-pods moving every replica of a pool (100 moves), and the
  500-move distribution: five such requests (five pools) at once, from the first request sent
  until the gateway's routing table has all 500 replicas in their new business's route (and until
  the last response). One request cannot move 500: a pool holds at most 256 replicas
  (`domain.scaling.MAX_REPLICAS`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import free_port  # noqa: E402

TARGETS_MS = {"read": 20.0, "assign": 10.0, "distribution500": 1000.0}


class Server:
    """The real app over a Runtime on the memory backend, served by uvicorn in a thread."""

    def __init__(self, data_dir: Path) -> None:
        import uvicorn

        from corral.api.app import create_app
        from corral.config import Settings
        from corral.runtime import memory_runtime

        self.port = free_port()
        settings = Settings(data_dir=data_dir, port=self.port, gateway_port=free_port(), gateway_data_plane="python")
        self.runtime = memory_runtime(settings, seed=0)
        config = uvicorn.Config(create_app(runtime=self.runtime), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` in the server's thread (to profile that thread)."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def routed(self, service: str) -> set[str]:
        """The replicas the gateway routes `service` to right now."""
        route = self.runtime.gateway.table.get(service)
        return {t.name for t in route.targets} if route else set()


async def timed(samples: list[float], request: Awaitable[httpx.Response]) -> httpx.Response:
    started = time.perf_counter()
    response = await request
    samples.append((time.perf_counter() - started) * 1000)
    if response.status_code >= 300:
        raise RuntimeError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:300]}")
    return response


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def setup(http: httpx.AsyncClient, pools: int, replicas: int, services: int) -> tuple[list[str], dict[str, list[str]]]:
    """`pools` pools of `replicas` and `services` business services spread over them (service k → pool k mod pools)."""
    names, businesses = [], {}
    for i in range(pools):
        body = {"engine": "simulator", "modelId": "sim", "modelTag": f"model-{i}", "replicas": replicas, "deployAsPool": True}
        names.append((await timed([], http.post("/api/deploy", json=body))).json()["deployment"]["name"])
        businesses[names[-1]] = []
    for k in range(services):
        pool = names[k % pools]
        await timed([], http.post("/api/deploy-service", json={"serviceName": f"biz-{k}", "modelPool": pool, "businessTag": f"biz-{k}"}))
        businesses[pool].append(f"biz-{k}")
    for pool in names[pools // 2:]:  # the pools not moved by the distribution rounds: spread over their businesses
        await timed([], http.post("/api/distribute-pods", json={"deploymentName": pool, "ratios": dict.fromkeys(businesses[pool], 1)}))
    return names, businesses


async def bench(args: argparse.Namespace, server: Server) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        pools, businesses = await setup(http, args.pools, args.replicas, args.services)
        print(f"setup: {args.pools} pools x {args.replicas} replicas, {args.services} services in {time.perf_counter() - t0:.1f} s")
        pod_count = len((await http.get("/api/pods")).json())
        assert pod_count == args.pools * args.replicas, pod_count

        reads = {"GET /api/pods": "/api/pods", "GET /api/deployments": "/api/deployments",
                 f"GET /api/pool-status/{{pool}} ({args.replicas} pods)": f"/api/pool-status/{pools[0]}"}
        for label, path in reads.items():
            samples: list[float] = []
            for i in range(args.rounds + 10):
                await timed(samples if i >= 10 else [], http.get(path))
            rows.append({"operation": label, "n": len(samples), "samples": samples, "target": TARGETS_MS["read"]})

        # assign: one pod of the last pool back and forth between two of its businesses; also until routed
        pool = pools[-1]
        pod = (await http.get("/api/pods", params={"deployment": pool})).json()[0]["name"]
        first, second = businesses[pool][0], businesses[pool][1]
        samples, routed = [], []
        for i in range(args.rounds + 10):
            business = first if i % 2 else second
            started = time.perf_counter()
            await timed(samples if i >= 10 else [], http.post("/api/assign-pod", json={"podName": pod, "businessTag": business}))
            while pod not in server.routed(f"{business}-nlb"):
                await asyncio.sleep(0.0005)
            if i >= 10:
                routed.append((time.perf_counter() - started) * 1000)
        rows.append({"operation": "POST /api/assign-pod", "n": len(samples), "samples": samples, "target": TARGETS_MS["assign"]})
        rows.append({"operation": "  assign → gateway routes it", "n": len(routed), "samples": routed, "target": None})

        # distributions: pools 0..4 move all their replicas from one business to another, alternately
        moved = pools[: args.pools // 2]
        one, whole, routed = [], [], []
        for r in range(args.distributions * 2 + 1):
            target = {p: businesses[p][r % 2] for p in moved}
            pods = {p: [x["name"] for x in (await http.get("/api/pods", params={"deployment": p})).json()] for p in moved}
            if r % 2 == 0 and r > 0:  # a single 100-move request (pool 0), then the others at once
                body = {"deploymentName": moved[0], "counts": {target[moved[0]]: args.replicas}}
                await timed(one, http.post("/api/distribute-pods", json=body))
                rest = moved[1:]
            else:
                rest = moved
            started = time.perf_counter()
            requests = [timed([], http.post("/api/distribute-pods", json={"deploymentName": p, "counts": {target[p]: args.replicas}}))
                        for p in rest]
            watch = asyncio.create_task(_until_routed(server, {p: (target[p], pods[p]) for p in moved}))
            responses = await asyncio.gather(*requests)
            answered = (time.perf_counter() - started) * 1000
            await watch
            if r == 0:
                continue  # warm-up: the first moves out of the unassigned pods
            if rest == moved:
                moves = sum(len(resp.json()["moves"]) for resp in responses)
                assert moves == len(moved) * args.replicas, moves
                whole.append(answered)
                routed.append(watch.result() - started * 1000)
        rows.append({"operation": f"POST /api/distribute-pods ({args.replicas} moves)", "n": len(one), "samples": one, "target": None})
        label = f"{len(moved) * args.replicas}-move distribution ({len(moved)} pools at once): last response"
        rows.append({"operation": label, "n": len(whole), "samples": whole, "target": TARGETS_MS["distribution500"]})
        rows.append({"operation": "  … until the gateway routes all of them", "n": len(routed), "samples": routed,
                     "target": TARGETS_MS["distribution500"]})
    return rows


async def _until_routed(server: Server, wanted: dict[str, tuple[str, list[str]]]) -> float:
    """perf_counter (ms) when every pod routes in its new business's service."""
    while True:
        if all(set(pods) <= server.routed(f"{business}-nlb") for business, pods in wanted.values()):
            return time.perf_counter() * 1000
        await asyncio.sleep(0.0005)


def show(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"Control plane on the memory backend: {args.pools * args.replicas} replicas in {args.pools} pools, "
             f"{args.services} business services (real HTTP, in-process uvicorn)")
    table = Table(title=title)
    for column in ("operation", "n", "p50 ms", "p99 ms", "max ms", "target (p50)", "met"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for row in rows:
        s = row["samples"]
        p50 = statistics.median(s)
        target = row["target"]
        met = "" if target is None else ("yes" if p50 < target else "NO")
        table.add_row(row["operation"], str(row["n"]), f"{p50:.2f}", f"{percentile(s, 0.99):.2f}", f"{max(s):.2f}",
                      "" if target is None else f"< {target:.0f} ms", met)
    Console(width=160).print(table)


def profile(args: argparse.Namespace, server: Server) -> None:
    """cProfile the server thread while one kind of request repeats; print the top of the profile."""
    profiler = cProfile.Profile()

    async def drive() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            pools, businesses = await setup(http, args.pools, args.replicas, args.services)
            pod = (await http.get("/api/pods", params={"deployment": pools[-1]})).json()[0]["name"]
            server.call(profiler.enable)
            for i in range(args.rounds if args.profile != "distribute" else args.distributions * 2):
                if args.profile == "read":
                    await http.get("/api/pods")
                elif args.profile == "assign":
                    business = businesses[pools[-1]][i % 2]
                    await http.post("/api/assign-pod", json={"podName": pod, "businessTag": business})
                else:
                    await http.post("/api/distribute-pods", json={"deploymentName": pools[0],
                                                                 "counts": {businesses[pools[0]][i % 2]: args.replicas}})
            server.call(profiler.disable)

    asyncio.run(drive())
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


class LoopLag:
    """How long the event loop was blocked: a task that asks to sleep 2 ms and records how late it woke."""

    def __init__(self) -> None:
        self.worst_ms = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.002)
            self.worst_ms = max(self.worst_ms, (time.perf_counter() - started) * 1000 - 2)

    def __enter__(self) -> LoopLag:
        self.worst_ms = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def emulator_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The Kubernetes backend against the emulated API server of tests/k8s (kmock over real HTTP, in a
    process of its own so that this loop measures the backend alone): `pools` × `replicas` ready pods
    already in the cluster when Corral starts, then: start (list + cache), a relist after a cut watch
    (the whole namespace replayed, 10% of the pods deleted while the watch was down), one status change
    per pod through the watch, and reads from the cache. Each with the worst stall of the backend's loop."""
    import subprocess

    from corral.backends.kubernetes import KubernetesBackend, client_from
    from corral.backends.kubernetes.reflector import WatchSettings
    from corral.domain.manifests import ClusterOptions
    from corral.store.state import StateStore

    root = Path(__file__).parents[1]
    sys.path.insert(0, str(root))
    from tests.k8s.cluster import NAMESPACE, kubeconfig

    rows: list[dict[str, Any]] = []
    data_dir = Path(tempfile.mkdtemp(prefix="corral-emulator-bench-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.k8s.cluster", str(port)], cwd=root, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and "serving" in server.stdout.readline()
    url = f"http://127.0.0.1:{port}"
    total = args.pools * args.replicas
    store = StateStore(data_dir / "corral.db")
    backend = KubernetesBackend(client_from(kubeconfig(url, data_dir / "kubeconfig"), NAMESPACE), ClusterOptions(namespace=NAMESPACE),
                                lambda event, data=None, **_: None, data_dir / "manifests", watch=WatchSettings(backoff_initial_s=0.001))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=120) as control:
            await control.post("/_emulator/seed", params={"pools": args.pools, "replicas": args.replicas})
            with LoopLag() as lag:
                started = time.perf_counter()
                await backend.start()
                start_ms = (time.perf_counter() - started) * 1000
            assert len(backend.list_pods()) == total, len(backend.list_pods())
            rows.append({"operation": f"start: list {total} pods (+ deployments), build the cache", "ms": start_ms, "lag": lag.worst_ms})
            gc.freeze()  # as Runtime.start does: what exists after start-up is never walked by the collector again

            lists = backend.reflectors["pods"].lists
            with LoopLag() as lag:
                started = time.perf_counter()
                gone = (await control.post("/_emulator/cut", params={"delete_every": 10})).json()["deleted"]
                while backend.reflectors["pods"].lists == lists or set(gone) & {p.name for p in backend.list_pods()}:
                    await asyncio.sleep(0.001)
                replay_ms = (time.perf_counter() - started) * 1000
            rows.append({"operation": f"cut watch → relist: {total} pods replayed, {len(gone)} found deleted", "ms": replay_ms,
                         "lag": lag.worst_ms})

            remaining = len(backend.list_pods())
            with LoopLag() as lag:
                started = time.perf_counter()
                await control.post("/_emulator/restart-all")
                while sum(p.restarts for p in backend.list_pods()) < remaining:
                    await asyncio.sleep(0.001)
                burst_ms = (time.perf_counter() - started) * 1000
            rows.append({"operation": f"{remaining} pod events through the watch (one per pod), until all are cached", "ms": burst_ms,
                         "lag": lag.worst_ms})

        samples = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            backend.list_pods()
            backend.list_pods(f"vllm-model-{args.pools - 1}-pool")
            samples.append((time.perf_counter() - began) * 1000)
        rows.append({"operation": "list_pods() (all) + one pool's, from the cache (p50)", "ms": statistics.median(samples), "lag": None})
    finally:
        await backend.close()
        store.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def show_emulator(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Kubernetes backend over the emulated API server: {args.pools} pools x {args.replicas} pods (real HTTP)")
    for column in ("operation", "ms", "worst event-loop block, ms"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for row in rows:
        table.add_row(row["operation"], f"{row['ms']:.2f}", "" if row["lag"] is None else f"{row['lag']:.1f}")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=100, help="per pool (at most 256)")
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200, help="samples per read and for assign")
    parser.add_argument("--distributions", type=int, default=10, help="samples of each distribution measurement")
    parser.add_argument("--profile", choices=["read", "assign", "distribute"], help="cProfile the server on one operation instead")
    parser.add_argument("--emulator", action="store_true",
                        help="the Kubernetes backend over the emulated API server (tests/k8s; needs kmock): start, replay, events")
    args = parser.parse_args()
    if args.emulator:
        show_emulator(asyncio.run(emulator_bench(args)), args)
        return
    data_dir = Path(tempfile.mkdtemp(prefix="corral-control-plane-bench-"))
    server = Server(data_dir)
    server.start()
    try:
        if args.profile:
            profile(args, server)
        else:
            show(asyncio.run(bench(args, server)), args)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
