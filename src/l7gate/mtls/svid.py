"""X.509-SVIDs and the peer check every mutual-auth handshake ends with.

`verify_peer` is the one place that decides whether a certificate chain proves a security
identity. It does not trust that OpenSSL already looked at the chain: it checks the SPIFFE rules
(exactly one URI SAN, a well-formed ``spiffe://TD/identity/N``, not a CA) and then verifies the
path to the trust bundle itself with `cryptography` (each signature and each validity period),
so the decision and its reason do not depend on how the TLS layer was configured.

Times are wall-clock seconds since the epoch (`time.time()`), the clock the certificates use.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from ..identity.spiffe import SpiffeIDError, parse_spiffe_id

_E = TypeVar("_E", bound=x509.ExtensionType)

MAX_PATH = 8  # certificates between a leaf and its trust anchor, anchor excluded


class Reason(enum.Enum):
    """Why a certificate does not prove an identity. The value is the text flows and logs show."""

    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    UNTRUSTED = "untrusted"
    WRONG_TRUST_DOMAIN = "wrong trust domain"
    MULTIPLE_URI_SANS = "more than one URI SAN"
    NO_SPIFFE_ID = "no SPIFFE ID"
    MALFORMED_SPIFFE_ID = "malformed SPIFFE ID"
    UNEXPECTED_IDENTITY = "unexpected identity"
    IS_CA = "is a CA"


class SVIDError(Exception):
    """A certificate that is not a valid X.509-SVID of the trust domain (see `Reason`)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value} ({detail})" if detail else reason.value)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SVID:
    """One identity's X.509-SVID and its private key (PEM, PKCS#8, unencrypted).

    `cert_pem` is the leaf alone; `chain_pem` is the leaf followed by any intermediates, i.e.
    what the TLS layer sends to the peer (never the root). Immutable; whoever holds it may
    share it between threads.
    """

    identity: int
    spiffe_id: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    chain_pem: bytes = field(repr=False)
    not_before: float
    not_after: float

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


@dataclass(frozen=True, slots=True)
class Peer:
    """The identity a verified peer certificate proves, and until when."""

    identity: int
    spiffe_id: str
    not_after: float


CertInput = bytes | x509.Certificate
"""A certificate as DER bytes (what `SSLSocket.getpeercert(True)` returns) or parsed."""


