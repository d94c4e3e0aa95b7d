"""The reference evaluator: the slow, obvious reading of the policy rules.

`evaluate(rules, flow)` walks every rule for every flow; nothing is cached or precomputed. It is
the specification the fast paths (resolved maps, Envoy config, BPF maps, the h11 engine) are
tested against, so it is written to be read next to Cilium's documentation:

  egress of the source (if it is an endpoint under policy), then ingress of the destination:
  1. A rule applies when its subject selector selects the endpoint.
  2. No rule applies in this direction → allowed (the endpoint is not in default-deny).
  3. A peer rule matches when a peer selector selects the peer (no peer selector: every peer;
     an empty rule `{}` matches nothing) and one of its ports covers the flow's port/protocol.
     A rule without `toPorts` and `icmps` covers every protocol and port, ICMP included;
     `protocol: ANY` is TCP, UDP and SCTP; ICMP is covered by `icmps` types (the flow's
     "port" is the ICMP type).
     A named port (`port: http`) is a container port of the flow's destination (the endpoint
     itself on ingress, the peer on egress): it covers the port its pods declare under that
     name for the flow's protocol, and nothing when they declare none or disagree, or, on
     ingress, when some pods of the identity do not declare it (`namedports`).
  4. Deny wins over allow: any matching deny rule drops the flow at L3/L4.
  5. No matching allow rule → dropped if the direction is default-deny, allowed otherwise.
  6. Allows are a union. If any matching allow requires authentication (the strongest mode
     wins), the flow needs a valid auth entry, and `test-always-fail` never has one.
  7. If any matching allow has no L7 rules, L7 is not restricted (an L4 allow makes L7 rules on
     that port moot). Otherwise the request must match one HTTP rule of one matching allow, on
     the normalized path; otherwise it is denied at L7 (Envoy answers 403). A DNS query (egress
     to port 53 under `rules.dns`) must match one name rule (`matchName`/`matchPattern`);
     otherwise the DNS proxy refuses it. A TLS connection (`tls_sni`) must name, in its
     ClientHello, a well-formed server name one `serverNames` pattern of one matching allow
     matches (Cilium's wildcards, `policy.fqdn.server_name_matches`); a TLS connection without
     SNI never does. Where any matching allow has `serverNames`, plain-text requests are refused
     whatever the HTTP rules of the others (Cilium: all traffic to that peer and port must be
     TLS); where they hold only HTTP rules, TLS connections are refused.
  `fromNodes`/`toNodes` peers select nodes only (`host`, `remote-node` identities), by the labels
  of their Node, which a node identity carries as `node:<key>` (`selector.NodeSelector`).
  `toFQDNs` peers select the addresses learned from DNS answers: a peer's labels carry
  `fqdn:<selector>` for each selector matching a name it was learned for (`policy.fqdn`).
  A `cidrGroupRef`/`cidrGroupSelector` entry selects an address when a group it names (given
  in `groups`; a group not given does not exist, and selects nothing) holds a CIDR around the
  address's prefix that no `except` range of the entry holds whole, and no `except` range holds
  the address's prefix; a group CIDR covering a whole family also selects `world`.
  A `toServices` entry selects an address when a Service it names (given in `services`; one not
  given does not exist, and selects nothing) has no selector and lists the address among its
  ready or serving endpoints: the address's prefix is that endpoint's host prefix (`/32`). A
  Service with a selector selects nothing through it.
  An identity the caller does not know is `world`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from .cidrgroup import CIDRGroup
from .labels import Labels, reserved
from .fqdn import NameMatch, fqdn, server_name_matches
from .icmp import describe_icmp_type
from .namedports import NO_NAMED_PORTS, NamedPorts
from .selector import CIDRGroupPeer, PeerSelector, ServicePeer, identity_prefix
from .toservices import ServiceTarget
from .pathnorm import normalize_path
from .types import ANY_PORT, AuthMode, Direction, HTTPRequest, HTTPRule, NamedPort, PeerRule, PortRule, Protocol, Rule

WORLD_ID = 2
WORLD_LABELS = Labels.of({reserved("world"): ""})


class Layer(str, Enum):
    L3L4 = "l3l4"
    L7 = "l7"
    AUTH = "auth"


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a flow. `managed` is true for an endpoint whose policy l7gate enforces;
    `named_ports` are the named container ports of the pods of its identity (for the named
    ports of rules, when it is the flow's destination)."""

    identity: int
    labels: Labels
    managed: bool = True
    name: str = ""
    named_ports: NamedPorts = NO_NAMED_PORTS


