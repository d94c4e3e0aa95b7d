"""Kubernetes Pod, Namespace, Service, EndpointSlice and Node objects (plain dicts from YAML or the API)
-> typed values.

The one place these objects are parsed (CONVENTIONS 3). Parsing checks what the API server would
have enforced, since hand-written inventories for `l7gate policy trace` never went through one:
label keys and values must be valid Kubernetes labels (YAML `version: 1` is an int, not the string
Kubernetes needs), names must be DNS names, IPs must parse. Every error is collected with its
field path (`metadata.labels.app: must be a string`) and raised together in one
`K8sObjectError`. Fields l7gate does not use are ignored.

A pod's cluster is its `l7gate.io/cluster` annotation, else the `default_cluster` the caller
passes (the agent's `--cluster-name`). The same goes for namespaces, Services and Nodes, so that
one inventory can describe several clusters.

A Node is its name, its labels (what `fromNodes`/`toNodes` select: `node_identity_labels`) and its
addresses (`status.addresses` of type InternalIP and ExternalIP); `node_addresses` says which node
each node address of an inventory is, with the pods' `status.hostIP` as the second source.

A Service becomes an `l7gate.services.Service` and an EndpointSlice an
`l7gate.services.EndpointSlice`, the values the service table takes; `pod_backend` gives the
table's view of a pod, `service_target` what a `toServices` rule reads of a Service.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from l7gate.identity.filter import identity_labels, node_labels
from l7gate.identity.numeric import ip_address
from l7gate.policy.errors import Finding
from l7gate.policy.labels import Labels
from l7gate.policy.names import PORT_NAME_RULE as _PORT_NAME_RULE
from l7gate.policy.names import name_error, port_name_problem, service_name_error
from l7gate.policy.toservices import ServiceTarget
from l7gate.services.table import ServiceTable
from l7gate.services.types import BackendPod, EndpointSlice, Service, ServicePort, SliceEndpoint, SlicePort

CLUSTER_ANNOTATION = "l7gate.io/cluster"
#: The kinds `parse_object` reads: what `l7gate endpoint apply` (the agent's endpoint API) takes.
ENDPOINT_KINDS = ("Pod", "Namespace", "Service", "EndpointSlice", "Node")
#: The cluster of a Namespace object without the cluster annotation: it describes that
#: namespace in every cluster (`scoped_namespace`).
ANY_CLUSTER = "*"
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
_CONDITION_STATUSES = ("True", "False", "Unknown")
_PROTOCOLS = ("TCP", "UDP", "SCTP")

#: Cilium's global-service annotations; in each tuple the first key present wins, as in Cilium.
GLOBAL_ANNOTATIONS = ("service.cilium.io/global", "io.cilium/global-service")
SHARED_ANNOTATIONS = ("service.cilium.io/shared", "io.cilium/shared-service")
AFFINITY_ANNOTATIONS = ("service.cilium.io/affinity", "io.cilium/service-affinity")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class K8sObjectError(Exception):
    """An object that cannot be used. `errors` holds every problem found, each with its path."""

    def __init__(self, resource: str, errors: tuple[Finding, ...]) -> None:
        self.resource = resource
        self.errors = errors
        super().__init__(f"{resource}: " + "; ".join(str(e) for e in errors))


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(mapping.items()))) if mapping else _EMPTY


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as l7gate sees it. Immutable; `labels` and `annotations` are read-only mappings.

    `named_ports` holds the named container ports, (name, containerPort, protocol) in the order
    of the pod spec, for Services whose `targetPort` is a name. `ready` says whether the pod may
    be a Service backend, as Kubernetes decides: not when its phase is `Failed` or `Succeeded`,
    its `Ready` condition is `False` or `Unknown`, or it is being deleted
    (`metadata.deletionTimestamp`). A pod whose status says nothing about readiness counts as
    ready: hand-written manifests have no status written by a kubelet."""

    cluster: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    ip: str | None = None
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    ips: tuple[str, ...] = ()  # every pod IP (dual stack), `ip` first
    node_name: str | None = None
    host_network: bool = False
    ports: tuple[tuple[int, str], ...] = ()  # (containerPort, protocol) from spec.containers[]
    host_ip: str | None = None  # status.hostIP: the node's address (its agent's mutual-auth server)
    named_ports: tuple[tuple[str, int, str], ...] = ()  # (name, containerPort, protocol), spec order
    ready: bool = True
    # the field each of `ips` came from (`status.podIP`, `status.podIPs[1].ip`), for error messages
    ip_fields: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Callers may pass plain dicts; keep read-only copies so the value stays immutable.
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))

    def __hash__(self) -> int:
        # The mappings are read-only views, so hashing their items is stable.
        labels, annotations = tuple(self.labels.items()), tuple(self.annotations.items())
        return hash((self.cluster, self.namespace, self.name, labels, self.ips, annotations))

    @property
    def ref(self) -> str:
        """`cluster/namespace/name`, the form `l7gate policy trace --from` accepts."""
        return f"{self.cluster}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Namespace:
    """A namespace as l7gate sees it. Immutable."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    cluster: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.labels.items()), self.cluster))


class _Errors:
    def __init__(self) -> None:
        self.found: list[Finding] = []

    def add(self, path: str, message: str) -> None:
        self.found.append(Finding(path, message))


@functools.lru_cache(maxsize=8192)  # the same few keys, on every object
def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "prefix before '/' must not be empty"
        if len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix):
            return "prefix must be a DNS subdomain (lowercase letters, digits, '-', '.')"
    if not name:
        return "name must not be empty"
    if len(name) > 63:
        return "name must be at most 63 characters"
    if not _LABEL_NAME.fullmatch(name):
        return (
            "name must consist of letters, digits, '-', '_' or '.',"
            " and start and end with a letter or digit"
        )
    return None


@functools.lru_cache(maxsize=8192)  # the same few values, on every object
def _label_value_problem(value: str) -> str | None:
    """What is wrong with a non-empty label value, or None."""
    if len(value) > 63:
        return "label value must be at most 63 characters"
    if not _LABEL_NAME.fullmatch(value):
        return ("label value must consist of letters, digits, '-', '_' or '.',"
                " and start and end with a letter or digit")
    return None


def _string_map(
    obj: Mapping[str, Any], field_name: str, path: str, errors: _Errors, *, labels: bool
) -> dict[str, str]:
    raw = obj.get(field_name)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.add(path, "must be a mapping")
        return {}
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            errors.add(f"{path}.{key}", "key must be a string")
            continue
        problem = _label_key_problem(key)
        if problem is not None:
            errors.add(f"{path}.{key}", f"invalid key: {problem}")
            continue
        if not isinstance(value, str):
            errors.add(f"{path}.{key}", "must be a string")
            continue
        if labels and value:
            problem = _label_value_problem(value)
            if problem is not None:
                errors.add(f"{path}.{key}", problem)
                continue
        out[key] = value
    return out


def _mapping(obj: Mapping[str, Any], key: str, path: str, errors: _Errors) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.add(path, "must be a mapping")
        return {}
    return value


def _optional_string(
    obj: Mapping[str, Any], key: str, path: str, errors: _Errors
) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        errors.add(path, "must be a string")
        return None
    return value


def _dns_name(
    value: str | None, path: str, errors: _Errors, *, subdomain: bool, required: bool
) -> str | None:
    if value is None or value == "":
        if required:
            errors.add(path, "is required")
        return None
    message = name_error(value, subdomain=subdomain)
    if message is not None:
        errors.add(path, message)
        return None
    return value


def _header(
    obj: object, kind: str, errors: _Errors, api_version: str = "v1"
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        errors.add("", f"a {kind} must be a mapping")
        return {}, {}
    if obj.get("apiVersion") != api_version:
        errors.add("apiVersion", f'must be "{api_version}", got {obj.get("apiVersion")!r}')
    if obj.get("kind") != kind:
        errors.add("kind", f"must be {kind!r}, got {obj.get('kind')!r}")
    if "metadata" not in obj:
        errors.add("metadata", "is required")
    return obj, _mapping(obj, "metadata", "metadata", errors)


def _cluster(
    annotations: Mapping[str, str], default_cluster: str, errors: _Errors
) -> str:
    value = annotations.get(CLUSTER_ANNOTATION)
    path = f"metadata.annotations.{CLUSTER_ANNOTATION}"
    if value is None:
        if not default_cluster:
            errors.add(path, "is required when no default cluster name is given")
        return default_cluster
    return _dns_name(value, path, errors, subdomain=False, required=True) or default_cluster


def _cluster_scoped_meta(meta: Mapping[str, Any], default_cluster: str, errors: _Errors, *,
                         subdomain: bool) -> tuple[str | None, dict[str, str], str]:
    """A cluster-scoped object's name (a DNS subdomain or label), labels and cluster."""
    name = _dns_name(
        _optional_string(meta, "name", "metadata.name", errors),
        "metadata.name", errors, subdomain=subdomain, required=True,
    )  # fmt: skip
    labels = _string_map(meta, "labels", "metadata.labels", errors, labels=True)
    annotations = _string_map(meta, "annotations", "metadata.annotations", errors, labels=False)
    return name, labels, _cluster(annotations, default_cluster, errors)


