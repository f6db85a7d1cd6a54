"""Metering through a real `corral serve` and real simulator replicas, on both data planes: requests, tokens,
held and rejected requests counted per business in `/api/usage` (JSON, CSV, Prometheus), GPU time from the
assignment history, and the counts surviving a SIGKILL of the control plane without being counted twice."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral
from tests.integration.test_cli import cli

POOL = "simulator-m-pool"
FAKE_NVML = Path(__file__).parents[1] / "fake_nvml"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "count these words please"}], "max_tokens": 6}


def usage(server: CorralServer, **params: str) -> dict[str, dict]:
    rows = server.ok("GET", "/api/usage", params=params)["rows"]  # type: ignore[index]
    return {row["business"]: row for row in rows}


def cursor(server: CorralServer, column: str = "flushed_at") -> str | None:
    """Metering's cursor in the database: when it last flushed, or the data plane's epoch it flushed."""
    with sqlite3.connect(server.data_dir / "corral.db") as conn:
        found = conn.execute(f"SELECT {column} FROM usage_cursor WHERE plane = 'gateway'").fetchone()  # noqa: S608
    return found[0] if found else None


def flushes(server: CorralServer) -> str | None:
    return cursor(server)


def send(server: CorralServer, service: str, n: int, key: str | None = None) -> tuple[int, int]:
    """`n` chat completions (with API `key`); the prompt and completion tokens their answers reported."""
    prompt = completion = 0
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for _ in range(n):
        answer = httpx.post(f"{server.gateway_url}/s/{service}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        prompt += answer.json()["usage"]["prompt_tokens"]
        completion += answer.json()["usage"]["completion_tokens"]
    return prompt, completion


@pytest.mark.parametrize("plane", ["python", "nginx"])
def test_usage_counts_traffic_and_gpu_time_and_survives_a_sigkill(plane: str, tmp_path: Path) -> None:
    from corral.gateway.nginx_plane import missing_parts

    if plane == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    env = {"CORRAL_GATEWAY_DATA_PLANE": plane, "CORRAL_USAGE_FLUSH_S": "1", "CORRAL_GATEWAY_HOLD_TIMEOUT_S": "0.3",
           # a simulated machine of 2 GPUs (tests/fake_nvml): the replica holds one, so its time is GPU time
           "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
           "CORRAL_TEST_NVML_DEVICES": json.dumps([{"name": "NVIDIA H100 80GB HBM3", "total": 80 * 1024**3, "used": 0,
                                                    "uuid": f"GPU-{i}"} for i in range(2)])}
    with running_corral(tmp_path / "data", env) as server:
        server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "m", "replicas": 1,
                                               "deployAsPool": True, "gpusPerReplica": 1, "engineArgs": ["--ttft-ms", "1"]})
        replica = server.wait_ready(POOL, 1)[0]["name"]
        service = {business: server.ok("POST", "/api/deploy-service", json={  # type: ignore[index]
            "serviceName": f"{business}-chat", "modelPool": POOL, "businessTag": business})["service"]["name"]
            for business in ("production", "cold")}
        server.ok("POST", "/api/assign-pod", json={"podName": replica, "businessTag": "production"})
        prompt, completion = send(server, service["production"], 5)
        refused = httpx.post(f"{server.gateway_url}/s/{service['cold']}/v1/chat/completions", json=CHAT, timeout=30)
        assert refused.status_code == 503  # held for want of a replica, then refused past the deadline

        def counted() -> dict[str, dict]:
            rows = usage(server)
            ok = ("production" in rows and rows["production"]["requests"] == 5 and "cold" in rows
                  and rows["cold"]["rejected"] == 1)
            return rows if ok else {}

        rows = wait_for(counted, timeout=20, what="the usage of production and cold flushed")
        assert (rows["production"]["promptTokens"], rows["production"]["completionTokens"]) == (prompt, completion) != (0, 0)
        assert rows["production"]["errors"] == 0 and rows["cold"]["held"] == 1 and rows["cold"]["requests"] == 0
        # the replica has been assigned to production since the assign row, and to nobody else
        assert rows["production"]["gpuSeconds"] == rows["production"]["replicaSeconds"] > 0
        assert rows["cold"]["gpuSeconds"] == 0

        table = server.http.get("/api/usage", params={"format": "csv", "groupBy": "hour"})
        assert table.headers["content-type"].startswith("text/csv")
        lines = list(csv.DictReader(io.StringIO(table.text)))
        assert sum(int(r["requests"]) for r in lines if r["business"] == "production") == 5
        assert all(r["hour"] for r in lines)
        assert server.http.get("/api/usage", headers={"Accept": "text/csv"}).text.startswith("business,keyId,hour,")
        samples = {(s.name, s.labels.get("business")): s.value
                   for f in text_string_to_metric_families(server.http.get("/api/metrics").text)
                   if f.name.startswith("corral_usage") for s in f.samples}
        assert samples[("corral_usage_requests_total", "production")] == 5
        assert samples[("corral_usage_rejected_total", "cold")] == 1

        if plane == "python":  # the CLI reads the same API whatever the plane
            table = cli(server.url, "usage", "--group-by", "hour")
            assert table.returncode == 0 and "production" in table.stdout and "Hour" in table.stdout, table.stderr
            as_csv = cli(server.url, "usage", "--csv")
            assert list(csv.DictReader(io.StringIO(as_csv.stdout)))[0]["business"] in ("cold", "production")
            bad = cli(server.url, "usage", "--from", "tomorrow")
            assert bad.returncode == 1 and "from must be an ISO 8601 time" in bad.stderr

        for params, field in [({"from": "yesterday"}, "from"), ({"to": "2026-13-01"}, "to"),
                              ({"from": "2026-12-02T00:00:00Z", "to": "2026-12-01T00:00:00Z"}, "before to"),
                              ({"from": "2020-01-01", "to": "2026-01-01"}, "366 days"), ({"groupBy": "team"}, "groupBy")]:
            answer = server.http.get("/api/usage", params=params)
            assert answer.status_code == 400 and field in answer.text, (params, answer.text)

        # Per API key once the service asks for keys: the key's requests on a row of their own (its id, never the key).
        server.ok("PUT", f"/api/business-services/{service['production']}/access", json={"auth": "keys"})
        key = server.ok("POST", f"/api/business-services/{service['production']}/keys", json={"name": "team-a"})
        send(server, service["production"], 2, key["key"])  # type: ignore[index]
        wait_for(lambda: {(r["business"], r["keyId"]): r["requests"] for r in server.ok(  # type: ignore[index]
            "GET", "/api/usage", params={"groupBy": "key"})["rows"]}.get(("production", key["id"])) == 2,  # type: ignore[index]
            timeout=20, what="the key's 2 requests flushed")
        by_key = {(r["business"], r["keyId"]): r["requests"] for r in server.ok(  # type: ignore[index]
            "GET", "/api/usage", params={"groupBy": "key"})["rows"]}
        assert by_key[("production", None)] == 5 and key["key"] not in server.http.get("/api/metrics").text  # type: ignore[index]
        assert f'key_id="{key["id"]}"' in server.http.get("/api/metrics").text  # type: ignore[index]
        server.ok("PUT", f"/api/business-services/{service['production']}/access", json={"auth": "none"})

        # Moved to cold: each business is billed its share, exactly the time between the two assignment rows.
        server.ok("POST", "/api/assign-pod", json={"podName": replica, "businessTag": "cold"})
        moves = [datetime.fromisoformat(h["timestamp"]) for h in reversed(server.ok(  # type: ignore[union-attr]
            "GET", "/api/history", params={"action": "assign"})) if h["outcome"] == "success"]
        assert len(moves) == 2
        rows = usage(server)
        assert rows["production"]["gpuSeconds"] == pytest.approx((moves[1] - moves[0]).total_seconds(), abs=0.002)
        assert rows["cold"]["gpuSeconds"] > 0

        # SIGKILL: no graceful flush. What was flushed stays, once; what comes after is added.
        assert server.process is not None
        epoch = cursor(server, "epoch")
        server.process.kill()
        server.process.wait(timeout=30)
        server.start()
        before = flushes(server)
        wait_for(lambda: flushes(server) != before, timeout=20, what="a flush after the restart")
        # nginx outlives the control plane and is adopted: its counters go on, and only the cursor keeps the
        # restarted control plane from adding them again. The Python plane restarted with it (a new epoch, from zero).
        assert (cursor(server, "epoch") == epoch) is (plane == "nginx")
        assert usage(server)["production"]["requests"] == 7
        server.ok("POST", "/api/assign-pod", json={"podName": replica, "businessTag": "production"})
        send(server, service["production"], 2)
        wait_for(lambda: usage(server)["production"]["requests"] == 9, timeout=20, what="the 2 new requests flushed")
        after = flushes(server)
        wait_for(lambda: flushes(server) != after, timeout=20, what="one more flush")
        assert usage(server)["production"]["requests"] == 9
