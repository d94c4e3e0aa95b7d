"""What every flow converter is given and may raise: the agent's view of addresses
(`IngestContext`, `PeerInfo`) and `MalformedEvent`.

The agent resolves addresses: `IngestContext.resolve(ip)` returns the `PeerInfo` of an address
(pod, namespace, cluster, labels, identity, whether it is a local endpoint), so the converters
need nothing from the agent. All values here are immutable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .flow import Endpoint, Service


class MalformedEvent(ValueError):
    """An event a converter cannot turn into flows."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the agent knows about an address. `labels` are Hubble-style strings."""

    identity: int
    cluster_name: str = ""
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    local: bool = False


Resolve = Callable[[str], PeerInfo]


def hubble_labels(labels: Mapping[str, str]) -> tuple[str, ...]:
    """l7gate labels (`app`, `reserved:world`, `cidr:10.0.0.0/8`) as Hubble prints them
    (`k8s:app=billing-service`, `reserved:world`, `cidr:10.0.0.0/8`), sorted."""
    out = []
    for k, v in labels.items():
        if ":" in k and not v:
            out.append(k)
        else:
            out.append(f"k8s:{k}={v}")
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class IngestContext:
    resolve: Resolve
    node_name: str = ""
    now: Callable[[], int] = time.time_ns
    # The Service an address and port is a backend of, if any (`Flow.destination_service`).
    service_of: Callable[[str, int], Service | None] = lambda ip, port: None


def endpoint(ip: str, port: int, info: PeerInfo) -> Endpoint:
    """A flow's endpoint: the address and port seen, named by what the agent knows of it."""
    return Endpoint(ip, port, info.identity, info.cluster_name, info.namespace, info.pod_name, info.labels)
