"""Mutual-auth handshakes over real TLS 1.3 on 127.0.0.0/8: MutualAuthServer + handshake(),
every refusal seen from both ends, and AuthManager keeping kernel-map entries fresh with
short-lived SVIDs on a manual clock (OpenSSL still checks validity against the real one)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from l7gate.mtls.auth import AuthManager
from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.handshake import (
    Address,
    AuthError,
    Failure,
    MutualAuthServer,
    ServerEvent,
    handshake,
)
from l7gate.identity.spiffe import spiffe_id
from l7gate.mtls.store import SVIDSource, SVIDStore
from l7gate.mtls.svid import Reason
from l7gate.testing.mtls import ManualClock, StaticSource, forge_svid

pytestmark = pytest.mark.integration

TD = "l7gate.local"
CLIENT, SERVER, SERVER2 = 100, 200, 201


@pytest.fixture(scope="module")
def ca() -> BuiltinCA:
    return BuiltinCA.ephemeral(TD)


class Node:
    """One agent's side: a store, and optionally a server that records what it saw."""

    def __init__(self, source: SVIDSource, directory: Path, identities: list[int],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = SVIDStore(source, directory, clock=clock)
        self.store.set_identities(identities)
        self.clock = clock
        self.events: list[ServerEvent] = []
        self._seen = threading.Condition()
        self.server: MutualAuthServer | None = None

    def serve(self, host: str = "127.0.0.1") -> tuple[str, int]:
        def record(event: ServerEvent) -> None:
            with self._seen:
                self.events.append(event)
                self._seen.notify_all()

        self.server = MutualAuthServer(self.store, (host, 0), on_handshake=record, timeout=5.0,
                                       clock=self.clock)
        return self.server.start().address

    def event(self, n: int = 1, timeout: float = 5.0) -> ServerEvent:
        """The server's n-th event (1-based), waiting for it: the client may return before the
        server has recorded its side."""
        with self._seen:
            assert self._seen.wait_for(lambda: len(self.events) >= n, timeout)
            return self.events[n - 1]

    def refusal(self, n: int = 1) -> AuthError:
        event = self.event(n)
        assert event.error is not None and event.peer is None, event
        return event.error

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.stop()


MakeNode = Callable[..., Node]
"""`make_node(source, identities, clock=time.time)`"""


@pytest.fixture
def make_node(tmp_path: Path, nodes: list[Node]) -> MakeNode:
    def make(source: SVIDSource, identities: list[int], clock: Callable[[], float] = time.time) -> Node:
        node = Node(source, tmp_path / f"node{len(nodes)}", identities, clock=clock)
        nodes.append(node)
        return node

    return make


def refused(store: SVIDStore, address: tuple[str, int], remote: int = SERVER) -> AuthError:
    with pytest.raises(AuthError) as info:
        handshake(store, CLIENT, remote, address, timeout=5.0)
    return info.value


# -- success ------------------------------------------------------------------------------------


def test_success_expires_at_the_earlier_certificate(ca: BuiltinCA, make_node: MakeNode) -> None:
    client_svid = ca.issue(CLIENT, ttl=120)
    client = make_node(StaticSource(TD, ca.bundle(), {CLIENT: client_svid}), [CLIENT])
    server = make_node(ca, [SERVER, SERVER2])
    address = server.serve()

    result = handshake(client.store, CLIENT, SERVER, address, timeout=5.0)
    assert (result.local, result.remote, result.node) == (CLIENT, SERVER, address)
    assert result.peer.identity == SERVER
    assert result.peer.not_after == server.store.svid(SERVER).not_after
    assert result.expires_at == client_svid.not_after < result.peer.not_after

    event = server.event()
    assert event.error is None and event.local == SERVER
    assert event.peer is not None and event.peer.spiffe_id == spiffe_id(TD, CLIENT)

    # the server proves whichever of its identities SNI names
    other = handshake(client.store, CLIENT, SERVER2, address, timeout=5.0)
    assert other.peer.identity == SERVER2 and server.event(2).local == SERVER2


def test_success_with_the_server_certificate_expiring_first(ca: BuiltinCA, make_node: MakeNode) -> None:
    server_svid = ca.issue(SERVER, ttl=90)
    client = make_node(ca, [CLIENT])
    server = make_node(StaticSource(TD, ca.bundle(), {SERVER: server_svid}), [SERVER])
    result = handshake(client.store, CLIENT, SERVER, server.serve(), timeout=5.0)
    assert result.expires_at == server_svid.not_after


def test_server_rotation_is_picked_up_by_the_next_handshake(
    ca: BuiltinCA, make_node: MakeNode, nodes: list[Node], tmp_path: Path
) -> None:
    source = StaticSource(TD, ca.bundle(), {SERVER: ca.issue(SERVER, ttl=600)})
    client = make_node(ca, [CLIENT])
    clock = ManualClock()  # the server store's rotation schedule; certificates use real time
    server = Node(source, tmp_path / "rotating", [SERVER], clock=clock)
    nodes.append(server)
    address = server.serve()
    before = handshake(client.store, CLIENT, SERVER, address).peer.not_after
    source.svids[SERVER] = ca.issue(SERVER, ttl=1200)
    clock.advance(301.0)
    assert server.store.refresh() == [SERVER]
    after = handshake(client.store, CLIENT, SERVER, address).peer.not_after
    assert after == source.svids[SERVER].not_after > before


# -- refused by the server, and the client learns why -------------------------------------------


def test_identity_the_server_does_not_have(ca: BuiltinCA, make_node: MakeNode) -> None:
    client = make_node(ca, [CLIENT])
    server = make_node(ca, [SERVER])
    error = refused(client.store, server.serve(), remote=300)
    assert error.reason is Failure.UNKNOWN_IDENTITY and error.by_peer
    event = server.event()
    assert event.error is not None and event.error.reason is Failure.UNKNOWN_IDENTITY
    assert "300.l7gate.local" in event.error.detail and event.local is None


def test_client_with_an_expired_svid(ca: BuiltinCA, make_node: MakeNode) -> None:
    expired = forge_svid(ca, CLIENT, not_before=time.time() - 7200, not_after=time.time() - 60)
    client = make_node(StaticSource(TD, ca.bundle(), {CLIENT: expired}), [CLIENT])
    server = make_node(ca, [SERVER])
    error = refused(client.store, server.serve())
    assert error.reason is Reason.EXPIRED and error.by_peer
    assert str(error).startswith("peer refused our certificate: expired")
    event = server.event()
    assert event.error is not None and event.error.reason is Reason.EXPIRED


def test_client_from_another_trust_domain(ca: BuiltinCA, make_node: MakeNode) -> None:
    other = BuiltinCA.ephemeral("other.example")
    client = make_node(StaticSource(TD, ca.bundle(), {CLIENT: other.issue(CLIENT)}), [CLIENT])
    # a server that trusts only its own CA: OpenSSL already refuses the chain
    strict = make_node(ca, [SERVER])
    error = refused(client.store, strict.serve())
    assert error.reason is Reason.UNTRUSTED and error.by_peer
    assert strict.refusal().reason is Reason.UNTRUSTED
    # a server whose bundle also holds the other root (a shared bundle, federation gone
    # wrong): the chain verifies, and verify_peer still refuses the foreign trust domain
    lax = make_node(StaticSource(TD, ca.bundle() + other.bundle(), {SERVER: ca.issue(SERVER)}),
                    [SERVER])
    error = refused(client.store, lax.serve())
    assert error.reason is Reason.WRONG_TRUST_DOMAIN and error.by_peer
    assert "other.example" in error.detail
    assert lax.refusal().reason is Reason.WRONG_TRUST_DOMAIN


def test_client_with_two_uri_sans(ca: BuiltinCA, make_node: MakeNode) -> None:
    two = forge_svid(ca, CLIENT, uris=[spiffe_id(TD, CLIENT), spiffe_id(TD, SERVER)])
    client = make_node(StaticSource(TD, ca.bundle(), {CLIENT: two}), [CLIENT])
    server = make_node(ca, [SERVER])
    error = refused(client.store, server.serve())
    assert error.reason is Reason.MULTIPLE_URI_SANS and error.by_peer
    event = server.event()
    assert event.error is not None and event.error.reason is Reason.MULTIPLE_URI_SANS
    assert event.local == SERVER and event.peer is None


def test_tls12_only_client_is_refused(ca: BuiltinCA, make_node: MakeNode) -> None:
    client = make_node(ca, [CLIENT])
    server = make_node(ca, [SERVER])
    address = server.serve()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.load_verify_locations(client.store.files(CLIENT).bundle)
    ctx.load_cert_chain(client.store.files(CLIENT).cert_and_key)
    with socket.create_connection(address, timeout=5) as sock:
        with pytest.raises(ssl.SSLError, match="(?i)protocol version|unsupported protocol"):
            ctx.wrap_socket(sock, server_hostname=f"{SERVER}.{TD}")
    event = server.event()
    assert event.error is not None and event.error.reason is Failure.TLS and event.peer is None


def test_client_without_sni_is_refused(ca: BuiltinCA, make_node: MakeNode) -> None:
    client = make_node(ca, [CLIENT])
    server = make_node(ca, [SERVER])
    address = server.serve()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(client.store.files(CLIENT).bundle)
    ctx.load_cert_chain(client.store.files(CLIENT).cert_and_key)
    with socket.create_connection(address, timeout=5) as sock:
        with pytest.raises(ssl.SSLError, match="(?i)unrecognized name"):
            ctx.wrap_socket(sock)
    assert server.refusal().reason is Failure.UNKNOWN_IDENTITY


# -- refused by the client ----------------------------------------------------------------------


def test_server_presenting_another_identity(ca: BuiltinCA, make_node: MakeNode) -> None:
    impostor = forge_svid(ca, SERVER, uris=[spiffe_id(TD, SERVER2)])  # a real SVID of 201
    client = make_node(ca, [CLIENT])
    server = make_node(StaticSource(TD, ca.bundle(), {SERVER: impostor}), [SERVER])
    error = refused(client.store, server.serve())
    assert error.reason is Reason.UNEXPECTED_IDENTITY and not error.by_peer
    assert "expected 200 got 201" in str(error)


def test_server_from_an_untrusted_ca(ca: BuiltinCA, make_node: MakeNode) -> None:
    rogue = BuiltinCA.ephemeral(TD)
    client = make_node(ca, [CLIENT])
    server = make_node(StaticSource(TD, ca.bundle(), {SERVER: rogue.issue(SERVER)}), [SERVER])
    error = refused(client.store, server.serve())
    assert error.reason is Reason.UNTRUSTED and not error.by_peer


def test_server_with_an_expired_svid(ca: BuiltinCA, make_node: MakeNode) -> None:
    expired = forge_svid(ca, SERVER, not_before=time.time() - 7200, not_after=time.time() - 60)
    client = make_node(ca, [CLIENT])
    server = make_node(StaticSource(TD, ca.bundle(), {SERVER: expired}), [SERVER])
    error = refused(client.store, server.serve())
    assert error.reason is Reason.EXPIRED and not error.by_peer


def test_nobody_listening_and_a_silent_peer(ca: BuiltinCA, make_node: MakeNode) -> None:
    client = make_node(ca, [CLIENT])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert refused(client.store, ("127.0.0.1", port)).reason is Failure.CONNECT
    with socket.socket() as silent:  # accepts TCP (backlog), never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        t0 = time.monotonic()
        with pytest.raises(AuthError) as info:
            handshake(client.store, CLIENT, SERVER, silent.getsockname(), timeout=0.5)
        assert info.value.reason is Failure.TIMEOUT
        assert time.monotonic() - t0 < 2.0


def test_local_identity_without_svid(ca: BuiltinCA, make_node: MakeNode) -> None:
    client = make_node(ca, [CLIENT])
    with pytest.raises(AuthError) as info:
        handshake(client.store, 999, SERVER, ("127.0.0.1", 1), timeout=1.0)
    assert info.value.reason is Failure.NO_LOCAL_SVID


# -- AuthManager over real TLS ------------------------------------------------------------------


def test_auth_manager_writes_at_once_refreshes_before_expiry_and_deletes(make_node: MakeNode) -> None:
    """Twelve seconds of 8-second SVIDs on a manual clock: the CA, both ends' stores and
    verifiers, and the manager read it; the manager's worker is `tick()`, called as time moves.
    The handshakes are real TLS, and OpenSSL checks validity against the real clock, which the
    manual one (started at the real time, 60 s of backdating) never leaves far behind."""
    clock = ManualClock()
    ca = BuiltinCA.ephemeral(TD, svid_ttl=8.0, clock=clock)  # 8 s SVIDs, rotated every ~4 s
    client = make_node(ca, [CLIENT], clock=clock)
    server_b = make_node(ca, [SERVER, SERVER2], clock=clock)
    b = server_b.serve("127.0.0.1")
    server_c = make_node(ca, [300], clock=clock)
    c = server_c.serve("127.0.0.2")
    with socket.socket() as closed:
        closed.bind(("127.0.0.3", 0))
        dead = closed.getsockname()

    lock = threading.Lock()
    writes: list[tuple[float, int, int, Address, float]] = []
    deletes: list[tuple[int, int, Address]] = []

    def write(local: int, remote: int, node: Address, expires_at: float) -> None:
        with lock:
            writes.append((clock(), local, remote, node, expires_at))

    def delete(local: int, remote: int, node: Address) -> None:
        with lock:
            deletes.append((local, remote, node))

    manager = AuthManager(client.store, write, delete, clock=clock, timeout=2.0, retry_base=0.2,
                          retry_max=0.5)
    try:
        t0 = clock()
        manager.set_wanted({(CLIENT, SERVER): {b}, (CLIENT, SERVER2): {b}, (CLIENT, 300): {c, dead}})
        manager.tick()  # the worker's first pass: every new row is due at once
        with lock:
            first = {(w[1], w[2], w[3]): w[0] - t0 for w in writes}
        # one entry per node that proved the pair: none for the dead node
        assert set(first) == {(CLIENT, SERVER, b), (CLIENT, SERVER2, b), (CLIENT, 300, c)}
        assert max(first.values()) == 0.0, first  # proactive: before any time passed

        # Longer than one SVID lifetime, in steps far shorter than any refresh interval: each
        # step is a pass of the stores' rotation threads and of the manager's worker.
        while clock() < t0 + 12.0:
            clock.advance(0.1)
            for node in (client, server_b, server_c):
                node.store.refresh()
            manager.tick()
        with lock:
            timeline = [w for w in writes if (w[1], w[2], w[3]) == (CLIENT, SERVER, b)]
        assert len(timeline) >= 3
        for (*_, old_expiry), (written_at, *_, new_expiry) in zip(timeline, timeline[1:]):
            assert written_at < old_expiry, "an entry lapsed before it was refreshed"
            assert new_expiry >= old_expiry
        assert timeline[-1][4] > clock()

        rows = {(r.remote, r.node): r for r in manager.status()}
        assert rows[(SERVER, b)].last_error is None and rows[(SERVER, b)].attempts >= 3
        dead_row = rows[(300, dead)]
        assert dead_row.last_ok is None and dead_row.failures >= 3
        assert dead_row.last_error is not None and dead_row.last_error.startswith("connection failed")
        assert rows[(300, c)].last_ok is not None  # one dead node does not block the pair

        manager.set_wanted({(CLIENT, SERVER): {b}})
        with lock:
            assert sorted(deletes) == [(CLIENT, SERVER2, b), (CLIENT, 300, c)]
        assert [(r.remote, r.node) for r in manager.status()] == [(SERVER, b)]
    finally:
        manager.stop()
