"""Kubernetes NetworkPolicies applied with `l7gate policy apply -f` to a running agent, enforced by
its real Envoy (loopback mode): L3/L4 only, so a denied connection to a proxied port is refused by
Envoy's RBAC (403) before the pod sees it, as for an L4-only CiliumNetworkPolicy; allows of a
NetworkPolicy and of a CNP on the same pod are a union."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.cli import main as cli_main
from l7gate.client import AdminClient

from .loopback import World, loopback_world, pod, request, wait_request

pytestmark = pytest.mark.integration

S = 53  # this module's 127.53.x.x addresses
LEDGER = f"127.{S}.1.20"
FRONTEND = f"127.{S}.2.55"  # web/frontend-service-abc, cluster-b (loopback_world)
OTHER = f"127.{S}.2.60"  # web/reporting-job-q7x, cluster-b
STRANGER = f"127.{S}.9.9"  # no pod: world

NETWORK_POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "ledger-from-web-frontends", "namespace": "payments"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "ledger"}},
        "policyTypes": ["Ingress"],
        "ingress": [{
            "from": [{"namespaceSelector": {"matchLabels": {"team": "web-team"}},
                      "podSelector": {"matchLabels": {"app": "frontend-service"}}}],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }],
    },
}
KEY = "NetworkPolicy/payments/ledger-from-web-frontends"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[World]:
    with loopback_world(tmp_path_factory.mktemp("l7g-knp"), S) as w:
        for port in (8080, 9090):
            w.serve(LEDGER, port, f"ledger-{port}")
        w.core.apply([
            # the web namespace's labels, in every cluster (no cluster annotation)
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web", "labels": {"team": "web-team"}}},
            pod("ledger-abc", "payments", LEDGER, {"app": "ledger"}, "cluster-a", (8080, 9090)),
        ])
        w.synced()
        w.wait_listening(LEDGER, 8080)
        w.wait_listening(LEDGER, 9090)
        yield w


def cli(world: World, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli_main([*argv[:2], "--admin", world.agent.admin.address, *argv[2:]])
    out, err = capsys.readouterr()
    return rc, out, err


def write(path: Path, *docs: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def test_policy_apply_of_a_network_policy_is_enforced_by_envoy(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert request(OTHER, LEDGER, 8080, "GET", "/x").status == 200  # nothing selects the ledger yet
    rc, out, err = cli(world, capsys, "policy", "apply", "-f", write(tmp_path / "np.yaml", NETWORK_POLICY))
    assert rc == 0, err
    assert f"{KEY} created" in out
    world.synced()
    assert wait_request(OTHER, LEDGER, "GET", "/x", 403) == 403  # the right namespace, not a frontend
    for method, path in (("GET", "/x"), ("POST", "/anything"), ("DELETE", "/v1/refund")):
        r = request(FRONTEND, LEDGER, 8080, method, path)
        assert r.status == 200, (method, path, r)  # L3/L4: every request on the allowed port
        assert json.loads(r.body)["pod"] == "ledger-8080"
    assert request(FRONTEND, LEDGER, 9090, "GET", "/x").status == 403  # a port the policy does not list
    assert request(STRANGER, LEDGER, 8080, "GET", "/x").status == 403  # world

    rc, out, _ = cli(world, capsys, "policy", "get")
    assert rc == 0 and KEY in out  # listed with its kind
    view = AdminClient(world.agent.admin.address).get("/v1/policy")
    (ledger,) = [e for e in view["endpoints"] if any(KEY in d for x in e["ingress"]["entries"]
                                                    for d in x["derived_from"])]
    assert ledger["ingress"]["default_deny"] is True
    assert {(x["ports"], x["protocol"], x["action"]) for x in ledger["ingress"]["entries"]} == {("8080", "TCP", "allow")}

    rc, out, _ = cli(world, capsys, "policy", "delete", KEY)
    assert rc == 0 and f"{KEY} deleted" in out
    world.synced()
    assert wait_request(OTHER, LEDGER, "GET", "/x", 200) == 200


def test_a_network_policy_and_a_cnp_on_one_pod_are_a_union(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cnp = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "ledger-reports", "namespace": "payments"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "ledger"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "reporting-job",
                                                                 "k8s:io.kubernetes.pod.namespace": "web"}}],
                              "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}],
                                           "rules": {"http": [{"method": "GET", "path": "/reports/.*"}]}}]}]},
    }
    rc, out, err = cli(world, capsys, "policy", "apply", "-f", write(tmp_path / "both.yaml", NETWORK_POLICY, cnp))
    assert rc == 0, err
    assert f"{KEY} created" in out and "CiliumNetworkPolicy/payments/ledger-reports created" in out
    try:
        world.synced()
        assert wait_request(OTHER, LEDGER, "GET", "/reports/q1", 200, port=9090) == 200  # the CNP's
        assert request(OTHER, LEDGER, 9090, "POST", "/reports/q1").status == 403  # its HTTP rule
        assert request(OTHER, LEDGER, 8080, "GET", "/x").status == 403
        assert request(FRONTEND, LEDGER, 8080, "PUT", "/x").status == 200  # the NetworkPolicy's
        assert request(FRONTEND, LEDGER, 9090, "GET", "/reports/q1").status == 403
    finally:
        for key in (KEY, "CiliumNetworkPolicy/payments/ledger-reports"):
            assert cli(world, capsys, "policy", "delete", key)[0] == 0
        world.synced()


def test_an_invalid_network_policy_is_refused_naming_the_field(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = json.loads(json.dumps(NETWORK_POLICY))
    bad["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "10.0.0.0/33"}})
    bad["spec"]["ingress"][0]["ports"][0]["port"] = "http_alt"
    rc, _, err = cli(world, capsys, "policy", "apply", "-f", write(tmp_path / "bad.yaml", bad))
    assert rc == 1
    assert "spec.ingress[0].from[1].ipBlock.cidr" in err and "invalid CIDR" in err
    assert "spec.ingress[0].ports[0].port" in err and "'_' is not allowed" in err
    assert KEY not in world.core.documents("NetworkPolicy")
