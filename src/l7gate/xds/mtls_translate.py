"""Encryption in transit: Envoy resources for the mTLS tunnel between two l7gate nodes.

Theory of operation (docs/in-transit-mtls.md has the whole design). Traffic under an
auth-required rule from pod S (identity s, node A) to pod D (identity d, node B, ip:port) goes:

    S ──plain──▶ A's Envoy: egress listener on D's ip:port (transparent; the kernel redirects)
                  route: source address → cluster l7g_tunnel_<B>_<s>_<d>,
                         sets x-envoy-original-dst-host = D's ip:port (OVERWRITE)
       ──mTLS──▶ B's Envoy: tunnel listener on B's node address, port 15443
                  filter chain per local identity, chosen by SNI "<d>.<trust-domain>",
                  presents d's SVID, requires a client certificate under the trust bundle
                  route RBAC: x-envoy-original-dst-host must be one of B's local ip:ports
                         (else: an open relay), then the client certificate's URI SAN → that
                         endpoint port's decision for the peer identity (the HTTP rules)
                  cluster: ORIGINAL_DST, use_http_header → D's ip:port
       ──plain──▶ D (on B, never leaves the node)

Who presents which SVID. The source Envoy presents s's SVID (the *source workload's*) and
accepts only a server certificate whose URI SAN is d's SPIFFE ID (the *destination
workload's*): the client names d in the SNI (``<d>.<trust-domain>``, the format of the
mutual-auth handshake) and the destination Envoy selects d's filter chain and certificate by it.
A client certificate and a server identity are properties of an Envoy cluster (and of its
connection pool), so there is one tunnel cluster per (destination node, source identity,
destination identity): an upstream connection authenticated as s never carries another
identity's requests, and one that proved d never carries requests for another identity.

SDS secrets are named after SPIFFE IDs: ``spiffe://TD/identity/N`` holds N's certificate chain
and key, ``spiffe://TD`` (the trust domain's own ID) the trust bundle as a validation context.
Both are served over ADS from the agent's snapshot cache; a rotation is an SDS update of one
secret, which Envoy applies to new handshakes without touching listeners or connections.

Constant-time lookups. The tunnel route's RBAC is one unified matcher, sent per route over RDS:

    HttpRequestHeaderMatchInput(x-envoy-original-dst-host) ─ exact_match_map (hash)
       ├─ "10.0.1.5:8080" → UriSanInput (the peer certificate's URI SAN) ─ exact_match_map
       │      ├─ "spiffe://TD/identity/7" → decision for identity 7 (leaf or HTTP rules)
       │      └─ on_no_match → the port's default (world's) decision
       ├─ "10.0.1.5:9090" → ...
       └─ on_no_match → DENY "deny-relay" (not a local endpoint port: refuse to forward)

Leaves are `rbac.decision_on_match` with ``auth_verified=True``: the certificate proved
the identity, so auth-required decisions are satisfied here (``test-always-fail`` still fails).
A header with two values, or a certificate with two URI SANs, is read as the values joined by a
comma, which is no key of either map: the request falls to the refusing / default branch.

Names (`*_name` functions) are stable so the publisher can diff by name. Everything here is a
pure function of its arguments returning protobuf messages: no I/O, and no import of
`l7gate.mtls` (the layer contract): SVIDs arrive as PEM bytes or strings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2
from envoy.config.core.v3 import extension_pb2 as core_extension_pb2
from envoy.config.core.v3 import socket_option_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_header_mutation_pb2,
)
from envoy.extensions.matching.common_inputs.ssl.v3 import ssl_inputs_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.matcher.v3 import string_pb2 as envoy_string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.type.matcher.v3 import matcher_pb2

# The headers between the Envoys (PROTOCOL_HEADER: node A sets it from %PROTOCOL%, overwriting
# what the pod sent; node B routes on it and removes it) are defined in l7gate.envoy_names.
from ..envoy_names import FORWARDED_FOR_HEADER as FORWARDED_FOR_HEADER
from ..envoy_names import HTTP_PROTOCOL_OPTIONS
from ..envoy_names import ORIGINAL_DST_HEADER as ORIGINAL_DST_HEADER
from ..envoy_names import PROTOCOL_HEADER as PROTOCOL_HEADER
from ..envoy_names import SOURCE_HEADER as SOURCE_HEADER
from ..identity.spiffe import server_name, spiffe_id, trust_domain_id
from ..policy.mapstate import Action, Decision
from . import rbac, resources
from .pb import ads, pack, typed_ext
from ..policy.httpverdict import named_policies

DEFAULT_TUNNEL_PORT = 15443
DEFAULT_MAX_CONNECTION_DURATION = 300.0  # seconds a tunnel connection lives, then drains
TUNNEL_LISTENER = "l7g_tunnel_in"
TUNNEL_ROUTE = "l7g_tunnel_rc"
ORIGINAL_DST_CLUSTER = "l7g_tunnel_origdst"
#: The same, speaking HTTP/2 (h2c) to the pod: for requests that came to node A as HTTP/2.
ORIGINAL_DST_H2_CLUSTER = "l7g_tunnel_origdst_h2"
TLS_TRANSPORT = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
# Never a valid ip:port nor a SPIFFE ID: keeps an exact_match_map non-empty (Envoy requires one
# entry) without matching anything.
_NEVER = "-"


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _socket(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
    )


# -- names ---------------------------------------------------------------------------------------


def svid_secret_name(trust_domain: str, identity: int) -> str:
    """The SDS name of an identity's certificate and key: its SPIFFE ID."""
    return spiffe_id(trust_domain, identity)


