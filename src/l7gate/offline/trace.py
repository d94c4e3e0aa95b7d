"""`l7gate policy trace`: the verdict for one connection/request (or ICMP message), explained
step by step.

Builds a throw-away world from manifest files — policies, CiliumCIDRGroups, Pods, Namespaces,
Services, EndpointSlices, Nodes — the way an agent would: identity labels from the pods, numeric
identities from each cluster's range (clusters numbered 1, 2, ... in name order), then asks the
reference evaluator. A node's address (a Node's, or a pod's hostIP) is that node as the
enforcing agent sees it: `host` from a pod on that node, the identity of its Node's labels (or
`remote-node`, without a Node) from elsewhere. A `cidrGroupRef` or `cidrGroupSelector` selects
the CIDRs of the groups given in the files (a group not given does not exist, and selects
nothing); a `toServices` entry selects the endpoint addresses the given EndpointSlices list for
the given Services of the source's cluster that have no selector. v1 Endpoints are refused
(write EndpointSlices). Egress is judged with the source cluster's view and ingress with the
destination cluster's, as the two agents would.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..identity.allocator import IdentityAllocator, fqdn_cidr_labels
from ..identity.numeric import HOST, IdentityError, reserved_identity
from ..k8s.manifests import load
from ..k8s.manifests import ENDPOINTS_REFUSED
from ..k8s.objects import (
    K8sObjectError, Namespace, Node, Pod, namespace_of, node_addresses, node_identity_labels, parse_endpoint_slice,
    parse_node, parse_pod, parse_service, pod_identity_labels, scoped_namespace, service_targets_of,
)
from ..kvstore.sqlite import SQLiteKVStore
from ..policy.cidrgroup import CIDRGroup, parse_cidr_group
from ..policy.errors import PolicyValidationError
from ..policy.evaluate import WORLD_ID, Flow, Layer, Peer, Verdict, evaluate, where
from ..policy.fqdn import FQDNSelector, fqdn
from ..policy.icmp import icmp_type_name
from ..policy.namedports import NamedPorts
from ..policy.parse import KIND_CIDR_GROUP, POLICY_KINDS, parse_policy
from ..policy.toservices import ServiceTarget
from ..policy.types import HTTPRequest, Protocol, Rule
from ..services import EndpointSlice, Service

EXIT_INVALID = 1
EXIT_USAGE = 2


class TraceError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class TraceRequest:
    paths: tuple[str, ...]
    source: str
    destination: str
    port: int | str  # a number, or the name of one of the destination pod's container ports; for protocol ICMP, the ICMP type
    protocol: str = "TCP"
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    authenticated: bool = False
    cluster_name: str = "default"
    # A DNS query (to port 53): judged by the `rules.dns` of the source's egress.
    dns_query: str | None = None
    # A TLS connection naming this server (SNI; "" for none): judged by `serverNames`.
    tls_sni: str | None = None
    # A snapshot of what the DNS proxy learned (name → addresses, `l7gate fqdn cache list`): an
    # address destination is then labelled with the toFQDNs selectors of its names.
    fqdn_cache: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Party:
    ref: str  # cluster/namespace/pod, or "world"
    cluster: str
    ip: str | None
    identity: int
    peer: Peer
    # The named container ports of the pods of its identity in the inventory (what the rules'
    # named ports resolve against): name → (number, protocol) → the pods declaring it.
    declared: Mapping[str, Mapping[tuple[int, str], tuple[str, ...]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.ref,
            "cluster": self.cluster,
            "ip": self.ip,
            "identity": self.identity,
            "labels": dict(self.peer.labels),
            "named_ports": [
                {"name": name, "port": number, "protocol": proto, "pods": list(pods)}
                for name, by in sorted(self.declared.items()) for (number, proto), pods in sorted(by.items())
            ],
        }


@dataclass(frozen=True, slots=True)
class TraceResult:
    request: TraceRequest
    source: Party
    destination: Party
    http: HTTPRequest
    http_defaulted: bool
    verdict: Verdict
    egress_reasons: tuple[str, ...]
    ingress_reasons: tuple[str, ...]
    clusters: Mapping[str, int]
    port: int = 0  # the port traced (a named --port resolved on the destination pod)

    @property
    def icmp(self) -> bool:
        return self.request.protocol == Protocol.ICMP.value

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        out: dict[str, Any] = {
            "verdict": v.verdict,
            "layer": v.layer.value if v.layer else None,
            "reasons": list(v.reasons),
            "policies": list(v.policies),
            "from_identity": self.source.identity,
            "to_identity": self.destination.identity,
            "from": self.source.to_json(),
            "to": self.destination.to_json(),
            "port": None if self.icmp else self.port,
            "port_name": self.request.port if isinstance(self.request.port, str) else None,
            "protocol": self.request.protocol,
            "http": {
                "method": self.http.method,
                "path": self.http.path,
                "host": self.http.host,
                "headers": dict(self.http.headers),
                "defaulted": self.http_defaulted,
            },
            "redirected_to_proxy": v.redirected,
            "auth_required": v.auth_required,
            "clusters": dict(self.clusters),
        }
        if self.icmp:
            out["http"] = None
            out["icmp"] = {"type": self.port, "name": icmp_type_name(self.port)}
        return out


@dataclass(frozen=True, slots=True)
class _Inventory:
    """What the files give: policy documents, pods, namespaces, CIDR groups, per cluster the
    Services as `toServices` reads them (namespace/name → target), and the Nodes."""

    policies: list[dict[str, Any]]
    pods: list[Pod]
    namespaces: dict[tuple[str, str], Namespace]
    groups: dict[str, CIDRGroup]
    services: dict[str, dict[str, ServiceTarget]]
    nodes: list[Node]


def _load(req: TraceRequest) -> _Inventory:
    manifests, errors = load(req.paths)
    missing = [e for e in errors if e.missing]
    if missing:
        raise TraceError("; ".join(str(e) for e in missing), EXIT_USAGE)
    if errors:
        raise TraceError("; ".join(str(e) for e in errors), EXIT_INVALID)
    policies: list[dict[str, Any]] = []
    pods: list[Pod] = []
    namespaces: dict[tuple[str, str], Namespace] = {}
    groups: dict[str, CIDRGroup] = {}
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    seen: dict[str, str] = {}
    nodes: dict[str, Node] = {}
    problems: list[str] = []

    def once(key: str, where: str) -> bool:
        if key in seen:
            problems.append(f"{where}: {key} is given twice (also at {seen[key]})")
            return False
        seen[key] = where
        return True

    for m in manifests:
        kind = m.kind
        try:
            if kind in ENDPOINTS_REFUSED:
                problems.append(f"{m.where}: {ENDPOINTS_REFUSED[kind]}")
            elif kind == "Service":
                svc = parse_service(m.obj, default_cluster=req.cluster_name)
                if once(f"Service {svc.cluster}/{svc.ref}", m.where):
                    services.append(svc)
            elif kind == "EndpointSlice":
                es = parse_endpoint_slice(m.obj, default_cluster=req.cluster_name)
                if once(f"EndpointSlice {es.cluster}/{es.ref}", m.where):
                    slices.append(es)
            elif kind in POLICY_KINDS:
                policies.append(m.obj)
            elif kind == KIND_CIDR_GROUP:
                group = parse_cidr_group(m.obj)
                if group.name in groups:
                    problems.append(f"{m.where}: {group.key} is given twice")
                groups[group.name] = group
            elif kind == "Pod":
                pods.append(parse_pod(m.obj, default_cluster=req.cluster_name))
            elif kind == "Namespace":
                ns = scoped_namespace(m.obj, default_cluster=req.cluster_name)
                namespaces[(ns.cluster, ns.name)] = ns
            elif kind == "Node":
                node = parse_node(m.obj, default_cluster=req.cluster_name)
                if node.ref in nodes:
                    problems.append(f"{m.where}: Node {node.ref} is given twice")
                nodes[node.ref] = node
        except (K8sObjectError, PolicyValidationError) as exc:
            problems.append(f"{m.where}: {exc}")
    if problems:
        raise TraceError("invalid objects:\n  " + "\n  ".join(problems), EXIT_INVALID)
    return _Inventory(policies, pods, namespaces, groups, service_targets_of(services, slices), list(nodes.values()))


def _rules_for_cluster(docs: list[dict[str, Any]], cluster: str) -> list[Rule]:
    rules: list[Rule] = []
    problems: list[str] = []
    for doc in docs:
        try:
            rules.extend(parse_policy(doc, cluster_name=cluster).rules)
        except PolicyValidationError as exc:
            problems.append(str(exc))
    if problems:
        raise TraceError(
            "invalid policies (run `l7gate policy validate`):\n  " + "\n  ".join(problems),
            EXIT_INVALID,
        )
    return rules


def _find_pod(ref: str, pods: list[Pod]) -> Pod:
    parts = ref.split("/")
    if len(parts) == 3:
        cluster, ns, name = parts
        found = [p for p in pods if (p.cluster, p.namespace, p.name) == (cluster, ns, name)]
    elif len(parts) == 2:
        ns, name = parts
        found = [p for p in pods if (p.namespace, p.name) == (ns, name)]
    else:
        raise TraceError(f"{ref!r}: expected [CLUSTER/]NAMESPACE/POD or `world`", EXIT_USAGE)
    if not found:
        known = ", ".join(sorted(f"{p.cluster}/{p.namespace}/{p.name}" for p in pods)) or "none"
        raise TraceError(f"no pod {ref!r} in the given files (pods: {known})", EXIT_USAGE)
    if len(found) > 1:
        names = ", ".join(f"{p.cluster}/{p.namespace}/{p.name}" for p in found)
        raise TraceError(f"{ref!r} is ambiguous ({names}): name the cluster", EXIT_USAGE)
    return found[0]


def run_trace(req: TraceRequest) -> TraceResult:
    inv = _load(req)
    docs, pods, namespaces, groups, nodes = inv.policies, inv.pods, inv.namespaces, inv.groups, inv.nodes
    clusters = sorted({p.cluster for p in pods} | {n.cluster for n in nodes} | {req.cluster_name})
    if len(clusters) > 255:
        raise TraceError("more than 255 clusters", EXIT_INVALID)
    cluster_ids = {c: i + 1 for i, c in enumerate(clusters)}

    store = SQLiteKVStore(":memory:")
    try:
        allocators = {
            c: IdentityAllocator(store, cluster_id=cid, owner=c) for c, cid in cluster_ids.items()
        }

        def party(ref: str, other: str = "") -> Party:
            if ref == "world":
                w = reserved_identity("world")
                return Party("world", "", None, w.id, Peer(w.id, w.labels, managed=False, name="world"))
            address = _address(ref)
            if address is not None and not any(p.ip == address for p in pods):
                node = _node_party(address, nodes, pods, other, node_identities)
                return node if node is not None else _address_party(address, docs, req, groups, inv.services)
            pod = _find_pod(ref, pods)
            try:
                labels = pod_identity_labels(pod, namespace_of(pod, namespaces))
                ident = allocators[pod.cluster].allocate(labels)
            except IdentityError as exc:
                raise TraceError(f"{ref}: {exc}", EXIT_INVALID) from None
            name = f"{pod.cluster}/{pod.namespace}/{pod.name}"
            return Party(name, pod.cluster, pod.ip, ident.id, Peer(ident.id, labels, True, name))

        # Every other node's identity from its Node's labels, in name order: numbers that do not
        # depend on the --from/--to order (each agent numbers them for itself).
        node_identities = {
            n.ref: allocators[req.cluster_name].allocate(node_identity_labels(n, local=False)).id
            for n in sorted(nodes, key=lambda n: (n.cluster, n.name))
        }

        # Allocate every pod first so identity numbers do not depend on the --from/--to order;
        # the named ports of each identity are those all its pods declare, as the agent sees them.
        declared: dict[int, dict[str, dict[tuple[int, str], list[str]]]] = {}
        pods_of: dict[int, list[Pod]] = {}
        for p in sorted(pods, key=lambda p: (p.cluster, p.namespace, p.name)):
            who = party(f"{p.cluster}/{p.namespace}/{p.name}")
            pods_of.setdefault(who.identity, []).append(p)
            by_name = declared.setdefault(who.identity, {})
            for name, number, proto in p.named_ports:
                by_name.setdefault(name, {}).setdefault((number, proto), []).append(who.ref)

        def with_ports(who: Party) -> Party:
            if not who.peer.managed:
                return who
            mine = declared.get(who.identity, {})
            ports = NamedPorts.of_pods(p.named_ports for p in pods_of.get(who.identity, ()))
            return dataclasses.replace(
                who, peer=dataclasses.replace(who.peer, named_ports=ports),
                declared={n: {k: tuple(v) for k, v in by.items()} for n, by in mine.items()})

        src = with_ports(party(req.source, req.destination))
        dst = with_ports(party(req.destination, req.source))
    finally:
        store.close()
    port = _traced_port(req, dst, pods)

    defaulted = req.method is None and req.path is None
    http = HTTPRequest(
        method=req.method or "GET",
        path=req.path or "/",
        host=req.host or "",
        headers={k.lower(): v for k, v in req.headers.items()},
    )
    protocol = Protocol(req.protocol)
    flow = Flow(src.peer, dst.peer, port, protocol,
                None if protocol is Protocol.ICMP or req.tls_sni is not None else http,
                req.authenticated, req.dns_query, req.tls_sni)

    egress = Verdict(True, None)
    if src.peer.managed:
        egress_rules = _rules_for_cluster(docs, src.cluster)
        egress = evaluate(egress_rules, _one_side(flow, source_managed=True), groups, inv.services.get(src.cluster))
    ingress = Verdict(True, None)
    if dst.peer.managed and egress.allowed and src.identity == HOST:
        # The node's own traffic to its pods is not judged (Cilium's default allow-localhost)
        ingress = Verdict(True, None, ("from this node (host): a node's own connections to its pods are "
                                       "always allowed, as in Cilium (allow-localhost)",))
    elif dst.peer.managed and egress.allowed:
        ingress_rules = _rules_for_cluster(docs, dst.cluster)
        ingress = evaluate(ingress_rules, _one_side(flow, source_managed=False), groups, inv.services.get(dst.cluster))
    decided = egress if not egress.allowed else ingress
    if decided.allowed:
        policies = tuple(sorted(set(egress.policies) | set(ingress.policies)))
    else:
        policies = decided.policies
    verdict = Verdict(
        decided.allowed,
        decided.layer,
        egress.reasons + ingress.reasons,
        policies,
        egress.redirected or ingress.redirected,
        egress.auth_required or ingress.auth_required,
    )
    return TraceResult(
        req, src, dst, http, defaulted, verdict, egress.reasons, ingress.reasons, cluster_ids, port
    )


def _traced_port(req: TraceRequest, dst: Party, pods: list[Pod]) -> int:
    """`--port`: a number, or a name looked up in the destination pod's own container ports
    (where the connection would go: the name as that pod declares it for --protocol)."""
    if isinstance(req.port, int):
        return req.port
    pod = next((p for p in pods if p.ref == dst.ref), None)
    if pod is None:
        raise TraceError(f"--port {req.port!r} is a port name, but {dst.ref} is not a pod of the inventory: "
                         "give the port number", EXIT_USAGE)
    found = sorted({n for name, n, proto in pod.named_ports if name == req.port and proto == req.protocol})
    if len(found) == 1:
        return found[0]
    have = ", ".join(f"{n}={num}/{proto}" for n, num, proto in pod.named_ports) or "none"
    if found:
        raise TraceError(f"{dst.ref} declares port name {req.port!r} for {req.protocol} more than once "
                         f"({', '.join(map(str, found))}): give the port number", EXIT_USAGE)
    raise TraceError(f"{dst.ref} declares no container port named {req.port!r} for {req.protocol} (its named "
                     f"ports: {have})", EXIT_USAGE)


def _address(ref: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ref))
    except ValueError:
        return None


def _node_party(ip: str, nodes: list[Node], pods: list[Pod], other: str,
                node_identities: Mapping[str, int]) -> Party | None:
    """A node's address (a Node's, or some pod's `status.hostIP`), as the agent enforcing for the
    other party has it in its ipcache: `host` seen from a pod on that node, with its Node's
    labels; from anywhere else the identity of its Node's labels (`node_identities`), or
    `remote-node` when no Node of that name is given."""
    where = node_addresses(nodes, pods).get(ip)
    if where is None:
        return None
    cluster, name = where
    peer_pod: Pod | None = None
    if other and other != "world" and _address(other) is None:
        try:
            peer_pod = _find_pod(other, pods)
        except TraceError:
            peer_pod = None  # reported when that party is read
    host = peer_pod is not None and peer_pod.cluster == cluster and (
        peer_pod.host_ip == ip or (name is not None and peer_pod.node_name == name))
    entity = "host" if host else "remote-node"
    node = next((n for n in nodes if (n.cluster, n.name) == where), None)
    if node is None:
        ident = reserved_identity(entity)
        shown = f"{ip} ({entity})"
        return Party(shown, "", ip, ident.id, Peer(ident.id, ident.labels, managed=False, name=shown))
    number = HOST if host else node_identities[node.ref]
    shown = f"{ip} ({entity}, node {node.ref})"
    labels = node_identity_labels(node, local=host)
    return Party(shown, cluster, ip, number, Peer(number, labels, managed=False, name=shown))


def _address_party(ip: str, docs: list[dict[str, Any]], req: TraceRequest, groups: Mapping[str, CIDRGroup],
                   services: Mapping[str, Mapping[str, ServiceTarget]]) -> Party:
    """An address outside the inventory: its CIDR identity's labels, plus the `fqdn:` labels
    of the policies' toFQDNs selectors that match a name the cache snapshot gives it (as the
    agent labels an address its DNS proxy learned). Its name says which of the CiliumCIDRGroups
    given hold it, and which Services list it as an endpoint."""
    names = [fqdn(n) for n, ips in req.fqdn_cache.items() if ip in ips]
    selectors: set[FQDNSelector] = set()
    for doc in docs:
        try:
            policy = parse_policy(doc, cluster_name=req.cluster_name)
        except PolicyValidationError:
            continue  # reported where the rules are read
        for rule in policy.rules:
            for pr in rule.rules:
                selectors.update(p for p in pr.peers or () if isinstance(p, FQDNSelector))
    keys = sorted({s.key for s in selectors for n in names if s.match.matches(n)})
    net = ipaddress.ip_network(ip)
    labels = fqdn_cidr_labels(net, keys)
    shown = f"{ip} ({', '.join(n.rstrip('.') for n in names)})" if names else ip
    holding = sorted(g.name for g in groups.values()
                     if any(c.version == net.version and net.subnet_of(c) for c in g.cidrs))  # type: ignore[arg-type]
    if holding:
        shown += f" (in CiliumCIDRGroup {', '.join(holding)})"
    listing = sorted(t.key for targets in services.values() for t in targets.values() if net in t.addresses)
    if listing:
        shown += f" (endpoint of Service {', '.join(listing)})"
    return Party(shown, "", ip, WORLD_ID, Peer(WORLD_ID, labels, managed=False, name=shown))


def load_fqdn_cache(text: str) -> dict[str, tuple[str, ...]]:
    """A cache snapshot: `{name: [ip, ...]}`, or what `l7gate fqdn cache list -o json` prints."""
    data = json.loads(text)
    out: dict[str, set[str]] = {}
    if isinstance(data, dict) and isinstance(data.get("entries"), list):
        for e in data["entries"]:
            out.setdefault(str(e["name"]), set()).add(str(ipaddress.ip_address(e["ip"])))
    elif isinstance(data, dict):
        for name, ips in data.items():
            if not isinstance(ips, list):
                raise ValueError(f"{name}: expected a list of addresses")
            out.setdefault(str(name), set()).update(str(ipaddress.ip_address(ip)) for ip in ips)
    else:
        raise ValueError("expected {name: [addresses]} or the output of `l7gate fqdn cache list -o json`")
    return {n: tuple(sorted(v)) for n, v in out.items()}


def _one_side(flow: Flow, *, source_managed: bool) -> Flow:
    s, d = flow.source, flow.destination
    return Flow(
        Peer(s.identity, s.labels, source_managed, s.name, s.named_ports),
        Peer(d.identity, d.labels, not source_managed, d.name, d.named_ports),
        flow.port,
        flow.protocol,
        flow.http,
        flow.authenticated,
        flow.dns,
        flow.tls_sni,
    )


_LAYER_TEXT = {
    Layer.L3L4: "at L3/L4: the connection is dropped in the kernel",
    Layer.L7: "at L7: the proxy answers 403 (Policy denied (L7))",
    Layer.AUTH: "by mutual authentication: dropped (Authentication required)",
}


def format_trace_text(r: TraceResult) -> str:
    v = r.verdict
    lines: list[str] = []
    req = r.request
    what = where(r.port, Protocol(req.protocol))
    if isinstance(req.port, str):
        what += f" (port {req.port!r} of {r.destination.ref})"
    lines.append(f"Trace {r.source.ref} -> {r.destination.ref} on {what}")
    if r.icmp:
        pass
    elif req.dns_query is not None:
        lines.append(f"  DNS query {fqdn(req.dns_query)}")
    elif req.tls_sni is not None:
        lines.append(f"  TLS, server name {req.tls_sni}" if req.tls_sni else "  TLS without a server name (SNI)")
    elif v.redirected or not r.http_defaulted:
        lines.append(
            f"  HTTP {r.http.method} {r.http.path}"
            + (f" host {r.http.host}" if r.http.host else "")
            + (" (no --method/--path given: tracing GET /)" if r.http_defaulted else "")
        )
    lines.append("")
    lines.append("1. Identities")
    for role, p in (("from", r.source), ("to", r.destination)):
        ip = f" ({p.ip})" if p.ip and not p.ref.startswith(p.ip) else ""
        lines.append(f"   {role:<4} {p.ref}{ip}: identity {p.identity}")
        lines.append(f"        labels: {', '.join(f'{k}={val}' if val else k for k, val in p.peer.labels.items())}")
        if p.declared:
            named = "; ".join(
                f"{name}={number}/{proto} ({', '.join(pods)})"
                for name, by in sorted(p.declared.items()) for (number, proto), pods in sorted(by.items())
            )
            lines.append(f"        named ports of the pods of identity {p.identity}: {named}")
    step = 2
    for title, reasons in (
        (f"Egress policy of {r.source.ref}", r.egress_reasons),
        (f"Ingress policy of {r.destination.ref}", r.ingress_reasons),
    ):
        if not reasons:
            continue
        lines.append(f"{step}. {title}")
        for reason in reasons:
            text = reason.split(": ", 1)[1] if ": " in reason else reason
            lines.append(f"   - {text}")
        step += 1
    lines.append("")
    if v.allowed:
        how = " through the L7 proxy" if v.redirected else ""
        lines.append(f"Verdict: ALLOWED{how}")
    else:
        assert v.layer is not None
        if v.layer is Layer.L7 and req.dns_query is not None:
            lines.append("Verdict: DENIED at L7: the DNS proxy answers REFUSED (Policy denied (L7))")
        elif v.layer is Layer.L7 and req.tls_sni is not None:
            lines.append("Verdict: DENIED at L7: the egress proxy closes the TLS connection (Policy denied (L7))")
        elif v.layer is Layer.L3L4 and r.icmp:
            lines.append("Verdict: DENIED at L3/L4: the ICMP message is dropped in the kernel")
        else:
            lines.append(f"Verdict: DENIED {_LAYER_TEXT[v.layer]}")
    if v.policies:
        lines.append(f"Policies: {', '.join(v.policies)}")
    return "\n".join(lines)
