"""Issue 26 item 4, over a real `corral serve`: a name ending in a newline (which `re.match(r"^...$")` passed) is
refused with a 400 that shows the newline, for every name field of the API — those that create a name and those
that look one up — and by every CLI command that takes one (exit code 1), and nothing changes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SIM_ARGS, CorralServer, deploy_sim_pool, running_corral

POOL = "simulator-qwen-06b-pool"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """A pool of 2 replicas, one of them in business `production` (service production-chat-nlb)."""
    with running_corral(tmp_path_factory.mktemp("names") / "data", {"CORRAL_GATEWAY_DATA_PLANE": "python"}) as corral:
        deploy_sim_pool(corral, replicas=2)
        corral.ok("POST", "/api/deploy-service", json={"serviceName": "production-chat", "modelPool": POOL,
                                                       "businessTag": "production"})
        corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 1}})
        yield corral


def _state(server: CorralServer) -> tuple:
    return (server.snapshot(), server.ok("GET", "/api/history", params={"limit": 1000}),
            sorted(p.name for p in (server.data_dir / "deployments").iterdir()))


def _pod(server: CorralServer) -> str:
    return server.pods(POOL)[0]["name"]


# (method, path, body, what the refusal names): every name field, given with a trailing newline.
def _cases(pod: str) -> list[tuple[str, str, Any, str]]:
    deploy = {"engine": "simulator", "modelId": "sim", "replicas": 0, "engineArgs": SIM_ARGS}
    return [
        ("POST", "/api/deploy", deploy | {"modelTag": "m9\n"}, "modelTag 'm9\\n'"),  # a standard deployment
        ("POST", "/api/deploy", deploy | {"modelTag": "m9\n", "deployAsPool": True}, "modelTag 'm9\\n'"),
        ("POST", "/api/deploy", deploy | {"modelTag": "m9", "secretEnv": {"API_KEY\n": "v"}}, "secretEnv"),
        ("POST", "/api/deploy-service", {"serviceName": "chat\n", "modelPool": POOL, "businessTag": "production"},
         "serviceName 'chat\\n'"),
        ("POST", "/api/deploy-service", {"serviceName": "chat", "modelPool": POOL, "businessTag": "production\n"},
         "businessTag 'production\\n'"),
        ("POST", "/api/deploy-service", {"serviceName": "chat", "modelPool": f"{POOL}\n", "businessTag": "production"},
         f"modelPool '{POOL}\\n'"),
        ("POST", "/api/assign-pod", {"podName": pod, "businessTag": "production\n"}, "businessTag 'production\\n'"),
        ("POST", "/api/assign-pod", {"podName": f"{pod}\n", "businessTag": "production"}, f"podName '{pod}\\n'"),
        ("POST", "/api/assign-pod", {"podName": pod, "businessTag": "production", "modelName": "qwen-06b\n"},
         "modelName 'qwen-06b\\n'"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL, "ratios": {"production\n": 1}},
         "business in ratios 'production\\n'"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL, "counts": {"production\n": 2}},
         "business in counts 'production\\n'"),
        ("POST", "/api/distribute-pods", {"deploymentName": f"{POOL}\n", "counts": {"production": 2}},
         f"deploymentName '{POOL}\\n'"),
        ("POST", "/api/scale-pool-deployment", {"deploymentName": f"{POOL}\n", "targetReplicas": 3},
         f"deploymentName '{POOL}\\n'"),
        ("POST", "/api/scale-deployment", {"deploymentName": f"{POOL}\n", "targetReplicas": 3},
         f"deploymentName '{POOL}\\n'"),
        ("DELETE", f"/api/deployments/{POOL}%0A?force=true", None, f"deployment '{POOL}\\n'"),
        ("DELETE", "/api/business-services/production-chat-nlb%0A?force=true", None, "service 'production-chat-nlb\\n'"),
        ("GET", f"/api/pool-status/{POOL}%0A", None, f"'{POOL}\\n'"),
        ("GET", f"/api/pods?deployment={POOL}%0A", None, f"deployment '{POOL}\\n'"),
        ("GET", f"/api/pods/{pod}%0A/logs", None, f"pod '{pod}\\n'"),
        ("PUT", "/api/business-services/production-chat-nlb%0A/policy", {"priority": 5},
         "business service 'production-chat-nlb\\n'"),
        ("PUT", f"/api/autopilot/{POOL}%0A", {"enabled": True}, f"'{POOL}\\n'"),
        ("POST", f"/api/pods/{pod}%0A/unpin", None, f"pod '{pod}\\n'"),
    ]


def test_every_api_name_field_refuses_a_trailing_newline(server: CorralServer) -> None:
    before = _state(server)
    for method, path, body, names in _cases(_pod(server)):
        response = server.http.request(method, path, json=body)
        assert response.status_code == 400, (method, path, body, response.status_code, response.text)
        error = response.json()["error"]
        assert names in error, (path, body, error)
        assert "\n" not in error, "the newline is shown escaped"
        if "secretEnv" not in names:
            assert "a newline (\\n)" in error or "modelName" in names, error
        assert _state(server) == before, (method, path, body)
    # The same names without the newline are found (a 404 only for what does not exist).
    assert server.http.get(f"/api/pool-status/{POOL}").status_code == 200
    assert server.http.get("/api/pool-status/simulator-nothing-pool").status_code == 404


def _cli(server: CorralServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.cli", *args, "--url", server.url],
                          capture_output=True, text=True, timeout=60)


def test_every_cli_command_that_takes_a_name_refuses_a_trailing_newline(server: CorralServer) -> None:
    before = _state(server)
    pod = _pod(server)
    commands = [
        (["deploy", "simulator", "sim", "--tag", "m9\n", "--replicas", "0", "--pool", "--no-wait"], "modelTag 'm9\\n'"),
        (["service", "create", "chat\n", "--pool", POOL, "--business", "production"], "serviceName 'chat\\n'"),
        (["service", "create", "chat", "--pool", POOL, "--business", "production\n"], "businessTag 'production\\n'"),
        (["service", "delete", "production-chat-nlb\n", "--force"], "service 'production-chat-nlb\\n'"),
        (["assign", pod, "production\n"], "businessTag 'production\\n'"),
        (["assign", f"{pod}\n", "production"], f"podName '{pod}\\n'"),
        (["distribute", POOL, "production\n=1"], "business in ratios 'production\\n'"),
        (["scale", f"{POOL}\n", "3"], f"deploymentName '{POOL}\\n'"),
        (["delete", f"{POOL}\n", "--yes", "--force"], f"deployment '{POOL}\\n'"),
        (["status", f"{POOL}\n"], f"'{POOL}\\n'"),
        (["logs", f"{pod}\n"], f"pod '{pod}\\n'"),
        (["autopilot", "policy", "production-chat-nlb\n", "--priority", "5"], "business service 'production-chat-nlb\\n'"),
        (["autopilot", "enable", f"{POOL}\n"], f"'{POOL}\\n'"),
        (["autopilot", "unpin", f"{pod}\n"], f"pod '{pod}\\n'"),
    ]
    for args, names in commands:
        result = _cli(server, *args)
        assert result.returncode == 1, (args, result.returncode, result.stdout, result.stderr)
        flat = " ".join(result.stderr.split())  # rich wraps long lines
        assert names in flat and "is not a valid name" in flat, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert _state(server) == before


def test_names_without_the_newline_still_work(server: CorralServer, tmp_path: Path) -> None:
    """The checks refuse the newline, not the name: the same requests without it are served."""
    assert server.ok("GET", f"/api/pods?deployment={POOL}")
    assert server.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 1},
                                                           "dryRun": True})["moves"] == []