def bundle_secret_name(trust_domain: str) -> str:
    """The SDS name of the trust bundle (a validation context): the trust domain's SPIFFE ID."""
    return trust_domain_id(trust_domain)


def host_port(ip: str, port: int) -> str:
    """The canonical ``ip:port`` (``[v6]:port``) carried in x-envoy-original-dst-host."""
    addr = ipaddress.ip_address(ip)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def tunnel_cluster_name(node: str, src_identity: int, dst_identity: int) -> str:
    return f"l7g_tunnel_{node}_{src_identity}_{dst_identity}"


def egress_listener_name(ip: str, port: int) -> str:
    return f"l7g_eg_{ip}_{port}"


def egress_route_name(ip: str, port: int) -> str:
    return f"l7g_egr_{ip}_{port}"


# -- secrets (SDS) -------------------------------------------------------------------------------


def _pem(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def svid_secret(
    trust_domain: str, identity: int, chain_pem: bytes | str, key_pem: bytes | str
) -> secret_pb2.Secret:
    """An identity's SVID as an SDS secret (chain = leaf + intermediates, never the root).

    Carries the private key: serve it only over the node-local ADS endpoint."""
    return secret_pb2.Secret(
        name=svid_secret_name(trust_domain, identity),
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=_pem(chain_pem)),
            private_key=base_pb2.DataSource(inline_bytes=_pem(key_pem)),
        ),
    )


def bundle_secret(trust_domain: str, bundle_pem: bytes | str) -> secret_pb2.Secret:
    """The trust bundle (one or more CA certificates, PEM) as an SDS validation context."""
    return secret_pb2.Secret(
        name=bundle_secret_name(trust_domain),
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=_pem(bundle_pem))
        ),
    )


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads())


def _uri_san(matcher: envoy_string_pb2.StringMatcher) -> common_pb2.SubjectAltNameMatcher:
    return common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=matcher
    )


def _common_tls(
    trust_domain: str,
    own_identity: int,
    peer_san: envoy_string_pb2.StringMatcher,
    alpn: Sequence[str],
) -> tls_pb2.CommonTlsContext:
    tls13 = common_pb2.TlsParameters.TLSv1_3
    return tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=tls13, tls_maximum_protocol_version=tls13
        ),
        tls_certificate_sds_secret_configs=[_sds(svid_secret_name(trust_domain, own_identity))],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=[_uri_san(peer_san)]
            ),
            validation_context_sds_secret_config=_sds(bundle_secret_name(trust_domain)),
        ),
        alpn_protocols=list(alpn),
    )


# -- source node -------------------------------------------------------------------------------


