"""Selectors: which identities a rule talks about, decided from labels alone.

Three kinds, one interface (`key`, `matches(labels)`):
- `LabelSelector`: Kubernetes matchLabels/matchExpressions, already scoped (the namespace
  requirement a CiliumNetworkPolicy implies is baked in when the rule is parsed).
- `EntitySelector`: Cilium's entities (world, cluster, host, ...), expressed through reserved
  labels and the local cluster name.
- `CIDRSelector`: a prefix with exceptions; selects CIDR identities (`cidr:<prefix>` labels)
  inside it, and `world` when it covers the whole address family.

`NodeSelector` (a `fromNodes`/`toNodes` entry) selects node identities (`reserved:host` or
`reserved:remote-node`) by their Node's labels, which a node identity carries as `node:<key>`.

Two more kinds are references, unresolved until `references.expand_policy` replaces them with
`CIDRSelector`s: `CIDRGroupPeer` (a `cidrGroupRef` or `cidrGroupSelector` entry) names
CiliumCIDRGroups and stands for their CIDRs; `ServicePeer` (a `toServices` entry) names
Kubernetes Services and stands for their endpoints' addresses. Unexpanded, they match nothing.

`key` is a canonical string: two selectors with equal keys select the same identities, which is
what lets the selector cache store each selector once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Protocol as TypingProtocol

from .labels import CIDR_SOURCE, CLUSTER_KEY, Labels, node_label, reserved

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PeerSelector(TypingProtocol):
    @property
    def key(self) -> str: ...

    def matches(self, labels: Labels) -> bool: ...


class Operator(str, Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Labels) -> bool:
        value = labels.get(self.key)
        if self.operator is Operator.IN:
            return value is not None and value in self.values
        if self.operator is Operator.NOT_IN:
            # Kubernetes semantics: a missing key satisfies NotIn.
            return value is None or value not in self.values
        if self.operator is Operator.EXISTS:
            return value is not None
        return value is None

    def __str__(self) -> str:
        if self.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
            return f"{self.key} {self.operator.value}"
        return f"{self.key} {self.operator.value} ({','.join(self.values)})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """All requirements must hold. No requirements selects every identity."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def build(cls, requirements: list[Requirement] | tuple[Requirement, ...]) -> LabelSelector:
        unique = {(r.key, r.operator.value, r.values): r for r in requirements}
        return cls(tuple(unique[k] for k in sorted(unique)))

    @property
    def key(self) -> str:
        return "sel{" + ";".join(str(r) for r in self.requirements) + "}"

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def names_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    def with_requirement(self, req: Requirement) -> LabelSelector:
        return LabelSelector.build([*self.requirements, req])

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


class Entity(str, Enum):
    ALL = "all"
    WORLD = "world"
    WORLD_IPV4 = "world-ipv4"
    WORLD_IPV6 = "world-ipv6"
    CLUSTER = "cluster"
    HOST = "host"
    REMOTE_NODE = "remote-node"
    KUBE_APISERVER = "kube-apiserver"
    INGRESS = "ingress"
    HEALTH = "health"
    INIT = "init"
    UNMANAGED = "unmanaged"


_WORLD_KEYS = (reserved("world"), reserved("world-ipv4"), reserved("world-ipv6"))
# Identities that belong to the local cluster without being pods (Cilium's `cluster` entity).
_CLUSTER_RESERVED = tuple(
    reserved(n)
    for n in ("host", "remote-node", "kube-apiserver", "ingress", "health", "init", "unmanaged")
)


@dataclass(frozen=True, slots=True)
class EntitySelector:
    entity: Entity
    local_cluster: str = ""

    @property
    def key(self) -> str:
        if self.entity is Entity.CLUSTER:
            return f"entity:cluster@{self.local_cluster}"
        return f"entity:{self.entity.value}"

    def matches(self, labels: Labels) -> bool:
        e = self.entity
        if e is Entity.ALL:
            return True
        if e is Entity.WORLD:
            return any(k in labels for k in _WORLD_KEYS)
        if e is Entity.CLUSTER:
            if any(k in labels for k in _CLUSTER_RESERVED):
                return True
            return not labels.is_reserved() and labels.get(CLUSTER_KEY) == self.local_cluster
        return reserved(e.value) in labels

    def __str__(self) -> str:
        return f"entity {self.entity.value}"


_NODE_KEYS = (reserved("host"), reserved("remote-node"))


def node_selector_key(key: str) -> str:
    """The identity label key a `fromNodes`/`toNodes` selector key reads (the key as parsed,
    `k8s:`/`any:` already stripped): a node's own label is `node:<key>`; the cluster label and
    keys naming a source (`reserved:host`, `node:role`) are read as they are."""
    if ":" in key or key == CLUSTER_KEY:
        return key
    return node_label(key)


@dataclass(frozen=True, slots=True)
class NodeSelector:
    """A `fromNodes`/`toNodes` entry: the nodes whose labels `selector` selects. It selects node
    identities only (this node's `host`, another node's `remote-node` ones), never a pod or
    `world`, whatever its requirements say (an empty one selects every node). `selector`'s keys
    are already the identity's (`node_selector_key`): `node:role`, `io.cilium.k8s.policy.cluster`."""

    selector: LabelSelector

    @classmethod
    def of(cls, selector: LabelSelector) -> NodeSelector:
        """From a selector as the policy wrote it (keys as parsed)."""
        return cls(LabelSelector.build([Requirement(node_selector_key(r.key), r.operator, r.values)
                                        for r in selector.requirements]))

    @property
    def key(self) -> str:
        return "nodes" + self.selector.key

    def matches(self, labels: Labels) -> bool:
        return any(k in labels for k in _NODE_KEYS) and self.selector.matches(labels)

    def __str__(self) -> str:
        return f"nodes {self.selector}"