@dataclass(frozen=True, slots=True)
class Flow:
    source: Peer
    destination: Peer
    port: int  # the destination port; for ICMP, the ICMP type
    protocol: Protocol = Protocol.TCP
    http: HTTPRequest | None = None
    authenticated: bool = False  # a valid auth entry exists for (source, destination)
    dns: str | None = None  # a DNS query for this name (to port 53), judged by `rules.dns`
    # A TLS connection whose ClientHello names this server ("": none), judged by `serverNames`
    tls_sni: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    layer: Layer | None  # where it was decided, when denied; None when allowed
    reasons: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()  # policies that allowed or denied it
    redirected: bool = False  # went through the L7 proxy
    auth_required: bool = False

    @property
    def verdict(self) -> str:
        return "allowed" if self.allowed else "denied"


def peer_for(
    identities: Mapping[int, Labels], ident: int, *, managed: bool = False,
    named_ports: Mapping[int, NamedPorts] | None = None,
) -> Peer:
    """A flow party from an identity number; unknown numbers are `world`. `named_ports`: the
    named container ports per identity."""
    labels = identities.get(ident)
    if labels is None:
        return Peer(WORLD_ID, WORLD_LABELS, managed=False)
    return Peer(ident, labels, managed=managed,
                named_ports=(named_ports or {}).get(ident, NO_NAMED_PORTS))


@dataclass(slots=True)
class _Side:
    allowed: bool = True
    layer: Layer | None = None
    reasons: list[str] = field(default_factory=list)
    policies: set[str] = field(default_factory=set)
    redirected: bool = False
    auth_required: bool = False


def _covers(pr: PortRule, port: int, protocol: Protocol, destination: NamedPorts, every_pod: bool) -> bool:
    for pp in pr.ports:
        if isinstance(pp, NamedPort):
            # "a named port is the destination's container port of that name"
            if pp.protocol.covers(protocol) and destination.number(pp.name, protocol, every_pod=every_pod) == port:
                return True
        elif pp.covers(port, protocol):
            return True
    return False


# What a rule without ports stands for in the list of matched rules: no L7 rules.
_EVERYTHING = PortRule((ANY_PORT,))


def where(port: int, protocol: Protocol) -> str:
    """"8080/TCP", or "ICMP type 8 (EchoRequest)"."""
    if protocol is Protocol.ICMP:
        return f"ICMP type {describe_icmp_type(port)}"
    return f"{port}/{protocol.value}"


def _describe(peer: Peer) -> str:
    return peer.name or f"identity {peer.identity}"


def _in_group_cidr(peer: CIDRGroupPeer, labels: Labels, groups: Mapping[str, CIDRGroup]) -> bool:
    """The module doc's reading of a CIDR group entry, spelled out."""
    prefix = identity_prefix(labels)
    for name in sorted(groups):
        group = groups[name]
        if not peer.selects_group(group.name, group.labels):
            continue
        for net in group.cidrs:
            if any(net.version == e.version and net.subnet_of(e) for e in peer.excepts):  # type: ignore[arg-type]
                continue  # the whole CIDR is excepted
            if prefix is None:
                family = "world-ipv4" if net.version == 4 else "world-ipv6"
                if net.prefixlen == 0 and (reserved("world") in labels or reserved(family) in labels):
                    return True
                continue
            if prefix.version != net.version or not prefix.subnet_of(net):  # type: ignore[arg-type]
                continue
            if not any(prefix.version == e.version and prefix.subnet_of(e) for e in peer.excepts):  # type: ignore[arg-type]
                return True
    return False


