"""Hypothesis strategies for policy tests: small universes, CNP/CCNP documents, flows, junk.

Everything a strategy draws is plain JSON (dicts, lists, strings, numbers), so that a failing
example can be written to `tests/corpus/` as it is and replayed by a plain test. The helpers at
the bottom turn those JSON values into the engine's types (`Labels`, `HTTPRequest`, `Flow`).

Shapes (also the corpus formats):

- universe: ``{"identities": {"<id>": {label: value}}, "endpoints": [<id>, ...],
  "named_ports": {"<id>": [[[name, containerPort, protocol], ...], ...]}}``
  Identity numbers follow Cilium: 1 host, 2 world, 3 unmanaged, 4 health, 5 init,
  6 remote-node, 7 kube-apiserver, 8 ingress, 9/10 world-ipv4/-ipv6; pods from 1001; CIDR
  identities (`cidr:<prefix>` + `reserved:world`) from 2**24; other nodes' identities from their
  Node's labels (`reserved:remote-node`, `node:<key>`, the cluster label) from 2**25, and the
  host (1) sometimes with this node's labels. `named_ports` (optional) are the
  named container ports of each pod of a pod identity, pod by pod (pods of one identity may
  disagree on a name's number, or not all declare it).
- policy document: a CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy as loaded from YAML.
  Most parse; a few are invalid on purpose (both selectors, L7 in a deny rule, UDP with HTTP
  rules, bad regex, unknown entity, ...), so callers must discard what the parser rejects.
  `toCIDRSet` entries name CiliumCIDRGroups (`cidrGroupRef`, `cidrGroupSelector`) now and then;
  `fromNodes`/`toNodes` select nodes by their labels.
- CIDR group document: a CiliumCIDRGroup (names g1-g3, CIDRs around the universe's CIDR
  identities, a `role` label); scenarios carry a few under ``"cidr_groups"``, and references
  to a group that is not there (g4) stay possible.
- Service and EndpointSlice documents: Services s1-s3 (some without a selector, labelled with a
  `role`) in the universe's namespaces and their EndpointSlices, whose addresses are those of
  the universe's host CIDR identities; scenarios carry a few under ``"services"``, and
  `toServices` entries (egress) name them by name or label — s9 never exists.
- flow: ``{"src": id, "dst": id, "port": n, "protocol": "TCP", "http": request | null,
  "authenticated": bool}`` with request ``{"method", "path", "host", "headers"}``. An ICMP
  flow has ``"protocol": "ICMP"`` and its ICMP type as ``"port"``.

The vocabularies are deliberately tiny (three apps, two teams, three namespaces, two clusters,
a handful of ports and regexes) so that generated selectors and rules actually select the
generated identities and match the generated flows.

Reused by the Envoy and BPF differential tests: import as ``tests.unit.strategies``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from hypothesis import strategies as st

from l7gate.policy.evaluate import Flow, Peer
from l7gate.policy.labels import CLUSTER_KEY, NAMESPACE_KEY, Labels
from l7gate.policy.namedports import NO_NAMED_PORTS, NamedPorts
from l7gate.policy.types import HTTPRequest, Protocol

T = TypeVar("T")
P = ParamSpec("P")


def _frozen(value: Any) -> Any:
    """A hashable stand-in for plain JSON-like arguments and dataclasses of them (TypeError for
    anything else)."""
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_frozen(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple(_frozen(getattr(value, f.name)) for f in dataclasses.fields(value)))
    hash(value)
    return value


def composite(f: Callable[Concatenate[st.DrawFn, P], T]) -> Callable[P, st.SearchStrategy[T]]:
    """`st.composite`, giving the same strategy object for equal arguments.

    A new strategy object is validated on its first draw, through every strategy under it; the
    composites below call each other at draw time (`policy_docs(hints=...)` once per generated
    operation), so about a third of the policy property tests' time went to validating strategy
    trees that were built afresh but equal to earlier ones. Reusing them draws the same values
    from the same choices. The arguments are copied, so that a caller mutating its `hints`
    later cannot reach into a cached strategy."""
    build = st.composite(f)
    cache: dict[Any, st.SearchStrategy[T]] = {}

    @functools.wraps(f)
    def reused(*args: P.args, **kwargs: P.kwargs) -> st.SearchStrategy[T]:
        try:
            key = _frozen((args, kwargs))
        except TypeError:
            return build(*args, **kwargs)
        found = cache.get(key)
        if found is None:
            if len(cache) >= 4096:
                cache.clear()
            found = cache[key] = build(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        return found

    return reused

LOCAL_CLUSTER = "cluster-a"
CLUSTERS = ("cluster-a", "cluster-b")
NAMESPACES = ("payments", "web", "kube-system")
DEFAULT_NAMESPACE = NAMESPACES[0]

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
POLICY_NAMES = ("p1", "p2", "p3")

# Reserved identities as Cilium numbers them.
HOST_ID, WORLD_ID = 1, 2
RESERVED_IDENTITIES: dict[int, dict[str, str]] = {
    1: {"reserved:host": ""},
    2: {"reserved:world": ""},
    3: {"reserved:unmanaged": ""},
    4: {"reserved:health": ""},
    5: {"reserved:init": ""},
    6: {"reserved:remote-node": ""},
    7: {"reserved:kube-apiserver": ""},
    8: {"reserved:ingress": ""},
    9: {"reserved:world-ipv4": ""},
    10: {"reserved:world-ipv6": ""},
}
POD_IDS = tuple(range(1001, 1009))
CIDR_ID_BASE = 1 << 24
CIDR_PREFIXES = ("10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.1.0/24", "2001:db8::/32", "10.1.2.4/32",
                 "192.168.1.7/32")
CIDR_IDENTITIES: dict[int, dict[str, str]] = {
    CIDR_ID_BASE + i: {f"cidr:{p}": "", "reserved:world": ""} for i, p in enumerate(CIDR_PREFIXES)
}

# Other nodes, by the labels of their Node (as `identity.filter.node_labels` gives them).
NODE_ID_BASE = 2 << 24
NODE_LABEL_VALUES: dict[str, tuple[str, ...]] = {"role": ("ingress", "worker"), "zone": ("z1", "z2")}
NODE_IDENTITIES: dict[int, dict[str, str]] = {
    NODE_ID_BASE + 1: {"reserved:remote-node": "", "node:role": "ingress", "node:zone": "z1", CLUSTER_KEY: "cluster-a"},
    NODE_ID_BASE + 2: {"reserved:remote-node": "", "node:role": "worker", "node:zone": "z2", CLUSTER_KEY: "cluster-a"},
    NODE_ID_BASE + 3: {"reserved:remote-node": "", "node:role": "ingress", CLUSTER_KEY: "cluster-b"},
}
# fromNodes/toNodes keys: the nodes' own labels (plain, with a source Cilium strips, or as
# `node:`), the cluster label, a reserved one.
NODE_SELECTOR_KEYS: dict[str, tuple[str, ...]] = {
    "role": NODE_LABEL_VALUES["role"],
    "k8s:role": NODE_LABEL_VALUES["role"],
    "zone": NODE_LABEL_VALUES["zone"],
    "node:zone": NODE_LABEL_VALUES["zone"],
    CLUSTER_KEY: CLUSTERS,
    "reserved:remote-node": ("",),
}

POD_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "app": ("frontend", "billing", "db"),
    "team": ("red", "blue"),
    "env": ("prod", "dev"),
}
# Selector keys, some with a source prefix the parser must strip.
SELECTOR_KEYS: dict[str, tuple[str, ...]] = {
    "app": POD_LABEL_VALUES["app"],
    "k8s:app": POD_LABEL_VALUES["app"],
    "team": POD_LABEL_VALUES["team"],
    "any:env": POD_LABEL_VALUES["env"],
    "k8s:" + NAMESPACE_KEY: NAMESPACES,
    CLUSTER_KEY: CLUSTERS,
}

ENTITIES = (
    "all", "world", "cluster", "host", "remote-node", "kube-apiserver", "ingress", "health",
    "init", "unmanaged", "world-ipv4", "world-ipv6",
)
CIDRS = (
    "10.1.0.0/16", "10.0.0.0/8", "10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0", "192.168.0.0/16",
    "2001:db8::/32", "::/0",
)
PORTS: tuple[str | int, ...] = ("80", "8080", "9090", "443", "53", "0", 80, 8080)
# Container port names pods declare (with the numbers they declare them with), and the names
# rules use: those, one in capitals (Cilium lowers it) and one no pod declares.
CONTAINER_PORTS: tuple[tuple[str, int, str], ...] = (
    ("http", 8080, "TCP"), ("http", 80, "TCP"), ("metrics", 9090, "TCP"), ("dns", 53, "UDP"),
    ("dns", 53, "TCP"), ("admin", 9100, "TCP"), ("http", 8080, "UDP"),
)
# `serverNames` entries (Cilium's wildcards) and the SNIs flows send.
SERVER_NAMES = ("api.example.test", "*.example.test", "**.cdn.test", "*", "API.Example.Test")
FLOW_SERVER_NAMES = ("api.example.test", "x.example.test", "a.b.cdn.test", "cdn.test", "evil.test")
PORT_NAMES = ("http", "http", "metrics", "dns", "admin", "HTTP", "nope")
END_PORTS = (0, 8081, 9100, 65535)
PROTOCOLS = ("TCP", "UDP", "ANY", "SCTP")
METHOD_RES = ("GET", "POST", "POST|PUT", "GET|HEAD", "DELETE", "GET", "POST", ".*")
PATH_RES = ("/v1/charge", "/v1/.*", "/v1/refund", "/", "/v1/charge(\\?.*)?", "/v2/.*")
HOST_RES = ("billing", "billing\\.payments\\.svc", ".*\\.svc", "api")
BAD_RES = ("(", "a(?=b)", "[z-a]", "x{2000}")
HEADER_STRINGS = ("X-User: alice", "x-debug", "X-User bob")
HEADER_MATCHES: tuple[dict[str, str], ...] = (
    {"name": "x-user", "value": "alice"},
    {"name": "X-User", "value": "bob", "mismatch": "LOG"},
    {"name": "x-debug"},
)
AUTH_MODES = ("disabled", "required", "test-always-fail")
# `icmps` types: numbers and Cilium's names (8 three ways), a few the flows never use.
ICMP_TYPES: tuple[int | str, ...] = (8, "EchoRequest", 0, "EchoReply", 13, "8", "Echo", "DestinationUnreachable", 255)
BAD_ICMP_TYPES: tuple[Any, ...] = (256, "Ping", "echoRequest", "08", True)
CIDR_GROUP_NAMES = ("g1", "g2", "g3")
CIDR_GROUP_ROLES = ("vpn", "office")
# Around the universe's CIDR identities (CIDR_PREFIXES), whole families included.
GROUP_CIDRS = ("10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.0.0/16", "10.0.0.0/8", "0.0.0.0/0",
               "2001:db8::/32")
GROUP_EXCEPTS = ("10.1.2.0/24", "10.1.2.3/32", "10.1.0.0/16", "192.168.1.0/24", "10.0.0.0/8")
SERVICE_NAMES = ("s1", "s2", "s3")
SERVICE_ROLES = ("partner", "backup")
# Endpoint addresses: the universe's host CIDR identities, and one no identity has.
ENDPOINT_ADDRESSES = ("10.1.2.3", "10.1.2.4", "192.168.1.7", "10.9.9.9")

REQUEST_METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD")
REQUEST_PATHS = (
    "/v1/charge", "/v1/refund", "/v1//refund", "/v1/%72efund", "/v1/x/../refund",
    "/v1%2Frefund", "/V1/charge", "/v1/charge?x=1", "/v1/charge#frag", "/", "/v2/items",
    "/v1/charge/",
)
REQUEST_HOSTS = ("", "billing", "billing.payments.svc", "api")
FLOW_PORTS = (80, 443, 8080, 8081, 9090, 9100, 53, 1, 65535)
FLOW_ICMP_TYPES = (8, 0, 13, 3, 255, 14)

# Field names the parser knows, so that junk mappings sometimes reach deep into it.
FIELD_NAMES = (
    "apiVersion", "kind", "metadata", "name", "namespace", "spec", "specs", "endpointSelector",
    "nodeSelector", "matchLabels", "matchExpressions", "key", "operator", "values", "ingress",
    "ingressDeny", "egress", "egressDeny", "enableDefaultDeny", "description", "labels",
    "fromEndpoints", "toEndpoints", "fromEntities", "toEntities", "fromCIDR", "toCIDR",
    "fromCIDRSet", "toCIDRSet", "cidr", "except", "toPorts", "ports", "port", "endPort",
    "protocol", "rules", "http", "method", "path", "host", "headers", "headerMatches", "value",
    "mismatch", "authentication", "mode", "source", "icmps", "fields", "type", "family", "cidrGroupRef", "cidrGroupSelector",
    "toServices", "k8sService", "k8sServiceSelector", "serviceName", "selector", "fromNodes", "toNodes", "serverNames",
)
# Strings that have broken parsers before: non-ASCII digits, a lone surrogate (valid in JSON as
# "\ud800"), a number too long for int(), whitespace, signs.
JUNK_STRINGS = (
    "", " ", "80 ", "-1", "0x50", "+80", "²", "١٢", "\ud800", "9" * 5000, "TCP ", "In",
    "cilium.io/v2", CNP, CCNP, "*", "\x00", "/", "10.0.0.0/33", "not-a-cidr",
)


def weighted(draw: st.DrawFn, choices: Sequence[tuple[int, T]]) -> T:
    """Pick one of `choices` by weight. Shrinks towards the first choice, so list the plain,
    valid case first."""
    n = draw(_uniform_below(sum(w for w, _ in choices)))
    for w, value in choices:
        if n < w:
            return value
        n -= w
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=None)
def _uniform_below(n: int) -> st.SearchStrategy[int]:
    # sampled_from draws uniformly; st.integers() favours some values and would skew weights.
    return st.sampled_from(range(n))


# -- universes ----------------------------------------------------------------------------------


def namespace(draw: st.DrawFn) -> str:
    """Mostly the first namespace, so that namespaced policies select the pods they are with."""
    return weighted(draw, [(3, NAMESPACES[0]), (1, NAMESPACES[1]), (1, NAMESPACES[2])])


@composite
def pod_labels(draw: st.DrawFn) -> dict[str, str]:
    labels = {
        NAMESPACE_KEY: namespace(draw),
        CLUSTER_KEY: draw(st.sampled_from(CLUSTERS)),
    }
    for key, values in POD_LABEL_VALUES.items():
        if draw(st.booleans()):
            labels[key] = draw(st.sampled_from(values))
    return labels


def pod_labels_example() -> dict[str, str]:
    """One fixed pod's labels, for hand-written cases."""
    return {NAMESPACE_KEY: "payments", CLUSTER_KEY: LOCAL_CLUSTER}


