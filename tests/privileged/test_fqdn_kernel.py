"""`toFQDNs` and `rules.dns` end to end, in kernel mode: a pod's DNS queries go through the node's
DNS proxy, which refuses the names its policy does not allow and teaches the agent the addresses
of the others before the pod gets them; the kernel then lets the pod reach those addresses, and
only those, for as long as their TTL.

Topology (the testbed; nothing simulated but "the internet"): node a1 runs an agent (kernel
mode) with the pod `web/client` and the cluster resolver `kube-system/coredns` (Debian's dnsmasq
on its pod address, port 53). Node `inet` has no agent: its pods stand for the internet (HTTP
servers on port 443, plain HTTP); the agent knows nothing of them, so their addresses are
`world` until DNS teaches otherwise. dnsmasq serves:

    api.example.test      → api      (TTL 60)      allowed by toFQDNs matchName
    b.svc.example.test    → svc-b    (TTL 60)      allowed by toFQDNs matchPattern *.svc.example.test
    c.svc.example.test    → svc-c    (TTL 60)      (queried over TCP)
    ttl.svc.example.test  → svc-ttl  (TTL 3)       expires
    other.example.test    → other    (TTL 60)      resolvable, no toFQDNs selector matches it
    evil.test             → api                    outside the DNS rules' pattern: REFUSED
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.testing.wait import eventually

from ..integration.test_dnsproxy import require_dnsmasq, wait_answering
from .test_kernel_datapath import L7GATE, AgentProc, stop_agents

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc, policy routing"), pytest.mark.integration]

DNSMASQ = "/usr/sbin/dnsmasq"

POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "client-egress", "namespace": "web"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "client"}},
        "egress": [
            {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                              "k8s:k8s-app": "kube-dns"}}],
             "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                          # `*` stays within one label: b.svc.example.test needs its own pattern
                          "rules": {"dns": [{"matchPattern": "*.example.test"},
                                            {"matchPattern": "*.svc.example.test"}]}}]},
            {"toFQDNs": [{"matchName": "api.example.test"}, {"matchPattern": "*.svc.example.test"}],
             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        ],
    },
}

QUERY = r"""
import sys, dns.message, dns.query, dns.rcode
server, name, proto = sys.argv[1], sys.argv[2], sys.argv[3]
q = dns.message.make_query(name, "A")
r = (dns.query.tcp if proto == "tcp" else dns.query.udp)(q, server, timeout=5)
ips = sorted(rr.address for rrset in r.answer for rr in rrset if rrset.rdtype == 1)
ttl = min((rrset.ttl for rrset in r.answer), default=0)
print(dns.rcode.to_text(r.rcode()), ",".join(ips), ttl, sep="|")
"""

# One connection that asks twice, `wait` seconds apart: what an established connection sees.
KEEPALIVE = r"""
import socket, sys, time
ip, wait = sys.argv[1], float(sys.argv[2])
s = socket.create_connection((ip, 443), timeout=5)
def ask():
    s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, _, rest = buf.partition(b"\r\n\r\n")
    n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < n:
        rest += s.recv(4096)
    return head.split(b" ")[1].decode()
