"""Real clients that nobody here wrote, against business services, as a user calls them: the official
`openai` SDK (chat, streaming with usage, completions, models, errors) and LangChain's `ChatOpenAI`
(`langchain-openai`), on both gateway data planes, on a simulator pool and on a `transformers serve`
pool of the tiny model. One `corral serve` per data plane carries both pools (module-scoped: a
transformers replica takes ~10 s and ~400 MB to start)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from corral.gateway.nginx_plane import missing_parts
from corral.gateway.proxy import held_too_long_suffix
from tests.integration.conftest import SIM_ARGS, CorralServer, running_corral

openai = pytest.importorskip("openai")
langchain_openai = pytest.importorskip("langchain_openai")
pytest.importorskip("transformers")

SIM_TAG, TINY_TAG = "qwen-06b", "tiny"
HOLD_TIMEOUT_S = 1.0
MESSAGES = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True)
class Pool:
    engine: str
    tag: str
    service: str  # its business service (one replica assigned)
    replicas: frozenset[str]


@dataclass(frozen=True)
class Setup:
    corral: CorralServer
    plane: str
    pools: dict[str, Pool]  # engine → pool
    idle_service: str  # a business service with no replica: the gateway's own 503


@pytest.fixture(scope="module", params=["python", "nginx"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    from tests.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")
    # A short hold deadline: the idle service's requests are held that long (issue 24), then answered 503.
    env = {"CORRAL_GATEWAY_DATA_PLANE": request.param, "CORRAL_GATEWAY_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S)}
    with running_corral(tmp_path_factory.mktemp(request.param) / "data", env) as corral:
        specs = {"simulator": {"modelId": "sim", "modelTag": SIM_TAG, "engineArgs": SIM_ARGS},
                 "transformers": {"modelId": str(model), "modelTag": TINY_TAG}}
        names = {engine: corral.ok("POST", "/api/deploy", json={"engine": engine, "replicas": 1, "deployAsPool": True, **spec}
                                   )["deployment"]["name"] for engine, spec in specs.items()}
        pools = {}
        for engine, name in names.items():
            pods = corral.wait_ready(name, 1, timeout=180)
            corral.ok("POST", "/api/deploy-service", json={"serviceName": f"{engine}-chat", "modelPool": name,
                                                            "businessTag": "production"})
            corral.ok("POST", "/api/distribute-pods", json={"deploymentName": name, "counts": {"production": 1}})
            pools[engine] = Pool(engine, specs[engine]["modelTag"], f"{engine}-chat-nlb", frozenset(p["name"] for p in pods))
        corral.ok("POST", "/api/deploy-service", json={"serviceName": "idle", "modelPool": names["simulator"],
                                                        "businessTag": "testing"})
        yield Setup(corral, request.param, pools, "idle-nlb")


def base_url(setup: Setup, service: str) -> str:
    return f"{setup.corral.gateway_url}/s/{service}/v1"


def sdk(setup: Setup, service: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(setup, service), api_key="none", max_retries=0, timeout=60)


ENGINES = ["simulator", pytest.param("transformers", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES)
def test_openai_sdk_chat_streaming_completions_and_models(setup: Setup, engine: str) -> None:
    pool = setup.pools[engine]
    client = sdk(setup, pool.service)

    raw = client.chat.completions.with_raw_response.create(model=pool.tag, messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    assert raw.headers["x-corral-replica"] in pool.replicas  # through the business service to its replica
    reply = raw.parse()
    assert reply.model == pool.tag and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in {"length", "stop"}
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 3

    stream = client.chat.completions.create(model=pool.tag, messages=MESSAGES, max_tokens=3, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices and {c.model for c in chunks} == {pool.tag}
    assert with_choices[-1].choices[0].finish_reason in {"length", "stop"}  # the last chunk says why it ended
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    if engine == "simulator":
        assert text == "tok0 tok1 tok2"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

    completion = client.completions.create(model=pool.tag, prompt="hello world", max_tokens=2)
    assert completion.model == pool.tag and completion.choices[0].text is not None
    if engine == "simulator":
        assert completion.choices[0].text == "tok0 tok1" and completion.usage.prompt_tokens == 3  # type: ignore[union-attr]

    assert [m.id for m in client.models.list()] == [pool.tag]


def test_openai_sdk_errors_carry_the_engines_and_the_gateways_reason(setup: Setup) -> None:
    client = sdk(setup, setup.pools["simulator"].service)
    # The engine's own 404 (vLLM's shape) passes through the gateway to the SDK's exception.
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert unknown.value.message.endswith("The model `gpt-4o` does not exist.")  # the SDK prefixes "Error code: 404 - "
    assert unknown.value.body == {"message": "The model `gpt-4o` does not exist.", "type": "NotFoundError", "param": "model",
                                  "code": 404}
    # The gateway's own errors, streaming and not, chat and completions.
    idle = sdk(setup, setup.idle_service)
    expected = (f"no replica assigned to business 'testing' of model '{SIM_TAG}'"
                + held_too_long_suffix(HOLD_TIMEOUT_S))
    for call in (lambda: idle.chat.completions.create(model=SIM_TAG, messages=MESSAGES, stream=True),  # type: ignore[arg-type]
                 lambda: idle.completions.create(model=SIM_TAG, prompt="hi")):
        with pytest.raises(openai.InternalServerError) as caught:
            call()
        assert caught.value.status_code == 503 and caught.value.message.endswith(expected)
        assert caught.value.body == {"message": expected, "type": "service_unavailable_error", "code": 503}


def langchain(setup: Setup, service: str, tag: str, **options: object) -> langchain_openai.ChatOpenAI:
    return langchain_openai.ChatOpenAI(base_url=base_url(setup, service), api_key="none", model=tag,  # type: ignore[arg-type]
                                       max_retries=0, timeout=60, **options)


@pytest.mark.parametrize("engine", ENGINES)
def test_langchain_chat_model_invokes_and_streams(setup: Setup, engine: str) -> None:
    pool = setup.pools[engine]
    chat = langchain(setup, pool.service, pool.tag, max_tokens=3)

    message = chat.invoke("hello")
    assert isinstance(message.content, str) and message.response_metadata["model_name"] == pool.tag
    assert message.response_metadata["finish_reason"] in {"length", "stop"}
    assert message.usage_metadata is not None and 1 <= message.usage_metadata["output_tokens"] <= 3

    chunks = list(langchain(setup, pool.service, pool.tag, max_tokens=3, stream_usage=engine == "simulator").stream("hello"))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.response_metadata.get("finish_reason") in {"length", "stop"}
    if engine == "simulator":
        assert whole.content == "tok0 tok1 tok2"
        assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == 3


def test_langchain_errors_carry_the_gateways_reason(setup: Setup) -> None:
    with pytest.raises(openai.APIStatusError) as caught:  # LangChain raises the SDK's exception as is
        langchain(setup, setup.idle_service, SIM_TAG).invoke("hello")
    assert caught.value.status_code == 503
    assert f"no replica assigned to business 'testing' of model '{SIM_TAG}'" in str(caught.value)

