"""The auth cache: proactive mutual-auth handshakes for the identity pairs policy names.

Theory of operation. The agent says which (local identity, remote identity) pairs need
authentication and on which nodes the remote identity lives (`set_wanted`). For each
(pair, node) the manager keeps a row and a time at which it next handshakes:

- a new row is due at once, so the entry exists before the first packet of the pair does
  (Cilium authenticates only after a drop; we do both: `request` is the on-demand path);
- after a success the row is due again when `refresh_fraction` (2/3) of the time left before
  the result expires has passed, and at once when the local identity's SVID rotates;
- after a failure it is retried with exponential backoff (`retry_base` doubling up to
  `retry_max`); a previous success stays valid until it expires.

Each row has its own kernel entry, keyed by (local, remote, node): a node is let in on its
own proof only, never on another node's. The manager reports every change through
`write(local, remote, node, expires_at)` (wall clock; see `boot_ns_for` for the kernel's clock)
while the row holds a valid result, and `delete(local, remote, node)` once it does not (the
result expired, or the node or the pair is no longer wanted).

It never flushes, and it deletes only entries it wrote itself: `stop()` leaves entries in
place (the datapath outlives the agent, DESIGN decision 7) and they expire on their own. A new
manager, the restarted agent's, does not read the map back and starts knowing of no entry, so
an entry the previous agent left stays until a success of its (pair, node) overwrites it (from
then on the manager owns it) or it expires. Traffic authenticated before the restart is thus
not dropped while the first handshakes run; a failed first handshake leaves the entry, as a
failure leaves a previous success of the manager's own; and an entry for a pair or node no
longer wanted expires instead of being deleted.

Handshakes run on a small thread pool. When several rows of one node are due at once
(`batch_min`, 2; after an agent restart, a CA rotation, a new node), they are proven together
over one batch channel (`batch.authenticate_batch`: one TLS handshake, one signature per
identity and side) instead of one handshake each; each pair's outcome is the one its own
handshake would have had, and is recorded exactly as a handshake's (a failure backs off that
row alone). A peer that does not batch gets one handshake per pair. The worker thread
(`start`) dispatches due rows and sleeps until the next one, woken early by `set_wanted`,
`request` and SVID rotations. Tests with an injected clock call `tick()` instead of starting
the worker.

Thread-safe. `write` and `delete` are called with the manager's lock held, from the worker,
the pool or the caller of `set_wanted`: they must be quick and must not call the manager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

from .batch import authenticate_batch
from .handshake import DEFAULT_TIMEOUT, Address, AuthError, AuthResult, Failure, handshake
from .store import SVIDStore
from ..clock import Clock

log = logging.getLogger(__name__)

Pair = tuple[int, int]
"""(local identity, remote identity)."""
HandshakeFn = Callable[[int, int, Address], AuthResult]
"""`(local, remote, node) -> AuthResult`, raising `AuthError`."""
BatchFn = Callable[[Address, Sequence[Pair]], Mapping[Pair, AuthResult | AuthError]]
"""`(node, pairs) -> {pair: AuthResult or AuthError}`: every pair proven to one node at once."""
WriteFn = Callable[[int, int, Address, float], None]
"""`(local, remote, node, expires_at)`: the node proved the pair until `expires_at` (wall clock)."""
DeleteFn = Callable[[int, int, Address], None]
"""`(local, remote, node)`: the node's entry for the pair is no longer valid."""

MAX_SLEEP = 5.0  # the worker re-checks at least this often (wall-clock jumps)


def boot_ns_for(
    expires_at: float, *, now_wall: float | None = None, now_boot_ns: int | None = None
) -> int:
    """A wall-clock expiry as a CLOCK_BOOTTIME nanosecond value (`bpf_ktime_get_boot_ns()`),
    the clock of the kernel auth map. Never negative; an expiry in the past stays in the past."""
    if now_wall is None or now_boot_ns is None:
        now_boot_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        now_wall = time.time()
    return max(0, now_boot_ns + round((expires_at - now_wall) * 1e9))


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """One (pair, node) row, for `l7gate auth status`.

    `expires_at` is the current valid result's expiry (None if there is none); `attempts` counts
    every handshake tried for the row, `failures` those failed since the last success.
    """

    local: int
    remote: int
    node: Address
    expires_at: float | None
    last_ok: float | None
    last_error: str | None
    attempts: int
    failures: int
    next_attempt: float


