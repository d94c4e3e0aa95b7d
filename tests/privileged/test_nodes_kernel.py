"""`fromNodes` / `toNodes` through the kernel datapath, by node labels.

Three nodes of cluster-a on the netns testbed, n1 linked to n2 and to n3, with different labels
(their Node objects, applied to the one agent, on n1, in kernel mode). Each node answers HTTP on
its own address (a process in the node's namespace, as a kubelet or a node-local cache would).
`web/client` on n1 reaches them under egress `toNodes` rules; `payments/server` on n1 is reached
from the nodes' own namespaces under ingress `fromNodes` rules (n1 itself is never judged: the
node's own traffic to its pods is allowed, Cilium's allow-localhost), at L3/L4 in the kernel and
with HTTP rules through Envoy (which knows a node's identity by its addresses, as any peer's).
Relabelling a node (its Node applied again) moves the verdicts.

Every verdict is checked three ways, table by table: what the kernel does (a connection made or
not), `l7gate policy trace` on the same inventory (pods and Nodes), and the reference evaluator on
the agent's own state (its identities and ipcache, from the admin API)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from l7gate.identity.ipcache import IPCache
from l7gate.identity.numeric import HOST
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.testing.testbed import Node, Pod, Testbed

from .test_kernel_datapath import L7GATE, AgentProc, make_agent, stop_agents
from .test_node_entities import NODE_PORT, cnp, only, serve_on_node

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]

CLUSTER = "cluster-a"
LABELS = {"n1": {"zone": "z1", "role": "app"}, "n2": {"zone": "z1", "role": "ingress"},
          "n3": {"zone": "z2", "role": "worker"}}


@dataclass
class World:
    tb: Testbed
    agent: AgentProc
    nodes: dict[str, Node]
    client: Pod
    server: Pod


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        nodes = {name: tb.add_node(name, cluster=CLUSTER, node_cidr=f"10.63.{i}.0/24", labels=LABELS[name])
                 for i, name in enumerate(("n1", "n2", "n3"), start=1)}
        tb.link(nodes["n1"], nodes["n2"])
        tb.link(nodes["n1"], nodes["n3"])
        client = tb.add_pod(nodes["n1"], "web", "client", labels={"app": "client"})
        server = tb.add_pod(nodes["n1"], "payments", "server", labels={"app": "server"}, ports=[8080])
        server.serve_http(8080)
        for node in nodes.values():
            serve_on_node(tb, node)
        agent = make_agent(tb, nodes["n1"], CLUSTER, 1, "cluster-b", 2, nodes["n1"].link_ifnames)
        try:
            agent.start(tb)
            agent.client.apply_endpoints(tb.to_manifests(nodes=True))
            agent.synced()
            yield World(tb, agent, nodes, client, server)
        finally:
            stop_agents(agent)


def label(w: World, labels: dict[str, dict[str, str]]) -> None:
    """The nodes' labels, applied to the agent as their Nodes (the last writer wins)."""
    for name, node_labels in labels.items():
        w.nodes[name].labels = dict(node_labels)
    w.agent.client.apply_endpoints([w.nodes[n].manifest() for n in labels])
    w.agent.synced()


