"""Encryption in transit on the netns testbed: the seed policy with `authentication: {mode:
required}` between two nodes, each with its own agent, Envoy and kernel datapath. The
frontend's connection is redirected by node B's kernel to node B's Envoy, which carries it to
node A's Envoy over mTLS (TLS 1.3, the workloads' SVIDs); node A refuses the same request in
plain text. A packet capture on the inter-node link shows TLS and no plaintext."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
import yaml

from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.mtls.ca import BuiltinCA
from l7gate.identity.spiffe import spiffe_id
from l7gate.testing.mtls import forge_svid
from l7gate.testing.wait import eventually

from .test_kernel_datapath import (
    BILLING_LABELS, FRONTEND_LABELS, L7GATE, AgentProc, make_agent, seed_policies, stop_agents, url,
)
from .test_mutual_auth import auth_policies

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc, tcpdump"), pytest.mark.integration]

TD = "l7gate.local"
TUNNEL_PORT = 15443
MARKER = "l7g-secret-body-7f3a9c"


LEDGER_PORT = 9000  # a raw TCP service (not HTTP) on the billing pod
# An echo server: answers each chunk with "echo:" + the chunk.
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("serving on", sys.argv[1], sys.argv[2], flush=True)
def handle(c):
    with c:
        while data := c.recv(4096):
            c.sendall(b"echo:" + data)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
    data = sys.argv[3].encode()
    s.sendall(data)
    got = b""
    while len(got) < len(data) + 5:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    sys.stdout.write(got.decode())
"""


def serve_echo(pod: Pod, port: int) -> None:
    proc = pod.spawn([sys.executable, "-c", ECHO_SERVER, pod.ip, str(port)])
    log = pod.testbed.log_path(proc)
    eventually(lambda: "serving on" in log.read_text(errors="replace") or proc.poll() is not None, 10,
               f"the echo server in {pod.name} to listen")
    assert proc.poll() is None, log.read_text(errors="replace")


def echo(pod: Pod, ip: str, port: int, line: str) -> str:
    """What `pod` gets back for `line` from the echo service ("" when the connection fails)."""
    r = pod.run([sys.executable, "-c", ECHO_CLIENT, ip, str(port), line], timeout=15)
    return str(r.stdout) if r.returncode == 0 else ""


def dport(flow: dict[str, Any]) -> int:
    return int(flow.get("l4", {}).get("TCP", {}).get("destination_port", 0))


def tunnel_policies(auth: bool = True) -> list[dict[str, Any]]:
    """The seed policy with auth, plus an auth-required L3/L4 allow on a non-HTTP port: the
    frontend may open any TCP connection to the billing pod's ledger port (`auth=False`: the
    same rules without authentication)."""
    ledger = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "allow-frontend-to-ledger"},
        "spec": {
            "endpointSelector": {"matchLabels": BILLING_LABELS},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": FRONTEND_LABELS}],
                "toPorts": [{"ports": [{"port": str(LEDGER_PORT), "protocol": "TCP"}]}],
                "authentication": {"mode": "required"},
            }],
        },
    }
    if not auth:
        del ledger["spec"]["ingress"][0]["authentication"]  # type: ignore[index]
        return [*seed_policies(), ledger]
    return [*auth_policies(), ledger]


def with_mtls(agent: AgentProc, node: Node, ca_dir: Path, trust_domain: str = TD,
              encryption: str = "tunnel") -> None:
    cfg = yaml.safe_load(agent.config.read_text())
    cfg["mtls"] = {"enabled": True, "trustDomain": trust_domain, "caDir": str(ca_dir),
                   "svidTTL": 600, "listen": f"{node.ip}:4250", "encryption": encryption,
                   "tunnelPort": TUNNEL_PORT}
    agent.config.write_text(yaml.safe_dump(cfg))


@dataclass
class World:
    tb: Testbed
    a: AgentProc
    b: AgentProc
    c: AgentProc
    d: AgentProc
    na: Node
    nb: Node
    billing: Pod
    fe: Pod
    plain: Pod
    rogue: Pod
    ca: Path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if shutil.which("tcpdump") is None:
        unavailable("tcpdump is not installed (scripts/install.sh installs it)")
    with Testbed() as tb:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.64.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.64.2.0/24")
        nc = tb.add_node("c1", cluster="cluster-b", node_cidr="10.64.3.0/24")
        nd = tb.add_node("d1", cluster="cluster-b", node_cidr="10.64.4.0/24")
        for n in (nb, nc, nd):
            tb.link(na, n)
        billing = tb.add_pod(na, "payments", "billing-service-xyz", labels=BILLING_LABELS,
                             ports=[8080, LEDGER_PORT])
        fe = tb.add_pod(nb, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        # the same workload on a node whose agent does not encrypt: it sends plain text
        plain = tb.add_pod(nc, "web", "frontend-service-pln", labels=FRONTEND_LABELS)
        # the same workload on a node whose SVIDs come from another CA and trust domain
        rogue = tb.add_pod(nd, "web", "frontend-service-zzz", labels=FRONTEND_LABELS)
        billing.serve_http(8080)
        serve_echo(billing, LEDGER_PORT)
        shared = tb.workdir / "shared-ca"
        agents: list[AgentProc] = []
        try:
            for node, cluster, cid, other, oid, ca, td, enc in (
                (na, "cluster-a", 1, "cluster-b", 2, shared, TD, "tunnel"),
                (nb, "cluster-b", 2, "cluster-a", 1, shared, TD, "tunnel"),
                (nc, "cluster-b", 2, "cluster-a", 1, shared, TD, "none"),
                (nd, "cluster-b", 2, "cluster-a", 1, tb.workdir / "rogue-ca", "rogue.example", "tunnel"),
            ):
                agent = make_agent(tb, node, cluster, cid, other, oid, node.link_ifnames)
                with_mtls(agent, node, ca, td, enc)
                agents.append(agent)
            for agent in agents:
                agent.start(tb)
                agent.client.apply_endpoints(tb.to_manifests())
                agent.client.apply_policies(tunnel_policies())
            yield World(tb, *agents, na, nb, billing, fe, plain, rogue, shared)  # type: ignore[misc]
        finally:
            stop_agents(*agents)


@contextmanager
def link_capture(w: World, name: str) -> Iterator[Path]:
    """tcpdump (TCP) on node B's link to node A while the block runs; yields the pcap path."""
    pcap = w.tb.workdir / name
    link = next(n for n in w.nb.link_ifnames)
    proc = w.nb.spawn(["tcpdump", "-i", link, "--immediate-mode", "-U", "-n", "-s", "0", "-w", str(pcap), "tcp"],
                      stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert b"listening on" in line, line
        yield pcap
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def pcap_text(pcap: Path) -> str:
    return subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-nn"], capture_output=True, text=True).stdout


def tunnel_of(agent: AgentProc) -> dict[str, Any]:
    t: dict[str, Any] = agent.client.get("/v1/auth")["tunnel"]
    return t


def wait_ready(w: World, timeout: float = 20.0) -> None:
    """Both ends of the tunnel are configured (the proactive part: no request sent yet)."""

    def ready() -> bool:
        ta, tb_ = tunnel_of(w.a), tunnel_of(w.b)
        assert ta["ingress"] and tb_["egress"] and all(e["ready"] for e in tb_["egress"]), (
            f"a={json.dumps(ta)} b={json.dumps(tb_)}")
        return True

    eventually(ready, timeout, "both ends of the tunnel to be configured")
    w.a.synced()
    w.b.synced()


def flows(agent: AgentProc, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [L7GATE, "observe", "--last", "200", "-o", "json", *args,
         "--admin", f"unix:{agent.workdir}/admin.sock"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line).get("flow", json.loads(line)) for line in out.splitlines() if line.strip()]


def flows_where(agent: AgentProc, match: Callable[[dict[str, Any]], bool], what: str, *args: str,
                timeout: float = 15.0) -> list[dict[str, Any]]:
    """The flows of `agent` (`l7gate observe` with `args`) that `match`, once there are any;
    fails naming `what` and showing the flows seen last."""

    def matching() -> list[dict[str, Any]]:
        seen = flows(agent, *args)
        got = [f for f in seen if match(f)]
        assert got, json.dumps(seen)
        return got

    return eventually(matching, timeout, what)


def test_first_request_through_the_tunnel_succeeds_and_l7_rules_apply(world: World) -> None:
    wait_ready(world)
    fe, billing = world.fe, world.billing
    status, body = fe.curl(url(billing, 8080, "/v1/charge"), "POST", data='{"amount": 100}')
    assert status == 200, body
    # The pod saw plain HTTP, and learns the caller's SPIFFE ID from node A's Envoy.
    assert fe.curl(url(billing, 8080, "/v1/transactions"))[0] == 403
    assert fe.curl(url(billing, 8080, "/v1/refund"), "POST")[0] == 403
    st = tunnel_of(world.b)
    assert st["egress"][0]["destination"] == f"{billing.ip}:8080"
    assert st["egress"][0]["node"] == f"{world.na.ip}:{TUNNEL_PORT}"
    out = subprocess.run([L7GATE, "auth", "status", "--admin", f"unix:{world.b.workdir}/admin.sock"],
                         capture_output=True, text=True, check=True).stdout
    assert "encryption in transit: mTLS tunnel" in out and f"{billing.ip}:8080" in out


def test_egress_http_rules_of_the_source_apply_before_the_tunnel(world: World) -> None:
    """The frontend's own egress HTTP rules on an auth-required destination: node B's tunnel
    egress listener applies them before it encrypts (docs/egress-http.md); what they refuse is
    node B's 403 and an EGRESS flow there, what they allow goes through the tunnel as before."""
    egress = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "frontend-egress", "namespace": "web"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "frontend-service"}},
                 "egress": [{"toEndpoints": [{"matchLabels": {"app": "billing-service",
                                                              "k8s:io.kubernetes.pod.namespace": "payments"}}],
                             "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                          "rules": {"http": [{"method": "POST", "path": "/v1/charge",
                                                              "headers": ["X-Egress: yes"]}]}},
                                         {"ports": [{"port": str(LEDGER_PORT), "protocol": "TCP"}]}]}]},
    }
    wait_ready(world)
    world.b.client.apply_policies([egress])
    try:
        def egress_rules_in_force() -> bool:
            status, _ = world.fe.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}")
            assert status == 403, status
            return True

        eventually(egress_rules_in_force, 20, "node B's tunnel egress listener to apply the egress rules")
        status, body = world.fe.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}",
                                     headers={"X-Egress": "yes"})
        assert status == 200, body
        assert tunnel_of(world.b)["egress"][0]["destination"] == f"{world.billing.ip}:8080"
        flows_where(world.b, lambda f: f.get("traffic_direction") == "EGRESS"
                    and f.get("drop_reason_desc") == "Policy denied (L7)"
                    and "CiliumNetworkPolicy/web/frontend-egress" in json.dumps(f.get("policy_match")),
                    "node B's egress denial as an EGRESS flow", "--verdict", "DROPPED")
    finally:
        world.b.client.delete_policy("CiliumNetworkPolicy/web/frontend-egress")
        world.b.synced()


