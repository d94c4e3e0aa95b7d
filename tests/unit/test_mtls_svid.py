"""X.509-SVIDs as issued by the built-in CA, and `verify_peer` accepting exactly the good ones."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.svid import Reason, SVIDError, verify_peer
from l7gate.testing.mtls import ManualClock, forge_svid

TD = "l7gate.local"


@pytest.fixture(scope="module")
def ca() -> BuiltinCA:
    return BuiltinCA.ephemeral(TD)


def reason_of(chain: object, bundle: list[x509.Certificate], expected: int | None = None,
              *, trust_domain: str = TD, now: float | None = None) -> Reason:
    with pytest.raises(SVIDError) as info:
        verify_peer(chain, bundle, trust_domain, expected,  # type: ignore[arg-type]
                    now=time.time() if now is None else now)
    return info.value.reason


# -- what the CA issues -------------------------------------------------------------------------


def test_issued_svid_has_the_spiffe_shape() -> None:
    clock = ManualClock(1_800_000_000.0)
    ca = BuiltinCA.ephemeral(TD, clock=clock, backdate=60)
    svid = ca.issue(66123, ttl=600)
    cert = svid.certificate

    assert svid.identity == 66123
    assert svid.spiffe_id == "spiffe://l7gate.local/identity/66123"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [svid.spiffe_id]
    assert san.get_values_for_type(x509.DNSName) == []
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}

    assert svid.not_before == cert.not_valid_before_utc.timestamp() == clock() - 60
    assert svid.not_after == cert.not_valid_after_utc.timestamp() == clock() + 600

    key = serialization.load_pem_private_key(svid.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    assert svid.chain_pem == svid.cert_pem
    cert.verify_directly_issued_by(ca.certificate)
    assert "PRIVATE KEY" not in repr(svid)


def test_svid_never_outlives_the_ca() -> None:
    ca = BuiltinCA.ephemeral(TD, ca_ttl=300)
    svid = ca.issue(300, ttl=3600)
    assert svid.not_after == ca.certificate.not_valid_after_utc.timestamp()


def test_each_issue_is_a_new_key_and_serial(ca: BuiltinCA) -> None:
    a, b = ca.issue(300), ca.issue(300)
    assert a.serial != b.serial and a.key_pem != b.key_pem


# -- verify_peer --------------------------------------------------------------------------------


def test_good_svid_is_accepted_as_der_or_parsed(ca: BuiltinCA) -> None:
    svid = ca.issue(300, ttl=600)
    der = svid.certificate.public_bytes(serialization.Encoding.DER)
    for chain in (der, [der], svid.certificate):
        peer = verify_peer(chain, ca.bundle(), TD, 300, now=time.time())
        assert (peer.identity, peer.spiffe_id) == (300, "spiffe://l7gate.local/identity/300")
        assert peer.not_after == svid.not_after
    assert verify_peer(der, ca.bundle(), TD, None, now=time.time()).identity == 300


def test_expired(ca: BuiltinCA) -> None:
    svid = forge_svid(ca, 300, not_before=time.time() - 7200, not_after=time.time() - 10)
    assert reason_of(svid.certificate, ca.bundle(), 300) is Reason.EXPIRED
    # the same SVID, seen from a clock before its expiry, is fine: the check uses `now`
    verify_peer(svid.certificate, ca.bundle(), TD, 300, now=time.time() - 60)


def test_not_yet_valid(ca: BuiltinCA) -> None:
    svid = forge_svid(ca, 300, not_before=time.time() + 600, not_after=time.time() + 3600)
    assert reason_of(svid.certificate, ca.bundle(), 300) is Reason.NOT_YET_VALID


def test_other_trust_domain() -> None:
    ours, theirs = BuiltinCA.ephemeral(TD), BuiltinCA.ephemeral("other.example")
    svid = theirs.issue(300)
    # even with their root in our bundle, their identities are not ours
    assert reason_of(svid.certificate, ours.bundle(), 300) is Reason.WRONG_TRUST_DOMAIN
    assert reason_of(svid.certificate, ours.bundle() + theirs.bundle(), 300) is Reason.WRONG_TRUST_DOMAIN


def test_two_uri_sans(ca: BuiltinCA) -> None:
    svid = forge_svid(ca, 300, uris=["spiffe://l7gate.local/identity/300",
                                     "spiffe://l7gate.local/identity/301"])
    with pytest.raises(SVIDError, match="more than one URI SAN") as info:
        verify_peer(svid.certificate, ca.bundle(), TD, 300, now=time.time())
    assert info.value.reason is Reason.MULTIPLE_URI_SANS


def test_no_uri_san(ca: BuiltinCA) -> None:
    assert reason_of(forge_svid(ca, 300, uris=[]).certificate, ca.bundle()) is Reason.NO_SPIFFE_ID


def test_uri_san_that_is_not_spiffe(ca: BuiltinCA) -> None:
    svid = forge_svid(ca, 300, uris=["https://l7gate.local/identity/300"])
    assert reason_of(svid.certificate, ca.bundle()) is Reason.NO_SPIFFE_ID


def test_malformed_spiffe_id(ca: BuiltinCA) -> None:
    svid = forge_svid(ca, 300, uris=["spiffe://l7gate.local/ns/payments/sa/billing"])
    assert reason_of(svid.certificate, ca.bundle()) is Reason.MALFORMED_SPIFFE_ID


def test_ca_certificate_as_leaf(ca: BuiltinCA) -> None:
    assert reason_of(ca.certificate, ca.bundle()) is Reason.IS_CA
    forged = forge_svid(ca, 300, is_ca=True)
    assert reason_of(forged.certificate, ca.bundle(), 300) is Reason.IS_CA


def test_signed_by_an_untrusted_ca_of_the_same_trust_domain(ca: BuiltinCA) -> None:
    rogue = BuiltinCA.ephemeral(TD)
    assert reason_of(rogue.issue(300).certificate, ca.bundle(), 300) is Reason.UNTRUSTED


def test_rogue_ca_with_our_roots_name_does_not_pass(ca: BuiltinCA) -> None:
    """Issuer names match, the signature does not: verify_directly_issued_by must catch it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    impostor_root = (
        x509.CertificateBuilder()
        .subject_name(ca.certificate.subject).issuer_name(ca.certificate.subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    impostor = BuiltinCA(key, impostor_root, TD)
    svid = impostor.issue(300)
    assert svid.certificate.issuer == ca.certificate.subject
    assert reason_of(svid.certificate, ca.bundle(), 300) is Reason.UNTRUSTED


def test_unexpected_identity(ca: BuiltinCA) -> None:
    with pytest.raises(SVIDError, match=r"unexpected identity \(expected 300 got 301\)") as info:
        verify_peer(ca.issue(301).certificate, ca.bundle(), TD, 300, now=time.time())
    assert info.value.reason is Reason.UNEXPECTED_IDENTITY


def test_garbage_and_empty_chains_are_untrusted(ca: BuiltinCA) -> None:
    assert reason_of(b"not a certificate", ca.bundle()) is Reason.UNTRUSTED
    assert reason_of([], ca.bundle()) is Reason.UNTRUSTED


def test_expired_root_makes_every_svid_untrusted() -> None:
    clock = ManualClock()
    ca = BuiltinCA.ephemeral(TD, clock=clock, ca_ttl=600, backdate=0)
    svid = ca.issue(300, ttl=60)
    later = clock() + 3600
    assert reason_of(svid.certificate, ca.bundle(), 300, now=later) is Reason.UNTRUSTED


# -- intermediates (as a SPIRE server with an upstream authority issues them) -------------------


def _root(path_length: int | None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test root {path_length}")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _intermediate(root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate) -> BuiltinCA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return BuiltinCA(key, cert, TD)


def test_chain_through_an_intermediate() -> None:
    root_key, root = _root(path_length=None)
    inter = _intermediate(root_key, root)
    leaf = inter.issue(300).certificate
    peer = verify_peer([leaf, inter.certificate], [root], TD, 300, now=time.time())
    assert peer.identity == 300
    assert reason_of([leaf], [root], 300) is Reason.UNTRUSTED  # intermediate not sent


def test_intermediate_below_a_root_that_forbids_one(ca: BuiltinCA) -> None:
    root_key, root = _root(path_length=0)
    inter = _intermediate(root_key, root)
    leaf = inter.issue(300).certificate
    with pytest.raises(SVIDError, match="allows 0 intermediates"):
        verify_peer([leaf, inter.certificate], [root], TD, 300, now=time.time())


# -- the cache of verified chains ------------------------------------------------------------


def test_a_chain_verified_once_is_not_checked_again_while_its_path_is_valid(
        ca: BuiltinCA, monkeypatch: pytest.MonkeyPatch) -> None:
    from l7gate.mtls import svid as svid_module

    svid_module.clear_verified()
    cert = ca.issue(300, ttl=600).certificate
    verify_peer(cert, ca.bundle(), TD, 300, now=time.time())

    def no_path(*_: object) -> None:
        raise AssertionError("the path was verified again")

    monkeypatch.setattr(svid_module, "_verify_path", no_path)
    assert verify_peer(cert, ca.bundle(), TD, 300, now=time.time()).identity == 300
    # the identity is still checked on a hit
    with pytest.raises(SVIDError, match=r"expected 301 got 300") as info:
        verify_peer(cert, ca.bundle(), TD, 301, now=time.time())
    assert info.value.reason is Reason.UNEXPECTED_IDENTITY


def test_a_cached_chain_is_checked_anew_outside_its_validity_and_under_another_bundle_or_domain(
        ca: BuiltinCA) -> None:
    svid = forge_svid(ca, 300, not_before=time.time() - 10, not_after=time.time() + 60)
    assert verify_peer(svid.certificate, ca.bundle(), TD, 300, now=time.time()).identity == 300
    assert reason_of(svid.certificate, ca.bundle(), 300, now=time.time() + 120) is Reason.EXPIRED
    assert reason_of(svid.certificate, ca.bundle(), 300, now=time.time() - 20) is Reason.NOT_YET_VALID
    other = BuiltinCA.ephemeral(TD)  # a CA rotation: the old chain is not trusted by the new bundle
    assert reason_of(svid.certificate, other.bundle(), 300) is Reason.UNTRUSTED
    assert reason_of(svid.certificate, ca.bundle(), 300, trust_domain="other.td") is Reason.WRONG_TRUST_DOMAIN


def test_a_cached_chain_under_a_root_that_expires_first_is_untrusted_then() -> None:
    clock = ManualClock()
    ca = BuiltinCA.ephemeral(TD, clock=clock, ca_ttl=600, backdate=0)
    now = clock()
    leaf = forge_svid(ca, 300, not_before=now - 10, not_after=now + 3600)  # outlives its root
    assert verify_peer(leaf.certificate, ca.bundle(), TD, 300, now=now).identity == 300
    assert reason_of(leaf.certificate, ca.bundle(), 300, now=now + 1200) is Reason.UNTRUSTED
