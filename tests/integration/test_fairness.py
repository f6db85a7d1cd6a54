"""Fair inside a business (issue 28, item 4), on both data planes: two keys of one business, one sending ten
times as much as the other, share its saturated replica by the virtual token counter (domain/fairness.py). Both
get service, and the quiet key's time to first token stays within 2× of what it is with the business to itself:
with first come first served it would wait behind the noisy key's whole backlog (about 3× here)."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral

POOL = "simulator-m-pool"
SERVICE = "acme-nlb"
# One replica that runs four requests at once (`--max-num-seqs 4`: the gateway holds the rest), each 100 ms to its
# first token, then its tokens at 1,000 a second: the noisy key's 4 to 64 of them (lengths that vary, so places
# free up at different times, as they do in real traffic), the quiet key's 16.
ENGINE_ARGS = "--ttft-ms 100 --tokens-per-second 1000 --max-num-seqs 4"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "stream": True}
NOISY_CLIENTS = 10  # each sends its next request when the last one ended: ten times the quiet key's one


@pytest.fixture(params=["python", "nginx"])
def business(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CorralServer, str, str]]:
    """A Corral per data plane with `acme` (external: key-protected) on one simulator replica, and two of its keys."""
    from corral.gateway.nginx_plane import missing_parts

    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    with running_corral(tmp_path_factory.mktemp(f"fair-{request.param}") / "data",
                        {"CORRAL_GATEWAY_DATA_PLANE": request.param}) as server:
        server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "m", "replicas": 1,
                                               "deployAsPool": True, "engineArgs": ENGINE_ARGS})
        pod = server.wait_ready(POOL, 1)[0]["name"]
        server.ok("POST", "/api/deploy-service", json={"serviceName": "acme", "modelPool": POOL, "businessTag": "acme",
                                                       "isExternal": True})
        server.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "acme"})
        noisy, quiet = (server.ok("POST", f"/api/business-services/{SERVICE}/keys", json={"name": n})["key"]
                        for n in ("noisy", "quiet"))
        yield server, noisy, quiet


def first_token_s(client: httpx.Client, url: str, key: str, tokens: int = 16) -> float:
    """One streamed chat completion: the seconds to its first body bytes (the whole stream is read)."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", url, json=CHAT | {"max_tokens": tokens},
                       headers={"authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_bytes():
            if first is None and chunk:
                first = time.perf_counter() - started
    assert first is not None
    return first


def test_a_quiet_key_keeps_its_first_token_time_beside_a_noisy_key(business: tuple[CorralServer, str, str]) -> None:
    server, noisy, quiet = business
    url = f"{server.gateway_url}/s/{SERVICE}/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        wait_for(lambda: client.post(url, json=CHAT | {"stream": False}, headers={"authorization": f"Bearer {quiet}"}
                                     ).status_code == 200, timeout=10, what="the keys at the gateway")
        alone = statistics.median(first_token_s(client, url, quiet) for _ in range(6))

        stop, served = threading.Event(), [0] * NOISY_CLIENTS

        def noisy_client(i: int) -> None:
            lengths = random.Random(i)
            with httpx.Client(timeout=30) as own:
                while not stop.is_set():
                    first_token_s(own, url, noisy, lengths.randint(4, 64))
                    served[i] += 1

        threads = [threading.Thread(target=noisy_client, args=(i,), daemon=True) for i in range(NOISY_CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            # saturated: the replica's two places are taken and the gateway holds the noisy key's other requests
            wait_for(lambda: server.ok("GET", f"/api/business-services/{SERVICE}/load", params={"window": 5})["held"] > 0,
                     timeout=15, what="requests held at the gateway")
            before = sum(served)
            beside = [first_token_s(client, url, quiet) for _ in range(8)]
            noisy_meanwhile = sum(served) - before
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    loaded = statistics.median(beside)
    print(f"quiet key's first token: {alone * 1000:.0f} ms alone, {loaded * 1000:.0f} ms beside the noisy key "
          f"(p50 of {len(beside)}); the noisy key served {noisy_meanwhile} meanwhile")
    assert noisy_meanwhile >= 8, f"the noisy key was served {noisy_meanwhile} times meanwhile"  # both get service
    assert loaded <= 2 * alone, (f"the quiet key's first token: {loaded * 1000:.0f} ms beside the noisy key, "
                                 f"{alone * 1000:.0f} ms alone ({[round(b * 1000) for b in beside]})")
