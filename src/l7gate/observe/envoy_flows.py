"""Envoy access logs → flows: the ``als`` source (`http_log_flows`, one
`envoy.data.accesslog.v3.HTTPAccessLogEntry` per request) and the ``als-tcp`` source
(`tcp_log_flows`, one `TCPAccessLogEntry` per connection of the mTLS tunnel listener), both
received over gRPC by `als.AccessLogReceiver`.

Envoy HTTP access log entry → flows (`http_log_flows`):

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

Ingestion does not build an HTTP entry's flows: `http_log_record` decides them (everything the
list above depends on, and every reason the entry is malformed) into an `HTTPLogRecord`, which
builds them when they are read — most never are — and writes their stream lines without
building them. `http_log_flows` builds them at once. A request through the mTLS tunnel (a
client certificate naming one identity) is a record too, with its peers read from the tunnel
(`_tunnel_source`, `_tunnel_destination`) and `auth_type` SPIRE: on a node that receives
tunnelled traffic, most entries are such. The rare ones are built at once (`_tls_entry_flows`):
a tunnelled CONNECT stream (the TCP variant), a certificate no single identity can be read
from, a refused upstream handshake, a TLS connection without a client certificate.

Envoy TCP access log entry → flows (`tcp_log_flows`): a connection the mTLS tunnel refused in
its TLS handshake, or could not carry, is one DROPPED (or ERROR) L3_L4 flow naming the reason;
the connections that ran are covered by their HTTP entries and give no flow.

The protobuf messages have no type stubs: mypy sees them as Any, the annotations are for readers.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

from envoy.config.core.v3.address_pb2 import SocketAddress
from envoy.data.accesslog.v3.accesslog_pb2 import (
    AccessLogCommon,
    HTTPAccessLogEntry,
    HTTPRequestProperties,
    HTTPResponseProperties,
    ResponseFlags,
    TCPAccessLogEntry,
)
from google.protobuf.duration_pb2 import Duration

from ..envoy_names import EGRESS_ACTION_PREFIX, TLS_STATE, ORIGINAL_DST_HEADER
from ..identity.spiffe import SpiffeIDError, parse_spiffe_id
from .flow import (
    AUTH_FAILED,
    AUTH_REQUIRED,
    EVENT_L7,
    HTTP,
    MAX_HEADER_VALUE,
    MAX_URL,
    POLICY_DENIED,
    POLICY_DENIED_L7,
    AuthType,
    Endpoint,
    Flow,
    FlowType,
    L7Type,
    Layer7,
    Service,
    TrafficDirection,
    Verdict,
    _endpoint_json,
    clip_url,
    format_time,
    safe_headers,
)
from ..records import HTTPRecord
from .ingest_context import IngestContext, MalformedEvent, PeerInfo, endpoint

SOURCE_ALS = "als"
SOURCE_H11 = "h11"  # the h11 engine's requests (`records.HTTPRecord`): `http_record_flows`
SOURCE_ALS_TCP = "als-tcp"
_ENTRY_TYPE = "envoy.data.accesslog.v3.HTTPAccessLogEntry"
_TCP_ENTRY_TYPE = "envoy.data.accesslog.v3.TCPAccessLogEntry"
_RBAC_DENIED = "rbac_access_denied_matched_policy["
_RBAC_FILTER = "envoy.filters.http.rbac"
_VIA_UPSTREAM = "via_upstream"
# envoy.config.core.v3.RequestMethod and HTTPAccessLogEntry.HTTPVersion, by number.
_METHODS = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_PROTOCOLS = ("", "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3")
_CONNECT = _METHODS.index("CONNECT")
# Every method an entry can name: the bound of `ingest.method_label`.
KNOWN_METHODS = frozenset(_METHODS[1:])
_DENY_REASONS = {"deny-l7": POLICY_DENIED_L7, "deny-l3l4": POLICY_DENIED, "deny-auth": AUTH_REQUIRED}
_MAX_TIME_NS = 253_402_300_799 * 1_000_000_000  # 9999-12-31T23:59:59Z: RFC 3339 ends there


def _ns(duration: Duration) -> int:
    return int(duration.seconds) * 1_000_000_000 + int(duration.nanos)


def _policies(action: str) -> tuple[str, str]:
    kind, _, pols = action.partition("|")
    return kind, pols


def _rbac_action(cp: AccessLogCommon) -> str:
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


def _tunnel_peer(cp: AccessLogCommon) -> int | None:
    """The l7gate identity of a client certificate (exactly one URI SAN, an identity's SPIFFE
    ID), or None: not a tunnel entry, or a certificate no identity can be read from."""
    if not cp.HasField("tls_properties"):
        return None
    uris = [s.uri for s in cp.tls_properties.peer_certificate_properties.subject_alt_name if s.uri]
    if len(uris) != 1:
        return None
    uri = uris[0]
    try:
        return _PEER_CACHE[uri]
    except KeyError:
        pass
    try:
        peer: int | None = parse_spiffe_id(uri)[1]
    except SpiffeIDError:
        peer = None
    if len(uri) <= _MAX_URI_KEY:  # a tunnel's peers are the source nodes' identities: few
        if len(_PEER_CACHE) >= _MAX_CACHED:
            _PEER_CACHE.clear()
        _PEER_CACHE[uri] = peer
    return peer


_PEER_CACHE: dict[str, int | None] = {}  # a client certificate's URI SAN → `_tunnel_peer`
_MAX_URI_KEY = 512


def _has_client_certificate(cp: AccessLogCommon) -> bool:
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


def _tunnel_ends(
    ctx: IngestContext, req: HTTPRequestProperties, peer: int | None, direct: str, local: str, local_port: int,
) -> tuple[tuple[str, int, PeerInfo], tuple[str, int, PeerInfo]]:
    """(address, port, peer) of the source and of the destination of a request through the mTLS
    tunnel, whose connection came from the source node's Envoy (`direct`) to this node's
    tunnel listener (`local`): the caller is the client certificate's identity (`peer`), its
    address what that Envoy appended to X-Forwarded-For, the pod it reached the
    original-destination header. The certificate wins over the claimed address; no usable
    identity in it: unknown."""
    src_addr = _tunnel_source(req.forwarded_for, direct)
    dst_addr, dst_port = _tunnel_destination(req.request_headers.get(ORIGINAL_DST_HEADER), local, local_port)
    src_info, dst_info = _resolve(ctx, src_addr), _resolve(ctx, dst_addr)
    if src_info.identity != peer:
        src_info = PeerInfo(peer or 0)
    return (src_addr, 0, src_info), (dst_addr, dst_port, dst_info)


def _check_type(entry: Any, expected: str) -> None:
    # Any: whatever the producer offered; this is where its type is found out.
    try:
        name = entry.DESCRIPTOR.full_name
    except AttributeError:
        raise MalformedEvent(f"not a protobuf message: {type(entry).__name__}") from None
    if name != expected:
        raise MalformedEvent(f"expected {expected}, got {name}")


def _downstream(cp: AccessLogCommon) -> tuple[SocketAddress, SocketAddress]:
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


def _start_ns(cp: AccessLogCommon, ctx: IngestContext) -> int:
    st = cp.start_time
    t0 = int(st.seconds) * 1_000_000_000 + int(st.nanos) or ctx.now()
    if not 0 < t0 <= _MAX_TIME_NS:
        raise MalformedEvent(f"start_time {st.seconds}s is not a time")
    return t0


# What a record's flows are, decided when its entry is ingested (`HTTPLogRecord.branch`).
DENIED = 0  # RBAC denied it: one DROPPED flow
ALLOWED = 1  # it passed policy: a request flow and a response flow
REFUSED = 2  # refused before policy was evaluated (no RBAC decision): one ERROR flow


class HTTPLogRecord:
    """One Envoy HTTP access log entry, decided but not built into flows: the values of the
    entry its flows are made of, and what could not wait — the peers its addresses resolved to
    (identities change), the Services they were backends of, the start time when Envoy gave
    none, which flows it gives (`branch`, `count`) and how they count (`shape`: the flows of two
    records of one shape count alike in every metric). Every reason an entry is malformed has
    been found by then: building its flows cannot fail.

    `flows()` builds them, `lines(i, j)` writes the stream lines of flows `i` to `j - 1` (what
    `api.flow_line` gives for each) without building them. The record stands for its flows in
    the ring (`flow.FlowItem`): most flows are never read, so most are never built, and what is
    built is not kept. Holds no protobuf (the message it came in is freed). Immutable; safe to
    share between threads.
    """

    __slots__ = ("node", "src_ip", "src_port", "src_info", "dst_ip", "dst_port", "dst_info", "direction", "t0",
                 "branch", "method", "code", "details", "reason", "action", "latency", "answered", "services",
                 "request", "request_headers", "response_headers", "shape", "count", "auth")

    def __init__(
        self, node: str, src_ip: str, src_port: int, src_info: PeerInfo, dst_ip: str, dst_port: int,
        dst_info: PeerInfo, direction: TrafficDirection, t0: int, branch: int, method: str, code: int, details: str, reason: str,
        action: str, latency: int, answered: bool, services: tuple[Service | None, Service | None] | None,
        request: tuple[str, str, str, int, str, str], request_headers: tuple[tuple[str, str], ...] | None,
        response_headers: tuple[tuple[str, str], ...], shape: Hashable, auth: AuthType = AuthType.DISABLED,
    ) -> None:
        self.node = node
        self.src_ip = src_ip
        self.src_port = src_port
        self.src_info = src_info
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.dst_info = dst_info
        self.direction = direction
        self.t0 = t0
        self.branch = branch
        self.method = method
        self.code = code
        self.details = details
        self.reason = reason  # DENIED: the drop reason
        self.action = action  # ALLOWED: the RBAC filter's decision (`allow|<policies>`)
        self.latency = latency  # ALLOWED: request start → first upstream byte
        self.answered = answered  # ALLOWED: the upstream answered (the response is FORWARDED)
        self.services = services  # (of the source, of the destination), or None: neither is one
        self.request = request  # scheme, authority, path, protocol (number), user agent, request id
        self.request_headers = request_headers  # the extra ones Envoy logged (`safe_headers`), or None
        self.response_headers = response_headers  # already `safe_headers`
        self.shape = shape  # branch, reason, method, code, source local, destination local, answered, direction
        self.count = 2 if branch == ALLOWED else 1
        self.auth = auth  # SPIRE: through the mTLS tunnel

    def _request(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        """(url, protocol, headers) of the request."""
        scheme, authority, path, p, user_agent, request_id = self.request
        proto = _PROTOCOLS[p] if 0 <= p < len(_PROTOCOLS) else ""
        url = clip_url(f"{scheme or 'http'}://{authority}{path}")
        # The two headers Envoy always logs need no sensitivity check, and come out sorted.
        known: list[tuple[str, str]] = []
        if user_agent:
            known.append(("user-agent", user_agent[:MAX_HEADER_VALUE]))
        if request_id:
            known.append(("x-request-id", request_id[:MAX_HEADER_VALUE]))
        extra = self.request_headers
        return url, proto, safe_headers([*extra, *known]) if extra else tuple(known)

    def _policies(self) -> tuple[str, ...]:
        key = self.details[len(_RBAC_DENIED) :].rstrip("]") if self.branch == DENIED else self.action
        return _split(_policies(key)[1])

    def flows(self) -> tuple[Flow, ...]:
        url, proto, req_headers = self._request()
        src = endpoint(self.src_ip, self.src_port, self.src_info)
        dst = endpoint(self.dst_ip, self.dst_port, self.dst_info)
        s_src, s_dst = self.services or (None, None)
        method, code, details, node, direction, t0 = self.method, self.code, self.details, self.node, self.direction, self.t0
        branch, auth = self.branch, self.auth
        if branch == DENIED:
            return (
                Flow(
                    time=t0, verdict=Verdict.DROPPED, type=FlowType.L7, source=src, destination=dst,
                    drop_reason_desc=self.reason,
                    l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                    traffic_direction=direction, policy_match=self._policies(), summary=self.reason,
                    node_name=node, source_service=s_src, destination_service=s_dst, auth_type=auth,
                ),
            )
        if branch == ALLOWED:
            policies = self._policies()
            latency, answered = self.latency, self.answered
            request = Flow(
                time=t0, verdict=Verdict.FORWARDED, type=FlowType.L7, source=src, destination=dst,
                l7=Layer7(L7Type.REQUEST, 0, HTTP(0, method, url, proto, req_headers)),
                traffic_direction=direction, policy_match=policies,
                summary=f"{method} {url}" if method else url, node_name=node,
                source_service=s_src, destination_service=s_dst, auth_type=auth,
            )
            response = Flow(
                time=t0 + latency, verdict=Verdict.FORWARDED if answered else Verdict.ERROR, type=FlowType.L7,
                source=dst, destination=src,
                l7=Layer7(L7Type.RESPONSE, latency, HTTP(code, method, url, proto, self.response_headers)),
                traffic_direction=direction, is_reply=True, policy_match=policies,
                summary=str(code) if answered else f"{code} {details}".strip(), node_name=node,
                source_service=s_dst, destination_service=s_src, auth_type=auth,
            )
            return (request, response)
        return (
            Flow(
                time=t0, verdict=Verdict.ERROR, type=FlowType.L7, source=src, destination=dst,
                l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                traffic_direction=direction, summary=f"{code} {details}".strip(), node_name=node,
                source_service=s_src, destination_service=s_dst, auth_type=auth,
            ),
        )

    def lines(self, start: int, stop: int) -> bytes:
        """The stream lines (`api.flow_line`) of flows `start` to `stop - 1`: field by field what
        `flow.flow_to_json` writes, in its order (tests/unit/test_observe_lazy.py holds them
        equal). What the records of one shape, peers and policy write alike comes from a
        template (`_LineTemplate`); the rest is filled in."""
        url, _, req_headers = self._request()
        url = _esc(url)
        t = _line_template(self)
        out = []
        for i in range(start, stop):
            if i == 0:
                when = format_time(self.t0)
                summary = t.summary if t.summary else ('"' + self.method + " " + url[1:]) if self.method else url
                out.append(
                    f'{{"flow":{{"time":"{when}",{t.request_head}{self.src_port},"destination_port":{self.dst_port}'
                    f'{t.request_http}"url":{url}{t.proto}{_headers_json(req_headers)}{t.request_tail}{summary}'
                    f'{t.end}"time":"{when}"}}\n'
                )
            else:  # the response to an ALLOWED request
                latency = self.latency
                when = format_time(self.t0 + latency)
                lat = f'"latency_ns":"{latency}",' if latency else ""
                out.append(
                    f'{{"flow":{{"time":"{when}",{t.response_head}{self.dst_port},"destination_port":{self.src_port}'
                    f'{t.response_l7}{lat}{t.response_http}"url":{url}{t.proto}{_headers_json(self.response_headers)}'
                    f'{t.response_tail}{t.end}"time":"{when}"}}\n'
                )
        return "".join(out).encode()


class _LineTemplate:
    """The text of a record's stream lines that does not change from request to request (see
    `HTTPLogRecord.lines`): around the time, the ports, the URL, the headers, the latency and,
    for a forwarded request, its summary."""

    __slots__ = ("src_info", "dst_info", "request_head", "request_http", "proto", "request_tail", "summary",
                 "response_head", "response_l7", "response_http", "response_tail", "end")

    def __init__(self, rec: HTTPLogRecord) -> None:
        self.src_info, self.dst_info = rec.src_info, rec.dst_info
        branch, method, code, node, details = rec.branch, rec.method, rec.code, rec.node, rec.details
        p = rec.request[3]
        proto = _PROTOCOLS[p] if 0 <= p < len(_PROTOCOLS) else ""
        self.proto = f',"protocol":{_esc(proto)}' if proto else ""
        node_json = _esc(node)
        node_field = f'"node_name":{node_json},' if node else ""
        method_field = f'"method":"{method}",' if method else ""  # one of _METHODS: nothing to escape
        s_src, s_dst = rec.services or (None, None)
        src_ip, dst_ip = _esc(rec.src_ip), _esc(rec.dst_ip)
        ep_src, ep_dst = _endpoint_json_text(rec.src_info), _endpoint_json_text(rec.dst_info)
        policies = rec._policies() if branch != REFUSED else ()
        policy_match = f'"policy_match":[{",".join(map(_esc, policies))}],' if policies else ""
        tail = f'"event_type":{{"type":{EVENT_L7}}},"traffic_direction":"{rec.direction}","is_reply":'
        if branch == ALLOWED:
            head, code_field, summary = '"verdict":"FORWARDED",', "", ""
        elif branch == DENIED:
            head = f'"verdict":"DROPPED","drop_reason_desc":{_esc(rec.reason)},'
            code_field, summary = f'"code":{code},' if code else "", _esc(rec.reason)
        else:
            head, code_field = '"verdict":"ERROR",', f'"code":{code},' if code else ""
            summary = _esc(f"{code} {details}".strip())
        self.summary = summary  # empty: a forwarded request's, made of its URL
        self.request_head = (
            f'{head}"IP":{{"source":{src_ip},"destination":{dst_ip},'
            f'"ipVersion":"{"IPv6" if ":" in rec.src_ip else "IPv4"}"}},"l4":{{"TCP":{{"source_port":'
        )
        self.request_http = (
            f'}}}},"source":{ep_src},"destination":{ep_dst},{_services_json(s_src, s_dst)}"Type":"L7",{node_field}'
            f'"l7":{{"type":"REQUEST","http":{{{code_field}{method_field}'
        )
        auth = f'"auth_type":"{rec.auth.value}",'
        self.request_tail = f'}}}},{tail}false,{auth}{policy_match}"Summary":'
        self.end = f'}},"node_name":{node_json},'
        self.response_head = self.response_l7 = self.response_http = self.response_tail = ""
        if branch == ALLOWED:
            answered = rec.answered
            self.response_head = (
                f'"verdict":"{"FORWARDED" if answered else "ERROR"}","IP":{{"source":{dst_ip},"destination":'
                f'{src_ip},"ipVersion":"{"IPv6" if ":" in rec.dst_ip else "IPv4"}"}},"l4":{{"TCP":{{"source_port":'
            )
            self.response_l7 = (
                f'}}}},"source":{ep_dst},"destination":{ep_src},{_services_json(s_dst, s_src)}"Type":"L7",'
                f'{node_field}"l7":{{"type":"RESPONSE",'
            )
            self.response_http = f'"http":{{{f""""code":{code},""" if code else ""}{method_field}'
            summary = f'"{code}"' if answered else _esc(f"{code} {details}".strip())
            self.response_tail = f'}}}},{tail}true,{auth}{policy_match}"Summary":{summary}'


_TEMPLATES: dict[Hashable, _LineTemplate] = {}


def _line_template(rec: HTTPLogRecord) -> _LineTemplate:
    """The template of a record's lines, cached: records of one shape between the same peers,
    with the same policies and details, write alike. The peers are the same objects (checked:
    an id can be reused once its object is gone)."""
    key = (rec.shape, rec.details, rec.action, rec.request[3], rec.src_ip, rec.dst_ip, id(rec.src_info),
           id(rec.dst_info), rec.services, rec.node, rec.direction, rec.auth)
    t = _TEMPLATES.get(key)
    if t is None or t.src_info is not rec.src_info or t.dst_info is not rec.dst_info:
        if len(_TEMPLATES) >= _MAX_CACHED:
            _TEMPLATES.clear()
        t = _TEMPLATES[key] = _LineTemplate(rec)
    return t


_esc: Any = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str (ensure_ascii)
# A stream line's pieces are cached (`_TEMPLATES`, `_ENDPOINTS`); the keys come from Envoy's
# entries and the agent's state (addresses, node and policy names); each cache is bounded.
_ENDPOINTS: dict[int, tuple[PeerInfo, str]] = {}  # id(PeerInfo) → (it, its JSON): peers are shared
_MAX_CACHED = 4096


def _endpoint_json_text(info: PeerInfo) -> str:
    """`flow._endpoint_json` of a peer, as JSON text. Cached per PeerInfo object (the agent
    hands the same one for an address until its state changes; the `is` check makes a reused
    id miss)."""
    hit = _ENDPOINTS.get(id(info))
    if hit is not None and hit[0] is info:
        return hit[1]
    text = json.dumps(_endpoint_json(Endpoint(identity=info.identity, cluster_name=info.cluster_name,
                                              namespace=info.namespace, pod_name=info.pod_name,
                                              labels=info.labels)), separators=(",", ":"))
    if len(_ENDPOINTS) >= _MAX_CACHED:
        _ENDPOINTS.clear()
    _ENDPOINTS[id(info)] = (info, text)
    return text


def _services_json(src: Service | None, dst: Service | None) -> str:
    out = ""
    if src is not None:
        out = f'"source_service":{{"name":{_esc(src.name)},"namespace":{_esc(src.namespace)}}},'
    if dst is not None:
        out += f'"destination_service":{{"name":{_esc(dst.name)},"namespace":{_esc(dst.namespace)}}},'
    return out


def _headers_json(headers: tuple[tuple[str, str], ...]) -> str:
    """The `headers` member of an http section (with the comma before it), or nothing."""
    if not headers:
        return ""
    return ',"headers":[' + ",".join(f'{{"key":{_esc(k)},"value":{_esc(v)}}}' for k, v in headers) + "]"


def http_log_record(entry: HTTPAccessLogEntry, ctx: IngestContext) -> HTTPLogRecord | tuple[Flow, ...]:
    """One Envoy HTTP access log entry, decided (see the module docstring and `HTTPLogRecord`);
    raises MalformedEvent on an entry that gives no flows. The rare entries with TLS in them
    are built at once: their flows (see the module docstring)."""
    if type(entry) is not HTTPAccessLogEntry:
        _check_type(entry, _ENTRY_TYPE)
    cp = entry.common_properties
    req = entry.request
    src_sa = cp.downstream_direct_remote_address.socket_address
    src_addr = src_sa.address
    if not src_addr:
        src_sa = cp.downstream_remote_address.socket_address
        src_addr = src_sa.address
    dst_sa = cp.downstream_local_address.socket_address
    dst_addr = dst_sa.address
    auth = AuthType.DISABLED
    if cp.HasField("tls_properties"):
        peer = _tunnel_peer(cp)
        if peer is None or req.request_method == _CONNECT or not src_addr or not dst_addr:
            return _tls_entry_flows(entry, ctx)
        auth = AuthType.SPIRE
        (src_addr, src_port, src_info), (dst_addr, dst_port, dst_info) = _tunnel_ends(
            ctx, req, peer, src_addr, dst_addr, dst_sa.port_value)
    else:
        if not src_addr or not dst_addr:
            raise MalformedEvent("entry without downstream IP addresses")
        src_port, dst_port = src_sa.port_value, dst_sa.port_value
        resolve = ctx.resolve
        try:
            src_info, dst_info = resolve(src_addr), resolve(dst_addr)
        except ValueError as exc:
            raise MalformedEvent(f"unusable address: {exc}") from None
    if dst_info.local:
        direction = TrafficDirection.INGRESS
    elif src_info.local:
        direction = TrafficDirection.EGRESS
    else:
        direction = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    st = cp.start_time
    t0 = st.seconds * 1_000_000_000 + st.nanos or ctx.now()
    if not 0 < t0 <= _MAX_TIME_NS:
        raise MalformedEvent(f"start_time {st.seconds}s is not a time")
    resp = entry.response
    m = req.request_method
    method = _METHODS[m] if 0 <= m < len(_METHODS) else ""
    code = resp.response_code.value
    details = resp.response_code_details

    reason, action, latency, answered = "", "", 0, False
    if details.startswith(_RBAC_DENIED):
        branch = DENIED
        reason = _DENY_CACHE.get(details) or _deny_reason(details)
        if details.startswith(_EGRESS_DENIED):
            direction = TrafficDirection.EGRESS  # the source node's egress proxy decided
    else:
        tls_failure = cp.upstream_transport_failure_reason
        if tls_failure and _is_tls_error(tls_failure):
            return _tls_entry_flows(entry, ctx)
        action = _cached_rbac_action(cp)
        if action.startswith(EGRESS_ACTION_PREFIX):
            direction = TrafficDirection.EGRESS
            action = action[len(EGRESS_ACTION_PREFIX):]
        if details == _VIA_UPSTREAM:
            allowed = answered = True
        else:
            upstream = bool(cp.upstream_remote_address.socket_address.address)
            answered = not details and upstream and code > 0
            allowed = answered or upstream or _policies(action)[0] == "allow"
        if allowed:
            branch = ALLOWED
            if cp.HasField("time_to_first_upstream_rx_byte"):
                d = cp.time_to_first_upstream_rx_byte
            elif cp.HasField("time_to_first_downstream_tx_byte"):
                d = cp.time_to_first_downstream_tx_byte
            else:
                d = cp.duration
            latency = d.seconds * 1_000_000_000 + d.nanos
            if not 0 <= latency <= _MAX_TIME_NS - t0:
                raise MalformedEvent(f"latency {latency} ns is not a duration")
        else:
            branch = REFUSED
    service_of = ctx.service_of
    s_src = service_of(src_addr, src_port) if src_port else None
    s_dst = service_of(dst_addr, dst_port) if dst_port else None
    extra = req.request_headers
    resp_extra = resp.response_headers if branch == ALLOWED else None
    # What a flow keeps is bounded and has no credentials: kept that way from here (the URL's
    # parts cut to the URL's bound give the same clipped URL; `safe_headers` of the extra
    # headers, then of them and the two Envoy always logs, is `safe_headers` of all of them).
    return HTTPLogRecord(
        ctx.node_name, src_addr, src_port, src_info, dst_addr, dst_port, dst_info, direction, t0, branch,
        method, code, details, reason, action, latency, answered,
        None if s_src is None and s_dst is None else (s_src, s_dst),
        (req.scheme[:MAX_URL], req.authority[:MAX_URL], req.path[:MAX_URL], entry.protocol_version,
         req.user_agent[:MAX_HEADER_VALUE], req.request_id[:MAX_HEADER_VALUE]),
        _safe_extra(extra) if extra else None,
        safe_headers(resp_extra.items()) if resp_extra else (),
        (branch, reason, method, code, src_info.local, dst_info.local, answered, direction),
        auth,
    )


_EXTRA: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}  # Envoy's extra headers → kept


def _safe_extra(extra: Any) -> tuple[tuple[str, str], ...]:
    """`safe_headers` of the extra request headers Envoy logged, cached by them: the tunnel's
    original-destination header takes one value per destination pod, and the headers a
    policy names often repeat. A cache of bounded size that is cleared when full, like the
    others here. Only header sets `safe_headers` keeps whole are cached: a credential is never
    a key (a flow keeps none, and neither does this cache)."""
    items = tuple(extra.items())
    kept = _EXTRA.get(items)
    if kept is None:
        kept = safe_headers(items)
        if len(kept) == len(items) and sum(len(k) + len(v) for k, v in items) <= _MAX_ACTION_KEY:
            if len(_EXTRA) >= _MAX_CACHED:
                _EXTRA.clear()
            _EXTRA[items] = kept
    return kept


_ACTIONS: dict[bytes, str] = {}  # an entry's metadata, serialized → the RBAC action in it
_MAX_ACTION_KEY = 1024


def _cached_rbac_action(cp: AccessLogCommon) -> str:
    """`_rbac_action`, cached by the metadata's bytes: serializing it costs less than reading
    the action out of its maps, and it takes few values (the policies deciding)."""
    key = cp.metadata.SerializeToString()
    action = _ACTIONS.get(key)
    if action is None:
        action = _rbac_action(cp)
        if len(key) <= _MAX_ACTION_KEY:  # other filters' metadata could make every entry's differ
            if len(_ACTIONS) >= _MAX_CACHED:
                _ACTIONS.clear()
            _ACTIONS[key] = action
    return action


_DENY_CACHE: dict[str, str] = {}
_EGRESS_DENIED = _RBAC_DENIED + EGRESS_ACTION_PREFIX


def _deny_reason(details: str) -> str:
    """The drop reason of an RBAC denial's `response_code_details` (cached: a few policies)."""
    reason = _DENY_CACHE.get(details)
    if reason is None:
        kind, _ = _policies(details[len(_RBAC_DENIED) :].rstrip("]"))
        reason = _DENY_REASONS.get(kind.removeprefix(EGRESS_ACTION_PREFIX), POLICY_DENIED)
        if len(_DENY_CACHE) >= 1024:
            _DENY_CACHE.clear()
        _DENY_CACHE[details] = reason
    return reason


