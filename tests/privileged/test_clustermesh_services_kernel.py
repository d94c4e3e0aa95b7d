"""Global services over a real Cluster Mesh, through the kernel datapath (issue 20): the seed's
two clusters, one etcd each (in a node's network namespace), cluster-a's two nodes with one
billing replica each, cluster-b's node with the frontend, a pod with other labels and a billing
replica of its own. billing-service is global in both clusters (cluster-a's selects its billing
pods; cluster-b's selects nothing at first, as examples/seed/ has it); every agent is told its own
cluster's pods and Services only. cluster-b's agent runs the socket load balancer on its pods'
cgroup, so the frontend's `curl http://billing-service.payments.svc.cluster.local:8080` (a
hosts file per pod stands in for cluster DNS) is balanced at connect() over the backends
cluster-a publishes in its etcd; every verdict after that is the billing pod's, as before.

Checked: 200 POSTs answered by both of cluster-a's billing pods (each at least 25%), GET 403 and
the other pod dropped through the service; a billing pod deleted in cluster-a never chosen again
at cluster-b; affinity `local` using cluster-b's own replica while it is ready and cluster-a's
otherwise; `shared: "false"` in cluster-a hiding its backends; `l7gate clustermesh status`
naming the global service cluster-b lacks.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from l7gate.testing.etcd import NodeEtcd
from l7gate.testing.testbed import CGROUP_ROOT, Pod, Testbed
from l7gate.testing.wait import eventually
from tests.conftest import unavailable

from .test_clustermesh_kernel import start_mesh_agents
from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, AgentProc, stop_agents
from .test_services_kernel import answered_by, kernel_drop

pytestmark = [pytest.mark.privileged("netns, bcc, cgroup v2 socket programs, etcd in a namespace"),
              pytest.mark.integration]

L7GATE = str(Path(sys.executable).parent / "l7gate")
VIP_A, VIP_B = "10.96.0.10", "10.97.0.10"
PORTS = [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080}]
A1, A2, B_LOCAL = "payments/billing-service-1", "payments/billing-service-2", "payments/billing-service-b"


@dataclass
class World:
    tb: Testbed
    a1: AgentProc
    a2: AgentProc
    b1: AgentProc
    billing: tuple[Pod, Pod]
    billing_b: Pod
    frontend: Pod
    other: Pod
    service_a: dict[str, Any]
    service_b: dict[str, Any]

    @property
    def cluster_a(self) -> tuple[AgentProc, AgentProc]:
        return self.a1, self.a2

    def backends_at_b(self) -> list[str]:
        """The pods behind cluster-b's ClusterIP, as its agent has them (/v1/services)."""
        for svc in self.b1.client.get("/v1/services")["services"]:
            for fe in svc["frontends"]:
                if fe["frontend"] == f"{VIP_B}:8080/TCP":
                    return sorted(b["pod"] for b in fe["backends"])
        return []

    def wait_backends(self, pods: list[str], what: str) -> None:
        eventually(lambda: self.backends_at_b() == sorted(pods), 45, what)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    etcd = shutil.which("etcd")
    if etcd is None:
        unavailable("needs the etcd binary (scripts/install.sh installs etcd-server)")
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        unavailable(f"no cgroup v2 at {CGROUP_ROOT}")
    with Testbed() as tb:
        na1 = tb.add_node("a1", cluster="cluster-a", node_cidr="10.69.1.0/24")
        na2 = tb.add_node("a2", cluster="cluster-a", node_cidr="10.69.2.0/24")
        nb1 = tb.add_node("b1", cluster="cluster-b", node_cidr="10.69.3.0/24", cgroup=True)  # the callers' node
        tb.link(na1, na2)
        tb.link(na1, nb1)
        tb.link(na2, nb1)
        billing = (tb.add_pod(na1, "payments", "billing-service-1", labels=BILLING_LABELS, ports=[8080]),
                   tb.add_pod(na2, "payments", "billing-service-2", labels=BILLING_LABELS, ports=[8080]))
        billing_b = tb.add_pod(nb1, "payments", "billing-service-b", labels=BILLING_LABELS, ports=[8080])
        fe = tb.add_pod(nb1, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        other = tb.add_pod(nb1, "web", "reporting-job-q7x", labels={"app": "reporting-job", "team": "web"})
        for pod in (*billing, billing_b):
            pod.serve_http(8080)
        service_a = tb.add_service("payments", "billing-service", VIP_A, PORTS, selector={"app": "billing-service"},
                                   cluster="cluster-a", annotations={"io.cilium/global-service": "true"})
        # As in examples/seed/: cluster-b has the Service too (Cilium requires it), selecting nothing there.
        service_b = tb.add_service("payments", "billing-service", VIP_B, PORTS, cluster="cluster-b",
                                   annotations={"service.cilium.io/global": "true"})
        etcd_a = NodeEtcd(na1, etcd, tb.workdir / "etcd-a").start()
        etcd_b = NodeEtcd(nb1, etcd, tb.workdir / "etcd-b").start()
        agents: list[AgentProc] = []
        try:
            start_mesh_agents(tb, (na1, na2, nb1), etcd_a, etcd_b, agents)
            w = World(tb, agents[0], agents[1], agents[2], billing, billing_b, fe, other, service_a, service_b)
            w.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}"], "cluster-a's billing pods behind cluster-b's ClusterIP")
            yield w
        finally:
            stop_agents(*agents)
            etcd_a.stop()
            etcd_b.stop()