def verify_peer(
    chain: CertInput | Sequence[CertInput],
    bundle: Sequence[x509.Certificate],
    trust_domain: str,
    expected_identity: int | None = None,
    *,
    now: float | None = None,
) -> Peer:
    """Check that `chain` (leaf first, then intermediates) is a valid X.509-SVID of
    `trust_domain` issued under `bundle`, naming `expected_identity` if that is given, at
    wall-clock time `now` (default: the current time).

    Raises `SVIDError` with the first failed check, in this order: the leaf is a CA; its URI
    SANs (exactly one, a spiffe:// URI, well formed); its trust domain; the signatures up to a
    bundle certificate and their validity periods ("untrusted"); the leaf's own validity
    period; the identity.
    """
    now = time.time() if now is None else now
    key = _cache_key(chain, bundle, trust_domain)
    with _verified_lock:
        hit = _verified.get(key)
        if hit is not None:
            _verified.move_to_end(key)
    if hit is not None and hit.valid_from <= now <= hit.valid_until:
        # The same chain, bundle and trust domain passed every check before, and every time
        # check passes at `now` too: the result is the one a full check would give.
        if expected_identity is not None and hit.peer.identity != expected_identity:
            raise SVIDError(Reason.UNEXPECTED_IDENTITY, f"expected {expected_identity} got {hit.peer.identity}")
        return hit.peer
    certs = _parse_chain(chain)
    leaf = certs[0]

    # SPIFFE X.509-SVID 4.1/4.3: a leaf is not a CA and cannot sign certificates.
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise SVIDError(Reason.IS_CA, "basicConstraints CA:TRUE")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and (usage.key_cert_sign or usage.crl_sign):
        raise SVIDError(Reason.IS_CA, "keyCertSign/cRLSign key usage")

    # SPIFFE X.509-SVID 2: exactly one URI SAN, the SPIFFE ID.
    san = _extension(leaf, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    if len(uris) > 1:
        raise SVIDError(Reason.MULTIPLE_URI_SANS, ", ".join(uris))
    if not uris or not uris[0].lower().startswith("spiffe:"):
        raise SVIDError(Reason.NO_SPIFFE_ID, uris[0] if uris else "no URI SAN")
    try:
        peer_domain, identity = parse_spiffe_id(uris[0])
    except SpiffeIDError as exc:
        raise SVIDError(Reason.MALFORMED_SPIFFE_ID, str(exc)) from None
    if peer_domain != trust_domain:
        raise SVIDError(Reason.WRONG_TRUST_DOMAIN, f"{peer_domain}, expected {trust_domain}")

    path = _verify_path(leaf, certs[1:], bundle, now)

    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if now < not_before:
        raise SVIDError(Reason.NOT_YET_VALID, f"valid from {_iso(leaf.not_valid_before_utc)}")
    if now > not_after:
        raise SVIDError(Reason.EXPIRED, f"expired at {_iso(leaf.not_valid_after_utc)}")

    peer = Peer(identity=identity, spiffe_id=uris[0], not_after=not_after)
    valid_from = max([not_before, *(c.not_valid_before_utc.timestamp() for c in path)])
    valid_until = min([not_after, *(c.not_valid_after_utc.timestamp() for c in path)])
    with _verified_lock:
        _verified[key] = _Verified(peer, valid_from, valid_until)
        while len(_verified) > VERIFIED_CACHE_SIZE:
            _verified.popitem(last=False)
    if expected_identity is not None and identity != expected_identity:
        raise SVIDError(Reason.UNEXPECTED_IDENTITY, f"expected {expected_identity} got {identity}")
    return peer


# Chains that passed every check, by (trust domain, chain, bundle) as DER: a peer seen again
# (every handshake of a node pair, each pair of identities on it) costs a lookup, not a path
# verification (~110 µs). An entry is used only while `now` is inside the validity period of
# every certificate on its verified path, the leaf's included; outside it the full check runs
# (and names the reason). A new bundle (a CA rotation) is another key. Failures are not kept.
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _Verified:
    peer: Peer
    valid_from: float
    valid_until: float


_verified: OrderedDict[tuple[bytes, ...], _Verified] = OrderedDict()
_verified_lock = threading.Lock()


def _der(cert: CertInput) -> bytes:
    if isinstance(cert, bytes):
        return cert
    # The bundle's certificates are the same objects on every call (the store's tuple): their
    # DER is kept, by object, so a cached check does not re-encode them (~8 µs of ~13).
    hit = _ders.get(id(cert))
    if hit is not None and hit[0] is cert:  # the entry holds the object: its id is not reused
        return hit[1]
    der = cert.public_bytes(Encoding.DER)
    with _verified_lock:
        if len(_ders) >= MAX_DERS:
            _ders.clear()
        _ders[id(cert)] = (cert, der)
    return der


MAX_DERS = 256
_ders: dict[int, tuple[x509.Certificate, bytes]] = {}


def _cache_key(chain: CertInput | Sequence[CertInput], bundle: Sequence[x509.Certificate],
               trust_domain: str) -> tuple[bytes, ...]:
    items: Sequence[CertInput] = [chain] if isinstance(chain, (bytes, x509.Certificate)) else chain
    # the chain's length first: no chain and bundle split the same bytes two ways
    return (trust_domain.encode(), len(items).to_bytes(2, "big"), *map(_der, items), *map(_der, bundle))


def clear_verified() -> None:
    """Forget every verified chain (tests; an operator's `auth` reset)."""
    with _verified_lock:
        _verified.clear()


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_chain(chain: CertInput | Sequence[CertInput]) -> list[x509.Certificate]:
    items: Sequence[CertInput] = (
        [chain] if isinstance(chain, (bytes, x509.Certificate)) else chain
    )
    if not items:
        raise SVIDError(Reason.UNTRUSTED, "no certificate")
    certs = []
    for item in items:
        if isinstance(item, x509.Certificate):
            certs.append(item)
            continue
        try:
            certs.append(x509.load_der_x509_certificate(item))
        except ValueError as exc:
            raise SVIDError(Reason.UNTRUSTED, f"unparsable certificate: {exc}") from None
    return certs


def _verify_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
    now: float,
) -> list[x509.Certificate]:
    """Walk issuer links from `leaf` to a bundle certificate, checking each signature, each
    issuer's validity period and its path length constraint; the issuers walked, the anchor
    last."""
    current = leaf
    pool = list(intermediates)
    path: list[x509.Certificate] = []
    below = 0  # intermediates between the issuer being looked for and the leaf
    for _ in range(MAX_PATH + 1):
        for anchor in bundle:
            if _issued_by(current, anchor):
                _check_issuer(anchor, now, below, "trust anchor")
                return [*path, anchor]
        for candidate in pool:
            if _issued_by(current, candidate) and _is_signing_ca(candidate):
                _check_issuer(candidate, now, below, "intermediate")
                pool.remove(candidate)
                path.append(candidate)
                current = candidate
                below += 1
                break
        else:
            raise SVIDError(
                Reason.UNTRUSTED,
                f"no certificate in the trust bundle issued {current.issuer.rfc4514_string()!r}",
            )
    raise SVIDError(Reason.UNTRUSTED, f"chain longer than {MAX_PATH} certificates")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)  # issuer name match + signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_signing_ca(cert: x509.Certificate) -> bool:
    constraints = _extension(cert, x509.BasicConstraints)
    usage = _extension(cert, x509.KeyUsage)
    return bool(constraints and constraints.ca) and (usage is None or usage.key_cert_sign)


def _check_issuer(cert: x509.Certificate, now: float, below: int, what: str) -> None:
    name = cert.subject.rfc4514_string()
    if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
        raise SVIDError(Reason.UNTRUSTED, f"{what} {name!r} is outside its validity period")
    constraints = _extension(cert, x509.BasicConstraints)
    limit = constraints.path_length if constraints is not None else None
    if limit is not None and below > limit:
        raise SVIDError(
            Reason.UNTRUSTED, f"{what} {name!r} allows {limit} intermediates below it, not {below}"
        )


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or undecodable extensions
        raise SVIDError(Reason.UNTRUSTED, f"malformed extensions: {exc}") from None