def tunnel_cluster(
    node: str,
    node_ip: str,
    trust_domain: str,
    src_identity: int,
    dst_identity: int,
    tunnel_port: int = DEFAULT_TUNNEL_PORT,
    *,
    connect_timeout: float = 1.0,
    max_connection_duration: float = DEFAULT_MAX_CONNECTION_DURATION,
) -> cluster_pb2.Cluster:
    """The source side of a tunnel: the destination node's tunnel port, over TLS 1.3 presenting
    `src_identity`'s SVID, asking for (SNI) and accepting only `dst_identity`'s SVID under the
    trust bundle. HTTP/2 to the peer Envoy, so one connection multiplexes many requests."""
    tls = tls_pb2.UpstreamTlsContext(
        sni=server_name(trust_domain, dst_identity),
        common_tls_context=_common_tls(
            trust_domain,
            src_identity,
            envoy_string_pb2.StringMatcher(exact=spiffe_id(trust_domain, dst_identity)),
            ["h2"],
        ),
    )
    name = tunnel_cluster_name(node, src_identity, dst_identity)
    h2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        ),
        # TLS checks certificates at the handshake only: bound how long a pooled connection
        # outlives the SVIDs it was opened with (it drains, then a new handshake is made).
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            max_connection_duration=_duration(max_connection_duration)
        ),
    )
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket(node_ip, tunnel_port))
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_duration(connect_timeout),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[lb])],
        ),
        transport_socket=base_pb2.TransportSocket(name=TLS_TRANSPORT, typed_config=pack(tls)),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: pack(h2)},
    )


EGRESS_RBAC_FILTER = "l7g.egress"  # the source pods' own egress HTTP rules (docs/egress-http.md)


# A source without egress HTTP rules of its own (an allow, no policy names).
_ALLOW_ALL = matcher_pb2.Matcher(on_no_match=rbac.decision_on_match(Decision(Action.ALLOW),
                                                                    prefix=rbac.EGRESS_ACTION_PREFIX))


def _egress_rbac(matcher: matcher_pb2.Matcher) -> dict[str, any_pb2.Any]:
    return {EGRESS_RBAC_FILTER: pack(rbac_http_pb2.RBACPerRoute(rbac=rbac_http_pb2.RBAC(matcher=matcher)))}


def _route_action(name: str, cluster: str, dst: str, egress: matcher_pb2.Matcher | None = None) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=cluster),
        # The pod cannot choose where the destination node forwards: whatever it sent is
        # replaced by the address the kernel redirected.
        request_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=ORIGINAL_DST_HEADER, value=dst),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            ),
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=PROTOCOL_HEADER, value="%PROTOCOL%"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            ),
        ],
        request_headers_to_remove=[SOURCE_HEADER],
        typed_per_filter_config=_egress_rbac(egress) if egress is not None else None,
    )


def _refuse(name: str, egress: bool = False) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(status=403),
        typed_per_filter_config=_egress_rbac(_ALLOW_ALL) if egress else None,
    )


def egress_route(
    dst_ip: str, dst_port: int, clusters_by_source: Mapping[str, Iterable[str]],
    egress_rbac: Mapping[str, matcher_pb2.Matcher] | None = None,
) -> route_pb2.RouteConfiguration:
    """The route of the egress listener for one remote (pod ip, port).

    The tunnel cluster is chosen by the connection's source address: `clusters_by_source` maps
    each local source identity's `tunnel_cluster` name to its pods' addresses. A route table
    may only match request headers, so the egress listener copies the peer address into
    `SOURCE_HEADER` before routing (an early header mutation that overwrites whatever the pod
    sent) and the virtual host looks it up in a hash map: constant time, and all of it RDS, so
    a local pod appearing is an RDS update, never a listener drain. A source no entry covers
    gets a local 403: its traffic must not leave in plain text, and no certificate may be
    presented on its behalf.

    `egress_rbac` (by tunnel cluster name): the egress HTTP rules of that source identity, for
    the listener's EGRESS_RBAC_FILTER; given, every route carries a matcher (allow-all for a
    source without such rules), as the filter's own default denies."""
    dst = host_port(dst_ip, dst_port)
    by_addr: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    for cluster, addrs in sorted(clusters_by_source.items()):
        for a in addrs:
            key = str(ipaddress.ip_address(a))  # the spelling Envoy's formatter uses
            if key in by_addr:
                raise ValueError(f"source address {key} is listed under two tunnel clusters")
            egress = None if egress_rbac is None else egress_rbac.get(cluster, _ALLOW_ALL)
            by_addr[key] = matcher_pb2.Matcher.OnMatch(
                action=typed_ext("route", _route_action(cluster, cluster, dst, egress))
            )
    refuse = matcher_pb2.Matcher.OnMatch(action=typed_ext("route", _refuse("no-tunnel", egress_rbac is not None)))
    if not by_addr:
        by_addr[_NEVER] = refuse
    tree = matcher_pb2.Matcher.MatcherTree(
        input=typed_ext("source", http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=SOURCE_HEADER)),
        exact_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(
            map=dict(sorted(by_addr.items()))
        ),
    )
    vhost = route_components_pb2.VirtualHost(
        name="l7gate",
        domains=["*"],
        matcher=matcher_pb2.Matcher(matcher_tree=tree, on_no_match=refuse),
    )
    return route_pb2.RouteConfiguration(name=egress_route_name(dst_ip, dst_port), virtual_hosts=[vhost])


