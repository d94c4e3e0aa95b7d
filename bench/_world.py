"""Helpers for bench_envoy: loopback agents with their real Envoy, a fast static upstream, `wrk`,
and a keep-alive HTTP client.

Every address used is inside 127.0.0.0/8. Every process started here is stopped by its PID
(the agent stops its own Envoy; `StaticUpstream` stops the upstream Envoy it started).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.daemon import Agent, start_agent
from l7gate.xds.cache import EXTENSION_CONFIG as EXTENSION_CONFIG_TYPE

OFFSET = 10000  # loopback mode: the pod's server listens on port + OFFSET
BILLING = {"app": "billing-service", "team": "payments", "env": "prod"}
FRONTEND = {"app": "frontend-service", "team": "web", "env": "prod"}
HOST = "billing-service.payments"


# -- Kubernetes objects --------------------------------------------------------------------------


def pod(
    name: str, ns: str, ip: str, labels: dict[str, str], cluster: str, ports: tuple[int, ...] = ()
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": {"l7gate.io/cluster": cluster},
        },
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": p} for p in ports]}]},
        "status": {"podIP": ip},
    }


def allow_http(name: str, from_labels: dict[str, str], method: str, path: str) -> dict[str, Any]:
    """A CCNP on billing-service: `from_labels` may `method path` on 8080."""
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "billing-service"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": from_labels}],
                    "toPorts": [
                        {
                            "ports": [{"port": "8080", "protocol": "TCP"}],
                            "rules": {"http": [{"method": method, "path": path}]},
                        }
                    ],
                }
            ],
        },
    }


# -- agents -------------------------------------------------------------------------------------


def agent_config(state: Path, node: str) -> AgentConfig:
    return AgentConfig(
        node=node,
        cluster_name="cluster-a",
        cluster_id=1,
        clusters={"cluster-b": 2},
        state_dir=str(state / "state"),
        admin_listen=f"unix:{state}/admin.sock",
        xds_listen=f"unix:{state}/xds.sock",
        envoy=EnvoySettings(log_level="warning", concurrency=1),
        upstream_port_offset=OFFSET,
    )


def start(state: Path, node: str) -> Agent:
    state.mkdir(parents=True, exist_ok=True)
    agent = start_agent(agent_config(state, node))
    try:
        assert agent.envoy is not None
        agent.envoy.wait_ready(30)
    except BaseException:
        agent.stop()
        raise
    return agent


def synced(agent: Agent, timeout: float = 120.0) -> None:
    if not agent.xds.wait_synced(agent.config.node_id, timeout):
        raise RuntimeError(
            "Envoy not synced: " + json.dumps(agent.xds.status_json(), indent=1, default=str)
        )


def policy_row(agent: Agent) -> Any:
    """The xDS status row of the agent's Envoy for ECDS, where the policy lives (the classifier
    and the source-address slots of each proxied port)."""
    for row in agent.xds.status():
        if row.node_id == agent.config.node_id and row.type_url == EXTENSION_CONFIG_TYPE:
            return row
    raise RuntimeError("no ECDS status row for the agent's Envoy")


def wait_policy_acked(agent: Agent, version: str, what: str, timeout: float = 120.0) -> Any:
    """Wait until the agent's Envoy has ACKed ECDS `version` (`policy_row`); its row then."""
    def acked(rows: list[Any]) -> bool:
        return any(r.node_id == agent.config.node_id and r.type_url == EXTENSION_CONFIG_TYPE
                   and r.acked_version == version for r in rows)

    if not agent.xds.wait(acked, timeout):
        raise RuntimeError(f"{what}: no ACK of ECDS {version} within {timeout:g} s")
    return policy_row(agent)


