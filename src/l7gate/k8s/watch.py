"""The Kubernetes API as a source of state: list+watch, feeding the agent (the I/O half).

Theory of operation
-------------------
`Watcher` runs one thread per resource of `reconcile.RESOURCES` (Namespaces, Nodes, Pods,
Services, EndpointSlices, CiliumNetworkPolicies, CiliumClusterwideNetworkPolicies,
NetworkPolicies, CiliumCIDRGroups, across all namespaces) doing what client-go's reflector does:

1. LIST, in pages of `page_size` (`limit`/`continue`; an expired continue token restarts the
   list), remembering the list's `resourceVersion`. The first listing asks for
   `resourceVersion=0` (any version), as client-go's reflector does: a real API server serves
   it from its watch cache, whole; relists read the current version, paged. `l7gate agent`
   asks for these first pages (`FirstPages`) as soon as it has its configuration, before it
   imports the rest of the agent, and each watch takes its own from there. A resource the server does not serve in its
   first API version (404) is listed, and then watched, in the next one it names
   (`Resource.older_versions`: CiliumCIDRGroup is v2 from Cilium 1.18, v2alpha1 before);
2. WATCH from that version with `allowWatchBookmarks` (a bookmark only moves the version on)
   and `timeoutSeconds` drawn in [T, 2T) so that the agents of every node do not all reconnect
   at once; the socket's read timeout (T·2 + `read_grace`) notices a connection that died
   silently;
3. when the watch ends (the server's timeout, a cut connection), WATCH again from the last
   version seen: nothing is missed and nothing is listed again;
4. "410 Gone" (on the watch request, or as an ERROR event: the version is older than the
   server's history, e.g. after a compaction or a long outage) → LIST again; the listing
   replaces everything the agent holds of that resource from the API (`reconcile`: objects
   that disappeared during the gap are deleted, changed ones re-applied);
5. any other failure (connection refused, a 5xx, a read timeout) → wait (`Backoff`: bounded,
   jittered) and WATCH again from the last version (or LIST again after an ERROR event other
   than 410, as client-go does).

The threads do not touch the agent. They project each object (`reconcile.project`) and queue
listings and events; ONE applier thread drains the queue, merges what it drained
(`reconcile.Pending`: the last state per object wins) and hands it to `reconcile.Reconciler`,
which applies it through the agent's `ObjectSink`. A burst of events is one apply, not one per
event. The initial sync applies the first listing of every resource as one request per
resource, in order (namespaces, nodes, policies, Services, EndpointSlices, pods), all in one
batch of the agent (one publication): a listing is applied as soon as it and every listing
before it have come, while later ones (pods, the slowest on a large cluster) are still on their
way; a batch held `EARLY_HOLD` seconds for a listing that does not come is published (each
resource in it a whole listing) and the rest follows when it comes. Only once every first
listing is applied is the watcher `ready` (`problems()` is empty): the agent's /healthz waits
for it. A failure of the sink itself (not a refusal) keeps what was drained and retries it
after a back-off.

An object the agent refuses is logged and kept in `status()`; a refused policy also gets a
Kubernetes Event (reason `PolicyInvalid`, the field paths in its message) from this node's
agent (`EventRecorder`, on a thread of its own, posting each refusal of one resourceVersion
once): docs/kubernetes.md says why an Event and not the policy's status. A refused CiliumCIDRGroup
gets one too (reason `CIDRGroupInvalid`).

Thread safety: `start`, `stop` once each, from one thread; `ready`, `wait_ready`, `problems`
and `status` from any thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes.client import Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import RESTClientObject
from kubernetes.config import ConfigException, load_kube_config
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME, SERVICE_TOKEN_FILENAME, InClusterConfigLoader,
)

from ..gcpause import paused
from .reconcile import (
    CIDRGROUPS, POLICY_KINDS, RESOURCES, Backoff, Desired, ObjectRef, ObjectSink, Pending, Reconciler, Resource,
    Slot, project,
)

Log = Callable[[str], None]

#: Event reasons, as `kubectl describe` shows them.
POLICY_INVALID = "PolicyInvalid"
CIDR_GROUP_INVALID = "CIDRGroupInvalid"
#: Events of cluster-scoped objects go to this namespace, as Kubernetes' own do (Nodes').
CLUSTER_EVENTS_NAMESPACE = "default"
EVENT_MESSAGE_MAX = 1024
#: How long the initial sync keeps the agent's batch open for first listings still to come once
#: it has applied those before them (`Watcher._apply_early`); then it publishes what it applied.
EARLY_HOLD = 5.0  # events.k8s.io's limit on a note; core/v1 Events are held to it too
#: Objects per page of a paged listing (`limit`).
PAGE_SIZE = 500


class KubeConfigError(Exception):
    """No usable client configuration: the kubeconfig or the in-cluster service account."""


class ApiError(Exception):
    """The API server answered with an error (`status`: the HTTP code, or an ERROR event's)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}" + (f": {message}" if message else ""))


class Gone(ApiError):
    """410: the resourceVersion asked for is older than the server's history: list again."""


def load_configuration(kubeconfig: str = "", *, environ: Mapping[str, str] = os.environ,
                       token_file: str = SERVICE_TOKEN_FILENAME,
                       ca_file: str = SERVICE_CERT_FILENAME) -> Configuration:
    """The client's configuration from a kubeconfig file, or else in-cluster (the pod's
    service-account token, re-read as it rotates, its CA, KUBERNETES_SERVICE_HOST/PORT).
    Raises KubeConfigError saying what is missing."""
    c = Configuration()
    try:
        if kubeconfig:
            load_kube_config(config_file=kubeconfig, client_configuration=c,  # type: ignore[no-untyped-call]
                             persist_config=False)
        else:
            loader = InClusterConfigLoader(token_filename=token_file, cert_filename=ca_file,  # type: ignore[no-untyped-call]
                                           environ=environ)
            loader.load_and_set(c)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        where = (f"kubeconfig {kubeconfig}" if kubeconfig else
                 f"in-cluster config (KUBERNETES_SERVICE_HOST/PORT, {token_file}, {ca_file}); "
                 "outside a pod, set kubernetes.kubeconfig")
        raise KubeConfigError(f"cannot use the {where}: {exc}") from None
    return c


class ApiConnection:
    """HTTP to the API server with the client's configuration (TLS, credentials, token
    refresh), JSON in and out; watches as raw streams. Thread-safe (urllib3's pool)."""

    def __init__(self, configuration: Configuration) -> None:
        configuration.retries = 0  # the watch retries, with its own back-off
        configuration.connection_pool_maxsize = 16  # eight watches, lists and Events at once
        self.configuration = configuration
        self._rest = RESTClientObject(configuration)
        self.host = str(configuration.host)

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "l7gate-agent", **extra}
        auth: Mapping[str, Any] = self.configuration.auth_settings()
        for setting in auth.values():
            if isinstance(setting, Mapping) and setting.get("in") == "header" and setting.get("value"):
                headers[str(setting["key"])] = str(setting["value"])
        return headers

    def send(self, method: str, path: str, query: Mapping[str, str] | None = None, body: Any = None,
             timeout: tuple[float, float] = (5.0, 30.0)) -> urllib3.BaseHTTPResponse:
        """The response, its body not read; an error status raises ApiError (Gone for 410)."""
        url = self.host + path + ("?" + urlencode(query) if query else "")
        headers = self._headers({"Content-Type": "application/json"} if body is not None else {})
        try:
            resp: urllib3.BaseHTTPResponse = self._rest.request(  # type: ignore[no-untyped-call]
                method, url, headers=headers, body=body, _request_timeout=timeout).response
        except ApiException as exc:  # the client's wrapping of TLS errors
            raise ApiError(0, str(exc.reason)) from None
        if not 200 <= resp.status < 300:
            try:
                data = json.loads(resp.read() or b"{}")
            except ValueError:
                data = {}
            finally:
                resp.release_conn()
            message = str(data.get("message", "")) if isinstance(data, dict) else ""
            cls = Gone if resp.status == 410 else ApiError
            raise cls(resp.status, str(resp.reason), message)
        return resp

    def json(self, method: str, path: str, query: Mapping[str, str] | None = None, body: Any = None,
             timeout: tuple[float, float] = (5.0, 60.0)) -> dict[str, Any]:
        resp = self.send(method, path, query, body, timeout)
        try:
            raw = resp.read()
        finally:
            resp.release_conn()
        return _object(raw, resp.status)

    def close(self) -> None:
        self._rest.close()


