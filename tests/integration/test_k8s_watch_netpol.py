"""Kubernetes NetworkPolicies (networking.k8s.io/v1) from the API server reach the agent through
its watch and are enforced by a real Envoy (loopback mode, the API-server DOUBLE): created,
changed and deleted in the API, they change verdicts; an invalid one is refused with its field
path and an Event on it, and changes nothing."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings, KubernetesSettings
from l7gate.agent.daemon import start_agent
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.wait import eventually

from .loopback import OFFSET, World, request, wait_request

pytestmark = pytest.mark.integration

S = 54  # this module's 127.54.x.x addresses
LEDGER = f"127.{S}.1.10"
FRONTEND = f"127.{S}.2.55"
REPORTS = f"127.{S}.2.60"
NODE = "node-a1"
KEY = "NetworkPolicy/payments/ledger-ingress"
NETWORK_POLICY: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "ledger-ingress", "namespace": "payments"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "ledger"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}},
                               "podSelector": {"matchLabels": {"app": "frontend"}}}],
                     "ports": [{"port": 8080}]}],
    },
}


def api_pod(name: str, ns: str, ip: str, labels: dict[str, str], ports: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1",
                                                   "ports": [{"containerPort": p} for p in ports]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


@dataclasses.dataclass
class KubeWorld:
    api: ApiServerDouble
    world: World

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = views.status(self.world.agent)["kubernetes"]
        return st

    def in_force(self) -> dict[str, Any]:
        docs: dict[str, Any] = self.world.agent.core.documents("NetworkPolicy")
        return docs


@pytest.fixture(scope="module")
def kw(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[KubeWorld]:
    tmp = tmp_path_factory.mktemp("l7g-k8s-knp")
    with ApiServerDouble(bookmark_interval=1.0) as api:
        kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}})
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web", "labels": {"team": "web"}}})
        api.create(api_pod("ledger-abc", "payments", LEDGER, {"app": "ledger"}, (8080,)), with_status=True)
        api.create(api_pod("frontend-abc", "web", FRONTEND, {"app": "frontend"}), with_status=True)
        api.create(api_pod("reports-xyz", "web", REPORTS, {"app": "reports"}), with_status=True)
        cfg = AgentConfig(
            node=NODE, cluster_name="cluster-a", cluster_id=1,
            state_dir=str(tmp / "state"), admin_listen=f"unix:{tmp}/admin.sock", xds_listen=f"unix:{tmp}/xds.sock",
            envoy=EnvoySettings(log_level="warning"), upstream_port_offset=OFFSET,
            kubernetes=KubernetesSettings(enabled=True, kubeconfig=str(kubeconfig), watch_timeout=30),
        )
        agent = start_agent(cfg)
        world = World(agent, tmp)
        try:
            assert agent.envoy is not None
            agent.envoy.wait_ready(30)
            world.serve(LEDGER, 8080, "ledger")
            assert agent.kube is not None
            assert agent.kube.wait_ready(20), agent.kube.problems()
            world.synced()
            world.wait_listening(LEDGER, 8080)
            yield KubeWorld(api, world)
        finally:
            for srv in world.servers:
                srv.shutdown()
                srv.server_close()
            agent.stop()


def test_network_policies_are_listed_and_watched(kw: KubeWorld) -> None:
    st = kw.status()
    assert st["synced"] and "networkpolicies" in st["resources"], st
    assert any(r.path == "/apis/networking.k8s.io/v1/networkpolicies" and "watch=" in r.query
               for r in kw.api.requests), "no watch on networkpolicies"


def test_a_network_policy_created_changed_and_deleted_in_the_api_is_enforced(kw: KubeWorld) -> None:
    api = kw.api
    assert wait_request(REPORTS, LEDGER, "GET", "/x", 200) == 200  # nothing selects the ledger
    api.create(copy.deepcopy(NETWORK_POLICY))
    assert wait_request(REPORTS, LEDGER, "GET", "/x", 403) == 403
    assert request(FRONTEND, LEDGER, 8080, "POST", "/anything").status == 200
    doc = eventually(lambda: kw.in_force().get(KEY), 10, "the NetworkPolicy in force")
    assert doc["metadata"]["annotations"]["l7gate.io/source"] == "kubernetes"  # the ownership mark
    eventually(lambda: kw.status()["resources"]["networkpolicies"]["in_force"] == 1, 10, "in_force 1")

    # changed in the API: now the reports pod, not the frontend
    changed = copy.deepcopy(NETWORK_POLICY)
    changed["spec"]["ingress"][0]["from"][0]["podSelector"] = {"matchLabels": {"app": "reports"}}
    api.update(changed)
    assert wait_request(REPORTS, LEDGER, "GET", "/x", 200) == 200
    assert wait_request(FRONTEND, LEDGER, "GET", "/x", 403) == 403

    # the namespace's labels change: the namespaceSelector no longer matches web
    api.patch("namespace", "web", {"metadata": {"labels": {"team": "elsewhere"}}})
    assert wait_request(REPORTS, LEDGER, "GET", "/x", 403) == 403
    api.patch("namespace", "web", {"metadata": {"labels": {"team": "web"}}})
    assert wait_request(REPORTS, LEDGER, "GET", "/x", 200) == 200

    api.delete("networkpolicy", "ledger-ingress", namespace="payments")
    assert wait_request(FRONTEND, LEDGER, "GET", "/x", 200) == 200
    eventually(lambda: KEY not in kw.in_force(), 10, "the NetworkPolicy gone from the agent")


def test_an_invalid_network_policy_is_refused_with_an_event_and_changes_nothing(kw: KubeWorld) -> None:
    api, core = kw.api, kw.world.agent.core
    revision = core.view().policy_revision
    bad = copy.deepcopy(NETWORK_POLICY)
    bad["metadata"]["name"] = "named-port"
    # A port name that is no IANA service name: the double stores it (it does not run the API
    # server's checks of a NetworkPolicy); the agent refuses it as the API server would.
    bad["spec"]["ingress"][0]["ports"] = [{"port": "http--alt"}]
    api.create(bad)

    def event() -> dict[str, Any] | None:
        for ev in api.objects("events", namespace="payments"):
            if ev["involvedObject"]["name"] == "named-port" and ev["reason"] == "PolicyInvalid":
                return ev
        return None

    ev = eventually(event, 10, "an Event on the refused NetworkPolicy")
    assert ev["involvedObject"]["kind"] == "NetworkPolicy"
    assert ev["involvedObject"]["apiVersion"] == "networking.k8s.io/v1"
    assert "spec.ingress[0].ports[0].port" in ev["message"] and "must not contain '--'" in ev["message"]
    refused = kw.status()["refused"]
    assert [r["object"] for r in refused] == ["NetworkPolicy payments/named-port"]
    assert "NetworkPolicy/payments/named-port" not in kw.in_force()
    assert core.view().policy_revision == revision
    assert request(REPORTS, LEDGER, 8080, "GET", "/x").status == 200  # nothing in force changed
    api.delete("networkpolicy", "named-port", namespace="payments")
    eventually(lambda: not kw.status()["refused"], 10, "no refusal left")