def test_capture_on_the_link_shows_tls_and_no_plaintext(world: World) -> None:
    wait_ready(world)
    na = world.na
    with link_capture(world, "link.pcap") as pcap:
        for _ in range(3):
            status, body = world.fe.curl(url(world.billing, 8080, "/v1/charge"), "POST",
                                         data=f'{{"note": "{MARKER}"}}')
            assert status == 200, body
    raw = pcap.read_bytes()
    assert len(raw) > 1000, "nothing captured"
    text = pcap_text(pcap)
    assert f"{na.ip}.{TUNNEL_PORT}" in text, text[:2000]  # the tunnel crossed the link
    assert f"{world.billing.ip}.8080" not in text, "a connection went to the pod directly"
    # TLS 1.3 records (application data: 0x17 0x03 0x03), and nothing readable in them. The
    # tunnel is HTTP/2 inside TLS, and a body marker is what HPACK cannot hide.
    assert b"\x17\x03\x03" in raw
    assert b"/v1/charge" not in raw and MARKER.encode() not in raw and b"billing-service" not in raw


def test_plaintext_from_a_node_that_does_not_encrypt_is_refused(world: World) -> None:
    wait_ready(world)
    status, _ = world.plain.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}", timeout=2)
    assert status == 0  # dropped in node A's kernel
    flows_where(world.a, lambda f: f.get("drop_reason_desc") == "Plaintext refused"
                and f["source"].get("pod_name") == "frontend-service-pln",
                "node A's flow of the refused plaintext", "--verdict", "DROPPED")


