"""`corral serve`, the README's main command: prints its URL and serves the API docs."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import CorralServer


def test_serve_prints_url_and_serves_openapi(corral: CorralServer) -> None:
    assert f"Corral is running at http://127.0.0.1:{corral.port}" in (corral.data_dir / "serve.log").read_text()
    spec = corral.ok("GET", "/openapi.json")
    for path in ["/api/deploy", "/api/deployments", "/api/deploy-service", "/api/business-services", "/api/assign-pod",
                 "/api/distribute-pods", "/api/scale-deployment", "/api/scale-pool-deployment",
                 "/api/pool-status/{deploymentName}", "/api/pods", "/api/history"]:
        assert path in spec["paths"], path
    assert corral.http.get("/docs").status_code == 200
    assert (corral.data_dir / "corral.db").exists()
    engines = {e["name"]: e["isSimulator"] for e in corral.ok("GET", "/api/health")["engines"]}
    assert engines == {"simulator": True, "sglang": False, "transformers": False, "vllm": False}


def test_serve_says_on_exit_that_replicas_keep_running_or_stops_them(tmp_path) -> None:
    """A newcomer's Ctrl+C left the replicas running without a word. Corral says so on exit, and
    `--stop-replicas-on-exit` (CORRAL_STOP_REPLICAS_ON_EXIT) stops them with it."""
    from corral.backends.local.process import find_replicas
    from corral.gateway.nginx_plane import missing_parts
    from tests.integration.conftest import deploy_sim_pool, running_corral

    with running_corral(tmp_path / "kept") as server:
        deploy_sim_pool(server, replicas=2)
        server.wait_ready("simulator-qwen-06b-pool", 2)
        server.stop()
        log = (server.data_dir / "serve.log").read_text()
        assert "2 replica(s) keep running" in log and "--stop-replicas-on-exit" in log, log[-2000:]
        assert len(find_replicas(server.data_dir.resolve())) == 2
        if not missing_parts():  # the nginx gateway outlives `corral serve` with them, still answering
            assert "keeps routing to them" in log
            assert httpx.get(f"{server.gateway_url}/s/nope-nlb/v1/models", timeout=5).status_code == 404
    with running_corral(tmp_path / "stopped", {"CORRAL_STOP_REPLICAS_ON_EXIT": "1"}) as server:
        deploy_sim_pool(server, replicas=2)
        server.wait_ready("simulator-qwen-06b-pool", 2)
        server.stop()
        assert "2 replica(s) stopped with it" in (server.data_dir / "serve.log").read_text()
        assert find_replicas(server.data_dir.resolve()) == {}
        with pytest.raises(httpx.ConnectError):  # and the gateway with them
            httpx.get(f"{server.gateway_url}/s/nope-nlb/v1/models", timeout=5)


def test_a_simulator_replicas_log_says_what_it_serves(corral: CorralServer) -> None:
    """`corral logs` on a simulator replica showed only Corral's header line: it now starts with the engine's own
    line, as vLLM's does (and prints vLLM's throughput line every 10 s while it works)."""
    from tests.integration.conftest import deploy_sim_pool

    deploy_sim_pool(corral, replicas=1)
    pod = corral.wait_ready("simulator-qwen-06b-pool", 1)[0]["name"]
    log = corral.http.get(f"/api/pods/{pod}/logs", params={"tail": 50}).text
    assert "[simulator] Corral's simulated engine (no model runs) serving 'qwen-06b'" in log, log
