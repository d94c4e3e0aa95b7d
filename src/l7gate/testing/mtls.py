"""Test helpers: a manual clock, a fixed SVID source, and deliberately bad SVIDs.

Nothing here is used by the agent. `forge_svid` signs with a real CA key, so the certificates
it makes are real ones that break exactly one rule each: they exist to show that the checks
in `svid.verify_peer` and in the handshake refuse them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..mtls.ca import BuiltinCA, _key_pem, _key_usage, _utc
from ..identity.spiffe import spiffe_id
from ..mtls.svid import SVID
from .clock import ManualClock

__all__ = ["ManualClock", "StaticSource", "forge_svid"]


class StaticSource:
    """An `SVIDSource` that hands out the SVIDs it was given (the same one every time)."""

    def __init__(
        self, trust_domain: str, bundle: Sequence[x509.Certificate], svids: Mapping[int, SVID]
    ) -> None:
        self._trust_domain = trust_domain
        self._bundle = list(bundle)
        self.svids = dict(svids)

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def svid_for(self, identity: int) -> SVID:
        return self.svids[identity]

    def bundle(self) -> list[x509.Certificate]:
        return list(self._bundle)


def forge_svid(
    ca: BuiltinCA,
    identity: int,
    *,
    uris: Sequence[str] | None = None,
    not_before: float | None = None,
    not_after: float | None = None,
    is_ca: bool = False,
) -> SVID:
    """An SVID for `identity` signed by `ca`, with the given URI SANs (default: the one right
    SPIFFE ID; ``[]`` for none), validity (default: from a minute ago for an hour) and CA flag.

    The returned `SVID.identity` is `identity` whatever the certificate says, so a store can be
    made to present a certificate of another identity under this one's name.
    """
    now = time.time()
    not_before = now - 60 if not_before is None else not_before
    not_after = now + 3600 if not_after is None else not_after
    uris = [spiffe_id(ca.trust_domain, identity)] if uris is None else list(uris)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l7gate-forged")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=None), critical=True
        )
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=is_ca), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    cert = ca.sign(builder)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return SVID(
        identity=identity,
        spiffe_id=uris[0] if uris else "",
        cert_pem=pem,
        key_pem=_key_pem(key),
        chain_pem=pem,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )
