"""SVIDs and the trust bundle from SPIRE: an `SVIDSource` over the SPIFFE Workload API.

Theory of operation. When SPIRE is configured, the node's SPIRE agent (not l7gate) holds the
keys: the agent's workload is registered in SPIRE once per security identity of the node, so
the Workload API hands it several X.509-SVIDs, ``spiffe://TD/identity/N`` each.
`SpireSource(socket_path, trust_domain)` keeps the latest of them:

- It opens one ``SpiffeWorkloadAPI/FetchX509SVID`` stream through the `spiffe` package
  (py-spiffe's `WorkloadApiClient.stream_x509_contexts`, which sends the required
  ``workload.spiffe.io: true`` header, reconnects with backoff when the agent is unavailable,
  and gives up on INVALID_ARGUMENT). It does not use py-spiffe's `X509Source`: that keeps only
  the one SVID its picker chooses, and a node needs all of its identities' SVIDs.
- Every message on the stream is a complete set: the SVIDs are re-indexed by identity and
  replace the previous set (SPIRE pushes a new set before the old SVIDs expire, and when
  registrations change). SVIDs whose SPIFFE ID is not ``spiffe://TD/identity/N`` of our trust
  domain are ignored (the agent may be entitled to others).
- `svid_for(identity)` returns the newest SVID of that identity, so `SVIDStore` sees a rotation
  the next time it fetches (when its own rotation time comes); `subscribe` tells whoever wants
  to know sooner. It raises `MissingSVIDError` when SPIRE holds no SVID for the identity, and
  `SpireError` when the newest one has expired or the stream failed for good.
- `bundle()` is the X.509 bundle of our trust domain from the same message. Federated bundles
  are kept (`federated_bundles`) but not trusted: l7gate authenticates one trust domain.

The constructor blocks until the first message arrived (or `timeout` passed: `SpireError`).
Thread-safe; `close()` ends the stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from spiffe import WorkloadApiClient
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.x509_context import X509Context

from ..identity.spiffe import SpiffeIDError, check_trust_domain, parse_spiffe_id, spiffe_id
from ..clock import Clock
from .svid import SVID

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # for the first message from the SPIRE agent


class SpireError(Exception):
    """The SPIRE agent cannot give us what we need (stream failed, nothing yet, expired)."""


class MissingSVIDError(SpireError, LookupError):
    """SPIRE holds no SVID for an identity: its workload entry is missing in SPIRE."""

    def __init__(self, identity: int, wanted: str, held: list[str]) -> None:
        super().__init__(
            f"SPIRE holds no SVID for identity {identity} ({wanted}); the Workload API gave "
            f"this node {', '.join(held) if held else 'no SVID of this trust domain'}: register "
            f"{wanted} in SPIRE for this node's agent"
        )
        self.identity = identity
        self.spiffe_id = wanted


@dataclass(frozen=True, slots=True)
class _Snapshot:
    svids: Mapping[int, SVID]
    bundle: tuple[x509.Certificate, ...]
    federated: Mapping[str, tuple[x509.Certificate, ...]]
    ignored: tuple[str, ...]  # SPIFFE IDs that are not identities of our trust domain


class SpireSource:
    """An `SVIDSource` fed by the SPIFFE Workload API at `socket_path` (see module docstring)."""

    def __init__(
        self,
        socket_path: str,
        trust_domain: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = time.time,
    ) -> None:
        self._trust_domain = check_trust_domain(trust_domain)
        self._clock = clock
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._snapshot: _Snapshot | None = None
        self._error: Exception | None = None
        self._closed = False
        self._updates = 0
        self._listeners: list[Callable[[], None]] = []
        endpoint = socket_path if socket_path.startswith("unix:") else f"unix:{socket_path}"
        try:
            self._client = WorkloadApiClient(endpoint)
        except PySpiffeError as exc:
            raise SpireError(f"SPIFFE Workload API at {socket_path}: {exc}") from exc
        self._socket_path = socket_path
        self._stream = self._client.stream_x509_contexts(self._on_update, self._on_error)
        if not self._first.wait(timeout):
            self.close()
            raise SpireError(
                f"no X.509-SVIDs from the SPIFFE Workload API at {socket_path} within {timeout}s"
            )
        with self._lock:
            error = self._error if self._snapshot is None else None
        if error is not None:
            self.close()
            raise SpireError(f"SPIFFE Workload API at {socket_path}: {error}") from error

    # -- SVIDSource ------------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def svid_for(self, identity: int) -> SVID:
        snapshot = self._current()
        svid = snapshot.svids.get(identity)
        if svid is None:
            held = [s.spiffe_id for _, s in sorted(snapshot.svids.items())]
            raise MissingSVIDError(identity, spiffe_id(self._trust_domain, identity), held)
        if self._clock() > svid.not_after:
            raise SpireError(
                f"the newest SVID SPIRE gave for {svid.spiffe_id} expired at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(svid.not_after))} "
                f"and no newer one arrived"
            )
        return svid

    def bundle(self) -> list[x509.Certificate]:
        snapshot = self._current()
        if not snapshot.bundle:
            raise SpireError(f"the SPIFFE Workload API sent no bundle of {self._trust_domain}")
        return list(snapshot.bundle)

    # -- more -----------------------------------------------------------------------------------

    def identities(self) -> frozenset[int]:
        """The identities SPIRE currently holds SVIDs for."""
        return frozenset(self._current().svids)

    def federated_bundles(self) -> dict[str, list[x509.Certificate]]:
        """Bundles of other trust domains the Workload API sent (informational: not trusted)."""
        return {td: list(certs) for td, certs in self._current().federated.items()}

    @property
    def updates(self) -> int:
        """How many Workload API messages were taken so far."""
        with self._lock:
            return self._updates

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (on the stream's thread) after each new set of SVIDs arrived."""
        with self._lock:
            self._listeners.append(callback)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stream.cancel()
        self._client.close()

    def __enter__(self) -> SpireSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ---------------------------------------------------------------------------------

    def _current(self) -> _Snapshot:
        with self._lock:
            if self._closed:
                raise SpireError("the SPIRE source is closed")
            if self._error is not None:
                raise SpireError(
                    f"the SPIFFE Workload API stream at {self._socket_path} failed: {self._error}"
                )
            if self._snapshot is None:
                raise SpireError("no X.509-SVIDs from the SPIFFE Workload API yet")
            return self._snapshot

    def _on_update(self, context: X509Context) -> None:
        try:
            snapshot = self._index(context)
        except Exception as exc:  # a message we cannot use: keep the last good one
            log.exception("SPIRE: unusable Workload API update")
            with self._lock:
                if self._snapshot is None:
                    self._error = exc
            self._first.set()
            return
        with self._lock:
            self._snapshot = snapshot
            self._error = None  # a stream that failed for good sends nothing more
            self._updates += 1
            listeners = list(self._listeners)
        self._first.set()
        log.info(
            "SPIRE: %d SVIDs of %s (identities %s)%s", len(snapshot.svids), self._trust_domain,
            ",".join(map(str, sorted(snapshot.svids))),
            f"; ignored {', '.join(snapshot.ignored)}" if snapshot.ignored else "",
        )
        for callback in listeners:
            try:
                callback()
            except Exception:
                log.exception("SPIRE update listener failed")

    def _on_error(self, error: Exception) -> None:
        log.error("SPIRE: the Workload API stream at %s failed: %s", self._socket_path, error)
        with self._lock:
            self._error = error
        self._first.set()

    def _index(self, context: X509Context) -> _Snapshot:
        svids: dict[int, SVID] = {}
        ignored: list[str] = []
        for x in context.x509_svids:
            uri = str(x.spiffe_id)
            try:
                domain, identity = parse_spiffe_id(uri)
            except SpiffeIDError:
                ignored.append(uri)
                continue
            if domain != self._trust_domain:
                ignored.append(uri)
                continue
            if identity in svids:
                # several entries for one SPIFFE ID: keep the one that lasts longest
                current = svids[identity]
                if current.not_after >= x.leaf.not_valid_after_utc.timestamp():
                    continue
            svids[identity] = _to_svid(identity, uri, x.cert_chain, x.private_key)
        bundle: tuple[x509.Certificate, ...] = ()
        federated: dict[str, tuple[x509.Certificate, ...]] = {}
        for b in context.x509_bundle_set.bundles:
            certs = tuple(sorted(b.x509_authorities, key=_der))  # a stable order
            if b.trust_domain.name == self._trust_domain:
                bundle = certs
            else:
                federated[b.trust_domain.name] = certs
        return _Snapshot(svids, bundle, federated, tuple(ignored))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _to_svid(
    identity: int, uri: str, chain: list[x509.Certificate], key: PrivateKeyTypes
) -> SVID:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in chain]
    leaf = chain[0]
    return SVID(
        identity=identity,
        spiffe_id=uri,
        cert_pem=pems[0],
        key_pem=key_pem,
        chain_pem=b"".join(pems),  # leaf then intermediates, as SPIRE sent them
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )
