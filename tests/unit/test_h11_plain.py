"""The h11 engine's plain-message shortcut (`l7proxy.h11plain`) against h11 itself: whatever the
shortcut takes, h11 would have parsed the same way and written the same bytes, so the engine's
answer cannot depend on which of the two read a message. Generated messages, malformed and
unusual ones included; the shortcut may decline anything, but must take the usual ones."""

from __future__ import annotations

import time

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l7gate.l7proxy.h11engine import (
    DENIED_BODY,
    EngineLimits,
    _client_response,
    _h11_reply,
    _head_problem,
    _local_reply,
    _pairs,
    _split_head,
    _upstream_headers,
)
from l7gate.l7proxy.h11plain import plain_request, plain_response, request_bytes
from l7gate.policy.pathnorm import normalize_path

from ..integration.test_h11_differential import raw_request

LIMITS = EngineLimits()


def _plain(buf: bytes) -> object:
    return plain_request(buf, LIMITS.max_header_bytes, LIMITS.max_headers, LIMITS.read_size)


# -- requests ----------------------------------------------------------------------------------


def pick(draw: st.DrawFn, good: list[bytes], bad: list[bytes], bad_in: int = 7) -> bytes:
    """Mostly one of `good`, one time in `bad_in` one of `bad`: messages near the usual ones,
    where a shortcut's mistakes would be."""
    return draw(st.sampled_from(bad if draw(st.integers(0, bad_in - 1)) == 0 else good))


METHODS = ([b"GET", b"POST", b"PUT", b"DELETE", b"PROPFIND", b"OPTIONS", b"PATCH"],
           [b"HEAD", b"CONNECT", b"get", b"M-SEARCH", b"QUERY", b"POST\t"])
TARGETS = ([b"/v1/charge", b"/", b"/v1/charge?a=1&b=%20", b"/v1//x/../charge", b"/v1%2Fcharge", b"/%7Euser", b"/#x"],
           [b"*", b"a:443", b"http://a/x", b"/caf\xc3\xa9", b"/a b", b"", b"/a\x7f"])
