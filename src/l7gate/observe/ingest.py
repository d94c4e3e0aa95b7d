"""Datapath events → flows: one typed converter per event source, one ingestion pipeline.

Theory of operation
-------------------
Every source of verdicts delivers its own typed events; each has one pure converter
`(event, IngestContext) -> tuple[Flow, ...]` that raises `MalformedEvent` (or anything else) on
input it cannot read. Today there is one source:

- ``als``: Envoy's HTTP access log entries (`envoy.data.accesslog.v3.HTTPAccessLogEntry`,
  received over gRPC by `als.AccessLogReceiver`), converted by `http_log_flows`.

The kernel datapath and mutual authentication plug in the same way, without touching the ring,
the filters, the renderers or the metrics: a ``bpf-drop`` source with a `KernelDrop` value (l7gate.records) (the
perf-ring record decoded in `redirect_bpf`: addresses, ports, drop reason code, identities)
and a converter giving one DROPPED L3_L4 flow ("Policy denied", "Authentication required", ...),
and an ``auth`` source with an `AuthEvent` (identity pair, handshake result) giving a flow whose
`auth_type` is SPIRE and, for a failed handshake, an "Authentication required" drop. Each is
registered in `Ingestor(converters=...)` and fed with `offer(source, events)`.

`Ingestor` decouples the event's producer from the conversion: `offer` (called on the gRPC
event loop, which also serves xDS) only appends the batch to a bounded queue and returns; the
ingestion thread converts, counts and publishes to the ring. A full queue refuses the batch and
counts its events as lost — the producer is never blocked. A batch is converted event by event:
an event that fails to convert is counted as malformed and skipped, the others go on.

The agent resolves addresses: `IngestContext.resolve(ip)` returns the `PeerInfo` of an address
(pod, namespace, cluster, labels, identity, whether it is a local endpoint), so this package
needs nothing from the agent.

Envoy access log entry → flows (`http_log_flows`):

- RBAC denial (`response_code_details` is `rbac_access_denied_matched_policy[<action>]`): one
  DROPPED L7 flow. The action name says why: `deny-l7|…` "Policy denied (L7)", `deny-l3l4|…`
  "Policy denied" (an L3/L4 verdict, made in Envoy in loopback mode), `deny-auth|…`
  "Authentication required", anything else (the filter-level deny-all of a route with no
  policy yet) "Policy denied". `policy_match` is the action's policy list.
- A request that passed policy gives a REQUEST flow (FORWARDED, summary `METHOD URL`) and a
  RESPONSE flow (`is_reply`, latency = time to the first upstream response byte). The
  response is FORWARDED when the upstream answered (`via_upstream`), ERROR when Envoy answered
  itself after letting the request through (upstream reset, no healthy upstream, client gone:
  summary `<code> <details>`). `policy_match` comes from the RBAC filter's metadata
  (`allow|…`).
- A request refused before policy was evaluated — the 400 of path normalization (an escaped
  slash, DESIGN decision 4), or any other local reply of Envoy's with no RBAC decision — is one
  ERROR L7 flow, summary `400 path_normalization_failed`. It is not DROPPED: no policy denied
  it, the proxy refused input it will not interpret. `--verdict ERROR` finds these.

Thread-safety: `offer`, `ingest`, `stats` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..envoy_names import ORIGINAL_DST_HEADER as ORIGINAL_DST_HEADER
from ..identity.spiffe import SpiffeIDError, parse_spiffe_id
from ..records import KernelDrop
from .flow import (
    AUTH_FAILED,
    PLAINTEXT_REFUSED,
    AUTH_REQUIRED,
    AuthType,
    HTTP,
    MAX_HEADER_VALUE,
    POLICY_DENIED,
    POLICY_DENIED_L7,
    Endpoint,
    Flow,
    FlowType,
    L7Type,
    Layer7,
    TrafficDirection,
    Verdict,
    clip_url,
    safe_headers,
)
from .ring import FlowRing

log = logging.getLogger(__name__)

SOURCE_ALS = "als"
DEFAULT_MAX_PENDING = 65536


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


Converter = Callable[[Any, IngestContext], Sequence[Flow]]

SOURCE_KERNEL = "bpf-drop"
_L4 = {6: "TCP", 17: "UDP", 132: "SCTP"}


def kernel_drop_flows(event: Any, ctx: IngestContext) -> tuple[Flow, ...]:
    """One DROPPED L3_L4 flow per kernel drop."""
    if not isinstance(event, KernelDrop):
        raise MalformedEvent(f"expected a KernelDrop, got {type(event).__name__}")
    src, dst = ctx.resolve(event.saddr), ctx.resolve(event.daddr)
    # The kernel knows the identities it judged; they win over a later ipcache view.
    src = PeerInfo(event.src_identity or src.identity, src.cluster_name, src.namespace, src.pod_name,
                   src.labels, src.local)
    dst = PeerInfo(event.dst_identity or dst.identity, dst.cluster_name, dst.namespace, dst.pod_name,
                   dst.labels, dst.local)
    direction = TrafficDirection.EGRESS if event.direction == "egress" else TrafficDirection.INGRESS
    auth = AuthType.SPIRE if event.reason in (AUTH_REQUIRED, PLAINTEXT_REFUSED) else AuthType.DISABLED
    return (
        Flow(
            time=event.time_ns or ctx.now(),
            verdict=Verdict.DROPPED,
            type=FlowType.L3_L4,
            source=_endpoint(event.saddr, event.sport, src),
            destination=_endpoint(event.daddr, event.dport, dst),
            drop_reason_desc=event.reason,
            traffic_direction=direction,
            auth_type=auth,
            summary=event.reason,
            node_name=ctx.node_name,
            protocol=_L4.get(event.proto, ""),
        ),
    )


# -- Envoy access logs ---------------------------------------------------------------------------

_ENTRY_TYPE = "envoy.data.accesslog.v3.HTTPAccessLogEntry"
_RBAC_DENIED = "rbac_access_denied_matched_policy["
_RBAC_FILTER = "envoy.filters.http.rbac"
_VIA_UPSTREAM = "via_upstream"
# envoy.config.core.v3.RequestMethod and HTTPAccessLogEntry.HTTPVersion, by number.
_METHODS = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_PROTOCOLS = ("", "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3")
_DENY_REASONS = {"deny-l7": POLICY_DENIED_L7, "deny-l3l4": POLICY_DENIED, "deny-auth": AUTH_REQUIRED}
_MAX_TIME_NS = 253_402_300_799 * 1_000_000_000  # 9999-12-31T23:59:59Z: RFC 3339 ends there


def _ns(duration: Any) -> int:
    return int(duration.seconds) * 1_000_000_000 + int(duration.nanos)


def _policies(action: str) -> tuple[str, str]:
    kind, _, pols = action.partition("|")
    return kind, pols


def _rbac_action(cp: Any) -> str:
    md = cp.metadata.filter_metadata
    if _RBAC_FILTER not in md:
        return ""
    v = md[_RBAC_FILTER].fields.get("enforced_effective_policy_id")
    return v.string_value if v is not None else ""


_TLS_WORDS = (
    # (fragment of BoringSSL's error text, what it means), most specific first
    ("CERTIFICATE_EXPIRED", "certificate expired"),
    ("certificate has expired", "certificate expired"),
    ("UNKNOWN_CA", "certificate from an unknown CA (another trust domain or CA)"),
    ("unable to get local issuer", "certificate from an unknown CA (another trust domain or CA)"),
    ("CERTIFICATE_REQUIRED", "no client certificate"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no client certificate"),
    ("verify cert failed: SAN", "certificate SPIFFE ID not accepted"),
    ("SAN matcher", "certificate SPIFFE ID not accepted"),
    ("CERTIFICATE_UNKNOWN", "certificate SPIFFE ID not accepted"),
    ("CERTIFICATE_VERIFY_FAILED", "certificate verification failed"),
    ("BAD_CERTIFICATE", "certificate refused"),
    ("HANDSHAKE_FAILURE", "handshake failure"),
    ("Connection reset by peer", "the destination closed the handshake (it serves no such identity "
                                 "in this trust domain, or refused the certificate)"),
)


def tls_reason(text: str) -> str:
    """Envoy's TLS failure text (BoringSSL's error stack) in words."""
    for frag, words in _TLS_WORDS:
        if frag in text:
            return words
    return "TLS handshake failed"


def _is_tls_error(text: str) -> bool:
    return "TLS" in text or "SSL" in text or "CERTIFICATE" in text.upper()


def _tunnel_peer(cp: Any) -> int | None:
    """The l7gate identity of a client certificate (exactly one URI SAN, an identity's SPIFFE
    ID), or None: not a tunnel entry, or a certificate no identity can be read from."""
    if not cp.HasField("tls_properties"):
        return None
    uris = [s.uri for s in cp.tls_properties.peer_certificate_properties.subject_alt_name if s.uri]
    if len(uris) != 1:
        return None
    try:
        return parse_spiffe_id(uris[0])[1]
    except SpiffeIDError:
        return None


def _has_client_certificate(cp: Any) -> bool:
    """Only the mTLS tunnel listener asks for client certificates."""
    return cp.HasField("tls_properties") and any(
        s.uri for s in cp.tls_properties.peer_certificate_properties.subject_alt_name)


def _tunnel_source(xff: str, direct: str) -> str:
    """The source pod's address in a tunnelled request's X-Forwarded-For: the entry the source
    node's Envoy appended, i.e. the last one before the one this node appended (`direct`)."""
    hops = [h.strip() for h in xff.split(",") if h.strip()]
    if hops and hops[-1] == direct:
        hops.pop()
    return hops[-1] if hops else direct


