"""The DNS proxy in forwarding mode on loopback, in front of a real dnsmasq: what clients get
(answers, REFUSED/NXDOMAIN, SERVFAIL), what the owner learns and when (on_answer before the
client has the answer), what reaches the resolver (refused names never do), UDP and TCP,
malformed input, limits, events, and 1,000 queries at once.

dnsmasq runs as a child process on 127.88.0.1 and a free high port, serving only the names
below; the proxy listens on 127.88.0.2; the client sends from 127.88.0.3.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from l7gate.dnsproxy import DNSAnswer, DNSEvent, DNSLimits, DNSProxy, DNSVerdict
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

DNSMASQ = "/usr/sbin/dnsmasq"
RESOLVER_IP = "127.88.0.1"
PROXY_IP = "127.88.0.2"
CLIENT_IP = "127.88.0.3"

API_IPS = ("127.88.0.10",)
DB_IPS = ("127.88.0.20", "127.88.0.21")


def require_dnsmasq() -> None:
    if not os.access(DNSMASQ, os.X_OK):
        unavailable(f"needs {DNSMASQ} (Debian package dnsmasq-base; `make install`)")


def dnsmasq_argv(ip: str, port: int, pid_file: Path) -> list[str]:
    """dnsmasq serving the test names and nothing else: no /etc/dnsmasq.conf, no resolv.conf,
    no /etc/hosts; unknown names under example.test are NXDOMAIN; every query is logged.

    - api.example.test      A 127.88.0.10 (TTL 30)
    - db.example.test       A 127.88.0.20, 127.88.0.21, AAAA fd00::20 (TTL 60)
    - alias.example.test    CNAME mid.example.test (TTL 20) → CNAME db.example.test (TTL 40)
    """
    return [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
            f"--listen-address={ip}", "--bind-interfaces", f"--port={port}", f"--pid-file={pid_file}",
            "--log-facility=-", "--log-queries", "--local-ttl=30", "--local=/example.test/",
            "--address=/api.example.test/127.88.0.10",
            "--host-record=db.example.test,127.88.0.20,fd00::20,60",
            "--host-record=db.example.test,127.88.0.21,60",
            "--cname=alias.example.test,mid.example.test,20",
            "--cname=mid.example.test,db.example.test,40"]


def wait_answering(ip: str, port: int, proc: subprocess.Popen[Any], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            dns.query.udp(dns.message.make_query("api.example.test", "A"), ip, port=port, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"dnsmasq does not answer on {ip}:{port}: {log.read_text(errors='replace')[-2000:]}")


def logged_queries(log: Path, name: str) -> int:
    """How many queries for `name` dnsmasq received (its --log-queries lines)."""
    pattern = re.compile(rf"query\[\w+\] {re.escape(name)} from ", re.IGNORECASE)
    return len(pattern.findall(log.read_text(errors="replace")))


def free_port(ip: str) -> int:
    """A port free for both UDP and TCP on ip (a race with other processes remains; the
    caller retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        u.bind((ip, 0))
        port = int(u.getsockname()[1])
        t.bind((ip, port))
        return port


class Dnsmasq:
    """A dnsmasq child process, ended by its PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "dnsmasq.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.address = (RESOLVER_IP, 0)

    def start(self) -> None:
        last = ""
        for _ in range(5):
            port = free_port(RESOLVER_IP)
            with self.log.open("w") as out:
                self.proc = subprocess.Popen(dnsmasq_argv(RESOLVER_IP, port, self.workdir / "dnsmasq.pid"),
                                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                wait_answering(RESOLVER_IP, port, self.proc, self.log)
                self.address = (RESOLVER_IP, port)
                return
            except RuntimeError as exc:
                last = str(exc)
                self.stop()
        raise RuntimeError(f"dnsmasq did not start: {last}")

    def queries(self, name: str) -> int:
        return logged_queries(self.log, name)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    require_dnsmasq()
    server = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Owner:
    """The agent's side: a judge allowing names by suffix, and a record of what it was told."""

    def __init__(self, denied: Sequence[str] = ("secret.example.test",)) -> None:
        self.denied = tuple(denied)
        self.judged: list[tuple[str, str, str, str]] = []
        self.learned: list[tuple[str, list[DNSAnswer]]] = []
        self.events: list[DNSEvent] = []
        self.lock = threading.Lock()

    def judge(self, src: str, server: str, qname: str, qtype: str) -> DNSVerdict:
        with self.lock:
            self.judged.append((src, server, qname, qtype))
        if qname in self.denied:
            return DNSVerdict(False, "no rule allows it")
        return DNSVerdict(True, "allowed", ("default/allow-dns",))

    def on_answer(self, src: str, answers: list[DNSAnswer]) -> None:
        with self.lock:
            self.learned.append((src, answers))

    def on_event(self, ev: DNSEvent) -> None:
        with self.lock:
            self.events.append(ev)


ProxyFactory = Callable[..., DNSProxy]


@pytest.fixture
def make_proxy(dnsmasq: Dnsmasq) -> Iterator[ProxyFactory]:
    started: list[DNSProxy] = []

    def make(owner: Owner, **kwargs: Any) -> DNSProxy:
        kwargs.setdefault("upstream", dnsmasq.address)
        proxy = DNSProxy(owner.judge, owner.on_answer, owner.on_event, listen=(PROXY_IP, 0), transparent=False,
                         **kwargs)
        proxy.start()
        started.append(proxy)
        assert proxy.address is not None, proxy.problems()
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def ask(proxy: DNSProxy, name: str, rdtype: str = "A", *, tcp: bool = False, timeout: float = 3.0) -> dns.message.Message:
    assert proxy.address is not None
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    r = send(q, proxy.address[0], port=proxy.address[1], timeout=timeout, source=CLIENT_IP)
    assert q.is_response(r)
    return r


def addresses(r: dns.message.Message) -> set[str]:
    return {rd.address for rrset in r.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rd in rrset}


both = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])


