"""Batched mutual auth (`mtls.batch`) over real TLS 1.3 on 127.0.0.1: many identity pairs proven
over one channel, every certificate rule of the handshake kept per pair, and the ways a batch
could be fooled that a handshake cannot (replayed, relayed, reflected or re-labelled
statements), each played by a peer that speaks the protocol with the module's own encoders."""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from l7gate.identity.spiffe import spiffe_id
from l7gate.mtls import batch
from l7gate.mtls.auth import AuthManager
from l7gate.mtls.batch import (
    CLIENT_PROOFS, NONCE_LEN, ROLE_CLIENT, ROLE_SERVER, SERVER_PROOFS, ChannelRefused, Pair, Proofs,
    Refusal, Statement, authenticate_batch, channel_binding, decode_proofs, decode_request,
    decode_verdicts, encode_proofs, encode_request, encode_verdicts, make_statement, recv_frame,
)
from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.handshake import (
    Address, AuthError, AuthResult, Failure, MutualAuthServer, ServerEvent, _contexts_for, _peer_chain,
    batch_server_name, handshake,
)
from l7gate.mtls.store import SVIDSource, SVIDStore
from l7gate.mtls.svid import SVID, Reason, clear_verified
from l7gate.testing.mtls import ManualClock, StaticSource, forge_svid

pytestmark = pytest.mark.integration

hs = importlib.import_module("l7gate.mtls.handshake")  # the module; the package exports the function

TD = "l7gate.local"
L1, L2, L3 = 100, 101, 102  # the client node's identities
R1, R2, R3 = 200, 201, 202  # the server node's


@pytest.fixture(scope="module")
def ca() -> BuiltinCA:
    return BuiltinCA.ephemeral(TD)


@pytest.fixture(autouse=True)
def fresh_verified_cache() -> None:
    clear_verified()  # each test's certificates are checked in full at least once


class Node:
    def __init__(self, source: SVIDSource, directory: Path, identities: list[int]) -> None:
        self.store = SVIDStore(source, directory)
        self.store.set_identities(identities)
        self.events: list[ServerEvent] = []
        self._lock = threading.Lock()
        self.server: MutualAuthServer | None = None

    def serve(self) -> Address:
        def record(event: ServerEvent) -> None:
            with self._lock:
                self.events.append(event)

        self.server = MutualAuthServer(self.store, ("127.0.0.1", 0), on_handshake=record, timeout=5.0)
        return self.server.start().address

    def seen(self, at_least: int = 0) -> list[ServerEvent]:
        """The server's events, once there are `at_least` (the client may return first)."""
        deadline = time.monotonic() + 5
        while True:
            with self._lock:
                if len(self.events) >= at_least or time.monotonic() > deadline:
                    return list(self.events)
            time.sleep(0.01)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(source: SVIDSource, identities: list[int]) -> Node:
        node = Node(source, tmp_path / f"node{len(made)}", identities)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


def static(ca: BuiltinCA, svids: dict[int, SVID], extra_roots: Sequence[BuiltinCA] = ()) -> StaticSource:
    bundle = ca.bundle() + [c for other in extra_roots for c in other.bundle()]
    return StaticSource(TD, bundle, svids)


def error(outcome: AuthResult | AuthError) -> AuthError:
    assert isinstance(outcome, AuthError), outcome
    return outcome


def ok(outcome: AuthResult | AuthError) -> AuthResult:
    assert isinstance(outcome, AuthResult), outcome
    return outcome


# -- what a batch proves ------------------------------------------------------------------------