VERSIONS = ([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.10"])
NAMES = ([b"User-Agent", b"Accept", b"X-Request-Id", b"X-Forwarded-For", b"x-forwarded-proto", b"Content-Type",
          b"Te", b"Keep-Alive", b"cookie", b"X-custom", b"!#$%&'*+-.^_`|~09"],
         [b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect", b"X Y", b"", b"X:Y", b"Content-Length", b"Host",
          b"caf\xc3\xa9", b"X\x00"])
SEPARATORS = ([b": ", b":", b":  ", b":\t", b": \t "], [b" : ", b"\t:", b"::"])
VALUES = ([b"a", b"a b", b"a\tb", b"", b"curl/8.5.0", b"*/*", b"10.0.0.1", b"a=b; c=d", b"chunked", b"close", b"\x21~"],
          [b"caf\xc3\xa9", b"a\x00b", b"a\rb", b"a\nb", b"a\x7fb", b"a\x0bb"])
EOLS = ([b"\r\n"], [b"\n", b"\r"])
BODIES = [b"", b"abc", b'{"amount": 1}', b"0\r\n\r\n", b"x" * 70]
TAILS = [b"", b"", b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GARBAGE", b"\r\n", b"\n"]


@st.composite
def request_like(draw: st.DrawFn) -> bytes:
    """Requests near the usual ones: each part well-formed, now and then not."""
    eol = pick(draw, *EOLS, bad_in=15)
    line = b" ".join([pick(draw, *METHODS), pick(draw, *TARGETS), pick(draw, *VERSIONS, bad_in=12)])
    headers = [pick(draw, *NAMES) + pick(draw, *SEPARATORS) + pick(draw, *VALUES) + pick(draw, [b""], [b" ", b"\t"])
               for _ in range(draw(st.integers(0, 5)))]
    hosts = draw(st.sampled_from([1] * 8 + [0, 2]))
    for _ in range(hosts):
        headers.insert(draw(st.integers(0, len(headers))), b"Host: " + pick(draw, [b"a", b"billing:8080"], [b""]))
    if draw(st.integers(0, 19)) == 0:
        headers.append(b" folded")  # obs-fold
    body = draw(st.sampled_from(BODIES))
    length = draw(st.sampled_from([b"%d" % len(body)] * 6 + [b"", b"%d" % (len(body) + 1), b"%d, %d" % (len(body), len(body)),
                                                              b"+%d" % len(body), b"0%d" % len(body)]))
    if length:
        headers.insert(draw(st.integers(0, len(headers))), b"Content-Length: " + length)
    elif body and draw(st.booleans()):
        body = b""
    data = eol.join([line, *headers]) + eol + eol + body + draw(st.sampled_from(TAILS))
    if draw(st.integers(0, 6)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


def _h11_request(buf: bytes) -> tuple[h11.Request, bytes, h11.Connection]:
    """What h11 (the engine's SERVER side) makes of `buf`: the request, its body, the state."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMITS.max_header_bytes)
    conn.receive_data(buf)
    req = conn.next_event()
    assert isinstance(req, h11.Request), req
    body = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.EndOfMessage):
            return req, body, conn
        assert isinstance(ev, h11.Data), ev
        body += ev.data


def _h11_upstream_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    uc = h11.Connection(h11.CLIENT)
    out = uc.send(h11.Request(method=method, target=target, headers=headers, _parsed=True)) or b""
    if body:
        out += uc.send(h11.Data(data=body)) or b""
    return out + (uc.send(h11.EndOfMessage()) or b"")


def check_request(buf: bytes) -> bool:
    got = _plain(buf)
    if got is None:
        return False
    assert got.raw == buf[: len(got.raw)]
    req, body, conn = _h11_request(buf)  # h11 parses it, without error
    assert (req.method, req.target, req.http_version) == (got.method, got.target, b"1.1")
    assert _pairs(req.headers) == got.headers
    assert body == got.body
    # All of it read, nothing else: the connection goes on as after any request h11 read whole.
    assert len(buf) - len(conn.trailing_data[0]) == len(got.raw)
    assert conn.their_state is h11.DONE and not conn.they_are_waiting_for_100_continue
    # The engine's framing checks (Envoy's answers) find nothing to refuse.
    assert _head_problem(_split_head(buf), LIMITS) is None
    # Any prefix is declined: the shortcut never takes a request before it is all there.
    for cut in {0, len(got.raw) - 1, len(got.raw) // 2}:
        assert _plain(buf[:cut]) is None
    # What goes to the pod is what h11 writes.
    norm = normalize_path(got.target.decode("latin-1"))
    if norm.rejected is None:
        out, websocket = _upstream_headers(got.headers, "127.0.0.1", "0123abcd")
        assert not websocket
        target = norm.path.encode("latin-1")
        assert request_bytes(got.method, target, out, got.body) == _h11_upstream_bytes(got.method, target, out,
                                                                                          got.body)
    return True


@settings(max_examples=4000, deadline=None)
@given(request_like())
@example(b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\n\r\n{\"amount\": 1}GET / HTTP/1.1\r\n")
def test_a_request_the_shortcut_takes_is_h11s_request(buf: bytes) -> None:
    check_request(buf)


@settings(max_examples=2000, deadline=None)
@given(raw_request())
def test_the_differential_tests_raw_requests_too(buf: bytes) -> None:
    check_request(buf)


@pytest.mark.parametrize("buf", [
    # wrk (the bench), curl, a browser-like GET, a pipelined pair: the shortcut takes them.
    b"POST /v1/charge HTTP/1.1\r\nHost: billing-service.payments\r\nContent-Length: 13\r\n"
    b"Content-Type: application/json\r\n\r\n{\"amount\": 1}",
    b"GET /v1/transactions HTTP/1.1\r\nHost: 10.0.1.5:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip, deflate\r\ncookie: a=b; c=d\r\n"
    b"x-request-id: 7\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
])
def test_the_usual_requests_take_the_shortcut(buf: bytes) -> None:
    assert check_request(buf)


@pytest.mark.timing
def test_a_hostile_head_is_declined_quickly() -> None:
    for head in (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a " * 30_000 + b"\x01\r\n\r\n",
                 b"GET / HTTP/1.1\r\n" + b"X:" + b" \t" * 30_000 + b"\r\n\r\n",
                 b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 10_000 + b"\r\r\n"):
        t = time.perf_counter()
        assert _plain(head) is None
        assert plain_response(head.replace(b"GET / HTTP/1.1", b"HTTP/1.1 200 OK")) is None
        assert time.perf_counter() - t < 0.05


# -- responses ---------------------------------------------------------------------------------

STATUS_LINES = ([b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 500 ",
                 b"HTTP/1.1 200  spaced  reason ", b"HTTP/1.1 999 X", b"HTTP/1.1 302 Found"],
                [b"HTTP/1.1 200", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 100 Continue",
                 b"HTTP/1.0 200 OK", b"HTTP/1.1 200 caf\xc3\xa9", b"HTTP/1.1 200 a\tb", b"HTTP/1.1 20 X",
                 b"HTTP/2 200 OK", b"http/1.1 200 OK", b"HTTP/1.1 099 X"])
RESPONSE_NAMES = ([b"content-type", b"date", b"server", b"x-forwarded-for", b"set-cookie", b"x-envoy-upstream-service-time",
                   b"x-custom", b"cache-control", b"!#$%&'*+-.^_`|~09", b"Content-Type", b"Date", b"Server",
                   b"Connection", b"Keep-Alive", b"x-forwarded-proto"],
                  [b"transfer-encoding", b"host", b"trailer", b"upgrade", b"te", b"content-length", b"X Y", b"",
                   b"caf\xc3\xa9"])
RESPONSE_SEPARATORS = ([b": ", b": ", b":", b":  ", b":\t"], [b" : ", b"\t:"])
RESPONSE_VALUES = ([b"text/plain", b"Mon, 07 Dec 2026 08:00:00 GMT", b"envoy", b"a=b; Path=/", b"", b"a  b", b"a\tb",
                    b"2", b"chunked", b"close", b"keep-alive", b"Keep-Alive, x", b"timeout=5"],
                   [b"caf\xc3\xa9", b"a\x00b", b"a\rb", b"a\x7fb"])
RESPONSE_BODIES = [b"", b"ok", b"x" * 13, b"2\r\nok\r\n0\r\n\r\n"]


@st.composite
def response_like(draw: st.DrawFn) -> bytes:
    """Responses near the usual ones (the engine's canonical ones most), now and then not."""
    eol = pick(draw, *EOLS, bad_in=15)
    headers = [pick(draw, *RESPONSE_NAMES) + pick(draw, *RESPONSE_SEPARATORS) + pick(draw, *RESPONSE_VALUES)
               + pick(draw, [b""], [b" ", b"\t"]) for _ in range(draw(st.integers(0, 5)))]
    body = draw(st.sampled_from(RESPONSE_BODIES))
    lengths = draw(st.sampled_from([[b"%d" % len(body)]] * 6 + [[], [b"0%d" % len(body)], [b"%d" % len(body)] * 2,
                                                                [b"%d, %d" % (len(body), len(body))], [b"%d" % (len(body) + 1)],
                                                                [b"-1"], [b"1" * 20]]))
    for length in lengths:
        name = pick(draw, [b"content-length", b"Content-Length"], [b"CONTENT-LENGTH"])
        headers.insert(draw(st.integers(0, len(headers))), name + b": " + length)
    data = eol.join([pick(draw, *STATUS_LINES), *headers]) + eol + eol + body
    data += draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n", b"junk"]))
    if draw(st.integers(0, 6)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


def _h11_relay(buf: bytes, method: bytes) -> tuple[bytes, int, bool, h11.Connection, h11.Connection] | None:
    """The engine's h11 way (`H11Engine._relay_response`) with `buf` from the pod: the bytes the
    client gets so far, the response's status, whether it is complete, both h11 states; None if
    no response head comes out of it (more to wait for, or an error)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"%s / HTTP/1.1\r\nHost: a\r\n\r\n" % method)
    assert isinstance(conn.next_event(), h11.Request) and isinstance(conn.next_event(), h11.EndOfMessage)
    uc = h11.Connection(h11.CLIENT)
    uc.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"a")]))
    uc.send(h11.EndOfMessage())
    uc.receive_data(buf)
    out = b""
    status = 0
    try:
        while True:
            ev = uc.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return (out, status, False, conn, uc) if status else None
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                out += conn.send(_client_response(ev)) or b""
            elif isinstance(ev, h11.Data):
                out += conn.send(ev) or b""
            elif isinstance(ev, h11.EndOfMessage):
                out += conn.send(ev) or b""
                return out, status, True, conn, uc
            else:
                return None
    except h11.ProtocolError:
        return None


def check_response(buf: bytes, method: bytes = b"POST") -> bool:
    got = plain_response(buf)
    if got is None:
        return False
    slow = _h11_relay(buf, method)
    assert slow is not None, buf
    out, status, complete, conn, uc = slow
    head = buf[: got.head_len] if got.head is None else got.head
    body = buf[got.head_len: got.head_len + got.length]
    assert head + body == out and got.status == status  # the same bytes to the client, so far
    assert complete == (len(buf) >= got.head_len + got.length)  # the same length
    if complete:
        assert len(buf) - len(uc.trailing_data[0]) == got.head_len + got.length  # the same bytes used
        # Both connections go on, as after the h11 way's end of the response.
        assert uc.our_state is h11.DONE and uc.their_state is h11.DONE
        assert conn.our_state is h11.DONE and conn.their_state is h11.DONE
    else:
        assert uc.their_state is h11.SEND_BODY  # h11 waits for the rest of the body, as the engine
    return True


@settings(max_examples=4000, deadline=None)
@given(response_like(), st.sampled_from([b"GET", b"POST", b"DELETE"]))
def test_a_response_the_shortcut_relays_is_what_h11_writes(buf: bytes, method: bytes) -> None:
    check_response(buf, method)


@pytest.mark.parametrize("buf", [
    # Envoy's direct_response (the bench's pod), a JSON API answer, one with a body to come after,
    # Python's http.server (head and body in two writes), a Go-like and a Node-like one.
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\ndate: Mon, 07 Dec 2026 08:00:00 GMT\r\n"
    b"server: envoy\r\n\r\nok",
    b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"amount\": 1}HTTP/1.1",
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11.2\r\nDate: Mon, 07 Dec 2026 08:00:00 GMT\r\n"
    b"Content-Length: 40\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Mon, 07 Dec 2026 08:00:00 GMT\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
    b"Keep-Alive: timeout=5\r\n\r\nok",
])
def test_the_usual_responses_take_the_shortcut(buf: bytes) -> None:
    assert check_response(buf)


# -- local replies -----------------------------------------------------------------------------


@pytest.mark.parametrize("status, body", [(403, DENIED_BODY), (400, b""), (404, b""), (503, b"upstream connect error"),
                                          (431, b"Request Header Fields Too Large")])
def test_a_raw_reply_that_keeps_the_connection_is_h11s(status: int, body: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request) and isinstance(conn.next_event(), h11.EndOfMessage)
    h11_bytes = _h11_reply(conn, status, body, "GET")
    assert _local_reply(status, body, False) == h11_bytes
    assert conn.our_state is h11.DONE
