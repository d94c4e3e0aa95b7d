"""Kernel datapath drops → flows: the ``bpf-drop`` source.

Its events are `records.KernelDrop` values, the perf-ring records decoded in `redirect_bpf`
(addresses, ports, drop reason, identities); each gives one DROPPED L3_L4 flow ("Policy denied",
"Authentication required", ...). An ICMP drop's flow carries the message's type and code
(Hubble's `l4.ICMPv4`) and names the type in its summary ("Policy denied (ICMPv4 EchoRequest)").
"""

from __future__ import annotations

from ..policy.icmp import icmp_type_name
from ..records import KernelDrop
from .flow import (
    AUTH_REQUIRED,
    ICMP,
    ICMPV4,
    PLAINTEXT_REFUSED,
    AuthType,
    Flow,
    FlowType,
    TrafficDirection,
    Verdict,
)
from .ingest_context import IngestContext, MalformedEvent, PeerInfo, endpoint

SOURCE_KERNEL = "bpf-drop"
_L4 = {6: "TCP", 17: "UDP", 132: "SCTP", 1: ICMPV4}


def kernel_drop_flows(event: KernelDrop, ctx: IngestContext) -> tuple[Flow, ...]:
    """One DROPPED L3_L4 flow per kernel drop."""
    # The pipeline hands a converter whatever its producer offered: check before trusting the type.
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
    protocol = _L4.get(event.proto, "")
    icmp: ICMP | None = None
    summary = event.reason
    if protocol == ICMPV4:
        icmp = ICMP(event.icmp_type, event.icmp_code)
        summary = f"{event.reason} (ICMPv4 {icmp_type_name(event.icmp_type) or f'type {event.icmp_type}'})"
    return (
        Flow(
            time=event.time_ns or ctx.now(),
            verdict=Verdict.DROPPED,
            type=FlowType.L3_L4,
            source=endpoint(event.saddr, event.sport, src),
            destination=endpoint(event.daddr, event.dport, dst),
            drop_reason_desc=event.reason,
            traffic_direction=direction,
            auth_type=auth,
            summary=summary,
            node_name=ctx.node_name,
            protocol=protocol,
            icmp=icmp,
        ),
    )