def _source_header_mutation() -> core_extension_pb2.TypedExtensionConfig:
    """Before the route is chosen: SOURCE_HEADER := the peer's address, whatever the pod sent."""
    set_source = mutation_rules_pb2.HeaderMutation(
        append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(
                key=SOURCE_HEADER, value="%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"
            ),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )
    return core_extension_pb2.TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation",
        typed_config=pack(early_header_mutation_pb2.HeaderMutation(mutations=[set_source])),
    )


def _normalizing_hcm(
    stat_prefix: str, rds_name: str, filters: Sequence[hcm_pb2.HttpFilter], access_logs: Sequence[Message]
) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=rds_name),
        http_filters=list(filters),
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        access_log=list(access_logs),
    )


def tcp_tunnel_chains(
    dst_ip: str,
    dst_port: int,
    cluster: str,
    sources: Iterable[str],
    *,
    access_logs: Sequence[Message] = (),
) -> list[listener_components_pb2.FilterChain]:
    """The TCP variant of the source side, for one local source identity: connections from
    its pods (`sources`, chosen by source address) are carried as one HTTP/2 CONNECT stream
    each over `cluster` (the identity's tunnel cluster: its SVID, the destination's SNI).

    One filter chain per source address: a pod appearing or leaving adds or removes its own
    chain, and Envoy drains only that one (the other pods' open connections stay).

    The CONNECT request names the destination in its authority and, like the HTTP variant, in
    x-envoy-original-dst-host (node B routes and checks by the header); X-Forwarded-For
    carries the pod's address for node B's flows. The pod sends only bytes: it can set
    neither."""
    dst = host_port(dst_ip, dst_port)
    proxy = tcp_proxy_pb2.TcpProxy(
        stat_prefix=f"{egress_listener_name(dst_ip, dst_port)}_tcp",
        cluster=cluster,
        tunneling_config=tcp_proxy_pb2.TcpProxy.TunnelingConfig(
            hostname=dst,
            headers_to_add=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=ORIGINAL_DST_HEADER, value=dst),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                ),
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(
                        key=FORWARDED_FOR_HEADER, value="%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"
                    ),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                ),
            ],
        ),
        access_log=list(access_logs),
    )
    filters = [listener_components_pb2.Filter(name=TCP_PROXY_FILTER, typed_config=pack(proxy))]
    chains = []
    for a in sorted({str(ipaddress.ip_address(x)) for x in sources}):
        addr = ipaddress.ip_address(a)
        match = listener_components_pb2.FilterChainMatch(source_prefix_ranges=[address_pb2.CidrRange(
            address_prefix=a, prefix_len=wrappers_pb2.UInt32Value(value=addr.max_prefixlen))])
        chains.append(listener_components_pb2.FilterChain(
            name=f"tcp-{a}", filter_chain_match=match, filters=filters))
    return chains


