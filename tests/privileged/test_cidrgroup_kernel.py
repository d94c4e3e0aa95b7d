"""CiliumCIDRGroups end to end, in kernel mode: a pod's egress policy names a group with
`toCIDRSet: [{cidrGroupRef: partners}]`, and the kernel lets the pod reach the group's CIDRs, and
only those, as the group is created, changed, narrowed with an `except` range and deleted
(`l7gate policy apply` / `delete`, through the agent's admin API); a group survives an agent
restart.

Topology (the testbed): node a1 runs an agent (kernel mode) with the pod `web/client`. Node
`inet` has no agent: its pods `partner` and `office` stand for addresses outside the cluster
(HTTP servers on port 443); the agent knows nothing of them, so their addresses are `world`
unless a CIDR identity holds them. Every address is inside the namespaces the testbed created.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from l7gate.client import AdminClient
from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import AgentProc, stop_agents

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc, policy routing"), pytest.mark.integration]

GROUP_KEY = "CiliumCIDRGroup/partners"
POLICY: dict[str, Any] = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "client-to-partners", "namespace": "web"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "client"}},
        "egress": [{"toCIDRSet": [{"cidrGroupRef": "partners"}],
                    "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}],
    },
}


def group(*cidrs: str) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumCIDRGroup", "metadata": {"name": "partners"},
            "spec": {"externalCIDRs": list(cidrs)}}


@dataclass
class World:
    tb: Testbed
    agent: AgentProc
    client: Pod
    partner: Pod
    office: Pod

    def reach(self, pod: Pod, timeout: float = 2.0) -> int:
        """The client's GET to `pod`:443: the HTTP status, 0 when dropped."""
        return self.client.curl(f"http://{pod.ip}:443/x", timeout=timeout)[0]

    def wait_reach(self, want: dict[str, int], what: str) -> None:
        def now() -> bool:
            got = {"partner": self.reach(self.partner, 1), "office": self.reach(self.office, 1)}
            assert got == want, got
            return True

        eventually(now, 20, what)

    def ipcache(self) -> set[str]:
        return {e["prefix"] for e in self.agent.client.get("/v1/ipcache")["entries"]}


def make_agent(tb: Testbed, node: Node, **datapath: Any) -> AgentProc:
    """An agent of cluster-a on `node`, kernel mode; `datapath`: more of its `datapath` settings."""
    work = tb.workdir / f"agent-{node.name}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": node.name, "cluster": {"name": "cluster-a", "id": 1},
        "stateDir": str(work / "state"), "admin": {"listen": f"unix:{work}/admin.sock"},
        "envoy": {"logLevel": "warning"},
        "datapath": {"mode": "kernel", "pinDir": f"/sys/fs/bpf/l7g/{node.netns}", "links": node.link_ifnames,
                     **datapath},
    }))
    return AgentProc(node, work, cfg, AdminClient(f"unix:{work}/admin.sock"))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        a1 = tb.add_node("a1", cluster="cluster-a", node_cidr="10.67.1.0/24")
        net = tb.add_node("inet", cluster="internet", node_cidr="10.67.9.0/24")
        tb.link(a1, net)
        client = tb.add_pod(a1, "web", "client", labels={"app": "client"})
        partner = tb.add_pod(net, "internet", "partner")
        office = tb.add_pod(net, "internet", "office")
        for pod in (partner, office):
            pod.serve_http(443)
        agent = make_agent(tb, a1)
        try:
            agent.start(tb)
            agent.client.apply_endpoints(tb.to_manifests("cluster-a"))
            agent.client.apply_policies([POLICY])
            agent.synced()
            yield World(tb, agent, client, partner, office)
        finally:
            stop_agents(agent)


def test_a_group_created_changed_narrowed_and_deleted_moves_the_kernels_verdict(world: World) -> None:
    w, api = world, world.agent.client
    partner, office = f"{w.partner.ip}/32", f"{w.office.ip}/32"
    # The policy names a group that does not exist: it selects nothing (egress is default-deny).
    w.wait_reach({"partner": 0, "office": 0}, "no group yet: both dropped")

    result = api.apply_policies([group(partner)])
    assert result["created"] == [GROUP_KEY]
    w.wait_reach({"partner": 200, "office": 0}, "the group holds the partner's address")
    assert partner in w.ipcache()

    api.apply_policies([group(office)])  # changed: the office instead
    w.wait_reach({"partner": 0, "office": 200}, "the group changed to the office's address")
    assert partner not in w.ipcache() and office in w.ipcache()

    # the whole node network, with the partner excepted (its own CIDR identity carves it out)
    narrowed = group("10.67.9.0/24")
    narrowed_entry = {"cidrGroupRef": "partners", "except": [partner]}
    api.apply_policies([narrowed, {**POLICY, "spec": {**POLICY["spec"], "egress": [
        {**POLICY["spec"]["egress"][0], "toCIDRSet": [narrowed_entry]}]}}])
    w.wait_reach({"partner": 0, "office": 200}, "the group's /24 except the partner")
    assert {"10.67.9.0/24", partner} <= w.ipcache()

    api.delete_policy(GROUP_KEY)
    w.wait_reach({"partner": 0, "office": 0}, "the group deleted: the rule selects nothing")
    assert not {"10.67.9.0/24", partner} & w.ipcache()
    keys = [p["key"] for p in api.get("/v1/policy")["policies"]]
    assert keys == ["CiliumNetworkPolicy/web/client-to-partners"]  # the policy stays in force


def test_a_group_survives_an_agent_restart(world: World) -> None:
    w = world
    api = w.agent.client
    api.apply_policies([POLICY, group(f"{w.partner.ip}/32")])
    w.wait_reach({"partner": 200, "office": 0}, "the group in force")
    assert w.agent.proc is not None
    w.agent.proc.terminate()
    w.agent.proc.wait(timeout=20)
    assert w.reach(w.partner) == 200  # the kernel's maps outlive the agent
    w.agent.start(w.tb)
    w.agent.synced()
    assert GROUP_KEY in [p["key"] for p in api.get("/v1/policy")["policies"]]
    w.wait_reach({"partner": 200, "office": 0}, "the group restored from the store")
    api.delete_policy(GROUP_KEY)
    w.wait_reach({"partner": 0, "office": 0}, "the restored group deleted")
