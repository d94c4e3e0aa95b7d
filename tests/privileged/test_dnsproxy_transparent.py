"""The DNS proxy in transparent mode, as the agent runs it: a pod queries its resolver's
address; the node's redirect (an fwmark and a policy-routing rule to ``local``; the agent's BPF
program sets the mark, here an iptables mangle chain does) delivers the query, destination
unchanged, to the proxy on the node; the proxy judges it, forwards it to that resolver, and the
pod gets the answer from the resolver's address — over UDP and TCP.

Topology (one testbed node, two pods on it): ``client`` → node (proxy on 0.0.0.0:53,
IP_TRANSPARENT) → ``resolver`` (dnsmasq on its pod address, port 53).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from l7gate.dnsproxy import DNSAnswer, DNSProxy
from l7gate.testing.testbed import Node, Pod, Testbed

from ..integration.test_dnsproxy import (Owner, addresses, dnsmasq_argv, logged_queries, require_dnsmasq,
                                         wait_answering)

pytestmark = [pytest.mark.privileged("netns, iptables, policy routing"), pytest.mark.integration]

MARK = "0xd00/0xf00"
TABLE = "2053"
CHAIN = "L7G-DNS"


@dataclass
class World:
    node: Node
    client: Pod
    resolver: Pod
    proxy: DNSProxy
    owner: Owner
    log: Path


def _must(where: Node, *argv: str) -> None:
    proc = where.run(list(argv))
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"


def redirect_dns(node: Node, client: Pod) -> None:
    """The datapath's part: the client's port-53 packets are marked and routed to the node."""
    _must(node, "iptables", "-t", "mangle", "-N", CHAIN)
    _must(node, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", client.host_ifname, "-j", CHAIN)
    for proto in ("udp", "tcp"):
        _must(node, "iptables", "-t", "mangle", "-A", CHAIN, "-p", proto, "--dport", "53",
              "-j", "MARK", "--set-mark", MARK)
    _must(node, "ip", "rule", "add", "fwmark", MARK, "lookup", TABLE)
    _must(node, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", TABLE)


def undo_redirect(node: Node, client: Pod) -> list[str]:
    """Remove what `redirect_dns` added (whatever of it exists); returns what failed."""
    failed = []
    for argv in (["ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", TABLE],
                 ["ip", "rule", "del", "fwmark", MARK, "lookup", TABLE],
                 ["iptables", "-t", "mangle", "-D", "PREROUTING", "-i", client.host_ifname, "-j", CHAIN],
                 ["iptables", "-t", "mangle", "-F", CHAIN],
                 ["iptables", "-t", "mangle", "-X", CHAIN]):
        proc = node.run(argv)
        if proc.returncode != 0:
            failed.append(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return failed


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_dnsmasq()
    with Testbed() as tb:
        node = tb.add_node("dns1", node_cidr="10.66.1.0/24")
        client = tb.add_pod(node, "default", "client", labels={"app": "client"})
        resolver = tb.add_pod(node, "kube-system", "resolver", labels={"k8s-app": "kube-dns"})
        proc = resolver.spawn(dnsmasq_argv(resolver.ip, 53, tb.workdir / "dnsmasq.pid"))
        log = tb.log_path(proc)
        with resolver.entered():
            wait_answering(resolver.ip, 53, proc, log)
        owner = Owner(denied=["secret.example.test"])
        proxy = DNSProxy(owner.judge, owner.on_answer, owner.on_event, listen=("0.0.0.0", 53), transparent=True,
                         timeout=3.0)
        try:
            redirect_dns(node, client)
            with node.entered():  # the proxy's sockets and threads live in the node's namespace
                proxy.start()
            assert proxy.address == ("0.0.0.0", 53), proxy.problems()
            yield World(node, client, resolver, proxy, owner, log)
        finally:
            proxy.stop()
            failed = undo_redirect(node, client)
            left = node.run(["iptables-save", "-t", "mangle"]).stdout + node.run(["ip", "rule"]).stdout
        assert not failed, failed
        assert CHAIN not in left and "lookup " + TABLE not in left


def _udp_exchange(w: World, name: str) -> tuple[dns.message.Message, Any]:
    q = dns.message.make_query(name, "A")
    with w.client.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(5)
        sock.sendto(q.to_wire(), (w.resolver.ip, 53))
        data, peer = sock.recvfrom(65535)
    r = dns.message.from_wire(data)
    assert q.is_response(r)
    return r, peer


def _tcp_exchange(w: World, name: str) -> tuple[dns.message.Message, Any]:
    q = dns.message.make_query(name, "A")
    with w.client.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(5)
        sock.connect((w.resolver.ip, 53))
        peer = sock.getpeername()
        wire = q.to_wire()
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        r, _ = dns.query.receive_tcp(sock, expiration=None)
    assert q.is_response(r)
    return r, peer


def test_udp_query_is_judged_forwarded_and_answered_from_the_resolver_address(world: World) -> None:
    w = world
    before = len(w.owner.judged)
    r, peer = _udp_exchange(w, "api.example.test")
    assert peer == (w.resolver.ip, 53)  # the client cannot tell a proxy answered
    assert addresses(r) == {"127.88.0.10"}
    assert w.owner.judged[before:] == [(w.client.ip, w.resolver.ip, "api.example.test", "A")]
    assert (w.client.ip, [DNSAnswer("api.example.test", ("127.88.0.10",), 30)]) in w.owner.learned
    # dnsmasq saw the query from the node (the proxy), not from the client
    text = w.log.read_text(errors="replace")
    assert f"query[A] api.example.test from {w.node.ip}" in text
    assert f"from {w.client.ip}" not in text
    ev = [e for e in w.owner.events if e.qname == "api.example.test" and e.protocol == "udp"]
    assert ev[-1].kind == "response" and ev[-1].server == (w.resolver.ip, 53) and ev[-1].rcode == "NOERROR"


def test_tcp_query_is_answered_from_the_resolver_address(world: World) -> None:
    w = world
    r, peer = _tcp_exchange(w, "alias.example.test")
    assert peer == (w.resolver.ip, 53)
    assert addresses(r) == {"127.88.0.20", "127.88.0.21"}
    assert w.owner.judged[-1] == (w.client.ip, w.resolver.ip, "alias.example.test", "A")
    learned = [answers for src, answers in w.owner.learned if answers[0].name == "alias.example.test"]
    assert [a.name for a in learned[-1]] == ["alias.example.test", "mid.example.test", "db.example.test"]
    ev = [e for e in w.owner.events if e.protocol == "tcp" and e.kind == "response"]
    assert ev[-1].server == (w.resolver.ip, 53) and ev[-1].source[0] == w.client.ip


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_refused_name_never_reaches_the_resolver(world: World, tcp: bool) -> None:
    w = world
    r, peer = (_tcp_exchange if tcp else _udp_exchange)(w, "secret.example.test")
    assert peer == (w.resolver.ip, 53)
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    _udp_exchange(w, "db.example.test")  # an allowed query after it: the log is current
    assert logged_queries(w.log, "db.example.test") >= 1
    assert logged_queries(w.log, "secret.example.test") == 0


def test_status_says_transparent_and_counts(world: World) -> None:
    w = world
    _udp_exchange(w, "api.example.test")
    status = w.proxy.status()
    assert status["mode"] == "transparent" and status["upstream"] == "original destination"
    assert status["listening"] == ["udp 0.0.0.0:53", "tcp 0.0.0.0:53"]
    assert status["queries"] >= 1 and status["allowed"] >= 1 and status["reply_errors"] == 0
    assert w.proxy.problems() == []
