"""The h11 engine's shortcut for plain messages: what h11 would parse and write, told without it.

Theory of operation
-------------------
Most requests and responses a proxy carries are plain: one HTTP/1.1 head, well-formed header
lines, a Content-Length body that is all there, nothing that changes the connection (no
Connection, Upgrade, Expect or Transfer-Encoding). For those, h11's work on both sides (its
state machines, event objects, header normalization, writers) was more than half of the engine's
CPU per request, and its result is known in advance:

- `plain_request(buf)`: a request at the start of `buf` that h11 would parse, with its body,
  into exactly these (method, target, headers, body) and that the engine's framing checks
  (`h11engine._head_problem`) pass; None for anything else (incomplete, unusual, malformed),
  which the engine then gives to h11 from the same bytes: the shortcut only ever declines.
- `request_bytes(...)`: the bytes h11 (CLIENT) writes for that request to the pod.
- `plain_response(buf)`: a response head at the start of `buf` that h11 would parse and the
  engine write back as `head` (its hop-by-hop headers dropped, names in lower case; None when
  that is the pod's head as it is, the usual case with Envoy or another proxy as the pod), with
  a Content-Length body relayed as it comes, the pod's connection kept after it; or None.

tests/unit/test_h11_plain.py holds each answer equal to h11's on generated messages (and the
engine's replies to what they were through h11). Pure: no I/O, no state.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# h11's grammar (h11/_abnf.py) narrowed: ASCII only, CRLF only, no obs-fold, no empty line
# before the request. (No possessive quantifiers: CPython 3.11.2 matches `(?:x+)*+` wrongly.
# These patterns backtrack linearly; tests/unit/test_h11_plain.py times hostile heads.)
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?"
_REQUEST_HEAD = re.compile(
    rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/1\.1\r\n((?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*)\r\n")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n")
# A response head as h11 writes it back: lower-case names, ": ", no padding; a reason phrase.
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.1 ([2-9][0-9][0-9]) [\x20-\x7e]*\r\n((?:[-!#$%&'*+.^_`|~0-9a-z]+: " + _VALUE + rb"\r\n)*)\r\n")
_ANY_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.1 ([2-9][0-9][0-9]) ([\x20-\x7e]*)\r\n((?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*)\r\n")
_NAME = re.compile(rb"^([^:\r\n]+):", re.M)
_CONTENT_LENGTH = re.compile(rb"^content-length: ([0-9]{1,19})\r\n", re.M)

# The methods Envoy's HTTP/1 codec takes (measured: others, e.g. M-SEARCH or QUERY, are a 400).
ENVOY_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK "
    b"SEARCH REPORT MKACTIVITY CHECKOUT MERGE NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE MKCALENDAR LINK UNLINK "
    b"SOURCE BIND REBIND UNBIND ACL".split())
# Those the shortcut takes: not CONNECT (no route) nor HEAD (its response's framing is not its
# headers').
_METHODS = ENVOY_METHODS - {b"CONNECT", b"HEAD"}
# Request headers that change h11's state or the engine's handling (keep-alive, upgrades,
# 100-continue, chunked bodies).
_REQUEST_DECLINES = frozenset({b"transfer-encoding", b"connection", b"upgrade", b"expect"})
# Response headers the engine strips (`h11engine._client_response`: its hop-by-hop ones but
# x-forwarded-for).
_RESPONSE_STRIPPED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                                b"http2-settings", b"expect", b"x-forwarded-proto"})
# Response headers that make a canonical head go the long way: stripped ones, Host (h11 writes
# it first), Transfer-Encoding.
_RESPONSE_DECLINES = _RESPONSE_STRIPPED | {b"host", b"transfer-encoding"}


class PlainRequest(NamedTuple):
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # (lower-case name, value), in order, as h11's parse
    body: bytes
    raw: bytes  # the request's bytes, head and body: `len(raw)` were taken from the buffer


def plain_request(buf: bytes | bytearray, max_head: int, max_headers: int, max_body: int) -> PlainRequest | None:
    """The plain request at the start of `buf`, or None (then h11 decides)."""
    m = _REQUEST_HEAD.match(buf)
    if m is None:
        return None
    method = m[1]
    head_len = m.end()
    if method not in _METHODS or head_len > max_head:
        return None
    fields = _FIELD.findall(m[3])
    if len(fields) >= max_headers - 1:
        return None
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    length = -1
    for name, value in fields:
        n = name.lower()
        if n in _REQUEST_DECLINES:
            return None
        if n == b"host":
            hosts += 1
        elif n == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 19:
                return None
            length = int(value)
        headers.append((n, value))
    if hosts != 1 or length > max_body:
        return None
    end = head_len + max(length, 0)
    if len(buf) < end:
        return None
    raw = bytes(buf[:end])
    return PlainRequest(method, m[2], headers, raw[head_len:], raw)


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """What h11 writes for `Request(method, target, headers)` and a body of `body`'s length
    (Content-Length framing): the Host line first, as h11's writer puts it."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [n + b": " + v for n, v in headers if n == b"host"]
    lines += [n + b": " + v for n, v in headers if n != b"host"]
    lines.append(b"")
    lines.append(body)
    return b"\r\n".join(lines)


class PlainResponse(NamedTuple):
    status: int
    head_len: int  # bytes of the pod's head at the start of the buffer
    length: int  # of the body that follows (Content-Length)
    head: bytes | None  # the head as the client gets it; None: the pod's, byte for byte


def plain_response(buf: bytes | bytearray) -> PlainResponse | None:
    """The head of a plain response at the start of `buf` and what the client gets for it (its
    body, `length` bytes, follows as it comes), or None (then h11 decides)."""
    m = _RESPONSE_HEAD.match(buf)
    if m is not None:  # canonical already: relayed as it is, if nothing in it is to be changed
        status = int(m[1])
        block = m[2]
        lengths = _CONTENT_LENGTH.findall(block)
        if len(lengths) == 1 and status != 204 and status != 304:
            names = _NAME.findall(block)
            if names.count(b"content-length") == 1 and _RESPONSE_DECLINES.isdisjoint(names):
                return PlainResponse(status, m.end(), int(lengths[0]), None)
    m = _ANY_RESPONSE_HEAD.match(buf)
    if m is None:
        return None
    status = int(m[1])
    if status == 204 or status == 304:  # no body whatever the headers say
        return None
    lines = [b"HTTP/1.1 " + m[1] + b" " + m[2]]
    length = -1
    for name, value in _FIELD.findall(m[3]):
        n = name.lower()
        if n in _RESPONSE_STRIPPED:
            if n == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
                return None  # the pod ends the connection: h11's to tell
            continue
        if n == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 19:
                return None
            length = int(value)
        elif n == b"host" or n == b"transfer-encoding":
            return None
        lines.append(n + b": " + value)
    if length < 0:
        return None
    lines.append(b"")
    lines.append(b"")
    return PlainResponse(status, m.end(), length, b"\r\n".join(lines))
