"""toServices end to end, in kernel mode (issue 17): a pod's egress policy names a Service
without a selector, `toServices: [{k8sService: {serviceName: ext, namespace: ext}}]`, and the
kernel lets the pod reach the addresses the Service's EndpointSlice lists — and nothing else — as
the slice is created, changed and deleted; a Service with a selector selects nothing; a
`k8sServiceSelector` follows the Service's labels. Every verdict is checked against `l7gate
policy trace` (the reference evaluator) over the same objects. The slice is also the Service's
backends: the socket load balancer sends a connect to its ClusterIP to the slice's address, which
the same egress rule then judges.

Topology (the testbed): node a1 runs an agent (kernel mode, the socket load balancer on its pods'
cgroup) with the pod `web/client`. Node `inet` has no agent: its pods `partner` and `office`
stand for addresses outside the cluster (HTTP servers on port 443), `world` unless a CIDR identity
holds them. Every address is inside the namespaces the testbed created.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.offline.trace import TraceRequest, run_trace
from l7gate.testing.testbed import CGROUP_ROOT, Pod, Testbed
from l7gate.testing.wait import eventually
from tests.conftest import unavailable

from .test_cidrgroup_kernel import make_agent
from .test_kernel_datapath import AgentProc, stop_agents

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc, cgroup v2 socket programs"), pytest.mark.integration]

VIP = "10.96.7.17"  # the Service's ClusterIP: no host has it; the socket LB translates it
BY_NAME: dict[str, Any] = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "client-to-ext", "namespace": "web"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
             "egress": [{"toServices": [{"k8sService": {"serviceName": "ext", "namespace": "ext"}}]}]},
}
BY_LABEL: dict[str, Any] = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "client-to-ext", "namespace": "web"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
             "egress": [{"toServices": [{"k8sServiceSelector": {"selector": {"matchLabels": {"role": "partner"}},
                                                               "namespace": "ext"}}]}]},
}


def service(*, selector: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": VIP, "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}
    if selector is not None:
        spec["selector"] = selector
    meta: dict[str, Any] = {"name": "ext", "namespace": "ext", "annotations": {"l7gate.io/cluster": "cluster-a"}}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def endpoint_slice(*pods: Pod) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-1", "namespace": "ext", "labels": {"kubernetes.io/service-name": "ext"},
                         "annotations": {"l7gate.io/cluster": "cluster-a"}},
            "addressType": "IPv4", "endpoints": [{"addresses": [p.ip]} for p in pods],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}


@dataclass
class World:
    tb: Testbed
    agent: AgentProc
    client: Pod
    partner: Pod
    office: Pod
    workdir: Path

    def reach(self, target: str, timeout: float = 1.0) -> int:
        """The client's GET to `target`:443: the HTTP status, 0 when dropped or refused."""
        return self.client.curl(f"http://{target}:443/x", timeout=timeout)[0]

    def traced(self, objects: list[dict[str, Any]], pod: Pod) -> bool:
        """`l7gate policy trace` over `objects` (the policy, Services, slices) and the cluster's pods:
        whether the client may reach `pod`:443."""
        f = self.workdir / "inventory.yaml"
        f.write_text(yaml.safe_dump_all([*objects, *self.tb.to_manifests("cluster-a")]))
        result = run_trace(TraceRequest((str(f),), "cluster-a/web/client", pod.ip, 443, cluster_name="cluster-a"))
        return result.verdict.allowed

    def agree(self, objects: list[dict[str, Any]], want: dict[str, bool], what: str) -> None:
        """The kernel (by curl) and trace give the verdicts `want` (pod name → reachable)."""
        pods = {"partner": self.partner, "office": self.office}
        assert {name: self.traced(objects, pods[name]) for name in want} == want, f"trace: {what}"

        def now() -> bool:
            got = {name: self.reach(pods[name].ip) == 200 for name in want}
            assert got == want, got
            return True

        eventually(now, 20, f"kernel: {what}")

    def ipcache(self) -> set[str]:
        return {e["prefix"] for e in self.agent.client.get("/v1/ipcache")["entries"]}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        unavailable(f"no cgroup v2 at {CGROUP_ROOT}")
    with Testbed() as tb:
        a1 = tb.add_node("a1", cluster="cluster-a", node_cidr="10.68.1.0/24", cgroup=True)
        net = tb.add_node("inet", cluster="internet", node_cidr="10.68.9.0/24")
        tb.link(a1, net)
        client = tb.add_pod(a1, "web", "client", labels={"app": "client"})
        partner = tb.add_pod(net, "internet", "partner")
        office = tb.add_pod(net, "internet", "office")
        for pod in (partner, office):
            pod.serve_http(443)
        agent = make_agent(tb, a1, cgroup=str(a1.cgroup))
        try:
            agent.start(tb)
            agent.client.apply_endpoints(tb.to_manifests("cluster-a"))
            agent.synced()
            yield World(tb, agent, client, partner, office, tb.workdir)
        finally:
            stop_agents(agent)