def _tunnel_destination(value: str | None, addr: str, port: int) -> tuple[str, int]:
    if not value:
        return addr, port
    host, _, p = value.rpartition(":")
    return (host, int(p)) if host and p.isdigit() else (addr, port)


def _endpoint(ip: str, port: int, info: PeerInfo) -> Endpoint:
    return Endpoint(ip, port, info.identity, info.cluster_name, info.namespace, info.pod_name, info.labels)


def _check_type(entry: Any, expected: str) -> None:
    try:
        name = entry.DESCRIPTOR.full_name
    except AttributeError:
        raise MalformedEvent(f"not a protobuf message: {type(entry).__name__}") from None
    if name != expected:
        raise MalformedEvent(f"expected {expected}, got {name}")


def _downstream(cp: Any) -> tuple[Any, Any]:
    """(source, destination) socket addresses of an entry: the direct peer if Envoy logged
    it, else the remote address."""
    src_sa = cp.downstream_direct_remote_address.socket_address
    if not src_sa.address:
        src_sa = cp.downstream_remote_address.socket_address
    return src_sa, cp.downstream_local_address.socket_address


def _resolve(ctx: IngestContext, addr: str) -> PeerInfo:
    try:
        return ctx.resolve(addr)
    except ValueError as exc:
        raise MalformedEvent(f"unusable address: {exc}") from None


