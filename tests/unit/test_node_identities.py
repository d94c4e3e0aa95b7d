"""Node addresses in the ipcache as Cilium's `host` (this node) and `remote-node` (any other),
from the pods' `status.hostIP`, and `policy trace` naming them the same way."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from l7gate.agent.core import AgentCore
from l7gate.identity.numeric import HOST, REMOTE_NODE
from l7gate.offline.trace import TraceRequest, run_trace

from .test_agent_core_apply import core, pod  # noqa: F401  (the fixture)


def net(ip: str) -> Any:
    return ipaddress.ip_network(ip)


def test_this_node_is_host_and_other_nodes_are_remote_node(core: AgentCore) -> None:  # noqa: F811
    core.apply([pod("a", "10.1.0.10", {"app": "a"}, node="n1", host_ip="192.0.2.1"),
                pod("b", "10.1.0.11", {"app": "b"}, node="n2", host_ip="192.0.2.2")])
    assert core.ipcache.get(net("192.0.2.1")) == HOST
    assert core.ipcache.get(net("192.0.2.2")) == REMOTE_NODE
    # the last pod on n2 gone: its node's address is no longer known
    assert core.delete_pod("cluster-a/web/b")
    assert core.ipcache.get(net("192.0.2.2")) is None


def test_a_pod_address_is_never_taken_for_a_node(core: AgentCore) -> None:  # noqa: F811
    # a pod whose hostIP is another pod's address (a misconfigured inventory): the pod keeps it
    core.apply([pod("a", "10.1.0.10", {"app": "a"}, node="n1", host_ip="10.1.0.11"),
                pod("b", "10.1.0.11", {"app": "b"}, node="n1", host_ip="192.0.2.1")])
    assert core.ipcache.get(net("10.1.0.11")) not in (HOST, REMOTE_NODE)
    assert core.ipcache.get(net("192.0.2.1")) == HOST


def test_trace_names_node_addresses(tmp_path: Path) -> None:
    pods = [pod("client", "10.1.0.10", {"app": "client"}, node="n1", host_ip="192.0.2.1"),
            pod("peer", "10.1.0.11", {"app": "peer"}, node="n2", host_ip="192.0.2.2")]
    policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
              "metadata": {"name": "to-host", "namespace": "web"},
              "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                       "egress": [{"toEntities": ["host"]}]}}
    f = tmp_path / "in.yaml"
    f.write_text(yaml.safe_dump_all([*pods, policy]))

    def verdict(dst: str) -> tuple[str, str]:
        r = run_trace(TraceRequest(paths=(str(f),), source="web/client", destination=dst, port=80,
                                   cluster_name="cluster-a"))
        return r.destination.ref, r.verdict.verdict

    assert verdict("192.0.2.1") == ("192.0.2.1 (host)", "allowed")
    assert verdict("192.0.2.2") == ("192.0.2.2 (remote-node)", "denied")
    assert verdict("192.0.2.3")[1] == "denied"  # not a node: world

