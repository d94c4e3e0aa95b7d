"""The flow record: one verdict on one request, connection or packet, with Hubble's field names.

A `Flow` is immutable and self-contained: who talked to whom (each side's cluster, namespace,
pod, labels, identity, address and port), what the datapath decided (`verdict`, and for drops
`drop_reason_desc`), at which layer (`Type`: L3_L4 or L7), the HTTP request or response for L7
flows, the direction, whether it is a reply, the authentication in force, which policies decided
it, and a one-line `summary` — the SUMMARY column of `l7gate observe`.

Wire format. `flow_to_json` / `flow_from_json` are the one encode/decode pair (CONVENTIONS 3):
the JSON object Hubble prints with `hubble observe -o json` (Hubble's proto field names, in
their own spelling: `Type`, `IP`, `l4`, `Summary`, `is_reply`, `drop_reason_desc`, ...),
restricted to the fields l7gate fills, plus `policy_match` (the policy keys of the RBAC
decision; Hubble spreads this over `ingress_allowed_by` / `ingress_denied_by`). The admin API
streams flows in this form and the CLI decodes them back into `Flow` values.

Python attribute names are Hubble's too, lowercased where Hubble capitalises (`type` for
`Type`, `summary` for `Summary`), and the source/destination address and port sit on the
`Endpoint` instead of Hubble's separate `IP` and `l4` sections.

Sensitive HTTP headers are never stored: `safe_headers` drops them before a Flow is built, and
`flow_from_json` drops them again, so no path into a Flow carries them.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias


ICMPV4 = "ICMPv4"  # the l4 section's key of an ICMP flow, as Hubble writes it


class Verdict(enum.StrEnum):
    VERDICT_UNKNOWN = "VERDICT_UNKNOWN"
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    ERROR = "ERROR"
    AUDIT = "AUDIT"
    REDIRECTED = "REDIRECTED"


class FlowType(enum.StrEnum):
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    L3_L4 = "L3_L4"
    L7 = "L7"


class L7Type(enum.StrEnum):
    UNKNOWN_L7_TYPE = "UNKNOWN_L7_TYPE"
    REQUEST = "REQUEST"
    RESPONSE = "RESPONSE"


class TrafficDirection(enum.StrEnum):
    TRAFFIC_DIRECTION_UNKNOWN = "TRAFFIC_DIRECTION_UNKNOWN"
    INGRESS = "INGRESS"
    EGRESS = "EGRESS"


class AuthType(enum.StrEnum):
    DISABLED = "DISABLED"
    SPIRE = "SPIRE"
    TEST_ALWAYS_FAIL = "TEST_ALWAYS_FAIL"


# Drop reasons, as Hubble words them (`drop_reason_desc` and the SUMMARY of a drop).
POLICY_DENIED = "Policy denied"
POLICY_DENIED_L7 = "Policy denied (L7)"
AUTH_REQUIRED = "Authentication required"
AUTH_FAILED = "Authentication failed"  # an mTLS tunnel handshake refused a certificate
PLAINTEXT_REFUSED = "Plaintext refused"  # auth-required traffic that did not use the tunnel

# Hubble's event types: the `event_type.type` number of each kind of flow.
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_L7 = 129

# Headers whose values are credentials or session state. Matching is on the lowercased name;
# any name containing one of the fragments is dropped too (x-auth-token, x-session-id, ...).
SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-amz-security-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-forwarded-client-cert",
    }
)
_SENSITIVE_FRAGMENTS = ("auth", "token", "secret", "passw", "cookie", "session", "api-key",
                        "apikey", "credential", "signature")

# Bounds that keep one flow small whatever a client sends (a ring of N flows stays O(N)).
MAX_URL = 2048
MAX_HEADER_VALUE = 256
MAX_HEADERS = 16


def is_sensitive_header(name: str) -> bool:
    n = name.lower()
    return n in SENSITIVE_HEADERS or any(f in n for f in _SENSITIVE_FRAGMENTS)


def safe_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The headers a flow may keep: sensitive ones dropped, names lowercased, values and count
    bounded, sorted (deterministic output)."""
    kept = sorted(
        (k.lower(), v[:MAX_HEADER_VALUE]) for k, v in headers if k and not is_sensitive_header(k)
    )
    return tuple(kept[:MAX_HEADERS])


