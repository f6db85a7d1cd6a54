"""The CLI speaks to operators: `-o table|wide|json|yaml|name`, names never cut, errors worded as commands, and the
server found from CORRAL_URL or CORRAL_HOST/CORRAL_PORT, against one real `corral serve` with simulator replicas."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from rich.console import Console

from corral import cli as corral_cli
from corral.api.auth import Unauthorized
from corral.api.schemas import error_body
from corral.domain.errors import Conflict, CorralError, Hint, InvalidInput, NotFound
from tests.integration.conftest import CorralServer, deploy_sim_pool, running_corral

POOL = "simulator-outputs-pool"


def run_cli(*args: str, url: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`corral ARGS` with stdout a pipe (as in `corral pods | grep`), a narrow COLUMNS and no inherited address."""
    base = {k: v for k, v in os.environ.items() if k not in ("CORRAL_URL", "CORRAL_HOST", "CORRAL_PORT", "COLUMNS")}
    base.update({"COLUMNS": "40", **({"CORRAL_URL": url} if url else {}), **env})
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], env=base, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    with running_corral(tmp_path_factory.mktemp("cli-output") / "data") as corral:
        pool = deploy_sim_pool(corral, tag="outputs", replicas=2)
        assert pool == POOL
        corral.ok("POST", "/api/deploy-service", json={"serviceName": "prod-chat", "modelPool": POOL,
                                                       "businessTag": "production"})
        corral.ok("POST", "/api/assign-pod", json={"podName": corral.pods(POOL)[0]["name"], "businessTag": "production"})
        yield corral


def test_json_and_yaml_are_the_apis_objects_with_their_types(server: CorralServer) -> None:
    listed = run_cli("pods", "-o", "json", url=server.url)
    assert listed.returncode == 0, listed.stderr
    pods = json.loads(listed.stdout)
    assert pods == server.pods()
    assert {"name", "deployment", "labels", "status", "ready", "business", "endpoint", "restarts", "gpuIds"} <= set(pods[0])
    assert isinstance(pods[0]["restarts"], int) and isinstance(pods[0]["ready"], bool) and isinstance(pods[0]["gpuIds"], list)

    deployments = yaml.safe_load(run_cli("deployments", "-o", "yaml", url=server.url).stdout)
    assert deployments == server.ok("GET", "/api/deployments")
    assert deployments[0]["replicas"] == 2 and deployments[0]["podDistribution"] == {"unassigned": 1, "production": 1}

    status = json.loads(run_cli("status", POOL, "-o", "json", url=server.url).stdout)
    assert status["totalPods"] == 2 and status["availableForScaleDown"] == 1 and isinstance(status["traffic"], dict)
    history = json.loads(run_cli("history", "-o", "json", url=server.url).stdout)
    assert history and all(isinstance(h["id"], int) for h in history) and {h["action"] for h in history} >= {"deploy", "assign"}
    services = json.loads(run_cli("service", "list", "-o", "json", url=server.url).stdout)
    assert [s["name"] for s in services] == ["prod-chat-nlb"] and services[0]["replicas"] == 1
    assert json.loads(run_cli("finetune", "list", "-o", "json", url=server.url).stdout) == []

    names = run_cli("pods", "-o", "name", url=server.url)
    assert names.stdout.split() == [p["name"] for p in pods]


def test_tables_in_a_pipe_keep_full_names_and_wide_adds_columns(server: CorralServer) -> None:
    pod_names = [p["name"] for p in server.pods()]
    table = run_cli("pods", url=server.url)
    assert table.returncode == 0, table.stderr
    assert "…" not in table.stdout
    assert all(any(name in line for line in table.stdout.splitlines()) for name in pod_names), table.stdout
    assert "GPU ids" not in table.stdout and "Labels" not in table.stdout

    wide = run_cli("pods", "-o", "wide", url=server.url)
    assert wide.returncode == 0 and "…" not in wide.stdout
    assert "GPU ids" in wide.stdout and "Labels" in wide.stdout and "Deployment" in wide.stdout
    assert "business=production" in wide.stdout and "business=unassigned" in wide.stdout

    deployments = run_cli("deployments", url=server.url).stdout
    assert POOL in deployments and "…" not in deployments
    wide_deployments = run_cli("deployments", "-o", "wide", url=server.url).stdout
    assert "Model id" in wide_deployments and "--ttft-ms 5" in wide_deployments
    history = run_cli("history", "-o", "wide", url=server.url).stdout
    assert "Id" in history and POOL in history and "…" not in history


