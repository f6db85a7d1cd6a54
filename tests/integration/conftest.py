"""A real `corral serve` process on a free port with its own data dir, driven over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.backends.local.process import free_port
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]


class CorralServer:
    """Start, stop and restart `corral serve`; replicas outlive it, as in production."""

    def __init__(self, data_dir: Path, token: str | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra_env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gateway_port = free_port()
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.token = token
        self.process: subprocess.Popen | None = None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def start(self) -> None:
        env = {**os.environ, "CORRAL_DATA_DIR": str(self.data_dir), "CORRAL_PORT": str(self.port),
               "CORRAL_GATEWAY_PORT": str(self.gateway_port), "CORRAL_STOP_GRACE_S": "5"}
        if self.token:
            env["CORRAL_API_TOKEN"] = self.token
        env.update(self.extra_env)
        log = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115 (kept open for the child)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "corral.main", "serve", "--log-level", "warning"], env=env, stdout=log, stderr=log
        )
        wait_for(self._healthy, timeout=30, what=f"corral serve on {self.url}")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"corral serve exited: {(self.data_dir / 'serve.log').read_text()[-3000:]}")
        try:
            return self.http.get("/api/health").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def replica_pids(self) -> list[int]:
        db = self.data_dir / "corral.db"
        if not db.exists():
            return []
        with sqlite3.connect(db) as conn:
            return [pid for (pid,) in conn.execute("SELECT pid FROM replicas WHERE pid IS NOT NULL")]

    def replica_pid(self, name: str) -> int:
        with sqlite3.connect(self.data_dir / "corral.db") as conn:
            return conn.execute("SELECT pid FROM replicas WHERE name = ?", (name,)).fetchone()[0]

    def finetune_pid(self, task_id: str) -> int:
        with sqlite3.connect(self.data_dir / "corral.db") as conn:
            return conn.execute("SELECT pid FROM finetune_tasks WHERE id = ?", (task_id,)).fetchone()[0]

    def kill_replicas(self) -> None:
        db = self.data_dir / "corral.db"
        if db.exists():
            with sqlite3.connect(db) as conn:
                try:
                    trainers = [pid for (pid,) in conn.execute("SELECT pid FROM finetune_tasks WHERE pid IS NOT NULL")]
                except sqlite3.OperationalError:
                    trainers = []
            for pid in trainers:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        from corral.backends.local.process import find_replicas

        found = [f.pid for copies in find_replicas(self.data_dir.resolve()).values() for f in copies]
        for pid in set(self.replica_pids()) | set(found):  # recorded or not (a crash before its pid was saved)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        from corral.gateway.nginx_plane import stop_generations

        stop_generations(self.data_dir / "gateway", timeout_s=2.0)  # nginx outlives `corral serve` too, by design

    # API helpers ---------------------------------------------------------------------------------
    def ok(self, method: str, path: str, **kwargs) -> dict | list:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code < 300, f"{method} {path} → {response.status_code}: {response.text}"
        return response.json()

    def pods(self, deployment: str | None = None) -> list[dict]:
        return self.ok("GET", "/api/pods", params={"deployment": deployment} if deployment else {})  # type: ignore[return-value]

    def wait_ready(self, deployment: str, count: int, timeout: float = 60) -> list[dict]:
        return wait_for(
            lambda: (pods := self.pods(deployment)) and len(pods) == count and all(p["ready"] for p in pods) and pods,
            timeout=timeout, what=f"{count} ready replicas of {deployment}",
        )

    def snapshot(self) -> str:
        """Everything a bad request must not change."""
        state = {
            "deployments": self.ok("GET", "/api/deployments"),
            "pods": [{k: p[k] for k in ("name", "labels", "deployment")} for p in self.pods()],
            "services": self.ok("GET", "/api/business-services"),
        }
        for d in state["deployments"]:
            d.pop("readyReplicas"), d.pop("currentReplicas")
        for s in state["services"]:
            s.pop("readyReplicas")
        return json.dumps(state, sort_keys=True)


@contextlib.contextmanager
def running_corral(data_dir: Path, env: dict[str, str] | None = None, token: str | None = None) -> Iterator[CorralServer]:
    """`corral serve` on a fresh data dir, stopped afterwards with every replica it left."""
    server = CorralServer(data_dir, token=token, env=env)
    server.data_dir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.kill_replicas()  # the safety net: replicas outlive the server by design


@pytest.fixture(params=["python", "nginx"])
def data_plane(request: pytest.FixtureRequest) -> str:
    """Both gateway data planes, for modules that ask (`pytestmark = pytest.mark.usefixtures("data_plane")`):
    the same behaviour is the contract."""
    from corral.gateway.nginx_plane import missing_parts

    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    return request.param


@pytest.fixture
def corral(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CorralServer]:
    """A running `corral serve`; a test module may pick the gateway data plane with a `data_plane` fixture."""
    plane = request.getfixturevalue("data_plane") if "data_plane" in request.fixturenames else "auto"
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": plane}) as server:
        yield server


SIM_ARGS = ["--ttft-ms", "5", "--tokens-per-second", "1000"]


def deploy_sim_pool(server: CorralServer, tag: str = "qwen-06b", replicas: int = 4) -> str:
    result = server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag,
                                                    "replicas": replicas, "deployAsPool": True, "engineArgs": SIM_ARGS})
    name = result["deployment"]["name"]
    server.wait_ready(name, replicas)
    return name