def test_the_kernel_follows_the_services_endpoint_slice(world: World) -> None:
    w, api = world, world.agent.client
    partner, office = f"{w.partner.ip}/32", f"{w.office.ip}/32"
    api.apply_policies([BY_NAME])
    # no Service yet: the rule selects nothing, and egress is default-deny
    w.agree([BY_NAME], {"partner": False, "office": False}, "no Service yet")

    result = api.apply_endpoints([service(), endpoint_slice(w.partner)])
    assert result["created"] == ["service/cluster-a/ext/ext", "endpointslice/cluster-a/ext/ext-1"], result
    objects = [BY_NAME, service(), endpoint_slice(w.partner)]
    w.agree(objects, {"partner": True, "office": False}, "the slice lists the partner")
    assert partner in w.ipcache() and office not in w.ipcache()
    # the ClusterIP: the socket LB picks the slice's endpoint, and the rule allows it
    eventually(lambda: w.reach(VIP) == 200, 10, "the ClusterIP served by the slice's endpoint")
    [svc] = api.get("/v1/services")["services"]
    assert svc["to_services"] == {"selectable": True, "addresses": [partner]}

    # the slice changed: the office instead of the partner
    api.apply_endpoints([endpoint_slice(w.office)])
    objects = [BY_NAME, service(), endpoint_slice(w.office)]
    w.agree(objects, {"partner": False, "office": True}, "the slice lists the office")
    assert office in w.ipcache() and partner not in w.ipcache()
    eventually(lambda: w.reach(VIP) == 200, 10, "the ClusterIP follows the slice")

    # the slice deleted: nothing is selected, the ClusterIP has no backend
    api.delete_endpoint_slice("ext/ext-1")
    w.agree([BY_NAME, service()], {"partner": False, "office": False}, "no slice")
    assert w.reach(VIP) == 0
    api.delete_service("ext/ext")


def test_a_service_with_a_selector_selects_nothing(world: World) -> None:
    w, api = world, world.agent.client
    api.apply_policies([BY_NAME])
    with_selector = service(selector={"app": "ext"})
    api.apply_endpoints([with_selector, endpoint_slice(w.partner, w.office)])
    w.agree([BY_NAME, with_selector, endpoint_slice(w.partner, w.office)], {"partner": False, "office": False},
            "the Service has a selector")
    assert not {f"{w.partner.ip}/32", f"{w.office.ip}/32"} & w.ipcache()
    # the same Service without its selector: the slice's addresses
    api.apply_endpoints([service()])
    w.agree([BY_NAME, service(), endpoint_slice(w.partner, w.office)], {"partner": True, "office": True},
            "the selector removed")
    api.delete_endpoint_slice("ext/ext-1")
    api.delete_service("ext/ext")


def test_a_service_selector_follows_the_services_labels(world: World) -> None:
    w, api = world, world.agent.client
    api.apply_policies([BY_LABEL])
    partnered = service(labels={"role": "partner"})
    api.apply_endpoints([partnered, endpoint_slice(w.partner)])
    w.agree([BY_LABEL, partnered, endpoint_slice(w.partner)], {"partner": True, "office": False},
            "the Service has the label")
    relabelled = service(labels={"role": "office"})
    api.apply_endpoints([relabelled])
    w.agree([BY_LABEL, relabelled, endpoint_slice(w.partner)], {"partner": False, "office": False},
            "the label changed")
    api.delete_endpoint_slice("ext/ext-1")
    api.delete_service("ext/ext")
