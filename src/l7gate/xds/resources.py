"""Envoy resources of a proxied port: names, the listener and its HTTP connection manager,
routes and the upstream cluster, built as protobuf messages (no JSON round trip).

Theory of operation. Listener and cluster are per (endpoint, port) in loopback mode: the
listener takes the pod's address and port, the pod's server listens on the same address at
`port + offset`, and the route sends allowed requests there. The listener's policy filter is
the port's classifier, which hands each request to the RBAC slot of its source address over
ECDS (`source_slots`, `rbac`); the route only forwards. The tunnel listener (`mtls_translate`)
uses `http_connection_manager` and `route_configuration` instead: its RBAC matcher travels
per route over RDS. Names are stable so the publisher can diff by name. All of this is pure:
nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2 as set_filter_state_value_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.type.matcher.v3 import matcher_pb2

from ..envoy_names import TLS_STATE, HTTP_PROTOCOL_OPTIONS
from .pb import ads, ecds_source, pack
from .rbac import deny_all_rbac
from .source_slots import CLASSIFIER_TYPE, SOURCE_SLOTS, classifier_name

RBAC_FILTER = "envoy.filters.http.rbac"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"


# -- names ---------------------------------------------------------------------------------------


def listener_name(ip: str, port: int) -> str:
    return f"l7g_ep_{ip}_{port}"


def route_name(ip: str, port: int) -> str:
    return f"l7g_rc_{ip}_{port}"


def cluster_name(ip: str, port: int) -> str:
    return f"l7g_up_{ip}_{port}"


# -- routes, listeners, clusters ---------------------------------------------------------------


def route_configuration(name: str, upstream_cluster: str, matcher: matcher_pb2.Matcher) -> route_pb2.RouteConfiguration:
    """A route carrying its RBAC matcher per route (RDS): the tunnel listener's shape, paired
    with `http_connection_manager`."""
    per_route = rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(matcher=matcher))
    route = route_components_pb2.Route(
        name="l7gate",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=upstream_cluster),
        typed_per_filter_config={RBAC_FILTER: pack(per_route)},
    )
    vhost = route_components_pb2.VirtualHost(name="l7gate", domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def upstream_route(name: str, upstream_cluster: str) -> route_pb2.RouteConfiguration:
    """A proxied port's route: everything to the pod. Policy is in the port's ECDS slots."""
    route = route_components_pb2.Route(
        name="l7gate",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=upstream_cluster),
    )
    vhost = route_components_pb2.VirtualHost(name="l7gate", domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def _hcm(
    stat_prefix: str, rds_name: str, policy_filter: hcm_pb2.HttpFilter, access_logs: Sequence[Message]
) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=rds_name),
        http_filters=[
            policy_filter,
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        access_log=list(access_logs),
        # WebSocket upgrades pass where the rules allow the request that asks for them (the
        # policy filter judges it like any request); other upgrades (h2c, CONNECT) are refused
        # or ignored by Envoy. As Cilium's proxy does.
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
    )


def http_connection_manager(stat_prefix: str, rds_name: str, access_logs: Sequence[Message] = ()) -> hcm_pb2.HttpConnectionManager:
    """HCM whose RBAC policy comes per route (`route_configuration`)."""
    # Filter-level RBAC denies everything: a route without its per-route policy fails closed.
    rbac = hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(deny_all_rbac()))
    return _hcm(stat_prefix, rds_name, rbac, access_logs)


def source_http_connection_manager(
    stat_prefix: str, rds_name: str, classifier: str, access_logs: Sequence[Message] = ()
) -> hcm_pb2.HttpConnectionManager:
    """HCM whose policy is the ECDS classifier `classifier` and its slots (`classifier_config`).
    No default config: the listener stays warming, taking no connection, until it arrives."""
    cls = hcm_pb2.HttpFilter(name=classifier, config_discovery=ecds_source(CLASSIFIER_TYPE))
    return _hcm(stat_prefix, rds_name, cls, access_logs)


def listener(
    name: str, ip: str, port: int, rds_name: str, access_logs: Sequence[Message] = (), transparent: bool = False,
    gen: int = 0, tls_chain: listener_components_pb2.FilterChain | None = None, split: int = SOURCE_SLOTS,
) -> listener_pb2.Listener:
    """A proxied port's listener; its policy filter is the port's classifier (ECDS) of
    incarnation `gen`, split `split` ways (`source_slots.classifier_name`). `tls_chain`: the
    chain of its TLS connections when the port has `serverNames` (`tls_filter_chain`), with
    the TLS inspector."""
    hcm = source_http_connection_manager(name, rds_name, classifier_name(ip, port, gen, split), access_logs)
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))]
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
        ),
        filter_chains=[chain] if tls_chain is None else [chain, tls_chain],
        listener_filters=[tls_inspector()] if tls_chain is not None else [],
        # Kernel mode: the pod's address is not local to the node; IP_TRANSPARENT lets Envoy
        # listen on it and answer from it, for the connections the datapath marks for it.
        transparent=wrappers_pb2.BoolValue(value=True) if transparent else None,
    )


# The filter state the ORIGINAL_DST cluster reads the upstream address from (Envoy's well-known
# key): for the egress TLS chains' TCP proxy, which has no header to carry it.
ORIGINAL_DST_STATE = "envoy.network.transport_socket.original_dst_address"


def tls_inspector() -> listener_components_pb2.ListenerFilter:
    """Tells TLS from plain text (`transport_protocol`) and reads the SNI. A plain-text client
    speaks first, so it waits for nothing."""
    return listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.tls_inspector", typed_config=pack(tls_inspector_pb2.TlsInspector()))


def tls_filter_chain(
    name: str, port: int, rbac_filters: Sequence[tuple[str, str, matcher_pb2.Matcher]], cluster: str,
    stat_prefix: str, tcp_access_logs: Sequence[Message] = (), *, original_dst: bool, direction: str,
) -> listener_components_pb2.FilterChain:
    """A chain for the TLS connections to `port` (`transport_protocol: tls`), judged by
    `serverNames` without reading their bytes: network RBAC filters (name, stat prefix, matcher
    whose leaves match the SNI: `rbac.decision_on_match(tls=True)`), then a TCP proxy to
    `cluster` that connects only once the ClientHello passed them (a refused server name opens
    no connection upstream). `original_dst`: the cluster is ORIGINAL_DST, told the accepted
    socket's own address. The SNI is kept in filter state (`TLS_STATE`, as
    `<direction>:<name>`) for the flow of the connection's access log entry.

    The verdict is taken once per connection, at its first bytes. The matchers sit in the
    listener: a change re-sends it, and Envoy drains only the chains that changed, so it
    reaches new connections; open ones keep their verdict."""
    states = [set_filter_state_value_pb2.FilterStateValue(
        object_key=TLS_STATE, factory_key="envoy.string",
        # (no SNI: empty, not Envoy's "-", which a client could send as its server name)
        format_string=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=f"{direction}:%REQUESTED_SERVER_NAME%"),
            omit_empty_values=True),
    )]
    if original_dst:
        states.insert(0, set_filter_state_value_pb2.FilterStateValue(
            object_key=ORIGINAL_DST_STATE,
            format_string=substitution_format_string_pb2.SubstitutionFormatString(
                text_format_source=base_pb2.DataSource(inline_string="%DOWNSTREAM_LOCAL_ADDRESS%")),
        ))
    proxy = tcp_proxy_pb2.TcpProxy(
        stat_prefix=stat_prefix, cluster=cluster, access_log=list(tcp_access_logs),
        upstream_connect_mode=tcp_proxy_pb2.ON_DOWNSTREAM_DATA,
        max_early_data_bytes=wrappers_pb2.UInt32Value(value=64 << 10))
    filters = [
        listener_components_pb2.Filter(name=fname, typed_config=pack(network_rbac_pb2.RBAC(
            stat_prefix=prefix, matcher=matcher)))
        for fname, prefix, matcher in rbac_filters
    ]
    filters.append(listener_components_pb2.Filter(
        name="envoy.filters.network.set_filter_state",
        typed_config=pack(set_filter_state_pb2.Config(on_new_connection=states))))
    filters.append(listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(proxy)))
    return listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=listener_components_pb2.FilterChainMatch(
            destination_port=wrappers_pb2.UInt32Value(value=port), transport_protocol="tls"),
        filters=filters,
    )


def downstream_protocol_options() -> any_pb2.Any:
    """The upstream protocol follows the downstream one: HTTP/1.1 stays HTTP/1.1, h2c stays h2c
    (gRPC). Envoy's default is HTTP/1.1 upstream whatever came in, which breaks every gRPC call
    to a server that speaks only HTTP/2. Cilium's proxy configures its clusters the same way."""
    return pack(http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        )
    ))


def static_cluster(name: str, ip: str, port: int) -> cluster_pb2.Cluster:
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
            )
        )
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[lb])],
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: downstream_protocol_options()},
    )


@dataclass(frozen=True, slots=True)
class ProxiedPort:
    """One (local endpoint, port) the node's Envoy fronts in loopback mode."""

    identity: int
    ip: str
    port: int
    upstream_ip: str
    upstream_port: int
    transparent: bool = False
