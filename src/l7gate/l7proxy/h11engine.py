"""The h11 engine: a transparent HTTP/1.1 proxy in Python enforcing the same L7 policy as Envoy.

Theory of operation
-------------------
`proxy.engine: h11` runs this engine in the agent process instead of Envoy. It takes the same
connections Envoy would: one listener per proxied port (`EnginePort`, from the agent's proxied
ports), on the pod's address — loopback mode: the pod's own 127.x address, the pod's server on
`port + offset`; kernel mode: a transparent socket (IP_TRANSPARENT) on the pod's address, which
the datapath's redirect delivers to, the pod's server on the same port.

Per connection, HTTP/1.1 framing on both sides is h11's (`h11.Connection`, SERVER towards the
client, CLIENT towards the pod) or, for plain messages, what h11 would do told without it
(`h11plain`: a complete request with a Content-Length body and nothing that changes the
connection; a canonical Content-Length response), and each request is judged on its own
(pipelined ones too) by the same steps either way (`_admit`):

1. Framing checks, as Envoy makes them (`_head_problem`, measured on Envoy's codec here, see
   docs/h11-engine.md): HTTP/1.0 and other versions → 426; Content-Length with
   Transfer-Encoding, a repeated or malformed Content-Length → 400; a Transfer-Encoding other
   than `chunked` → 501; more than `max_headers` headers, or a head over `max_header_bytes`
   → 431; a method with lower-case letters, bytes outside ASCII in the target, NUL/CR/LF where
   they do not belong → 400 (h11's grammar and ours). These answers close the connection.
2. Path normalization, `policy.pathnorm.normalize_path`: the one definition Envoy's settings
   are tested against (`#`, escaped slashes → 400).
3. The decision: the agent's `PolicySource.decision(pod ip, port, source ip)` — the same
   `Decision` Envoy's matcher leaf is built from — then `policy.httpverdict.request_verdict`:
   denied → 403 `RBAC: access denied`, the connection kept; allowed → forwarded to the pod with
   the normalized path. Decisions are cached per (pod ip, port, source ip) until the source's
   revision changes, so a policy change applies to the next request on an open connection, as
   Envoy's RBAC per request does.

Every request gives one `records.HTTPRecord` — what Envoy's access log entry says of it, the
RBAC action name included — to `on_records`; the agent's flow ingestion turns it into the flows
`observe.envoy_flows.http_log_flows` gives for Envoy's entry of the same request (held equal by
tests/unit/test_h11_flows.py, through `access_log_entry`), so flows, their reasons and the
flow metrics are the same.

The two ways meet at message boundaries: a request not plain (or not all there yet) goes to a
fresh h11 connection from the same bytes, and what h11 leaves unread comes back to the buffer
after it; a plain request's response that is not plain is handed to h11 after replaying both
sides' state (`_replay`). Sockets are `_Side` protocols: one buffer per socket, read by the
connection's task.

Bounded per connection: the head (h11's `max_incomplete_event_size`; the shortcut takes heads
up to the same size and bodies up to a read's size), bodies are streamed with back-pressure,
never buffered; timeouts for an idle connection, an incomplete head, a stalled
body and the upstream's connect and response. WebSocket upgrades pass where the request that
asks for them is allowed (then bytes are relayed); other upgrades (h2c) are stripped, as Envoy
does.

Threads: the engine runs its own event loop (uvloop where it installs) in one thread; `set_ports`
and `status` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import h11
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from ..policy.httpverdict import RequestVerdict, request_verdict
from ..policy.mapstate import Decision
from ..policy.pathnorm import normalize_path
from ..policy.types import HTTPRequest
from ..records import HTTPRecord
from .h11plain import ENVOY_METHODS, PlainRequest, plain_request, plain_response, request_bytes

IP_TRANSPARENT = 19  # <linux/in.h>
RBAC_FILTER = "envoy.filters.http.rbac"
RBAC_DENIED = "rbac_access_denied_matched_policy[{}]"
VIA_UPSTREAM = "via_upstream"
DENIED_BODY = b"RBAC: access denied"
# Envoy's texts for its local replies, so that clients and flows see the same.
_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 426: b"Upgrade Required",
            431: b"Request Header Fields Too Large", 501: b"Not Implemented", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 408: b"Request Timeout"}
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                         b"http2-settings", b"expect", b"x-forwarded-for", b"x-forwarded-proto"})
_METHODS = {m: v for m, v in base_pb2.RequestMethod.items() if v}
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


@dataclass(frozen=True, slots=True)
class EnginePort:
    """One proxied (pod address, port): where to listen and where the pod's server is."""

    ip: str
    port: int
    upstream_ip: str
    upstream_port: int
    transparent: bool = False


class PolicySource(Protocol):
    """What the engine asks the agent. `revision()` changes whenever any decision may have."""

    def revision(self) -> Hashable: ...

    def decision(self, local_ip: str, port: int, source_ip: str) -> Decision: ...


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    max_headers: int = 100  # Envoy's max_headers_count default
    idle_timeout: float = 300.0  # no request on an open connection
    header_timeout: float = 30.0  # a request head begun but not complete
    body_timeout: float = 300.0  # no byte of a body, either way (Envoy's stream_idle_timeout)
    connect_timeout: float = 1.0  # the pod's server (the clusters' connect_timeout)
    max_connections: int = 10_000  # open client connections; one more is closed at once (counted)
    read_size: int = 64 * 1024


@dataclass(slots=True)
class EngineStats:
    connections_total: int = 0
    connections_active: int = 0
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    rejected: int = 0  # refused before policy (framing, normalization)
    plain: int = 0  # requests taken by the plain-message shortcut (h11plain), not h11
    upstream_errors: int = 0
    decision_lookups: int = 0  # decisions asked of the agent (cache misses)
    connections_refused: int = 0  # over max_connections: closed at once


