"""Node addresses in the ipcache as Cilium's `host` (this node) and `remote-node` (any other),
from the pods' `status.hostIP` and the Nodes' addresses; with a Node, another node's addresses
have the identity of its labels and `host` carries this node's (what fromNodes/toNodes select);
and `policy trace` naming them the same way."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore, ApplyError
from l7gate.identity.numeric import HOST, REMOTE_NODE, is_remote_node_scoped
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.offline.trace import TraceRequest, run_trace
from l7gate.policy.mapstate import Action, decide
from l7gate.policy.types import Direction, Protocol
from l7gate.xds.cache import SnapshotCache

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



# -- Nodes: node addresses get the identity of their Node's labels -----------------------------------


def node(name: str, ip: str, labels: dict[str, str], *, cluster: str = "cluster-a") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {"l7gate.io/cluster": cluster}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}


TO_INGRESS_NODES = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                    "metadata": {"name": "to-ingress-nodes", "namespace": "web"},
                    "spec": {"endpointSelector": {"matchLabels": {"app": "a"}},
                             "egress": [{"toNodes": [{"matchLabels": {"role": "ingress"}}],
                                         "toPorts": [{"ports": [{"port": "7070", "protocol": "TCP"}]}]}]}}


def egress_allowed(core: AgentCore, pod_ip: str, to: str, port: int = 7070) -> bool:  # noqa: F811
    """What the kernel decides for a new connection: the ipcache's identities, the resolved map."""
    ident = core.ipcache.lookup(pod_ip)
    return decide(core.resolver.endpoint_policy(ident), Direction.EGRESS, core.ipcache.lookup(to), port,
                  Protocol.TCP).action is Action.ALLOW


def test_nodes_give_their_addresses_the_identity_of_their_labels(core: AgentCore) -> None:  # noqa: F811
    core.apply([node("n1", "192.0.2.1", {"role": "app"}), node("n2", "192.0.2.2", {"role": "ingress"}),
                node("n3", "192.0.2.3", {"role": "worker"}),
                pod("a", "10.1.0.10", {"app": "a"}, node="n1", host_ip="192.0.2.1"), TO_INGRESS_NODES])
    # this node's (n1) address is `host`, and `host` carries its labels
    assert core.ipcache.get(net("192.0.2.1")) == HOST
    assert dict(core.resolver.identities[HOST]) == {"reserved:host": "", "node:role": "app",
                                                    "io.cilium.k8s.policy.cluster": "cluster-a"}
    n2, n3 = core.ipcache.get(net("192.0.2.2")), core.ipcache.get(net("192.0.2.3"))
    assert n2 is not None and n3 is not None and is_remote_node_scoped(n2) and is_remote_node_scoped(n3) and n2 != n3
    assert core.resolver.identities[n2]["node:role"] == "ingress"
    assert {n["node"]: n["identity"] for n in views.nodes(core.view())} == {
        "cluster-a/n1": HOST, "cluster-a/n2": n2, "cluster-a/n3": n3}
    assert [egress_allowed(core, "10.1.0.10", ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")] == [
        False, True, False]
    # relabelling a node moves the verdict: n3 is an ingress node now, n2 no longer
    core.apply([node("n3", "192.0.2.3", {"role": "ingress"}), node("n2", "192.0.2.2", {"role": "worker"})])
    assert [egress_allowed(core, "10.1.0.10", ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")] == [
        False, False, True]
    # a Node gone: its address is known no more (no pod of it), and its identity is released
    old = core.ipcache.get(net("192.0.2.2"))
    assert core.delete_node("n2") and core.ipcache.get(net("192.0.2.2")) is None
    assert old not in core.resolver.identities


def test_a_pods_host_ip_is_its_nodes_and_remote_node_without_one(core: AgentCore) -> None:  # noqa: F811
    core.apply([pod("b", "10.1.0.11", {"app": "b"}, node="n2", host_ip="192.0.2.2")])
    assert core.ipcache.get(net("192.0.2.2")) == REMOTE_NODE
    # the Node of the pod's node labels the pod's hostIP too, even when it does not list it
    core.apply([node("n2", "192.0.2.20", {"role": "ingress"})])
    n2 = core.ipcache.get(net("192.0.2.20"))
    assert n2 is not None and is_remote_node_scoped(n2) and core.ipcache.get(net("192.0.2.2")) == n2
    assert core.delete_node("cluster-a/n2")
    assert core.ipcache.get(net("192.0.2.2")) == REMOTE_NODE and core.ipcache.get(net("192.0.2.20")) is None
    assert dict(core.resolver.identities[HOST]) == {"reserved:host": ""}


def test_one_address_one_node(core: AgentCore) -> None:  # noqa: F811
    core.apply([node("n2", "192.0.2.2", {})])
    with pytest.raises(ApplyError) as info:
        core.apply([node("n3", "192.0.2.2", {})])
    assert info.value.errors == [
        "Node cluster-a/n3: status.addresses[0].address: 192.0.2.2 is already the address of Node cluster-a/n2"]
    # moving the address in one request is fine
    core.apply([node("n3", "192.0.2.2", {}), node("n2", "192.0.2.4", {})])
    bad = node("n4", "192.0.2.5", {})
    bad["status"]["addresses"][0]["type"] = "InternalIPv4"
    with pytest.raises(ApplyError) as info:
        core.apply([bad])
    assert info.value.errors == ["Node n4: status.addresses[0].type: must be one of InternalIP, ExternalIP, Hostname, "
                                 "InternalDNS, ExternalDNS, got 'InternalIPv4'"]


def test_nodes_are_stored_and_restored(tmp_path: Path) -> None:
    cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    with SQLiteKVStore(str(tmp_path / "kv.db")) as store:
        first = AgentCore(cfg, store, SnapshotCache())
        first.apply([node("n1", "192.0.2.1", {"role": "app"}), node("n2", "192.0.2.2", {"role": "ingress"})])
        before = {e.prefix: e.identity for e in first.ipcache.snapshot()}
    with SQLiteKVStore(str(tmp_path / "kv.db")) as store:
        again = AgentCore(cfg, store, SnapshotCache())
        assert {e.prefix: e.identity for e in again.ipcache.snapshot()} == before
        assert again.resolver.identities[HOST]["node:role"] == "app"
        assert set(again.documents("Node")) == {"cluster-a/n1", "cluster-a/n2"}
