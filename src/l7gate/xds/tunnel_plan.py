"""Encryption in transit, the plan: which connections go Envoy to Envoy over mTLS
(docs/in-transit-mtls.md). Pure: no I/O; `xds.tunnel` publishes a plan.

A connection from local pod `s` to remote pod `d` (on another l7gate node) on TCP port `p` is
*tunnelled* when `d`'s ingress decision for `s` on `p` requires mutual authentication and allows
something (`mapstate.tunnel_needed`): with HTTP rules, the requests go through the tunnel (HTTP
variant); with an L3/L4 allow, the connection's bytes, as an HTTP/2 CONNECT stream (TCP variant,
`mapstate.tunnel_tcp`). The destination node computes the same decision for its own endpoints
and marks those kernel entries `TUNNEL`: plaintext from other nodes is refused there. Both sides
use the same map (`resolve`) and the same decision (`mapstate.PortView`), so they agree.

The source node does not hold `d`'s resolved policy (the agent's resolver computes maps for local
endpoints only). `plan()` finds the candidates by scanning the rules for auth-required ingress
rules whose subject selects a remote identity and whose peers select a local one, then decides
each candidate exactly from `d`'s map computed apart (`resolve.resolve_endpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..policy.labels import Labels
from ..policy.mapstate import Action, Decision, EndpointPolicy, PortView, tunnel_needed, tunnel_tcp
from ..policy.namedports import NO_NAMED_PORTS, NamedPorts
from ..policy.resolve import resolve_endpoint
from ..policy.types import AuthMode, Direction, NamedPort, Policy, Protocol as L4Protocol
from . import mtls_translate as mt
from . import rbac

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
    policy_of: Callable[[int], EndpointPolicy | None]  # the resolver's endpoint_policy (local endpoints)
    # the named container ports of each identity's pods (for the rules' named ports)
    named_ports: Mapping[int, NamedPorts] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EgressPort:
    remote: mt.RemotePort
    sources: Mapping[int, tuple[str, ...]]  # local source identity → its local pod addresses
    tcp_sources: frozenset[int] = frozenset()  # the sources whose decision is an L3/L4 allow
    # Sources with egress HTTP rules towards the remote on this port (their own egress policy's
    # decision, Action.HTTP): the source node's tunnel egress listener applies them
    # (docs/egress-http.md); such a source always takes the HTTP variant.
    egress_http: Mapping[int, Decision] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TunnelPlan:
    ingress: Mapping[tuple[str, int], rbac.PortDecisions]  # local (pod ip, port) needing the tunnel
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
    policies: Sequence[Policy], remote: Sequence[PodView], local: Sequence[PodView],
    named_ports: Mapping[int, NamedPorts],
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
                            if isinstance(pp, NamedPort):  # the destination's port of that name
                                n = named_ports.get(d.identity, NO_NAMED_PORTS).number(
                                    pp.name, L4Protocol.TCP, every_pod=True)  # d's ingress
                                if n is not None:
                                    ports.add(n)
                            elif pp.ports.lo == pp.ports.hi:
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
    ingress: dict[tuple[str, int], rbac.PortDecisions] = {}
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
            dec = rbac.port_decisions(pol, port, known)
            if tunnel_needed(dec.world) or any(tunnel_needed(x) for x in dec.peers.values()):
                ingress[(p.ip, port)] = dec
                ingress_ids.add(p.identity)

    # Source side: exact decisions of the remote destinations' ingress policy.
    candidates = _auth_ingress_candidates(inputs.policies, remote, local, inputs.named_ports)
    kernel: set[TunnelKey] = set()
    tcp: set[TunnelKey] = set()  # the TCP variant's share of `kernel`
    for d, per_source in sorted(candidates.items()):
        d_labels = inputs.identities.get(d)
        if d_labels is None:
            continue
        d_policy = resolve_endpoint(
            d,
            {d: d_labels} | {s: inputs.identities[s] for s in per_source if s in inputs.identities},
            inputs.policies,
            {d: inputs.named_ports[d]} if d in inputs.named_ports else None,
        )
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
    own: dict[tuple[int, int, int], Decision | None] = {}  # (s, d, port) → s's egress HTTP decision
    for p in remote:
        for port, srcs in pairs.get(p.identity, {}).items():
            egress_http: dict[int, Decision] = {}
            for s in sorted(srcs):
                key = (s, p.identity, port)
                if key not in own:
                    mine = PortView(inputs.policy_of(s), Direction.EGRESS, port, L4Protocol.TCP).decide(p.identity)
                    own[key] = mine if mine.action is Action.HTTP else None
                found = own[key]
                if found is not None:
                    egress_http[s] = found
            egress[(p.ip, port)] = EgressPort(
                mt.RemotePort(p.ip, port, p.identity, p.node or p.node_ip, p.node_ip, 0),
                {s: tuple(sorted(sources_of.get(s, ()))) for s in sorted(srcs)},
                frozenset(s for s in srcs if (s, p.identity, TCP, port) in tcp and s not in egress_http),
                egress_http,
            )
    return TunnelPlan(ingress, frozenset(ingress_ids), egress, frozenset(kernel))
