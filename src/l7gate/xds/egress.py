"""Egress HTTP rules, enforced by the source node's Envoy (docs/egress-http.md).

Theory of operation. A local pod's connection that its egress policy sends through the proxy
(HTTP rules on the port) is handed by the kernel (`l7g_from_pod`, `bpf_sk_assign`) to one
listener, `EGRESS_LISTENER` on <proxy.egressPort> (the kernel finds it as 127.0.0.1:<port>;
it is bound to every address, see ANY_ADDRESS); the accepted socket keeps the
destination the pod connected to as its local address. That listener has:

- the `original_src` listener filter: the upstream connection leaves from the pod's own
  address, marked PROXY_UPSTREAM_MARK, so that the destination's kernel and proxy see the pod
  (its identity) and this node's kernel steers the replies back to Envoy's socket;
- one filter chain per port that some local pod has egress HTTP rules on (matched by the
  destination port; any other port has no chain and Envoy closes the connection), whose HTTP
  connection manager (paths normalized as everywhere) runs two RBAC filters and the router;
  their matchers come per route over RDS (`l7g_egress_rc_<port>`), so a change applies to the
  next request on an open connection:

    l7g.dst_ingress  DestinationIP ─ local pods with ingress HTTP rules on the port
                        └─ DirectSourceIP ─ that pod's ingress decisions for the local pods
                     any other destination: allowed (its own node, or this kernel, judges it)
    l7g.egress       DirectSourceIP ─ local pods with egress HTTP rules on the port
                        └─ DestinationIP ─ that pod's egress decisions, by destination identity
                     any other source: denied (fail closed)
    router           → ORIGINAL_DST cluster: the destination the pod asked for

  The egress filter's action names carry `rbac.EGRESS_ACTION_PREFIX`, so a flow tells which
  side decided (traffic_direction EGRESS).

All of this is pure; `EgressPublisher` hands what changed to the snapshot cache per flush, next
to the other producers' resources (names of its own).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.type.matcher.v3 import ip_pb2, matcher_pb2

from ..envoy_names import CLUSTER, HTTP_PROTOCOL_OPTIONS, LISTENER, ORIGINAL_DST_HEADER, ROUTE
from ..identity.ipcache import IPNetwork
from ..policy.mapstate import Action, Decision, EndpointPolicy, MapEntry, MapKey
from ..policy.parse import MAX_L7_RANGE
from ..policy.types import Direction, Protocol
from . import rbac
from .cache import SnapshotDelta
from .pb import ads, cidr, pack, typed_ext
from .publisher import ResourceSink
from . import resources
from .resources import HCM_FILTER, ROUTER_FILTER, downstream_protocol_options

EGRESS_LISTENER = "l7g_egress"
EGRESS_CLUSTER = "l7g_egress_origdst"
EGRESS_TCP_CLUSTER = "l7g_egress_origdst_tcp"
EGRESS_FILTER = "l7g.egress"
DST_INGRESS_FILTER = "l7g.dst_ingress"
EGRESS_ROUTE_NAME = "l7g-egress"  # the route's own name, as access logs report it
PROXY_UPSTREAM_MARK = 0xA00  # datapath.c: the egress proxy's upstream sockets
# Bound to the wildcard address: Envoy then reads each accepted connection's own local address
# (the destination the pod asked for) instead of assuming the listener's, which the filter
# chains' destination_port match needs. A connection made to <node>:<port> itself matches no
# chain (no pod's rules name that port and address) and is closed.
ANY_ADDRESS = "0.0.0.0"


def route_config_name(port: int) -> str:
    return f"l7g_egress_rc_{port}"


# -- what is rendered ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalPod:
    ip: str
    identity: int


def _http_ports(entries: Mapping[MapKey, MapEntry], *, dns: bool) -> set[int]:
    """The TCP ports whose entries send through the proxy (HTTP rules; DNS rules too if `dns`),
    a range's ports one by one (the parser bounds HTTP ranges to MAX_L7_RANGE ports)."""
    out: set[int] = set()
    for k, e in entries.items():
        if not e.redirect or e.deny or not k.protocol.covers(Protocol.TCP):
            continue
        if e.l7 is not None and e.l7.dns and not dns:
            continue
        if k.ports.hi - k.ports.lo < MAX_L7_RANGE:
            out.update(range(k.ports.lo, k.ports.hi + 1))
    return out


