"""Kubernetes NetworkPolicy (`networking.k8s.io/v1`) documents → `Policy` values.

Theory of operation: a NetworkPolicy is translated into the rule model a CiliumNetworkPolicy
parses into (`types.Rule`, `types.PeerRule`), as Cilium converts one into its own `api.Rule`
(`pkg/k8s/network_policy.go`), so that resolution, the reference evaluator, `policy trace`, the
kernel maps and Envoy treat both alike: a NetworkPolicy is an allow-list like any other, its
allows are a union with those of every other policy selecting the same pod, and a deny rule of a
CiliumNetworkPolicy still wins over them. The semantics are upstream Kubernetes':

- `spec.podSelector` selects pods of the policy's namespace (`{}`: all of them);
- `spec.policyTypes` (default: `Ingress`, plus `Egress` when `egress` has rules) lists the
  directions the policy isolates: each listed direction is default-deny for the selected pods,
  with the rules of that direction as its only allows (none: deny all). A direction not listed
  is left alone, and its rules, if any, are ignored (with a warning);
- a rule allows traffic from (to) any of its peers on any of its ports; no `from` (`to`), or an
  empty list, is every peer, the world included; no `ports`, or an empty list, is every port;
- a peer is `podSelector` alone (pods of the policy's namespace), `namespaceSelector` alone (all
  pods of the matching namespaces; `{}`: every namespace), both (the matching pods of the
  matching namespaces), or `ipBlock` (a CIDR minus its `except` ranges; as in Cilium it selects
  addresses outside the cluster, never a pod);
- a port is TCP unless `protocol` says UDP or SCTP; `port` a number (no port: every port of
  that protocol), `endPort` the end of a range, or a name: the container port of that name and
  protocol of the destination (the selected pod on ingress, the peer pod on egress), resolved
  as a CiliumNetworkPolicy's named port (`namedports`); an `ipBlock` peer has no named ports.

A namespace selector is read against the namespace labels every pod identity carries
(`io.cilium.k8s.namespace.labels.<key>`), and always requires a pod, so that `NotIn` or
`DoesNotExist` cannot select the world or the host. `kubernetes.io/metadata.name`, which the API
server sets on every namespace to its name and never lets change, is read as the pod's
namespace itself: the same selection where the namespace's labels are known, and the right one
where they are not (a namespace never applied to the agent, a `policy trace` inventory without
it).

Bad input is reported as the CNP parser reports it (every error, with its field path), checked
as the API server checks a NetworkPolicy: a selector key with a `:` source prefix, a quoted port
number, port 0, an `ipBlock` beside a selector in one peer, an empty peer or an `except` equal to
its CIDR are errors. A port name must be an IANA service name, lowercase, as the API server
requires (a CiliumNetworkPolicy's may be upper-case: Cilium lowers it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import PolicyValidationError
from .labels import NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX
from .names import PORT_NAME_RULE, port_name_problem
from .parse import KIND_KNP, META_FIELDS, _join, _SpecParser, _type_name, _Walker
from .selector import CIDRSelector, IPNetwork, LabelSelector, Operator, PeerSelector, Requirement
from .types import (
    ALL_PORTS, Direction, NamedPort, Origin, PeerRule, Policy, Port, PortProtocol, PortRange, PortRule, Protocol, Rule,
    port_sort_key,
)

API_VERSION_KNP = "networking.k8s.io/v1"
#: The namespace label the API server sets to the namespace's own name (immutable).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_POLICY_TYPES = {"Ingress": Direction.INGRESS, "Egress": Direction.EGRESS}
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}


def parse_network_policy(
    doc: Mapping[str, Any],
    *,
    default_namespace: str = "default",
    cluster_name: str = "default",
) -> Policy:
    """Translate one NetworkPolicy document (a dict as loaded from YAML or JSON).

    Raises PolicyValidationError with every error found; lint warnings ride on the `Policy`.
    `cluster_name` is taken for `parse_policy`'s sake: a NetworkPolicy names no entity, so the
    local cluster does not change its meaning.
    """
    w = _Walker()
    meta = doc.get("metadata")
    name = ""
    namespace = ""
    if isinstance(meta, Mapping):
        n, ns = meta.get("name"), meta.get("namespace")
        name = n if isinstance(n, str) else ""
        namespace = ns if isinstance(ns, str) else ""
    namespace = namespace or default_namespace
    resource = f"{KIND_KNP}/{namespace}/{name}"

    top = w.mapping(
        doc, "", {"apiVersion", "kind", "metadata", "spec", "status"},
        nullable={"spec": "", "status": ""},
    ) or {}
    api = doc.get("apiVersion")
    if api != API_VERSION_KNP:
        w.error(
            "apiVersion",
            f"a NetworkPolicy must be {API_VERSION_KNP!r}, got {api!r}"
            + ("" if api is None else
               " (l7gate enforces Kubernetes' NetworkPolicy; the NetworkPolicy kinds of other "
               "projects, such as Calico's, are not supported)"),
            "api-version",
        )
    if meta is None:
        w.error("metadata", "is required (with a name)", "required")
    else:
        meta_map = w.mapping(meta, "metadata", set(META_FIELDS))
        if meta_map is not None:
            if "name" not in meta_map:
                w.error("metadata.name", "is required", "required")
            else:
                w.k8s_name(meta_map["name"], "metadata.name", subdomain=True)
            if "namespace" in meta_map:
                w.k8s_name(meta_map["namespace"], "metadata.namespace", subdomain=False)

    rule: Rule | None = None
    if "spec" not in top:
        w.error("spec", "is required (write `spec: {podSelector: {}}` to select every pod of the "
                "namespace)", "required")
    else:
        rule = _Translator(w, namespace, name).spec(top["spec"], "spec")
    if w.errors or rule is None:  # no rule without an error saying why
        raise PolicyValidationError(resource, tuple(w.errors))
    return Policy(KIND_KNP, namespace, name, (rule,), tuple(w.warnings))


class _Translator:
    """Walks one NetworkPolicy spec; selectors and CIDRs are checked by the CNP parser's own
    code (`_SpecParser`), so that both kinds refuse the same values with the same words."""

    def __init__(self, w: _Walker, namespace: str, name: str) -> None:
        self.w = w
        self.namespace = namespace
        self.name = name
        self.cnp = _SpecParser(w, KIND_KNP, namespace, name, "")

    def origin(self, path: str) -> Origin:
        return Origin(KIND_KNP, self.namespace, self.name, path)

    # -- spec ---------------------------------------------------------------------------------

    def spec(self, value: object, path: str) -> Rule | None:
        w = self.w
        spec = w.mapping(
            value, path, {"podSelector", "policyTypes", "ingress", "egress"},
            nullable={
                "podSelector": f"the policy then selects every pod of namespace {self.namespace}",
                "policyTypes": "the policy then isolates ingress, and egress when `egress` has rules",
                "ingress": "",
                "egress": "",
            },
        )
        if spec is None:
            return None
        n_errors = len(w.errors)
        subject: LabelSelector | None = LabelSelector()
        if "podSelector" in spec:
            subject = self.selector(spec["podSelector"], _join(path, "podSelector"))
        elif not (isinstance(value, Mapping) and "podSelector" in value):  # null: warned above
            w.warn(
                path,
                f"no podSelector: the policy selects every pod of namespace {self.namespace} (the "
                "API server stores it as `podSelector: {}`); write that to say so",
                "no-pod-selector",
            )

        lists: dict[Direction, list[Any]] = {}
        for direction, field in ((Direction.INGRESS, "ingress"), (Direction.EGRESS, "egress")):
            if field in spec:
                items = w.list_of(spec[field], _join(path, field))
                if items is not None:
                    lists[direction] = items

        listed: list[Direction] = []
        if "policyTypes" in spec:
            tp = _join(path, "policyTypes")
            for i, t in enumerate(w.list_of(spec["policyTypes"], tp) or []):
                d = _POLICY_TYPES.get(t) if isinstance(t, str) else None
                if d is None:
                    w.error(f"{tp}[{i}]", f"must be Ingress or Egress, got {t!r}", "policy-type")
                elif d in listed:
                    w.error(f"{tp}[{i}]", f"{t} is listed twice", "policy-type")
                else:
                    listed.append(d)
        # The API server's default, for a missing or empty list: Ingress always, Egress when
        # the policy has egress rules.
        types = set(listed) if listed else {Direction.INGRESS} | (
            {Direction.EGRESS} if lists.get(Direction.EGRESS) else set())

        peer_rules: list[PeerRule] = []
        for direction, items in lists.items():
            field = direction.value
            fpath = _join(path, field)
            parsed = [
                r for r in (self.rule(item, f"{fpath}[{i}]", direction) for i, item in enumerate(items))
                if r is not None
            ]
            if direction in types:
                peer_rules.extend(parsed)
            elif items:
                kind = field.capitalize()
                w.warn(
                    fpath,
                    f"policyTypes does not list {kind}: these {field} rules are ignored and the "
                    f"policy leaves {field} of the pods it selects alone (Kubernetes' semantics). "
                    f"Add {kind} to policyTypes to enforce them",
                    "ignored-rules",
                )
        if len(w.errors) > n_errors or subject is None:
            return None
        return Rule(
            subject=subject.with_requirement(Requirement(NAMESPACE_KEY, Operator.IN, (self.namespace,))),
            node_selector=False,
            rules=tuple(peer_rules),
            default_deny_ingress=Direction.INGRESS in types,
            default_deny_egress=Direction.EGRESS in types,
            origin=self.origin(path),
        )

    # -- rules and peers --------------------------------------------------------------------------

    def rule(self, value: object, path: str, direction: Direction) -> PeerRule | None:
        w = self.w
        peers_field = "from" if direction is Direction.INGRESS else "to"
        every = "source" if direction is Direction.INGRESS else "destination"
        if value is None:
            w.warn(path, f"null is read as {{}} (the API server stores it so): this rule allows "
                   f"every {every} on every port", "null-field")
            value = {}
        m = w.mapping(
            value, path, {peers_field, "ports"},
            nullable={peers_field: f"the rule then matches every {every}",
                      "ports": "the rule then matches every port"},
        )
        if m is None:
            return None
        n_errors = len(w.errors)
        peers: tuple[PeerSelector, ...] | None = None  # every peer, the world included
        if peers_field in m:
            pp = _join(path, peers_field)
            items = w.list_of(m[peers_field], pp)
            if items:
                found = w.each(items, pp, self.peer)
                peers = tuple(sorted(found, key=lambda s: s.key))
        ports: list[Port] = []
        if "ports" in m:
            pp = _join(path, "ports")
            ports = w.each(w.list_of(m["ports"], pp) or [], pp, self.port)
        if len(w.errors) > n_errors:
            return None
        port_rules = (PortRule(tuple(sorted(set(ports), key=port_sort_key))),) if ports else ()
        return PeerRule(direction, False, peers, port_rules, None, self.origin(path))

    def peer(self, value: object, path: str) -> PeerSelector | None:
        w = self.w
        m = w.mapping(
            value, path, {"podSelector", "namespaceSelector", "ipBlock"},
            nullable={"podSelector": "", "namespaceSelector": "", "ipBlock": ""},
        )
        if m is None:
            return None
        has_pod, has_ns, has_ip = ("podSelector" in m), ("namespaceSelector" in m), ("ipBlock" in m)
        if has_ip and (has_pod or has_ns):
            w.error(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer (the "
                "API server refuses it): write them as two peers of the list",
                "peer-kinds",
            )
            return None
        if not (has_pod or has_ns or has_ip):
            w.error(
                path,
                "a peer needs podSelector, namespaceSelector or ipBlock (the API server refuses an "
                "empty peer); leave the whole list out to match every peer",
                "empty-peer",
            )
            return None
        if has_ip:
            return self.ip_block(m["ipBlock"], _join(path, "ipBlock"))
        pods: LabelSelector | None = LabelSelector()
        if has_pod:
            pods = self.selector(m["podSelector"], _join(path, "podSelector"))
        if not has_ns:
            if pods is None:
                return None
            # podSelector alone: pods of the policy's own namespace.
            return pods.with_requirement(Requirement(NAMESPACE_KEY, Operator.IN, (self.namespace,)))
        namespaces = self.selector(m["namespaceSelector"], _join(path, "namespaceSelector"))
        if pods is None or namespaces is None:
            return None
        # Both: the matching pods of the matching namespaces (one selector, all requirements).
        # A pod always has a namespace: the requirement keeps reserved identities (world, host)
        # out, whatever NotIn or DoesNotExist the namespace selector holds.
        reqs = [*pods.requirements, Requirement(NAMESPACE_KEY, Operator.EXISTS)]
        reqs.extend(_namespace_requirement(r) for r in namespaces.requirements)
        return LabelSelector.build(reqs)

    def selector(self, value: object, path: str) -> LabelSelector | None:
        """A Kubernetes label selector. Cilium's source prefixes (`k8s:`, `reserved:`) are refused:
        the API server refuses a `:` in a label key, and `reserved:host` in a NetworkPolicy
        would otherwise select what no Kubernetes selector can."""
        w = self.w
        if value is None:
            w.error(path, "must be a mapping, got null (write {} to select everything)", "type")
            return None
        bad = False
        if isinstance(value, Mapping):
            ml = value.get("matchLabels")
            if isinstance(ml, Mapping):
                for k in ml:
                    if isinstance(k, str) and ":" in k:
                        w.error(f"{path}.matchLabels.{k}", _colon_key(k), "label-key")
                        bad = True
            me = value.get("matchExpressions")
            if isinstance(me, list):
                for i, e in enumerate(me):
                    key = e.get("key") if isinstance(e, Mapping) else None
                    if isinstance(key, str) and ":" in key:
                        w.error(f"{path}.matchExpressions[{i}].key", _colon_key(key), "label-key")
                        bad = True
        if bad:
            return None
        return self.cnp.label_selector(value, path)

    def ip_block(self, value: object, path: str) -> CIDRSelector | None:
        w = self.w
        m = w.mapping(value, path, {"cidr", "except"}, nullable={"except": "no address is left out of the CIDR"})
        if m is None:
            return None
        if "cidr" not in m:
            w.error(_join(path, "cidr"), "is required", "required")
            return None
        net = self.cnp.cidr(m["cidr"], _join(path, "cidr"))
        excepts: set[IPNetwork] = set()
        if "except" in m:
            ep = _join(path, "except")
            for i, e in enumerate(w.list_of(m["except"], ep) or []):
                en = self.cnp.cidr(e, f"{ep}[{i}]")
                if en is None or net is None:
                    continue
                if en.version != net.version or not en.subnet_of(net):  # type: ignore[arg-type]
                    w.error(f"{ep}[{i}]", f"{en} is not inside {net}", "cidr-except")
                elif en.prefixlen == net.prefixlen:
                    w.error(f"{ep}[{i}]", f"{en} is the whole of {net}: an except must be a strict "
                            "subset of the CIDR (the API server refuses it)", "cidr-except")
                else:
                    excepts.add(en)
        if net is None:
            return None
        return CIDRSelector(
            net, tuple(sorted(excepts, key=lambda n: (n.version, n.network_address.packed, n.prefixlen)))
        )

    # -- ports ------------------------------------------------------------------------------------

    def port(self, value: object, path: str) -> Port | None:
        w = self.w
        if value is None:
            w.warn(path, "null is read as {} (the API server stores it so): every TCP port", "null-field")
            value = {}
        m = w.mapping(
            value, path, {"protocol", "port", "endPort"},
            nullable={"protocol": "the port is then TCP", "port": "the entry then matches every port",
                      "endPort": "the entry is then a single port"},
        )
        if m is None:
            return None
        n_errors = len(w.errors)
        proto = Protocol.TCP
        if "protocol" in m:
            raw_proto = m["protocol"]
            if not isinstance(raw_proto, str) or raw_proto not in _PROTOCOLS:
                w.error(_join(path, "protocol"), f"must be one of TCP, UDP, SCTP, got {raw_proto!r}", "protocol")
            else:
                proto = _PROTOCOLS[raw_proto]
        port: int | None = None
        name: str | None = None
        pp = _join(path, "port")
        if "port" in m:
            raw = m["port"]
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                w.error(pp, f"must be a port number, got {_type_name(raw)}", "type")
            elif isinstance(raw, str) and raw.isascii() and raw.isdigit():
                w.error(
                    pp,
                    f"a quoted number is a port name to the API server, which refuses {raw[:20]!r} "
                    "(a name needs a letter): write the number without quotes",
                    "port-type",
                )
            elif isinstance(raw, str):
                problem = port_name_problem(raw)
                if problem is None:
                    name = raw
                else:
                    w.error(pp, f"a port number 1-65535, or a port name that {PORT_NAME_RULE}: {problem}; "
                                f"got {raw[:20]!r}", "port-name")
            elif not 1 <= raw <= 65535:
                w.error(pp, f"port {raw} is out of range 1-65535", "port-range")
            else:
                port = raw
        end: int | None = None
        if "endPort" in m:
            ep = _join(path, "endPort")
            raw_end = m["endPort"]
            if isinstance(raw_end, bool) or not isinstance(raw_end, int):
                w.error(ep, f"must be an integer, got {_type_name(raw_end)}", "type")
            elif "port" not in m:
                w.error(ep, "endPort needs a port number in `port` (the start of the range)", "end-port")
            elif name is not None:
                w.error(ep, f"endPort needs a port number in `port`, not the port name {name!r} (the API "
                            "server refuses it)", "end-port")
            elif port is not None and not port <= raw_end <= 65535:
                w.error(ep, f"endPort {raw_end} must be between port {port} and 65535", "end-port")
            else:
                end = raw_end
        if len(w.errors) > n_errors:
            return None
        if name is not None:
            return NamedPort(name, proto)
        if port is None:
            return PortProtocol(ALL_PORTS, proto)
        return PortProtocol(PortRange(port, end if end is not None else port), proto)


def _namespace_requirement(r: Requirement) -> Requirement:
    """A namespace selector's requirement, read against the namespace labels of a pod."""
    if r.key == NAMESPACE_NAME_LABEL:
        return Requirement(NAMESPACE_KEY, r.operator, r.values)
    return Requirement(NAMESPACE_LABELS_PREFIX + r.key, r.operator, r.values)


def _colon_key(key: str) -> str:
    return (
        f"{key!r} is not a Kubernetes label key: ':' is not allowed (the API server refuses it; "
        "source prefixes such as `k8s:` and `reserved:` belong to Cilium's own policies)"
    )