def test_every_pair_is_proven_as_its_handshake_would_prove_it(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    short = ca.issue(L2, ttl=120)
    client = make_node(static(ca, {L1: ca.issue(L1), L2: short}), [L1, L2])
    server = make_node(ca, [R1, R2])
    address = server.serve()
    pairs = [(L1, R1), (L1, R2), (L2, R1), (L2, R2)]
    out = authenticate_batch(client.store, pairs, address, fallback=False)
    assert sorted(out) == pairs
    for (local, remote), outcome in out.items():
        result = ok(outcome)
        assert (result.local, result.remote, result.node) == (local, remote, address)
        assert result.peer.identity == remote
        assert result.peer.not_after == server.store.svid(remote).not_after
        # the handshake's expiry rule: the earlier of the two certificates
        assert result.expires_at == min(client.store.svid(local).not_after, result.peer.not_after)
        single = handshake(client.store, local, remote, address)
        assert (single.expires_at, single.peer) == (result.expires_at, result.peer)
    assert ok(out[(L2, R1)]).expires_at == short.not_after
    # the server saw each pair: its identity, the client's proven identity
    batch_events = server.seen(at_least=8)[:4]
    assert sorted((e.local, e.peer.identity if e.peer else None, e.error) for e in batch_events) == [
        (R1, L1, None), (R1, L2, None), (R2, L1, None), (R2, L2, None)]


def test_an_identity_the_server_node_does_not_hold(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    client = make_node(ca, [L1])
    server = make_node(ca, [R1])
    out = authenticate_batch(client.store, [(L1, R1), (L1, 300)], server.serve(), fallback=False)
    ok(out[(L1, R1)])
    refused = error(out[(L1, 300)])
    assert refused.reason is Failure.UNKNOWN_IDENTITY and refused.by_peer  # as the handshake's
    assert [(e.local, e.error.reason if e.error else None) for e in server.seen(at_least=2)] == [
        (None, Failure.UNKNOWN_IDENTITY), (R1, None)]


def test_a_local_identity_without_an_svid(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    client = make_node(ca, [L1])
    server = make_node(ca, [R1])
    out = authenticate_batch(client.store, [(L1, R1), (999, R1)], server.serve(), fallback=False)
    ok(out[(L1, R1)])
    assert error(out[(999, R1)]).reason is Failure.NO_LOCAL_SVID


def test_a_peer_without_batching_gets_one_handshake_per_pair(
    ca: BuiltinCA, make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server of the version before batching: "batch.<td>" is no identity's name to it
    monkeypatch.setattr(hs, "is_batch_server_name", lambda name, td: False)
    client = make_node(ca, [L1, L2])
    server = make_node(ca, [R1])
    address = server.serve()
    with pytest.raises(ChannelRefused) as info:
        authenticate_batch(client.store, [(L1, R1), (L2, R1)], address, fallback=False)
    assert info.value.error.reason is Failure.UNKNOWN_IDENTITY
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1), (L1, 300)], address)
    ok(out[(L1, R1)]), ok(out[(L2, R1)])
    assert error(out[(L1, 300)]).reason is Failure.UNKNOWN_IDENTITY
    handshakes = [e for e in server.seen(at_least=5) if e.error is None]
    assert sorted(e.peer.identity for e in handshakes if e.peer) == [L1, L2]


def test_a_node_lost_during_the_fallback_fails_the_remaining_pairs_at_once(
    ca: BuiltinCA, make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One handshake per pair must not wait out a timeout per pair for a node that went away."""
    monkeypatch.setattr(hs, "is_batch_server_name", lambda name, td: False)
    client = make_node(ca, [L1])
    server = make_node(ca, [R1])
    address = server.serve()
    tried: list[Pair] = []

    def lost(store: SVIDStore, local: int, remote: int, *args: object, **kwargs: object) -> AuthResult:
        tried.append((local, remote))
        raise AuthError(Failure.TIMEOUT, "handshake with the node")

    monkeypatch.setattr(batch, "handshake", lost)
    pairs = [(L1, r) for r in range(200, 210)]
    out = authenticate_batch(client.store, pairs, address)
    assert tried == [pairs[0]]
    assert {error(o).reason for o in out.values()} == {Failure.TIMEOUT} and len(out) == len(pairs)


def test_nobody_listening_fails_every_pair_at_once(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    client = make_node(ca, [L1, L2])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1)], dead)
    assert {error(o).reason for o in out.values()} == {Failure.CONNECT}


# -- the handshake's certificate rules, per pair ------------------------------------------------


def forged_server(ca: BuiltinCA, make_node: Callable[..., Node], bad: SVID,
                  extra_roots: Sequence[BuiltinCA] = ()) -> tuple[Node, Address]:
    """A server node whose R1 is fine and whose R2 presents `bad`."""
    server = make_node(static(ca, {R1: ca.issue(R1), R2: bad}, extra_roots), [R1, R2])
    return server, server.serve()


def client_sees(ca: BuiltinCA, make_node: Callable[..., Node], bad: SVID,
                extra_roots: Sequence[BuiltinCA] = ()) -> AuthError:
    """What the client makes of R2's proof when R2's SVID is `bad` (R1's pair must pass)."""
    client = make_node(static(ca, {L1: ca.issue(L1)}, extra_roots), [L1])
    _, address = forged_server(ca, make_node, bad)
    out = authenticate_batch(client.store, [(L1, R1), (L1, R2)], address, fallback=False)
    ok(out[(L1, R1)])
    refused = error(out[(L1, R2)])
    assert not refused.by_peer
    return refused


def server_sees(ca: BuiltinCA, make_node: Callable[..., Node], bad: SVID,
                extra_roots: Sequence[BuiltinCA] = ()) -> tuple[AuthError, list[ServerEvent]]:
    """What the server makes of L2's proof when L2's SVID is `bad` (L1, the channel's
    certificate, and its pair are fine)."""
    client = make_node(static(ca, {L1: ca.issue(L1), L2: bad}), [L1, L2])
    server = make_node(static(ca, {R1: ca.issue(R1)}, extra_roots), [R1])
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1)], server.serve(), fallback=False)
    ok(out[(L1, R1)])
    refused = error(out[(L2, R1)])
    assert refused.by_peer
    return refused, server.seen(at_least=2)


