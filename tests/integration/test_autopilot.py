"""The autopilot over real simulator replicas: a burst on one business gets warm replicas from the
spares and an idle business within seconds, and gives them back after the burst, with zero failed
requests, a pinned replica untouched and every min respected."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral

# Two batch slots and 40 tokens/s per sequence: one replica holds 2 requests of ~0.25 s; a burst of 10
# concurrent clients queues ~8 requests on it, which vLLM's `num_requests_waiting` shows at once.
ENGINE_ARGS = ["--max-num-seqs", "2", "--tokens-per-second", "40", "--ttft-ms", "5"]
CHAT = {"model": "qwen-06b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "stream": True}


@pytest.fixture
def corral(tmp_path: Path):
    env = {"CORRAL_AUTOPILOT_INTERVAL_S": "0.25"}
    with running_corral(tmp_path / "data", env) as server:
        yield server


def sim_pool(server: CorralServer, replicas: int, businesses: tuple[str, ...] = ()) -> str:
    """A ready pool of `replicas` simulator replicas (ENGINE_ARGS) and a business service per business, named after
    it (`<business>-nlb`); the pool's name."""
    pool = server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b",
                                                  "replicas": replicas, "deployAsPool": True,
                                                  "engineArgs": ENGINE_ARGS})["deployment"]["name"]
    server.wait_ready(pool, replicas)
    for business in businesses:
        server.ok("POST", "/api/deploy-service", json={"serviceName": business, "modelPool": pool, "businessTag": business})
    return pool


def businesses(server: CorralServer, pool: str) -> Counter[str]:
    return Counter(p["labels"]["business"] for p in server.pods(pool))


