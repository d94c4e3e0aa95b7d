"""`GET /v1/flows`: the query, the NDJSON stream the agent writes, and its decoding by the CLI.

    GET /v1/flows?filter=<FlowFilter JSON>&since=<5m|RFC 3339>&last=<N>&follow=1

The body is NDJSON, sent with chunked transfer encoding, one object per line as Hubble's
GetFlowsResponse: `{"flow": {...}, "node_name": ..., "time": ...}`, or
`{"lost_events": {"source": "FOLLOW_QUEUE", "num_events_lost": N}}` when a follower fell behind
and its queue shed flows. Without `follow` the stream holds the matching flows of the ring
(the newest `last` of them, when given) and ends. With `follow` it goes on with every new
matching flow until the client goes away or the agent stops; an empty line is sent after
`heartbeat` seconds without flows, so a dead client is noticed and a live one knows the agent
is there.

A bad query raises `ValueError` (FilterError included) before anything is streamed: the admin
API answers 400 with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from .filters import FilterError, FlowFilter, parse_since
from .flow import Flow, FlowItem, Materializer, flow_from_json, flow_to_json
from .ring import FlowRing

PATH = "/v1/flows"
CONTENT_TYPE = "application/x-ndjson"
LOST_SOURCE = "FOLLOW_QUEUE"
MAX_LAST = 1_000_000
_BATCH = 512


@dataclass(frozen=True, slots=True)
class FlowQuery:
    filter: FlowFilter = FlowFilter()
    since: int | None = None  # ns since the epoch
    last: int | None = None
    follow: bool = False

    @classmethod
    def from_query(cls, query: Mapping[str, str], now_ns: int | None = None) -> FlowQuery:
        errors: list[str] = []
        flt = FlowFilter()
        if query.get("filter"):
            try:
                flt = FlowFilter.from_json(json.loads(query["filter"]))
            except json.JSONDecodeError as exc:
                errors.append(f"filter: invalid JSON: {exc.msg}")
            except FilterError as exc:
                errors.extend(exc.errors)
        since = None
        if query.get("since"):
            try:
                since = parse_since(query["since"], now_ns)
            except ValueError as exc:
                errors.append(f"--since {query['since']!r}: {exc}")
        last = None
        if query.get("last"):
            v = query["last"]
            if not v.isdigit() or int(v) > MAX_LAST:
                errors.append(f"--last {v!r}: expected a number 0-{MAX_LAST}")
            else:
                last = int(v)
        follow = query.get("follow", "") in ("1", "true", "yes")
        unknown = sorted(set(query) - {"filter", "since", "last", "follow"})
        if unknown:
            errors.append(f"unknown query parameter(s): {', '.join(unknown)}")
        if errors:
            raise FilterError(errors)
        return cls(flt, since, last, follow)


def query_path(flt: FlowFilter, *, since: str | None, last: int | None, follow: bool) -> str:
    """The request path the CLI sends (values already validated by the caller)."""
    q: dict[str, str] = {}
    if flt:
        q["filter"] = json.dumps(flt.to_json(), separators=(",", ":"), sort_keys=True)
    if since:
        q["since"] = since
    if last is not None:
        q["last"] = str(last)
    if follow:
        q["follow"] = "1"
    return PATH + ("?" + urlencode(q) if q else "")


def flow_line(f: Flow) -> bytes:
    body = flow_to_json(f)
    return json.dumps({"flow": body, "node_name": f.node_name, "time": body["time"]},
                      separators=(",", ":")).encode() + b"\n"


def item_lines(items: Sequence[FlowItem]) -> bytes:
    """`flow_line` of each flow as the ring holds it: a lazy one writes its lines itself, the
    flows of one event together."""
    out: list[bytes] = []
    i, n = 0, len(items)
    while i < n:
        item = items[i]
        if isinstance(item, Flow):
            out.append(flow_line(item))
            i += 1
            continue
        lazy, start = item
        j = i + 1
        while j < n:
            nxt = items[j]
            if isinstance(nxt, Flow) or nxt[0] is not lazy:
                break
            j += 1
        out.append(lazy.lines(start, start + j - i))
        i = j
    return b"".join(out)


def lost_line(n: int) -> bytes:
    return json.dumps({"lost_events": {"source": LOST_SOURCE, "num_events_lost": n}},
                      separators=(",", ":")).encode() + b"\n"


def stream(ring: FlowRing, q: FlowQuery, *, heartbeat: float = 1.0) -> Iterator[bytes]:
    """The response body for `q`: chunks of NDJSON lines (see the module docstring)."""
    match = q.filter.compile() if q.filter else None
    if not q.follow:
        items = ring.snapshot_items(match, since=q.since, last=q.last)

        def once() -> Iterator[bytes]:
            for i in range(0, len(items), _BATCH):
                yield item_lines(items[i : i + _BATCH])

        return once()
    backlog, sub = ring.subscribe_items(match, since=q.since, last=q.last)

    def follow() -> Iterator[bytes]:
        with sub:
            for i in range(0, len(backlog), _BATCH):
                yield item_lines(backlog[i : i + _BATCH])
            if not backlog:
                yield b"\n"  # the client sees the stream open at once
            while True:
                items, lost = sub.take_items(heartbeat)
                if not items and not lost and sub.closed:
                    return
                if match is not None:
                    materialize = Materializer()
                    items = [i for i in items if match(materialize(i))]
                out = (lost_line(lost) if lost else b"") + item_lines(items)
                yield out or b"\n"

    return follow()


@dataclass(frozen=True, slots=True)
class Lost:
    count: int


def decode_line(line: bytes | str) -> Flow | Lost | None:
    """One line of the stream: a Flow, a Lost notice, or None for a heartbeat. Raises
    ValueError on a line that is neither."""
    text = line.strip()
    if not text:
        return None
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object per line")
    if "flow" in obj:
        return flow_from_json(obj["flow"])
    if "lost_events" in obj:
        n = obj["lost_events"].get("num_events_lost", 0) if isinstance(obj["lost_events"], dict) else 0
        return Lost(int(n))
    raise ValueError(f"unexpected stream object with keys {sorted(obj)}")