def test_expired_svids(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    def expired(identity: int) -> SVID:
        return forge_svid(ca, identity, not_before=time.time() - 7200, not_after=time.time() - 60)

    assert client_sees(ca, make_node, expired(R2)).reason is Reason.EXPIRED
    refused, events = server_sees(ca, make_node, expired(L2))
    assert refused.reason is Reason.EXPIRED
    assert str(refused).startswith("peer refused our certificate: expired")
    assert [e.error.reason for e in events if e.error] == [Reason.EXPIRED]


def test_other_trust_domain(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    other = BuiltinCA.ephemeral("other.example")
    # an untrusted root: verify_peer names the trust domain before it walks the path (the
    # handshake says "untrusted" here: OpenSSL refuses the chain before verify_peer runs)
    assert client_sees(ca, make_node, other.issue(R2)).reason is Reason.WRONG_TRUST_DOMAIN
    # our trust domain, another root: the path check
    assert client_sees(ca, make_node, BuiltinCA.ephemeral(TD).issue(R2)).reason is Reason.UNTRUSTED
    # a bundle holding both roots: the trust-domain rule still refuses it
    refused = client_sees(ca, make_node, other.issue(R2), extra_roots=[other])
    assert refused.reason is Reason.WRONG_TRUST_DOMAIN and "other.example" in refused.detail
    refused, _ = server_sees(ca, make_node, other.issue(L2), extra_roots=[other])
    assert refused.reason is Reason.WRONG_TRUST_DOMAIN


def test_wrong_san(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    # a real SVID of R3 offered as R2's
    refused = client_sees(ca, make_node, forge_svid(ca, R2, uris=[spiffe_id(TD, R3)]))
    assert refused.reason is Reason.UNEXPECTED_IDENTITY and "expected 201 got 202" in str(refused)
    two = forge_svid(ca, R2, uris=[spiffe_id(TD, R2), spiffe_id(TD, R3)])
    assert client_sees(ca, make_node, two).reason is Reason.MULTIPLE_URI_SANS
    refused, _ = server_sees(ca, make_node, forge_svid(ca, L2, uris=[spiffe_id(TD, L3)]))
    assert refused.reason is Reason.UNEXPECTED_IDENTITY


def test_ca_certificate_as_leaf(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    assert client_sees(ca, make_node, forge_svid(ca, R2, is_ca=True)).reason is Reason.IS_CA
    refused, _ = server_sees(ca, make_node, forge_svid(ca, L2, is_ca=True))
    assert refused.reason is Reason.IS_CA


def svid_for_purposes(ca: BuiltinCA, identity: int, purposes: list[x509.ObjectIdentifier],
                      key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> SVID:
    """A real SVID of `identity` whose extended key usage lists only `purposes` (and whose key
    is `key`, default a new P-256 one)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    cert = ca.sign(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l7gate-forged")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.timezone.utc))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(TD, identity))]),
                       critical=False))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return SVID(identity, spiffe_id(TD, identity), pem, key_pem, pem,
                cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())


def test_certificate_purpose(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    """OpenSSL refuses a TLS peer whose extended key usage is not for its side; a statement's
    leaf is held to the same rule."""
    client_only = svid_for_purposes(ca, R2, [ExtendedKeyUsageOID.CLIENT_AUTH])
    refused = client_sees(ca, make_node, client_only)
    assert refused.reason is Reason.UNTRUSTED and "serverAuth" in refused.detail
    # the handshake's verdict on the same certificate
    client = make_node(ca, [L1])
    _, address = forged_server(ca, make_node, client_only)
    with pytest.raises(AuthError) as info:
        handshake(client.store, L1, R2, address)
    assert info.value.reason is Reason.UNTRUSTED and "purpose" in str(info.value)
    refused, _ = server_sees(ca, make_node, svid_for_purposes(ca, L2, [ExtendedKeyUsageOID.SERVER_AUTH]))
    assert refused.reason is Reason.UNTRUSTED and "clientAuth" in refused.detail


def test_a_weak_key(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    """OpenSSL (security level 2) refuses an RSA-1024 peer in TLS; a statement's leaf too."""
    weak = svid_for_purposes(ca, R2, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                             key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    refused = client_sees(ca, make_node, weak)
    assert refused.reason is Reason.UNTRUSTED and "RSA-1024 key too weak" in refused.detail


def test_a_refused_channel_certificate_falls_back_to_each_pairs_own_reason(
    ca: BuiltinCA, make_node: Callable[..., Node]
) -> None:
    """The channel is authenticated with the lowest local identity's SVID; if the server refuses
    it, that must not fail the other identities' pairs."""
    expired = forge_svid(ca, L1, not_before=time.time() - 7200, not_after=time.time() - 60)
    client = make_node(static(ca, {L1: expired, L2: ca.issue(L2)}), [L1, L2])
    server = make_node(ca, [R1])
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1)], server.serve())
    assert error(out[(L1, R1)]).reason is Reason.EXPIRED and error(out[(L1, R1)]).by_peer
    ok(out[(L2, R1)])
    # refused by the server's verify_peer after TLS (a bundle holding the other root, so OpenSSL
    # passes the chain): the REFUSED frame, then the same fallback
    other = BuiltinCA.ephemeral("other.example")
    client = make_node(static(ca, {L1: other.issue(L1), L2: ca.issue(L2)}), [L1, L2])
    lax = make_node(static(ca, {R1: ca.issue(R1)}, [other]), [R1])
    address = lax.serve()
    with pytest.raises(ChannelRefused) as info:
        authenticate_batch(client.store, [(L1, R1), (L2, R1)], address, fallback=False)
    assert info.value.error.reason is Reason.WRONG_TRUST_DOMAIN and info.value.error.by_peer
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1)], address)
    assert error(out[(L1, R1)]).reason is Reason.WRONG_TRUST_DOMAIN and error(out[(L1, R1)]).by_peer
    ok(out[(L2, R1)])


