"""The agent-to-agent mutual-auth handshake: TLS 1.3, both sides present an X.509-SVID.

Theory of operation. Node B's agent runs a `MutualAuthServer` on the mutual-auth port. Node
A's agent, needing to know that identity R really lives behind node B before it lets local
identity L talk to R, calls `handshake(store, L, R, B)`:

1. A opens TCP to B and starts TLS 1.3 (nothing older is offered or accepted) with SNI
   ``"<R>.<trust-domain>"``, presenting L's SVID.
2. B's SNI callback switches to the TLS context holding R's SVID, or ends the handshake with an
   ``unrecognized_name`` alert when R is not one of B's identities (or the name is not of the
   trust domain). B requires a client certificate.
3. OpenSSL on both sides checks the peer chain against the trust bundle; then each side runs
   `verify_peer` on what it got: A requires exactly R (``expected_identity=R``), B accepts any
   identity of the trust domain.
4. B answers one line, ``OK`` or ``ERR <REASON> <detail>``, and closes. In TLS 1.3 the client
   finishes its handshake before the server has judged the client certificate, so this line
   (or the alert that replaces it) is how A learns that B accepted L.
5. A's result expires at the earlier of the two certificates' NotAfter.

The server also answers batch channels (SNI ``"batch.<trust-domain>"``, see `batch`): many
identity pairs proven over one channel, each by its own identity's key.

Failures raise `AuthError` naming the `Reason` (a certificate check, ours or the peer's) or
the `Failure` (connect, timeout, TLS, unknown identity). TLS contexts are built from the store's
files and cached per identity until the store's SVID or bundle changes.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..identity.spiffe import SpiffeIDError, check_trust_domain, parse_server_name, server_name
from .store import SVIDStore
from ..clock import Clock
from .svid import SVID, Peer, Reason, SVIDError, verify_peer

log = logging.getLogger(__name__)

DEFAULT_PORT = 4250  # Cilium's mutual-auth port; the agents of one mesh must agree on it
DEFAULT_TIMEOUT = 5.0
MAX_STATUS_LINE = 1024
_ENCODING_DER = 2  # _ssl.ENCODING_DER, for the certificates of get_unverified_chain()

Address = tuple[str, int]

BATCH_LABEL = "batch"  # the SNI label of a batch channel (`batch`): not an identity number


def batch_server_name(trust_domain: str) -> str:
    """The SNI that asks an agent for a batch channel, ``"batch.<trust-domain>"``."""
    return f"{BATCH_LABEL}.{check_trust_domain(trust_domain)}"


def is_batch_server_name(name: str, trust_domain: str) -> bool:
    return name.lower() == f"{BATCH_LABEL}.{trust_domain}"


class Failure(enum.Enum):
    """Why a handshake failed when no certificate check is to blame."""

    CONNECT = "connection failed"
    TIMEOUT = "timed out"
    TLS = "TLS handshake failed"
    UNKNOWN_IDENTITY = "peer does not serve the identity"
    NO_LOCAL_SVID = "no SVID for the local identity"
    PROTOCOL = "protocol error"
    PROOF = "pair proof refused"  # a batch channel's signature that does not verify (`batch`)


class AuthError(Exception):
    """A failed mutual-auth handshake.

    `reason` is a `Reason` when a certificate check failed, else a `Failure`; `by_peer` says
    that the peer refused *our* certificate (as opposed to us refusing theirs).
    """

    def __init__(self, reason: Reason | Failure, detail: str = "", *, by_peer: bool = False):
        self.reason = reason
        self.detail = detail
        self.by_peer = by_peer
        text = reason.value
        if by_peer:
            prefix = "peer refused our certificate: " if isinstance(reason, Reason) else "peer: "
            text = prefix + text
        super().__init__(f"{text} ({detail})" if detail else text)

    @property
    def text(self) -> str:
        return str(self)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """A successful handshake: `remote` proved itself at `node` to `local`, until `expires_at`
    (wall clock, the earlier of the two certificates' NotAfter)."""

    local: int
    remote: int
    node: Address
    expires_at: float
    peer: Peer


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One handshake the server took part in, for logs and flows. `local` is None when the
    client named no identity we serve."""

    local: int | None
    client: Address
    peer: Peer | None
    error: AuthError | None


# -- TLS contexts -------------------------------------------------------------------------------


class _IdentityContext(ssl.SSLContext):
    identity: int
    svid: SVID


def _base(server_side: bool, store: SVIDStore) -> _IdentityContext:
    ctx = _IdentityContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE IDs are URIs, not host names: verify_peer checks them
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=store.bundle_pem().decode())
    if server_side:
        ctx.num_tickets = 0  # no resumption: every handshake proves the certificates again
    return ctx


class _Contexts:
    """Per-identity client and server contexts of one store, rebuilt when it changes."""

    def __init__(self, store: SVIDStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._cache: dict[tuple[bool, int], tuple[int, _IdentityContext]] = {}
        self._base: tuple[int, ssl.SSLContext] | None = None

    def get(self, server_side: bool, identity: int) -> _IdentityContext:
        files = self._store.files(identity)  # rotates first if due; KeyError if not ours
        with self._lock:
            hit = self._cache.get((server_side, identity))
            if hit is not None and hit[0] == files.generation:
                return hit[1]
        ctx = _base(server_side, self._store)
        ctx.load_cert_chain(files.cert_and_key)
        ctx.identity = identity
        # If the file was rotated after `files` was taken, the key is newer than this SVID and
        # expiries computed from it are early, never late.
        ctx.svid = files.svid
        with self._lock:
            self._cache[(server_side, identity)] = (files.generation, ctx)
        return ctx

    def base_server(self) -> ssl.SSLContext:
        """The context a server connection starts with: no certificate until SNI picks one."""
        generation = self._store.generation
        with self._lock:
            if self._base is not None and self._base[0] == generation:
                return self._base[1]
        ctx = _base(True, self._store)
        ctx.sni_callback = self._select_identity
        local = self._store.identities()
        with self._lock:
            self._base = (generation, ctx)
            for key in [k for k in self._cache if k[1] not in local]:
                del self._cache[key]  # identities that left the node
        return ctx

    def _select_identity(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        _refused.name = name
        if name is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            if is_batch_server_name(name, self._store.trust_domain):
                # A batch channel (`batch`): any identity of ours authenticates the channel;
                # the pairs are proven inside it, each by its own key.
                held = self._store.identities()
                if not held:
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                sslobj.context = self.get(True, min(held))
                _refused.batch = True
                return None
            identity = parse_server_name(name, self._store.trust_domain)
            if identity not in self._store.identities():
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = self.get(True, identity)
        except (SpiffeIDError, KeyError):
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        except Exception:
            log.exception("mutual-auth: choosing the certificate for %r failed", name)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


# The SNI a server thread's current handshake asked for, to name it when the callback refused,
# and whether it asked for a batch channel (`batch`).
_refused = threading.local()

_contexts_lock = threading.Lock()
_contexts: weakref.WeakKeyDictionary[SVIDStore, _Contexts] = weakref.WeakKeyDictionary()


def _contexts_for(store: SVIDStore) -> _Contexts:
    with _contexts_lock:
        found = _contexts.get(store)
        if found is None:
            found = _contexts[store] = _Contexts(store)
        return found


# -- client -------------------------------------------------------------------------------------


def handshake(
    store: SVIDStore,
    local_identity: int,
    remote_identity: int,
    address: Address,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    clock: Clock = time.time,
) -> AuthResult:
    """Prove `local_identity` to the agent at `address` and have it prove `remote_identity`.

    Blocks for at most about `timeout` seconds. Raises `AuthError`. Thread-safe.
    """
    deadline = time.monotonic() + timeout
    try:
        ctx = _contexts_for(store).get(False, local_identity)
    except KeyError:
        raise AuthError(Failure.NO_LOCAL_SVID, f"identity {local_identity}") from None
    sni = server_name(store.trust_domain, remote_identity)
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except TimeoutError:
        raise AuthError(Failure.TIMEOUT, f"connecting to {_fmt(address)}") from None
    except OSError as exc:
        raise AuthError(Failure.CONNECT, f"{_fmt(address)}: {exc.strerror or exc}") from None
    with sock:
        try:
            sock.settimeout(_remaining(deadline))
            with ctx.wrap_socket(sock, server_hostname=sni) as tls:
                try:
                    peer = verify_peer(
                        _peer_chain(tls), store.bundle(), store.trust_domain, remote_identity,
                        now=clock(),
                    )
                except SVIDError as exc:
                    raise AuthError(exc.reason, exc.detail) from None
                tls.settimeout(_remaining(deadline))
                _read_verdict(tls)
        except AuthError:
            raise
        except ssl.SSLError as exc:
            raise _tls_error(exc) from None
        except TimeoutError:
            raise AuthError(Failure.TIMEOUT, f"handshake with {_fmt(address)}") from None
        except OSError as exc:
            raise AuthError(Failure.CONNECT, f"{_fmt(address)}: {exc.strerror or exc}") from None
    expires_at = min(ctx.svid.not_after, peer.not_after)
    return AuthResult(local_identity, remote_identity, address, expires_at, peer)


def _read_verdict(tls: ssl.SSLSocket) -> None:
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_STATUS_LINE:
        chunk = tls.recv(MAX_STATUS_LINE - len(line))
        if not chunk:
            break
        line += chunk
    text = line.decode("utf-8", "replace").strip()
    if text == "OK":
        return
    word, _, rest = text.partition(" ")
    if word == "ERR":
        name, _, detail = rest.partition(" ")
        reason: Reason | Failure = Reason.__members__.get(name) or Failure.__members__.get(
            name, Failure.PROTOCOL
        )
        raise AuthError(reason, detail, by_peer=True)
    raise AuthError(Failure.PROTOCOL, f"unexpected answer {text[:80]!r}" if text else "no answer")


# OpenSSL reason codes of the alerts a peer sends when it rejects our certificate or our name.
_PEER_ALERTS: dict[str, Reason | Failure] = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": Reason.EXPIRED,
    "TLSV1_ALERT_UNKNOWN_CA": Reason.UNTRUSTED,
    "SSLV3_ALERT_BAD_CERTIFICATE": Reason.UNTRUSTED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": Reason.UNTRUSTED,
    "TLSV1_UNRECOGNIZED_NAME": Failure.UNKNOWN_IDENTITY,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": Failure.TLS,
}
# X509_V_ERR_* codes of our own OpenSSL chain check.
_VERIFY_CODES: dict[int, Reason] = {9: Reason.NOT_YET_VALID, 10: Reason.EXPIRED}


def _tls_error(exc: ssl.SSLError) -> AuthError:
    """Our OpenSSL chain check failing, or an alert from the peer (it refused us)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_CODES.get(exc.verify_code, Reason.UNTRUSTED)
        return AuthError(reason, f"OpenSSL: {exc.verify_message}")
    code = exc.reason or ""
    mapped = _PEER_ALERTS.get(code)
    if mapped is not None:
        return AuthError(mapped, code.lower().replace("_", " "), by_peer=True)
    return AuthError(Failure.TLS, str(exc.reason or exc))


def _peer_chain(tls: ssl.SSLSocket) -> list[bytes]:
    leaf = tls.getpeercert(binary_form=True)
    if not leaf:
        return []
    # Python 3.13 names it get_unverified_chain(); 3.10-3.12 have it on the internal object.
    getter: Callable[[], Any] | None = getattr(tls, "get_unverified_chain", None) or getattr(
        getattr(tls, "_sslobj", None), "get_unverified_chain", None
    )
    chain = [leaf]
    if getter is not None:
        for cert in getter() or []:
            der = cert if isinstance(cert, bytes) else cert.public_bytes(_ENCODING_DER)
            if der != leaf:
                chain.append(der)
    return chain


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _fmt(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


# -- server -------------------------------------------------------------------------------------


class MutualAuthServer:
    """Answers mutual-auth handshakes for the store's identities on `listen`.

    A listening thread accepts; each connection is served on its own short-lived thread, at
    most `max_concurrent` at a time (more are closed at once). `start()` binds (so `address` is
    known, also with port 0), `stop()` closes the socket and waits for the threads.
    `on_handshake` is called on the connection's thread after every attempt that reached TLS.
    """

    def __init__(
        self,
        store: SVIDStore,
        listen: Address = ("127.0.0.1", DEFAULT_PORT),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_concurrent: int = 64,
        on_handshake: Callable[[ServerEvent], None] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._listen = listen
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._on_handshake = on_handshake
        self._clock = clock
        self._contexts = _contexts_for(store)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def address(self) -> Address:
        if self._sock is None:
            raise RuntimeError("server not started")
        host, port = self._sock.getsockname()[:2]
        return (host, port)

    def start(self) -> MutualAuthServer:
        if self._sock is not None:
            return self
        family = socket.AF_INET6 if ":" in self._listen[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(self._listen)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"l7gate-mutual-auth {_fmt(self.address)}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join()

    def __enter__(self) -> MutualAuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, client = sock.accept()
            except OSError as exc:
                if self._stopping.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                log.warning("mutual-auth accept failed: %s", exc)
                time.sleep(0.05)
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("mutual-auth: too many concurrent handshakes, closing %s", client)
                conn.close()
                continue
            worker = threading.Thread(
                target=self._serve, args=(conn, (client[0], client[1])), daemon=True
            )
            with self._workers_lock:
                self._workers.add(worker)
            worker.start()

    def _serve(self, conn: socket.socket, client: Address) -> None:
        try:
            event = self._handle(conn, client)
            if event is not None and self._on_handshake is not None:
                self._on_handshake(event)
        except Exception:
            log.exception("mutual-auth: handling %s failed", _fmt(client))
        finally:
            conn.close()
            self._slots.release()
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def _handle(self, conn: socket.socket, client: Address) -> ServerEvent | None:
        conn.settimeout(self._timeout)
        base = self._contexts.base_server()
        _refused.name = None
        _refused.batch = False
        try:
            tls = base.wrap_socket(conn, server_side=True)
        except ssl.SSLError as exc:
            if exc.reason == "CALLBACK_FAILED":  # our SNI callback said no
                error = AuthError(Failure.UNKNOWN_IDENTITY, f"client asked for {_refused.name!r}")
            else:
                error = _tls_error(exc)
            log.info("mutual-auth from %s refused: %s", _fmt(client), error)
            return ServerEvent(None, client, None, error)
        except OSError:
            return None  # the client went away before TLS
        with tls:
            ctx = tls.context
            local = ctx.identity if isinstance(ctx, _IdentityContext) else None
            try:
                peer = verify_peer(
                    _peer_chain(tls), self._store.bundle(), self._store.trust_domain,
                    now=self._clock(),
                )
            except SVIDError as exc:
                error = AuthError(exc.reason, exc.detail)
                log.info("mutual-auth from %s refused: %s", _fmt(client), error)
                if _refused.batch:
                    from .batch import encode_refused  # batch builds on this module

                    self._send_raw(tls, encode_refused(exc.reason.name, exc.detail))
                else:
                    self._send(tls, f"ERR {exc.reason.name} {exc.detail}")
                return ServerEvent(local, client, None, error)
            if _refused.batch and isinstance(ctx, _IdentityContext):
                self._serve_batch(tls, ctx.svid, client)
                return None
            self._send(tls, "OK")
            return ServerEvent(local, client, peer, None)

    def _serve_batch(self, tls: ssl.SSLSocket, channel_svid: SVID, client: Address) -> None:
        from . import batch  # batch builds on this module

        def on_pair(local: int | None, claimed: int, peer: Peer | None, error: AuthError | None) -> None:
            if error is not None:
                log.info("mutual-auth (batch) from %s for %s refused: %s", _fmt(client), claimed, error)
            if self._on_handshake is not None:
                self._on_handshake(ServerEvent(local, client, peer, error))

        try:
            batch.serve_batch(self._store, tls, channel_svid, self._timeout, self._clock, on_pair)
            tls.unwrap()
        except (batch.ProtocolError, AuthError, OSError, ValueError) as exc:
            log.info("mutual-auth batch from %s ended: %s", _fmt(client), exc)

    @staticmethod
    def _send_raw(tls: ssl.SSLSocket, data: bytes) -> None:
        try:
            tls.sendall(data)
            tls.unwrap()
        except (OSError, ValueError):
            pass

    @staticmethod
    def _send(tls: ssl.SSLSocket, line: str) -> None:
        try:
            tls.sendall(line.replace("\n", " ").encode()[: MAX_STATUS_LINE - 1] + b"\n")
            tls.unwrap()  # close_notify, so the client reads the line and then a clean EOF
        except (OSError, ValueError):
            pass
