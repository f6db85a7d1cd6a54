"""`corral serve`, the README's main command: prints its URL and serves the API docs."""

from __future__ import annotations

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
