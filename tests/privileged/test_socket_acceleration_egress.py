"""Socket acceleration beside the egress proxy: two sockets with one 4-tuple.

The egress proxy's upstream connection leaves from the client pod's own address
(`original_src`), from a port the node's kernel picks. A pod's own socket picks its ports in
its own network namespace, so the client can hold a connection with the very same 4-tuple:
(client ip, port P) → (destination, port). The sockhash keys sockets by 4-tuple, so the
destination's socket of the proxy's upstream connection looked like the peer of the client's
own socket: whatever the client sent on it was handed straight to the destination, past the
egress proxy and its HTTP rules (and the destination's answers straight back). The test makes
the collision on purpose: it reads the port of the proxy's upstream connection and binds the
client's next connection to it. A request the egress rules refuse must still get Envoy's 403.

Run twice: with the agent (and so its Envoy) in the pods' cgroup, as a DaemonSet pod is under
kubepods, and outside it.
"""

from __future__ import annotations

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

# Runs in the client pod: one keep-alive request through the egress proxy, then (once told the
# port of the proxy's upstream connection) a refused request on a connection from that port.
CLIENT = r"""
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])

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

first = socket.create_connection((dst, port), timeout=5)
print("first", *get(first, "/allowed/1"), flush=True)
upstream_port = int(sys.stdin.readline())
second = socket.socket()
second.settimeout(5)
second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
second.bind(("0.0.0.0", upstream_port))
second.connect((dst, port))
try:
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
        # Envoy's egress rules refuse GET /denied: a 200 means the bytes went past Envoy
        assert second[:2] == ["second", "403"], f"{second}: the request went past the egress proxy"
    finally:
        proc.kill()
        proc.wait()