def _start_ns(cp: Any, ctx: IngestContext) -> int:
    st = cp.start_time
    t0 = int(st.seconds) * 1_000_000_000 + int(st.nanos) or ctx.now()
    if not 0 < t0 <= _MAX_TIME_NS:
        raise MalformedEvent(f"start_time {st.seconds}s is not a time")
    return t0


def http_log_flows(entry: Any, ctx: IngestContext) -> tuple[Flow, ...]:
    """The flows of one Envoy HTTP access log entry (see the module docstring)."""
    _check_type(entry, _ENTRY_TYPE)
    cp = entry.common_properties
    src_sa, dst_sa = _downstream(cp)
    if not src_sa.address or not dst_sa.address:
        raise MalformedEvent("entry without downstream IP addresses")
    src_addr, src_port = src_sa.address, int(src_sa.port_value)
    dst_addr, dst_port = dst_sa.address, int(dst_sa.port_value)
    req = entry.request
    tunnel_identity = _tunnel_peer(cp)
    tunnelled = _has_client_certificate(cp)
    auth = AuthType.SPIRE if tunnelled else AuthType.DISABLED
    if tunnelled:
        # Through the mTLS tunnel: the connection comes from the source node's Envoy. The
        # caller is the client certificate's identity; its address is what that Envoy
        # appended to X-Forwarded-For; the pod it reached is the original-destination header.
        src_addr, src_port = _tunnel_source(req.forwarded_for, src_addr), 0
        dst_addr, dst_port = _tunnel_destination(req.request_headers.get(ORIGINAL_DST_HEADER), dst_addr, dst_port)
    src_info, dst_info = _resolve(ctx, src_addr), _resolve(ctx, dst_addr)
    if _has_client_certificate(cp) and src_info.identity != tunnel_identity:
        # The certificate wins over the claimed address; no usable identity in it: unknown.
        src_info = PeerInfo(tunnel_identity or 0)
    src = _endpoint(src_addr, src_port, src_info)
    dst = _endpoint(dst_addr, dst_port, dst_info)
    if dst_info.local:
        direction = TrafficDirection.INGRESS
    elif src_info.local:
        direction = TrafficDirection.EGRESS
    else:
        direction = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN

    t0 = _start_ns(cp, ctx)
    resp = entry.response
    m = int(req.request_method)
    method = _METHODS[m] if 0 <= m < len(_METHODS) else ""
    p = int(entry.protocol_version)
    proto = _PROTOCOLS[p] if 0 <= p < len(_PROTOCOLS) else ""
    url = clip_url(f"{req.scheme or 'http'}://{req.authority}{req.path}")
    code = int(resp.response_code.value)
    details = resp.response_code_details
    req_headers = _request_headers(req)
    node = ctx.node_name

    if tunnelled and method == "CONNECT":
        return (_tunnel_connect_flow(entry, t0, src, dst, direction, node),)

    if details.startswith(_RBAC_DENIED):
        kind, pols = _policies(details[len(_RBAC_DENIED) :].rstrip("]"))
        reason = _DENY_REASONS.get(kind, POLICY_DENIED)
        summary = reason
        if tunnelled and tunnel_identity is None:
            n = sum(1 for x in cp.tls_properties.peer_certificate_properties.subject_alt_name if x.uri)
            summary = (f"{reason}: the client certificate names no single identity ({n} URI SANs); "
                       f"decided as an unknown peer")
        return (
            Flow(
                time=t0, verdict=Verdict.DROPPED, type=FlowType.L7, source=src, destination=dst,
                drop_reason_desc=reason,
                l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                traffic_direction=direction, policy_match=_split(pols), summary=summary,
                node_name=node, auth_type=auth,
            ),
        )

    tls_failure = cp.upstream_transport_failure_reason
    if tls_failure and _is_tls_error(tls_failure):
        # The source side of the tunnel: the destination node's Envoy refused our certificate,
        # or we refused its certificate. Nothing was sent.
        words = tls_reason(tls_failure)
        return (
            Flow(
                time=t0, verdict=Verdict.DROPPED, type=FlowType.L7, source=src, destination=dst,
                drop_reason_desc=AUTH_FAILED,
                l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                traffic_direction=direction,
                summary=f"mTLS tunnel to {cp.upstream_remote_address.socket_address.address or 'peer'} "
                        f"refused: {words} ({tls_failure[:200]})",
                node_name=node, auth_type=AuthType.SPIRE,
            ),
        )

    action = _rbac_action(cp)
    kind, pols = _policies(action)
    upstream = bool(cp.upstream_remote_address.socket_address.address)
    answered = details == _VIA_UPSTREAM or (not details and upstream and code > 0)
    if kind == "allow" or answered or upstream:
        policies = _split(pols)
        if cp.HasField("time_to_first_upstream_rx_byte"):
            latency = _ns(cp.time_to_first_upstream_rx_byte)
        elif cp.HasField("time_to_first_downstream_tx_byte"):
            latency = _ns(cp.time_to_first_downstream_tx_byte)
        else:
            latency = _ns(cp.duration)
        if not 0 <= latency <= _MAX_TIME_NS - t0:
            raise MalformedEvent(f"latency {latency} ns is not a duration")
        request = Flow(
            time=t0, verdict=Verdict.FORWARDED, type=FlowType.L7, source=src, destination=dst,
            l7=Layer7(L7Type.REQUEST, 0, HTTP(0, method, url, proto, req_headers)),
            traffic_direction=direction, policy_match=policies,
            summary=f"{method} {url}" if method else url, node_name=node, auth_type=auth,
        )
        verdict = Verdict.FORWARDED if answered else Verdict.ERROR
        response = Flow(
            time=t0 + latency, verdict=verdict, type=FlowType.L7, source=dst, destination=src,
            l7=Layer7(L7Type.RESPONSE, latency, HTTP(code, method, url, proto, _response_headers(resp))),
            traffic_direction=direction, is_reply=True, policy_match=policies,
            summary=str(code) if answered else f"{code} {details}".strip(), node_name=node, auth_type=auth,
        )
        return (request, response)

    return (
        Flow(
            time=t0, verdict=Verdict.ERROR, type=FlowType.L7, source=src, destination=dst,
            l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
            traffic_direction=direction, summary=f"{code} {details}".strip(), node_name=node, auth_type=auth,
        ),
    )