class Tally:
    """Streamed chat requests through a business service, each read to its end: anything but a complete 200 is a
    failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def send(self, http: httpx.Client) -> None:
        try:
            with http.stream("POST", f"{self.url}/chat/completions", json=CHAT) as answer:
                body = b"".join(answer.iter_bytes())
            if answer.status_code != 200 or b"[DONE]" not in body:
                self.failures.append(f"{answer.status_code}: {body[:200]!r}")
            else:
                self.ok += 1
        except httpx.HTTPError as exc:
            self.failures.append(repr(exc))


class Burst(Tally):
    """`clients` threads sending one request after another until stopped (closed loop)."""

    def __init__(self, url: str, clients: int) -> None:
        super().__init__(url)
        self.clients = clients
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                self.send(http)

    def __enter__(self) -> Burst:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_a_burst_gets_warm_replicas_within_seconds_and_gives_them_back(corral: CorralServer) -> None:
    pool = sim_pool(corral, 5, ("production", "idle"))
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"production": 1, "idle": 3}})
    pinned = next(p["name"] for p in corral.pods(pool) if p["labels"]["business"] == "idle")
    assert corral.ok("POST", "/api/assign-pod", json={"podName": pinned, "businessTag": "idle", "pin": True})["pinned"] is True
    corral.ok("PUT", "/api/business-services/production-nlb/policy",
              json={"minReplicas": 1, "priority": 10, "target": {"waitingPerReplica": 1}})
    corral.ok("PUT", "/api/business-services/idle-nlb/policy", json={"minReplicas": 1, "priority": 0})
    assert businesses(corral, pool) == {"production": 1, "idle": 3, "unassigned": 1}

    url = corral.ok("GET", "/api/business-services")[0]["baseUrl"].replace("idle-nlb", "production-nlb")
    floor: list[int] = []  # idle's replicas, seen all along: never below its min

    with Burst(url, clients=10) as burst:
        wait_for(lambda: burst.ok >= 5, timeout=20, what="the burst flowing")
        started = time.monotonic()
        status = corral.ok("PUT", f"/api/autopilot/{pool}", json={"enabled": True, "warmSpares": 0, "cooldownSeconds": 1,
                                                                   "stabilizationSeconds": 0.5, "releaseAfterSeconds": 3,
                                                                   "stableWindowSeconds": 2, "panicWindowSeconds": 0.5})
        assert status["settings"]["enabled"] is True

        def grown() -> bool:
            seen = businesses(corral, pool)
            floor.append(seen["idle"])
            return seen["production"] >= 3

        wait_for(grown, timeout=15, interval=0.05, what="the autopilot moving replicas to production")
        reaction = time.monotonic() - started
        after_burst = burst.ok
        wait_for(lambda: burst.ok > after_burst + 20, timeout=20, what="the burst served by the moved replicas")

    assert not burst.failures, burst.failures[:5]
    print(f"reaction {reaction:.2f} s, served {burst.ok}")
    assert reaction < 10, reaction  # measured precisely by bench/autopilot.py; here: seconds, not a cold start
    moves = [h for h in corral.ok("GET", "/api/history", params={"action": "assign"}) if h["message"].startswith("autopilot:")]
    sources = {h["before"]["business"] for h in moves if h["after"]["business"] == "production"}
    assert sources == {"unassigned", "idle"}, moves
    # Pressure shows as a queue (waiting), or first as the concurrency target's margin (80% of the 2 batch slots).
    assert all(("production waiting per replica" in h["message"] or "production concurrency per replica" in h["message"])
               for h in moves if h["after"]["business"] == "production"), [h["message"] for h in moves]
    assert corral.ok("GET", "/api/history", params={"action": "autopilot"}), "no decision summary row"

    # After the burst: production gives its surplus back to the spares; idle keeps its min and its pinned replica.
    def shrunk() -> bool:
        seen = businesses(corral, pool)
        floor.append(seen["idle"])
        return seen["production"] == 1
    wait_for(shrunk, timeout=30, interval=0.2, what="production's surplus released after the burst")
    assert min(floor) >= 1
    assert next(p for p in corral.pods(pool) if p["name"] == pinned)["labels"]["business"] == "idle"
    status = corral.ok("GET", f"/api/autopilot/{pool}")
    assert status["decisions"] and status["decisions"][0]["moves"][0]["to"] == "unassigned"
    production = next(b for b in status["businesses"] if b["business"] == "production")
    assert production["policy"]["priority"] == 10 and production["services"] == ["production-nlb"]
    assert next(r for r in status["replicas"] if r["pod"] == pinned)["pinned"] is True
    metrics = corral.http.get("/api/metrics").text
    assert f'corral_autopilot_actions_total{{pool="{pool}",kind="moves"}}' in metrics


def test_a_concurrency_target_moves_a_replica_before_anything_queues(corral: CorralServer) -> None:
    """Two clients keep production's one replica's two batch slots busy: nothing ever waits, so a waiting target
    sees no pressure; `concurrencyPerReplica` 1 sees 2 running on 1 replica and brings a second one."""
    pool = sim_pool(corral, 2, ("production",))
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"production": 1}})
    corral.ok("PUT", "/api/business-services/production-nlb/policy",
              json={"minReplicas": 1, "target": {"waitingPerReplica": 1, "concurrencyPerReplica": 1}})
    url = corral.ok("GET", "/api/business-services")[0]["baseUrl"]
    with Burst(url, clients=2) as load:
        wait_for(lambda: load.ok >= 4, timeout=20, what="the load flowing")
        corral.ok("PUT", f"/api/autopilot/{pool}", json={"enabled": True, "warmSpares": 0, "replicaConcurrency": 2,
                                                          "stabilizationSeconds": 0.5, "releaseAfterSeconds": 600})
        wait_for(lambda: businesses(corral, pool)["production"] == 2, timeout=15, interval=0.05,
                 what="a second replica for production")
    assert not load.failures, load.failures[:5]
    moved = [h for h in corral.ok("GET", "/api/history", params={"action": "assign"}) if h["message"].startswith("autopilot:")]
    assert len(moved) == 1 and "production concurrency per replica" in moved[0]["message"], moved


def test_policy_and_settings_are_validated_and_recorded(corral: CorralServer) -> None:
    pool = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b",
                                                  "replicas": 1, "deployAsPool": True})["deployment"]["name"]
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "production", "modelPool": pool, "businessTag": "production"})
    assert corral.ok("GET", "/api/business-services/production-nlb/policy") == {
        "minReplicas": None, "maxReplicas": None, "priority": 0, "target": {"ttftP90Ms": None, "waitingPerReplica": 1.0, "concurrencyPerReplica": None}}
    for body, words in [({"minReplicas": 3, "maxReplicas": 1}, "maxReplicas (1) must be >= minReplicas (3)"),
                        ({"minReplicas": -1}, "minReplicas"), ({"priority": 10**9}, "priority"),
                        ({"minReplicas": 1.5}, "minReplicas"), ({"target": {"ttftP90Ms": 0}}, "ttftP90Ms"),
                        ({"target": {"concurrencyPerReplica": 0}}, "concurrencyPerReplica"),
                        ({"bogus": 1}, "bogus")]:
        answer = corral.http.put("/api/business-services/production-nlb/policy", json=body)
        assert answer.status_code == 400 and words in answer.text, (body, answer.text)
    assert corral.http.get("/api/business-services/nope/policy").status_code == 404
    assert corral.http.put(f"/api/autopilot/{pool}", json={"warmSpares": 1000}).status_code == 400
    windows = corral.http.put(f"/api/autopilot/{pool}", json={"stableWindowSeconds": 5, "panicWindowSeconds": 10})
    assert windows.status_code == 400 and "must not exceed stableWindowSeconds" in windows.text, windows.text
    assert corral.http.get("/api/autopilot/nope-pool").status_code == 404
    assert corral.http.post("/api/pods/nope/unpin").status_code == 404
    assert corral.ok("GET", "/api/history", params={"action": "policy"}) == []  # refusals changed nothing

    spec = {"minReplicas": 1, "maxReplicas": 4, "priority": 7,
            "target": {"ttftP90Ms": 800, "waitingPerReplica": 2, "concurrencyPerReplica": 2.8}}
    assert corral.ok("PUT", "/api/business-services/production-nlb/policy", json=spec) == spec
    corral.restart()
    assert corral.ok("GET", "/api/business-services/production-nlb/policy") == spec  # desired state: it survives
    rows = corral.ok("GET", "/api/history", params={"action": "policy"})
    assert rows[0]["target"] == "production-nlb" and rows[0]["after"]["priority"] == 7 and rows[0]["outcome"] == "success"


def test_cli_sets_policies_and_settings_and_shows_the_status(corral: CorralServer) -> None:
    from tests.integration.test_cli import cli

    pool = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b",
                                                  "replicas": 2, "deployAsPool": True})["deployment"]["name"]
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "production", "modelPool": pool, "businessTag": "production"})
    done = cli(corral.url, "autopilot", "policy", "production-nlb", "--min", "1", "--priority", "5", "--ttft-p90-ms", "900",
               "--concurrency-per-replica", "3", "-o", "json")
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)
    assert policy["minReplicas"] == 1 and policy["priority"] == 5 and policy["target"]["ttftP90Ms"] == 900.0
    assert policy["target"]["concurrencyPerReplica"] == 3.0
    refused = cli(corral.url, "autopilot", "policy", "production-nlb", "--min", "5", "--max", "2")
    assert refused.returncode != 0 and "maxReplicas (2) must be >= minReplicas (5)" in refused.stderr
    enabled = cli(corral.url, "autopilot", "enable", pool, "--warm-spares", "1")
    assert enabled.returncode == 0, enabled.stderr
    # The min of 1 is met at once from the spares (no stabilisation for a min): shown in the status.
    wait_for(lambda: businesses(corral, pool)["production"] == 1, timeout=15, what="production's min met")
    status = json.loads(cli(corral.url, "autopilot", "status", pool, "-o", "json").stdout)
    assert status["settings"]["enabled"] is True and status["settings"]["warmSpares"] == 1
    assert "< minReplicas 1" in status["decisions"][0]["moves"][0]["reason"]
    table = cli(corral.url, "autopilot", "status", pool)
    assert table.returncode == 0 and "production" in table.stdout and "autopilot on" in table.stdout
    assert "SOURCE" in table.stdout and "HELD" in table.stdout  # where each business's load came from
    wide = cli(corral.url, "autopilot", "status", pool, "-o", "wide")
    assert wide.returncode == 0 and "AGE" in wide.stdout and "engine" in wide.stdout, wide.stdout
    # A manual assignment while the autopilot is on pins the replica; unpin lets the autopilot move it again.
    spare = next(p["name"] for p in corral.pods(pool) if p["labels"]["business"] == "unassigned")
    assigned = cli(corral.url, "assign", spare, "production")
    assert assigned.returncode == 0 and "pinned" in assigned.stdout, assigned.stdout
    assert "was not pinned" not in cli(corral.url, "autopilot", "unpin", spare).stdout
    assert cli(corral.url, "autopilot", "disable", pool).returncode == 0
    assert cli(corral.url, "autopilot", "status", "nope-pool").returncode != 0


def test_requests_to_a_business_without_a_replica_are_held_until_the_autopilot_gives_it_one(corral: CorralServer) -> None:
    """The activator: the gateway holds requests for a business with no replica (instead of a 503 at once), the
    autopilot counts them as demand and moves a spare to it, and every held request is then answered: zero failed."""
    pool = sim_pool(corral, 2, ("cold",))
    [service] = corral.ok("GET", "/api/business-services")
    assert businesses(corral, pool)["cold"] == 0
    corral.ok("PUT", f"/api/autopilot/{pool}", json={"enabled": True, "warmSpares": 0, "stabilizationSeconds": 0.5})
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=6) as clients:
        answers = list(clients.map(
            lambda _: http.post(f"{service['baseUrl']}/chat/completions", json=CHAT | {"stream": False}), range(6)))
    assert [a.status_code for a in answers] == [200] * 6, [a.text[:200] for a in answers if a.status_code != 200]
    assert businesses(corral, pool)["cold"] >= 1
    *_, first = [h for h in corral.ok("GET", "/api/history", params={"action": "assign"})  # newest first
                 if h["message"].startswith("autopilot:") and h["after"].get("business") == "cold"]
    assert "cold has traffic and no ready replica" in first["message"]


class Poisson(Tally):
    """Open-loop Poisson arrivals at `rate` per second, each request on a worker thread."""

    def __init__(self, url: str, rate: float, seed: int) -> None:
        super().__init__(url)
        self.rate, self.rng = rate, random.Random(seed)
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.thread = threading.Thread(target=self._arrivals, daemon=True)
        self.http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))

    def _arrivals(self) -> None:
        while not self.stop.wait(self.rng.expovariate(self.rate)):
            self.pool.submit(self._one)

    def _one(self) -> None:
        self.send(self.http)

    def __enter__(self) -> Poisson:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=True)
        self.http.close()


def test_steady_poisson_load_on_two_businesses_settles_and_stays_settled(corral: CorralServer) -> None:
    """Issue 24: on steady load the autopilot moved replicas back and forth all along. Two businesses with constant
    Poisson arrivals (each ~2.5 requests in flight at ~0.25 s a request, on replicas of 2 batch slots): once settled,
    no replica moves over a 20 s window (a tenth of a 10-minute window's budget of 2 moves, scaled to the windows
    set here)."""
    pool = sim_pool(corral, 6, ("chat", "batch"))
    # The split the load asks for (equal loads, equal priorities): before issue 24 the autopilot moved replicas back
    # and forth from just such a split; from an uneven one, when it acts depends on its windows, not on the test.
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"chat": 3, "batch": 3}})
    base = corral.ok("GET", "/api/business-services")[0]["baseUrl"]
    urls = {b: base.rsplit("/s/", 1)[0] + f"/s/{b}-nlb/v1" for b in ("chat", "batch")}

    def autopilot_moves() -> list[dict]:
        return [h for h in corral.ok("GET", "/api/history", params={"action": "assign", "limit": 1000})
                if h["message"].startswith("autopilot:")]

    with Poisson(urls["chat"], rate=10, seed=1) as chat, Poisson(urls["batch"], rate=10, seed=2) as batch:
        wait_for(lambda: chat.ok >= 10 and batch.ok >= 10, timeout=20, what="the load flowing")
        status = corral.ok("PUT", f"/api/autopilot/{pool}", json={
            "enabled": True, "warmSpares": 0, "cooldownSeconds": 5, "stabilizationSeconds": 1, "releaseAfterSeconds": 20,
            "stableWindowSeconds": 5, "panicWindowSeconds": 1})
        assert status["replicaConcurrency"] == 2 and status["replicaConcurrencySource"] == "engine"

        enabled_at = time.time()

        # Settled: whatever it moved, then no move for longer than a decision can take to come (a 5 s stable
        # window, 1 s of pressure, the 5 s cooldown, a tick): 12 s.
        def settled() -> bool:
            moves = autopilot_moves()
            last = datetime.fromisoformat(moves[0]["timestamp"]).timestamp() if moves else enabled_at
            return time.time() - last >= 12
        wait_for(settled, timeout=60, interval=0.5, what="the autopilot settling on steady load")
        before = len(autopilot_moves())
        window_ends = time.monotonic() + 20
        wait_for(lambda: time.monotonic() >= window_ends or len(autopilot_moves()) > before + 1, timeout=25,
                 interval=0.5, what="a 20 s window over the settled pool")
        after = autopilot_moves()
        status = corral.ok("GET", f"/api/autopilot/{pool}")
    assert len(after) - before <= 1, [h["message"] for h in after[: len(after) - before]]
    assert not chat.failures and not batch.failures, (chat.failures[:3], batch.failures[:3])
    counts = businesses(corral, pool)
    assert counts["batch"] >= 1 and counts["chat"] >= 1, counts
    assert {b["source"] for b in status["businesses"]} <= {"engine", "gateway"}
    assert all(r["source"] in ("engine", "gateway") for r in status["replicas"])
