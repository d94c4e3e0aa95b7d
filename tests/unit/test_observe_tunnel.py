"""Flows of the mTLS tunnel: the caller comes from the client certificate (the connection
comes from the other node's Envoy), refused handshakes become DROPPED flows naming the reason."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format

from l7gate.observe.flow import AUTH_FAILED, POLICY_DENIED, POLICY_DENIED_L7, AuthType, FlowType, TrafficDirection, Verdict
from l7gate.observe.envoy_flows import tcp_log_flows, tls_reason

from .test_observe_data import BILLING_ID, BILLING_IP, CTX, FRONTEND_ID, FRONTEND_IP, flows

NODE_B = "127.77.2.1"  # the source node's Envoy, as the destination sees the connection
TUNNEL = {"socketAddress": {"address": "127.77.1.1", "portValue": 15443}}


def _cert(*uris: str) -> dict[str, object]:
    return {"tlsProperties": {"tlsVersion": "TLSv1_3", "peerCertificateProperties": {
        "subjectAltName": [{"uri": u} for u in uris]}}}


def tunnelled(*uris: str, **request: object) -> dict[str, object]:
    return {
        "common_properties": {
            **_cert(*uris),
            "downstreamDirectRemoteAddress": {"socketAddress": {"address": NODE_B, "portValue": 40000}},
            "downstreamRemoteAddress": {"socketAddress": {"address": NODE_B, "portValue": 40000}},
            "downstreamLocalAddress": TUNNEL,
        },
        "request": {"forwardedFor": f"{FRONTEND_IP},{NODE_B}",
                    "requestHeaders": {"x-envoy-original-dst-host": f"{BILLING_IP}:8080"}, **request},
    }


def test_tunnelled_request_names_the_certificates_identity_and_the_real_endpoints() -> None:
    req, resp = flows("allowed", **tunnelled(f"spiffe://l7gate.local/identity/{FRONTEND_ID}"))
    assert req.verdict is Verdict.FORWARDED and req.auth_type is AuthType.SPIRE
    assert (req.source.ip, req.source.identity) == (FRONTEND_IP, FRONTEND_ID)
    assert (req.destination.ip, req.destination.port, req.destination.identity) == (BILLING_IP, 8080, BILLING_ID)


def test_a_forged_forwarded_for_does_not_change_the_identity() -> None:
    # The pod claimed the billing address in X-Forwarded-For; the source node's Envoy appended
    # the true one. The certificate's identity wins over any address.
    (req, _) = flows("allowed", **tunnelled(f"spiffe://l7gate.local/identity/{FRONTEND_ID}",
                                             forwardedFor=f"{BILLING_IP},{FRONTEND_IP},{NODE_B}"))
    assert (req.source.ip, req.source.identity) == (FRONTEND_IP, FRONTEND_ID)
    (req, _) = flows("allowed", **tunnelled(f"spiffe://l7gate.local/identity/{FRONTEND_ID}",
                                             forwardedFor=f"{FRONTEND_IP},{BILLING_IP},{NODE_B}"))
    assert req.source.identity == FRONTEND_ID and req.source.pod_name == ""


def test_two_uri_sans_name_no_identity() -> None:
    (req, *_) = flows("allowed", **tunnelled(f"spiffe://l7gate.local/identity/{FRONTEND_ID}",
                                              f"spiffe://l7gate.local/identity/{BILLING_ID}"))
    assert req.source.identity == 0
    (f,) = flows("denied_l3l4_world", **tunnelled(f"spiffe://l7gate.local/identity/{FRONTEND_ID}",
                                            f"spiffe://l7gate.local/identity/{BILLING_ID}"))
    assert f.verdict is Verdict.DROPPED and "2 URI SANs" in f.summary and f.source.identity == 0


def test_upstream_tls_failure_is_authentication_failed_with_the_reason() -> None:
    reason = ("TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert "
              "failed: X509_verify_cert: certificate verification error at depth 0: certificate has expired")
    (f,) = flows("allowed", common_properties={"upstreamTransportFailureReason": reason},
                 response={"responseCode": 503, "responseCodeDetails": "upstream_reset_before_response_started"})
    assert f.verdict is Verdict.DROPPED and f.drop_reason_desc == AUTH_FAILED
    assert "certificate expired" in f.summary


def _tcp(**cp: object) -> accesslog_pb2.TCPAccessLogEntry:
    return json_format.ParseDict({"commonProperties": cp}, accesslog_pb2.TCPAccessLogEntry())


def test_refused_handshakes_at_the_tunnel_listener() -> None:
    src = {"socketAddress": {"address": NODE_B, "portValue": 40000}}
    (f,) = tcp_log_flows(_tcp(downstreamDirectRemoteAddress=src, downstreamLocalAddress=TUNNEL,
                              downstreamTransportFailureReason="TLS_error:|...:TLSV1_ALERT_UNKNOWN_CA:..."), CTX)
    assert f.verdict is Verdict.DROPPED and f.drop_reason_desc == AUTH_FAILED
    assert "unknown CA" in f.summary and f.source.ip == NODE_B
    (f,) = tcp_log_flows(_tcp(downstreamDirectRemoteAddress=src, downstreamLocalAddress=TUNNEL,
                              tlsProperties={"tlsSniHostname": "65536.rogue.example"},
                              responseFlags={"noRouteFound": True}), CTX)
    assert "65536.rogue.example" in f.summary
    # Envoy leaves the addresses out for some refused handshakes: still a flow.
    (f,) = tcp_log_flows(_tcp(downstreamTransportFailureReason="...CERTIFICATE_REQUIRED..."), CTX)
    assert f.source.ip == "" and "no client certificate" in f.summary
    # A connection that worked: its requests have their own flows.
    assert tcp_log_flows(_tcp(downstreamDirectRemoteAddress=src, downstreamLocalAddress=TUNNEL), CTX) == ()


def test_tls_reasons_in_words() -> None:
    assert tls_reason("SSLV3_ALERT_CERTIFICATE_EXPIRED") == "certificate expired"
    assert tls_reason("...unable to get local issuer certificate") .startswith("certificate from an unknown CA")
    assert tls_reason("something else") == "TLS handshake failed"


# -- the TCP variant (CONNECT) --------------------------------------------------------------------


def _connect(details: str, code: int, action: str, **cp: object) -> dict[str, object]:
    e = tunnelled(f"spiffe://l7gate.local/identity/{FRONTEND_ID}",
                  requestMethod="CONNECT", path="", authority=f"{BILLING_IP}:8080", requestBodyBytes="34")
    common = dict(e["common_properties"])  # type: ignore[arg-type]
    common["metadata"] = {"filterMetadata": {"envoy.filters.http.rbac": {"enforced_effective_policy_id": action}}}
    common.update(cp)
    e["common_properties"] = common
    e["response"] = {"responseCode": code, "responseCodeDetails": details, "responseBodyBytes": "39"}
    e["protocolVersion"] = "HTTP2"
    return e


def test_connect_through_the_tunnel_is_an_l3l4_flow_with_the_bytes() -> None:
    up = {"upstreamRemoteAddress": {"socketAddress": {"address": BILLING_IP, "portValue": 8080}}}
    (f,) = flows("allowed", **_connect("via_upstream", 200, "allow|CiliumNetworkPolicy/prod/ledger", **up))
    assert f.verdict is Verdict.FORWARDED and f.type is FlowType.L3_L4 and f.l7 is None
    assert f.auth_type is AuthType.SPIRE and f.policy_match == ("CiliumNetworkPolicy/prod/ledger",)
    assert (f.source.ip, f.source.identity) == (FRONTEND_IP, FRONTEND_ID)
    assert (f.destination.ip, f.destination.port) == (BILLING_IP, 8080)
    assert "34 bytes in, 39 bytes out" in f.summary


def test_connect_refused_names_why() -> None:
    deny = "rbac_access_denied_matched_policy[deny-l7|CiliumNetworkPolicy/prod/ledger-http]"
    (f,) = flows("allowed", **_connect(deny, 403, "deny-l7|CiliumNetworkPolicy/prod/ledger-http"))
    assert f.verdict is Verdict.DROPPED and f.type is FlowType.L3_L4
    assert f.drop_reason_desc == POLICY_DENIED_L7 and "cannot be checked" in f.summary
    relay = "rbac_access_denied_matched_policy[deny-relay|]"
    (f,) = flows("allowed", **_connect(relay, 403, "deny-relay|"))
    assert f.verdict is Verdict.DROPPED and "not an endpoint port of this node" in f.summary


def test_source_side_tcp_failures() -> None:
    pod = {"socketAddress": {"address": FRONTEND_IP, "portValue": 41000}}
    dst = {"socketAddress": {"address": BILLING_IP, "portValue": 8080}}
    peer = {"socketAddress": {"address": "127.77.1.1", "portValue": 15443}}
    base = {"downstreamDirectRemoteAddress": pod, "downstreamLocalAddress": dst, "upstreamRemoteAddress": peer}
    (f,) = tcp_log_flows(_tcp(**base, upstreamTransportFailureReason="tunnel_response:403",
                              responseFlags={"upstreamConnectionFailure": True}), CTX)
    assert f.verdict is Verdict.DROPPED and f.drop_reason_desc == POLICY_DENIED
    assert f.traffic_direction is TrafficDirection.EGRESS and f.source.identity == FRONTEND_ID
    assert "refused the connection (CONNECT answered 403)" in f.summary
    tls = "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher"
    (f,) = tcp_log_flows(_tcp(**base, upstreamTransportFailureReason=tls,
                              responseFlags={"upstreamConnectionFailure": True}), CTX)
    assert f.drop_reason_desc == AUTH_FAILED and "SPIFFE ID not accepted" in f.summary
    (f,) = tcp_log_flows(_tcp(**base, upstreamTransportFailureReason="delayed connect error: Connection refused",
                              responseFlags={"upstreamConnectionFailure": True}), CTX)
    assert f.verdict is Verdict.ERROR and "Connection refused" in f.summary
