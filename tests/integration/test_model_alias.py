"""Every engine answers to the pool's tag through a business service, as an OpenAI SDK calls it:
`transformers serve` pins its model path, so the gateway maps the tag both ways (routing.py); and the
gateway's own errors carry their reason to the SDK. On both data planes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import CorralServer, running_corral
from tests.tiny_model import build_tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

TAG = "tiny"
pytestmark = pytest.mark.usefixtures("data_plane")


@pytest.fixture
def corral(tmp_path: Path, data_plane: str) -> Iterator[CorralServer]:
    """`corral serve` on the data plane under test; a business with no replica holds a request 1 s
    (issue 24)."""
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": data_plane,
                                            "CORRAL_GATEWAY_HOLD_TIMEOUT_S": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def client(corral: CorralServer, service: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{corral.gateway_url}/s/{service}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.slow
def test_a_transformers_pool_answers_to_its_tag_through_the_sdk(corral: CorralServer, tiny_model: Path) -> None:
    pool = corral.ok("POST", "/api/deploy", json={"engine": "transformers", "modelId": str(tiny_model), "modelTag": TAG,
                                                  "replicas": 1, "deployAsPool": True})["deployment"]["name"]
    corral.wait_ready(pool, 1, timeout=180)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "chat", "modelPool": pool, "businessTag": "production"})
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"production": 1}})
    sdk = client(corral, "chat-nlb")
    messages = [{"role": "user", "content": "hello"}]

    reply = sdk.chat.completions.create(model=TAG, messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert reply.model == TAG and reply.choices[0].message.role == "assistant"

    chunks = list(sdk.chat.completions.create(model=TAG, messages=messages, max_tokens=3, stream=True))  # type: ignore[arg-type]
    assert chunks and {c.model for c in chunks} == {TAG}

    assert [m.id for m in sdk.models.list()] == [TAG]


def test_gateway_errors_reach_the_sdk_with_their_reason(corral: CorralServer) -> None:
    pool = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 1,
                                                  "deployAsPool": True})["deployment"]["name"]
    corral.wait_ready(pool, 1)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "empty", "modelPool": pool, "businessTag": "testing"})
    with pytest.raises(openai.APIStatusError) as caught:
        client(corral, "empty-nlb").chat.completions.create(model="qwen-06b", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert "no replica assigned to business 'testing' of model 'qwen-06b'" in caught.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client(corral, "nope-nlb").models.list()
    assert "service 'nope-nlb' not found" in missing.value.message


def test_only_replicas_of_an_engine_that_cannot_serve_the_tag_are_rewritten() -> None:
    from corral.domain import labels as L
    from corral.domain.models import Pod, Service
    from corral.gateway.proxy import request_model_rewrite, response_model_rewrite
    from corral.gateway.routing import build_routes

    def pod(name: str, engine: str) -> Pod:
        labels = {**L.pool_labels(model_tag=TAG, pool=f"{engine}-{TAG}-pool", engine=engine), L.BUSINESS: "production"}
        return Pod(name=name, deployment=f"{engine}-{TAG}-pool", labels=labels, ready=True, endpoint=f"http://127.0.0.1:{len(name)}")

    service = Service(name="chat-nlb", model=TAG, selector=L.business_selector(TAG, "production"),
                      labels={L.SERVICE_TYPE: L.BUSINESS_SERVICE})
    route = build_routes([service], [pod("t-1", "transformers"), pod("sim-1", "simulator")])["chat-nlb"]
    assert {t.name: t.rewrite_model for t in route.targets} == {"t-1": True, "sim-1": False}
    assert not route.answers_models()  # the simulator lists the tag itself
    assert request_model_rewrite(b'{"model": "tiny", "n": 1}', TAG) == b'{"model":null, "n": 1}'
    assert request_model_rewrite(b'{"model": "tiny-2"}', TAG) is None  # another model: left to the engine
    event = b'data: {"model":"/tmp/tiny","content":"\\"model\\":\\"x\\""}\n\n'
    assert response_model_rewrite(event, TAG) == b'data: {"model":"tiny","content":"\\"model\\":\\"x\\""}\n\n'
