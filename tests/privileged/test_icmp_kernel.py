"""ICMP through the kernel datapath: real `ping` between pods in network namespaces. Node n1
(cluster c1) holds server, client and other; node n2 (cluster c2) holds remote, whose packets
reach n1 over the link between the nodes. Each node runs its kernel-mode agent (h11 engine: no
Envoy is needed for ICMP).

For each policy set the kernel's verdict on an echo request (does the reply come back?), the
reference evaluator's and `l7gate policy trace --icmp-type 8`'s must be the same; a dropped
request must be a DROPPED flow that names the ICMP type, as Hubble's `l4.ICMPv4` does.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.offline.trace import TraceRequest, run_trace
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.types import Protocol
from l7gate.testing.testbed import Pod, Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import L7GATE, AgentProc, make_agent, stop_agents

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc, ping"), pytest.mark.integration]

CLUSTER = "c1"
ECHO_REQUEST = 8


def cnp(name: str, selector: dict[str, Any], **rules: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"endpointSelector": selector, **rules}}


SERVER = {"matchLabels": {"app": "server"}}
CLIENT = {"matchLabels": {"app": "client"}}


def icmps(*types: int | str) -> list[dict[str, Any]]:
    return [{"fields": [{"type": t} for t in types]}]


@dataclass
class World:
    tb: Testbed
    agent: AgentProc  # n1's, where the server is
    agent2: AgentProc
    pods: dict[str, Pod]
    files: Path

    def ref(self, name: str) -> str:
        return f"{self.pods[name].cluster}/ns/{name}"

    def apply(self, docs: list[dict[str, Any]]) -> None:
        for agent in (self.agent, self.agent2):
            if docs:
                agent.client.apply_policies(docs)
            agent.synced()

    def delete(self, docs: list[dict[str, Any]]) -> None:
        for agent in (self.agent, self.agent2):
            for d in docs:
                agent.client.delete_policy(f"CiliumNetworkPolicy/ns/{d['metadata']['name']}")
            agent.synced()

    def reference(self, docs: list[dict[str, Any]], src: str, dst: str) -> bool:
        """The reference evaluator on the agent's own identities."""
        by_pod = {pod: (i["identity"], Labels.of(i["labels"]), i["endpoint"])
                  for i in self.agent.client.get("/v1/identities")["identities"] for pod in i["pods"]}
        rules = [r for d in docs for r in parse_policy(d, cluster_name=CLUSTER).rules]

        def peer(name: str) -> Peer:
            ident, labels, managed = by_pod[self.ref(name)]
            return Peer(ident, labels, managed=managed, name=name)

        return evaluate(rules, Flow(peer(src), peer(dst), ECHO_REQUEST, Protocol.ICMP)).allowed

    def trace(self, docs: list[dict[str, Any]], src: str, dst: str) -> bool:
        """`l7gate policy trace --icmp-type 8` on the same policies and pods, as files."""
        path = self.files / "trace.yaml"
        path.write_text(yaml.safe_dump_all([*self.tb.to_manifests(), *docs]))
        req = TraceRequest(paths=(str(path),), source=self.ref(src), destination=self.ref(dst),
                           port=ECHO_REQUEST, protocol="ICMP", cluster_name=CLUSTER)
        return run_trace(req).verdict.allowed

    def ping(self, src: str, dst: str, ident: int | None = None) -> bool:
        argv = ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1"]
        if ident is not None:
            argv += ["-e", str(ident)]
        return self.pods[src].run([*argv, self.pods[dst].ip]).returncode == 0

    def drop_flows(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [L7GATE, "observe", "--verdict", "DROPPED", "--last", "200", "-o", "json",
             "--admin", f"unix:{self.agent.workdir}/admin.sock"],
            capture_output=True, text=True, check=True,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Testbed() as tb:
        node = tb.add_node("n1", cluster=CLUSTER, node_cidr="10.63.1.0/24")
        node2 = tb.add_node("n2", cluster="c2", node_cidr="10.63.2.0/24")
        tb.link(node, node2)
        pods = {name: tb.add_pod(node, "ns", name, labels={"app": name}) for name in ("server", "client", "other")}
        pods["remote"] = tb.add_pod(node2, "ns", "remote", labels={"app": "remote"})
        agent = make_agent(tb, node, CLUSTER, 1, "c2", 2, node.link_ifnames, "h11")
        agent2 = make_agent(tb, node2, "c2", 2, CLUSTER, 1, node2.link_ifnames, "h11")
        try:
            for a in (agent, agent2):
                a.start(tb)
                a.client.apply_endpoints(tb.to_manifests())
                a.synced()
            yield World(tb, agent, agent2, pods, tmp_path_factory.mktemp("icmp"))
        finally:
            stop_agents(agent, agent2)


L3_ALLOW = cnp("l3", SERVER, ingress=[{"fromEndpoints": [CLIENT]}])
L3_ALLOW_REMOTE = cnp("l3-remote", SERVER, ingress=[{"fromEndpoints": [{"matchLabels": {"app": "remote"}}]}])
ECHO_ALLOW = cnp("echo", SERVER, ingress=[{"fromEndpoints": [CLIENT], "icmps": icmps("EchoRequest")}])
TIMESTAMP_ONLY = cnp("timestamp", SERVER, ingress=[{"fromEndpoints": [CLIENT], "icmps": icmps(13)}])
DEFAULT_DENY = cnp("deny-all", SERVER, ingress=[{}])
DENY_WINS = [L3_ALLOW, cnp("no-echo", SERVER, ingressDeny=[{"fromEndpoints": [CLIENT], "icmps": icmps(8)}])]
# `protocol: ANY` is TCP, UDP and SCTP in Cilium: it lets no ICMP through.
ANY_PORTS = cnp("any", SERVER, ingress=[{"fromEndpoints": [CLIENT], "toPorts": [{"ports": [{"port": "0", "protocol": "ANY"}]}]}])
# The client may send echo requests to the server and takes no ingress at all: the replies come
# back through conntrack, not through policy.
CLIENT_EGRESS_ONLY = cnp("client", CLIENT, egress=[{"toEndpoints": [SERVER], "icmps": icmps(8)}], ingress=[{}])


@pytest.mark.parametrize(
    "docs, src, allowed",
    [
        pytest.param([], "client", True, id="no-policy-allows-all"),
        pytest.param([L3_ALLOW], "client", True, id="l3-only-allow"),
        pytest.param([L3_ALLOW], "other", False, id="l3-only-allow-other-peer"),
        pytest.param([ECHO_ALLOW], "client", True, id="icmps-echo-request"),
        pytest.param([ECHO_ALLOW], "other", False, id="icmps-echo-request-other-peer"),
        pytest.param([TIMESTAMP_ONLY], "client", False, id="icmps-other-type-only"),
        pytest.param([DEFAULT_DENY], "client", False, id="default-deny"),
        pytest.param(DENY_WINS, "client", False, id="deny-wins"),
        pytest.param([ANY_PORTS], "client", False, id="toPorts-ANY-is-not-ICMP"),
        pytest.param([CLIENT_EGRESS_ONLY], "client", True, id="reply-through-conntrack"),
        pytest.param([], "remote", True, id="other-node-no-policy"),
        pytest.param([L3_ALLOW_REMOTE], "remote", True, id="other-node-l3-only-allow"),
        pytest.param([ECHO_ALLOW], "remote", False, id="other-node-icmps-for-another-peer"),
    ],
)
def test_kernel_reference_and_trace_agree_on_ping(world: World, docs: list[dict[str, Any]], src: str,
                                                 allowed: bool) -> None:
    world.apply(docs)
    try:
        assert world.reference(docs, src, "server") is allowed, "reference evaluator"
        assert world.trace(docs, src, "server") is allowed, "policy trace"
        assert world.ping(src, "server") is allowed, "kernel"
        if not allowed:
            src_ip, dst_ip = world.pods[src].ip, world.pods["server"].ip

            def dropped_as_icmp() -> bool:
                flows = world.drop_flows()
                assert any(f["IP"] == {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"}
                           and f["l4"] == {"ICMPv4": {"type": ECHO_REQUEST, "code": 0}}
                           and f["drop_reason_desc"] == "Policy denied"
                           and f["Summary"] == "Policy denied (ICMPv4 EchoRequest)"
                           for f in flows), flows[-5:]
                return True

            eventually(dropped_as_icmp, 10, "the dropped echo request as a DROPPED ICMPv4 flow")
    finally:
        world.delete(docs)


def test_reply_passes_only_as_a_reply(world: World) -> None:
    """The client takes no ingress; its echo requests to the server are answered (conntrack).
    An echo request from the server with the identifier of the client's request is still a
    request, judged and dropped (Cilium's GHSA-c66w-hq56-4q97 was that bypass)."""
    docs = [CLIENT_EGRESS_ONLY]
    world.apply(docs)
    try:
        assert world.reference(docs, "server", "client") is False
        assert world.ping("client", "server", ident=4242)
        assert not world.ping("server", "client", ident=4242)
    finally:
        world.delete(docs)