def http_log_flows(entry: HTTPAccessLogEntry, ctx: IngestContext) -> tuple[Flow, ...]:
    """The flows of one Envoy HTTP access log entry (see the module docstring), built at once."""
    rec = http_log_record(entry, ctx)
    return rec if isinstance(rec, tuple) else rec.flows()


def _tls_entry_flows(entry: HTTPAccessLogEntry, ctx: IngestContext) -> tuple[Flow, ...]:
    """The flows of an entry with TLS in it: through the mTLS tunnel (a client certificate), or
    from a connection to it (the source side); built at once (few)."""
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
        (src_addr, src_port, src_info), (dst_addr, dst_port, dst_info) = _tunnel_ends(
            ctx, req, tunnel_identity, src_addr, dst_addr, dst_port)
    else:
        src_info, dst_info = _resolve(ctx, src_addr), _resolve(ctx, dst_addr)
    src = endpoint(src_addr, src_port, src_info)
    dst = endpoint(dst_addr, dst_port, dst_info)
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
        if kind.startswith(EGRESS_ACTION_PREFIX):
            # the source node's egress proxy: the pod's own egress HTTP rules refused it
            kind, direction = kind[len(EGRESS_ACTION_PREFIX):], TrafficDirection.EGRESS
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
    if kind.startswith(EGRESS_ACTION_PREFIX):
        kind, direction = kind[len(EGRESS_ACTION_PREFIX):], TrafficDirection.EGRESS
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
    entry: HTTPAccessLogEntry, t0: int, src: Endpoint, dst: Endpoint, direction: TrafficDirection, node: str
) -> Flow:
    """The TCP variant of the tunnel, on the destination node: one HTTP/2 CONNECT stream is one
    TCP connection of the source pod. Its flow is L3/L4 (the bytes are not HTTP): the RBAC
    verdict, and for a stream that ran, the bytes each way."""
    cp = entry.common_properties
    details = entry.response.response_code_details
    if details.startswith(_RBAC_DENIED):
        kind, pols = _policies(details[len(_RBAC_DENIED) :].rstrip("]"))
        if kind.startswith(EGRESS_ACTION_PREFIX):
            # the source node's egress proxy: the pod's own egress HTTP rules refused it
            kind, direction = kind[len(EGRESS_ACTION_PREFIX):], TrafficDirection.EGRESS
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


