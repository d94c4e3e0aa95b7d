"""Kubernetes Pod and Namespace objects (plain dicts from YAML or the API) -> typed values.

The one place these objects are parsed (CONVENTIONS 3). Parsing checks what the API server would
have enforced, since hand-written inventories for `l7gate policy trace` never went through one:
label keys and values must be valid Kubernetes labels (YAML `version: 1` is an int, not the string
Kubernetes needs), names must be DNS names, IPs must parse. Every error is collected with its
field path (`metadata.labels.app: must be a string`) and raised together in one
`K8sObjectError`. Fields l7gate does not use are ignored.

A pod's cluster is its `l7gate.io/cluster` annotation, else the `default_cluster` the caller
passes (the agent's `--cluster-name`). The same goes for namespaces, so that one inventory can
describe several clusters.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from l7gate.identity.filter import identity_labels
from l7gate.policy.errors import Finding
from l7gate.policy.labels import Labels
from l7gate.policy.names import name_error

CLUSTER_ANNOTATION = "l7gate.io/cluster"
#: The cluster of a Namespace object without the cluster annotation: it describes that
#: namespace in every cluster (`scoped_namespace`).
ANY_CLUSTER = "*"
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

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
    """A pod as l7gate sees it. Immutable; `labels` and `annotations` are read-only mappings."""

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
        where = f"{path}.{key}"
        problem = _label_key_problem(key)
        if problem is not None:
            errors.add(where, f"invalid key: {problem}")
            continue
        if not isinstance(value, str):
            errors.add(where, "must be a string")
            continue
        if labels and value:
            if len(value) > 63:
                errors.add(where, "label value must be at most 63 characters")
                continue
            if not _LABEL_NAME.fullmatch(value):
                errors.add(
                    where,
                    "label value must consist of letters, digits, '-', '_' or '.',"
                    " and start and end with a letter or digit",
                )
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
    obj: object, kind: str, errors: _Errors
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        errors.add("", f"a {kind} must be a mapping")
        return {}, {}
    if obj.get("apiVersion") != "v1":
        errors.add("apiVersion", f'must be "v1", got {obj.get("apiVersion")!r}')
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


def _ip(value: object, path: str, errors: _Errors) -> str | None:
    """A pod's or node's own address. Addresses no pod or node can have are refused here, in any
    datapath mode: the agent would listen on them (0.0.0.0 is every interface of the node)."""
    if not isinstance(value, str):
        errors.add(path, "must be a string")
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        errors.add(path, f"not an IP address: {value!r}")
        return None
    what = None
    if addr.is_unspecified:
        what = "the unspecified address (it means every interface of the node)"
    elif addr.is_multicast:
        what = "a multicast address"
    elif addr == _LIMITED_BROADCAST:
        what = "the limited broadcast address"
    if what is not None:
        errors.add(path, f"{addr.compressed} is {what}, not an address of one pod or node: give its own "
                         "unicast address")
        return None
    return addr.compressed


def _raise_if(errors: _Errors, kind: str, namespace: str | None, name: str | None) -> None:
    if errors.found:
        what = f"{namespace}/{name}" if namespace and name else (name or "<unnamed>")
        raise K8sObjectError(f"{kind} {what}", tuple(errors.found))


def parse_pod(obj: object, *, default_cluster: str) -> Pod:
    """A `Pod` from a Kubernetes Pod object. Raises K8sObjectError listing every problem."""
    errors = _Errors()
    top, meta = _header(obj, "Pod", errors)
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
    cluster = _cluster(annotations, default_cluster, errors)

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
        for pi, cp in enumerate(cports):
            ppath = f"{cpath}.ports[{pi}]"
            if not isinstance(cp, Mapping):
                errors.add(ppath, "must be a mapping")
                continue
            number = cp.get("containerPort")
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
                errors.add(f"{ppath}.containerPort", f"must be a port number 1-65535, got {number!r}")
                continue
            proto = cp.get("protocol", "TCP")
            if proto not in ("TCP", "UDP", "SCTP"):
                errors.add(f"{ppath}.protocol", f"must be TCP, UDP or SCTP, got {proto!r}")
                continue
            ports.add((number, proto))

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
    )


def parse_namespace(obj: object, *, default_cluster: str) -> Namespace:
    """A `Namespace` from a Kubernetes Namespace object. Raises K8sObjectError."""
    errors = _Errors()
    _, meta = _header(obj, "Namespace", errors)
    name = _dns_name(
        _optional_string(meta, "name", "metadata.name", errors),
        "metadata.name", errors, subdomain=False, required=True,
    )  # fmt: skip
    labels = _string_map(meta, "labels", "metadata.labels", errors, labels=True)
    annotations = _string_map(meta, "annotations", "metadata.annotations", errors, labels=False)
    cluster = _cluster(annotations, default_cluster, errors)
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
    return identity_labels(
        pod.labels,
        namespace=pod.namespace,
        cluster=pod.cluster,
        service_account=pod.service_account,
        namespace_labels=namespace.labels if namespace is not None else None,
    )


def parse_object(obj: object, *, default_cluster: str) -> Pod | Namespace:
    """A Pod or a Namespace, by the object's `kind`."""
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if kind == "Pod":
        return parse_pod(obj, default_cluster=default_cluster)
    if kind == "Namespace":
        return parse_namespace(obj, default_cluster=default_cluster)
    raise K8sObjectError("object", (Finding("kind", f"must be 'Pod' or 'Namespace', got {kind!r}"),))
