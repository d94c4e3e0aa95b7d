"""l7gate.services: Kubernetes Services and Cilium's global services as a pure table.

Services and the pods their selectors pick, the EndpointSlices of Services without one (and,
for global Services, the backends remote clusters publish) → frontends (ClusterIP:port/protocol)
and their backends, the desired state the socket load balancer applies. No I/O and no threads: the agent feeds it and applies its
output. `types` holds the values, `table` the `ServiceTable`.
"""

from l7gate.services.table import PortBackends, ServiceTable
from l7gate.services.types import (
    ADDRESS_TYPES,
    AFFINITIES,
    PROTOCOLS,
    Backend,
    BackendPod,
    EndpointSlice,
    Frontend,
    FrontendEntry,
    Service,
    ServicePort,
    SliceEndpoint,
    SlicePort,
)

__all__ = [
    "ADDRESS_TYPES",
    "AFFINITIES",
    "PROTOCOLS",
    "Backend",
    "BackendPod",
    "EndpointSlice",
    "Frontend",
    "FrontendEntry",
    "PortBackends",
    "Service",
    "ServicePort",
    "ServiceTable",
    "SliceEndpoint",
    "SlicePort",
]