def tcp_log_flows(entry: TCPAccessLogEntry, ctx: IngestContext) -> tuple[Flow, ...]:
    """Listener-level entries of the mTLS tunnel listener: one per connection. A connection
    whose TLS handshake failed becomes a DROPPED flow naming the reason; the others are covered
    by their HTTP entries and give no flow."""
    _check_type(entry, _TCP_ENTRY_TYPE)
    cp = entry.common_properties
    if TLS_STATE in cp.filter_state_objects:
        return _tls_chain_flows(cp, ctx)
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
            source=endpoint(src_sa.address, int(src_sa.port_value), src_info),
            destination=endpoint(dst_sa.address, int(dst_sa.port_value), dst_info),
            drop_reason_desc=AUTH_FAILED, auth_type=AuthType.SPIRE,
            traffic_direction=TrafficDirection.INGRESS,
            summary=f"mTLS tunnel refused the client: {words}",
            node_name=ctx.node_name, protocol="TCP",
        ),
    )


def _tls_chain_flows(cp: AccessLogCommon, ctx: IngestContext) -> tuple[Flow, ...]:
    """A TLS connection a proxy judged by `serverNames` (`xds.resources.tls_filter_chain`: the
    egress listener's, or a local pod's ingress listener's): one flow, DROPPED with the reason
    when a network RBAC filter refused it, else FORWARDED (ERROR when the destination could not
    be reached)."""
    text = _string_value(cp.filter_state_objects[TLS_STATE])
    side, sep, sni = text.partition(":")
    if not sep or side not in ("egress", "ingress"):
        raise MalformedEvent(f"{TLS_STATE} {text[:100]!r} is not <egress|ingress>:<server name>")
    # A client chooses the bytes of its SNI: shown escaped, never as raw control characters
    sni = sni[:MAX_HEADER_VALUE].encode("ascii", "backslashreplace").decode("ascii")
    sni = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in sni)
    chain = TrafficDirection.EGRESS if side == "egress" else TrafficDirection.INGRESS
    src_sa, dst_sa = _downstream(cp)
    if not src_sa.address or not dst_sa.address:
        raise MalformedEvent("entry without downstream IP addresses")
    src = endpoint(src_sa.address, int(src_sa.port_value), _resolve(ctx, src_sa.address))
    dst = endpoint(dst_sa.address, int(dst_sa.port_value), _resolve(ctx, dst_sa.address))
    t0 = _start_ns(cp, ctx)
    named = f"TLS server name {sni}" if sni else "TLS without a server name (SNI)"
    details = cp.connection_termination_details
    common = dict(time=t0, type=FlowType.L3_L4, source=src, destination=dst, node_name=ctx.node_name,
                  protocol="TCP")
    if details.startswith(_RBAC_DENIED):
        kind, pols = _policies(details[len(_RBAC_DENIED):].rstrip("]"))
        direction = TrafficDirection.INGRESS  # an ingress chain, or the local destination's own policy
        if kind.startswith(EGRESS_ACTION_PREFIX):
            kind, direction = kind[len(EGRESS_ACTION_PREFIX):], TrafficDirection.EGRESS
        reason = _DENY_REASONS.get(kind, POLICY_DENIED)
        return (Flow(verdict=Verdict.DROPPED, drop_reason_desc=reason, traffic_direction=direction,
                     policy_match=_split(pols), summary=f"{named}: {reason}", **common),)  # type: ignore[arg-type]
    if cp.upstream_transport_failure_reason or _upstream_failed(cp.response_flags):
        return (Flow(verdict=Verdict.ERROR, traffic_direction=chain,
                     summary=f"{named}: the destination could not be reached", **common),)  # type: ignore[arg-type]
    return (Flow(verdict=Verdict.FORWARDED, traffic_direction=chain,
                 summary=f"{named}: allowed by serverNames", **common),)  # type: ignore[arg-type]