def _tunnel_connect_flow(
    entry: Any, t0: int, src: Endpoint, dst: Endpoint, direction: TrafficDirection, node: str
) -> Flow:
    """The TCP variant of the tunnel, on the destination node: one HTTP/2 CONNECT stream is one
    TCP connection of the source pod. Its flow is L3/L4 (the bytes are not HTTP): the RBAC
    verdict, and for a stream that ran, the bytes each way."""
    cp = entry.common_properties
    details = entry.response.response_code_details
    if details.startswith(_RBAC_DENIED):
        kind, pols = _policies(details[len(_RBAC_DENIED) :].rstrip("]"))
        reason = _DENY_REASONS.get(kind, POLICY_DENIED)
        why = ("the port allows this peer only certain HTTP requests; a TCP stream cannot be checked "
               "against them" if kind == "deny-l7" else reason)
        return Flow(
            time=t0, verdict=Verdict.DROPPED, type=FlowType.L3_L4, source=src, destination=dst,
            drop_reason_desc=reason, traffic_direction=direction, policy_match=_split(pols),
            summary=f"TCP through the mTLS tunnel refused: {why}" if kind != "deny-relay"
            else "TCP through the mTLS tunnel refused: not an endpoint port of this node",
            node_name=node, auth_type=AuthType.SPIRE,
        )
    _, pols = _policies(_rbac_action(cp))
    upstream = bool(cp.upstream_remote_address.socket_address.address)
    rx, tx = int(entry.request.request_body_bytes), int(entry.response.response_body_bytes)
    ok = upstream and int(entry.response.response_code.value) in (0, 200)
    return Flow(
        time=t0, verdict=Verdict.FORWARDED if ok else Verdict.ERROR, type=FlowType.L3_L4,
        source=src, destination=dst, traffic_direction=direction, policy_match=_split(pols),
        summary=(f"TCP through the mTLS tunnel: {rx} bytes in, {tx} bytes out" if ok else
                 f"TCP through the mTLS tunnel failed: {entry.response.response_code.value} {details}".strip()),
        node_name=node, auth_type=AuthType.SPIRE,
    )


