"""Property tests for Kubernetes NetworkPolicy (CONVENTIONS.md 11, 12), in the style of
`test_policy_properties.py`:

1. Upstream model: on generated NetworkPolicies, pods (with their namespaces' labels and named
   container ports), reserved identities and addresses outside the cluster, the reference
   evaluator's verdict on the translated rules equals that of a small, independent reading of
   the Kubernetes API docs (`model_allows`), which works on the documents and on addresses, not
   on l7gate's types. Ports may be named (`port: http`: the destination pod's container port).
2. Hand-written CNP: NetworkPolicies mixed with generated CiliumNetworkPolicies give the verdicts
   that the same CNPs with each NetworkPolicy written out by hand as a CiliumNetworkPolicy give
   (the union with CNPs, and CNP deny rules over NetworkPolicy allows, included).
3. Resolved maps: on the same mixes, `resolve.lookup` agrees with the reference evaluator
   (`check_differential`, the fast path the kernel maps and Envoy are built from).
4. The parser parses or raises PolicyValidationError on mutated NetworkPolicies; every finding
   names a field of the document (`check_parser`).

Failing inputs are printed as JSON (`note`) for a regression test.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import given, note
from hypothesis import strategies as st

from l7gate.identity.allocator import cidr_labels
from l7gate.identity.filter import identity_labels
from l7gate.policy.errors import PolicyValidationError
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.namedports import NamedPorts
from l7gate.policy.parse import parse_policy
from l7gate.policy.types import Protocol, Rule
from tests.unit import strategies as gen
from tests.unit.strategies import composite, weighted
from tests.unit.test_policy_properties import as_json, check_differential, check_parser, event, examples, same_verdict

NAMESPACES = gen.NAMESPACES
NAME_LABEL = "kubernetes.io/metadata.name"
POD_KEYS: dict[str, tuple[str, ...]] = {"app": ("frontend", "billing", "db"), "team": ("red", "blue")}
NS_KEYS: dict[str, tuple[str, ...]] = {"team": ("red", "blue"), "env": ("prod", "dev"), NAME_LABEL: NAMESPACES}
BLOCKS = ("10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "0.0.0.0/0", "2001:db8::/32")
EXCEPTS = ("10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.1.0/24", "10.200.0.0/16", "2001:db8:1::/48")
# Every prefix a generated ipBlock names has a CIDR identity, as Cilium allocates one for each
# prefix in a policy: the longest-prefix lookup of an address then says which side of every
# `except` it is on. 0.0.0.0/0 is the world identity.
CIDR_POOL = tuple(sorted({*BLOCKS, *EXCEPTS} - {"0.0.0.0/0"}))
# Addresses outside the cluster. IPv4 only outside the pool's prefixes: the `world` identity has
# no address family in l7gate (its datapath drops IPv6), so an IPv6 address that no prefix
# covers is left out of the model.
ADDRESSES = ("10.1.2.3", "10.1.2.4", "10.1.3.1", "10.5.0.1", "10.200.1.1", "192.168.1.1", "192.168.2.1",
             "172.16.0.1", "8.8.8.8", "2001:db8:1::1", "2001:db8:2::1")
RESERVED = {1: "host", 6: "remote-node", 7: "kube-apiserver"}
FLOW_PORTS = (53, 80, 81, 443, 444, 8080, 8081, 9000, 9050, 9100, 32000, 32500, 32768, 32769, 65535)
CIDR_ID_BASE = 1 << 24
WORLD_ID = 2
# A pod's named container ports, at most one number per (name, protocol) (one pod, as upstream
# reads it); the names policies use, one of which no pod declares.
CONTAINER_PORTS = tuple(sorted({(n, proto): (n, p, proto) for n, p, proto in gen.CONTAINER_PORTS}.values()))
PORT_NAMES = ("http", "http", "http", "metrics", "dns", "admin", "nope")


# -- generated NetworkPolicies -----------------------------------------------------------------------


@composite
def selectors(draw: st.DrawFn, keys: Mapping[str, tuple[str, ...]],
              hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A label selector over `keys`; with `hints` (label sets that exist), often one that
    selects one of them."""
    kind = weighted(draw, [(3, "empty"), (5, "labels"), (3, "expressions"), (6 if hints else 0, "hint")])
    if kind == "empty":
        return {}
    if kind == "hint":
        target = draw(st.sampled_from(list(hints)))
        chosen = draw(st.sets(st.sampled_from(sorted(k for k in target if k in keys)), max_size=2)) if any(
            k in keys for k in target) else set()
        return {"matchLabels": {k: target[k] for k in sorted(chosen)}} if chosen else {}
    sel: dict[str, Any] = {}
    if kind == "labels" or draw(st.booleans()):
        chosen = draw(st.sets(st.sampled_from(sorted(keys)), min_size=1, max_size=2))
        sel["matchLabels"] = {k: draw(st.sampled_from(keys[k])) for k in sorted(chosen)}
    if kind == "expressions":
        exprs = []
        for _ in range(draw(st.integers(1, 2))):
            key = draw(st.sampled_from(sorted(keys)))
            op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
            expr: dict[str, Any] = {"key": key, "operator": op}
            if op in ("In", "NotIn"):
                expr["values"] = sorted(draw(st.sets(st.sampled_from(keys[key]), min_size=1, max_size=2)))
            exprs.append(expr)
        sel["matchExpressions"] = exprs
    return sel


