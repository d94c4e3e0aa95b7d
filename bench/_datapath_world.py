"""Helpers for bench_datapath: connect timing in pod namespaces, a policy-loaded BPF datapath,
an iptables chain of per-peer rules, agents (kernel and loopback mode) as processes, a static
Envoy upstream, `wrk`, and request probes.

Network hygiene: everything runs inside namespaces of a `Testbed` (l7g-prefixed, removed at
the end) or on 127.0.0.0/8 inside such a namespace. BPF pins live under
/sys/fs/bpf/l7g/<testbed netns>...; iptables chains are named L7G-BENCH and exist only in a
testbed node namespace. Every process is started through the testbed (ended by PID at
teardown) or stopped here by its PID.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from _world import WrkResult, find_wrk, parse_wrk
from l7gate.client import AdminClient, AdminError
from l7gate.testing.testbed import Node, Pod
from l7gate.redirect_bpf.compile import KAction, PolicyKey, PolicyValue
from l7gate.redirect_bpf.loader import KernelDatapath

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed"
L7GATE = str(Path(sys.executable).parent / "l7gate")
BPF_ROOT = Path("/sys/fs/bpf/l7g")
BILLING = {"app": "billing-service", "team": "payments", "env": "prod"}
FRONTEND = {"app": "frontend-service", "team": "web", "env": "prod"}
OTHER = {"app": "reporting-job", "team": "web", "env": "prod"}
HOST = "billing-service.payments"
OFFSET = 10000  # loopback mode: a pod's server listens on port + OFFSET
TCP = 6
INGRESS, EGRESS = 0, 1

# --- 1. connect latency -------------------------------------------------------------------------

ACCEPT_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4096)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""
_LINGER_RST = struct.pack("ii", 1, 0)


def start_accept_server(pod: Pod, port: int, cpu: int | None) -> None:
    """A server in `pod` that accepts and closes every connection (pinned to `cpu` if given)."""
    argv = [sys.executable, "-c", ACCEPT_SERVER, pod.ip, str(port)]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = pod.spawn(argv)
    log = pod.testbed.log_path(proc)
    deadline = time.monotonic() + 10
    while "listening" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"accept server in {pod.name} did not start: {log.read_text()}")
        time.sleep(0.01)


def connect_samples(pod: Pod, ip: str, port: int, n: int, warmup: int = 50) -> list[float]:
    """Seconds of `n` sequential TCP connects from `pod` to ip:port (each closed with a RST, so
    no TIME_WAIT piles up and port allocation costs the same for every block)."""
    out: list[float] = []
    gc.disable()
    try:
        with pod.entered():  # sockets are created in the pod's netns
            for i in range(n + warmup):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                s.settimeout(2.0)
                try:
                    t0 = time.perf_counter()
                    s.connect((ip, port))
                    t1 = time.perf_counter()
                finally:
                    s.close()
                if i >= warmup:
                    out.append(t1 - t0)
    finally:
        gc.enable()
    return out


def connect_dropped(pod: Pod, ip: str, port: int, timeout: float = 0.3) -> bool:
    """True if a SYN from `pod` to ip:port gets no answer at all (dropped, not refused)."""
    with pod.entered():
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return False
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        s.close()


@contextmanager
def pinned_thread(cpu: int | None) -> Iterator[None]:
    """Run the calling thread on one CPU (Linux: pid 0 is the calling thread), then restore."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpus_for_client_and_server() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


# --- 1. the BPF datapath, loaded directly -------------------------------------------------------


