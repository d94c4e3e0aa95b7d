"""The Aggregated Discovery Service (ADS): state-of-the-world and delta, served from the cache.

Theory of operation
-------------------
`XdsServer` runs a grpc.aio server on an event loop in a background thread, so that a thousand
Envoy streams cost a thousand coroutines, not a thousand threads. Everything protocol-related
runs on that loop; the rest of the agent talks to it through the thread-safe `SnapshotCache`
(writes) and `status()` / `wait()` (reads).

Each ADS stream is one `_Stream` coroutine. It wakes when a request arrives or when the cache
reports a change for its node (one cache watcher per server; the loop fans the wake-up out), and
then, per type in make-before-break order (CDS, EDS, SDS, LDS, RDS, ECDS), sends what the cache
has that the Envoy does not.

State of the world (`StreamAggregatedResources`):

- The response version is the hash of the (name, version) pairs it carries, so a version says
  exactly which content an Envoy holds. LDS and CDS are wildcard (every resource of the type);
  RDS, EDS, SDS and ECDS carry only the `resource_names` the Envoy asked for.
- A request whose `response_nonce` is not the nonce of the latest response of its type on this
  stream is stale and ignored: Envoy repeats its full subscription in every request, so nothing
  is lost, and the answer to the newer response is still to come.
- A request with the latest nonce is an ACK, or a NACK if it carries `error_detail`. Only one
  response per type is in flight: changes made meanwhile are sent once the answer arrives.
- A NACKed version is never re-sent: the stream waits for the cache to produce another one.
  The NACK is recorded with Envoy's error text; Envoy keeps its last good configuration.
- On (re)connect Envoy reports the version it holds; if that is what the cache serves now,
  nothing is sent and the type counts as acknowledged.

Delta (`DeltaAggregatedResources`):

- Per type the stream keeps what it believes the Envoy holds (name -> resource version), seeded
  from `initial_resource_versions` on (re)connect, and sends only resources whose version
  differs, plus `removed_resources` for names that are gone (or asked for and absent).
- That belief is updated when a response is sent, not when it is ACKed: a NACKed resource is not
  re-sent until it changes again. Subscription changes are applied whatever the nonce; the nonce
  decides only whether a request is an ACK or NACK of a response still outstanding.
- The first request of a type on a stream always gets a response, possibly empty, so Envoy's
  initial fetch completes instead of waiting for its timeout.
- `system_version_info` carries the same subset hash as the state-of-the-world version, so the
  status rows of both protocols compare alike.

Tracking (`status()`): per node id and type, the version sent, the version acknowledged, the
nonce, the last NACK, times, and whether the node has a live stream; classified by
`status.classify`. `on_ack(node_id, type_url, version, latency_seconds)` and
`on_nack(node_id, type_url, version, error)` hooks run on the server's loop: they must not block.

Thread-safety: `start`, `stop`, `status`, `status_json` and `wait` may be called from any
thread, except the server's own loop. A server can be started once; make a new one (with the
same cache) to restart. All servers of a process share one event loop thread (`_grpc_loop`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from l7gate.xds.cache import (
    SHORT_NAMES,
    TYPE_ORDER,
    TYPE_URLS,
    WILDCARD_TYPES,
    CachedResource,
    Snapshot,
    SnapshotCache,
    version_from_total,
    version_of,
    version_of_resources,
)
from l7gate.xds.status import Nack, StatusRow, SyncState, classify, rows_to_json

__all__ = ["AckHook", "NackHook", "XdsServer", "StatusRow", "SyncState", "Nack"]

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
AckHook = Callable[[str, str, str, float], None]
NackHook = Callable[[str, str, str, str], None]

# Told-absent marker in a delta stream's view of the client: the client was told (via
# removed_resources) that a name it subscribed to does not exist.
_ABSENT = ""
# How long a delta stream lets a burst of requests gather before answering them at once.
COALESCE_SECONDS = 0.002


def served(
    snap: Snapshot, type_url: str, names: AbstractSet[str] | None, *, ordered: bool = True,
) -> tuple[str, list[CachedResource]]:
    """The version and resources of `type_url` for a subscription (`names` None = wildcard);
    the resources in name order unless `ordered` is false (the version does not depend on it)."""
    by_name = snap.resources[type_url]
    if names is None:
        return snap.versions[type_url], list(by_name.values())
    entries = [by_name[n] for n in (sorted(names) if ordered else names) if n in by_name]
    return version_of_resources(entries), entries


@dataclass(slots=True)
class _Track:
    """Mutable tracking record of one (node, type); guarded by `XdsServer._lock`."""

    protocol: str
    names: frozenset[str] | set[str] | None  # a delta stream's live set of names (read under the lock)
    sent_version: str | None = None
    nonce: str | None = None
    last_sent: float | None = None
    acked_version: str | None = None
    last_ack: float | None = None
    ack_latency: float | None = None
    last_nack: Nack | None = None
    pushes: int = 0  # responses sent for this (node, type)


_shared_loop: asyncio.AbstractEventLoop | None = None
_shared_loop_lock = threading.Lock()


def _grpc_loop() -> asyncio.AbstractEventLoop:
    """The event loop every XdsServer of this process runs on, in one daemon thread.

    grpc.aio binds each event loop that ever used it to one process-wide completion queue and
    keeps dispatching to it; a loop closed when a server stops then makes later completions fail
    with "Event loop is closed" (grpc/grpc#23377, #36096). One loop that lives as long as the
    process avoids that, and a restarted server (or a second agent in a test) reuses it.
    """
    global _shared_loop
    with _shared_loop_lock:
        if _shared_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="xds-server", daemon=True).start()
            _shared_loop = loop
        return _shared_loop


class XdsServer:
    """An ADS server over `cache`, listening on `address` ("host:port", port 0 picks one, or
    "unix:/path"). Thread-safe; see the module docstring. Use as a context manager or call
    `start()` and `stop()`.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        address: str = "127.0.0.1:0",
        *,
        on_ack: AckHook | None = None,
        on_nack: NackHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        grpc_options: Sequence[tuple[str, Any]] = (),
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> None:
        self.cache = cache
        # Other gRPC services on the same listener (the access log service for Envoy's ALS).
        self._extra_handlers = tuple(extra_handlers)
        self._requested_address = address
        self._on_ack = on_ack
        self._on_nack = on_nack
        self._clock = clock
        self._wall = wall_clock
        self._options: list[tuple[str, Any]] = [
            # A second agent on the same port must fail to bind, not share the port's traffic.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 2**20),
            *grpc_options,
        ]
        self._address: str | None = None
        self._port: int | None = None
        self._done: concurrent.futures.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._grace: float | None = 1.0
        self._start_error: BaseException | None = None
        self._stopping = False
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._live: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound address: "127.0.0.1:<port>" with the real port, or "unix:/path"."""
        if self._address is None:
            raise RuntimeError("server not started")
        return self._address

    @property
    def port(self) -> int | None:
        """The bound TCP port (None for a unix socket)."""
        return self._port

    def start(self, timeout: float = 10.0) -> str:
        """Bind and start serving; returns the bound address. Raises if binding fails."""
        if self._done is not None:
            raise RuntimeError("an XdsServer starts once; create a new one to restart")
        ready = threading.Event()
        self._done = asyncio.run_coroutine_threadsafe(self._run(ready), _grpc_loop())
        if not ready.wait(timeout):
            raise TimeoutError(f"xDS server did not start within {timeout} s")
        if self._start_error is not None:
            raise self._start_error
        if self.address.startswith("unix:"):
            # The stream serves the whole policy and takes access logs (flows): only the
            # agent's user (its Envoy) may connect, wherever the socket is (docs/security.md).
            os.chmod(self.address[len("unix:"):], 0o600)
        return self.address

    def stop(self, grace: float | None = 1.0) -> None:
        """End every stream, stop listening, and wait (up to `grace` s for in-flight RPCs)."""
        loop, event, done = self._loop, self._stop_event, self._done
        if loop is None or event is None or done is None:
            return
        self._grace = grace
        loop.call_soon_threadsafe(event.set)
        done.result()

    def __enter__(self) -> XdsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _run(self, ready: threading.Event) -> None:
        try:
            await self._main(ready)
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not ready.is_set():
                self._start_error = exc
                ready.set()
            else:
                log.exception("xDS server failed")

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers((self._handler(), *self._extra_handlers))
        try:
            port = server.add_insecure_port(self._requested_address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind xDS server to {self._requested_address}: {exc}") from exc
        if self._requested_address.startswith("unix:"):
            self._address = self._requested_address
        else:
            if port == 0:
                raise OSError(f"cannot bind xDS server to {self._requested_address}")
            host = self._requested_address.rsplit(":", 1)[0]
            self._address, self._port = f"{host}:{port}", port
        await server.start()
        unwatch = self.cache.watch(self._cache_changed)
        ready.set()
        try:
            await self._stop_event.wait()
        finally:
            unwatch()
            self._stopping = True
            for stream in list(self._streams):
                stream.wake.set()
            await server.stop(self._grace)

    def _handler(self) -> Any:
        # Registered by hand (what ads_pb2_grpc.add_..._to_server does) so the servicer needs
        # no subclass of an untyped generated class.
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._serve_sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._serve_delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
                ),
            },
        )

    # grpc.aio recognises streaming handlers by being async generator functions.
    async def _serve_sotw(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in _SotwStream(self).serve(requests):
            yield response

    async def _serve_delta(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in _DeltaStream(self).serve(requests):
            yield response

    def _cache_changed(self, nodes: frozenset[str]) -> None:
        # Called in the cache writer's thread: hop onto the loop once per change, not per stream.
        loop = self._loop
        if loop is None or self._stopping:
            return
        try:
            loop.call_soon_threadsafe(self._wake_streams, nodes)
        except RuntimeError:  # loop closed while stopping
            pass

    def _wake_streams(self, nodes: frozenset[str]) -> None:
        everyone = "*" in nodes
        for stream in self._streams:
            if stream.node_id is not None and (everyone or stream.node_id in nodes):
                stream.dirty = True
                stream.wake.set()

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    # -- tracking (called on the loop) ----------------------------------------------------

    def _connected(self, node_id: str, delta: int) -> None:
        with self._changed:
            self._live[node_id] = self._live.get(node_id, 0) + delta
            self._changed.notify_all()

    def _track_start(
        self, node_id: str, type_url: str, protocol: str, names: frozenset[str] | set[str] | None,
        reported: str | None,
    ) -> None:
        with self._changed:
            old = self._tracks.get((node_id, type_url))
            # A new stream: what was sent on the old one is moot; what the Envoy says it holds
            # is its acknowledged version. The last NACK stays as history.
            self._tracks[(node_id, type_url)] = _Track(
                protocol=protocol,
                names=names,
                acked_version=reported,
                last_ack=self._wall() if reported is not None else None,
                last_nack=old.last_nack if old is not None else None,
            )
            self._changed.notify_all()

    def _track_names(self, node_id: str, type_url: str, names: frozenset[str] | set[str] | None) -> None:
        with self._changed:
            track = self._tracks.get((node_id, type_url))
            if track is not None:
                track.names = names

    def _track_sent(self, node_id: str, type_url: str, version: str, nonce: str) -> None:
        with self._changed:
            track = self._tracks[(node_id, type_url)]
            track.sent_version, track.nonce, track.last_sent = version, nonce, self._wall()
            track.pushes += 1
            self._changed.notify_all()

    def _track_ack(self, node_id: str, type_url: str, version: str, latency: float) -> None:
        with self._changed:
            track = self._tracks[(node_id, type_url)]
            track.acked_version, track.last_ack = version, self._wall()
            track.ack_latency = latency
            self._changed.notify_all()
        if self._on_ack is not None:
            try:
                self._on_ack(node_id, type_url, version, latency)
            except Exception:  # noqa: BLE001 - a metrics hook must not break the stream
                log.exception("on_ack hook failed")

    def _track_nack(
        self, node_id: str, type_url: str, version: str, nonce: str, error: str
    ) -> None:
        log.warning(
            "node %r rejected %s version %s: %s",
            node_id, SHORT_NAMES.get(type_url, type_url), version, error,
        )
        with self._changed:
            track = self._tracks[(node_id, type_url)]
            track.last_nack = Nack(version=version, error=error, at=self._wall(), nonce=nonce)
            self._changed.notify_all()
        if self._on_nack is not None:
            try:
                self._on_nack(node_id, type_url, version, error)
            except Exception:  # noqa: BLE001 - a metrics hook must not break the stream
                log.exception("on_nack hook failed")

    # -- status --------------------------------------------------------------------------

    def status(self, type_url: str | None = None) -> list[StatusRow]:
        """One row per (node id, type) ever seen by this server, sorted by node then type; of
        `type_url` only, if given (a row costs a pass over its subscription: the ECDS row of a
        node with 100 proxied ports is 13,000 names)."""
        with self._lock:
            tracks = [  # a delta stream's names are its live set: copied here, under the lock
                (node, t, dataclasses.replace(tr, names=None if tr.names is None else frozenset(tr.names)))
                for (node, t), tr in self._tracks.items()
                if type_url is None or t == type_url
            ]
            live = dict(self._live)
        rows = []
        order = {t: i for i, t in enumerate(TYPE_ORDER)}
        for node, t, tr in sorted(tracks, key=lambda x: (x[0], order.get(x[1], 99))):
            snap = self.cache.snapshot_for(node)
            current: str | None = None
            count = 0
            if snap is not None:
                current, entries = served(snap, t, tr.names, ordered=False)
                count = len(entries)
            rows.append(
                StatusRow(
                    node_id=node,
                    type_url=t,
                    type=SHORT_NAMES.get(t, t),
                    protocol=tr.protocol,
                    connected=live.get(node, 0) > 0,
                    state=classify(current, tr.sent_version, tr.acked_version, tr.last_nack,
                                   connected=live.get(node, 0) > 0),
                    cache_version=current,
                    sent_version=tr.sent_version,
                    acked_version=tr.acked_version,
                    nonce=tr.nonce,
                    resources=count,
                    last_sent=tr.last_sent,
                    last_ack=tr.last_ack,
                    ack_latency=tr.ack_latency,
                    last_nack=tr.last_nack,
                    pushes=tr.pushes,
                )
            )
        return rows

    def status_json(self) -> dict[str, Any]:
        """`status()` grouped by node, JSON-serialisable (the `/v1/xds/status` body)."""
        return rows_to_json(self.status())

    def wait(self, predicate: Callable[[list[StatusRow]], bool], timeout: float) -> bool:
        """Block until `predicate(self.status())` holds or `timeout` s pass; returns whether
        it held. Re-evaluated on every tracking change; also on cache changes, every 50 ms."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.status()):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait(min(left, 0.05))

    def wait_synced(self, node_id: str, timeout: float, types: Iterable[str] = ()) -> bool:
        """Wait until every tracked type of `node_id` (or every one of `types`) is SYNCED."""
        wanted = frozenset(types)

        def ok(rows: list[StatusRow]) -> bool:
            mine = [r for r in rows if r.node_id == node_id]
            if wanted and {r.type_url for r in mine} < wanted:
                return False
            return bool(mine) and all(
                r.state is SyncState.SYNCED for r in mine if not wanted or r.type_url in wanted
            )

        return self.wait(ok, timeout)


    def subscribed(self, node_id: str, type_url: str, names: Iterable[str]) -> set[str]:
        """Of `names`, those the node's Envoy subscribes to now (on a live stream)."""
        with self._lock:
            track = self._tracks.get((node_id, type_url))
            if track is None or track.names is None or self._live.get(node_id, 0) <= 0:
                return set()
            return {n for n in names if n in track.names}


class _Stream:
    """One ADS stream; runs on the server's loop only."""

    protocol = ""

    def __init__(self, server: XdsServer) -> None:
        self.server = server
        self.node_id: str | None = None
        self.inbox: deque[Any] = deque()
        self.wake = asyncio.Event()
        self.dirty = False
        self.closed = False

    async def serve(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        server = self.server
        if server._stopping:
            return
        reader = asyncio.create_task(self._read(requests))
        server._streams.add(self)
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.closed or server._stopping:
                    return
                if self.coalesce and not self.closed and any(
                    r.resource_names_subscribe for r in self.inbox
                ):
                    # Envoy subscribes to a classifier's 129 slots one request each, in a
                    # burst: answer the burst in one response, not 129 (13,000 responses and
                    # as many ACKs for a node with 100 proxied ports made most of its sync).
                    await asyncio.sleep(COALESCE_SECONDS)
                out: list[Any] = self._handle_all()
                if self.dirty and self.node_id is not None:
                    self.dirty = False
                    for type_url in TYPE_ORDER:
                        out.extend(self.push(type_url))
                for response in out:
                    yield response
        finally:
            reader.cancel()
            server._streams.discard(self)
            if self.node_id is not None:
                server._connected(self.node_id, -1)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                self.inbox.append(request)
                self.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream is an ended stream
            log.debug("xDS stream of %r ended: %s", self.node_id, exc)
        finally:
            self.closed = True
            self.wake.set()

    coalesce = False  # whether a burst of requests is answered once (`_handle_all`)

    def _handle_all(self) -> list[Any]:
        """The answers to every request in the inbox, one by one."""
        out: list[Any] = []
        while self.inbox:
            out.extend(self._handle(self.inbox.popleft()))
        return out

    def _handle(self, request: Any) -> list[Any]:
        if self.node_id is None:
            # Envoy may send the node only in the first request of a stream.
            self.node_id = request.node.id
            self.server._connected(self.node_id, +1)
        if request.type_url not in TYPE_URLS:
            log.info("node %r asked for unserved type %r", self.node_id, request.type_url)
            return []
        try:
            return self.handle(request)
        except Exception:  # noqa: BLE001 - one bad request must not end the stream
            log.exception("xDS request from %r failed", self.node_id)
            return []

    def handle(self, request: Any) -> list[Any]:
        raise NotImplementedError

    def push(self, type_url: str) -> list[Any]:
        raise NotImplementedError


@dataclass(slots=True)
class _SotwType:
    names: frozenset[str] | None
    reported: str | None  # the version the Envoy said it holds when it (re)subscribed
    nonce: str | None = None
    sent_version: str | None = None
    sent_at: float = 0.0
    in_flight: bool = False


class _SotwStream(_Stream):
    protocol = "sotw"

    def __init__(self, server: XdsServer) -> None:
        super().__init__(server)
        self.types: dict[str, _SotwType] = {}

    def handle(self, request: Any) -> list[Any]:
        server, node, t = self.server, self.node_id or "", request.type_url
        names = None if t in WILDCARD_TYPES else frozenset(request.resource_names)
        st = self.types.get(t)
        if request.response_nonce:
            if st is None or request.response_nonce != st.nonce:
                log.debug("node %r: stale nonce %r for %s", node, request.response_nonce, t)
                return []
            st.in_flight = False
            version = st.sent_version or ""  # set together with the nonce
            if request.HasField("error_detail"):
                server._track_nack(
                    node, t, version, request.response_nonce, request.error_detail.message
                )
            else:
                # The Envoy's own word for what it now holds; it is the version just sent.
                acked = request.version_info or version
                server._track_ack(node, t, acked, server._clock() - st.sent_at)
        else:
            reported = request.version_info or None
            st = self.types[t] = _SotwType(names=names, reported=reported)
            server._track_start(node, t, self.protocol, names, reported)
        if names != st.names:
            st.names = names
            server._track_names(node, t, names)
        return self.push(t)

    def push(self, type_url: str) -> list[Any]:
        st = self.types.get(type_url)
        if st is None or st.in_flight:
            return []
        snap = self.server.cache.snapshot_for(self.node_id or "")
        if snap is None:
            return []
        version, entries = served(snap, type_url, st.names)
        if version == st.sent_version:
            return []  # sent already: ACKed, or NACKed and not to be re-sent
        if st.sent_version is None and version == st.reported:
            return []  # the Envoy already holds exactly this
        nonce = self.server.next_nonce()
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce
        )
        response.resources.extend(e.packed for e in entries)
        st.nonce, st.sent_version, st.sent_at = nonce, version, self.server._clock()
        st.in_flight = True
        self.server._track_sent(self.node_id or "", type_url, version, nonce)
        return [response]


@dataclass(slots=True)
class _DeltaType:
    wildcard: bool
    names: set[str] = field(default_factory=set)  # changed under the server's lock (status reads it)
    # The subscription's version, kept up to date name by name (`cache.version_of`): the
    # entry hashes of the subscribed names present in the snapshot of type version `hashed_at`.
    hashes: dict[str, int] = field(default_factory=dict)
    total: int = 0
    hashed_at: str | None = None
    known: dict[str, str] = field(default_factory=dict)  # what the Envoy holds, by our count
    seen_type_version: str | None = None  # cache type version at the last diff
    owes_first: bool = True  # the first response is due even if it is empty
    outstanding: dict[str, tuple[str, float]] = field(default_factory=dict)  # nonce → sent
    sent_version: str | None = None  # of the last response

    def subscription(self) -> frozenset[str] | None:
        return None if self.wildcard else frozenset(self.names)


class _DeltaStream(_Stream):
    protocol = "delta"
    coalesce = True

    def __init__(self, server: XdsServer) -> None:
        super().__init__(server)
        self.types: dict[str, _DeltaType] = {}
        self._batch: dict[str, set[str]] | None = None  # while `_handle_all` runs: changed names by type

    def _handle_all(self) -> list[Any]:
        """Every request in the inbox taken in order (ACKs, NACKs, (un)subscriptions), then one
        response per type for all of them: what answering them one by one would send, merged
        (a later request's subscription is answered with the earlier ones')."""
        batch: dict[str, set[str]] = {}
        self._batch = batch
        try:
            for _ in range(len(self.inbox)):
                self._handle(self.inbox.popleft())
        finally:
            self._batch = None
        out: list[Any] = []
        for type_url in sorted(batch, key=lambda t: TYPE_ORDER.index(t) if t in TYPE_ORDER else 99):
            out.extend(self.push(type_url, batch[type_url]))
        return out

    def handle(self, request: Any) -> list[Any]:
        server, node, t = self.server, self.node_id or "", request.type_url
        subscribe = list(request.resource_names_subscribe)
        initial: Mapping[str, str] = request.initial_resource_versions
        st = self.types.get(t)
        if st is None:
            # An empty first subscription to LDS/CDS is the legacy wildcard; "*" is explicit.
            wildcard = "*" in subscribe or (t in WILDCARD_TYPES and not subscribe)
            st = self.types[t] = _DeltaType(wildcard=wildcard, known=dict(initial))
            reported = None
            if initial:  # the version of what the Envoy holds, as `served` computes one
                reported = version_of(initial.items())
            # the live set (changed under the lock): the status view copies it under the lock
            server._track_start(node, t, self.protocol, None if wildcard else st.names, reported)
        if request.response_nonce:
            sent = st.outstanding.get(request.response_nonce)
            if sent is None:
                log.debug("node %r: stale nonce %r for %s", node, request.response_nonce, t)
            else:
                # Responses are answered in order: this one settles every older one too.
                for nonce in list(st.outstanding):
                    del st.outstanding[nonce]
                    if nonce == request.response_nonce:
                        break
                version, sent_at = sent
                if request.HasField("error_detail"):
                    server._track_nack(
                        node, t, version, request.response_nonce, request.error_detail.message
                    )
                else:
                    server._track_ack(node, t, version, server._clock() - sent_at)
        was_wildcard = st.wildcard
        unsubscribe = list(request.resource_names_unsubscribe)
        with server._lock:  # status copies the names meanwhile
            for name in subscribe:
                if name == "*":
                    st.wildcard = True
                    continue
                st.names.add(name)
                if name not in initial and not st.wildcard:
                    # An explicit (re)subscription asks for the resource even if we sent it before.
                    st.known.pop(name, None)
            for name in unsubscribe:
                if name == "*":
                    st.wildcard = False
                    continue
                st.names.discard(name)
                if not st.wildcard:
                    st.known.pop(name, None)
        if st.wildcard != was_wildcard:
            st.seen_type_version = st.hashed_at = None  # everything is looked at again
            server._track_names(node, t, None if st.wildcard else st.names)
        changed = {n for n in (*subscribe, *unsubscribe) if n != "*"}
        if self._batch is not None:
            self._batch.setdefault(t, set()).update(changed)
            return []
        return self.push(t, changed)

    def push(self, type_url: str, changed: set[str] | None = None) -> list[Any]:
        """What the Envoy is owed of `type_url`: everything, when the snapshot's type changed
        since the last look (or the subscription turned wildcard or back), else only the
        `changed` names it (un)subscribed — one request costs what it names, not the whole
        subscription."""
        st = self.types.get(type_url)
        if st is None:
            return []
        snap = self.server.cache.snapshot_for(self.node_id or "")
        if snap is None:
            return []
        type_version = snap.versions[type_url]
        whole = type_version != st.seen_type_version
        if not whole and not changed and not st.owes_first:
            return []
        st.seen_type_version = type_version
        present = snap.resources[type_url]
        known = st.known
        upserts: list[CachedResource] = []
        removed: list[str] = []
        if st.wildcard:
            upserts = [e for name, e in present.items() if known.get(name) != e.version]
            for name in [n for n in known if n not in present]:
                if name in st.names:
                    if known[name] != _ABSENT:
                        removed.append(name)
                        known[name] = _ABSENT
                else:
                    removed.append(name)
                    del known[name]
        else:
            for name in sorted(st.names if whole or changed is None else changed & st.names):
                entry = present.get(name)
                if entry is not None:
                    if known.get(name) != entry.version:
                        upserts.append(entry)
                elif known.get(name) != _ABSENT:
                    # Tell the Envoy it does not exist, so it stops waiting for it.
                    removed.append(name)
                    known[name] = _ABSENT
        if not upserts and not removed and not st.owes_first:
            if not changed:
                return []
            # Names unsubscribed (or subscribed again, already held): nothing to send, but the
            # subscription's version moved; an empty response says so, else the status would
            # call the node stale until the next change (e.g. after a listener drained).
            version = self._version(st, snap, type_url, None if whole else changed)
            if version == st.sent_version:
                return []
        else:
            st.owes_first = False
            for entry in upserts:
                known[entry.name] = entry.version
            version = self._version(st, snap, type_url, None if whole else changed)
        st.sent_version = version
        nonce = self.server.next_nonce()
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=type_url, nonce=nonce
        )
        for entry in upserts:
            response.resources.add(name=entry.name, version=entry.version, resource=entry.packed)
        response.removed_resources.extend(removed)
        st.outstanding[nonce] = (version, self.server._clock())
        self.server._track_sent(self.node_id or "", type_url, version, nonce)
        return [response]

    @staticmethod
    def _version(st: _DeltaType, snap: Snapshot, type_url: str, changed: set[str] | None) -> str:
        """`served(snap, type_url, subscription)`'s version, kept up to date name by name."""
        if st.wildcard:
            return snap.versions[type_url]
        present = snap.resources[type_url]
        type_version = snap.versions[type_url]
        if changed is None or st.hashed_at != type_version:
            st.hashes = {n: present[n].hash for n in st.names if n in present}
            st.total = sum(st.hashes.values())
            st.hashed_at = type_version
        else:
            for n in changed:
                old = st.hashes.pop(n, None)
                if old is not None:
                    st.total -= old
                entry = present.get(n)
                if entry is not None and n in st.names:
                    h = st.hashes[n] = entry.hash
                    st.total += h
        return version_from_total(st.total)
