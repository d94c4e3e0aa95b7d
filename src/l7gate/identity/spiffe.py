"""SPIFFE IDs and TLS server names for numeric security identities.

Every security identity N of trust domain TD is the SPIFFE ID ``spiffe://TD/identity/N``
(the same path Cilium uses), carried as the one URI SAN of the identity's X.509-SVID.

`DEFAULT_TRUST_DOMAIN` is ``l7gate.local``:
- it is one name for every cluster, so the clusters of a mesh that share one CA (or one SPIRE
  server) form one trust domain, and cross-cluster pairs authenticate like local ones;
- ``.local`` is not a public DNS suffix, so it names nothing on the internet and cannot collide
  with a domain someone owns, while still being a valid DNS name: ``<identity>.l7gate.local``
  is a valid TLS server name (see `server_name`);
- two meshes that must never trust each other need two trust domains: configure one each.

A mutual-auth client names the identity it wants the server to prove in the TLS SNI,
``"<identity>.<trust-domain>"`` (Cilium's format too), because a node serves many identities
on one port and SNI is the only thing the server sees before it must choose its certificate.
"""

from __future__ import annotations

import re

DEFAULT_TRUST_DOMAIN = "l7gate.local"
SCHEME = "spiffe://"
IDENTITY_PATH = "/identity/"
MAX_IDENTITY = 0xFFFFFFFF

# SPIFFE ID spec, section 2.1: lowercase letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_IDENTITY = re.compile(r"[1-9][0-9]{0,9}")


class SpiffeIDError(ValueError):
    """A trust domain, SPIFFE ID or server name that is not in the form described above."""


def check_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(trust_domain) or trust_domain.strip(".") != trust_domain:
        raise SpiffeIDError(
            f"invalid trust domain {trust_domain!r}: lowercase letters, digits, '.', '-', '_'"
        )
    return trust_domain


def check_identity(identity: int) -> int:
    if isinstance(identity, bool) or not isinstance(identity, int) or not (
        1 <= identity <= MAX_IDENTITY
    ):
        raise SpiffeIDError(f"invalid security identity {identity!r}: an integer 1..{MAX_IDENTITY}")
    return identity


def spiffe_id(trust_domain: str, identity: int) -> str:
    return f"{SCHEME}{check_trust_domain(trust_domain)}{IDENTITY_PATH}{check_identity(identity)}"


def trust_domain_id(trust_domain: str) -> str:
    """The SPIFFE ID of the trust domain itself (carried by the CA certificate)."""
    return f"{SCHEME}{check_trust_domain(trust_domain)}"


def parse_spiffe_id(uri: str) -> tuple[str, int]:
    """``spiffe://TD/identity/N`` → (TD, N); anything else raises `SpiffeIDError`.

    Strict on purpose: no port, user info, query, fragment, percent-encoding, upper case,
    trailing slash or leading zeros, so one identity has exactly one spelling.
    """
    if not uri.startswith(SCHEME):
        raise SpiffeIDError(f"{uri!r} is not a spiffe:// URI")
    rest = uri[len(SCHEME) :]
    trust_domain, sep, path = rest.partition("/")
    if not sep:
        raise SpiffeIDError(f"{uri!r} has no path")
    try:
        check_trust_domain(trust_domain)
    except SpiffeIDError as exc:
        raise SpiffeIDError(f"{uri!r}: {exc}") from None
    path = "/" + path
    if not path.startswith(IDENTITY_PATH) or not _IDENTITY.fullmatch(path[len(IDENTITY_PATH) :]):
        raise SpiffeIDError(f"{uri!r}: path is not {IDENTITY_PATH}<identity number>")
    identity = int(path[len(IDENTITY_PATH) :])
    if identity > MAX_IDENTITY:
        raise SpiffeIDError(f"{uri!r}: identity out of range")
    return trust_domain, identity


def server_name(trust_domain: str, identity: int) -> str:
    """The SNI a client sends to ask for `identity`'s SVID: ``"<identity>.<trust-domain>"``."""
    return f"{check_identity(identity)}.{check_trust_domain(trust_domain)}"


def parse_server_name(name: str, trust_domain: str) -> int:
    """The identity named by an SNI of our trust domain (case-insensitive, as DNS names are)."""
    head, sep, tail = name.lower().partition(".")
    if not sep or tail != trust_domain or not _IDENTITY.fullmatch(head):
        raise SpiffeIDError(f"server name {name!r} is not <identity>.{trust_domain}")
    identity = int(head)
    if identity > MAX_IDENTITY:
        raise SpiffeIDError(f"server name {name!r}: identity out of range")
    return identity