def _at_service_endpoint(peer: ServicePeer, labels: Labels, services: Mapping[str, ServiceTarget]) -> bool:
    """The module doc's reading of a `toServices` entry, spelled out."""
    prefix = identity_prefix(labels)
    if prefix is None:
        return False  # pods and reserved identities are no Service's endpoint address
    for key in sorted(services):
        svc = services[key]
        if svc.has_selector or not peer.selects_service(svc.namespace, svc.name, svc.labels):
            continue
        if prefix in svc.addresses:
            return True
    return False


def _explain_services(peer: ServicePeer, services: Mapping[str, ServiceTarget]) -> str:
    """What a `toServices` entry selects, in words."""
    named = [services[k] for k in sorted(services) if peer.selects_service(services[k].namespace, services[k].name,
                                                                           services[k].labels)]
    if not named:
        return f"toServices {peer}: no such Service is known, so it selects nothing"
    parts = []
    for t in named:
        if t.has_selector:
            parts.append(f"Service {t.key} has a selector, which toServices does not select (nothing)")
        elif not t.addresses:
            parts.append(f"Service {t.key} has no ready or serving endpoint (nothing)")
        else:
            parts.append(f"Service {t.key}, the addresses {', '.join(a.with_prefixlen for a in t.addresses)}")
    return f"toServices {peer} selects " + "; ".join(parts)


@dataclass(frozen=True, slots=True)
class _Referenced:
    """The objects references are read against: CIDR groups by name, Services by namespace/name."""

    groups: Mapping[str, CIDRGroup]
    services: Mapping[str, ServiceTarget]


def _selects(sel: PeerSelector, labels: Labels, refs: _Referenced) -> bool:
    if isinstance(sel, CIDRGroupPeer):
        return _in_group_cidr(sel, labels, refs.groups)
    if isinstance(sel, ServicePeer):
        return _at_service_endpoint(sel, labels, refs.services)
    return sel.matches(labels)