def clip_url(url: str) -> str:
    return url if len(url) <= MAX_URL else url[: MAX_URL - 3] + "..."


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a flow. `labels` are Hubble-style strings (`k8s:app=billing-service`,
    `reserved:world`); `pod_name` is empty for an address that is no pod (world, a CIDR)."""

    ip: str = ""
    port: int = 0
    identity: int = 0
    cluster_name: str = ""
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    """The Kubernetes Service a flow's side was reached as (Hubble's `source_service` /
    `destination_service`): the Service one of whose backends that address and port is."""

    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class HTTP:
    code: int = 0
    method: str = ""
    url: str = ""
    protocol: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """The path of `url`, without scheme, authority or query (what --http-path matches)."""
        url = self.url
        i = url.find("://")
        if i >= 0:
            j = url.find("/", i + 3)
            url = url[j:] if j >= 0 else "/"
        return url.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class DNS:
    """A DNS query or answer, as Hubble shows it (`l7.dns`): the name with its trailing dot,
    the answer's addresses and TTL, its CNAMEs, its rcode (0 NOERROR, 3 NXDOMAIN, 5 REFUSED)."""

    query: str = ""
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    rcode: int = 0
    qtypes: tuple[str, ...] = ()
    observation_source: str = "proxy"


@dataclass(frozen=True, slots=True)
class ICMP:
    """Hubble's `l4.ICMPv4`: the message's type and code (an ICMP flow has no ports)."""

    type: int = 0
    code: int = 0


