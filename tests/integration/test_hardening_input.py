"""Issue 11, bad input and secrets, over a real `corral serve`: every bad deploy or finetune request is refused
with a 4xx that says what to fix and changes nothing (deployments, pods, services, history, secrets, manifests,
finetune tasks and their directories); secret engine arguments and `secretEnv` never leave Corral."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import SIM_ARGS, CorralServer, running_corral

# 400 today (`app.invalid_body`); 422 where the API answers schema violations as its OpenAPI document declares.
SCHEMA_REFUSAL = (400, 422)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """One server for the module (fast): datasets are read from its `inputs` folder only."""
    root = tmp_path_factory.mktemp("hardening")
    (root / "inputs").mkdir()
    with running_corral(root / "data", {"CORRAL_DATASET_ROOTS": str(root / "inputs")}) as corral:
        yield corral


def _secret_rows(server: CorralServer) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "corral.db") as db:
        return list(db.execute("SELECT deployment FROM deployment_secrets"))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _state(server: CorralServer) -> tuple:
    """Everything a refused request must leave as it was."""
    return (server.snapshot(), server.ok("GET", "/api/history", params={"limit": 1000}), _secret_rows(server),
            _files(server.data_dir / "deployments"), server.ok("GET", "/api/finetune/tasks"), _files(server.data_dir / "finetune"))


def _refused(server: CorralServer, path: str, cases: list[tuple[dict, tuple[int, ...] | int, str]]) -> None:
    before = _state(server)
    for body, status, fragment in cases:
        response = server.http.post(path, json=body) if not isinstance(body, str) else server.http.post(
            path, content=body, headers={"Content-Type": "application/json"})
        statuses = status if isinstance(status, tuple) else (status,)
        assert response.status_code in statuses, (str(body)[:300], response.status_code, response.text[:500])
        error = response.json()["error"]
        assert fragment in error, (str(body)[:300], error[:500])
        assert len(error) < 2000, "a refusal never echoes a huge value"
        assert _state(server) == before, str(body)[:300]


def test_bad_deploy_requests_are_refused_and_change_nothing(server: CorralServer) -> None:
    deploy = {"engine": "simulator", "modelId": "sim", "modelTag": "hardened", "replicas": 1, "deployAsPool": True}
    _refused(server, "/api/deploy", [
        # control characters: a NUL byte cannot even be passed to a process (was: 500 and a crash loop)
        ({**deploy, "engineArgs": ["--ttft-ms", "5\x00"]}, 400, "engineArgs[1] contains a NUL byte"),
        ({**deploy, "engineArgs": "--ttft-ms 5\x00"}, 400, "engineArgs[1] contains a NUL byte"),
        ({**deploy, "engineArgs": ["--ttft-ms", "5\x1b[2J"]}, 400, "contains the control character \\x1b"),
        ({**deploy, "engineArgs": ["--x", "a\nb"]}, 400, "contains a newline"),
        ({**deploy, "modelId": "sim\x00"}, 400, "modelId contains a NUL byte"),
        ({**deploy, "modelId": "--host=0.0.0.0"}, 400, "modelId may not start with '-'"),
        # the flags Corral sets, in both forms and abbreviated as argparse reads them
        ({**deploy, "engineArgs": ["--host", "0.0.0.0"]}, 400, "engineArgs may not set --host: Corral sets the address"),
        ({**deploy, "engineArgs": "--port=9999"}, 400, "engineArgs may not set --port: Corral sets the port"),
        ({**deploy, "engineArgs": ["--por", "9999"]}, 400, "engineArgs may not set --port ('--por' is read as --port)"),
        ({**deploy, "engineArgs": ["--model", "other"]}, 400, "engineArgs may not set --model"),
        ({**deploy, "engine": "vllm", "engineArgs": ["--served-model-name=x"]}, 400, "engineArgs may not set --served-model-name"),
        ({**deploy, "engine": "vllm", "engineArgs": ["--model", "x"]}, 400, "engineArgs may not set --model: Corral sets the model"),
        ({**deploy, "engine": "sglang", "engineArgs": ["--model-path", "x"]}, 400, "engineArgs may not set --model-path"),
        ({**deploy, "engine": "transformers", "engineArgs": ["--host=::"]}, 400, "engineArgs may not set --host"),
        # size limits
        ({**deploy, "modelId": "m" * 4097}, SCHEMA_REFUSAL, "modelId: String should have at most 4096 characters"),
        ({**deploy, "modelTag": "t" * 64}, SCHEMA_REFUSAL, "modelTag: String should have at most 63 characters"),
        ({**deploy, "engine": "e" * 33}, SCHEMA_REFUSAL, "engine: String should have at most 32 characters"),
        ({**deploy, "engineArgs": ["--x"] * 257}, SCHEMA_REFUSAL, "at most 256 items"),
        ({**deploy, "engineArgs": ["a" * 4097]}, SCHEMA_REFUSAL, "at most 4096 characters"),
        # secretEnv: names checked, reserved ones refused, values never quoted
        ({**deploy, "secretEnv": {"1BAD": "x"}}, SCHEMA_REFUSAL, "secretEnv.1BAD"),
        ({**deploy, "secretEnv": {"CUDA_VISIBLE_DEVICES": "7"}}, 400, "secretEnv may not set CUDA_VISIBLE_DEVICES"),
        ({**deploy, "secretEnv": {"LD_PRELOAD": "/tmp/x.so"}}, 400, "secretEnv may not set LD_PRELOAD"),
        ({**deploy, "secretEnv": {"CORRAL_REPLICA_NAME": "x"}}, 400, "secretEnv may not set CORRAL_REPLICA_NAME"),
        ({**deploy, "secretEnv": {f"K{i}": "v" for i in range(33)}}, SCHEMA_REFUSAL, "secretEnv: Dictionary should have at most 32 items"),
        ({**deploy, "secretEnv": {"TOKEN": "sk-\x00"}}, 400, "secretEnv TOKEN contains a NUL byte"),
        # refused by the backend after the secret was kept: it is forgotten again (checked by _state)
        ({**deploy, "gpusPerReplica": 2, "secretEnv": {"HF_TOKEN": "hf-x"}}, 409, "needs 2 GPU(s)"),
    ])
    _refused(server, "/api/deploy-service", [
        ({"serviceName": "s" * 64, "modelPool": "p", "businessTag": "b"}, SCHEMA_REFUSAL, "serviceName: String should have at most 63"),
        ({"serviceName": "s", "modelPool": "p" * 64, "businessTag": "b"}, SCHEMA_REFUSAL, "modelPool: String should have at most 63"),
    ])
    _refused(server, "/api/assign-pod", [({"podName": "p" * 81, "businessTag": "b"}, SCHEMA_REFUSAL, "podName: String should have at most 80")])
    _refused(server, "/api/distribute-pods", [
        ({"deploymentName": "d", "ratios": {"b" * 64: 1}}, SCHEMA_REFUSAL, "at most 63 characters"),
    ])


def test_secret_arguments_and_secret_env_are_never_shown(server: CorralServer) -> None:
    arg_secret, env_secret = "sk-arg-0123456789", "hf-env-0123456789"
    created = server.ok("POST", "/api/deploy", json={
        "engine": "simulator", "modelId": "sim", "modelTag": "secretive", "replicas": 1, "deployAsPool": True,
        "engineArgs": [*SIM_ARGS, "--api-key", arg_secret], "secretEnv": {"HF_TOKEN": env_secret}})
    name = created["deployment"]["name"]
    pod = server.wait_ready(name, 1)[0]
    try:
        # Shown as *** (arguments) or by name only (secretEnv) in every answer, event-fed list and file Corral writes.
        deployment = server.ok("GET", f"/api/deployments/{name}")
        assert deployment["engineArgs"] == [*SIM_ARGS, "--api-key", "***"]
        assert deployment["secretEnv"] == ["HF_TOKEN"]
        manifest = Path(created["manifestPath"]).read_text()
        assert "--api-key" in manifest and "'***'" in manifest and "secretKeyRef" in manifest and "HF_TOKEN" in manifest
        replica_log = server.http.get(f"/api/pods/{pod['name']}/logs", params={"tail": 1000}).text
        assert "starting:" in replica_log and "'--api-key', '***'" in replica_log
        shown = [json.dumps(created), json.dumps(deployment), manifest, replica_log,
                 server.http.get("/api/deployments").text, server.http.get("/api/pods").text,
                 server.http.get("/api/history", params={"limit": 1000}).text, (server.data_dir / "serve.log").read_text()]
        for text in shown:
            assert arg_secret not in text and env_secret not in text
        # ... and yet the replica has both: the key guards its API, the variable is in its environment.
        assert httpx.get(f"{pod['endpoint']}/v1/models").status_code == 401
        assert httpx.get(f"{pod['endpoint']}/v1/models", headers={"Authorization": f"Bearer {arg_secret}"}).status_code == 200
        environ = Path(f"/proc/{server.replica_pid(pod['name'])}/environ").read_bytes().split(b"\0")
        assert f"HF_TOKEN={env_secret}".encode() in environ
    finally:
        server.ok("DELETE", f"/api/deployments/{name}")
    wait_for(lambda: not _secret_rows(server), timeout=30, what="the deleted deployment's secrets to be forgotten")


def test_abbreviated_secret_flags_are_masked_too(server: CorralServer) -> None:
    """Issue 26 item 7: argparse reads any unambiguous prefix of a long option as the option, so `--api-ke V` sets the
    simulator's (and vLLM's) API key: its value is masked like `--api-key`'s, in both forms, wherever it is shown."""
    first, second = "sk-abbrev-first-0123", "sk-abbrev-second-0123"
    created = server.ok("POST", "/api/deploy", json={
        "engine": "simulator", "modelId": "sim", "modelTag": "abbreviated", "replicas": 1, "deployAsPool": True,
        "engineArgs": [*SIM_ARGS, f"--api-k={first}", "--api-ke", second]})
    name = created["deployment"]["name"]
    pod = server.wait_ready(name, 1)[0]
    try:
        deployment = server.ok("GET", f"/api/deployments/{name}")
        assert deployment["engineArgs"] == [*SIM_ARGS, "--api-k=***", "--api-ke", "***"]
        manifest = Path(created["manifestPath"]).read_text()
        replica_log = server.http.get(f"/api/pods/{pod['name']}/logs", params={"tail": 1000}).text
        assert "'--api-k=***', '--api-ke', '***'" in replica_log
        shown = [json.dumps(created), json.dumps(deployment), manifest, replica_log,
                 server.http.get("/api/deployments").text, server.http.get("/api/pods").text,
                 server.http.get("/api/history", params={"limit": 1000}).text, (server.data_dir / "serve.log").read_text()]
        for text in shown:
            assert first not in text and second not in text
        # The abbreviation really is the key (argparse: the last one wins).
        models = f"{pod['endpoint']}/v1/models"
        assert httpx.get(models, headers={"Authorization": f"Bearer {first}"}).status_code == 401
        assert httpx.get(models, headers={"Authorization": f"Bearer {second}"}).status_code == 200
    finally:
        server.ok("DELETE", f"/api/deployments/{name}")