def with_annotations(svc: dict[str, Any], selector: dict[str, str] | None = None, **annotations: str) -> dict[str, Any]:
    doc = copy.deepcopy(svc)
    doc["metadata"]["annotations"].update(annotations)
    if selector is not None:
        doc["spec"]["selector"] = selector
    return doc


def not_ready(pod: Pod) -> dict[str, Any]:
    doc = pod.manifest()
    doc["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    return doc


def test_the_frontend_in_cluster_b_calls_the_global_service_by_name(world: World) -> None:
    got = answered_by(world.frontend, 200)
    assert sum(got.values()) == 200 and set(got) == {A1, A2}, got
    assert min(got.values()) >= 50, f"each of cluster-a's billing pods should answer at least 25% of 200: {got}"
    st = world.b1.status()
    assert st["services"]["datapath"].startswith("served: the kernel's socket load balancer"), st["services"]


def test_http_rules_apply_to_the_remote_backend_behind_the_service(world: World) -> None:
    got = answered_by(world.frontend, 20, method="GET", path="/v1/transactions")
    assert got == Counter({"status 403": 20}), got


def test_a_pod_the_policy_does_not_allow_is_dropped_through_the_service(world: World) -> None:
    assert answered_by(world.frontend, 2).keys() <= {A1, A2}  # positive control
    status, err = world.other.curl("http://billing-service.payments.svc.cluster.local:8080/v1/charge", "POST",
                                   data="{}", timeout=2)
    assert status == 0, (status, err)
    # Dropped in the kernel of the billing pod's node in cluster-a, which judged the backend the
    # load balancer in cluster-b chose (not the ClusterIP) and names the Service.
    drop = kernel_drop(world.cluster_a, world.other, world.billing,
                       "a kernel drop in cluster-a from cluster-b's reporting-job to a billing pod")
    assert drop["drop_reason_desc"] == "Policy denied", drop
    assert drop["destination_service"] == {"name": "billing-service", "namespace": "payments"}, drop


def test_affinity_local_prefers_local_backends_and_falls_back_to_remote_ones(world: World) -> None:
    local = with_annotations(world.service_b, {"app": "billing-service"}, **{"service.cilium.io/affinity": "local"})
    world.b1.client.apply_endpoints([local])
    try:
        world.wait_backends([f"cluster-b/{B_LOCAL}"], "affinity local: cluster-b's own ready replica only")
        got = answered_by(world.frontend, 40)
        assert got == Counter({B_LOCAL: 40}), got
        world.b1.client.apply_endpoints([not_ready(world.billing_b)])  # no local backend is ready
        world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}"], "affinity local falling back to cluster-a's")
        got = answered_by(world.frontend, 100)
        assert set(got) == {A1, A2} and min(got.values()) >= 25, got
        world.b1.client.apply_endpoints([world.billing_b.manifest()])  # ready again: local again
        world.wait_backends([f"cluster-b/{B_LOCAL}"], "affinity local back on cluster-b's replica")
        assert answered_by(world.frontend, 20) == Counter({B_LOCAL: 20})
    finally:
        world.b1.client.apply_endpoints([world.service_b, world.billing_b.manifest()])
    world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}"], "cluster-b's Service as it was")


