"""Batched mutual auth: many identity pairs proven over one TLS channel between two agents.

Theory of operation. After an agent restart (or a CA rotation) a node has hundreds or
thousands of (local identity, remote identity) pairs to prove to each other node. One full
`handshake` per pair costs two TLS handshakes' worth of CPU; here node A's agent opens *one*
mutually-authenticated TLS 1.3 channel to node B's `MutualAuthServer` and proves every pair
over it with one signed *statement* per identity and side ("X vouches, on this channel, for
its pairs with Y1, Y2, ..."):

1. Channel. A connects with SNI ``"batch.<trust-domain>"`` and presents the SVID of one of the
   batch's local identities; B's SNI callback presents the SVID of one of its own identities.
   Both run `verify_peer` (any identity of the trust domain) on what they got. The channel only
   says "two members of the trust domain"; no pair is proven by it. A server of a version
   without batching refuses the name (``unrecognized_name``): A falls back to one `handshake`
   per pair. A channel refused for any other certificate reason falls back too, so that every
   pair gets the reason of its own certificates, never that of the channel's.
2. A → B ``REQUEST``: a fresh 32-byte nonce ``Nc`` and the pairs ``(L, R)``.
3. B → A ``SERVER_PROOFS``: a fresh nonce ``Ns``; for each R it holds, R's statement (R's SVID
   chain, the sorted L's of R's pairs, R's signature over the transcript below); for each pair
   whose R it does not hold, ``UNKNOWN_IDENTITY`` (the handshake's ``unrecognized_name``).
4. A checks each statement once: `verify_peer(chain)` (trust domain, SAN shape, not a CA, path
   to the bundle, validity at `now`: the handshake's rules), the certificate's identity is the
   prover's, the signature holds over the transcript A builds itself, and the pair's L is among
   the signed partners. For each L with pairs whose statement held, A → B ``CLIENT_PROOFS``:
   L's statement for those R's.
5. B checks each of A's statements the same way and answers ``VERDICTS``: ``OK`` or
   ``ERR <REASON> <detail>`` per pair, as the handshake's status line.
6. A pair is authenticated when B's statement for it held and B answered OK; it expires at the
   earlier of L's and R's NotAfter, as a handshake's result. Any other outcome fails the pairs
   of that statement alone, with the `AuthError` a handshake would have raised (or
   `Failure.PROOF` for a signature that does not verify or a pair no statement covers).

The transcript a statement signs (`transcript`):

    "l7gate mutual-auth pair proof v1\\0" || role ("C" or "S") || len(td) || td
    || SHA-256(channel client leaf) || SHA-256(channel server leaf) || Nc || Ns
    || prover (u32) || SHA-256(prover's leaf) || count || partners (u32 each, sorted, unique)

- the two channel leaves bind it to this TLS channel: each end proved it holds its leaf's key
  in the TLS handshake (CertificateVerify), so a man in the middle, who must present a
  certificate of its own on at least one side, makes the two ends see different pairs of
  leaves. Python's ssl offers no TLS 1.3 exporter and ``tls-unique`` is undefined for TLS 1.3,
  so the certificates plus the nonces (exchanged inside the channel) stand in for it;
- each verifier's own fresh nonce makes every statement new: one recorded on another channel
  or an earlier session does not verify;
- prover and partners: a statement for (L, R) says nothing about (L, R') or (L', R);
- the role: a statement made by the client side cannot be reflected back as the server's (the
  same identity may live on both nodes);
- the prover's leaf: the signature is over the certificate whose identity and NotAfter the
  verifier reads, not only over its key.

Costs: one TLS handshake per batch; per identity and side one signature and one verification
(ECDSA P-256: ~40 and ~90 µs) and a `verify_peer` (cached across batches). With each identity
in one pair only, that is per pair; with identities in many pairs, far less.

Thread-safe: `authenticate_batch` keeps nothing between calls; `serve_batch` runs on the
server's connection thread.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..clock import Clock
from ..gcpause import paused
from .handshake import (
    DEFAULT_TIMEOUT,
    Address,
    AuthError,
    AuthResult,
    Failure,
    _contexts_for,
    _fmt,
    _peer_chain,
    _remaining,
    _tls_error,
    batch_server_name,
    handshake,
)
from .store import SVIDStore
from .svid import SVID, Peer, Reason, SVIDError, verify_peer

log = logging.getLogger(__name__)

Pair = tuple[int, int]
"""(local identity, remote identity), from the client's side."""
Outcome = AuthResult | AuthError