# -- a peer that lies: the verifier is the client (it writes the auth map) ----------------------


@dataclass
class Channel:
    """What a rogue server knows of one channel when it answers."""

    client_nonce: bytes
    server_nonce: bytes
    pairs: list[Pair]
    binding: bytes
    client_leaf: bytes


@dataclass
class RogueServer:
    """Speaks the batch protocol with its store's `channel_identity` SVID on the channel and
    answers each request with `answer(channel) -> Proofs`, then says OK to every pair."""

    store: SVIDStore
    channel_identity: int
    answer: Callable[[Channel], Proofs]
    server_nonce: Callable[[], bytes] = lambda: secrets.token_bytes(NONCE_LEN)
    channels: list[Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.address: Address = self._sock.getsockname()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctx = _contexts_for(self.store).get(True, self.channel_identity)
        svid = self.store.svid(self.channel_identity)
        leaf = batch._signer(svid).chain[0]
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        deadline = time.monotonic() + 5
                        nc, pairs = decode_request(recv_frame(tls, deadline))
                        ns = self.server_nonce()
                        client_leaf = _peer_chain(tls)[0]
                        ch = Channel(nc, ns, pairs, channel_binding(client_leaf, leaf, nc, ns), client_leaf)
                        self.channels.append(ch)
                        tls.sendall(encode_proofs(SERVER_PROOFS, self.answer(ch)))
                        recv_frame(tls, deadline)
                        tls.sendall(encode_verdicts([None] * len(pairs)))
                except (OSError, ssl.SSLError, batch.ProtocolError, AuthError):
                    continue

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def rogues() -> Iterator[list[RogueServer]]:
    made: list[RogueServer] = []
    yield made
    for rogue in made:
        rogue.close()


def honest(store: SVIDStore) -> Callable[[Channel], Proofs]:
    """What a correct server holding the identities of `store` answers."""
    def answer(ch: Channel) -> Proofs:
        partners: dict[int, list[int]] = {}
        for local, remote in ch.pairs:
            partners.setdefault(remote, []).append(local)
        return Proofs(ch.server_nonce, tuple(
            make_statement(TD, ch.binding, ROLE_SERVER, store.svid(r), ls) for r, ls in sorted(partners.items())))
    return answer


def test_rogue_server_helper_is_accepted_when_honest(ca: BuiltinCA, make_node: Callable[..., Node],
                                                     rogues: list[RogueServer]) -> None:
    """The rogue servers below differ from this one in one lie each."""
    client = make_node(ca, [L1])
    b = make_node(ca, [R1])
    rogue = RogueServer(b.store, R1, honest(b.store))
    rogues.append(rogue)
    ok(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])


