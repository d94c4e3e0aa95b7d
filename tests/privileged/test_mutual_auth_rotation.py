"""SVID rotation under a steady probe loop: with 10-second SVIDs (rotated at half their life)
the agents re-handshake and refresh the kernel's auth entries before they expire, and not one
request under `authentication: required` is dropped. Run twice: on the handshake path alone
(`encryption: none`) and through the mTLS tunnel, where each rotation also replaces the SDS
secret the Envoys present."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, make_agent, stop_agents, url
from .test_mutual_auth import auth_policies

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]

TTL = 10


@pytest.fixture(scope="module", params=["none", "tunnel"])
def world(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    with Testbed() as tb:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.66.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.66.2.0/24")
        tb.link(na, nb)
        billing = tb.add_pod(na, "payments", "billing-service-xyz", labels=BILLING_LABELS, ports=[8080])
        fe = tb.add_pod(nb, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        billing.serve_http(8080)
        ca = tb.workdir / "ca"
        agents = []
        try:
            for node, cluster, cid, other, oid in ((na, "cluster-a", 1, "cluster-b", 2), (nb, "cluster-b", 2, "cluster-a", 1)):
                agent = make_agent(tb, node, cluster, cid, other, oid, node.link_ifnames)
                cfg = yaml.safe_load(agent.config.read_text())
                cfg["mtls"] = {"enabled": True, "caDir": str(ca), "svidTTL": TTL, "listen": f"{node.ip}:4250",
                               "encryption": request.param}
                agent.config.write_text(yaml.safe_dump(cfg))
                agents.append(agent)
            for agent in agents:
                agent.start(tb)
                agent.client.apply_endpoints(tb.to_manifests())
                agent.client.apply_policies(auth_policies())
            yield {"a": agents[0], "b": agents[1], "fe": fe, "billing": billing, "encryption": request.param}
        finally:
            stop_agents(*agents)


def test_rotation_under_a_probe_loop_loses_no_request(world: dict[str, Any]) -> None:
    fe, billing = world["fe"], world["billing"]
    eventually(lambda: fe.curl(url(billing, 8080, "/v1/charge"), "POST", timeout=2)[0] == 200, 10,
               "the first call to be allowed")
    expiries: set[float] = set()
    statuses: list[int] = []
    end = time.monotonic() + 2.5 * TTL
    while time.monotonic() < end:
        statuses.append(fe.curl(url(billing, 8080, "/v1/charge"), "POST", timeout=10)[0])
        for e in world["a"].client.get("/v1/auth")["entries"]:
            if e["expires_at"]:
                expiries.add(round(e["expires_at"], 1))
        time.sleep(0.1)
    assert len(statuses) > 20
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} succeeded"
    assert len(expiries) >= 3, f"the auth entry was refreshed {len(expiries) - 1} times: {sorted(expiries)}"
    if world["encryption"] == "tunnel":
        egress = world["b"].client.get("/v1/auth")["tunnel"]["egress"]
        assert egress and all(e["ready"] for e in egress), egress