def egress_sni_ports(policy: EndpointPolicy | None) -> set[int]:
    """The ports an endpoint's egress policy has `serverNames` on (a TLS chain each)."""
    return set() if policy is None else rbac.sni_ports(policy.egress, MAX_L7_RANGE)


def egress_http_ports(policy: EndpointPolicy | None) -> set[int]:
    """The ports an endpoint's egress policy sends through the proxy for HTTP rules (not DNS:
    the DNS proxy takes those)."""
    return set() if policy is None else _http_ports(policy.egress, dns=False)


def ingress_http_ports(policy: EndpointPolicy | None) -> set[int]:
    """The ports an endpoint's ingress policy sends through the proxy (its listeners)."""
    return set() if policy is None else _http_ports(policy.ingress, dns=True)


def _host(ip: str) -> IPNetwork:
    return ipaddress.ip_network(ip)


def _ip_tree(input_name: str, input_msg: Message, branches: Sequence[tuple[IPNetwork, matcher_pb2.Matcher]],
             on_no_match: matcher_pb2.Matcher.OnMatch) -> matcher_pb2.Matcher:
    ipm = ip_pb2.IPMatcher()
    for net, nested in branches:
        ipm.range_matchers.add(ranges=[cidr(net)], on_match=matcher_pb2.Matcher.OnMatch(matcher=nested),
                               exclusive=True)
    if not ipm.range_matchers:
        # an IP matcher needs a range: 255.255.255.255/32 is never a TCP peer
        ipm.range_matchers.add(ranges=[cidr(_host("255.255.255.255"))], on_match=on_no_match, exclusive=True)
    tree = matcher_pb2.Matcher.MatcherTree(input=typed_ext(input_name, input_msg),
                                           custom_match=typed_ext("ip-matcher", ipm))
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=on_no_match)


def egress_matcher(
    port: int,
    sources: Sequence[LocalPod],
    policy_of: Callable[[int], EndpointPolicy | None],
    prefixes: Mapping[int, Sequence[IPNetwork]],
    *,
    auth_verified: bool,
    tls: bool = False,
) -> matcher_pb2.Matcher:
    """Per local source pod, its egress decisions on `port` by destination address (`tls`: for
    TLS connections, judged by `serverNames`)."""
    branches: list[tuple[IPNetwork, matcher_pb2.Matcher]] = []
    memo: dict[int, matcher_pb2.Matcher] = {}
    for pod in sorted(sources, key=lambda p: ipaddress.ip_address(p.ip)):
        m = memo.get(pod.identity)
        if m is None:
            decisions = rbac.port_decisions(policy_of(pod.identity), port, prefixes.keys(), Direction.EGRESS)
            m = memo[pod.identity] = rbac.rbac_matcher(
                decisions, prefixes, auth_verified=auth_verified, destination=True,
                prefix=rbac.EGRESS_ACTION_PREFIX, tls=tls)
        branches.append((_host(pod.ip), m))
    deny = rbac.decision_on_match(Decision(Action.DENY, reason="not a local pod with egress HTTP rules"),
                                  prefix=rbac.EGRESS_ACTION_PREFIX)
    return _ip_tree("direct-source-ip", network_inputs_pb2.DirectSourceIPInput(), branches, deny)


def dst_ingress_matcher(
    port: int,
    destinations: Sequence[LocalPod],
    sources: Sequence[LocalPod],
    policy_of: Callable[[int], EndpointPolicy | None],
    *,
    auth_verified: bool,
    tls: bool = False,
) -> matcher_pb2.Matcher:
    """Per local destination pod with ingress HTTP rules on `port`, its decisions for the local
    pods (the only sources the egress proxy serves; `tls`: for a TLS connection, which its HTTP
    rules cannot allow)."""
    src_prefixes: dict[int, list[IPNetwork]] = {}
    for s in sources:
        src_prefixes.setdefault(s.identity, []).append(_host(s.ip))
    branches: list[tuple[IPNetwork, matcher_pb2.Matcher]] = []
    memo: dict[int, matcher_pb2.Matcher] = {}
    for pod in sorted(destinations, key=lambda p: ipaddress.ip_address(p.ip)):
        m = memo.get(pod.identity)
        if m is None:
            decisions = rbac.port_decisions(policy_of(pod.identity), port, src_prefixes.keys())
            m = memo[pod.identity] = rbac.rbac_matcher(decisions, src_prefixes, auth_verified=auth_verified, tls=tls)
        branches.append((_host(pod.ip), m))
    allow = rbac.decision_on_match(Decision(Action.ALLOW))
    return _ip_tree("destination-ip", network_inputs_pb2.DestinationIPInput(), branches, allow)


