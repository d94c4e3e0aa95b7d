"""gRPC through the kernel datapath on the netns testbed: a real grpcio server in the billing pod
(node a1, cluster-a) and real grpcio clients in pods on other nodes (cluster-b), each pod in its
own network namespace, each node with its agent, BPF programs and Envoy.

- port 9091: HTTP rules on the gRPC methods, no authentication: the kernel redirects the
  connection to node a1's Envoy, which judges each call;
- port 9090: the same rules with `authentication: required` and encryption in transit: node b1's
  Envoy carries each call to node a1's Envoy over the mTLS tunnel (HTTP/2), which hands it to
  the pod as h2c; node c1's agent does not encrypt, so its plaintext is refused in the kernel.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from l7gate.testing.testbed import Pod, Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, AgentProc, make_agent, stop_agents
from .test_mtls_tunnel import TD, flows, with_mtls

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]

PLAIN, TUNNELLED = 9091, 9090
OTHER_LABELS = {"app": "reporting-job", "team": "web", "env": "prod"}

SERVER = """
import sys, time
from concurrent import futures
import grpc
ident = lambda b: b
def charge(req, ctx): return b"charged " + req
def refund(req, ctx): return b"refunded " + req
def watch(req, ctx):
    n = 0
    while ctx.is_active() and n < 50:
        n += 1
        yield b"tick %d" % n
        time.sleep(0.02)
srv = grpc.server(futures.ThreadPoolExecutor(8))
srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("billing.Billing", {
    "Charge": grpc.unary_unary_rpc_method_handler(charge, request_deserializer=ident, response_serializer=ident),
    "Refund": grpc.unary_unary_rpc_method_handler(refund, request_deserializer=ident, response_serializer=ident),
    "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=ident, response_serializer=ident),
})])
for port in sys.argv[2:]:
    srv.add_insecure_port(f"{sys.argv[1]}:{port}")
srv.start()
print("serving", flush=True)
srv.wait_for_termination()
"""
CLIENT = """
import sys
import grpc
ident = lambda b: b
target, method = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as ch:
    try:
        if method == "Watch":
            got = list(ch.unary_stream("/billing.Billing/Watch", request_serializer=ident,
                                       response_deserializer=ident)(b"", timeout=8))
            print("OK", len(got), got[-1].decode())
        else:
            out = ch.unary_unary(f"/billing.Billing/{method}", request_serializer=ident,
                                 response_deserializer=ident)(b"100", timeout=4)
            print("OK", out.decode())
    except grpc.RpcError as e:
        print("ERR", e.code().name, e.details())