def test_peer_from_another_trust_domain_is_refused_and_flows_name_the_reason(world: World) -> None:
    wait_ready(world)
    status, body = world.rogue.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}", timeout=10)
    assert status == 503, (status, body)  # refused by TLS between the Envoys: nothing was sent
    # The rogue node's Envoy could not verify node A's certificate (another CA): its flow says so.
    flows_where(world.d, lambda f: f.get("drop_reason_desc") == "Authentication failed"
                and "mTLS tunnel" in (f.get("Summary") or "")
                and f["source"].get("pod_name") == "frontend-service-zzz",
                "the rogue node's flow of the failed authentication", "--verdict", "DROPPED")
    # Node A names it too: the rogue asked for billing under its own trust domain's name.
    flows_where(world.a, lambda f: f.get("drop_reason_desc") == "Authentication failed"
                and "rogue.example" in (f.get("Summary") or ""),
                "node A's flow naming the rogue trust domain", "--verdict", "DROPPED")
    assert not [f for f in flows(world.a) if f["source"].get("pod_name") == "frontend-service-zzz"
                and f.get("verdict") == "FORWARDED"]


def _tls_client(node: Node, dst: str, target: int, hostport: str, svid: Any, workdir: Path, name: str) -> str:
    """A TLS client on `node` (the node itself, not a pod) presenting `svid` to the tunnel
    port of `dst`, asking for `target`'s certificate and for delivery to `hostport`; returns
    the HTTP status line, or "refused: <error>"."""
    d = workdir / name
    d.mkdir(exist_ok=True)
    (d / "cert.pem").write_bytes(svid.chain_pem)
    (d / "key.pem").write_bytes(svid.key_pem)
    (d / "key.pem").chmod(0o600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))
    with node.entered():
        try:
            with socket.create_connection((dst, TUNNEL_PORT), timeout=3) as raw:
                with ctx.wrap_socket(raw, server_hostname=f"{target}.{TD}") as s:
                    s.sendall(b"POST /v1/charge HTTP/1.1\r\nhost: billing\r\n"
                              b"x-envoy-original-dst-host: " + hostport.encode() + b"\r\n"
                              b"content-length: 2\r\nconnection: close\r\n\r\n{}")
                    data = s.recv(4096)
                    if not data:
                        return "refused: closed"
                    return data.split(b"\r\n", 1)[0].decode()
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"


def test_expired_or_two_uri_san_client_certificates_are_refused_and_flows_say_why(world: World) -> None:
    wait_ready(world)
    ca = BuiltinCA.load_or_create(world.ca, TD)
    eps = world.a.client.get("/v1/endpoints")["endpoints"]
    billing_id = next(e["identity"] for e in eps if e["ref"].endswith("/billing-service-xyz"))
    fe_id = next(e["identity"] for e in eps if e["ref"].endswith("/frontend-service-abc"))
    dst = f"{world.billing.ip}:8080"
    now = time.time()
    ok = forge_svid(ca, fe_id)
    expired = forge_svid(ca, fe_id, not_before=now - 7200, not_after=now - 60)
    two = forge_svid(ca, fe_id, uris=[spiffe_id(TD, fe_id), spiffe_id(TD, billing_id)])
    wd, nb, a_ip = world.tb.workdir, world.nb, world.na.ip
    # Control: a valid frontend SVID gets through, so the refusals below are the certificates'.
    assert _tls_client(nb, a_ip, billing_id, dst, ok, wd, "ok").endswith("200 OK")
    assert _tls_client(nb, a_ip, billing_id, dst, expired, wd, "expired").startswith("refused")
    assert " 403 " in _tls_client(nb, a_ip, billing_id, dst, two, wd, "two") + " "
    flows_where(world.a, lambda f: f.get("drop_reason_desc") == "Authentication failed"
                and "certificate expired" in (f.get("Summary") or ""),
                "node A's flow of the expired certificate", "--verdict", "DROPPED")
    # Two URI SANs name no identity: the port's default (world's) decision applies.
    flows_where(world.a, lambda f: f.get("drop_reason_desc") == "Policy denied"
                and f.get("destination", {}).get("pod_name") == "billing-service-xyz"
                and not f.get("source", {}).get("identity")
                and "2 URI SANs" in (f.get("Summary") or ""),
                "node A's flow of the two-URI-SAN certificate", "--verdict", "DROPPED")