def test_replayed_statements_of_an_earlier_session(ca: BuiltinCA, make_node: Callable[..., Node],
                                                   rogues: list[RogueServer]) -> None:
    """B's genuine statements, recorded from an earlier channel (same certificates on both
    ends), sent again byte for byte with their nonce: the client's fresh nonce refuses them."""
    client = make_node(ca, [L1])
    b = make_node(ca, [R1])
    recorded: list[Proofs] = []

    def replay(ch: Channel) -> Proofs:
        if not recorded:
            recorded.append(honest(b.store)(ch))
        return recorded[0]

    rogue = RogueServer(b.store, R1, replay)
    rogues.append(rogue)
    ok(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])
    refused = error(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])
    assert refused.reason is Failure.PROOF and not refused.by_peer


def test_a_stale_nonce(ca: BuiltinCA, make_node: Callable[..., Node], rogues: list[RogueServer]) -> None:
    """A statement signed now, by the real key, on this channel's certificates, but over the
    client nonce of an earlier session."""
    client = make_node(ca, [L1])
    b = make_node(ca, [R1])
    leaf = batch._signer(b.store.svid(R1)).chain[0]
    stale: list[bytes] = []

    def stale_nonce(ch: Channel) -> Proofs:
        stale.append(ch.client_nonce)
        old = channel_binding(ch.client_leaf, leaf, stale[0], ch.server_nonce)
        return Proofs(ch.server_nonce, (make_statement(TD, old, ROLE_SERVER, b.store.svid(R1), [L1]),))

    rogue = RogueServer(b.store, R1, stale_nonce)
    rogues.append(rogue)
    ok(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])
    refused = error(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])
    assert refused.reason is Failure.PROOF


def test_statements_relayed_from_another_channel(ca: BuiltinCA, make_node: Callable[..., Node],
                                                 rogues: list[RogueServer]) -> None:
    """Node M holds only X, not R1. It terminates the client's channel with X's SVID, opens its
    own channel to B (which holds R1) with the client's nonce and pairs, and forwards B's
    genuine statements with B's nonce. B signed M's channel, not the client's."""
    client = make_node(ca, [L1])
    b = make_node(ca, [R1])
    b_address = b.serve()
    m = make_node(ca, [300])

    def relay(ch: Channel) -> Proofs:
        ctx = _contexts_for(m.store).get(False, 300)
        with socket.create_connection(b_address, timeout=5) as sock:
            with ctx.wrap_socket(sock, server_hostname=batch_server_name(TD)) as tls:
                tls.sendall(encode_request(ch.client_nonce, ch.pairs))
                return decode_proofs(SERVER_PROOFS, recv_frame(tls, time.monotonic() + 5), len(ch.pairs))

    rogue = RogueServer(m.store, 300, relay)
    rogues.append(rogue)
    refused = error(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])
    assert refused.reason is Failure.PROOF
    assert rogue.channels  # the relay did run