"""


def grpc_policy(port: int, auth: bool) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "fromEndpoints": [{"matchLabels": FRONTEND_LABELS}],
        "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}], "rules": {"http": [
            {"method": "POST", "path": "/billing.Billing/Charge"},
            {"method": "POST", "path": "/billing.Billing/Watch"},
        ]}}],
    }
    if auth:
        rule["authentication"] = {"mode": "required"}
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": f"billing-grpc-{port}"},
            "spec": {"endpointSelector": {"matchLabels": BILLING_LABELS}, "ingress": [rule]}}


@dataclass
class World:
    tb: Testbed
    a: AgentProc
    billing: Pod
    fe: Pod  # node b1: encrypts
    plain: Pod  # node c1: same labels, does not encrypt
    other: Pod  # node c1: no rule names it


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.67.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.67.2.0/24")
        nc = tb.add_node("c1", cluster="cluster-b", node_cidr="10.67.3.0/24")
        for n in (nb, nc):
            tb.link(na, n)
        billing = tb.add_pod(na, "payments", "billing-service-xyz", labels=BILLING_LABELS, ports=[TUNNELLED, PLAIN])
        fe = tb.add_pod(nb, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        plain = tb.add_pod(nc, "web", "frontend-service-pln", labels=FRONTEND_LABELS)
        other = tb.add_pod(nc, "web", "reporting-job-q7x", labels=OTHER_LABELS)
        server = billing.spawn([sys.executable, "-c", SERVER, billing.ip, str(TUNNELLED), str(PLAIN)])
        log = tb.log_path(server)
        eventually(lambda: "serving" in log.read_text(errors="replace") or server.poll() is not None, 15,
                   "the gRPC server in the billing pod to serve")
        assert server.poll() is None, log.read_text(errors="replace")
        shared = tb.workdir / "shared-ca"
        agents: list[AgentProc] = []
        try:
            for node, cluster, cid, other_cluster, oid, enc in (
                (na, "cluster-a", 1, "cluster-b", 2, "tunnel"),
                (nb, "cluster-b", 2, "cluster-a", 1, "tunnel"),
                (nc, "cluster-b", 2, "cluster-a", 1, "none"),
            ):
                agent = make_agent(tb, node, cluster, cid, other_cluster, oid, node.link_ifnames)
                with_mtls(agent, node, shared, TD, enc)
                agents.append(agent)
            for agent in agents:
                agent.start(tb)
                agent.client.apply_endpoints(tb.to_manifests())
                agent.client.apply_policies([grpc_policy(PLAIN, auth=False), grpc_policy(TUNNELLED, auth=True)])
            yield World(tb, agents[0], billing, fe, plain, other)
        finally:
            stop_agents(*agents)


def call(pod: Pod, target: Pod, port: int, method: str) -> str:
    r = pod.run([sys.executable, "-c", CLIENT, f"{target.ip}:{port}", method], timeout=30)
    return str(r.stdout).strip() or f"FAILED {r.stderr[-300:]}"


def until(pod: Pod, target: Pod, port: int, method: str, want: str, timeout: float = 30.0) -> str:
    """The answer once it starts with `want` (the agents configure Envoy and the tunnel a moment
    after the policy arrives); fails with the last answer after `timeout`."""

    def answered() -> str:
        got = call(pod, target, port, method)
        assert got.startswith(want), got
        return got

    return eventually(answered, timeout, f"{method} from {pod.name} to {target.name}:{port} to answer {want}")


def test_grpc_through_the_kernel_redirect(world: World) -> None:
    """Port 9091 (no auth): the connection is redirected to node a1's Envoy, which judges calls."""
    assert until(world.fe, world.billing, PLAIN, "Charge", "OK") == "OK charged 100"
    got = call(world.fe, world.billing, PLAIN, "Refund")
    assert got.startswith("ERR PERMISSION_DENIED RBAC: access denied"), got
    stream = call(world.fe, world.billing, PLAIN, "Watch")
    assert stream == "OK 50 tick 50", stream
    # The pod no rule names is dropped in the kernel: no call gets through. The control: from the
    # same node (c1), the pod the rule names is answered.
    assert until(world.plain, world.billing, PLAIN, "Charge", "OK") == "OK charged 100"
    dropped = call(world.other, world.billing, PLAIN, "Charge")
    assert dropped.split()[0:2] in (["ERR", "UNAVAILABLE"], ["ERR", "DEADLINE_EXCEEDED"]), dropped


def test_grpc_across_nodes_through_the_mtls_tunnel(world: World) -> None:
    """Port 9090 (auth required): each call goes Envoy to Envoy over mTLS, reaches the pod as
    h2c; the node that does not encrypt is refused in the kernel."""
    assert until(world.fe, world.billing, TUNNELLED, "Charge", "OK") == "OK charged 100"
    got = call(world.fe, world.billing, TUNNELLED, "Refund")
    assert got.startswith("ERR PERMISSION_DENIED RBAC: access denied"), got
    assert call(world.fe, world.billing, TUNNELLED, "Watch") == "OK 50 tick 50"
    refused = call(world.plain, world.billing, TUNNELLED, "Charge")
    assert refused.split()[0:2] in (["ERR", "UNAVAILABLE"], ["ERR", "DEADLINE_EXCEEDED"]), refused
    # The control: the same pod's call to the port without authentication is answered, so the
    # refusal above is for the plaintext, not a path from node c1 that carries nothing.
    assert until(world.plain, world.billing, PLAIN, "Charge", "OK") == "OK charged 100"
    # Node a1's flows name the gRPC method and the caller from its certificate.
    def charged() -> list[dict[str, Any]]:
        all_flows = flows(world.a)
        got = [f for f in all_flows if "/billing.Billing/Charge" in str(f.get("l7", {}))
               and f.get("verdict") == "FORWARDED"]
        assert got, all_flows[-5:]
        return got

    seen = eventually(charged, 10, "node a1's flow of the Charge call")
    assert any(f.get("source", {}).get("pod_name") == "frontend-service-abc" for f in seen), seen[-1]