def _ip(value: object, path: str, errors: _Errors) -> str | None:
    """A pod's or node's own address. Addresses no pod or node can have are refused here, in any
    datapath mode: the agent would listen on them (0.0.0.0 is every interface of the node)."""
    if not isinstance(value, str):
        errors.add(path, "must be a string")
        return None
    address, problem = _checked_ip(value)
    if problem:
        errors.add(path, problem)
        return None
    return address


@functools.lru_cache(maxsize=65536)
def _checked_ip(value: str) -> tuple[str, str]:
    """(the address, compressed; "") or ("", the problem): `_ip`'s check, remembered per text (an
    initial sync reads each pod's address twice and each node's once per pod on it)."""
    try:
        addr = ip_address(value)
    except ValueError:
        return "", f"not an IP address: {value!r}"
    what = None
    if addr.is_unspecified:
        what = "the unspecified address (it means every interface of the node)"
    elif addr.is_multicast:
        what = "a multicast address"
    elif addr == _LIMITED_BROADCAST:
        what = "the limited broadcast address"
    if what is not None:
        return "", (f"{addr.compressed} is {what}, not an address of one pod or node: give its own "
                    "unicast address")
    return addr.compressed, ""


def _object_meta(
    meta: Mapping[str, Any], default_cluster: str, errors: _Errors
) -> tuple[str | None, str, dict[str, str], dict[str, str], str]:
    """A namespaced object's (name, namespace, labels, annotations, cluster), checked: its name a
    DNS subdomain, the namespace `default` when absent."""
    name = _dns_name(
        _optional_string(meta, "name", "metadata.name", errors),
        "metadata.name", errors, subdomain=True, required=True,
    )  # fmt: skip
    namespace = _dns_name(
        _optional_string(meta, "namespace", "metadata.namespace", errors),
        "metadata.namespace", errors, subdomain=False, required=False,
    ) or DEFAULT_NAMESPACE  # fmt: skip
    labels = _string_map(meta, "labels", "metadata.labels", errors, labels=True)
    annotations = _string_map(meta, "annotations", "metadata.annotations", errors, labels=False)
    return name, namespace, labels, annotations, _cluster(annotations, default_cluster, errors)