def host_labels() -> st.SearchStrategy[dict[str, str]]:
    """The local host; node labels (env) let nodeSelector policies select it; with this node's
    Node known, its labels as `node:<key>` (what fromNodes/toNodes read) and its cluster."""
    mine = {CLUSTER_KEY: LOCAL_CLUSTER}
    return st.sampled_from(({}, {"env": "prod"}, {"env": "dev"}, {"node:role": "worker", "node:zone": "z1", **mine},
                            {"node:role": "ingress", **mine})).map(
        lambda extra: {"reserved:host": "", **extra}
    )


def node_labels_of(draw: st.DrawFn) -> dict[str, str]:
    """Another node's identity labels: its Node's labels (some), its cluster."""
    labels = {"reserved:remote-node": "", CLUSTER_KEY: draw(st.sampled_from(CLUSTERS))}
    for key, values in NODE_LABEL_VALUES.items():
        if draw(st.booleans()):
            labels[f"node:{key}"] = draw(st.sampled_from(values))
    return labels


@composite
def universes(draw: st.DrawFn, *, min_pods: int = 1, max_pods: int = 5, min_cidrs: int = 0,
              min_nodes: int = 0) -> dict[str, Any]:
    """Identities (world always, other reserved, CIDR and node identities sometimes, a few pods)
    and the endpoints under policy (some pods, sometimes the host)."""
    identities: dict[str, dict[str, str]] = {str(WORLD_ID): RESERVED_IDENTITIES[WORLD_ID]}
    for ident in draw(st.sets(st.sampled_from(tuple(sorted(RESERVED_IDENTITIES))), max_size=4)):
        identities[str(ident)] = dict(RESERVED_IDENTITIES[ident])
    if draw(st.booleans()):
        identities[str(HOST_ID)] = draw(host_labels())
    for ident in draw(st.sets(st.sampled_from(tuple(sorted(CIDR_IDENTITIES))), min_size=min_cidrs, max_size=max(3, min_cidrs))):
        identities[str(ident)] = dict(CIDR_IDENTITIES[ident])
    for ident in draw(st.sets(st.sampled_from(tuple(sorted(NODE_IDENTITIES))), min_size=min_nodes, max_size=3)):
        identities[str(ident)] = dict(NODE_IDENTITIES[ident])
    n = draw(st.integers(min_pods, max_pods))
    pods = POD_IDS[:n]
    for ident in pods:
        identities[str(ident)] = draw(pod_labels())
    candidates = list(pods) + ([HOST_ID] if str(HOST_ID) in identities else [])
    endpoints = draw(st.sets(st.sampled_from(candidates), min_size=1))
    named: dict[str, list[list[list[Any]]]] = {}
    for ident in pods:
        declared = draw(container_ports())
        if any(declared):
            named[str(ident)] = declared
    return {"identities": identities, "endpoints": sorted(endpoints), "named_ports": named}