print(ask(), flush=True)
time.sleep(wait)
print(ask(), flush=True)
"""


@dataclass
class World:
    tb: Testbed
    agent: AgentProc
    client: Pod
    coredns: Pod
    inet: dict[str, Pod]


def dnsmasq_argv(ip: str, pid: str, inet: dict[str, Pod]) -> list[str]:
    return [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
            f"--listen-address={ip}", "--bind-interfaces", "--port=53", f"--pid-file={pid}", "--log-facility=-",
            "--log-queries", "--local-ttl=60", "--local=/example.test/", "--local=/test/",
            f"--host-record=api.example.test,{inet['api'].ip},60",
            f"--host-record=b.svc.example.test,{inet['svc-b'].ip},60",
            f"--host-record=c.svc.example.test,{inet['svc-c'].ip},60",
            f"--host-record=ttl.svc.example.test,{inet['svc-ttl'].ip},3",
            f"--host-record=other.example.test,{inet['other'].ip},60",
            f"--host-record=evil.test,{inet['api'].ip},60"]


def make_agent(tb: Testbed, node: Node) -> AgentProc:
    work = tb.workdir / f"agent-{node.name}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": node.name, "cluster": {"name": "cluster-a", "id": 1},
        "stateDir": str(work / "state"), "admin": {"listen": f"unix:{work}/admin.sock"},
        "envoy": {"logLevel": "warning"},
        "datapath": {"mode": "kernel", "pinDir": f"/sys/fs/bpf/l7g/{node.netns}", "links": node.link_ifnames},
        "dns": {"minTTL": 0},
    }))
    from l7gate.client import AdminClient

    return AgentProc(node, work, cfg, AdminClient(f"unix:{work}/admin.sock"))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_dnsmasq()
    with Testbed() as tb:
        a1 = tb.add_node("a1", cluster="cluster-a", node_cidr="10.64.1.0/24")
        net = tb.add_node("inet", cluster="internet", node_cidr="10.64.9.0/24")
        tb.link(a1, net)
        client = tb.add_pod(a1, "web", "client", labels={"app": "client"})
        coredns = tb.add_pod(a1, "kube-system", "coredns", labels={"k8s-app": "kube-dns"})
        inet = {name: tb.add_pod(net, "internet", name) for name in ("api", "svc-b", "svc-c", "svc-ttl", "other")}
        for pod in inet.values():
            pod.serve_http(443)
        proc = coredns.spawn(dnsmasq_argv(coredns.ip, str(tb.workdir / "dnsmasq.pid"), inet))
        with coredns.entered():
            wait_answering(coredns.ip, 53, proc, tb.log_path(proc))
        agent = make_agent(tb, a1)
        try:
            agent.start(tb)
            agent.client.apply_endpoints(tb.to_manifests("cluster-a"))
            agent.client.apply_policies([POLICY])
            agent.synced()
            yield World(tb, agent, client, coredns, inet)
        finally:
            stop_agents(agent)


def query(w: World, name: str, proto: str = "udp") -> tuple[str, list[str], int]:
    r = w.client.run([sys.executable, "-c", QUERY, w.coredns.ip, name, proto], timeout=30)
    if r.returncode != 0:
        return "TIMEOUT" if "Timeout" in r.stderr else f"ERROR {r.stderr.strip()[-200:]}", [], 0
    rcode, ips, ttl = r.stdout.strip().split("|")
    return rcode, [i for i in ips.split(",") if i], int(ttl)


def get(w: World, pod: str, timeout: float = 2.0) -> int:
    return w.client.curl(f"http://{w.inet[pod].ip}:443/x", timeout=timeout)[0]


def fqdn_cache(w: World) -> list[dict[str, Any]]:
    out = subprocess.run([L7GATE, "fqdn", "cache", "list", "-o", "json", "--admin", f"unix:{w.agent.workdir}/admin.sock"],
                         capture_output=True, text=True, check=True).stdout
    return list(json.loads(out)["entries"])


def test_an_allowed_name_resolves_and_the_first_connection_succeeds(world: World) -> None:
    assert get(world, "api", timeout=1) == 0  # world's, before any lookup
    rcode, ips, _ = query(world, "api.example.test")
    assert (rcode, ips) == ("NOERROR", [world.inet["api"].ip])
    assert get(world, "api") == 200  # the first connection after the answer: no retry
    rows = [r for r in fqdn_cache(world) if r["name"] == "api.example.test."]
    assert [(r["ip"], r["sources"]) for r in rows] == [(world.inet["api"].ip, ["cluster-a/web/client"])]
    assert rows[0]["identity"] is not None and rows[0]["identity"] >= 1 << 24


def test_a_name_outside_the_pattern_is_refused_and_opens_nothing(world: World) -> None:
    assert query(world, "evil.test")[0] == "REFUSED"
    assert not [r for r in fqdn_cache(world) if r["name"] == "evil.test."]
    # a resolvable name no toFQDNs selector matches: answered, its address stays world's
    rcode, ips, _ = query(world, "other.example.test")
    assert (rcode, ips) == ("NOERROR", [world.inet["other"].ip])
    assert get(world, "other", timeout=1) == 0


def test_an_address_reached_without_a_lookup_is_dropped_until_looked_up(world: World) -> None:
    assert get(world, "svc-b", timeout=1) == 0
    assert query(world, "b.svc.example.test")[:2] == ("NOERROR", [world.inet["svc-b"].ip])  # matchPattern
    assert get(world, "svc-b") == 200


def test_dns_over_tcp(world: World) -> None:
    assert get(world, "svc-c", timeout=1) == 0
    assert query(world, "c.svc.example.test", "tcp")[:2] == ("NOERROR", [world.inet["svc-c"].ip])
    assert get(world, "svc-c") == 200


def test_ttl_expiry_drops_new_connections_and_keeps_established_ones(world: World) -> None:
    rcode, ips, ttl = query(world, "ttl.svc.example.test")
    assert (rcode, ips, ttl) == ("NOERROR", [world.inet["svc-ttl"].ip], 3)
    held = world.client.spawn([sys.executable, "-u", "-c", KEEPALIVE, world.inet["svc-ttl"].ip, "7"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout is not None
        assert held.stdout.readline().strip() == "200"  # opened while the name was live
        eventually(lambda: not [r for r in fqdn_cache(world) if r["name"] == "ttl.svc.example.test."], 10,
                   "the 3 s TTL to expire")
        assert get(world, "svc-ttl", timeout=1) == 0  # new connections: dropped
        assert held.stdout.readline().strip() == "200"  # the established one: kept
    finally:
        held.wait(timeout=20)


def test_dns_queries_and_answers_are_flows(world: World) -> None:
    query(world, "api.example.test")
    query(world, "evil.test")

    def seen() -> list[dict[str, Any]]:
        out = subprocess.run([L7GATE, "observe", "--type", "l7", "--last", "200", "-o", "json",
                              "--admin", f"unix:{world.agent.workdir}/admin.sock"],
                             capture_output=True, text=True, check=True).stdout
        flows = [json.loads(line).get("flow", json.loads(line)) for line in out.splitlines() if line.strip()]
        dns = [(f["verdict"], f["l7"]["type"], f["l7"]["dns"]["query"], f["l7"]["dns"].get("rcode", 0),
                tuple(f["l7"]["dns"].get("ips", ()))) for f in flows if f.get("l7", {}).get("dns")]
        assert ("FORWARDED", "REQUEST", "api.example.test.", 0, ()) in dns, dns
        assert ("FORWARDED", "RESPONSE", "api.example.test.", 0, (world.inet["api"].ip,)) in dns, dns
        assert ("DROPPED", "REQUEST", "evil.test.", 5, ()) in dns, dns
        return dns

    eventually(seen, 10, "the DNS flows in `l7gate observe`")


def test_learned_addresses_stay_allowed_across_an_agent_restart(world: World) -> None:
    assert query(world, "api.example.test")[0] == "NOERROR"
    assert get(world, "api") == 200
    a = world.agent
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert get(world, "api") == 200  # the kernel's maps outlive the agent
    a.start(world.tb)
    a.synced()
    # No new lookup: the learned address came back from the store.
    rows = [r for r in fqdn_cache(world) if r["name"] == "api.example.test."]
    assert rows and rows[0]["identity"] is not None, rows
    assert get(world, "api") == 200
    assert get(world, "other", timeout=1) == 0


def test_to_fqdns_with_http_rules_goes_through_the_egress_proxy(world: World) -> None:
    """toFQDNs and HTTP rules on one port: the learned address is a destination of the egress
    listener's matcher (docs/egress-http.md); GET /x is let through, anything else gets 403 from
    this node's Envoy."""
    policy = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "client-fqdn-http", "namespace": "web"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                 "egress": [{"toFQDNs": [{"matchName": "other.example.test"}],
                             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}],
                                          "rules": {"http": [{"method": "GET", "path": "/x"}]}}]}]},
    }
    world.agent.client.apply_policies([policy])
    try:
        world.agent.synced()
        assert query(world, "other.example.test")[:2] == ("NOERROR", [world.inet["other"].ip])
        url = f"http://{world.inet['other'].ip}:443"
        status, body = world.client.curl(url + "/x")
        assert status == 200 and json.loads(body)["peer"] == world.client.ip, body
        assert world.client.curl(url + "/y")[0] == 403
        assert world.client.curl(url + "/x", method="POST")[0] == 403
    finally:
        world.agent.client.delete_policy("CiliumNetworkPolicy/web/client-fqdn-http")