def _evaluate_direction(
    rules: Iterable[Rule], direction: Direction, subject: Peer, peer: Peer, flow: Flow, refs: _Referenced,
) -> _Side:
    side = _Side()
    d = direction.value
    selecting = [r for r in rules if r.selects(subject.labels)]
    if not selecting:
        side.reasons.append(f"{d}: no policy selects {_describe(subject)}; not in default-deny")
        return side
    names = sorted({r.origin.policy for r in selecting})
    side.reasons.append(f"{d}: {_describe(subject)} is selected by {', '.join(names)}")
    default_deny = any(r.default_deny(direction) for r in selecting)

    matched: list[tuple[PeerRule, PortRule]] = []
    ingress = direction is Direction.INGRESS  # a named port must then be every pod's of the identity
    named: dict[str, list[str]] = {}  # what each named port of a rule that selects the peer is
    for rule in selecting:
        for pr in rule.rules:
            if pr.direction is not direction:
                continue
            if pr.peers is not None and not any(_selects(s, peer.labels, refs) for s in pr.peers):
                continue
            if not pr.port_rules:
                # No toPorts, no icmps: every protocol, every port, every ICMP type.
                matched.append((pr, _EVERYTHING))
                continue
            for port_rule in pr.port_rules:
                for pp in port_rule.ports:
                    if isinstance(pp, NamedPort) and pp.protocol.covers(flow.protocol):
                        text = flow.destination.named_ports.explain(pp, flow.protocol, every_pod=ingress)
                        named.setdefault(text, []).append(str(pr.origin))
                if _covers(port_rule, flow.port, flow.protocol, flow.destination.named_ports, ingress):
                    matched.append((pr, port_rule))
    for text, origins in sorted(named.items()):
        side.reasons.append(f"{d}: on {_describe(flow.destination)}, {text} ({', '.join(sorted(set(origins)))})")
    services: dict[str, list[str]] = {}  # what each toServices entry of this direction stands for
    for rule in selecting:
        for pr in rule.rules:
            if pr.direction is direction:
                for p in pr.peers or ():
                    if isinstance(p, ServicePeer):
                        services.setdefault(_explain_services(p, refs.services), []).append(str(pr.origin))
    for text, origins in sorted(services.items()):
        side.reasons.append(f"{d}: {text} ({', '.join(sorted(set(origins)))})")

    at = where(flow.port, flow.protocol)
    denies = [pr for pr, _ in matched if pr.deny]
    if denies:
        side.allowed, side.layer = False, Layer.L3L4
        side.policies = {pr.origin.policy for pr in denies}
        side.reasons.append(
            f"{d}: denied by deny rule {', '.join(sorted(str(pr.origin) for pr in denies))} "
            f"(deny wins over allow)"
        )
        return side
    allows = [(pr, port) for pr, port in matched if not pr.deny]
    if not allows:
        if default_deny:
            side.allowed, side.layer = False, Layer.L3L4
            side.policies = {r.origin.policy for r in selecting if r.default_deny(direction)}
            side.reasons.append(
                f"{d}: no rule allows {_describe(peer)} on {at}; "
                f"{_describe(subject)} is in default-deny"
            )
        else:
            side.reasons.append(f"{d}: no rule matches and {d} is not default-deny: allowed")
        return side

    origins = sorted({str(pr.origin) for pr, _ in allows})
    side.policies = {pr.origin.policy for pr, _ in allows}
    modes = [pr.auth for pr, _ in allows if pr.auth is not None]
    mode = max(modes, key=lambda m: m.strength) if modes else None
    if mode is AuthMode.ALWAYS_FAIL:
        side.allowed, side.layer, side.auth_required = False, Layer.AUTH, True
        side.reasons.append(f"{d}: authentication mode test-always-fail ({', '.join(origins)})")
        return side
    if mode is AuthMode.REQUIRED:
        side.auth_required = True
        if not flow.authenticated:
            side.allowed, side.layer = False, Layer.AUTH
            side.reasons.append(
                f"{d}: Authentication required by {', '.join(origins)}; no valid auth entry "
                f"for this identity pair"
            )
            return side
        side.reasons.append(f"{d}: mutual authentication required and present")

    l7_rules: list[tuple[PeerRule, HTTPRule]] = []
    dns_rules: list[tuple[PeerRule, NameMatch]] = []
    sni_rules: list[tuple[PeerRule, NameMatch]] = []
    l4_only = [pr for pr, port in allows if port.l7 is None]
    for pr, port in allows:
        if port.l7 is not None:
            side.redirected = True
            l7_rules.extend((pr, h) for h in port.l7.http)
            dns_rules.extend((pr, m) for m in port.l7.dns)
            sni_rules.extend((pr, m) for m in port.l7.sni)
    if l4_only:
        side.reasons.append(
            f"{d}: allowed at L3/L4 on {at} by {', '.join(sorted(str(p.origin) for p in l4_only))}"
            + ("; L7 rules on this port are moot" if l7_rules or sni_rules else "")
        )
        return side
    if flow.tls_sni is not None:
        # A TLS connection: only serverNames can allow it (its bytes are not read).
        side.reasons.append(f"{d}: L3/L4 allows {at} by {', '.join(origins)}; TLS server names apply")
        sni = flow.tls_sni
        shits = [(pr, m) for pr, m in sni_rules if server_name_matches(m, sni)]
        if shits:
            side.policies = {pr.origin.policy for pr, _ in shits}
            side.reasons.append(f"{d}: TLS server name {sni} matches {shits[0][1].match_pattern} of {shits[0][0].origin}")
            return side
        side.allowed, side.layer = False, Layer.L7
        what = f"TLS server name {sni}" if sni else "a TLS connection without a server name (SNI)"
        side.reasons.append(
            f"{d}: Policy denied (L7): {what} matches none of the serverNames "
            + (", ".join(str(m.match_pattern) for _, m in sni_rules) or "(the rules here are HTTP rules, "
               "which a TLS connection cannot meet)"))
        return side
    if dns_rules and not l7_rules:
        side.reasons.append(f"{d}: L3/L4 allows {at} by {', '.join(origins)}; DNS rules apply (the DNS proxy)")
        if flow.dns is None:
            side.reasons.append(f"{d}: no DNS query given; each query is checked by the DNS proxy")
            return side
        name = fqdn(flow.dns)
        dhits = [(pr, m) for pr, m in dns_rules if m.matches(name)]
        if dhits:
            side.policies = {pr.origin.policy for pr, _ in dhits}
            side.reasons.append(f"{d}: DNS query {name} matches {dhits[0][1]} of {dhits[0][0].origin}")
            return side
        side.allowed, side.layer = False, Layer.L7
        side.reasons.append(f"{d}: Policy denied (L7): DNS query {name} matches none of the DNS rules "
                            + ", ".join(str(m) for _, m in dns_rules) + "; the DNS proxy answers REFUSED")
        return side
    if sni_rules:
        # Cilium: where any rule requires a server name, all traffic to that peer and port must
        # be TLS, whatever the HTTP rules of other rules say
        side.reasons.append(f"{d}: L3/L4 allows {at} by {', '.join(origins)}; serverNames apply ("
                            + ", ".join(str(m.match_pattern) for _, m in sni_rules) + "): TLS only")
        if flow.http is None:
            side.reasons.append(f"{d}: no connection given; each is checked by the proxy")
            return side
        side.allowed, side.layer = False, Layer.L7
        side.reasons.append(f"{d}: Policy denied (L7): a plain-text request where serverNames require TLS")
        return side
    side.reasons.append(f"{d}: L3/L4 allows {at} by {', '.join(origins)}; HTTP rules apply")
    if flow.http is None:
        side.reasons.append(f"{d}: no HTTP request given; each request is checked by the proxy")
        return side
    req = flow.http
    norm = normalize_path(req.path)
    if norm.rejected is not None:
        side.allowed, side.layer = False, Layer.L7
        side.reasons.append(f"{d}: request refused before policy: {norm.rejected}")
        return side
    hits = [(pr, h) for pr, h in l7_rules if h.matches(req, norm.path)]
    if hits:
        side.policies = {pr.origin.policy for pr, _ in hits}
        pr, h = hits[0]
        side.reasons.append(f"{d}: {req.method} {norm.path} matches HTTP rule {h} of {pr.origin}")
        return side
    side.allowed, side.layer = False, Layer.L7
    side.reasons.append(
        f"{d}: Policy denied (L7): {req.method} {norm.path}"
        + (f" host {req.host}" if req.host else "")
        + f" matches none of the {len(l7_rules)} HTTP rule(s): "
        + ", ".join(str(h) for _, h in l7_rules)
    )
    return side


