"""Shared benchmark plumbing: a real `corral serve`, simulator pools, nginx and vllm-router beside it.

Everything runs on loopback, bounded in time, and is torn down at the end (also on Ctrl+C).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from corral.backends.local.process import free_port


def wait_until(predicate, timeout: float, what: str):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


class Corral:
    """`corral serve` in a temporary data dir, driven over its API."""

    def __init__(self, data_plane: str = "auto", env: dict[str, str] | None = None) -> None:
        """`env`: more environment for `corral serve` (settings; PYTHONPATH to run another tree's code)."""
        self.dir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
        self.port, self.gateway_port = free_port(), free_port()
        self.url, self.gateway = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.gateway_port}"
        env = {**os.environ, "CORRAL_DATA_DIR": str(self.dir), "CORRAL_PORT": str(self.port),
               "CORRAL_GATEWAY_PORT": str(self.gateway_port), "CORRAL_STOP_GRACE_S": "3", "CORRAL_DRAIN_TIMEOUT_S": "30",
               "CORRAL_GATEWAY_DATA_PLANE": data_plane, **(env or {})}
        self.log = open(self.dir / "serve.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "corral.main", "serve", "--log-level", "warning"],
                                        env=env, stdout=self.log, stderr=self.log)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        wait_until(lambda: self.http.get("/api/health").status_code == 200, 30, "corral serve")

    def api(self, method: str, path: str, **kwargs):  # noqa: ANN201
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def pool(self, tag: str, replicas: int, engine_args: str) -> str:
        name = self.api("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag, "replicas": replicas,
                                                     "deployAsPool": True, "engineArgs": engine_args})["deployment"]["name"]
        wait_until(lambda: len(p := self.pods(name)) == replicas and all(x["ready"] for x in p), 60, f"{name} ready")
        return name

    def pods(self, deployment: str) -> list[dict]:
        return self.api("GET", "/api/pods", params={"deployment": deployment})

    def close(self) -> None:
        for d in self.api("GET", "/api/deployments"):
            self.http.delete(f"/api/deployments/{d['name']}", params={"force": "true"})
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: not self.pods_rows(), 30, "replicas to stop")
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        from corral.gateway.nginx_plane import stop_generations

        stop_generations(self.dir / "gateway", timeout_s=5.0)  # nginx outlives `corral serve`, by design: not a bench's
        shutil.rmtree(self.dir, ignore_errors=True)

    def pods_rows(self) -> list:
        import sqlite3

        with sqlite3.connect(self.dir / "corral.db") as db:
            return db.execute("SELECT name FROM replicas").fetchall()


@contextlib.contextmanager
def _process(argv: list[str], probe_url: str, what: str) -> Iterator[None]:
    """Run a proxy for the duration of the block; ready once `probe_url` answers 200."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: httpx.get(probe_url).status_code == 200, 30, what)
        yield
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def nginx(endpoints: list[str]) -> Iterator[str]:
    """nginx (Debian package) as a least_conn reverse proxy with upstream keep-alive, one worker."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed: apt-get install -y nginx-light")
    workdir = Path(tempfile.mkdtemp(prefix="corral-nginx-"))
    port = free_port()
    servers = "\n".join(f"    server {e.removeprefix('http://')};" for e in endpoints)
    temp = "\n".join(f"  {k}_temp_path {workdir}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (workdir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp}
  upstream replicas {{
    least_conn;
{servers}
    keepalive 512;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    url = f"http://127.0.0.1:{port}"
    try:
        with _process([binary, "-c", str(workdir / "nginx.conf"), "-p", str(workdir)], f"{url}/health", "nginx"):
            yield url
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def vllm_router(endpoints: list[str], policy: str = "round_robin") -> Iterator[str]:
    """vllm-router (PyPI, Rust) with the same replicas as workers."""
    binary = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not Path(binary).exists():
        raise RuntimeError("vllm-router is not installed: pip install vllm-router")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *endpoints, "--policy", policy,
            "--max-concurrent-requests", "4096", "--log-level", "error",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    with _process(argv, f"{url}/v1/models", "vllm-router"):
        yield url


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def nginx_family(marker: str) -> list[int]:
    """Every nginx master whose command line contains `marker` (its config or prefix path), and its workers."""
    masters = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "nginx" and marker.encode() in (entry / "cmdline").read_bytes():
                    masters.append(int(entry.name))
            except OSError:
                continue
    family = []
    for master in masters:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        family += [master, *(int(c) for c in children)]
    return family