def _raise_if(errors: _Errors, kind: str, namespace: str | None, name: str | None) -> None:
    if errors.found:
        what = f"{namespace}/{name}" if namespace and name else (name or "<unnamed>")
        raise K8sObjectError(f"{kind} {what}", tuple(errors.found))


def _port_name(value: object, path: str, errors: _Errors) -> str | None:
    """A container port's name; None when absent (or empty, which Kubernetes treats alike) or bad."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        errors.add(path, "must be a string")
        return None
    problem = port_name_problem(value)
    if problem is not None:
        errors.add(path, f"{_PORT_NAME_RULE}: {problem}; got {value!r}")
        return None
    return value


def _pod_ready(meta: Mapping[str, Any], status: Mapping[str, Any], errors: _Errors) -> bool:
    """Whether the pod may be a Service backend (see `Pod`): Kubernetes' `IsPodReady` (the Ready
    condition must be True), minus the pods its endpoint controllers leave out (finished or
    being deleted); a status without a Ready condition counts as ready."""
    ready = True
    if meta.get("deletionTimestamp") not in (None, ""):
        ready = False
    phase = status.get("phase")
    if phase is not None:
        if phase not in _POD_PHASES:
            errors.add("status.phase", f"must be one of {', '.join(_POD_PHASES)}, got {phase!r}")
        elif phase in ("Failed", "Succeeded"):
            ready = False
    conditions = status.get("conditions")
    if conditions is None:
        return ready
    if not isinstance(conditions, list):
        errors.add("status.conditions", "must be a list")
        return ready
    seen_ready = False
    for i, cond in enumerate(conditions):
        path = f"status.conditions[{i}]"
        if not isinstance(cond, Mapping):
            errors.add(path, "must be a mapping")
            continue
        if not isinstance(cond.get("type"), str):
            errors.add(f"{path}.type", "must be a string")
            continue
        if cond["type"] != "Ready" or seen_ready:  # the first Ready condition counts, as in Kubernetes
            continue
        seen_ready = True
        value = cond.get("status")
        if value not in _CONDITION_STATUSES:
            hint = " (a string: quote it in YAML)" if isinstance(value, bool) else ""
            errors.add(f"{path}.status", f'must be "True", "False" or "Unknown"{hint}, got {value!r}')
        elif value != "True":
            ready = False
    return ready


def parse_pod(obj: object, *, default_cluster: str) -> Pod:
    """A `Pod` from a Kubernetes Pod object. Raises K8sObjectError listing every problem."""
    errors = _Errors()
    top, meta = _header(obj, "Pod", errors)
    name, namespace, labels, annotations, cluster = _object_meta(meta, default_cluster, errors)

    spec = _mapping(top, "spec", "spec", errors)
    service_account = DEFAULT_SERVICE_ACCOUNT
    # serviceAccount is the deprecated alias; the API server fills in both
    for key in ("serviceAccountName", "serviceAccount"):
        account = _dns_name(
            _optional_string(spec, key, f"spec.{key}", errors),
            f"spec.{key}", errors, subdomain=True, required=False,
        )  # fmt: skip
        if account:
            service_account = account
            break
    node_name = _optional_string(spec, "nodeName", "spec.nodeName", errors) or None
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        errors.add("spec.hostNetwork", "must be a boolean")
        host_network = False

    ports: set[tuple[int, str]] = set()
    named_ports: list[tuple[str, int, str]] = []
    containers = spec.get("containers")
    if containers is not None and not isinstance(containers, list):
        errors.add("spec.containers", "must be a list")
        containers = []
    for ci, container in enumerate(containers or []):
        cpath = f"spec.containers[{ci}]"
        if not isinstance(container, Mapping):
            errors.add(cpath, "must be a mapping")
            continue
        cports = container.get("ports")
        if cports is None:
            continue
        if not isinstance(cports, list):
            errors.add(f"{cpath}.ports", "must be a list")
            continue
        names: dict[str, int] = {}
        for pi, cp in enumerate(cports):
            ppath = f"{cpath}.ports[{pi}]"
            if not isinstance(cp, Mapping):
                errors.add(ppath, "must be a mapping")
                continue
            port_name = _port_name(cp.get("name"), f"{ppath}.name", errors)
            if port_name is not None:
                if port_name in names:
                    # Kubernetes refuses a name twice in one container; across containers the
                    # first wins when a Service looks it up
                    errors.add(f"{ppath}.name", f"duplicate port name {port_name!r} in this container "
                                                f"(also {cpath}.ports[{names[port_name]}])")
                    port_name = None
                else:
                    names[port_name] = pi
            number = cp.get("containerPort")
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
                errors.add(f"{ppath}.containerPort", f"must be a port number 1-65535, got {number!r}")
                continue
            proto = cp.get("protocol", "TCP")
            if proto not in ("TCP", "UDP", "SCTP"):
                errors.add(f"{ppath}.protocol", f"must be TCP, UDP or SCTP, got {proto!r}")
                continue
            ports.add((number, proto))
            if port_name is not None:
                named_ports.append((port_name, number, proto))

    status = _mapping(top, "status", "status", errors)
    ips: list[str] = []
    ip_fields: list[str] = []
    if status.get("podIP") not in (None, ""):
        ip = _ip(status["podIP"], "status.podIP", errors)
        if ip is not None:
            ips.append(ip)
            ip_fields.append("status.podIP")
    host_ip: str | None = None
    if status.get("hostIP") not in (None, ""):
        host_ip = _ip(status["hostIP"], "status.hostIP", errors)
    pod_ips = status.get("podIPs")
    if pod_ips is not None:
        if not isinstance(pod_ips, list):
            errors.add("status.podIPs", "must be a list")
        else:
            for i, item in enumerate(pod_ips):
                if not isinstance(item, Mapping) or "ip" not in item:
                    errors.add(f"status.podIPs[{i}]", "must be a mapping with an ip")
                    continue
                ip = _ip(item["ip"], f"status.podIPs[{i}].ip", errors)
                if ip is not None and ip not in ips:
                    ips.append(ip)
                    ip_fields.append(f"status.podIPs[{i}].ip")

    ready = _pod_ready(meta, status, errors)

    _raise_if(errors, "Pod", namespace, name)
    assert name is not None
    return Pod(
        cluster=cluster,
        namespace=namespace,
        name=name,
        labels=_frozen(labels),
        service_account=service_account,
        ip=ips[0] if ips else None,
        annotations=_frozen(annotations),
        ips=tuple(ips),
        node_name=node_name,
        host_network=host_network,
        ports=tuple(sorted(ports)),
        host_ip=host_ip,
        ip_fields=tuple(ip_fields),
        named_ports=tuple(named_ports),
        ready=ready,
    )


_NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS")
#: The address types that are the node's own IP addresses (as Cilium reads a Node).
NODE_IP_TYPES = ("InternalIP", "ExternalIP")


@dataclass(frozen=True, slots=True)
class Node:
    """A Kubernetes Node as l7gate sees it: its labels and its IP addresses (InternalIP and
    ExternalIP, in the order of `status.addresses`, IPv6 ones included). Immutable."""

    cluster: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    addresses: tuple[str, ...] = ()
    # the field each of `addresses` came from (`status.addresses[1].address`), for error messages
    address_fields: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def __hash__(self) -> int:
        return hash((self.cluster, self.name, tuple(self.labels.items()), self.addresses))

    @property
    def ref(self) -> str:
        """`cluster/name`: the key the agent files a Node under."""
        return f"{self.cluster}/{self.name}"

    @property
    def ipv4_addresses(self) -> tuple[str, ...]:
        """The addresses the datapath polices (it is IPv4 only)."""
        return tuple(a for a in self.addresses if ipaddress.ip_address(a).version == 4)


def parse_node(obj: object, *, default_cluster: str) -> Node:
    """A `Node` from a Kubernetes Node object. Raises K8sObjectError listing every problem."""
    errors = _Errors()
    top, meta = _header(obj, "Node", errors)
    name, labels, cluster = _cluster_scoped_meta(meta, default_cluster, errors, subdomain=True)
    status = _mapping(top, "status", "status", errors)
    addresses: list[str] = []
    fields: list[str] = []
    raw = status.get("addresses")
    if raw is not None and not isinstance(raw, list):
        errors.add("status.addresses", "must be a list")
        raw = []
    for i, item in enumerate(raw or []):
        path = f"status.addresses[{i}]"
        if not isinstance(item, Mapping):
            errors.add(path, "must be a mapping with a type and an address")
            continue
        kind = item.get("type")
        if kind not in _NODE_ADDRESS_TYPES:
            errors.add(f"{path}.type", f"must be one of {', '.join(_NODE_ADDRESS_TYPES)}, got {kind!r}")
            continue
        value = item.get("address")
        if not isinstance(value, str) or not value:
            errors.add(f"{path}.address", "must be a non-empty string")
            continue
        if kind in NODE_IP_TYPES:
            ip = _ip(value, f"{path}.address", errors)
            if ip is not None and ip not in addresses:
                addresses.append(ip)
                fields.append(f"{path}.address")
    _raise_if(errors, "Node", None, name)
    assert name is not None
    return Node(cluster=cluster, name=name, labels=_frozen(labels), addresses=tuple(addresses),
                address_fields=tuple(fields))


def node_identity_labels(node: Node, *, local: bool) -> Labels:
    """The labels of `node`'s identity (`identity.filter.node_labels`): `reserved:host` for
    the agent's own node, `reserved:remote-node` for any other, with the Node's labels as
    `node:<key>` and its cluster. The one definition the agent and `policy trace` share."""
    return node_labels(node.labels, cluster=node.cluster, local=local)


def node_addresses(nodes: Iterable[Node], pods: Iterable[Pod]) -> dict[str, tuple[str, str | None]]:
    """Every node address the inventory knows → (its cluster, the name of its node, or None when
    no Node object or pod names it). The IPv4 InternalIP/ExternalIP of the Nodes first; then
    each pod's `status.hostIP` not already a Node's, as an address of the node its `spec.nodeName`
    names (a pod without one: a node whose name is unknown). An address two Nodes give is the
    first one's, in (cluster, name) order, as is a hostIP pods on two nodes give. Loopback and
    IPv6 addresses are left out: they are never a node's address on the datapath."""
    out: dict[str, tuple[str, str | None]] = {}
    for node in sorted(nodes, key=lambda n: (n.cluster, n.name)):
        for ip in node.ipv4_addresses:
            if not ipaddress.ip_address(ip).is_loopback:
                out.setdefault(ip, (node.cluster, node.name))
    # one pass, no sort: the agent calls this after every change of its pods
    first: dict[str, tuple[tuple[str, str, str], str | None, str]] = {}
    for pod in pods:
        host = pod.host_ip
        if host is None or host in out:
            continue
        key = (pod.cluster, pod.namespace, pod.name)
        seen = first.get(host)
        if seen is None or key < seen[0]:
            first[host] = (key, pod.node_name, pod.cluster)
    for host, (_, name, cluster) in first.items():
        addr = ipaddress.ip_address(host)
        if addr.version == 4 and not addr.is_loopback:
            out[host] = (cluster, name)
    return out