def evaluate(rules: Iterable[Rule], flow: Flow, groups: Mapping[str, CIDRGroup] | None = None,
             services: Mapping[str, ServiceTarget] | None = None) -> Verdict:
    """The verdict for `flow` under `rules`: egress of the source, then ingress of the target.
    `groups`: the CiliumCIDRGroups in force, by name; `services`: the Services `toServices`
    reads, by namespace/name (none given: none exists)."""
    rule_list = list(rules)
    refs = _Referenced(groups or {}, services or {})
    sides: list[_Side] = []
    if flow.source.managed:
        sides.append(
            _evaluate_direction(rule_list, Direction.EGRESS, flow.source, flow.destination, flow, refs)
        )
    if flow.destination.managed and (not sides or sides[0].allowed):
        sides.append(
            _evaluate_direction(rule_list, Direction.INGRESS, flow.destination, flow.source, flow, refs)
        )
    reasons = [r for s in sides for r in s.reasons]
    denied = next((s for s in sides if not s.allowed), None)
    redirected = any(s.redirected for s in sides)
    auth_required = any(s.auth_required for s in sides)
    if denied is not None:
        return Verdict(
            False, denied.layer, tuple(reasons), tuple(sorted(denied.policies)), redirected,
            auth_required,
        )
    policies = sorted({p for s in sides for p in s.policies})
    return Verdict(True, None, tuple(reasons), tuple(policies), redirected, auth_required)
