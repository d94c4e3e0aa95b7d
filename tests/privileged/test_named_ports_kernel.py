"""Named ports (`port: http`) end to end, kernel mode: pods in network namespaces on one node,
the agent's BPF programs on their veths and its Envoy behind the transparent redirect.

shop/api declares `http` (8080) and `metrics` (9090) and serves 8080, 8081, 9090 and 9091;
shop/db declares `postgres` (5432) and serves 5432 and 5433. The policies let web call GET
/v1/... on api's `http` (HTTP rules: through Envoy), monitoring reach api's `metrics` (L3/L4),
web reach api's `grpc` (which api does not declare: nothing), and api call db's `postgres`
(egress, resolved on the peer). Every probe is a real curl; its answer (200, Envoy's 403, or
no answer at all: dropped in the kernel) must be what `l7gate policy trace` (the reference
evaluator) says for the same inventory. Then the pods' container ports change (re-applied, as a
rollout would) and the verdicts move with them, in the kernel, in Envoy and in the trace."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.offline.trace import TraceRequest, run_trace
from l7gate.testing.testbed import Pod, Testbed

from .test_kernel_datapath import AgentProc, make_agent, stop_agents, url

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]


def cnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def peers(app: str) -> list[dict[str, Any]]:
    return [{"matchLabels": {"app": app, "k8s:io.kubernetes.pod.namespace": "web"}}]


POLICIES = [
    cnp("api-ingress", {
        "endpointSelector": {"matchLabels": {"app": "api"}},
        "ingress": [
            {"fromEndpoints": peers("web"),
             "toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}],
                          "rules": {"http": [{"method": "GET", "path": "/v1/.*"}]}}]},
            {"fromEndpoints": peers("monitoring"), "toPorts": [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]},
            {"fromEndpoints": peers("web"), "toPorts": [{"ports": [{"port": "grpc", "protocol": "TCP"}]}]},
        ],
    }),
    cnp("api-egress", {
        "endpointSelector": {"matchLabels": {"app": "api"}},
        "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}],
                    "toPorts": [{"ports": [{"port": "postgres", "protocol": "TCP"}]}]}],
    }),
]


@dataclass
class World:
    tb: Testbed
    agent: AgentProc
    api: Pod
    db: Pod
    web: Pod
    monitoring: Pod
    workdir: Path
    ports: dict[str, list[tuple[int, str]]]  # pod name → its container ports (number, name)

    def manifests(self) -> list[dict[str, Any]]:
        """The testbed's Namespaces and Pods, each pod declaring the container ports `ports`
        gives it."""
        out = []
        for m in self.tb.to_manifests():
            m = copy.deepcopy(m)
            declared = self.ports.get(m["metadata"]["name"]) if m["kind"] == "Pod" else None
            if declared is not None:
                m["spec"]["containers"][0]["ports"] = [
                    {"containerPort": n, "protocol": "TCP", **({"name": name} if name else {})} for n, name in declared]
            out.append(m)
        return out

    def apply_pods(self) -> None:
        self.agent.client.apply_endpoints(self.manifests())
        self.agent.synced()

    def trace(self, src: Pod, dst: Pod, port: int, method: str) -> tuple[bool, str | None]:
        """The reference evaluator's verdict (`l7gate policy trace`) for the inventory in force."""
        folder = self.workdir / "trace"
        folder.mkdir(exist_ok=True)
        (folder / "policies.yaml").write_text(yaml.safe_dump_all(POLICIES))
        (folder / "inventory.yaml").write_text(yaml.safe_dump_all(self.manifests()))
        r = run_trace(TraceRequest(paths=(str(folder),), source=src.ref, destination=dst.ref, port=port,
                                   method=method, path="/v1/items", cluster_name="cluster-a"))
        self.last_reasons = r.verdict.reasons
        return r.verdict.allowed, r.verdict.layer.value if r.verdict.layer else None

    last_reasons: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Testbed() as tb:
        node = tb.add_node("n1", cluster="cluster-a", node_cidr="10.77.1.0/24")
        api = tb.add_pod(node, "shop", "api-7f9c", labels={"app": "api"})
        db = tb.add_pod(node, "shop", "db-0", labels={"app": "db"})
        web = tb.add_pod(node, "web", "web-5d8", labels={"app": "web"})
        monitoring = tb.add_pod(node, "web", "monitoring-1", labels={"app": "monitoring"})
        for port in (8080, 8081, 9090, 9091):
            api.serve_http(port)
        for port in (5432, 5433):
            db.serve_http(port)
        agent = make_agent(tb, node, "cluster-a", 1, "cluster-b", 2, [])
        w = World(tb, agent, api, db, web, monitoring, tmp_path_factory.mktemp("l7g-named"), dict(PORTS))
        try:
            agent.start(tb)
            w.apply_pods()
            agent.client.apply_policies(POLICIES)
            agent.synced()
            yield w
        finally:
            stop_agents(agent)


