"""A node's lease in its cluster's etcd, kept alive by a thread.

Theory of operation
-------------------
Every key a node owns in its cluster's store (its node record, its endpoints, its identity value
keys) is attached to one lease, so that the keys of a node whose agent dies vanish `ttl` seconds
later, as in Cilium. `MeshLease` grants the lease on first use and renews it every `ttl / 3`
seconds from a daemon thread. A failed renewal is retried every second; if the lease has expired
meanwhile (etcd unreachable for longer than the TTL, or etcd replaced), its keys are gone, so
the next renewal grants a new lease and calls every subscriber with the new id: they write their
keys again (the publisher re-publishes, the allocator re-writes its value keys). A writer that
finds the lease gone first (a pod applied just after etcd came back, before the keepalive
noticed) calls `replace`, which does the same at once.

Thread safety: every method may be called from any thread. Subscribers are called from the
keepalive thread, one at a time, and must not call `close`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from l7gate.kvstore.api import KVStore, KVStoreError

log = logging.getLogger(__name__)

_RETRY = 1.0


class MeshLease:
    """One lease and its keepalive thread. The caller owns it and must `close` it; the store is
    not owned (close the lease first)."""

    def __init__(self, store: KVStore, ttl: float = 15.0, *, name: str = "") -> None:
        if ttl <= 0:
            raise ValueError("lease TTL must be positive")
        self._store = store
        self.ttl = ttl
        self.name = name
        self._lock = threading.Lock()
        self._id: int | None = None
        self._subscribers: list[Callable[[int], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One regrant at a time, by the keepalive or a writer (`replace`); reentrant, since a
        # subscriber's own write may find the old lease gone too.
        self._regrant_lock = threading.RLock()
        self.regrants = 0

    @property
    def id(self) -> int:
        """The current lease id, granted now if there is none yet (KVStoreError if etcd cannot
        be reached). Starts the keepalive thread."""
        with self._lock:
            if self._stop.is_set():
                raise KVStoreError("lease is closed")
            if self._id is None:
                self._id = self._store.grant_lease(self.ttl)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"mesh-lease {self.name}",
                                                daemon=True)
                self._thread.start()
            return self._id

    @property
    def current(self) -> int | None:
        """The current lease id without granting one."""
        return self._id

    def subscribe(self, callback: Callable[[int], None]) -> None:
        """Call `callback(new_id)` whenever the lease had to be granted again."""
        with self._lock:
            self._subscribers.append(callback)

    def _run(self) -> None:
        interval = max(self.ttl / 3, 0.5)
        wait = interval
        while not self._stop.wait(wait):
            lease = self._id
            if lease is None:
                wait = interval
                continue
            try:
                self._store.keepalive(lease)
                wait = interval
            except KVStoreError as e:
                if "not found" not in str(e):
                    log.warning("lease %s: keepalive failed (retrying): %s", self.name, e)
                    wait = _RETRY
                    continue
                wait = self._regrant(lease, e)

    def replace(self, stale: int) -> None:
        """A write on lease `stale` found it gone (expired or revoked): grant a new one now,
        unless the keepalive or another writer already did, and call the subscribers (from this
        thread) as a keepalive's regrant does. KVStoreError if etcd cannot grant one."""
        with self._regrant_lock:
            if self._stop.is_set() or self._id != stale:
                return
            self._install(stale, self._store.grant_lease(self.ttl))

    def _regrant(self, old: int, why: KVStoreError) -> float:
        with self._regrant_lock:
            if self._id != old:
                return max(self.ttl / 3, 0.5)  # a writer replaced it already
            try:
                new = self._store.grant_lease(self.ttl)
            except KVStoreError as e:
                log.warning("lease %s expired (%s); granting a new one failed (retrying): %s", self.name, why, e)
                return _RETRY
            if not self._install(old, new):
                return 0
        return max(self.ttl / 3, 0.5)

    def _install(self, old: int, new: int) -> bool:
        with self._lock:
            if self._stop.is_set():
                return False
            self._id = new
            self.regrants += 1
            subscribers = list(self._subscribers)
        log.warning("lease %s: lease %x expired (its keys are gone): granted %x, writing them again",
                    self.name, old, new)
        for callback in subscribers:
            try:
                callback(new)
            except Exception:  # a subscriber's failure must not end the keepalive
                log.exception("lease %s: a subscriber failed on the new lease", self.name)
        return True

    def close(self, *, revoke: bool = True) -> None:
        """Stop renewing; with `revoke`, end the lease now so that its keys go at once (a clean
        shutdown), else they live until the TTL runs out. Idempotent."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            thread, lease = self._thread, self._id
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if revoke and lease is not None:
            try:
                self._store.revoke(lease)
            except KVStoreError as e:
                log.info("lease %s: revoke failed (its keys expire with the TTL): %s", self.name, e)