def test_a_node_that_does_not_hold_the_identity(ca: BuiltinCA, make_node: Callable[..., Node],
                                                rogues: list[RogueServer]) -> None:
    """M holds X only. It claims R1 with its own chain (the SAN says X), or with R1's real
    (public) chain and its own key's signature."""
    client = make_node(ca, [L1])
    b = make_node(ca, [R1])
    m = make_node(ca, [300])
    r1_chain = batch._signer(b.store.svid(R1)).chain

    def own_chain(ch: Channel) -> Proofs:
        st = make_statement(TD, ch.binding, ROLE_SERVER, m.store.svid(300), [L1])
        return Proofs(ch.server_nonce, (Statement(st.chain, R1, st.partners, st.signature),))

    def stolen_chain(ch: Channel) -> Proofs:
        data = batch.transcript(TD, ch.binding, ROLE_SERVER, R1, r1_chain[0], (L1,))
        sig = batch.sign(batch._signer(m.store.svid(300)).key, data)
        return Proofs(ch.server_nonce, (Statement(r1_chain, R1, (L1,), sig),))

    for answer, reason in ((own_chain, Reason.UNEXPECTED_IDENTITY), (stolen_chain, Failure.PROOF)):
        rogue = RogueServer(m.store, 300, answer)
        rogues.append(rogue)
        refused = error(authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)[(L1, R1)])
        assert refused.reason is reason, answer.__name__


def test_tampered_identity_numbers(ca: BuiltinCA, make_node: Callable[..., Node], rogues: list[RogueServer]) -> None:
    """B's genuine statement for (L1, R1) with L2 added to its partners afterwards; and a
    genuine statement that leaves a requested pair out."""
    client = make_node(ca, [L1, L2])
    b = make_node(ca, [R1])

    def widened(ch: Channel) -> Proofs:
        st = make_statement(TD, ch.binding, ROLE_SERVER, b.store.svid(R1), [L1])
        return Proofs(ch.server_nonce, (Statement(st.chain, R1, (L1, L2), st.signature),))

    def narrow(ch: Channel) -> Proofs:
        return Proofs(ch.server_nonce, (make_statement(TD, ch.binding, ROLE_SERVER, b.store.svid(R1), [L1]),))

    rogue = RogueServer(b.store, R1, widened)
    rogues.append(rogue)
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1)], rogue.address, fallback=False)
    assert {p: error(o).reason for p, o in out.items()} == {(L1, R1): Failure.PROOF, (L2, R1): Failure.PROOF}

    rogue = RogueServer(b.store, R1, narrow)
    rogues.append(rogue)
    out = authenticate_batch(client.store, [(L1, R1), (L2, R1)], rogue.address, fallback=False)
    ok(out[(L1, R1)])
    assert error(out[(L2, R1)]).reason is Failure.PROOF


# -- a client that lies: the server's verdicts --------------------------------------------------


def rogue_client(store: SVIDStore, channel_identity: int, address: Address, pairs: list[Pair],
                 answer: Callable[[bytes, Proofs], Proofs], nonce: bytes | None = None,
                 ) -> list[Refusal | None]:
    """Opens a batch channel to `address` and answers the server's proofs with
    `answer(binding, server_proofs)`; the server's verdicts."""
    ctx = _contexts_for(store).get(False, channel_identity)
    nonce = nonce or secrets.token_bytes(NONCE_LEN)
    with socket.create_connection(address, timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname=batch_server_name(TD)) as tls:
            deadline = time.monotonic() + 5
            tls.sendall(encode_request(nonce, pairs))
            theirs = decode_proofs(SERVER_PROOFS, recv_frame(tls, deadline), len(pairs))
            assert theirs.nonce is not None
            binding = channel_binding(batch._signer(store.svid(channel_identity)).chain[0], _peer_chain(tls)[0],
                                      nonce, theirs.nonce)
            tls.sendall(encode_proofs(CLIENT_PROOFS, answer(binding, theirs)))
            return decode_verdicts(recv_frame(tls, deadline), len(pairs))