def parse_namespace(obj: object, *, default_cluster: str) -> Namespace:
    """A `Namespace` from a Kubernetes Namespace object. Raises K8sObjectError."""
    errors = _Errors()
    _, meta = _header(obj, "Namespace", errors)
    name, labels, cluster = _cluster_scoped_meta(meta, default_cluster, errors, subdomain=False)
    _raise_if(errors, "Namespace", None, name)
    assert name is not None
    return Namespace(name=name, labels=_frozen(labels), cluster=cluster)


def scoped_namespace(obj: object, *, default_cluster: str) -> Namespace:
    """`parse_namespace`, but a Namespace object without the cluster annotation describes that
    namespace in every cluster: its cluster is ANY_CLUSTER. Raises K8sObjectError."""
    ns = parse_namespace(obj, default_cluster=default_cluster)
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    if isinstance(annotations, Mapping) and CLUSTER_ANNOTATION in annotations:
        return ns
    return Namespace(ns.name, ns.labels, ANY_CLUSTER)


def namespace_of(pod: Pod, namespaces: Mapping[tuple[str, str], Namespace]) -> Namespace | None:
    """The Namespace that describes `pod`'s namespace, from `namespaces` keyed by (cluster, name)
    as `scoped_namespace` gives them: the one naming the pod's cluster wins over one for every
    cluster; a namespace of another cluster never applies."""
    return namespaces.get((pod.cluster, pod.namespace)) or namespaces.get((ANY_CLUSTER, pod.namespace))