def cidr_label(net: IPNetwork) -> str:
    return f"{CIDR_SOURCE}:{net.with_prefixlen}"


def identity_prefix(labels: Labels) -> IPNetwork | None:
    """The prefix a CIDR identity stands for, read from its `cidr:` label (the longest one)."""
    best: IPNetwork | None = None
    for key in labels:
        if key.startswith(CIDR_SOURCE + ":"):
            try:
                net = ipaddress.ip_network(key[len(CIDR_SOURCE) + 1 :], strict=False)
            except ValueError:
                continue
            if best is None or net.prefixlen > best.prefixlen:
                best = net
    return best


@dataclass(frozen=True, slots=True)
class CIDRSelector:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    @property
    def key(self) -> str:
        ex = ",".join(e.with_prefixlen for e in self.excepts)
        return f"cidr:{self.cidr.with_prefixlen}" + (f"!{ex}" if ex else "")

    def matches(self, labels: Labels) -> bool:
        prefix = identity_prefix(labels)
        if prefix is None:
            # A catch-all prefix is the world entity (Cilium: 0.0.0.0/0 selects `world`);
            # pods and other cluster identities are never selected by CIDR rules. Its `except`
            # ranges do not keep world out: each of them has a CIDR identity of its own (the
            # agent allocates one for every prefix a policy names), so the longest-prefix
            # lookup never gives an address inside one the `world` identity.
            if self.cidr.prefixlen == 0:
                family = "world-ipv4" if self.cidr.version == 4 else "world-ipv6"
                return reserved("world") in labels or reserved(family) in labels
            return False
        if prefix.version != self.cidr.version or not prefix.subnet_of(self.cidr):  # type: ignore[arg-type]
            return False
        return not any(
            prefix.version == e.version and prefix.subnet_of(e)  # type: ignore[arg-type]
            for e in self.excepts
        )

    def __str__(self) -> str:
        ex = " except " + ",".join(e.with_prefixlen for e in self.excepts) if self.excepts else ""
        return f"cidr {self.cidr.with_prefixlen}{ex}"


# The one selector that selects every identity, including ones not known yet. Resolution maps it
# to the ANY peer (identity 0) instead of enumerating identities.
WILDCARD = EntitySelector(Entity.ALL)


#: The label every CiliumCIDRGroup carries with its name (Cilium's), beside its own labels: a
#: `cidrGroupSelector` can select a group by name through it.
CIDR_GROUP_NAME_LABEL = "io.cilium.policy.cidrgroupname"


def cidr_group_name_key(name: str) -> str:
    return f"{CIDR_GROUP_NAME_LABEL}/{name}"


def _named_key(name: str | None, selector: LabelSelector | None) -> str:
    """The key part of a reference that names objects by `name`, or else by `selector`."""
    return f"name={name}" if name is not None else (selector or LabelSelector()).key


def _names(name: str | None, selector: LabelSelector | None, object_name: str, labels: Labels) -> bool:
    """Whether a reference by `name` (or else by `selector`) names the object `object_name`
    with `labels`; one with neither names nothing."""
    if name is not None:
        return object_name == name
    return selector is not None and selector.matches(labels)


@dataclass(frozen=True, slots=True)
class CIDRGroupPeer:
    """A `fromCIDRSet`/`toCIDRSet` entry that names CiliumCIDRGroups instead of a CIDR: by name
    (`cidrGroupRef`) or by the groups' labels (`cidrGroupSelector`), with the entry's `except`
    ranges. Which addresses it selects depends on the groups in force, so it is expanded (by
    `references.expand_policy`) before a policy is resolved or enforced; `matches` itself selects
    nothing, the fail-safe reading of a group that does not exist."""

    name: str | None = None
    selector: LabelSelector | None = None
    excepts: tuple[IPNetwork, ...] = ()

    @property
    def key(self) -> str:
        ex = ",".join(e.with_prefixlen for e in self.excepts)
        return f"cidrgroup:{_named_key(self.name, self.selector)}" + (f"!{ex}" if ex else "")

    def selects_group(self, name: str, labels: Labels) -> bool:
        """Whether the group `name` with `labels` (its name label included) is one this entry
        names."""
        return _names(self.name, self.selector, name, labels)

    def matches(self, labels: Labels) -> bool:
        return False

    def __str__(self) -> str:
        which = f"cidrGroupRef {self.name}" if self.name is not None else f"cidrGroupSelector {self.selector}"
        ex = " except " + ",".join(e.with_prefixlen for e in self.excepts) if self.excepts else ""
        return which + ex


@dataclass(frozen=True, slots=True)
class ServicePeer:
    """A `toServices` entry: Kubernetes Services by name (`k8sService`) or by their own labels
    (`k8sServiceSelector`), in `namespace` ("" for every namespace: Cilium reads the entry as
    written, even in a CiliumNetworkPolicy). It stands for the addresses of the endpoints of the
    Services it selects (`toservices`), so, like `CIDRGroupPeer`, it is expanded before a policy
    is resolved; `matches` itself selects nothing."""

    namespace: str = ""
    name: str | None = None
    selector: LabelSelector | None = None

    @property
    def key(self) -> str:
        return f"service:{self.namespace or '*'}/{_named_key(self.name, self.selector)}"

    def selects_service(self, namespace: str, name: str, labels: Labels) -> bool:
        """Whether the Service `namespace/name` with metadata `labels` is one this entry names."""
        if self.namespace and self.namespace != namespace:
            return False
        return _names(self.name, self.selector, name, labels)

    def matches(self, labels: Labels) -> bool:
        return False

    def __str__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "any namespace"
        if self.name is not None:
            return f"k8sService {self.name} ({where})"
        return f"k8sServiceSelector {self.selector} ({where})"