def test_a_client_reflecting_the_servers_statement(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    """Identity X lives on both nodes. A client node holding only Y asks for (X, X) and sends
    the server's own statement for X back as its proof of X: the role refuses it."""
    x, y = 300, 301
    client = make_node(ca, [y])
    server = make_node(ca, [x])
    verdicts = rogue_client(client.store, y, server.serve(), [(x, x)], lambda binding, theirs: Proofs(
        None, theirs.statements))
    assert verdicts[0] is not None and verdicts[0].reason == Failure.PROOF.name
    assert [(e.local, e.error.reason if e.error else None) for e in server.seen(at_least=1)] == [(x, Failure.PROOF)]


def test_a_client_replaying_its_proof_of_an_earlier_session(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    """The client node held L2 once and recorded its statement; with L2 gone it replays it, with
    the same client nonce: the server's fresh nonce refuses it."""
    client = make_node(ca, [L1, L2])
    server = make_node(ca, [R1])
    address = server.serve()
    nonce = secrets.token_bytes(NONCE_LEN)
    recorded: list[Proofs] = []

    def prove(binding: bytes, theirs: Proofs) -> Proofs:
        recorded.append(Proofs(None, (make_statement(TD, binding, ROLE_CLIENT, client.store.svid(L2), [R1]),)))
        return recorded[0]

    assert rogue_client(client.store, L1, address, [(L2, R1)], prove, nonce) == [None]
    client.store.set_identities([L1])
    verdicts = rogue_client(client.store, L1, address, [(L2, R1)], lambda b, t: recorded[0], nonce)
    assert verdicts[0] is not None and verdicts[0].reason == Failure.PROOF.name


def test_a_client_claiming_an_identity_it_does_not_hold(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    client = make_node(ca, [L1])
    holder = make_node(ca, [L2])
    server = make_node(ca, [R1])
    address = server.serve()
    l2_chain = batch._signer(holder.store.svid(L2)).chain

    def own_chain(binding: bytes, theirs: Proofs) -> Proofs:
        st = make_statement(TD, binding, ROLE_CLIENT, client.store.svid(L1), [R1])
        return Proofs(None, (Statement(st.chain, L2, st.partners, st.signature),))

    def wrong_key(binding: bytes, theirs: Proofs) -> Proofs:
        data = batch.transcript(TD, binding, ROLE_CLIENT, L2, l2_chain[0], (R1,))
        return Proofs(None, (Statement(l2_chain, L2, (R1,), batch.sign(batch._signer(client.store.svid(L1)).key, data)),))

    for answer, reason in ((own_chain, Reason.UNEXPECTED_IDENTITY), (wrong_key, Failure.PROOF)):
        verdicts = rogue_client(client.store, L1, address, [(L2, R1)], answer)
        assert verdicts[0] is not None and verdicts[0].reason == reason.name, answer.__name__


# -- the auth cache on the batch path -----------------------------------------------------------


def test_auth_manager_proves_a_nodes_due_pairs_over_one_channel(ca: BuiltinCA, make_node: Callable[..., Node]) -> None:
    clock = ManualClock()
    client = make_node(ca, [L1, L2])
    server = make_node(ca, [R1, R2])
    address = server.serve()
    calls: list[tuple[Address, list[Pair]]] = []
    written: dict[tuple[int, int, Address], float] = {}

    def batch_fn(node: Address, pairs: Sequence[Pair]) -> dict[Pair, AuthResult | AuthError]:
        calls.append((node, list(pairs)))
        return authenticate_batch(client.store, pairs, node, clock=clock)

    def write(local: int, remote: int, node: Address, expires_at: float) -> None:
        written[(local, remote, node)] = expires_at

    def delete(local: int, remote: int, node: Address) -> None:
        del written[(local, remote, node)]

    manager = AuthManager(client.store, write, delete, batch_fn=batch_fn, clock=clock)
    try:
        wanted = {(L1, R1): {address}, (L1, R2): {address}, (L2, R1): {address}, (L2, 300): {address}}
        manager.set_wanted(wanted)
        manager.tick()
        assert calls == [(address, sorted(wanted))]
        assert set(written) == {(L1, R1, address), (L1, R2, address), (L2, R1, address)}
        rows = {(s.local, s.remote): s for s in manager.status()}
        last_error = rows[(L2, 300)].last_error
        assert last_error is not None and "does not serve the identity" in last_error
        assert rows[(L2, 300)].failures == 1 and rows[(L1, R1)].failures == 0
        # one row due alone (the on-demand path): a handshake, not a batch
        clock.advance(1.5)
        manager.request(L2, 300)
        manager.tick()
        assert len(calls) == 1  # no second batch
        assert {(s.local, s.remote): s.attempts for s in manager.status()}[(L2, 300)] == 2
    finally:
        manager.stop()


def test_the_agents_auth_manager_batches_by_default(
    ca: BuiltinCA, make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`AuthManager(store, ...)`, as the daemon builds it, proves a node's due pairs over one
    batch channel and writes what a handshake per pair would have written."""
    auth_module = importlib.import_module("l7gate.mtls.auth")
    channels: list[list[Pair]] = []
    real = auth_module.authenticate_batch

    def counted(store: SVIDStore, pairs: Sequence[Pair], *args: object, **kwargs: object) -> object:
        channels.append(list(pairs))
        return real(store, pairs, *args, **kwargs)

    monkeypatch.setattr(auth_module, "authenticate_batch", counted)
    client = make_node(ca, [L1, L2])
    server = make_node(ca, [R1, R2])
    address = server.serve()
    written: dict[tuple[int, int, Address], float] = {}

    def write(local: int, remote: int, node: Address, expires_at: float) -> None:
        written[(local, remote, node)] = expires_at

    manager = AuthManager(client.store, write, lambda *_: None)
    try:
        pairs = [(L1, R1), (L1, R2), (L2, R1), (L2, R2)]
        manager.set_wanted({pair: {address} for pair in pairs})
        manager.tick()
        assert channels == [pairs]
        for local, remote in pairs:
            single = handshake(client.store, local, remote, address)
            assert written[(local, remote, address)] == single.expires_at
    finally:
        manager.stop()


# -- the garbage collector: paused while a batch computes, never while it waits -----------------


def test_the_collector_is_on_while_either_side_waits_for_its_peer(ca: BuiltinCA, make_node: Callable[..., Node],
                                                                  rogues: list[RogueServer]) -> None:
    """A batch pauses the cyclic collector (`gcpause`) for its CPU work only: a peer that holds
    the channel open, on either side, cannot keep the agent's collector off."""
    assert gc.isenabled()
    client = make_node(ca, [L1])
    b = make_node(ca, [R1])
    answering, release = threading.Event(), threading.Event()

    def slow(ch: Channel) -> Proofs:
        answering.set()
        release.wait(10)
        return honest(b.store)(ch)

    rogue = RogueServer(b.store, R1, slow)
    rogues.append(rogue)
    out: dict[Pair, Any] = {}
    t = threading.Thread(target=lambda: out.update(
        authenticate_batch(client.store, [(L1, R1)], rogue.address, fallback=False)))
    t.start()
    assert answering.wait(10)
    time.sleep(0.1)  # the client is waiting for the server's proofs
    assert gc.isenabled()
    release.set()
    t.join(10)
    ok(out[(L1, R1)])
    assert gc.isenabled()

    # The server's side (this process too): it has sent its proofs and waits for the client's.
    server = make_node(ca, [R2])
    seen_on: list[bool] = []

    def hold(binding: bytes, theirs: Proofs) -> Proofs:
        time.sleep(0.1)
        seen_on.append(gc.isenabled())
        return Proofs(None, (make_statement(TD, binding, ROLE_CLIENT, client.store.svid(L1), [R2]),))

    verdicts = rogue_client(client.store, L1, server.serve(), [(L1, R2)], hold)
    assert verdicts == [None] and seen_on == [True]
    assert gc.isenabled()