class PolicyDatapath:
    """The project's tc programs loaded with `KernelDatapath` into their own pin dir, maps holding
    the client and server as endpoints, an L4 ALLOW for client→server:port plus `peers - 1`
    other peers allowed to the server (each with its ipcache entry), an ANY deny for the server's
    ingress and an ANY allow for the client's egress."""

    CLIENT_ID, SERVER_ID, FIRST_PEER_ID = 70_001, 70_002, 100_000

    def __init__(self, node: Node, tag: str) -> None:
        self.node = node
        self.dp = KernelDatapath(BPF_ROOT / f"{node.netns}-{tag}")
        self.attached: list[str] = []
        self.entries = 0

    def open(self, client: Pod, server: Pod, port: int, peers: int) -> None:
        self.dp.open()
        c, s = self.CLIENT_ID, self.SERVER_ID
        ipcache = {ipaddress.IPv4Network(f"{client.ip}/32"): c, ipaddress.IPv4Network(f"{server.ip}/32"): s}
        policy = {
            PolicyKey(c, EGRESS, TCP, 0, 0, 0): PolicyValue(KAction.ALLOW),
            PolicyKey(s, INGRESS, TCP, 0, 0, 0): PolicyValue(KAction.DENY),
            PolicyKey(s, INGRESS, TCP, c, port, 16): PolicyValue(KAction.ALLOW),
        }
        base = int(ipaddress.IPv4Address("10.200.0.0"))
        for i in range(peers - 1):
            ident = self.FIRST_PEER_ID + i
            ipcache[ipaddress.IPv4Network(f"{ipaddress.IPv4Address(base + i + 1)}/32")] = ident
            policy[PolicyKey(s, INGRESS, TCP, ident, port, 16)] = PolicyValue(KAction.ALLOW)
        self.dp.set_ipcache(ipcache)
        self.dp.set_endpoints({client.ip: c, server.ip: s})
        self.dp.set_policy(policy)
        self.entries = self.dp.policy_entries()

    def attach(self, *pods: Pod) -> None:
        with self.node.entered():
            for pod in pods:
                self.dp.attach(pod.host_ifname, "pod")
                self.attached.append(pod.host_ifname)

    def detach(self) -> None:
        with self.node.entered():
            for ifname in self.attached:
                self.dp.detach(ifname)
        self.attached.clear()

    def remove(self) -> None:
        """Detach, unpin everything and release the program and map fds this process holds."""
        try:
            with self.node.entered():
                self.dp.uninstall()
        finally:
            if self.dp.bpf is not None:
                self.dp.bpf.cleanup()
                self.dp.bpf = None
            remove_bpf_root_if_empty()


def remove_bpf_root_if_empty() -> None:
    try:
        BPF_ROOT.rmdir()
    except OSError:
        pass  # another run still has pins there, or it is gone


# --- 2. an iptables chain of per-peer rules -----------------------------------------------------


class IptablesChain:
    """`L7G-BENCH` in the node's filter table: `rules` non-matching per-peer ACCEPTs, then the
    client's ACCEPT; jumped to from FORWARD only while `enabled()`. No conntrack shortcut: every
    forwarded packet walks the chain, as the naive per-peer approach does."""

    NAME = "L7G-BENCH"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.created_filter_table = False
        self.loaded = False

    def _ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = self.node.run(["iptables", "-w", *args])
        if check and out.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)} in {self.node.netns}: {out.stderr.strip()}")
        return out

    def load(self, client: Pod, server: Pod, port: int, rules: int) -> float:
        """Create the chain (not yet jumped to); returns the seconds iptables-restore took."""
        tables = self.node.run(["nft", "list", "tables"]).stdout
        self.created_filter_table = "table ip filter" not in tables
        base = int(ipaddress.IPv4Address("10.200.0.0"))
        lines = ["*filter", f":{self.NAME} - [0:0]"]
        match = f"-d {server.ip}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
        lines += [f"-A {self.NAME} -s {ipaddress.IPv4Address(base + i + 1)}/32 {match}" for i in range(rules)]
        lines += [f"-A {self.NAME} -s {client.ip}/32 {match}", "COMMIT", ""]
        t0 = time.perf_counter()
        out = self.node.run(["iptables-restore", "-w", "--noflush"], input="\n".join(lines))
        took = time.perf_counter() - t0
        self.loaded = True
        if out.returncode != 0:
            raise RuntimeError(f"iptables-restore in {self.node.netns}: {out.stderr.strip()}")
        return took

    @contextmanager
    def enabled(self) -> Iterator[None]:
        self._ipt("-I", "FORWARD", "1", "-j", self.NAME)
        try:
            yield
        finally:
            self._ipt("-D", "FORWARD", "-j", self.NAME)

    def accepted_packets(self) -> int:
        """Packets the client's ACCEPT (the chain's last rule) has matched."""
        out = self._ipt("-n", "-v", "-x", "-L", self.NAME).stdout.strip().splitlines()
        return int(out[-1].split()[0])

    def remove(self) -> None:
        if not self.loaded:
            return
        self._ipt("-D", "FORWARD", "-j", self.NAME, check=False)
        self._ipt("-F", self.NAME, check=False)
        self._ipt("-X", self.NAME, check=False)
        if self.created_filter_table:
            self.node.run(["nft", "delete", "table", "ip", "filter"])
        self.loaded = False