def _object(raw: bytes, status: int) -> dict[str, Any]:
    """A response body that must be a JSON object."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ApiError(status, "malformed", "the response is not a JSON object")
    return data


def _first_query(page_size: int) -> dict[str, str]:
    """The query of a resource's first listing (`ResourceWatch._list`)."""
    return {"limit": str(page_size), "resourceVersion": "0"}


class FirstPages:
    """The first page of every resource's first listing, asked for before the watch starts.

    `l7gate agent` builds this as soon as it has read its configuration, and only then imports
    the rest of the agent (~0.5 s here), while the API server prepares its answers (on a large
    cluster, the pods' listing is the slowest part of the initial sync). Each request runs on a
    thread of its own and keeps the raw bytes: socket reads release the interpreter's lock, so
    the imports are not slowed, and the watch that takes a page decodes it. A page the server
    refused, or that never came, is not kept: the watch asks again itself and handles the
    error as it always does. Thread-safe; a page is taken once."""

    def __init__(self, api: ApiConnection, resources: Sequence[Resource] = RESOURCES, *,
                 page_size: int = PAGE_SIZE) -> None:
        self.api = api
        self.page_size = page_size
        self._lock = threading.Lock()
        self._pages: dict[str, tuple[threading.Thread, list[bytes]]] = {}
        for r in resources:
            path = r.path_for(r.versions[0])
            got: list[bytes] = []
            t = threading.Thread(target=self._fetch, args=(path, got), name=f"l7g-k8s-first-{r.name}", daemon=True)
            self._pages[path] = (t, got)
            t.start()

    def _fetch(self, path: str, got: list[bytes]) -> None:
        try:
            resp = self.api.send("GET", path, _first_query(self.page_size), timeout=(5.0, 60.0))
            try:
                got.append(resp.read())
            finally:
                resp.release_conn()
        except Exception:  # noqa: BLE001 - the watch asks again, and says what went wrong
            pass

    def take(self, path: str, query: Mapping[str, str], stopping: threading.Event) -> bytes | None:
        """The raw page asked for as (`path`, `query`), waiting for it if it is on its way; None
        if there is none (another query, already taken, failed) or `stopping` is set."""
        if dict(query) != _first_query(self.page_size):
            return None
        with self._lock:
            entry = self._pages.pop(path, None)
        if entry is None:
            return None
        thread, got = entry
        while thread.is_alive() and not stopping.is_set():
            thread.join(0.05)
        return got[0] if got and not stopping.is_set() else None

    def discard(self) -> None:
        """Drop the pages nobody took."""
        with self._lock:
            self._pages.clear()