def pod_identity_labels(pod: Pod, namespace: Namespace | None) -> Labels:
    """The labels of `pod`'s identity (`identity.filter.identity_labels`), with its namespace's
    labels (`namespace_of`): the one definition the agent and `policy trace` share. Raises
    IdentityError for a pod without namespace or cluster."""
    return _identity_labels(tuple(pod.labels.items()), pod.namespace, pod.cluster, pod.service_account,
                            tuple(namespace.labels.items()) if namespace is not None else None)


@functools.lru_cache(maxsize=16384)  # thousands of pods, a few hundred label sets
def _identity_labels(labels: tuple[tuple[str, str], ...], namespace: str, cluster: str, service_account: str,
                     namespace_labels: tuple[tuple[str, str], ...] | None) -> Labels:
    return identity_labels(dict(labels), namespace=namespace, cluster=cluster, service_account=service_account,
                           namespace_labels=dict(namespace_labels) if namespace_labels is not None else None)


def pod_backend(pod: Pod) -> BackendPod | None:
    """What the service table needs of `pod`, at its first IPv4 address (ClusterIPs are IPv4);
    None for a pod without one, which can be no backend."""
    ip = next((a for a in pod.ips if ip_address(a).version == 4), None)
    if ip is None:
        return None
    return BackendPod(
        ref=pod.ref, cluster=pod.cluster, namespace=pod.namespace, ip=ip, labels=pod.labels,
        ready=pod.ready, named_ports=pod.named_ports,
    )


def _service_name(meta: Mapping[str, Any], errors: _Errors) -> str | None:
    value = meta.get("name")
    if value is None or value == "":
        errors.add("metadata.name", "is required")
        return None
    if not isinstance(value, str):
        errors.add("metadata.name", "must be a string")
        return None
    message = service_name_error(value)
    if message is not None:
        errors.add("metadata.name", message)
        return None
    return value


def _annotation(
    annotations: Mapping[str, str], keys: tuple[str, ...], allowed: tuple[str, ...], errors: _Errors
) -> str | None:
    """The lowercased value of the first of `keys` present (Cilium compares annotation values
    in lower case), or None; a value outside `allowed` is an error naming its annotation."""
    found: str | None = None
    for key in keys:
        value = annotations.get(key)
        if value is None:
            continue
        if value.lower() not in allowed:
            wanted = ", ".join(f'"{a}"' for a in allowed if a)
            errors.add(f"metadata.annotations.{key}", f"must be {wanted}, got {value!r}")
        elif found is None:
            found = value.lower()
    return found


def _port_number(value: object, path: str, errors: _Errors) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        errors.add(path, f"must be a port number 1-65535, got {value!r}")
        return None
    return value