class _Reject(Exception):
    """A request answered by the engine itself: `status`, Envoy's response_code_details, whether
    the connection closes after it, its body (None: the reason phrase); `denied`: by policy."""

    def __init__(self, status: int, details: str, close: bool = True, body: bytes | None = None,
                 denied: bool = False) -> None:
        super().__init__(details)
        self.status, self.details, self.close, self.body, self.denied = status, details, close, body, denied


class _ClientGone(Exception):
    pass


class _Expired(Exception):
    """A connection's deadline passed while it waited (`_Timer`)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Timer:
    """One connection's deadline. Armed before each wait; the engine's sweeper (twice a second)
    cancels the connection's task when it passes, and the wait turns that into `_Expired`. One
    sweeper instead of a timeout per read: those were ~5% of a request's CPU."""

    __slots__ = ("task", "deadline", "kind", "expired")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.deadline = float("inf")
        self.kind = ""
        self.expired = ""

    def arm(self, kind: str, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.kind = kind

    def check(self, err: asyncio.CancelledError) -> _Expired:
        """The `_Expired` a cancellation stands for, or `err` again if it was no timeout."""
        if not self.expired:
            raise err
        kind, self.expired = self.expired, ""
        self.task.uncancel()
        return _Expired(kind)


class _Side(asyncio.Protocol):
    """One socket of the engine, a client's or a pod's: the bytes that arrived and were not
    taken yet (`buf`), the connection task's wait for more, and the write side's flow control.
    What asyncio's StreamReader and StreamWriter did for the engine, without their layers: the
    plain-message shortcut parses `buf` where it lies, h11 is given it whole.

    Bounded: above `2 * limit` bytes not taken, the socket is not read until the task takes
    them; `drain` waits while the transport's write buffer is above its high-water mark.
    Owned by one connection task; loop thread only."""

    __slots__ = ("transport", "buf", "limit", "eof", "lost", "error", "_waiter", "_drainer", "_read_paused",
                 "_write_paused", "_on_made")

    def __init__(self, limit: int, on_made: Callable[[_Side], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.limit = limit
        self.eof = False  # no more bytes will come (FIN, or the connection is gone)
        self.lost = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._on_made = on_made

    # -- asyncio.Protocol (called by the loop) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, unregistered
        if self._on_made is not None:
            self._on_made(self)
            self._on_made = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 2 * self.limit and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # a half-closed client still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self.error = exc
        self._wake()
        d, self._drainer = self._drainer, None
        if d is not None and not d.done():
            d.set_exception(ConnectionResetError("Connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d, self._drainer = self._drainer, None
        if d is not None and not d.done():
            d.set_result(None)

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    # -- the connection task's side --

    async def wait(self) -> None:
        """Until bytes or the end arrive (at once if there are some, or it ended)."""
        if self.buf or self.eof:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes; b"" at the end; the connection's error if it ended with one."""
        if not self.buf and not self.eof:
            await self.wait()
        if not self.buf:
            if self.error is not None:
                raise self.error
            return b""
        return self.take(n)

    def take(self, n: int) -> bytes:
        buf = self.buf
        if len(buf) <= n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._resume()
        return data

    def consume(self, n: int) -> None:
        del self.buf[:n]
        self._resume()

    def _resume(self) -> None:
        if self._read_paused and len(self.buf) <= self.limit and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def unread(self, data: bytes) -> None:
        """Bytes taken but not used (h11's trailing data), back in front."""
        if data:
            self.buf[:0] = data

    def at_eof(self) -> bool:
        return self.eof and not self.buf

    def write(self, data: bytes | bytearray) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def write_buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("Connection lost")
        if not self._write_paused:
            return
        self._drainer = asyncio.get_running_loop().create_future()
        await self._drainer

    def write_eof(self) -> None:
        if self.transport is not None and not self.lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(slots=True)
class _Upstream:
    """An open connection to a pod's server, kept between requests. h11 (CLIENT) state is made
    per request that goes the h11 way: bytes it did not use go back into `side.buf`."""

    side: _Side
    address: tuple[str, int]


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _head_problem(raw_head: bytes, limits: EngineLimits) -> _Reject | None:
    """What Envoy's HTTP/1 codec refuses, in the order it checks (measured on Envoy here, see
    docs/h11-engine.md): the request line's syntax, the header lines, the framing headers, the
    target's form, then the version. h11 refuses some of these too, with other codes or in
    another order."""
    lines = raw_head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) == 2 and parts[1].startswith(b"/"):
        return _Reject(426, "low_version")  # HTTP/0.9
    if len(parts) != 3:
        return _Reject(400, "http1.codec_error")
    method, target, version = parts
    if method not in ENVOY_METHODS:
        return _Reject(400, "http1.codec_error")
    if not target or any(c >= 0x7F or c <= 0x20 for c in target):
        return _Reject(400, "http1.codec_error")
    if len(version) != 8 or not version.startswith(b"HTTP/") or not (
            version[5:6].isdigit() and version[6:7] == b"." and version[7:8].isdigit()):
        return _Reject(400, "http1.codec_error")
    if method != b"CONNECT" and not (
            target.startswith(b"/") or target == b"*" or target.lower().startswith((b"http://", b"https://"))):
        return _Reject(400, "http1.codec_error")
    names: list[bytes] = []
    values: dict[bytes, list[bytes]] = {}
    for ln in lines[1:]:
        if not ln:
            break
        if ln[:1] in (b" ", b"\t"):
            continue  # obs-fold: the previous header goes on
        name, sep, value = ln.partition(b":")
        if not sep or not name or any(c not in _TOKEN for c in name):
            return _Reject(400, "http1.codec_error")
        n = name.lower()
        names.append(n)
        values.setdefault(n, []).append(value.strip())
    if len(names) > limits.max_headers:
        return _Reject(431, "http1.too_many_headers")
    cl, te = values.get(b"content-length", []), values.get(b"transfer-encoding", [])
    if len(cl) > 1 or any(not v.isdigit() or int(v) >= 1 << 64 for v in cl):
        return _Reject(400, "http1.content_length_not_allowed")
    if method == b"CONNECT" and cl and int(cl[0]):
        return _Reject(400, "http1.content_length_not_allowed")
    if method == b"CONNECT" and te:
        return _Reject(501, "http1.invalid_transfer_encoding")
    if cl and te:
        return _Reject(400, "http1.content_length_and_chunked_not_allowed")
    if len(te) > 1 or (te and te[0].lower() != b"chunked"):
        return _Reject(501, "http1.invalid_transfer_encoding")
    if method == b"CONNECT":
        if b"/" in target or target == b"*":
            return _Reject(400, "http1.codec_error")
    elif target == b"*":
        if method != b"OPTIONS":
            return _Reject(400, "http1.codec_error")
    if version != b"HTTP/1.1":
        return _Reject(426, "low_version")
    return None


_PLAIN_TARGET = re.compile(rb"/[\x21-\x7e]*\Z")


def _pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value) pairs of parsed headers. h11's `Headers` is a Sequence whose
    iteration goes through `__getitem__` per item in Python: a tenth of a request's header
    handling; its item list is read directly."""
    return [(n, v) for _, n, v in headers._full_items]


def _header_dict(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers as the rules match them: by lower-case name, a repeated one's values joined with
    "," (Envoy's header match input)."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        n, v = name.decode("latin-1"), value.decode("latin-1")
        headers[n] = f"{headers[n]},{v}" if n in headers else v
    return headers


def _plainly_fine(req: h11.Request, raw: bytearray, limits: EngineLimits) -> bool:
    """Whether `_head_problem` would find nothing, told cheaply for the usual request (what h11
    parsed: a method Envoy knows, HTTP/1.1, an origin-form ASCII target, few headers, no
    Transfer-Encoding, at most one plain Content-Length in the raw head). False means: ask
    `_head_problem`. tests/unit/test_h11_head.py holds the two to the same answers."""
    if req.http_version != b"1.1" or req.method not in ENVOY_METHODS or req.method == b"CONNECT":
        return False
    if not _PLAIN_TARGET.match(req.target) or len(req.headers) >= limits.max_headers - 1:
        return False
    cl = None
    for name, value in _pairs(req.headers):
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            cl = value
    if cl is None:
        return b"content-length" not in raw.lower()
    if not cl.isdigit() or len(cl) > 19:
        return False
    lowered = raw.lower()
    i = lowered.find(b"content-length")
    return lowered.count(b"content-length") == 1 and b"," not in raw[i:raw.find(b"\n", i)]


def _skip_empty_body(conn: h11.Connection) -> None:
    """Read the end of a request that has no body (or whose body is all buffered): the
    connection can then carry the next request after a local reply."""
    try:
        while conn.their_state is h11.SEND_BODY:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
    except h11.RemoteProtocolError:
        return


def _split_head(buf: bytes) -> bytes:
    """The head at the start of `buf` (up to the first empty line)."""
    ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    return buf[: min(ends)] if ends else buf


def _upstream_headers(pairs: list[tuple[bytes, bytes]], source_ip: str,
                      request_id: str) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers a request goes to the pod with, and whether it is a WebSocket upgrade:
    hop-by-hop headers (and those its Connection header names) dropped, x-forwarded-for
    appended, x-forwarded-proto and x-request-id set, as Envoy's."""
    websocket = False
    out_headers: list[tuple[bytes, bytes]] = []
    conn_tokens = {t.strip().lower() for n, v in pairs if n == b"connection" for t in v.split(b",")}
    upgrade = [v for n, v in pairs if n == b"upgrade"]
    if upgrade and b"upgrade" in conn_tokens and upgrade[0].strip().lower() == b"websocket":
        websocket = True
    for name, value in pairs:
        if name in _HOP_BY_HOP or name in conn_tokens:
            continue
        out_headers.append((name, value))
    if websocket:
        out_headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    xff = [v for n, v in pairs if n == b"x-forwarded-for"]
    out_headers.append((b"x-forwarded-for", b",".join([*xff, source_ip.encode()])))
    out_headers.append((b"x-forwarded-proto", b"http"))
    if not any(n == b"x-request-id" for n, _ in out_headers):
        out_headers.append((b"x-request-id", request_id.encode()))
    return out_headers, websocket


def _client_response(ev: h11.Response) -> h11.Response:
    """The pod's response as it goes to the client: hop-by-hop headers dropped (x-forwarded-for
    kept), framing h11's own."""
    hdrs = [(n, v) for _, n, v in ev.headers._full_items
            if (n not in _HOP_BY_HOP or n == b"x-forwarded-for") and n != b"transfer-encoding"]
    return h11.Response(status_code=ev.status_code, headers=hdrs, reason=ev.reason, _parsed=True)


def _h11_reply(conn: h11.Connection, status: int, body: bytes, method: str) -> bytes:
    """A local reply through h11, on a connection that goes on."""
    headers = [(b"content-length", b"%d" % len(body)), (b"date", _http_date()), (b"server", b"l7gate-h11")]
    if body:
        headers.insert(1, (b"content-type", b"text/plain"))
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""),
                                 _parsed=True)) or b""  # our own, valid headers
    if body and method != "HEAD":  # the answer to HEAD: no body, its length in the headers
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def _local_reply(status: int, body: bytes, close: bool, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    reason = _REASONS.get(status, b"")
    head = [b"HTTP/1.1 %d %s" % (status, reason)]
    if body:
        head.append(b"content-length: %d" % len(body))
        head.append(b"content-type: text/plain")
    else:
        head.append(b"content-length: 0")
    head.extend(k + b": " + v for k, v in extra)
    head.append(b"date: " + _http_date())
    head.append(b"server: l7gate-h11")
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode())
    return _date_cache[1]


