"""The backend contract: the same scenarios, through the Controller, on every backend (see conftest).

A pool of 4 and two business services; assignment; a 3:1 distribution (a repeat moves nothing);
a scale-down refused with spec 01's exact message (and recorded as refused); a safe scale-down that
removes exactly the unassigned pods. After every call no history row is left pending, and the
events have the same shape whichever backend runs.
"""

from __future__ import annotations

import re

import pytest

from corral.domain import labels as L
from corral.domain.errors import Conflict, CorralError
from tests.conftest import wait_for_async
from tests.contract.conftest import BUSINESSES, MODEL, Plane, close_controller

TARGETS_3_1 = {"production": 3, "testing": 1, L.UNASSIGNED: 0}


async def test_pool_of_four_and_two_business_services(plane: Plane) -> None:
    pods = await plane.deploy_pool()
    assert len(pods) == 4
    # local and memory: <pool>-<5>; a cluster: <pool>-<pod-template-hash>-<5> (ReplicaSet naming)
    assert all(re.fullmatch(rf"{re.escape(plane.pool)}(-[a-z0-9]{{6,10}})?-[a-z0-9]{{5,6}}", name) for name in pods), pods
    for pod in plane.backend.list_pods(plane.pool):
        assert pod.is_pool_pod and pod.business == L.UNASSIGNED and pod.model == MODEL
        assert pod.labels[L.POOL] == plane.pool and pod.labels[L.POOL_TYPE] == plane.engine
    deployment = plane.backend.get_deployment(plane.pool)
    assert deployment is not None and deployment.is_pool and deployment.replicas == 4
    assert deployment.selector == {L.MODEL: MODEL, L.POOL: plane.pool}  # never business

    services = {s.businessTag: s for s in plane.controller.list_business_services()}
    assert sorted(services) == sorted(BUSINESSES)
    assert services["production"].selector == {L.MODEL: MODEL, L.BUSINESS: "production"}
    assert services["production"].isExternal and not services["testing"].isExternal
    assert services["production"].replicas == 0
    status = plane.controller.pool_status(plane.pool)
    assert status.totalPods == 4
    assert status.podDistribution == {L.UNASSIGNED: 4, "production": 0, "testing": 0}
    assert status.availableForScaleDown == 4

    outcomes = [(r["action"], r["target"], r["outcome"]) for r in reversed(plane.history())]
    assert outcomes == [("deploy", plane.pool, "success"), ("deploy-service", "production-chat-nlb", "success"),
                        ("deploy-service", "testing-chat-nlb", "success")]
    plane.assert_event_shapes()


async def test_assign_relabels_one_pod(plane: Plane) -> None:
    pods = await plane.deploy_pool()
    result = await plane.controller.assign_pod(pods[0], "production", MODEL)
    assert result.wire() == {"success": True, "podName": pods[0], "modelName": MODEL, "previousBusiness": L.UNASSIGNED,
                             "businessTag": "production", "changed": True, "pinned": False}
    plane.assert_settled()
    pod = plane.backend.get_pod(pods[0])
    assert pod is not None and pod.business == "production"
    assert plane.distribution() == {"production": 1, L.UNASSIGNED: 3}
    [row] = plane.history("assign")
    # (the pool, and the replica's GPUs where it has any, ride along for metering's GPU-seconds: domain/usage.py)
    assert (row["target"], row["before"]["business"], row["after"]["business"], row["outcome"]) == (
        pods[0], L.UNASSIGNED, "production", "success")
    assert row["before"]["pool"] == row["after"]["pool"] == plane.pool

    again = await plane.controller.assign_pod(pods[0], "production", None)
    assert again.changed is False
    assert len(plane.history("assign")) == 1  # nothing changed, nothing recorded
    with pytest.raises(CorralError):  # no service for that business: refused, nothing changed
        await plane.controller.assign_pod(pods[1], "nobody", None)
    assert plane.distribution() == {"production": 1, L.UNASSIGNED: 3}
    plane.assert_settled()

    [event] = [data for kind, data in plane.events if kind == "pod_assignment"]
    assert event == {"podName": pods[0], "deployment": plane.pool, "modelName": MODEL, "from": L.UNASSIGNED, "to": "production"}
    plane.assert_event_shapes()


async def test_distribute_three_to_one_then_nothing_to_move(plane: Plane) -> None:
    await plane.deploy_pool()
    first = await plane.controller.distribute(plane.pool, {"production": 3, "testing": 1}, None)
    assert first.targets == TARGETS_3_1
    assert len(first.moves) == 4 and {m.from_ for m in first.moves} == {L.UNASSIGNED}
    assert plane.distribution() == {"production": 3, "testing": 1}
    plane.assert_settled()
    [row] = plane.history("distribute")
    assert row["outcome"] == "success" and row["message"] == "4 move(s)"
    assert [r["outcome"] for r in plane.history("assign")] == ["success"] * 4

    second = await plane.controller.distribute(plane.pool, {"production": 3, "testing": 1}, None)
    assert second.moves == []
    assert plane.distribution() == {"production": 3, "testing": 1}
    plane.assert_settled()
    latest = plane.history("distribute")[0]
    assert latest["outcome"] == "success" and latest["message"] == "0 move(s)"
    assert len(plane.history("assign")) == 4

    distributions = [data for kind, data in plane.events if kind == "distribution"]
    assert [len(d["moves"]) for d in distributions] == [4, 0]
    assert len([kind for kind, _ in plane.events if kind == "pod_assignment"]) == 4
    plane.assert_event_shapes()


