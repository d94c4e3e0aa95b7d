"""Nodes from the API server reach the agent through its watch (the API-server DOUBLE, the real
`kubectl`): their labels become the identity of their addresses, `kubectl label node` moves an
address to the identity of its new labels and the verdict of a `fromNodes` rule with it,
`kubectl delete node` takes the address away, and the agent's own Node labels `host`. The
verdict is the one the agent's proxy asks for (`l7_decision`: the ipcache's identity of the
source address, the destination pod's resolved map); the node addresses are documentation
addresses no packet is sent to (tests/privileged/test_nodes_kernel.py sends them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings, KubernetesSettings
from l7gate.agent.daemon import Agent, start_agent
from l7gate.identity.numeric import HOST, WORLD, is_remote_node_scoped
from l7gate.policy.mapstate import Action
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.wait import eventually

pytestmark = pytest.mark.integration

NODE = "node-a1"
LEDGER = "127.48.1.10"
ADDRESSES = {"node-a1": "192.0.2.1", "node-a2": "192.0.2.2", "node-a3": "192.0.2.3"}
POLICY: dict[str, Any] = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "ledger-from-ingress-nodes", "namespace": "payments"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "ledger"}},
             "ingress": [{"fromNodes": [{"matchLabels": {"role": "ingress"}}],
                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]},
}


def node_manifest(name: str, labels: dict[str, str]) -> str:
    return (f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {labels}\n"
            f"status:\n  addresses:\n  - {{type: InternalIP, address: {ADDRESSES[name]}}}\n"
            f"  - {{type: Hostname, address: {name}}}\n")


@dataclasses.dataclass
class KubeWorld:
    api: ApiServerDouble
    agent: Agent
    tmp: Path

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in views.nodes(self.agent.core.view())}

    def admitted(self, node: str) -> bool:
        """What the proxy in front of ledger decides for a connection from `node`'s address."""
        return bool(self.agent.core.l7_decision(LEDGER, 8080, ADDRESSES[node]).action is Action.ALLOW)

    def kubectl(self, *args: str) -> str:
        out = self.api.kubectl(*args)
        assert out.returncode == 0, out.stderr
        return str(out.stdout)


@pytest.fixture(scope="module")
def kw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeWorld]:
    tmp = tmp_path_factory.mktemp("l7g-k8s-nodes")
    with ApiServerDouble(bookmark_interval=1.0) as api:
        kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        for name, labels in (("node-a1", {"role": "app"}), ("node-a2", {"role": "ingress"}), ("node-a3", {"role": "worker"})):
            (tmp / f"{name}.yaml").write_text(node_manifest(name, labels))
            api.apply_manifests(tmp / f"{name}.yaml", with_status=True)
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}})
        api.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ledger-abc", "namespace": "payments", "labels": {"app": "ledger"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1",
                                                       "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": LEDGER, "podIPs": [{"ip": LEDGER}], "hostIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }, with_status=True)
        api.create(POLICY)
        cfg = AgentConfig(
            node=NODE, cluster_name="cluster-a", cluster_id=1,
            state_dir=str(tmp / "state"), admin_listen=f"unix:{tmp}/admin.sock", xds_listen=f"unix:{tmp}/xds.sock",
            envoy=EnvoySettings(enabled=False),
            kubernetes=KubernetesSettings(enabled=True, kubeconfig=str(kubeconfig), watch_timeout=30),
        )
        agent = start_agent(cfg)
        try:
            assert agent.kube is not None
            assert agent.kube.wait_ready(20), agent.kube.problems()
            yield KubeWorld(api, agent, tmp)
        finally:
            agent.stop()


def test_nodes_are_listed_and_watched_and_label_their_addresses(kw: KubeWorld) -> None:
    st = views.status(kw.agent)["kubernetes"]
    assert st["synced"] and st["resources"]["nodes"]["api_version"] == "v1", st
    assert any(r.path == "/api/v1/nodes" and "watch=" in r.query for r in kw.api.requests)
    nodes = kw.nodes()
    assert nodes["node-a1"]["identity"] == HOST and nodes["node-a1"]["local"]
    assert kw.agent.core.resolver.identities[HOST]["node:role"] == "app"
    for name in ("node-a2", "node-a3"):
        ident = nodes[name]["identity"]
        assert ident is not None and is_remote_node_scoped(ident)
        assert kw.agent.core.resolver.identities[ident]["node:role"] == nodes[name]["labels"]["role"]
    assert kw.admitted("node-a2") and not kw.admitted("node-a3")


def test_kubectl_label_node_moves_the_verdict(kw: KubeWorld) -> None:
    before = kw.nodes()["node-a3"]["identity"]
    assert "node/node-a3 labeled" in kw.kubectl("label", "node", "node-a3", "role=ingress", "--overwrite")
    eventually(lambda: kw.admitted("node-a3"), timeout=10, what="node-a3 admitted once labelled role=ingress")
    assert kw.nodes()["node-a3"]["identity"] != before
    assert "node/node-a2 unlabeled" in kw.kubectl("label", "node", "node-a2", "role-")
    eventually(lambda: not kw.admitted("node-a2"), timeout=10, what="node-a2 refused once its role is gone")
    assert kw.nodes()["node-a2"]["labels"] == {}


def test_kubectl_delete_node_takes_its_address_away(kw: KubeWorld) -> None:
    assert 'node "node-a3" deleted' in kw.kubectl("delete", "node", "node-a3")
    eventually(lambda: "node-a3" not in kw.nodes(), timeout=10, what="node-a3 gone from the agent")
    # no pod says it is a node's address any more: it is world again, and world is not admitted
    assert kw.agent.core.ipcache.lookup(ADDRESSES["node-a3"]) == WORLD
    assert not kw.admitted("node-a3")
