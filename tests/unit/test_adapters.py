"""LoRA adapters on running vLLM pools: the pure decisions (corral.domain.adapters) and the desired-state
reconciler (corral.adapters) over the in-memory backend, with replicas that keep their adapters in a dict.
The same rules run against real vLLM CPU replicas in tests/integration/test_vllm_cpu.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from corral.adapters import AdapterManager, AdapterRefused, VllmAdapterClient, task_adapter
from corral.backends.memory import MemoryBackend
from corral.controller import Controller, DeploySpec
from corral.domain.adapters import (
    MAX_ADAPTERS_PER_POOL,
    Adapter,
    check_adapter_name,
    check_can_add,
    parse_loaded,
    plan_sync,
)
from corral.domain.errors import Conflict, InvalidInput, NotFound
from corral.domain.models import Deployment
from corral.engines import get_engine
from corral.events import EventBus
from corral.store.state import StateStore

LORA_ARGS = ("--enable-lora", "--max-lora-rank", "16")


def pool(engine: str = "vllm", args: tuple[str, ...] = LORA_ARGS, is_pool: bool = True) -> Deployment:
    return Deployment(name=f"{engine}-chat-pool", engine=engine, model_id="m", model_tag="chat", is_pool=is_pool, replicas=2,
                      engine_args=args)


# the pure decisions ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["support-v1", "A.b_c-9", "x" * 63])
def test_adapter_names_clients_can_send_are_accepted(name: str) -> None:
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(("name", "why"), [("", "required"), ("x" * 64, "at most 63"), ("a/b", "only letters"),
                                           ("-a", "starting with"), ("a b", "only letters"), ("a:b", "only letters"),
                                           (None, "required")])
def test_bad_adapter_names_are_refused_with_the_rule(name: object, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        check_adapter_name(name)


def test_only_a_lora_enabled_vllm_pool_takes_an_adapter_that_fits() -> None:
    check_can_add(pool(), "a", 16, [])
    with pytest.raises(Conflict, match="runs sglang; adapters can be added only to vLLM pools"):
        check_can_add(pool("sglang"), "a", 8, [])
    with pytest.raises(Conflict, match="not started with LoRA enabled.*--enable-lora --max-lora-rank 8"):
        check_can_add(pool(args=()), "a", 8, [])
    with pytest.raises(Conflict, match="standard deployment"):
        check_can_add(pool(is_pool=False), "a", 8, [])
    with pytest.raises(Conflict, match="rank 32 is above .*--max-lora-rank 16"):
        check_can_add(pool(), "a", 32, [])
    with pytest.raises(Conflict, match="rank 32 is above .*--max-lora-rank 16"):  # vLLM's default when not set
        check_can_add(pool(args=("--enable-lora",)), "a", 32, [])
    check_can_add(pool(args=("--enable-lora", "--max-lora-rank=64")), "a", 32, [])
    for taken in ("chat", "chat-base", "static"):
        with pytest.raises(Conflict, match=f"'{taken}' is already a model name"):
            check_can_add(pool(args=(*LORA_ARGS, "--lora-modules", "static=/x")), taken, 8, [])
    with pytest.raises(Conflict, match="already has an adapter named 'a'; remove it first"):
        check_can_add(pool(), "a", 8, [Adapter("p", "a", "/x")])
    with pytest.raises(Conflict, match=f"has {MAX_ADAPTERS_PER_POOL} adapters"):
        check_can_add(pool(), "new", 8, [Adapter("p", f"a{i}", "/x") for i in range(MAX_ADAPTERS_PER_POOL)])


def test_a_replica_is_brought_to_the_desired_adapters() -> None:
    desired = [Adapter("p", "a", "/a"), Adapter("p", "b", "/b")]
    assert not plan_sync(desired, {"a": "/a", "b": "/b"})
    plan = plan_sync(desired, {"a": "/a", "stale": "/s", "static": "/t"}, keep={"static"})
    assert plan.unload == ("stale",) and plan.load == (("b", "/b"),)
    moved = plan_sync(desired, {"a": "/old", "b": "/b"})  # same name, another directory: re-loaded
    assert moved.unload == ("a",) and moved.load == (("a", "/a"),)
    assert plan_sync([], {"x": "/x"}).unload == ("x",)


def test_loaded_adapters_are_read_from_vllms_model_list() -> None:
    models = {"object": "list", "data": [{"id": "chat", "root": "/m", "parent": None},
                                         {"id": "a", "root": "/a", "parent": "chat"}, "junk", {"parent": "chat"}]}
    assert parse_loaded(models) == {"a": "/a"}
    assert parse_loaded(["not", "a", "dict"]) == {} == parse_loaded({"data": "x"})


def test_only_a_completed_lora_task_has_an_adapter_to_add(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "rank_pattern": {"q": 8}}')
    task = {"id": "t1", "status": "completed", "output": str(tmp_path), "method": "lora"}
    assert task_adapter(SimpleNamespace(**task)) == (str(tmp_path), 8)  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="task t1 is training; only a completed task"):
        task_adapter(SimpleNamespace(**task | {"status": "training"}))  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="is a full finetune and has no LoRA adapter"):
        task_adapter(SimpleNamespace(**task | {"method": "full"}))  # type: ignore[arg-type]


def test_vllm_replicas_with_lora_get_runtime_loading_and_a_bounded_cpu_kv_cache() -> None:
    vllm = get_engine("vllm")
    spec = vllm.launch(model_id="/no/such/dir", model_tag="chat", port=1, host="h", gpus=0, extra=list(LORA_ARGS), replica="r")
    assert spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert spec.argv[spec.argv.index("--kv-cache-memory-bytes") + 1] == str(1024**3)
    plain = vllm.launch(model_id="org/m", model_tag="chat", port=1, host="h", gpus=1, extra=[], replica="r")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env and "--kv-cache-memory-bytes" not in plain.argv
    own = vllm.server_args(model_id="m", model_tag="chat", port=1, host="h", gpus=0, extra=["--kv-cache-memory-bytes", "5"])
    assert own.count("--kv-cache-memory-bytes") == 1


def test_a_configured_vllm_interpreter_runs_the_replicas_and_is_checked(tmp_path: Path) -> None:
    from corral.engines import set_interpreter

    vllm = get_engine("vllm")
    try:
        set_interpreter("vllm", str(tmp_path / "missing-python"))
        assert vllm.launch(model_id="m", model_tag="t", port=1, host="h", gpus=1, extra=[], replica="r").argv[0] == str(
            tmp_path / "missing-python")
        with pytest.raises(InvalidInput, match="CORRAL_VLLM_PYTHON=.*is not an executable file"):
            vllm.check_installed()
    finally:
        set_interpreter("vllm", None)


# the reconciler over the in-memory backend -------------------------------------------------------
class FakeReplicas:
    """vLLM replicas' adapter state by endpoint; paths containing 'bad' are refused, `down` endpoints unreachable."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, str]] = {}
        self.down: set[str] = set()
        self.calls: list[tuple[str, str, str]] = []

    def _check(self, endpoint: str) -> dict[str, str]:
        if endpoint in self.down:
            raise httpx.ConnectError("connection refused")
        return self.state.setdefault(endpoint, {})

    async def loaded(self, endpoint: str) -> dict[str, str]:
        return dict(self._check(endpoint))

    async def load(self, endpoint: str, name: str, path: str) -> None:
        state = self._check(endpoint)
        self.calls.append(("load", endpoint, name))
        if "bad" in path:
            raise AdapterRefused(f"404: Loading lora {name} failed: No adapter found for {path}")
        state[name] = path

    async def unload(self, endpoint: str, name: str) -> None:
        self.calls.append(("unload", endpoint, name))
        self._check(endpoint).pop(name, None)

    async def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path):  # noqa: ANN201
    store = StateStore(tmp_path / "corral.db")
    yield store
    store.close()


