"""Bad input refused at the agent (issue 11), through its admin API and the CLI, with a real
Envoy in loopback mode: what is refused changes nothing, and nothing listens where it must not."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.client import AdminClient, AdminError
from l7gate.cli import main

from .loopback import World, loopback_world, pod

pytestmark = pytest.mark.integration

S = 81  # this module's 127.81.x.x addresses
BILLING = f"127.{S}.1.10"
FRONTEND_LABELS = {"app": "frontend-service"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[World]:
    with loopback_world(tmp_path_factory.mktemp("l7g-bad-input"), S) as w:
        yield w


def cli(world: World, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([*argv[:2], "--admin", world.agent.admin.address, *argv[2:]])
    out, err = capsys.readouterr()
    return rc, out, err


def client(world: World) -> AdminClient:
    return AdminClient(world.agent.admin.address, None)


def cnp(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "payments"},
        "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": FRONTEND_LABELS}]}]},
    }


def listening(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_admin_api_refuses_the_same_policy_twice_in_one_request(world: World) -> None:
    before = client(world).get("/v1/policy")["policies"]
    with pytest.raises(AdminError) as ei:
        client(world).apply_policies([cnp("twice", "billing-service"), cnp("twice", "nothing")])
    assert ei.value.status == 422
    assert "object 2: CiliumNetworkPolicy/payments/twice is also object 1" in str(ei.value)
    assert client(world).get("/v1/policy")["policies"] == before


def test_cli_apply_warns_that_auth_required_drops_traffic_without_mutual_auth(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = cnp("needs-auth", "billing-service")
    doc["spec"]["ingress"][0]["authentication"] = {"mode": "required"}
    f = world.tmp / "needs-auth.yaml"
    f.write_text(yaml.safe_dump(doc))
    try:
        rc, out, err = cli(world, capsys, "policy", "apply", "-f", str(f))
        assert rc == 0, err
        assert "CiliumNetworkPolicy/payments/needs-auth created" in out
        assert "warning: CiliumNetworkPolicy/payments/needs-auth: spec.ingress[0].authentication: " in err
        assert "mtls.enabled" in err and "warning" not in out
    finally:
        client(world).delete_policy("CiliumNetworkPolicy/payments/needs-auth")


@pytest.mark.parametrize(
    "ip, message",
    [
        ("0.0.0.0", "status.podIP: 0.0.0.0 is the unspecified address"),
        (f"10.{S}.0.9", f"status.podIP: 10.{S}.0.9 is outside 127.0.0.0/8"),
    ],
)
def test_a_local_pod_envoy_cannot_listen_for_is_refused(
    world: World, capsys: pytest.CaptureFixture[str], ip: str, message: str
) -> None:
    """0.0.0.0 made the node's Envoy listen on every interface of the node; an address outside
    127/8 in loopback mode left the pod's listener unbound (and its traffic unpoliced)."""
    port = 18081
    f = world.tmp / "bad-pod.yaml"
    f.write_text(yaml.safe_dump(pod("wide-open", "payments", ip, {"app": "wide"}, "cluster-a", (port,))))
    rc, _, err = cli(world, capsys, "endpoint", "apply", "-f", str(f))
    assert rc == 1 and message in err, err
    assert "Traceback" not in err
    world.synced()
    assert not listening(BILLING, port) and not listening("127.0.0.1", port)
    assert all(p["ref"] != "cluster-a/payments/wide-open" for p in client(world).get("/v1/endpoints")["endpoints"])


def test_unknown_kind_never_reaches_the_agent(world: World, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "typo.yaml"
    doc = cnp("typo", "billing-service")
    doc["kind"] = "CiliumNetworkPolicyy"
    f.write_text(yaml.safe_dump(doc))
    rc, _, err = cli(world, capsys, "policy", "apply", "-f", str(f))
    assert rc == 1 and "did you mean 'CiliumNetworkPolicy'?" in err
    assert all(p["key"] != "CiliumNetworkPolicy/payments/typo" for p in client(world).get("/v1/policy")["policies"])
