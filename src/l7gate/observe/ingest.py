"""Datapath events → flows: the ingestion pipeline.

Theory of operation
-------------------
Every source of verdicts delivers its own typed events; each has one pure converter
`(event, IngestContext) -> tuple[Flow, ...]` that raises `MalformedEvent` (or anything else) on
input it cannot read (`ingest_context` holds what converters share). The sources today:

- ``als``: Envoy's HTTP access log entries (`envoy.data.accesslog.v3.HTTPAccessLogEntry`,
  received over gRPC by `als.AccessLogReceiver`), decided by `envoy_flows.http_log_record`;
- ``als-tcp``: the mTLS tunnel listener's TCP access log entries, `envoy_flows.tcp_log_flows`;
- ``bpf-drop``: the kernel datapath's drops (`records.KernelDrop`), `kernel_flows.kernel_drop_flows`;
- ``dns``: the node's DNS proxy's queries and answers (`records.DNSRecord`), `dns_flows.dns_flows`;
- ``h11``: the h11 engine's requests (`records.HTTPRecord`), `envoy_flows.http_record_flows`.

Mutual authentication would plug in the same way, without touching the ring, the filters, the
renderers or the metrics: an ``auth`` source with an `AuthEvent` (identity pair, handshake
result) giving a flow whose `auth_type` is SPIRE and, for a failed handshake, an
"Authentication required" drop. Each source is registered in `Ingestor(converters=...)` and fed
with `offer(source, events)`.

A converter may also return a `flow.LazyFlows` instead of flows: the event decided (how many
flows, how they count, every reason it is malformed found) but not built. Envoy's access log
entries are — at full load they are most of what a node ingests, and most flows are never
read. The ring holds it for its flows; a reader builds them (or, for the stream, writes their
lines without building them). Its metrics are those of the flows of the first event of its
`shape`, built once: events of one shape count alike.

`Ingestor` decouples the event's producer from the conversion: `offer` (called on the gRPC
event loop, which also serves xDS) only appends the batch to a bounded queue and returns; the
ingestion thread converts, counts and publishes to the ring. A full queue refuses the batch and
counts its events as lost — the producer is never blocked. A batch is converted event by event:
an event that fails to convert is counted as malformed and skipped, the others go on. The
counters are updated once per batch, and within a batch an address is resolved (and looked up
as a Service backend) once.

Thread-safety: `offer`, `ingest`, `ingest_items`, `stats` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry, TCPAccessLogEntry

from .dns_flows import SOURCE_DNS, dns_flows
from .envoy_flows import (KNOWN_METHODS, SOURCE_ALS, SOURCE_ALS_TCP, SOURCE_H11, http_log_record, http_record_flows,
                          tcp_log_flows)
from .flow import Flow, FlowItem, LazyFlows, Service, Verdict, materialize_all
from .ingest_context import IngestContext, PeerInfo
from .kernel_flows import SOURCE_KERNEL, kernel_drop_flows
from .ring import FlowRing

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 65536

# Any: a converter is typed by the event it reads, but is handed whatever its source's producer
# offered (the queue holds every source's events), so it checks the type itself. It returns the
# event's flows (a tuple or a list), or a LazyFlows standing for them.
Converter = Callable[[Any, IngestContext], "Sequence[Flow] | LazyFlows"]
# What a flow adds to the counters: (verdict, type, direction), drop reason, (method, code, verdict).
_FlowKeys = tuple[tuple[str, str, str], str, "tuple[str, str, str] | None"]
_MAX_SHAPES = 4096

def method_label(method: str) -> str:
    """A bounded label value: a client chooses the method, Prometheus must not grow with it."""
    return method if method in KNOWN_METHODS else "OTHER"


@dataclass(slots=True)
class IngestStats:
    """Counters since start. Owned by the Ingestor; `Ingestor.stats()` returns a copy."""

    events: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    flows: dict[tuple[str, str, str], int] = field(default_factory=dict)  # verdict, type, direction
    drops: dict[str, int] = field(default_factory=dict)  # reason
    http: dict[tuple[str, str, str], int] = field(default_factory=dict)  # method, code, verdict

    def copy(self) -> IngestStats:
        return IngestStats(
            dict(self.events), dict(self.malformed), dict(self.lost), dict(self.flows),
            dict(self.drops), dict(self.http),
        )


def _inc(d: dict[str, int], key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


class Ingestor:
    """Converts events from every source into flows and publishes them to `ring`.

    `offer` is non-blocking and bounded (`max_pending` events waiting); `ingest` converts
    synchronously in the caller's thread. `start()` runs the ingestion thread that drains what
    `offer` queued; `stop()` ends it after the queue is drained. Thread-safe.
    """

    def __init__(
        self,
        ring: FlowRing,
        ctx: IngestContext,
        *,
        converters: Mapping[str, Converter] | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.ring = ring
        self.ctx = ctx
        self.converters: dict[str, Converter] = dict(
            converters or {SOURCE_ALS: http_log_record, SOURCE_KERNEL: kernel_drop_flows,
                           SOURCE_ALS_TCP: tcp_log_flows, SOURCE_DNS: dns_flows, SOURCE_H11: http_record_flows}
        )
        self.max_pending = max_pending
        self._stats = IngestStats()
        self._stats_lock = threading.Lock()
        self._shapes: dict[Hashable, tuple[_FlowKeys, ...]] = {}  # LazyFlows.shape → its flows' keys
        self._pending: deque[tuple[str, Sequence[object]]] = deque()
        self._pending_events = 0
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- producer side -------------------------------------------------------------------------

    def offer(self, source: str, events: Sequence[object]) -> bool:
        """Queue `events` for the ingestion thread. False (and counted as lost) when the queue
        is full or the ingestor is stopped: the caller is never blocked."""
        n = len(events)
        if n == 0:
            return True
        with self._cond:
            if self._stopping or self._pending_events + n > self.max_pending:
                with self._stats_lock:
                    _inc(self._stats.lost, source, n)
                return False
            self._pending.append((source, events))
            self._pending_events += n
            self._cond.notify_all()  # the ingestion thread, and any `drain` waiting
        return True

    def http_access_logs(self, entries: Sequence[HTTPAccessLogEntry]) -> None:
        """The `AccessLogReceiver` batch sink."""
        self.offer(SOURCE_ALS, entries)

    def tcp_access_logs(self, entries: Sequence[TCPAccessLogEntry]) -> None:
        """The `AccessLogReceiver` TCP batch sink."""
        self.offer(SOURCE_ALS_TCP, entries)

    # -- conversion ----------------------------------------------------------------------------

    def ingest(self, source: str, events: Iterable[object]) -> list[Flow]:
        """Convert and publish now; returns the flows (built). Bad events are counted and
        skipped."""
        return materialize_all(self.ingest_items(source, events))

    def ingest_items(self, source: str, events: Iterable[object]) -> list[FlowItem]:
        """`ingest`, with the flows as published (not built): what the ingestion thread does."""
        convert = self.converters.get(source)
        ctx = _batch_context(self.ctx)
        items: list[FlowItem] = []
        eager: list[Flow] = []
        tally: dict[Hashable, list[Any]] = {}  # shape → [its flows' keys, events]
        known = self._shapes
        bad = 0
        n = 0
        for ev in events:
            n += 1
            if convert is None:
                bad += 1
                continue
            try:
                out = convert(ev, ctx)
                if isinstance(out, (tuple, list)):
                    flows = [_with_services(f, ctx) for f in out]
                    eager.extend(flows)
                    items.extend(flows)
                    continue
                lazy: LazyFlows = out  # type: ignore[assignment]  # not a sequence: lazy
                shape = lazy.shape
                t = tally.get(shape)
                if t is None:
                    keys = known.get(shape)
                    if keys is None:
                        if len(known) >= _MAX_SHAPES:
                            known.clear()
                        keys = known[shape] = tuple(_flow_keys(f) for f in lazy.flows())
                    t = tally[shape] = [keys, 0]
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop ingestion
                bad += 1
                if bad == 1:
                    log.debug("%s event skipped: %s: %s", source, type(exc).__name__, exc)
                continue
            t[1] += 1
            c = lazy.count
            items.append((lazy, 0))
            if c == 2:
                items.append((lazy, 1))
            elif c > 2:
                items.extend((lazy, i) for i in range(1, c))
        self._count(source, n, bad, eager, tally.values())
        self.ring.publish(items)
        return items

    def _count(self, source: str, n: int, bad: int, flows: list[Flow], shapes: Iterable[list[Any]] = ()) -> None:
        """Add a batch to the counters: `flows` built, and `shapes` ([the keys of an event's
        flows, how many events had them])."""
        tally: dict[tuple[_FlowKeys, ...], int] = {}
        for keys, c in shapes:
            tally[keys] = tally.get(keys, 0) + c
        for f in flows:
            k = (_flow_keys(f),)
            tally[k] = tally.get(k, 0) + 1
        with self._stats_lock:
            s = self._stats
            _inc(s.events, source, n)
            if bad:
                _inc(s.malformed, source, bad)
            fl, dr, ht = s.flows, s.drops, s.http
            for keys, c in tally.items():
                for key, drop, hk in keys:
                    fl[key] = fl.get(key, 0) + c
                    if drop:
                        dr[drop] = dr.get(drop, 0) + c
                    if hk is not None:
                        ht[hk] = ht.get(hk, 0) + c

    def stats(self) -> IngestStats:
        with self._stats_lock:
            return self._stats.copy()

    @property
    def pending(self) -> int:
        return self._pending_events

    # -- the ingestion thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l7gate-flows", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batches = list(self._pending)
                self._pending.clear()
                self._busy = True
            try:
                for source, events in batches:
                    try:
                        self.ingest_items(source, events)
                    except Exception:  # noqa: BLE001 - the thread must outlive any bug
                        log.exception("flow ingestion failed for a %s batch", source)
            finally:
                with self._cond:
                    self._pending_events -= sum(len(e) for _, e in batches)
                    self._busy = False
                    self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything offered so far is ingested (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


def _flow_keys(f: Flow) -> _FlowKeys:
    l7 = f.l7
    hk = None
    # One count per request, on the flow that ends it: the response, or the drop or error that
    # stood in for one.
    if l7 is not None and l7.http is not None and (f.is_reply or f.verdict is not Verdict.FORWARDED):
        c = l7.http.code
        hk = (method_label(l7.http.method), str(c) if 0 <= c <= 999 else "other", f.verdict.value)
    return (f.verdict.value, f.type.value, f.traffic_direction.value), f.drop_reason_desc, hk


def _batch_context(ctx: IngestContext) -> IngestContext:
    """`ctx` for one batch: each address resolved, each (address, port) looked up as a Service
    backend, once (a batch is converted at one moment; a failed resolution is not kept)."""
    peers: dict[str, PeerInfo] = {}
    services: dict[tuple[str, int], Service | None] = {}
    resolve, service_of = ctx.resolve, ctx.service_of

    def resolve_once(ip: str) -> PeerInfo:
        info = peers.get(ip)
        if info is None:
            info = peers[ip] = resolve(ip)
        return info

    def service_once(ip: str, port: int) -> Service | None:
        key = (ip, port)
        try:
            return services[key]
        except KeyError:
            svc = services[key] = service_of(ip, port)
            return svc

    return replace(ctx, resolve=resolve_once, service_of=service_once)


def _with_services(f: Flow, ctx: IngestContext) -> Flow:
    """`f` with the Services its sides are backends of (as Hubble names `destination_service`
    after the load balancer chose the backend: the socket LB hands the backend's address on)."""
    src = ctx.service_of(f.source.ip, f.source.port) if f.source.port else None
    dst = ctx.service_of(f.destination.ip, f.destination.port) if f.destination.port else None
    if src is None and dst is None:
        return f
    return replace(f, source_service=src, destination_service=dst)
