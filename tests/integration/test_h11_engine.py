"""The h11 engine under hostile and heavy input (loopback mode, a real agent in this process):
slow clients, huge heads, many connections, big bodies either way, pipelining, upgrades and its
timeouts. It must keep serving everyone else, with memory bounded, and judge every request."""

from __future__ import annotations

import base64
import copy
import re
import resource
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from l7gate.testing.wait import eventually

from .loopback import OFFSET, HttpConn, World, loopback_world, pod, request, seed_policies

pytestmark = pytest.mark.integration

S = 77  # this module's 127.77.x.x addresses
BILLING = f"127.{S}.1.10"
FRONTEND = f"127.{S}.2.55"
BIG = f"127.{S}.1.30"  # a pod whose server streams big bodies and takes WebSocket upgrades
RAW = f"127.{S}.1.40"  # a pod answering in canonical bytes, one write per response (_RawPod)


class _Big(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", "x")
            self.end_headers()
            self.wfile.flush()
            while True:  # echo, raw: the test speaks bytes, not frames
                data = self.connection.recv(4096)
                if not data:
                    return
                self.connection.sendall(data.upper())
        n = int(self.path.rsplit("/", 1)[-1])
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = b"x" * 65536
        left = n
        while left:
            k = min(left, len(chunk))
            self.wfile.write(chunk[:k])
            left -= k

    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        got = 0
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                break
            got += len(data)
            left -= len(data)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


BIG_POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "big", "namespace": "payments"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "big"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend-service",
                                                             "k8s:io.kubernetes.pod.namespace": "web"}}],
                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                       "rules": {"http": [{"method": "GET", "path": "/bytes/[0-9]+"},
                                                          {"method": "POST", "path": "/upload"},
                                                          {"method": "GET", "path": "/ws"}]}}]}]},
}