def _string_value(packed: Any) -> str:
    """The text of a `google.protobuf.StringValue` in an Any, read from its wire form: a client's
    SNI may hold bytes that are not UTF-8 (BoringSSL takes them), which the protobuf decoder
    refuses; such a connection must still be a flow, its bytes shown escaped."""
    if packed.type_url != "type.googleapis.com/google.protobuf.StringValue":
        raise MalformedEvent(f"{TLS_STATE} is a {packed.type_url[-80:]!r}, not a StringValue")
    data = bytes(packed.value)
    if not data:
        return ""
    if data[0] != 0x0A:
        raise MalformedEvent(f"{TLS_STATE} is not a StringValue")
    length, shift, i = 0, 0, 1
    while True:
        if i >= len(data) or shift > 28:
            raise MalformedEvent(f"{TLS_STATE}: a truncated StringValue")
        b = data[i]
        i += 1
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    if i + length != len(data):
        raise MalformedEvent(f"{TLS_STATE}: a StringValue of {len(data)} bytes says {length}")
    return data[i:].decode("utf-8", "backslashreplace")


def _upstream_failed(flags: ResponseFlags) -> bool:
    return bool(flags.upstream_connection_failure or flags.no_healthy_upstream
                or flags.upstream_overflow or flags.upstream_retry_limit_exceeded)


