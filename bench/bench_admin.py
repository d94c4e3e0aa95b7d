"""The admin API under load and under a descriptor-exhaustion attack: the bounded server
(`agent/httpd.py`) against the server the agent had before, a thread per connection
(`http.server.ThreadingHTTPServer`, listen backlog 5), both serving the same AdminApp of one real
agent (with its Envoy), in the same run, interleaved.

- requests/s and p99 with 500 concurrent clients (wrk -c500), each request on a new connection
  (as every CLI call and health probe makes one), GET /v1/status with the bearer token, over
  TCP on 127.0.0.1 (wrk speaks TCP only; the default unix socket is faster);
- the agent process's RSS and thread count with 5,000 idle connections held by another process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from run import Context, Result

from _world import find_wrk, parse_wrk, start
from l7gate.agent.admin import AdminApp, AdminServer
from l7gate.agent.httpd import Limits, Request

CLIENTS = 500
IDLE = 5000

HOLD = """
import resource, select, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
pending = []
for _ in range(int(sys.argv[3])):
    s = socket.socket(); s.setblocking(False); s.connect_ex((sys.argv[1], int(sys.argv[2]))); pending.append(s)
held, deadline = [], time.monotonic() + 60
while pending and time.monotonic() < deadline:  # until every handshake completed (SYN retries too)
    p = select.poll()
    for s in pending:
        p.register(s, select.POLLOUT)
    ready = {fd for fd, _ in p.poll(500)}
    done = [s for s in pending if s.fileno() in ready]
    held += [s for s in done if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
    pending = [s for s in pending if s.fileno() not in ready]
print("holding", len(held), flush=True)
sys.stdin.read()
"""


class _ThreadPerConnection(BaseHTTPRequestHandler):
    """The agent's admin transport before: one thread per connection, no timeouts."""

    protocol_version = "HTTP/1.1"
    app: AdminApp

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        resp = self.app.handle(Request(self.command, self.path, headers, body, self.client_address[0],
                                       self.server.server_address[1]))  # type: ignore[index]
        data = resp.body if isinstance(resp.body, bytes) else b"".join(resp.body)
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _any


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients reset by the full backlog: counted by wrk, not worth a traceback each


def _before(app: AdminApp) -> tuple[ThreadingHTTPServer, str]:
    handler = type("H", (_ThreadPerConnection,), {"app": app})
    srv = _QuietServer(("127.0.0.1", 0), handler)  # request_queue_size 5, as before
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"127.0.0.1:{srv.server_address[1]}"


def _wrk(address: str, token: str, seconds: int, script: Path) -> tuple[float, float, int, int]:
    """(requests/s, p99 ms, socket errors, requests answered) of one wrk run."""
    # A new connection per request, as every CLI call and probe makes one.
    script.write_text(f'wrk.headers["Authorization"] = "Bearer {token}"\nwrk.headers["Connection"] = "close"\n')
    out = subprocess.run([find_wrk(), "-t2", f"-c{CLIENTS}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                          "-s", str(script), f"http://{address}/v1/status"],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
    r = parse_wrk(out.stdout)
    if r.non_2xx:
        raise RuntimeError(f"{r.non_2xx} answers were not 200:\n{out.stdout}")
    assert r.p99_ms is not None
    return r.rps, r.p99_ms, r.socket_errors, r.requests


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _idle_cost(address: str) -> tuple[float, int, int, int]:
    """(RSS growth MiB, threads added, descriptors added, connections established) while another
    process holds IDLE idle connections to `address`."""
    host, _, port = address.rpartition(":")
    rss0, threads0, fds0 = _rss_mib(), threading.active_count(), len(os.listdir("/proc/self/fd"))
    proc = subprocess.Popen([sys.executable, "-I", "-c", HOLD, host, port, str(IDLE)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        established = int(proc.stdout.readline().split()[1])
        time.sleep(3.0)  # every connection accepted (and, before, every thread started)
        rss, threads, fds = _rss_mib(), threading.active_count(), len(os.listdir("/proc/self/fd"))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
    time.sleep(2.0)  # let the connections close before the next measurement
    return rss - rss0, threads - threads0, fds - fds0, established


def run(ctx: Context) -> list[Result]:
    find_wrk()
    seconds = 2 if ctx.quick else 4
    pairs = 1 if ctx.quick else 3
    agent = start(ctx.scratch / "admin-bench", "node-admin")
    try:
        token = "Zr3x_Q9mLk2VbN8wTy6uHs4PdJf1Gc0aEoRi7XlM5nB" + "x"
        app = AdminApp(agent.core, agent.admin.app.hooks, token)
        after = AdminServer(app, "127.0.0.1:0", limits=Limits())
        after.start()
        before, before_addr = _before(app)
        rows: dict[str, list[tuple[float, float, int, int]]] = {"before": [], "after": []}
        try:
            for i in range(pairs):
                for name, addr in (("before", before_addr), ("after", after.address))[:: 1 if i % 2 == 0 else -1]:
                    rows[name].append(_wrk(addr, token, seconds, ctx.scratch / "auth.lua"))
                    time.sleep(1.0)
            idle_after = _idle_cost(after.address)
            idle_before = _idle_cost(before_addr)
        finally:
            after.stop()
            before.shutdown()
            before.server_close()
    finally:
        agent.stop()

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[name])

    failed = {k: sum(r[2] for r in v) for k, v in rows.items()}
    answered = {k: sum(r[3] for r in v) for k, v in rows.items()}
    spread = (f"{pairs} interleaved pairs of {seconds} s, wrk -t2 -c{CLIENTS}, a connection per request, "
              f"GET /v1/status of a real agent; requests failed (refused or reset): before {failed['before']:,} "
              f"of {failed['before'] + answered['before']:,}, after {failed['after']:,} of "
              f"{failed['after'] + answered['after']:,}")
    rps_a, rps_b = med("after", 0), med("before", 0)
    p99_a, p99_b = med("after", 1), med("before", 1)
    return [
        Result(name=f"admin API requests/s, {CLIENTS} concurrent clients", value=rps_a, unit="req/s",
               baseline_name="a thread per connection (before)", baseline_value=rps_b, notes=spread),
        Result(name=f"admin API p99 latency, {CLIENTS} concurrent clients", value=p99_a, unit="ms",
               baseline_name="a thread per connection (before)", baseline_value=p99_b,
               notes="over the requests answered: before, the listen backlog of 5 refused or reset "
                     f"{failed['before']:,} requests, which its p99 does not count; after, the backlog of 1024 "
                     f"queues the burst ({failed['after']:,} failed), so every client waits its turn: at "
                     f"saturation the mean is clients / throughput"),
        Result(name=f"agent RSS growth with {IDLE:,} idle connections", value=idle_after[0], unit="MiB",
               baseline_name="a thread per connection (before)", baseline_value=idle_before[0],
               notes=f"threads added: {idle_after[1]} (before: {idle_before[1]}); descriptors added: "
                     f"{idle_after[2]} (before: {idle_before[2]}); handshakes completed: {idle_after[3]} "
                     f"(before: {idle_before[3]}); the bounded server holds at most admin.maxConnections "
                     f"({Limits().max_connections}) and closes the oldest idle one"),
    ]
