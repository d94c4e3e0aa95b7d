"""Egress HTTP rules, enforced by the source node's Envoy (docs/egress-http.md).

Node a1 (cluster-a) holds `web/client`, whose egress policy has HTTP rules, `web/free` (no
policy), and `payments/local-api` (ingress HTTP rules of its own). Node b1 (cluster-b, its own
agent) holds `payments/remote-api` (ingress HTTP rules). The node `inet` (a cluster no agent
knows) holds `internet/site`: `world`. Every request from the client goes through a1's egress
listener: the egress rules decide first (403 from a1's Envoy, an EGRESS flow), then the
destination's ingress rules (a1's own Envoy for the local pod, b1's for the remote one). The
servers see the client's own address: the destination's policy judges the client's identity.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.testing.testbed import Pod, Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import L7GATE, AgentProc, make_agent, stop_agents

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]

NS = "k8s:io.kubernetes.pod.namespace"


def cnp(name: str, namespace: str, app: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"endpointSelector": {"matchLabels": {"app": app}}, **spec}}


def http_port(port: int, *rules: dict[str, str]) -> dict[str, Any]:
    return {"ports": [{"port": str(port), "protocol": "TCP"}], "rules": {"http": list(rules)}}


CLIENT_EGRESS = cnp("client-egress", "web", "client", egress=[
    {"toEndpoints": [{"matchLabels": {NS: "payments"}}],
     "toPorts": [http_port(8080, {"method": "GET", "path": "/allowed/.*"})]},
    {"toEntities": ["world"], "toPorts": [http_port(80, {"method": "GET", "path": "/public.*"})]},
])
LOCAL_INGRESS = cnp("local-api-ingress", "payments", "local-api", ingress=[
    {"fromEndpoints": [{"matchLabels": {NS: "web"}}],
     "toPorts": [http_port(8080, {"path": "/allowed/a.*"})]},
])
REMOTE_INGRESS = cnp("remote-api-ingress", "payments", "remote-api", ingress=[
    {"fromEndpoints": [{"matchLabels": {"app": "client", NS: "web"}}],
     "toPorts": [http_port(8080, {"path": "/allowed/b.*"})]},
])


@dataclass
class World:
    tb: Testbed
    a: AgentProc
    b: AgentProc
    client: Pod
    free: Pod
    local: Pod
    remote: Pod
    site: Pod


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.63.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.63.2.0/24")
        inet = tb.add_node("inet", cluster="internet", node_cidr="10.63.9.0/24")
        tb.link(na, nb)
        tb.link(na, inet)
        client = tb.add_pod(na, "web", "client", labels={"app": "client"})
        free = tb.add_pod(na, "web", "free", labels={"app": "free"})
        local = tb.add_pod(na, "payments", "local-api", labels={"app": "local-api"}, ports=[8080])
        remote = tb.add_pod(nb, "payments", "remote-api", labels={"app": "remote-api"}, ports=[8080])
        site = tb.add_pod(inet, "internet", "site")
        # 9001: a port remote-api serves without declaring it (containerPorts are optional)
        for pod, port in ((local, 8080), (remote, 8080), (remote, 9001), (site, 80)):
            pod.serve_http(port)
        a = make_agent(tb, na, "cluster-a", 1, "cluster-b", 2, na.link_ifnames)
        b = make_agent(tb, nb, "cluster-b", 2, "cluster-a", 1, nb.link_ifnames)
        try:
            known = tb.to_manifests("cluster-a") + tb.to_manifests("cluster-b")
            for agent in (a, b):
                agent.start(tb)
                agent.client.apply_endpoints(known)
                agent.client.apply_policies([CLIENT_EGRESS, LOCAL_INGRESS, REMOTE_INGRESS])
                agent.synced()
            yield World(tb, a, b, client, free, local, remote, site)
        finally:
            stop_agents(a, b)


def get(w: World, pod: Pod, dst: Pod, port: int, path: str) -> tuple[int, dict[str, Any] | str]:
    status, body = pod.curl(f"http://{dst.ip}:{port}{path}", timeout=5)
    if status == 200:
        return status, json.loads(body)
    return status, body


def flows(w: World, agent: AgentProc, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run([L7GATE, "observe", "--last", "200", "-o", "json", *args,
                          "--admin", f"unix:{agent.workdir}/admin.sock"],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line).get("flow", json.loads(line)) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("dst, port, path, want", [
    ("local", 8080, "/allowed/a1", 200),    # egress allows, the local pod's ingress allows
    ("local", 8080, "/allowed/z", 403),     # egress allows, the local pod's ingress refuses
    ("local", 8080, "/denied", 403),        # egress refuses
    ("remote", 8080, "/allowed/b1", 200),   # egress allows, b1's Envoy (ingress) allows
    ("remote", 8080, "/allowed/z", 403),    # egress allows, b1's Envoy refuses
    ("remote", 8080, "/denied", 403),       # egress refuses at a1
    ("site", 80, "/public/x", 200),         # world, egress allows
    ("site", 80, "/private", 403),          # world, egress refuses
])
def test_egress_http_rules_at_the_source(world: World, dst: str, port: int, path: str, want: int) -> None:
    target = getattr(world, dst)
    status, body = get(world, world.client, target, port, path)
    assert status == want, body
    if status == 200:
        assert isinstance(body, dict) and body["path"] == path
        # The egress proxy connects from the client's own address: the local pod and the site
        # see it. The remote pod is reached through b1's own ingress proxy, which connects from
        # b1 (and admitted the request only because it saw the client's identity).
        peer = world.remote.node.ip if dst == "remote" else world.client.ip
        assert body["peer"] == peer, body


def test_an_egress_denial_is_an_egress_flow(world: World) -> None:
    assert get(world, world.client, world.remote, 8080, "/denied/flow")[0] == 403

    def seen() -> bool:
        fs = [f for f in flows(world, world.a, "--verdict", "DROPPED", "--type", "l7")
              if f.get("l7", {}).get("http", {}).get("url", "").endswith("/denied/flow")]
        assert fs, "no flow yet"
        f = fs[-1]
        assert f["traffic_direction"] == "EGRESS", f
        assert f["drop_reason_desc"] == "Policy denied (L7)", f
        assert "CiliumNetworkPolicy/web/client-egress" in f["policy_match"] if isinstance(
            f["policy_match"], list) else "client-egress" in json.dumps(f), f
        assert f["source"]["pod_name"] == "client", f
        return True

    eventually(seen, 10, "the egress denial in `l7gate observe` on a1")


def test_status_shows_the_egress_proxy(world: World) -> None:
    eg = world.a.status()["egress_proxy"]
    assert eg == {"port": 15001, "ports": [80, 8080]}, eg


def test_a_pod_without_egress_rules_is_not_proxied(world: World) -> None:
    # `free` has no policy: it reaches the remote pod directly, and b1's ingress rules (which
    # admit the client only) drop it in b1's kernel
    assert world.free.curl(f"http://{world.remote.ip}:8080/allowed/b", timeout=2)[0] == 0
    status, body = world.free.curl(f"http://{world.site.ip}:80/anything", timeout=5)
    assert status == 200 and json.loads(body)["peer"] == world.free.ip


def test_other_ports_stay_l3l4(world: World) -> None:
    # the client's egress policy names only 8080 and 80: anything else is dropped in the kernel
    assert world.client.curl(f"http://{world.site.ip}:8080/", timeout=2)[0] == 0


def test_trace_agrees(world: World) -> None:
    inv = world.tb.workdir / "egress-trace.yaml"
    docs = world.tb.to_manifests("cluster-a") + world.tb.to_manifests("cluster-b")
    inv.write_text(yaml.safe_dump_all([*docs, CLIENT_EGRESS, LOCAL_INGRESS, REMOTE_INGRESS]))

    def trace(dst: str, path: str) -> str:
        out = subprocess.run([L7GATE, "policy", "trace", "-f", str(inv), "--cluster-name", "cluster-a",
                              "--from", "cluster-a/web/client", "--to", dst, "--port", "8080",
                              "--method", "GET", "--path", path, "-o", "json"],
                             capture_output=True, text=True)
        assert out.returncode in (0, 1), out.stderr
        return str(json.loads(out.stdout)["verdict"])

    assert trace("cluster-a/payments/local-api", "/allowed/a1") == "allowed"
    assert trace("cluster-a/payments/local-api", "/allowed/z") == "denied"
    assert trace("cluster-a/payments/local-api", "/denied") == "denied"
    assert trace("cluster-b/payments/remote-api", "/allowed/b1") == "allowed"
    assert trace("cluster-b/payments/remote-api", "/denied") == "denied"


RANGE_PORTS = [{"port": "9000", "endPort": 9002, "protocol": "TCP"}]


def test_http_rules_on_a_port_range_and_an_undeclared_port(world: World) -> None:
    """HTTP rules on 9000-9002, on both sides: b1's Envoy listens on every port of the range
    for remote-api (9001 is served but not declared as a containerPort), a1's egress listener
    has a filter chain for each."""
    ingress = cnp("remote-api-range", "payments", "remote-api", ingress=[
        {"fromEndpoints": [{"matchLabels": {NS: "web"}}],
         "toPorts": [{"ports": RANGE_PORTS, "rules": {"http": [{"path": "/r.*"}]}}]}])
    egress = cnp("client-range", "web", "client", egress=[
        {"toEndpoints": [{"matchLabels": {NS: "payments"}}],
         "toPorts": [{"ports": RANGE_PORTS, "rules": {"http": [{"method": "GET", "path": "/r/ok.*"}]}}]}])
    for agent in (world.a, world.b):
        agent.client.apply_policies([ingress, egress])
        agent.synced()
    try:
        remote = f"http://{world.remote.ip}:9001"
        # free: no egress rules; b1's ingress rules on the undeclared port
        assert world.free.curl(remote + "/r/any")[0] == 200
        assert world.free.curl(remote + "/x")[0] == 403
        # client: a1's egress rules first, then b1's
        status, body = world.client.curl(remote + "/r/ok")
        assert status == 200 and json.loads(body)["path"] == "/r/ok", body
        assert world.client.curl(remote + "/r/no")[0] == 403   # egress refuses
        assert world.client.curl(remote + "/x")[0] == 403      # egress refuses (and ingress would)
        assert world.client.curl(f"http://{world.remote.ip}:9003/r/ok", timeout=2)[0] == 0  # outside the range
    finally:
        for agent in (world.a, world.b):
            agent.client.delete_policy("CiliumNetworkPolicy/payments/remote-api-range")
            agent.client.delete_policy("CiliumNetworkPolicy/web/client-range")


# -- serverNames: TLS connections judged by their SNI at the source ------------------------------

TLS_SERVER = """\
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
names = []
ctx.sni_callback = lambda sock, name, c: names.append(name) and None
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("serving on", sys.argv[1], sys.argv[2], flush=True)
while True:
    conn, peer = srv.accept()
    print("accepted", peer[0], flush=True)
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
        tls.recv(65536)
        body = ("peer=%s sni=%s" % (peer[0], names[-1] if names else "")).encode()
        tls.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body) + body)
        tls.close()
    except Exception as e:
        print("error", e, flush=True)
        conn.close()
