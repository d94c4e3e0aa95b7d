"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy documents → `Policy` values.

Theory of operation: the parser walks the document once, carrying the YAML path of the value it
is looking at. Every problem is appended to a list instead of raised, so a user sees all of them
at once; if the list is non-empty at the end, the whole resource is rejected with a
`PolicyValidationError` (other resources in the same file are parsed independently). Lint
warnings — policies that are valid but do not do what they look like — ride along on the
returned `Policy`.

Scoping is applied here, once, so that downstream code only ever sees ready-to-match selectors:
a CiliumNetworkPolicy's endpoint selector and peer selectors are confined to its namespace
(unless a peer selector names the namespace label or a reserved label); a clusterwide policy's
empty peer selector selects every pod (any namespace) but no reserved identity.

The document is read as the API server stores it, then checked as Cilium's rule sanitizer
checks it, so that a policy l7gate accepts is one a Cilium cluster accepts too (docs/deviations.md
lists the exceptions). An optional field set to null is dropped, as the API server drops it,
with a warning saying what the rule then means. A rule Cilium refuses is an error whose message
says so and why; where only Cilium's CRD schema refuses a value (the API server, at apply time),
it is a warning. A peer field given as `[]` selects no peer, as in Cilium: unlike a missing field,
it does not widen a rule with `toPorts` to every peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import Finding, PolicyValidationError
from .labels import NAMESPACE_KEY, RESERVED_SOURCE, Labels, normalize_key, reserved
from .labelsyntax import label_key_problem, label_value_problem
from .names import name_error, port_name_problem, service_name_error
from .fqdn import FQDNError, FQDNSelector, NameMatch
from .icmp import NAMES_NOT_IN_CRD, ICMPTypeError, parse_icmp_type
from .regex import RegexError, compile_regex
from .selector import (
    CIDRGroupPeer,
    CIDRSelector,
    Entity,
    EntitySelector,
    IPNetwork,
    LabelSelector,
    NodeSelector,
    Operator,
    PeerSelector,
    Requirement,
    ServicePeer,
)
from .types import (
    ALL_PORTS,
    ANY_PORT,
    AuthMode,
    Direction,
    HeaderMatch,
    HTTPRule,
    L7Rules,
    MismatchAction,
    Origin,
    PeerRule,
    Policy,
    NamedPort,
    Port,
    PortProtocol,
    PortRange,
    PortRule,
    Protocol,
    Rule,
    port_sort_key,
)

API_VERSION = "cilium.io/v2"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
# Kubernetes' own NetworkPolicy (networking.k8s.io/v1), translated into the same rules (`netpol`).
KIND_KNP = "NetworkPolicy"
#: Every kind `parse_policy` reads. The order is relied on: [0] namespaced, [1] clusterwide.
POLICY_KINDS = (KIND_CNP, KIND_CCNP, KIND_KNP)
# CiliumCIDRGroup (`cidrgroup.parse_cidr_group`): not a policy, but what `cidrGroupRef` and
# `cidrGroupSelector` in the policies' CIDR rules name. Cilium serves it as v2alpha1 (1.13-1.17)
# and as v2 with v2alpha1 deprecated (1.18 on); the two have one schema.
KIND_CIDR_GROUP = "CiliumCIDRGroup"
CIDR_GROUP_API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
#: What `policy validate`, `trace` and `apply` (and the agent's policy API) read.
POLICY_INPUT_KINDS = (*POLICY_KINDS, KIND_CIDR_GROUP)

T = TypeVar("T")

# What `metadata` may hold: the fields of ObjectMeta a stored or written object has.
META_FIELDS = frozenset({
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "managedFields", "finalizers", "ownerReferences", "deletionTimestamp",
    "deletionGracePeriodSeconds", "generateName", "selfLink",
})

_SPEC_FIELDS = {
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "enableDefaultDeny",
    "description",
    "labels",
}
# Fields Cilium has that l7gate does not enforce: refused by name instead of "unknown field".
_UNSUPPORTED_PEER_FIELDS = {
    "fromRequires": "requirement selectors",
    "toRequires": "requirement selectors",
    "fromGroups": "cloud provider groups",
    "toGroups": "cloud provider groups",
}
_UNSUPPORTED_PORT_RULE_FIELDS = {
    "terminatingTLS": "TLS interception",
    "originatingTLS": "TLS interception",
    "listener": "custom Envoy listeners",
}
_UNSUPPORTED_L7_FIELDS = {
    "kafka": "Kafka rules",
    "l7proto": "generic L7 parsers",
    "l7": "generic L7 parsers",
}
_ENTITIES = {e.value: e for e in Entity}


def _is_or_are(what: str) -> str:
    """The verb for an unsupported feature's name: "SNI matching is", "Kafka rules are"."""
    return "are" if what.split()[-1].endswith("s") else "is"

# Entities Cilium's sanitizer knows that l7gate does not implement.
_UNSUPPORTED_ENTITIES = {"none": "it selects no peer"}
# HTTP rules on a port range: the proxy listens on every port of it (per local pod), and the
# egress listener has a filter chain per port; a range is bounded so that one rule cannot ask
# for thousands of listeners.
MAX_L7_RANGE = 128
# Entities Cilium's agent knows but its CRD's enum leaves out: the API server refuses them.
_ENTITIES_NOT_IN_CRD = {"world-ipv4", "world-ipv6"}
# What `protocol` in toPorts may say. ICMP is not a toPorts protocol in l7gate: `icmps` says it.
_PROTOCOLS = {p.value: p for p in (Protocol.ANY, Protocol.TCP, Protocol.UDP, Protocol.SCTP)}
_ICMP_PROTOCOLS = {"ICMP", "ICMPv6", "ICMPV6"}
# Protocols without ports that Cilium accepts (behind --enable-extended-ip-protocols).
_UNSUPPORTED_PROTOCOLS = {"VRRP", "IGMP", "GRE", "IPIP", "IPV6", "ESP", "AH"}
_DIRECTIONS = ("ingress", "ingressDeny", "egress", "egressDeny")
# Cilium's limit on the ports of one toPorts entry (its sanitizer and its CRD's maxItems).
MAX_PORTS = 40
# ... and on the fields (types) of one icmps entry.
MAX_ICMP_FIELDS = 40
_ICMP_FAMILIES = ("IPv4", "IPv6")
_AUTH_MODES = {m.value: m for m in AuthMode}
_TOKEN_CHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