@composite
def container_ports(draw: st.DrawFn) -> list[list[list[Any]]]:
    """The named container ports of one identity's pods, pod by pod: mostly one or two pods
    declaring the same; sometimes none, two pods that disagree (http as 8080 and 80), or a
    second pod without them."""
    kind = weighted(draw, [(2, "none"), (4, "one"), (3, "same"), (1, "conflict"), (1, "partial")])
    if kind == "none":
        return []
    chosen = [list(c) for c in sorted(draw(st.sets(st.sampled_from(CONTAINER_PORTS), min_size=1, max_size=3)))]
    if kind == "one":
        return [chosen]
    if kind == "same":
        return [chosen, copy.deepcopy(chosen)]
    if kind == "partial":
        return [chosen, []]
    other = [c for c in chosen if c[0] != "http"]
    return [[*other, ["http", 8080, "TCP"]], [*other, ["http", 80, "TCP"]]]


# -- selectors ----------------------------------------------------------------------------------


@composite
def match_expressions(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(tuple(sorted(SELECTOR_KEYS))))
    op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
    expr: dict[str, Any] = {"key": key, "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = sorted(draw(st.sets(st.sampled_from(SELECTOR_KEYS[key]), min_size=1, max_size=2)))
    elif draw(st.integers(0, 9)) == 0:
        expr["values"] = []
    return expr


@composite
def label_selectors(
    draw: st.DrawFn, *, allow_reserved: bool = False, hints: Sequence[Mapping[str, str]] = ()
) -> dict[str, Any]:
    """A Kubernetes label selector. `{}` is common: it is the interesting edge case. With
    `hints` (label sets of identities that exist), often one that selects one of them."""
    kind = weighted(draw, [(3, "empty"), (6, "labels"), (1 if allow_reserved else 0, "reserved"),
                           (6 if hints else 0, "hint")])
    if kind == "empty":
        return {}
    if kind == "hint":
        target = draw(st.sampled_from(list(hints)))
        known = [k for k in sorted(target) if k in POD_LABEL_VALUES or k == NAMESPACE_KEY]
        chosen = draw(st.sets(st.sampled_from(tuple(known)), max_size=2)) if known else set()
        return {"matchLabels": {k: target[k] for k in sorted(chosen)}} if chosen else {}
    if kind == "reserved":
        name = draw(st.sampled_from(("host", "world", "kube-apiserver", "remote-node")))
        return {"matchLabels": {f"reserved:{name}": ""}}
    sel: dict[str, Any] = {}
    keys = draw(st.sets(st.sampled_from(tuple(sorted(SELECTOR_KEYS))), max_size=2))
    if keys:
        sel["matchLabels"] = {k: draw(st.sampled_from(SELECTOR_KEYS[k])) for k in sorted(keys)}
    if draw(st.booleans()) or not keys:
        sel["matchExpressions"] = draw(st.lists(match_expressions(), min_size=1, max_size=2))
    return sel


@composite
def node_selectors(draw: st.DrawFn) -> dict[str, Any]:
    """A `fromNodes`/`toNodes` entry: `{}` now and then (every node), mostly a node label."""
    if weighted(draw, [(6, False), (1, True)]):
        return {}
    sel: dict[str, Any] = {}
    keys = draw(st.sets(st.sampled_from(tuple(sorted(NODE_SELECTOR_KEYS))), max_size=2))
    if keys:
        sel["matchLabels"] = {k: draw(st.sampled_from(NODE_SELECTOR_KEYS[k])) for k in sorted(keys)}
    if weighted(draw, [(2, False), (1, True)]) or not keys:
        key = draw(st.sampled_from(tuple(sorted(NODE_SELECTOR_KEYS))))
        op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
        expr: dict[str, Any] = {"key": key, "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = sorted(draw(st.sets(st.sampled_from(NODE_SELECTOR_KEYS[key]), min_size=1, max_size=2)))
        sel["matchExpressions"] = [expr]
    return sel


# -- rules ----------------------------------------------------------------------------------------


@composite
def port_protocols(draw: st.DrawFn) -> dict[str, Any]:
    if weighted(draw, [(3, False), (1, True)]):
        named: dict[str, Any] = {"port": draw(st.sampled_from(PORT_NAMES))}
        if weighted(draw, [(30, False), (1, True)]):
            named["endPort"] = 9100  # invalid with a named port
        if draw(st.booleans()):
            named["protocol"] = weighted(draw, [(4, "TCP"), (2, "UDP"), (2, "ANY"), (1, "SCTP")])
        return named
    entry: dict[str, Any] = {"port": draw(st.sampled_from(PORTS))}
    if weighted(draw, [(4, False), (1, True)]):
        end = draw(st.sampled_from(END_PORTS))
        if str(entry["port"]) == "0" and end and weighted(draw, [(9, True), (1, False)]):
            end = 0  # port 0 with a non-zero endPort is invalid; keep it rare
        entry["endPort"] = end
    if draw(st.booleans()):
        entry["protocol"] = weighted(draw, [(4, "TCP"), (2, "UDP"), (2, "ANY"), (1, "SCTP")])
    return entry


@composite
def http_rules(draw: st.DrawFn) -> dict[str, Any] | None:
    if weighted(draw, [(12, False), (1, True)]):
        return None  # `- ` in YAML: the parser reads it as {}
    rule: dict[str, Any] = {}

    def regex(pool: Sequence[str]) -> str:
        return weighted(draw, [(30, draw(st.sampled_from(pool))), (1, draw(st.sampled_from(BAD_RES)))])

    if weighted(draw, [(1, False), (3, True)]):
        rule["method"] = regex(METHOD_RES)
    if weighted(draw, [(1, False), (3, True)]):
        rule["path"] = regex(PATH_RES)
    if weighted(draw, [(3, False), (1, True)]):
        rule["host"] = regex(HOST_RES)
    if weighted(draw, [(4, False), (1, True)]):
        rule["headers"] = draw(st.lists(st.sampled_from(HEADER_STRINGS), min_size=1, max_size=2))
    if weighted(draw, [(5, False), (1, True)]):
        rule["headerMatches"] = [dict(h) for h in draw(st.lists(st.sampled_from(HEADER_MATCHES), min_size=1, max_size=2))]
    return rule


@composite
def port_rules(draw: st.DrawFn, *, deny: bool, ingress: bool = True) -> dict[str, Any]:
    """One `toPorts` element: L4 ports, or a single TCP port with HTTP rules, or with TLS server
    names (egress), or `{}`.

    HTTP rules or serverNames in a deny rule, on a protocol other than TCP or on a port range are
    invalid, and so are serverNames on ingress or beside HTTP rules; they stay rare."""
    kind = weighted(draw, [(30, "l4"), (1, "l7"), (3, "empty"), (1, "sni")] if deny
                    else [(6, "l4"), (10, "l7"), (1, "empty"), (1 if ingress else 5, "sni")])
    if kind == "empty":
        return {}
    if kind == "sni":
        sni_port: dict[str, Any] = {"port": weighted(draw, [(3, "8080"), (1, "80"), (1, "http"), (1, "0")])}
        sni_port["protocol"] = weighted(draw, [(20, "TCP"), (2, "ANY"), (1, "UDP")])
        out: dict[str, Any] = {"ports": [sni_port],
                               "serverNames": draw(st.lists(st.sampled_from(SERVER_NAMES), min_size=1, max_size=2))}
        if weighted(draw, [(30, False), (1, True)]):
            out["rules"] = {"http": [{}]}  # refused beside serverNames
        return out
    if kind == "l4":
        return {"ports": draw(st.lists(port_protocols(), min_size=1, max_size=2))}
    port: dict[str, Any] = {"port": weighted(draw, [(2, "8080"), (2, 8080), (1, "80"), (3, "http"), (1, "metrics")])}
    # Cilium refuses HTTP rules on anything but TCP (ANY, left out, UDP): those stay rare
    proto = weighted(draw, [(1, None), (40, "TCP"), (1, "ANY"), (1, "UDP")])
    if proto is not None:
        port["protocol"] = proto
    if weighted(draw, [(60, False), (1, True)]):
        port["endPort"] = 9100  # a range: invalid with HTTP rules
    http = draw(st.lists(http_rules(), min_size=1, max_size=2))
    if weighted(draw, [(12, False), (1, True)]):
        http = [{}]
    return {"ports": [port], "rules": {"http": http}}


@composite
def icmp_rules(draw: st.DrawFn) -> dict[str, Any]:
    """One `icmps` element: a few types, rarely none, an IPv6 family or a bad type (invalid)."""
    if weighted(draw, [(20, False), (1, True)]):
        return {} if draw(st.booleans()) else {"fields": []}  # no type: the rule matches nothing
    fields: list[dict[str, Any]] = []
    for t in draw(st.lists(st.sampled_from(ICMP_TYPES), min_size=1, max_size=3)):
        field: dict[str, Any] = {"type": t}
        if weighted(draw, [(4, False), (1, True)]):
            field["family"] = weighted(draw, [(30, "IPv4"), (1, "IPv6")])
        fields.append(field)
    if weighted(draw, [(40, False), (1, True)]):
        fields.append({"type": draw(st.sampled_from(BAD_ICMP_TYPES))})
    return {"fields": fields}


@composite
def peer_rules(
    draw: st.DrawFn, *, ingress: bool, deny: bool, hints: Sequence[Mapping[str, str]] = ()
) -> dict[str, Any]:
    """One element of ingress / ingressDeny / egress / egressDeny."""
    pre = "from" if ingress else "to"
    rule: dict[str, Any] = {}
    peer_kind = weighted(draw, [(5, "endpoints"), (2, "entities"), (1, "cidr"), (1, "cidrset"), (2, "nodes"),
                                (0 if ingress else 1, "services"), (4, "none"), (1, "two")])
    kinds = [peer_kind] if peer_kind != "two" else draw(
        st.lists(st.sampled_from(("endpoints", "entities", "cidr", "cidrset", "nodes")), min_size=2,
                 max_size=2, unique=True))
    for k in kinds:
        if k == "endpoints":
            rule[pre + "Endpoints"] = draw(st.lists(label_selectors(allow_reserved=True, hints=hints), max_size=2))
        elif k == "entities":
            ents = draw(st.lists(st.sampled_from(ENTITIES), max_size=2))
            if weighted(draw, [(40, False), (1, True)]):
                ents.append("galaxy")
            rule[pre + "Entities"] = ents
        elif k == "cidr":
            cidrs = draw(st.lists(st.sampled_from(CIDRS), max_size=2))
            if weighted(draw, [(40, False), (1, True)]):
                cidrs.append("10.1.2.3")  # no prefix length: rejected
            rule[pre + "CIDR"] = cidrs
        elif k == "cidrset":
            rule[pre + "CIDRSet"] = draw(st.lists(cidr_sets(), max_size=2))
        elif k == "services":
            rule["toServices"] = draw(st.lists(service_entries(), max_size=2))
        elif k == "nodes":
            rule[pre + "Nodes"] = draw(st.lists(node_selectors(), max_size=2))
    l4 = weighted(draw, [(3, "toPorts"), (2, "none"), (1, "icmps")])
    if peer_kind == "services" and weighted(draw, [(4, True), (1, False)]):
        l4 = "none"  # Cilium refuses toServices beside toPorts: keep that rare
    if l4 == "none" and peer_kind == "none" and draw(st.booleans()):
        l4 = "toPorts"
    if weighted(draw, [(60, False), (1, True)]):
        l4 = "both"  # Cilium refuses icmps beside toPorts
    if l4 in ("toPorts", "both"):
        rule["toPorts"] = draw(st.lists(port_rules(deny=deny, ingress=ingress), min_size=weighted(draw, [(6, 1), (1, 0)]),
                                        max_size=2))
    if l4 in ("icmps", "both"):
        rule["icmps"] = draw(st.lists(icmp_rules(), min_size=weighted(draw, [(8, 1), (1, 0)]), max_size=2))
    if not deny and weighted(draw, [(4, False), (1, True)]):
        rule["authentication"] = {"mode": draw(st.sampled_from(AUTH_MODES))}
    elif deny and weighted(draw, [(40, False), (1, True)]):
        rule["authentication"] = {"mode": "required"}  # not allowed in deny rules
    return rule


@composite
def cidr_sets(draw: st.DrawFn) -> dict[str, Any]:
    """A `toCIDRSet` entry: mostly a CIDR, sometimes CIDR groups by name (g4 never exists) or by
    label; rarely two kinds at once (refused)."""
    kind = weighted(draw, [(6, "cidr"), (3, "ref"), (2, "selector"), (1, "two")])
    entry: dict[str, Any] = {}
    if kind in ("cidr", "two"):
        entry["cidr"] = draw(st.sampled_from(("10.0.0.0/8", "10.1.0.0/16", "0.0.0.0/0", "192.168.0.0/16")))
        if draw(st.booleans()):
            entry["except"] = draw(st.lists(st.sampled_from(("10.1.2.0/24", "10.1.0.0/16", "10.1.2.3/32")), max_size=2))
    if kind in ("ref", "two"):
        entry["cidrGroupRef"] = weighted(draw, [(6, draw(st.sampled_from(CIDR_GROUP_NAMES))), (1, "g4")])
    if kind == "selector":
        entry["cidrGroupSelector"] = draw(cidr_group_selectors())
    if kind in ("ref", "selector") and draw(st.booleans()):
        entry["except"] = draw(st.lists(st.sampled_from(GROUP_EXCEPTS), max_size=2))
    return entry


@composite
def cidr_group_selectors(draw: st.DrawFn) -> dict[str, Any]:
    kind = weighted(draw, [(4, "role"), (2, "expr"), (1, "name"), (1, "empty")])
    if kind == "role":
        return {"matchLabels": {"role": draw(st.sampled_from(CIDR_GROUP_ROLES))}}
    if kind == "expr":
        op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
        expr: dict[str, Any] = {"key": "role", "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = [draw(st.sampled_from(CIDR_GROUP_ROLES))]
        return {"matchExpressions": [expr]}
    if kind == "name":
        name = draw(st.sampled_from(CIDR_GROUP_NAMES))
        return {"matchExpressions": [{"key": f"io.cilium.policy.cidrgroupname/{name}", "operator": "Exists"}]}
    return {}


@composite
def cidr_group_docs(draw: st.DrawFn, *, name: str | None = None) -> dict[str, Any]:
    """A CiliumCIDRGroup, in either version Cilium serves; rarely with a bare address (refused)."""
    meta: dict[str, Any] = {"name": name or draw(st.sampled_from(CIDR_GROUP_NAMES))}
    if draw(st.booleans()):
        meta["labels"] = {"role": draw(st.sampled_from(CIDR_GROUP_ROLES))}
    # mostly wide CIDRs, which hold several of the universe's CIDR identities
    wide = ("10.0.0.0/8", "10.1.0.0/16")
    cidrs = draw(st.lists(st.sampled_from(wide * 3 + GROUP_CIDRS), min_size=weighted(draw, [(1, 0), (8, 1)]),
                          max_size=3))
    if weighted(draw, [(30, False), (1, True)]):
        cidrs.append("10.1.2.3")
    return {"apiVersion": draw(st.sampled_from(("cilium.io/v2alpha1", "cilium.io/v2"))), "kind": "CiliumCIDRGroup",
            "metadata": meta, "spec": {"externalCIDRs": cidrs}}


@composite
def service_entries(draw: st.DrawFn) -> dict[str, Any]:
    """A `toServices` entry: a Service by name (s9 never exists), by its labels, rarely neither or
    both (refused); the namespace mostly given, sometimes left out (every namespace)."""
    kind = weighted(draw, [(5, "name"), (3, "labels"), (1, "bad")])
    entry: dict[str, Any] = {}
    namespace = weighted(draw, [(3, NAMESPACES[0]), (1, NAMESPACES[1]), (2, None)])
    if kind == "name":
        ref: dict[str, Any] = {"serviceName": weighted(draw, [(6, draw(st.sampled_from(SERVICE_NAMES))), (1, "s9")])}
        if namespace is not None:
            ref["namespace"] = namespace
        entry["k8sService"] = ref
    elif kind == "labels":
        sel = weighted(draw, [(4, {"matchLabels": {"role": draw(st.sampled_from(SERVICE_ROLES))}}),
                              (1, {"matchExpressions": [{"key": "role", "operator": "Exists"}]}), (1, {})])
        by: dict[str, Any] = {"selector": sel}
        if namespace is not None:
            by["namespace"] = namespace
        entry["k8sServiceSelector"] = by
    elif draw(st.booleans()):
        entry = {"k8sService": {"serviceName": "s1"}, "k8sServiceSelector": {"selector": {}}}
    return entry


@composite
def service_docs(draw: st.DrawFn, *, name: str | None = None) -> list[dict[str, Any]]:
    """A Service (mostly without a selector, now and then with one) and its EndpointSlices, in one
    of the universe's namespaces; endpoints ready, not ready, or serving while terminating; rarely
    a slice the API server refuses (a loopback address)."""
    svc_name = name or draw(st.sampled_from(SERVICE_NAMES))
    ns = namespace(draw)
    meta: dict[str, Any] = {"name": svc_name, "namespace": ns}
    if draw(st.booleans()):
        meta["labels"] = {"role": draw(st.sampled_from(SERVICE_ROLES))}
    spec: dict[str, Any] = {"ports": [{"name": "https", "port": 443}]}
    if weighted(draw, [(4, False), (1, True)]):
        spec["selector"] = {"app": "db"}
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}]
    for i in range(draw(st.integers(0, 2))):
        endpoints = []
        for _ in range(draw(st.integers(0, 2))):
            endpoint: dict[str, Any] = {"addresses": draw(st.lists(st.sampled_from(ENDPOINT_ADDRESSES), min_size=1,
                                                                   max_size=2, unique=True))}
            condition = weighted(draw, [(4, None), (1, {"ready": False}),
                                        (1, {"ready": False, "serving": True, "terminating": True})])
            if condition is not None:
                endpoint["conditions"] = condition
            endpoints.append(endpoint)
        if weighted(draw, [(30, False), (1, True)]):
            endpoints.append({"addresses": ["127.0.0.1"]})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{svc_name}-{i}", "namespace": ns,
                                  "labels": {"kubernetes.io/service-name": svc_name}},
                     "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "https", "port": 443}]})
    return docs


