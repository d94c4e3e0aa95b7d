"""Encryption in transit, published: keeps the node's Envoy and kernel in step with a
`tunnel_plan.TunnelPlan` (docs/in-transit-mtls.md).

Per plan, the node's Envoy gets (through the snapshot cache, next to the publisher's resources,
with names of their own, as one `SnapshotDelta` per plan):
- SDS: the SVID of every local identity the tunnel uses, and the trust bundle;
- destination side: the tunnel listener on `<node address>:<tunnelPort>`, its route (per local
  endpoint port: per client certificate identity, the port's decisions) and the ORIGINAL_DST
  cluster;
- source side, per remote (pod ip, port): a transparent egress listener on that address, its
  route (local source address → the tunnel cluster of the source's identity) and the clusters.

The kernel's tunnel map (source identity, destination identity, TCP, port) sends local pods'
connections to the egress listeners. It is written only after Envoy has acknowledged the
listeners (a redirect to a listener that does not exist yet would be refused); removals go
the other way round: the kernel first, then Envoy.

Rotation: a new SVID replaces its SDS secret; Envoy uses it for new handshakes, with no
listener change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message

from . import mtls_translate as mt
from .cache import CLUSTER, LISTENER, ROUTE, SECRET, Snapshot, SnapshotDelta
from .tunnel_plan import TCP, TunnelKey, TunnelPlan

log = logging.getLogger(__name__)


class SVIDPem(Protocol):
    """An identity's certificate chain and key (`mtls.svid.SVID` is one)."""

    @property
    def chain_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...


class SVIDs(Protocol):
    """What the tunnel needs of the node's SVIDs (`mtls.store.SVIDStore` provides it)."""

    @property
    def trust_domain(self) -> str: ...

    def svid(self, identity: int) -> SVIDPem: ...

    def bundle_pem(self) -> bytes: ...

    def subscribe(self, callback: Callable[[int], None]) -> None: ...

    def subscribe_bundle(self, callback: Callable[[], None]) -> None: ...


class Sink(Protocol):
    """What the tunnel needs from the snapshot cache (`cache.SnapshotCache` provides it)."""

    def apply(self, node_id: str, delta: SnapshotDelta) -> Snapshot: ...


@dataclass
class TunnelStatus:
    plan: TunnelPlan = field(default_factory=TunnelPlan.empty)
    listener_version: str = ""
    kernel_written: frozenset[TunnelKey] = frozenset()
    kernel_at: float = 0.0
    error: str = ""


