"""CiliumCIDRGroups from the API server reach the agent through its watch, and a policy naming
one is enforced by a real Envoy (loopback mode, the API-server DOUBLE, the real `kubectl`): the
group created with `kubectl apply` (cilium.io/v2alpha1, as Cilium users write it), changed
through cilium.io/v2 and deleted with `kubectl delete` changes verdicts; before it exists the
reference selects nothing. Requests come from 127.x addresses that no pod has: their identity is
the CIDR identity of the group's CIDR."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings, KubernetesSettings
from l7gate.agent.daemon import start_agent
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.wait import eventually

from .loopback import OFFSET, World, wait_request

pytestmark = pytest.mark.integration

S = 47  # this module's 127.47.x.x addresses
LEDGER = f"127.{S}.1.10"
PARTNER = f"127.{S}.9.9"  # no pod has it: a partner's address
OFFICE = f"127.{S}.8.8"
NODE = "node-a1"
GROUP_KEY = "CiliumCIDRGroup/partners"
POLICY: dict[str, Any] = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "ledger-from-partners", "namespace": "payments"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "ledger"}},
             "ingress": [{"fromCIDRSet": [{"cidrGroupRef": "partners"}],
                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]},
}
GROUP_YAML = f"""\
apiVersion: cilium.io/v2alpha1
kind: CiliumCIDRGroup
metadata:
  name: partners
  labels: {{role: partner}}
spec:
  externalCIDRs: ["127.{S}.9.0/24"]
"""


@dataclasses.dataclass
class KubeWorld:
    api: ApiServerDouble
    world: World
    tmp: Path

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = views.status(self.world.agent)["kubernetes"]
        return st

    def groups(self) -> dict[str, Any]:
        docs: dict[str, Any] = self.world.agent.core.documents("CiliumCIDRGroup")
        return docs


@pytest.fixture(scope="module")
def kw(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[KubeWorld]:
    tmp = tmp_path_factory.mktemp("l7g-k8s-ccg")
    with ApiServerDouble(bookmark_interval=1.0) as api:
        kubeconfig = api.kubeconfig(tmp / "kubeconfig")
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
            yield KubeWorld(api, world, tmp)
        finally:
            for srv in world.servers:
                srv.shutdown()
                srv.server_close()
            agent.stop()


def test_cidr_groups_are_listed_and_watched_in_v2(kw: KubeWorld) -> None:
    st = kw.status()
    assert st["synced"] and st["resources"]["ciliumcidrgroups"]["api_version"] == "cilium.io/v2", st
    assert any(r.path == "/apis/cilium.io/v2/ciliumcidrgroups" and "watch=" in r.query for r in kw.api.requests)


def test_a_group_created_changed_and_deleted_in_the_api_changes_verdicts(kw: KubeWorld) -> None:
    api = kw.api
    # the policy names a group that does not exist: it selects nothing, and ledger is in default-deny
    assert wait_request(PARTNER, LEDGER, "GET", "/x", 403) == 403

    manifest = kw.tmp / "partners.yaml"
    manifest.write_text(GROUP_YAML)
    out = api.kubectl("apply", "-f", str(manifest))
    assert out.returncode == 0, out.stderr
    assert "ciliumcidrgroup.cilium.io/partners created" in out.stdout, out.stdout
    assert wait_request(PARTNER, LEDGER, "GET", "/x", 200) == 200
    assert wait_request(OFFICE, LEDGER, "GET", "/x", 403) == 403
    doc = eventually(lambda: kw.groups().get(GROUP_KEY), 10, "the group in force")
    assert doc["metadata"]["annotations"]["l7gate.io/source"] == "kubernetes"
    eventually(lambda: kw.status()["resources"]["ciliumcidrgroups"]["in_force"] == 1, 10, "in_force 1")

    # changed through the other version Cilium serves: the office's CIDR, not the partner's
    current = api.get("ciliumcidrgroups", "partners")
    assert current is not None
    changed = {**current, "apiVersion": "cilium.io/v2", "spec": {"externalCIDRs": [f"127.{S}.8.0/24"]}}
    api.update(changed)
    assert wait_request(OFFICE, LEDGER, "GET", "/x", 200) == 200
    assert wait_request(PARTNER, LEDGER, "GET", "/x", 403) == 403

    out = api.kubectl("delete", "ccg", "partners")
    assert out.returncode == 0, out.stderr
    assert wait_request(OFFICE, LEDGER, "GET", "/x", 403) == 403
    eventually(lambda: GROUP_KEY not in kw.groups(), 10, "the group gone from the agent")
    # the policy stays, selecting nothing
    assert "CiliumNetworkPolicy/payments/ledger-from-partners" in kw.world.agent.core.documents("CiliumNetworkPolicy")


def test_where_only_v2alpha1_is_served_the_watch_reads_groups_in_v2alpha1(tmp_path: Path) -> None:
    """Cilium 1.13 to 1.17 serve CiliumCIDRGroup as cilium.io/v2alpha1 only: a double whose CRD
    serves that version alone, with the agent's own core and watch (no Envoy needed)."""
    import yaml

    from l7gate.agent.core import AgentCore
    from l7gate.agent.kube import CoreSink
    from l7gate.k8s.watch import ApiConnection, Watcher, load_configuration
    from l7gate.kvstore.sqlite import SQLiteKVStore
    from l7gate.testing.apiserver_double_types import default_crd_dir
    from l7gate.xds.cache import SnapshotCache

    crds = default_crd_dir()
    assert crds is not None
    old = tmp_path / "crds"
    old.mkdir()
    for f in crds.glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        if crd["spec"]["names"]["kind"] == "CiliumCIDRGroup":
            crd["spec"]["versions"] = [{**v, "storage": True, "deprecated": False}
                                       for v in crd["spec"]["versions"] if v["name"] == "v2alpha1"]
        (old / f.name).write_text(yaml.safe_dump(crd))
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    core = AgentCore(AgentConfig(node=NODE, cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                                 envoy=EnvoySettings(enabled=False), datapath_mode="kernel"), store, SnapshotCache())
    with ApiServerDouble(crds=[old], bookmark_interval=1.0) as api:
        api.create(yaml.safe_load(GROUP_YAML))
        assert {t.version for t in api.types if t.plural == "ciliumcidrgroups"} == {"v2alpha1"}
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        watcher = Watcher(ApiConnection(load_configuration(str(kubeconfig))), CoreSink(core), cluster="cluster-a",
                          node=NODE, log=lambda line: None, watch_timeout=30)
        watcher.start()
        try:
            assert watcher.wait_ready(20), watcher.problems()
            assert watcher.status()["resources"]["ciliumcidrgroups"]["api_version"] == "cilium.io/v2alpha1"
            assert any(r.path == "/apis/cilium.io/v2/ciliumcidrgroups" and r.status == 404 for r in api.requests)
            doc = core.document("CiliumCIDRGroup", GROUP_KEY)
            assert doc is not None and doc["apiVersion"] == "cilium.io/v2alpha1"
            current = api.get("ciliumcidrgroups", "partners")
            assert current is not None
            api.update({**current, "spec": {"externalCIDRs": [f"127.{S}.8.0/24"]}})
            eventually(lambda: (core.document("CiliumCIDRGroup", GROUP_KEY) or {}).get("spec")
                       == {"externalCIDRs": [f"127.{S}.8.0/24"]}, 10, "the change, through the v2alpha1 watch")
        finally:
            watcher.stop()
            store.close()