def egress_listener(
    ip: str,
    port: int,
    *,
    transparent: bool = True,
    bind: tuple[str, int] | None = None,
    access_logs: Sequence[Message] = (),
    tcp_chains: Sequence[listener_components_pb2.FilterChain] = (),
    egress_rules: bool = False,
) -> listener_pb2.Listener:
    """The source node's listener for one remote (pod ip, port) under an auth-required rule.

    In production it is transparent on the remote pod's own address: the kernel redirects the
    local pod's connection to it. `bind` overrides the address it listens on (tests: a plain
    127.x address with ``transparent=False``); names stay keyed by the remote ip:port.
    No RBAC here: the destination decides; this Envoy only encrypts and names the destination —
    unless a source has egress HTTP rules towards it (`egress_rules`): then an RBAC filter whose
    matcher comes per route (`egress_route`'s `egress_rbac`) applies them first.

    `tcp_chains` (`tcp_tunnel_chains`) carry the sources whose decision is an L3/L4 allow as
    raw TCP; they match by source address, so they win over the HTTP chain, which has no
    match and takes every other source (an unknown one gets its local 403).
    """
    name = egress_listener_name(ip, port)
    router = hcm_pb2.HttpFilter(name=resources.ROUTER_FILTER, typed_config=pack(router_pb2.Router()))
    filters = [router]
    if egress_rules:
        # the filter's own default denies: a route without its matcher fails closed
        filters.insert(0, hcm_pb2.HttpFilter(name=EGRESS_RBAC_FILTER, typed_config=pack(rbac.deny_all_rbac())))
    hcm = _normalizing_hcm(name, egress_route_name(ip, port), filters, access_logs)
    hcm.early_header_mutation_extensions.append(_source_header_mutation())
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=resources.HCM_FILTER, typed_config=pack(hcm))]
    )
    bind_ip, bind_port = bind if bind is not None else (ip, port)
    return listener_pb2.Listener(
        name=name,
        address=_socket(bind_ip, bind_port),
        filter_chains=[*tcp_chains, chain],
        transparent=wrappers_pb2.BoolValue(value=True) if transparent else None,
    )


# -- destination node ----------------------------------------------------------------------------


def tunnel_listener(
    ip: str,
    trust_domain: str,
    local_identities: Collection[int],
    port: int = DEFAULT_TUNNEL_PORT,
    *,
    access_logs: Sequence[Message] = (),
    listener_access_logs: Sequence[Message] = (),
) -> listener_pb2.Listener:
    """The destination node's mTLS listener: one filter chain per local identity, selected by
    SNI ``<identity>.<trust-domain>``, presenting that identity's SVID and requiring a client
    certificate that chains to the bundle and carries a URI SAN of the trust domain. A
    connection with no SNI, another SNI or no valid client certificate never reaches HTTP.

    Changes only when the set of local identities changes (an LDS update that leaves other
    chains' connections alone); policy changes go to the tunnel route (RDS)."""
    if not local_identities:
        raise ValueError("a tunnel listener needs at least one local identity (omit it instead)")
    td_prefix = envoy_string_pb2.StringMatcher(prefix=f"{trust_domain_id(trust_domain)}/identity/")
    chains = []
    for ident in sorted(set(local_identities)):
        hcm = resources.http_connection_manager(TUNNEL_LISTENER, TUNNEL_ROUTE, access_logs)
        # The pod learns the caller's SPIFFE ID; whatever a client sent in XFCC is dropped.
        hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        hcm.set_current_client_cert_details.uri = True
        # The TCP variant arrives as HTTP/2 CONNECT; only the route's CONNECT entry accepts
        # it, under its own RBAC (`tunnel_route`).
        hcm.http2_protocol_options.allow_connect = True
        hcm.upgrade_configs.append(hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT"))
        tls = tls_pb2.DownstreamTlsContext(
            require_client_certificate=wrappers_pb2.BoolValue(value=True),
            require_sni=wrappers_pb2.BoolValue(value=True),
            # Every connection verifies a certificate in full: a resumed session would carry a
            # certificate checked hours ago, perhaps expired or of a since-rotated key.
            disable_stateless_session_resumption=True,
            disable_stateful_session_resumption=True,
            common_tls_context=_common_tls(trust_domain, ident, td_prefix, ["h2", "http/1.1"]),
        )
        chains.append(
            listener_components_pb2.FilterChain(
                name=f"identity-{ident}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    server_names=[server_name(trust_domain, ident)], transport_protocol="tls"
                ),
                filters=[listener_components_pb2.Filter(name=resources.HCM_FILTER, typed_config=pack(hcm))],
                transport_socket=base_pb2.TransportSocket(name=TLS_TRANSPORT, typed_config=pack(tls)),
            )
        )
    return listener_pb2.Listener(
        name=TUNNEL_LISTENER,
        address=_socket(ip, port),
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
            )
        ],
        filter_chains=chains,
        # One entry per connection when it closes, with the TLS failure reason if the
        # handshake failed: refused certificates never reach HTTP, so only this records them.
        access_log=list(listener_access_logs),
    )


