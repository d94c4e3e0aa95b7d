"""The socket load balancer (lb.c, lb.py): a ClusterIP translated to a backend pod at connect(),
per datagram for unconnected UDP, and back for recvfrom()/getpeername(), for the processes of
one cgroup v2 only.

World: one testbed node with a client pod and three server pods. backend-a and backend-b
answer with their name (TCP: a line on accept; UDP: an echo prefixed with the name). The decoy
pod *holds the ClusterIP address* and answers as "decoy": a connect that is not translated
reaches it, so "not translated" is an answer, not a timeout. Translation applies to
processes in the test's own cgroup (`/sys/fs/cgroup/unified/l7g-lb-<random>`); the maps are
pinned in `/sys/fs/bpf/l7g-lb-<random>`. Both, and the testbed's namespaces, are removed at
the end even on failure."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable

from l7gate.redirect_bpf.lb import SocketLB, attachments, detach_all
from l7gate.redirect_bpf.loader import DatapathError, check_pins
from l7gate.testing.testbed import Pod, Testbed, remove_cgroup

pytestmark = [pytest.mark.privileged("netns, bcc cgroup sock_addr programs, cgroup v2"), pytest.mark.integration]

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
SVC_TCP, SVC_UDP = 80, 53  # the service's ports on the ClusterIP
POD_TCP, POD_UDP = 8080, 5353  # the backends' target ports

SERVER = r"""
import socket, sys, threading
name, ip, tport, uport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((ip, tport))
t.listen(4096)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((ip, uport))
def udp():
    while True:
        data, addr = u.recvfrom(4096)
        u.sendto(name.encode() + b" " + data, addr)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = t.accept()
    try:
        c.sendall(name.encode() + b"\n")
    except OSError:
        pass
    c.close()
