"""The routing table: every service gets exactly the ready replicas its selector matches, in pod order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.domain import labels as L
from corral.domain.models import Pod, Service
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
