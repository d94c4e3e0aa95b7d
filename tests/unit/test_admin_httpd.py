"""The admin API's transport and its caller policy: bounds that hold under abuse (slow, huge,
many connections) and the requests a web page could make refused. Loopback sockets only."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.admin import AdminApp, AdminHooks, token_weakness
from l7gate.agent.httpd import BoundedHTTPServer, Limits, Request, Response
from l7gate.testing.wait import eventually


def ok(req: Request) -> Response:
    return Response(200, json.dumps({"path": req.target, "len": len(req.body)}).encode())


class Server:
    def __init__(self, handler: Any = ok, **limits: Any) -> None:
        self.srv = BoundedHTTPServer("127.0.0.1:0", handler, Limits(**limits))
        self.srv.start()
        host, _, port = self.srv.address.rpartition(":")
        self.addr = (host, int(port))

    def conn(self) -> socket.socket:
        return socket.create_connection(self.addr, timeout=5)

    def close(self) -> None:
        self.srv.stop()


@pytest.fixture
def server() -> Iterator[Any]:
    made: list[Server] = []

    def make(handler: Any = ok, **limits: Any) -> Server:
        s = Server(handler, **limits)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = next((int(v) for k, _, v in (ln.partition(b": ") for ln in head.split(b"\r\n")[1:])
                   if k.lower() == b"content-length"), 0)
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, rest[:length]


def closed(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


def test_keep_alive_and_a_body(server: Any) -> None:
    s = server()
    c = s.conn()
    c.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert read_response(c) == (200, b'{"path": "/a", "len": 3}')
    c.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(c)[0] == 200


def test_a_slowloris_is_cut_at_the_header_deadline_even_while_trickling(server: Any) -> None:
    s = server(header_timeout=0.6)
    c = s.conn()
    start = time.monotonic()
    c.sendall(b"GET / HTTP/1.1\r\n")
    cut = False
    for _ in range(30):  # a byte every 0.1 s: each alone would keep a per-read timeout alive
        try:
            c.sendall(b"X")
        except OSError:
            cut = True
            break
        time.sleep(0.1)
        if closed(c, 0.001):
            cut = True
            break
    assert cut and time.monotonic() - start < 2.0
    assert s.srv.stats().timed_out == 1


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
])
def test_bad_requests_get_a_clear_status_and_a_closed_connection(server: Any, raw: bytes, status: int) -> None:
    s = server(max_body=1 << 20)
    c = s.conn()
    c.sendall(raw)
    got, body = read_response(c)
    assert got == status and json.loads(body)["error"]
    assert closed(c, 2)


def test_a_new_client_evicts_the_oldest_idle_connection(server: Any) -> None:
    s = server(max_connections=4)
    idle = [s.conn() for _ in range(4)]
    eventually(lambda: s.srv.stats().connections == 4, 5, "the four idle connections to be admitted")
    fresh = s.conn()
    fresh.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(fresh)[0] == 200
    assert closed(idle[0], 2) and not closed(idle[3], 0.2)
    assert s.srv.stats().evicted >= 1 and s.srv.stats().connections <= 4


def test_when_every_connection_is_inside_a_request_the_newcomer_is_refused(server: Any) -> None:
    release = threading.Event()
    inside: list[Request] = []

    def slow(req: Request) -> Response:
        inside.append(req)
        release.wait(10)
        return ok(req)

    s = server(slow, max_connections=2, workers=2)
    busy = [s.conn() for _ in range(2)]
    for c in busy:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    eventually(lambda: len(inside) == 2, 5, "both requests to be inside the handler")
    newcomer = s.conn()
    assert closed(newcomer, 2)
    release.set()
    assert all(read_response(c)[0] == 200 for c in busy)
    assert s.srv.stats().refused == 1


def test_idle_connections_cost_no_thread(server: Any) -> None:
    s = server(max_connections=600)
    c = s.conn()
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    read_response(c)
    before = threading.active_count()
    idle = [s.conn() for _ in range(500)]
    eventually(lambda: s.srv.stats().connections >= 500, 5, "500 idle connections to be admitted")
    assert threading.active_count() == before
    for i in idle:
        i.close()


def test_streams_are_chunked_and_bounded(server: Any) -> None:
    stop = threading.Event()

    def handler(req: Request) -> Response:
        def gen() -> Iterator[bytes]:
            yield b"one\n"
            while not stop.wait(0.05):
                yield b""
        return Response(200, gen(), "application/x-ndjson")

    s = server(handler, max_streams=1)
    a = s.conn()
    a.sendall(b"GET /follow HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"one" not in data:
        data += a.recv(4096)
    assert b"Transfer-Encoding: chunked" in data and b"4\r\none\n\r\n" in data
    b = s.conn()
    b.sendall(b"GET /follow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(b)[0] == 503
    stop.set()
    assert closed(a, 5)


def test_a_unix_socket_is_created_0600_and_a_live_one_is_not_taken_over(tmp_path: Path) -> None:
    import os

    path = tmp_path / "admin.sock"
    srv = BoundedHTTPServer(f"unix:{path}", ok)
    srv.start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(OSError, match="in use"):
            BoundedHTTPServer(f"unix:{path}", ok)
    finally:
        srv.stop()
    assert not path.exists()


# -- who may call (AdminApp's policy), without sockets -------------------------------------------

HOOKS = AdminHooks(status=lambda: {"node": "n"}, xds_status=lambda: {}, xds_config=lambda n, t: {},
                   metrics=lambda: (b"", "text/plain"), health=lambda: [])


def call(app: AdminApp, method: str, target: str, headers: dict[str, str], body: bytes = b"",
         port: int | None = 9876) -> int:
    return app.handle(Request(method, target, headers, body, "127.0.0.1", port)).status


def test_requests_a_web_page_could_make_are_refused() -> None:
    app = AdminApp(None, HOOKS, token="t" * 8 + "0123456789abcdefghijklmnopqrstuv")  # type: ignore[arg-type]
    auth = {"authorization": f"Bearer {app.token}", "host": "127.0.0.1:9876"}
    assert call(app, "GET", "/v1/status", auth) == 200
    assert call(app, "GET", "/v1/status", {**auth, "origin": "http://evil.example"}) == 403
    assert call(app, "GET", "/v1/status", {**auth, "sec-fetch-site": "cross-site"}) == 403
    assert call(app, "GET", "/v1/status", {**auth, "host": "evil.example:9876"}) == 403  # DNS rebinding
    assert call(app, "GET", "/v1/status", {**auth, "host": "127.0.0.1:80"}) == 403
    assert call(app, "GET", "/v1/status", {k: v for k, v in auth.items() if k != "host"}) == 403
    for host in ("localhost:9876", "[::1]:9876", "10.0.0.1:9876"):
        assert call(app, "GET", "/v1/status", {**auth, "host": host}) == 200
    post = {**auth, "content-type": "text/plain"}
    assert call(app, "POST", "/v1/policy", post, b'{"objects": []}') == 415
    assert call(app, "POST", "/v1/policy", {**auth, "content-type": "application/json; charset=utf-8"},
                b'{"objects": []}') == 400  # reached the route: an empty list is a bad request
    assert call(app, "GET", "/v1/status", {"host": "127.0.0.1:9876"}) == 401
    assert call(app, "GET", "/v1/status", {"host": "127.0.0.1:9876", "authorization": "Bearer x"}) == 401
    assert call(app, "GET", "/healthz", {"host": "127.0.0.1:9876"}) == 200  # no token for health
    # A unix socket has no Host to check, the rest holds.
    unix = AdminApp(None, HOOKS)  # type: ignore[arg-type]
    assert call(unix, "GET", "/v1/status", {}, port=None) == 200
    assert call(unix, "GET", "/v1/status", {"origin": "null"}, port=None) == 403


def test_healthz_says_what_is_wrong() -> None:
    import dataclasses

    sick = AdminApp(None, dataclasses.replace(HOOKS, health=lambda: ["Envoy is STOPPED"]))  # type: ignore[arg-type]
    resp = sick.handle(Request("GET", "/healthz", {}, b"", "unix"))
    assert resp.status == 503 and json.loads(resp.body)["problems"] == ["Envoy is STOPPED"]  # type: ignore[arg-type]


@pytest.mark.parametrize("token, weak", [
    ("aaaaaaaaaaaaaaaa", True), ("a" * 64, True), ("short", True), ("ab" * 32, True),
    ("0123456789abcdef" * 2, True),
    ("3f9a1c0e7b2d4856a9e0c1f2d3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f70", False),
    ("Zr3x_Q9mLk2VbN8wTy6uHs4PdJf1Gc0aEoRi7XlM5nB", False),
])
def test_token_strength(token: str, weak: bool) -> None:
    assert (token_weakness(token) is not None) == weak