def test_an_api_body_trickled_a_byte_at_a_time_is_answered_408_at_its_deadline(tmp_path: Path) -> None:
    """Issue 26 item 7: the client body timeout is a silence, which a byte every half second never reaches; the
    whole body has CORRAL_API_BODY_TIMEOUT_S from the request's start, then the request is answered 408 and
    nothing is changed."""
    with running_corral(tmp_path / "data", {"CORRAL_API_BODY_TIMEOUT_S": "2"}) as corral:
        before = _state(corral)
        body = json.dumps({"engine": "simulator", "modelId": "sim", "modelTag": "trickled", "replicas": 1,
                           "deployAsPool": True}).encode()
        head = (f"POST /api/deploy HTTP/1.1\r\nHost: 127.0.0.1:{corral.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", corral.port)) as sock:
            sock.sendall(head)
            started = time.monotonic()
            sock.settimeout(0.5)  # paces the trickle: a byte per half second, and reads whatever came back meanwhile
            answer, sent = b"", 0
            while b"\r\n\r\n" not in answer and time.monotonic() - started < 15:
                if sent < len(body) - 1:  # never the last byte
                    sock.sendall(body[sent:sent + 1])
                    sent += 1
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answer += chunk
            elapsed = time.monotonic() - started
            while (head_end := answer.find(b"\r\n\r\n")) >= 0 and len(answer) < head_end + 4 + int(
                    answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
                answer += sock.recv(65536)
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", answer
        assert 2 <= elapsed < 6, elapsed
        assert b"connection: close" in rest.lower()
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error.startswith("request body not received whole within 2 s of the request's start") and \
            "CORRAL_API_BODY_TIMEOUT_S" in error, error
        assert 2 <= sent < len(body) - 1
        assert _state(corral) == before
        # An ordinary request on a new connection is served as before.
        assert corral.http.get("/api/deployments").status_code == 200


def _inputs(server: CorralServer) -> Path:
    return server.data_dir.parent / "inputs"


def test_bad_finetune_submissions_are_refused_and_create_nothing(server: CorralServer) -> None:
    inputs = _inputs(server)
    good, binary, latin = inputs / "good.jsonl", inputs / "weights.bin", inputs / "latin1.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n')
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    latin.write_bytes('{"instruction": "caf\u00e9", "output": "b"}\n'.encode("latin-1"))
    model = inputs / "model"
    model.mkdir(exist_ok=True)
    base = {"baseModel": str(model), "datasetPath": str(good), "gpus": 0}
    nan = '{"baseModel": "%s", "datasetPath": "%s", "gpus": 0, %%s}' % (model, good)
    _refused(server, "/api/finetune/tasks", [
        ({**base, "datasetPath": str(binary)}, 400, "is a binary file, not JSONL text"),
        ({**base, "datasetPath": str(latin)}, 400, "dataset line 1: not UTF-8 text"),
        (nan % '"timeoutSeconds": NaN', 400, "timeoutSeconds must be a positive number of seconds, at most 31622400 (366 days), got NaN"),
        (nan % '"timeoutSeconds": Infinity', 400, "timeoutSeconds must be a positive number of seconds, at most 31622400 (366 days), got Infinity"),
        # A year at most: the queue turns a timeout into a time (a reservation, a promised start), which must be a date.
        ({**base, "timeoutSeconds": 1e300}, 400, "timeoutSeconds must be a positive number of seconds, at most 31622400 (366 days), got 1e+300"),
        (nan % '"hyperparameters": {"learningRate": NaN}', 400, "hyperparameter learningRate must be a positive number at most 1, got NaN"),
        (nan % '"hyperparameters": {"loraDropout": -Infinity}', 400, "hyperparameter loraDropout must be a number from 0 to less than 1"),
        (nan % '"gpus": {"count": 0, "memoryGb": NaN}', (400, 422), "memoryGb"),
        ({**base, "hyperparameters": {"batchSize": 2.5}}, 400, "hyperparameter batchSize must be an integer from 1 to 4096, got 2.5"),
        ({**base, "hyperparameters": {"batchSize": 0}}, 400, "batchSize must be an integer from 1 to 4096, got 0"),
        ({**base, "hyperparameters": {"batchSize": "2"}}, 400, "batchSize must be an integer from 1 to 4096, got '2'"),
        ({**base, "hyperparameters": {"batchSize": True}}, 400, "batchSize must be an integer from 1 to 4096, got True"),
        ({**base, "hyperparameters": {"maxSeqLen": 8}}, 400, "maxSeqLen must be an integer from 16 to 1048576, got 8"),
        ({**base, "hyperparameters": {"maxSeqLen": 2**21}}, 400, "maxSeqLen must be an integer from 16 to 1048576"),
        ({**base, "hyperparameters": {"loraRank": 1025}}, 400, "loraRank must be an integer from 1 to 1024"),
        ({**base, "hyperparameters": {"epochs": 0.5}}, 400, "epochs must be an integer from 1 to 1000, got 0.5"),
        ({**base, "hyperparameters": {"learningRate": 2}}, 400, "learningRate must be a positive number at most 1, got 2"),
        ({**base, "hyperparameters": {"seed": -1}}, 400, "seed must be an integer from 0 to"),
        ({**base, "hyperparameters": {f"k{i}": 1 for i in range(33)}}, SCHEMA_REFUSAL, "hyperparameters: Dictionary should have at most 32"),
        ({**base, "baseModel": "org/" + "m" * 4096}, SCHEMA_REFUSAL, "baseModel: String should have at most 4096 characters"),
        ({**base, "datasetPath": "/" + "d" * 4096}, SCHEMA_REFUSAL, "datasetPath: String should have at most 4096 characters"),
        ({**base, "baseModel": "org/model\x00"}, 400, "baseModel must not contain a NUL byte"),
        ({**base, "method": "x" * 17}, SCHEMA_REFUSAL, "method: String should have at most 16 characters"),
    ])


def test_integer_hyperparameters_stay_integers_to_the_trainer(server: CorralServer) -> None:
    inputs = _inputs(server)
    (inputs / "model").mkdir(exist_ok=True)
    (inputs / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    hp = {"batchSize": 2, "maxSeqLen": 64, "loraRank": 4, "epochs": 1, "gradientAccumulation": 2.0, "learningRate": 2e-4}
    response = server.http.post("/api/finetune/tasks", json={
        "baseModel": str(inputs / "model"), "datasetPath": str(inputs / "good.jsonl"), "gpus": 0, "hyperparameters": hp})
    assert response.status_code == 201, response.text
    task = response.json()
    try:
        assert '"batchSize":2,' in response.text.replace(" ", "")  # 2, never 2.0, on the wire
        stored = task["hyperparameters"]
        assert stored["batchSize"] == 2 and stored["gradientAccumulation"] == 2 and stored["learningRate"] == 2e-4
        assert all(type(stored[k]) is int for k in ("batchSize", "maxSeqLen", "loraRank", "epochs", "gradientAccumulation", "seed"))
        # What the trainer reads (written when it is started, at once on this idle CPU slot).
        task_json = server.data_dir / "finetune" / task["id"] / "task.json"
        wait_for(task_json.exists, timeout=10, what="the trainer's task.json")
        given = json.loads(task_json.read_text())["hyperparameters"]
        assert given == stored and type(given["batchSize"]) is int and type(given["loraAlpha"]) is int
    finally:
        server.ok("POST", f"/api/finetune/tasks/{task['id']}/cancel")


def test_cli_hyperparameters_go_through_the_same_checks(server: CorralServer) -> None:
    inputs = _inputs(server)
    (inputs / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    before = _state(server)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "corral.cli", "finetune", "submit", str(inputs / "model"),
                               str(inputs / "good.jsonl"), "--gpus", "0", "--url", server.url, *args],
                              capture_output=True, text=True, timeout=60)

    for hp, message in [("batchSize=2.5", "hyperparameter batchSize must be an integer from 1 to 4096, got 2.5"),
                        ("learningRate=nan", "learningRate must be a positive number at most 1, got NaN"),
                        ("maxSeqLen=inf", "maxSeqLen must be an integer from 16 to 1048576, got Infinity"),
                        ("epoch=1", "unknown hyperparameter(s) epoch")]:
        result = cli("--hp", hp)
        assert result.returncode == 1 and message in result.stderr, (hp, result.stderr)
    assert _state(server) == before


def test_finetune_without_the_trainer_packages_is_refused_at_submit(tmp_path: Path) -> None:
    """peft is hidden from a second `corral serve` (a sitecustomize sets sys.modules['peft'] = None, which
    importlib.util.find_spec reports as not installed)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['peft'] = None\n")
    (tmp_path / "inputs").mkdir()
    dataset = tmp_path / "inputs" / "good.jsonl"
    dataset.write_text('{"instruction": "a", "output": "b"}\n')
    with running_corral(tmp_path / "data", {"PYTHONPATH": str(hide), "CORRAL_DATASET_ROOTS": str(tmp_path / "inputs")}) as server:
        response = server.http.post("/api/finetune/tasks", json={"baseModel": "org/model", "datasetPath": str(dataset), "gpus": 0})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "peft is not installed" in error and "pip install 'corral[train]'" in error
        assert server.ok("GET", "/api/finetune/tasks") == [] and _files(server.data_dir / "finetune") == []


def test_cli_deploy_takes_secret_env_from_its_own_environment(server: CorralServer) -> None:
    secret = "sk-cli-0123456789"
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "deploy", "simulator", "sim", "--tag", "cli-secret", "--replicas", "0", "--pool",
         "--secret-env", "SIMULATOR_API_KEY", "--no-wait", "--url", server.url],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SIMULATOR_API_KEY": secret})
    assert result.returncode == 0, result.stderr
    try:
        deployment = server.ok("GET", "/api/deployments/simulator-cli-secret-pool")
        assert deployment["secretEnv"] == ["SIMULATOR_API_KEY"]
        assert secret not in result.stdout + result.stderr + server.http.get("/api/deployments").text
    finally:
        server.ok("DELETE", "/api/deployments/simulator-cli-secret-pool")
    wait_for(lambda: not _secret_rows(server), timeout=30, what="the deleted deployment's secrets to be forgotten")