def test_auth_removed_then_restored_moves_the_path_out_of_and_back_into_the_tunnel(world: World) -> None:
    wait_ready(world)
    try:
        for agent in (world.a, world.b, world.c, world.d):
            agent.client.apply_policies(tunnel_policies(auth=False))  # the same rules, no auth
        eventually(lambda: not tunnel_of(world.b)["kernel"] and not tunnel_of(world.a)["ingress"], 15,
                   "the tunnel to be taken down on both ends")
        world.a.synced()
        # Plain text is fine now, from both kinds of node.
        assert world.fe.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}")[0] == 200
        assert world.plain.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}")[0] == 200
        assert echo(world.plain, world.billing.ip, LEDGER_PORT, "plain") == "echo:plain"
    finally:
        for agent in (world.a, world.b, world.c, world.d):
            agent.client.apply_policies(tunnel_policies())
    wait_ready(world)
    assert world.fe.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}")[0] == 200
    assert world.plain.curl(url(world.billing, 8080, "/v1/charge"), "POST", data="{}", timeout=2)[0] == 0
    assert echo(world.fe, world.billing.ip, LEDGER_PORT, "tunnelled") == "echo:tunnelled"
    assert echo(world.plain, world.billing.ip, LEDGER_PORT, "plain") == ""


def test_tcp_through_the_tunnel_for_an_l4_allow_on_a_non_http_port(world: World) -> None:
    """The TCP variant: an auth-required L3/L4 allow. The frontend's connection to the ledger
    port is carried as a CONNECT stream over the same mTLS tunnel; the link shows TLS only;
    plaintext from the node that does not encrypt is refused; both nodes' flows say so."""
    wait_ready(world)
    fe, billing, na = world.fe, world.billing, world.na
    st = tunnel_of(world.b)
    ledger = [e for e in st["egress"] if e["destination"] == f"{billing.ip}:{LEDGER_PORT}"]
    assert ledger and ledger[0]["tcp_sources"] == ledger[0]["sources"] and ledger[0]["ready"], st
    assert f"{billing.ip}:{LEDGER_PORT}" in [e["endpoint"] for e in tunnel_of(world.a)["ingress"]]

    with link_capture(world, "ledger.pcap") as pcap:
        for i in range(3):
            msg = f"ledger {i} {MARKER}"
            assert echo(fe, billing.ip, LEDGER_PORT, msg) == "echo:" + msg
    raw = pcap.read_bytes()
    text = pcap_text(pcap)
    assert f"{na.ip}.{TUNNEL_PORT}" in text, text[:2000]
    assert f"{billing.ip}.{LEDGER_PORT}" not in text, "a connection went to the pod directly"
    assert b"\x17\x03\x03" in raw and MARKER.encode() not in raw

    # The same workload on the node that sends plain text: refused by node A's kernel.
    assert echo(world.plain, billing.ip, LEDGER_PORT, "plain " + MARKER) == ""
    flows_where(world.a, lambda f: f.get("drop_reason_desc") == "Plaintext refused"
                and f["source"].get("pod_name") == "frontend-service-pln"
                and dport(f) == LEDGER_PORT,
                "node A's flow of the refused plaintext to the ledger port", "--verdict", "DROPPED")

    # Node A's flow of the tunnelled connection: L3/L4, the frontend by its certificate.
    got = flows_where(world.a, lambda f: "TCP through the mTLS tunnel" in (f.get("Summary") or "")
                      and f["source"].get("pod_name") == "frontend-service-abc"
                      and dport(f) == LEDGER_PORT,
                      "node A's flow of the tunnelled ledger connection", "--verdict", "FORWARDED")
    assert got[-1].get("auth_type") == "SPIRE"
