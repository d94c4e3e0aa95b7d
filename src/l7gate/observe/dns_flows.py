"""DNS proxy records → flows: the ``dns`` source.

Its events are `records.DNSRecord` values (the node's DNS proxy, through the agent). As Hubble
shows them: a query is a `dns-request` flow (FORWARDED when policy allowed it, DROPPED
"Policy denied (L7)" with the REFUSED answer's rcode when not), its answer a `dns-response`
flow (`is_reply`, the addresses, TTL and CNAMEs, the latency; ERROR when the proxy answered
SERVFAIL or nothing). Names carry their trailing dot, as in Hubble.
"""

from __future__ import annotations

from ..records import DNSRecord
from .flow import DNS, POLICY_DENIED_L7, Flow, FlowType, L7Type, Layer7, TrafficDirection, Verdict
from .ingest_context import IngestContext, MalformedEvent, endpoint

SOURCE_DNS = "dns"
RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}
_MAX_TIME = 1 << 62


def dns_flows(rec: DNSRecord, ctx: IngestContext) -> tuple[Flow, ...]:
    if not isinstance(rec, DNSRecord):
        raise MalformedEvent(f"expected a DNSRecord, got {type(rec).__name__}")
    t = int(rec.time * 1e9)
    if not 0 < t < _MAX_TIME:
        raise MalformedEvent(f"time {rec.time} is not a time")
    name = rec.qname if rec.qname.endswith(".") else rec.qname + "."
    pod = endpoint(rec.source[0], rec.source[1], ctx.resolve(rec.source[0]))
    server = endpoint(rec.server[0], rec.server[1], ctx.resolve(rec.server[0]))
    proto = rec.protocol.upper()
    qtypes = (rec.qtype,) if rec.qtype else ()
    if rec.kind == "request":
        dns = DNS(query=name, qtypes=qtypes, rcode=0 if rec.allowed else RCODES.get(rec.rcode or "REFUSED", 5))
        return (Flow(
            time=t, verdict=Verdict.FORWARDED if rec.allowed else Verdict.DROPPED, type=FlowType.L7,
            source=pod, destination=server, protocol=proto,
            drop_reason_desc="" if rec.allowed else POLICY_DENIED_L7,
            l7=Layer7(L7Type.REQUEST, 0, dns=dns), traffic_direction=TrafficDirection.EGRESS,
            policy_match=rec.policies, summary=f"DNS Query {name} {rec.qtype}".rstrip(), node_name=ctx.node_name,
        ),)
    if rec.kind != "response":
        raise MalformedEvent(f"unknown DNS record kind {rec.kind!r}")
    latency = max(0, int(rec.latency * 1e9))
    ok = rec.rcode in ("NOERROR", "NXDOMAIN") and not rec.error
    dns = DNS(query=name, ips=rec.ips, ttl=rec.ttl, cnames=tuple(c if c.endswith(".") else c + "." for c in rec.cnames),
              rcode=RCODES.get(rec.rcode, 2 if rec.rcode else 0), qtypes=qtypes)
    if ok:
        shown = ",".join(rec.ips)
        summary = f'DNS Answer "{shown}" TTL: {rec.ttl} (Proxy {name} {rec.qtype})' if rec.ips else \
            f"DNS Answer RCode: {rec.rcode} (Proxy {name} {rec.qtype})"
    else:
        summary = f"DNS Answer {rec.rcode or 'none'}: {rec.error or 'no answer'} (Proxy {name} {rec.qtype})"
    return (Flow(
        time=t, verdict=Verdict.FORWARDED if ok else Verdict.ERROR, type=FlowType.L7,
        source=server, destination=pod, protocol=proto, l7=Layer7(L7Type.RESPONSE, latency, dns=dns),
        traffic_direction=TrafficDirection.EGRESS, is_reply=True, policy_match=rec.policies, summary=summary,
        node_name=ctx.node_name,
    ),)