def _split(pols: str) -> tuple[str, ...]:
    return tuple(p for p in pols.split(",") if p) if pols else ()


SOURCE_ALS_TCP = "als-tcp"
_TCP_ENTRY_TYPE = "envoy.data.accesslog.v3.TCPAccessLogEntry"


def tcp_log_flows(entry: Any, ctx: IngestContext) -> tuple[Flow, ...]:
    """Listener-level entries of the mTLS tunnel listener: one per connection. A connection
    whose TLS handshake failed becomes a DROPPED flow naming the reason; the others are covered
    by their HTTP entries and give no flow."""
    _check_type(entry, _TCP_ENTRY_TYPE)
    cp = entry.common_properties
    if cp.upstream_transport_failure_reason or _upstream_failed(cp.response_flags):
        return _tunnel_tcp_source_flows(cp, ctx)
    failure = cp.downstream_transport_failure_reason
    sni = cp.tls_properties.tls_sni_hostname if cp.HasField("tls_properties") else ""
    if failure:
        words = f"{tls_reason(failure)} ({failure[:200]})"
    elif cp.response_flags.no_route_found or cp.response_flags.no_filter_config_found:
        # The tunnel listener has one filter chain per local identity, chosen by SNI: none
        # for this name (another trust domain, or no such workload on this node), or no SNI.
        words = (f"server name {sni!r} names no local identity of this trust domain" if sni
                 else "no server name (SNI) sent")
    else:
        return ()
    src_sa, dst_sa = _downstream(cp)
    # Envoy 1.40 logs a connection refused in the TLS handshake without its addresses: the
    # flow then says only what was refused and why.
    src_info = _resolve(ctx, src_sa.address) if src_sa.address else PeerInfo(0)
    dst_info = _resolve(ctx, dst_sa.address) if dst_sa.address else PeerInfo(0)
    t0 = _start_ns(cp, ctx)
    return (
        Flow(
            time=t0, verdict=Verdict.DROPPED, type=FlowType.L3_L4,
            source=_endpoint(src_sa.address, int(src_sa.port_value), src_info),
            destination=_endpoint(dst_sa.address, int(dst_sa.port_value), dst_info),
            drop_reason_desc=AUTH_FAILED, auth_type=AuthType.SPIRE,
            traffic_direction=TrafficDirection.INGRESS,
            summary=f"mTLS tunnel refused the client: {words}",
            node_name=ctx.node_name, protocol="TCP",
        ),
    )


