"""Recorded Envoy access log entries and the flows they give, shared by the observe tests.

`RECORDED` holds entries a real Envoy configured by the agent sent over ALS in loopback mode
(tests/integration/loopback.py world, subnet 77; Envoy 1.36), as proto JSON: the seed's allowed
call, its L7 denial, an escaped slash refused by path normalization, a request from an address
that is no pod (world: denied at L3/L4), and an allowed request whose upstream was down.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format

from l7gate.observe.flow import Flow
from l7gate.observe.envoy_flows import http_log_flows
from l7gate.observe.ingest_context import IngestContext, PeerInfo

FRONTEND_IP = "127.77.2.55"
BILLING_IP = "127.77.1.10"
BILLING2_IP = "127.77.1.11"
FRONTEND_ID = 131328
BILLING_ID = 65792

RECORDED: dict[str, str] = {
    'allowed': '{"commonProperties": {"accessLogType": "DownstreamEnd", "downstreamDirectRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 57101}}, "downstreamLocalAddress": {"socketAddress": {"address": "127.77.1.10", "portValue": 8080}}, "downstreamRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 57101}}, "downstreamWireBytesReceived": "79", "downstreamWireBytesSent": "167", "duration": "0.001966921s", "metadata": {"filterMetadata": {"envoy.filters.http.rbac": {"enforced_effective_policy_id": "allow|CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api", "enforced_engine_result": "allowed"}}}, "routeName": "l7gate", "startTime": "2026-11-26T10:18:45.159619Z", "streamId": "4ad7a96c-4a18-403f-b854-11c8ee2ee407", "timeToFirstDownstreamTxByte": "0.001870818s", "timeToFirstUpstreamRxByte": "0.001708968s", "timeToFirstUpstreamTxByte": "0.000787980s", "timeToLastDownstreamTxByte": "0.001947432s", "timeToLastRxByte": "0.000048392s", "timeToLastUpstreamRxByte": "0.001896616s", "timeToLastUpstreamTxByte": "0.000788081s", "upstreamCluster": "l7g_up_127.77.1.10_8080", "upstreamLocalAddress": {"socketAddress": {"address": "127.0.0.1", "portValue": 47816}}, "upstreamRemoteAddress": {"socketAddress": {"address": "127.77.1.10", "portValue": 18080}}, "upstreamRequestAttemptCount": 1, "upstreamWireBytesReceived": "154", "upstreamWireBytesSent": "264"}, "protocolVersion": "HTTP11", "request": {"authority": "billing-service.payments", "downstreamHeaderBytesReceived": "49", "forwardedFor": "127.77.2.55", "path": "/v1/charge", "requestHeadersBytes": "251", "requestId": "4ad7a96c-4a18-403f-b854-11c8ee2ee407", "requestMethod": "POST", "scheme": "http", "upstreamHeaderBytesSent": "236"}, "response": {"downstreamHeaderBytesSent": "106", "responseBodyBytes": "42", "responseCode": 200, "responseCodeDetails": "via_upstream", "responseHeadersBytes": "100", "upstreamHeaderBytesReceived": "90"}}',
    'denied_l7': '{"commonProperties": {"accessLogType": "DownstreamEnd", "downstreamDirectRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 40763}}, "downstreamLocalAddress": {"socketAddress": {"address": "127.77.1.10", "portValue": 8080}}, "downstreamRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 40763}}, "downstreamWireBytesReceived": "84", "downstreamWireBytesSent": "143", "duration": "0.000134519s", "metadata": {"filterMetadata": {"envoy.filters.http.rbac": {"enforced_effective_policy_id": "deny-l7|CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api", "enforced_engine_result": "denied"}}}, "routeName": "l7gate", "startTime": "2026-11-26T10:18:45.162164Z", "streamId": "9e160706-e554-4dd9-b024-601dea86cc0e", "timeToFirstDownstreamTxByte": "0.000112316s", "timeToLastDownstreamTxByte": "0.000132406s", "timeToLastRxByte": "0.000026148s"}, "protocolVersion": "HTTP11", "request": {"authority": "billing-service.payments", "downstreamHeaderBytesReceived": "49", "forwardedFor": "127.77.2.55", "path": "/v1/transactions", "requestHeadersBytes": "221", "requestId": "9e160706-e554-4dd9-b024-601dea86cc0e", "requestMethod": "GET", "scheme": "http"}, "response": {"downstreamHeaderBytesSent": "98", "responseBodyBytes": "19", "responseCode": 403, "responseCodeDetails": "rbac_access_denied_matched_policy[deny-l7|CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api]", "responseHeadersBytes": "92"}}',
    'path_normalization': '{"commonProperties": {"accessLogType": "DownstreamEnd", "downstreamDirectRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 43543}}, "downstreamLocalAddress": {"socketAddress": {"address": "127.77.1.10", "portValue": 8080}}, "downstreamRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 43543}}, "downstreamWireBytesReceived": "81", "downstreamWireBytesSent": "118", "duration": "0.000040450s", "startTime": "2026-11-26T10:18:45.162652Z", "timeToFirstDownstreamTxByte": "0.000035012s", "timeToLastDownstreamTxByte": "0.000039248s", "timeToLastRxByte": "0.000014922s"}, "protocolVersion": "HTTP11", "request": {"authority": "billing-service.payments", "downstreamHeaderBytesReceived": "49", "path": "/v1/refund", "requestHeadersBytes": "75", "requestMethod": "POST"}, "response": {"downstreamHeaderBytesSent": "90", "responseCode": 400, "responseCodeDetails": "path_normalization_failed", "responseHeadersBytes": "69"}}',
    'denied_l3l4_world': '{"commonProperties": {"accessLogType": "DownstreamEnd", "downstreamDirectRemoteAddress": {"socketAddress": {"address": "127.0.0.1", "portValue": 33103}}, "downstreamLocalAddress": {"socketAddress": {"address": "127.77.1.10", "portValue": 8080}}, "downstreamRemoteAddress": {"socketAddress": {"address": "127.0.0.1", "portValue": 33103}}, "downstreamWireBytesReceived": "79", "downstreamWireBytesSent": "143", "duration": "0.000055653s", "metadata": {"filterMetadata": {"envoy.filters.http.rbac": {"enforced_effective_policy_id": "deny-l3l4|CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api,CiliumClusterwideNetworkPolicy/default-deny-all-pods", "enforced_engine_result": "denied"}}}, "routeName": "l7gate", "startTime": "2026-11-26T10:18:45.162949Z", "streamId": "5bcab7eb-fa77-47f6-8df7-badc6eb31c42", "timeToFirstDownstreamTxByte": "0.000049224s", "timeToLastDownstreamTxByte": "0.000054041s", "timeToLastRxByte": "0.000012319s"}, "protocolVersion": "HTTP11", "request": {"authority": "billing-service.payments", "downstreamHeaderBytesReceived": "49", "forwardedFor": "192.0.2.2", "path": "/v1/charge", "requestHeadersBytes": "212", "requestId": "5bcab7eb-fa77-47f6-8df7-badc6eb31c42", "requestMethod": "POST", "scheme": "http"}, "response": {"downstreamHeaderBytesSent": "98", "responseBodyBytes": "19", "responseCode": 403, "responseCodeDetails": "rbac_access_denied_matched_policy[deny-l3l4|CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api,CiliumClusterwideNetworkPolicy/default-deny-all-pods]", "responseHeadersBytes": "92"}}',
    'upstream_down': '{"commonProperties": {"accessLogType": "DownstreamEnd", "downstreamDirectRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 45505}}, "downstreamLocalAddress": {"socketAddress": {"address": "127.77.1.11", "portValue": 8080}}, "downstreamRemoteAddress": {"socketAddress": {"address": "127.77.2.55", "portValue": 45505}}, "downstreamWireBytesReceived": "79", "downstreamWireBytesSent": "232", "duration": "0.000613952s", "metadata": {"filterMetadata": {"envoy.filters.http.rbac": {"enforced_effective_policy_id": "allow|CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api", "enforced_engine_result": "allowed"}}}, "responseFlags": {"upstreamConnectionFailure": true}, "routeName": "l7gate", "startTime": "2026-11-26T10:18:45.635684Z", "streamId": "8c8b1a91-b27d-4406-aa61-ec5096dbae9f", "timeToFirstDownstreamTxByte": "0.000542426s", "timeToLastDownstreamTxByte": "0.000598819s", "timeToLastRxByte": "0.000051236s", "upstreamCluster": "l7g_up_127.77.1.11_8080", "upstreamRemoteAddress": {"socketAddress": {"address": "127.77.1.11", "portValue": 18080}}, "upstreamRequestAttemptCount": 1, "upstreamTransportFailureReason": "delayed connect error: Connection refused"}, "protocolVersion": "HTTP11", "request": {"authority": "billing-service.payments", "downstreamHeaderBytesReceived": "49", "forwardedFor": "127.77.2.55", "path": "/v1/charge", "requestHeadersBytes": "251", "requestId": "8c8b1a91-b27d-4406-aa61-ec5096dbae9f", "requestMethod": "POST", "scheme": "http"}, "response": {"downstreamHeaderBytesSent": "98", "responseBodyBytes": "98", "responseCode": 503, "responseCodeDetails": "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}", "responseHeadersBytes": "92"}}',
}

PEERS = {
    FRONTEND_IP: PeerInfo(
        FRONTEND_ID, "cluster-b", "web", "frontend-service-abc",
        ("k8s:app=frontend-service", "k8s:env=prod", "k8s:io.cilium.k8s.policy.cluster=cluster-b",
         "k8s:io.kubernetes.pod.namespace=web", "k8s:team=web"),
    ),
    BILLING_IP: PeerInfo(
        BILLING_ID, "cluster-a", "payments", "billing-service-xyz",
        ("k8s:app=billing-service", "k8s:env=prod", "k8s:io.cilium.k8s.policy.cluster=cluster-a",
         "k8s:io.kubernetes.pod.namespace=payments", "k8s:team=payments"),
        local=True,
    ),
    BILLING2_IP: PeerInfo(
        BILLING_ID, "cluster-a", "payments", "billing-service-k2m4p",
        ("k8s:app=billing-service", "k8s:env=prod", "k8s:io.cilium.k8s.policy.cluster=cluster-a",
         "k8s:io.kubernetes.pod.namespace=payments", "k8s:team=payments"),
        local=True,
    ),
}
WORLD = PeerInfo(2, labels=("reserved:world",))


def resolve(ip: str) -> PeerInfo:
    import ipaddress

    ipaddress.ip_address(ip)  # ValueError on junk, as the agent's resolver
    return PEERS.get(ip, WORLD)


CTX = IngestContext(resolve, node_name="cluster-a/node-a1", now=lambda: 1_700_000_000_000_000_000)


def entry(name: str, **changes: Any) -> Any:
    """A recorded entry as an HTTPAccessLogEntry; `changes` are merged into its proto JSON."""
    obj = json.loads(RECORDED[name])
    _merge(obj, changes)
    return json_format.ParseDict(obj, accesslog_pb2.HTTPAccessLogEntry())


def _merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def flows(name: str, **changes: Any) -> tuple[Flow, ...]:
    return tuple(http_log_flows(entry(name, **changes), CTX))


def recorded_flows() -> list[Flow]:
    """Every recorded entry's flows, in order (the corpus the filter and render tests use)."""
    return [f for name in RECORDED for f in flows(name)]
