"""Control-plane latency at scale: 1,000 replicas in 10 pools, 100 business services.

    python bench/control_plane.py [--quick] [--pools 10] [--replicas 100] [--services 100] [--rounds 200]
                                  [--distributions 10] [--ticks 10] [--no-autopilot]
                                  [--profile read|assign|distribute|tick]
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

The autopilot is enabled on every pool (`PUT /api/autopilot/{pool}`, defaults otherwise) while everything
is measured, so each autopilot tick scrapes 1,000 replicas' `/metrics`: every pod's endpoint is one
local HTTP server in a process of its own (`--serve-metrics`, so that serving costs this process
nothing) answering a vLLM-sized page (`vllm_page`: the families and bucket sets of a vLLM 0.10 server,
48 KB, 626 lines; the autopilot parses it for real). A watchdog task on the server's event loop sleeps
1 ms in a loop and records how late it wakes: a late wake-up is a stall of the loop, which the API and
the Python gateway share.

Measured, after a warm-up:
- autopilot ticks with no traffic (`--ticks` of them): the longest loop stall within each tick (from
  one tick's start to the next's), how long a tick takes, and the loop time blocked per tick;
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
import itertools
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

TARGETS_MS = {"read": 20.0, "pods": 10.0, "assign": 5.0, "distribution500": 1000.0, "stall": 20.0}


class Server:
    """The real app over a Runtime on the memory backend, served by uvicorn in a thread."""

    def __init__(self, data_dir: Path, metrics_url: str | None = None) -> None:
        import uvicorn

        from corral.api.app import create_app
        from corral.config import Settings
        from corral.runtime import memory_runtime

        self.port = free_port()
        settings = Settings(data_dir=data_dir, port=self.port, gateway_port=free_port(), gateway_data_plane="python")
        self.runtime = memory_runtime(settings, seed=0, endpoint=metrics_url)
        self.stalls = Stalls()
        self.ticks: list[tuple[float, float]] = []  # each autopilot tick's (start, end), perf_counter s
        tick = self.runtime.autopilot.tick

        async def timed_tick() -> None:
            started = time.perf_counter()
            try:
                await tick()
            finally:
                self.ticks.append((started, time.perf_counter()))

        self.runtime.autopilot.tick = timed_tick  # type: ignore[method-assign]
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
        asyncio.run_coroutine_threadsafe(self.stalls.run(), self.loop)

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


class Stalls:
    """The server loop's stalls: a task that sleeps 1 ms in a loop and records how late each wake-up was
    (perf_counter seconds of the wake-up, lateness in ms). Anything that holds the loop (parsing, building
    views, a synchronous read) shows as lateness; the API and the Python gateway wait that long too."""

    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            woke = time.perf_counter()
            late = (woke - started) * 1000 - 1
            if late > 0.5:
                self.wakes.append((woke, late))

    def worst(self, start: float, end: float) -> float:
        """The longest stall that ended between `start` and `end` (perf_counter seconds), ms."""
        return max((late for woke, late in self.wakes if start <= woke < end), default=0.0)

    def blocked(self, start: float, end: float) -> float:
        """The loop time lost to stalls between `start` and `end`, ms."""
        return sum(late for woke, late in self.wakes if start <= woke < end)


HANDLERS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/embeddings",
            "/tokenize", "/detokenize", "/version", "/load")
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
LATENCY = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
TOKEN_LATENCY = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40,
                 80)
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160,
        640, 2560)
HIGHR = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5, 10, 30, 60)
ITERATION = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
VLLM_HISTOGRAMS = (("iteration_tokens_total", ITERATION),
                   ("time_to_first_token_seconds", TTFT), ("time_per_output_token_seconds", TOKEN_LATENCY),
                   ("inter_token_latency_seconds", TOKEN_LATENCY), ("e2e_request_latency_seconds", LATENCY),
                   ("request_queue_time_seconds", LATENCY), ("request_inference_time_seconds", LATENCY),
                   ("request_prefill_time_seconds", LATENCY), ("request_decode_time_seconds", LATENCY),
                   ("request_prompt_tokens", TOKENS), ("request_generation_tokens", TOKENS),
                   ("request_max_num_generation_tokens", TOKENS), ("request_params_n", (1, 2, 5, 10, 20)),
                   ("request_params_max_tokens", TOKENS))
CACHE_CONFIG = {"block_size": "16", "cache_dtype": "auto", "calculate_kv_scales": "False",
                "cpu_offload_gb": "0", "enable_prefix_caching": "True", "engine": "0",
                "gpu_memory_utilization": "0.9", "is_attention_free": "False", "num_cpu_blocks": "None",
                "num_gpu_blocks": "27305", "num_gpu_blocks_override": "None",
                "prefix_caching_hash_algo": "builtin", "sliding_window": "None", "swap_space": "4",
                "swap_space_bytes": "4294967296"}


def vllm_page(model: str = "model-0") -> str:
    """A vLLM-sized `/metrics` page: the families, label sets and bucket bounds a vLLM 0.10 server
    exposes (Python and process collectors, the HTTP instrumentator's, vLLM's gauges, counters and 14
    histograms), one model, no adapters: 48 KB, 626 lines, ~8 ms to parse with prometheus_client."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str = "") -> None:
        out.extend((f"# HELP {name} {help_ or name.replace('_', ' ')}", f"# TYPE {name} {kind}"))

    def labels(**pairs: str) -> str:
        return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"

    for name in ("python_gc_objects_collected_total", "python_gc_objects_uncollectable_total",
                 "python_gc_collections_total"):
        family(name, "counter")
        out.extend(f'{name}{{generation="{g}"}} {1234.0 * (g + 1)}' for g in range(3))
    family("python_info", "gauge", "Python platform information")
    python = labels(implementation="CPython", major="3", minor="12", patchlevel="3", version="3.12.3")
    out.append(f"python_info{python} 1.0")
    for name, value in [("process_virtual_memory_bytes", 3.2e10), ("process_resident_memory_bytes", 4.1e9),
                        ("process_start_time_seconds", 1.7e9), ("process_cpu_seconds_total", 1234.5),
                        ("process_open_fds", 87.0), ("process_max_fds", 1048576.0)]:
        family(name, "counter" if name.endswith("_total") else "gauge")
        out.append(f"{name} {value}")
    family("http_requests_total", "counter", "Total number of requests by method, status and handler.")
    out.extend(f"http_requests_total{labels(handler=h, method='POST', status=s)} 17.0"
               for h in HANDLERS for s in ("2xx", "4xx", "5xx"))
    out.extend(f"http_requests_created{labels(handler=h, method='POST', status='2xx')} 1.7e9"
               for h in HANDLERS)
    for name in ("http_request_size_bytes", "http_response_size_bytes"):
        family(name, "summary", "Content length of requests by handler.")
        for h in HANDLERS:
            out.extend((f"{name}_count{labels(handler=h)} 1000.0", f"{name}_sum{labels(handler=h)} 123456.0"))
        out.extend(f"{name}_created{labels(handler=h)} 1.7e9" for h in HANDLERS)
    highr = "http_request_duration_highr_seconds"
    family(highr, "histogram", "Latency with many buckets but no API specific labels.")
    out.extend(f'{highr}_bucket{{le="{float(le)}"}} {100.0 * (i + 1)}' for i, le in enumerate(HIGHR))
    out.extend((f'{highr}_bucket{{le="+Inf"}} 2200.0', f"{highr}_count 2200.0", f"{highr}_sum 812.5",
                f"{highr}_created 1.7e9"))
    family("http_request_duration_seconds", "histogram", "Latency with only few buckets by handler.")
    for h in HANDLERS:
        out.extend(f"http_request_duration_seconds_bucket{labels(handler=h, le=le, method='POST')} 90.0"
                   for le in ("0.1", "0.5", "1.0", "+Inf"))
        out.extend((f"http_request_duration_seconds_count{labels(handler=h, method='POST')} 90.0",
                    f"http_request_duration_seconds_sum{labels(handler=h, method='POST')} 31.0"))
    out.extend(f"http_request_duration_seconds_created{labels(handler=h, method='POST')} 1.7e9"
               for h in HANDLERS)
    engine = labels(engine="0", model_name=model)
    for name, value in [("num_requests_running", 1.0), ("num_requests_waiting", 0.0),
                        ("gpu_cache_usage_perc", 0.05), ("kv_cache_usage_perc", 0.05)]:
        family(f"vllm:{name}", "gauge")
        out.append(f"vllm:{name}{engine} {value}")
    family("vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
    lora = labels(max_lora="4", running_lora_adapters="", waiting_lora_adapters="")
    out.append(f"vllm:lora_requests_info{lora} 1.7e9")
    family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
    out.append(f"vllm:cache_config_info{labels(**CACHE_CONFIG)} 1.0")
    for name in ("num_preemptions", "gpu_prefix_cache_queries", "gpu_prefix_cache_hits",
                 "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens"):
        family(f"vllm:{name}_total", "counter")
        out.extend((f"vllm:{name}_total{engine} 123456.0", f"vllm:{name}_created{engine} 1.7e9"))
    family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    reasons = [labels(engine="0", finished_reason=r, model_name=model) for r in ("stop", "length", "abort")]
    out.extend(f"vllm:request_success_total{r} 321.0" for r in reasons)
    out.extend(f"vllm:request_success_created{r} 1.7e9" for r in reasons)
    for name, bounds in VLLM_HISTOGRAMS:
        family(f"vllm:{name}", "histogram")
        out.extend(f"vllm:{name}_bucket{labels(engine='0', le=str(float(le)), model_name=model)} {10.0 * i}"
                   for i, le in enumerate(bounds))
        count = 10.0 * len(bounds)
        out.extend((f"vllm:{name}_bucket{labels(engine='0', le='+Inf', model_name=model)} {count}",
                    f"vllm:{name}_count{engine} {count}", f"vllm:{name}_sum{engine} 1234.5",
                    f"vllm:{name}_created{engine} 1.7e9"))
    return "\n".join(out) + "\n"


def serve_metrics(port: int) -> None:
    """`--serve-metrics PORT`: every replica's engine, in a process of its own: `/metrics` answers
    `vllm_page()`, any other path 200 (health checks)."""
    from aiohttp import web

    page = vllm_page().encode()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain", charset="utf-8")

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class MetricsServer:
    """`serve_metrics` in a subprocess of this script, on a free loopback port."""

    def __init__(self) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-metrics", str(self.port)])
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/metrics", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the /metrics server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


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


async def enable_autopilot(http: httpx.AsyncClient, pools: list[str]) -> None:
    """The autopilot on for every pool, its other settings at their defaults."""
    for pool in pools:
        await timed([], http.put(f"/api/autopilot/{pool}", json={"enabled": True}))


async def idle_ticks(server: Server, count: int, limit_s: float) -> list[dict[str, Any]]:
    """Wait for `count` whole autopilot ticks with no traffic (at most `limit_s`); per tick, from its start to
    the next one's: the longest loop stall, the tick's own duration and the loop time lost to stalls."""
    first = len(server.ticks)
    deadline = time.monotonic() + limit_s
    while len(server.ticks) < first + count + 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ticks = server.ticks[first:]
    if len(ticks) < 2:
        raise RuntimeError(f"fewer than 2 autopilot ticks in {limit_s:.0f} s")
    spans = [(start, end, following) for (start, end), (following, _) in itertools.pairwise(ticks)]
    stalls = [server.stalls.worst(start, following) for start, _, following in spans]
    lasted = [(end - start) * 1000 for start, end, _ in spans]
    blocked = [server.stalls.blocked(start, following) for start, _, following in spans]
    return [
        {"operation": "autopilot tick, no traffic: longest loop stall", "n": len(spans), "samples": stalls,
         "target": TARGETS_MS["stall"]},
        {"operation": "  tick duration (start to end)", "n": len(spans), "samples": lasted, "target": None},
        {"operation": "  loop time lost to stalls per tick", "n": len(spans), "samples": blocked,
         "target": None},
    ]


async def bench(args: argparse.Namespace, server: Server) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)

    def phase(row: dict[str, Any], started: float) -> dict[str, Any]:
        """The row, with the longest loop stall seen since `started` (perf_counter seconds)."""
        return {**row, "stall": server.stalls.worst(started, time.perf_counter())}

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        pools, businesses = await setup(http, args.pools, args.replicas, args.services)
        print(f"setup: {args.pools} pools x {args.replicas} replicas, {args.services} services in {time.perf_counter() - t0:.1f} s")
        pod_count = len((await http.get("/api/pods")).json())
        assert pod_count == args.pools * args.replicas, pod_count
        if args.autopilot:
            await enable_autopilot(http, pools)
            t0 = time.perf_counter()
            rows.extend(await idle_ticks(server, args.ticks, limit_s=120))
            print(f"{args.ticks} autopilot ticks in {time.perf_counter() - t0:.1f} s")

        reads = {"GET /api/pods": ("/api/pods", TARGETS_MS["pods"]),
                 "GET /api/deployments": ("/api/deployments", TARGETS_MS["read"]),
                 f"GET /api/pool-status/{{pool}} ({args.replicas} pods)": (f"/api/pool-status/{pools[0]}",
                                                                          TARGETS_MS["read"])}
        for label, (path, target) in reads.items():
            samples: list[float] = []
            started = time.perf_counter()
            for i in range(args.rounds + 10):
                await timed(samples if i >= 10 else [], http.get(path))
            row = {"operation": label, "n": len(samples), "samples": samples, "target": target}
            rows.append(phase(row, started))

        # assign: one pod of the last pool back and forth between two of its businesses; also until routed
        pool = pools[-1]
        pod = (await http.get("/api/pods", params={"deployment": pool})).json()[0]["name"]
        first, second = businesses[pool][0], businesses[pool][1]
        samples, routed = [], []
        started_phase = time.perf_counter()
        for i in range(args.rounds + 10):
            business = first if i % 2 else second
            started = time.perf_counter()
            await timed(samples if i >= 10 else [], http.post("/api/assign-pod", json={"podName": pod, "businessTag": business}))
            while pod not in server.routed(f"{business}-nlb"):
                await asyncio.sleep(0.0005)
            if i >= 10:
                routed.append((time.perf_counter() - started) * 1000)
        rows.append(phase({"operation": "POST /api/assign-pod", "n": len(samples), "samples": samples,
                           "target": TARGETS_MS["assign"]}, started_phase))
        rows.append({"operation": "  assign → gateway routes it", "n": len(routed), "samples": routed, "target": None})

        # distributions: pools 0..4 move all their replicas from one business to another, alternately
        moved = pools[: args.pools // 2]
        one, whole, routed = [], [], []
        started_phase = time.perf_counter()
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
        row = {"operation": label, "n": len(whole), "samples": whole, "target": TARGETS_MS["distribution500"]}
        rows.append(phase(row, started_phase))
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

    autopilot = ("autopilot on every pool, 1,000 vLLM-sized /metrics pages scraped" if args.autopilot
                 else "autopilot off")
    title = (f"Control plane on the memory backend: {args.pools * args.replicas} replicas in {args.pools} pools, "
             f"{args.services} business services, {autopilot} (real HTTP, in-process uvicorn)")
    table = Table(title=title)
    for column in ("operation", "n", "p50 ms", "p99 ms", "max ms", "target", "met", "worst loop stall ms"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for row in rows:
        s = row["samples"]
        p50 = statistics.median(s)
        target = row["target"]
        every_tick = row["operation"].startswith("autopilot tick")  # a stall's target holds in every tick
        judged = max(s) if every_tick else p50
        met = "" if target is None else ("yes" if judged <= target else "NO")
        shown = "" if target is None else f"{'max' if every_tick else 'p50'} ≤ {target:.0f} ms"
        stall = f"{row['stall']:.1f}" if "stall" in row else ""
        table.add_row(row["operation"], str(row["n"]), f"{p50:.2f}", f"{percentile(s, 0.99):.2f}", f"{max(s):.2f}",
                      shown, met, stall)
    Console(width=160).print(table)


def profile(args: argparse.Namespace, server: Server) -> None:
    """cProfile the server thread while one kind of request repeats; print the top of the profile."""
    profiler = cProfile.Profile()

    async def drive() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            pools, businesses = await setup(http, args.pools, args.replicas, args.services)
            pod = (await http.get("/api/pods", params={"deployment": pools[-1]})).json()[0]["name"]
            if args.autopilot:
                await enable_autopilot(http, pools)
                await idle_ticks(server, 1, limit_s=120)  # not profiled: the first (connections opened)
            server.call(profiler.enable)
            if args.profile == "tick":
                await idle_ticks(server, args.ticks, limit_s=120)
            for i in range(0 if args.profile == "tick" else args.rounds if args.profile != "distribute"
                           else args.distributions * 2):
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
    parser.add_argument("--ticks", type=int, default=10, help="autopilot ticks measured with no traffic")
    parser.add_argument("--no-autopilot", dest="autopilot", action="store_false",
                        help="leave the autopilot off (no /metrics scraped)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples (50 rounds, 3 distributions, 4 ticks): ~1 min")
    parser.add_argument("--profile", choices=["read", "assign", "distribute", "tick"],
                        help="cProfile the server on one operation instead (tick: idle autopilot ticks)")
    parser.add_argument("--emulator", action="store_true",
                        help="the Kubernetes backend over the emulated API server (tests/k8s; needs kmock): start, replay, events")
    # MetricsServer's child process
    parser.add_argument("--serve-metrics", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_metrics:
        serve_metrics(args.serve_metrics)
        return
    if args.quick:
        args.rounds, args.distributions, args.ticks = 50, 3, 4
    if args.emulator:
        show_emulator(asyncio.run(emulator_bench(args)), args)
        return
    data_dir = Path(tempfile.mkdtemp(prefix="corral-control-plane-bench-"))
    metrics = MetricsServer() if args.autopilot else None
    server = Server(data_dir, metrics.url if metrics else None)
    server.start()
    try:
        if args.profile:
            profile(args, server)
        else:
            show(asyncio.run(bench(args, server)), args)
    finally:
        server.stop()
        if metrics:
            metrics.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
