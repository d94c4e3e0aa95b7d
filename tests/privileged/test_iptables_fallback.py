"""The fallback datapath: no BPF (bcc unavailable, or `datapath.bpf: false`). Every TCP
connection to a local pod is marked by an iptables mangle chain and delivered to Envoy's
transparent listener; Envoy makes the L3/L4 verdicts as well as the L7 ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import Testbed

from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, make_agent, seed_policies, stop_agents, url

pytestmark = [pytest.mark.privileged("netns, iptables"), pytest.mark.integration]


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    with Testbed() as tb:
        node = tb.add_node("f1", cluster="cluster-a", node_cidr="10.64.1.0/24")
        billing = tb.add_pod(node, "payments", "billing-service-xyz", labels=BILLING_LABELS, ports=[8080])
        fe = tb.add_pod(node, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        other = tb.add_pod(node, "web", "reporting-job-q7x", labels={"app": "reporting-job"})
        billing.serve_http(8080)
        billing.serve_http(9090)
        agent = make_agent(tb, node, "cluster-a", 1, "cluster-b", 2, [])
        cfg = yaml.safe_load(agent.config.read_text())
        cfg["datapath"]["bpf"] = False
        agent.config.write_text(yaml.safe_dump(cfg))
        try:
            agent.start(tb)
            agent.client.apply_endpoints(tb.to_manifests())
            agent.client.apply_policies(seed_policies())
            agent.synced()
            yield {"agent": agent, "node": node, "billing": billing, "fe": fe, "other": other}
        finally:
            stop_agents(agent)


def test_status_says_fallback_and_why(world: dict[str, Any]) -> None:
    dp = world["agent"].status()["datapath"]
    assert dp["mode"] == "iptables-fallback" and "datapath.bpf is false" in dp["reason"]
    rules = world["node"].run(["iptables-save", "-t", "mangle"]).stdout
    assert "L7G-PREROUTING" in rules and world["billing"].ip in rules
    assert not Path(world["agent"].pin_dir).exists()  # no BPF was loaded


def test_seed_table_with_envoy_making_l3l4_verdicts(world: dict[str, Any]) -> None:
    fe, billing, other = world["fe"], world["billing"], world["other"]
    assert fe.curl(url(billing, 8080, "/v1/charge"), "POST")[0] == 200
    assert fe.curl(url(billing, 8080, "/v1/transactions"))[0] == 403
    assert fe.curl(url(billing, 8080, "/v1/refund"), "POST")[0] == 403
    assert other.curl(url(billing, 8080, "/v1/charge"), "POST")[0] == 403  # L3/L4 verdict, by Envoy
    # a port without a proxy listener is not reachable at all (fail closed)
    assert fe.curl(url(billing, 9090, "/"), timeout=2)[0] == 0


def test_a_service_is_listed_but_its_clusterip_is_not_served(world: dict[str, Any]) -> None:
    """The fallback has no load balancer: it says so, and a ClusterIP leads nowhere (a connect
    to it fails; it never reaches a pod unjudged)."""
    agent, fe, billing = world["agent"], world["fe"], world["billing"]
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "billing-service", "namespace": "payments"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 8080}], "selector": {"app": "billing-service"}}}
    agent.client.apply_endpoints([svc])
    try:
        data = agent.client.get("/v1/services")
        assert data["datapath"].startswith("not served: the iptables fallback"), data["datapath"]
        (fe_entry,) = data["services"][0]["frontends"]
        assert [b["pod"] for b in fe_entry["backends"]] == [billing.ref]
        assert agent.status()["services"]["datapath"] == data["datapath"]
        assert fe.curl("http://10.96.0.10:8080/v1/charge", "POST", timeout=2)[0] == 0
    finally:
        agent.client.delete_service("payments/billing-service")
    assert agent.client.get("/v1/services")["services"] == []
