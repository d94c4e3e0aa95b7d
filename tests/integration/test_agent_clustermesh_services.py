"""Global services over a real Cluster Mesh, in loopback mode: three `l7gate agent` processes
(cluster-a's nodes a1 and a2, cluster-b's b1), one etcd per cluster. cluster-a's Service
billing-service is global, with two billing pods; cluster-b has the Service too (same name and
namespace, global, no selector), as Cilium requires.

Checked: both of cluster-a's agents publish the one ClusterService key, in Cilium's JSON, on a
lease, with the sync canary; cluster-b's agent balances its ClusterIP over cluster-a's backends
(loopback mode serves no ClusterIP, so `/v1/services` is what is checked: the same desired state
the kernel's socket LB gets, as tests/privileged/test_clustermesh_services_kernel.py shows); a
backend deleted leaves; an outage keeps the known backends and a reconnect drops one deleted
meanwhile; a restarted agent serves the last known backends while the remote etcd is frozen;
the agent whose lease holds the key stopping leaves it to the other; `shared: "false"` and an
un-globalled Service withdraw it; `l7gate clustermesh status` names a global service missing
here, or not global here.

Every address is in 127.0.0.0/8; every process is stopped by PID.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.client import AdminClient
from l7gate.testing.etcd import EtcdServer
from l7gate.testing.wait import eventually

from .test_agent_clustermesh import Agent as MeshAgent

pytestmark = pytest.mark.integration

L7GATE = str(Path(sys.executable).parent / "l7gate")
BILLING = {"app": "billing-service", "team": "payments", "env": "prod"}
B1, B2 = "127.93.1.10", "127.93.2.10"  # billing pods on a1 and a2
VIP_A, VIP_B = "10.96.0.10", "10.97.0.10"
KEY = "cilium/state/services/v1/cluster-a/payments/billing-service"
REFS = ["cluster-a/payments/billing-service-1", "cluster-a/payments/billing-service-2"]


class Agent(MeshAgent):
    """An agent of test_agent_clustermesh that counts as started once its admin API answers
    (Envoy may still be starting), with helpers for Services."""

    def start(self) -> None:
        self.proc = subprocess.Popen([L7GATE, "agent", "--config", str(self.config)],
                                     stderr=open(self.dir / "agent.log", "ab"))

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-2000:]
            return bool(self.client.get("/v1/status"))

        eventually(up, 30, f"agent {self.dir.name} answering")

    def apply(self, *objs: dict[str, Any]) -> None:
        self.client.apply_endpoints(list(objs))

    def frontend(self, vip: str) -> list[str]:
        """The backends (address) of `vip`:8080/TCP in /v1/services, sorted."""
        for svc in self.client.get("/v1/services")["services"]:
            for fe in svc["frontends"]:
                if fe["frontend"] == f"{vip}:8080/TCP":
                    return sorted(b["address"] for b in fe["backends"])
        return []

    def backend_pods(self, vip: str) -> list[str]:
        for svc in self.client.get("/v1/services")["services"]:
            for fe in svc["frontends"]:
                if fe["frontend"] == f"{vip}:8080/TCP":
                    return sorted(b["pod"] for b in fe["backends"])
        return []

    def mesh(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get("/v1/clustermesh")
        return data


def make_agent(root: Path, cluster: str, cid: int, node: str, etcd: EtcdServer, remote: tuple[str, EtcdServer]) -> Agent:
    d = root / node
    (d / "mesh").mkdir(parents=True, exist_ok=True)
    (d / "mesh" / remote[0]).write_text(yaml.safe_dump({"endpoints": [remote[1].endpoint]}))
    cfg = d / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": node, "cluster": {"name": cluster, "id": cid}, "stateDir": str(d / "state"),
        "admin": {"listen": f"unix:{d}/admin.sock"}, "envoy": {"enabled": False},
        "clustermesh": {"etcd": {"endpoints": [etcd.endpoint]}, "configDir": str(d / "mesh"), "leaseTTL": 5},
    }))
    return Agent(d, cfg, AdminClient(f"unix:{d}/admin.sock"))


def billing_pod(name: str, ip: str, node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "payments", "labels": BILLING,
                         "annotations": {"l7gate.io/cluster": "cluster-a"}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
            "status": {"podIP": ip}}


def service(cluster: str, ip: str, selector: dict[str, str] | None, **annotations: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": ip, "ports": [{"name": "http", "port": 8080, "protocol": "TCP",
                                                        "targetPort": 8080}]}
    if selector is not None:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "billing-service", "namespace": "payments", "labels": {"team": "payments"},
                         "annotations": {"l7gate.io/cluster": cluster, **annotations}},
            "spec": spec}


SERVICE_A = service("cluster-a", VIP_A, {"app": "billing-service"}, **{"io.cilium/global-service": "true"})
SERVICE_B = service("cluster-b", VIP_B, None, **{"service.cilium.io/global": "true"})
PODS = [billing_pod("billing-service-1", B1, "a1"), billing_pod("billing-service-2", B2, "a2")]


@dataclass
class World:
    a1: Agent
    a2: Agent
    b: Agent
    etcd_a: EtcdServer
    etcd_b: EtcdServer

    @property
    def cluster_a(self) -> tuple[Agent, Agent]:
        return self.a1, self.a2


def etcdctl(etcd: EtcdServer, *args: str) -> str:
    out = subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, *args], capture_output=True, text=True,
                         timeout=30, env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def stored(etcd: EtcdServer) -> tuple[dict[str, Any] | None, int]:
    """The ClusterService in cluster-a's etcd (decoded JSON) and the lease it is on."""
    data = json.loads(etcdctl(etcd, "get", KEY, "-w", "json"))
    kvs = data.get("kvs") or []
    if not kvs:
        return None, 0
    return json.loads(base64.b64decode(kvs[0]["value"])), int(kvs[0].get("lease", 0))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from tests.conftest import _find_binary, unavailable

    binary = _find_binary("etcd")
    if binary is None or _find_binary("etcdctl") is None:
        unavailable("needs etcd and etcdctl (scripts/install.sh installs etcd-server and etcd-client)")
    root = tmp_path_factory.mktemp("l7g-mesh-svc")
    agents: list[Agent] = []
    try:
        with EtcdServer(binary, root / "etcd-a") as etcd_a, EtcdServer(binary, root / "etcd-b") as etcd_b:
            a1 = make_agent(root, "cluster-a", 1, "a1", etcd_a, ("cluster-b", etcd_b))
            a2 = make_agent(root, "cluster-a", 1, "a2", etcd_a, ("cluster-b", etcd_b))
            b = make_agent(root, "cluster-b", 2, "b1", etcd_b, ("cluster-a", etcd_a))
            agents = [a1, a2, b]
            for agent in agents:
                agent.start()
            for agent in (a1, a2):  # every agent of cluster-a is told its cluster's pods and Services
                agent.apply(*PODS, SERVICE_A)
            b.apply(SERVICE_B)
            yield World(a1, a2, b, etcd_a, etcd_b)
    finally:
        for agent in agents:
            agent.stop()