def test_a_narrow_terminal_folds_cells_instead_of_cutting_them(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(corral_cli, "console", Console(file=screen, force_terminal=True, width=30, color_system=None))
    name = "simulator-qwen-06b-pool-7f3kq"
    corral_cli._table("Pods", ["Name", "Status", "Business"], [[name, "Running", "[bold]production[/bold]"]])
    text = screen.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 30
    cells = [line.split("│") for line in text.splitlines() if line.count("│") == 4]
    assert "".join(c[1].strip() for c in cells) == name  # folded onto several lines, every character kept
    assert "".join(c[3].strip() for c in cells) == "[bold]production[/bold]"  # API text is never markup


def test_errors_speak_cli(server: CorralServer) -> None:
    missing = run_cli("assign", "ghost", "production", url=server.url)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "pod 'ghost' not found; list pods with `corral pods`" in missing.stderr and "/api/" not in missing.stderr
    status = run_cli("status", "ghost", url=server.url)
    assert status.returncode == 1 and "list deployments with `corral deployments`" in status.stderr
    serving = run_cli("delete", POOL, "--yes", url=server.url)
    assert serving.returncode == 1 and "`--force`" in serving.stderr and "force=true" not in serving.stderr
    bad = run_cli("pods", "-o", "xml", url=server.url)
    assert bad.returncode == 1 and "table, wide, json, yaml, name" in bad.stderr


def test_cli_words_every_api_hint_as_a_command() -> None:
    def cli_message(refusal: CorralError) -> str:  # the API's body for the refusal, as the CLI words it
        return corral_cli.cli_error(error_body(refusal).wire())

    assert set(corral_cli.CLI_WORDING) == set(Hint)
    assert cli_message(NotFound("pod 'x' not found", Hint.LIST_PODS)) == \
        "pod 'x' not found; list pods with `corral pods`"
    assert cli_message(NotFound("service 'a' not found", Hint.LIST_SERVICES)) == \
        "service 'a' not found; list them with `corral service list`"
    assert cli_message(NotFound("task 't' not found", Hint.LIST_FINETUNE_TASKS)).endswith("`corral finetune list`")
    assert cli_message(Conflict("pool 'p' serves production; unassign its pods first", Hint.FORCE)) == \
        "pool 'p' serves production; unassign its pods first or delete with `--force`"
    assert "`corral service create" in cli_message(
        InvalidInput("business 'b' has no business service for model 'm'", Hint.CREATE_SERVICE, choices=["a"]))
    assert "--token" in cli_message(Unauthorized("this Corral requires an API token", Hint.SEND_TOKEN))
    assert cli_message(Conflict("Cannot scale down: need 2 unassigned pods, but only 1 available")) == \
        "Cannot scale down: need 2 unassigned pods, but only 1 available"


def test_the_server_is_found_from_corral_host_and_port(server: CorralServer) -> None:
    assert corral_cli.server_url(None, {}) == "http://127.0.0.1:8080"
    assert corral_cli.server_url(None, {"CORRAL_HOST": "0.0.0.0", "CORRAL_PORT": "9090"}) == "http://127.0.0.1:9090"
    assert corral_cli.server_url(None, {"CORRAL_HOST": "::1"}) == "http://[::1]:8080"
    assert corral_cli.server_url("http://h:1", {"CORRAL_PORT": "9"}) == "http://h:1"

    port = str(server.port)
    found = run_cli("pods", "-o", "name", CORRAL_HOST="0.0.0.0", CORRAL_PORT=port)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [p["name"] for p in server.pods()]
    assert run_cli("pods", "-o", "name", CORRAL_PORT=port).returncode == 0
    wrong = run_cli("pods", CORRAL_PORT="not-a-port")
    assert wrong.returncode == 1 and "CORRAL_PORT" in wrong.stderr
    assert f"export CORRAL_URL=http://127.0.0.1:{port}\n" in (server.data_dir / "serve.log").read_text()
