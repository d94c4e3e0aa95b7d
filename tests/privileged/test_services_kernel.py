"""Services in kernel mode: a pod calls a Service by name, the socket load balancer picks a
backend pod at connect(), and every path after that (the kernel's L3/L4 verdict, Envoy's HTTP
rules, flows) sees the real backend. One cluster, two nodes, an agent on each; the pods of each
node run in the node's cgroup, where its agent attaches the load balancer."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import CGROUP_ROOT, Pod, Testbed
from l7gate.testing.wait import eventually
from tests.conftest import unavailable

from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, AgentProc, make_agent, seed_policies, stop_agents
from .test_mtls_tunnel import flows, flows_where

pytestmark = [pytest.mark.privileged("netns, bcc, cgroup v2 socket programs"), pytest.mark.integration]

VIP = "10.96.0.10"
NAME = "billing-service.payments.svc.cluster.local"
UDP_PORT = 5353

# UDP: the billing pods' echo servers answer with their own name; the frontend may send to them.
UDP_POLICY: dict[str, Any] = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
    "metadata": {"name": "allow-frontend-udp-echo"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "billing-service"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend-service"}}],
                          "toPorts": [{"ports": [{"port": str(UDP_PORT), "protocol": "UDP"}]}]}]},
}

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("serving", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(sys.argv[3].encode(), peer)
""")

# Runs in the frontend: what the application sees of a ClusterIP.
PEER_CHECK = textwrap.dedent("""
    import json, socket, sys
    vip, port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t = socket.create_connection((socket.gethostbyname(sys.argv[4]), port), timeout=5)
    tcp_peer = t.getpeername()
    t.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(b"ping", (vip, udp_port))
    answer, source = u.recvfrom(2048)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(5)
    c.connect((vip, udp_port))
    c.send(b"ping")
    connected_answer = c.recv(2048)
    print(json.dumps({"tcp_peer": list(tcp_peer), "udp_source": list(source), "udp_answer": answer.decode(),
                      "connected_peer": list(c.getpeername()), "connected_answer": connected_answer.decode()}))
""")


@dataclass
class World:
    tb: Testbed
    agents: tuple[AgentProc, AgentProc]
    billing: tuple[Pod, Pod]
    frontend: Pod
    other: Pod


def apply_everywhere(world_agents: tuple[AgentProc, ...], objects: list[dict[str, Any]]) -> None:
    for agent in world_agents:
        agent.client.apply_endpoints(objects)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        unavailable(f"no cgroup v2 at {CGROUP_ROOT}")
    with Testbed() as tb:
        n1 = tb.add_node("a1", cluster="cluster-a", node_cidr="10.71.1.0/24", cgroup=True)
        n2 = tb.add_node("a2", cluster="cluster-a", node_cidr="10.71.2.0/24", cgroup=True)
        tb.link(n1, n2)
        b1 = tb.add_pod(n1, "payments", "billing-service-1", labels=BILLING_LABELS, ports=[8080])
        b2 = tb.add_pod(n2, "payments", "billing-service-2", labels=BILLING_LABELS, ports=[8080])
        fe = tb.add_pod(n2, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        other = tb.add_pod(n2, "web", "reporting-job-q7x", labels={"app": "reporting-job", "team": "web"})
        tb.add_service("payments", "billing-service", VIP,
                       [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080},
                        {"name": "echo", "port": UDP_PORT, "protocol": "UDP", "targetPort": UDP_PORT}],
                       selector={"app": "billing-service"}, cluster="cluster-a")
        for pod in (b1, b2):
            pod.serve_http(8080)
            echo = pod.spawn(["python3", "-c", UDP_ECHO, pod.ip, str(UDP_PORT), pod.name])
            eventually(lambda: "serving" in tb.log_path(echo).read_text(), 10, f"{pod.name}'s UDP echo")
        agents = (make_agent(tb, n1, "cluster-a", 1, "cluster-b", 2, n1.link_ifnames),
                  make_agent(tb, n2, "cluster-a", 1, "cluster-b", 2, n2.link_ifnames))
        try:
            for agent, node in zip(agents, (n1, n2)):
                cfg = yaml.safe_load(agent.config.read_text())
                cfg["datapath"]["cgroup"] = str(node.cgroup)
                agent.config.write_text(yaml.safe_dump(cfg))
                agent.start(tb)
                agent.client.apply_endpoints(tb.to_manifests("cluster-a"))
                agent.client.apply_policies([*seed_policies(), UDP_POLICY])
                agent.synced()
            yield World(tb, agents, (b1, b2), fe, other)
        finally:
            stop_agents(*agents)