MAGIC = b"L7GB"
VERSION = 1
NONCE_LEN = 32
MAX_PAIRS = 1024  # per channel; `authenticate_batch` splits larger batches
MAX_MESSAGE = 8 << 20
MAX_CHAIN = 8
PROOF_CONTEXT = b"l7gate mutual-auth pair proof v1\x00"
ROLE_CLIENT, ROLE_SERVER = b"C", b"S"

# Message types, the first byte of every frame.
REQUEST, SERVER_PROOFS, CLIENT_PROOFS, VERDICTS, REFUSED = 1, 2, 3, 4, 5
# A verdict, per pair.
OK, ERROR = 0, 1


class ProtocolError(Exception):
    """A malformed or out-of-order batch message."""


# -- proofs -------------------------------------------------------------------------------------


def channel_binding(client_leaf: bytes, server_leaf: bytes, client_nonce: bytes,
                    server_nonce: bytes) -> bytes:
    """What ties a proof to one TLS channel and one session on it (see the module docstring)."""
    return (hashlib.sha256(client_leaf).digest() + hashlib.sha256(server_leaf).digest()
            + client_nonce + server_nonce)


def transcript(trust_domain: str, binding: bytes, role: bytes, prover: int, prover_leaf: bytes,
               partners: Sequence[int]) -> bytes:
    """What a statement's signature covers: `prover` (whose leaf it is) vouches, on this channel
    and in this role, for the pairs it forms with each of `partners` (sorted, unique)."""
    td = trust_domain.encode()
    return b"".join((PROOF_CONTEXT, role, struct.pack(">B", len(td)), td, binding,
                     struct.pack(">I", prover), _digest(prover_leaf),
                     struct.pack(f">I{len(partners)}I", len(partners), *partners)))


# `_CPU_ONLY`: the cyclic garbage collector is paused (`gcpause`) while a batch is decoded,
# judged, signed and encoded (a batch's objects die by reference counting; a collection of an
# agent's whole heap in the middle of one took ~15-20% of the batch's CPU), and never while a
# frame is awaited from the peer: a peer that holds its channel open cannot hold the collector
# off for longer than the CPU work of a batch.


@lru_cache(maxsize=4096)
def _digest(leaf: bytes) -> bytes:
    """A leaf certificate's SHA-256, remembered: every statement's transcript names its
    prover's leaf, and a node proves and checks the same few hundred leaves batch after batch."""
    return hashlib.sha256(leaf).digest()


# The signature algorithm of EC keys, built once (an immutable description; building it took a
# few percent of a batch's CPU).
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class _Signer:
    key: PrivateKey
    chain: tuple[bytes, ...]  # DER, leaf first


@lru_cache(maxsize=4096)
def _signer(svid: SVID) -> _Signer:
    key = serialization.load_pem_private_key(svid.key_pem, password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"unsupported SVID key type {type(key).__name__}")
    chain = tuple(c.public_bytes(serialization.Encoding.DER)
                  for c in x509.load_pem_x509_certificates(svid.chain_pem))
    return _Signer(key, chain)


def sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, _ECDSA_SHA256)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
                    hashes.SHA256())


@dataclass(frozen=True, slots=True)
class _Leaf:
    key: object  # the public key
    purpose_error: dict[bytes, str]  # role -> why the leaf may not sign in that role