# --- agents ---------------------------------------------------------------------------------------


def seed_policies() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((SEED / name).read_text()))
    return docs


def loopback_pod(name: str, ns: str, ip: str, labels: dict[str, str], ports: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {"l7gate.io/cluster": "cluster-a"}},
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": p} for p in ports]}]},
        "status": {"podIP": ip},
    }


class AgentProcess:
    """`l7gate agent --config ...` in a testbed node namespace, started and stopped by PID."""

    def __init__(self, node: Node, work: Path, kernel: bool, manifests: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> None:
        """`extra`: top-level sections that replace or add to the generated config (e.g.
        `cluster`, `clusters`, `mtls`)."""
        self.node = node
        self.work = work
        self.kernel = kernel
        self.manifests = manifests
        self.pin_dir = BPF_ROOT / node.netns
        self.state = work / "state"
        self.proc: subprocess.Popen[Any] | None = None
        self.client = AdminClient(f"unix:{work}/admin.sock", timeout=30)
        work.mkdir(parents=True, exist_ok=True)
        datapath: dict[str, Any] = (
            {"mode": "kernel", "pinDir": str(self.pin_dir), "links": node.link_ifnames}
            if kernel else {"mode": "loopback", "upstreamPortOffset": OFFSET}
        )
        # A node whose pods have a cgroup (`add_node(cgroup=True)`): the agent's socket programs
        # attach there, and the agent (so its Envoy) runs in it, as a DaemonSet pod does under
        # kubepods: Envoy's sockets join the socket acceleration.
        self.cgroup = node.cgroup if kernel else None
        if self.cgroup is not None:
            datapath["cgroup"] = str(self.cgroup)
        self.config = work / "agent.yaml"
        self.config.write_text(yaml.safe_dump({
            "node": node.name,
            "cluster": {"name": "cluster-a", "id": 1},
            "stateDir": str(self.state),
            "admin": {"listen": f"unix:{work}/admin.sock"},
            "envoy": {"logLevel": "warning", "concurrency": 1},
            "datapath": datapath,
            **(extra or {}),
        }))

    def spawn(self) -> None:
        # Kernel mode pins under the host's /sys/fs/bpf: enter the network namespace only.
        self.proc = self.node.spawn([L7GATE, "agent", "--config", str(self.config)], net_only=self.kernel,
                                    cgroup=self.cgroup)

    def log_tail(self, n: int = 3000) -> str:
        if self.proc is None:
            return ""
        return self.node.testbed.log_path(self.proc).read_text(errors="replace")[-n:]

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"agent on {self.node.name} exited:\n{self.log_tail()}")

    def wait_admin(self, deadline: float) -> None:
        while True:
            try:
                self.client.get("/v1/status")
                return
            except OSError:
                pass
            except AdminError:
                pass  # the admin server answers a moment before the agent is fully built
            self.alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent admin API on {self.node.name} did not come up:\n{self.log_tail()}")
            time.sleep(0.005)

    def apply_seed(self) -> None:
        self.client.apply_endpoints(self.manifests)
        self.client.apply_policies(seed_policies())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def forget(self, pods: list[Pod]) -> None:
        """A first start: no state dir, no pins, nothing attached, no policy routing."""
        shutil.rmtree(self.state, ignore_errors=True)
        if not self.kernel:
            return
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        for pod in pods:
            self.node.run(["tc", "qdisc", "del", "dev", pod.host_ifname, "clsact"])
        self.node.run(["ip", "rule", "del", "fwmark", "0x200/0xf00", "lookup", "2004"])
        self.node.run(["ip", "route", "flush", "table", "2004"])