@pytest.fixture
async def plane(store: StateStore):  # noqa: ANN201
    backend = MemoryBackend()
    bus = EventBus()
    replicas = FakeReplicas()
    manager = AdapterManager(backend, store, bus, client=replicas)
    controller = Controller(backend, store, bus, adapters=manager.views)
    name = (await controller.deploy(DeploySpec(engine="vllm", model_id="m", model_tag="chat", replicas=2, deploy_as_pool=True,
                                               gpus_per_replica=0, engine_args=list(LORA_ARGS)))).deployment.name
    yield backend, controller, manager, replicas, name
    await manager.close()


def loaded_everywhere(backend: MemoryBackend, replicas: FakeReplicas, pool: str) -> list[set[str]]:
    return [set(replicas.state.get(p.endpoint, {})) for p in backend.list_pods(pool)]  # type: ignore[arg-type]


async def test_an_added_adapter_is_loaded_on_every_replica_and_on_those_that_come_later(plane, store: StateStore) -> None:
    backend, controller, manager, replicas, pool = plane
    result = await manager.add(pool, "support", path="/adapters/support", task_id="t1", rank=8)
    assert result.adapter.loadedOn == 2 == result.adapter.readyReplicas
    assert loaded_everywhere(backend, replicas, pool) == [{"support"}] * 2
    row = store.history(action="adapter-add")[0]
    assert row["outcome"] == "success" and row["target"] == pool and row["after"]["adapter"] == "support"
    view = controller.get_deployment(pool)
    assert [(a.name, a.taskId, a.loadedOn) for a in view.adapters] == [("support", "t1", 2)]

    await controller.scale(pool, 3, pool_endpoint=True)  # a scale-up: the new replica gets it from the loop
    await manager.reconcile()
    assert loaded_everywhere(backend, replicas, pool) == [{"support"}] * 3

    crashed = backend.list_pods(pool)[0]
    backend.set_ready(crashed.name, False)  # a crash: the restarted process has no adapters
    await manager.reconcile()
    replicas.state.pop(crashed.endpoint)  # type: ignore[arg-type]
    backend.set_ready(crashed.name, True)
    await manager.reconcile()
    assert loaded_everywhere(backend, replicas, pool) == [{"support"}] * 3
    assert controller.get_deployment(pool).adapters[0].loadedOn == 3