def answered_by(pod: Pod, n: int, method: str = "POST", path: str = "/v1/charge") -> Counter[str]:
    """Who answered each of `n` requests (curl, by the Service's name), by pod name; "status N"
    for anything but a 200 (0: no HTTP answer)."""
    got: Counter[str] = Counter()
    for _ in range(n):
        status, body = pod.curl(f"http://{NAME}:8080{path}", method, data='{"amount": 100}', timeout=5)
        got[json.loads(body)["pod"] if status == 200 else f"status {status}"] += 1
    return got


def test_status_and_service_list_say_clusterips_are_served(world: World) -> None:
    for agent in world.agents:
        st = agent.status()
        assert st["services"]["datapath"].startswith("served: the kernel's socket load balancer"), st["services"]
        data = agent.client.get("/v1/services")
        (svc,) = data["services"]
        http = next(f for f in svc["frontends"] if f["frontend"] == f"{VIP}:8080/TCP")
        assert sorted(b["pod"] for b in http["backends"]) == [
            "cluster-a/payments/billing-service-1", "cluster-a/payments/billing-service-2"]


def test_the_service_name_balances_over_both_billing_pods(world: World) -> None:
    got = answered_by(world.frontend, 200)
    assert sum(got.values()) == 200 and set(got) == {"payments/billing-service-1", "payments/billing-service-2"}, got
    assert min(got.values()) >= 50, f"each backend should answer at least 25% of 200: {got}"


def test_http_rules_apply_to_the_backend_behind_the_service(world: World) -> None:
    got = answered_by(world.frontend, 20, method="GET", path="/v1/transactions")
    assert got == Counter({"status 403": 20}), got


def kernel_drop(agents: Sequence[AgentProc], source: Pod, backends: Sequence[Pod], what: str) -> dict[str, Any]:
    """The first kernel drop flow, at any of `agents`, from `source` to one of `backends` (waited
    for: a flow is published after the drop)."""
    ips = {p.ip for p in backends}

    def dropped() -> list[dict[str, Any]]:
        got = [f for agent in agents
               for f in flows(agent, "--from-pod", source.ref, "--type", "drop")
               if f["IP"]["destination"] in ips]
        assert got, "no drop flow yet"
        return got

    first: dict[str, Any] = eventually(dropped, 15, what)[0]
    return first


def test_a_pod_the_policy_does_not_allow_is_dropped_through_the_service(world: World) -> None:
    status, err = world.other.curl(f"http://{NAME}:8080/v1/charge", "POST", data="{}", timeout=2)
    assert status == 0, (status, err)
    # The kernel judged the backend pod, not the ClusterIP: a policy drop towards a billing pod,
    # at the node of whichever backend the load balancer chose.
    drop = kernel_drop(world.agents, world.other, world.billing, "a kernel drop from reporting-job to a billing pod")
    assert drop["drop_reason_desc"] == "Policy denied", drop
    assert drop["destination_service"] == {"name": "billing-service", "namespace": "payments"}, drop


def test_the_application_sees_the_clusterip_and_udp_works(world: World) -> None:
    out = world.frontend.run(["python3", "-c", PEER_CHECK, VIP, "8080", str(UDP_PORT), NAME])
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["tcp_peer"] == [VIP, 8080]
    assert seen["udp_source"] == [VIP, UDP_PORT] and seen["udp_answer"] in ("billing-service-1", "billing-service-2")
    assert seen["connected_peer"] == [VIP, UDP_PORT]
    assert seen["connected_answer"] in ("billing-service-1", "billing-service-2")


def test_a_process_outside_the_pods_cgroup_is_not_translated(world: World) -> None:
    out = world.frontend.run(["curl", "-sS", "--noproxy", "*", "--max-time", "2", f"http://{VIP}:8080/"],
                             cgroup=CGROUP_ROOT)
    assert out.returncode != 0, out.stdout


def test_flows_name_the_service(world: World) -> None:
    answered_by(world.frontend, 4)
    svc = {"name": "billing-service", "namespace": "payments"}
    got = flows_where(world.agents[0], lambda f: f.get("destination_service") == svc,
                      "an L7 flow at a billing pod's node naming destination_service billing-service",
                      "--to-pod", world.billing[0].ref, "--type", "l7")
    assert got[0]["destination"]["pod_name"] == "billing-service-1", got[0]


def test_a_deleted_backend_is_never_chosen_again(world: World) -> None:
    gone = world.billing[1]
    for agent in world.agents:
        agent.client.delete_endpoint(gone.ref)
    try:
        got = answered_by(world.frontend, 60)
        assert got == Counter({"payments/billing-service-1": 60}), got
        data = world.agents[1].client.get("/v1/services")
        http = next(f for f in data["services"][0]["frontends"] if f["frontend"] == f"{VIP}:8080/TCP")
        assert [b["pod"] for b in http["backends"]] == ["cluster-a/payments/billing-service-1"]
    finally:
        apply_everywhere(world.agents, [gone.manifest()])
    eventually(lambda: len(answered_by(world.frontend, 20)) == 2, 20, "the backend back in the rotation")