@dataclass(slots=True)
class _Row:
    next_at: float
    expires_at: float | None = None
    last_ok: float | None = None
    last_error: str | None = None
    last_attempt: float | None = None
    attempts: int = 0
    failures: int = 0
    running: bool = False
    rerun: bool = False  # the local SVID rotated while a handshake was running


class AuthManager:
    """Keeps the auth entries of the wanted pairs valid (see the module docstring)."""

    def __init__(
        self,
        store: SVIDStore | None,
        write: WriteFn,
        delete: DeleteFn,
        *,
        handshake_fn: HandshakeFn | None = None,
        batch_fn: BatchFn | None = None,
        batch_min: int = 2,
        clock: Clock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        refresh_fraction: float = 2 / 3,
        min_refresh: float = 1.0,
        retry_base: float = 1.0,
        retry_max: float = 30.0,
        request_interval: float = 1.0,
        workers: int = 4,
    ) -> None:
        if handshake_fn is None:
            if store is None:
                raise ValueError("AuthManager needs a store, or a handshake_fn")
            bound = store

            def handshake_fn(local: int, remote: int, node: Address) -> AuthResult:
                return handshake(bound, local, remote, node, timeout, clock=clock)

            if batch_fn is None:
                def batch_fn(node: Address, pairs: Sequence[Pair]) -> Mapping[Pair, AuthResult | AuthError]:
                    return authenticate_batch(bound, pairs, node, timeout, clock=clock)

        if not 0.0 < refresh_fraction < 1.0:
            raise ValueError(f"refresh_fraction must be in (0, 1), got {refresh_fraction}")
        self._handshake = handshake_fn
        self._batch = batch_fn
        self.batch_min = batch_min
        self._write = write
        self._delete = delete
        self._clock = clock
        self.refresh_fraction = refresh_fraction
        self.min_refresh = min_refresh
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.request_interval = request_interval
        self._lock = threading.Lock()
        self._rows: dict[Pair, dict[Address, _Row]] = {}
        self._written: dict[Pair, dict[Address, float]] = {}  # what this manager wrote, per node
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="l7gate-auth")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store is not None:
            store.subscribe(self._on_rotation)

    # -- input ----------------------------------------------------------------------------------

    def set_wanted(self, pairs: Mapping[Pair, Set[Address]]) -> None:
        """The pairs that need authentication now, each with the nodes of its remote identity."""
        with self._lock:
            now = self._clock()
            wanted = {pair: frozenset(nodes) for pair, nodes in pairs.items()}
            for pair in self._rows.keys() - wanted.keys():
                del self._rows[pair]
            for pair, nodes in wanted.items():
                rows = self._rows.setdefault(pair, {})
                for node in rows.keys() - nodes:
                    del rows[node]
                for node in nodes - rows.keys():
                    rows[node] = _Row(next_at=now)
            for pair in sorted(self._written.keys() | wanted.keys()):
                self._sync(pair, now)
        self._wake.set()

    def request(self, local: int, remote: int) -> bool:
        """Handshake for the pair now (after an auth drop). At most once per `request_interval`
        per node, so a burst of drops is one handshake. False if the pair is not wanted."""
        with self._lock:
            now = self._clock()
            rows = self._rows.get((local, remote), {})
            for row in rows.values():
                last = row.last_attempt
                if not row.running and (last is None or now - last >= self.request_interval):
                    row.next_at = min(row.next_at, now)
        self._wake.set()
        return bool(rows)

    def _on_rotation(self, identity: int) -> None:
        with self._lock:
            now = self._clock()
            for pair, rows in self._rows.items():
                if pair[0] != identity:
                    continue
                for row in rows.values():
                    if row.running:
                        row.rerun = True
                    else:
                        row.next_at = now
        self._wake.set()

    # -- output ---------------------------------------------------------------------------------

    def status(self) -> list[AuthStatus]:
        with self._lock:
            return [
                AuthStatus(pair[0], pair[1], node, row.expires_at, row.last_ok, row.last_error,
                           row.attempts, row.failures, row.next_at)
                for pair, rows in sorted(self._rows.items())
                for node, row in sorted(rows.items())
            ]

    # -- running --------------------------------------------------------------------------------

    def tick(self, wait: bool = True) -> float | None:
        """Expire old results, start the due handshakes (and with `wait`, finish them); return
        when something is next due (None: nothing is)."""
        futures: list[Future[None]] = []
        with self._lock:
            now = self._clock()
            due: dict[Address, list[tuple[Pair, _Row]]] = {}
            for pair, rows in sorted(self._rows.items()):
                expired = False
                for node, row in sorted(rows.items()):
                    if row.expires_at is not None and row.expires_at <= now:
                        row.expires_at = None
                        expired = True
                    if not row.running and row.next_at <= now:
                        row.running = True
                        row.attempts += 1
                        row.last_attempt = now
                        due.setdefault(node, []).append((pair, row))
                if expired:
                    self._sync(pair, now)
            for node, batch in sorted(due.items()):
                if self._batch is not None and len(batch) >= self.batch_min:
                    futures.append(self._pool.submit(self._attempt_batch, node, batch))
                else:
                    futures.extend(self._pool.submit(self._attempt, pair, node, row) for pair, row in batch)
        if wait:
            wait_futures(futures)
        return self._next_due()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="l7gate-auth-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker and wait for running handshakes. Entries stay in the kernel map."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                due = self.tick(wait=False)
            except Exception:
                log.exception("auth manager tick failed")
                due = None
            sleep = MAX_SLEEP if due is None else min(max(due - self._clock(), 0.0), MAX_SLEEP)
            self._wake.wait(sleep)

    def _attempt(self, pair: Pair, node: Address, row: _Row) -> None:
        local, remote = pair
        outcome: AuthResult | Exception
        try:
            outcome = self._handshake(local, remote, node)
        except AuthError as exc:
            outcome = exc
        except Exception as exc:
            log.exception("handshake %d->%d at %s raised", local, remote, node)
            outcome = exc
        with self._lock:
            self._record(pair, node, row, outcome)
        self._wake.set()

    def _attempt_batch(self, node: Address, batch: list[tuple[Pair, _Row]]) -> None:
        assert self._batch is not None
        outcomes: Mapping[Pair, AuthResult | Exception]
        try:
            outcomes = self._batch(node, [pair for pair, _ in batch])
        except Exception as exc:
            log.exception("batch auth of %d pairs at %s raised", len(batch), node)
            outcomes = {pair: exc for pair, _ in batch}
        with self._lock:
            for pair, row in batch:
                outcome = outcomes.get(pair)
                if outcome is None:  # fail closed: a pair the batch did not answer
                    outcome = AuthError(Failure.PROTOCOL, "no outcome for the pair in the batch")
                self._record(pair, node, row, outcome)
        self._wake.set()

    def _record(self, pair: Pair, node: Address, row: _Row, outcome: AuthResult | Exception) -> None:
        """One attempt's outcome into its row and the entries (lock held)."""
        local, remote = pair
        if self._rows.get(pair, {}).get(node) is not row:
            return  # no longer wanted (or re-added afresh) while the handshake ran
        row.running = False
        now = self._clock()
        if isinstance(outcome, AuthResult):
            row.expires_at = outcome.expires_at
            row.last_ok = now
            row.last_error = None
            row.failures = 0
            left = outcome.expires_at - now
            row.next_at = now + max(self.min_refresh, self.refresh_fraction * left)
        else:
            row.last_error = str(outcome) or type(outcome).__name__
            row.failures += 1
            row.next_at = now + min(self.retry_max, self.retry_base * 2 ** (row.failures - 1))
            log.info("auth %d->%d at %s failed: %s", local, remote, node, row.last_error)
        if row.rerun:
            row.rerun = False
            row.next_at = now
        self._sync(pair, now)

    def _next_due(self) -> float | None:
        with self._lock:
            times = [
                t
                for rows in self._rows.values()
                for row in rows.values()
                for t in (None if row.running else row.next_at, row.expires_at)
                if t is not None
            ]
            return min(times, default=None)

    def _sync(self, pair: Pair, now: float) -> None:
        """Bring the pair's entries in line with its rows: each node's valid result written, the
        entries of nodes without one deleted (lock held)."""
        rows = self._rows.get(pair, {})
        written = self._written.setdefault(pair, {})
        for node in sorted(written.keys() | rows.keys()):
            row = rows.get(node)
            target = None
            if row is not None and row.expires_at is not None and row.expires_at > now:
                target = row.expires_at
            have = written.get(node)
            if target == have:
                continue
            try:
                if target is None:
                    self._delete(pair[0], pair[1], node)
                    del written[node]
                else:
                    self._write(pair[0], pair[1], node, target)
                    written[node] = target
            except Exception:
                log.exception("auth entry %s -> %s for %d->%d at %s failed", have, target, *pair, node)
        if not written:
            del self._written[pair]