async def test_scale_down_refused_when_too_few_unassigned(plane: Plane) -> None:
    await plane.deploy_pool()
    await plane.controller.distribute(plane.pool, None, {"production": 2, "testing": 1})
    before = sorted(plane.pods())
    with pytest.raises(Conflict) as refusal:
        await plane.controller.scale(plane.pool, 1, pool_endpoint=True)
    assert refusal.value.message == "Cannot scale down: need 3 unassigned pods, but only 1 available"
    assert refusal.value.details["unassignedPods"] == 1
    assert sorted(plane.pods()) == before  # nothing removed
    assert plane.distribution() == {"production": 2, "testing": 1, L.UNASSIGNED: 1}
    [row] = plane.history("scale")
    assert (row["target"], row["outcome"], row["message"]) == (
        plane.pool, "refused", "Cannot scale down: need 3 unassigned pods, but only 1 available")
    assert (row["before"], row["after"]) == ({"replicas": 4}, {"replicas": 1})
    plane.assert_settled()
    assert not [kind for kind, _ in plane.events if kind == "scale"]
    plane.assert_event_shapes()


async def test_safe_scale_down_removes_exactly_the_unassigned_pods(plane: Plane) -> None:
    await plane.deploy_pool()
    await plane.controller.distribute(plane.pool, None, {"production": 1, "testing": 1})
    assigned = {p.name: p.business for p in plane.backend.list_pods(plane.pool) if p.business != L.UNASSIGNED}
    unassigned = {p.name for p in plane.backend.list_pods(plane.pool) if p.business == L.UNASSIGNED}
    assert len(assigned) == 2 and len(unassigned) == 2

    result = await plane.controller.scale(plane.pool, 2, pool_endpoint=True)
    assert set(result.removed) == unassigned and result.added == []
    assert (result.currentReplicas, result.targetReplicas) == (4, 2)
    plane.assert_settled()
    await wait_for_async(lambda: set(plane.pods()) == set(assigned), timeout=30, what="exactly the assigned pods to remain")
    assert {p.name: p.business for p in plane.backend.list_pods(plane.pool)} == assigned
    [row] = plane.history("scale")
    assert row["outcome"] == "success" and (row["before"], row["after"]) == ({"replicas": 4}, {"replicas": 2})

    grown = await plane.controller.scale(plane.pool, 3, pool_endpoint=True)
    assert grown.removed == [] and (grown.currentReplicas, grown.targetReplicas) == (4 - 2, 3)
    await wait_for_async(lambda: len(plane.pods()) == 3, timeout=30, what="a third pod")
    assert plane.distribution() == {"production": 1, "testing": 1, L.UNASSIGNED: 1}
    plane.assert_settled()
    assert [data["removed"] for kind, data in plane.events if kind == "scale"][0] == result.removed
    plane.assert_event_shapes()


async def test_autopilot_moves_and_spares_removal_hold_to_what_is_there(plane: Plane) -> None:
    """The autopilot's actions through the controller: moves re-checked under the pool's lock (a pinned
    or meanwhile moved replica is left alone), one intent with a reason per replica and a summary row;
    a scale-in removes exactly the named spares, never an assigned replica."""
    from corral.domain.autopilot import PlannedMove

    await plane.deploy_pool()
    await plane.controller.distribute(plane.pool, None, {"production": 1, "testing": 2})
    by_business: dict[str, list[str]] = {}
    for pod in plane.backend.list_pods(plane.pool):
        by_business.setdefault(pod.business or "", []).append(pod.name)
    [spare], testing = by_business[L.UNASSIGNED], sorted(by_business["testing"])
    plane.store.set_pins(plane.pool, [testing[1]], True)
    moves = [PlannedMove(spare, L.UNASSIGNED, "production", "production waiting per replica 4.0 > 1.0"),
             PlannedMove(testing[0], "testing", "production", "production waiting per replica 4.0 > 1.0"),
             PlannedMove(testing[1], "testing", "production", "pinned: must not move"),
             PlannedMove(by_business["production"][0], "testing", "production", "stale: it is not in testing")]
    done = await plane.controller.autopilot_moves(plane.pool, moves, "burst on production")
    assert [m.pod for m in done] == [spare, testing[0]]
    assert plane.distribution() == {"production": 3, "testing": 1}
    plane.assert_settled()
    rows = plane.history("assign")[:2]
    assert all(r["message"].startswith("autopilot: production waiting per replica") for r in rows)
    [summary] = plane.history("autopilot")
    assert summary["outcome"] == "success" and summary["message"] == "burst on production"

    back = await plane.controller.autopilot_moves(plane.pool, [PlannedMove(spare, "production", L.UNASSIGNED, "released")], "r")
    assert [m.pod for m in back] == [spare]
    removed = await plane.controller.remove_spares(plane.pool, [spare, testing[0]], "autopilot: idle spare")
    assert removed == [spare]  # testing[0] is assigned (production): never removed
    await wait_for_async(lambda: spare not in plane.pods(), timeout=30, what="the spare removed")
    assert plane.distribution() == {"production": 2, "testing": 1}
    plane.assert_settled()
    plane.assert_event_shapes()


@pytest.mark.parametrize("backend_kind", ["memory"], indirect=True)
async def test_controller_closes_right_after_a_report(plane: Plane) -> None:
    await plane.deploy_pool()  # the memory backend's reports wake the reconciler without the test yielding
    assert await close_controller(plane.controller, patience_s=1.0), "Controller.close() did not return within 1 s"