def route_configuration(port: int, egress: matcher_pb2.Matcher, dst_ingress: matcher_pb2.Matcher) -> route_pb2.RouteConfiguration:
    route = route_components_pb2.Route(
        name=EGRESS_ROUTE_NAME,
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=EGRESS_CLUSTER),
        # Where the pod connected (the accepted socket's own address), for the ORIGINAL_DST
        # cluster: whatever the pod sent in this header is replaced.
        request_headers_to_add=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=ORIGINAL_DST_HEADER, value="%DOWNSTREAM_LOCAL_ADDRESS%"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )],
        typed_per_filter_config={
            DST_INGRESS_FILTER: pack(rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(matcher=dst_ingress))),
            EGRESS_FILTER: pack(rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(matcher=egress))),
        },
    )
    vhost = route_components_pb2.VirtualHost(name="l7gate-egress", domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=route_config_name(port), virtual_hosts=[vhost])


def _hcm(port: int, access_logs: Sequence[Message]) -> hcm_pb2.HttpConnectionManager:
    # Filter-level RBAC denies everything: a route without its per-route policy fails closed.
    deny_all = pack(rbac.deny_all_rbac())
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=f"{EGRESS_LISTENER}_{port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=route_config_name(port)),
        http_filters=[
            hcm_pb2.HttpFilter(name=DST_INGRESS_FILTER, typed_config=deny_all),
            hcm_pb2.HttpFilter(name=EGRESS_FILTER, typed_config=deny_all),
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        access_log=list(access_logs),
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
    )


def tls_chain(port: int, egress: matcher_pb2.Matcher, dst_ingress: matcher_pb2.Matcher,
              tcp_access_logs: Sequence[Message] = ()) -> listener_components_pb2.FilterChain:
    """A port's chain for TLS connections (the TLS inspector saw a ClientHello), judged by
    `serverNames` without reading the bytes: two network RBAC filters (the same two sides as
    the HTTP chain's, their leaves matching the SNI), then a TCP proxy to where the pod
    connected (`resources.tls_filter_chain`)."""
    return resources.tls_filter_chain(
        f"tls-port-{port}", port,
        [(DST_INGRESS_FILTER, f"{EGRESS_LISTENER}_dst_{port}", dst_ingress),
         (EGRESS_FILTER, f"{EGRESS_LISTENER}_sni_{port}", egress)],
        EGRESS_TCP_CLUSTER, f"{EGRESS_LISTENER}_tls_{port}", tcp_access_logs,
        original_dst=True, direction="egress")


def listener(proxy_port: int, ports: Iterable[int], access_logs: Sequence[Message] = (),
             tls_chains: Sequence[listener_components_pb2.FilterChain] = ()) -> listener_pb2.Listener:
    chains = [
        listener_components_pb2.FilterChain(
            name=f"port-{p}",
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                destination_port=wrappers_pb2.UInt32Value(value=p)),
            filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(_hcm(p, access_logs)))],
        )
        for p in sorted(ports)
    ]
    listener_filters = [listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.original_src",
        typed_config=pack(original_src_pb2.OriginalSrc(mark=PROXY_UPSTREAM_MARK)),
    )]
    if tls_chains:
        listener_filters.append(resources.tls_inspector())
    return listener_pb2.Listener(
        name=EGRESS_LISTENER,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ANY_ADDRESS, port_value=proxy_port)),
        # The kernel assigns connections to other addresses to this socket: it must be allowed
        # to answer from them.
        transparent=wrappers_pb2.BoolValue(value=True),
        listener_filters=listener_filters,
        filter_chains=[*chains, *tls_chains],
    )


def cluster() -> cluster_pb2.Cluster:
    """The destination the pod connected to: the downstream connection's local address, which
    the route copies into ORIGINAL_DST_HEADER (Envoy takes a connection's local address as the
    original destination only when a listener filter restored it, which needs netfilter)."""
    return cluster_pb2.Cluster(
        name=EGRESS_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=5),
        original_dst_lb_config=cluster_pb2.Cluster.OriginalDstLbConfig(
            use_http_header=True, http_header_name=ORIGINAL_DST_HEADER),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: downstream_protocol_options()},
    )


