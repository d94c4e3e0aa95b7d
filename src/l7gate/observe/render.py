"""Flows as text: the seed article's table, Hubble's compact line, JSON and jsonpb.

- ``text``: `TIMESTAMP  SOURCE -> DESTINATION  TYPE  VERDICT  SUMMARY`, as in the seed
  article. A peer is `namespace/pod (ip)` when it is in the agent's own cluster (the cluster
  part of the flow's `node_name`, `cluster/node`), `cluster/namespace/pod (ip)` otherwise, and
  `ip (world)` / `ip (ID:n)` for an address that is no pod. TYPE is `http-request`,
  `http-response`, or `l7` for an L7 flow that ends the request without a response (a denial,
  an error); L3/L4 flows read `l3-l4`, or `drop` when dropped.
- ``compact``: Hubble's one-liner, `TIME: SRC:PORT (ID:n) -> DST:PORT (ID:n) TYPE VERDICT (SUMMARY)`
  (no `:PORT` for ICMP).
- ``json``: one flow object per line (`flow.flow_to_json`).
- ``jsonpb``: one `{"flow": ..., "node_name": ..., "time": ...}` per line, as Hubble's
  GetFlowsResponse.

Times print in the local time zone unless a `tz` is given.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence

from ..identity.numeric import RESERVED_NAMES
from .flow import ICMPV4, Endpoint, Flow, FlowType, L7Type, Verdict, flow_to_json

FORMATS = ("text", "json", "jsonpb", "compact")
HEADER = ("TIMESTAMP", "SOURCE", "", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
# Minimum column widths, so that a followed stream stays aligned with its header.
MIN_WIDTHS = (19, 40, 2, 40, 13, 9, 0)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def timestamp(ns: int, tz: _dt.tzinfo | None = None) -> str:
    """`Apr 26 14:20:10.112`."""
    dt = _dt.datetime.fromtimestamp(ns / 1e9, tz) if tz else _dt.datetime.fromtimestamp(ns / 1e9)
    ms = (ns // 1_000_000) % 1000
    return f"{_MONTHS[dt.month - 1]} {dt.day:2d} {dt:%H:%M:%S}.{ms:03d}"


def local_cluster(f: Flow) -> str:
    return f.node_name.split("/", 1)[0] if "/" in f.node_name else ""


def peer(e: Endpoint, local: str) -> str:
    if e.pod_name:
        name = f"{e.namespace}/{e.pod_name}"
        if e.cluster_name and e.cluster_name != local:
            name = f"{e.cluster_name}/{name}"
        return f"{name} ({e.ip})"
    reserved = RESERVED_NAMES.get(e.identity)
    return f"{e.ip} ({reserved})" if reserved else f"{e.ip} (ID:{e.identity})"


def type_label(f: Flow) -> str:
    if f.type is FlowType.L7:
        if f.l7 is not None and f.l7.dns is not None:
            return "dns-response" if f.l7.type is L7Type.RESPONSE else "dns-request"
        if f.l7 is not None and f.l7.http is not None:
            if f.l7.type is L7Type.RESPONSE:
                return "http-response"
            if f.verdict is Verdict.FORWARDED:
                return "http-request"
        return "l7"
    if f.verdict is Verdict.DROPPED:
        return "drop"
    return "l3-l4"


def summary(f: Flow) -> str:
    return f.summary or f.drop_reason_desc


def text_row(f: Flow, tz: _dt.tzinfo | None = None) -> tuple[str, ...]:
    local = local_cluster(f)
    return (
        timestamp(f.time, tz), peer(f.source, local), "->", peer(f.destination, local),
        type_label(f), f.verdict.value, summary(f),
    )


class TextTable:
    """Aligned rows under one header. The first `write` fixes the widths (at least
    MIN_WIDTHS, wider if its rows need it); later rows that are wider just push right."""

    def __init__(self, tz: _dt.tzinfo | None = None) -> None:
        self.tz = tz
        self.widths: list[int] | None = None

    def _line(self, cells: Sequence[str]) -> str:
        assert self.widths is not None
        return "  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip()

    def write(self, flows: Iterable[Flow], *, header: bool = True) -> list[str]:
        rows = [text_row(f, self.tz) for f in flows]
        out: list[str] = []
        if self.widths is None:
            self.widths = [max([m, len(h), *(len(r[i]) for r in rows)]) for i, (m, h) in enumerate(zip(MIN_WIDTHS, HEADER))]
            if header:
                out.append(self._line(HEADER))
        out.extend(self._line(r) for r in rows)
        return out


def _compact_peer(e: Endpoint, local: str, ports: bool = True) -> str:
    if e.pod_name:
        name = f"{e.namespace}/{e.pod_name}"
        if e.cluster_name and e.cluster_name != local:
            name = f"{e.cluster_name}/{name}"
    else:
        name = e.ip
    reserved = RESERVED_NAMES.get(e.identity)
    who = reserved if reserved else f"ID:{e.identity}"
    return f"{name}{f':{e.port}' if ports else ''} ({who})"


def compact_line(f: Flow, tz: _dt.tzinfo | None = None) -> str:
    local = local_cluster(f)
    ports = f.protocol != ICMPV4  # an ICMP message has none
    return (
        f"{timestamp(f.time, tz)}: {_compact_peer(f.source, local, ports)} -> "
        f"{_compact_peer(f.destination, local, ports)} {type_label(f)} {f.verdict.value} ({summary(f)})"
    )


def json_line(f: Flow) -> str:
    return json.dumps(flow_to_json(f), separators=(",", ":"))


def jsonpb_line(f: Flow) -> str:
    body = flow_to_json(f)
    return json.dumps({"flow": body, "node_name": f.node_name, "time": body["time"]}, separators=(",", ":"))


class Renderer:
    """Turns batches of flows into output lines for one format (`FORMATS`)."""

    def __init__(self, fmt: str, tz: _dt.tzinfo | None = None, *, header: bool = True) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r} (expected one of {', '.join(FORMATS)})")
        self.fmt = fmt
        self.tz = tz
        self.header = header
        self._table = TextTable(tz)

    def lines(self, flows: Sequence[Flow]) -> list[str]:
        if self.fmt == "text":
            if not flows and self._table.widths is not None:
                return []
            return self._table.write(flows, header=self.header)
        if self.fmt == "compact":
            return [compact_line(f, self.tz) for f in flows]
        if self.fmt == "json":
            return [json_line(f) for f in flows]
        return [jsonpb_line(f) for f in flows]