async def test_a_refused_adapter_is_rolled_back_everywhere(plane, store: StateStore) -> None:
    backend, controller, manager, replicas, pool = plane
    await manager.add(pool, "good", path="/adapters/good", task_id=None, rank=8)
    with pytest.raises(Conflict, match="could not load adapter 'broken' from /adapters/bad: 404: .*nothing was added"):
        await manager.add(pool, "broken", path="/adapters/bad", task_id="t2", rank=8)
    assert [a.name for a in store.list_adapters(pool)] == ["good"]
    assert loaded_everywhere(backend, replicas, pool) == [{"good"}] * 2
    assert store.history(action="adapter-add")[0]["outcome"] == "rolled_back"


async def test_an_unreachable_replica_gets_the_adapter_once_it_answers(plane) -> None:
    backend, controller, manager, replicas, pool = plane
    down = backend.list_pods(pool)[1].endpoint
    replicas.down.add(down)
    result = await manager.add(pool, "a", path="/adapters/a", task_id=None, rank=8)
    assert (result.adapter.loadedOn, result.adapter.readyReplicas) == (1, 2)
    assert "loaded on 1 of 2" in result.message and "reconciler retries" in result.message
    replicas.down.clear()
    await manager.reconcile()
    assert loaded_everywhere(backend, replicas, pool) == [{"a"}] * 2


