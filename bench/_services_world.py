"""Helpers for bench_services: connect timing from a process inside (or outside) a cgroup,
the socket load balancer loaded into a cgroup of the bench's own, BPF run-time statistics,
and an iptables DNAT ruleset of N services as kube-proxy (iptables mode) builds it.

Network hygiene: everything runs inside the namespaces of a `Testbed` (l7g-prefixed, removed
at the end). Cgroups are `/sys/fs/cgroup/unified/l7g-lb-bench-<random>-<tag>`, pins
`/sys/fs/bpf/l7g-lb-bench-<random>-<tag>`, iptables chains `L7G-*` in a testbed node's nat
table only; all removed at the end. Processes are started through the testbed (ended by PID
at teardown) or stopped here by PID.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from l7gate.redirect_bpf.lb import SocketLB, detach_all
from l7gate.testing.testbed import Node, Pod, remove_cgroup

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
SERVICE_NET = ipaddress.IPv4Network("10.96.0.0/16")  # ClusterIPs
FAKE_BACKENDS = ipaddress.IPv4Network("10.200.0.0/16")  # backends of the services nobody dials
SVC_PORT = 80

# A long-lived connect timer: reads "ip port n warmup [ip2 port2]" lines, answers one JSON line
# per request with the seconds each of the n timed connect() calls took; with a second target,
# connects alternate between the two (A B, B A, A B, ...), n of each, timed separately. Each
# socket is closed with a RST (SO_LINGER 0), so no TIME_WAIT piles up and every block pays the
# same for port allocation.
CONNECTOR = r"""
import errno, gc, json, socket, struct, sys, time
LINGER = struct.pack("ii", 1, 0)
errors = {}
def one(ip, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER)
    s.settimeout(2.0)
    try:
        t0 = time.perf_counter()
        s.connect((ip, port))
        return time.perf_counter() - t0
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e))
        errors[name] = errors.get(name, 0) + 1
        return None
    finally:
        s.close()
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    targets = [(words[0], int(words[1]))] + ([(words[4], int(words[5]))] if len(words) > 4 else [])
    n, warmup = int(words[2]), int(words[3])
    samples = [[] for _ in targets]
    errors.clear()
    gc.disable()
    for i in range(n + warmup):
        order = list(range(len(targets)))
        if i % 2:
            order.reverse()
        for k in order:
            t = one(*targets[k])
            if i >= warmup and t is not None:
                samples[k].append(t)
    gc.enable()
    print(json.dumps({"samples": samples, "errors": errors}), flush=True)