@composite
def direction_lists(
    draw: st.DrawFn, *, ingress: bool, deny: bool, hints: Sequence[Mapping[str, str]] = ()
) -> list[dict[str, Any]] | None:
    """None (field absent), [], [{}] or a few peer rules."""
    kind = weighted(draw, [(2, "absent"), (1, "empty"), (1, "braces"), (6, "rules")])
    if kind == "absent":
        return None
    if kind == "empty":
        return []
    if kind == "braces":
        return [{}]
    return draw(st.lists(peer_rules(ingress=ingress, deny=deny, hints=hints), min_size=1, max_size=3))


@composite
def specs(draw: st.DrawFn, *, kind: str, hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    choice = weighted(draw, [(30, "endpoint"), (3 if kind == CCNP else 0, "node"),
                             (1, "both"), (1, "neither")])
    if choice in ("endpoint", "both"):
        spec["endpointSelector"] = draw(label_selectors(hints=hints))
    if choice in ("node", "both"):
        spec["nodeSelector"] = draw(st.sampled_from(({}, {"matchLabels": {"env": "prod"}})))
    for field, ingress, deny in (
        ("ingress", True, False), ("ingressDeny", True, True),
        ("egress", False, False), ("egressDeny", False, True),
    ):
        weights = [(1, False), (3, True)] if not deny else [(3, False), (1, True)]
        if weighted(draw, weights):
            value = draw(direction_lists(ingress=ingress, deny=deny, hints=hints))
            if value is not None:
                spec[field] = value
    if weighted(draw, [(4, False), (1, True)]):
        edd = {}
        for d in ("ingress", "egress"):
            if draw(st.booleans()):
                edd[d] = draw(st.booleans())
        spec["enableDefaultDeny"] = edd
    if weighted(draw, [(6, False), (1, True)]):
        spec["description"] = "generated"
    return spec


@composite
def policy_docs(draw: st.DrawFn, *, hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A CNP or CCNP document. Names collide on purpose, so later documents replace earlier ones.
    `hints`: pod label sets; selectors and namespaces are often taken from them."""
    kind = weighted(draw, [(2, CNP), (1, CCNP)])
    meta: dict[str, Any] = {"name": draw(st.sampled_from(POLICY_NAMES))}
    if kind == CNP and weighted(draw, [(1, False), (4, True)]):
        from_hint: bool = draw(st.booleans())
        if hints and from_hint:
            meta["namespace"] = draw(st.sampled_from(list(hints)))[NAMESPACE_KEY]
        else:
            meta["namespace"] = namespace(draw)
    doc: dict[str, Any] = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta}
    if weighted(draw, [(5, True), (1, False)]):
        doc["spec"] = draw(specs(kind=kind, hints=hints))
    else:
        doc["specs"] = draw(st.lists(specs(kind=kind, hints=hints), min_size=1, max_size=2))
    return doc


def policy_key(doc: Mapping[str, Any], default_namespace: str = DEFAULT_NAMESPACE) -> str:
    """The repository key a (valid) document is stored under."""
    meta = doc["metadata"]
    if doc["kind"] == CNP:
        return f"{CNP}/{meta.get('namespace', default_namespace)}/{meta['name']}"
    return f"{CCNP}/{meta['name']}"


def policy_keys() -> st.SearchStrategy[str]:
    """Keys generated documents can have (and one that none has)."""
    keys = [f"{CNP}/{ns}/{n}" for ns in NAMESPACES for n in POLICY_NAMES]
    keys += [f"{CCNP}/{n}" for n in POLICY_NAMES] + [f"{CNP}/payments/never"]
    return st.sampled_from(keys)


# -- flows ----------------------------------------------------------------------------------------


@composite
def tls_server_names(draw: st.DrawFn) -> str:
    """The SNI of a TLS flow ("" for none)."""
    return weighted(draw, [(6, draw(st.sampled_from(FLOW_SERVER_NAMES))), (1, "")])


@composite
def http_requests(draw: st.DrawFn) -> dict[str, Any]:
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["x-user"] = draw(st.sampled_from(("alice", "bob")))
    if weighted(draw, [(3, False), (1, True)]):
        headers["x-debug"] = "1"
    return {
        "method": draw(st.sampled_from(REQUEST_METHODS)),
        "path": draw(st.sampled_from(REQUEST_PATHS)),
        "host": draw(st.sampled_from(REQUEST_HOSTS)),
        "headers": headers,
    }


@composite
def flows(draw: st.DrawFn, universe: Mapping[str, Any]) -> dict[str, Any]:
    """A flow between identities of `universe`, biased towards endpoints on either side."""
    all_ids = sorted(int(i) for i in universe["identities"])
    eps = list(universe["endpoints"])

    def party() -> int:
        return draw(st.sampled_from(eps)) if draw(st.booleans()) else draw(st.sampled_from(all_ids))

    protocol = weighted(draw, [(8, "TCP"), (1, "UDP"), (1, "SCTP"), (2, "ICMP")])
    http = None
    tls_sni: str | None = None
    if protocol == "TCP":
        what = weighted(draw, [(1, "none"), (3, "http"), (1, "tls")])
        if what == "http":
            http = draw(http_requests())
        elif what == "tls":
            tls_sni = draw(tls_server_names())
    src, dst = party(), party()
    if protocol == "ICMP":
        port = draw(st.sampled_from(FLOW_ICMP_TYPES))  # the ICMP type
    else:
        # Mostly the ports HTTP rules are generated on; often a named port the destination declares.
        declared = [d for pod in universe.get("named_ports", {}).get(str(dst), []) for d in pod]
        port = weighted(draw, [(6, 8080), (2, 80), (2, draw(st.sampled_from(FLOW_PORTS))), (4 if declared else 0, -1)])
        if port == -1:
            _, port, proto = draw(st.sampled_from(declared))
            protocol = weighted(draw, [(4, proto), (1, "TCP")])
            if protocol != "TCP":
                http = tls_sni = None
    out = {
        "src": src,
        "dst": dst,
        "port": port,
        "protocol": protocol,
        "http": http,
        "authenticated": draw(st.booleans()),
    }
    if tls_sni is not None:
        out["tls_sni"] = tls_sni
    return out


@composite
def scenarios(draw: st.DrawFn, *, max_policies: int = 4, max_flows: int = 10) -> dict[str, Any]:
    """A universe, policy documents and flows among its identities (the differential corpus
    format)."""
    universe = draw(universes())
    hints = [lab for lab in universe["identities"].values() if NAMESPACE_KEY in lab]
    return {
        "cluster_name": LOCAL_CLUSTER,
        "default_namespace": DEFAULT_NAMESPACE,
        **universe,
        "policies": draw(st.lists(policy_docs(hints=hints), min_size=1, max_size=max_policies)),
        "cidr_groups": draw(st.lists(cidr_group_docs(), max_size=3)),
        "services": [d for docs in draw(st.lists(service_docs(), max_size=2)) for d in docs],
        "flows": draw(st.lists(flows(universe), min_size=2, max_size=max_flows)),
    }


@composite
def group_cidr_sets(draw: st.DrawFn) -> dict[str, Any]:
    """A `toCIDRSet` entry that names CIDR groups (by name, g4 never existing, or by label)."""
    entry: dict[str, Any] = {}
    if draw(st.booleans()):
        entry["cidrGroupRef"] = weighted(draw, [(6, draw(st.sampled_from(CIDR_GROUP_NAMES))), (1, "g4")])
    else:
        entry["cidrGroupSelector"] = draw(cidr_group_selectors())
    if weighted(draw, [(1, False), (2, True)]):
        # mostly ranges inside the wide group CIDRs, around the universe's CIDR identities
        entry["except"] = draw(st.lists(
            st.sampled_from(GROUP_EXCEPTS[:2] * 3 + GROUP_EXCEPTS[2:]), min_size=1, max_size=2))
    return entry


def _with_one_more_rule(draw: st.DrawFn, hints: Sequence[Mapping[str, str]],
                        peers: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """A policy document with one more rule (allow or deny, either direction) whose peer field is
    `peers(ingress)`, sometimes with ports: either a generated policy, or a plain one selecting the
    pods of a namespace, so that the added rule decides verdicts."""
    if weighted(draw, [(2, False), (1, True)]):
        doc = copy.deepcopy(draw(policy_docs(hints=hints)))
    else:
        doc = {"apiVersion": "cilium.io/v2", "kind": CNP, "metadata": {"name": draw(st.sampled_from(POLICY_NAMES))},
               "spec": {"endpointSelector": weighted(draw, [(3, {}), (1, draw(label_selectors(hints=hints)))])}}
        from_hint: bool = draw(st.booleans())
        if hints and from_hint:
            doc["metadata"]["namespace"] = draw(st.sampled_from(list(hints)))[NAMESPACE_KEY]
    spec = doc["spec"] if "spec" in doc else doc["specs"][0]
    if not isinstance(spec, dict):
        return doc
    field = weighted(draw, [(3, "ingress"), (3, "egress"), (1, "ingressDeny"), (1, "egressDeny")])
    rule = peers(field.startswith("ingress"))
    if weighted(draw, [(3, False), (1, True)]):
        rule["toPorts"] = [{"ports": draw(st.lists(port_protocols(), min_size=1, max_size=2))}]
    existing = spec.get(field)
    spec[field] = [*existing, rule] if isinstance(existing, list) else [rule]
    return doc


def _flows_between(draw: st.DrawFn, universe: Mapping[str, Any], peers: Sequence[int], max_flows: int) -> list[Any]:
    """Flows between the universe's endpoints and `peers`, either way."""
    eps = list(universe["endpoints"])

    @composite
    def flow(draw: st.DrawFn) -> dict[str, Any]:
        f = draw(flows(universe))
        if draw(st.booleans()):
            f["src"], f["dst"] = draw(st.sampled_from(peers)), draw(st.sampled_from(eps))
        else:
            f["src"], f["dst"] = draw(st.sampled_from(eps)), draw(st.sampled_from(peers))
        return f

    return draw(st.lists(flow(), min_size=4, max_size=max_flows))


@composite
def group_policy_docs(draw: st.DrawFn, *, hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A policy document with one more rule, whose peers are CIDR groups (CIDR entries beside
    them sometimes)."""
    def peers(ingress: bool) -> dict[str, Any]:
        entries = draw(st.lists(group_cidr_sets(), min_size=1, max_size=2))
        if weighted(draw, [(4, False), (1, True)]):
            entries.append(draw(cidr_sets()))
        return {("fromCIDRSet" if ingress else "toCIDRSet"): entries}

    return _with_one_more_rule(draw, hints, peers)


@composite
def group_scenarios(draw: st.DrawFn, *, max_policies: int = 3, max_flows: int = 10) -> dict[str, Any]:
    """A scenario (`scenarios`' format) where policies name CIDR groups, the universe has CIDR
    identities for the groups' CIDRs to select, and flows go between them and endpoints."""
    universe = draw(universes(min_cidrs=2))
    hints = [lab for lab in universe["identities"].values() if NAMESPACE_KEY in lab]
    cidr_ids = sorted(int(i) for i in universe["identities"] if int(i) in CIDR_IDENTITIES or int(i) == WORLD_ID)
    return {
        "cluster_name": LOCAL_CLUSTER,
        "default_namespace": DEFAULT_NAMESPACE,
        **universe,
        "policies": draw(st.lists(group_policy_docs(hints=hints), min_size=1, max_size=max_policies)),
        # most names taken (a reference to one that is not is a case too), now and then twice
        "cidr_groups": [g for name in CIDR_GROUP_NAMES if weighted(draw, [(1, False), (3, True)])
                        for g in draw(st.lists(cidr_group_docs(name=name), min_size=1, max_size=2))],
        "flows": _flows_between(draw, universe, cidr_ids, max_flows),
    }


@composite
def node_policy_docs(draw: st.DrawFn, *, hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A policy document with one more rule, whose peers are nodes by label."""
    return _with_one_more_rule(draw, hints, lambda ingress: {
        ("fromNodes" if ingress else "toNodes"): draw(st.lists(node_selectors(), min_size=1, max_size=2))})


@composite
def node_scenarios(draw: st.DrawFn, *, max_policies: int = 3, max_flows: int = 10) -> dict[str, Any]:
    """A scenario (`scenarios`' format) where policies name nodes by label, the universe has
    node identities (the host with or without this node's labels, `remote-node` 6 for a node
    whose labels are unknown, labelled ones), and flows go between them and endpoints."""
    universe = draw(universes(min_nodes=1))
    if draw(st.booleans()):
        universe["identities"][str(HOST_ID)] = draw(host_labels())
    if draw(st.booleans()):
        universe["identities"]["6"] = dict(RESERVED_IDENTITIES[6])
    hints = [lab for lab in universe["identities"].values() if NAMESPACE_KEY in lab]
    node_ids = sorted(int(i) for i, lab in universe["identities"].items()
                      if "reserved:remote-node" in lab or "reserved:host" in lab)
    return {
        "cluster_name": LOCAL_CLUSTER,
        "default_namespace": DEFAULT_NAMESPACE,
        **universe,
        "policies": draw(st.lists(node_policy_docs(hints=hints), min_size=1, max_size=max_policies)),
        "flows": _flows_between(draw, universe, node_ids, max_flows),
    }


@composite
def service_policy_docs(draw: st.DrawFn, *, hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A policy document with one more egress (or, rarely, egressDeny) rule naming Services."""
    if weighted(draw, [(2, False), (1, True)]):
        doc = copy.deepcopy(draw(policy_docs(hints=hints)))
    else:  # a plain one, selecting the pods of a namespace, so that the service rule decides verdicts
        doc = {"apiVersion": "cilium.io/v2", "kind": draw(st.sampled_from((CNP, CNP, CCNP))),
               "metadata": {"name": draw(st.sampled_from(POLICY_NAMES))},
               "spec": {"endpointSelector": weighted(draw, [(3, {}), (1, draw(label_selectors(hints=hints)))])}}
        from_hint: bool = draw(st.booleans())
        if hints and from_hint and doc["kind"] == CNP:
            doc["metadata"]["namespace"] = draw(st.sampled_from(list(hints)))[NAMESPACE_KEY]
    spec = doc["spec"] if "spec" in doc else doc["specs"][0]
    if not isinstance(spec, dict):
        return doc
    field = weighted(draw, [(4, "egress"), (1, "egressDeny")])
    rule: dict[str, Any] = {"toServices": draw(st.lists(service_entries(), min_size=1, max_size=2))}
    if weighted(draw, [(12, False), (1, True)]):
        rule["toPorts"] = [{"ports": [{"port": "443", "protocol": "TCP"}]}]  # refused beside toServices
    elif weighted(draw, [(6, False), (1, True)]):
        rule["icmps"] = [{"fields": [{"type": 8}]}]
    existing = spec.get(field)
    spec[field] = [*existing, rule] if isinstance(existing, list) else [rule]
    return doc


@composite
def service_scenarios(draw: st.DrawFn, *, max_policies: int = 3, max_flows: int = 10) -> dict[str, Any]:
    """A scenario (`scenarios`' format) where policies name Services with toServices, the
    universe has the host CIDR identities their EndpointSlices list, and flows go from endpoints
    to them (and to other CIDR identities, world, pods)."""
    universe = draw(universes(min_cidrs=3))
    hosts = [str(i) for i, p in CIDR_IDENTITIES.items() if next(iter(p)).endswith("/32")]
    for ident in draw(st.sets(st.sampled_from(hosts), min_size=1)):
        universe["identities"][ident] = dict(CIDR_IDENTITIES[int(ident)])
    hints = [lab for lab in universe["identities"].values() if NAMESPACE_KEY in lab]
    eps = list(universe["endpoints"])
    others = sorted(int(i) for i in universe["identities"])

    @composite
    def flow(draw: st.DrawFn) -> dict[str, Any]:
        f = draw(flows(universe))
        f["src"] = draw(st.sampled_from(eps))
        f["dst"] = weighted(draw, [(3, int(draw(st.sampled_from(hosts)))), (1, draw(st.sampled_from(others)))])
        if str(f["dst"]) not in universe["identities"]:
            f["dst"] = draw(st.sampled_from(others))
        return f

    return {
        "cluster_name": LOCAL_CLUSTER,
        "default_namespace": DEFAULT_NAMESPACE,
        **universe,
        "policies": draw(st.lists(service_policy_docs(hints=hints), min_size=1, max_size=max_policies)),
        # most names taken (a name without a Service is a case too), now and then twice
        "services": [d for name in SERVICE_NAMES if weighted(draw, [(1, False), (3, True)])
                     for docs in draw(st.lists(service_docs(name=name), min_size=1, max_size=2)) for d in docs],
        "flows": draw(st.lists(flow(), min_size=4, max_size=max_flows)),
    }


# -- operation sequences (incremental resolution) ---------------------------------------------


_node_labels = composite(node_labels_of)


def _identity_labels(ident: int) -> st.SearchStrategy[dict[str, str]]:
    if ident in RESERVED_IDENTITIES:
        if ident == HOST_ID:
            return host_labels()
        return st.just(dict(RESERVED_IDENTITIES[ident]))
    if ident in CIDR_IDENTITIES:
        return st.just(dict(CIDR_IDENTITIES[ident]))
    if ident in NODE_IDENTITIES:
        return _node_labels()  # a node relabelled (its number is the agent's to keep)
    return pod_labels()


IDENTITY_POOL = (HOST_ID, WORLD_ID, 7, *POD_IDS[:6], CIDR_ID_BASE, CIDR_ID_BASE + 2, NODE_ID_BASE + 1)


@composite
def operations(draw: st.DrawFn, *, hints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """One resolver operation, as JSON. Ids come from a small pool so operations collide."""
    op = weighted(draw, [(4, "identities"), (3, "add_endpoint"), (1, "remove_endpoint"),
                         (4, "upsert_policy"), (1, "delete_policy"), (1, "recompute_all"),
                         (3, "named_ports"), (2, "upsert_group"), (1, "delete_group"),
                         (3, "upsert_services"), (1, "delete_service")])
    if op == "named_ports":
        # A pod of the identity came, went or changed its container ports: the ports all its pods
        # declare now.
        changed = draw(st.sets(st.sampled_from(POD_IDS[:6]), min_size=1, max_size=2))
        return {"op": op, "named_ports": {str(i): draw(container_ports()) for i in sorted(changed)}}
    if op == "identities":
        upserted: dict[str, dict[str, str]] = {}
        for ident in draw(st.sets(st.sampled_from(IDENTITY_POOL), max_size=2)):
            upserted[str(ident)] = draw(_identity_labels(ident))
        deleted = draw(st.sets(st.sampled_from(tuple(i for i in IDENTITY_POOL if str(i) not in upserted)), max_size=1))
        return {"op": op, "upserted": upserted, "deleted": sorted(deleted)}
    if op in ("add_endpoint", "remove_endpoint"):
        return {"op": op, "id": draw(st.sampled_from((HOST_ID, *POD_IDS[:6])))}
    if op == "upsert_policy":
        docs = weighted(draw, [(2, policy_docs(hints=hints)), (1, group_policy_docs(hints=hints)),
                               (1, service_policy_docs(hints=hints)), (1, node_policy_docs(hints=hints))])
        return {"op": op, "doc": draw(docs)}
    if op == "delete_policy":
        return {"op": op, "key": draw(policy_keys())}
    if op == "upsert_group":
        return {"op": op, "doc": draw(cidr_group_docs())}
    if op == "delete_group":
        return {"op": op, "name": draw(st.sampled_from(CIDR_GROUP_NAMES))}
    if op == "upsert_services":
        return {"op": op, "docs": draw(service_docs())}
    if op == "delete_service":
        return {"op": op, "kind": draw(st.sampled_from(("Service", "EndpointSlice"))),
                "namespace": draw(st.sampled_from(NAMESPACES)), "name": draw(st.sampled_from(
                    SERVICE_NAMES + tuple(f"{n}-0" for n in SERVICE_NAMES)))}
    return {"op": op}


@composite
def op_sequences(draw: st.DrawFn) -> dict[str, Any]:
    """`setup` builds an initial state (its maps are the appliers' starting point); `ops` are the
    changes whose deltas are checked (the incremental corpus format)."""
    universe = draw(universes(min_pods=2))
    hints = [lab for lab in universe["identities"].values() if NAMESPACE_KEY in lab]
    setup: list[dict[str, Any]] = [{
        "op": "identities",
        "upserted": universe["identities"],
        "deleted": [],
    }]
    if universe["named_ports"]:
        setup.append({"op": "named_ports", "named_ports": universe["named_ports"]})
    setup += [{"op": "upsert_group", "doc": d} for d in draw(st.lists(cidr_group_docs(), max_size=2))]
    setup += [{"op": "upsert_services", "docs": d} for d in draw(st.lists(service_docs(), max_size=2))]
    docs = policy_docs(hints=hints) | group_policy_docs(hints=hints) | service_policy_docs(hints=hints)
    setup += [{"op": "upsert_policy", "doc": d} for d in draw(st.lists(docs, max_size=3))]
    if weighted(draw, [(2, False), (1, True)]):  # a policy naming Services, that later changes of them move
        setup.append({"op": "upsert_policy", "doc": draw(service_policy_docs(hints=hints))})
    setup += [{"op": "add_endpoint", "id": e} for e in universe["endpoints"]]
    return {
        "cluster_name": LOCAL_CLUSTER,
        "default_namespace": DEFAULT_NAMESPACE,
        "setup": setup,
        "ops": draw(st.lists(operations(hints=hints), min_size=1, max_size=15)),
    }


@composite
def service_op_sequences(draw: st.DrawFn) -> dict[str, Any]:
    """`op_sequences`' format, where policies name Services and the changes are mostly of
    Services and their EndpointSlices (each re-expands the policies naming Services)."""
    universe = draw(universes(min_pods=2, min_cidrs=3))
    hints = [lab for lab in universe["identities"].values() if NAMESPACE_KEY in lab]
    setup: list[dict[str, Any]] = [{"op": "identities", "upserted": universe["identities"], "deleted": []}]
    setup += [{"op": "upsert_policy", "doc": d}
              for d in draw(st.lists(service_policy_docs(hints=hints), min_size=1, max_size=3))]
    setup += [{"op": "add_endpoint", "id": e} for e in universe["endpoints"]]
    change = st.sampled_from(SERVICE_NAMES).flatmap(lambda name: service_docs(name=name)).map(
        lambda docs: {"op": "upsert_services", "docs": docs})
    delete = st.builds(lambda kind, name, ns: {"op": "delete_service", "kind": kind, "namespace": ns, "name": name},
                       st.sampled_from(("Service", "EndpointSlice")),
                       st.sampled_from(SERVICE_NAMES + tuple(f"{n}-0" for n in SERVICE_NAMES)), st.just(NAMESPACES[0]))
    policy = service_policy_docs(hints=hints).map(lambda d: {"op": "upsert_policy", "doc": d})
    return {
        "cluster_name": LOCAL_CLUSTER,
        "default_namespace": DEFAULT_NAMESPACE,
        "setup": setup,
        "ops": draw(st.lists(change | change | change | delete | policy, min_size=2, max_size=12)),
    }


# -- junk, for the parser -------------------------------------------------------------------------


def json_scalars() -> st.SearchStrategy[Any]:
    return (
        st.none() | st.booleans() | st.integers() | st.integers(-2, 70000)
        | st.floats(allow_nan=False) | st.text(max_size=6) | st.sampled_from(JUNK_STRINGS)
        | st.sampled_from(FIELD_NAMES)
    )


def json_values(max_leaves: int = 25) -> st.SearchStrategy[Any]:
    """Any JSON-like value; mapping keys are often field names the parser knows."""
    keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=6)
    return st.recursive(
        json_scalars(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
        max_leaves=max_leaves,
    )


def subtree_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (tuple of keys and indexes) to a value inside `doc`, the root excluded."""
    if isinstance(doc, dict):
        items: Any = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from subtree_paths(v, (*prefix, k))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    return _get(doc, path[:-1])


@composite
def mutated_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid-looking document with one to three subtrees replaced, deleted or renamed."""
    doc = copy.deepcopy(draw(policy_docs()))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(subtree_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        last = path[-1]
        action = draw(st.sampled_from(("junk-leaf", "replace", "replace", "delete", "rename")))
        if action == "junk-leaf":
            leaves = [p for p in paths if not isinstance(_get(doc, p), (dict, list))] or paths
            leaf = draw(st.sampled_from(leaves))
            _parent(doc, leaf)[leaf[-1]] = draw(st.sampled_from(JUNK_STRINGS) | json_scalars())
        elif action == "replace":
            parent[last] = draw(json_values(max_leaves=8))
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            value = parent.pop(last)
            parent[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=4))] = value
        else:
            parent.insert(last, draw(json_values(max_leaves=4)))
    return doc


# -- JSON → engine types ------------------------------------------------------------------------


def identities_of(universe: Mapping[str, Any]) -> dict[int, Labels]:
    return {int(i): Labels.of(lab) for i, lab in universe["identities"].items()}


def named_ports_of(universe: Mapping[str, Any]) -> dict[int, NamedPorts]:
    """The universe's named container ports per identity (none: `{}`)."""
    return {int(i): NamedPorts.of_pods([(n, p, proto) for n, p, proto in pod] for pod in pods)
            for i, pods in universe.get("named_ports", {}).items()}


def request_of(http: Mapping[str, Any] | None) -> HTTPRequest | None:
    if http is None:
        return None
    return HTTPRequest(
        method=http["method"],
        path=http["path"],
        host=http.get("host", ""),
        headers={k.lower(): v for k, v in http.get("headers", {}).items()},
    )


def flow_of(
    flow: Mapping[str, Any],
    identities: Mapping[int, Labels],
    *,
    source_managed: bool,
    destination_managed: bool,
    named_ports: Mapping[int, NamedPorts] | None = None,
) -> Flow:
    src, dst = flow["src"], flow["dst"]
    named = named_ports or {}
    return Flow(
        source=Peer(src, identities[src], managed=source_managed, named_ports=named.get(src, NO_NAMED_PORTS)),
        destination=Peer(dst, identities[dst], managed=destination_managed,
                         named_ports=named.get(dst, NO_NAMED_PORTS)),
        port=flow["port"],
        protocol=Protocol(flow["protocol"]),
        http=request_of(flow.get("http")),
        authenticated=flow.get("authenticated", False),
        tls_sni=flow.get("tls_sni"),
    )