class _Walker:
    """Collects findings while walking one document."""

    def __init__(self) -> None:
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []

    def error(self, path: str, message: str, code: str = "invalid") -> None:
        self.errors.append(Finding(path, message, code))

    def warn(self, path: str, message: str, code: str) -> None:
        self.warnings.append(Finding(path, message, code))

    def mapping(
        self,
        value: object,
        path: str,
        allowed: set[str],
        unsupported: Mapping[str, str] | None = None,
        nullable: Mapping[str, str] | None = None,
    ) -> Mapping[str, Any] | None:
        """`value` checked against its field names. A `nullable` (or unsupported) field set to
        null is left out of the result, as the API server leaves it out of the stored object,
        with a warning that ends with what that field's absence means (`nullable[key]`)."""
        if not isinstance(value, Mapping):
            self.error(path, f"must be a mapping, got {_type_name(value)}", "type")
            return None
        kept: dict[Any, Any] = {}
        for key, item in value.items():
            if item is None and isinstance(key, str) and (
                (nullable is not None and key in nullable) or (unsupported and key in unsupported)
            ):
                meaning = nullable.get(key, "") if nullable is not None else ""
                self.warn(
                    _join(path, key),
                    f"null is the same as leaving `{key}` out (the API server drops it)"
                    + (f": {meaning}" if meaning else ""),
                    "null-field",
                )
                continue
            kept[key] = item
            if not isinstance(key, str):
                self.error(path, f"field names must be strings, got {key!r}", "type")
            elif unsupported and key in unsupported:
                self.error(
                    _join(path, key),
                    f"{unsupported[key]} {_is_or_are(unsupported[key])} not supported by l7gate; remove this field",
                    "unsupported",
                )
            elif key not in allowed:
                self.error(
                    _join(path, key),
                    f"unknown field (expected one of: {', '.join(sorted(allowed))})",
                    "unknown-field",
                )
        return kept

    def list_of(self, value: object, path: str) -> list[Any] | None:
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {_type_name(value)}", "type")
            return None
        return value

    def string(self, value: object, path: str, *, allow_empty: bool = True) -> str | None:
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {_type_name(value)}", "type")
            return None
        if not allow_empty and not value:
            self.error(path, "must not be empty", "empty")
            return None
        return value

    def k8s_name(self, value: object, path: str, *, subdomain: bool) -> str | None:
        """An object or namespace name, as the API server checks it: `/` in either would make
        two policies one key."""
        s = self.string(value, path, allow_empty=False)
        if s is None:
            return None
        message = name_error(s, subdomain=subdomain)
        if message is not None:
            self.error(path, message, "name")
            return None
        return s

    def required_string(self, m: Mapping[str, Any], key: str, path: str) -> str | None:
        if key not in m:
            self.error(_join(path, key), "is required", "required")
            return None
        return self.string(m[key], _join(path, key), allow_empty=False)

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {_type_name(value)}", "type")
            return None
        return value

    def each(self, items: list[Any], path: str, fn: Callable[[Any, str], T | None]) -> list[T]:
        out: list[T] = []
        for i, item in enumerate(items):
            parsed = fn(item, f"{path}[{i}]")
            if parsed is not None:
                out.append(parsed)
        return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_policy(
    doc: object,
    *,
    default_namespace: str = "default",
    cluster_name: str = "default",
) -> Policy:
    """Parse one CNP/CCNP document (a dict as loaded from YAML or JSON).

    Raises PolicyValidationError with every error found. `cluster_name` is the local cluster,
    which the `cluster` entity refers to. A Kubernetes NetworkPolicy is translated into the same
    rules a CiliumNetworkPolicy gives (`netpol.parse_network_policy`).
    """
    w = _Walker()
    resource = "<policy>"
    if not isinstance(doc, Mapping):
        raise PolicyValidationError(
            resource, (Finding("", f"a policy must be a mapping, got {_type_name(doc)}", "type"),)
        )
    kind = doc.get("kind")
    if kind == KIND_KNP:
        # Imported here: `netpol` builds on this module's walker and selector parsing.
        from .netpol import parse_network_policy

        return parse_network_policy(doc, default_namespace=default_namespace, cluster_name=cluster_name)
    name = ""
    namespace = ""
    meta = doc.get("metadata")
    if isinstance(meta, Mapping):
        n = meta.get("name")
        name = n if isinstance(n, str) else ""
        ns = meta.get("namespace")
        namespace = ns if isinstance(ns, str) else ""
    if kind in POLICY_KINDS:
        resource = f"{kind}/{namespace + '/' if namespace and kind == KIND_CNP else ''}{name}"

    top = w.mapping(
        doc,
        "",
        {"apiVersion", "kind", "metadata", "spec", "specs", "status"},
        nullable={"spec": "", "specs": "", "status": ""},
    ) or {}
    api = doc.get("apiVersion")
    if api != API_VERSION:
        w.error("apiVersion", f"must be {API_VERSION!r}, got {api!r}", "api-version")
    if kind not in POLICY_KINDS:
        w.error("kind", f"must be one of {', '.join(POLICY_KINDS)}, got {kind!r}", "kind")
        raise PolicyValidationError(resource, tuple(w.errors))

    meta_map = w.mapping(meta, "metadata", set(META_FIELDS)) if meta is not None else None
    if meta is None:
        w.error("metadata", "is required (with a name)", "required")
    if meta_map is not None:
        if "name" not in meta_map:
            w.error("metadata.name", "is required", "required")
        else:
            w.k8s_name(meta_map["name"], "metadata.name", subdomain=True)
        if "namespace" in meta_map:
            if kind == KIND_CNP:
                w.k8s_name(meta_map["namespace"], "metadata.namespace", subdomain=False)
            else:  # ignored, with a warning below
                w.string(meta_map["namespace"], "metadata.namespace", allow_empty=False)
    if kind == KIND_CNP:
        namespace = namespace or default_namespace
    elif namespace:
        w.warn(
            "metadata.namespace",
            "a CiliumClusterwideNetworkPolicy is cluster-scoped; the namespace is ignored",
            "ignored-namespace",
        )
        namespace = ""
    resource = f"{kind}/{namespace + '/' if namespace else ''}{name}"

    specs: list[tuple[object, str]] = []
    if "spec" in top:
        specs.append((top["spec"], "spec"))
    if "specs" in top:
        items = w.list_of(top["specs"], "specs")
        if items is not None:
            if not items:
                w.error("specs", "must not be empty", "empty")
            specs.extend((s, f"specs[{i}]") for i, s in enumerate(items))
    if "spec" not in top and "specs" not in top:
        w.error("spec", "a policy needs `spec` or `specs`", "required")

    parser = _SpecParser(w, kind, namespace, name, cluster_name)
    rules = [r for r in (parser.spec(s, p) for s, p in specs) if r is not None]
    if w.errors:
        raise PolicyValidationError(resource, tuple(w.errors))
    return Policy(kind, namespace, name, tuple(rules), tuple(w.warnings))