def envoy_memory(agent: Agent) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the agent's Envoy, bytes."""
    assert agent.envoy is not None
    pid = agent.envoy.status().pid
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def quiesce(*agents: Agent, timeout: float = 60.0) -> None:
    """Let the agents' access-log ingestion catch up (Envoy flushes its gRPC access logs every
    50 ms; after a wrk run the agent may still be turning tens of thousands into flows)."""
    time.sleep(0.2)
    for agent in agents:
        ingestor = getattr(agent, "ingestor", None)
        if ingestor is not None and hasattr(ingestor, "drain"):
            ingestor.drain(timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def policy_shape(agent: Agent) -> str:
    """Size of the agent's ECDS policy resources (per port: a classifier and its RBAC slots) and
    of the default action name (which Envoy copies into every denied request's metadata and
    access-log entry)."""
    try:
        from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
        from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
        from xds.type.matcher.v3 import ip_pb2

        snap = agent.cache.get_snapshot(agent.config.node_id)
        assert snap is not None
        slots, sizes, ranges, decisions, name_len = 0, [], 0, 0, 0
        classifier = 0
        for msg in snap.messages(EXTENSION_CONFIG_TYPE).values():
            size = msg.ByteSize()
            if not msg.typed_config.type_url.endswith("rbac.v3.RBAC"):
                classifier += size
                continue
            rbac = rbac_pb2.RBAC()
            msg.typed_config.Unpack(rbac)
            m = rbac.matcher
            ipm = ip_pb2.IPMatcher.FromString(m.matcher_tree.custom_match.typed_config.value)
            slots += 1
            sizes.append(size)
            decisions += len(ipm.range_matchers)
            ranges += sum(len(r.ranges) for r in ipm.range_matchers)
            act = rbac_config_pb2.Action()
            m.on_no_match.action.typed_config.Unpack(act)
            name_len = max(name_len, len(act.name))
        sizes.sort()
        return (
            f"ECDS {sum(sizes) / 1e6:.2f} MB in {slots} RBAC slots (largest {sizes[-1] / 1e3:.0f} kB, "
            f"median {sizes[len(sizes) // 2] / 1e3:.1f} kB) + classifiers {classifier / 1e3:.1f} kB; "
            f"{decisions} range matchers holding {ranges} ranges; default action name {name_len} chars"
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic, not a measurement
        return f"(policy shape unavailable: {type(exc).__name__})"


def wait_listening(ip: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {ip}:{port}") from None
            time.sleep(0.05)


# -- the upstream: a static Envoy answering 200 itself --------------------------------------------


class StaticUpstream:
    """A second Envoy, static bootstrap, `direct_response` 200 on ip:port: the pod's server.

    Python's http.server tops out at a few thousand requests/s, below what the proxy under test
    forwards; Envoy answering by itself costs about as much CPU per request as the proxy does.
    """

    def __init__(self, binary: str, ip: str, port: int, workdir: Path) -> None:
        self.ip, self.port = ip, port
        workdir.mkdir(parents=True, exist_ok=True)
        boot = workdir / "upstream.json"
        boot.write_text(json.dumps(self.bootstrap(ip, port)))
        self.log = workdir / "upstream.log"
        self.proc = subprocess.Popen(
            [binary, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1",
             "-l", "warning", "--log-path", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(ip, port)
            time.sleep(0.2)
            if self.proc.poll() is not None:  # e.g. the address is taken by someone else
                raise RuntimeError(f"upstream Envoy exited ({self.proc.returncode}); see {self.log}")
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def bootstrap(ip: str, port: int) -> dict[str, Any]:
        """The upstream Envoy's bootstrap (a subclass may change what it answers)."""
        return _upstream_bootstrap(ip, port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _upstream_bootstrap(ip: str, port: int) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            # Read the whole request first: a direct_response sent before the body arrived
            # closes the connection, and every POST would cost the proxy a new upstream one.
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 65536,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "node": {"id": "bench-upstream", "cluster": "bench"},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": {"socket_address": {"address": ip, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


# -- wrk ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int
    p50_ms: float | None = None
    p99_ms: float | None = None


def find_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk (scripts/install.sh)")
    return path


def wrk(
    url: str,
    seconds: int,
    script: Path,
    threads: int = 1,
    connections: int = 32,
) -> WrkResult:
    """Run wrk against `url`; the Lua `script` sets the method, body and Host header.

    wrk cannot choose its source address: the kernel picks 127.0.0.1 for a 127.x destination
    (`ip route get 127.171.1.10` says `src 127.0.0.1`), so the bench registers a pod at 127.0.0.1.
    """
    out = subprocess.run(
        [find_wrk(), f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
         "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    return parse_wrk(out.stdout)


def parse_wrk(text: str) -> WrkResult:
    """wrk's report → WrkResult (p50 and p99 only when run with --latency)."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)

    def percentile(p: str) -> float | None:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return None if m is None else float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        non_2xx=int(non.group(1)) if non else 0,
        socket_errors=sum(int(g) for g in err.groups()) if err else 0,
        p50_ms=percentile("50"),
        p99_ms=percentile("99"),
    )


def wrk_script(path: Path, method: str, body: str = "") -> Path:
    lines = [f'wrk.method = "{method}"', f'wrk.headers["Host"] = "{HOST}"']
    if body:
        lines += [f"wrk.body = {json.dumps(body)}", 'wrk.headers["Content-Type"] = "application/json"']
    path.write_text("\n".join(lines) + "\n")
    return path


# -- a keep-alive client -------------------------------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 connection (from 127.0.0.1, the kernel's choice), reopened if closed."""

    def __init__(self, ip: str, port: int, timeout: float = 5.0) -> None:
        self.ip, self.port, self.timeout = ip, port, timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        s = socket.create_connection((self.ip, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        return s

    def status(self, method: str, path: str) -> int:
        """The status of one request; 0 if the connection failed (reopened next time)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode()
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.sendall(head)
            return self._read()
        except OSError:
            self.close()
            return 0

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed by peer")
        self.buf += chunk

    def _read(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for ln in lines[1:]:
            k, _, v = ln.decode("latin-1").partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v.strip())
            elif k == "connection" and v.strip().lower() == "close":
                close = True
            elif k == "transfer-encoding":
                raise RuntimeError("chunked responses are not expected here")
        while len(self.buf) < length:
            self._fill()
        self.buf = self.buf[length:]
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def wait_status(conn: KeepAlive, method: str, path: str, want: int, timeout: float) -> int:
    """Poll until a request gets `want`; returns how many requests that took."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        if conn.status(method, path) == want:
            return n
        if time.monotonic() > deadline:
            raise RuntimeError(f"{method} {path} never got {want} within {timeout} s")


def apply_timed(agent: Agent, docs: Iterable[Any]) -> float:
    t0 = time.perf_counter()
    agent.core.apply(list(docs))
    return time.perf_counter() - t0
