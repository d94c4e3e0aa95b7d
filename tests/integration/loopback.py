"""A loopback-mode world for integration tests: a real agent (in this process) with its real
Envoy (a child process), pods as HTTP servers on their own 127.x addresses, and a client that
sends requests from a chosen source address.

Every address is inside 127.0.0.0/8; every process started is stopped at the end, by PID.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.daemon import Agent, start_agent
from l7gate.testing.wait import eventually

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"
OFFSET = 10000


def seed_policies() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((SEED / name).read_text()))
    return docs


def pod(name: str, ns: str, ip: str, labels: dict[str, str], cluster: str, ports: tuple[int, ...] = (),
        names: dict[int, str] | None = None) -> dict[str, Any]:
    """`names`: container port number → its name (named ports)."""
    declared = [{"containerPort": p, **({"name": names[p]} if names and p in names else {})} for p in ports]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {"l7gate.io/cluster": cluster}},
        "spec": {"containers": [{"name": "app", "ports": declared}]},
        "status": {"podIP": ip},
    }


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one response, not two writes 40 ms apart
    pod_name = ""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"pod": self.pod_name, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Response:
    status: int
    body: bytes


class HttpConn:
    """One keep-alive HTTP/1.1 connection from a chosen source address."""

    def __init__(self, src: str, dst: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0))
        self.buf = b""

    def request(self, method: str, path: str, host: str = "billing-service.payments", body: bytes = b"") -> Response:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        return self._read()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buf += chunk

    def _read(self) -> Response:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.decode().partition(":") for ln in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    break
        else:
            n = int(headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
        return Response(status, body)

    def close(self) -> None:
        self.sock.close()


def request(src: str, dst: str, port: int, method: str, path: str) -> Response:
    """One request on a fresh connection; a refused/reset connection is status 0."""
    try:
        c = HttpConn(src, dst, port)
    except OSError:
        return Response(0, b"")
    try:
        return c.request(method, path)
    except OSError:
        return Response(0, b"")
    finally:
        c.close()


def _answered(send: Callable[[], Response], want: int) -> Callable[[], bool]:
    """A predicate for `eventually`: True once a request answers `want`; otherwise it raises,
    so that a timeout reports the last status seen."""

    def answered() -> bool:
        got = send().status
        if got != want:
            raise AssertionError(f"status {got}")
        return True

    return answered


def wait_conn(conn: HttpConn, method: str, path: str, want: int, timeout: float = 5.0) -> int:
    """`want`, once the request answers it on this same connection; fails after `timeout` with
    the last status.

    Envoy ACKs a config once its main thread has it; the worker threads take it a moment later.
    """
    eventually(_answered(lambda: conn.request(method, path), want), timeout,
               f"{method} {path} to answer {want} on one connection")
    return want


def wait_request(src: str, dst: str, method: str, path: str, want: int, timeout: float = 5.0,
                 port: int = 8080) -> int:
    """Like wait_conn, one fresh connection per attempt."""
    eventually(_answered(lambda: request(src, dst, port, method, path), want), timeout,
               f"{method} {path} from {src} to {dst}:{port} to answer {want}")
    return want


@dataclass
class World:
    agent: Agent
    tmp: Path
    servers: list[ThreadingHTTPServer] = field(default_factory=list)

    @property
    def core(self) -> Any:
        return self.agent.core

    def serve(self, ip: str, port: int, name: str) -> None:
        handler = type("H", (_Upstream,), {"pod_name": name})
        srv = ThreadingHTTPServer((ip, port + OFFSET), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.servers.append(srv)

    def synced(self, timeout: float = 10.0) -> None:
        engine = self.agent.engine
        if engine is not None:  # proxy.engine h11: listening on every proxied port is in force
            ports = [(p.ip, p.port) for p in self.agent.core.publisher.ports]
            assert engine.wait_listening(ports, timeout), json.dumps(engine.status(), indent=1)
            return
        node = self.agent.config.node_id
        ok = self.agent.xds.wait_synced(node, timeout)
        assert ok, json.dumps(self.agent.xds.status_json(), indent=1)

    def wait_listening(self, ip: str, port: int, timeout: float = 10.0) -> None:
        def connects() -> bool:
            socket.create_connection((ip, port), timeout=0.5).close()
            return True

        eventually(connects, timeout, f"something to listen on {ip}:{port}")


@contextmanager
def loopback_world(tmp: Path, subnet: int, **config: Any) -> Iterator[World]:
    """An agent for cluster-a with billing (2 pods, port 8080 named `http`) on 127.<subnet>.1.10/11
    and frontend / reporting-job (cluster-b) on 127.<subnet>.2.55 / .60. `config` overrides
    AgentConfig fields."""
    cfg = AgentConfig(
        node="node-a1",
        cluster_name="cluster-a",
        cluster_id=1,
        clusters={"cluster-b": 2},
        state_dir=str(tmp / "state"),
        admin_listen=f"unix:{tmp}/admin.sock",
        xds_listen=f"unix:{tmp}/xds.sock",
        envoy=EnvoySettings(log_level="warning"),
        upstream_port_offset=OFFSET,
    )
    agent = start_agent(dataclasses.replace(cfg, **config))
    world = World(agent, tmp)
    try:
        if agent.engine is None:
            assert agent.envoy is not None
            agent.envoy.wait_ready(30)
        billing = {"app": "billing-service", "team": "payments", "env": "prod"}
        frontend = {"app": "frontend-service", "team": "web", "env": "prod"}
        other = {"app": "reporting-job", "team": "web", "env": "prod"}
        s = subnet
        for i, ip in enumerate((f"127.{s}.1.10", f"127.{s}.1.11")):
            world.serve(ip, 8080, f"billing-{i}")
        agent.core.apply(
            [
                pod("billing-service-xyz", "payments", f"127.{s}.1.10", billing, "cluster-a", (8080,), {8080: "http"}),
                pod("billing-service-k2m4p", "payments", f"127.{s}.1.11", billing, "cluster-a", (8080,), {8080: "http"}),
                pod("frontend-service-abc", "web", f"127.{s}.2.55", frontend, "cluster-b"),
                pod("reporting-job-q7x", "web", f"127.{s}.2.60", other, "cluster-b"),
            ]
        )
        agent.core.apply(seed_policies())
        world.synced()
        world.wait_listening(f"127.{s}.1.10", 8080)
        yield world
    finally:
        for srv in world.servers:
            srv.shutdown()
            srv.server_close()
        agent.stop()