@dataclass(frozen=True, slots=True)
class _Listed:
    resource: Resource
    items: tuple[Desired, ...]


@dataclass(frozen=True, slots=True)
class _Event:
    resource: Resource
    desired: Desired


class ResourceWatch:
    """The list+watch loop of one resource (module doc), on a thread of its own. It queues
    `_Listed` and `_Event` items through `put`; it never calls the agent."""

    def __init__(self, resource: Resource, api: ApiConnection, cluster: str, put: Callable[[object], None],
                 stopping: threading.Event, *, watch_timeout: float, read_grace: float, page_size: int,
                 backoff: Backoff, rng: Callable[[], float] = random.random,
                 first_pages: FirstPages | None = None) -> None:
        self.resource = resource
        self._first_pages = first_pages
        # The version read: the resource's first, or one of its older versions the server
        # serves instead (`_list`).
        self.api_version = resource.api_version
        self._path = resource.path
        self._api = api
        self._cluster = cluster
        self._put = put
        self._stopping = stopping
        self._watch_timeout = watch_timeout
        self._read_grace = read_grace
        self._page_size = page_size
        self._backoff = backoff
        self._rng = rng
        self._lock = threading.Lock()
        self._resp: urllib3.BaseHTTPResponse | None = None
        # for the status; written by this watch's thread only
        self.state = "starting"
        self.resource_version: str | None = None  # the last seen: where the next watch resumes
        self.listed_at: float | None = None
        self.listed_objects = 0
        self.first_page_at_start = False  # the first listing began with the page asked for at start-up
        self.watching_since: float | None = None
        self.relists = 0
        self.reconnects = 0
        self.last_error = ""
        self.last_error_at: float | None = None
        self._last_gone = float("-inf")
        self._opened: float | None = None  # when the watch in progress was opened (monotonic)
        self._delivered = False  # whether it delivered an event or a bookmark
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"l7g-k8s-{self.resource.name}", daemon=True)
        self.thread.start()

    def abort(self) -> None:
        """Unblock a read in progress (stop)."""
        with self._lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - already closed, or no socket to shut down
                pass

    def run(self) -> None:
        while not self._stopping.is_set():
            # The last version seen, moved on by every event and bookmark as it arrives, so that
            # a watch cut mid-stream resumes after the last event it delivered: resuming from an
            # older version would replay history, and apply old versions of objects again.
            rv = self.resource_version
            try:
                start = rv
                if start is None:
                    self.state = "listing"
                    start = self.resource_version = self._list()
                self.state = "watching"
                self.watching_since = time.time()
                self._watch(start)
                if not self._settle() and not self._stopping.is_set():
                    self._retry("the watch ended at once, without an event")
                    continue
                self.reconnects += 1
            except Gone as exc:
                # Too old for the server's history: only a new listing is complete.
                self._settle()
                self.relists += 1
                self._note(f"{exc}; listing again")
                if rv is None or time.monotonic() - self._last_gone < 1.0:  # do not spin on it
                    self._retry(f"{exc}; listing again")
                self._last_gone = time.monotonic()
                self.resource_version = None
            except _WatchError as exc:
                self._settle()
                self.relists += 1
                self._retry(f"{exc}; listing again")
                self.resource_version = None
            except (ApiError, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                self._settle()
                if not self._stopping.is_set():
                    self.reconnects += 1
                    self._retry(_describe(exc))
            finally:
                self.watching_since = None
        self.state = "stopped"

    def _settle(self) -> bool:
        """After a watch ended, however it ended: whether it was healthy — it delivered an
        event or a bookmark, or stayed open for a second. A healthy watch resets the back-off:
        a watch that ran for an hour and is then cut starts again from the base delay."""
        opened, self._opened = self._opened, None
        healthy = opened is not None and (self._delivered or time.monotonic() - opened >= 1.0)
        if healthy:
            self._backoff.reset()
        return healthy

    def _note(self, error: str) -> None:
        self.last_error, self.last_error_at = error, time.time()

    def _retry(self, error: str) -> None:
        self._note(error)
        self.state = "retrying"
        self._stopping.wait(self._backoff.next())

    def _list(self) -> str:
        items: list[Desired] = []
        token = ""
        versions = list(self.resource.versions)  # each tried once per listing, first first
        self.api_version = versions.pop(0)
        self._path = self.resource.path_for(self.api_version)
        # The first listing reads at any version ("0"), as client-go's reflector does: a real
        # API server answers it from its watch cache, whole, without paging (and without a
        # consistent read from etcd); a relist (after "410 Gone" or an ERROR event) reads the
        # current version, in pages. The watch resumes from the listing's version either way.
        first = self.listed_at is None
        while True:
            query = {"limit": str(self._page_size)}
            if token:
                query["continue"] = token
            elif first:
                query["resourceVersion"] = "0"
            raw = None
            if first and not token and self._first_pages is not None:
                raw, self._first_pages = self._first_pages.take(self._path, query, self._stopping), None
                self.first_page_at_start = raw is not None
            try:
                with paused():  # a page is thousands of long-lived objects (gcpause)
                    page = _object(raw, 200) if raw is not None else self._api.json("GET", self._path, query)
            except Gone:
                if not token:
                    raise
                items, token = [], ""  # the continue token expired: the list again, whole
                continue
            except ApiError as exc:
                if exc.status != 404 or token or not versions:
                    raise
                self.api_version = versions.pop(0)  # not served in this version: the next one
                self._path = self.resource.path_for(self.api_version)
                continue
            meta = page.get("metadata") or {}
            with paused():
                for obj in page.get("items") or ():
                    if isinstance(obj, Mapping):
                        items.append(project(self.resource, obj, self._cluster, api_version=self.api_version))
            token = str(meta.get("continue") or "")
            if not token:
                rv = str(meta.get("resourceVersion") or "")
                break
        self.listed_at = time.time()
        self.listed_objects = len(items)
        self._put(_Listed(self.resource, tuple(items)))
        return rv

    def _watch(self, rv: str) -> None:
        """Watch from `rv` until the stream ends, moving `resource_version` on as it goes."""
        timeout = int(self._watch_timeout * (1 + self._rng())) or 1
        query = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)}
        resp = self._api.send("GET", self._path, query, timeout=(5.0, timeout + self._read_grace))
        with self._lock:
            self._resp = resp
        self._opened, self._delivered = time.monotonic(), False
        try:
            for line in _lines(resp, self._stopping):
                rv = self._handle(line, rv)
                self.resource_version = rv
                self._delivered = True
        finally:
            with self._lock:
                self._resp = None
            # Never back into the pool with a stream half read: the next request would read it.
            resp.close()
            resp.release_conn()

    def _handle(self, line: bytes, rv: str) -> str:
        ev = json.loads(line)
        kind, obj = ev.get("type"), ev.get("object")
        if not isinstance(obj, Mapping):
            raise ValueError(f"a watch event without an object: {line[:200]!r}")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410 or obj.get("reason") in ("Expired", "Gone"):
                raise Gone(410, str(obj.get("reason", "Gone")), str(obj.get("message", "")))
            raise _WatchError(int(code) if isinstance(code, int) else 0, str(obj.get("reason", "")),
                              str(obj.get("message", "")))
        meta = obj.get("metadata")
        new_rv = str(meta.get("resourceVersion") or rv) if isinstance(meta, Mapping) else rv
        if kind == "BOOKMARK":
            return new_rv
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f"a watch event of unknown type {kind!r}")
        self._put(_Event(self.resource, project(self.resource, obj, self._cluster, deleted=kind == "DELETED",
                                                api_version=self.api_version)))
        return new_rv

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state, "api_version": self.api_version, "resource_version": self.resource_version,
            "listed_at": self.listed_at, "first_page_at_start": self.first_page_at_start,
            "listed_objects": self.listed_objects, "watching_since": self.watching_since,
            "relists": self.relists, "reconnects": self.reconnects,
            "last_error": self.last_error or None, "last_error_at": self.last_error_at,
        }


