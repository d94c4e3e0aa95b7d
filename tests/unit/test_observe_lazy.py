"""Envoy's access log entries are kept as they came and built into flows only when read
(`envoy_flows.HTTPLogRecord`): everything a user sees must be what the eager converter gave.

The oracle is the converter as it was before entries became lazy (`reference_flows`, copied
from commit b7a15cd with the counting of `Ingestor._count` of that time), run on generated
entries — addresses, tunnel certificates, RBAC decisions, upstream failures, headers, broken
times — and the recorded ones. Held equal: which entries are malformed, the flows, the
metrics, the ring and what followers receive, filtered or not, byte for byte.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l7gate.envoy_names import ORIGINAL_DST_HEADER
from l7gate.observe.api import FlowQuery, flow_line, stream
from l7gate.observe.envoy_flows import (
    _DENY_REASONS,
    _ENTRY_TYPE,
    _MAX_TIME_NS,
    _METHODS,
    _PROTOCOLS,
    _RBAC_DENIED,
    _VIA_UPSTREAM,
    SOURCE_ALS,
    HTTPLogRecord,
    _check_type,
    _downstream,
    _has_client_certificate,
    _is_tls_error,
    _ns,
    _policies,
    _rbac_action,
    _request_headers,
    _resolve,
    _response_headers,
    _split,
    _start_ns,
    _tunnel_connect_flow,
    _tunnel_destination,
    _tunnel_peer,
    _tunnel_source,
    http_log_flows,
    http_log_record,
    tls_reason,
)
from l7gate.observe.filters import FlowFilter
from l7gate.observe.flow import (
    AUTH_FAILED,
    HTTP,
    POLICY_DENIED,
    AuthType,
    Flow,
    FlowType,
    L7Type,
    Layer7,
    Service,
    TrafficDirection,
    Verdict,
    clip_url,
    flow_to_json,
    materialize,
)
from l7gate.observe.ingest import Ingestor, method_label
from l7gate.observe.ingest_context import IngestContext, MalformedEvent, PeerInfo, endpoint
from l7gate.observe.ring import FlowRing

from .test_observe_data import RECORDED, entry

# -- the oracle: the eager converter and counting of b7a15cd ------------------------------------


def reference_flows(entry: Any, ctx: IngestContext) -> tuple[Flow, ...]:  # noqa: C901 - a copy, kept as it was
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
        src_addr, src_port = _tunnel_source(req.forwarded_for, src_addr), 0
        dst_addr, dst_port = _tunnel_destination(req.request_headers.get(ORIGINAL_DST_HEADER), dst_addr, dst_port)
    src_info, dst_info = _resolve(ctx, src_addr), _resolve(ctx, dst_addr)
    if _has_client_certificate(cp) and src_info.identity != tunnel_identity:
        src_info = PeerInfo(tunnel_identity or 0)
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
        reason = _DENY_REASONS.get(kind, POLICY_DENIED)
        summary = reason
        if tunnelled and tunnel_identity is None:
            n = sum(1 for x in cp.tls_properties.peer_certificate_properties.subject_alt_name if x.uri)
            summary = (f"{reason}: the client certificate names no single identity ({n} URI SANs); "
                       f"decided as an unknown peer")
        return (Flow(time=t0, verdict=Verdict.DROPPED, type=FlowType.L7, source=src, destination=dst,
                     drop_reason_desc=reason, l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                     traffic_direction=direction, policy_match=_split(pols), summary=summary, node_name=node,
                     auth_type=auth),)
    tls_failure = cp.upstream_transport_failure_reason
    if tls_failure and _is_tls_error(tls_failure):
        words = tls_reason(tls_failure)
        return (Flow(time=t0, verdict=Verdict.DROPPED, type=FlowType.L7, source=src, destination=dst,
                     drop_reason_desc=AUTH_FAILED, l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                     traffic_direction=direction,
                     summary=f"mTLS tunnel to {cp.upstream_remote_address.socket_address.address or 'peer'} "
                             f"refused: {words} ({tls_failure[:200]})",
                     node_name=node, auth_type=AuthType.SPIRE),)
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
        request = Flow(time=t0, verdict=Verdict.FORWARDED, type=FlowType.L7, source=src, destination=dst,
                       l7=Layer7(L7Type.REQUEST, 0, HTTP(0, method, url, proto, req_headers)),
                       traffic_direction=direction, policy_match=policies,
                       summary=f"{method} {url}" if method else url, node_name=node, auth_type=auth)
        verdict = Verdict.FORWARDED if answered else Verdict.ERROR
        response = Flow(time=t0 + latency, verdict=verdict, type=FlowType.L7, source=dst, destination=src,
                        l7=Layer7(L7Type.RESPONSE, latency, HTTP(code, method, url, proto, _response_headers(resp))),
                        traffic_direction=direction, is_reply=True, policy_match=policies,
                        summary=str(code) if answered else f"{code} {details}".strip(), node_name=node, auth_type=auth)
        return (request, response)
    return (Flow(time=t0, verdict=Verdict.ERROR, type=FlowType.L7, source=src, destination=dst,
                 l7=Layer7(L7Type.REQUEST, 0, HTTP(code, method, url, proto, req_headers)),
                 traffic_direction=direction, summary=f"{code} {details}".strip(), node_name=node, auth_type=auth),)


def reference_ingest(entries: list[Any], ctx: IngestContext) -> tuple[list[Flow], int, dict[str, Any]]:
    """(flows, malformed, counters) as ingestion gave them before entries became lazy."""
    from dataclasses import replace

    flows: list[Flow] = []
    bad = 0
    for e in entries:
        try:
            flows.extend(reference_flows(e, ctx))
        except Exception:  # noqa: BLE001 - as ingestion does
            bad += 1
    out = []
    for f in flows:
        src = ctx.service_of(f.source.ip, f.source.port) if f.source.port else None
        dst = ctx.service_of(f.destination.ip, f.destination.port) if f.destination.port else None
        out.append(f if src is None and dst is None else replace(f, source_service=src, destination_service=dst))
    fl: dict[Any, int] = {}
    dr: dict[str, int] = {}
    ht: dict[Any, int] = {}
    for f in out:
        key = (f.verdict.value, f.type.value, f.traffic_direction.value)
        fl[key] = fl.get(key, 0) + 1
        if f.drop_reason_desc:
            dr[f.drop_reason_desc] = dr.get(f.drop_reason_desc, 0) + 1
        l7 = f.l7
        if l7 is not None and l7.http is not None and (f.is_reply or f.verdict is not Verdict.FORWARDED):
            c = l7.http.code
            hk = (method_label(l7.http.method), str(c) if 0 <= c <= 999 else "other", f.verdict.value)
            ht[hk] = ht.get(hk, 0) + 1
    return out, bad, {"flows": fl, "drops": dr, "http": ht}


# -- generated entries ----------------------------------------------------------------------------

POD_A, POD_B, POD_C, WORLD_IP = "10.1.0.5", "10.1.0.6", "fd00::7", "203.0.113.9"
PEERS = {
    POD_A: PeerInfo(70000, "c1", "web", "frontend-1", ("k8s:app=frontend",)),
    POD_B: PeerInfo(65600, "c1", "payments", "billing-1", ("k8s:app=billing", 'k8s:odd="q\\'), local=True),
    POD_C: PeerInfo(65601, "c2", "payments", "billing-\u00e9", ("k8s:app=billing",), local=True),
}
SERVICES = {(POD_B, 8080): Service("billing", "payments"), (POD_A, 41000): Service("odd\"name", "web")}


def resolve(ip: str) -> PeerInfo:
    ipaddress.ip_address(ip)  # ValueError on junk, as the agent's resolver
    return PEERS.get(ip, PeerInfo(2, labels=("reserved:world",)))


def service_of(ip: str, port: int) -> Service | None:
    return SERVICES.get((ip, port))


CTX = IngestContext(resolve, node_name="c1/node-1", now=lambda: 1_700_000_000_123_456_789, service_of=service_of)
NO_NODE = IngestContext(resolve, node_name="", now=lambda: 1_700_000_000_000_000_000)

_addr = st.sampled_from([POD_A, POD_B, POD_C, WORLD_IP, "", "junk", "127.0.0.1"])
_text = st.text(max_size=12)
_details = st.one_of(
    _text,
    st.sampled_from([
        "via_upstream", "", "path_normalization_failed", "rbac_access_denied_matched_policy[",
        "rbac_access_denied_matched_policy[deny-l7|P1]", "rbac_access_denied_matched_policy[deny-l3l4|P1,P2]",
        "rbac_access_denied_matched_policy[deny-auth|]", "rbac_access_denied_matched_policy[none]",
        "upstream_reset_before_response_started{connection_failure}",
    ]),
)
_action = st.sampled_from(["allow|CCNP/a", "allow|A,B", "deny-l7|X", "allow|", "", "\u00fc|\u00fc"])


def _duration(draw: st.DrawFn, d: Any) -> None:
    d.seconds = draw(st.sampled_from([0, 0, 1, -3, 10_000, 2**40]))
    d.nanos = draw(st.integers(0, 999_999_999))


@st.composite
def entries(draw: st.DrawFn) -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    cp = e.common_properties
    if draw(st.booleans()):
        cp.downstream_direct_remote_address.socket_address.address = draw(_addr)
        cp.downstream_direct_remote_address.socket_address.port_value = draw(st.sampled_from([0, 41000, 55555]))
    cp.downstream_remote_address.socket_address.address = draw(_addr)
    cp.downstream_remote_address.socket_address.port_value = draw(st.sampled_from([0, 41000, 40001]))
    cp.downstream_local_address.socket_address.address = draw(_addr)
    cp.downstream_local_address.socket_address.port_value = draw(st.sampled_from([0, 8080, 15443]))
    cp.start_time.seconds = draw(st.sampled_from([0, 1_700_000_000, 1_700_000_001, 253_402_300_800, -1]))
    cp.start_time.nanos = draw(st.integers(0, 999_999_999))
    for name in ("time_to_first_upstream_rx_byte", "time_to_first_downstream_tx_byte", "duration"):
        if draw(st.booleans()):
            _duration(draw, getattr(cp, name))
    if draw(st.booleans()):
        cp.upstream_remote_address.socket_address.address = draw(st.sampled_from([POD_B, "x"]))
    if draw(st.integers(0, 3)) == 0:
        cp.upstream_transport_failure_reason = draw(st.sampled_from(
            ["TLS_error: CERTIFICATE_VERIFY_FAILED", "delayed connect error: refused", "SSL routines"]))
    if draw(st.booleans()):
        cp.metadata.filter_metadata["envoy.filters.http.rbac"].fields["enforced_effective_policy_id"].string_value = draw(_action)
    if draw(st.integers(0, 4)) == 0:  # the mTLS tunnel: a client certificate
        sans = cp.tls_properties.peer_certificate_properties.subject_alt_name
        for uri in draw(st.lists(st.sampled_from(["spiffe://l7gate.local/identity/65600",
                                                  "spiffe://l7gate.local/identity/70000", "bad"]), max_size=2)):
            sans.add().uri = uri
        if draw(st.booleans()):
            e.request.request_headers[ORIGINAL_DST_HEADER] = draw(st.sampled_from([f"{POD_B}:8080", "nope"]))
        e.request.forwarded_for = draw(st.sampled_from(["", f"{POD_A}", f"{POD_A}, 10.9.9.9"]))
    e.protocol_version = draw(st.integers(0, 5))
    e.request.request_method = draw(st.integers(0, 10))
    e.request.authority = draw(st.sampled_from(["billing.payments", "", "h\u00f6st", 'q"\\']))
    e.request.path = draw(st.one_of(st.sampled_from(["/v1/charge", "/a?b=\u2603", "/" + "p" * 3000]), _text))
    e.request.scheme = draw(st.sampled_from(["http", "", "https"]))
    if draw(st.booleans()):
        e.request.user_agent = draw(st.sampled_from(["curl/8", "x" * 300, "\u00e9\n"]))
    if draw(st.booleans()):
        e.request.request_id = draw(_text)
    for k, v in draw(st.dictionaries(st.sampled_from(["Cookie", "content-type", "X-Trace", "authorization"]), _text,
                                     max_size=2)).items():
        e.request.request_headers[k] = v
    for k, v in draw(st.dictionaries(st.sampled_from(["set-cookie", "content-length"]), _text, max_size=2)).items():
        e.response.response_headers[k] = v
    e.response.response_code.value = draw(st.sampled_from([0, 200, 403, 503, 1000, 2**32 - 1]))
    e.response.response_code_details = draw(_details)
    return e


def _lines(flows: list[Flow] | tuple[Flow, ...]) -> bytes:
    return b"".join(flow_line(f) for f in flows)


# -- the properties ---------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries(), st.sampled_from([CTX, NO_NODE]))
def test_a_record_gives_what_the_eager_converter_gave(e: Any, ctx: IngestContext) -> None:
    try:
        want = reference_flows(e, ctx)
    except MalformedEvent:
        want = None
    try:
        rec = http_log_record(e, ctx)
    except MalformedEvent:
        rec = None
    assert (want is None) == (rec is None), (want, rec)
    if want is None or rec is None:
        return
    got = rec if isinstance(rec, tuple) else rec.flows()
    # The converter itself adds the entry's Services (ingestion did it after converting).
    assert tuple(_drop_services(f) for f in got) == want
    assert http_log_flows(e, ctx) == got
    if isinstance(rec, HTTPLogRecord):
        assert rec.count == len(want)
        assert rec.lines(0, rec.count) == _lines(got)
        for i in range(rec.count):
            assert rec.lines(i, i + 1) == flow_line(got[i])
            json.loads(rec.lines(i, i + 1))


def _drop_services(f: Flow) -> Flow:
    from dataclasses import replace

    return replace(f, source_service=None, destination_service=None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries(), min_size=1, max_size=25), st.integers(1, 40))
def test_ingestion_counts_holds_and_streams_what_it_did_eagerly(batch: list[Any], capacity: int) -> None:
    want, bad, counters = reference_ingest(batch, CTX)
    ring = FlowRing(capacity, follow_buffer=7)
    ing = Ingestor(ring, CTX)
    with ring.subscribe_items()[1] as sub:
        items = ing.ingest_items(SOURCE_ALS, batch[: len(batch) // 2])
        items += ing.ingest_items(SOURCE_ALS, batch[len(batch) // 2 :])
        assert [materialize(i) for i in items] == want
        s = ing.stats()
        assert s.events == {SOURCE_ALS: len(batch)}
        assert s.malformed == ({SOURCE_ALS: bad} if bad else {})
        assert (s.flows, s.drops, s.http) == (counters["flows"], counters["drops"], counters["http"])
        # The ring: the newest `capacity` flows; a follower: the newest 7, and the count lost.
        assert ring.snapshot() == want[-capacity:]
        assert ring.stats().overflow == max(0, len(want) - capacity)
        got, lost = sub.take(0)
        assert got == want[-7:] and lost == max(0, len(want) - 7)
    # The stream a follower reads, byte for byte, filtered or not.
    for flt in (FlowFilter(), FlowFilter(verdict=("DROPPED",)), FlowFilter(destination_pod=("payments/billing",)),
                FlowFilter(http_status_code=("4+",), type=("l7",)), FlowFilter(source_identity=("world",))):
        match = flt.compile() if flt else None
        body = b"".join(stream(ring, FlowQuery(flt)))
        assert body == _lines([f for f in want[-capacity:] if match is None or match(f)])


def test_recorded_entries() -> None:
    from .test_observe_data import CTX as RECORDED_CTX

    for name in RECORDED:
        e = entry(name)
        rec = http_log_record(e, RECORDED_CTX)
        assert isinstance(rec, HTTPLogRecord)
        assert rec.flows() == reference_flows(e, RECORDED_CTX)
        assert rec.lines(0, rec.count) == _lines(rec.flows())
        assert all(json.loads(ln) == {"flow": flow_to_json(f), "node_name": f.node_name,
                                      "time": flow_to_json(f)["time"]}
                   for ln, f in zip(rec.lines(0, rec.count).splitlines(), rec.flows(), strict=True))


def test_records_of_one_shape_count_alike_across_batches() -> None:
    # The counters come from the first record of a shape: a later one, in another batch, with
    # other ports, times and paths, counts the same.
    ring = FlowRing(100)
    ing = Ingestor(ring, CTX)
    a = entry("allowed")
    b = entry("allowed", request={"path": "/v1/other"}, commonProperties={
        "downstreamDirectRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 1}}})
    for batch in ([a], [b, a], [entry("denied_l7")] * 3):
        ing.ingest_items(SOURCE_ALS, batch)
    want, _, counters = reference_ingest([a, b, a] + [entry("denied_l7")] * 3, CTX)
    s = ing.stats()
    assert (s.flows, s.drops, s.http) == (counters["flows"], counters["drops"], counters["http"])
    assert ring.snapshot() == want


def test_observe_follow_jsonpb_prints_the_lines_the_agent_wrote(tmp_path: Any, capsys: Any) -> None:
    # `l7gate observe -f -o jsonpb` copies the agent's lines through: the flows a follower
    # missed (its queue holds 3) are reported on stderr, the rest printed byte for byte.
    import threading

    from l7gate import cli
    from l7gate.agent.admin import AdminApp, AdminHooks, AdminServer

    from .test_observe_cli import eventually

    ring = FlowRing(100, follow_buffer=3)
    hooks = AdminHooks(
        status=lambda: {}, xds_status=lambda: {}, xds_config=lambda n, t: {},
        metrics=lambda: (b"", "text/plain"),
        flows=lambda q: stream(ring, FlowQuery.from_query(q), heartbeat=0.05),
    )
    server = AdminServer(AdminApp(None, hooks), f"unix:{tmp_path}/admin.sock")  # type: ignore[arg-type]
    server.start()
    result: dict[str, int] = {}
    printed: list[str] = []
    errors: list[str] = []

    def printed_so_far() -> str:
        out, err = capsys.readouterr()
        printed.append(out)
        errors.append(err)
        return "".join(printed)

    try:
        t = threading.Thread(target=lambda: result.setdefault(
            "rc", cli.main(["observe", "--admin", server.address, "-f", "-o", "jsonpb", "--last", "0"])))
        t.start()
        eventually(lambda: ring.stats().followers == 1, 5, "`l7gate observe -f` to follow")
        ing = Ingestor(ring, CTX)
        first = ing.ingest_items(SOURCE_ALS, [entry("allowed")])  # 2 flows: they fit
        want = _lines([materialize(i) for i in first])
        eventually(lambda: printed_so_far() == want.decode(), 5, "the first flows printed")
        batch = [entry(n) for n in RECORDED]  # 7 flows at once: the follower keeps the newest 3
        items = ing.ingest_items(SOURCE_ALS, batch)
        ring.close()
        t.join(5)
    finally:
        server.stop()
    printed_so_far()
    assert "".join(printed).encode() == want + _lines([materialize(i) for i in items][-3:])
    assert "4 flow(s) lost" in "".join(errors) and result["rc"] == 1


def test_lines_follow_a_peer_whose_labels_changed() -> None:
    # The agent hands a new PeerInfo when a pod changes: lines written from cached pieces show
    # what the new one says (the caches hold the peers they were made for, so an id is not
    # reused while its pieces are cached).
    for n in range(3):
        for version in (f"v{n}", f"w{n}"):
            peer = PeerInfo(65600 + n, "c1", "payments", "billing-1", (f"k8s:version={version}",), local=True)
            ctx = IngestContext(lambda ip, o=peer: o if ip == "127.77.1.10" else PEERS[POD_A])
            for name in ("denied_l7", "allowed"):
                rec = http_log_record(entry(name), ctx)
                assert isinstance(rec, HTTPLogRecord)
                assert rec.lines(0, rec.count) == _lines(rec.flows())
                assert f"version={version}".encode() in rec.lines(0, 1)


def test_a_record_keeps_no_credentials_and_no_more_than_a_flow() -> None:
    # The ring holds records, not flows: they must hold no more than the flows would.
    huge = "/" + "p" * 100_000
    e = entry("allowed", request={"path": huge, "authority": "a" * 100_000, "userAgent": "u" * 10_000,
                                  "requestId": "r" * 10_000,
                                  "requestHeaders": {"authorization": "Bearer s3cr3t", "x-b": "v" * 10_000}},
              response={"responseHeaders": {"set-cookie": "s3cr3t", "x-c": "w" * 10_000}})
    rec = http_log_record(e, CTX)
    assert isinstance(rec, HTTPLogRecord)
    held = repr([getattr(rec, name) for name in HTTPLogRecord.__slots__])
    assert "s3cr3t" not in held and len(held) < 12_000
    assert rec.flows() == reference_flows(e, CTX.__class__(CTX.resolve, CTX.node_name, CTX.now))
    assert rec.lines(0, rec.count) == _lines(rec.flows())


def test_the_converters_caches_keep_no_credentials() -> None:
    # The extra headers' cache (`_safe_extra`) is keyed by what Envoy logged: a set holding a
    # credential must not become a key (it would outlive the entry), the same set without one is
    # cached.
    from l7gate.observe import envoy_flows

    envoy_flows._EXTRA.clear()
    secret = entry("allowed", request={"requestHeaders": {"authorization": "Bearer s3cr3t", "x-b": "1"}})
    plain = entry("allowed", request={"requestHeaders": {"x-b": "1"}})
    for e in (secret, plain, secret):
        rec = http_log_record(e, CTX)
        assert isinstance(rec, HTTPLogRecord) and rec.request_headers == (("x-b", "1"),)
    assert "s3cr3t" not in repr(envoy_flows._EXTRA) and list(envoy_flows._EXTRA.values()) == [(("x-b", "1"),)]