def _upstream_failed(flags: Any) -> bool:
    return bool(flags.upstream_connection_failure or flags.no_healthy_upstream
                or flags.upstream_overflow or flags.upstream_retry_limit_exceeded)


def _tunnel_tcp_source_flows(cp: Any, ctx: IngestContext) -> tuple[Flow, ...]:
    """The source node's side of the TCP variant: its egress chains log only connections the
    tunnel could not carry. Nothing of them left the node in plain text."""
    src_sa, dst_sa = _downstream(cp)
    if not src_sa.address or not dst_sa.address:
        raise MalformedEvent("entry without downstream IP addresses")
    src_info, dst_info = _resolve(ctx, src_sa.address), _resolve(ctx, dst_sa.address)
    t0 = _start_ns(cp, ctx)
    peer = cp.upstream_remote_address.socket_address.address or "the destination node"
    reason = cp.upstream_transport_failure_reason
    verdict, drop = Verdict.DROPPED, AUTH_FAILED
    if reason.startswith("tunnel_response:"):
        code = reason.partition(":")[2]
        drop = POLICY_DENIED if code == "403" else ""
        verdict = Verdict.DROPPED if code == "403" else Verdict.ERROR
        summary = (f"TCP through the mTLS tunnel to {peer}: the destination node refused the "
                   f"connection (CONNECT answered {code})")
    elif reason and _is_tls_error(reason):
        summary = f"mTLS tunnel to {peer} refused: {tls_reason(reason)} ({reason[:200]})"
    else:
        verdict, drop = Verdict.ERROR, ""
        summary = f"mTLS tunnel to {peer} failed: {reason or 'no connection'}"
    return (
        Flow(
            time=t0, verdict=verdict, type=FlowType.L3_L4,
            source=_endpoint(src_sa.address, int(src_sa.port_value), src_info),
            destination=_endpoint(dst_sa.address, int(dst_sa.port_value), dst_info),
            drop_reason_desc=drop, auth_type=AuthType.SPIRE,
            traffic_direction=TrafficDirection.EGRESS, summary=summary,
            node_name=ctx.node_name, protocol="TCP",
        ),
    )


def _request_headers(req: Any) -> tuple[tuple[str, str], ...]:
    # The two headers Envoy always logs need no sensitivity check, and come out sorted.
    known: list[tuple[str, str]] = []
    if req.user_agent:
        known.append(("user-agent", req.user_agent[:MAX_HEADER_VALUE]))
    if req.request_id:
        known.append(("x-request-id", req.request_id[:MAX_HEADER_VALUE]))
    extra = req.request_headers
    if extra:
        return safe_headers([*extra.items(), *known])
    return tuple(known)


def _response_headers(resp: Any) -> tuple[tuple[str, str], ...]:
    if not resp.response_headers:
        return ()
    return safe_headers(resp.response_headers.items())


# -- the pipeline --------------------------------------------------------------------------------

_KNOWN_METHODS = frozenset(_METHODS[1:])


def method_label(method: str) -> str:
    """A bounded label value: a client chooses the method, Prometheus must not grow with it."""
    return method if method in _KNOWN_METHODS else "OTHER"


@dataclass(slots=True)
class IngestStats:
    """Counters since start. Owned by the Ingestor; `Ingestor.stats()` returns a copy."""

    events: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    flows: dict[tuple[str, str, str], int] = field(default_factory=dict)  # verdict, type, direction
    drops: dict[str, int] = field(default_factory=dict)  # reason
    http: dict[tuple[str, str, str], int] = field(default_factory=dict)  # method, code, verdict

    def copy(self) -> IngestStats:
        return IngestStats(
            dict(self.events), dict(self.malformed), dict(self.lost), dict(self.flows),
            dict(self.drops), dict(self.http),
        )


