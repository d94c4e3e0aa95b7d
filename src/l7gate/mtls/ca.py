"""The built-in CA: one ECDSA P-256 root per trust domain, persisted in a directory.

Theory of operation. `BuiltinCA.load_or_create(directory, trust_domain)` is the only way in:

- The directory is created with mode 0700. It may be shared by several agents (the agents of
  two clusters that form one trust domain), so the whole load-or-create runs under an exclusive
  `flock` on ``ca.lock``: of two processes that race on an empty directory, one creates the
  root and the other waits and loads it.
- ``ca.key`` (PKCS#8 PEM) is written through `_files.write_private`: a temporary file opened
  with O_CREAT|O_EXCL and mode 0600, fchmod-ed before the first byte, fsync-ed, then renamed
  over the final name. ``ca.crt`` is written the same way (it is public, but nothing here
  writes a file others can read).
- Loading a ``ca.key`` that the group or others can access is refused with `InsecureFileError`
  (we do not chmod it: it may already have leaked, and rotating it is the operator's call).
- The key is written before the certificate. A crash between the two leaves a key without a
  certificate, which the next load repairs by self-signing a new certificate for that key;
  a certificate without a key is an error.

`issue(identity, ttl)` mints an X.509-SVID. The CA is also an `SVIDSource` (`svid_for`,
`bundle`, `trust_domain`) for `SVIDStore`. Thread-safe: after loading nothing mutates.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import ensure_private_dir, read_private, write_private
from ..identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    check_identity,
    check_trust_domain,
    spiffe_id,
    trust_domain_id,
)
from ..clock import Clock
from .svid import SVID

log = logging.getLogger(__name__)

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
LOCK_FILE = "ca.lock"

DEFAULT_SVID_TTL = 3600.0
DEFAULT_CA_TTL = 10 * 365 * 86400.0
DEFAULT_BACKDATE = 60.0  # NotBefore this far in the past, for peers whose clocks run behind


class CAError(Exception):
    """A CA directory that cannot be used (inconsistent files, another trust domain)."""


class BuiltinCA:
    """A self-signed ECDSA P-256 root that issues X.509-SVIDs for security identities."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        trust_domain: str,
        *,
        clock: Clock = time.time,
        svid_ttl: float = DEFAULT_SVID_TTL,
        backdate: float = DEFAULT_BACKDATE,
    ) -> None:
        self._key = key
        self._cert = certificate
        self._trust_domain = check_trust_domain(trust_domain)
        self._clock = clock
        self.svid_ttl = svid_ttl
        self.backdate = backdate

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        clock: Clock = time.time,
        svid_ttl: float = DEFAULT_SVID_TTL,
        ca_ttl: float = DEFAULT_CA_TTL,
        backdate: float = DEFAULT_BACKDATE,
    ) -> BuiltinCA:
        check_trust_domain(trust_domain)
        root = ensure_private_dir(Path(directory))
        key_path, cert_path = root / KEY_FILE, root / CERT_FILE
        lock_fd = os.open(
            root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(lock_fd, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if key_path.exists():
                key = _load_key(key_path)
                if cert_path.exists():
                    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                    _check_pair(cert, key, trust_domain, cert_path)
                else:
                    log.warning("%s has no %s: self-signing a new one for the key", root, CERT_FILE)
                    cert = _self_sign(key, trust_domain, clock(), ca_ttl, backdate)
                    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            elif cert_path.exists():
                raise CAError(f"{cert_path} exists without {key_path}: cannot sign without the key")
            else:
                key = ec.generate_private_key(ec.SECP256R1())
                write_private(key_path, _key_pem(key))
                cert = _self_sign(key, trust_domain, clock(), ca_ttl, backdate)
                write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
                log.info("created the built-in CA of trust domain %s in %s", trust_domain, root)
        finally:
            os.close(lock_fd)  # releases the flock
        if clock() > cert.not_valid_after_utc.timestamp():
            raise CAError(f"the CA certificate {cert_path} expired at {cert.not_valid_after_utc}")
        return cls(key, cert, trust_domain, clock=clock, svid_ttl=svid_ttl, backdate=backdate)

    @classmethod
    def ephemeral(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        clock: Clock = time.time,
        svid_ttl: float = DEFAULT_SVID_TTL,
        ca_ttl: float = DEFAULT_CA_TTL,
        backdate: float = DEFAULT_BACKDATE,
    ) -> BuiltinCA:
        """A CA that lives in memory only (tests, benchmarks, a throwaway demo)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _self_sign(key, trust_domain, clock(), ca_ttl, backdate)
        return cls(key, cert, trust_domain, clock=clock, svid_ttl=svid_ttl, backdate=backdate)

    # -- the CA ---------------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def bundle(self) -> list[x509.Certificate]:
        return [self._cert]

    def svid_for(self, identity: int) -> SVID:
        return self.issue(identity)

    def issue(self, identity: int, ttl: float | None = None) -> SVID:
        """A fresh key and leaf certificate for `identity`, valid until now + `ttl` (clamped to
        the CA's own expiry) and from `backdate` seconds ago."""
        check_identity(identity)
        ttl = self.svid_ttl if ttl is None else ttl
        if ttl <= 0:
            raise ValueError(f"SVID ttl must be positive, got {ttl}")
        now = self._clock()
        not_after = min(now + ttl, self._cert.not_valid_after_utc.timestamp())
        uri = spiffe_id(self._trust_domain, identity)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l7gate")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - self.backdate))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        cert = self.sign(builder)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        return SVID(
            identity=identity,
            spiffe_id=uri,
            cert_pem=cert_pem,
            key_pem=_key_pem(key),
            chain_pem=cert_pem,  # signed by the root itself: no intermediates to send
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign `builder` with the root key, setting the issuer name and authority key id.

        For tooling and tests that need a certificate `issue` would not make; the result is
        whatever the builder says, so use `issue` for SVIDs.
        """
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        return builder.issuer_name(self._cert.subject).add_extension(aki, critical=False).sign(
            self._key, hashes.SHA256()
        )


def _self_sign(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: float, ttl: float, backdate: float
) -> x509.Certificate:
    # A random serial in the name keeps two CAs (two trust domains, or a replaced root) apart
    # for issuer lookups; the SPIFFE ID of the trust domain says which domain the root is for.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l7gate"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"l7gate CA {secrets.token_hex(8)}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - backdate))
        .not_valid_after(_utc(now + ttl))
        # path length 0: this root signs SVIDs only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _check_pair(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str, path: Path
) -> None:
    if cert.public_key() != key.public_key():
        raise CAError(f"{path} does not belong to the key next to it")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    domains = [uri.removeprefix("spiffe://") for uri in uris if uri.startswith("spiffe://")]
    if domains != [trust_domain]:
        raise CAError(
            f"{path} is the CA of trust domain {', '.join(domains) or '(none)'}, "
            f"not {trust_domain}: use another directory per trust domain"
        )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(read_private(path), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CAError(f"{path} is not an ECDSA P-256 key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc)