SOL_SOCKET = 1
SO_MARK = 36


def original_dst_cluster(
    *, connect_timeout: float = 1.0, socket_mark: int | None = None, http2: bool = False
) -> cluster_pb2.Cluster:
    """Forwards to the address in x-envoy-original-dst-host (a local pod). Only requests the
    tunnel route's RBAC let through get here, so the header names a local endpoint port.
    `http2`: the ORIGINAL_DST_H2_CLUSTER, which speaks h2c to the pod (PROTOCOL_HEADER).

    `socket_mark` sets SO_MARK on the connections to the pods (Envoy needs CAP_NET_ADMIN): the
    mark by which the destination's kernel tells "delivered by the local tunnel" from plaintext
    that arrived from another node (docs/in-transit-mtls.md, "The kernel's part")."""
    cluster = cluster_pb2.Cluster(
        name=ORIGINAL_DST_H2_CLUSTER if http2 else ORIGINAL_DST_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=_duration(connect_timeout),
        original_dst_lb_config=cluster_pb2.Cluster.OriginalDstLbConfig(
            use_http_header=True, http_header_name=ORIGINAL_DST_HEADER
        ),
    )
    if http2:
        h2 = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(h2))
    if socket_mark is not None:
        cluster.upstream_bind_config.socket_options.append(
            socket_option_pb2.SocketOption(
                description="l7gate tunnel delivery mark",
                level=SOL_SOCKET,
                name=SO_MARK,
                int_value=socket_mark,
                state=socket_option_pb2.SocketOption.STATE_PREBIND,
            )
        )
    return cluster


def _deny(name: str) -> matcher_pb2.Matcher.OnMatch:
    act = rbac_config_pb2.Action(name=name, action=rbac_config_pb2.RBAC.Action.DENY)
    return matcher_pb2.Matcher.OnMatch(action=typed_ext("rbac-action", act))


def _connect_on_match(d: Decision) -> matcher_pb2.Matcher.OnMatch:
    """A decision for a CONNECT (the TCP variant): raw bytes pass only where the peer may send
    anything (an L3/L4 allow). HTTP rules cannot be checked inside a byte stream, so a port
    the peer may reach only with certain requests refuses CONNECT ("deny-l7")."""
    if d.action is Action.HTTP:
        return _deny(f"deny-l7|{named_policies(d)}")
    return rbac.decision_on_match(d, auth_verified=True)


def identity_matcher(
    trust_domain: str, decisions: rbac.PortDecisions, *, connect: bool = False
) -> matcher_pb2.Matcher.OnMatch:
    """One local endpoint port's decisions keyed by the peer certificate's URI SAN (`connect`:
    as they apply to a CONNECT stream, `_connect_on_match`).

    Identities whose decision equals world's are not listed: they fall to on_no_match, which
    is world's decision (as an unknown source address does in `rbac.rbac_matcher`)."""
    def leaf(d: Decision) -> matcher_pb2.Matcher.OnMatch:
        return _connect_on_match(d) if connect else rbac.decision_on_match(d, auth_verified=True)

    default = leaf(decisions.world)
    if not decisions.peers:
        return default
    by_san = {spiffe_id(trust_domain, ident): leaf(d) for ident, d in decisions.peers.items()}
    tree = matcher_pb2.Matcher.MatcherTree(
        input=typed_ext("uri-san", ssl_inputs_pb2.UriSanInput()),
        exact_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(map=by_san),
    )
    return matcher_pb2.Matcher.OnMatch(
        matcher=matcher_pb2.Matcher(matcher_tree=tree, on_no_match=default)
    )