PORTS = {"api-7f9c": [(8080, "http"), (9090, "metrics")], "db-0": [(5432, "postgres")]}

# What curl sees for each verdict: Envoy's answer, or none at all (dropped in the kernel).
STATUS = {(True, None): 200, (False, "l7"): 403, (False, "l3l4"): 0}


def probe(world: World, src: Pod, dst: Pod, port: int, method: str = "GET") -> tuple[int, tuple[bool, str | None]]:
    status = src.curl(url(dst, port, "/v1/items"), method, timeout=2)[0]
    return status, world.trace(src, dst, port, method)


def check(world: World, cases: list[tuple[Pod, Pod, int, str, int]]) -> None:
    """Each (src, dst, port, method, status): curl's status, and the trace agrees with it."""
    seen = []
    for src, dst, port, method, want in cases:
        status, verdict = probe(world, src, dst, port, method)
        seen.append((src.name, dst.name, port, method, status, verdict))
        assert status == want and STATUS[verdict] == want, (
            f"{src.name} -> {dst.name}:{port} {method}: curl {status}, trace {verdict}, expected {want}\n"
            + "\n".join(world.last_reasons) + f"\nso far: {seen}")


def api_ingress_ports(world: World) -> set[tuple[str, str]]:
    """The agent's resolved map for api: (ports, action) of its ingress entries."""
    eps = world.agent.client.get("/v1/policy")["endpoints"]
    api = next(e for e in eps if "cluster-a/shop/api-7f9c" in e["pods"])
    return {(x["ports"], x["action"]) for x in api["ingress"]["entries"]}


def test_named_ports_through_the_kernel_and_envoy(world: World) -> None:
    w = world
    check(w, [
        (w.web, w.api, 8080, "GET", 200),          # http = 8080, HTTP rules: Envoy allows
        (w.web, w.api, 8080, "POST", 403),         # ... and refuses what they do not allow
        (w.web, w.api, 8081, "GET", 0),            # not http: dropped in the kernel
        (w.web, w.api, 9090, "GET", 0),            # metrics is monitoring's
        (w.web, w.api, 9091, "GET", 0),            # grpc: api declares no such port
        (w.monitoring, w.api, 9090, "GET", 200),   # metrics = 9090, L3/L4 allow
        (w.monitoring, w.api, 8080, "GET", 0),
        (w.api, w.db, 5432, "GET", 200),           # egress: postgres of the peer = 5432
        (w.api, w.db, 5433, "GET", 0),
    ])
    w.trace(w.web, w.api, 9091, "GET")
    assert any("port name 'grpc' is not declared for TCP: it selects nothing" in r for r in w.last_reasons)
    assert {("8080", "proxy"), ("9090", "allow")} <= api_ingress_ports(w)


def test_moved_container_ports_move_the_verdicts(world: World) -> None:
    w = world
    try:
        # A rollout moves api's http to 8081 and db's postgres to 5433: the pods are re-applied
        # (Envoy gets a listener on 8081, the kernel redirects 8081 to it).
        w.ports["api-7f9c"] = [(8081, "http"), (9090, "metrics")]
        w.ports["db-0"] = [(5433, "postgres")]
        w.apply_pods()
        assert ("8081", "proxy") in api_ingress_ports(w) and ("8080", "proxy") not in api_ingress_ports(w)
        check(w, [
            (w.web, w.api, 8081, "GET", 200),
            (w.web, w.api, 8081, "POST", 403),
            (w.web, w.api, 8080, "GET", 0),
            (w.monitoring, w.api, 9090, "GET", 200),
            (w.api, w.db, 5433, "GET", 200),
            (w.api, w.db, 5432, "GET", 0),
        ])
        # The port loses its name: nothing is named http any more, nothing is let in on it.
        w.ports["api-7f9c"] = [(8081, ""), (9090, "metrics")]
        w.apply_pods()
        check(w, [(w.web, w.api, 8081, "GET", 0), (w.monitoring, w.api, 9090, "GET", 200)])
    finally:
        w.ports.update(PORTS)
        w.apply_pods()
