"""The routing table: every service gets exactly the ready replicas its selector matches, in pod order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.domain import labels as L
from corral.domain.autopilot import configured_batch_limit
from corral.domain.models import Deployment, Pod, Service
from corral.gateway.routing import Target, build_routes

values = st.sampled_from(["a", "b", "c"])
label_maps = st.dictionaries(st.sampled_from(["model", "business", "pool", "app"]), values, max_size=4)


@given(st.lists(st.tuples(label_maps, st.booleans(), st.booleans()), max_size=30), st.lists(label_maps, max_size=8))
def test_targets_are_the_ready_pods_the_selector_matches(pods_spec, selectors) -> None:
    pods = [Pod(name=f"p{i}", deployment="d", labels=labels, ready=ready, endpoint=f"http://127.0.0.1:{9000 + i}" if routable else None)
            for i, (labels, ready, routable) in enumerate(pods_spec)]
    services = [Service(name=f"s{i}", model="m", selector=selector) for i, selector in enumerate(selectors)]
    table = build_routes(services, pods)
    for service in services:
        expected = tuple(Target(p.name, p.endpoint) for p in pods  # type: ignore[arg-type]
                         if p.ready and p.endpoint and L.matches(service.selector, p.labels))
        assert table[service.name].targets == expected


def test_batch_limit_is_read_from_the_engine_args() -> None:
    assert configured_batch_limit("vllm", ["--max-num-seqs", "64"]) == 64
    assert configured_batch_limit("simulator", ["--ttft-ms", "5", "--max-num-seqs=4"]) == 4
    assert configured_batch_limit("sglang", ["--max-running-requests", "32"]) == 32
    assert configured_batch_limit("vllm", ["--max-num-seqs", "8", "--max-num-seqs", "16"]) == 16  # the last wins
    assert configured_batch_limit("sglang", ["--max-num-seqs", "8"]) is None  # not SGLang's flag
    assert configured_batch_limit("transformers", ["--max-num-seqs", "8"]) is None  # no batch limit flag
    assert configured_batch_limit("vllm", []) is None and configured_batch_limit("vllm", ["--max-num-seqs"]) is None
    assert configured_batch_limit("vllm", ["--max-num-seqs", "0"]) is None
    assert configured_batch_limit("vllm", ["--max-num-seqs=x"]) is None


def test_targets_carry_their_deployments_configured_batch_limit() -> None:
    pods = [Pod(name=f"{d}-{i}", deployment=d, labels={"model": "m", "business": "b"}, ready=True,
                endpoint=f"http://127.0.0.1:{9000 + i}") for i, d in enumerate(["limited", "open"])]
    deployments = [Deployment("limited", "vllm", "x", "m", True, 1, engine_args=("--max-num-seqs", "3")),
                   Deployment("open", "vllm", "x", "m", True, 1)]
    service = Service(name="s", model="m", selector={"model": "m", "business": "b"})
    assert {t.name: t.concurrency for t in build_routes([service], pods, deployments)["s"].targets} == {
        "limited-0": 3, "open-1": None}
    assert all(t.concurrency is None for t in build_routes([service], pods)["s"].targets)  # unknown: no limit