def access_log_entry(log: HTTPRecord) -> accesslog_pb2.HTTPAccessLogEntry:
    """The Envoy access log entry Envoy would have written for this request (the fields the
    flows read: observe.envoy_flows). Fields are set in place: no message is built twice."""
    e = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    cp = e.common_properties
    for field_, (ip, port) in ((cp.downstream_remote_address, log.src), (cp.downstream_direct_remote_address, log.src),
                               (cp.downstream_local_address, log.dst)):
        sa = field_.socket_address
        sa.address, sa.port_value = ip, port
    ns = int(log.start * 1e9)
    cp.start_time.seconds, cp.start_time.nanos = divmod(ns, 1_000_000_000)
    if log.upstream is not None:
        sa = cp.upstream_remote_address.socket_address
        sa.address, sa.port_value = log.upstream
    if log.first_upstream_byte is not None:
        d = max(0, int((log.first_upstream_byte - log.start) * 1e9))
        cp.time_to_first_upstream_rx_byte.seconds, cp.time_to_first_upstream_rx_byte.nanos = divmod(d, 1_000_000_000)
    if log.action and not log.details.startswith("rbac_access_denied"):
        cp.metadata.filter_metadata[RBAC_FILTER].fields["enforced_effective_policy_id"].string_value = log.action
    req = e.request
    req.request_method = _METHODS.get(log.method, 0)
    req.scheme = "http"
    req.authority = log.authority
    req.path = log.path
    if log.user_agent:
        req.user_agent = log.user_agent
    if log.request_id:
        req.request_id = log.request_id
    resp = e.response
    if log.code:
        resp.response_code.value = log.code
    resp.response_code_details = log.details
    return e