def tunnel_matcher(
    trust_domain: str, by_destination: Mapping[tuple[str, int], rbac.PortDecisions], *, connect: bool = False
) -> matcher_pb2.Matcher:
    """The tunnel route's RBAC matcher: the destination (x-envoy-original-dst-host) must be a
    local endpoint port, then the peer identity from the client certificate picks that port's
    decision. `by_destination` maps each local (pod ip, port) reachable through the tunnel to
    `rbac.port_decisions(...)` for it. `connect`: the CONNECT route's matcher (the TCP
    variant). Deterministic: equal inputs, identical bytes."""
    by_dst = {
        host_port(ip, port): identity_matcher(trust_domain, d, connect=connect)
        for (ip, port), d in sorted(by_destination.items())
    }
    if not by_dst:
        by_dst[_NEVER] = _deny("deny-relay|")
    tree = matcher_pb2.Matcher.MatcherTree(
        input=typed_ext(
            "original-dst",
            http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=ORIGINAL_DST_HEADER),
        ),
        exact_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(map=by_dst),
    )
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=_deny("deny-relay|"))


def tunnel_route(
    matcher: matcher_pb2.Matcher, connect_matcher: matcher_pb2.Matcher | None = None
) -> route_pb2.RouteConfiguration:
    """The tunnel listener's route: everything to the ORIGINAL_DST cluster, under `matcher`
    as RBACPerRoute (a policy change is an RDS update that reaches the next request).

    CONNECT requests (the TCP variant) match only the first route, which terminates them and
    relays the stream's bytes to the pod, under `connect_matcher` (`tunnel_matcher(...,
    connect=True)`; none: every CONNECT is refused)."""
    rc = resources.route_configuration(TUNNEL_ROUTE, ORIGINAL_DST_CLUSTER, matcher)
    vhost = rc.virtual_hosts[0]
    http1 = vhost.routes[0]
    # The HTTP routes share one RBAC config at the virtual host (the CONNECT route overrides it
    # with its own): the h2 route adds no second copy of the decisions to the RDS resource.
    vhost.typed_per_filter_config[resources.RBAC_FILTER].CopyFrom(http1.typed_per_filter_config[resources.RBAC_FILTER])
    del http1.typed_per_filter_config[resources.RBAC_FILTER]
    http1.request_headers_to_remove.append(PROTOCOL_HEADER)
    h2 = route_components_pb2.Route()
    h2.CopyFrom(http1)
    h2.name = "l7gate-h2"
    h2.route.cluster = ORIGINAL_DST_H2_CLUSTER
    h2.match.headers.append(route_components_pb2.HeaderMatcher(
        name=PROTOCOL_HEADER, string_match=envoy_string_pb2.StringMatcher(exact="HTTP/2")))
    vhost.routes.insert(0, h2)
    per_route = rbac_http_pb2.RBACPerRoute(
        rbac=rbac_http_pb2.RBAC(matcher=connect_matcher if connect_matcher is not None else _deny_all_connect())
    )
    connect = route_components_pb2.Route(
        name="l7gate-connect",
        match=route_components_pb2.RouteMatch(
            connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher()
        ),
        route=route_components_pb2.RouteAction(
            cluster=ORIGINAL_DST_CLUSTER,
            upgrade_configs=[
                route_components_pb2.RouteAction.UpgradeConfig(
                    upgrade_type="CONNECT",
                    connect_config=route_components_pb2.RouteAction.UpgradeConfig.ConnectConfig(),
                )
            ],
        ),
        typed_per_filter_config={resources.RBAC_FILTER: pack(per_route)},
    )
    # The HTTP routes never upgrade to CONNECT (a CONNECT cannot match a path route anyway).
    for r in vhost.routes:
        r.route.upgrade_configs.append(
            route_components_pb2.RouteAction.UpgradeConfig(
                upgrade_type="CONNECT", enabled=wrappers_pb2.BoolValue(value=False)
            )
        )
    vhost.routes.insert(0, connect)
    return rc


def _deny_all_connect() -> matcher_pb2.Matcher:
    return tunnel_matcher("", {}, connect=True)


# -- bundles for the publisher -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelIngress:
    """The destination node's side: one listener, one route, two clusters (fixed names)."""

    listener: listener_pb2.Listener
    route: route_pb2.RouteConfiguration
    clusters: tuple[cluster_pb2.Cluster, ...]  # to the pods: HTTP/1.1 and h2c (PROTOCOL_HEADER)


