"""Socket acceleration (sockops + sk_msg): once a local pod's connection to the node's Envoy is
established, its bytes go socket to socket and no longer cross the pod's veth; the verdicts
(kernel L3/L4, Envoy L7) are unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
import yaml

from l7gate.testing.testbed import Node, Testbed
from l7gate.testing.wait import eventually
from l7gate.redirect_bpf.loader import _detach_cgroup_sockops

from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, L7GATE, make_agent, seed_policies, stop_agents, url

pytestmark = [pytest.mark.privileged("netns, bcc sockops, cgroup v2"), pytest.mark.integration]

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


def rx_bytes(node: Node, ifname: str) -> int:
    out = node.run(["ip", "-s", "-j", "link", "show", ifname]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        unavailable("no cgroup v2 at /sys/fs/cgroup/unified")
    with Testbed() as tb:
        cg = CGROUP_ROOT / f"l7g-{tb.run_id}"
        cg.mkdir()
        agent = None
        try:
            node = tb.add_node("s1", cluster="cluster-a", node_cidr="10.65.1.0/24")
            billing = tb.add_pod(node, "payments", "billing-service-xyz", labels=BILLING_LABELS, ports=[8080])
            client = tb.add_pod(node, "payments", "frontend-local", labels={**FRONTEND_LABELS})
            billing.serve_http(8080, cgroup=cg)
            agent = make_agent(tb, node, "cluster-a", 1, "cluster-b", 2, [])
            cfg = yaml.safe_load(agent.config.read_text())
            cfg["datapath"]["cgroup"] = str(cg)
            agent.config.write_text(yaml.safe_dump(cfg))
            # the agent (and so its Envoy) runs in the pods' cgroup, as the sockops program needs
            agent.proc = node.spawn([L7GATE, "agent", "--config", str(agent.config)], net_only=True, cgroup=cg)
            eventually(lambda: (agent.client.get("/v1/status")["envoy"] or {}).get("state") == "LIVE", 30,
                       "the agent in the pods' cgroup to report its Envoy LIVE")
            # the seed policy, with the client in the billing pod's own namespace allowed
            docs = seed_policies()
            agent.client.apply_endpoints(tb.to_manifests())
            agent.client.apply_policies(docs)
            agent.synced()
            yield {"tb": tb, "node": node, "agent": agent, "billing": billing, "client": client, "cg": cg}
        finally:
            _detach_cgroup_sockops(cg)
            stop_agents(agent)
            tb.close()
            try:
                cg.rmdir()
            except OSError:
                pass


def test_status_shows_acceleration(world: dict[str, Any]) -> None:
    assert world["agent"].status()["datapath"]["socket_acceleration"].startswith("on")


def test_upload_through_envoy_skips_the_veth(world: dict[str, Any]) -> None:
    node, client, billing, cg = world["node"], world["client"], world["billing"], world["cg"]
    payload = world["tb"].workdir / "payload"
    payload.write_bytes(b"x" * 8_000_000)
    before = rx_bytes(node, client.host_ifname)
    r = client.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "20",
                    "--data-binary", f"@{payload}", url(billing, 8080, "/v1/charge")], cgroup=cg)
    body, _, code = r.stdout.rpartition("\n")
    assert code == "200" and json.loads(body)["body_bytes"] == 8_000_000
    crossed = rx_bytes(node, client.host_ifname) - before
    assert crossed < 200_000, f"{crossed} bytes crossed the veth: not accelerated"
    # verdicts unchanged: L7 denial still comes from Envoy
    r = client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                    url(billing, 8080, "/v1/refund"), "-X", "POST"], cgroup=cg)
    assert r.stdout == "403"


def test_without_the_cgroup_bytes_take_the_normal_path(world: dict[str, Any]) -> None:
    node, client, billing = world["node"], world["client"], world["billing"]
    payload = world["tb"].workdir / "payload2"
    payload.write_bytes(b"y" * 2_000_000)
    before = rx_bytes(node, client.host_ifname)
    r = client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20",
                    "--data-binary", f"@{payload}", url(billing, 8080, "/v1/charge")])
    assert r.stdout == "200"
    assert rx_bytes(node, client.host_ifname) - before > 2_000_000