# --- allowed names -------------------------------------------------------------------------------


@both
def test_allowed_name_is_answered_and_learned(make_proxy: ProxyFactory, tcp: bool) -> None:
    owner = Owner()
    proxy = make_proxy(owner)
    r = ask(proxy, "Api.Example.TEST", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == set(API_IPS)
    assert owner.judged == [(CLIENT_IP, PROXY_IP, "api.example.test", "A")]
    assert owner.learned == [(CLIENT_IP, [DNSAnswer("api.example.test", API_IPS, 30)])]


@both
def test_cname_chain_every_name_learns_the_final_addresses(make_proxy: ProxyFactory, tcp: bool) -> None:
    owner = Owner()
    proxy = make_proxy(owner)
    r = ask(proxy, "alias.example.test", tcp=tcp)
    assert addresses(r) == set(DB_IPS)
    ((src, answers),) = owner.learned
    assert src == CLIENT_IP
    assert [(a.name, set(a.ips), a.ttl) for a in answers] == [
        ("alias.example.test", set(DB_IPS), 20), ("mid.example.test", set(DB_IPS), 40),
        ("db.example.test", set(DB_IPS), 60)]
    r6 = ask(proxy, "alias.example.test", "AAAA", tcp=tcp)
    assert addresses(r6) == {"fd00::20"}
    assert owner.learned[1][1][0] == DNSAnswer("alias.example.test", ("fd00::20",), 20)


@both
def test_on_answer_runs_before_the_client_gets_the_answer(make_proxy: ProxyFactory, tcp: bool) -> None:
    """on_answer blocks; meanwhile the client has nothing; once it returns, the answer comes."""
    entered, release = threading.Event(), threading.Event()
    returned_at: list[float] = []

    class Slow(Owner):
        def on_answer(self, src: str, answers: list[DNSAnswer]) -> None:
            entered.set()
            release.wait(10)
            super().on_answer(src, answers)
            returned_at.append(time.monotonic())

    owner = Slow()
    proxy = make_proxy(owner)
    got: list[tuple[float, dns.message.Message]] = []
    client = threading.Thread(target=lambda: got.append((0.0, ask(proxy, "api.example.test", tcp=tcp, timeout=8))))
    client.start()
    try:
        assert entered.wait(5), "on_answer was not called"
        time.sleep(0.5)
        assert client.is_alive() and not got, "the client got the answer while on_answer was running"
    finally:
        release.set()
    client.join(10)
    received_at = time.monotonic()
    assert got and addresses(got[0][1]) == set(API_IPS)
    assert returned_at and returned_at[0] <= received_at
    assert owner.learned == [(CLIENT_IP, [DNSAnswer("api.example.test", API_IPS, 30)])]


def test_nxdomain_is_relayed_and_teaches_nothing(make_proxy: ProxyFactory) -> None:
    owner = Owner()
    proxy = make_proxy(owner)
    r = ask(proxy, "nope.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert owner.learned == []


# --- refused names -------------------------------------------------------------------------------


@both
def test_refused_name_gets_refused_and_is_never_forwarded(make_proxy: ProxyFactory, dnsmasq: Dnsmasq,
                                                          tcp: bool) -> None:
    owner = Owner(denied=["secret.example.test"])
    proxy = make_proxy(owner)
    forwarded_before = dnsmasq.queries("api.example.test")
    r = ask(proxy, "Secret.Example.Test", tcp=tcp)
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    assert r.question[0].name.to_text() == "Secret.Example.Test."
    ask(proxy, "api.example.test", tcp=tcp)  # an allowed one after it: dnsmasq's log is current
    assert dnsmasq.queries("api.example.test") == forwarded_before + 1
    assert dnsmasq.queries("secret.example.test") == 0
    assert owner.learned == [(CLIENT_IP, [DNSAnswer("api.example.test", API_IPS, 30)])]
    assert proxy.status()["refused"] == 1


def test_refused_with_name_error_gets_nxdomain(make_proxy: ProxyFactory, dnsmasq: Dnsmasq) -> None:
    owner = Owner(denied=["secret.example.test"])
    proxy = make_proxy(owner, refused_rcode="nameError")
    for tcp in (False, True):
        r = ask(proxy, "secret.example.test", tcp=tcp)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert dnsmasq.queries("secret.example.test") == 0
    assert proxy.status()["reject_rcode"] == "NXDOMAIN"


def test_a_judge_that_fails_denies(make_proxy: ProxyFactory, dnsmasq: Dnsmasq) -> None:
    class Broken(Owner):
        def judge(self, src: str, server: str, qname: str, qtype: str) -> DNSVerdict:
            raise RuntimeError("policy not ready")

    owner = Broken()
    proxy = make_proxy(owner)
    assert ask(proxy, "failclosed.example.test").rcode() == dns.rcode.REFUSED
    assert dnsmasq.queries("failclosed.example.test") == 0
    (ev,) = owner.events
    assert ev.verdict is not None and not ev.verdict.allowed and "policy not ready" in ev.verdict.reason


# --- TCP -----------------------------------------------------------------------------------------


def _frame(msg: dns.message.Message) -> bytes:
    wire = msg.to_wire()
    return struct.pack("!H", len(wire)) + wire


def _read_frame(sock: socket.socket) -> bytes:
    head = _recv_exactly(sock, 2)
    return _recv_exactly(sock, struct.unpack("!H", head)[0])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _connect(proxy: DNSProxy) -> socket.socket:
    assert proxy.address is not None
    sock = socket.create_connection(proxy.address, timeout=5, source_address=(CLIENT_IP, 0))
    return sock


def test_tcp_pipelined_queries_on_one_connection(make_proxy: ProxyFactory, dnsmasq: Dnsmasq) -> None:
    owner = Owner(denied=["secret.example.test"])
    proxy = make_proxy(owner)
    queries = [dns.message.make_query(n, "A") for n in ("api.example.test", "secret.example.test",
                                                         "db.example.test", "alias.example.test")]
    with _connect(proxy) as sock:
        sock.sendall(b"".join(_frame(q) for q in queries))
        answers = {m.id: m for m in (dns.message.from_wire(_read_frame(sock)) for _ in queries)}
    assert set(answers) == {q.id for q in queries}
    assert addresses(answers[queries[0].id]) == set(API_IPS)
    assert answers[queries[1].id].rcode() == dns.rcode.REFUSED
    assert addresses(answers[queries[2].id]) == set(DB_IPS)
    assert addresses(answers[queries[3].id]) == set(DB_IPS)
    assert proxy.status()["tcp"]["total"] == 1


def test_tcp_connection_limit(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(Owner(), limits=DNSLimits(max_tcp_connections=1))
    with _connect(proxy) as first:
        first.sendall(_frame(dns.message.make_query("api.example.test", "A")))
        assert dns.message.from_wire(_read_frame(first)).answer
        with _connect(proxy) as second:
            assert second.recv(10) == b""  # closed at once
        first.sendall(_frame(dns.message.make_query("db.example.test", "A")))
        assert dns.message.from_wire(_read_frame(first)).answer
    assert proxy.status()["tcp"]["refused"] == 1


# --- malformed input -----------------------------------------------------------------------------


def _two_questions() -> bytes:
    q = dns.message.make_query("api.example.test", "A")
    q.question.append(dns.rrset.RRset(q.question[0].name, dns.rdataclass.IN, dns.rdatatype.AAAA))
    return q.to_wire()


def _no_question() -> bytes:
    q = dns.message.make_query("api.example.test", "A")
    q.question = []
    return q.to_wire()


UDP_GARBAGE = {
    "garbage": b"\xde\xad\xbe\xef" * 5,
    "short": b"\x01\x02\x03",
    "no question": _no_question(),
    "two questions": _two_questions(),
    "a response": dns.message.make_response(dns.message.make_query("api.example.test", "A")).to_wire(),
    "oversized": dns.message.make_query("api.example.test", "A").to_wire() + b"\x00" * 5000,
}


def test_malformed_datagrams_are_counted_and_dropped(make_proxy: ProxyFactory, dnsmasq: Dnsmasq) -> None:
    owner = Owner()
    proxy = make_proxy(owner)
    assert proxy.address is not None
    forwarded_before = dnsmasq.queries("api.example.test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((CLIENT_IP, 0))
        sock.settimeout(0.5)
        for data in UDP_GARBAGE.values():
            sock.sendto(data, proxy.address)
        with pytest.raises(TimeoutError):
            sock.recvfrom(65535)  # no answer to any of them
    _wait_for(lambda: proxy.status()["malformed"] == len(UDP_GARBAGE))
    assert owner.judged == [] and owner.events == []
    assert dnsmasq.queries("api.example.test") == forwarded_before
    assert addresses(ask(proxy, "api.example.test")) == set(API_IPS)  # still answering
    assert "udp from 127.88.0.3" in proxy.status()["last"]["malformed"]


TCP_GARBAGE = {
    "truncated length prefix": b"\x00",
    "truncated message": struct.pack("!H", 40) + b"\x00" * 10,
    "too short for a header": struct.pack("!H", 5) + b"\x00" * 5,
    "oversized": struct.pack("!H", 5000) + b"\x00" * 5000,
    "garbage": struct.pack("!H", 20) + b"\xde\xad\xbe\xef" * 5,
    "two questions": struct.pack("!H", len(_two_questions())) + _two_questions(),
}


@pytest.mark.parametrize("data", TCP_GARBAGE.values(), ids=TCP_GARBAGE.keys())
def test_malformed_tcp_input_closes_the_connection(make_proxy: ProxyFactory, data: bytes) -> None:
    proxy = make_proxy(Owner())
    with _connect(proxy) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""  # closed, nothing answered
    _wait_for(lambda: proxy.status()["malformed"] == 1)
    assert addresses(ask(proxy, "api.example.test", tcp=True)) == set(API_IPS)
    _wait_for(lambda: proxy.status()["tcp"]["active"] == 0)


def test_tcp_client_closing_its_side_still_gets_its_answer(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(Owner())
    with _connect(proxy) as sock:
        sock.sendall(_frame(dns.message.make_query("api.example.test", "A")))
        sock.shutdown(socket.SHUT_WR)
        assert addresses(dns.message.from_wire(_read_frame(sock))) == set(API_IPS)
    assert proxy.status()["malformed"] == 0


# --- upstream and owner failures, limits -----------------------------------------------------------


def test_upstream_refusing_gives_servfail(make_proxy: ProxyFactory) -> None:
    owner = Owner()
    proxy = make_proxy(owner, upstream=(RESOLVER_IP, free_port(RESOLVER_IP)))  # nothing listens there
    for tcp in (False, True):
        assert ask(proxy, "api.example.test", tcp=tcp).rcode() == dns.rcode.SERVFAIL
    assert proxy.status()["upstream_errors"] == 2 and owner.learned == []
    response = [e for e in owner.events if e.kind == "response"]
    assert [e.rcode for e in response] == ["SERVFAIL", "SERVFAIL"] and all(e.error for e in response)


def test_silent_upstream_gives_no_answer(make_proxy: ProxyFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((RESOLVER_IP, 0))
        owner = Owner()
        proxy = make_proxy(owner, upstream=silent.getsockname(), timeout=0.3)
        with pytest.raises(dns.exception.Timeout):
            ask(proxy, "api.example.test", timeout=1.0)
        silent.settimeout(1)
        forwarded, _ = silent.recvfrom(512)  # the query did reach it, with the client's id
        assert dns.message.from_wire(forwarded).question[0].name.to_text() == "api.example.test."
    _wait_for(lambda: proxy.status()["upstream_timeouts"] == 1)
    assert [e.kind for e in owner.events] == ["request", "response"] and "did not answer" in owner.events[1].error


def test_a_failing_on_answer_gives_servfail(make_proxy: ProxyFactory) -> None:
    class Failing(Owner):
        def on_answer(self, src: str, answers: list[DNSAnswer]) -> None:
            raise OSError("bpf map full")

    proxy = make_proxy(Failing())
    assert ask(proxy, "api.example.test").rcode() == dns.rcode.SERVFAIL
    assert proxy.status()["answers"]["errors"] == 1
    assert "bpf map full" in proxy.status()["last"]["answer_error"]


def test_response_max_delay_releases_a_slow_answer(make_proxy: ProxyFactory) -> None:
    release = threading.Event()

    class Stuck(Owner):
        def on_answer(self, src: str, answers: list[DNSAnswer]) -> None:
            release.wait(10)

    proxy = make_proxy(Stuck(), response_max_delay=0.2)
    try:
        start = time.monotonic()
        assert addresses(ask(proxy, "api.example.test")) == set(API_IPS)
        assert 0.2 <= time.monotonic() - start < 2
        assert proxy.status()["answers"]["delayed"] == 1
    finally:
        release.set()


def test_over_max_inflight_gets_servfail(make_proxy: ProxyFactory, dnsmasq: Dnsmasq) -> None:
    entered, release = threading.Event(), threading.Event()

    class Blocking(Owner):
        def on_answer(self, src: str, answers: list[DNSAnswer]) -> None:
            entered.set()
            release.wait(10)

    proxy = make_proxy(Blocking(), max_inflight=1)
    first = threading.Thread(target=ask, args=(proxy, "api.example.test"), kwargs={"timeout": 8})
    first.start()
    try:
        assert entered.wait(5)
        before = dnsmasq.queries("db.example.test")
        assert ask(proxy, "db.example.test").rcode() == dns.rcode.SERVFAIL
        assert ask(proxy, "db.example.test", tcp=True).rcode() == dns.rcode.SERVFAIL
        assert dnsmasq.queries("db.example.test") == before
        assert proxy.status()["overloaded"] == 2 and proxy.status()["inflight"] == 1
    finally:
        release.set()
        first.join(10)
    assert proxy.status()["inflight"] == 0


def test_bind_failure_is_a_problem_and_retried(dnsmasq: Dnsmasq) -> None:
    taken = socket.socket()
    taken.bind((PROXY_IP, 0))
    taken.listen(1)
    port = int(taken.getsockname()[1])
    owner = Owner()
    proxy = DNSProxy(owner.judge, owner.on_answer, listen=(PROXY_IP, port), transparent=False,
                     upstream=dnsmasq.address)
    proxy.start()
    try:
        assert proxy.address is None
        assert any("cannot listen" in p for p in proxy.problems()), proxy.problems()
        taken.close()
        _wait_for(lambda: proxy.address == (PROXY_IP, port), timeout=5)
        assert not any("cannot listen" in p for p in proxy.problems())
        assert addresses(ask(proxy, "api.example.test")) == set(API_IPS)
    finally:
        taken.close()
        proxy.stop()
    assert proxy.status()["state"] == "STOPPED"


@both
def test_a_query_the_proxy_sends_to_itself_is_cut_short(dnsmasq: Dnsmasq, tcp: bool) -> None:
    """Upstream = the proxy itself (as when a pod asks the node's own address in transparent
    mode): the forwarded copy is recognised and answered SERVFAIL, not forwarded again."""
    owner = Owner()
    port = free_port(PROXY_IP)
    proxy = DNSProxy(owner.judge, owner.on_answer, owner.on_event, listen=(PROXY_IP, port), transparent=False,
                     upstream=(PROXY_IP, port))
    proxy.start()
    try:
        assert ask(proxy, "api.example.test", tcp=tcp).rcode() == dns.rcode.SERVFAIL
        status = proxy.status()
        assert status["loops"] == 1 and status["queries"] == 2 and "came back" in status["last"]["loop"]
        assert len(owner.judged) == 1 and owner.learned == []
    finally:
        proxy.stop()


@both
def test_ipv6_listener(dnsmasq: Dnsmasq, tcp: bool) -> None:
    """An IPv6 listener (IPV6_RECVORIGDSTADDR, IPV6_PKTINFO), forwarding to IPv4 dnsmasq."""
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").read_text().strip():
        unavailable("needs IPv6 on loopback (::1)")
    owner = Owner()
    proxy = DNSProxy(owner.judge, owner.on_answer, owner.on_event, listen=("::1", 0), transparent=False,
                     upstream=dnsmasq.address)
    proxy.start()
    try:
        assert proxy.address is not None and proxy.address[0] == "::1", proxy.problems()
        q = dns.message.make_query("db.example.test", "AAAA")
        send = dns.query.tcp if tcp else dns.query.udp
        r = send(q, "::1", port=proxy.address[1], timeout=3)
        assert addresses(r) == {"fd00::20"}
        assert owner.judged == [("::1", "::1", "db.example.test", "AAAA")]
        assert owner.events[-1].server == ("::1", proxy.address[1])
    finally:
        proxy.stop()


def test_forwarding_mode_needs_an_upstream() -> None:
    with pytest.raises(ValueError, match="upstream"):
        DNSProxy(Owner().judge, Owner().on_answer, transparent=False)


# --- events ----------------------------------------------------------------------------------------


def test_events_tell_the_story_of_each_query(make_proxy: ProxyFactory) -> None:
    owner = Owner(denied=["secret.example.test"])
    proxy = make_proxy(owner)
    ask(proxy, "alias.example.test")
    ask(proxy, "secret.example.test", tcp=True)
    ask(proxy, "nope.example.test", "AAAA")
    ev = owner.events
    assert [(e.kind, e.qname, e.qtype, e.protocol) for e in ev] == [
        ("request", "alias.example.test", "A", "udp"), ("response", "alias.example.test", "A", "udp"),
        ("request", "secret.example.test", "A", "tcp"),
        ("request", "nope.example.test", "AAAA", "udp"), ("response", "nope.example.test", "AAAA", "udp")]
    req, resp, denied, _, nx = ev
    assert req.verdict == DNSVerdict(True, "allowed", ("default/allow-dns",)) and req.rcode == ""
    assert resp.rcode == "NOERROR" and set(resp.ips) == set(DB_IPS) and resp.ttl == 20
    assert resp.cnames == ("mid.example.test", "db.example.test")
    assert 0 < req.latency <= resp.latency < 3 and resp.error == ""
    assert resp.source[0] == CLIENT_IP and resp.server == proxy.address and resp.id == req.id
    assert denied.verdict is not None and not denied.verdict.allowed and denied.rcode == "REFUSED"
    assert nx.rcode == "NXDOMAIN" and nx.ips == ()
    assert all(abs(e.time - time.time()) < 60 for e in ev)


# --- load --------------------------------------------------------------------------------------------


def test_a_thousand_concurrent_queries(make_proxy: ProxyFactory, dnsmasq: Dnsmasq) -> None:
    owner = Owner(denied=["secret.example.test"])
    proxy = make_proxy(owner)
    assert proxy.address is not None
    ip, port = proxy.address
    names = ["api.example.test", "db.example.test", "alias.example.test", "secret.example.test",
             "nope.example.test"]
    plan = [names[i % len(names)] for i in range(1000)]
    forwarded_before = dnsmasq.queries("secret.example.test")

    async def one(name: str) -> dns.message.Message:
        q = dns.message.make_query(name, "A")
        for _attempt in range(3):  # a lost datagram is retried, as a stub resolver does
            try:
                return await dns.asyncquery.udp(q, ip, port=port, timeout=5, source=CLIENT_IP)
            except dns.exception.Timeout:
                continue
        raise AssertionError(f"no answer for {name}")

    async def all_at_once() -> list[dns.message.Message]:
        return await asyncio.gather(*(one(n) for n in plan))

    start = time.monotonic()
    results = asyncio.run(all_at_once())
    elapsed = time.monotonic() - start
    expected = {"api.example.test": set(API_IPS), "db.example.test": set(DB_IPS),
                "alias.example.test": set(DB_IPS)}
    for name, r in zip(plan, results, strict=True):
        assert r.question[0].name.to_text(omit_final_dot=True) == name
        if name == "secret.example.test":
            assert r.rcode() == dns.rcode.REFUSED
        elif name == "nope.example.test":
            assert r.rcode() == dns.rcode.NXDOMAIN
        else:
            assert addresses(r) == expected[name], name
    status = proxy.status()
    assert status["queries"] >= 1000 and status["refused"] >= 200 and status["inflight"] == 0
    assert status["inflight_peak"] >= 100  # they really were in flight together
    assert len(owner.learned) >= 600
    assert dnsmasq.queries("secret.example.test") == forwarded_before
    assert elapsed < 30


def _wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