def tunnel_ingress(
    node_ip: str,
    trust_domain: str,
    by_destination: Mapping[tuple[str, int], rbac.PortDecisions],
    local_identities: Collection[int],
    port: int = DEFAULT_TUNNEL_PORT,
    *,
    access_logs: Sequence[Message] = (),
    listener_access_logs: Sequence[Message] = (),
    socket_mark: int | None = None,
) -> TunnelIngress:
    """Everything the destination node's Envoy needs except the secrets: add `svid_secret` for
    each of `local_identities` and `bundle_secret` to the same snapshot (SDS names:
    `svid_secret_name`, `bundle_secret_name`)."""
    return TunnelIngress(
        tunnel_listener(node_ip, trust_domain, local_identities, port, access_logs=access_logs,
                        listener_access_logs=listener_access_logs),
        tunnel_route(
            tunnel_matcher(trust_domain, by_destination),
            tunnel_matcher(trust_domain, by_destination, connect=True),
        ),
        (original_dst_cluster(socket_mark=socket_mark), original_dst_cluster(socket_mark=socket_mark, http2=True)),
    )


@dataclass(frozen=True, slots=True)
class TunnelEgress:
    """The source node's side for one remote (pod ip, port): its listener and route, and the
    tunnel clusters the route names (one per local source identity)."""

    listener: listener_pb2.Listener
    route: route_pb2.RouteConfiguration
    clusters: tuple[cluster_pb2.Cluster, ...]


@dataclass(frozen=True, slots=True)
class RemotePort:
    """A remote endpoint port reached through the tunnel: where it is and whose it is."""

    ip: str
    port: int
    identity: int  # the destination workload's identity (the server certificate it must show)
    node: str  # the destination node's name (only used in cluster names)
    node_ip: str
    tunnel_port: int = DEFAULT_TUNNEL_PORT


def tunnel_egress(
    remote: RemotePort,
    trust_domain: str,
    sources: Mapping[int, Iterable[str]],
    *,
    transparent: bool = True,
    bind: tuple[str, int] | None = None,
    access_logs: Sequence[Message] = (),
    tcp_sources: Collection[int] = (),
    tcp_access_logs: Sequence[Message] = (),
    egress_http: Mapping[int, Decision] | None = None,
) -> TunnelEgress:
    """The source node's resources for one remote port. `sources` maps each local identity
    that may send there (under an auth-required rule) to its local pod addresses; each gets its own
    tunnel cluster, presenting its own SVID. `bind` overrides where the listener binds
    (tests); the route and header always carry `remote`'s ip:port.

    Identities in `tcp_sources` (their decision is an L3/L4 allow: any bytes, not only HTTP)
    take the TCP variant: one CONNECT stream per connection, through the same cluster.

    Add `svid_secret` for each source identity and `bundle_secret` to the same snapshot."""
    clusters = {
        ident: tunnel_cluster(
            remote.node, remote.node_ip, trust_domain, ident, remote.identity, remote.tunnel_port
        )
        for ident in sorted(sources)
    }
    owner: dict[str, int] = {}
    for i in sorted(sources):
        for a in sources[i]:
            key = str(ipaddress.ip_address(a))
            if owner.setdefault(key, i) != i:
                raise ValueError(f"source address {key} is listed under identities {owner[key]} and {i}")
    rbac_by_cluster = None
    if egress_http:
        rbac_by_cluster = {
            clusters[i].name: matcher_pb2.Matcher(on_no_match=rbac.decision_on_match(
                d, auth_verified=True, prefix=rbac.EGRESS_ACTION_PREFIX))
            for i, d in egress_http.items() if i in clusters
        }
    route = egress_route(
        remote.ip, remote.port,
        {clusters[i].name: nets for i, nets in sources.items() if i not in tcp_sources},
        rbac_by_cluster,
    )
    chains = [
        chain
        for i in sorted(sources) if i in tcp_sources
        for chain in tcp_tunnel_chains(remote.ip, remote.port, clusters[i].name, sources[i],
                                       access_logs=tcp_access_logs)
    ]
    lst = egress_listener(
        remote.ip, remote.port, transparent=transparent, bind=bind, access_logs=access_logs,
        tcp_chains=chains, egress_rules=bool(egress_http),
    )
    return TunnelEgress(lst, route, tuple(clusters.values()))
