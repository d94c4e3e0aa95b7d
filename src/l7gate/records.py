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
    the interface); `time_ns` is when the agent read it (wall clock). An ICMP packet (`proto`
    1) has no ports (`sport`, `dport` 0): its `icmp_type` and `icmp_code` say what it was."""

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
    icmp_type: int = 0
    icmp_code: int = 0


@dataclass(frozen=True, slots=True)
class DNSRecord:
    """A DNS query the node's DNS proxy judged, or the answer it released (`dnsproxy`'s
    `DNSEvent`, as the agent hands it on). `kind` is "request" or "response"; `source` the
    pod, `server` the resolver it asked; `qname` without its trailing dot; `rcode` a name
    ("NOERROR", "REFUSED", ...; empty when no answer was sent); `time` wall-clock seconds,
    `latency` seconds from the query to the released answer."""

    kind: str
    source: tuple[str, int]
    server: tuple[str, int]
    qname: str
    qtype: str
    protocol: str  # "udp" or "tcp"
    time: float
    allowed: bool = True
    reason: str = ""
    policies: tuple[str, ...] = ()
    rcode: str = ""
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    latency: float = 0.0
    error: str = ""


@dataclass(slots=True)
class HTTPRecord:
    """One request the h11 engine judged: what an Envoy HTTP access log entry says of it (the
    fields `observe.envoy_flows.http_log_flows` reads), without the protobuf round trip.
    `start` and `first_upstream_byte` are wall-clock seconds; `details` is Envoy's
    response_code_details; `action` the RBAC action name (`allow|…`, `deny-l7|…`).
    The engine fills one in as its request goes, then hands it over and never touches it
    again: the only record here that is not frozen (one object per request, not two)."""

    start: float
    src: tuple[str, int]
    dst: tuple[str, int]
    method: str = ""
    authority: str = ""
    path: str = ""
    user_agent: str = ""
    request_id: str = ""
    code: int = 0
    details: str = ""
    action: str = ""
    upstream: tuple[str, int] | None = None
    first_upstream_byte: float | None = None