async def test_removing_unloads_and_strays_are_unloaded_but_command_line_adapters_kept(plane, store: StateStore) -> None:
    backend, controller, manager, replicas, pool = plane
    manager.recheck_s = 0  # every pass asks every replica
    await manager.add(pool, "a", path="/adapters/a", task_id=None, rank=8)
    first = backend.list_pods(pool)[0].endpoint
    replicas.state[first]["by-hand"] = "/x"  # loaded behind Corral's back
    await manager.reconcile()
    assert loaded_everywhere(backend, replicas, pool) == [{"a"}] * 2
    result = await manager.remove(pool, "a")
    assert result.removed == "a" and loaded_everywhere(backend, replicas, pool) == [set()] * 2
    assert store.history(action="adapter-remove")[0]["outcome"] == "success"
    with pytest.raises(NotFound, match="has no adapter named 'a'"):
        await manager.remove(pool, "a")
    with pytest.raises(NotFound, match="pool 'nope' not found"):
        await manager.add("nope", "a", path="/a", task_id=None, rank=8)


async def test_a_deleted_pools_adapters_go_with_it(plane, store: StateStore) -> None:
    backend, controller, manager, replicas, pool = plane
    await manager.add(pool, "a", path="/adapters/a", task_id=None, rank=8)
    await controller.delete_deployment(pool, force=True)
    assert store.list_adapters() == []


async def test_vllms_refusal_text_reaches_the_message() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "chat", "parent": None}, {"id": "a", "root": "/a", "parent": "chat"}]})
        if request.url.path == "/v1/load_lora_adapter":
            return httpx.Response(404, json={"error": {"message": "Loading lora x failed: No adapter found for /x"}})
        return httpx.Response(404, json={"error": {"message": "The lora adapter 'x' cannot be found."}})

    client = VllmAdapterClient()
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    assert await client.loaded("http://r") == {"a": "/a"}
    with pytest.raises(AdapterRefused, match="404: Loading lora x failed: No adapter found for /x"):
        await client.load("http://r", "x", "/x")
    await client.unload("http://r", "x")  # not loaded: nothing to do
    await client.close()


# interrupted adds and removes (issue 26: judged by what the replicas have loaded) -----------------
def interrupted_add(store: StateStore, pool: str, name: str, path: str) -> None:
    """What `AdapterManager.add` writes before it loads anything: the adapter and its pending row (then Corral is
    killed)."""
    from corral.domain.history import Action, HistoryDraft, Intent

    store.add_adapter(Adapter(pool=pool, name=name, path=path, rank=8),
                      Intent([HistoryDraft(Action.ADAPTER_ADD, pool, after={"adapter": name, "taskId": None, "path": path},
                                           message=f"LoRA adapter '{name}' added")]))


def restart_judging(store: StateStore, backend: MemoryBackend) -> None:
    """The controller's judging at start, before the adapter reconciler starts (runtime.py's order)."""
    from corral.domain.history import Observed
    from corral.intents import Intents

    Intents(store).complete_interrupted(lambda: Observed(deployments={d.name: d for d in backend.list_deployments()},
                                                         pods=backend.list_pods(), services={}))


async def test_an_interrupted_add_that_replicas_refuse_is_rolled_back_after_a_restart(plane, store: StateStore) -> None:
    backend, controller, manager, replicas, pool = plane
    await manager.add(pool, "good", path="/adapters/good", task_id=None, rank=8)
    interrupted_add(store, pool, "broken", "/adapters/bad")
    interrupted_add(store, pool, "fine", "/adapters/fine")
    restart_judging(store, backend)
    assert [r["outcome"] for r in store.history(action="adapter-add")[:2]] == ["pending", "pending"]  # left to the reconciler
    again = AdapterManager(backend, store, EventBus(), client=replicas)
    await again.start()
    try:
        rows = {r["after"]["adapter"]: r for r in store.history(action="adapter-add")}
        assert rows["broken"]["outcome"] == "rolled_back" and "refused to load it" in rows["broken"]["message"]
        assert "No adapter found for /adapters/bad" in rows["broken"]["message"]
        assert rows["fine"]["outcome"] == "success" and "loaded on 2 of 2" in rows["fine"]["message"]
        assert [a.name for a in store.list_adapters(pool)] == ["fine", "good"]  # no longer desired: never retried
        assert loaded_everywhere(backend, replicas, pool) == [{"fine", "good"}] * 2
        assert not store.pending_history()
    finally:
        await again.close()


