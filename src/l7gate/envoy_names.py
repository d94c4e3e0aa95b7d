"""Names l7gate and its Envoys agree on, defined once: the xDS resource type URLs and names, and the
request headers the tunnel sets between Envoys (which the flows read back). Below every package
that speaks to Envoy (`xds` builds with them, `observe` reads access logs with them, the CLI
names types with them)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

TYPE_PREFIX = "type.googleapis.com/"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION_CONFIG = TYPE_PREFIX + "envoy.config.core.v3.TypedExtensionConfig"
#: The xDS service names Envoy's docs and logs use for each type (the CLI takes them too).
SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {
        LISTENER: "LDS",
        ROUTE: "RDS",
        CLUSTER: "CDS",
        ENDPOINT: "EDS",
        SECRET: "SDS",
        EXTENSION_CONFIG: "ECDS",
    }
)
#: The name under which a cluster's upstream HTTP options go (typed_extension_protocol_options).
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

#: Where the tunnel's destination Envoy delivers a request (a local pod's ip:port): set by the
#: source node's Envoy, read by the destination's ORIGINAL_DST cluster, its RBAC and the flows.
ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"
#: The source pod's address, set by the source Envoy itself for its egress route's lookup.
SOURCE_HEADER = "x-l7gate-source"
#: The protocol a request arrived in at the source node (Envoy's %PROTOCOL%), for the
#: destination to speak the same to the pod: the tunnel itself is always HTTP/2.
PROTOCOL_HEADER = "x-l7gate-downstream-protocol"
FORWARDED_FOR_HEADER = "x-forwarded-for"
#: The egress proxy's own RBAC verdicts (egress HTTP rules, at the source node) carry this before
#: their action name (`egress-allow|…`, `egress-deny-l7|…`): the flows tell them from the
#: destination's ingress verdicts by it.
EGRESS_ACTION_PREFIX = "egress-"
#: A filter state object the TLS chains (`serverNames`) set on each connection, `<direction>:<SNI>`
#: (`egress` or `ingress`; `-` for no SNI), and log, so that a TCP access log entry of such a
#: chain becomes a flow (`observe.envoy_flows`).
TLS_STATE = "l7g.tls"