# What TLS checks of a peer's leaf beyond verify_peer (OpenSSL's purpose check): a key usage, if
# present, that allows signatures; an extended key usage, if present, for the role's side.
_PURPOSE = {ROLE_SERVER: (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            ROLE_CLIENT: (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")}


@lru_cache(maxsize=4096)
def _leaf(der: bytes) -> _Leaf:
    cert = x509.load_der_x509_certificate(der)
    errors: dict[bytes, str] = {}
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    try:
        eku: x509.ExtendedKeyUsage | None = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    key = cert.public_key()
    weak = _weak_key(key)
    for role, (oid, name) in _PURPOSE.items():
        if weak is not None:
            errors[role] = weak
        elif usage is not None and not usage.digital_signature:
            errors[role] = "key usage without digitalSignature"
        elif eku is not None and oid not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            errors[role] = f"extended key usage without {name}"
    return _Leaf(key, errors)


def _weak_key(key: object) -> str | None:
    """OpenSSL's security level 2 (Debian's default) refuses these in TLS; so do we here."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return None if key.curve.key_size >= 256 else f"{key.curve.name} key too weak"
    if isinstance(key, rsa.RSAPublicKey):
        return None if key.key_size >= 2048 else f"RSA-{key.key_size} key too weak"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return f"unsupported key type {type(key).__name__}"


def signature_holds(leaf: bytes, signature: bytes, data: bytes) -> bool:
    key = _leaf(leaf).key
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, _ECDSA_SHA256)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
                       hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


class _Checker:
    """Checks the statements of one side of one channel: each distinct chain once, with
    `verify_peer`, and each statement's signature once."""

    def __init__(self, store: SVIDStore, binding: bytes, role: bytes, now: float) -> None:
        self._store = store
        self._bundle = store.bundle()
        self._binding = binding
        self._role = role
        self._now = now
        self._chains: dict[tuple[bytes, ...], Peer | SVIDError] = {}

    def check(self, statement: Statement) -> Peer:
        """The peer a statement proves, or `AuthError` (the certificate's reason, or PROOF)."""
        chain, prover = statement.chain, statement.prover
        known = self._chains.get(chain)
        if known is None:
            try:
                known = verify_peer(list(chain), self._bundle, self._store.trust_domain, now=self._now)
            except SVIDError as exc:
                known = exc
            self._chains[chain] = known
        if isinstance(known, SVIDError):
            raise AuthError(known.reason, known.detail)
        if known.identity != prover:  # verify_peer's own wording for a wrong identity
            raise AuthError(Reason.UNEXPECTED_IDENTITY, f"expected {prover} got {known.identity}")
        purpose = _leaf(chain[0]).purpose_error.get(self._role)
        if purpose is not None:  # the handshake's OpenSSL says "unsupported certificate purpose"
            raise AuthError(Reason.UNTRUSTED, f"certificate purpose: {purpose}")
        data = transcript(self._store.trust_domain, self._binding, self._role, prover, chain[0],
                          statement.partners)
        if not signature_holds(chain[0], statement.signature, data):
            raise AuthError(Failure.PROOF, f"the signature of {prover} does not verify for this channel")
        return known


def make_statement(trust_domain: str, binding: bytes, role: bytes, svid: SVID,
                   partners: Iterable[int]) -> Statement:
    signer = _signer(svid)
    ordered = tuple(sorted(set(partners)))
    data = transcript(trust_domain, binding, role, svid.identity, signer.chain[0], ordered)
    return Statement(signer.chain, svid.identity, ordered, sign(signer.key, data))


# -- wire format --------------------------------------------------------------------------------
# Frames: u32 length, then the body, whose first byte is the message type. Integers big-endian.
# A chain is u8 count + (u32 length + DER) each; a string u16 length + UTF-8.


class _Writer:
    def __init__(self, kind: int) -> None:
        self.parts: list[bytes] = [struct.pack(">B", kind)]

    def raw(self, b: bytes) -> None:
        self.parts.append(b)

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack(">B", v))

    def u16(self, v: int) -> None:
        self.parts.append(struct.pack(">H", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack(">I", v))

    def blob(self, b: bytes) -> None:
        self.parts.append(struct.pack(">I", len(b)))
        self.parts.append(b)

    def text(self, s: str) -> None:
        b = s.encode()[:4096]
        self.parts.append(struct.pack(">H", len(b)))
        self.parts.append(b)

    def chain(self, chain: Sequence[bytes]) -> None:
        self.u8(len(chain))
        for der in chain:
            self.blob(der)

    def frame(self) -> bytes:
        body = b"".join(self.parts)
        return struct.pack(">I", len(body)) + body


class _Reader:
    def __init__(self, body: bytes, kind: int) -> None:
        self._b = memoryview(body)
        self._i = 0
        got = self.u8()
        if got != kind:
            raise ProtocolError(f"expected message {kind}, got {got}")

    def take(self, n: int) -> bytes:
        if n < 0 or self._i + n > len(self._b):
            raise ProtocolError("truncated message")
        out = bytes(self._b[self._i:self._i + n])
        self._i += n
        return out

    def u8(self) -> int:
        return int(struct.unpack(">B", self.take(1))[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def blob(self) -> bytes:
        return self.take(self.u32())

    def text(self) -> str:
        return self.take(self.u16()).decode("utf-8", "replace")

    def chain(self) -> tuple[bytes, ...]:
        n = self.u8()
        if not 1 <= n <= MAX_CHAIN:
            raise ProtocolError(f"a chain of {n} certificates")
        return tuple(self.blob() for _ in range(n))

    def end(self) -> None:
        if self._i != len(self._b):
            raise ProtocolError("trailing bytes")


def encode_request(nonce: bytes, pairs: Sequence[Pair]) -> bytes:
    w = _Writer(REQUEST)
    w.raw(MAGIC)
    w.u8(VERSION)
    w.raw(nonce)
    w.u16(len(pairs))
    for local, remote in pairs:
        w.u32(local)
        w.u32(remote)
    return w.frame()


def decode_request(body: bytes) -> tuple[bytes, list[Pair]]:
    r = _Reader(body, REQUEST)
    if r.take(len(MAGIC)) != MAGIC or r.u8() != VERSION:
        raise ProtocolError("not a version 1 batch request")
    nonce = r.take(NONCE_LEN)
    n = r.u16()
    if n > MAX_PAIRS:
        raise ProtocolError(f"{n} pairs, more than {MAX_PAIRS}")
    pairs = [(r.u32(), r.u32()) for _ in range(n)]
    r.end()
    return nonce, pairs


@dataclass(frozen=True, slots=True)
class Statement:
    """`prover`'s signed word, on one channel, that it forms a pair with each of `partners`."""

    chain: tuple[bytes, ...]  # DER, leaf first
    prover: int
    partners: tuple[int, ...]  # sorted, unique
    signature: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # a `Reason` or `Failure` member name
    detail: str


@dataclass(frozen=True, slots=True)
class Proofs:
    """A SERVER_PROOFS (with the server's nonce) or CLIENT_PROOFS message: one statement per
    prover identity, and per-pair refusals (index into the request's pairs)."""

    nonce: bytes | None
    statements: tuple[Statement, ...]
    refusals: tuple[tuple[int, Refusal], ...] = ()


def encode_proofs(kind: int, proofs: Proofs) -> bytes:
    w = _Writer(kind)
    if kind == SERVER_PROOFS:
        assert proofs.nonce is not None and len(proofs.nonce) == NONCE_LEN
        w.raw(proofs.nonce)
    w.u16(len(proofs.refusals))
    for index, refusal in proofs.refusals:
        w.u16(index)
        w.text(refusal.reason)
        w.text(refusal.detail)
    w.u16(len(proofs.statements))
    for st in proofs.statements:
        w.chain(st.chain)
        w.u32(st.prover)
        w.u16(len(st.partners))
        w.raw(struct.pack(f">{len(st.partners)}I", *st.partners))
        w.blob(st.signature)
    return w.frame()


def decode_proofs(kind: int, body: bytes, count: int) -> Proofs:
    """`count` is the number of pairs in the request, which every index must be below."""
    r = _Reader(body, kind)
    nonce = r.take(NONCE_LEN) if kind == SERVER_PROOFS else None
    refusals = []
    for _ in range(r.u16()):
        index = r.u16()
        if index >= count:
            raise ProtocolError(f"refusal for pair {index} of {count}")
        refusals.append((index, Refusal(r.text(), r.text())))
    statements = []
    provers: set[int] = set()
    for _ in range(r.u16()):
        chain = r.chain()
        prover = r.u32()
        n = r.u16()
        partners = struct.unpack(f">{n}I", r.take(4 * n))
        if prover in provers:
            raise ProtocolError(f"two statements of {prover}")
        if any(a >= b for a, b in zip(partners, partners[1:])):
            raise ProtocolError(f"the partners of {prover} are not sorted and unique")
        provers.add(prover)
        statements.append(Statement(chain, prover, tuple(partners), r.blob()))
    r.end()
    return Proofs(nonce, tuple(statements), tuple(refusals))


def encode_verdicts(verdicts: Sequence[Refusal | None]) -> bytes:
    """Per pair: None is OK, a `Refusal` an ERR; SKIPPED pairs get a Refusal too."""
    w = _Writer(VERDICTS)
    w.u16(len(verdicts))
    for v in verdicts:
        if v is None:
            w.u8(OK)
        else:
            w.u8(ERROR)
            w.text(v.reason)
            w.text(v.detail)
    return w.frame()


def decode_verdicts(body: bytes, count: int) -> list[Refusal | None]:
    r = _Reader(body, VERDICTS)
    n = r.u16()
    if n != count:
        raise ProtocolError(f"{n} verdicts for {count} pairs")
    out: list[Refusal | None] = []
    for _ in range(n):
        tag = r.u8()
        if tag == OK:
            out.append(None)
        elif tag == ERROR:
            out.append(Refusal(r.text(), r.text()))
        else:
            raise ProtocolError(f"unknown verdict {tag}")
    r.end()
    return out


def encode_refused(reason: str, detail: str) -> bytes:
    w = _Writer(REFUSED)
    w.text(reason)
    w.text(detail)
    return w.frame()


def send_frame(tls: ssl.SSLSocket, frame: bytes) -> None:
    tls.sendall(frame)


def recv_frame(tls: ssl.SSLSocket, deadline: float) -> bytes:
    """One frame's body (its type byte first). A REFUSED frame raises the peer's `AuthError`."""
    head = _recv_exact(tls, 4, deadline)
    (n,) = struct.unpack(">I", head)
    if not 1 <= n <= MAX_MESSAGE:
        raise ProtocolError(f"a frame of {n} bytes")
    body = _recv_exact(tls, n, deadline)
    if body[0] == REFUSED:
        r = _Reader(body, REFUSED)
        refusal = Refusal(r.text(), r.text())
        raise _refusal_error(refusal)
    return body


def _recv_exact(tls: ssl.SSLSocket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        tls.settimeout(_remaining(deadline))
        chunk = tls.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


def _refusal_error(refusal: Refusal) -> AuthError:
    """The peer's ERR, as the handshake's status line maps it."""
    reason: Reason | Failure = Reason.__members__.get(refusal.reason) or Failure.__members__.get(
        refusal.reason, Failure.PROTOCOL)
    return AuthError(reason, refusal.detail, by_peer=True)


def _refusal_of(error: AuthError) -> Refusal:
    return Refusal(error.reason.name, error.detail)


# -- client -------------------------------------------------------------------------------------


class ChannelRefused(Exception):
    """The batch channel could not be set up for a reason that says nothing about the pairs
    (the peer does not batch, or refused the channel's certificates): prove them one by one."""

    def __init__(self, error: AuthError) -> None:
        super().__init__(str(error))
        self.error = error


def authenticate_batch(
    store: SVIDStore,
    pairs: Iterable[Pair],
    address: Address,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    clock: Clock = time.time,
    fallback: bool = True,
) -> dict[Pair, Outcome]:
    """Prove every `pairs` to the agent at `address` over batch channels (at most MAX_PAIRS
    pairs each), falling back to one `handshake` per pair when the peer does not batch (with
    `fallback`; without it, `ChannelRefused` is raised). Each pair's outcome is what
    `handshake` would return or raise for it. Blocks for about `timeout` per channel.
    Thread-safe."""
    todo = sorted(set(pairs))
    out: dict[Pair, Outcome] = {}
    for start in range(0, len(todo), MAX_PAIRS):
        chunk = todo[start:start + MAX_PAIRS]
        try:
            out.update(_one_channel(store, chunk, address, timeout, clock))
        except ChannelRefused as refused:
            if not fallback:
                raise
            log.info("batch auth with %s refused (%s): one handshake per pair", _fmt(address), refused)
            out.update(_one_by_one(store, chunk, address, timeout, clock))
    return out


def _one_by_one(store: SVIDStore, pairs: Sequence[Pair], address: Address, timeout: float,
                clock: Clock) -> dict[Pair, Outcome]:
    """A handshake per pair; once the node cannot be reached (connect failed, timed out), the
    remaining pairs fail with that error instead of waiting for it each in turn."""
    out: dict[Pair, Outcome] = {}
    for index, (local, remote) in enumerate(pairs):
        try:
            out[(local, remote)] = handshake(store, local, remote, address, timeout, clock=clock)
        except AuthError as exc:
            out[(local, remote)] = exc
            if exc.reason in (Failure.CONNECT, Failure.TIMEOUT):
                out.update(_all(pairs[index + 1:], exc))
                break
    return out


def _one_channel(store: SVIDStore, pairs: Sequence[Pair], address: Address, timeout: float,
                 clock: Clock) -> dict[Pair, Outcome]:
    out: dict[Pair, Outcome] = {}
    held = store.identities()
    wanted = []
    for pair in pairs:
        if pair[0] in held:
            wanted.append(pair)
        else:
            out[pair] = AuthError(Failure.NO_LOCAL_SVID, f"identity {pair[0]}")
    if not wanted:
        return out
    deadline = time.monotonic() + timeout
    try:
        channel_identity = min(p[0] for p in wanted)
        ctx = _contexts_for(store).get(False, channel_identity)
    except KeyError:  # left the node just now: its pairs fail one by one
        raise ChannelRefused(AuthError(Failure.NO_LOCAL_SVID, "no SVID for the channel")) from None
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except TimeoutError:
        return out | _all(wanted, AuthError(Failure.TIMEOUT, f"connecting to {_fmt(address)}"))
    except OSError as exc:
        return out | _all(wanted, AuthError(Failure.CONNECT, f"{_fmt(address)}: {exc.strerror or exc}"))
    with sock:
        try:
            sock.settimeout(_remaining(deadline))
            try:
                tls = ctx.wrap_socket(sock, server_hostname=batch_server_name(store.trust_domain))
            except ssl.SSLError as exc:
                raise ChannelRefused(_tls_error(exc)) from None
            with tls:
                return out | _prove(store, tls, ctx.svid, wanted, address, deadline, clock)
        except ChannelRefused:
            raise
        except AuthError as exc:
            if exc.reason in (Failure.CONNECT, Failure.TIMEOUT):
                return out | _all(wanted, exc)
            raise ChannelRefused(exc) from None
        except ProtocolError as exc:
            return out | _all(wanted, AuthError(Failure.PROTOCOL, f"{_fmt(address)}: {exc}"))
        except TimeoutError:
            return out | _all(wanted, AuthError(Failure.TIMEOUT, f"batch with {_fmt(address)}"))
        except ssl.SSLError as exc:  # e.g. the peer's alert for our channel certificate
            raise ChannelRefused(_tls_error(exc)) from None
        except OSError as exc:
            return out | _all(wanted, AuthError(Failure.CONNECT, f"{_fmt(address)}: {exc.strerror or exc}"))


def _all(pairs: Iterable[Pair], error: AuthError) -> dict[Pair, Outcome]:
    return {pair: error for pair in pairs}


def _prove(store: SVIDStore, tls: ssl.SSLSocket, channel_svid: SVID, pairs: Sequence[Pair],
           address: Address, deadline: float, clock: Clock) -> dict[Pair, Outcome]:
    """The client's part after TLS. Raises `AuthError` for the channel as a whole."""
    server_chain = _peer_chain(tls)
    try:
        verify_peer(server_chain, store.bundle(), store.trust_domain, now=clock())
    except SVIDError as exc:
        raise AuthError(exc.reason, f"batch channel: {exc.detail}") from None
    nonce = secrets.token_bytes(NONCE_LEN)
    send_frame(tls, encode_request(nonce, pairs))
    body = recv_frame(tls, deadline)
    with paused():  # the CPU-bound part, not the waits (`_CPU_ONLY`)
        theirs = decode_proofs(SERVER_PROOFS, body, len(pairs))
        assert theirs.nonce is not None
        binding = channel_binding(_signer(channel_svid).chain[0], server_chain[0], nonce, theirs.nonce)
        out = _judge(store, binding, ROLE_SERVER, clock(), pairs, theirs, server_side=False)
        # Our statements: one per local identity, for the pairs the server proved.
        partners: dict[int, list[int]] = {}
        for pair, outcome in out.items():
            if isinstance(outcome, Peer):
                partners.setdefault(pair[0], []).append(pair[1])
        statements = []
        results: dict[Pair, Outcome] = {}
        svids: dict[int, SVID] = {}
        for local, remotes in sorted(partners.items()):
            try:
                svids[local] = svid = store.svid(local)
            except KeyError:
                for remote in remotes:
                    results[(local, remote)] = AuthError(Failure.NO_LOCAL_SVID, f"identity {local}")
                continue
            statements.append(make_statement(store.trust_domain, binding, ROLE_CLIENT, svid, remotes))
        frame = encode_proofs(CLIENT_PROOFS, Proofs(None, tuple(statements)))
    send_frame(tls, frame)
    verdicts = decode_verdicts(recv_frame(tls, deadline), len(pairs))
    for pair, verdict in zip(pairs, verdicts):
        outcome = out[pair]
        if pair in results:
            continue
        if not isinstance(outcome, Peer):
            results[pair] = outcome
        elif verdict is not None:
            results[pair] = _refusal_error(verdict)
        else:
            local, remote = pair
            results[pair] = AuthResult(local, remote, address,
                                       min(svids[local].not_after, outcome.not_after), outcome)
    return results


def _judge(store: SVIDStore, binding: bytes, role: bytes, now: float, pairs: Sequence[Pair],
           proofs: Proofs, *, server_side: bool) -> dict[Pair, Peer | AuthError]:
    """Each pair's outcome from the other side's statements: the peer that proved it, or why
    not. On the client the prover of (L, R) is R; on the server it is L."""
    checker = _Checker(store, binding, role, now)
    by_prover = {st.prover: st for st in proofs.statements}
    checked: dict[int, Peer | AuthError] = {}
    refused = dict(proofs.refusals)
    out: dict[Pair, Peer | AuthError] = {}
    for index, pair in enumerate(pairs):
        prover, partner = (pair[0], pair[1]) if server_side else (pair[1], pair[0])
        refusal = refused.get(index)
        statement = by_prover.get(prover)
        if refusal is not None:
            out[pair] = _refusal_error(refusal)
            continue
        if statement is None or partner not in statement.partners:
            out[pair] = AuthError(Failure.PROOF, f"no proof of {prover} for the pair with {partner}",
                                  by_peer=not server_side)
            continue
        if prover not in checked:
            try:
                checked[prover] = checker.check(statement)
            except AuthError as exc:
                checked[prover] = exc
        out[pair] = checked[prover]
    return out


# -- server -------------------------------------------------------------------------------------

ServerPairEvent = Callable[[int | None, int, Peer | None, AuthError | None], None]
"""`(local identity or None, claimed client identity, peer, error)`: one pair's outcome on the
server, for its logs and `ServerEvent`s."""


def serve_batch(
    store: SVIDStore,
    tls: ssl.SSLSocket,
    channel_svid: SVID,
    timeout: float,
    clock: Clock,
    on_pair: ServerPairEvent,
) -> None:
    """The server's part after TLS, on a channel whose client certificate passed `verify_peer`.
    Raises `ProtocolError`, `AuthError` (timeouts) or OSError; the caller closes the socket."""
    deadline = time.monotonic() + timeout
    body = recv_frame(tls, deadline)
    with paused():  # the CPU-bound parts, not the waits (`_CPU_ONLY`)
        client_nonce, pairs = decode_request(body)
        nonce = secrets.token_bytes(NONCE_LEN)
        binding = channel_binding(_peer_chain(tls)[0], _signer(channel_svid).chain[0], client_nonce, nonce)
        held = store.identities()
        partners: dict[int, list[int]] = {}
        refusals: list[tuple[int, Refusal]] = []
        for index, (local, remote) in enumerate(pairs):
            if remote in held:
                partners.setdefault(remote, []).append(local)
            else:
                error = AuthError(Failure.UNKNOWN_IDENTITY, f"identity {remote} is not on this node")
                on_pair(None, local, None, error)
                refusals.append((index, _refusal_of(error)))
        statements = []
        for remote, locals_ in sorted(partners.items()):
            try:
                svid = store.svid(remote)
            except KeyError:  # left the node since `held` was read
                for index, pair in enumerate(pairs):
                    if pair[1] == remote:
                        refusals.append((index, Refusal(Failure.UNKNOWN_IDENTITY.name, f"identity {remote}")))
                continue
            statements.append(make_statement(store.trust_domain, binding, ROLE_SERVER, svid, locals_))
        frame = encode_proofs(SERVER_PROOFS, Proofs(nonce, tuple(statements), tuple(refusals)))
    send_frame(tls, frame)
    body = recv_frame(tls, deadline)
    with paused():
        theirs = decode_proofs(CLIENT_PROOFS, body, len(pairs))
        proven = {st.prover: set(st.partners) for st in statements}
        answered = {st.prover: set(st.partners) for st in theirs.statements}
        judged = _judge(store, binding, ROLE_CLIENT, clock(), pairs, theirs, server_side=True)
        verdicts: list[Refusal | None] = []
        for local, remote in pairs:
            if local not in proven.get(remote, ()):
                verdicts.append(Refusal(Failure.UNKNOWN_IDENTITY.name, f"identity {remote} is not on this node"))
                continue
            outcome = judged[(local, remote)]
            if remote not in answered.get(local, ()):  # the client gave up on the pair (our proof
                verdicts.append(Refusal(Failure.PROOF.name, "no proof"))  # failed there): no event
                continue
            if isinstance(outcome, AuthError):
                on_pair(remote, local, None, outcome)
                verdicts.append(_refusal_of(outcome))
            else:
                on_pair(remote, local, outcome, None)
                verdicts.append(None)
        frame = encode_verdicts(verdicts)
    send_frame(tls, frame)