def both_backends(w: World) -> None:
    eventually(lambda: w.b.frontend(VIP_B) == [f"{B1}:8080", f"{B2}:8080"], 30,
               "cluster-b's ClusterIP balanced over both of cluster-a's billing pods")


def test_cluster_a_publishes_its_global_service_in_ciliums_format(world: World) -> None:
    def published() -> dict[str, Any] | None:
        doc, _ = stored(world.etcd_a)
        return doc if doc is not None and len(doc["backends"]) == 2 else None

    doc = eventually(published, 30, "the ClusterService in cluster-a's etcd")
    assert doc == {
        "cluster": "cluster-a", "namespace": "payments", "name": "billing-service",
        "frontends": {VIP_A: {"http": {"Protocol": "TCP", "Port": 8080}}},
        "backends": {B1: {"http": {"Protocol": "TCP", "Port": 8080}}, B2: {"http": {"Protocol": "TCP", "Port": 8080}}},
        "labels": {"team": "payments"}, "selector": {"app": "billing-service"},
        "includeExternal": True, "shared": True, "clusterID": 1,
    }
    _, lease = stored(world.etcd_a)
    assert lease != 0  # on an agent's lease: it goes when cluster-a's agents are all gone
    keys = etcdctl(world.etcd_a, "get", "--prefix", "cilium/synced/cluster-a/", "--keys-only").split()
    assert "cilium/synced/cluster-a/cilium/state/services/v1" in keys
    # both agents publish it: one key, the same bytes
    for agent in world.cluster_a:
        assert agent.mesh()["publishing"]["services"] == ["payments/billing-service"]