def _cluster_ip(spec: Mapping[str, Any], errors: _Errors) -> tuple[str | None, bool]:
    """(address, headless). An address the socket load balancer must never take over is
    refused: a ClusterIP of 127.0.0.1 would capture every pod's connections to itself."""
    value = spec.get("clusterIP")
    if value is None or value == "":
        return None, False
    if value == "None":
        return None, True
    if not isinstance(value, str):
        errors.add("spec.clusterIP", "must be a string")
        return None, False
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        errors.add("spec.clusterIP", f'must be an IPv4 address or "None" (headless), got {value!r}')
        return None, False
    if addr.version != 4:
        errors.add("spec.clusterIP", f"l7gate supports IPv4 ClusterIPs only, got {value!r}")
        return None, False
    what = None
    if addr.is_unspecified:
        what = "the unspecified address"
    elif addr.is_loopback:
        what = "a loopback address"
    elif addr.is_multicast:
        what = "a multicast address"
    elif addr == _LIMITED_BROADCAST:
        what = "the limited broadcast address"
    elif addr.is_link_local:
        what = "a link-local address"
    if what is not None:
        errors.add("spec.clusterIP", f"{addr} is {what}, which cannot be a Service's address")
        return None, False
    return addr.compressed, False


def _service_ports(spec: Mapping[str, Any], headless: bool, errors: _Errors) -> tuple[ServicePort, ...]:
    raw = spec.get("ports")
    if raw is None:
        raw = []
    elif not isinstance(raw, list):
        errors.add("spec.ports", "must be a list")
        return ()
    if not raw and not headless:
        errors.add("spec.ports", "at least one port is required (only a headless Service, clusterIP: None, "
                                 "may have none)")
    out: list[ServicePort] = []
    names: dict[str, int] = {}
    numbers: dict[tuple[int, str], int] = {}
    for i, item in enumerate(raw):
        path = f"spec.ports[{i}]"
        if not isinstance(item, Mapping):
            errors.add(path, "must be a mapping")
            continue
        ok = True
        port = _port_number(item.get("port"), f"{path}.port", errors)
        protocol = item.get("protocol")
        if protocol is None:
            protocol = "TCP"
        elif protocol not in _PROTOCOLS:
            errors.add(f"{path}.protocol", f"must be TCP, UDP or SCTP, got {protocol!r}")
            ok = False
        name = item.get("name")
        if name is None or name == "":
            name = ""
            if len(raw) > 1:
                errors.add(f"{path}.name", "is required when a Service has more than one port")
                ok = False
        elif not isinstance(name, str):
            errors.add(f"{path}.name", "must be a string")
            ok = False
        elif (message := name_error(name, subdomain=False)) is not None:
            errors.add(f"{path}.name", message)
            ok = False
        elif name in names:
            errors.add(f"{path}.name", f"duplicate port name {name!r} (also spec.ports[{names[name]}])")
            ok = False
        else:
            names[name] = i
        target: int | str | None = port
        raw_target = item.get("targetPort")
        if raw_target is not None:
            target = None
            if isinstance(raw_target, str):
                problem = port_name_problem(raw_target)
                if problem is None:
                    target = raw_target
                else:
                    hint = " (a number: write it without quotes)" if raw_target.isdigit() else ""
                    errors.add(f"{path}.targetPort", f"must be a port number 1-65535 or a container port's "
                                                     f"name; {_PORT_NAME_RULE}{hint}: {problem}; got {raw_target!r}")
            else:
                target = _port_number(raw_target, f"{path}.targetPort", errors)
        if port is None or target is None or not ok:
            continue
        if (port, protocol) in numbers:
            errors.add(path, f"duplicate port {port}/{protocol} (also spec.ports[{numbers[port, protocol]}])")
            continue
        numbers[port, protocol] = i
        out.append(ServicePort(name=name, port=port, protocol=protocol, target=target))
    return tuple(out)


def parse_service(obj: object, *, default_cluster: str) -> Service:
    """An `l7gate.services.Service` from a Kubernetes Service object. Raises K8sObjectError
    listing every problem.

    - `spec.type` ClusterIP (the default); NodePort and LoadBalancer are accepted, and only their
      ClusterIP part is used (l7gate balances connections made inside the cluster, to the
      ClusterIP); ExternalName is refused.
    - `spec.clusterIP`: an IPv4 address; "None" makes a headless Service; absent (a Service the
      API server has not allocated an address for, as in a hand-written file): no frontend
      either, since l7gate allocates no ClusterIPs. `spec.clusterIPs` is not read.
    - `spec.ports[]`: `port`, `protocol` (TCP), `name` (required with more than one port), and
      `targetPort` (the port's number by default) as a number or a container port's name.
    - `spec.selector`: absent or empty (the API server cannot tell the two apart): Kubernetes
      does not manage the Service's endpoints, and the table gives it no backends.
    - Cilium's annotations: `service.cilium.io/global` (or `io.cilium/global-service`) "true"
      makes it global; `service.cilium.io/shared` (or `io.cilium/shared-service`) "false" keeps
      this cluster's backends from other clusters (default "true"; meaningful only when
      global); `service.cilium.io/affinity` (or `io.cilium/service-affinity`) local, remote or
      none (the default). Values are compared in lower case, as Cilium does; any other value is
      an error naming its annotation.
    """
    errors = _Errors()
    top, meta = _header(obj, "Service", errors)
    name = _service_name(meta, errors)
    namespace = _dns_name(
        _optional_string(meta, "namespace", "metadata.namespace", errors),
        "metadata.namespace", errors, subdomain=False, required=False,
    ) or DEFAULT_NAMESPACE  # fmt: skip
    annotations = _string_map(meta, "annotations", "metadata.annotations", errors, labels=False)
    cluster = _cluster(annotations, default_cluster, errors)
    global_ = _annotation(annotations, GLOBAL_ANNOTATIONS, ("true", "false"), errors) == "true"
    shared = _annotation(annotations, SHARED_ANNOTATIONS, ("true", "false"), errors) != "false"
    affinity = _annotation(annotations, AFFINITY_ANNOTATIONS, ("local", "remote", "none", ""), errors) or "none"

    spec = _mapping(top, "spec", "spec", errors)
    kind = spec.get("type")
    if kind is None:
        kind = "ClusterIP"
    if kind == "ExternalName":
        errors.add("spec.type", "ExternalName Services are not supported by l7gate")
    elif kind not in ("ClusterIP", "NodePort", "LoadBalancer"):
        errors.add("spec.type", f"must be ClusterIP, NodePort, LoadBalancer or ExternalName, got {kind!r}")
    cluster_ip, headless = _cluster_ip(spec, errors)
    ports = _service_ports(spec, headless, errors)
    selector = _string_map(spec, "selector", "spec.selector", errors, labels=True)
    labels = _string_map(meta, "labels", "metadata.labels", errors, labels=True)

    _raise_if(errors, "Service", namespace, name)
    assert name is not None
    return Service(
        cluster=cluster, namespace=namespace, name=name, cluster_ip=cluster_ip, ports=ports,
        selector=selector or None, global_=global_, shared=shared, affinity=affinity, labels=labels,
    )