def _tunnel_tcp_source_flows(cp: AccessLogCommon, ctx: IngestContext) -> tuple[Flow, ...]:
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
            source=endpoint(src_sa.address, int(src_sa.port_value), src_info),
            destination=endpoint(dst_sa.address, int(dst_sa.port_value), dst_info),
            drop_reason_desc=drop, auth_type=AuthType.SPIRE,
            traffic_direction=TrafficDirection.EGRESS, summary=summary,
            node_name=ctx.node_name, protocol="TCP",
        ),
    )


def _request_headers(req: HTTPRequestProperties) -> tuple[tuple[str, str], ...]:
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


def _response_headers(resp: HTTPResponseProperties) -> tuple[tuple[str, str], ...]:
    if not resp.response_headers:
        return ()
    return safe_headers(resp.response_headers.items())



def http_record_flows(rec: HTTPRecord, ctx: IngestContext) -> tuple[Flow, ...]:
    """The flows of one request the h11 engine judged: exactly what `http_log_flows` gives for
    the Envoy access log entry of the same request (tests/unit/test_h11_flows.py holds them
    equal), read from the record directly (no protobuf built and read back: the engine shares
    its process with this thread)."""
    if not isinstance(rec, HTTPRecord):
        raise MalformedEvent(f"expected an HTTPRecord, got {type(rec).__name__}")
    src_addr, src_port = rec.src
    dst_addr, dst_port = rec.dst
    src_info, dst_info = _resolve(ctx, src_addr), _resolve(ctx, dst_addr)
    src, dst = endpoint(src_addr, src_port, src_info), endpoint(dst_addr, dst_port, dst_info)
    if dst_info.local:
        direction = TrafficDirection.INGRESS
    elif src_info.local:
        direction = TrafficDirection.EGRESS
    else:
        direction = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    t0 = int(rec.start * 1e9) or ctx.now()
    if not 0 < t0 <= _MAX_TIME_NS:
        raise MalformedEvent(f"start {rec.start} is not a time")
    method = rec.method if rec.method in KNOWN_METHODS else ""
    url = clip_url(f"http://{rec.authority}{rec.path}")
    code, details, node = rec.code, rec.details, ctx.node_name
    known: list[tuple[str, str]] = []
    if rec.user_agent:
        known.append(("user-agent", rec.user_agent[:MAX_HEADER_VALUE]))
    if rec.request_id:
        known.append(("x-request-id", rec.request_id[:MAX_HEADER_VALUE]))
    req_headers = tuple(known)
    proto = "HTTP/1.1"
    if details.startswith(_RBAC_DENIED):
        kind, pols = _policies(details[len(_RBAC_DENIED):].rstrip("]"))
        reason = _DENY_REASONS.get(kind, POLICY_DENIED)
        return (Flow(time=t0, verdict=Verdict.DROPPED, type=FlowType.L7, source=src, destination=dst,
                     drop_reason_desc=reason, l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                     traffic_direction=direction, policy_match=_split(pols), summary=reason, node_name=node),)
    kind, pols = _policies(rec.action)
    upstream = rec.upstream is not None
    answered = details == _VIA_UPSTREAM or (not details and upstream and code > 0)
    if kind == "allow" or answered or upstream:
        policies = _split(pols)
        latency = int((rec.first_upstream_byte - rec.start) * 1e9) if rec.first_upstream_byte is not None else 0
        latency = max(0, latency)
        if not 0 <= latency <= _MAX_TIME_NS - t0:
            raise MalformedEvent(f"latency {latency} ns is not a duration")
        request = Flow(time=t0, verdict=Verdict.FORWARDED, type=FlowType.L7, source=src, destination=dst,
                       l7=Layer7(L7Type.REQUEST, 0, HTTP(0, method, url, proto, req_headers)),
                       traffic_direction=direction, policy_match=policies,
                       summary=f"{method} {url}" if method else url, node_name=node)
        response = Flow(time=t0 + latency, verdict=Verdict.FORWARDED if answered else Verdict.ERROR, type=FlowType.L7,
                        source=dst, destination=src,
                        l7=Layer7(L7Type.RESPONSE, latency, HTTP(code, method, url, proto, ())),
                        traffic_direction=direction, is_reply=True, policy_match=policies,
                        summary=str(code) if answered else f"{code} {details}".strip(), node_name=node)
        return (request, response)
    return (Flow(time=t0, verdict=Verdict.ERROR, type=FlowType.L7, source=src, destination=dst,
                 l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                 traffic_direction=direction, summary=f"{code} {details}".strip(), node_name=node),)