def test_cluster_b_balances_its_global_service_over_cluster_as_backends(world: World) -> None:
    both_backends(world)
    # named after cluster-a's pods, which arrived through the mesh too
    eventually(lambda: world.b.backend_pods(VIP_B) == REFS, 15, "backends named after their pods")
    (remote,) = world.b.mesh()["remotes"]
    assert remote["services"] == 1 and remote["global_services"] == [
        {"service": "payments/billing-service", "frontends": [f"{VIP_A}:8080/TCP"], "backends": 2, "shared": True,
         "here": "global"}]
    assert world.b.mesh()["service_problems"] == []
    # cluster-a's own ClusterIP stays its own: remote backends are only cluster-b's to use
    assert world.a1.frontend(VIP_A) == [f"{B1}:8080", f"{B2}:8080"]


def test_a_backend_deleted_in_cluster_a_leaves_cluster_bs_rotation(world: World) -> None:
    both_backends(world)
    for agent in world.cluster_a:
        agent.client.delete_endpoint("cluster-a/payments/billing-service-2")
    try:
        eventually(lambda: world.b.frontend(VIP_B) == [f"{B1}:8080"], 20, "billing-service-2 gone at cluster-b")
    finally:
        for agent in world.cluster_a:
            agent.apply(PODS[1])
    both_backends(world)


def test_an_outage_keeps_the_known_backends_and_a_reconnect_converges(world: World) -> None:
    both_backends(world)
    world.etcd_a.freeze()
    try:
        def lost() -> dict[str, Any] | None:
            (st,) = world.b.mesh()["remotes"]
            return st if not st["connected"] else None

        st = eventually(lost, 20, "cluster-b's mesh to see cluster-a's frozen etcd as disconnected")
        assert st["services"] == 1
        assert world.b.frontend(VIP_B) == [f"{B1}:8080", f"{B2}:8080"]  # known backends stay
    finally:
        world.etcd_a.thaw()
    # A backend deleted while cluster-b cannot see cluster-a's etcd leaves after the reconnect.
    world.etcd_a.kill()
    for agent in world.cluster_a:
        agent.client.delete_endpoint("cluster-a/payments/billing-service-2")  # queued by their publishers
    assert world.b.frontend(VIP_B) == [f"{B1}:8080", f"{B2}:8080"]
    world.etcd_a.restart()
    try:
        eventually(lambda: world.b.frontend(VIP_B) == [f"{B1}:8080"], 45,
                   "the deleted backend removed at cluster-b after cluster-a's etcd came back")
    finally:
        for agent in world.cluster_a:
            agent.apply(PODS[1])
    both_backends(world)


