"""Kernel drop events become DROPPED L3_L4 flows."""

from __future__ import annotations

from l7gate.observe.flow import FlowType, TrafficDirection, Verdict, flow_from_json, flow_to_json
from l7gate.observe.ingest_context import IngestContext, MalformedEvent, PeerInfo
from l7gate.observe.kernel_flows import kernel_drop_flows
from l7gate.records import KernelDrop


def resolve(ip: str) -> PeerInfo:
    return {
        "10.0.2.55": PeerInfo(131072, "cluster-b", "web", "frontend-service-abc", ("k8s:app=frontend-service",)),
        "10.0.1.10": PeerInfo(65536, "cluster-a", "payments", "billing-service-xyz", ("k8s:app=billing-service",), True),
    }.get(ip, PeerInfo(2, labels=("reserved:world",)))


def test_kernel_drop_is_a_dropped_l3l4_flow() -> None:
    ev = KernelDrop("10.0.2.55", "10.0.1.10", 40000, 9090, 6, "Policy denied", "ingress", 131072, 65536, 123)
    (f,) = kernel_drop_flows(ev, IngestContext(resolve, node_name="cluster-a/a1"))
    assert (f.verdict, f.type, f.drop_reason_desc, f.summary) == (Verdict.DROPPED, FlowType.L3_L4, "Policy denied", "Policy denied")
    assert f.source.pod_name == "frontend-service-abc" and f.destination.port == 9090
    assert f.traffic_direction is TrafficDirection.INGRESS and f.protocol == "TCP"
    again = flow_from_json(flow_to_json(f))
    assert again == f


def test_udp_drop_keeps_its_protocol_and_auth_drop_names_it() -> None:
    ev = KernelDrop("10.0.2.55", "10.0.1.10", 5353, 53, 17, "Authentication required", "ingress", 131072, 65536, 1)
    (f,) = kernel_drop_flows(ev, IngestContext(resolve))
    assert f.protocol == "UDP" and f.drop_reason_desc == "Authentication required"
    assert flow_to_json(f)["l4"] == {"UDP": {"source_port": 5353, "destination_port": 53}}


def test_not_a_kernel_drop_is_malformed() -> None:
    try:
        kernel_drop_flows({"saddr": "x"}, IngestContext(resolve))
    except MalformedEvent:
        pass
    else:
        raise AssertionError("a dict must be refused")
