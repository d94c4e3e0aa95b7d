"""SpireSource (SVIDs from the SPIFFE Workload API) against WorkloadAPITestDouble.

No SPIRE server or agent can run here, so the Workload API end is a test double that speaks
the real protocol (gRPC on a unix socket, SpiffeWorkloadAPI/FetchX509SVID, workload.proto
messages, the workload.spiffe.io header) and mints SVIDs with a BuiltinCA. The client side is
the real one: py-spiffe's WorkloadApiClient inside SpireSource, and SVIDStore + handshake on top.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from spiffe._proto import workload_pb2

from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.handshake import AuthError, Failure, MutualAuthServer, ServerEvent, handshake
from l7gate.mtls.spire import MissingSVIDError, SpireError, SpireSource
from l7gate.identity.spiffe import spiffe_id
from l7gate.mtls.store import SVIDSource, SVIDStore
from l7gate.mtls.svid import Reason, verify_peer
from l7gate.testing.mtls import ManualClock, forge_svid
from l7gate.testing.wait import eventually
from l7gate.testing.workload_api_double import WorkloadAPITestDouble

pytestmark = pytest.mark.integration

TD = "l7gate.local"
CLIENT, SERVER, OTHER = 100, 200, 300


@pytest.fixture(scope="module")
def ca() -> BuiltinCA:
    return BuiltinCA.ephemeral(TD)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # short: a unix socket path must fit in 108 bytes, pytest's tmp_path may not
    path = Path(tempfile.mkdtemp(prefix="l7g-wapi-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Harness:
    """Doubles, sources, stores and servers made by one test, torn down after it."""

    def __init__(self, sockdir: Path, tmp: Path) -> None:
        self.sockdir = sockdir
        self.tmp = tmp
        self.doubles: list[WorkloadAPITestDouble] = []
        self.sources: list[SpireSource] = []
        self.servers: list[MutualAuthServer] = []
        self.stores = 0

    def double(self, ca: BuiltinCA, identities: list[int], **kw: object) -> WorkloadAPITestDouble:
        path = self.sockdir / f"agent{len(self.doubles)}.sock"
        d = WorkloadAPITestDouble(path, ca, identities, **kw)  # type: ignore[arg-type]
        self.doubles.append(d.start())
        return d

    def source(self, double: WorkloadAPITestDouble, trust_domain: str = TD,
               **kw: object) -> SpireSource:
        src = SpireSource(str(double.socket_path), trust_domain, **kw)  # type: ignore[arg-type]
        self.sources.append(src)
        return src

    def store(self, source: SVIDSource, identities: list[int],
              clock: Callable[[], float] = time.time) -> SVIDStore:
        store = SVIDStore(source, self.tmp / f"store{self.stores}", clock=clock)
        self.stores += 1
        store.set_identities(identities)
        return store

    def serve(self, store: SVIDStore, events: list[ServerEvent] | None = None) -> tuple[str, int]:
        record = events.append if events is not None else None
        server = MutualAuthServer(store, ("127.0.0.1", 0), on_handshake=record, timeout=5.0)
        self.servers.append(server)
        return server.start().address

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for src in self.sources:
            src.close()
        for d in self.doubles:
            d.stop()


@pytest.fixture
def h(sockdir: Path, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(sockdir, tmp_path)
    yield harness
    harness.close()


# -- the source ---------------------------------------------------------------------------------


def test_source_svids_and_bundle_are_what_verify_peer_accepts(ca: BuiltinCA, h: Harness) -> None:
    # the agent's workload may be entitled to SPIFFE IDs that are not identities: ignored
    agent_id = forge_svid(ca, 1, uris=[f"spiffe://{TD}/ns/kube-system/sa/l7gate"])
    double = h.double(ca, [CLIENT, SERVER], extra_svids=[agent_id],
                      federated={"partner.example": BuiltinCA.ephemeral("partner.example").bundle()})
    src = h.source(double)

    assert src.trust_domain == TD
    assert src.identities() == {CLIENT, SERVER}
    assert src.bundle() == ca.bundle()
    assert list(src.federated_bundles()) == ["partner.example"]
    served = double.svids()
    for identity in (CLIENT, SERVER):
        svid = src.svid_for(identity)
        assert svid.identity == identity and svid.spiffe_id == spiffe_id(TD, identity)
        # the very certificate and key SPIRE sent, in the form the built-in CA gives them
        assert svid.cert_pem == served[identity].cert_pem
        assert svid.chain_pem == served[identity].chain_pem
        assert svid.not_after == served[identity].not_after
        chain = x509.load_pem_x509_certificates(svid.chain_pem)
        peer = verify_peer(chain, src.bundle(), TD, identity)
        assert peer.identity == identity and peer.not_after == svid.not_after
        # the same check against the built-in CA's own bundle: nothing SPIRE-specific
        assert verify_peer(chain, ca.bundle(), TD, identity) == peer
    # the same SVID again until SPIRE pushes another (a caching source)
    assert src.svid_for(CLIENT) == src.svid_for(CLIENT)


def test_missing_identity_is_a_clear_error(ca: BuiltinCA, h: Harness) -> None:
    double = h.double(ca, [CLIENT])
    src = h.source(double)
    with pytest.raises(MissingSVIDError) as info:
        src.svid_for(OTHER)
    assert info.value.identity == OTHER
    text = str(info.value)
    assert f"no SVID for identity {OTHER} ({spiffe_id(TD, OTHER)})" in text
    assert spiffe_id(TD, CLIENT) in text  # what SPIRE does hold
    assert isinstance(info.value, LookupError)

    # through the store, as the agent sees it
    with pytest.raises(MissingSVIDError):
        h.store(src, [CLIENT, OTHER])

    # registered in SPIRE later: pushed on the stream, then found
    double.set_identities([CLIENT, OTHER])
    eventually(lambda: OTHER in src.identities(), 5, f"SPIRE's SVID for {OTHER} at the source")
    assert src.svid_for(OTHER).spiffe_id == spiffe_id(TD, OTHER)
    assert h.store(src, [CLIENT, OTHER]).identities() == {CLIENT, OTHER}


def test_another_trust_domain_gives_no_svids_of_ours(ca: BuiltinCA, h: Harness) -> None:
    foreign = h.double(BuiltinCA.ephemeral("other.example"), [CLIENT])
    src = h.source(foreign, TD)
    with pytest.raises(MissingSVIDError, match="no SVID of this trust domain"):
        src.svid_for(CLIENT)
    with pytest.raises(SpireError, match=f"no bundle of {TD}"):
        src.bundle()


def test_no_agent_and_no_identity_fail_clearly(ca: BuiltinCA, h: Harness) -> None:
    with pytest.raises(SpireError, match="does not exist"):
        SpireSource(str(h.sockdir / "nobody.sock"), TD, timeout=1.0)
    # an agent that issued the workload nothing answers PERMISSION_DENIED, which the client
    # retries: no first update within the timeout
    empty = h.double(ca, [])
    started = time.monotonic()
    with pytest.raises(SpireError, match="no X.509-SVIDs .* within 0.5s"):
        SpireSource(str(empty.socket_path), TD, timeout=0.5)
    assert time.monotonic() - started < 3.0


def test_an_expired_svid_is_not_handed_out(ca: BuiltinCA, h: Harness) -> None:
    clock = ManualClock()
    double = h.double(ca, [CLIENT], ttl=600)
    src = h.source(double, clock=clock)
    svid = src.svid_for(CLIENT)
    clock.set(svid.not_after + 1)  # SPIRE pushed nothing newer in time
    with pytest.raises(SpireError, match=r"expired at .* no newer one arrived"):
        src.svid_for(CLIENT)


def test_agent_restart_keeps_the_last_svids_and_reconnects(ca: BuiltinCA, h: Harness) -> None:
    double = h.double(ca, [CLIENT])
    src = h.source(double)
    before = src.svid_for(CLIENT)
    double.stop()
    time.sleep(0.2)
    assert src.svid_for(CLIENT) == before  # still valid, still served
    double.rotate()  # the restarted agent has new SVIDs
    double.start()
    eventually(lambda: src.svid_for(CLIENT).serial != before.serial, 8.0,
               "the restarted agent's new SVID at the source")
    assert src.svid_for(CLIENT).cert_pem == double.svids()[CLIENT].cert_pem


# -- the double speaks the protocol -------------------------------------------------------------


def test_double_refuses_a_request_without_the_security_header(ca: BuiltinCA, h: Harness) -> None:
    double = h.double(ca, [CLIENT, SERVER])
    with grpc.insecure_channel(f"unix:{double.socket_path}") as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.X509SVIDResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            next(iter(fetch(workload_pb2.X509SVIDRequest(), timeout=5.0)))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "security header missing from request"
        assert double.refused == 1

        wrong = fetch(workload_pb2.X509SVIDRequest(), timeout=5.0,
                      metadata=[("workload.spiffe.io", "false")])
        with pytest.raises(grpc.RpcError):
            next(iter(wrong))
        assert double.refused == 2

        stream = fetch(workload_pb2.X509SVIDRequest(), timeout=5.0,
                       metadata=[("workload.spiffe.io", "true")])
        response = next(iter(stream))
        stream.cancel()
    assert [s.spiffe_id for s in response.svids] == [spiffe_id(TD, CLIENT), spiffe_id(TD, SERVER)]
    first = response.svids[0]
    leaf = x509.load_der_x509_certificate(first.x509_svid)  # DER chain of one
    assert verify_peer(leaf, [x509.load_der_x509_certificate(first.bundle)], TD, CLIENT)
    assert double.refused == 2 and double.requests == 3


# -- SpireSource behind SVIDStore and the handshake ---------------------------------------------


def test_handshake_between_builtin_ca_and_spire_nodes(ca: BuiltinCA, h: Harness) -> None:
    spire_store = h.store(h.source(h.double(ca, [CLIENT, SERVER])), [CLIENT, SERVER])
    builtin_store = h.store(ca, [CLIENT, SERVER])
    spire_events: list[ServerEvent] = []
    builtin_events: list[ServerEvent] = []
    spire_addr = h.serve(spire_store, spire_events)
    builtin_addr = h.serve(builtin_store, builtin_events)

    # SPIRE-fed client -> built-in CA server
    result = handshake(spire_store, CLIENT, SERVER, builtin_addr, timeout=5.0)
    assert result.peer.identity == SERVER
    assert result.peer.not_after == builtin_store.svid(SERVER).not_after
    eventually(lambda: len(builtin_events) == 1, 5, "the built-in CA server's handshake event")
    assert builtin_events[0].peer is not None
    assert builtin_events[0].peer.spiffe_id == spire_store.svid(CLIENT).spiffe_id

    # built-in CA client -> SPIRE-fed server
    result = handshake(builtin_store, CLIENT, SERVER, spire_addr, timeout=5.0)
    assert result.peer.identity == SERVER
    assert result.peer.not_after == spire_store.svid(SERVER).not_after
    eventually(lambda: len(spire_events) == 1, 5, "the SPIRE-fed server's handshake event")
    assert spire_events[0].error is None


def test_handshake_fails_across_trust_domains(ca: BuiltinCA, h: Harness) -> None:
    builtin_store = h.store(ca, [SERVER])
    address = h.serve(builtin_store)

    # a SPIRE of another trust domain: its node asks for 200.other.example, which we don't serve
    other = BuiltinCA.ephemeral("other.example")
    foreign_store = h.store(h.source(h.double(other, [CLIENT]), "other.example"), [CLIENT])
    with pytest.raises(AuthError) as info:
        handshake(foreign_store, CLIENT, SERVER, address, timeout=5.0)
    assert info.value.reason is Failure.UNKNOWN_IDENTITY and info.value.by_peer

    # a SPIRE that claims our trust domain's name with another root: nobody trusts anybody
    rogue = BuiltinCA.ephemeral(TD)
    rogue_store = h.store(h.source(h.double(rogue, [CLIENT, SERVER])), [CLIENT, SERVER])
    with pytest.raises(AuthError) as info:
        handshake(rogue_store, CLIENT, SERVER, address, timeout=5.0)
    assert info.value.reason is Reason.UNTRUSTED and not info.value.by_peer
    with pytest.raises(AuthError) as info:
        handshake(h.store(ca, [CLIENT]), CLIENT, SERVER, h.serve(rogue_store), timeout=5.0)
    assert info.value.reason is Reason.UNTRUSTED and not info.value.by_peer


def test_rotation_pushed_by_spire_is_picked_up(ca: BuiltinCA, h: Harness) -> None:
    clock = ManualClock()
    double = h.double(ca, [CLIENT, SERVER], ttl=3600)
    src = h.source(double)
    pushed = threading.Event()
    src.subscribe(pushed.set)
    store = h.store(src, [CLIENT, SERVER], clock=clock)
    rotations: list[int] = []
    store.subscribe(rotations.append)
    old = store.svid(CLIENT)
    server_store = h.store(ca, [SERVER])
    address = h.serve(server_store)
    assert handshake(store, CLIENT, SERVER, address, timeout=5.0).expires_at == old.not_after

    double.ttl = 1800  # so the new SVID is told apart by its expiry in the handshake too
    new = double.rotate([CLIENT])[CLIENT]
    assert pushed.wait(5.0)
    assert src.svid_for(CLIENT).cert_pem == new.cert_pem  # the source has the newest at once
    # the store takes it when its own rotation time comes (half the remaining lifetime)
    assert store.svid(CLIENT) == old
    clock.advance(1801)
    assert store.refresh() == [CLIENT]  # SERVER's SVID did not change: not a rotation
    assert rotations == [CLIENT]
    assert store.svid(CLIENT).cert_pem == new.cert_pem
    assert store.files(CLIENT).cert_and_key.read_bytes().endswith(new.chain_pem)

    # the next handshake presents the rotated SVID
    events: list[ServerEvent] = []
    address = h.serve(server_store, events)
    assert handshake(store, CLIENT, SERVER, address, timeout=5.0).expires_at == new.not_after
    eventually(lambda: len(events) == 1, 5, "the server's handshake event")
    assert events[0].peer is not None and events[0].peer.not_after == new.not_after
    assert new.not_after < old.not_after