"""


class ConnectError(RuntimeError):
    pass


class Connector:
    """A `CONNECTOR` process in `pod`, in `cgroup` (None: outside every l7gate cgroup), pinned
    to `cpu`. Sockets are created in that process, so the cgroup's programs see them."""

    def __init__(self, pod: Pod, cgroup: Path | None, cpu: int | None, label: str) -> None:
        self.label = label
        argv = [sys.executable, "-c", CONNECTOR]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.proc = pod.spawn(argv, cgroup=cgroup, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"connector {label} did not start: {line!r}")

    def samples(self, ip: str, port: int, n: int, warmup: int = 30) -> list[float]:
        """Seconds of `n` connects to ip:port; raises ConnectError if any failed."""
        return self._ask(f"{ip} {port} {n} {warmup}", f"{ip}:{port}")[0]

    def paired(self, a: tuple[str, int], b: tuple[str, int], n: int, warmup: int = 30
               ) -> tuple[list[float], list[float]]:
        """Seconds of `n` connects to each of `a` and `b`, alternating (A B, B A, ...), so that
        both see the same moment of the machine; raises ConnectError if any failed."""
        got = self._ask(f"{a[0]} {a[1]} {n} {warmup} {b[0]} {b[1]}", f"{a[0]}:{a[1]} and {b[0]}:{b[1]}")
        return got[0], got[1]

    def _ask(self, request: str, what: str) -> list[list[float]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{request}\n".encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        try:
            answer: dict[str, Any] = json.loads(line)
        except ValueError:
            raise RuntimeError(f"connector {self.label}: {line[-2000:]!r}") from None
        if answer["errors"]:
            raise ConnectError(f"connector {self.label} to {what}: {answer['errors']}")
        return [[float(x) for x in samples] for samples in answer["samples"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def make_cgroup(name: str) -> Path:
    path = CGROUP_ROOT / name
    path.mkdir()
    return path


def services(n: int, measured: int, backend: tuple[str, int]) -> dict[tuple[str, int, str], list[tuple[str, int]]]:
    """`n` TCP services on ClusterIP:80, two backends each; service number `measured` has the
    bench's server twice (both slots), the others fake pod addresses nobody dials."""
    out: dict[tuple[str, int, str], list[tuple[str, int]]] = {}
    for i in range(n):
        if i == measured:
            out[(cluster_ip(i), SVC_PORT, "TCP")] = [backend, backend]
        else:
            base = int(FAKE_BACKENDS.network_address) + 2 * i + 1
            out[(cluster_ip(i), SVC_PORT, "TCP")] = [
                (str(ipaddress.IPv4Address(base)), 8080), (str(ipaddress.IPv4Address(base + 1)), 8080)]
    return out


def cluster_ip(i: int) -> str:
    return str(SERVICE_NET.network_address + 1 + i)


class LoadedLB:
    """A `SocketLB` in pins of its own, holding `n` services, attached to a cgroup of its own."""

    def __init__(self, tag: str, n: int, measured: int, backend: tuple[str, int]) -> None:
        self.n = n
        self.cgroup = make_cgroup(f"l7g-lb-bench-{tag}")
        self.lb = SocketLB(BPFFS / f"l7g-lb-bench-{tag}")
        self.write_s = 0.0
        try:
            self.lb.open()
            t0 = time.perf_counter()
            self.lb.set_services(services(n, measured, backend))
            self.write_s = time.perf_counter() - t0
            self.lb.attach(self.cgroup)
        except BaseException:
            self.remove()
            raise

    def connect_prog_fd(self) -> int:
        return int(self.lb._fns["l7g_lb_connect4"].fd)

    def remove(self) -> None:
        """Detach, unpin, release the fds, remove the cgroup."""
        try:
            detach_all(self.cgroup)
            self.lb.uninstall()
        finally:
            shutil.rmtree(self.lb.pin_dir, ignore_errors=True)
            remove_cgroup(self.cgroup)


# --- BPF run-time statistics ---------------------------------------------------------------------

_BPF_ENABLE_STATS = 32  # enum bpf_cmd
_BPF_STATS_RUN_TIME = 0
_SYS_BPF = 321  # x86_64


@contextmanager
def bpf_run_time_stats() -> Iterator[bool]:
    """Kernel-wide BPF run-time accounting while the body runs (BPF_ENABLE_STATS: on while the
    returned fd is open, off again when it is closed). Yields False if the kernel refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 2)(_BPF_STATS_RUN_TIME, 0)
    fd = libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind `fd`, from /proc/self/fdinfo."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                  if ":\t" in line)
    return int(fields.get("run_time_ns", "0")), int(fields.get("run_cnt", "0"))


# --- kube-proxy's iptables DNAT rules ------------------------------------------------------------


class KubeProxyChains:
    """What kube-proxy (iptables mode) writes to the nat table for `n` ClusterIP services with
    two endpoints each, l7g-prefixed: L7G-KUBE-SERVICES holds one rule per service port
    (`-d clusterIP -p tcp --dport 80 -j L7G-SVC-<n>`, in service order); L7G-SVC-<n> sends half
    the new connections (`-m statistic --mode random --probability 0.5`) to L7G-SEP-<n>A and the
    rest to L7G-SEP-<n>B; an endpoint chain marks hairpin traffic for masquerade and DNATs to the
    endpoint. PREROUTING jumps to L7G-KUBE-SERVICES only while `enabled()`, and only for the
    ClusterIP range (kube-proxy: always, for every new connection, from PREROUTING for pod
    traffic and OUTPUT for the host's — so its connects straight to pods walk the whole chain
    too, which is not counted here)."""

    SERVICES = "L7G-KUBE-SERVICES"
    MARK_MASQ = "L7G-MARK-MASQ"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.created_nat_table = False
        self.loaded = False
        self.chains: list[str] = []

    def _ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = self.node.run(["iptables", "-w", "-t", "nat", *args])
        if check and out.returncode != 0:
            raise RuntimeError(f"iptables -t nat {' '.join(args)} in {self.node.netns}: {out.stderr.strip()}")
        return out

    def load(self, svcs: dict[tuple[str, int, str], list[tuple[str, int]]]) -> float:
        """Write the rules (not yet jumped to); returns the seconds iptables-restore took."""
        self.created_nat_table = "table ip nat" not in self.node.run(["nft", "list", "tables"]).stdout
        lines = ["*nat", f":{self.SERVICES} - [0:0]", f":{self.MARK_MASQ} - [0:0]"]
        rules = [f"-A {self.MARK_MASQ} -j MARK --set-xmark 0x4000/0x4000"]
        for i, ((vip, port, _), endpoints) in enumerate(svcs.items()):
            svc = f"L7G-SVC-{i:05d}"
            seps = [f"L7G-SEP-{i:05d}{chr(ord('A') + k)}" for k in range(len(endpoints))]
            lines += [f":{c} - [0:0]" for c in (svc, *seps)]
            comment = f'-m comment --comment "bench/svc-{i}:http cluster IP"'
            rules.append(f"-A {self.SERVICES} -d {vip}/32 -p tcp {comment} -m tcp --dport {port} -j {svc}")
            for k, (sep, (ip, eport)) in enumerate(zip(seps, endpoints)):
                left = len(seps) - k
                prob = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
                rules.append(f"-A {svc} {prob}-j {sep}")
                rules.append(f"-A {sep} -s {ip}/32 -j {self.MARK_MASQ}")
                rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{eport}")
            self.chains += [svc, *seps]
        self.chains += [self.SERVICES, self.MARK_MASQ]
        text = "\n".join(lines + rules + ["COMMIT", ""])
        t0 = time.perf_counter()
        out = self.node.run(["iptables-restore", "-w", "--noflush"], input=text, timeout=600)
        took = time.perf_counter() - t0
        self.loaded = True
        if out.returncode != 0:
            raise RuntimeError(f"iptables-restore in {self.node.netns}: {out.stderr.strip()[-2000:]}")
        return took

    @contextmanager
    def enabled(self) -> Iterator[None]:
        """PREROUTING jumps to L7G-KUBE-SERVICES for the ClusterIP range only (kube-proxy: for
        every packet), so that connects straight to a pod, the baseline, do not walk it."""
        self._ipt("-I", "PREROUTING", "1", "-d", str(SERVICE_NET), "-j", self.SERVICES)
        try:
            yield
        finally:
            self._ipt("-D", "PREROUTING", "-d", str(SERVICE_NET), "-j", self.SERVICES)

    def packets(self, chain: str) -> int:
        """Packets that entered `chain` (the sum of its rules' counters)."""
        out = self._ipt("-n", "-v", "-x", "-L", chain).stdout.strip().splitlines()[2:]
        return sum(int(line.split()[0]) for line in out if line.strip())

    def remove(self) -> None:
        if not self.loaded:
            return
        self._ipt("-D", "PREROUTING", "-d", str(SERVICE_NET), "-j", self.SERVICES, check=False)
        if self.created_nat_table:
            self.node.run(["nft", "delete", "table", "ip", "nat"])
        else:
            text = "\n".join(["*nat", *(f"-F {c}" for c in self.chains), *(f"-X {c}" for c in self.chains),
                              "COMMIT", ""])
            self.node.run(["iptables-restore", "-w", "--noflush"], input=text, timeout=600)
        self.loaded = False

