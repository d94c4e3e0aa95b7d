"""The SVIDs of this node's identities, kept current from an `SVIDSource`.

Theory of operation. The agent tells the store which security identities live on this node
(`set_identities`); the store fetches one SVID per identity from its source (the built-in CA,
or a SPIFFE Workload API client) and keeps it current:

- An SVID is rotated once `rotate_fraction` (default 50%) of its usable lifetime is gone. The
  usable lifetime runs from when the store fetched it to its NotAfter, not from NotBefore,
  because sources backdate NotBefore for clock skew.
- Rotation is lazy and timed: every read (`svid`, `files`) rotates what is due first, and
  `start()` runs a thread that wakes for the next due rotation. `refresh()` does one pass.
- After an identity's SVID changed, every callback given to `subscribe` is called with the
  identity (outside the store's lock, on the thread that noticed it).
- The trust bundle is re-read from the source on every `refresh()`; `generation` increases
  whenever an SVID or the bundle changes, so TLS contexts built from them know to rebuild.

Files for the TLS layer (python's ssl loads keys from files only) go to `directory` (0700):
``svid-<identity>.pem`` holds the private key followed by the chain, so a single atomic rename
replaces both and a reader never pairs a new key with an old certificate; ``bundle.pem`` holds
the trust bundle. Every file is written with mode 0600 (`_files.write_private`). Files of
identities that left the node are deleted.

Thread-safe. SVIDs it returns are immutable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._files import ensure_private_dir, write_private
from ..clock import Clock
from .svid import SVID

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.pem"
MAX_SLEEP = 30.0  # the rotation thread re-checks at least this often (wall-clock jumps)


class SVIDSource(Protocol):
    """Where SVIDs come from. `BuiltinCA` is one; a SPIFFE Workload API client is another.

    `svid_for` returns a currently valid SVID for the identity: a source that caches (as a
    Workload API client does) may return the same SVID again until it has a newer one.
    """

    @property
    def trust_domain(self) -> str: ...

    def svid_for(self, identity: int) -> SVID: ...

    def bundle(self) -> list[x509.Certificate]: ...


@dataclass(frozen=True, slots=True)
class SVIDFiles:
    """Where one identity's SVID is on disk, for `SSLContext.load_cert_chain(cert_and_key)`,
    with the SVID those files held and the store's `generation` when this was taken."""

    identity: int
    cert_and_key: Path
    bundle: Path
    svid: SVID
    generation: int


@dataclass(slots=True)
class _Held:
    svid: SVID
    fetched_at: float
    rotate_at: float