# -- EndpointSlices ------------------------------------------------------------------------------

ENDPOINT_SLICE_API_VERSION = "discovery.k8s.io/v1"
#: The label that says which Service a slice holds the endpoints of (Kubernetes').
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: The label naming the controller that manages a slice, and the value of Kubernetes' own
#: endpoint slice controller, which writes the slices of Services with a selector.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
ENDPOINT_SLICE_CONTROLLER = "endpointslice-controller.k8s.io"
_ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
# The API server's limits (discovery/v1 validation).
_MAX_ENDPOINTS, _MAX_ADDRESSES, _MAX_SLICE_PORTS = 1000, 100, 100
_LINK_LOCAL_MULTICAST = (ipaddress.ip_network("224.0.0.0/24"), ipaddress.ip_network("ff02::/16"))


def _endpoint_address(value: object, family: int | None, path: str, errors: _Errors) -> str | None:
    """An endpoint's address as the API server checks it: of the slice's address family, and
    not an address that cannot be another host's (unspecified, loopback, link-local)."""
    if not isinstance(value, str) or not value:
        errors.add(path, "must be a non-empty string")
        return None
    if family is None:  # FQDN: a name, unused by l7gate
        return value
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        errors.add(path, f"must be an IPv{family} address (addressType IPv{family}), got {value!r}")
        return None
    if addr.version != family:
        errors.add(path, f"must be an IPv{family} address (addressType IPv{family}), got {value!r}")
        return None
    what = ("the unspecified address" if addr.is_unspecified else "a loopback address" if addr.is_loopback
            else "a link-local address" if addr.is_link_local or any(addr in n for n in _LINK_LOCAL_MULTICAST)
            else None)
    if what is not None:
        errors.add(path, f"{addr.compressed} is {what}: the API server refuses it as an endpoint's address")
        return None
    return addr.compressed



def _condition(conditions: Mapping[str, Any], key: str, path: str, errors: _Errors) -> bool | None:
    value = conditions.get(key)
    if value is None or isinstance(value, bool):
        return value
    hint = " (write true or false, without quotes)" if value in ("true", "false", "True", "False") else ""
    errors.add(f"{path}.{key}", f"must be true, false or null{hint}, got {value!r}")
    return None


def _slice_endpoints(top: Mapping[str, Any], family: int | None, errors: _Errors) -> tuple[SliceEndpoint, ...]:
    raw = top.get("endpoints")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.add("endpoints", "must be a list")
        return ()
    if len(raw) > _MAX_ENDPOINTS:
        errors.add("endpoints", f"must have at most {_MAX_ENDPOINTS} items, has {len(raw)}")
    out: list[SliceEndpoint] = []
    for i, item in enumerate(raw):
        path = f"endpoints[{i}]"
        if not isinstance(item, Mapping):
            errors.add(path, "must be a mapping")
            continue
        addresses = item.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            errors.add(f"{path}.addresses", "is required: a list of 1 to 100 addresses"
                       if addresses in (None, []) else "must be a list")
            continue
        if len(addresses) > _MAX_ADDRESSES:
            errors.add(f"{path}.addresses", f"must have at most {_MAX_ADDRESSES} items, has {len(addresses)}")
        found = [a for j, value in enumerate(addresses)
                 if (a := _endpoint_address(value, family, f"{path}.addresses[{j}]", errors)) is not None]
        conditions = _mapping(item, "conditions", f"{path}.conditions", errors)
        ready = _condition(conditions, "ready", f"{path}.conditions", errors)
        serving = _condition(conditions, "serving", f"{path}.conditions", errors)
        _condition(conditions, "terminating", f"{path}.conditions", errors)
        # Kubernetes: an unknown `ready` is ready; an unknown `serving` is what `ready` says.
        is_ready = ready is None or ready
        out.append(SliceEndpoint(tuple(found), is_ready, is_ready if serving is None else serving))
    return tuple(out)