class H11Engine:
    def __init__(
        self,
        source: PolicySource,
        *,
        auth_verified: bool = False,
        on_records: Callable[[Sequence[HTTPRecord]], None] | None = None,
        limits: EngineLimits = EngineLimits(),
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.source = source
        self.auth_verified = auth_verified
        self.on_records = on_records
        self.limits = limits
        self._log = log
        self.stats = EngineStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._ports: dict[tuple[str, int], EnginePort] = {}
        self._servers: dict[tuple[str, int], asyncio.Server] = {}
        self._bind_errors: dict[tuple[str, int], str] = {}
        self._decisions: dict[tuple[str, int, str], Decision] = {}
        self._decisions_at: Hashable = None
        # Verdicts of decisions whose rules read no header, by (decision, method, path, host):
        # RE2 matching was a tenth of a request's CPU. Cleared with the decisions.
        self._verdicts: dict[tuple[Decision, str, str, str], RequestVerdict] = {}
        self._pending_logs: list[HTTPRecord] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[_Timer] = set()
        self._started = 0.0
        self._loop_kind = "asyncio"

    # -- lifecycle (any thread) ----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        # A request allocates a few hundred short-lived objects: with the default threshold
        # (700) the youngest generation was collected every few requests.
        gen0, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(max(gen0, 100_000), gen1, gen2)
        self._thread = threading.Thread(target=self._run, name="l7g-h11", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the h11 engine's event loop did not start")
        self._started = time.time()

    def _run(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            self._loop_kind = "uvloop"
        except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        loop.call_soon(self._ready.set)
        loop.call_later(1.0, self._retry_binds)
        loop.call_later(0.5, self._sweep)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            for srv in self._servers.values():
                srv.close()
            self._servers.clear()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=timeout)
            self._flush_logs()
            loop.stop()

        with contextlib.suppress(RuntimeError):  # the loop already ended
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
        self._loop = None

    def set_ports(self, ports: Iterable[EnginePort]) -> None:
        """The proxied ports now: listeners are opened and closed to match (open connections of
        a removed port finish their requests)."""
        wanted = {(p.ip, p.port): p for p in ports}
        loop = self._loop
        if loop is None:
            raise RuntimeError("the h11 engine is not started")
        loop.call_soon_threadsafe(self._reconcile, wanted)

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "engine": "h11",
            "state": "LIVE" if self._loop is not None else "STOPPED",
            "loop": self._loop_kind,
            "listeners": len(self._servers),
            "ports": len(self._ports),
            "bind_errors": dict(sorted((f"{ip}:{port}", why) for (ip, port), why in self._bind_errors.items())),
            "connections": {"active": s.connections_active, "total": s.connections_total,
                            "refused": s.connections_refused, "max": self.limits.max_connections},
            "requests": {"total": s.requests, "allowed": s.allowed, "denied": s.denied,
                         "rejected": s.rejected, "upstream_errors": s.upstream_errors, "plain": s.plain},
            "decision_lookups": s.decision_lookups,
        }

    def problems(self) -> list[str]:
        """For the agent's health: ports the engine could not listen on."""
        return [f"h11 engine cannot listen on {ip}:{port}: {why}"
                for (ip, port), why in sorted(self._bind_errors.items())]

    def wait_listening(self, ports: Iterable[tuple[str, int]], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        want = set(ports)
        while time.monotonic() < deadline:
            if want <= set(self._servers):
                return True
            time.sleep(0.02)
        return False

    # -- listeners (loop thread) --------------------------------------------------------------

    def _reconcile(self, wanted: dict[tuple[str, int], EnginePort]) -> None:
        for key in list(self._servers):
            p = wanted.get(key)
            old = self._ports.get(key)
            if p is None or (old is not None and old.transparent != p.transparent):
                self._servers.pop(key).close()
        self._ports = wanted
        for key in list(self._bind_errors):
            if key not in wanted:
                del self._bind_errors[key]
        for key, p in wanted.items():
            if key not in self._servers:
                self._listen(p)

    def _sweep(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        for t in self._timers:
            if now > t.deadline and not t.expired and not t.task.done():
                t.expired = t.kind
                t.deadline = float("inf")
                t.task.cancel()
        self._loop.call_later(0.5, self._sweep)

    async def _wait_read(self, timer: _Timer, kind: str, seconds: float, side: _Side) -> bytes:
        timer.arm(kind, seconds)
        try:
            return await side.read(self.limits.read_size)
        except asyncio.CancelledError as err:
            raise timer.check(err) from None
        finally:
            timer.deadline = float("inf")

    async def _wait_data(self, timer: _Timer, kind: str, seconds: float, side: _Side) -> None:
        """Until `side` has bytes or ended, bytes left where they are."""
        timer.arm(kind, seconds)
        try:
            await side.wait()
        except asyncio.CancelledError as err:
            raise timer.check(err) from None
        finally:
            timer.deadline = float("inf")

    async def _flush(self, timer: _Timer, side: _Side, out: bytearray | bytes) -> None:
        """Write what is pending as one write; wait only while the socket's buffer is full."""
        if out:
            side.write(out if isinstance(out, bytes) else bytes(out))
            if isinstance(out, bytearray):
                out.clear()
        if side.write_buffered() > self.limits.read_size:
            timer.arm("body", self.limits.body_timeout)
            try:
                await side.drain()
            except asyncio.CancelledError as err:
                raise timer.check(err) from None
            finally:
                timer.deadline = float("inf")

    def _retry_binds(self) -> None:
        assert self._loop is not None
        for key in list(self._bind_errors):
            p = self._ports.get(key)
            if p is not None and key not in self._servers:
                self._listen(p)
        self._loop.call_later(1.0, self._retry_binds)

    def _listen(self, p: EnginePort) -> None:
        key = (p.ip, p.port)
        family = socket.AF_INET6 if ipaddress.ip_address(p.ip).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if p.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((p.ip, p.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            if self._bind_errors.get(key) != why:
                self._log(f"h11 engine: cannot listen on {p.ip}:{p.port}: {why} (retrying every second)")
            self._bind_errors[key] = why
            return
        self._bind_errors.pop(key, None)
        assert self._loop is not None
        task = self._loop.create_task(self._start_server(key, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_server(self, key: tuple[str, int], sock: socket.socket) -> None:
        limit = self.limits.read_size
        loop = asyncio.get_running_loop()
        # asyncio listens again with its own backlog (100 by default): a burst of new
        # connections then waits a second for a SYN retransmit. Envoy's default is 1024.
        srv = await loop.create_server(lambda: _Side(limit, lambda side: self._accepted(side, key)), sock=sock,
                                       backlog=1024)
        if self._ports.get(key) is None or key in self._servers:  # removed (or replaced) meanwhile
            srv.close()
            return
        self._servers[key] = srv

    def _accepted(self, side: _Side, key: tuple[str, int]) -> None:
        if self.stats.connections_active >= self.limits.max_connections:
            self.stats.connections_refused += 1
            side.close()
            return
        assert self._loop is not None
        t = self._loop.create_task(self._connection(side, key))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- decisions ----------------------------------------------------------------------------

    def _decision(self, local_ip: str, port: int, source_ip: str) -> Decision:
        rev = self.source.revision()
        if rev != self._decisions_at:
            self._decisions.clear()
            self._verdicts.clear()
            self._decisions_at = rev
        key = (local_ip, port, source_ip)
        d = self._decisions.get(key)
        if d is None:
            self.stats.decision_lookups += 1
            d = self.source.decision(local_ip, port, source_ip)
            if len(self._decisions) < 100_000:
                self._decisions[key] = d
        return d

    # -- one connection -----------------------------------------------------------------------

    async def _connection(self, client: _Side, key: tuple[str, int]) -> None:
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        up: _Upstream | None = None
        task = asyncio.current_task()
        assert task is not None and client.transport is not None
        timer = _Timer(task)
        self._timers.add(timer)
        limits = self.limits
        try:
            transport = client.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
            src, dst = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
            while True:
                port = self._ports.get(key)
                if port is None:
                    break  # the port is no longer proxied: close between requests
                if not client.buf:
                    try:
                        await self._wait_data(timer, "idle", limits.idle_timeout, client)
                    except _Expired:
                        break
                    if not client.buf:
                        break  # the client closed
                plain = plain_request(client.buf, limits.max_header_bytes, limits.max_headers, limits.read_size)
                if plain is not None:
                    client.consume(len(plain.raw))
                    up, keep = await self._plain_exchange(timer, client, plain, port, src, dst, up)
                else:
                    # Everything else is h11's, from the same bytes, a read's worth at a time
                    # (its head limit counts what it holds incomplete); what it leaves of them
                    # (a pipelined request) comes back for the next round.
                    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
                    conn.receive_data(client.take(limits.read_size))
                    up, keep = await self._exchange(timer, conn, client, port, src, dst, up)
                    keep = keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE
                    if keep:
                        client.unread(conn.trailing_data[0])
                if not keep:
                    break
        except (_ClientGone, _Expired, ConnectionError, asyncio.CancelledError, TimeoutError, OSError):
            pass
        finally:
            self._timers.discard(timer)
            self.stats.connections_active -= 1
            if up is not None:
                up.side.close()
            client.close()

    async def _read_head(self, timer: _Timer, conn: h11.Connection, client: _Side) -> h11.Request | None:
        raw = bytearray(conn.trailing_data[0])
        cap = self.limits.max_header_bytes + self.limits.read_size
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status != 431:  # a head too large for h11 is too large for Envoy too
                    ours = _head_problem(_split_head(bytes(raw)), self.limits)
                    if ours is not None:
                        raise ours from None
                raise _Reject(431 if status == 431 else 400 if status < 500 else status,
                              "http1.codec_error" if status != 501 else "http1.invalid_transfer_encoding",
                              ) from None
            if ev is h11.NEED_DATA:
                try:
                    if raw:
                        data = await self._wait_read(timer, "header", self.limits.header_timeout, client)
                    else:
                        data = await self._wait_read(timer, "idle", self.limits.idle_timeout, client)
                except _Expired as exp:
                    if exp.kind == "header":
                        raise _Reject(408, "request_header_timeout") from None
                    return None
                conn.receive_data(data)
                if len(raw) < cap:
                    raw += data
                continue
            if isinstance(ev, h11.Request):
                if not _plainly_fine(ev, raw, self.limits):
                    problem = _head_problem(_split_head(bytes(raw)), self.limits)
                    if problem is not None:
                        raise problem
                return ev
            return None  # ConnectionClosed, or nothing more to read

    def _admit(self, log: HTTPRecord, method: str, target: str, pairs: list[tuple[bytes, bytes]],
               port: EnginePort) -> tuple[_Reject | None, str]:
        """Whether a parsed request goes to the pod: (None, its normalized path), or the answer
        it gets instead (a denial: `_Reject.denied`). Fills in `log` as Envoy's entry would be."""
        host = ua = rid = b""
        for n, v in pairs:
            if n == b"host" and not host:
                host = v
            elif n == b"user-agent" and not ua:
                ua = v
            elif n == b"x-request-id" and not rid:
                rid = v
        log.method = method
        log.authority = host.decode("latin-1")
        log.user_agent = ua.decode("latin-1")
        log.request_id = rid.decode("latin-1") if rid else os.urandom(16).hex()
        log.path = target
        if target == "*":
            return _Reject(404, "route_not_found", close=False, body=b""), ""
        if method == "CONNECT":
            return self._connect_verdict(log, port, log.src, _header_dict(pairs)), ""
        norm = normalize_path(target)
        if norm.rejected is not None:
            return _Reject(400, "path_normalization_failed", body=b""), ""
        log.path = norm.path
        decision = self._decision(log.dst[0], port.port, log.src[0])
        verdict = self._verdict(decision, method, target, norm.path, log.authority, pairs)
        log.action = verdict.action
        if not verdict.allowed:
            return _Reject(403, RBAC_DENIED.format(verdict.action), close=False, body=DENIED_BODY, denied=True), ""
        return None, norm.path

    async def _exchange(
        self, timer: _Timer, conn: h11.Connection, client: _Side,
        port: EnginePort, src: tuple[str, int], dst: tuple[str, int], up: _Upstream | None,
    ) -> tuple[_Upstream | None, bool]:
        """One request through h11: (the upstream connection to keep, whether the client
        connection goes on)."""
        log = HTTPRecord(time.time(), src, dst)
        try:
            req = await self._read_head(timer, conn, client)
        except _Reject as rej:
            self.stats.requests += 1
            self.stats.rejected += 1
            log.code, log.details = rej.status, rej.details
            await self._reply(client, rej.status, _REASONS.get(rej.status, b""), True)
            self._emit(log)
            return up, False
        if req is None:
            return up, False
        self.stats.requests += 1
        method, target = req.method.decode("latin-1"), req.target.decode("latin-1")
        pairs = _pairs(req.headers)
        problem, norm_path = self._admit(log, method, target, pairs, port)
        if problem is not None:
            log.code, log.details = problem.status, problem.details
            if problem.denied:
                self.stats.denied += 1
                _skip_empty_body(conn)
                # A body not yet read: answer and close, as Envoy does for a local reply mid-request.
                close = conn.their_state is not h11.DONE or conn.our_state is h11.MUST_CLOSE
            else:
                self.stats.rejected += 1
                if not problem.close:
                    _skip_empty_body(conn)
                close = problem.close or conn.their_state is not h11.DONE
            body = _REASONS.get(problem.status, b"") if problem.body is None else problem.body
            await self._reply(client, problem.status, body, close, conn, method)
            self._emit(log)
            return up, not close
        self.stats.allowed += 1
        try:
            return await self._forward(timer, conn, client, req.method, pairs, norm_path, port, src, log, up, None)
        finally:
            self._emit(log)

    async def _plain_exchange(
        self, timer: _Timer, client: _Side, plain: PlainRequest,
        port: EnginePort, src: tuple[str, int], dst: tuple[str, int], up: _Upstream | None,
    ) -> tuple[_Upstream | None, bool]:
        """One plain request (`h11plain`), taken whole from the client's bytes: judged as
        `_exchange` judges, answered with the bytes h11 would have written, its state the
        state h11 would be in (all read, keep-alive)."""
        log = HTTPRecord(time.time(), src, dst)
        self.stats.requests += 1
        self.stats.plain += 1
        method = plain.method.decode("latin-1")
        problem, norm_path = self._admit(log, method, plain.target.decode("latin-1"), plain.headers, port)
        if problem is not None:
            log.code, log.details = problem.status, problem.details
            if problem.denied:
                self.stats.denied += 1
            else:
                self.stats.rejected += 1
            body = _REASONS.get(problem.status, b"") if problem.body is None else problem.body
            await self._reply(client, problem.status, body, problem.close)
            self._emit(log)
            return up, not problem.close
        self.stats.allowed += 1
        try:
            return await self._forward(timer, None, client, plain.method, plain.headers, norm_path, port, src, log, up,
                                       plain)
        finally:
            self._emit(log)

    def _verdict(self, d: Decision, method: str, target: str, path: str, host: str,
                 pairs: list[tuple[bytes, bytes]]) -> RequestVerdict:
        if any(r.headers for r in d.http):
            return request_verdict(d, HTTPRequest(method, target, host, _header_dict(pairs)), path,
                                   auth_verified=self.auth_verified)
        key = (d, method, path, host)  # a decision hashes once (its hash is kept)
        v = self._verdicts.get(key)
        if v is None:
            v = request_verdict(d, HTTPRequest(method, target, host, {}), path, auth_verified=self.auth_verified)
            if len(self._verdicts) < 100_000:
                self._verdicts[key] = v
        return v

    def _connect_verdict(self, log: HTTPRecord, port: EnginePort, src: tuple[str, int], headers: dict[str, str]) -> _Reject:
        """CONNECT: judged by policy like any request (no path); an allowed one has no route."""
        decision = self._decision(log.dst[0], port.port, src[0])
        v = request_verdict(decision, HTTPRequest("CONNECT", "", log.authority, headers), "", auth_verified=self.auth_verified)
        log.action = v.action
        if not v.allowed:
            return _Reject(403, RBAC_DENIED.format(v.action), body=DENIED_BODY)
        return _Reject(404, "route_not_found", body=b"")

    async def _reply(self, client: _Side, status: int, body: bytes, close: bool,
                     conn: h11.Connection | None = None, method: str = "") -> None:
        """A local reply. On a connection that goes on, through `conn` (h11 then knows the
        response was sent); otherwise, or for a plain request (no h11 state), as raw bytes —
        the same bytes h11 writes for a connection that goes on (tests/unit/test_h11_plain.py)."""
        if not close and conn is not None and conn.our_state is h11.SEND_RESPONSE:
            client.write(_h11_reply(conn, status, body, method))
        else:
            client.write(_local_reply(status, body, close))
        with contextlib.suppress(ConnectionError):
            await client.drain()

    # -- forwarding ---------------------------------------------------------------------------

    async def _open_upstream(self, port: EnginePort) -> _Upstream:
        loop = asyncio.get_running_loop()
        limit = self.limits.read_size
        async with asyncio.timeout(self.limits.connect_timeout):
            _, side = await loop.create_connection(lambda: _Side(limit), port.upstream_ip, port.upstream_port)
        assert side.transport is not None
        sock = side.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Upstream(side, (port.upstream_ip, port.upstream_port))

    async def _forward(
        self, timer: _Timer, conn: h11.Connection | None, client: _Side, method: bytes,
        pairs: list[tuple[bytes, bytes]], path: str, port: EnginePort, src: tuple[str, int], log: HTTPRecord,
        up: _Upstream | None, plain: PlainRequest | None,
    ) -> tuple[_Upstream | None, bool]:
        """An allowed request to the pod and its response back. `conn` is the client's h11
        state, None for a plain request (`plain`), whose request and response skip h11 — as long
        as the response is plain too; otherwise h11 is brought to where it would be (`_replay`)
        and takes the response from there."""
        out_headers, websocket = _upstream_headers(pairs, src[0], log.request_id)
        if up is not None and up.side.at_eof():
            up.side.close()
            up = None
        if up is None:
            try:
                up = await self._open_upstream(port)
            except (OSError, TimeoutError):
                self.stats.upstream_errors += 1
                log.code = 503
                log.details = "upstream_reset_before_response_started{remote_connection_failure}"
                # Raw, as the h11 way always wrote it: the connection then ends (h11 did not see
                # a response; a plain request's answer is the same).
                request_done = conn is None or conn.their_state is h11.DONE
                await self._reply(client, 503, b"upstream connect error or disconnect/reset before headers. "
                                               b"reset reason: remote connection failure", not request_done)
                return None, False
        log.upstream = up.address
        target = path.encode("latin-1")
        try:
            if plain is None:
                assert conn is not None
                uc = h11.Connection(h11.CLIENT)
                # The head and whatever of the body is here already go as one write.
                # `_parsed`: the names and values came out of h11's parser (or are ours: an
                # address, "http", hex), so h11's header regexes need not run over them again.
                out = bytearray(uc.send(h11.Request(method=method, target=target, headers=out_headers,
                                                    _parsed=True)) or b"")
                if conn.they_are_waiting_for_100_continue:
                    client.write(conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
                                 or b"")
                await self._relay_request_body(timer, conn, client, uc, up, out)
            else:
                await self._flush(timer, up.side, request_bytes(method, target, out_headers, plain.body))
                kept = await self._plain_response(timer, client, up, log)
                if kept is not None:
                    return kept
                conn, uc = self._replay(plain, method, target, out_headers)
            return await self._relay_response(timer, conn, client, uc, up, log, websocket)
        except _ClientGone:
            up.side.close()
            raise
        except _Reject as rej:  # the request's body was malformed, or stalled
            up.side.close()
            log.code, log.details = rej.status, rej.details
            if conn is not None and conn.our_state is h11.SEND_RESPONSE:
                await self._reply(client, rej.status, _REASONS.get(rej.status, b""), True)
            return None, False
        except (ConnectionError, OSError, _Expired, h11.ProtocolError) as exc:
            up.side.close()
            if isinstance(exc, _Expired) and exc.kind != "upstream":
                raise _ClientGone() from None  # the client stalled
            if conn is None or conn.our_state is h11.SEND_RESPONSE:
                self.stats.upstream_errors += 1
                log.code = 503 if not isinstance(exc, _Expired) else 504
                log.details = ("upstream_reset_before_response_started{connection_termination}"
                               if log.code == 503 else "upstream_response_timeout")
                body = (b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
                        if log.code == 503 else b"upstream request timeout")
                await self._reply(client, log.code, body, True)
                return None, False
            raise _ClientGone() from None

    async def _plain_response(self, timer: _Timer, client: _Side, up: _Upstream,
                              log: HTTPRecord) -> tuple[_Upstream | None, bool] | None:
        """The pod's answer to a plain request, when its head is plain too (`plain_response`):
        the head as h11 would write it, then the body as it comes, counted by its
        Content-Length; both connections kept. None: h11 must take it (`_replay`)."""
        side = up.side
        if not side.buf and not side.eof:
            await self._wait_data(timer, "upstream", self.limits.body_timeout, side)
        if not side.buf:
            return None  # the pod closed: h11 says how
        if log.first_upstream_byte is None:
            log.first_upstream_byte = time.time()
        got = plain_response(side.buf)
        if got is None:
            return None
        log.code, log.details = got.status, VIA_UPSTREAM
        head = side.take(got.head_len)
        body = side.take(got.length)
        left = got.length - len(body)
        try:
            await self._flush(timer, client, (head if got.head is None else got.head) + body)
            # Once the head is out, whatever stops the body ends the client's connection, as
            # on the h11 way.
            while left:
                await self._wait_data(timer, "upstream", self.limits.body_timeout, side)
                if not side.buf:
                    raise ConnectionResetError("upstream closed mid-response")
                body = side.take(min(left, self.limits.read_size))
                left -= len(body)
                await self._flush(timer, client, body)
        except (_Expired, ConnectionError, OSError):
            up.side.close()
            raise _ClientGone() from None
        return up, True

    def _replay(self, plain: PlainRequest, method: bytes, target: bytes,
                out_headers: list[tuple[bytes, bytes]]) -> tuple[h11.Connection, h11.Connection]:
        """h11's state for both sides of a plain request sent without it: the client's request
        received, the pod's sent (their bytes were the same; h11's output is dropped)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        conn.receive_data(plain.raw)
        while not isinstance(conn.next_event(), h11.EndOfMessage):
            pass
        uc = h11.Connection(h11.CLIENT)
        uc.send(h11.Request(method=method, target=target, headers=out_headers, _parsed=True))
        if plain.body:
            uc.send(h11.Data(data=plain.body))
        uc.send(h11.EndOfMessage())
        return conn, uc

    async def _relay_request_body(self, timer: _Timer, conn: h11.Connection, client: _Side,
                                  uc: h11.Connection, up: _Upstream, out: bytearray) -> None:
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                raise _Reject(400, "http1.codec_error") from None
            if ev is h11.NEED_DATA:
                await self._flush(timer, up.side, out)
                try:
                    data = await self._wait_read(timer, "body", self.limits.body_timeout, client)
                except _Expired:
                    raise _Reject(408, "stream_idle_timeout") from None
                conn.receive_data(data)
                if not data:
                    raise _ClientGone()
                continue
            if isinstance(ev, h11.Data):
                out += uc.send(ev) or b""
                if len(out) >= self.limits.read_size:
                    await self._flush(timer, up.side, out)
                continue
            if isinstance(ev, h11.EndOfMessage):
                out += uc.send(h11.EndOfMessage()) or b""
                await self._flush(timer, up.side, out)
                return
            raise _ClientGone()  # ConnectionClosed mid-body

    async def _relay_response(
        self, timer: _Timer, conn: h11.Connection, client: _Side, uc: h11.Connection,
        up: _Upstream, log: HTTPRecord, websocket: bool,
    ) -> tuple[_Upstream | None, bool]:
        out = bytearray()  # for the client: written when the pod must be waited for, or at the end
        while True:
            ev = uc.next_event()
            if ev is h11.NEED_DATA:
                await self._flush(timer, client, out)
                data = await self._wait_read(timer, "upstream", self.limits.body_timeout, up.side)
                uc.receive_data(data)
                if log.first_upstream_byte is None and data:
                    log.first_upstream_byte = time.time()
                continue
            try:
                if isinstance(ev, h11.InformationalResponse):
                    if ev.status_code == 101 and websocket:
                        hdrs = _pairs(ev.headers)
                        out += conn.send(h11.InformationalResponse(status_code=101, headers=hdrs, reason=ev.reason)) or b""
                        await self._flush(timer, client, out)
                        log.code, log.details = 101, VIA_UPSTREAM
                        await self._splice(conn, client, uc, up)
                        return None, False
                    continue  # 100 Continue from the pod: the client had its own
                if isinstance(ev, h11.Response):
                    log.code, log.details = ev.status_code, VIA_UPSTREAM
                    out += conn.send(_client_response(ev)) or b""
                    continue
                if isinstance(ev, h11.Data):
                    out += conn.send(ev) or b""
                    if len(out) >= self.limits.read_size:
                        await self._flush(timer, client, out)
                    continue
                if isinstance(ev, h11.EndOfMessage):
                    out += conn.send(ev) or b""
                    await self._flush(timer, client, out)
                    if uc.our_state is h11.DONE and uc.their_state is h11.DONE:
                        up.side.unread(uc.trailing_data[0])  # kept for the next request
                        keep_up: _Upstream | None = up
                    else:
                        up.side.close()
                        keep_up = None
                    return keep_up, conn.our_state is h11.DONE and conn.their_state is h11.DONE
            except h11.LocalProtocolError:
                raise _ClientGone() from None
            except _Expired:
                raise _ClientGone() from None  # the client does not read
            raise ConnectionResetError("upstream closed mid-response")

    async def _splice(self, conn: h11.Connection, client: _Side, uc: h11.Connection, up: _Upstream) -> None:
        """After a 101: bytes both ways until either side closes."""
        early_down, _ = conn.trailing_data
        early_up, _ = uc.trailing_data
        if early_down:
            up.side.write(early_down)
        if early_up:
            client.write(early_up)

        async def pump(r: _Side, w: _Side) -> None:
            try:
                while True:
                    async with asyncio.timeout(self.limits.idle_timeout):
                        data = await r.read(self.limits.read_size)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            finally:
                with contextlib.suppress(OSError):
                    w.write_eof()

        await asyncio.gather(pump(client, up.side), pump(up.side, client), return_exceptions=True)
        up.side.close()

    # -- access logs --------------------------------------------------------------------------

    def _emit(self, log: HTTPRecord) -> None:
        if self.on_records is None:
            return
        if not self._pending_logs and self._loop is not None:
            self._loop.call_later(0.02, self._flush_logs)
        self._pending_logs.append(log)  # filled in as the request went; not touched again

    def _flush_logs(self) -> None:
        batch, self._pending_logs = self._pending_logs, []
        if batch and self.on_records is not None:
            try:
                self.on_records(batch)
            except Exception as exc:  # noqa: BLE001 - flows must never stop the proxy
                self._log(f"h11 engine: access logs dropped: {exc}")