def tcp_cluster() -> cluster_pb2.Cluster:
    """The TLS chains' upstream: the destination the pod connected to, from the filter state
    the chain sets from the accepted socket's own address (`resources.ORIGINAL_DST_STATE`)."""
    return cluster_pb2.Cluster(
        name=EGRESS_TCP_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=5),
    )


# -- publishing ----------------------------------------------------------------------------------


@dataclass(slots=True)
class EgressPublisher:
    """Renders the egress listener and its routes from the local pods' policies and the
    ipcache, and hands what changed to the snapshot cache. Not thread-safe: the agent's
    reconcile loop owns it."""

    sink: ResourceSink
    node_id: str
    proxy_port: int
    access_logs: Sequence[Message] = ()
    auth_verified: bool = True
    tcp_access_logs: Sequence[Message] = ()  # the TLS chains' (one entry per connection)
    _sent: dict[str, dict[str, bytes]] = field(default_factory=dict)  # type → name → serialized
    ports: tuple[int, ...] = ()  # the ports the listener has a filter chain for, as last published
    _last_ports: tuple[int, ...] = ()

    def render(
        self,
        local_pods: Sequence[LocalPod],
        policy_of: Callable[[int], EndpointPolicy | None],
        prefixes: Mapping[int, Sequence[IPNetwork]],
    ) -> dict[str, dict[str, Message]]:
        by_port: dict[int, list[LocalPod]] = {}
        sni_ports: set[int] = set()
        for pod in local_pods:
            policy = policy_of(pod.identity)
            for p in egress_http_ports(policy):
                by_port.setdefault(p, []).append(pod)
            sni_ports |= egress_sni_ports(policy)
        out: dict[str, dict[str, Message]] = {LISTENER: {}, ROUTE: {}, CLUSTER: {}}
        if not by_port or not self.proxy_port:
            return out
        proxied = {pod: ingress_http_ports(policy_of(pod.identity)) for pod in local_pods}
        tls_chains: list[listener_components_pb2.FilterChain] = []
        for port, sources in sorted(by_port.items()):
            dsts = [p for p in local_pods if port in proxied[p]]
            em = egress_matcher(port, sources, policy_of, prefixes, auth_verified=self.auth_verified)
            im = dst_ingress_matcher(port, dsts, local_pods, policy_of, auth_verified=self.auth_verified)
            out[ROUTE][route_config_name(port)] = route_configuration(port, em, im)
            if port in sni_ports:
                # A TLS connection goes straight to its destination, never through the mTLS
                # tunnel: a rule that requires mutual authentication is not met (fail closed).
                tls_chains.append(tls_chain(
                    port, egress_matcher(port, sources, policy_of, prefixes, auth_verified=False, tls=True),
                    dst_ingress_matcher(port, dsts, local_pods, policy_of, auth_verified=False, tls=True),
                    self.tcp_access_logs))
        out[LISTENER][EGRESS_LISTENER] = listener(self.proxy_port, by_port, self.access_logs, tls_chains)
        self._last_ports = tuple(by_port)
        out[CLUSTER][EGRESS_CLUSTER] = cluster()
        if tls_chains:
            out[CLUSTER][EGRESS_TCP_CLUSTER] = tcp_cluster()
        return out

    def publish(
        self,
        local_pods: Sequence[LocalPod],
        policy_of: Callable[[int], EndpointPolicy | None],
        prefixes: Mapping[int, Sequence[IPNetwork]],
    ) -> bool:
        """Render and send what changed since the last call; whether anything was sent."""
        rendered = self.render(local_pods, policy_of, prefixes)
        # the ports with a filter chain: one route each (`route_config_name`)
        self.ports = tuple(sorted(self._last_ports)) if rendered[ROUTE] else ()
        delta = SnapshotDelta()
        changed = False
        for type_url in (CLUSTER, ROUTE, LISTENER):
            now = {name: m.SerializeToString(deterministic=True) for name, m in rendered[type_url].items()}
            before = self._sent.get(type_url, {})
            put = {name: rendered[type_url][name] for name, b in now.items() if before.get(name) != b}
            gone = [name for name in before if name not in now]
            if put:
                delta.put(type_url, put)
            if gone:
                delta.remove(type_url, gone)
            changed = changed or bool(put or gone)
            self._sent[type_url] = now
        if changed:
            self.sink.apply(self.node_id, delta)
        return changed
