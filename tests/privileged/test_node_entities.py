"""Node addresses as Cilium's `host` and `remote-node` entities, through the kernel datapath.

Two nodes, a1 (cluster-a) and b1 (cluster-b), joined by a link, each with its agent in kernel
mode. Each node answers HTTP on its own address (a process in the node's namespace, as a
kubelet or a node-local cache would). The pod `web/client` on b1 reaches them under egress
policies naming entities; `payments/server` on a1 is reached from the nodes under ingress
policies. The agents have the node addresses from the pods' `status.hostIP`: b1's own is `host`
there, a1's is `remote-node`. Each verdict is checked against `l7gate policy trace` on the same
inventory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import POD_SERVER, Node, Pod, Testbed

from .test_kernel_datapath import L7GATE, AgentProc, make_agent, stop_agents

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]

NODE_PORT = 7070


@dataclass
class World:
    tb: Testbed
    a: AgentProc
    b: AgentProc
    na: Node
    nb: Node
    client: Pod
    server: Pod
    inventory: Path


def serve_on_node(tb: Testbed, node: Node) -> None:
    proc = node.spawn([sys.executable, str(POD_SERVER), "--listen", f"{node.ip}:{NODE_PORT}", "--name", node.name])
    deadline = time.monotonic() + 10
    while not node.tcp_connect(node.ip, NODE_PORT, timeout=0.5):
        assert proc.poll() is None and time.monotonic() < deadline, tb.log_path(proc).read_text()[-2000:]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.62.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.62.2.0/24")
        tb.link(na, nb)
        server = tb.add_pod(na, "payments", "server", labels={"app": "server"}, ports=[8080])
        client = tb.add_pod(nb, "web", "client", labels={"app": "client"})
        server.serve_http(8080)
        for node in (na, nb):
            serve_on_node(tb, node)
        inventory = tb.workdir / "inventory.yaml"
        inventory.write_text(yaml.safe_dump_all(tb.to_manifests()))
        a = make_agent(tb, na, "cluster-a", 1, "cluster-b", 2, na.link_ifnames)
        b = make_agent(tb, nb, "cluster-b", 2, "cluster-a", 1, nb.link_ifnames)
        try:
            for agent in (a, b):
                agent.start(tb)
                agent.client.apply_endpoints(tb.to_manifests())
                agent.synced()
            yield World(tb, a, b, na, nb, client, server, inventory)
        finally:
            stop_agents(a, b)


def cnp(name: str, namespace: str, app: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"endpointSelector": {"matchLabels": {"app": app}}, **spec}}


def only(agent: AgentProc, policy: dict[str, Any]) -> None:
    """`policy` is the one policy in force on `agent`."""
    for p in agent.client.get("/v1/policy")["policies"]:
        agent.client.delete_policy(p["key"])
    agent.client.apply_policies([policy])
    agent.synced()


def trace(w: World, policy: dict[str, Any], src: str, dst: str, port: int, cluster: str) -> bool:
    path = w.tb.workdir / f"trace-{policy['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(policy))
    out = subprocess.run([L7GATE, "policy", "trace", "-f", str(path), "-f", str(w.inventory),
                          "--cluster-name", cluster, "--from", src, "--to", dst, "--port", str(port),
                          "-o", "json"], capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return bool(json.loads(out.stdout)["verdict"] == "allowed")


def egress_to(w: World, entity: str) -> dict[str, Any]:
    return cnp(f"client-to-{entity}", "web", "client",
               egress=[{"toEntities": [entity],
                        "toPorts": [{"ports": [{"port": str(NODE_PORT), "protocol": "TCP"}]}]}])


@pytest.mark.parametrize("entity, own_node, other_node", [
    ("host", True, False),
    ("remote-node", False, True),
    ("world", False, False),  # nodes are not `world`, as in Cilium
    ("cluster", True, True),
])
def test_egress_to_node_entities(world: World, entity: str, own_node: bool, other_node: bool) -> None:
    policy = egress_to(world, entity)
    only(world.b, policy)
    got = {
        "own": world.client.curl(f"http://{world.nb.ip}:{NODE_PORT}/", timeout=2)[0] == 200,
        "other": world.client.curl(f"http://{world.na.ip}:{NODE_PORT}/", timeout=2)[0] == 200,
    }
    assert got == {"own": own_node, "other": other_node}, json.dumps(world.b.client.get("/v1/policy")["endpoints"])[:3000]
    traced = {
        "own": trace(world, policy, "web/client", world.nb.ip, NODE_PORT, "cluster-b"),
        "other": trace(world, policy, "web/client", world.na.ip, NODE_PORT, "cluster-b"),
    }
    assert traced == got


@pytest.mark.parametrize("entity, allowed", [("remote-node", True), ("world", False), ("host", False)])
def test_ingress_from_another_node(world: World, entity: str, allowed: bool) -> None:
    policy = cnp(f"server-from-{entity}", "payments", "server",
                 ingress=[{"fromEntities": [entity],
                           "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}])
    only(world.a, policy)
    assert world.nb.tcp_connect(world.server.ip, 8080) is allowed
    assert trace(world, policy, world.nb.ip, "payments/server", 8080, "cluster-a") is allowed


def test_the_node_itself_always_reaches_its_pods(world: World) -> None:
    """Host-originated traffic to a local pod is not judged (Cilium's default allow-localhost),
    whatever the pod's ingress policy says."""
    policy = cnp("server-from-world-only", "payments", "server",
                 ingress=[{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}])
    only(world.a, policy)
    assert world.na.tcp_connect(world.server.ip, 8080)
    assert trace(world, policy, world.na.ip, "payments/server", 8080, "cluster-a")
    assert not world.nb.tcp_connect(world.server.ip, 8080)