class _WatchError(ApiError):
    """An ERROR event other than 410 in a watch stream: list again after a back-off."""


def _lines(resp: urllib3.BaseHTTPResponse, stopping: threading.Event) -> Iterator[bytes]:
    """The stream's lines as they arrive (each watch event is one line of JSON)."""
    buf = b""
    while not stopping.is_set():
        chunk = resp.read1(65536)
        if not chunk:
            return
        buf += chunk
        while True:
            line, sep, rest = buf.partition(b"\n")
            if not sep:
                break
            buf = rest
            if line.strip():
                yield line


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        hint = ""
        if exc.status == 404:
            hint = (" (is the resource served? CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and "
                    "CiliumCIDRGroup need the CRDs of deploy/crds, or Cilium's)")
        elif exc.status in (401, 403):
            hint = " (the agent's credentials, or its ClusterRole, do not allow it)"
        return f"{exc}{hint}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Posts core/v1 Events about objects, on a thread of its own, so that a slow API server
    never holds up the applier. Bounded: a full queue drops the Event (it is in the log)."""

    def __init__(self, api: ApiConnection, node: str, log: Log, *, attempts: int = 3,
                 backoff: Backoff | None = None) -> None:
        self._api = api
        self._node = node
        self._log = log
        self._attempts = attempts
        self._backoff = backoff or Backoff(base=0.5, cap=5.0)
        self._queue: queue.Queue[tuple[ObjectRef, str, str] | None] = queue.Queue(maxsize=256)
        self.posted = 0
        self.last_error = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l7g-k8s-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(5)

    def warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        try:
            self._queue.put_nowait((ref, reason, message))
        except queue.Full:
            self.last_error = f"the Event queue is full: dropped {reason} for {ref}"

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            ref, reason, message = item
            for attempt in range(self._attempts):
                try:
                    self._post(ref, reason, message)
                    self.posted += 1
                    self._backoff.reset()
                    break
                except (ApiError, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                    self.last_error = f"Event {reason} for {ref}: {_describe(exc)}"
                    if attempt + 1 == self._attempts:
                        self._log(f"kubernetes: could not post {self.last_error}")
                    else:
                        time.sleep(self._backoff.next())

    def _post(self, ref: ObjectRef, reason: str, message: str) -> None:
        namespace = ref.namespace or CLUSTER_EVENTS_NAMESPACE
        now = _now()
        involved = {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name}
        if ref.namespace:
            involved["namespace"] = ref.namespace
        if ref.uid:
            involved["uid"] = ref.uid
        if ref.resource_version:
            involved["resourceVersion"] = ref.resource_version
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            # Kubernetes' recorders name an Event <object>.<unique hex>
            "metadata": {"name": f"{ref.name}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:EVENT_MESSAGE_MAX],
            "type": "Warning",
            "source": {"component": "l7gate-agent", "host": self._node},
            "reportingComponent": "l7gate.io/agent",
            "reportingInstance": self._node,
            "action": "Enforce",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._api.json("POST", f"/api/v1/namespaces/{quote(namespace, safe='')}/events", body=body)


class Watcher:
    """The Kubernetes source of one agent (module doc)."""

    def __init__(self, api: ApiConnection, sink: ObjectSink, *, cluster: str, node: str, log: Log,
                 watch_timeout: float = 300.0, read_grace: float = 30.0, page_size: int = PAGE_SIZE,
                 backoff: Callable[[], Backoff] = Backoff, resources: Sequence[Resource] = RESOURCES,
                 events: EventRecorder | None = None, early_hold: float = EARLY_HOLD,
                 first_pages: FirstPages | None = None) -> None:
        self.api = api
        self._first_pages = first_pages
        self._sink = sink
        self._early_hold = early_hold
        self.cluster = cluster
        self.node = node
        self._log = log
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._backoff = backoff
        self.events = events or EventRecorder(api, node, log)
        self.reconciler = Reconciler(sink, self)
        self.watches = [
            ResourceWatch(r, api, cluster, self._queue.put, self._stopping, watch_timeout=watch_timeout,
                          read_grace=read_grace, page_size=page_size, backoff=backoff(), first_pages=first_pages)
            for r in resources
        ]
        self._resources = tuple(r for r in RESOURCES if r in resources)  # in the order they apply
        self._applier: threading.Thread | None = None
        self._reported: dict[tuple[str, str, str], tuple[str, tuple[str, ...]]] = {}
        self.started_at: float | None = None
        self._t0 = time.monotonic()
        self.synced_at: float | None = None
        self.sync_seconds: float | None = None
        self.apply_error = ""
        # the initial sync's first listings applied ahead of the rest, and the batch they are in
        self._early: dict[Resource, Slot] = {}
        self._held: contextlib.ExitStack | None = None
        self._held_since = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.events.start()
        self._applier = threading.Thread(target=self._apply_loop, name="l7g-k8s-apply", daemon=True)
        self._applier.start()
        for w in self.watches:
            w.start()

    def stop(self) -> None:
        self._stopping.set()
        for w in self.watches:
            w.abort()
        for w in self.watches:
            if w.thread is not None:
                w.thread.join(5)
        if self._applier is not None:
            self._applier.join(10)
        self.events.stop()
        self.api.close()

    @property
    def ready(self) -> bool:
        """The first listing of every resource is applied."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    # -- the applier --------------------------------------------------------------------------

    def _drain(self, pending: Pending, first: object) -> int:
        n = 0
        item: object = first
        while True:
            if isinstance(item, _Listed):
                pending.listing(item.resource, item.items)
            elif isinstance(item, _Event):
                pending.event(item.resource, item.desired)
            n += 1
            if n >= 100_000:
                return n
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n

    def _apply_loop(self) -> None:
        pending = Pending()
        backoff = self._backoff()
        try:
            while not self._stopping.is_set():
                pending = self._apply_step(pending, backoff)
        finally:
            if self._held is not None:  # stopping during the initial sync: publish what it applied
                self._close_held()

    def _apply_step(self, pending: Pending, backoff: Backoff) -> Pending:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            first = None
        if first is not None:
            fresh = Pending()
            self._drain(fresh, first)
            pending.absorb(fresh)
        if not self.ready and not all(pending.listed(r) or r in self._early for r in self._resources):
            # the initial sync applies every first listing, in order, in one batch
            self._apply_early(pending, backoff)
            return pending
        if not pending and self._held is None:
            return pending
        left, failures = self._run(pending)
        if self._held is not None and not failures:
            error = self._close_held()
            if error:  # all of it again: what was applied ahead, and this run's own
                failures = [error]
                left = self._restore_early(pending)
        if failures:
            self._failed(failures, backoff)
            return left
        backoff.reset()
        self.apply_error = ""
        if not self.ready:
            self._early.clear()
            self.synced_at = time.time()
            self.sync_seconds = time.monotonic() - self._t0
            self._ready.set()
            if self._first_pages is not None:
                self._first_pages.discard()
            counts = ", ".join(f"{s.in_force} {r.name}" for r, s in
                               ((r, self.reconciler.stats[r.kind]) for r in self._resources))
            self._log(f"kubernetes: initial sync applied in {self.sync_seconds:.2f}s: {counts}")
        return left

    def _apply_early(self, pending: Pending, backoff: Backoff) -> None:
        """The initial sync while some first listings are still to come: the listings whose
        predecessors (in `RESOURCES` order) are all applied are applied now, inside one batch of
        the agent held open until the last is (`_held`: one publication, as if all had come at
        once, while the slow listing, pods on a large cluster, is still on its way). A batch
        held `early_hold` seconds (a listing that does not come: a resource not served, not
        allowed) is published: each resource in it is a whole listing, applied in order, and
        the agent stays not ready until the rest is applied."""
        ready = []
        for r in self._resources:
            if r in self._early:
                continue
            if not pending.listed(r):
                break
            ready.append(r)
        if ready:
            if self._held is None:
                held = contextlib.ExitStack()
                held.enter_context(self._sink.batch())
                self._held, self._held_since = held, time.monotonic()
            part = Pending()
            for r in ready:
                part.slots[r], pending.slots[r] = pending.slots[r], Slot()
            left, failures = self._run(part)
            for r in ready:
                if left.slots[r]:  # failed: kept, tried again
                    pending.slots[r] = left.slots[r]
                else:
                    self._early[r] = part.slots[r]
            if failures:
                self._failed(failures, backoff)
        if self._held is not None and time.monotonic() - self._held_since >= self._early_hold:
            missing = [r.name for r in self._resources if r not in self._early and not pending.listed(r)]
            self._log(f"kubernetes: no first listing of {', '.join(missing)} after {self._early_hold:.0f}s: "
                      f"publishing the {len(self._early)} resources applied so far; not ready until the rest is")
            error = self._close_held()
            if error:
                self._failed([error], None)
                restored = self._restore_early(pending)
                pending.slots = restored.slots

    def _run(self, pending: Pending) -> tuple[Pending, list[str]]:
        """`Reconciler.run`, a reporter's failure counted as a failure of the whole run."""
        try:
            return self.reconciler.run(pending)
        except Exception as exc:  # noqa: BLE001 - a reporter's failure: keep going
            return Pending(), [f"{type(exc).__name__}: {exc}"]

    def _failed(self, failures: Sequence[str], backoff: Backoff | None) -> None:
        """Kept in the status and the log; then the back-off's wait, if there is one."""
        self.apply_error = "; ".join(failures)
        self._log(f"kubernetes: the agent failed to apply (retrying): {self.apply_error}")
        if backoff is not None:
            self._stopping.wait(backoff.next())

    def _restore_early(self, later: Pending) -> Pending:
        """After the held batch's publication failed: the listings applied ahead, pending
        again with whatever came for them since folded in (`later`'s listings and events win),
        so that the whole initial sync is applied again, as any failed run is."""
        restored = Pending()
        for r, slot in self._early.items():
            assert slot.full is not None  # only listings are applied ahead
            restored.listing(r, slot.full.values())
        self._early.clear()
        restored.absorb(later)
        return restored

    def _close_held(self) -> str:
        """End the initial sync's held batch (the agent publishes it); what failed, or ""."""
        held, self._held = self._held, None
        assert held is not None
        try:
            held.close()
        except Exception as exc:  # noqa: BLE001 - retried as a failed apply
            return f"publishing: {type(exc).__name__}: {exc}"
        return ""

    # -- the Reporter ----------------------------------------------------------------------------

    def refused(self, ref: ObjectRef, errors: Sequence[str]) -> None:
        """An object the agent refused: the log, and an Event for a policy; once per version."""
        key = (ref.kind, ref.namespace, ref.name)
        reasons = tuple(_strip_resource(ref, e) for e in errors)
        if self._reported.get(key) == (ref.resource_version, reasons):
            return
        self._reported[key] = (ref.resource_version, reasons)
        if len(self._reported) > 10_000:
            self._reported.pop(next(iter(self._reported)))
        self._log(f"kubernetes: {ref} (resourceVersion {ref.resource_version}) refused, nothing in force "
                  f"changed: {'; '.join(reasons)}")
        if ref.kind in POLICY_KINDS:
            message = (f"l7gate agent on node {self.node} refused this policy: {'; '.join(reasons)}. Nothing in "
                       "force changed: a previous version of it, if any, is still enforced.")
            self.events.warn(ref, POLICY_INVALID, message)
        elif ref.kind == CIDRGROUPS.kind:
            message = (f"l7gate agent on node {self.node} refused this CIDR group: {'; '.join(reasons)}. Nothing "
                       "in force changed: the policies naming it keep its previous version, if any.")
            self.events.warn(ref, CIDR_GROUP_INVALID, message)

    # -- the status -------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the agent is not ready yet as far as the API is concerned (empty: it is)."""
        if self.ready:
            return []
        waiting = [w for w in self.watches if w.listed_at is None]
        what = ", ".join(w.resource.name for w in waiting) or "the agent to apply them"
        errors = "; ".join(f"{w.resource.name}: {w.last_error}" for w in waiting if w.last_error)
        return [f"kubernetes: the initial lists from {self.api.host} are not applied yet (waiting for {what})"
                + (f": {errors}" if errors else "")]

    def status(self) -> dict[str, Any]:
        resources: dict[str, Any] = {}
        refused: list[dict[str, Any]] = []
        for w in self.watches:
            r = w.resource
            st = self.reconciler.stats[r.kind]
            refusals = self.reconciler.refusals[r.kind].copy()  # the applier changes it meanwhile
            resources[r.name] = {**w.status(), "synced_at": st.synced_at, "in_force": st.in_force,
                                 "refused": len(refusals), "events": st.events, "applies": st.applies,
                                 "deletes": st.deletes}
            for ref, errs in list(refusals.values())[:20]:
                refused.append({"object": str(ref), "resource_version": ref.resource_version,
                                "errors": [_strip_resource(ref, e) for e in errs]})
        connected = all(w.state == "watching" for w in self.watches)
        return {
            "enabled": True,
            "server": self.api.host,
            "node": self.node,
            "cluster": self.cluster,
            "connection": "connected" if connected else "connecting" if not self.ready else "disconnected",
            "synced": self.ready,
            "synced_at": self.synced_at,
            "sync_seconds": None if self.sync_seconds is None else round(self.sync_seconds, 3),
            "resources": resources,
            "refused": refused,
            "apply_error": self.apply_error or None,
            "events": {"posted": self.events.posted, "last_error": self.events.last_error or None},
        }


def _strip_resource(ref: ObjectRef, error: str) -> str:
    """An agent error without its leading object name (the Event is on that object)."""
    head, sep, rest = error.partition(": ")
    if sep and head.startswith((f"{ref.kind}/", f"{ref.kind} ")) and head.endswith(ref.name):
        return rest
    return error
