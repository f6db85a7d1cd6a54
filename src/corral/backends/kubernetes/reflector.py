"""A reflector per kind of object: client-go's list-then-watch loop, with a store that never goes back.

What it does, and where client-go does the same (k8s.io/client-go/tools/cache/reflector.go):
- **List, then watch from the list's resourceVersion** (`ListAndWatch`): the watch replays nothing
  the list already gave, and misses nothing that happened after it.
- **Bookmarks and a randomised timeout**: every watch asks for `allowWatchBookmarks=true`, so the
  API server sends the current resourceVersion even when nothing of ours changes (a quiet watch
  does not fall behind the compaction window), and for `timeoutSeconds` drawn from [min, 2·min)
  (`timeoutSeconds := int64(r.minWatchTimeout.Seconds() * (rand.Float64() + 1.0))`, minWatchTimeout
  5 min), so that many clients do not reconnect in lockstep. A watch the server ends after its
  timeout is resumed from the last resourceVersion seen (an event's or a bookmark's), without relisting.
- **410 Gone / Expired: list again and replace the store.** A version older than the API server
  keeps answers 410 (an HTTP status, or an ERROR event carrying a Status with code 410 — what the
  watch cache sends), and then only a new list is correct (`isExpiredError` → relist).
  `Store.replace` works like client-go's `DeltaFIFO.Replace`: whatever the new list lacks is
  reported deleted.
- **429 Too Many Requests: watch again from the last version**, after the `Retry-After` the server
  asked for (else the back-off), never relisting: a list is the heaviest request there is, the last
  thing to send an API server that sheds load (client-go re-watches on `IsTooManyRequests`).
- **Any other failure (a cut connection, connection refused, a 5xx, a read timeout): watch again
  from the last version after a back-off**; the watch cache replays what happened meanwhile,
  deletions included, or answers 410 if that is too old. Only when that re-watch fails too (before
  it delivered anything) is the store relisted and replaced.
- **Dead watches, told by their bookmarks**: kube-apiserver's watch cache sends a watcher that
  allows bookmarks one roughly every minute, and one 2 s before its timeout
  (`cacheWatcher.nextBookmarkTime`, staging/src/k8s.io/apiserver/pkg/storage/cacher), whether or not
  anything changed. So once a reflector has seen the server send bookmarks, a watch silent for
  longer than `idle_s` (neither an event nor a bookmark) is dead — a half-open connection, a stuck
  proxy, an API server that lost its etcd watch — and is replaced by a watch from the last
  resourceVersion (a failed re-watch relists, as for any failure). Where no bookmark has come yet (a
  server without the watch cache), a quiet watch may be quiet for good reason, and only the read
  timeout below applies. client-go relies on HTTP/2 health-check pings (ReadIdleTimeout 30 s,
  k8s.io/apimachinery/pkg/util/net/http.go), which a connection kept alive by a proxy passes while
  nothing flows behind it.
- **A read timeout** on the watch request (its timeoutSeconds plus a grace): the server promised
  to end the stream by then, so silence past it means a dead (half-open) connection, bookmarks or not.
- **Back-off** between failed attempts: 0.8 s doubling to 30 s, with jitter (the reflector's
  defaults), reset by a watch that worked.

The store (`Store`) takes writes' answers too, so Corral reads its own writes at once — but an
answer never replaces a newer copy (resourceVersions compared: etcd's revision, an integer that
only grows; where a version is not an integer, the later arrival wins), and never brings back an
object that was deleted meanwhile (a deleted uid never returns: uids are unique per object).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from lightkube import AsyncClient
from lightkube.core import generic_client

log = logging.getLogger("corral.kubernetes")

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
PAGE = 500
Change = Callable[[str, str, "dict[str, Any] | None", "dict[str, Any]"], None]  # (kind, event, old, new)


@dataclass(frozen=True)
class WatchSettings:
    min_timeout_s: float = 300.0  # each watch asks for timeoutSeconds in [min, 2·min) (client-go: 5 min)
    read_grace_s: float = 30.0  # silence beyond timeoutSeconds + this = a dead connection
    # Silence (no event, no bookmark) beyond this = a dead watch, once the server was seen to send bookmarks
    # (about one a minute): 2.5 bookmark periods, so that one late bookmark is not taken for a dead watch.
    idle_s: float = 150.0
    backoff_initial_s: float = 0.8
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0


DEFAULTS = WatchSettings()


def watch_settings(**changes: Any) -> WatchSettings:
    """The defaults with some settings changed (read when called: tests shorten the defaults)."""
    return dataclasses.replace(DEFAULTS, **changes)


def resource_version(obj: dict[str, Any] | None) -> int | None:
    """An object's resourceVersion as an integer, or None where it is not one (API conventions call it
    opaque; etcd-backed API servers serve etcd's revision, which only grows)."""
    value = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _uid(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("uid")


class Store:
    """One kind's objects by name (one namespace), as the watch and Corral's own writes leave them."""

    TOMBSTONES = 10_000

    def __init__(self, kind: str, on_change: Change, keep: Callable[[dict[str, Any]], bool] = lambda obj: True,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.kind = kind
        self.objects: dict[str, dict[str, Any]] = {}
        self.on_change = on_change
        self.keep = keep  # objects this store ignores (a business service's router, say)
        # What is kept of each object the watch brings (client-go's SetTransform): the fields a reader needs, so that
        # a cluster-wide store stays small. It may also rename an object (`namespace/name` for a cluster-wide one).
        self.transform = transform
        self._buried: OrderedDict[str, None] = OrderedDict()  # uids of deleted objects

    def _bury(self, obj: dict[str, Any]) -> None:
        uid = _uid(obj)
        if uid:
            self._buried[uid] = None
            while len(self._buried) > self.TOMBSTONES:
                self._buried.popitem(last=False)

    def buried(self, obj: dict[str, Any]) -> bool:
        uid = _uid(obj)
        return bool(uid) and uid in self._buried

    def _upsert(self, obj: dict[str, Any]) -> bool:
        name = obj["metadata"]["name"]
        if not self.keep(obj) or self.buried(obj):
            return False  # never resurrect a deleted object
        old = self.objects.get(name)
        if old is not None and _uid(old) == _uid(obj):
            new_rv, old_rv = resource_version(obj), resource_version(old)
            if new_rv is not None and old_rv is not None and new_rv <= old_rv:
                return False  # we hold this version or a newer one (a write's answer ahead of its event)
        self.objects[name] = obj
        self.on_change(self.kind, ADDED if old is None else MODIFIED, old, obj)
        return True

    def event(self, kind: str, obj: dict[str, Any]) -> bool:
        """A watch event (in order). Returns whether the store changed."""
        if self.transform is not None:
            obj = self.transform(obj)
        if kind == DELETED:
            self._bury(obj)
            old = self.objects.get(obj["metadata"]["name"])
            if old is None or (_uid(old) and _uid(obj) and _uid(old) != _uid(obj)):
                return False  # a deletion of an older object of that name
            del self.objects[obj["metadata"]["name"]]
            self.on_change(self.kind, DELETED, old, obj)
            return True
        return self._upsert(obj)

    def write(self, obj: dict[str, Any]) -> bool:
        """The API server's answer to one of Corral's writes: read-your-writes, never over a newer copy."""
        return self._upsert(obj)

    def forget(self, name: str) -> dict[str, Any] | None:
        """Corral deleted the object itself: out of the store now, and its late events ignored."""
        old = self.objects.pop(name, None)
        if old is not None:
            self._bury(old)
            self.on_change(self.kind, DELETED, old, old)
        return old

    def replace(self, items: list[dict[str, Any]], list_version: int | None) -> int:
        """A fresh list replaces the store (client-go's Replace): objects it lacks are reported deleted,
        unless Corral wrote them after the list was taken (the watch will say). Returns how many vanished."""
        if self.transform is not None:
            items = [self.transform(obj) for obj in items]
        listed = {obj["metadata"]["name"] for obj in items}
        vanished = 0
        for name, old in list(self.objects.items()):
            if name in listed:
                continue
            version = resource_version(old)
            if version is not None and list_version is not None and version > list_version:
                continue
            del self.objects[name]
            self._bury(old)
            vanished += 1
            self.on_change(self.kind, DELETED, old, old)
        for obj in items:
            current = self.objects.get(obj["metadata"]["name"])
            if current is not None and _uid(current) != _uid(obj):  # replaced by a namesake while we were away
                del self.objects[obj["metadata"]["name"]]
                self._bury(current)
                self.on_change(self.kind, DELETED, current, current)
            self._upsert(obj)
        return vanished


class Expired(Exception):
    """410 Gone: the resourceVersion is older than the API server keeps."""


class WatchFailed(Exception):
    pass


class DeadWatch(WatchFailed):
    """A watch silent (no event, no bookmark) for longer than `WatchSettings.idle_s` from a server that sends bookmarks."""


class Throttled(WatchFailed):
    """429 Too Many Requests; `retry_after`: the seconds the server asked for (its `Retry-After`), if any."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date (not sent by kube-apiserver)


class Reflector:
    """Keeps one `Store` in step with the API server (one kind, one namespace, one label selector)."""

    def __init__(self, client: AsyncClient, resource: Any, store: Store, namespace: str | None, labels: dict[str, str] | None,
                 settings: WatchSettings | None = None, fields: str | None = None) -> None:
        """`namespace`: one namespace, None for a cluster-scoped kind, `lightkube.ALL_NS` for all namespaces;
        `fields`: a field selector (the watch cache applies it to old and new objects, as a label selector)."""
        self.client, self.resource, self.store = client, resource, store
        self.namespace, self.labels, self.fields = namespace, labels, fields
        self.settings = settings or DEFAULTS
        self.version: str | None = None  # the last resourceVersion seen; None: list first
        self.lists = 0
        self.watches = 0
        self.errors = 0
        self.expired = 0
        self.throttled = 0  # 429s, each followed by a re-watch (or a list, if none had worked yet) after Retry-After
        self.rewatches = 0  # watches resumed from the last version after a failure, without relisting
        self.bookmarks = 0  # BOOKMARK events received: once there is one, a silent watch is a dead one (`idle_s`)
        self.dead = 0  # watches given up as dead: silent for longer than `idle_s` (counted in `errors` too)
        self.last_error: str | None = None
        self.delivered = 0  # events and bookmarks of the current watch
        self.synced = asyncio.Event()

    # Lightkube builds the request (URL, auth, TLS); its own `watch` cannot ask for bookmarks, has no
    # read timeout and hides where a watch ended, so the stream is read here.
    def _request(self, params: dict[str, Any], read_timeout: float | None) -> Any:
        generic = self.client._client
        selector = ",".join(f"{k}={v}" for k, v in sorted((self.labels or {}).items())) or None
        prepared = generic.prepare_request("list", res=self.resource, namespace=self.namespace,
                                           params={"labelSelector": selector, "fieldSelector": self.fields, **params})
        timeout = generic_client.httpx.Timeout(self.settings.connect_timeout_s, read=read_timeout)
        return generic._client.build_request(prepared.method, prepared.url, params=prepared.params, timeout=timeout)

    async def list(self) -> None:
        """A full list in pages of `PAGE` (client-go's pager: limit 500, then `continue`; every page of one
        list is served at the list's resourceVersion), then one `Store.replace`."""
        http = self.client._client._client
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": str(PAGE)}
        while True:
            response = await http.send(self._request(params, self.settings.connect_timeout_s * 3))
            try:
                if response.status_code == 410:
                    raise Expired(f"list {self.store.kind}: the continue token expired")
                if response.status_code == 429:
                    raise Throttled(f"list {self.store.kind}: HTTP 429", _retry_after(response))
                if response.status_code >= 400:
                    raise WatchFailed(f"list {self.store.kind}: HTTP {response.status_code} {response.text[:200]}")
                body = msgspec.json.decode(response.content)  # several times faster than json for a thousand pods
            finally:
                await response.aclose()
            items += body.get("items") or []
            meta = body.get("metadata") or {}
            await asyncio.sleep(0)  # let the loop breathe between pages (a page of 500 pods decodes in ~10 ms)
            if not meta.get("continue"):
                break
            params = {"limit": str(PAGE), "continue": meta["continue"]}
        version = meta.get("resourceVersion")
        started = time.perf_counter()
        vanished = self.store.replace(items, resource_version({"metadata": {"resourceVersion": version}}))
        self.lists += 1
        self.version = version
        self.synced.set()
        log.debug("listed %d %s at %s; replaced in %.1f ms (%d vanished)", len(items), self.store.kind, version,
                  (time.perf_counter() - started) * 1000, vanished)

    async def watch_once(self) -> None:
        """One watch from `self.version`, until the server ends it (returns) or it fails (raises)."""
        timeout = max(1, int(self.settings.min_timeout_s * (random.random() + 1.0)))
        params = {"watch": "true", "resourceVersion": self.version, "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)}
        http = self.client._client._client
        self.delivered = 0
        response = await http.send(self._request(params, timeout + self.settings.read_grace_s), stream=True)
        self.watches += 1
        try:
            if response.status_code == 410:
                raise Expired(f"HTTP 410 watching {self.store.kind} from {self.version}")
            if response.status_code == 429:
                raise Throttled(f"watch {self.store.kind}: HTTP 429", _retry_after(response))
            if response.status_code >= 400:
                await response.aread()
                raise WatchFailed(f"watch {self.store.kind}: HTTP {response.status_code} {response.text[:200]}")
            loop = asyncio.get_running_loop()
            try:
                # The silence bound, re-armed by every line (an event or a bookmark); unarmed until the server is
                # known to send bookmarks.
                async with asyncio.timeout_at(loop.time() + self.settings.idle_s if self.bookmarks else None) as silence:
                    async for line in response.aiter_lines():
                        if line.strip():
                            self._line(line)
                        if self.bookmarks:
                            silence.reschedule(loop.time() + self.settings.idle_s)
            except TimeoutError:
                if not silence.expired():
                    raise
                raise DeadWatch(f"watch {self.store.kind}: neither an event nor a bookmark for {self.settings.idle_s:g} s "
                                f"(the server sends bookmarks): a dead watch") from None
        finally:
            await response.aclose()

    def _line(self, line: str) -> None:
        """One line of a watch stream: an event into the store, a bookmark's version kept, an ERROR raised."""
        event = msgspec.json.decode(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired(obj.get("message") or "410 Gone")
            if obj.get("code") == 429:
                raise Throttled(f"watch {self.store.kind}: 429 {obj.get('message')}", None)
            raise WatchFailed(f"watch {self.store.kind}: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        self.delivered += 1
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in (ADDED, MODIFIED, DELETED):
            self.store.event(kind, obj)
        elif kind == "BOOKMARK":
            self.bookmarks += 1
        if version:
            self.version = version  # BOOKMARKs only move this on

    async def run(self) -> None:
        """List (when needed) and watch, for ever. Cancel to stop."""
        delay = self.settings.backoff_initial_s
        resuming = False  # the last watch failed: this one resumes from the version it had reached
        while True:
            try:
                if self.version is None:
                    await self.list()
                elif resuming:
                    self.rewatches += 1
                await self.watch_once()
                delay = self.settings.backoff_initial_s  # ended by the server's timeout: resume from self.version
                resuming = False
            except asyncio.CancelledError:
                raise
            except Expired as exc:
                self.expired += 1
                self.version = None  # relist at once
                resuming = False
                log.info("watch of %s expired (%s): listing again", self.store.kind, exc)
            except Throttled as exc:  # the server sheds load: the same request again, when it says
                self.throttled += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                wait = exc.retry_after if exc.retry_after is not None else delay * random.uniform(0.8, 1.2)
                log.info("watch of %s throttled (%s); watching again from %s in %.1f s", self.store.kind, exc, self.version, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.settings.backoff_max_s)
            except Exception as exc:  # a cut or silent connection, an API server restart, a 5xx: re-watch, then relist
                self.errors += 1
                self.dead += isinstance(exc, DeadWatch)
                if self.delivered:  # the watch had worked until now: start the back-off again
                    delay = self.settings.backoff_initial_s
                    resuming = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                if resuming and not self.delivered:  # the re-watch failed too: only a list can be trusted now
                    self.version = None
                    resuming = False
                    what = "listing again"
                else:
                    resuming = self.version is not None
                    what = f"watching again from {self.version}" if resuming else "listing again"
                self.delivered = 0
                log.warning("watch of %s failed (%s); %s in %.1f s", self.store.kind, self.last_error, what, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.backoff_max_s)
