"""A real etcd for tests and benches: its own process, loopback ports and data dir.

`EtcdServer` starts the Debian `etcd` binary (3.4) as a plain child process: client, peer and
metrics ports are free loopback ports picked at start (never 2379), the data dir is one the
caller owns (a pytest tmp_path, a bench scratch dir), the cluster token is random so that every
fresh start is a new etcd cluster with a new cluster ID. It is ready when `/health` on its plain
HTTP metrics port says so (the client port may speak TLS with client-cert auth), and it is
stopped by its PID only: SIGCONT first (it may be frozen by a test), then SIGTERM, then SIGKILL.
Use it as a context manager, so that it is stopped even when the test fails; nothing here
touches a system etcd service or port 2379.

`make_tls` writes what Cilium's clustermesh uses against etcd: a CA, a server certificate for
127.0.0.1 and client certificates, made with `cryptography`.

Stdlib and `cryptography` only, no pytest: `bench/bench_etcd.py` loads this file by path.
Not thread-safe: one owner per server.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

READY_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick; etcd binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    if port == 2379:  # never collide with a system etcd's well-known port
        return free_port()
    return port


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files: the CA, the server's certificate for 127.0.0.1, a client certificate signed by
    the CA, and a client certificate signed by another CA (a client the server must refuse)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def make_tls(directory: Path, server_ips: Sequence[str] = ("127.0.0.1",)) -> TLSFiles:
    """Generate a CA, a server cert (SAN: `server_ips`) and client certs into `directory`."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], *,
             server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[1].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]),
                critical=False,
            )
        return key, builder.sign(issuer[0], hashes.SHA256())

    def write(stem: str, pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(pair[1].public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(pair[0].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    the_ca, other_ca = ca("l7gate test etcd CA"), ca("some other CA")
    ca_path, _ = write("ca", the_ca)
    server_cert, server_key = write("server", leaf("etcd", the_ca, server=True))
    client_cert, client_key = write("client", leaf("l7gate-agent", the_ca, server=False))
    rogue_cert, rogue_key = write("rogue", leaf("l7gate-agent", other_ca, server=False))
    return TLSFiles(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


def single_member_argv(binary: str, name: str, data_dir: Path, client_url: str, peer_url: str,
                       token: str) -> list[str]:
    """The command line of a one-member etcd cluster serving `client_url`."""
    return [
        binary, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}",
        "--initial-cluster-token", token, "--initial-cluster-state", "new",
        "--logger", "zap", "--log-outputs", "stderr",
    ]


class _EtcdProcess:
    """What both kinds of test etcd do with their running process: ended only by its PID."""

    proc: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "etcd is not running"
        return self.proc.pid

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye on its connections."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """Stop it by its PID (SIGCONT, SIGTERM, then SIGKILL after 5 s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a frozen process would not act on SIGTERM
            proc.terminate()
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except ProcessLookupError:
            pass


class EtcdServer(_EtcdProcess):
    """One etcd process (module doc). `endpoint` is what `EtcdKVStore` takes."""

    def __init__(self, binary: str, data_dir: Path, *, tls: TLSFiles | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.tls = tls
        self.extra_args = extra_args
        self.client_port = free_port()
        self.peer_port, self.metrics_port = free_port(), free_port()
        self.token = secrets.token_hex(8)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.started_in = 0.0

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        """Start and wait until healthy (a few tries if a picked port was taken meanwhile)."""
        last = ""
        for _ in range(3):
            try:
                self._start_once()
                return self
            except RuntimeError as exc:
                last = str(exc)
                self.client_port, self.peer_port, self.metrics_port = free_port(), free_port(), free_port()
        raise RuntimeError(last)

    def _start_once(self) -> None:
        peer, metrics = self.peer_port, self.metrics_port
        scheme = "https" if self.tls else "http"
        client_url = f"{scheme}://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{peer}"
        argv = single_member_argv(self.binary, "l7gate-test", self.data_dir, client_url, peer_url,
                                  self.token)
        argv += ["--listen-metrics-urls", f"http://127.0.0.1:{metrics}"]
        if self.tls:
            argv += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                     "--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        argv += list(self.extra_args)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = started + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"etcd exited at start: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        self.started_in = time.monotonic() - started
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {READY_TIMEOUT} s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def restart(self) -> None:
        """Start again on the same ports and data (after `kill` or `stop`): the same cluster."""
        self.stop()
        self._start_once()

    def restart_fresh(self) -> None:
        """Stop, drop the data, start a new etcd cluster (new cluster ID) on the same ports."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.token = secrets.token_hex(8)
        self._start_once()

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


NODE_CLIENT_PORT = 32379  # inside a testbed node's own network namespace: no clash with a host etcd


class NodeEtcd(_EtcdProcess):
    """An etcd inside a testbed node's network namespace, listening on the node's address
    (`endpoint`), so that the node's agent and the agents of linked nodes (other clusters)
    reach it as they would a cluster's etcd. Started with `node.spawn`: the testbed ends it at
    teardown in any case; `stop` ends it earlier, by PID. Not thread-safe."""

    def __init__(self, node: object, binary: str, data_dir: Path) -> None:
        self.node = node
        self.binary = binary
        self.data_dir = data_dir
        self.ip: str = getattr(node, "ip")
        self.token = secrets.token_hex(8)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{NODE_CLIENT_PORT}"

    def start(self) -> NodeEtcd:
        client, peer = self.endpoint, f"http://{self.ip}:{NODE_CLIENT_PORT + 1}"
        argv = single_member_argv(self.binary, "l7gate-node", self.data_dir, client, peer, self.token)
        spawn = getattr(self.node, "spawn")
        self.proc = spawn(argv, net_only=True)
        tb = getattr(self.node, "testbed")
        log = tb.log_path(self.proc)
        deadline = time.monotonic() + READY_TIMEOUT
        # etcd 3.4 says so when its client port is up ("serving client traffic" with zap logs)
        while not any(m in log.read_text(errors="replace") for m in ("serving client traffic",
                                                                     "ready to serve client requests")):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd in {getattr(self.node, 'netns')} did not start: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def restart(self) -> None:
        """Start again on the same address and data (after `kill`): the same etcd cluster."""
        self.kill()
        self.start()