def test_shared_false_hides_a_clusters_backends(world: World) -> None:
    # cluster-b's Service selects its own replica too: without affinity, all three are used.
    world.b1.client.apply_endpoints([with_annotations(world.service_b, {"app": "billing-service"})])
    try:
        world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}", f"cluster-b/{B_LOCAL}"], "three backends")
        assert set(answered_by(world.frontend, 60)) == {A1, A2, B_LOCAL}
        unshared = with_annotations(world.service_a, **{"service.cilium.io/shared": "false"})
        for agent in world.cluster_a:
            agent.client.apply_endpoints([unshared])
        try:
            world.wait_backends([f"cluster-b/{B_LOCAL}"], "cluster-a's backends hidden from cluster-b")
            assert answered_by(world.frontend, 40) == Counter({B_LOCAL: 40})
            # shared is about what cluster-a offers: its own ClusterIP still uses its own pods, and
            # cluster-b's replica too (cluster-b's Service is global and shared, and selects it now).
            data = world.a1.client.get("/v1/services")
            (fe,) = data["services"][0]["frontends"]
            assert sorted(b["pod"] for b in fe["backends"]) == [f"cluster-a/{A1}", f"cluster-a/{A2}",
                                                                  f"cluster-b/{B_LOCAL}"]
        finally:
            for agent in world.cluster_a:
                agent.client.apply_endpoints([world.service_a])
        world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}", f"cluster-b/{B_LOCAL}"], "shared again")
    finally:
        world.b1.client.apply_endpoints([world.service_b])
    world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}"], "cluster-b's Service as it was")


def test_status_names_the_global_service_missing_in_this_cluster(world: World) -> None:
    world.b1.client.delete_service("payments/billing-service")
    try:
        def named() -> str | None:
            out = subprocess.run([L7GATE, "clustermesh", "status", "--admin", f"unix:{world.b1.workdir}/admin.sock"],
                                 capture_output=True, text=True, timeout=30).stdout
            return out if "not here" in out else None

        out = eventually(named, 20, "clustermesh status naming the missing Service")
        assert ("global service payments/billing-service exists in cluster-a but not here: create it in this "
                "cluster too, as Cilium requires") in out, out
        # and indeed nothing here balances to cluster-a: the ClusterIP is no address at all now
        status, _ = world.frontend.curl("http://billing-service.payments.svc.cluster.local:8080/v1/charge", "POST",
                                        data="{}", timeout=2)
        assert status == 0
    finally:
        world.b1.client.apply_endpoints([world.service_b])
    world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}"], "cluster-b's Service back")
    assert set(answered_by(world.frontend, 20)) <= {A1, A2}


def test_a_billing_pod_deleted_in_cluster_a_is_not_chosen_again(world: World) -> None:
    gone = world.billing[1]
    for agent in world.cluster_a:
        agent.client.delete_endpoint(gone.ref)
    try:
        world.wait_backends([f"cluster-a/{A1}"], "billing-service-2 gone from cluster-b's rotation")
        got = answered_by(world.frontend, 60)
        assert got == Counter({A1: 60}), got
    finally:
        for agent in world.cluster_a:
            agent.client.apply_endpoints([gone.manifest()])
    # Re-applied, it is published and merged again, and answers again: its node's Envoy takes
    # the re-created listener with new names for its classifier and source slots (reusing the
    # draining listener's names left every slot unsubscribed: 403 for every request).
    world.wait_backends([f"cluster-a/{A1}", f"cluster-a/{A2}"], "billing-service-2 back in cluster-b's rotation")

    def both_answer() -> bool:
        got = answered_by(world.frontend, 40)
        assert set(got) == {A1, A2}, got
        return True

    eventually(both_answer, 20, "both billing pods to answer again")
