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
