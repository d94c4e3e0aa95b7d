"""`authentication: {mode: required}` on the seed policy, across nodes, through the kernel:
agents hold SPIFFE SVIDs from a shared built-in CA, handshake proactively (TLS 1.3, mutual) and
write the kernel's auth map; a peer whose node cannot prove its identity is dropped with
"Authentication required"."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import Node, Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import (
    BILLING_LABELS, FRONTEND_LABELS, L7GATE, AgentProc, make_agent, seed_policies, stop_agents, url,
)

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]


def auth_policies() -> list[dict[str, Any]]:
    docs = seed_policies()
    allow = copy.deepcopy(docs[1])
    allow["spec"]["ingress"][0]["authentication"] = {"mode": "required"}
    return [docs[0], allow]


def with_mtls(agent: AgentProc, node: Node, ca_dir: Path, trust_domain: str = "l7gate.local") -> None:
    cfg = yaml.safe_load(agent.config.read_text())
    cfg["mtls"] = {"enabled": True, "trustDomain": trust_domain, "caDir": str(ca_dir),
                   "svidTTL": 600, "listen": f"{node.ip}:4250",
                   # the handshake path alone: test_mtls_tunnel.py covers encryption in transit
                   "encryption": "none"}
    agent.config.write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    with Testbed() as tb:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.63.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.63.2.0/24")
        nc = tb.add_node("c1", cluster="cluster-b", node_cidr="10.63.3.0/24")
        tb.link(na, nb)
        tb.link(na, nc)
        billing = tb.add_pod(na, "payments", "billing-service-xyz", labels=BILLING_LABELS, ports=[8080])
        fe = tb.add_pod(nb, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        # the same workload on a node whose agent has SVIDs from another CA: cannot prove it
        fe_rogue = tb.add_pod(nc, "web", "frontend-service-zzz", labels=FRONTEND_LABELS)
        billing.serve_http(8080)
        shared_ca = tb.workdir / "shared-ca"
        agents = []
        try:
            for node, cluster, cid, other, oid, ca, td in (
                (na, "cluster-a", 1, "cluster-b", 2, shared_ca, "l7gate.local"),
                (nb, "cluster-b", 2, "cluster-a", 1, shared_ca, "l7gate.local"),
                (nc, "cluster-b", 2, "cluster-a", 1, tb.workdir / "rogue-ca", "rogue.example"),
            ):
                agent = make_agent(tb, node, cluster, cid, other, oid, node.link_ifnames)
                with_mtls(agent, node, ca, td)
                agents.append(agent)
            for agent in agents:
                agent.start(tb)
                agent.client.apply_endpoints(tb.to_manifests())
                agent.client.apply_policies(auth_policies())
            yield {"tb": tb, "a": agents[0], "b": agents[1], "c": agents[2], "billing": billing,
                   "fe": fe, "rogue": fe_rogue, "ca": shared_ca}
        finally:
            stop_agents(*agents)


def test_first_request_succeeds_proactive_handshake(world: dict[str, Any]) -> None:
    fe, billing = world["fe"], world["billing"]
    # No request has been sent yet: the handshake must already be done (no dropped first request).
    eventually(lambda: any(e["expires_at"] and e["node"].startswith("10.63.2.")
                           for e in world["a"].client.get("/v1/auth")["entries"]), 10,
               "node a's proactive handshake with the frontend's node")
    status, body = fe.curl(url(billing, 8080, "/v1/charge"), "POST", data="{}")
    assert status == 200, body
    assert fe.curl(url(billing, 8080, "/v1/refund"), "POST")[0] == 403  # L7 rules still apply


def test_auth_status_lists_the_pair(world: dict[str, Any]) -> None:
    out = subprocess.run([L7GATE, "auth", "status", "--admin", f"unix:{world['a'].workdir}/admin.sock"],
                         capture_output=True, text=True, check=True).stdout
    assert "LOCAL" in out and "65536" in out and "131072" in out and "10.63.2.1:4250" in out


def test_peer_from_another_trust_domain_is_refused_and_the_flow_says_why(world: dict[str, Any]) -> None:
    rogue, billing = world["rogue"], world["billing"]
    assert rogue.curl(url(billing, 8080, "/v1/charge"), "POST", timeout=2)[0] == 0  # dropped in the kernel
    # the failed handshake is recorded by the auth manager's thread: poll for it
    def rogue_rows_failed() -> bool:
        entries = world["a"].client.get("/v1/auth")["entries"]
        rogue_rows = [e for e in entries if e["node"].startswith("10.63.3.")]
        assert rogue_rows and all(e["last_error"] for e in rogue_rows), entries
        return True

    eventually(rogue_rows_failed, 10, "node a's failed handshakes with the rogue node")

    # the drop's flow is published shortly after the drop: poll for it
    def the_drop_is_a_flow() -> bool:
        out = subprocess.run(
            [L7GATE, "observe", "--verdict", "DROPPED", "--last", "50", "-o", "json",
             "--admin", f"unix:{world['a'].workdir}/admin.sock"], capture_output=True, text=True, check=True).stdout
        flows = [json.loads(line) for line in out.splitlines() if line.strip()]
        flows = [f.get("flow", f) for f in flows]
        assert any(f["drop_reason_desc"] == "Authentication required"
                   and f["source"].get("pod_name") == "frontend-service-zzz" for f in flows), flows
        return True

    eventually(the_drop_is_a_flow, 10, "the rogue's drop in `l7gate observe`")


def test_keys_are_never_group_or_world_readable(world: dict[str, Any]) -> None:
    found = 0
    for root in (world["ca"], *(a.workdir / "state" / "mtls" for a in (world["a"], world["b"]))):
        for path in Path(root).rglob("*"):
            if path.is_file() and (path.name.endswith(".key") or path.suffix == ".pem"):
                mode = stat.S_IMODE(os.stat(path).st_mode)
                assert mode & 0o077 == 0, f"{path} is mode {mode:o}"
                found += 1
    assert found >= 3
