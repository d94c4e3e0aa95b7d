"""Encryption in transit: which connections go Envoy to Envoy over mTLS, and keeping the
node's Envoy and kernel in step with that (docs/in-transit-mtls.md).

Theory of operation. A connection from local pod `s` to remote pod `d` (on another l7gate
node) on TCP port `p` is *tunnelled* when `d`'s ingress decision for `s` on `p` requires mutual
authentication and allows something (`compile.tunnel_needed`): with HTTP rules, the requests go
through the tunnel (HTTP variant); with an L3/L4 allow, the connection's bytes, as an HTTP/2
CONNECT stream (TCP variant, `compile.tunnel_tcp`). The destination node computes the
same decision for its own endpoints and marks those kernel entries `TUNNEL`: plaintext from
other nodes is refused there. Both sides use the resolver and `decide`, so they agree.

The source node does not hold `d`'s resolved policy (the resolver computes maps for local
endpoints only). `plan()` finds the candidates by scanning the rules for auth-required ingress
rules whose subject selects a remote identity and whose peers select a local one, then decides
each candidate exactly with a small resolver holding only the policies that select `d`.

Per plan, the node's Envoy gets (through the snapshot cache, next to the publisher's
resources, with names of their own):
- SDS: the SVID of every local identity the tunnel uses, and the trust bundle;
- destination side: the tunnel listener on `<node address>:<tunnelPort>`, its route (per local
  endpoint port: per client certificate identity, the port's decisions) and the
  ORIGINAL_DST cluster;
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

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message

from ..mtls.store import SVIDStore
from ..policy.labels import Labels
from ..policy.repository import Repository
from ..policy.resolve import PortView, Resolver
from ..policy.types import AuthMode, Direction, Policy, Protocol as L4Protocol
from ..redirect_bpf.compile import tunnel_needed, tunnel_tcp
from ..xds import mtls_translate as mt
from ..xds import translate as t
from ..xds.cache import CLUSTER, LISTENER, ROUTE, SECRET
from .core import AgentCore, PodRecord

log = logging.getLogger(__name__)

TCP = 6
TunnelKey = tuple[int, int, int, int]  # (source identity, destination identity, IP protocol, port)


@dataclass(frozen=True, slots=True)
class PodView:
    identity: int
    labels: Labels
    ip: str
    local: bool
    ports: tuple[int, ...]  # declared TCP ports
    node: str = ""  # remote pods: the node's name (or address)
    node_ip: str = ""  # remote pods: status.hostIP


@dataclass(frozen=True, slots=True)
class TunnelInputs:
    pods: tuple[PodView, ...]
    policies: tuple[Policy, ...]
    identities: Mapping[int, Labels]
    policy_of: Callable[[int], Any]  # the resolver's endpoint_policy (local endpoints)


@dataclass(frozen=True, slots=True)
class EgressPort:
    remote: mt.RemotePort
    sources: Mapping[int, tuple[str, ...]]  # local source identity → its local pod addresses
    tcp_sources: frozenset[int] = frozenset()  # the sources whose decision is an L3/L4 allow


@dataclass(frozen=True, slots=True)
class TunnelPlan:
    ingress: Mapping[tuple[str, int], t.PortDecisions]  # local (pod ip, port) needing the tunnel
    ingress_identities: frozenset[int]  # local identities the tunnel listener answers for
    egress: Mapping[tuple[str, int], EgressPort]
    kernel: frozenset[TunnelKey]

    @property
    def svid_identities(self) -> frozenset[int]:
        return self.ingress_identities | {s for e in self.egress.values() for s in e.sources}

    @classmethod
    def empty(cls) -> TunnelPlan:
        return cls({}, frozenset(), {}, frozenset())


def _auth_ingress_candidates(
    policies: Sequence[Policy], remote: Sequence[PodView], local: Sequence[PodView]
) -> dict[int, dict[int, set[int]]]:
    """remote identity → local identity → ports that some auth-required ingress allow rule on
    the remote identity could tunnel (a superset: `plan` decides each exactly)."""
    out: dict[int, dict[int, set[int]]] = {}
    for pol in policies:
        for rule in pol.rules:
            auth_rules = [
                pr for pr in rule.rules
                if pr.direction is Direction.INGRESS and not pr.deny and pr.auth is AuthMode.REQUIRED
            ]
            if not auth_rules:
                continue
            targets = [p for p in remote if rule.selects(p.labels)]
            if not targets:
                continue
            for pr in auth_rules:
                sources = {
                    p.identity for p in local
                    if pr.peers is None or any(sel.matches(p.labels) for sel in pr.peers)
                }
                if not sources:
                    continue
                for d in targets:
                    ports: set[int] = set()
                    for port_rule in pr.effective_port_rules:
                        for pp in port_rule.ports:
                            if not pp.protocol.covers(L4Protocol.TCP):
                                continue
                            if pp.ports.lo == pp.ports.hi:
                                ports.add(pp.ports.lo)
                            else:  # a range: the ports the destination pod declares in it
                                ports.update(x for x in d.ports if pp.ports.contains(x))
                    if ports:
                        per = out.setdefault(d.identity, {})
                        for s in sources:
                            per.setdefault(s, set()).update(ports)
    return out


def plan(inputs: TunnelInputs) -> TunnelPlan:
    """Which connections this node tunnels (source side) and which of its endpoint ports
    accept tunnelled requests only (destination side). Pure."""
    local = [p for p in inputs.pods if p.local]
    remote = [p for p in inputs.pods if not p.local and p.node_ip]

    # Destination side: local endpoint ports where some peer's decision needs the tunnel.
    ingress: dict[tuple[str, int], t.PortDecisions] = {}
    ingress_ids: set[int] = set()
    known = list(inputs.identities)
    for p in local:
        pol = inputs.policy_of(p.identity)
        if pol is None or not any(e.auth is AuthMode.REQUIRED for e in pol.ingress.values()):
            continue  # (cheap test first: most endpoints have no auth-required rule)
        # The declared ports, and every single port an auth-required entry names, declared or
        # not: the source tunnels a rule's single ports whatever the pod declares
        # (`_auth_ingress_candidates`), so this end must accept them.
        ports = set(p.ports) | {
            k.ports.lo for k, e in pol.ingress.items()
            if e.auth is AuthMode.REQUIRED and k.ports.lo == k.ports.hi and k.ports.lo
            and k.protocol.covers(L4Protocol.TCP)
        }
        for port in sorted(ports):
            dec = t.port_decisions(pol, port, known)
            if tunnel_needed(dec.world) or any(tunnel_needed(x) for x in dec.peers.values()):
                ingress[(p.ip, port)] = dec
                ingress_ids.add(p.identity)

    # Source side: exact decisions of the remote destinations' ingress policy.
    candidates = _auth_ingress_candidates(inputs.policies, remote, local)
    kernel: set[TunnelKey] = set()
    tcp: set[TunnelKey] = set()  # the TCP variant's share of `kernel`
    for d, per_source in sorted(candidates.items()):
        d_labels = inputs.identities.get(d)
        if d_labels is None:
            continue
        selecting = [pol for pol in inputs.policies if any(r.selects(d_labels) for r in pol.rules)]
        resolver = Resolver(Repository())
        for pol in selecting:
            resolver.upsert_policy(pol)
        resolver.update_identities(
            {d: d_labels} | {s: inputs.identities[s] for s in per_source if s in inputs.identities}
        )
        resolver.add_endpoint(d)
        d_policy = resolver.endpoint_policy(d)
        for s, ports in per_source.items():
            for port in ports:
                decision = PortView(d_policy, Direction.INGRESS, port, L4Protocol.TCP).decide(s)
                if tunnel_needed(decision):
                    kernel.add((s, d, TCP, port))
                    if tunnel_tcp(decision):
                        tcp.add((s, d, TCP, port))

    # Source addresses pick the tunnel cluster (and so the certificate): an address two local
    # identities share (host-network pods) could be either, so it gets no tunnel at all (its
    # connections meet the egress listener's refusal, never another identity's certificate).
    owners: dict[str, set[int]] = {}
    for p in local:
        owners.setdefault(p.ip, set()).add(p.identity)
    sources_of: dict[int, list[str]] = {}
    for p in local:
        if len(owners[p.ip]) == 1:
            sources_of.setdefault(p.identity, []).append(p.ip)
    egress: dict[tuple[str, int], EgressPort] = {}
    pairs: dict[int, dict[int, set[int]]] = {}  # d → port → sources
    for s, d, _, port in kernel:
        pairs.setdefault(d, {}).setdefault(port, set()).add(s)
    for p in remote:
        for port, srcs in pairs.get(p.identity, {}).items():
            egress[(p.ip, port)] = EgressPort(
                mt.RemotePort(p.ip, port, p.identity, p.node or p.node_ip, p.node_ip, 0),
                {s: tuple(sorted(sources_of.get(s, ()))) for s in sorted(srcs)},
                frozenset(s for s in srcs if (s, p.identity, TCP, port) in tcp),
            )
    return TunnelPlan(ingress, frozenset(ingress_ids), egress, frozenset(kernel))


# -- Envoy and kernel ---------------------------------------------------------------------------


class Sink(Protocol):
    def update(
        self, node_id: str, type_url: str, upserted: Mapping[str, Message], removed: Iterable[str]
    ) -> str: ...


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
        store: SVIDStore,
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
            self.sink.update(self.node_id, SECRET, {mt.svid_secret_name(self.td, ident): self._secret(ident)}, ())
            self.sink.update(self.node_id, SECRET, {mt.bundle_secret_name(self.td): mt.bundle_secret(self.td, self.store.bundle_pem())}, ())
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
            self.sink.update(self.node_id, SECRET, {
                mt.bundle_secret_name(self.td): mt.bundle_secret(self.td, self.store.bundle_pem())}, ())
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
                                 tcp_sources=eg.tcp_sources, tcp_access_logs=self.tcp_access_logs)
            for c in e.clusters:
                clusters[c.name] = c
            routes[e.route.name] = e.route
            listeners[e.listener.name] = e.listener
        names = {SECRET: set(secrets), CLUSTER: set(clusters), ROUTE: set(routes), LISTENER: set(listeners)}
        with self._lock:
            gone = {k: self._names[k] - names[k] for k in names}
        try:
            # Every intermediate snapshot stays consistent: secrets, clusters, routes, then
            # listeners; removals in the reverse order.
            self.sink.update(self.node_id, SECRET, secrets, ())
            self.sink.update(self.node_id, CLUSTER, clusters, ())
            self.sink.update(self.node_id, ROUTE, routes, ())
            lds = self.sink.update(self.node_id, LISTENER, listeners, gone[LISTENER])
            self.sink.update(self.node_id, ROUTE, {}, gone[ROUTE])
            self.sink.update(self.node_id, CLUSTER, {}, gone[CLUSTER])
            self.sink.update(self.node_id, SECRET, {}, gone[SECRET])
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


def inputs_from_core(core: AgentCore) -> TunnelInputs:
    """The planner's inputs from an `AgentCore` (`AgentCore.tunnel_state`)."""
    pods, policies, identities, policy_of = core.tunnel_state()
    return TunnelInputs(pod_views(pods), policies, identities, policy_of)


def pod_views(records: Iterable[PodRecord]) -> tuple[PodView, ...]:
    """PodViews from the core's pod records (`agent.core.PodRecord`)."""
    out: list[PodView] = []
    for rec in records:
        pod = rec.pod
        if pod.ip is None or ipaddress.ip_address(pod.ip).version != 4:
            continue
        ports = tuple(sorted({port for port, proto in pod.ports if proto == "TCP"}))
        out.append(PodView(rec.identity, rec.labels, pod.ip, rec.local, ports,
                           pod.node_name or (pod.host_ip or ""), pod.host_ip or ""))
    return tuple(out)