async def test_an_interrupted_add_waits_for_a_replica_to_answer_and_a_remove_is_judged_done(plane, store: StateStore) -> None:
    backend, controller, manager, replicas, pool = plane
    await manager.add(pool, "old", path="/adapters/old", task_id=None, rank=8)
    interrupted_add(store, pool, "late", "/adapters/bad-late")
    from corral.domain.history import Action, HistoryDraft, Intent

    store.remove_adapter(pool, "old", Intent([HistoryDraft(Action.ADAPTER_REMOVE, pool, before={"adapter": "old"},
                                                           message="LoRA adapter 'old' removed")]))
    replicas.down = {p.endpoint for p in backend.list_pods(pool)}  # type: ignore[misc]
    restart_judging(store, backend)
    again = AdapterManager(backend, store, EventBus(), client=replicas)
    await again.start()
    try:
        assert store.history(action="adapter-remove")[0]["outcome"] == "success"
        assert store.history(action="adapter-add")[0]["outcome"] == "pending"  # nobody answered: not judged yet
        replicas.down.clear()
        await again.reconcile()
        row = store.history(action="adapter-add")[0]
        assert row["outcome"] == "rolled_back" and [a.name for a in store.list_adapters(pool)] == []
        assert loaded_everywhere(backend, replicas, pool) == [set()] * 2  # 'old' unloaded too
    finally:
        await again.close()


# what an adapter directory says about its training -----------------------------------------------
def adapter_dir(root: Path, base: str, dora: bool = False, template: str | None = None, eos: str = "<|im_end|>") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": base, "use_dora": dora}))
    if template is not None:
        (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
        (root / "chat_template.jinja").write_text(template)
    return root


async def test_an_adapter_for_another_base_model_dora_or_another_template_is_refused(tmp_path: Path, store: StateStore) -> None:
    backend = MemoryBackend()
    replicas = FakeReplicas()
    manager = AdapterManager(backend, store, EventBus(), client=replicas)
    controller = Controller(backend, store, EventBus(), adapters=manager.views)
    base = adapter_dir(tmp_path / "base", "x", template="{{ chatml }}")  # the pool's model: its tokenizer files
    name = (await controller.deploy(DeploySpec(engine="vllm", model_id=str(base), model_tag="chat", replicas=1, deploy_as_pool=True,
                                               gpus_per_replica=0, engine_args=list(LORA_ARGS)))).deployment.name
    try:
        other = adapter_dir(tmp_path / "other", "Qwen/Qwen2.5-7B-Instruct")
        with pytest.raises(Conflict, match=r"trained on base model 'Qwen/Qwen2.5-7B-Instruct', but pool .* serves '.*base'"):
            await manager.add(name, "a", path=str(other), task_id=None, rank=8)
        via_link = tmp_path / "link"
        via_link.symlink_to(base)
        dora = adapter_dir(tmp_path / "dora", str(via_link) + "/", dora=True)  # the same base, written otherwise
        with pytest.raises(Conflict, match="DoRA adapter .* vLLM cannot load"):
            await manager.add(name, "a", path=str(dora), task_id=None, rank=8)
        llama = adapter_dir(tmp_path / "llama3", str(base), template="{{ llama3 }}", eos="<|eot_id|>")
        with pytest.raises(Conflict, match="another chat template than pool .* deploy the task as its own pool"):
            await manager.add(name, "a", path=str(llama), task_id=None, rank=8)
        assert store.list_adapters() == [] and replicas.calls == []  # refused before anything was recorded or loaded
        assert all(r["outcome"] != "pending" for r in store.history(action="adapter-add"))
        same = adapter_dir(tmp_path / "same", str(base), template="{{ chatml }}")
        assert (await manager.add(name, "a", path=str(same), task_id=None, rank=8)).adapter.loadedOn == 1
    finally:
        await manager.close()