@composite
def ip_blocks(draw: st.DrawFn) -> dict[str, Any]:
    cidr = draw(st.sampled_from((*BLOCKS, "0.0.0.0/0")))  # the whole family twice as often
    net = ipaddress.ip_network(cidr)
    inside = [e for e in EXCEPTS if _strictly_inside(ipaddress.ip_network(e), net)]
    block: dict[str, Any] = {"cidr": cidr}
    with_except: bool = weighted(draw, [(1, False), (2, True)])
    if inside and with_except:
        block["except"] = sorted(draw(st.sets(st.sampled_from(inside), min_size=1, max_size=2)))
    return block


@composite
def peers(draw: st.DrawFn, hints: Hints) -> dict[str, Any]:
    kind = weighted(draw, [(3, "pod"), (3, "namespace"), (3, "both"), (4, "ip")])
    if kind == "ip":
        return {"ipBlock": draw(ip_blocks())}
    peer: dict[str, Any] = {}
    if kind in ("pod", "both"):
        peer["podSelector"] = draw(selectors(POD_KEYS, hints.pods))
    if kind in ("namespace", "both"):
        peer["namespaceSelector"] = draw(selectors(NS_KEYS, hints.namespace_labels))
    return peer


@composite
def ports(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if draw(st.booleans()):
        entry["protocol"] = weighted(draw, [(4, "TCP"), (2, "UDP"), (1, "SCTP")])
    kind = weighted(draw, [(3, "single"), (1, "every"), (3, "range"), (3, "named")])
    if kind == "named":
        entry["port"] = draw(st.sampled_from(PORT_NAMES))
        return entry
    if kind != "every":
        entry["port"] = draw(st.sampled_from((80, 443, 8080, 9000, 32000)))
    if kind == "range":
        entry["endPort"] = entry["port"] + weighted(draw, [(1, 0), (2, 1), (2, 768), (2, 100)])
    return entry


@composite
def np_rules(draw: st.DrawFn, peer_field: str, hints: Hints) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    which = weighted(draw, [(2, "absent"), (1, "empty"), (5, "peers")])
    if which == "empty":
        rule[peer_field] = []
    elif which == "peers":
        rule[peer_field] = draw(st.lists(peers(hints), min_size=1, max_size=3))
    which = weighted(draw, [(2, "absent"), (1, "empty"), (4, "ports")])
    if which == "empty":
        rule["ports"] = []
    elif which == "ports":
        rule["ports"] = draw(st.lists(ports(), min_size=1, max_size=3))
    return rule


@dataclass(frozen=True)
class Hints:
    """What exists in the world a policy is drawn for: pods' namespaces and labels, and the
    namespaces' labels, so that generated selectors often select something."""

    namespaces: Sequence[str] = ()
    pods: Sequence[Mapping[str, str]] = ()
    namespace_labels: Sequence[Mapping[str, str]] = ()


def hints_of(world: Mapping[str, Any]) -> Hints:
    return Hints(tuple(p["namespace"] for p in world["pods"]), tuple(p["labels"] for p in world["pods"]),
                 tuple(world["namespaces"].values()))


@composite
def network_policies(draw: st.DrawFn, hints: Hints = Hints()) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": draw(selectors(POD_KEYS, hints.pods))}
    types = weighted(draw, [(3, None), (1, []), (2, ["Ingress"]), (2, ["Egress"]), (2, ["Ingress", "Egress"]),
                            (1, ["Egress", "Ingress"])])
    if types is not None:
        spec["policyTypes"] = types
    for field, peer_field in (("ingress", "from"), ("egress", "to")):
        which = weighted(draw, [(2, "absent"), (1, "empty"), (5, "rules")])
        if which == "empty":
            spec[field] = []
        elif which == "rules":
            spec[field] = draw(st.lists(np_rules(peer_field, hints), min_size=1, max_size=3))
    from_hint: bool = weighted(draw, [(1, False), (3, True)])
    namespace = draw(st.sampled_from(hints.namespaces if hints.namespaces and from_hint else NAMESPACES))
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": draw(st.sampled_from(("n1", "n2"))), "namespace": namespace}, "spec": spec}


# -- the world they are judged in ----------------------------------------------------------------------


@dataclass(frozen=True)
class Party:
    """One end of a flow: a pod (`namespace` set), a reserved identity, or an address outside
    the cluster (`ip` set)."""

    identity: int
    labels: Labels
    namespace: str | None = None
    pod_labels: Mapping[str, str] | None = None
    ip: str | None = None
    named: tuple[tuple[str, int, str], ...] = ()  # a pod's named container ports

    @property
    def named_ports(self) -> NamedPorts:
        return NamedPorts.of(self.named)

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


@composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    """Namespaces with their labels (the API server's name label always), pods, and identities
    for reserved parties and the pool's prefixes; plain JSON."""
    namespaces = {}
    for ns in NAMESPACES:
        labels = {NAME_LABEL: ns}
        for key in ("team", "env"):
            if draw(st.booleans()):
                labels[key] = draw(st.sampled_from(NS_KEYS[key]))
        namespaces[ns] = labels
    pods = []
    for _ in range(draw(st.integers(2, 6))):
        labels = {k: draw(st.sampled_from(v)) for k, v in POD_KEYS.items() if draw(st.booleans())}
        declared = sorted(draw(st.sets(st.sampled_from(CONTAINER_PORTS), min_size=weighted(draw, [(1, 0), (3, 1)]),
                                       max_size=3)))
        pods.append({"namespace": draw(st.sampled_from(NAMESPACES)), "cluster": draw(st.sampled_from(gen.CLUSTERS)),
                     "labels": labels, "ports": [list(d) for d in declared]})
    return {"namespaces": namespaces, "pods": pods}


def longest_prefix(ip: str) -> str | None:
    addr = ipaddress.ip_address(ip)
    inside = [ipaddress.ip_network(p) for p in CIDR_POOL if addr in ipaddress.ip_network(p)]
    return max(inside, key=lambda n: n.prefixlen).with_prefixlen if inside else None


def parties_of(world: Mapping[str, Any]) -> list[Party]:
    out: list[Party] = []
    for i, p in enumerate(world["pods"]):
        labels = identity_labels(p["labels"], namespace=p["namespace"], cluster=p["cluster"],
                                 namespace_labels=world["namespaces"][p["namespace"]])
        named = tuple((n, port, proto) for n, port, proto in p.get("ports", []))
        out.append(Party(1001 + i, labels, p["namespace"], p["labels"], named=named))
    for ident, name in RESERVED.items():
        out.append(Party(ident, Labels.of({f"reserved:{name}": ""})))
    for ip in ADDRESSES:
        prefix = longest_prefix(ip)
        if prefix is None:
            out.append(Party(WORLD_ID, Labels.of({"reserved:world": ""}), ip=ip))
        else:
            out.append(Party(CIDR_ID_BASE + CIDR_POOL.index(prefix), Labels.of(cidr_labels(prefix)), ip=ip))
    return out


# -- 1. the upstream model -----------------------------------------------------------------------------------


def policy_types(spec: Mapping[str, Any]) -> set[str]:
    """`spec.policyTypes`, or the API server's default: Ingress, and Egress when there are egress rules."""
    listed = spec.get("policyTypes") or []
    if listed:
        return set(listed)
    return {"Ingress"} | ({"Egress"} if spec.get("egress") else set())


def selector_matches(sel: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector: every matchLabels pair, every expression (NotIn holds for a
    missing key)."""
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for e in sel.get("matchExpressions") or []:
        value = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and value not in e["values"]:
            return False
        if op == "NotIn" and value is not None and value in e["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def in_block(block: Mapping[str, Any], party: Party) -> bool:
    assert party.ip is not None
    addr = ipaddress.ip_address(party.ip)
    cidr = ipaddress.ip_network(block["cidr"])
    if addr.version != cidr.version or addr not in cidr:
        return False
    excepts = [ipaddress.ip_network(e) for e in block.get("except") or []]
    if any(addr.version == e.version and addr in e for e in excepts):
        event("an address in an except range")
        return False
    if excepts and longest_prefix(party.ip) is None:
        event("the world let in by a block with except ranges")
    return True


def peer_matches(peer: Mapping[str, Any], party: Party, policy_namespace: str,
                 namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    if "ipBlock" in peer:
        # Only addresses outside the cluster: Cilium (as upstream allows) never matches a pod's
        # or the node's address by ipBlock.
        return party.ip is not None and in_block(peer["ipBlock"], party)
    if not party.is_pod:
        return False
    assert party.namespace is not None and party.pod_labels is not None
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], namespaces[party.namespace]):
            return False
    elif party.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], party.pod_labels)


def port_matches(entries: Sequence[Mapping[str, Any]] | None, port: int, protocol: str, destination: Party) -> bool:
    """A rule's ports cover (port, protocol) of a connection to `destination`: a named port is
    the destination pod's container port of that name and protocol."""
    if not entries:
        return True
    for e in entries:
        if e.get("protocol", "TCP") != protocol:
            continue
        if isinstance(e.get("port"), str):
            if any(n == e["port"] and proto == protocol and number == port for n, number, proto in destination.named):
                event("a named port")
                return True
            continue
        if "port" not in e or e["port"] <= port <= e.get("endPort", e["port"]):
            if "port" in e and port > e["port"]:
                event("a port inside a range, past its start")
            return True
    return False


def model_direction(docs: Sequence[Mapping[str, Any]], direction: str, subject: Party, peer: Party, port: int,
                    protocol: str, namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    """A pod is isolated in a direction when a policy of its namespace selects it and lists
    that direction; then only the rules of those policies let traffic through."""
    assert subject.namespace is not None and subject.pod_labels is not None
    field, peer_field = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [d for d in docs if d["metadata"]["namespace"] == subject.namespace
                 and selector_matches(d["spec"].get("podSelector") or {}, subject.pod_labels)
                 and direction in policy_types(d["spec"])]
    if not isolating:
        return True
    for d in isolating:
        for rule in d["spec"].get(field) or []:
            listed = rule.get(peer_field) or []
            if listed and not any(peer_matches(p, peer, d["metadata"]["namespace"], namespaces) for p in listed):
                continue
            if port_matches(rule.get("ports"), port, protocol, subject if direction == "Ingress" else peer):
                return True
    return False


def model_allows(docs: Sequence[Mapping[str, Any]], src: Party, dst: Party, port: int, protocol: str,
                 namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    if src.is_pod and not model_direction(docs, "Egress", src, dst, port, protocol, namespaces):
        return False
    return not dst.is_pod or model_direction(docs, "Ingress", dst, src, port, protocol, namespaces)


def translate(docs: Sequence[Mapping[str, Any]]) -> list[Rule]:
    return [r for d in docs for r in parse_policy(d, cluster_name=gen.LOCAL_CLUSTER).rules]


@examples(400)
@given(st.data(), worlds())
def test_network_policy_verdicts_follow_the_kubernetes_semantics(data: st.DataObject, world: dict[str, Any]) -> None:
    docs = data.draw(st.lists(network_policies(hints_of(world)), min_size=1, max_size=4))
    note("world:\n" + as_json(world) + "\npolicies:\n" + as_json(docs))
    keyed = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs}  # a later one replaces
    docs = list(keyed.values())
    rules = translate(docs)
    parties = parties_of(world)
    pods = [p for p in parties if p.is_pod]
    outside = [p for p in parties if p.ip is not None]
    # Ports the policies name (a range's ends and the port after it too) are the interesting ones.
    named = sorted({q for d in docs for field in ("ingress", "egress") for r in d["spec"].get(field) or []
                    for e in r.get("ports") or [] if isinstance(e.get("port"), int)
                    for q in (e["port"], e.get("endPort", e["port"]), e.get("endPort", e["port"]) + 1)})
    # Strategies over this example's parties are built once, not per flow: a new strategy is
    # validated on its first draw, and that was a third of this test's time.
    pick_pool = st.sampled_from((outside, outside, outside, pods, pods, parties))
    pick_from = {id(pool): st.sampled_from(pool) for pool in (outside, pods, parties)}
    pick_named_port = st.sampled_from(named) if named else None
    for _ in range(16):
        # Mostly a pod and another party, often an address outside the cluster (ipBlock peers).
        # (repeated entries weigh the choices)
        pool = data.draw(pick_pool)
        pod, other = data.draw(pick_from[id(pods)]), data.draw(pick_from[id(pool)])
        src, dst = (other, pod) if data.draw(st.booleans()) else (pod, other)
        protocol = data.draw(st.sampled_from(("TCP",) * 6 + ("UDP",) * 2 + ("SCTP",)))
        if dst.named and data.draw(st.booleans()):
            # one of the destination's named container ports, on its protocol
            _, port, protocol = data.draw(st.sampled_from(dst.named))
        elif pick_named_port is not None and data.draw(st.sampled_from((False, True, True))):
            port = data.draw(pick_named_port)
        else:
            port = data.draw(st.sampled_from(FLOW_PORTS))
        want = model_allows(docs, src, dst, port, protocol, world["namespaces"])
        flow = Flow(Peer(src.identity, src.labels, managed=src.is_pod),
                    Peer(dst.identity, dst.labels, managed=dst.is_pod, named_ports=dst.named_ports),
                    port, Protocol(protocol))
        got = evaluate(rules, flow)
        event(f"{'allowed' if want else 'denied'}")
        assert got.allowed is want, (
            f"{src} -> {dst} {port}/{protocol}: the model says {'allowed' if want else 'denied'}, "
            f"evaluate says {got.verdict}:\n  " + "\n  ".join(got.reasons))
        assert not got.redirected and not got.auth_required  # L3/L4 only


# -- 2. and 3. beside CiliumNetworkPolicies -----------------------------------------------------------------


def _cnp_port(entry: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"port": str(entry.get("port", 0)), "protocol": entry.get("protocol", "TCP")}
    if "endPort" in entry:
        out["endPort"] = entry["endPort"]
    return out


def _cnp_endpoints(peer: Mapping[str, Any]) -> dict[str, Any]:
    """A pod/namespace peer as a CNP endpoint selector: namespace labels under Cilium's prefix,
    the name label as the pod's namespace, a pod required."""
    if "namespaceSelector" not in peer:
        return copy.deepcopy(dict(peer["podSelector"]))  # the CNP's own namespace scoping applies

    def key(k: str) -> str:
        return "k8s:io.kubernetes.pod.namespace" if k == NAME_LABEL else f"k8s:io.cilium.k8s.namespace.labels.{k}"

    ns_sel, pod_sel = peer["namespaceSelector"], peer.get("podSelector") or {}
    labels = {**(pod_sel.get("matchLabels") or {}),
              **{key(k): v for k, v in (ns_sel.get("matchLabels") or {}).items()}}
    exprs = [*copy.deepcopy(pod_sel.get("matchExpressions") or []),
             *[{**copy.deepcopy(e), "key": key(e["key"])} for e in ns_sel.get("matchExpressions") or []],
             {"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]
    return {"matchLabels": labels, "matchExpressions": exprs}


def hand_written_cnp(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The CiliumNetworkPolicy a person would write for `doc`, one rule per peer, as Cilium's
    own conversion does."""
    spec = doc["spec"]
    types = policy_types(spec)
    out: dict[str, Any] = {
        "endpointSelector": copy.deepcopy(spec.get("podSelector") or {}),
        "enableDefaultDeny": {"ingress": "Ingress" in types, "egress": "Egress" in types},
    }
    for kind, field, pre in (("Ingress", "ingress", "from"), ("Egress", "egress", "to")):
        if kind not in types:
            continue
        rules: list[dict[str, Any]] = []
        for rule in spec.get(field) or []:
            to_ports = [{"ports": [_cnp_port(p) for p in rule["ports"]]}] if rule.get("ports") else None
            listed = rule.get("from" if field == "ingress" else "to") or []
            cnp_rules: list[dict[str, Any]] = [{f"{pre}Entities": ["all"]}] if not listed else [
                {f"{pre}CIDRSet": [copy.deepcopy(p["ipBlock"])]} if "ipBlock" in p
                else {f"{pre}Endpoints": [_cnp_endpoints(p)]}
                for p in listed]
            for r in cnp_rules:
                if to_ports is not None:
                    r["toPorts"] = copy.deepcopy(to_ports)
                rules.append(r)
        if rules:
            out[field] = rules
    meta = doc["metadata"]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": f"knp-{meta['name']}", "namespace": meta["namespace"]}, "spec": out}


def identities_json(world: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    return {str(p.identity): dict(p.labels) for p in parties_of(world)} | {
        str(gen.WORLD_ID): dict(gen.RESERVED_IDENTITIES[gen.WORLD_ID])}


@composite
def mixes(draw: st.DrawFn) -> dict[str, Any]:
    """A world, NetworkPolicies, generated CNPs/CCNPs and flows: the differential corpus format."""
    world = draw(worlds())
    identities = identities_json(world)
    pod_ids = sorted(int(i) for i in identities if 1000 < int(i) < CIDR_ID_BASE)
    named = {str(p.identity): [[list(d) for d in p.named]] for p in parties_of(world) if p.named}
    universe = {"identities": identities, "endpoints": sorted(draw(st.sets(st.sampled_from(pod_ids), min_size=1))),
                "named_ports": named}
    hints = [lab for lab in identities.values() if "io.kubernetes.pod.namespace" in lab]
    return {
        "cluster_name": gen.LOCAL_CLUSTER,
        "default_namespace": gen.DEFAULT_NAMESPACE,
        **universe,
        "network_policies": draw(st.lists(network_policies(hints_of(world)), min_size=1, max_size=3)),
        "cnps": draw(st.lists(gen.policy_docs(hints=hints), max_size=2)),
        "flows": draw(st.lists(gen.flows(universe), min_size=2, max_size=10)),
    }


def valid(docs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    out = []
    for d in docs:
        try:
            parse_policy(d, cluster_name=gen.LOCAL_CLUSTER, default_namespace=gen.DEFAULT_NAMESPACE)
        except PolicyValidationError:
            continue
        out.append(d)
    return out


@examples(200)
@given(mixes())
def test_network_policies_beside_cnps_equal_their_hand_written_cnps(scn: dict[str, Any]) -> None:
    note("scenario:\n" + as_json(scn))
    identities = gen.identities_of(scn)
    named = gen.named_ports_of(scn)
    endpoints = set(scn["endpoints"])
    cnps = valid(scn["cnps"])
    knps = list({(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in scn["network_policies"]}.values())
    ours = translate([*knps, *cnps])
    hand = translate([*(hand_written_cnp(d) for d in knps), *cnps])
    for f in scn["flows"]:
        flow = gen.flow_of(f, identities, source_managed=f["src"] in endpoints, destination_managed=f["dst"] in endpoints,
                           named_ports=named)
        a, b = evaluate(ours, flow), evaluate(hand, flow)
        event(a.verdict)
        assert same_verdict(a, b), (
            f"flow {as_json(f)}\n  NetworkPolicy: {a.verdict} {a.layer}\n    " + "\n    ".join(a.reasons)
            + f"\n  hand-written CNP: {b.verdict} {b.layer}\n    " + "\n    ".join(b.reasons))


@examples(150)
@given(mixes())
def test_resolved_maps_agree_with_the_reference_evaluator_on_network_policies(scn: dict[str, Any]) -> None:
    note("scenario:\n" + as_json(scn))
    check_differential({**scn, "policies": [*scn["network_policies"], *scn["cnps"]]})


# -- 4. parser robustness ---------------------------------------------------------------------------------


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return list(gen.subtree_paths(doc, prefix))


@composite
def mutated_network_policies(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(network_policies()))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        action = draw(st.sampled_from(("junk", "replace", "delete", "rename")))
        if action == "junk":
            parent[last] = draw(st.sampled_from(gen.JUNK_STRINGS) | gen.json_scalars()
                                | st.sampled_from(("http", "80", 0, 65536, "SCTP", "ANY", "::/0", "10.1.2.3")))
        elif action == "replace":
            parent[last] = draw(gen.json_values(max_leaves=8))
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            value = parent.pop(last)
            parent[draw(st.sampled_from(("from", "to", "ports", "port", "endPort", "ipBlock", "except", "cidr",
                                         "podSelector", "namespaceSelector", "policyTypes", "ingress", "egress"))
                        | st.text(max_size=4))] = value
        else:
            parent.insert(last, draw(gen.json_values(max_leaves=4)))
    return doc


@examples(300)
@given(mutated_network_policies())
def test_parser_on_mutated_network_policies(doc: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/parser/):\n" + as_json({"doc": doc}))
    check_parser(doc)


@examples(100)
@given(network_policies())
def test_generated_network_policies_parse(doc: dict[str, Any]) -> None:
    """The generator must exercise the translation, not the parser's error paths."""
    check_parser(doc)
    parse_policy(doc, cluster_name=gen.LOCAL_CLUSTER)


def _strictly_inside(inner: Any, outer: Any) -> bool:
    return bool(inner.version == outer.version and inner.subnet_of(outer) and inner.prefixlen > outer.prefixlen)