class SVIDStore:
    """Current SVIDs for this node's identities (see the module docstring). Thread-safe."""

    def __init__(
        self,
        source: SVIDSource,
        directory: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        rotate_fraction: float = 0.5,
    ) -> None:
        if not 0.0 < rotate_fraction < 1.0:
            raise ValueError(f"rotate_fraction must be in (0, 1), got {rotate_fraction}")
        self._source = source
        self._dir = ensure_private_dir(Path(directory))
        self._clock = clock
        self.rotate_fraction = rotate_fraction
        self._lock = threading.RLock()
        self._held: dict[int, _Held] = {}
        self._bundle: tuple[x509.Certificate, ...] = ()
        self._bundle_pem = b""
        self._generation = 0
        self._listeners: list[Callable[[int], None]] = []
        self._bundle_listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        with self._lock:
            self._refresh_bundle()

    # -- what the TLS layer reads ---------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._source.trust_domain

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def generation(self) -> int:
        """Increases whenever any SVID or the bundle changes."""
        return self._generation

    def identities(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._held)

    def svid(self, identity: int) -> SVID:
        """The current SVID of a local identity (rotated first if due); KeyError if the identity
        is not on this node."""
        self._rotate_due(only=identity)
        with self._lock:
            return self._held[identity].svid

    def files(self, identity: int) -> SVIDFiles:
        self._rotate_due(only=identity)
        with self._lock:
            return SVIDFiles(identity, self._svid_path(identity), self._dir / BUNDLE_FILE,
                             self._held[identity].svid, self._generation)

    def bundle(self) -> tuple[x509.Certificate, ...]:
        with self._lock:
            return self._bundle

    def bundle_pem(self) -> bytes:
        with self._lock:
            return self._bundle_pem

    # -- what the agent drives ------------------------------------------------------------------

    def set_identities(self, identities: Iterable[int]) -> None:
        """Make the node's identities exactly `identities`: fetch SVIDs for new ones, forget
        (and delete the files of) those that left."""
        wanted = set(identities)
        with self._lock:
            for gone in sorted(self._held.keys() - wanted):
                del self._held[gone]
                self._svid_path(gone).unlink(missing_ok=True)
                self._generation += 1
            for new in sorted(wanted - self._held.keys()):
                self._fetch(new)
        self._wake.set()

    def subscribe(self, callback: Callable[[int], None]) -> None:
        """Call `callback(identity)` after that identity's SVID was replaced."""
        with self._lock:
            self._listeners.append(callback)

    def subscribe_bundle(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after the trust bundle changed (re-read on every `refresh()`, at
        least every MAX_SLEEP seconds on the rotation thread)."""
        with self._lock:
            self._bundle_listeners.append(callback)

    def refresh(self) -> list[int]:
        """Re-read the bundle and rotate every SVID that is due; return the rotated identities."""
        with self._lock:
            changed = self._refresh_bundle()
            listeners = list(self._bundle_listeners) if changed else []
        for callback in listeners:
            try:
                callback()
            except Exception:
                log.exception("trust bundle listener failed")
        return self._rotate_due(only=None)

    def next_rotation(self) -> float | None:
        with self._lock:
            return min((h.rotate_at for h in self._held.values()), default=None)

    def start(self) -> None:
        """Rotate on a background thread (daemon) until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="l7gate-svid-rotation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- inside ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("SVID rotation failed; retrying")
            due = self.next_rotation()
            wait = MAX_SLEEP if due is None else min(max(due - self._clock(), 0.05), MAX_SLEEP)
            self._wake.wait(wait)
            self._wake.clear()

    def _rotate_due(self, only: int | None) -> list[int]:
        rotated = []
        with self._lock:
            now = self._clock()
            ids = [only] if only is not None and only in self._held else sorted(self._held)
            for identity in ids:
                held = self._held[identity]
                if now >= held.rotate_at and self._fetch(identity):
                    rotated.append(identity)
            listeners = list(self._listeners)
        for identity in rotated:
            log.info("rotated the SVID of identity %d", identity)
            for callback in listeners:
                try:
                    callback(identity)
                except Exception:
                    log.exception("SVID rotation listener failed for identity %d", identity)
        return rotated

    def _fetch(self, identity: int) -> bool:
        """Fetch `identity`'s SVID from the source; True if it differs from the one held."""
        svid = self._source.svid_for(identity)
        if svid.identity != identity:
            raise ValueError(f"source returned the SVID of {svid.identity} for {identity}")
        now = self._clock()
        rotate_at = now + self.rotate_fraction * max(svid.not_after - now, 0.0)
        old = self._held.get(identity)
        self._held[identity] = _Held(svid, now, rotate_at)
        if old is not None and old.svid.cert_pem == svid.cert_pem:
            return False
        write_private(self._svid_path(identity), svid.key_pem + svid.chain_pem)
        self._generation += 1
        return old is not None

    def _refresh_bundle(self) -> bool:
        bundle = tuple(self._source.bundle())
        if bundle == self._bundle:
            return False
        self._bundle = bundle
        self._bundle_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle)
        write_private(self._dir / BUNDLE_FILE, self._bundle_pem)
        self._generation += 1
        return True

    def _svid_path(self, identity: int) -> Path:
        return self._dir / f"svid-{identity}.pem"
