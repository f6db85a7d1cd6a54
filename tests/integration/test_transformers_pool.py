"""A pool of two real `transformers serve` replicas on a tiny model built here (no model hub)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import CorralServer
from tests.tiny_model import build_tiny_model

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.mark.slow
def test_pool_of_two_transformers_replicas_answers_chat(corral: CorralServer, tiny_model: Path) -> None:
    result = corral.ok("POST", "/api/deploy", json={"engine": "transformers", "modelId": str(tiny_model), "modelTag": "tiny-qwen",
                                                    "replicas": 2, "deployAsPool": True})
    pool = result["deployment"]["name"]
    assert pool == "transformers-tiny-qwen-pool" and result["deployment"]["isSimulator"] is False
    pods = corral.wait_ready(pool, 2, timeout=180)
    assert len({p["endpoint"] for p in pods}) == 2
    for pod in pods:
        reply = httpx.post(
            f"{pod['endpoint']}/v1/chat/completions",
            json={"model": str(tiny_model), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
        assert body["choices"][0]["message"]["role"] == "assistant"

    # Through a business service, with the openai SDK (issue 30): transformers serve answers FastAPI's {"detail": …},
    # which the SDK showed as a bare "Error code: 400"; the gateway gives it OpenAI's shape, reason kept, and an
    # engine's message never shows the model's path on this machine (the tag instead).
    import openai

    corral.ok("POST", "/api/deploy-service", json={"serviceName": "tiny", "modelPool": pool, "businessTag": "production"})
    corral.ok("POST", "/api/assign-pod", json={"podName": pods[0]["name"], "businessTag": "production"})
    client = openai.OpenAI(base_url=f"{corral.gateway_url}/s/tiny-nlb/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="tiny-qwen", messages=[], max_tokens=4)
    assert 400 <= refused.value.status_code < 500
    reason = str(refused.value)
    assert "error code" in reason.lower() and len(refused.value.message) > len(f"Error code: {refused.value.status_code}")
    assert refused.value.body is not None and refused.value.body.get("message"), refused.value.body  # type: ignore[union-attr]
    assert str(tiny_model) not in reason
    with pytest.raises(openai.APIStatusError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert str(tiny_model) not in str(unknown.value) and "tiny-qwen" in str(unknown.value), str(unknown.value)