"""

SNI_EGRESS = cnp("client-sni", "web", "client", egress=[
    {"toEntities": ["world"],
     "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}], "serverNames": ["api.example.test", "**.cdn.test"]}]},
])


def _https(pod: Pod, name: str, ip: str, port: int = 443, timeout: float = 5) -> tuple[int, str]:
    """curl https://<name>:<port>/ to `ip` (SNI `name`; "" sends none), not checking the server's
    certificate (the test's own ephemeral CA)."""
    url = f"https://{name or ip}:{port}/"
    argv = ["curl", "-sS", "-k", "--noproxy", "*", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}"]
    if name:
        argv += ["--resolve", f"{name}:{port}:{ip}"]
    proc = pod.run([*argv, url], text=True, timeout=timeout + 10)
    body, _, code = proc.stdout.rpartition("\n")
    return (int(code), body) if code.isdigit() and code != "000" else (0, proc.stderr.strip())


_TLS_LOG: list[Any] = []  # the egress TLS server's output file


@contextmanager
def _tls_server(world: World, pod: Pod, port: int, policy: dict[str, Any]) -> Iterator[Path]:
    """TLS_SERVER on pod:port (a certificate of the test's own CA) with `policy` applied on both
    agents, for the duration; yields the server's output file."""
    from l7gate.testing.etcd import make_tls

    files = make_tls(world.tb.workdir / f"sni-tls-{pod.name}-{port}", server_ips=(pod.ip,))
    script = world.tb.workdir / "tls_server.py"
    script.write_text(TLS_SERVER)
    proc = pod.spawn([sys.executable, str(script), pod.ip, str(port), str(files.server_cert), str(files.server_key)])
    log = world.tb.log_path(proc)
    eventually(lambda: "serving on" in log.read_text(errors="replace"), 10, "the TLS server listening")
    meta = policy["metadata"]
    for agent in (world.a, world.b):
        agent.client.apply_policies([policy])
        agent.synced()
    try:
        yield log
    finally:
        for agent in (world.a, world.b):
            agent.client.delete_policy(f"{policy['kind']}/{meta['namespace']}/{meta['name']}")
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tls_site(world: World) -> Iterator[Pod]:
    with _tls_server(world, world.site, 443, SNI_EGRESS) as log:
        _TLS_LOG[:] = [log]
        yield world.site


@pytest.mark.parametrize("name, allowed", [
    ("api.example.test", True),
    ("API.Example.TEST", True),       # SNI is compared without case
    ("a.b.cdn.test", True),           # `**.` is one or more labels
    ("cdn.test", False),
    ("evil.example.test", False),
    ("", False),                      # TLS without SNI
])
def test_server_names_judge_tls_at_the_source(world: World, tls_site: Pod, name: str, allowed: bool) -> None:
    status, body = _https(world.client, name, tls_site.ip)
    if allowed:
        # the server saw the client's own address and the SNI the client sent: the bytes
        # were relayed untouched (no interception)
        assert status == 200, body
        assert body == f"peer={world.client.ip} sni={name.lower()}", body  # curl sends it lower-case
    else:
        assert status == 0, body


def test_a_refused_server_name_opens_no_connection_to_the_destination(world: World, tls_site: Pod) -> None:
    log = _TLS_LOG[0]

    def accepted() -> int:
        return log.read_text(errors="replace").count("accepted ")

    before = accepted()
    assert _https(world.client, "evil.example.test", tls_site.ip)[0] == 0
    assert _https(world.client, "api.example.test", tls_site.ip)[0] == 200
    assert accepted() == before + 1, log.read_text()[-500:]  # only the allowed one reached the server


def test_plain_text_on_a_server_names_port_is_refused(world: World, tls_site: Pod) -> None:
    assert world.client.curl(f"http://{tls_site.ip}:443/", timeout=3)[0] in (0, 403)


def test_a_pod_without_server_names_is_not_filtered(world: World, tls_site: Pod) -> None:
    status, body = _https(world.free, "evil.example.test", tls_site.ip)
    assert status == 200 and body == f"peer={world.free.ip} sni=evil.example.test", body


def test_tls_verdicts_are_egress_flows(world: World, tls_site: Pod) -> None:
    assert _https(world.client, "blocked.example.test", tls_site.ip)[0] == 0
    assert _https(world.client, "api.example.test", tls_site.ip)[0] == 200

    def seen() -> bool:
        fs = [f for f in flows(world, world.a) if "TLS server name" in f.get("Summary", "")]
        dropped = [f for f in fs if "blocked.example.test" in f["Summary"]]
        passed = [f for f in fs if "api.example.test" in f["Summary"]]
        assert dropped and passed, fs[-5:]
        d, p = dropped[-1], passed[-1]
        assert d["verdict"] == "DROPPED" and d["drop_reason_desc"] == "Policy denied (L7)", d
        assert d["traffic_direction"] == "EGRESS" and d["source"]["pod_name"] == "client", d
        assert "CiliumNetworkPolicy/web/client-sni" in json.dumps(d["policy_match"]), d
        assert p["verdict"] == "FORWARDED" and p["traffic_direction"] == "EGRESS", p
        return True

    eventually(seen, 10, "the TLS verdicts in `l7gate observe` on a1")


def test_trace_agrees_on_server_names(world: World) -> None:
    inv = world.tb.workdir / "sni-trace.yaml"
    inv.write_text(yaml.safe_dump_all([*world.tb.to_manifests("cluster-a"), SNI_EGRESS]))
    for name, want in (("api.example.test", "allowed"), ("x.y.cdn.test", "allowed"), ("evil.test", "denied")):
        out = subprocess.run([L7GATE, "policy", "trace", "-f", str(inv), "--cluster-name", "cluster-a",
                              "--from", "cluster-a/web/client", "--to", world.site.ip, "--port", "443",
                              "--sni", name, "-o", "json"], capture_output=True, text=True)
        assert json.loads(out.stdout)["verdict"] == want, out.stdout


SNI_INGRESS = cnp("remote-api-sni", "payments", "remote-api", ingress=[
    {"fromEndpoints": [{"matchLabels": {NS: "web", "app": "free"}}],
     "toPorts": [{"ports": [{"port": "8443", "protocol": "TCP"}], "serverNames": ["api.payments.test"]}]},
])


@pytest.fixture(scope="module")
def tls_remote(world: World) -> Iterator[Pod]:
    """A TLS server on remote-api:8443 (node b1), whose ingress policy admits `web/free` with
    server name api.payments.test only: b1's Envoy judges it (its listener's TLS chain)."""
    with _tls_server(world, world.remote, 8443, SNI_INGRESS):
        yield world.remote


@pytest.mark.parametrize("name, allowed", [
    ("api.payments.test", True),
    ("other.payments.test", False),
])
def test_server_names_on_ingress_are_judged_by_the_destination_node(world: World, tls_remote: Pod, name: str,
                                                                    allowed: bool) -> None:
    status, body = _https(world.free, name, tls_remote.ip, 8443)
    if allowed:
        # b1's Envoy relayed the bytes untouched to the pod (from b1's own address, as its
        # ingress proxy does for HTTP)
        assert status == 200 and body == f"peer={world.remote.node.ip} sni={name}", body
    else:
        assert status == 0, body


def test_plain_text_to_an_ingress_server_names_port_is_refused(world: World, tls_remote: Pod) -> None:
    assert world.free.curl(f"http://{tls_remote.ip}:8443/", timeout=3)[0] in (0, 403)


def test_ingress_tls_verdicts_are_ingress_flows(world: World, tls_remote: Pod) -> None:
    assert _https(world.free, "nope.payments.test", tls_remote.ip, 8443)[0] == 0

    def seen() -> bool:
        fs = [f for f in flows(world, world.b) if "nope.payments.test" in f.get("Summary", "")]
        assert fs, "no flow yet"
        f = fs[-1]
        assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "Policy denied (L7)", f
        assert f["traffic_direction"] == "INGRESS" and f["destination"]["pod_name"] == "remote-api", f
        assert "remote-api-sni" in json.dumps(f["policy_match"]), f
        return True

    eventually(seen, 10, "the ingress TLS verdict in `l7gate observe` on b1")