"""

# One-shot client actions; prints one JSON document.
CLIENT = r"""
import errno, json, os, socket, sys, threading, time
cmd, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def name_of(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(64)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()

def one_tcp():
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((ip, port))
        return name_of(s), list(s.getpeername())
    except OSError as e:
        return f"error:{errno.errorcode.get(e.errno, e.errno)}", None
    finally:
        s.close()

if cmd == "tcp":
    counts = {}
    for _ in range(int(sys.argv[4])):
        name = one_tcp()[0]
        counts[name] = counts.get(name, 0) + 1
    print(json.dumps(counts))
elif cmd == "peer":
    name, peer = one_tcp()
    print(json.dumps({"name": name, "peer": peer}))
elif cmd == "refused":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if sys.argv[4] == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(5)
    t0 = time.monotonic()
    try:
        if sys.argv[4] == "udp":
            s.sendto(b"x", (ip, port))
        else:
            s.connect((ip, port))
        err = None
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    print(json.dumps({"error": err, "seconds": time.monotonic() - t0}))
elif cmd == "udp":
    out = []
    for i in range(int(sys.argv[4])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(f"ping{i}".encode(), (ip, port))
            data, addr = s.recvfrom(4096)
            out.append({"from": list(addr), "reply": data.decode()})
        except OSError as e:
            out.append({"error": str(e)})
        finally:
            s.close()
    print(json.dumps(out))
elif cmd == "udp-connected":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((ip, port))
    s.send(b"hello")
    data, addr = s.recvfrom(4096)
    print(json.dumps({"from": list(addr), "reply": data.decode(), "peer": list(s.getpeername())}))
elif cmd == "hammer":
    # connect until the stop file exists; one line per connect: its start and end times
    # (CLOCK_MONOTONIC, ns, taken before connect() and after the answer) and the answer
    stop, threads = sys.argv[4], int(sys.argv[5])
    lock = threading.Lock()
    def loop():
        while not os.path.exists(stop):
            t0 = time.monotonic_ns()
            name, _ = one_tcp()
            t1 = time.monotonic_ns()
            with lock:
                print(f"{t0} {t1} {name}", flush=True)
    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
"""


@dataclass
class World:
    tb: Testbed
    client: Pod
    a: Pod
    b: Pod
    decoy: Pod
    cgroup: Path
    pins: Path
    lbs: list[SocketLB] = field(default_factory=list)

    @property
    def vip(self) -> str:
        return self.decoy.ip

    @property
    def lb(self) -> SocketLB:
        return self.lbs[-1]

    def run(self, *args: object, inside: bool = True) -> Any:
        """A client action in the client pod, in the test's cgroup (`inside`) or not."""
        argv = [sys.executable, "-c", CLIENT, *map(str, args)]
        out = self.client.run(argv, cgroup=self.cgroup if inside else None, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def both(self) -> dict[tuple[str, int, str], list[tuple[str, int]]]:
        return {(self.vip, SVC_TCP, "TCP"): [(self.a.ip, POD_TCP), (self.b.ip, POD_TCP)],
                (self.vip, SVC_UDP, "UDP"): [(self.a.ip, POD_UDP), (self.b.ip, POD_UDP)]}

    def only(self, pod: Pod) -> dict[tuple[str, int, str], list[tuple[str, int]]]:
        return {(self.vip, SVC_TCP, "TCP"): [(pod.ip, POD_TCP)],
                (self.vip, SVC_UDP, "UDP"): [(pod.ip, POD_UDP)]}


class Hammer:
    """Connects to the ClusterIP in a loop from the client pod, inside the cgroup, until
    stopped; every connect is logged with the CLOCK_MONOTONIC times at which it started and
    ended (its backend was chosen in between)."""

    def __init__(self, w: World, threads: int = 2) -> None:
        self.stop_file = w.tb.workdir / f"stop-{secrets.token_hex(3)}"
        self.proc = w.client.spawn([sys.executable, "-c", CLIENT, "hammer", w.vip, str(SVC_TCP),
                                    str(self.stop_file), str(threads)], cgroup=w.cgroup)
        self.log = w.tb.log_path(self.proc)

    def spans(self) -> list[tuple[int, int, str]]:
        """(start, end, answer) of every connect so far."""
        out = []
        for line in self.log.read_text().splitlines():
            t0, t1, name = (line.split(" ", 2) + ["", ""])[:3]
            if t0.isdigit() and t1.isdigit() and name:
                out.append((int(t0), int(t1), name))
        return out

    def lines(self) -> list[tuple[int, str]]:
        """(start, answer) of every connect so far."""
        return [(t0, name) for t0, _, name in self.spans()]

    def wait_for(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < n:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"the hammer made {len(self.lines())} connects, expected {n}"
            time.sleep(0.02)

    def finish(self) -> list[tuple[int, str]]:
        self.stop()
        return self.lines()

    def stop(self) -> None:
        self.stop_file.touch()
        self.proc.wait(timeout=20)


def _start_server(pod: Pod, name: str, tport: int, uport: int) -> None:
    proc = pod.spawn([sys.executable, "-c", SERVER, name, pod.ip, str(tport), str(uport)])
    log = pod.testbed.log_path(proc)
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        unavailable(f"no cgroup v2 at {CGROUP_ROOT}")
    if not os.path.ismount(BPFFS):
        unavailable(f"bpffs is not mounted at {BPFFS}")
    tag = secrets.token_hex(3)
    cg, pins = CGROUP_ROOT / f"l7g-lb-{tag}", BPFFS / f"l7g-lb-{tag}"
    with Testbed() as tb:
        w: World | None = None
        cg.mkdir()
        try:
            node = tb.add_node("lb")
            client = tb.add_pod(node, "default", "client")
            a = tb.add_pod(node, "default", "backend-a")
            b = tb.add_pod(node, "default", "backend-b")
            decoy = tb.add_pod(node, "default", "decoy")
            for pod, name in ((a, "backend-a"), (b, "backend-b")):
                _start_server(pod, name, POD_TCP, POD_UDP)
            _start_server(decoy, "decoy", SVC_TCP, SVC_UDP)
            w = World(tb, client, a, b, decoy, cg, pins)
            lb = SocketLB(pins)
            w.lbs.append(lb)
            lb.open()
            lb.attach(cg)
            yield w
        finally:
            try:
                detach_all(cg)
            finally:
                for lb in w.lbs if w is not None else []:
                    lb.close()
                shutil.rmtree(pins, ignore_errors=True)
                remove_cgroup(cg)


def test_tcp_to_the_clusterip_reaches_both_backends(world: World) -> None:
    world.lb.set_services(world.both())
    counts = world.run("tcp", world.vip, SVC_TCP, 200)
    assert set(counts) == {"backend-a", "backend-b"}, counts  # no decoy, no error
    assert sum(counts.values()) == 200
    assert min(counts.values()) >= 50, f"each backend should get >= 25% of 200: {counts}"


def test_getpeername_returns_the_clusterip(world: World) -> None:
    world.lb.set_services(world.both())
    got = world.run("peer", world.vip, SVC_TCP)
    assert got["name"] in ("backend-a", "backend-b")  # really answered by a backend
    assert got["peer"] == [world.vip, SVC_TCP]


def test_udp_to_the_clusterip_works_both_ways(world: World) -> None:
    world.lb.set_services(world.both())
    replies = world.run("udp", world.vip, SVC_UDP, 40)
    assert all("error" not in r for r in replies), replies
    assert all(r["from"] == [world.vip, SVC_UDP] for r in replies), replies  # recvfrom sees the VIP
    answered = Counter(r["reply"].split()[0] for r in replies)
    assert set(answered) == {"backend-a", "backend-b"}, answered  # 40 sockets, both backends
    assert all(r["reply"].endswith(f"ping{i}") for i, r in enumerate(replies))
    connected = world.run("udp-connected", world.vip, SVC_UDP)
    assert connected["reply"].split()[0] in ("backend-a", "backend-b")
    assert connected["from"] == [world.vip, SVC_UDP]
    assert connected["peer"] == [world.vip, SVC_UDP]


def test_processes_outside_the_cgroup_are_not_translated(world: World) -> None:
    world.lb.set_services(world.both())
    assert world.run("tcp", world.vip, SVC_TCP, 20, inside=False) == {"decoy": 20}
    replies = world.run("udp", world.vip, SVC_UDP, 5, inside=False)
    assert [r["reply"].split()[0] for r in replies] == ["decoy"] * 5


def test_no_backends_fails_fast(world: World) -> None:
    world.lb.set_services({(world.vip, SVC_TCP, "TCP"): [], (world.vip, SVC_UDP, "UDP"): []})
    try:
        tcp = world.run("refused", world.vip, SVC_TCP, "tcp")
        udp = world.run("refused", world.vip, SVC_UDP, "udp")
    finally:
        world.lb.set_services(world.both())
    # Cilium's answer: EHOSTUNREACH at once, nothing sent (and never the decoy)
    assert tcp["error"] == "EHOSTUNREACH" and tcp["seconds"] < 0.2, tcp
    assert udp["error"] == "EHOSTUNREACH" and udp["seconds"] < 0.2, udp


def test_a_removed_backend_is_never_chosen_after_the_update_returns(world: World) -> None:
    lb = world.lb
    lb.set_services(world.both())
    hammer = Hammer(world, threads=2)
    windows: list[tuple[int, int, str]] = []  # [update returned, next update called): removed pod
    try:
        hammer.wait_for(50)
        for i in range(8):
            removed, kept = (world.b, world.a) if i % 2 == 0 else (world.a, world.b)
            lb.set_services(world.both())
            time.sleep(0.1)
            assert lb.set_services(world.only(kept)) == 2
            returned = time.monotonic_ns()
            time.sleep(0.25)
            windows.append((returned, time.monotonic_ns(), removed.name))
    finally:
        hammer.stop()
    log = hammer.spans()
    lb.set_services(world.both())
    answers = Counter(name for _, _, name in log)
    assert set(answers) == {"backend-a", "backend-b"}, f"errors or untranslated connects: {answers}"
    for start, end, gone in windows:
        # connects that began after the update returned and ended before the next update began
        # (one that ends after it may have been balanced by it: the removed backend is back then)
        inside = [name for t0, t1, name in log if start <= t0 and t1 < end]
        assert len(inside) >= 20, f"only {len(inside)} connects in a window: the hammer stalled"
        assert gone not in inside, (f"{inside.count(gone)} of {len(inside)} connects started after "
                                    f"the update returned still reached {gone}")
    # and the removed one was really in rotation just before each removal
    assert answers["backend-a"] > 50 and answers["backend-b"] > 50


def test_agent_restart_keeps_translating_and_reconciles(world: World) -> None:
    old = world.lb
    old.set_services(world.both())
    before = old.kernel_entries()
    # a writer that died between writing slots and switching leaves an orphan slot behind
    _, backends = old._tables()
    backends[backends.Key(4_000_000_000, 0)] = backends.Leaf(1, 1, 0)
    hammer = Hammer(world, threads=2)
    try:
        hammer.wait_for(30)
        new = SocketLB(world.pins)  # a restarted agent: same pins, a fresh bcc module
        world.lbs.append(new)
        new.open()
        assert new.replaced == []
        assert new.repaired == 1
        assert new.services() == old.services()
        assert new.set_services(world.both()) == 0  # read back: nothing to write
        new.attach(world.cgroup)  # replaces the old programs, gap-free
        old.close()
        hooks = attachments(world.cgroup)
        assert len(hooks) == 4 and len({h.hook for h in hooks}) == 4, hooks  # one each, none twice
        hammer.wait_for(len(hammer.lines()) + 30)
        assert new.set_services(world.only(world.a)) == 2
        changed = time.monotonic_ns()
        hammer.wait_for(len(hammer.lines()) + 50)
    finally:
        log = hammer.finish()
    after = new.kernel_entries()
    live_before = {sid for _, sid in before.values()}
    assert all(sid not in live_before and sid > max(live_before) for _, sid in after.values()), (before, after)
    answers = Counter(name for _, name in log)
    assert set(answers) <= {"backend-a", "backend-b"}, f"a gap in translation: {answers}"
    assert not [n for t, n in log if t >= changed and n != "backend-a"]
    new.set_services(world.both())
    assert world.run("peer", world.vip, SVC_TCP)["peer"] == [world.vip, SVC_TCP]


def test_foreign_pinned_lb_map_is_refused_and_replaced() -> None:
    if not os.path.ismount(BPFFS):
        unavailable(f"bpffs is not mounted at {BPFFS}")
    pins = BPFFS / f"l7g-lb-{secrets.token_hex(3)}"
    pins.mkdir()
    lb = SocketLB(pins)
    try:
        subprocess.run(["bpftool", "map", "create", str(pins / "lb_services"), "type", "hash", "key", "4",
                        "value", "4", "entries", "16", "name", "foreign"], check=True)
        problems = check_pins(pins)
        assert any("lb_services" in p and "expected hash 8/8" in p for p in problems), problems
        lb.open()
        assert lb.replaced
        assert check_pins(pins) == []
        assert lb.set_services({("10.96.0.1", 443, "TCP"): [("10.1.0.5", 6443)]}) == 1
        assert lb.services() == {("10.96.0.1", 443, "TCP"): [("10.1.0.5", 6443)]}
        with pytest.raises(DatapathError, match="unknown protocol"):
            lb.set_services({("10.96.0.1", 443, "ICMP"): []})
    finally:
        lb.uninstall()
        shutil.rmtree(pins, ignore_errors=True)
    assert not pins.exists()
