"""Envoy access log entries → flows, and the ingestion pipeline's handling of bad input."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.observe.flow import (
    AUTH_REQUIRED,
    POLICY_DENIED,
    POLICY_DENIED_L7,
    Flow,
    FlowType,
    L7Type,
    TrafficDirection,
    Verdict,
    flow_to_json,
    parse_time,
)
from l7gate.observe.envoy_flows import SOURCE_ALS, http_log_flows
from l7gate.observe.ingest import Ingestor
from l7gate.observe.ingest_context import IngestContext, MalformedEvent, PeerInfo, hubble_labels
from l7gate.observe.ring import FlowRing

from .test_observe_data import BILLING_IP, CTX, FRONTEND_IP, RECORDED, entry, flows, recorded_flows

ALLOW_POLICY = "CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api"


def _seconds_ns(d: str) -> int:
    """Proto JSON duration ("0.003289474s") → ns."""
    whole, _, frac = d.rstrip("s").partition(".")
    return int(whole) * 1_000_000_000 + int(frac.ljust(9, "0"))


def test_allowed_request_gives_a_forwarded_request_and_response() -> None:
    req, resp = flows("allowed")
    assert req.verdict is Verdict.FORWARDED and resp.verdict is Verdict.FORWARDED
    assert req.type is FlowType.L7 and resp.type is FlowType.L7
    assert req.summary == "POST http://billing-service.payments/v1/charge"
    assert resp.summary == "200"
    assert req.l7 is not None and req.l7.type is L7Type.REQUEST and not req.is_reply
    assert resp.l7 is not None and resp.l7.type is L7Type.RESPONSE and resp.is_reply
    assert req.source.pod_name == "frontend-service-abc" and req.source.cluster_name == "cluster-b"
    assert req.source.ip == FRONTEND_IP and req.destination.ip == BILLING_IP
    assert req.destination.port == 8080
    # The reply runs the other way.
    assert (resp.source, resp.destination) == (req.destination, req.source)
    assert req.traffic_direction is TrafficDirection.INGRESS is resp.traffic_direction
    assert req.policy_match == (ALLOW_POLICY,) == resp.policy_match
    # Times: the request at Envoy's start_time, the response when the upstream answered.
    cp = json.loads(RECORDED["allowed"])["commonProperties"]
    start = parse_time(cp["startTime"])
    assert req.time == start
    assert resp.l7.latency_ns == _seconds_ns(cp["timeToFirstUpstreamRxByte"]) > 0
    assert resp.time == start + resp.l7.latency_ns
    assert resp.http is not None and resp.http.code == 200 and resp.http.method == "POST"
    assert req.http is not None and req.http.protocol == "HTTP/1.1" and req.http.code == 0
    assert req.node_name == "cluster-a/node-a1"


@pytest.mark.parametrize(
    "action, reason",
    [
        ("deny-l7|P1", POLICY_DENIED_L7),
        ("deny-l3l4|P1,P2", POLICY_DENIED),
        ("deny-auth|P1", AUTH_REQUIRED),
        ("none", POLICY_DENIED),  # the filter-level deny-all of a route with no policy yet
    ],
)
def test_rbac_denial_is_one_dropped_l7_flow_with_its_reason(action: str, reason: str) -> None:
    (f,) = flows("denied_l7", response={"responseCodeDetails": f"rbac_access_denied_matched_policy[{action}]"})
    assert f.verdict is Verdict.DROPPED and f.type is FlowType.L7
    assert f.drop_reason_desc == reason == f.summary
    assert f.http is not None and f.http.code == 403 and f.http.method == "GET"
    assert f.http.url == "http://billing-service.payments/v1/transactions"
    pols = action.partition("|")[2]
    assert f.policy_match == tuple(p for p in pols.split(",") if p)


def test_recorded_denials() -> None:
    (l7,) = flows("denied_l7")
    assert (l7.verdict, l7.drop_reason_desc, l7.policy_match) == (Verdict.DROPPED, POLICY_DENIED_L7, (ALLOW_POLICY,))
    (l34,) = flows("denied_l3l4_world")
    assert l34.drop_reason_desc == POLICY_DENIED
    assert l34.source.identity == 2 and l34.source.pod_name == "" and l34.source.labels == ("reserved:world",)
    assert len(l34.policy_match) == 2


def test_path_normalization_400_is_one_error_flow() -> None:
    (f,) = flows("path_normalization")
    assert f.verdict is Verdict.ERROR and f.type is FlowType.L7
    assert f.drop_reason_desc == "" and f.policy_match == ()
    assert f.summary == "400 path_normalization_failed"
    assert f.http is not None and f.http.code == 400


def test_allowed_request_whose_upstream_failed_is_forwarded_then_error() -> None:
    req, resp = flows("upstream_down")
    assert req.verdict is Verdict.FORWARDED
    assert resp.verdict is Verdict.ERROR and resp.is_reply
    assert resp.summary.startswith("503 upstream_reset_before_response_started")


def test_sensitive_headers_are_never_stored() -> None:
    secrets = {
        "authorization": "Bearer s3cr3t-token", "cookie": "sid=s3cr3t-cookie",
        "proxy-authorization": "Basic s3cr3t-proxy", "x-api-key": "s3cr3t-key",
        "x-auth-token": "s3cr3t-auth", "x-session-id": "s3cr3t-session",
        "content-type": "application/json",
    }
    req, resp = flows(
        "allowed",
        request={"requestHeaders": secrets, "userAgent": "curl/8.5"},
        response={"responseHeaders": {"set-cookie": "sid=s3cr3t-set", "content-length": "42"}},
    )
    assert req.http is not None and resp.http is not None
    rid = json.loads(RECORDED["allowed"])["request"]["requestId"]
    assert dict(req.http.headers) == {
        "content-type": "application/json", "user-agent": "curl/8.5", "x-request-id": rid,
    }
    assert dict(resp.http.headers) == {"content-length": "42"}
    text = json.dumps([flow_to_json(req), flow_to_json(resp)])
    assert "s3cr3t" not in text


def test_unknown_address_is_world_and_direction_follows_the_local_side() -> None:
    def resolve(ip: str) -> PeerInfo:
        return PeerInfo(2, labels=("reserved:world",), local=(ip == FRONTEND_IP))

    req, _ = http_log_flows(entry("allowed"), IngestContext(resolve))
    assert req.destination.identity == 2
    assert req.traffic_direction is TrafficDirection.EGRESS  # only the source is local
    req2, _ = http_log_flows(entry("allowed"), IngestContext(lambda ip: PeerInfo(2)))
    assert req2.traffic_direction is TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN


def test_long_urls_are_clipped() -> None:
    (f,) = flows("denied_l7", request={"path": "/" + "a" * 10_000})
    assert f.http is not None and len(f.http.url) == 2048 and f.http.url.endswith("...")


def test_hubble_labels() -> None:
    assert hubble_labels({"app": "x", "reserved:world": "", "cidr:10.0.0.0/8": ""}) == (
        "cidr:10.0.0.0/8", "k8s:app=x", "reserved:world",
    )


# -- bad input -------------------------------------------------------------------------------------

JUNK: list[Any] = [
    None,
    "a string",
    b"\x08\x96\x01",
    42,
    accesslog_pb2.TCPAccessLogEntry(),
    accesslog_pb2.HTTPAccessLogEntry(),  # no addresses at all
]


def _junk_entries() -> list[Any]:
    out = list(JUNK)
    bad_ip = entry("allowed")
    bad_ip.common_properties.downstream_direct_remote_address.socket_address.address = "not-an-ip"
    out.append(bad_ip)
    far = entry("allowed")  # found by the fuzz test below: year 10000 broke flow_to_json
    far.common_properties.start_time.seconds = 253_402_300_800
    out.append(far)
    backwards = entry("allowed")
    backwards.common_properties.time_to_first_upstream_rx_byte.seconds = -5
    out.append(backwards)
    pipe = accesslog_pb2.HTTPAccessLogEntry()
    pipe.common_properties.downstream_remote_address.pipe.path = "/tmp/x.sock"
    out.append(pipe)
    return out


@pytest.mark.parametrize("junk", _junk_entries(), ids=lambda j: type(j).__name__)
def test_converter_raises_only_malformed_event(junk: Any) -> None:
    with pytest.raises(MalformedEvent):
        http_log_flows(junk, CTX)


def test_ingest_counts_and_skips_junk_and_keeps_the_rest() -> None:
    ring = FlowRing(100)
    ing = Ingestor(ring, CTX)
    junk = _junk_entries()
    batch = [junk[0], entry("allowed"), *junk[1:], entry("denied_l7")]
    out = ing.ingest(SOURCE_ALS, batch)
    assert [f.summary for f in out] == [
        "POST http://billing-service.payments/v1/charge", "200", POLICY_DENIED_L7,
    ]
    s = ing.stats()
    assert s.events == {SOURCE_ALS: len(batch)}
    assert s.malformed == {SOURCE_ALS: len(junk)}
    assert len(ring) == 3


def test_unknown_source_is_counted_malformed() -> None:
    ing = Ingestor(FlowRing(10), CTX)
    assert ing.ingest("bpf-drop", [object(), object()]) == []
    assert ing.stats().malformed == {"bpf-drop": 2}


def test_a_converter_that_crashes_is_contained() -> None:
    def boom(ev: Any, ctx: IngestContext) -> tuple[Flow, ...]:
        raise ZeroDivisionError("bug")

    ing = Ingestor(FlowRing(10), CTX, converters={"x": boom})
    assert ing.ingest("x", [1, 2, 3]) == []
    assert ing.stats().malformed == {"x": 3}


_text = st.text(max_size=30)


@st.composite
def _entries(draw: st.DrawFn) -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    cp = e.common_properties
    cp.downstream_remote_address.socket_address.address = draw(st.sampled_from(["127.0.0.1", "::1", "", "x", "10.0.0.300"]))
    cp.downstream_local_address.socket_address.address = draw(st.sampled_from([BILLING_IP, "", "::ffff:1.2.3.4", "zz"]))
    cp.downstream_local_address.socket_address.port_value = draw(st.integers(0, 65535))
    cp.start_time.seconds = draw(st.integers(0, 2**40))
    cp.start_time.nanos = draw(st.integers(0, 999_999_999))
    if draw(st.booleans()):
        cp.time_to_first_upstream_rx_byte.seconds = draw(st.integers(0, 10_000))
    if draw(st.booleans()):
        cp.upstream_remote_address.socket_address.address = draw(_text)
    if draw(st.booleans()):
        cp.metadata.filter_metadata["envoy.filters.http.rbac"].fields["enforced_effective_policy_id"].string_value = draw(_text)
    e.protocol_version = draw(st.integers(0, 4))
    e.request.request_method = draw(st.integers(0, 9))
    e.request.authority = draw(_text)
    e.request.path = draw(_text)
    e.request.scheme = draw(_text)
    for k, v in draw(st.dictionaries(_text, _text, max_size=3)).items():
        e.request.request_headers[k] = v
    e.response.response_code.value = draw(st.integers(0, 2**32 - 1))
    e.response.response_code_details = draw(
        st.one_of(_text, st.sampled_from(["via_upstream", "rbac_access_denied_matched_policy[", "rbac_access_denied_matched_policy[deny-l7|]"]))
    )
    return e


@settings(max_examples=300, deadline=None)
@given(_entries())
def test_any_entry_gives_flows_or_malformed_event_never_another_error(e: Any) -> None:
    def resolve(ip: str) -> PeerInfo:
        import ipaddress

        ipaddress.ip_address(ip)
        return PeerInfo(7)

    try:
        out = http_log_flows(e, IngestContext(resolve))
    except MalformedEvent:
        return
    assert 1 <= len(out) <= 2
    for f in out:
        json.dumps(flow_to_json(f))


# -- the ingestion thread --------------------------------------------------------------------------


@pytest.mark.timing
def test_offer_is_bounded_never_blocks_and_counts_what_it_refuses() -> None:
    ring = FlowRing(1000)
    ing = Ingestor(ring, CTX, max_pending=10)  # not started: nothing drains the queue
    assert ing.offer(SOURCE_ALS, [entry("allowed")] * 6)
    t0 = time.monotonic()
    assert not ing.offer(SOURCE_ALS, [entry("allowed")] * 6)
    assert time.monotonic() - t0 < 0.1
    assert ing.stats().lost == {SOURCE_ALS: 6}
    ing.start()
    assert ing.drain(5)
    assert len(ring) == 12
    ing.stop()
    assert not ing.offer(SOURCE_ALS, [entry("allowed")])  # stopped: refused, counted
    assert ing.stats().lost == {SOURCE_ALS: 7}


def test_thread_ingests_concurrent_offers_in_order_per_producer() -> None:
    ring = FlowRing(100_000)
    ing = Ingestor(ring, CTX)
    ing.start()
    e = entry("denied_l7")

    def produce() -> None:
        for _ in range(200):
            ing.offer(SOURCE_ALS, [e] * 5)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ing.drain(10)
    ing.stop()
    assert len(ring) == 4 * 200 * 5
    s = ing.stats()
    assert s.flows == {("DROPPED", "L7", "INGRESS"): 4000}
    assert s.drops == {POLICY_DENIED_L7: 4000}
    assert s.http == {("GET", "403", "DROPPED"): 4000}


def test_stats_count_each_request_once_by_outcome() -> None:
    ing = Ingestor(FlowRing(100), CTX)
    ing.ingest(SOURCE_ALS, [entry(n) for n in ("allowed", "denied_l7", "path_normalization", "denied_l3l4_world", "upstream_down")])
    s = ing.stats()
    assert s.http == {
        ("POST", "200", "FORWARDED"): 1,
        ("GET", "403", "DROPPED"): 1,
        ("POST", "400", "ERROR"): 1,
        ("POST", "403", "DROPPED"): 1,
        ("POST", "503", "ERROR"): 1,
    }
    assert s.drops == {POLICY_DENIED_L7: 1, POLICY_DENIED: 1}
    assert s.flows[("FORWARDED", "L7", "INGRESS")] == 3  # 2 of the allowed call, 1 request of upstream_down
    assert sum(s.flows.values()) == len(recorded_flows())


def test_unknown_methods_share_one_label() -> None:
    from l7gate.observe.ingest import method_label

    assert method_label("GET") == "GET"
    assert method_label("") == "OTHER" and method_label("BREW") == "OTHER"
