"""The emulated cluster itself has the API semantics the backend relies on: resourceVersions, watches
from a version (bookmarks, timeouts, 410 for compacted versions, selector transitions), 409 on stale
writes, the status subresource, graceful pod deletion, the pod lifecycle and the ReplicaSet's
real removal order. Each is checked over real HTTP, as the backend meets them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import wait_for_async
from tests.k8s.cluster import COST, DEPLOYMENTS, NAMESPACE, PODS, SLICES, is_ready, now_iso, removal_order

PODS_URL = f"/api/v1/namespaces/{NAMESPACE}/pods"


def http(config: Path) -> httpx.AsyncClient:
    server = yaml.safe_load(config.read_text())["clusters"][0]["cluster"]["server"]
    return httpx.AsyncClient(base_url=server, timeout=10)


def pod_body(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"app": "x"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}


async def watch_lines(client: httpx.AsyncClient, params: dict, until: int) -> list[dict]:
    events = []
    async with client.stream("GET", PODS_URL, params={"watch": "true", **params}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.strip():
                events.append(json.loads(line))
            if len(events) >= until:
                break
    return events


async def test_versions_conflicts_and_the_status_subresource(cluster) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    controllers.paused = True
    async with http(config) as client:
        created = (await client.post(PODS_URL, json=pod_body("a"))).json()
        version = int(created["metadata"]["resourceVersion"])
        assert created["metadata"]["uid"] and created["status"]["phase"] == "Pending"  # status is the server's on create
        assert (await client.post(PODS_URL, json=pod_body("a"))).status_code == 409  # AlreadyExists
        patch = {"metadata": {"resourceVersion": str(version), "labels": {"app": "y"}}}
        first = await client.patch(f"{PODS_URL}/a", json=patch, headers={"Content-Type": "application/merge-patch+json"})
        assert first.status_code == 200 and int(first.json()["metadata"]["resourceVersion"]) > version
        stale = await client.patch(f"{PODS_URL}/a", json=patch, headers={"Content-Type": "application/merge-patch+json"})
        assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"  # the precondition failed
        ignored = await client.patch(f"{PODS_URL}/a", json={"status": {"phase": "Running"}},
                                     headers={"Content-Type": "application/merge-patch+json"})
        assert ignored.json()["status"]["phase"] == "Pending"  # a main-resource write never changes status
        status = await client.patch(f"{PODS_URL}/a/status", json={"status": {"phase": "Running"}},
                                    headers={"Content-Type": "application/merge-patch+json"})
        assert status.json()["status"]["phase"] == "Running"
        listed = (await client.get(PODS_URL)).json()
        assert int(listed["metadata"]["resourceVersion"]) >= int(status.json()["metadata"]["resourceVersion"])


async def test_watches_resume_from_a_version_send_bookmarks_time_out_and_expire(cluster) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    controllers.paused = True
    async with http(config) as client:
        start = (await client.get(PODS_URL)).json()["metadata"]["resourceVersion"]
        await client.post(PODS_URL, json=pod_body("one"))
        await client.post(PODS_URL, json=pod_body("two", {"app": "other"}))
        # From a version: only what happened after it, filtered by the selector.
        events = await watch_lines(client, {"resourceVersion": start, "labelSelector": "app=x", "timeoutSeconds": "1"}, 1)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "one")]
        # A relabel out of the selector is a DELETED for that watch (the watch cache compares old and new).
        version = (await client.get(PODS_URL)).json()["metadata"]["resourceVersion"]
        await client.patch(f"{PODS_URL}/one", json={"metadata": {"labels": {"app": "gone"}}},
                           headers={"Content-Type": "application/merge-patch+json"})
        events = await watch_lines(client, {"resourceVersion": version, "labelSelector": "app=x"}, 1)
        assert events[0]["type"] == "DELETED" and events[0]["object"]["metadata"]["name"] == "one"
        # Bookmarks carry the current version; the stream ends cleanly after timeoutSeconds.
        started = time.monotonic()
        events = await watch_lines(client, {"resourceVersion": version, "labelSelector": "app=nothing", "allowWatchBookmarks": "true",
                                            "timeoutSeconds": "1"}, 100)
        assert 0.9 < time.monotonic() - started < 3
        assert events and {e["type"] for e in events} == {"BOOKMARK"}
        assert events[-1]["object"]["metadata"]["resourceVersion"] == str(api.rv)
        # After compaction, a watch from an older version gets a 410 Expired ERROR event.
        api.compact()
        events = await watch_lines(client, {"resourceVersion": start}, 1)
        assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"


async def test_pods_start_and_terminate_like_pods(cluster) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    async with http(config) as client:
        before = (await client.get(PODS_URL)).json()["metadata"]["resourceVersion"]  # watched from here: every step seen
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                      "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                               "template": {"metadata": {"labels": {"app": "web"}},
                                            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
        assert (await client.post(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments", json=deployment)).status_code == 201
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
        await client.post(f"/api/v1/namespaces/{NAMESPACE}/services", json=service)
        seen: list[tuple[str, bool]] = []
        async with client.stream("GET", PODS_URL, params={"watch": "true", "labelSelector": "app=web", "resourceVersion": before}) as response:
            async for line in response.aiter_lines():
                pod = json.loads(line)["object"]
                seen.append((pod["status"]["phase"] + ("/bound" if pod["spec"].get("nodeName") else ""), is_ready(pod)))
                if is_ready(pod):
                    break
        assert seen[0] == ("Pending", False) and ("Pending/bound", False) in seen and seen[-1] == ("Running/bound", True)
        name = pod["metadata"]["name"]
        assert name.startswith("web-") and len(name) == len("web-") + 5  # generateName
        controllers.timings.termination_s = 5
        await client.delete(f"{PODS_URL}/{name}")
        terminating = api.get(PODS, name)
        assert terminating["metadata"]["deletionTimestamp"]  # graceful: marked, still there
        await wait_for_async(lambda: any(e["conditions"]["terminating"] and not e["conditions"]["ready"]
                                         for s in api.items(SLICES) for e in s["endpoints"]), what="a terminating endpoint")
        assert len([p for p in api.items(PODS) if not p["metadata"].get("deletionTimestamp")]) == 1  # replaced at once


def _pod(name: str, *, node: str = "n1", phase: str = "Running", ready: bool = True, cost: int | None = None, restarts: int = 0,
         age_s: float = 100.0, ready_s: float = 50.0, uid: str = "") -> dict:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - age_s)) + f".{int((now - age_s) % 1 * 1e6):06d}Z"
    ready_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - ready_s)) + f".{int((now - ready_s) % 1 * 1e6):06d}Z"
    return {"metadata": {"name": name, "uid": uid or name, "creationTimestamp": stamp,
                         "annotations": {COST: str(cost)} if cost is not None else {}},
            "spec": {"nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": ready_at}],
                       "containerStatuses": [{"restartCount": restarts}]}}


def test_replicaset_removal_order_has_the_real_keys() -> None:
    def first(*pods: dict) -> str:
        return removal_order(list(pods), pods)[0]["metadata"]["name"]

    assert first(_pod("a"), _pod("unscheduled", node="")) == "unscheduled"  # 1. not on a node yet
    assert first(_pod("a"), _pod("pending", phase="Pending", ready=False)) == "pending"  # 2. Pending < Running
    assert first(_pod("cheap", cost=-1000), _pod("not-ready", ready=False, cost=1000)) == "not-ready"  # 3. before the cost
    assert first(_pod("assigned", cost=1000), _pod("unassigned", cost=-100)) == "unassigned"  # 4. lower cost
    crowded = [_pod("alone", node="n2"), _pod("crowded", node="n1"), _pod("neighbour", node="n1", cost=5)]
    assert removal_order(crowded[:2], crowded)[0]["metadata"]["name"] == "crowded"  # 5. more colocated pods
    assert first(_pod("long", ready_s=10_000), _pod("short", ready_s=1)) == "short"  # 6. ready for less time
    assert first(_pod("steady", restarts=0), _pod("flaky", restarts=3)) == "flaky"  # 7. more restarts
    assert first(_pod("old", age_s=10_000, ready_s=5), _pod("new", age_s=10, ready_s=5)) == "new"  # 8. newer
    # ... on a logarithmic scale: pods of about the same age tie, and the UID decides (not "the newest").
    same = [_pod("b-newer", age_s=100.0, ready_s=5, uid="b"), _pod("a-older", age_s=101.0, ready_s=5, uid="a")]
    assert removal_order(same, same)[0]["metadata"]["name"] == "a-older"


async def test_a_concurrent_writer_makes_a_conditional_write_conflict(cluster) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    controllers.paused = True
    deployment = api.create(DEPLOYMENTS, {"metadata": {"name": "d"}, "spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}},
                                                                              "template": {"metadata": {"labels": {"a": "b"}}, "spec": {}}}})
    api.conflict_once(DEPLOYMENTS, "d", {"spec": {"replicas": 5}})
    async with http(config) as client:
        answer = await client.patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/d",
                                    json={"metadata": {"resourceVersion": deployment["metadata"]["resourceVersion"]}, "spec": {"replicas": 3}},
                                    headers={"Content-Type": "application/merge-patch+json"})
    assert answer.status_code == 409
    current = api.get(DEPLOYMENTS, "d")
    assert current["spec"]["replicas"] == 5 and current["metadata"]["generation"] == 2 and now_iso()
