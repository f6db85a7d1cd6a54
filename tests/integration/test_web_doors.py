"""The web doors of a real `corral serve` (issue 11): `/ws` needs a known origin and the token, mutations refuse
cross-site requests, bodies are capped, unknown methods get JSON, the data dir is private, finetune datasets
are confined to the dataset roots, and the UI's upload needs the token and stays within its caps.
Each refusal is checked for its status, its message, and that nothing changed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, deploy_sim_pool

TOKEN = "s3cret-token"
ALLOWED = "https://corral.example.com"
EVIL = "http://evil.example"
TRAIN = '{"instruction": "say hi", "output": "hi"}\n'


def start(data_dir: Path, token: str | None = None, **env: str) -> CorralServer:
    defaults = {
        "CORRAL_GATEWAY_DATA_PLANE": "python", "CORRAL_ALLOWED_ORIGINS": ALLOWED,
        "CORRAL_CPU_TRAINING_SLOTS": "0",  # finetune tasks stay queued
        "CORRAL_DATASET_ROOTS": os.pathsep.join([str(data_dir / "uploads"), os.getcwd()]),  # the default, whatever the environment says
    }
    server = CorralServer(data_dir, token=token, env={**defaults, **env})
    server.data_dir.mkdir()
    server.start()
    return server


@pytest.fixture(scope="module")
def open_corral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """No token configured: the doors must hold on origins and content types alone."""
    server = start(tmp_path_factory.mktemp("open") / "data")
    try:
        yield server
    finally:
        server.stop()
        server.kill_replicas()


@pytest.fixture(scope="module")
def token_corral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    server = start(tmp_path_factory.mktemp("token") / "data", token=TOKEN)
    try:
        yield server
    finally:
        server.stop()
        server.kill_replicas()


def anonymous(server: CorralServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30)


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    return response.json()["error"]


def ws(server: CorralServer, query: str = "", headers: dict[str, str] | None = None, origin: str | None = None,
       subprotocols: list[str] | None = None) -> tuple[int, Any]:
    """(101, {hello, subprotocol}) for an open stream, or (status, error message) for a refused handshake."""
    try:
        with connect(server.url.replace("http://", "ws://") + "/ws" + query, additional_headers=headers, origin=origin,
                     subprotocols=subprotocols, open_timeout=10) as conn:  # type: ignore[arg-type]
            return 101, {"hello": json.loads(conn.recv(timeout=10)), "subprotocol": conn.subprotocol}
    except InvalidStatus as exc:
        return exc.response.status_code, json.loads(exc.response.body)["error"]


# /ws ------------------------------------------------------------------------------------------------------
def test_ws_needs_the_token_when_one_is_set(token_corral: CorralServer) -> None:
    need = "this Corral requires an API token for /ws"
    status, message = ws(token_corral)
    assert status == 401 and message.startswith(need)
    status, message = ws(token_corral, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and message.startswith(need)
    status, message = ws(token_corral, query="?token=wrong")
    assert status == 401
    for way in [{"headers": {"Authorization": f"Bearer {TOKEN}"}}, {"query": f"?token={TOKEN}"},
                {"subprotocols": ["corral", f"corral.token.{TOKEN}"]}]:
        status, opened = ws(token_corral, **way)  # type: ignore[arg-type]
        assert status == 101 and opened["hello"]["type"] == "hello", way
    assert ws(token_corral, subprotocols=["corral", f"corral.token.{TOKEN}"])[1]["subprotocol"] == "corral"
    # a browser page (it always sends Origin) of this Corral, with the token: fine; of another site: refused
    assert ws(token_corral, origin=token_corral.url, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 101
    status, message = ws(token_corral, origin=EVIL, subprotocols=["corral", f"corral.token.{TOKEN}"])
    assert status == 403 and "a page of http://evil.example may not open this Corral's event stream" in message


def test_ws_refuses_other_origins_without_a_token(open_corral: CorralServer) -> None:
    assert ws(open_corral)[0] == 101  # a non-browser client (no Origin): reads are open
    assert ws(open_corral, origin=open_corral.url)[0] == 101
    assert ws(open_corral, origin=ALLOWED)[0] == 101  # CORRAL_ALLOWED_ORIGINS
    for origin in (EVIL, "null", open_corral.url.replace("127.0.0.1", "localhost"), f"http://127.0.0.1:{open_corral.gateway_port}"):
        status, message = ws(open_corral, origin=origin)
        assert status == 403 and "may not open this Corral's event stream" in message, origin


# mutations (CSRF) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def queued_task(open_corral: CorralServer) -> str:
    """A finetune task that stays queued (no CPU training slot), with its dataset under the uploads root."""
    uploads = open_corral.data_dir / "uploads"
    uploads.mkdir(exist_ok=True)
    (uploads / "train.jsonl").write_text(TRAIN)
    return open_corral.ok("POST", "/api/finetune/tasks", json={  # type: ignore[index, return-value]
        "baseModel": "org/model", "datasetPath": str(uploads / "train.jsonl"), "gpus": 0})["id"]


def test_cross_site_requests_change_nothing(open_corral: CorralServer, queued_task: str) -> None:
    corral = open_corral
    pool = deploy_sim_pool(corral, tag="csrf", replicas=1)
    before, tasks_before = corral.snapshot(), corral.ok("GET", "/api/finetune/tasks")
    cancel = f"/api/finetune/tasks/{queued_task}/cancel"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    scale = json.dumps({"deploymentName": pool, "targetReplicas": 0})
    port = corral.port
    cases = [
        # the attack: an HTML form on another site, posted by a visitor's browser
        ("POST", cancel, {**form, "Origin": EVIL, "Sec-Fetch-Site": "cross-site"}, "x=1", 403,
         "cross-origin request refused: a page of http://evil.example may not change this Corral"),
        ("POST", cancel, {**form, "Sec-Fetch-Site": "cross-site"}, "x=1", 403, "cross-site request refused"),
        ("POST", cancel, form, "x=1", 415, "send the request body as JSON with 'Content-Type: application/json'"),
        ("POST", cancel, {"Origin": "null"}, "", 403, "cross-origin request refused"),
        ("POST", "/api/scale-deployment", {"Content-Type": "text/plain", "Origin": EVIL}, scale, 403, "cross-origin"),
        ("POST", "/api/scale-deployment", {"Content-Type": "text/plain"}, scale, 415, "(got 'text/plain')"),
        ("POST", "/api/scale-deployment", {"Content-Type": "multipart/form-data; boundary=x"}, scale, 415, "Content-Type"),
        ("POST", "/api/scale-deployment", {}, scale, 415, "(got none)"),
        ("POST", "/api/scale-deployment", {"Content-Type": "application/json", "Origin": EVIL}, scale, 403, "cross-origin"),
        ("POST", "/api/scale-deployment", {"Content-Type": "application/json", "Origin": f"http://localhost:{port}"}, scale,
         403, "cross-origin"),  # another origin of the same machine is another origin
        ("DELETE", f"/api/deployments/{pool}", {"Origin": EVIL}, "", 403, "cross-origin"),
        # DNS rebinding: evil.example re-pointed at 127.0.0.1 makes its page "same-origin" with itself
        ("POST", cancel, {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}, "", 403,
         "answers loopback names only, not Host 'evil.example"),
        ("GET", "/api/history", {"Host": f"evil.example:{port}"}, "", 403, "a guard against DNS rebinding"),
    ]
    with anonymous(corral) as http:
        for method, path, headers, body, status, fragment in cases:
            response = http.request(method, path, headers=headers, content=body)
            assert response.status_code == status and fragment in error_of(response), (method, path, headers, response.text)
        # this Corral's own pages and the allowed origins pass the doors (and reach the route: 404 for a ghost task)
        for origin in (corral.url, f"http://localhost:{port}", ALLOWED):
            host = {"Host": f"localhost:{port}"} if "localhost" in origin else {}
            response = http.post("/api/finetune/tasks/ft-ghost/cancel", headers={"Origin": origin, **host})
            assert response.status_code == 404 and "ft-ghost" in error_of(response), origin
    assert corral.snapshot() == before
    assert corral.ok("GET", "/api/finetune/tasks") == tasks_before
    assert corral.ok("GET", f"/api/finetune/tasks/{queued_task}")["status"] == "queued"  # type: ignore[index]


def test_cross_site_requests_are_refused_even_with_the_token(token_corral: CorralServer) -> None:
    before = token_corral.snapshot()
    response = token_corral.http.post("/api/deploy", headers={"Origin": EVIL}, json={
        "engine": "simulator", "modelId": "sim", "modelTag": "evil", "replicas": 1})
    assert response.status_code == 403 and "cross-origin request refused" in error_of(response)
    with anonymous(token_corral) as http:  # and without the token, a same-origin page is still refused (401)
        response = http.post("/api/deploy", headers={"Origin": token_corral.url}, json={
            "engine": "simulator", "modelId": "sim", "modelTag": "evil", "replicas": 1})
        assert response.status_code == 401 and "requires an API token" in error_of(response)
    assert token_corral.snapshot() == before


# bodies, methods, validation ------------------------------------------------------------------------------
def test_bodies_over_the_cap_are_refused_before_they_are_read(open_corral: CorralServer) -> None:
    before = open_corral.snapshot()
    huge = {"engine": "simulator", "modelId": "m" * (2 * 1024**2), "modelTag": "huge", "replicas": 1}
    response = open_corral.http.post("/api/deploy", json=huge)
    assert response.status_code == 413
    assert error_of(response).startswith("request body too large: ") and "the limit is 1048576 (CORRAL_MAX_BODY_BYTES)" in error_of(response)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        body = json.dumps(huge).encode()
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    response = open_corral.http.post("/api/deploy", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "more than" in error_of(response)
    under = open_corral.http.post("/api/deploy", json={**huge, "modelId": "m" * 900_000})
    assert under.status_code == 400, under.text[:300]  # under the cap: refused by validation, not by size
    assert open_corral.snapshot() == before


def test_unknown_methods_and_paths_under_api_are_json(open_corral: CorralServer) -> None:
    with anonymous(open_corral) as http:
        for method in ("OPTIONS", "PUT", "PATCH", "DELETE", "HEAD"):
            response = http.request(method, "/api/deployments")
            assert response.status_code == 405 and response.headers["allow"] == "GET", method
            if method != "HEAD":
                assert error_of(response) == f"/api/deployments accepts GET, not {method}"
        response = http.request("GET", "/api/finetune/tasks/x/cancel")
        assert response.status_code == 405 and error_of(response) == "/api/finetune/tasks/x/cancel accepts POST, not GET"
        for method in ("GET", "POST", "OPTIONS", "DELETE"):
            response = http.request(method, "/api/no-such-thing")
            assert response.status_code == 404 and "no API endpoint /api/no-such-thing" in error_of(response), method


def test_validation_errors_are_400_as_the_document_says(open_corral: CorralServer) -> None:
    document = open_corral.ok("GET", "/openapi.json")
    assert "422" not in json.dumps(document["paths"]) and "HTTPValidationError" not in json.dumps(document)
    operations = {(m.upper(), p): op for p, ops in document["paths"].items() for m, op in ops.items()}  # type: ignore[union-attr]
    for (method, path), operation in operations.items():
        if operation.get("requestBody") or any(p["schema"].get("type") not in (None, "string")
                                               for p in operation.get("parameters", []) if "schema" in p):
            assert "400" in operation["responses"], (method, path)
        if method != "GET" and path.startswith("/api/"):
            assert {"403", "415"} <= set(operation["responses"]), (method, path)
    with anonymous(open_corral) as http:
        cases = [
            http.post("/api/deploy", json={"engine": "simulator", "modelId": "x", "modelTag": "t", "replicas": "two"}),
            http.get("/api/history", params={"limit": "many"}),
            http.post("/api/deploy", content=b"{not json", headers={"Content-Type": "application/json"}),
            http.post("/api/deploy", content=b"\xff\xfe", headers={"Content-Type": "application/json"}),
        ]
    for response in cases:
        assert response.status_code == 400 and error_of(response).startswith("invalid request"), response.text


# files -----------------------------------------------------------------------------------------------------
def test_the_data_dir_is_private(open_corral: CorralServer, queued_task: str) -> None:
    deploy_sim_pool(open_corral, tag="private", replicas=1)  # logs, manifests, the database, an upload, a task
    data = open_corral.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700  # created 0755 by the test, narrowed at start
    loose = []
    for path in [data, *data.rglob("*")]:
        if path.name == "serve.log" or path.is_symlink() or path.relative_to(data).parts[:1] == ("uploads",):
            continue  # written by this test harness, not by Corral (uploads through the UI: test_upload_caps_…)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{oct(mode)} {path.relative_to(data)}")
    assert not loose, loose
    assert (data / "corral.db").exists() and (data / "logs").is_dir()


def test_dataset_paths_outside_the_roots_are_refused_unread(open_corral: CorralServer, tmp_path: Path) -> None:
    uploads = open_corral.data_dir / "uploads"
    uploads.mkdir(exist_ok=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret content\n")
    link = uploads / "innocent.jsonl"
    link.symlink_to(secret)
    tasks = open_corral.ok("GET", "/api/finetune/tasks")
    try:
        for path in ("/etc/shadow", str(secret), str(link), str(uploads / ".." / ".." / ".." / "secret.txt"), "../../../etc/passwd"):
            response = open_corral.http.post("/api/finetune/tasks", json={"baseModel": "org/model", "datasetPath": path, "gpus": 0})
            message = error_of(response)
            assert response.status_code == 400 and "is outside the dataset folders" in message, (path, message)
            assert "CORRAL_DATASET_ROOTS" in message and "JSON" not in message and "secret content" not in message
        inside = open_corral.http.post("/api/finetune/tasks", json={"baseModel": "org/model", "gpus": 0,
                                                                    "datasetPath": str(uploads / "missing.jsonl")})
        assert inside.status_code == 400 and "is not a file" in error_of(inside)  # inside a root: checked as before
    finally:
        link.unlink()
    assert open_corral.ok("GET", "/api/finetune/tasks") == tasks


# the web UI's upload ---------------------------------------------------------------------------------------
def upload_url(server: CorralServer, http: httpx.Client) -> str:
    page = http.get("/finetune")
    assert page.status_code == 200
    found = re.search(r"/_nicegui/client/[0-9a-f-]+/upload/\d+", page.text)
    assert found, "no upload element on /finetune"
    return found.group(0)


def test_upload_needs_the_token(token_corral: CorralServer) -> None:
    uploads = token_corral.data_dir / "uploads"
    with anonymous(token_corral) as http:
        response = http.post(upload_url(token_corral, http), files={"file": ("train.jsonl", TRAIN.encode())})
    assert response.status_code == 403 and "disabled" in response.text
    assert not uploads.exists() or not list(uploads.iterdir())


def test_upload_caps_size_count_and_origin(tmp_path: Path) -> None:
    server = start(tmp_path / "data", CORRAL_UPLOAD_MAX_BYTES="4096", CORRAL_UPLOAD_MAX_FILES="2")
    uploads = server.data_dir / "uploads"
    try:
        with anonymous(server) as http:
            url = upload_url(server, http)
            big = http.post(url, files={"file": ("big.jsonl", TRAIN.encode() * 200)})
            assert big.status_code == 413 and "the limit is 4096 (CORRAL_UPLOAD_MAX_BYTES)" in error_of(big)
            evil = http.post(url, files={"file": ("train.jsonl", TRAIN.encode())}, headers={"Origin": EVIL})
            assert evil.status_code == 403 and "cross-origin upload refused" in error_of(evil)
            assert not uploads.exists() or not list(uploads.iterdir())
            for _ in range(2):
                assert http.post(url, files={"file": ("train.jsonl", TRAIN.encode())}).status_code == 200
            # The UI's upload handler stores the file after answering: wait for both, whole.
            stored = wait_for(lambda: (files := list(uploads.iterdir())) and len(files) == 2
                              and all(f.read_text() == TRAIN for f in files) and files, timeout=10, what="both uploads stored")
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in stored)
            third = http.post(url, files={"file": ("train.jsonl", TRAIN.encode())})
            assert third.status_code == 409 and "CORRAL_UPLOAD_MAX_FILES=2" in error_of(third)
            assert len(list(uploads.iterdir())) == 2
    finally:
        server.stop()
        server.kill_replicas()


# the web UI's dataset field and upload widget (NiceGUI's simulated user, a real runtime) -------------------
async def test_ui_dataset_check_and_upload_follow_the_doors(tmp_path: Path) -> None:
    from nicegui import ui
    from nicegui.testing.user_simulation import user_simulation

    from corral.backends.local.process import free_port
    from corral.config import Settings
    from corral.runtime import Runtime
    from corral.ui import live
    from corral.ui.shell import root

    secret = tmp_path / "secret.jsonl"
    secret.write_text("not json: the secret content\n")
    runtime = Runtime(Settings(data_dir=tmp_path / "data", port=free_port(), gateway_port=free_port(),
                               gateway_data_plane="python", api_token=TOKEN, dataset_roots=[]))  # [] → the default roots
    await runtime.start()
    live.bind(runtime)
    try:
        async with user_simulation(root=root) as user:
            await user.open("/finetune")
            (upload,) = user.find(kind=ui.upload).elements
            assert not upload.enabled  # token set, not entered: NiceGUI refuses the upload route (403)
            field = next(e for e in user.find(kind=ui.input).elements if e.props.get("data-testid") == "ft-dataset")
            field.set_value(str(secret))
            await user.should_see("is outside the dataset folders")
            await user.should_not_see("not valid JSON")
            await user.should_not_see("secret content")
            field.set_value("/etc/shadow")
            await user.should_see("'/etc/shadow' is outside the dataset folders")
            ok = runtime.settings.uploads_dir
            ok.mkdir(parents=True)
            (ok / "train.jsonl").write_text(TRAIN)
            field.set_value(str(ok / "train.jsonl"))
            await user.should_see("✓ 1 examples")
            token_field = next(e for e in user.find(kind=ui.input).elements if e.props.get("label") == "token")
            token_field.set_value(TOKEN)
            user.find(kind=ui.button, content="Save").click()
            await user.should_see("token accepted")
            for _ in range(50):  # the binding follows the saved token
                if upload.enabled:
                    break
                await asyncio.sleep(0.05)
            assert upload.enabled
    finally:
        await runtime.close()


def test_default_dataset_roots_are_the_uploads_and_the_start_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.config import Settings
    from corral.paths import confine_dataset

    monkeypatch.delenv("CORRAL_DATASET_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.dataset_roots == [tmp_path / "data" / "uploads", tmp_path]
    assert confine_dataset("train.jsonl", settings.dataset_roots) == tmp_path / "train.jsonl"  # relative: to the start directory
    monkeypatch.setenv("CORRAL_DATASET_ROOTS", f"/srv/a{os.pathsep}/srv/b")
    assert Settings(data_dir=tmp_path / "data").dataset_roots == [Path("/srv/a"), Path("/srv/b")]