# --- request probes -----------------------------------------------------------------------------


def http_probe(where: Pod | Node, ip: str, port: int, method: str, path: str,
               connect_timeout: float = 0.1, timeout: float = 1.0) -> tuple[int, bool]:
    """One request on a fresh connection from `where`'s netns: (status, proxied by Envoy —
    the router's x-envoy-upstream-service-time header); (0, False) on any connection error.
    A short connect timeout: a dropped SYN is given up on (and retried on a new port by the
    caller) instead of waiting for the kernel's 1 s retransmission."""
    with where.entered():
        s = socket.socket()
    s.settimeout(connect_timeout)
    try:
        s.connect((ip, port))
        s.settimeout(timeout)
        body = b"{}" if method == "POST" else b""
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
                  f"Connection: close\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return 0, False
    finally:
        s.close()
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    m = re.match(r"http/1\.1 (\d{3})", head)
    if m is None:
        return 0, False
    return int(m.group(1)), "x-envoy-upstream-service-time:" in head


def wait_until(check: Callable[[], bool], timeout: float, what: str, on_fail: Callable[[], str] = lambda: "") -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what} not within {timeout} s\n{on_fail()}")
        time.sleep(0.01)
    return time.monotonic() - start


# --- the upstream and wrk -----------------------------------------------------------------------


def start_static_upstream(where: Pod | Node, ip: str, port: int, workdir: Path) -> subprocess.Popen[Any]:
    """An Envoy answering 200 by itself (`direct_response`) on ip:port inside `where`: the pod's
    server. Python's http.server tops out below what the proxy under test forwards."""
    from l7gate.l7proxy.supervisor import find_envoy

    workdir.mkdir(parents=True, exist_ok=True)
    boot = workdir / f"upstream-{where.name}.json"
    boot.write_text(json.dumps(_upstream_bootstrap(ip, port)))
    proc = where.spawn([str(find_envoy()), "-c", str(boot), "--disable-hot-restart", "--concurrency", "1",
                        "-l", "warning"])

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream Envoy in {where.name} exited: "
                               f"{where.testbed.log_path(proc).read_text()[-2000:]}")
        with where.entered():
            s = socket.socket()
        try:
            s.settimeout(0.5)
            s.connect((ip, port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    wait_until(listening, 20, f"upstream Envoy on {ip}:{port}")
    return proc


def _upstream_bootstrap(ip: str, port: int) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}],
        }]},
        # The buffer filter reads the whole request body before the direct response: without it
        # Envoy answers a POST before its body is read and closes the connection ("connection:
        # close" on every response), and each proxied request costs a new upstream connection.
        "http_filters": [
            {"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": 65536}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "node": {"id": "bench-upstream", "cluster": "bench"},
        "static_resources": {"listeners": [{
            "name": "upstream",
            "address": {"socket_address": {"address": ip, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


def wrk_script(path: Path) -> Path:
    path.write_text(f'wrk.method = "POST"\nwrk.body = "{{}}"\nwrk.headers["Host"] = "{HOST}"\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


def wrk(where: Pod | Node, url: str, seconds: float, script: Path, connections: int = 32,
        cpus: str | None = None) -> WrkResult:
    """`cpus`: run wrk on those CPUs only (taskset list, e.g. "1")."""
    pin = ["taskset", "-c", cpus] if cpus else []
    out = where.run([*pin, find_wrk(), "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url],
                    timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    return parse_wrk(out.stdout)

