"""The h11 engine's flows equal Envoy's: for any request record, `http_record_flows` (what the
agent ingests from the engine) gives exactly the flows `http_log_flows` gives for the Envoy
access log entry of the same request (`access_log_entry`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from l7gate.l7proxy.h11engine import RBAC_DENIED, VIA_UPSTREAM, access_log_entry
from l7gate.observe.envoy_flows import http_log_flows, http_record_flows
from l7gate.observe.ingest_context import IngestContext, PeerInfo
from l7gate.records import HTTPRecord


def ctx() -> IngestContext:
    def resolve(ip: str) -> PeerInfo:
        return {"10.0.1.5": PeerInfo(65536, "c", "payments", "billing", ("k8s:app=billing",), True),
                "10.0.2.7": PeerInfo(131072, "c", "web", "frontend", ("k8s:app=frontend",), False)}.get(ip, PeerInfo(2))
    return IngestContext(resolve, node_name="c/n1")


addresses = st.sampled_from(["10.0.1.5", "10.0.2.7", "192.0.2.9"])
actions = st.sampled_from(["", "allow|p", "allow|a,b,c,+more", "deny-l7|p", "deny-l3l4|p,q", "deny-auth|p"])
records = st.builds(
    lambda start, src, sport, dst, method, authority, path, ua, rid, code, action, outcome, upstream, lat: HTTPRecord(
        start, (src, sport), (dst, 8080), method, authority, path, ua, rid,
        403 if outcome == "deny" else code,
        RBAC_DENIED.format(action) if outcome == "deny" else VIA_UPSTREAM if outcome == "upstream" else outcome,
        "" if outcome == "deny" else action,
        ("10.0.1.5", 18080) if upstream else None,
        start + lat if upstream and lat is not None else None),
    st.floats(1.7e9, 1.8e9), addresses, st.integers(1, 65535), addresses,
    st.sampled_from(["GET", "POST", "PROPFIND", "CONNECT", ""]), st.sampled_from(["", "a", "billing-service.payments:8080"]),
    st.sampled_from(["/", "/v1/charge", "/v1/charge?x=1", "*"]), st.sampled_from(["", "curl/8"]),
    st.sampled_from(["", "0123abcd"]), st.sampled_from([200, 400, 404, 503, 0]), actions,
    st.sampled_from(["deny", "upstream", "path_normalization_failed", "route_not_found",
                     "upstream_reset_before_response_started{remote_connection_failure}", ""]),
    st.booleans(), st.none() | st.floats(0, 5))


@given(records)
def test_the_engines_record_flows_equal_envoys_entry_flows(rec: HTTPRecord) -> None:
    c = ctx()
    assert http_record_flows(rec, c) == http_log_flows(access_log_entry(rec), c)
