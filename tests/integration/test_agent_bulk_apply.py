"""Thousands of policies in one apply through the admin API (issue 11), with a real Envoy.

12,310 policies in one request took the agent minutes, `policy get` and `endpoint list` timed
out meanwhile, and a restart with that state took 207 s before the admin API answered. Here
5,000 policies (two local endpoints, each selected by 2,500 of them) must be applied within a
few seconds while reads keep answering from the state before the apply, be enforced by Envoy
as written, and a restarted agent must answer within a few seconds with all of them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from l7gate.client import AdminClient
from l7gate.agent.daemon import start_agent
from l7gate.testing.wait import eventually

from .loopback import World, loopback_world, pod, wait_request

pytestmark = pytest.mark.integration

S = 91  # this module's 127.91.x.x addresses
N = 5000
APPS, PEERS = 2, 20
APPLY_WITHIN = 5.0  # s, through the admin API (~1.5 s here; ~11 s when each policy was resolved alone)
READ_WITHIN = 1.0  # s, for a read while the apply is under way (they waited for the whole apply)
RESTART_WITHIN = 4.0  # s, agent start to the admin API answering with every policy (~10 s before)
SEED_POLICIES = 2  # loopback_world's


def api_ip(a: int) -> str:
    return f"127.{S}.3.{10 + a}"


def client_ip(c: int) -> str:
    return f"127.{S}.4.{10 + c}"


def pods() -> list[dict[str, Any]]:
    return [
        *(pod(f"api{a}", "shop", api_ip(a), {"app": f"api{a}"}, "cluster-a", (8080,)) for a in range(APPS)),
        *(pod(f"client{c}", "shop", client_ip(c), {"app": f"client{c}"}, "cluster-b") for c in range(PEERS)),
    ]


def policy(j: int) -> dict[str, Any]:
    """Policy j lets client j%20 GET /api/j/items/<n> on api j%2."""
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"bulk-{j}", "namespace": "shop"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": f"api{j % APPS}"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": f"client{j % PEERS}"}}],
                "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                             "rules": {"http": [{"method": "GET", "path": f"/api/{j}/items/[0-9]+"}]}}],
            }],
        },
    }


class Reader(threading.Thread):
    """`endpoint list`, `policy get` and `status`, over and over, each timed."""

    def __init__(self, client: AdminClient) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stop = threading.Event()
        self.reads: list[tuple[str, float]] = []
        self.policy_counts: set[int] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in ("/v1/endpoints", "/v1/status", "/v1/policy"):
                t0 = time.monotonic()
                body = self.client.get(path)
                self.reads.append((path, time.monotonic() - t0))
                if path == "/v1/status":
                    self.policy_counts.add(body["policies"])
            time.sleep(0.05)


def check_enforced() -> None:
    """What the policies say, through Envoy: client c may GET /api/j/items/<n> on api j%2 for
    every j = c (mod 20), nothing else."""
    cases = [
        (client_ip(3), api_ip(1), "GET", "/api/3/items/42", 200),
        (client_ip(3), api_ip(1), "GET", "/api/4983/items/7", 200),
        (client_ip(19), api_ip(1), "GET", f"/api/{N - 1}/items/0", 200),  # the request's last policy
        (client_ip(4), api_ip(0), "GET", "/api/4/items/9", 200),
        (client_ip(3), api_ip(1), "GET", "/api/5/items/42", 403),  # client 5's path
        (client_ip(3), api_ip(1), "POST", "/api/3/items/42", 403),
        (client_ip(3), api_ip(0), "GET", "/api/3/items/42", 403),  # no policy of api0 names client 3
        (f"127.{S}.9.9", api_ip(1), "GET", "/api/3/items/42", 403),  # world
    ]
    got = [(src, dst, method, path, wait_request(src, dst, method, path, want, timeout=10))
           for src, dst, method, path, want in cases]
    assert got == cases


def test_thousands_of_policies_applied_enforced_and_restored(tmp_path: Path, require_envoy: None) -> None:
    with loopback_world(tmp_path, S) as world:
        for a in range(APPS):
            world.serve(api_ip(a), 8080, f"api{a}")
        client = AdminClient(world.agent.admin.address, timeout=300)
        client.apply_endpoints(pods())
        world.synced()
        docs = [policy(j) for j in range(N)]
        reader = Reader(AdminClient(world.agent.admin.address, timeout=300))
        reader.start()
        try:
            eventually(lambda: len(reader.reads) >= 3, 30, "a round of reads before the apply")
            t0 = time.monotonic()
            result = client.apply_policies(docs)
            took = time.monotonic() - t0
            applied_at = len(reader.reads)
            eventually(lambda: len(reader.reads) >= applied_at + 3, 60, "a round of reads after the apply")
        finally:
            reader.stop.set()
            reader.join(60)
        assert len(result["created"]) == N
        assert took <= APPLY_WITHIN, f"{N} policies took {took:.1f} s (agent: {result.get('timing')})"
        slowest = max(reader.reads, key=lambda r: r[1])
        assert slowest[1] <= READ_WITHIN, f"{slowest[0]} took {slowest[1]:.1f} s during the apply"
        # Reads saw the state before the apply, then all of it: never a part.
        assert reader.policy_counts == {SEED_POLICIES, SEED_POLICIES + N}
        world.synced(timeout=60)
        check_enforced()

    # The same state directory: the restarted agent restores every policy from the kvstore.
    t0 = time.monotonic()
    agent = start_agent(world.agent.config)
    again = World(agent, tmp_path)
    try:
        status = AdminClient(agent.admin.address).get("/v1/status")
        took = time.monotonic() - t0
        assert took <= RESTART_WITHIN, f"the restarted agent answered after {took:.1f} s"
        assert status["policies"] == SEED_POLICIES + N
        assert agent.envoy is not None
        agent.envoy.wait_ready(30)
        for a in range(APPS):
            again.serve(api_ip(a), 8080, f"api{a}")
        again.synced(timeout=60)
        check_enforced()
    finally:
        for srv in again.servers:
            srv.shutdown()
            srv.server_close()
        agent.stop()
