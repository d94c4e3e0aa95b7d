"""Socket acceleration beside the egress proxy: two sockets with one 4-tuple.

The egress proxy's upstream connection leaves from the client pod's own address
(`original_src`), from a port the node's kernel picks. A pod's own socket picks its ports in
its own network namespace, so the client can hold a connection with the very same 4-tuple:
(client ip, port P) → (destination, port). The sockhash keys sockets by 4-tuple, so the
destination's socket of the proxy's upstream connection looked like the peer of the client's
own socket: whatever the client sent on it was handed straight to the destination, past the
egress proxy and its HTTP rules (and the destination's answers straight back). The tests make
the collision on purpose, in both orders: the client binds a connection to the port of the
proxy's live upstream connection (the datapath refuses it, with a flow saying why), and the
proxy's upstream connection can only take a port of the client's live connections (it is
refused: 503). Nothing the client sends may reach the destination past the egress rules.

Run twice: with the agent (and so its Envoy) in the pods' cgroup, as a DaemonSet pod is under
kubepods, and outside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.redirect_bpf.loader import _detach_cgroup_sockops
from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.testing.wait import eventually
from tests.conftest import unavailable

from .test_kernel_datapath import L7GATE, make_agent, stop_agents

pytestmark = [pytest.mark.privileged("netns, bcc sockops, cgroup v2"), pytest.mark.integration]

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
NS = "k8s:io.kubernetes.pod.namespace"
CLIENT_EGRESS = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "client-egress", "namespace": "web"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [
        {"toEndpoints": [{"matchLabels": {NS: "payments"}}],
         "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                      "rules": {"http": [{"method": "GET", "path": "/allowed/.*"}]}}]},
    ]},
}

# An HTTP/1.1 GET on a keep-alive socket: (status, body); for the scripts run in the client pod.
GET = r"""
import socket, sys

def get(s, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.split(b" ")[1].decode() if head else "none", body[:length].decode(errors="replace")
"""

# Runs in the client pod: one keep-alive request through the egress proxy, then (once told the
# port of the proxy's upstream connection) a refused request on a connection from that port.
CLIENT = GET + r"""
dst, port = sys.argv[1], int(sys.argv[2])
first = socket.create_connection((dst, port), timeout=5)
print("first", *get(first, "/allowed/1"), flush=True)
upstream_port = int(sys.stdin.readline())
second = socket.socket()
second.settimeout(5)
second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
second.bind(("0.0.0.0", upstream_port))
try:
    second.connect((dst, port))
    print("second", *get(second, "/denied"), flush=True)
except OSError as exc:
    print("second", "error", repr(exc), flush=True)
"""


@pytest.fixture(scope="module", params=["envoy-in-cgroup", "envoy-outside"])
def world(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        unavailable("no cgroup v2 at /sys/fs/cgroup/unified")
    with Testbed() as tb:
        node = tb.add_node("s1", cluster="cluster-a", node_cidr="10.66.1.0/24", cgroup=True)
        assert node.cgroup is not None
        client = tb.add_pod(node, "web", "client", labels={"app": "client"})
        api = tb.add_pod(node, "payments", "api", labels={"app": "api"}, ports=[8080])
        api.serve_http(8080)
        agent = make_agent(tb, node, "cluster-a", 1, "cluster-b", 2, [])
        try:
            cfg = yaml.safe_load(agent.config.read_text())
            cfg["datapath"]["cgroup"] = str(node.cgroup)
            agent.config.write_text(yaml.safe_dump(cfg))
            inside = request.param == "envoy-in-cgroup"
            agent.proc = node.spawn([L7GATE, "agent", "--config", str(agent.config)], net_only=True,
                                    **({"cgroup": node.cgroup} if inside else {}))
            eventually(lambda: (agent.client.get("/v1/status")["envoy"] or {}).get("state") == "LIVE", 30,
                       "the agent to report its Envoy LIVE")
            agent.client.apply_endpoints(tb.to_manifests())
            agent.client.apply_policies([CLIENT_EGRESS])
            agent.synced()
            assert agent.status()["datapath"]["socket_acceleration"].startswith("on")
            yield {"tb": tb, "node": node, "agent": agent, "client": client, "api": api}
        finally:
            _detach_cgroup_sockops(node.cgroup)
            stop_agents(agent)


# Runs in the client pod: idle connections from each port of the node's ephemeral range (the
# proxy's upstream connections from the client's address must take one of them), then one
# allowed request through the proxy, then a refused request on every idle connection.
CLIENT_FIRST = GET + r"""
dst, port, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idle = []
for p in range(lo, hi + 1):
    s = socket.socket()
    s.settimeout(20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p))
    s.connect((dst, port))
    idle.append(s)