def test_a_restarted_agent_serves_the_last_known_remote_backends(world: World) -> None:
    """cilium#26462 for services: restored from the agent's store while the remote etcd is frozen."""
    both_backends(world)
    world.b.stop()
    world.etcd_a.freeze()
    try:
        world.b.start()
        assert world.b.frontend(VIP_B) == [f"{B1}:8080", f"{B2}:8080"]
        (st,) = world.b.mesh()["remotes"]
        assert not st["ready"]
    finally:
        world.etcd_a.thaw()
    eventually(lambda: world.b.mesh()["ready"], 45, "cluster-b's mesh ready again")
    both_backends(world)


def test_the_agent_holding_the_key_stopping_leaves_it_to_the_other(world: World) -> None:
    """The key is on the lease of the agent that wrote it last. Make that a2 (a label change,
    applied on a1 first), stop a2 (its lease is revoked, the key deleted): a1 writes it again."""
    both_backends(world)
    relabelled = json.loads(json.dumps(SERVICE_A))
    relabelled["metadata"]["labels"]["tier"] = "backend"
    world.a1.apply(relabelled)
    world.a2.apply(relabelled)
    eventually(lambda: (stored(world.etcd_a)[0] or {}).get("labels") == {"team": "payments", "tier": "backend"},
               20, "the relabelled service written")
    _, lease_a2 = stored(world.etcd_a)
    world.a2.stop()
    try:
        eventually(lambda: stored(world.etcd_a)[0] is not None and stored(world.etcd_a)[1] not in (0, lease_a2), 20,
                   "the key written again by a1, on its own lease")
        both_backends(world)
    finally:
        world.a2.start()
    for agent in world.cluster_a:
        agent.apply(SERVICE_A)
    eventually(lambda: (stored(world.etcd_a)[0] or {}).get("labels") == {"team": "payments"}, 20, "labels back")


@pytest.mark.parametrize("annotations", [{"io.cilium/global-service": "true", "service.cilium.io/shared": "false"},
                                         {}], ids=["unshared", "not-global"])
def test_a_service_no_longer_shared_or_global_is_withdrawn(world: World, annotations: dict[str, str]) -> None:
    both_backends(world)
    changed = service("cluster-a", VIP_A, {"app": "billing-service"}, **annotations)
    for agent in world.cluster_a:
        agent.apply(changed)
    try:
        eventually(lambda: stored(world.etcd_a)[0] is None, 20, "the key gone from cluster-a's etcd")
        eventually(lambda: world.b.frontend(VIP_B) == [], 20, "cluster-b left without cluster-a's backends")
        assert world.b.mesh()["remotes"][0]["global_services"] == []
        assert world.a1.frontend(VIP_A) == [f"{B1}:8080", f"{B2}:8080"]  # cluster-a's own LB unchanged
    finally:
        for agent in world.cluster_a:
            agent.apply(SERVICE_A)
    both_backends(world)


def mesh_status(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([L7GATE, "clustermesh", "status", "--admin", f"unix:{agent.dir}/admin.sock", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_names_a_global_service_missing_here_or_not_global_here(world: World) -> None:
    both_backends(world)
    assert world.b.client.delete_service("payments/billing-service")
    try:
        out = eventually(lambda: r.stdout if "not here" in (r := mesh_status(world.b)).stdout else None, 15,
                         "the status naming the missing service")
        assert ("global service payments/billing-service exists in cluster-a but not here: create it in this "
                "cluster too, as Cilium requires") in out
        row = next(line for line in out.splitlines() if "payments/billing-service" in line and "cluster-a" in line)
        assert row.split()[-1] == "missing", out
        world.b.apply(service("cluster-b", VIP_B, None))  # here, but not global
        out = eventually(lambda: r.stdout if "not global here" in (r := mesh_status(world.b)).stdout else None, 15,
                         "the status naming the service that is not global here")
        assert 'annotate this cluster\'s Service payments/billing-service with service.cilium.io/global: "true"' in out
        assert world.b.frontend(VIP_B) == []
    finally:
        world.b.apply(SERVICE_B)
    both_backends(world)
    assert world.b.mesh()["service_problems"] == []