def _slice_ports(top: Mapping[str, Any], errors: _Errors) -> tuple[SlicePort, ...]:
    raw = top.get("ports")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.add("ports", "must be a list")
        return ()
    if len(raw) > _MAX_SLICE_PORTS:
        errors.add("ports", f"must have at most {_MAX_SLICE_PORTS} items, has {len(raw)}")
    out: list[SlicePort] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"ports[{i}]"
        if not isinstance(item, Mapping):
            errors.add(path, "must be a mapping")
            continue
        name = item.get("name")
        if name is None:
            name = ""
        elif not isinstance(name, str):
            errors.add(f"{path}.name", "must be a string")
            continue
        elif name and (message := name_error(name, subdomain=False)) is not None:
            errors.add(f"{path}.name", message)
            continue
        if name in seen:
            errors.add(f"{path}.name", f"duplicate port name {name!r} (also ports[{seen[name]}])")
            continue
        seen[name] = i
        protocol = item.get("protocol")
        if protocol is None:
            protocol = "TCP"
        elif protocol not in _PROTOCOLS:
            errors.add(f"{path}.protocol", f"must be TCP, UDP or SCTP, got {protocol!r}")
            continue
        if item.get("port") is None:
            continue  # "every port": a Service port of this name has no port number to balance to
        number = _port_number(item.get("port"), f"{path}.port", errors)
        if number is not None:
            out.append(SlicePort(name, number, protocol))
    return tuple(sorted(out))


def parse_endpoint_slice(obj: object, *, default_cluster: str) -> EndpointSlice:
    """An `l7gate.services.EndpointSlice` from a `discovery.k8s.io/v1` EndpointSlice. Raises
    K8sObjectError listing every problem, each with its field path.

    - `metadata.labels["kubernetes.io/service-name"]` names the Service it belongs to (in its
      namespace); without it the slice belongs to none and changes nothing;
    - `addressType` (required): IPv4, IPv6 or FQDN; each endpoint's `addresses` (1 to 100) must
      be of that family, and not unspecified, loopback or link-local (the API server's checks);
    - `endpoints[].conditions`: `ready` (unknown: ready), `serving` (unknown: as `ready`);
      `terminating` is read only to be checked;
    - `ports[]`: `name` (a DNS label, or empty), `port` (1-65535; absent: every port, which gives
      no backend port), `protocol` (TCP, UDP or SCTP; TCP by default).
    Fields l7gate does not use (hostname, nodeName, zone, targetRef, hints) are ignored."""
    errors = _Errors()
    top, meta = _header(obj, "EndpointSlice", errors, ENDPOINT_SLICE_API_VERSION)
    name, namespace, labels, _, cluster = _object_meta(meta, default_cluster, errors)
    address_type = top.get("addressType")
    family: int | None = None
    if address_type not in _ADDRESS_TYPES:
        errors.add("addressType", f"is required: IPv4, IPv6 or FQDN, got {address_type!r}")
        address_type = "FQDN"
    elif address_type != "FQDN":
        family = 4 if address_type == "IPv4" else 6
    endpoints = _slice_endpoints(top, family, errors)
    ports = _slice_ports(top, errors)
    _raise_if(errors, "EndpointSlice", namespace, name)
    assert name is not None and isinstance(address_type, str)
    return EndpointSlice(cluster=cluster, namespace=namespace, name=name, service=labels.get(SERVICE_NAME_LABEL) or None,
                         address_type=address_type, endpoints=endpoints, ports=ports)


def service_target(svc: Service, addresses: Iterable[str]) -> ServiceTarget:
    """What a `toServices` rule reads of `svc` whose EndpointSlices give `addresses`
    (`ServiceTable.endpoint_addresses`): the one definition the agent and `policy trace` share.
    A Service with a selector is not selectable, and keeps no addresses: a change of its
    endpoints changes nothing `toServices` selects."""
    has_selector = svc.selector is not None
    return ServiceTarget.of(svc.namespace, svc.name, svc.labels, has_selector=has_selector,
                            addresses=() if has_selector else addresses)


def service_targets_of(services: Iterable[Service], slices: Iterable[EndpointSlice]) -> dict[str, dict[str, ServiceTarget]]:
    """Per cluster, what `toServices` reads of `services` given `slices` (namespace/name →
    target), through a service table as the agent has it: for an inventory of files."""
    tables: dict[str, ServiceTable] = {}
    for svc in services:
        tables.setdefault(svc.cluster, ServiceTable()).upsert_service(svc)
    for es in slices:
        tables.setdefault(es.cluster, ServiceTable()).upsert_slice(es)
    return {cluster: {svc.ref: service_target(svc, t.endpoint_addresses(svc.namespace, svc.name))
                      for svc in t.services()} for cluster, t in tables.items()}


def parse_object(obj: object, *, default_cluster: str) -> Pod | Namespace | Service | EndpointSlice | Node:
    """A Pod, a Namespace, a Service, an EndpointSlice or a Node, by the object's `kind`."""
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if kind == "Pod":
        return parse_pod(obj, default_cluster=default_cluster)
    if kind == "Node":
        return parse_node(obj, default_cluster=default_cluster)
    if kind == "Namespace":
        return parse_namespace(obj, default_cluster=default_cluster)
    if kind == "Service":
        return parse_service(obj, default_cluster=default_cluster)
    if kind == "EndpointSlice":
        return parse_endpoint_slice(obj, default_cluster=default_cluster)
    raise K8sObjectError(
        "object", (Finding("kind", f"must be 'Pod', 'Namespace', 'Service', 'EndpointSlice' or 'Node', got {kind!r}"),)
    )
