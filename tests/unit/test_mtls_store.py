"""SVIDStore: one SVID per local identity, rotation at a fraction of the lifetime (injected
clock), files for the TLS layer, and the mode of every file the mtls package writes."""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.store import BUNDLE_FILE, SVIDStore
from l7gate.testing.mtls import ManualClock, StaticSource
from l7gate.testing.wait import eventually

TD = "l7gate.local"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def ca(clock: ManualClock) -> BuiltinCA:
    return BuiltinCA.ephemeral(TD, clock=clock, svid_ttl=100.0)


def test_fetches_one_svid_per_identity_and_forgets_those_that_leave(
    tmp_path: Path, ca: BuiltinCA
) -> None:
    store = SVIDStore(ca, tmp_path / "svids")
    store.set_identities([300, 301])
    assert store.identities() == {300, 301}
    assert store.svid(300).spiffe_id == "spiffe://l7gate.local/identity/300"
    assert store.svid(300) == store.svid(300)  # held, not issued on every read
    assert (tmp_path / "svids" / "svid-301.pem").exists()

    store.set_identities([300])
    with pytest.raises(KeyError):
        store.svid(301)
    assert not (tmp_path / "svids" / "svid-301.pem").exists()
    assert store.trust_domain == TD
    assert list(store.bundle()) == ca.bundle()


def test_files_load_into_python_ssl(tmp_path: Path, ca: BuiltinCA) -> None:
    store = SVIDStore(ca, tmp_path)
    store.set_identities([300])
    files = store.files(300)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.cert_and_key)  # key and chain from one file
    ctx.load_verify_locations(files.bundle)
    assert files.svid == store.svid(300)
    assert files.bundle.read_bytes() == store.bundle_pem()


def test_rotates_at_half_of_the_lifetime(tmp_path: Path, ca: BuiltinCA, clock: ManualClock) -> None:
    store = SVIDStore(ca, tmp_path, clock=clock)
    rotated: list[int] = []
    store.subscribe(rotated.append)
    store.set_identities([300, 301])
    first = store.svid(300)
    generation = store.generation
    file_before = (tmp_path / "svid-300.pem").read_bytes()
    assert store.next_rotation() == pytest.approx(clock() + 50)

    clock.advance(49.0)
    assert store.refresh() == []
    assert store.svid(300) == first and rotated == []

    clock.advance(2.0)
    assert store.refresh() == [300, 301]
    assert rotated == [300, 301]
    second = store.svid(300)
    assert second.serial != first.serial
    assert second.not_after == pytest.approx(clock() + 100, abs=1)
    assert store.generation > generation
    assert (tmp_path / "svid-300.pem").read_bytes() != file_before


def test_reading_a_due_svid_rotates_it_first(tmp_path: Path, ca: BuiltinCA, clock: ManualClock) -> None:
    store = SVIDStore(ca, tmp_path, clock=clock)
    rotated: list[int] = []
    store.subscribe(rotated.append)
    store.set_identities([300])
    first = store.svid(300)
    clock.advance(51.0)
    assert store.svid(300).serial != first.serial
    assert rotated == [300]


def test_rotation_fraction_is_configurable(tmp_path: Path, ca: BuiltinCA, clock: ManualClock) -> None:
    store = SVIDStore(ca, tmp_path, clock=clock, rotate_fraction=0.8)
    store.set_identities([300])
    clock.advance(79.0)
    assert store.refresh() == []
    clock.advance(2.0)
    assert store.refresh() == [300]
    with pytest.raises(ValueError):
        SVIDStore(ca, tmp_path, rotate_fraction=1.0)


def test_fraction_counts_from_fetch_not_from_the_backdated_not_before(
    tmp_path: Path, clock: ManualClock
) -> None:
    # 10 minutes of backdating and a 100 s TTL: rotating at half of (NotAfter - NotBefore)
    # would rotate at once, every time.
    ca = BuiltinCA.ephemeral(TD, clock=clock, svid_ttl=100.0, backdate=600)
    store = SVIDStore(ca, tmp_path, clock=clock)
    store.set_identities([300])
    clock.advance(40.0)
    assert store.refresh() == []


def test_source_returning_the_same_svid_is_not_a_rotation(tmp_path: Path, ca: BuiltinCA,
                                                           clock: ManualClock) -> None:
    source = StaticSource(TD, ca.bundle(), {300: ca.issue(300)})
    store = SVIDStore(source, tmp_path, clock=clock)
    rotated: list[int] = []
    store.subscribe(rotated.append)
    store.set_identities([300])
    clock.advance(60.0)
    assert store.refresh() == [] and rotated == []
    source.svids[300] = ca.issue(300)
    clock.advance(30.0)  # due again: half of what was left at the last fetch
    assert store.refresh() == [300] and rotated == [300]


def test_background_thread_rotates(tmp_path: Path) -> None:
    ca = BuiltinCA.ephemeral(TD, svid_ttl=1.0, backdate=0)
    store = SVIDStore(ca, tmp_path)
    store.set_identities([300])
    first = store.svid(300).serial
    rotated: list[int] = []
    store.subscribe(rotated.append)
    store.start()
    try:
        # Real time: the thread sleeps on its own timer until the rotation is due (~0.5 s).
        eventually(lambda: rotated, 5.0, "the rotation thread to rotate the SVID")
    finally:
        store.stop()
    assert rotated[0] == 300
    assert store.svid(300).serial != first


# -- every file the package writes --------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_every_written_file_is_private(tmp_path: Path, open_umask: None, clock: ManualClock) -> None:
    """CA key and certificate, lock file, SVID keys (also after rotation), bundle: 0600 in 0700
    directories, with umask 0 so that only the code's own modes count; no temp file left."""
    ca = BuiltinCA.load_or_create(tmp_path / "ca", TD, clock=clock, svid_ttl=100.0)
    store = SVIDStore(ca, tmp_path / "node" / "svids", clock=clock)
    store.set_identities([300, 301, 66123])
    clock.advance(60.0)
    assert store.refresh() == [300, 301, 66123]
    store.set_identities([300, 301])

    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "ca/ca.crt", "ca/ca.key", "ca/ca.lock",
        f"node/svids/{BUNDLE_FILE}", "node/svids/svid-300.pem", "node/svids/svid-301.pem",
    ]
    for path in tmp_path.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            if path.name in ("ca", "svids"):
                assert mode == 0o700, path
        else:
            assert mode == 0o600, f"{path} has mode {mode:04o}"
    key_files = [tmp_path / "ca" / "ca.key", *(tmp_path / "node" / "svids").glob("svid-*.pem")]
    for path in key_files:
        assert b"PRIVATE KEY" in path.read_bytes()


def test_bundle_listeners_hear_a_new_bundle_once(tmp_path: Path, ca: BuiltinCA) -> None:
    """A CA rotation (a new bundle) is announced on the next refresh, once; an unchanged
    bundle is not."""
    other = BuiltinCA.ephemeral(TD)
    source = StaticSource(TD, ca.bundle(), {300: ca.issue(300)})
    store = SVIDStore(source, tmp_path)
    heard: list[bytes] = []
    store.subscribe_bundle(lambda: heard.append(store.bundle_pem()))
    store.refresh()
    assert heard == []
    source._bundle = [*ca.bundle(), *other.bundle()]  # the new root next to the old one
    store.refresh()
    store.refresh()
    assert len(heard) == 1 and heard[0] == store.bundle_pem() != b""
    assert (tmp_path / BUNDLE_FILE).read_bytes() == heard[0]