c = socket.create_connection((dst, port), timeout=20)
try:
    print("allowed", *get(c, "/allowed/1")[:1], flush=True)
except OSError as exc:
    print("allowed", "error", flush=True)
for s in idle:
    try:
        print("denied", *get(s, "/denied")[:1], flush=True)
    except OSError as exc:
        print("denied", "error", flush=True)
print("done", flush=True)
"""


def test_a_proxy_upstream_connection_never_takes_a_live_pod_connection_4_tuple(world: dict[str, Any]) -> None:
    """The other order: the pod's connections exist first, and the proxy's upstream connection
    can only get a port one of them uses (the node's ephemeral range is narrowed to their
    ports). It must not open; nothing the pod sends on them may reach the destination."""
    node, client, api = world["node"], world["client"], world["api"]
    old = node.run(["sysctl", "-n", "net.ipv4.ip_local_port_range"]).stdout.split()
    lo, hi = 45000, 45007
    node.run(["sysctl", "-w", f"net.ipv4.ip_local_port_range={lo} {hi}"], check=True)
    proc = client.spawn([sys.executable, "-c", CLIENT_FIRST, api.ip, "8080", str(lo), str(hi)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        lines = [ln.split() for ln in out.splitlines()]
        assert lines and lines[-1] == ["done"], out
        denied = [ln[1] for ln in lines if ln[0] == "denied"]
        assert len(denied) == hi - lo + 1, out
        assert all(code in ("403", "error") for code in denied), f"past the egress proxy: {out}"
        # the proxy could not open its upstream connection: every port it could take was in use
        assert ["allowed", "503"] in lines, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        node.run(["sysctl", "-w", f"net.ipv4.ip_local_port_range={old[0]} {old[1]}"], check=True)


def _upstream_ports(node: Node, client: Pod, api: Pod) -> list[int]:
    """The local ports of the egress proxy's upstream connections from the client's address (in
    the node's namespace, where Envoy runs)."""
    out = node.run(["ss", "-Htn", "state", "established", "src", client.ip, "dst", f"{api.ip}:8080"]).stdout
    ports = []
    for line in out.splitlines():
        fields = line.split()
        local = next((f for f in fields if f.startswith(f"{client.ip}:")), None)
        if local:
            ports.append(int(local.rpartition(":")[2]))
    return ports


def test_a_socket_with_the_proxy_upstream_4_tuple_still_meets_the_egress_rules(world: dict[str, Any]) -> None:
    node, client, api = world["node"], world["client"], world["api"]
    proc = client.spawn([sys.executable, "-c", CLIENT, api.ip, "8080"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline().split(maxsplit=2)
        assert first[:2] == ["first", "200"], first
        ports = eventually(lambda: _upstream_ports(node, client, api), 5,
                           "the egress proxy's upstream connection from the client's address")
        proc.stdin.write(f"{ports[0]}\n")
        proc.stdin.flush()
        second = proc.stdout.read().split(maxsplit=2)
        # Envoy's egress rules refuse GET /denied: a 200 means the bytes went past Envoy. The
        # datapath refuses the connection itself while the proxy's upstream one lives, and says so.
        assert second[:2] != ["second", "200"], f"{second}: the request went past the egress proxy"
        assert second[:2] == ["second", "error"], second
    finally:
        proc.kill()
        proc.wait()
    agent = world["agent"]

    def refused() -> dict[str, Any] | None:
        out = subprocess.run([L7GATE, "observe", "--last", "100", "-o", "json", "--verdict", "DROPPED",
                              "--admin", f"unix:{agent.workdir}/admin.sock"],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            f = json.loads(line).get("flow") or json.loads(line)
            if (f.get("drop_reason_desc") == "Connection 4-tuple in use by the egress proxy"
                    and f.get("l4", {}).get("TCP", {}).get("source_port") == ports[0]):
                return f
        return None

    flow = eventually(refused, 10, "a DROPPED flow naming the egress proxy's 4-tuple")
    assert flow["IP"]["source"] == client.ip and flow["IP"]["destination"] == api.ip, flow