class _RawPod:
    """A pod's server answering each request with one fixed response, canonical and in one
    write (what the engine's plain-response shortcut relays), and keeping every request's
    bytes as they arrived."""

    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\nx-pod: raw\r\n\r\nhello"

    def __init__(self, ip: str, port: int) -> None:
        self.received: list[bytes] = []
        self.sock = socket.create_server((ip, port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while True:
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    m = re.search(rb"(?im)^content-length: *(\d+)", head)
                    n = int(m[1]) if m else 0
                    if len(rest) < n:
                        break
                    self.received.append(head + b"\r\n\r\n" + rest[:n])
                    buf = rest[n:]
                    c.sendall(self.RESPONSE)
                data = c.recv(65536)
                if not data:
                    return
                buf += data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with loopback_world(tmp_path_factory.mktemp("l7g-h11"), S, proxy_engine="h11", proxy_header_timeout=2.0,
                        proxy_idle_timeout=3.0, proxy_max_connections=3000) as w:
        srv = ThreadingHTTPServer((BIG, 8080 + OFFSET), _Big)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        w.servers.append(srv)
        w.core.apply([pod("big-0", "payments", BIG, {"app": "big"}, "cluster-a", (8080,)), BIG_POLICY])
        w.synced()
        yield w


@pytest.fixture(scope="module")
def raw_pod(world: World) -> Iterator[_RawPod]:
    server = _RawPod(RAW, 8080 + OFFSET)
    try:
        world.core.apply([pod("raw-0", "payments", RAW, {"app": "big"}, "cluster-a", (8080,))])  # BIG_POLICY's
        world.synced()
        yield server
    finally:
        server.close()


def _latency(src: str = FRONTEND) -> float:
    t = time.monotonic()
    assert request(src, BILLING, 8080, "POST", "/v1/charge").status == 200
    return time.monotonic() - t


def _connect(src: str = FRONTEND, dst: str = BILLING) -> socket.socket:
    return socket.create_connection((dst, 8080), timeout=5, source_address=(src, 0))


def _status_line(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\r\n", 1)[0]


def test_slow_clients_do_not_hold_up_others_and_are_cut_at_the_header_timeout(world: World) -> None:
    slow = [_connect() for _ in range(200)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/charge HTTP/1.1\r\nHost: a\r\n")  # and never the rest
        assert max(_latency() for _ in range(20)) < 1.0
        for s in slow[:5]:  # after proxy.headerTimeout (2 s): 408 and closed
            s.settimeout(6)
            assert _status_line(s) == b"HTTP/1.1 408 Request Timeout"
            while s.recv(4096):  # the rest of the answer, then the close
                pass
    finally:
        for s in slow:
            s.close()


def test_idle_keepalive_connections_are_closed_after_the_idle_timeout(world: World) -> None:
    c = HttpConn(FRONTEND, BILLING, 8080)
    try:
        assert c.request("POST", "/v1/charge").status == 200
        c.sock.settimeout(8)
        t = time.monotonic()
        assert c.sock.recv(1) == b""  # closed by the engine
        assert 2.0 < time.monotonic() - t < 6.0  # proxy.idleTimeout: 3 s
    finally:
        c.close()


def test_huge_heads_are_431_and_others_are_served(world: World) -> None:
    for head in (b"X: " + b"a" * 70_000 + b"\r\n", b"".join(b"X%d: a\r\n" % i for i in range(101))):
        s = _connect()
        try:
            s.sendall(b"POST /v1/charge HTTP/1.1\r\nHost: a\r\n" + head + b"\r\n")
            assert _status_line(s) == b"HTTP/1.1 431 Request Header Fields Too Large"
        finally:
            s.close()
    assert _latency() < 1.0


def test_many_connections_are_held_and_the_engine_serves_a_new_one(world: World) -> None:
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 3 * n + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 3 * n + 500), hard))
    engine = world.agent.engine
    assert engine is not None
    t0 = time.monotonic()
    conns = [_connect() for _ in range(n)]
    try:
        def held() -> bool:
            active = engine.status()["connections"]["active"]
            assert active >= n, (active, time.monotonic() - t0)
            return True

        # (proxy.idleTimeout is 3 s here: the first ones are closed after that)
        eventually(held, max(0.5, 2.8 - (time.monotonic() - t0)), f"{n} connections open")
        assert _latency() < 1.0
    finally:
        for s in conns:
            s.close()


def test_pipelined_requests_are_judged_one_by_one(world: World) -> None:
    s = _connect()
    try:
        s.sendall(b"".join(b"%s %s HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n" % (m, p) for m, p in (
            (b"POST", b"/v1/charge"), (b"POST", b"/v1/refund"), (b"GET", b"/v1/charge"), (b"POST", b"/v1/charge"))))
        s.settimeout(5)
        buf = b""
        while buf.count(b"HTTP/1.1 ") < 4:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
        statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", buf)]
        assert statuses == [200, 403, 403, 200]
    finally:
        s.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_a_big_upload_streams_with_memory_bounded(world: World) -> None:
    size = 256 << 20
    before = _rss_kib()
    s = _connect(dst=BIG)
    try:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"y" * (1 << 20)
        for _ in range(size >> 20):
            s.sendall(chunk)
        s.settimeout(30)
        buf = b""
        while not buf.endswith(str(size).encode()):
            data = s.recv(65536)
            assert data, buf
            buf += data
        assert buf.startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    assert _rss_kib() - before < 64 * 1024, "the upload was buffered"


def test_a_slow_reader_of_a_big_response_is_held_back_not_buffered(world: World) -> None:
    size = 512 << 20
    before = _rss_kib()
    s = _connect(dst=BIG)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
        s.settimeout(10)
        assert _status_line(s).startswith(b"HTTP/1.1 200")
        time.sleep(2)  # the client reads nothing: the engine must not read the pod's body ahead
        assert _rss_kib() - before < 64 * 1024, "the response was buffered"
        assert _latency() < 1.0  # and it serves others meanwhile
    finally:
        s.close()


def test_websocket_upgrades_pass_only_where_policy_allows(world: World) -> None:
    key = base64.b64encode(b"0123456789abcdef")
    up = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n" % key
    s = _connect(dst=BIG)
    try:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\n" + up + b"\r\n")
        s.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        s.sendall(b"hello")
        assert s.recv(4096) == b"HELLO"  # bytes relayed both ways after the upgrade
    finally:
        s.close()
    s = _connect(dst=BIG)
    try:
        s.sendall(b"GET /other HTTP/1.1\r\nHost: a\r\n" + up + b"\r\n")
        assert _status_line(s) == b"HTTP/1.1 403 Forbidden"
    finally:
        s.close()


def test_a_policy_change_applies_to_the_next_request_on_an_open_connection(world: World) -> None:
    c = HttpConn(FRONTEND, BILLING, 8080)
    try:
        assert c.request("GET", "/v1/transactions").status == 403
        changed = copy.deepcopy(seed_policies()[1])
        changed["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"].append({"method": "GET", "path": "/v1/transactions"})
        world.core.apply([changed])
        assert c.request("GET", "/v1/transactions").status == 200  # no wait: the next request sees it
        world.core.apply(seed_policies())
        assert c.request("GET", "/v1/transactions").status == 403
    finally:
        c.close()


def _responses(s: socket.socket, n: int) -> list[bytes]:
    """`n` whole responses from `s` (Content-Length framed), the date masked."""
    s.settimeout(5)
    buf, out = b"", []
    while len(out) < n:
        if b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            m = re.search(rb"(?im)^content-length: *(\d+)", head)
            k = int(m[1]) if m else 0
            if len(rest) >= k:
                out.append(re.sub(rb"(?im)^date: [^\r]*", b"date: -", head) + b"\r\n\r\n" + rest[:k])
                buf = rest[k:]
                continue
        data = s.recv(65536)
        assert data, (out, buf)
        buf += data
    return out


def test_the_plain_shortcut_and_h11_give_the_same_bytes_both_ways(world: World, raw_pod: _RawPod) -> None:
    """The same requests, once each sent whole (the shortcut takes them, and the pod's canonical
    answers) and once with their heads in two pieces (h11 reads them): the client and the pod
    get byte for byte the same, pipelined or not, allowed or denied."""
    engine = world.agent.engine
    assert engine is not None
    reqs = [b"POST /upload HTTP/1.1\r\nX-Request-Id: r1\r\nHost: raw\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /nope HTTP/1.1\r\nHost: raw\r\nX-Request-Id: r2\r\n\r\n",
            b"GET /bytes//5 HTTP/1.1\r\nhost: raw\r\nx-request-id: r3\r\nuser-agent: t\r\n\r\n"]
    got: dict[bool, tuple[list[bytes], list[bytes], int]] = {}
    for split in (False, True):
        received_before = len(raw_pod.received)
        plain_before = engine.stats.plain
        s = _connect(dst=RAW)
        try:
            if split:
                for r in reqs:
                    s.sendall(r[:9])
                    time.sleep(0.2)  # the engine has read the first piece: h11 takes the request
                    s.sendall(r[9:])
                    time.sleep(0.2)
            else:
                s.sendall(b"".join(reqs))  # pipelined
            answers = _responses(s, len(reqs))
        finally:
            s.close()
        eventually(lambda: len(raw_pod.received) >= received_before + 2, 5, "the pod to get both allowed requests")
        got[split] = (answers, raw_pod.received[received_before:], engine.stats.plain - plain_before)
    assert [a.split(b"\r\n", 1)[0] for a in got[False][0]] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 403 Forbidden",
                                                                 b"HTTP/1.1 200 OK"]
    assert got[False][2] == 3 and got[True][2] == 0  # the shortcut took them all, then none
    assert got[False][0] == got[True][0]  # what the client got
    assert got[False][1] == got[True][1]  # what the pod got