class Tunnels:
    """Publishes a `TunnelPlan` to the node's Envoy and the kernel's tunnel map."""

    def __init__(
        self,
        sink: Sink,
        node_id: str,
        store: SVIDs,
        node_ip: str,
        tunnel_port: int,
        set_kernel: Callable[[frozenset[TunnelKey]], object],
        listeners_acked: Callable[[str, float], bool],
        access_logs: Sequence[Message] = (),
        ingress_access_logs: Sequence[Message] = (),
        listener_access_logs: Sequence[Message] = (),
        tcp_access_logs: Sequence[Message] = (),
    ) -> None:
        self.sink = sink
        self.node_id = node_id
        self.store = store
        self.td = store.trust_domain
        self.node_ip = node_ip
        self.port = tunnel_port
        self.set_kernel = set_kernel
        self.listeners_acked = listeners_acked
        self.access_logs = access_logs
        self.ingress_access_logs = ingress_access_logs or access_logs
        self.listener_access_logs = listener_access_logs
        self.tcp_access_logs = tcp_access_logs  # source side, TCP variant (tcp_proxy)
        self._lock = threading.Lock()
        self._names: dict[str, set[str]] = {SECRET: set(), CLUSTER: set(), ROUTE: set(), LISTENER: set()}
        self._status = TunnelStatus()
        self._wanted: tuple[frozenset[TunnelKey], str] | None = None
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._kernel_loop, name="l7g-tunnel", daemon=True)
        self._thread.start()
        store.subscribe(self._rotated)
        store.subscribe_bundle(self._bundle_changed)

    # -- Envoy ------------------------------------------------------------------------------------

    def _secret(self, ident: int) -> Message:
        svid = self.store.svid(ident)
        return mt.svid_secret(self.td, ident, svid.chain_pem, svid.key_pem)

    def _rotated(self, ident: int) -> None:
        with self._lock:
            if mt.svid_secret_name(self.td, ident) not in self._names[SECRET]:
                return
        try:
            delta = SnapshotDelta()
            delta.put(SECRET, {
                mt.svid_secret_name(self.td, ident): self._secret(ident),
                mt.bundle_secret_name(self.td): mt.bundle_secret(self.td, self.store.bundle_pem()),
            })
            self.sink.apply(self.node_id, delta)
        except Exception as exc:  # noqa: BLE001 - rotation must not kill the store's thread
            log.warning("tunnel: rotated SVID of identity %d not published: %s", ident, exc)

    def _bundle_changed(self) -> None:
        """A new trust bundle (a CA rotation, or SPIRE's bundle update) reaches Envoy at once:
        one SDS update; the next handshakes verify against it. Nothing to do while the tunnel
        publishes no secret."""
        with self._lock:
            if mt.bundle_secret_name(self.td) not in self._names[SECRET]:
                return
        try:
            delta = SnapshotDelta()
            delta.put(SECRET, {mt.bundle_secret_name(self.td): mt.bundle_secret(self.td, self.store.bundle_pem())})
            self.sink.apply(self.node_id, delta)
        except Exception as exc:  # noqa: BLE001 - must not kill the store's thread
            log.warning("tunnel: new trust bundle not published: %s", exc)

    def apply(self, new: TunnelPlan) -> None:
        """Publish `new`; the kernel follows once Envoy has the listeners."""
        with self._lock:
            old = self._status.plan
            if new == old and not self._status.error:
                return
            kernel_old = self._status.kernel_written
        # Removals from the kernel first: no connection may be redirected to a listener that
        # is about to go away.
        shrink = kernel_old & new.kernel
        if shrink != kernel_old:
            self.set_kernel(shrink)
            with self._lock:
                self._status.kernel_written = shrink
        secrets: dict[str, Message] = {}
        for ident in sorted(new.svid_identities):
            try:
                secrets[mt.svid_secret_name(self.td, ident)] = self._secret(ident)
            except Exception as exc:  # noqa: BLE001 - no SVID yet: that identity's tunnel waits
                log.info("tunnel: no SVID for identity %d yet: %s", ident, exc)
        if secrets:
            secrets[mt.bundle_secret_name(self.td)] = mt.bundle_secret(self.td, self.store.bundle_pem())
        clusters: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        listeners: dict[str, Message] = {}
        ingress_ids = {i for i in new.ingress_identities if mt.svid_secret_name(self.td, i) in secrets}
        if new.ingress and ingress_ids:
            ing = mt.tunnel_ingress(self.node_ip, self.td, new.ingress, ingress_ids, self.port,
                                    access_logs=self.ingress_access_logs,
                                    listener_access_logs=self.listener_access_logs)
            clusters.update((c.name, c) for c in ing.clusters)
            routes[ing.route.name] = ing.route
            listeners[ing.listener.name] = ing.listener
        # A source identity without its SVID yet gets no tunnel cluster, so the kernel must
        # not send its connections to the egress listener either (they would be refused).
        kernel = frozenset(k for k in new.kernel if mt.svid_secret_name(self.td, k[0]) in secrets)
        for (ip, port), eg in sorted(new.egress.items()):
            sources = {s: a for s, a in eg.sources.items() if mt.svid_secret_name(self.td, s) in secrets}
            if not sources:
                continue
            remote = mt.RemotePort(eg.remote.ip, eg.remote.port, eg.remote.identity, eg.remote.node,
                                   eg.remote.node_ip, self.port)
            e = mt.tunnel_egress(remote, self.td, sources, transparent=True, access_logs=self.access_logs,
                                 tcp_sources=eg.tcp_sources, tcp_access_logs=self.tcp_access_logs,
                                 egress_http={i: d for i, d in eg.egress_http.items() if i in sources})
            for c in e.clusters:
                clusters[c.name] = c
            routes[e.route.name] = e.route
            listeners[e.listener.name] = e.listener
        names = {SECRET: set(secrets), CLUSTER: set(clusters), ROUTE: set(routes), LISTENER: set(listeners)}
        with self._lock:
            gone = {k: self._names[k] - names[k] for k in names}
        try:
            # One snapshot: the cache checks it is consistent, so no order of types to keep.
            delta = SnapshotDelta()
            for type_url, resources in ((SECRET, secrets), (CLUSTER, clusters), (ROUTE, routes), (LISTENER, listeners)):
                delta.put(type_url, resources)
                delta.remove(type_url, gone[type_url])
            lds = self.sink.apply(self.node_id, delta).version(LISTENER)
        except Exception as exc:  # noqa: BLE001 - keep the last good tunnel config; say why
            log.error("tunnel: configuration refused: %s", exc)
            with self._lock:
                self._status.error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            self._names = names
            self._status.plan = new
            self._status.listener_version = lds
            self._status.error = ""
            self._wanted = (kernel, lds)
            self._wake.notify_all()

    # -- kernel -----------------------------------------------------------------------------------

    def _kernel_loop(self) -> None:
        while True:
            with self._lock:
                while self._wanted is None and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                assert self._wanted is not None
                kernel, version = self._wanted
            # Envoy must hold the egress listeners before the kernel sends connections to them.
            acked = self.listeners_acked(version, 10.0)
            with self._lock:
                if self._wanted != (kernel, version):
                    continue  # a newer plan arrived meanwhile
                self._wanted = None
            if not acked:
                log.warning("tunnel: Envoy has not acknowledged listeners %s after 10 s; "
                            "writing the kernel's tunnel map anyway", version)
            try:
                self.set_kernel(kernel)
            except Exception as exc:  # noqa: BLE001
                log.error("tunnel: kernel map not written: %s", exc)
                with self._lock:
                    self._status.error = f"kernel: {exc}"
                continue
            with self._lock:
                self._status.kernel_written = kernel
                self._status.kernel_at = time.time()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=5)

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            st = self._status
            p = st.plan
            return {
                "listen": f"{self.node_ip}:{self.port}",
                "trust_domain": self.td,
                "ingress": [
                    {"endpoint": f"{ip}:{port}"} for ip, port in sorted(p.ingress)
                ],
                "egress": [
                    {
                        "destination": f"{ip}:{port}",
                        "identity": e.remote.identity,
                        "node": f"{e.remote.node_ip}:{self.port}",
                        "sources": sorted(e.sources),
                        "tcp_sources": sorted(e.tcp_sources),
                        "ready": all((s, e.remote.identity, TCP, port) in st.kernel_written for s in e.sources),
                    }
                    for (ip, port), e in sorted(p.egress.items())
                ],
                "kernel": [
                    {"source": s, "destination": d, "port": port}
                    for s, d, _, port in sorted(st.kernel_written)
                ],
                "listener_version": st.listener_version,
                "error": st.error,
            }
