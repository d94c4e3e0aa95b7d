"""Records that cross from an enforcement backend to observability: defined once, here, below
both (the kernel datapath produces them, `observe` turns them into flows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KernelDrop:
    """A packet the kernel datapath dropped, decoded from its perf-ring record by
    `redirect_bpf.loader`. `reason` is the datapath's words ("Policy denied", "Authentication
    required", ...); `direction` says whose policy dropped it ("ingress": the destination's,
    "egress": the source's); `endpoint` and `ifindex` say where (the local endpoint's identity,
    the interface); `time_ns` is when the agent read it (wall clock)."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    reason: str
    direction: str
    src_identity: int
    dst_identity: int
    time_ns: int = 0
    endpoint: int = 0
    ifindex: int = 0