class _SpecParser:
    def __init__(self, w: _Walker, kind: str, namespace: str, name: str, cluster: str) -> None:
        self.w = w
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.cluster = cluster
        self.namespaced = kind == KIND_CNP
        # Set per spec: a host policy (nodeSelector) may not carry HTTP rules.
        self.host_policy = False

    def origin(self, path: str) -> Origin:
        return Origin(self.kind, self.namespace, self.name, path)

    # -- spec -------------------------------------------------------------------------------

    def spec(self, value: object, path: str) -> Rule | None:
        w = self.w
        spec = w.mapping(
            value,
            path,
            _SPEC_FIELDS,
            nullable={
                **{d: "" for d in _DIRECTIONS},
                "enableDefaultDeny": "default-deny then follows the rule lists",
                "description": "",
                "labels": "",
            },
        )
        if spec is None:
            return None
        n_errors = len(w.errors)
        has_ep = "endpointSelector" in spec
        has_node = "nodeSelector" in spec
        subject: LabelSelector | None = None
        if has_ep and has_node:
            w.error(
                path,
                "set exactly one of endpointSelector and nodeSelector, not both",
                "selector-choice",
            )
        elif not has_ep and not has_node:
            w.error(
                path, "one of endpointSelector or nodeSelector is required", "selector-choice"
            )
        elif has_ep:
            sel = self.label_selector(spec["endpointSelector"], _join(path, "endpointSelector"))
            if sel is not None:
                if self.namespaced:
                    sel = sel.with_requirement(
                        Requirement(NAMESPACE_KEY, Operator.IN, (self.namespace,))
                    )
                subject = sel
        else:
            if self.namespaced:
                w.error(
                    _join(path, "nodeSelector"),
                    "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy",
                    "node-selector-namespaced",
                )
            sel = self.label_selector(spec["nodeSelector"], _join(path, "nodeSelector"))
            if sel is not None:
                subject = sel.with_requirement(Requirement(reserved("host"), Operator.EXISTS))

        description = ""
        if "description" in spec:
            description = w.string(spec["description"], _join(path, "description")) or ""
        labels = Labels()
        if "labels" in spec:
            labels = self.spec_labels(spec["labels"], _join(path, "labels"))

        explicit: dict[Direction, bool | None] = {Direction.INGRESS: None, Direction.EGRESS: None}
        if "enableDefaultDeny" in spec:
            edd = w.mapping(
                spec["enableDefaultDeny"],
                _join(path, "enableDefaultDeny"),
                {"ingress", "egress"},
                nullable={
                    d: "that direction's default-deny then follows whether it has rules"
                    for d in ("ingress", "egress")
                },
            )
            if edd is not None:
                for d in Direction:
                    if d.value in edd:
                        explicit[d] = w.boolean(
                            edd[d.value], _join(path, f"enableDefaultDeny.{d.value}")
                        )

        self.host_policy = has_node and not has_ep
        peer_rules: list[PeerRule] = []
        present: dict[Direction, bool] = {Direction.INGRESS: False, Direction.EGRESS: False}
        for field, direction, deny in (
            ("ingress", Direction.INGRESS, False),
            ("ingressDeny", Direction.INGRESS, True),
            ("egress", Direction.EGRESS, False),
            ("egressDeny", Direction.EGRESS, True),
        ):
            if field not in spec:
                continue
            fpath = _join(path, field)
            items = w.list_of(spec[field], fpath)
            if items is None:
                continue
            if items:
                present[direction] = True
            for i, item in enumerate(items):
                parsed = self.peer_rule(item, f"{fpath}[{i}]", direction, deny)
                if parsed is not None:
                    peer_rules.append(parsed)

        # Cilium 1.17+ refuses a spec without a single rule (older releases accept it, and so
        # does l7gate: the seed's default-deny-all.yaml is such a spec, and the seed's files
        # apply unchanged). A warning, not an error.
        has_rules = present[Direction.INGRESS] or present[Direction.EGRESS]
        given = [d for d in _DIRECTIONS if d in spec]
        refused = ""
        if not has_rules and all(isinstance(spec[d], list) for d in given):
            refused = (
                "Cilium 1.17 and later refuse a spec without any ingress, ingressDeny, egress or "
                "egressDeny rule (the policy is marked Valid=False and enforces nothing)"
            )
        warned = False
        for direction, field in ((Direction.INGRESS, "ingress"), (Direction.EGRESS, "egress")):
            deny_field = field + "Deny"
            empty = [
                f for f in (field, deny_field) if isinstance(spec.get(f), list) and not spec[f]
            ]
            if empty and not present[direction] and explicit[direction] is None:
                w.warn(
                    _join(path, empty[0]),
                    f"`{empty[0]}: []` has no effect: an empty list does not put the endpoint "
                    f"in default-deny. Write `{field}: [{{}}]` to deny all {field} traffic"
                    + (f", or `enableDefaultDeny: {{{field}: true}}`" if has_rules else "")
                    + (f". {refused}" if refused and not warned else ""),
                    "empty-direction",
                )
                warned = True
        if refused and not warned:
            w.warn(
                path,
                refused
                + ("" if given else "; its CRD requires one of those fields, even with enableDefaultDeny")
                + ". Write `ingress: [{}]` (or `egress: [{}]`) to put the endpoints in default-deny",
                "no-rules",
            )

        if len(w.errors) > n_errors or subject is None:
            return None

        def default_deny(d: Direction) -> bool:
            e = explicit[d]
            return present[d] if e is None else e

        return Rule(
            subject=subject,
            node_selector=has_node,
            rules=tuple(peer_rules),
            default_deny_ingress=default_deny(Direction.INGRESS),
            default_deny_egress=default_deny(Direction.EGRESS),
            origin=self.origin(path),
            description=description,
            labels=labels,
        )

    def spec_labels(self, value: object, path: str) -> Labels:
        items = self.w.list_of(value, path)
        out: dict[str, str] = {}
        for i, item in enumerate(items or []):
            p = f"{path}[{i}]"
            m = self.w.mapping(item, p, {"key", "value", "source"})
            if m is None:
                continue
            key = self.w.required_string(m, "key", p)
            val = self.w.string(m.get("value", ""), _join(p, "value"))
            if "source" in m:
                self.w.string(m["source"], _join(p, "source"))
            if key is not None and val is not None:
                out[key] = val
        return Labels.of(out)

    # -- selectors ----------------------------------------------------------------------------

    def label_selector(self, value: object, path: str) -> LabelSelector | None:
        w = self.w
        if value is None:
            w.error(path, "must be a mapping, got null (write {} to select everything)", "type")
            return None
        m = w.mapping(
            value, path, {"matchLabels", "matchExpressions"},
            nullable={"matchLabels": "", "matchExpressions": ""},
        )
        if m is None:
            return None
        n_errors = len(w.errors)
        reqs: list[Requirement] = []
        if "matchLabels" in m:
            mp = _join(path, "matchLabels")
            ml = m["matchLabels"]
            if not isinstance(ml, Mapping):
                w.error(mp, f"must be a mapping, got {_type_name(ml)}", "type")
            else:
                for k, v in ml.items():
                    kp = f"{mp}.{k}"
                    if not isinstance(k, str) or not k:
                        w.error(mp, f"label keys must be non-empty strings, got {k!r}", "type")
                        continue
                    if self.label_key(k, kp):
                        val = self.label_value(v, kp)
                        if val is not None:
                            reqs.append(Requirement(normalize_key(k), Operator.IN, (val,)))
        if "matchExpressions" in m:
            ep = _join(path, "matchExpressions")
            exprs = w.list_of(m["matchExpressions"], ep)
            for i, e in enumerate(exprs or []):
                req = self.requirement(e, f"{ep}[{i}]")
                if req is not None:
                    reqs.append(req)
        if len(w.errors) > n_errors:
            return None
        return LabelSelector.build(reqs)

    def label_key(self, key: str, path: str) -> bool:
        problem = label_key_problem(key)
        if problem is not None:
            self.w.error(path, f"Cilium refuses the label key {key!r}: {problem}", "label-key")
        return problem is None

    def label_value(self, value: object, path: str) -> str | None:
        s = self.w.string(value, path)
        if s is None:
            return None
        problem = label_value_problem(s)
        if problem is not None:
            self.w.error(path, f"Cilium refuses the label value {s!r}: {problem}", "label-value")
            return None
        return s

    def requirement(self, value: object, path: str) -> Requirement | None:
        w = self.w
        m = w.mapping(value, path, {"key", "operator", "values"}, nullable={"values": ""})
        if m is None:
            return None
        key = w.required_string(m, "key", path)
        if key is not None and not self.label_key(key, _join(path, "key")):
            key = None
        op_raw = m.get("operator")
        op: Operator | None = None
        if "operator" not in m:
            w.error(_join(path, "operator"), "is required (In, NotIn, Exists or DoesNotExist)", "required")
        elif not isinstance(op_raw, str) or op_raw not in {o.value for o in Operator}:
            w.error(
                _join(path, "operator"),
                f"must be one of In, NotIn, Exists, DoesNotExist, got {op_raw!r}",
                "operator",
            )
        else:
            op = Operator(op_raw)
        values: list[str] = []
        items: list[Any] = []
        if "values" in m:
            items = w.list_of(m["values"], _join(path, "values")) or []
            for i, v in enumerate(items):
                s = self.label_value(v, f"{path}.values[{i}]")
                if s is not None:
                    values.append(s)
        if op in (Operator.IN, Operator.NOT_IN) and not items:
            w.error(_join(path, "values"), f"operator {op.value} needs at least one value", "values")
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and items:
            w.error(_join(path, "values"), f"operator {op.value} takes no values", "values")
        if key is None or op is None:
            return None
        return Requirement(normalize_key(key), op, tuple(sorted(set(values))))

    def scoped_peer(self, sel: LabelSelector) -> LabelSelector:
        """Apply Cilium's implicit scoping to a peer endpoint selector."""
        names_reserved = any(r.key.startswith(RESERVED_SOURCE + ":") for r in sel.requirements)
        if names_reserved:
            return sel
        if self.namespaced:
            if sel.names_key(NAMESPACE_KEY):
                return sel
            return sel.with_requirement(Requirement(NAMESPACE_KEY, Operator.IN, (self.namespace,)))
        if sel.names_key(NAMESPACE_KEY):
            return sel
        # A clusterwide endpoint selector selects pods (which always have a namespace), never
        # world, host or other reserved identities — not even through NotIn/DoesNotExist.
        return sel.with_requirement(Requirement(NAMESPACE_KEY, Operator.EXISTS))

    # -- peer rules -----------------------------------------------------------------------------

    def peer_rule(self, value: object, path: str, direction: Direction, deny: bool) -> PeerRule | None:
        w = self.w
        pre = "from" if direction is Direction.INGRESS else "to"
        peer_fields: tuple[str, ...] = (f"{pre}Endpoints", f"{pre}Entities", f"{pre}CIDR", f"{pre}CIDRSet",
                                        f"{pre}Nodes")
        if direction is Direction.EGRESS:
            peer_fields += ("toFQDNs", "toServices")
        allowed = {*peer_fields, "toPorts", "icmps", "authentication"}
        unsupported = {k: v for k, v in _UNSUPPORTED_PEER_FIELDS.items() if k.startswith(pre)}
        raw: Mapping[Any, Any] = value if isinstance(value, Mapping) else {}
        act, verb = ("deny", "denies") if deny else ("allow", "allows")
        has_ports = isinstance(raw.get("toPorts"), list) and bool(raw["toPorts"])
        has_icmps = isinstance(raw.get("icmps"), list) and bool(raw["icmps"])
        every = f"its {'ICMP types' if has_icmps and not has_ports else 'ports'} {pre} every peer"
        nullable = {
            "toPorts": "the rule then covers every port" + ("" if has_icmps else " and protocol"),
            "icmps": "the rule then covers every ICMP type" if not has_ports else "",
            "authentication": "no authentication is then required",
        }
        for field in peer_fields:
            if any(raw.get(f) is not None for f in peer_fields if f != field):
                nullable[field] = ""
            elif has_ports or has_icmps:
                nullable[field] = f"with no peer field left, this rule {verb} {every}"
            else:
                nullable[field] = "with no peer field and no ports, this rule selects no peer"
        if not any(raw.get(f) is not None for f in peer_fields):
            for f in ("toPorts", "icmps"):
                nullable[f] = "with no peer field and no ports, this rule selects no peer"
        m = w.mapping(value, path, allowed, unsupported, nullable)
        if m is None:
            return None
        n_errors = len(w.errors)
        if deny and "authentication" in m:
            w.error(_join(path, "authentication"), "authentication is not allowed in deny rules", "deny-auth")
        peers: list[PeerSelector] = []
        named_peer_field = False
        # Cilium reads a peer field given as [] as "select no peer", unlike a missing field.
        empty_peer_field = False
        first_kind = ""
        for field in m:
            if field not in peer_fields:
                continue
            fpath = _join(path, field)
            items = w.list_of(m[field], fpath)
            if items is None:
                continue
            if not items:
                empty_peer_field = True
                w.warn(
                    fpath,
                    f"an empty list selects no peer (Cilium reads `{field}: []` unlike a missing "
                    f"field): this rule {verb} nothing"
                    + (f"; leave `{field}` out to {act} {every}"
                       if (has_ports or has_icmps) and not any(m.get(f) for f in peer_fields) else ""),
                    "empty-peer-list",
                )
                continue
            if first_kind:
                w.error(
                    fpath,
                    f"Cilium refuses a rule that combines `{first_kind}` and `{field}`: one rule "
                    f"takes one kind of peer ({', '.join(peer_fields)}). Split it into a rule "
                    "per kind",
                    "peer-kinds",
                )
                continue
            first_kind = field
            named_peer_field = True
            if field.endswith("Endpoints"):
                for i, item in enumerate(items):
                    sel = self.label_selector(item, f"{fpath}[{i}]")
                    if sel is not None:
                        peers.append(self.scoped_peer(sel))
            elif field.endswith("Nodes"):
                # Nodes by their labels (Cilium's node selector labels): never scoped to the
                # policy's namespace, and never a pod.
                for i, item in enumerate(items):
                    sel = self.label_selector(item, f"{fpath}[{i}]")
                    if sel is not None:
                        peers.append(NodeSelector.of(sel))
            elif field.endswith("Entities"):
                for i, item in enumerate(items):
                    ent = w.string(item, f"{fpath}[{i}]")
                    if ent is None:
                        continue
                    if ent in _UNSUPPORTED_ENTITIES:
                        w.error(
                            f"{fpath}[{i}]",
                            f"entity {ent!r} is not supported by l7gate (to Cilium "
                            f"{_UNSUPPORTED_ENTITIES[ent]}); remove it",
                            "unsupported",
                        )
                        continue
                    if ent in _ENTITIES_NOT_IN_CRD:
                        w.warn(
                            f"{fpath}[{i}]",
                            f"entity {ent!r} is missing from the entity list in Cilium's CRD: "
                            "with Cilium's CRDs installed, the API server refuses this policy. "
                            "Use `world`, or a CIDR rule",
                            "crd-entity",
                        )
                    if ent not in _ENTITIES:
                        w.error(
                            f"{fpath}[{i}]",
                            f"unknown entity {ent!r} (expected one of: {', '.join(sorted(_ENTITIES))})",
                            "entity",
                        )
                        continue
                    entity = _ENTITIES[ent]
                    local = self.cluster if entity is Entity.CLUSTER else ""
                    peers.append(EntitySelector(entity, local))
            elif field == "toFQDNs":
                if deny:
                    w.error(fpath, "Cilium refuses toFQDNs in deny rules (egressDeny): a name's addresses "
                                   "change under the rule; deny by CIDR instead", "fqdn-deny")
                    continue
                for i, item in enumerate(items):
                    sel_f = self.fqdn_selector(item, f"{fpath}[{i}]")
                    if sel_f is not None:
                        peers.append(sel_f)
            elif field == "toServices":
                if has_ports:
                    w.error(
                        fpath,
                        "Cilium refuses toServices beside toPorts (\"Combining ToServices and ToPorts is not "
                        "supported yet\"): a toServices rule covers every port of the Services' endpoints; leave "
                        "toPorts out, or name the endpoints' addresses in toCIDRSet to limit the ports",
                        "services-with-ports",
                    )
                if deny:
                    w.warn(fpath, "Cilium's agent expands toServices in egress rules only, so in Cilium this deny rule "
                                  "denies nothing; l7gate denies the addresses of the Services' endpoints, as "
                                  "written", "services-deny")
                for i, item in enumerate(items):
                    sel_s = self.service_entry(item, f"{fpath}[{i}]")
                    if sel_s is not None:
                        peers.append(sel_s)
            elif field.endswith("CIDRSet"):
                for i, item in enumerate(items):
                    sel_c = self.cidr_set(item, f"{fpath}[{i}]")
                    if sel_c is not None:
                        peers.append(sel_c)
            else:
                for i, item in enumerate(items):
                    net = self.cidr(item, f"{fpath}[{i}]")
                    if net is not None:
                        peers.append(CIDRSelector(net))

        port_rules: list[PortRule] = []
        if "toPorts" in m:
            tp = _join(path, "toPorts")
            items = w.list_of(m["toPorts"], tp)
            if items is not None:
                if not items:
                    w.warn(tp, "an empty list is the same as leaving the field out: all ports", "empty-ports")
                port_rules = w.each(items, tp, lambda v, p: self.port_rule(v, p, deny))
                if direction is Direction.INGRESS and any(r.l7 is not None and r.l7.dns for r in port_rules):
                    w.error(tp, "DNS rules apply to egress only (the queries a pod sends), as in Cilium", "dns-ingress")

        # `icmps: [{fields: []}]` (or only such entries): no ICMP type, so the rule matches nothing.
        icmps_match_nothing = False
        if "icmps" in m:
            ip = _join(path, "icmps")
            items = w.list_of(m["icmps"], ip)
            if items is not None:
                if not items:
                    w.warn(ip, "an empty list is the same as leaving the field out", "empty-icmps")
                elif has_ports:
                    w.error(
                        ip,
                        "Cilium refuses a rule with both `icmps` and `toPorts` (\"the ICMPs block may "
                        "only be present without ToPorts\"): put the ICMP types in a rule of their own",
                        "icmps-with-ports",
                    )
                else:
                    types = w.each(items, ip, self.icmp_rule)
                    port_rules = [PortRule(t) for t in types if t]
                    icmps_match_nothing = len(types) == len(items) and not port_rules

        auth: AuthMode | None = None
        if "authentication" in m and not deny:
            ap = _join(path, "authentication")
            am = w.mapping(m["authentication"], ap, {"mode"})
            if am is not None:
                mode = am.get("mode")
                if "mode" not in am:
                    w.error(_join(ap, "mode"), "is required (disabled, required or test-always-fail)", "required")
                elif not isinstance(mode, str) or mode not in _AUTH_MODES:
                    w.error(
                        _join(ap, "mode"),
                        f"must be one of {', '.join(_AUTH_MODES)}, got {mode!r}",
                        "auth-mode",
                    )
                else:
                    auth = _AUTH_MODES[mode]

        if len(w.errors) > n_errors:
            return None
        if empty_peer_field or icmps_match_nothing:
            peer_tuple: tuple[PeerSelector, ...] | None = ()
        elif named_peer_field:
            peer_tuple = tuple(sorted(peers, key=lambda s: s.key))
        elif m.get("toPorts") or m.get("icmps"):
            peer_tuple = None  # L4-only rule: every peer
        else:
            peer_tuple = ()  # `- {}`: selects nothing
        return PeerRule(direction, deny, peer_tuple, tuple(port_rules), auth, self.origin(path))

    def icmp_rule(self, value: object, path: str) -> tuple[PortProtocol, ...] | None:
        """One `icmps` entry: its types as ICMP ports (empty: no field, so no type)."""
        w = self.w
        m = w.mapping(value, path, {"fields"}, nullable={"fields": "the entry then matches no ICMP type"})
        if m is None:
            return None
        n_errors = len(w.errors)
        out: set[PortProtocol] = set()
        fp = _join(path, "fields")
        items = w.list_of(m["fields"], fp) if "fields" in m else []
        if items is None:
            return None
        if len(items) > MAX_ICMP_FIELDS:
            w.error(
                fp,
                f"Cilium refuses more than {MAX_ICMP_FIELDS} ICMP types in one icmps entry (\"too many "
                f"types\"; this one has {len(items)}): spread them over several entries",
                "too-many-icmp-fields",
            )
        for i, item in enumerate(items):
            t = self.icmp_field(item, f"{fp}[{i}]")
            if t is not None:
                out.add(PortProtocol(PortRange(t, t), Protocol.ICMP))
        if len(w.errors) > n_errors:
            return None
        if not items:
            w.warn(path, "an ICMP rule without fields matches no ICMP type: unless another entry "
                         "names some, this rule matches nothing", "empty-icmp-fields")
        return tuple(sorted(out))

    def icmp_field(self, value: object, path: str) -> int | None:
        """`{type: 8 | "EchoRequest", family: IPv4}` → the ICMP type."""
        w = self.w
        m = w.mapping(value, path, {"type", "family"},
                      nullable={"family": "the family is then IPv4 (the default)"})
        if m is None:
            return None
        family = "IPv4"
        if "family" in m:
            raw_family = m["family"]
            fam_path = _join(path, "family")
            if raw_family == "IPv6":
                w.error(fam_path, "ICMPv6 rules are not supported by l7gate (IPv6 is not enforced: the "
                                  "datapath drops all IPv6 traffic); remove this ICMPv6 type from `fields`",
                        "unsupported")
                return None
            if raw_family == "":
                w.warn(fam_path, "an empty family is IPv4 to Cilium's agent, but its CRD allows only IPv4 or "
                                 "IPv6: with Cilium's CRDs installed, the API server refuses this policy. Write "
                                 "IPv4, or leave family out", "crd-icmp-family")
            elif raw_family not in _ICMP_FAMILIES:
                w.error(fam_path, f"must be IPv4 or IPv6, got {raw_family!r} (Cilium refuses it: "
                                  "\"wrong family\")", "icmp-family")
                return None
            else:
                family = raw_family
        tp = _join(path, "type")
        if "type" not in m or m["type"] is None:
            w.error(tp, f"is required: an ICMP type number 0-255 or name, such as 8 or EchoRequest ({family})",
                    "required")
            return None
        raw = m["type"]
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            w.error(tp, f"must be an ICMP type number 0-255 or name, got {_type_name(raw)}", "type")
            return None
        try:
            icmp_type = parse_icmp_type(raw)
        except ICMPTypeError as exc:
            w.error(tp, str(exc), "icmp-type")
            return None
        if isinstance(raw, str) and raw in NAMES_NOT_IN_CRD:
            w.warn(tp, f"{raw!r} is missing from the ICMP type pattern of Cilium's CRD: with Cilium's "
                       f"CRDs installed, the API server refuses this policy. Write its number, {icmp_type}",
                   "crd-icmp-type")
        return icmp_type

    def name_match(self, value: object, path: str) -> NameMatch | None:
        """One `{matchName: ...}` or `{matchPattern: ...}` (toFQDNs, rules.dns)."""
        w = self.w
        m = w.mapping(value, path, {"matchName", "matchPattern"})
        if m is None:
            return None
        if ("matchName" in m) == ("matchPattern" in m):
            w.error(path, "needs exactly one of matchName and matchPattern", "fqdn-match")
            return None
        key = "matchName" if "matchName" in m else "matchPattern"
        raw = w.string(m[key], _join(path, key), allow_empty=False)
        if raw is None:
            return None
        try:
            return NameMatch.name(raw) if key == "matchName" else NameMatch.pattern(raw)
        except FQDNError as exc:
            w.error(_join(path, key), str(exc), "fqdn")
            return None

    def fqdn_selector(self, value: object, path: str) -> FQDNSelector | None:
        match = self.name_match(value, path)
        return FQDNSelector(match) if match is not None else None

    def service_entry(self, value: object, path: str) -> ServicePeer | None:
        """One `toServices` entry: `k8sService: {serviceName, namespace}` or `k8sServiceSelector:
        {selector, namespace}` (`toservices` says what it selects). Exactly one of the two: Cilium
        reads the selector and ignores `k8sService` when both are set, which l7gate refuses."""
        w = self.w
        m = w.mapping(value, path, {"k8sService", "k8sServiceSelector"},
                      nullable={"k8sService": "", "k8sServiceSelector": ""})
        if m is None:
            return None
        kinds = [k for k in ("k8sService", "k8sServiceSelector") if k in m]
        if not kinds:
            w.error(path, "needs k8sService (a Service by name) or k8sServiceSelector (Services by their labels)",
                    "required")
            return None
        if len(kinds) == 2:
            w.error(_join(path, "k8sService"),
                    "set one of k8sService and k8sServiceSelector: with both, Cilium reads the selector and "
                    "ignores k8sService. Write one entry for each", "service-kinds")
            return None
        kind = kinds[0]
        ep = _join(path, kind)
        if kind == "k8sService":
            ref = w.mapping(m[kind], ep, {"serviceName", "namespace"},
                            nullable={"namespace": "the entry then names a Service of every namespace"})
            if ref is None:
                return None
            name: str | None = None
            if "serviceName" not in ref or ref["serviceName"] in (None, ""):
                w.error(_join(ep, "serviceName"), "is required: the Service's name (Cilium matches it exactly, so "
                                                  "an entry without one selects no Service)", "required")
            else:
                name = w.string(ref["serviceName"], _join(ep, "serviceName"))
                message = service_name_error(name) if name is not None else None
                if message is not None:
                    w.error(_join(ep, "serviceName"), f"no Service can have this name: it {message}", "name")
                    name = None
            namespace = self.service_namespace(ref, ep)
            if name is None or namespace is None:
                return None
            return ServicePeer(namespace=namespace, name=name)
        sel_m = w.mapping(m[kind], ep, {"selector", "namespace"},
                          nullable={"namespace": "the entry then selects Services of every namespace"})
        if sel_m is None:
            return None
        sp = _join(ep, "selector")
        sel: LabelSelector | None = None
        if "selector" not in sel_m:
            w.error(sp, "is required: a label selector over the Services' own labels", "required")
        else:
            sel = self.label_selector(sel_m["selector"], sp)
        namespace = self.service_namespace(sel_m, ep)
        if sel is None or namespace is None:
            return None
        if not sel.requirements:
            where = f"namespace {namespace}" if namespace else "every namespace"
            w.warn(sp, f"an empty selector selects every Service without a selector in {where} (as in Cilium): "
                       "name the Services' labels", "services-selector-empty")
        return ServicePeer(namespace=namespace, selector=sel)

    def service_namespace(self, m: Mapping[str, Any], path: str) -> str | None:
        """The `namespace` of a toServices entry: "" (every namespace) when absent or empty, with
        a warning in a CiliumNetworkPolicy, whose own namespace it does not default to."""
        np = _join(path, "namespace")
        raw = m.get("namespace", "")
        if raw == "":
            if self.namespaced:
                w_path = np if "namespace" in m else path
                self.w.warn(w_path, f"without a namespace, this entry names Services of every namespace, not "
                                    f"only {self.namespace}: Cilium does not scope toServices to the policy's "
                                    f"namespace. Write `namespace: {self.namespace}` if that is what you mean",
                            "services-any-namespace")
            return ""
        return self.w.k8s_name(raw, np, subdomain=False)

    def cidr(self, value: object, path: str) -> IPNetwork | None:
        s = self.w.string(value, path, allow_empty=False)
        if s is None:
            return None
        try:
            if "/" not in s:
                raise ValueError("a CIDR needs a prefix length, e.g. 10.0.0.0/8 or 10.1.2.3/32")
            return ipaddress.ip_network(s, strict=False)
        except ValueError as exc:
            self.w.error(path, f"invalid CIDR {s!r}: {exc}", "cidr")
            return None

    def cidr_set(self, value: object, path: str) -> CIDRSelector | CIDRGroupPeer | None:
        """One `fromCIDRSet`/`toCIDRSet` entry: a CIDR, or CiliumCIDRGroups by name
        (`cidrGroupRef`) or by label (`cidrGroupSelector`); exactly one of the three, as Cilium's
        sanitizer requires. `except` ranges must lie inside a `cidr`; beside a group Cilium checks
        nothing (the group's CIDRs are not known when the rule is checked), and neither does
        l7gate beyond their being CIDRs."""
        w = self.w
        m = w.mapping(
            value, path, {"cidr", "except", "cidrGroupRef", "cidrGroupSelector"},
            nullable={"except": "no address is left out of the CIDR"},
        )
        if m is None:
            return None
        kinds = [k for k in ("cidr", "cidrGroupRef", "cidrGroupSelector") if k in m]
        if not kinds:
            w.error(
                _join(path, "cidr"),
                "is required: Cilium refuses a CIDR rule without one of cidr, cidrGroupRef or "
                "cidrGroupSelector (one of cidr, cidrGroupRef, or cidrGroupSelector is required)",
                "required",
            )
            return None
        n_errors = len(w.errors)
        for extra in kinds[1:]:
            w.error(
                _join(path, extra),
                f"Cilium refuses a CIDR rule that sets both `{kinds[0]}` and `{extra}` (more than one "
                "of cidr, cidrGroupRef, or cidrGroupSelector may not be set): write one entry for each",
                "cidr-rule-kinds",
            )
        kind = kinds[0]
        net: IPNetwork | None = None
        ref: str | None = None
        sel: LabelSelector | None = None
        if kind == "cidr":
            net = self.cidr(m["cidr"], _join(path, "cidr"))
        elif kind == "cidrGroupRef":
            ref = w.k8s_name(m["cidrGroupRef"], _join(path, "cidrGroupRef"), subdomain=True)
        else:
            gp = _join(path, "cidrGroupSelector")
            sel = self.label_selector(m["cidrGroupSelector"], gp)
            if sel is not None and not sel.requirements:
                w.warn(
                    gp,
                    "an empty cidrGroupSelector selects every CiliumCIDRGroup: l7gate selects the CIDRs of "
                    "every group; Cilium matches an empty selector against every identity, pods included. "
                    "Name the groups' labels",
                    "cidr-group-selector-empty",
                )
        excepts: list[IPNetwork] = []
        if "except" in m:
            ep = _join(path, "except")
            for i, e in enumerate(w.list_of(m["except"], ep) or []):
                en = self.cidr(e, f"{ep}[{i}]")
                if en is None:
                    continue
                if net is not None and (en.version != net.version or not en.subnet_of(net)):  # type: ignore[arg-type]
                    w.error(f"{ep}[{i}]", f"{en} is not inside {net}", "cidr-except")
                    continue
                excepts.append(en)
        if len(w.errors) > n_errors:
            return None
        ordered = tuple(sorted(set(excepts), key=lambda n: (n.version, n.network_address.packed, n.prefixlen)))
        if net is not None:
            return CIDRSelector(net, ordered)
        if ref is not None:
            return CIDRGroupPeer(name=ref, excepts=ordered)
        if sel is not None:
            return CIDRGroupPeer(selector=sel, excepts=ordered)
        return None

    # -- ports and L7 ---------------------------------------------------------------------------

    def port_rule(self, value: object, path: str, deny: bool) -> PortRule | None:
        w = self.w
        m = w.mapping(
            value, path, {"ports", "rules", "serverNames"}, _UNSUPPORTED_PORT_RULE_FIELDS,
            nullable={
                "ports": "the entry then selects no port",
                "rules": "" if deny else "the ports are then allowed without HTTP filtering",
                "serverNames": "" if deny else "the ports are then allowed without TLS server name filtering",
            },
        )
        if m is None:
            return None
        n_errors = len(w.errors)
        ports: list[Port] = []
        # (index in `ports:`, its parsed value, whether `protocol` was written)
        parsed: list[tuple[int, Port, bool]] = []
        if "ports" in m:
            pp = _join(path, "ports")
            items = w.list_of(m["ports"], pp)
            if items is not None and len(items) > MAX_PORTS:
                w.error(
                    pp,
                    f"Cilium refuses more than {MAX_PORTS} ports in one toPorts entry (this one "
                    f"has {len(items)}): spread them over several entries",
                    "too-many-ports",
                )
            for i, item in enumerate(items or []):
                parsed_port = self.port_protocol(item, f"{pp}[{i}]")
                if parsed_port is not None:
                    written = isinstance(item, Mapping) and item.get("protocol") is not None
                    parsed.append((i, parsed_port, written))
            ports = [p for _, p, _ in parsed]
        l7: L7Rules | None = None
        if "rules" in m:
            rp = _join(path, "rules")
            if deny:
                w.error(rp, "L7 rules are not allowed in deny rules (ingressDeny/egressDeny)", "deny-l7")
            else:
                l7 = self.l7_rules(m["rules"], rp)
                if l7 is not None and self.host_policy:
                    w.error(
                        rp,
                        "Cilium refuses HTTP rules in a host policy (a spec with nodeSelector): "
                        "it has no L7 proxy for the node's own traffic",
                        "host-l7",
                    )
        rules_given = isinstance(m.get("rules"), Mapping) and any(v is not None for v in m["rules"].values())
        sni = self.server_names(m, path, deny, l7 is not None or rules_given) if "serverNames" in m else None
        if len(w.errors) > n_errors:
            return None
        if sni:
            l7 = L7Rules.of((), (), sni)
        if not ports:
            if l7 is not None:
                w.error(_join(path, "ports"), ("serverNames need" if sni else "L7 rules need") + " at least one port",
                        "l7-port")
                return None
            if "ports" not in m or not parsed:
                # Cilium's policy engine adds a key per listed port: an entry without any adds
                # none, so the rule allows (or denies) nothing, though it still makes the
                # direction default-deny. Leaving toPorts out is what covers every port.
                w.warn(
                    path if "ports" not in m else _join(path, "ports"),
                    "a toPorts entry without ports selects no port, in Cilium as here: this rule "
                    + ("denies" if deny else "allows")
                    + " nothing. To cover every port, leave `toPorts` out or write `port: \"0\"`",
                    "empty-ports",
                )
                return PortRule((), None)
        if l7 is not None and l7.dns:
            # DNS rules (Cilium): a query on UDP or TCP; every protocol of the port is kept.
            for i, pp_, _ in parsed:
                if pp_.protocol is Protocol.SCTP:
                    w.error(f"{path}.ports[{i}].protocol", "DNS rules apply to UDP and TCP, not SCTP", "dns-protocol")
                elif isinstance(pp_, NamedPort):
                    w.error(f"{path}.ports[{i}].port", f"DNS rules need port 53, not a named port ({pp_.name!r}): "
                                                       "the node's DNS proxy takes the queries pods send to port 53",
                            "dns-port")
                elif pp_.ports != PortRange(53, 53):
                    w.error(f"{path}.ports[{i}]", "DNS rules need port 53: the node's DNS proxy takes the "
                                                  "queries pods send there", "dns-port")
            if len(w.errors) > n_errors:
                return None
            return PortRule(tuple(sorted(set(ports), key=port_sort_key)), l7)
        if sni and l7 is not None:
            return self._sni_ports(path, parsed, l7, n_errors)
        if l7 is not None:
            fixed: list[Port] = []
            for i, pp_, written in parsed:
                here = f"{path}.ports[{i}]"
                if pp_.protocol in (Protocol.UDP, Protocol.SCTP):
                    w.error(
                        f"{here}.protocol",
                        "HTTP rules apply to TCP only: Cilium refuses them unless the port says "
                        f"`protocol: TCP` (this one is {pp_.protocol.value})",
                        "l7-protocol",
                    )
                elif isinstance(pp_, PortProtocol) and pp_.ports == ALL_PORTS:
                    w.error(
                        here,
                        "HTTP rules need a single port: Cilium refuses them on port 0 (all ports)",
                        "l7-port-range",
                    )
                elif isinstance(pp_, PortProtocol) and pp_.ports.hi - pp_.ports.lo + 1 > MAX_L7_RANGE:
                    w.error(
                        here,
                        f"HTTP rules on a range of {pp_.ports.hi - pp_.ports.lo + 1} ports: l7gate's proxy "
                        f"takes at most {MAX_L7_RANGE} ports per range (a listener per port and pod); "
                        "split the rule or narrow the range",
                        "l7-port-range",
                    )
                else:
                    if pp_.protocol is Protocol.ANY:
                        w.error(
                            f"{here}.protocol" if written else here,
                            "Cilium refuses HTTP rules unless the port says `protocol: TCP` "
                            "(this one is ANY"
                            + ("" if written else ", the default when protocol is left out")
                            + "): its rule checks allow L7 rules on TCP only, so the whole "
                            "policy would be refused. Write `protocol: TCP`",
                            "l7-protocol-any",
                        )
                        continue
                    fixed.append(NamedPort(pp_.name, Protocol.TCP) if isinstance(pp_, NamedPort)
                                 else PortProtocol(pp_.ports, Protocol.TCP))
            if len(w.errors) > n_errors:
                return None
            ports = fixed
        return PortRule(tuple(sorted(set(ports), key=port_sort_key)), l7)

    def server_names(self, m: Mapping[str, Any], path: str, deny: bool,
                     with_rules: bool) -> tuple[NameMatch, ...] | None:
        """`serverNames`: the TLS server names (SNI) a connection on the ports may name, as
        canonical patterns (Cilium's ServerName: `*` within a label, a leading `**.` for one
        or more labels, `*` alone for every name)."""
        w = self.w
        sp = _join(path, "serverNames")
        if deny:
            w.error(sp, "serverNames are not allowed in deny rules (ingressDeny/egressDeny): Cilium's deny "
                        "rules take ports only", "deny-l7")
            return None
        if self.host_policy:
            w.error(sp, "serverNames are not supported in a host policy (a spec with nodeSelector): l7gate has no "
                        "proxy for the node's own traffic", "host-l7")
            return None
        items = w.list_of(m["serverNames"], sp)
        if items is None:
            return None
        if not items:
            w.warn(sp, "an empty list is the same as leaving the field out: no TLS server name filtering",
                   "empty-server-names")
            return None
        if with_rules:
            w.error(sp, "Cilium refuses serverNames beside L7 rules in one toPorts entry (\"ServerNames are not "
                        "allowed with L7 rules without TLS termination\"): put them in separate entries",
                    "sni-with-l7")
            return None
        out: list[NameMatch] = []
        for i, item in enumerate(items):
            here = f"{sp}[{i}]"
            if not isinstance(item, str):
                w.error(here, f"must be a string, got {_type_name(item)}", "type")
            elif not item.strip():
                w.error(here, "Cilium refuses an empty server name (\"Empty server name is not allowed\")",
                        "sni-empty")
            else:
                try:
                    out.append(NameMatch.pattern(item))
                except FQDNError as e:
                    w.error(here, str(e).replace("DNS name pattern", "server name"), "sni-name")
        return tuple(out)

    def _sni_ports(self, path: str, parsed: list[tuple[int, Port, bool]], l7: L7Rules,
                   n_errors: int) -> PortRule | None:
        """The ports of a `serverNames` entry: TCP (TLS runs over TCP), a port or a bounded range."""
        w = self.w
        fixed: list[Port] = []
        for i, pp_, written in parsed:
            here = f"{path}.ports[{i}]"
            if pp_.protocol in (Protocol.UDP, Protocol.SCTP):
                w.error(f"{here}.protocol", "serverNames apply to TLS over TCP: this port is "
                                            f"{pp_.protocol.value}", "sni-protocol")
                continue
            if isinstance(pp_, PortProtocol) and pp_.ports == ALL_PORTS:
                w.error(here, "serverNames need a port: l7gate's proxy matches them per port, not on "
                              "port 0 (all ports)", "l7-port-range")
                continue
            if isinstance(pp_, PortProtocol) and pp_.ports.hi - pp_.ports.lo + 1 > MAX_L7_RANGE:
                w.error(here, f"serverNames on a range of {pp_.ports.hi - pp_.ports.lo + 1} ports: l7gate's "
                              f"proxy takes at most {MAX_L7_RANGE} ports per range; split the rule or narrow "
                              "the range", "l7-port-range")
                continue
            if pp_.protocol is Protocol.ANY:
                w.warn(f"{here}.protocol" if written else here,
                       "serverNames apply to TLS over TCP: this ANY port"
                       + ("" if written else " (the default when protocol is left out)")
                       + " allows TCP connections with a matching server name, and no UDP or SCTP",
                       "sni-protocol-any")
            fixed.append(NamedPort(pp_.name, Protocol.TCP) if isinstance(pp_, NamedPort)
                         else PortProtocol(pp_.ports, Protocol.TCP))
        if len(w.errors) > n_errors:
            return None
        return PortRule(tuple(sorted(set(fixed), key=port_sort_key)), l7)

    def port_protocol(self, value: object, path: str) -> Port | None:
        w = self.w
        m = w.mapping(
            value, path, {"port", "endPort", "protocol"},
            nullable={
                "endPort": "the entry is then a single port",
                "protocol": "the port then matches TCP, UDP and SCTP (ANY)",
            },
        )
        if m is None:
            return None
        n_errors = len(w.errors)
        port: int | None = None
        name: str | None = None
        raw = m.get("port")
        pp = _join(path, "port")
        if raw is None:
            w.error(pp, "is required", "required")
        elif isinstance(raw, bool) or not isinstance(raw, (int, str)):
            w.error(pp, f"must be a port number, got {_type_name(raw)}", "type")
        elif isinstance(raw, str) and not (raw.isascii() and raw.isdigit()):
            # Not a number: a port name (an IANA service name, which Cilium compares without
            # case: `HTTP` is the container port `http`).
            problem = port_name_problem(raw.lower()) if raw.isascii() else "only ASCII letters, digits and '-'"
            if problem is None:
                name = raw.lower()
            else:
                w.error(
                    pp,
                    f"must be a port number 0-65535 or a port name (an IANA service name: at most 15 "
                    f"letters, digits and '-', at least one letter, no '-' first, last or twice in a "
                    f"row): {problem}; got {raw[:20]!r}",
                    "port-name",
                )
        elif isinstance(raw, str) and raw.startswith("0") and 1 < len(raw) <= 6:
            # Cilium parses the port like a Go literal: a leading 0 makes it octal.
            octal = (
                f"Cilium reads {raw!r} as port {int(raw, 8)}"
                if set(raw) <= set("01234567")
                else f"{raw!r} is not an octal number, so Cilium refuses it"
            )
            w.error(
                pp,
                f"a port with a leading 0 is octal to Cilium ({octal}): write it without the "
                "leading zeros",
                "port-octal",
            )
        elif isinstance(raw, str) and len(raw) > 5:
            w.error(pp, f"port {raw[:20]}… is out of range 0-65535", "port-range")
        else:
            port = int(raw)
            if not 0 <= port <= 65535:
                w.error(pp, f"port {port} is out of range 0-65535", "port-range")
                port = None
            elif isinstance(raw, int):
                w.warn(
                    pp,
                    f"Cilium's CRD declares port as a string: with Cilium's CRDs installed, the "
                    f"API server refuses the number {raw}. Quote it: port: \"{raw}\"",
                    "crd-port-type",
                )
        end: int | None = None
        if "endPort" in m:
            ep = _join(path, "endPort")
            raw_end = m["endPort"]
            if isinstance(raw_end, bool) or not isinstance(raw_end, int):
                w.error(ep, f"must be an integer, got {_type_name(raw_end)}", "type")
            elif name is not None and raw_end != 0:
                # Cilium ignores it without a word; a range the author wrote must not vanish.
                w.error(ep, f"endPort needs a port number: port {name!r} is a named port, one port "
                            "(Cilium ignores endPort here); remove endPort or give numbers", "end-port")
            elif not 0 <= raw_end <= 65535:
                w.error(ep, f"endPort {raw_end} is out of range 0-65535", "port-range")
            elif port is not None and port == 0 and raw_end != 0:
                w.error(ep, "endPort needs a non-zero port", "end-port")
            elif port is not None and raw_end < port and raw_end != 0:
                w.error(ep, f"endPort {raw_end} is smaller than port {port}", "end-port")
            else:
                end = raw_end
        proto = Protocol.ANY
        if "protocol" in m:
            praw = m["protocol"]
            if isinstance(praw, str) and praw in _ICMP_PROTOCOLS:
                w.error(
                    _join(path, "protocol"),
                    f"protocol {praw} is not a toPorts protocol in l7gate: write ICMP rules as `icmps` "
                    "(`icmps: [{fields: [{type: 8}]}]`) in a rule without toPorts",
                    "protocol",
                )
            elif isinstance(praw, str) and praw in _UNSUPPORTED_PROTOCOLS:
                w.error(
                    _join(path, "protocol"),
                    f"protocol {praw} is not supported by l7gate (TCP, UDP, SCTP or ANY); "
                    "remove this port",
                    "unsupported",
                )
            elif not isinstance(praw, str) or praw not in _PROTOCOLS:
                w.error(
                    _join(path, "protocol"),
                    f"must be one of {', '.join(_PROTOCOLS)}, got {praw!r}",
                    "protocol",
                )
            else:
                proto = _PROTOCOLS[praw]
        if len(w.errors) > n_errors:
            return None
        if name is not None:
            return NamedPort(name, proto)
        if port is None:
            return None
        if port == 0:
            return PortProtocol(ALL_PORTS, proto)
        return PortProtocol(PortRange(port, end if end else port), proto)

    def l7_rules(self, value: object, path: str) -> L7Rules | None:
        w = self.w
        m = w.mapping(value, path, {"http", "dns"}, _UNSUPPORTED_L7_FIELDS, nullable={"http": "", "dns": ""})
        if m is None:
            return None
        if "http" in m and "dns" in m:
            w.error(path, "Cilium takes one kind of L7 rules per port: http or dns, not both", "l7-kinds")
            return None
        if "dns" in m:
            dp = _join(path, "dns")
            items = w.list_of(m["dns"], dp)
            if items is None:
                return None
            if not items:
                w.warn(dp, "an empty list has no effect: write `dns: [{matchPattern: \"*\"}]` to allow every "
                           "query through the DNS proxy", "empty-dns")
                return None
            names = w.each(items, dp, self.name_match)
            return L7Rules.of((), names)
        if "http" not in m:
            if not any(k in m for k in _UNSUPPORTED_L7_FIELDS):
                w.warn(
                    path,
                    "`rules` without `http` means no L7 rules here, but Cilium's CRD requires "
                    "exactly one of http or dns in it: with Cilium's CRDs installed, the API "
                    "server refuses this policy. Leave `rules` out",
                    "crd-empty-rules",
                )
            return None
        hp = _join(path, "http")
        items = w.list_of(m["http"], hp)
        if items is None:
            return None
        if not items:
            w.warn(hp, "an empty list has no effect: write `http: [{}]` to allow every request through the proxy", "empty-http")
            return None
        rules = w.each(items, hp, self.http_rule)
        return L7Rules.of(rules)

    def regex_field(self, m: Mapping[str, Any], key: str, path: str) -> str | None:
        if key not in m:
            return None
        s = self.w.string(m[key], _join(path, key))
        if s is None:
            return None
        try:
            compile_regex(s)
        except RegexError as exc:
            self.w.error(_join(path, key), str(exc), "regex")
            return None
        return s

    def http_rule(self, value: object, path: str) -> HTTPRule | None:
        w = self.w
        if value is None:
            value = {}
        m = w.mapping(
            value, path, {"method", "path", "host", "headers", "headerMatches"},
            nullable={
                "method": "any method matches", "path": "any path matches",
                "host": "any host matches", "headers": "", "headerMatches": "",
            },
        )
        if m is None:
            return None
        n_errors = len(w.errors)
        method = self.regex_field(m, "method", path)
        path_re = self.regex_field(m, "path", path)
        host = self.regex_field(m, "host", path)
        headers: list[HeaderMatch] = []
        if "headers" in m:
            hp = _join(path, "headers")
            for i, h in enumerate(w.list_of(m["headers"], hp) or []):
                hm = self.header_string(h, f"{hp}[{i}]")
                if hm is not None:
                    headers.append(hm)
        if "headerMatches" in m:
            hp = _join(path, "headerMatches")
            for i, h in enumerate(w.list_of(m["headerMatches"], hp) or []):
                hm = self.header_match(h, f"{hp}[{i}]")
                if hm is not None:
                    headers.append(hm)
        if len(w.errors) > n_errors:
            return None
        return HTTPRule(method, path_re, host, tuple(sorted(set(headers), key=str)))

    def header_name(self, name: str, path: str) -> str | None:
        if not name or any(c not in _TOKEN_CHARS for c in name):
            self.w.error(path, f"invalid HTTP header name {name!r}", "header-name")
            return None
        return name.lower()

    def header_string(self, value: object, path: str) -> HeaderMatch | None:
        s = self.w.string(value, path, allow_empty=False)
        if s is None:
            return None
        if ":" in s:
            name, _, val = s.partition(":")
            hv: str | None = val.strip()
        else:
            parts = s.split(None, 1)
            if not parts:
                self.w.error(path, "must name a header: 'Name' or 'Name: value'", "header-name")
                return None
            name = parts[0]
            hv = parts[1].strip() if len(parts) > 1 else None
        n = self.header_name(name.strip(), path)
        return None if n is None else HeaderMatch(n, hv)

    def header_match(self, value: object, path: str) -> HeaderMatch | None:
        w = self.w
        m = w.mapping(
            value, path, {"name", "value", "mismatch"},
            {"secret": "header values from Kubernetes secrets"},
            nullable={
                "value": "only the header's presence is checked",
                "mismatch": "a request that does not match is refused",
            },
        )
        if m is None:
            return None
        raw_name = w.required_string(m, "name", path)
        name = self.header_name(raw_name, _join(path, "name")) if raw_name is not None else None
        val = None
        if "value" in m:
            val = w.string(m["value"], _join(path, "value"))
        mismatch: MismatchAction | None = None
        if "mismatch" in m:
            mm = m["mismatch"]
            if not isinstance(mm, str) or mm not in {a.value for a in MismatchAction}:
                w.error(
                    _join(path, "mismatch"),
                    f"must be one of LOG, ADD, DELETE, REPLACE, got {mm!r}",
                    "mismatch",
                )
            else:
                mismatch = MismatchAction(mm)
        if name is None:
            return None
        return HeaderMatch(name, val, mismatch)
