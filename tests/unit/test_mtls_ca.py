"""Built-in CA: SPIFFE naming, the root it persists, file modes, refusal of exposed keys, and
two processes racing to create the CA of a shared directory."""

from __future__ import annotations

import multiprocessing
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from l7gate.mtls.ca import CERT_FILE, KEY_FILE, BuiltinCA, CAError
from l7gate.mtls._files import InsecureFileError
from l7gate.identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    SpiffeIDError,
    parse_server_name,
    parse_spiffe_id,
    server_name,
    spiffe_id,
)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: any file created without an explicit private mode would be world readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- names --------------------------------------------------------------------------------------


def test_spiffe_id_format_and_default_trust_domain() -> None:
    assert DEFAULT_TRUST_DOMAIN == "l7gate.local"
    assert spiffe_id("l7gate.local", 66123) == "spiffe://l7gate.local/identity/66123"
    assert parse_spiffe_id("spiffe://l7gate.local/identity/66123") == ("l7gate.local", 66123)
    assert server_name("l7gate.local", 66123) == "66123.l7gate.local"
    assert parse_server_name("66123.L7GATE.local", "l7gate.local") == 66123


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://l7gate.local/identity/",
        "spiffe://l7gate.local/identity/0",
        "spiffe://l7gate.local/identity/007",
        "spiffe://l7gate.local/identity/12/",
        "spiffe://l7gate.local/identity/12?x=1",
        "spiffe://l7gate.local/identity/4294967296",
        "spiffe://l7gate.local/ns/default/sa/frontend",
        "spiffe://L7GATE.local/identity/12",
        "spiffe://l7gate.local:443/identity/12",
        "spiffe://user@l7gate.local/identity/12",
        "spiffe://l7gate.local",
        "https://l7gate.local/identity/12",
    ],
)
def test_malformed_spiffe_ids_are_rejected(uri: str) -> None:
    with pytest.raises(SpiffeIDError):
        parse_spiffe_id(uri)


@pytest.mark.parametrize("name", ["66123.other.local", "66123", "x.l7gate.local", "0.l7gate.local"])
def test_server_names_of_other_forms_are_rejected(name: str) -> None:
    with pytest.raises(SpiffeIDError):
        parse_server_name(name, "l7gate.local")


@pytest.mark.parametrize("identity", [0, -1, 2**32, True])
def test_spiffe_id_refuses_identities_out_of_range(identity: int) -> None:
    with pytest.raises(SpiffeIDError):
        spiffe_id("l7gate.local", identity)


# -- the root -----------------------------------------------------------------------------------


def test_created_root_is_a_self_signed_p256_ca_of_the_trust_domain(tmp_path: Path) -> None:
    ca = BuiltinCA.load_or_create(tmp_path / "ca", "cluster.example")
    root = ca.certificate
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    public = root.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert isinstance(root.signature_hash_algorithm, hashes.SHA256)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.example"]
    assert ca.bundle() == [root]


def test_files_and_directory_are_private_even_under_umask_0(tmp_path: Path, open_umask: None) -> None:
    directory = tmp_path / "shared" / "ca"
    BuiltinCA.load_or_create(directory)
    assert mode(directory) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key", "ca.lock"]
    for path in directory.iterdir():
        assert mode(path) == 0o600, path


def test_reload_returns_the_same_root_and_key(tmp_path: Path) -> None:
    first = BuiltinCA.load_or_create(tmp_path)
    key_bytes = (tmp_path / KEY_FILE).read_bytes()
    second = BuiltinCA.load_or_create(tmp_path)
    assert second.certificate == first.certificate
    assert (tmp_path / KEY_FILE).read_bytes() == key_bytes
    # an SVID from the reloaded CA chains to the first one's root
    second.issue(300).certificate.verify_directly_issued_by(first.certificate)


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_group_or_others_is_refused(tmp_path: Path, bad_mode: int) -> None:
    BuiltinCA.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE, bad_mode)
    with pytest.raises(InsecureFileError, match=f"mode {bad_mode:04o}.*group or others"):
        BuiltinCA.load_or_create(tmp_path)
    assert mode(tmp_path / KEY_FILE) == bad_mode  # refused, not silently "fixed"


def test_key_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    BuiltinCA.load_or_create(tmp_path / "real")
    (tmp_path / "link").mkdir(mode=0o700)
    (tmp_path / "link" / KEY_FILE).symlink_to(tmp_path / "real" / KEY_FILE)
    (tmp_path / "link" / CERT_FILE).write_bytes((tmp_path / "real" / CERT_FILE).read_bytes())
    with pytest.raises(OSError):
        BuiltinCA.load_or_create(tmp_path / "link")


def test_world_writable_directory_is_refused_and_readable_one_tightened(tmp_path: Path) -> None:
    writable = tmp_path / "w"
    writable.mkdir()
    os.chmod(writable, 0o777)
    with pytest.raises(InsecureFileError, match="writable by group or others"):
        BuiltinCA.load_or_create(writable)
    assert not (writable / KEY_FILE).exists()

    readable = tmp_path / "r"
    readable.mkdir()
    os.chmod(readable, 0o755)
    BuiltinCA.load_or_create(readable)
    assert mode(readable) == 0o700


def test_directory_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    BuiltinCA.load_or_create(tmp_path, "one.example")
    with pytest.raises(CAError, match="trust domain one.example, not two.example"):
        BuiltinCA.load_or_create(tmp_path, "two.example")


def test_key_without_certificate_gets_a_new_certificate_for_the_same_key(tmp_path: Path) -> None:
    first = BuiltinCA.load_or_create(tmp_path)
    (tmp_path / CERT_FILE).unlink()  # as after a crash between the two renames
    second = BuiltinCA.load_or_create(tmp_path)
    assert second.certificate.public_key() == first.certificate.public_key()
    assert mode(tmp_path / CERT_FILE) == 0o600


def test_certificate_without_key_is_an_error(tmp_path: Path) -> None:
    BuiltinCA.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).unlink()
    with pytest.raises(CAError, match="without"):
        BuiltinCA.load_or_create(tmp_path)


def _load_and_report(directory: str, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue[bytes]) -> None:
    start.wait()
    ca = BuiltinCA.load_or_create(directory)
    out.put(ca.certificate.fingerprint(hashes.SHA256()))


def test_processes_racing_on_a_shared_directory_end_up_with_one_ca(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    out: multiprocessing.Queue[bytes] = ctx.Queue()
    directory = tmp_path / "shared-ca"
    procs = [ctx.Process(target=_load_and_report, args=(str(directory), start, out)) for _ in range(6)]
    for p in procs:
        p.start()
    start.set()
    fingerprints = {out.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(fingerprints) == 1
    assert fingerprints == {BuiltinCA.load_or_create(directory).certificate.fingerprint(hashes.SHA256())}
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key", "ca.lock"]