def traced(w: World, policy: dict[str, Any], src: str, dst: str, port: int, *http: str) -> bool:
    path = w.tb.workdir / f"trace-{policy['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump_all([policy, *w.tb.to_manifests(nodes=True)]))
    request = ["--method", http[0], "--path", http[1]] if http else []
    out = subprocess.run([L7GATE, "policy", "trace", "-f", str(path), "--cluster-name", CLUSTER,
                          "--from", src, "--to", dst, "--port", str(port), *request, "-o", "json"],
                         capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return bool(json.loads(out.stdout)["verdict"] == "allowed")


def reference(w: World, policy: dict[str, Any], src: str, dst: str, port: int) -> bool:
    """The reference evaluator on the agent's own state: the identities its ipcache gives the two
    addresses, with the labels it holds for them."""
    ipcache = IPCache()
    for e in w.agent.client.get("/v1/ipcache")["entries"]:
        ipcache.upsert(ipaddress.ip_network(e["prefix"]), e["identity"])
    labels = {i["identity"]: Labels.of(i["labels"]) for i in w.agent.client.get("/v1/identities")["identities"]}
    pods = {w.client.ip, w.server.ip}
    s, d = ipcache.lookup(src), ipcache.lookup(dst)
    if s == HOST and dst in pods:
        return True  # the node's own traffic to its pods is not judged (allow-localhost)
    rules = parse_policy(policy, cluster_name=CLUSTER).rules
    flow = Flow(Peer(s, labels[s], src in pods), Peer(d, labels[d], dst in pods), port)
    return evaluate(rules, flow).allowed


def egress_to_nodes(selector: dict[str, Any]) -> dict[str, Any]:
    return cnp("client-to-nodes", "web", "client",
               egress=[{"toNodes": [selector], "toPorts": [{"ports": [{"port": str(NODE_PORT), "protocol": "TCP"}]}]}])


def ingress_from_nodes(selector: dict[str, Any]) -> dict[str, Any]:
    return cnp("server-from-nodes", "payments", "server",
               ingress=[{"fromNodes": [selector], "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}])


def egress_table(w: World, policy: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """Per node: does the client reach it, by the kernel, by trace, by the reference evaluator."""
    only(w.agent, policy)
    out: dict[str, dict[str, bool]] = {"kernel": {}, "trace": {}, "reference": {}}
    for name, node in w.nodes.items():
        out["kernel"][name] = w.client.curl(f"http://{node.ip}:{NODE_PORT}/", timeout=2)[0] == 200
        out["trace"][name] = traced(w, policy, "web/client", node.ip, NODE_PORT)
        out["reference"][name] = reference(w, policy, w.client.ip, node.ip, NODE_PORT)
    return out


def ingress_table(w: World, policy: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """Per node: is a connection from its own namespace to the server admitted, three ways."""
    only(w.agent, policy)
    out: dict[str, dict[str, bool]] = {"kernel": {}, "trace": {}, "reference": {}}
    for name, node in w.nodes.items():
        out["kernel"][name] = node.tcp_connect(w.server.ip, 8080)
        out["trace"][name] = traced(w, policy, node.ip, "payments/server", 8080)
        out["reference"][name] = reference(w, policy, node.ip, w.server.ip, 8080)
    return out


def agree(table: dict[str, dict[str, bool]], want: dict[str, bool]) -> None:
    assert table == {"kernel": want, "trace": want, "reference": want}, json.dumps(table)


def test_to_nodes_reaches_only_the_labelled_nodes(world: World) -> None:
    label(world, LABELS)
    agree(egress_table(world, egress_to_nodes({"matchLabels": {"role": "ingress"}})),
          {"n1": False, "n2": True, "n3": False})


def test_to_nodes_reads_the_own_nodes_labels_too(world: World) -> None:
    """The client's own node (host) carries its Node's labels: zone z1 selects it, and n2."""
    label(world, LABELS)
    agree(egress_table(world, egress_to_nodes({"matchLabels": {"zone": "z1"}})), {"n1": True, "n2": True, "n3": False})
    agree(egress_table(world, egress_to_nodes({"matchExpressions": [{"key": "role", "operator": "NotIn",
                                                                     "values": ["ingress"]}]})),
          {"n1": True, "n2": False, "n3": True})


def test_from_nodes_admits_only_the_labelled_nodes(world: World) -> None:
    label(world, LABELS)
    # n1 is the server's own node: its connections are never judged
    agree(ingress_table(world, ingress_from_nodes({"matchLabels": {"role": "ingress"}})),
          {"n1": True, "n2": True, "n3": False})
    agree(ingress_table(world, ingress_from_nodes({"matchLabels": {"zone": "z2"}})),
          {"n1": True, "n2": False, "n3": True})


def test_relabelling_a_node_moves_the_verdicts(world: World) -> None:
    label(world, LABELS)
    to_ingress = egress_to_nodes({"matchLabels": {"role": "ingress"}})
    from_ingress = ingress_from_nodes({"matchLabels": {"role": "ingress"}})
    agree(egress_table(world, to_ingress), {"n1": False, "n2": True, "n3": False})
    before = {n["node"]: n["identity"] for n in world.agent.client.get("/v1/nodes")["nodes"]}
    label(world, {"n2": {"zone": "z1", "role": "worker"}, "n3": {"zone": "z2", "role": "ingress"}})
    after = {n["node"]: n["identity"] for n in world.agent.client.get("/v1/nodes")["nodes"]}
    assert after["cluster-a/n1"] == before["cluster-a/n1"] == HOST
    assert after["cluster-a/n2"] != before["cluster-a/n2"] and after["cluster-a/n3"] != before["cluster-a/n3"]
    agree(egress_table(world, to_ingress), {"n1": False, "n2": False, "n3": True})
    agree(ingress_table(world, from_ingress), {"n1": True, "n2": False, "n3": True})
    # the agent's own node relabelled: host's labels follow
    label(world, {"n1": {"zone": "z1", "role": "ingress"}})
    agree(egress_table(world, to_ingress), {"n1": True, "n2": False, "n3": True})
    label(world, LABELS)


def node_curl(node: Node, url: str) -> int:
    """An HTTP GET from the node's own namespace (its address as the source): the status, 0
    when no response came back (the connection dropped)."""
    out = node.run(["curl", "-sS", "--noproxy", "*", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}", url],
                   capture_output=True, text=True, timeout=15)
    return int(out.stdout) if out.stdout.strip().isdigit() else 0


def test_from_nodes_with_http_rules_goes_through_envoy(world: World) -> None:
    label(world, LABELS)
    policy = cnp("server-from-nodes-http", "payments", "server",
                 ingress=[{"fromNodes": [{"matchLabels": {"role": "ingress"}}],
                           "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                        "rules": {"http": [{"method": "GET", "path": "/ok"}]}}]}])
    only(world.agent, policy)
    got = {(name, path): node_curl(world.nodes[name], f"http://{world.server.ip}:8080{path}")
           for name in ("n2", "n3") for path in ("/ok", "/nope")}
    # n2 (role ingress) through Envoy: its rule's request allowed, another one 403; n3 dropped
    assert got == {("n2", "/ok"): 200, ("n2", "/nope"): 403, ("n3", "/ok"): 0, ("n3", "/nope"): 0}, got
    traced_ = {(name, path): traced(world, policy, world.nodes[name].ip, "payments/server", 8080, "GET", path)
               for name in ("n2", "n3") for path in ("/ok", "/nope")}
    assert traced_ == {k: v == 200 for k, v in got.items()}
    # relabelled: n3 through Envoy now, n2 dropped
    label(world, {"n2": {"zone": "z1", "role": "worker"}, "n3": {"zone": "z2", "role": "ingress"}})
    assert node_curl(world.nodes["n3"], f"http://{world.server.ip}:8080/ok") == 200
    assert node_curl(world.nodes["n2"], f"http://{world.server.ip}:8080/ok") == 0
    label(world, LABELS)
