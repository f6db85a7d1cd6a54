"""Gateway latency of small requests while 50 MB bodies are sent to a business service, back to back."""
import json
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, "bench")
import httpx
from harness import Corral, wait_until

plane, seconds = (sys.argv[1] if len(sys.argv) > 1 else "python"), 8
corral = Corral(plane)
try:
    corral.api("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "m", "replicas": 2,
                                            "engineArgs": "--ttft-ms 0 --tokens-per-second 0"})
    wait_until(lambda: len(p := corral.pods("simulator-m")) == 2 and all(x["ready"] for x in p), 60, "replicas")
    host, port = corral.gateway.removeprefix("http://").split(":")
    path = "/s/simulator-m/v1/chat/completions"
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 50_000_000}], "max_tokens": 1}).encode()

    def small_requests(stop_after: float) -> list[float]:
        out, end = [], time.monotonic() + stop_after
        with httpx.Client(base_url=corral.gateway, timeout=120) as client:
            while time.monotonic() < end:
                started = time.perf_counter()
                assert client.post(path, json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200
                out.append(1000 * (time.perf_counter() - started))
        return out

    def big_bodies(stop: threading.Event, statuses: list) -> None:  # one 50 MB body a second
        while not stop.is_set():
            started = time.monotonic()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(big)}\r\nConnection: close\r\n\r\n".encode() + big)
                statuses.append(sock.recv(64).split(b" ")[1].decode())
            stop.wait(max(0.0, started + 1.0 - time.monotonic()))

    def row(name: str, ms: list[float]) -> None:
        q = statistics.quantiles(ms, n=100)
        print(f"{name:<34} {len(ms):>6} {q[49]:>8.2f} {q[98]:>9.2f} {max(ms):>9.1f}")

    print(f"{plane} data plane, body cap {os.environ.get('CORRAL_GATEWAY_MAX_BODY_BYTES', 'default')}")
    print(f"{'small requests':<34} {'n':>6} {'p50 ms':>8} {'p99 ms':>9} {'max ms':>9}")
    row("alone", small_requests(seconds))
    stop, statuses = threading.Event(), []
    sender = threading.Thread(target=big_bodies, args=(stop, statuses), daemon=True)
    sender.start()
    during = small_requests(seconds)
    stop.set()
    sender.join(120)
    row(f"during 50 MB bodies ({len(statuses)} sent)", during)
    print("50 MB answers:", {s: statuses.count(s) for s in set(statuses)})
finally:
    corral.close()