@dataclass(frozen=True, slots=True)
class Layer7:
    type: L7Type = L7Type.UNKNOWN_L7_TYPE
    latency_ns: int = 0
    http: HTTP | None = None
    dns: DNS | None = None


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow. Immutable; safe to share between threads (the ring hands the same objects to
    every reader)."""

    time: int  # nanoseconds since the epoch
    verdict: Verdict
    type: FlowType
    source: Endpoint
    destination: Endpoint
    drop_reason_desc: str = ""
    l7: Layer7 | None = None
    traffic_direction: TrafficDirection = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    is_reply: bool = False
    auth_type: AuthType = AuthType.DISABLED
    policy_match: tuple[str, ...] = ()
    summary: str = ""
    node_name: str = ""
    protocol: str = "TCP"  # the l4 section's key: TCP, UDP, SCTP, ICMPv4 (others: "")
    source_service: Service | None = None
    destination_service: Service | None = None
    icmp: ICMP | None = None  # protocol ICMPv4: its type and code

    @property
    def http(self) -> HTTP | None:
        return self.l7.http if self.l7 is not None else None

    @property
    def event_type(self) -> int:
        if self.type is FlowType.L7:
            return EVENT_L7
        return EVENT_DROP if self.verdict is Verdict.DROPPED else EVENT_TRACE


class LazyFlows(Protocol):
    """An event's flows, decided but built only if something reads them: most flows are
    never read (the ring holds the latest, readers are few), so ingestion decides what an
    event's flows are and counts them, and leaves building them to the reader
    (`envoy_flows.HTTPLogRecord`, Envoy's access log entries). Thread-safe."""

    @property
    def count(self) -> int:
        """How many flows."""

    @property
    def shape(self) -> Hashable:
        """Two events of one shape give flows that count alike in every metric."""

    def flows(self) -> tuple[Flow, ...]:
        """The flows, built the way an eager converter builds them."""

    def lines(self, start: int, stop: int) -> bytes:
        """`api.flow_line` of flows `start` to `stop - 1`, possibly without building them."""


# One flow as the ring holds it: built, or flow `i` of a `LazyFlows`.
FlowItem: TypeAlias = "Flow | tuple[LazyFlows, int]"


def materialize(item: FlowItem) -> Flow:
    return item if isinstance(item, Flow) else item[0].flows()[item[1]]


class Materializer:
    """`materialize` for a run of items: the flows of one LazyFlows, adjacent as they are
    published, are built once. One per reader; not thread-safe."""

    __slots__ = ("_last", "_built")

    def __init__(self) -> None:
        self._last: LazyFlows | None = None
        self._built: tuple[Flow, ...] = ()

    def __call__(self, item: FlowItem) -> Flow:
        if isinstance(item, Flow):
            return item
        lazy, i = item
        if lazy is not self._last:
            self._last, self._built = lazy, lazy.flows()
        return self._built[i]


def materialize_all(items: Iterable[FlowItem]) -> list[Flow]:
    return list(map(Materializer(), items))


# -- wire format ---------------------------------------------------------------------------------


class FlowDecodeError(ValueError):
    """A JSON object that is not a flow this module wrote."""


_last_second: tuple[int, str] = (-1, "")


def format_time(ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds, as Hubble's JSON prints `time`."""
    global _last_second
    sec, frac = divmod(ns, 1_000_000_000)
    cached_sec, base = _last_second  # flows come in bursts within one second
    if cached_sec != sec:
        base = _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (sec, base)
    return f"{base}.{frac:09d}Z"


def parse_time(text: str) -> int:
    """RFC 3339 (any precision, `Z` or an offset) → nanoseconds since the epoch."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    frac_ns = 0
    dot = t.find(".")
    if dot >= 0:
        end = dot + 1
        while end < len(t) and t[end].isdigit():
            end += 1
        digits = t[dot + 1 : end]
        if not digits:
            raise ValueError(f"invalid timestamp {text!r}")
        frac_ns = int(digits[:9].ljust(9, "0"))
        t = t[:dot] + t[end:]
    try:
        dt = _dt.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"invalid RFC 3339 timestamp {text!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {text!r} needs a time zone (Z or +HH:MM)")
    return int(dt.timestamp()) * 1_000_000_000 + frac_ns


def _endpoint_json(e: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"identity": e.identity}
    if e.cluster_name:
        out["cluster_name"] = e.cluster_name
    if e.namespace:
        out["namespace"] = e.namespace
    if e.labels:
        out["labels"] = list(e.labels)
    if e.pod_name:
        out["pod_name"] = e.pod_name
    return out


def flow_to_json(f: Flow) -> dict[str, Any]:
    """The flow as Hubble's JSON (`hubble observe -o json`), restricted to the fields we fill."""
    out: dict[str, Any] = {
        "time": format_time(f.time),
        "verdict": f.verdict.value,
    }
    if f.drop_reason_desc:
        out["drop_reason_desc"] = f.drop_reason_desc
    s, d = f.source, f.destination
    out["IP"] = {"source": s.ip, "destination": d.ip, "ipVersion": "IPv6" if ":" in s.ip else "IPv4"}
    if f.protocol == ICMPV4:
        icmp = f.icmp or ICMP()
        out["l4"] = {ICMPV4: {"type": icmp.type, "code": icmp.code}}
    elif f.protocol:
        out["l4"] = {f.protocol: {"source_port": s.port, "destination_port": d.port}}
    out["source"] = _endpoint_json(s)
    out["destination"] = _endpoint_json(d)
    if f.source_service is not None:
        out["source_service"] = {"name": f.source_service.name, "namespace": f.source_service.namespace}
    if f.destination_service is not None:
        out["destination_service"] = {"name": f.destination_service.name,
                                      "namespace": f.destination_service.namespace}
    out["Type"] = f.type.value
    if f.node_name:
        out["node_name"] = f.node_name
    if f.l7 is not None:
        l7: dict[str, Any] = {"type": f.l7.type.value}
        if f.l7.latency_ns:
            l7["latency_ns"] = str(f.l7.latency_ns)  # uint64: a string in proto JSON
        h = f.l7.http
        if h is not None:
            http: dict[str, Any] = {}
            if h.code:
                http["code"] = h.code
            for k in ("method", "url", "protocol"):
                v = getattr(h, k)
                if v:
                    http[k] = v
            if h.headers:
                http["headers"] = [{"key": k, "value": v} for k, v in h.headers]
            l7["http"] = http
        dn = f.l7.dns
        if dn is not None:
            dns: dict[str, Any] = {"query": dn.query}
            if dn.ips:
                dns["ips"] = list(dn.ips)
            if dn.ttl:
                dns["ttl"] = dn.ttl
            if dn.cnames:
                dns["cnames"] = list(dn.cnames)
            if dn.rcode:
                dns["rcode"] = dn.rcode
            if dn.qtypes:
                dns["qtypes"] = list(dn.qtypes)
            dns["observation_source"] = dn.observation_source
            l7["dns"] = dns
        out["l7"] = l7
    out["event_type"] = {"type": f.event_type}
    out["traffic_direction"] = f.traffic_direction.value
    out["is_reply"] = f.is_reply
    out["auth_type"] = f.auth_type.value
    if f.policy_match:
        out["policy_match"] = list(f.policy_match)
    out["Summary"] = f.summary
    return out


def _enum(cls: type[enum.StrEnum], value: object, path: str, default: Any) -> Any:
    if value is None:
        return default
    if not isinstance(value, str):
        raise FlowDecodeError(f"{path}: expected a string, got {value!r}")
    try:
        return cls(value)
    except ValueError:
        raise FlowDecodeError(f"{path}: unknown value {value!r}") from None


def _int(value: object, path: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FlowDecodeError(f"{path}: expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise FlowDecodeError(f"{path}: expected an integer, got {value!r}") from None


def _str(value: object, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FlowDecodeError(f"{path}: expected a string, got {value!r}")
    return value


def _map(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FlowDecodeError(f"{path}: expected an object")
    return value


def _endpoint_from(d: Mapping[str, Any], ip: str, port: int, path: str) -> Endpoint:
    labels = d.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise FlowDecodeError(f"{path}.labels: expected a list of strings")
    return Endpoint(
        ip=ip,
        port=port,
        identity=_int(d.get("identity"), f"{path}.identity"),
        cluster_name=_str(d.get("cluster_name"), f"{path}.cluster_name"),
        namespace=_str(d.get("namespace"), f"{path}.namespace"),
        pod_name=_str(d.get("pod_name"), f"{path}.pod_name"),
        labels=tuple(labels),
    )


def _service_from(value: object, path: str) -> Service | None:
    if value is None:
        return None
    d = _map(value, path)
    return Service(_str(d.get("name"), f"{path}.name"), _str(d.get("namespace"), f"{path}.namespace"))


def flow_from_json(obj: object) -> Flow:
    """The inverse of `flow_to_json`; raises FlowDecodeError naming the field at fault."""
    d = _map(obj, "flow")
    if "time" not in d:
        raise FlowDecodeError("flow.time: is required")
    try:
        t = parse_time(_str(d["time"], "flow.time"))
    except ValueError as exc:
        raise FlowDecodeError(f"flow.time: {exc}") from None
    ip = _map(d.get("IP"), "flow.IP")
    l4 = _map(d.get("l4"), "flow.l4")
    protocol = next((p for p in ("TCP", "UDP", "SCTP", ICMPV4) if p in l4), "")
    ports = _map(l4.get(protocol), f"flow.l4.{protocol}") if protocol else {}
    icmp: ICMP | None = None
    if protocol == ICMPV4:
        icmp = ICMP(_int(ports.get("type"), "flow.l4.ICMPv4.type"), _int(ports.get("code"), "flow.l4.ICMPv4.code"))
        ports = {}
    src = _endpoint_from(
        _map(d.get("source"), "flow.source"), _str(ip.get("source"), "flow.IP.source"),
        _int(ports.get("source_port", 0), f"flow.l4.{protocol}.source_port"), "flow.source",
    )
    dst = _endpoint_from(
        _map(d.get("destination"), "flow.destination"), _str(ip.get("destination"), "flow.IP.destination"),
        _int(ports.get("destination_port", 0), f"flow.l4.{protocol}.destination_port"), "flow.destination",
    )
    l7: Layer7 | None = None
    if d.get("l7") is not None:
        l7d = _map(d["l7"], "flow.l7")
        http: HTTP | None = None
        if l7d.get("http") is not None:
            hd = _map(l7d["http"], "flow.l7.http")
            raw_headers = hd.get("headers") or []
            if not isinstance(raw_headers, list):
                raise FlowDecodeError("flow.l7.http.headers: expected a list")
            pairs = []
            for i, h in enumerate(raw_headers):
                hm = _map(h, f"flow.l7.http.headers[{i}]")
                pairs.append((_str(hm.get("key"), f"flow.l7.http.headers[{i}].key"),
                              _str(hm.get("value"), f"flow.l7.http.headers[{i}].value")))
            http = HTTP(
                code=_int(hd.get("code"), "flow.l7.http.code"),
                method=_str(hd.get("method"), "flow.l7.http.method"),
                url=_str(hd.get("url"), "flow.l7.http.url"),
                protocol=_str(hd.get("protocol"), "flow.l7.http.protocol"),
                headers=safe_headers(pairs),
            )
        dns: DNS | None = None
        if l7d.get("dns") is not None:
            dd = _map(l7d["dns"], "flow.l7.dns")
            lists = {}
            for k in ("ips", "cnames", "qtypes"):
                v = dd.get(k) or []
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise FlowDecodeError(f"flow.l7.dns.{k}: expected a list of strings")
                lists[k] = tuple(v)
            dns = DNS(query=_str(dd.get("query"), "flow.l7.dns.query"), ips=lists["ips"],
                      ttl=_int(dd.get("ttl"), "flow.l7.dns.ttl"), cnames=lists["cnames"],
                      rcode=_int(dd.get("rcode"), "flow.l7.dns.rcode"), qtypes=lists["qtypes"],
                      observation_source=_str(dd.get("observation_source"), "flow.l7.dns.observation_source")
                      or "proxy")
        l7 = Layer7(
            type=_enum(L7Type, l7d.get("type"), "flow.l7.type", L7Type.UNKNOWN_L7_TYPE),
            latency_ns=_int(l7d.get("latency_ns"), "flow.l7.latency_ns"),
            http=http,
            dns=dns,
        )
    pm = d.get("policy_match") or []
    if not isinstance(pm, list) or not all(isinstance(x, str) for x in pm):
        raise FlowDecodeError("flow.policy_match: expected a list of strings")
    reply = d.get("is_reply", False)
    if not isinstance(reply, bool):
        raise FlowDecodeError("flow.is_reply: expected true or false")
    return Flow(
        time=t,
        verdict=_enum(Verdict, d.get("verdict"), "flow.verdict", Verdict.VERDICT_UNKNOWN),
        type=_enum(FlowType, d.get("Type"), "flow.Type", FlowType.UNKNOWN_TYPE),
        source=src,
        destination=dst,
        drop_reason_desc=_str(d.get("drop_reason_desc"), "flow.drop_reason_desc"),
        l7=l7,
        traffic_direction=_enum(
            TrafficDirection, d.get("traffic_direction"), "flow.traffic_direction",
            TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN,
        ),
        is_reply=reply,
        auth_type=_enum(AuthType, d.get("auth_type"), "flow.auth_type", AuthType.DISABLED),
        policy_match=tuple(pm),
        summary=_str(d.get("Summary"), "flow.Summary"),
        node_name=_str(d.get("node_name"), "flow.node_name"),
        protocol=protocol,
        source_service=_service_from(d.get("source_service"), "flow.source_service"),
        destination_service=_service_from(d.get("destination_service"), "flow.destination_service"),
        icmp=icmp,
    )
