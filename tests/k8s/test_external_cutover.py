"""Cut-over to an external business service (a LoadBalancer: an AWS NLB with IP targets) is judged by the load
balancer's target health where it can be read — the AWS Load Balancer Controller's readiness gate condition on
the pod — and recorded `unconfirmed` ("endpoints updated; external targets may take minutes") where it cannot:
never as done on the EndpointSlices alone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from corral.backends.kubernetes import convert
from corral.domain import labels as L
from corral.domain.manifests import ClusterOptions, deployment_manifest
from corral.domain.models import Service
from tests.conftest import wait_for_async
from tests.k8s.cluster import DEPLOYMENTS, NAMESPACE, PODS, _set_condition
from tests.k8s.test_reflector import POOL, open_backend

BINDINGS = "elbv2.k8s.aws/v1beta1/targetgroupbindings"
BINDING = "k8s-corral-producti-0123456789"  # the controller's name for the Service's target group binding
GATE = convert.TARGET_HEALTH + BINDING
EXTERNAL = Service("production-chat-nlb", "qwen-7b", L.business_selector("qwen-7b", "production"),
                   {L.BUSINESS: "production", L.MODEL: "qwen-7b", L.SERVICE_TYPE: L.BUSINESS_SERVICE}, is_external=True,
                   deployment=POOL.name)


def pod(gates: list[str], conditions: dict[str, str]) -> dict[str, Any]:
    return {"spec": {"readinessGates": [{"conditionType": g} for g in gates]},
            "status": {"conditions": [{"type": t, "status": v} for t, v in conditions.items()]}}


def test_target_health_is_read_from_the_load_balancer_controllers_gates() -> None:
    gated = pod([GATE, "example.com/other"], {"Ready": "True", GATE: "False"})
    assert convert.target_health_gates(gated) == [BINDING] and not convert.target_healthy(gated, BINDING)
    assert convert.target_healthy(pod([GATE], {GATE: "True"}), BINDING)
    assert convert.target_health_gates(pod([], {"Ready": "True"})) == [] and not convert.target_healthy(pod([], {}), BINDING)


def cutovers(reports: list[tuple[str | None, dict]]) -> list[tuple[str | None, Any]]:
    return [(event, outcome) for event, outcome in reports if event in ("assignment_complete", "cutover")]


async def test_external_cutover_waits_for_the_target_health_or_says_it_cannot_tell(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    manifest = deployment_manifest(POOL, ["--model", POOL.model_id], ClusterOptions(namespace=NAMESPACE))
    # One pod carries the gate, as the controller's webhook injects it into a pod created while the Service selects it.
    gated = copy.deepcopy(manifest)
    gated["spec"]["template"]["spec"]["readinessGates"] = [{"conditionType": GATE}]
    api.create(DEPLOYMENTS, gated)
    rows: list[tuple[str, str, str]] = []  # (pod, outcome, message) of cut-over rows

    async with open_backend(config, tmp_path) as (backend, reports):
        backend.report = lambda event, data=None, *, history=None, outcome="success": (  # type: ignore[method-assign]
            reports.append((event, data or {})), history and rows.append((history.target, str(outcome), history.message)))
        await wait_for_async(lambda: len(p := backend.list_pods(POOL.name)) == 3 and all(x.ready for x in p), what="a ready pool")
        first, second, _ = (p.name for p in backend.list_pods(POOL.name))
        await backend.create_service(EXTERNAL)

        # No TargetGroupBinding for the Service (no controller, or not yet): endpoints only, unconfirmed.
        await backend.set_businesses({first: "production"})
        await wait_for_async(lambda: any(r[0] == first for r in rows), what="the first cut-over judged")
        (_, outcome, message), = [r for r in rows if r[0] == first]
        assert outcome == "unconfirmed" and "endpoints updated after" in message and "external targets may take minutes" in message
        assert "no TargetGroupBinding binds production-chat-nlb" in message
        assert not any(e == "assignment_complete" and d["podName"] == first for e, d in reports)  # never reported done

        # The binding exists and the pod has its gate: done only when the controller reports the target healthy.
        api.create(BINDINGS, {"metadata": {"name": BINDING}, "spec": {"serviceRef": {"name": EXTERNAL.name, "port": 8000},
                                                                       "targetType": "ip"}})
        backend._bindings = None  # read afresh (they are cached for BINDINGS_TTL_S)
        await backend.set_businesses({second: "production"})
        await wait_for_async(lambda: second in backend.objects["pods"] and f"cutover-{second}" in {t.get_name() for t in backend._tasks},
                             what="the endpoints followed; waiting for the target health")
        assert not any(r[0] == second for r in rows)
        target = api.get(PODS, second)
        api.patch(PODS, second, {"status": {"conditions": _set_condition(target["status"].get("conditions"), GATE, "True")}},
                  subresource="status")  # the controller: the IP target passed the NLB's health checks
        await wait_for_async(lambda: any(r[0] == second for r in rows), what="the second cut-over judged")
        (_, outcome, message), = [r for r in rows if r[0] == second]
        assert outcome == "success" and f"load balancer target healthy: {BINDING}" in message
        assert any(e == "assignment_complete" and d["podName"] == second for e, d in reports)
        assert "corral_cutover_unconfirmed_total 1" in "\n".join(backend.metrics())