def _inc(d: dict[Any, int], key: Any, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


class Ingestor:
    """Converts events from every source into flows and publishes them to `ring`.

    `offer` is non-blocking and bounded (`max_pending` events waiting); `ingest` converts
    synchronously in the caller's thread. `start()` runs the ingestion thread that drains what
    `offer` queued; `stop()` ends it after the queue is drained. Thread-safe.
    """

    def __init__(
        self,
        ring: FlowRing,
        ctx: IngestContext,
        *,
        converters: Mapping[str, Converter] | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.ring = ring
        self.ctx = ctx
        self.converters: dict[str, Converter] = dict(
            converters or {SOURCE_ALS: http_log_flows, SOURCE_KERNEL: kernel_drop_flows,
                           SOURCE_ALS_TCP: tcp_log_flows}
        )
        self.max_pending = max_pending
        self._stats = IngestStats()
        self._stats_lock = threading.Lock()
        self._pending: deque[tuple[str, Sequence[Any]]] = deque()
        self._pending_events = 0
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- producer side -------------------------------------------------------------------------

    def offer(self, source: str, events: Sequence[Any]) -> bool:
        """Queue `events` for the ingestion thread. False (and counted as lost) when the queue
        is full or the ingestor is stopped: the caller is never blocked."""
        n = len(events)
        if n == 0:
            return True
        with self._cond:
            if self._stopping or self._pending_events + n > self.max_pending:
                with self._stats_lock:
                    _inc(self._stats.lost, source, n)
                return False
            self._pending.append((source, events))
            self._pending_events += n
            self._cond.notify_all()  # the ingestion thread, and any `drain` waiting
        return True

    def http_access_logs(self, entries: Sequence[Any]) -> None:
        """The `AccessLogReceiver` batch sink."""
        self.offer(SOURCE_ALS, entries)

    def tcp_access_logs(self, entries: Sequence[Any]) -> None:
        """The `AccessLogReceiver` TCP batch sink."""
        self.offer(SOURCE_ALS_TCP, entries)

    # -- conversion ----------------------------------------------------------------------------

    def ingest(self, source: str, events: Iterable[Any]) -> list[Flow]:
        """Convert and publish now; returns the flows. Bad events are counted and skipped."""
        convert = self.converters.get(source)
        ctx = self.ctx
        flows: list[Flow] = []
        bad = 0
        n = 0
        for ev in events:
            n += 1
            if convert is None:
                bad += 1
                continue
            try:
                flows.extend(convert(ev, ctx))
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop ingestion
                bad += 1
                if bad == 1:
                    log.debug("%s event skipped: %s: %s", source, type(exc).__name__, exc)
        self._count(source, n, bad, flows)
        self.ring.publish(flows)
        return flows

    def _count(self, source: str, n: int, bad: int, flows: list[Flow]) -> None:
        with self._stats_lock:
            s = self._stats
            _inc(s.events, source, n)
            if bad:
                _inc(s.malformed, source, bad)
            fl, dr, ht = s.flows, s.drops, s.http
            for f in flows:
                key = (f.verdict.value, f.type.value, f.traffic_direction.value)
                fl[key] = fl.get(key, 0) + 1
                if f.drop_reason_desc:
                    dr[f.drop_reason_desc] = dr.get(f.drop_reason_desc, 0) + 1
                l7 = f.l7
                # One count per request, on the flow that ends it: the response, or the drop or
                # error that stood in for one.
                if l7 is not None and l7.http is not None and (f.is_reply or f.verdict is not Verdict.FORWARDED):
                    c = l7.http.code
                    hk = (method_label(l7.http.method), str(c) if 0 <= c <= 999 else "other", f.verdict.value)
                    ht[hk] = ht.get(hk, 0) + 1

    def stats(self) -> IngestStats:
        with self._stats_lock:
            return self._stats.copy()

    @property
    def pending(self) -> int:
        return self._pending_events

    # -- the ingestion thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l7gate-flows", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batches = list(self._pending)
                self._pending.clear()
                self._busy = True
            try:
                for source, events in batches:
                    try:
                        self.ingest(source, events)
                    except Exception:  # noqa: BLE001 - the thread must outlive any bug
                        log.exception("flow ingestion failed for a %s batch", source)
            finally:
                with self._cond:
                    self._pending_events -= sum(len(e) for _, e in batches)
                    self._busy = False
                    self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything offered so far is ingested (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
