"""The values of the service table: Services, the pods they may select, frontends and backends.

All are immutable (CONVENTIONS 4): mappings are kept as read-only copies and hashed by their
items. They are built by `k8s.objects` (from Kubernetes objects), by the agent (a `BackendPod`
from each pod) and by the cluster mesh (a remote cluster's `Backend`s); the table never mutates
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

PROTOCOLS = ("TCP", "UDP", "SCTP")
AFFINITIES = ("none", "local", "remote")

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(mapping.items()))) if mapping else _EMPTY


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of a Service's `spec.ports`. `target` is a container port number, or the name
    of a container port, looked up in each selected pod (`BackendPod.named_ports`)."""

    name: str  # "" for the single unnamed port Kubernetes allows
    port: int
    protocol: str  # TCP, UDP or SCTP
    target: int | str

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")


@dataclass(frozen=True, slots=True)
class Service:
    """A Service of one cluster as the table sees it. `cluster_ip` is None for a headless Service
    (`clusterIP: None`) or one without an address: it has no frontend. `selector` None means
    that Kubernetes does not manage its endpoints (no selector, or the empty one: the API server
    cannot tell `{}` from an absent selector): it has no backends of its own.

    A Service without a selector takes its backends from the EndpointSlices labelled with its
    name (`EndpointSlice`), which someone other than Kubernetes' endpoint controllers manages.
    `labels` are its metadata labels (what a `toServices` selector reads, what the mesh publishes).

    `global_`, `shared` and `affinity` are Cilium's global-service annotations. `shared` and
    `affinity` mean something only for a global Service: the table ignores `affinity` otherwise,
    and `shared` is read by whoever publishes this cluster's backends to the mesh."""

    cluster: str
    namespace: str
    name: str
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] | None
    global_: bool = False
    shared: bool = True
    affinity: str = "none"  # none, local or remote
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        if self.affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {', '.join(AFFINITIES)}, got {self.affinity!r}")
        # An empty selector selects nothing in Kubernetes; keep one spelling of "no selector".
        object.__setattr__(self, "selector", _frozen(self.selector) if self.selector else None)
        object.__setattr__(self, "labels", _frozen(self.labels))

    def __hash__(self) -> int:
        selector = tuple(self.selector.items()) if self.selector is not None else None
        return hash((self.cluster, self.namespace, self.name, self.cluster_ip, self.ports, selector,
                     self.global_, self.shared, self.affinity, tuple(self.labels.items())))

    @property
    def ref(self) -> str:
        """`namespace/name`: how the table, the mesh and flows name a Service."""
        return f"{self.namespace}/{self.name}"


ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One entry of an EndpointSlice's `endpoints`: its addresses and conditions, as
    Kubernetes defines them (`ready` unknown counts as ready; `serving` unknown is `ready`)."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True


@dataclass(frozen=True, slots=True, order=True)
class SlicePort:
    """One entry of an EndpointSlice's `ports`: it serves the Service port of the same name and
    protocol, on `port` at each endpoint."""

    name: str  # "" for the single unnamed port
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A `discovery.k8s.io/v1` EndpointSlice of one cluster: the endpoints of the Service
    `service` (its `kubernetes.io/service-name` label; None: it belongs to no Service) in its
    namespace. `address_type` IPv4, IPv6 or FQDN (FQDN endpoints are no address: unused)."""

    cluster: str
    namespace: str
    name: str
    service: str | None
    address_type: str
    endpoints: tuple[SliceEndpoint, ...] = ()
    ports: tuple[SlicePort, ...] = ()

    def __post_init__(self) -> None:
        if self.address_type not in ADDRESS_TYPES:
            raise ValueError(f"address type must be one of {', '.join(ADDRESS_TYPES)}, got {self.address_type!r}")

    @property
    def ref(self) -> str:
        """`namespace/name`: how the table names a slice."""
        return f"{self.namespace}/{self.name}"

    @property
    def service_ref(self) -> str | None:
        """`namespace/name` of the Service it belongs to."""
        return f"{self.namespace}/{self.service}" if self.service else None


@dataclass(frozen=True, slots=True)
class BackendPod:
    """What the table needs of a pod. `ref` identifies it (the agent passes `Pod.ref`,
    `cluster/namespace/name`); `ip` is the address backends are reached at; `named_ports` holds
    (name, containerPort, protocol) in the pod spec's order (the first match wins, as in
    Kubernetes)."""

    ref: str
    cluster: str
    namespace: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    ready: bool = True
    named_ports: tuple[tuple[str, int, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def __hash__(self) -> int:
        return hash((self.ref, self.cluster, self.namespace, self.ip, tuple(self.labels.items()),
                     self.ready, self.named_ports))


@dataclass(frozen=True, slots=True, order=True)
class Frontend:
    """A service address: ClusterIP, service port, protocol (TCP, UDP or SCTP)."""

    ip: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One address a frontend balances over. `pod` is the pod's ref, `cluster` the cluster it
    runs in."""

    ip: str
    port: int
    pod: str
    cluster: str


@dataclass(frozen=True, slots=True)
class FrontendEntry:
    """The desired state of one frontend: the Service (`namespace/name`) and port it belongs to,
    and its backends, sorted and without duplicates. No backends: the frontend exists and has
    nowhere to send a connection (the datapath refuses it rather than let it leave unbalanced)."""

    service: str
    port_name: str
    backends: tuple[Backend, ...]
