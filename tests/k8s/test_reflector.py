"""The Kubernetes backend's reflectors: list, then watch from the list's version (bookmarks, a
randomised timeout); relist and replace the cache after a cut or silent connection or a 410, with
deletions reported for what vanished meanwhile; writes' answers never overwrite newer objects nor
bring deleted ones back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from corral.backends.kubernetes import KubernetesBackend, client_from
from corral.backends.kubernetes.reflector import Store, WatchSettings
from corral.domain.manifests import ClusterOptions, deployment_manifest
from corral.domain.models import Deployment
from tests.conftest import wait_for_async
from tests.k8s.cluster import DEPLOYMENTS, NAMESPACE, PODS
from tests.k8s.conftest import FAST_WATCHES

MANAGED = "app.kubernetes.io/managed-by=corral"  # the label selector of Corral's own pods' watch
POOL = Deployment("vllm-qwen-7b-pool", "vllm", "Qwen/Qwen2.5-7B", "qwen-7b", True, 3, gpus_per_replica=1)


def obj(name: str, version: int, uid: str = "u1", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid, "resourceVersion": str(version), "labels": labels}}


def test_the_store_never_goes_back() -> None:
    changes: list[tuple[str, str, str]] = []
    store = Store("pods", lambda kind, change, old, new: changes.append((change, new["metadata"]["name"], new["metadata"]["resourceVersion"])))
    assert store.event("ADDED", obj("a", 10))
    assert store.write(obj("a", 12, business="production"))  # a write's answer, ahead of its event
    assert not store.event("MODIFIED", obj("a", 11))  # an older event arriving later changes nothing
    assert not store.event("MODIFIED", obj("a", 12, business="production"))  # the answer's own event: no second change
    assert not store.write(obj("a", 11))  # a late answer of an earlier write
    assert store.objects["a"]["metadata"]["resourceVersion"] == "12"
    assert store.event("DELETED", obj("a", 13))
    assert not store.write(obj("a", 14))  # an answer arriving after the deletion never resurrects it
    assert not store.event("MODIFIED", obj("a", 12))
    assert "a" not in store.objects
    assert store.event("ADDED", obj("a", 20, uid="u2"))  # a new object of the same name is another object
    store.forget("a")  # Corral deleted it itself
    assert not store.event("MODIFIED", obj("a", 21, uid="u2"))  # its late events are ignored
    assert [c[0] for c in changes] == ["ADDED", "MODIFIED", "DELETED", "ADDED", "DELETED"]


def test_a_relist_replaces_the_store_and_reports_what_vanished() -> None:
    changes: list[tuple[str, str]] = []
    store = Store("pods", lambda kind, change, old, new: changes.append((change, new["metadata"]["name"])))
    for name, version in (("kept", 10), ("gone", 11), ("changed", 12), ("written-after", 30)):
        store.event("ADDED", obj(name, version, uid=name))
    changes.clear()
    vanished = store.replace([obj("kept", 10, uid="kept"), obj("changed", 15, uid="changed"), obj("new", 16, uid="new")], 20)
    assert vanished == 1
    assert sorted(changes) == [("ADDED", "new"), ("DELETED", "gone"), ("MODIFIED", "changed")]
    assert sorted(store.objects) == ["changed", "kept", "new", "written-after"]  # newer than the list: the watch will say


@asynccontextmanager
async def open_backend(config: Path, tmp_path: Path, settings: WatchSettings = FAST_WATCHES
                       ) -> AsyncIterator[tuple[KubernetesBackend, list[tuple[str | None, dict]]]]:
    reports: list[tuple[str | None, dict]] = []
    backend = KubernetesBackend(client_from(config, NAMESPACE), ClusterOptions(namespace=NAMESPACE),
                                lambda event, data=None, **_: reports.append((event, data or {})), tmp_path / "manifests", watch=settings)
    await backend.start()
    try:
        yield backend, reports
    finally:
        await backend.close()


async def ready_pool(api: Any, backend: KubernetesBackend, replicas: int = 3) -> list[str]:
    api.create(DEPLOYMENTS, deployment_manifest(POOL, ["--model", POOL.model_id], ClusterOptions(namespace=NAMESPACE)))
    await wait_for_async(lambda: len(p := backend.list_pods(POOL.name)) == replicas and all(x.ready for x in p), what="a ready pool")
    return [p.name for p in backend.list_pods(POOL.name)]


def deleted(reports: list[tuple[str | None, dict]], name: str) -> bool:
    return any(event == "replica_status" and data.get("name") == name and data["phase"] == "Deleted" for event, data in reports)


async def test_watches_start_at_the_list_version_with_bookmarks_and_a_random_timeout(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, _, config = cluster
    async with open_backend(config, tmp_path) as (backend, _):
        await ready_pool(api, backend)
        watches = [params for plural, params in api.watch_requests if plural == PODS and "labelSelector" in params]
        first = watches[0]
        assert first["allowWatchBookmarks"] == "true" and first["labelSelector"] == "app.kubernetes.io/managed-by=corral"
        assert first["resourceVersion"] not in ("", "0")  # from the list's version: nothing replayed, nothing missed
        assert 2 <= int(first["timeoutSeconds"]) < 4
        await wait_for_async(lambda: backend.reflectors["pods"].watches >= 2, timeout=10, what="a watch ended by its timeout")
        resumed = [params for plural, params in api.watch_requests if plural == PODS and "labelSelector" in params][1]
        assert int(resumed["resourceVersion"]) > int(first["resourceVersion"])  # resumed from the last event or bookmark
        assert backend.reflectors["pods"].lists == 1  # ... without relisting


async def test_what_was_deleted_while_the_watch_was_cut_is_deleted(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    async with open_backend(config, tmp_path) as (backend, reports):
        victim = (await ready_pool(api, backend))[0]
        controllers.paused = True
        api.cut_watches()  # an API server restart, a network blip ...
        api.delete(PODS, victim, grace_s=0)  # ... and a pod deleted meanwhile: no watch will ever send its DELETED
        await wait_for_async(lambda: victim not in {p.name for p in backend.list_pods()}, timeout=10, what="the re-watch")
        assert deleted(reports, victim)
        # Re-watched from the last version seen: the watch cache replays the deletion; no relist was needed.
        assert backend.reflectors["pods"].lists == 1 and backend.reflectors["pods"].errors >= 1
        assert backend.reflectors["pods"].rewatches >= 1
        assert not any(c.holder.name == victim for c in backend.gpu_claims())


async def test_a_failed_rewatch_relists(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    async with open_backend(config, tmp_path) as (backend, reports):
        victim = (await ready_pool(api, backend))[0]
        controllers.paused = True
        api.refuse_watches(PODS, 1, code=500, selector=MANAGED)  # the re-watch fails too ...
        api.cut_watches()
        api.delete(PODS, victim, grace_s=0)
        await wait_for_async(lambda: victim not in {p.name for p in backend.list_pods()}, timeout=10, what="the relist")
        assert deleted(reports, victim) and backend.reflectors["pods"].lists == 2  # ... so the store is listed again


async def test_a_throttled_watch_is_resumed_after_retry_after_without_relisting(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    async with open_backend(config, tmp_path) as (backend, reports):
        victim = (await ready_pool(api, backend))[0]
        controllers.paused = True
        pods = backend.reflectors["pods"]
        api.refuse_watches(PODS, 2, code=429, retry_after=1, selector=MANAGED)  # API Priority and Fairness sheds load: 429, Retry-After: 1
        started = time.monotonic()
        api.end_watches()  # the watches end (their timeout); resuming them is answered 429 twice
        api.delete(PODS, victim, grace_s=0)
        await wait_for_async(lambda: victim not in {p.name for p in backend.list_pods()}, timeout=10, what="the resumed watch")
        assert time.monotonic() - started >= 2.0  # each retry waited as long as the server asked
        assert deleted(reports, victim) and pods.throttled == 2
        assert pods.lists == 1 and pods.errors == 0  # never relisted: the watch resumed from the last version seen
        throttled = [params for plural, params in api.watch_requests if plural == PODS and params.get("labelSelector") == MANAGED][-3:]
        assert len({params["resourceVersion"] for params in throttled}) == 1


async def test_a_silent_connection_is_noticed(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    quick = WatchSettings(min_timeout_s=1.0, read_grace_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.2)
    async with open_backend(config, tmp_path, quick) as (backend, reports):
        victim = (await ready_pool(api, backend))[0]
        controllers.paused = True
        assert api.stall_watches() >= 6  # half-open: the connections stay, nothing arrives on them
        api.delete(PODS, victim, grace_s=0)
        await wait_for_async(lambda: victim not in {p.name for p in backend.list_pods()}, timeout=10, what="the read timeout")
        assert "Timeout" in (backend.reflectors["pods"].last_error or "") and deleted(reports, victim)


async def test_a_compacted_version_relists(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    api.bookmark_interval_s = 3600  # no bookmarks: the last version seen is an event's
    async with open_backend(config, tmp_path) as (backend, reports):
        victim = (await ready_pool(api, backend))[0]
        controllers.paused = True
        api.end_watches()  # the watches end (their timeout), and before they are resumed ...
        for i in range(5):  # ... writes Corral does not watch move the cluster's version on,
            api.create(PODS, {"metadata": {"name": f"other-{i}"}, "spec": {"containers": []}})
        api.delete(PODS, victim, grace_s=0)  # a pod is deleted,
        api.compact()  # and the history is compacted: resuming from the last version seen gets 410 Expired
        await wait_for_async(lambda: backend.reflectors["pods"].expired >= 1, timeout=10, what="410 Expired")
        await wait_for_async(lambda: victim not in {p.name for p in backend.list_pods()}, timeout=10, what="the relist")
        assert deleted(reports, victim) and backend.reflectors["pods"].errors == 0
        assert "other-0" not in backend.objects["pods"]  # the relist keeps the selector


async def test_a_watch_silent_past_its_bookmarks_is_watched_again_without_relisting(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    # The server ends no watch for a minute and the read timeout is further away still: only the bookmarks tell.
    patient = WatchSettings(min_timeout_s=60.0, read_grace_s=60.0, backoff_initial_s=0.05, backoff_max_s=0.2, idle_s=1.5)
    async with open_backend(config, tmp_path, patient) as (backend, reports):
        victim = (await ready_pool(api, backend))[0]
        pods = backend.reflectors["pods"]
        await wait_for_async(lambda: pods.bookmarks >= 1, timeout=5, what="a bookmark (the emulator sends one every 0.5 s)")
        controllers.paused = True
        assert api.stall_watches() >= 6  # half-open: the connections stay, nothing arrives on them
        api.delete(PODS, victim, grace_s=0)
        await wait_for_async(lambda: victim not in {p.name for p in backend.list_pods()}, timeout=8, what="the dead watch replaced")
        assert pods.dead >= 1 and "DeadWatch" in (pods.last_error or "") and deleted(reports, victim)
        assert pods.lists == 1 and pods.rewatches >= 1  # watched again from the last version: the cache replayed the deletion


async def test_a_quiet_watch_without_bookmarks_is_not_taken_for_dead(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, controllers, config = cluster
    api.send_bookmarks = False  # a server without the watch cache sends no bookmarks: silence proves nothing
    quick = WatchSettings(min_timeout_s=1.0, read_grace_s=1.5, backoff_initial_s=0.05, backoff_max_s=0.2, idle_s=0.3)
    async with open_backend(config, tmp_path, quick) as (backend, _):
        await ready_pool(api, backend)
        controllers.paused = True  # nothing changes: the watches stay silent until the server ends them (1-2 s)
        pods = backend.reflectors["pods"]
        watched = pods.watches
        await wait_for_async(lambda: pods.watches >= watched + 2, timeout=10, what="two quiet watches ended by the server")
        assert pods.bookmarks == 0 and pods.dead == 0 and pods.errors == 0 and pods.lists == 1
