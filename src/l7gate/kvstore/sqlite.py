"""The embedded kvstore: one SQLite file, the single-node default.

Theory of operation
-------------------
Four tables live in the file:

- `kv(key, value, create_revision, mod_revision, lease)`: the current state.
- `events(revision, type, key, value)`: the change history, one row per mutation. It is the single
  source of truth for watches, which lets a watch see writes made by *another* `SQLiteKVStore`
  (another thread's instance or another process) on the same file.
- `leases(id, ttl, expires_at)`: live leases; `expires_at` is in the injected clock's time base.
- `meta(name, value)`: `revision` (latest change) and `compacted` (highest revision dropped from
  the history); `meta_text(name, value)`: the file store's `store_id`.

Every write runs in one `BEGIN IMMEDIATE` transaction that first expires due leases, then bumps
`revision`, changes `kv` and appends to `events`. Because SQLite serialises writers on the file,
`create` (put-if-absent) is atomic across threads, instances and processes.

Lease expiry is enforced lazily but strictly: every operation, and every watch poll, first deletes
the keys of leases whose `expires_at <= clock()`, so an expired key is never returned, and its
DELETE event carries a revision after the expiry. Nothing needs a background thread; a test
advances its fake clock and the next operation reaps. Like etcd after a restart, opening a file
gives every lease a full TTL again, because a monotonic clock means nothing across processes'
lifetimes or reboots.

A watch remembers the next revision it wants and reads matching rows from `events`. Writers of this
instance wake waiting watches at once; writes from other instances are found by polling every
`poll_interval` seconds. The history is trimmed to the last `history` events; a watch that falls
behind the trimmed point fails with KVStoreError (etcd's "compacted" error), and so does a watch
asked to start there.

A store that existed is never silently replaced by an empty one: a file store has a random
`store_id` in `meta_text`, also written beside it in `<path>.id`. Opening refuses (KVStoreError) a file
that exists with 0 bytes (truncated), a missing file whose `.id` remains (deleted), and a file
whose id differs from the `.id` (another store put in its place). Only a path with neither file
is a first start (`created` is then True). A garbage or cut-short file is refused by SQLite.

Thread safety: one SQLite connection per instance, guarded by a lock; every method may be called
from any thread.
"""

from __future__ import annotations

import collections
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType

from l7gate.clock import Clock
from l7gate.kvstore.api import Event, EventType, KVStoreError, check_int64, check_key, check_prefix, check_value


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
CREATE TABLE IF NOT EXISTS meta_text (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER
);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL
);
"""

# Trim the history only every so many revisions, so that a write costs one extra DELETE rarely.
_TRIM_EVERY = 256
# The row writes of a put (`put`, `put_many`: one statement per row, or per table).
_INSERT_EVENT = "INSERT INTO events (revision, type, key, value) VALUES (?, ?, ?, ?)"
_UPSERT_KV = (
    "INSERT INTO kv (key, value, create_revision, mod_revision, lease)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " value = excluded.value, mod_revision = excluded.mod_revision,"
    " lease = excluded.lease"
)
# Upper bound of events a watch reads from the file in one go.
_WATCH_BATCH = 1024


def _refuse_lost_store(path: str, marker: str) -> None:
    """KVStoreError when `path` is a store that existed and whose state is gone (module doc)."""
    try:
        size: int | None = os.path.getsize(path)
    except FileNotFoundError:
        size = None
    fix = (f"restore it from a backup, or remove {path} and {marker} to start afresh with no policies, "
           "pods or identities")
    if size == 0:
        raise KVStoreError(f"{path} exists but is empty (0 bytes): the store's state was lost (the file was "
                           f"truncated?); refusing to start with nothing in force: {fix}")
    if size is None and os.path.exists(marker):
        raise KVStoreError(f"{path} is missing, but {marker} says a store was here: refusing to start with "
                           f"nothing in force: {fix}")


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (etcd's range_end),
    or None when there is none. SQLite compares TEXT as UTF-8 bytes, which orders like code
    points, so this bound works in SQL."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored; valid keys never hold one
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _range_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
    if not prefix:
        return "1", ()
    end = prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


class SQLiteKVStore:
    """A `KVStore` in a SQLite file (or ':memory:'). Thread-safe; the caller owns it and must
    `close` it. Several instances, in one process or several, may share one file; all of them
    must use clocks with the same time base."""

    def __init__(
        self,
        path: str,
        *,
        clock: Clock = time.monotonic,
        history: int = 10_000,
        poll_interval: float = 0.05,
        durable: bool = True,
        busy_timeout: float = 10.0,
    ) -> None:
        if history < 1:
            raise KVStoreError("history must be at least 1")
        self._path = path
        self._clock = clock
        self._history = history
        self._poll_interval = poll_interval
        self._lock = threading.RLock()
        self._batch_depth = 0
        # Inside a batch: the revision counter, kept here and written to `meta` once (before any
        # read inside the batch, and at its end): one UPDATE per write was most of a put's cost.
        self._batch_rev: int | None = None
        # Wakes watches when this instance commits; `_generation` lets a watch tell whether it
        # missed a wake-up between reading the file and going to sleep.
        self._changed = threading.Condition(threading.Lock())
        self._generation = 0
        self._closed = False
        in_memory = path == ":memory:" or path.startswith("file::memory:")
        self.created = in_memory or not os.path.exists(path)
        marker = path + ".id"
        if not in_memory:
            _refuse_lost_store(path, marker)
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            if path != ":memory:" and not path.startswith("file::memory:"):
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise KVStoreError(f"{path}: cannot enable WAL journal (got {mode})")
            # FULL: an allocated identity must survive a power cut, or a number already written
            # into pinned BPF maps could later be handed to other labels.
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            # Schema and the lease refresh in one transaction, before anything can reap: an
            # expiry time written under another process's clock must not be compared with ours.
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
            self._db.execute("UPDATE leases SET expires_at = ? + ttl", (self._clock(),))
            self._db.execute("COMMIT")
            if not in_memory:
                self._check_identity(path, marker)
        except sqlite3.Error as e:
            if hasattr(self, "_db"):
                self._db.close()
            raise KVStoreError(f"{path}: cannot open kvstore: {e}") from e
        except KVStoreError:
            self._db.close()
            raise

    def _check_identity(self, path: str, marker: str) -> None:
        """The store's id in `meta_text` against `<path>.id` (module doc); a store without either gets
        one now (a first start, or a store made before ids existed)."""
        row = self._db.execute("SELECT value FROM meta_text WHERE name = 'store_id'").fetchone()
        try:
            with open(marker, encoding="ascii") as fh:
                recorded: str | None = fh.read().strip()
        except FileNotFoundError:
            recorded = None
        if row is not None and recorded is not None and row[0] != recorded:
            raise KVStoreError(
                f"{path} is store {row[0]}, but {marker} says this directory held store {recorded}: "
                "another store was put in its place; restore the right file, or remove both to start afresh")
        if row is None:
            store_id = recorded or secrets.token_hex(16)
            self._db.execute("INSERT OR REPLACE INTO meta_text (name, value) VALUES ('store_id', ?)",
                             (store_id,))
        else:
            store_id = str(row[0])
        if recorded is None:
            tmp = marker + ".tmp"
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(store_id + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, marker)

    # -- plumbing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KVStoreError(f"{self._path}: kvstore is closed")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one transaction (one fsync): inside, `put`/`create`/`delete` join
        it instead of committing one by one. All or nothing: an exception rolls every write in
        the batch back. Other threads wait for the batch to end (the store's lock is held)."""
        with self._lock:
            if self._batch_depth:
                self._batch_depth += 1
                try:
                    yield
                finally:
                    self._batch_depth -= 1
                return
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._batch_depth = 1
                try:
                    self._reap_locked()
                    yield
                    self._write_batch_rev(self._db)
                except BaseException:
                    self._batch_rev = None
                    self._db.execute("ROLLBACK")
                    raise
                finally:
                    self._batch_depth = 0
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise KVStoreError(f"{self._path}: {e}") from e
        self._notify()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; due leases are reaped first, inside it."""
        with self._lock:
            self._check_open()
            if self._batch_depth:
                yield self._db  # part of the caller's batch: it commits (or rolls back) once
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._reap_locked()
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise KVStoreError(f"{self._path}: {e}") from e
        self._notify()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction (a consistent snapshot), after reaping due leases."""
        self._reap_if_due()
        with self._lock:
            self._check_open()
            if self._batch_depth:
                self._write_batch_rev(self._db)
                yield self._db  # inside the caller's batch: read its own writes
                return
            try:
                self._db.execute("BEGIN")
                try:
                    yield self._db
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise KVStoreError(f"{self._path}: {e}") from e

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _write_batch_rev(self, db: sqlite3.Connection) -> None:
        if self._batch_rev is not None:
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (self._batch_rev,))
            self._batch_rev = None

    def _bump(self, db: sqlite3.Connection, n: int = 1) -> int:
        """Take the next `n` revisions; returns the last. Inside a batch, the counter is kept
        in memory until the batch's end (`_write_batch_rev`)."""
        if self._batch_depth:
            if self._batch_rev is None:
                self._batch_rev = int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
            self._batch_rev += n
            rev = self._batch_rev
        else:
            rev = int(db.execute("UPDATE meta SET value = value + ? WHERE name = 'revision' RETURNING value",
                                 (n,)).fetchone()[0])
        return rev

    def _trim(self, db: sqlite3.Connection, rev: int, n: int = 1) -> None:
        """Trim the history to the last `history` events when the revisions up to `rev` just
        taken (`n` of them) passed a multiple of _TRIM_EVERY."""
        if rev // _TRIM_EVERY != (rev - n) // _TRIM_EVERY and rev > self._history:
            floor = rev - self._history
            db.execute("DELETE FROM events WHERE revision <= ?", (floor,))
            db.execute(
                "UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'", (floor,)
            )

    def _record(self, db: sqlite3.Connection, kind: EventType, key: str, value: bytes) -> int:
        rev = self._bump(db)
        self._trim(db, rev)
        db.execute(_INSERT_EVENT, (rev, kind.value, key, value))
        return rev

    def _delete_locked(
        self, db: sqlite3.Connection, key: str, prev_value: bytes | None = None
    ) -> bool:
        if prev_value is None:
            cur = db.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            cur = db.execute("DELETE FROM kv WHERE key = ? AND value = ?", (key, prev_value))
        if cur.rowcount == 0:
            return False
        self._record(db, EventType.DELETE, key, b"")
        return True

    def _revoke_locked(self, db: sqlite3.Connection, lease: int) -> None:
        keys = [
            row[0]
            for row in db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))
        ]
        for key in keys:
            self._delete_locked(db, key)
        db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def _reap_locked(self) -> None:
        due = [
            row[0]
            for row in self._db.execute(
                "SELECT id FROM leases WHERE expires_at <= ? ORDER BY id", (self._clock(),)
            )
        ]
        for lease in due:
            self._revoke_locked(self._db, lease)

    def _reap_if_due(self) -> None:
        # A cheap read first, so that plain reads stay read-only unless a lease really expired.
        with self._lock:
            self._check_open()
            try:
                due = self._db.execute(
                    "SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (self._clock(),)
                ).fetchone()
            except sqlite3.Error as e:
                raise KVStoreError(f"{self._path}: {e}") from e
        if due is not None:
            with self._write():
                pass

    def _check_lease(self, db: sqlite3.Connection, lease: int | None) -> None:
        if lease is None:
            return
        check_int64(lease, "lease")
        if db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise KVStoreError(f"lease {lease} not found (expired or revoked)")

    # -- KVStore --------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        key = check_key(key)
        with self._read() as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        key, value = check_key(key), check_value(value)
        with self._write() as db:
            self._check_lease(db, lease)
            rev = self._record(db, EventType.PUT, key, value)
            db.execute(_UPSERT_KV, (key, value, rev, rev, lease))
        return rev

    def put_many(self, items: Iterable[tuple[str, bytes]], lease: int | None = None) -> int:
        """Put many keys in one transaction (SQLite has no size limit on one, so this is
        atomic here; etcd's is not), joining the caller's batch if there is one: the same
        revisions, events and rows as one `put` after another, written with one statement per
        table. Returns the revision of the last (0 for no items)."""
        rows = [(check_key(key), check_value(value)) for key, value in items]
        if not rows:
            return 0
        with self.batch():
            db = self._db
            self._check_lease(db, lease)
            last = self._bump(db, len(rows))
            first = last - len(rows) + 1
            put = EventType.PUT.value
            db.executemany(_INSERT_EVENT, [(first + i, put, key, value) for i, (key, value) in enumerate(rows)])
            db.executemany(_UPSERT_KV, [(key, value, first + i, first + i, lease) for i, (key, value) in enumerate(rows)])
            self._trim(db, last, len(rows))
        return last

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        key, value = check_key(key), check_value(value)
        with self._write() as db:
            self._check_lease(db, lease)
            if db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None:
                return False
            rev = self._record(db, EventType.PUT, key, value)
            db.execute(
                "INSERT INTO kv (key, value, create_revision, mod_revision, lease)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, value, rev, rev, lease),
            )
        return True

    def delete(self, key: str, *, prev_value: bytes | None = None) -> bool:
        key = check_key(key)
        if prev_value is not None:
            prev_value = check_value(prev_value)
        with self._write() as db:
            return self._delete_locked(db, key, prev_value)

    def list_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        return self.list_prefix_with_revision(prefix)[0]

    def list_prefix_with_revision(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        prefix = check_prefix(prefix)
        where, args = _range_clause(prefix)
        with self._read() as db:
            rev = int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
            rows = db.execute(f"SELECT key, value FROM kv WHERE {where} ORDER BY key", args)
            items = [(str(k), bytes(v)) for k, v in rows]
        return items, rev

    @property
    def revision(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> SQLiteWatch:
        prefix = check_prefix(prefix)
        with self._read() as db:
            rev, compacted = self._revisions(db)
        if start_revision is None:
            start_revision = rev + 1
        elif check_int64(start_revision, "start_revision") <= compacted:
            raise KVStoreError(
                f"watch from revision {start_revision}: history compacted up to {compacted}"
            )
        return SQLiteWatch(self, prefix, max(start_revision, 1))

    def grant_lease(self, ttl_seconds: float) -> int:
        if not ttl_seconds > 0:
            raise KVStoreError(f"lease TTL must be positive, got {ttl_seconds!r}")
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO leases (ttl, expires_at) VALUES (?, ?)",
                (float(ttl_seconds), self._clock() + ttl_seconds),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def keepalive(self, lease: int) -> float:
        check_int64(lease, "lease")
        with self._write() as db:
            row = db.execute(
                "UPDATE leases SET expires_at = ? + ttl WHERE id = ? RETURNING ttl",
                (self._clock(), lease),
            ).fetchone()
            if row is None:
                raise KVStoreError(f"lease {lease} not found (expired or revoked)")
            return float(row[0])

    def revoke(self, lease: int) -> None:
        with self._write() as db:
            self._check_lease(db, lease)
            self._revoke_locked(db, lease)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
        self._notify()

    def __enter__(self) -> SQLiteKVStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- backend-specific -----------------------------------------------------------------------

    def reap_expired_leases(self) -> None:
        """Delete the keys of every expired lease now (any other call does it too)."""
        self._reap_if_due()

    def compact(self, revision: int) -> None:
        """Drop history up to and including `revision`."""
        with self._write() as db:
            self._write_batch_rev(db)
            rev, _ = self._revisions(db)
            floor = min(revision, rev)
            db.execute("DELETE FROM events WHERE revision <= ?", (floor,))
            db.execute(
                "UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'", (floor,)
            )

    @staticmethod
    def _revisions(db: sqlite3.Connection) -> tuple[int, int]:
        rows = dict(db.execute("SELECT name, value FROM meta"))
        return int(rows["revision"]), int(rows["compacted"])

    def _events_from(self, prefix: str, start: int) -> tuple[list[Event], int]:
        """Events for `prefix` with revision >= start, and the next revision to ask for."""
        where, args = _range_clause(prefix)
        with self._read() as db:
            rev, compacted = self._revisions(db)
            if start <= compacted:
                raise KVStoreError(
                    f"watch {prefix!r} fell behind: needs revision {start},"
                    f" history compacted up to {compacted}"
                )
            rows = db.execute(
                f"SELECT revision, type, key, value FROM events WHERE revision >= ? AND {where}"
                " ORDER BY revision LIMIT ?",
                (start, *args, _WATCH_BATCH),
            ).fetchall()
        events = [Event(EventType(t), str(k), bytes(v), int(r)) for r, t, k, v in rows]
        if len(events) == _WATCH_BATCH:
            return events, events[-1].revision + 1
        return events, max(start, rev + 1)


class SQLiteWatch:
    """A `Watch` over a `SQLiteKVStore`. Thread-safe."""

    def __init__(self, store: SQLiteKVStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = start_revision
        self._buffer: collections.deque[Event] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._store._closed

    def get(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._store
        while True:
            with store._changed:
                generation = store._generation
            with self._lock:
                if self.closed:
                    return None
                if not self._buffer:
                    try:
                        events, self._next = store._events_from(self._prefix, self._next)
                    except KVStoreError:
                        if self.closed:
                            return None
                        raise
                    self._buffer.extend(events)
                if self._buffer:
                    return self._buffer.popleft()
            wait = store._poll_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait = min(wait, remaining)
            with store._changed:
                if store._generation == generation and not self.closed:
                    store._changed.wait(wait)

    def close(self) -> None:
        self._closed = True
        self._store._notify()

    def __enter__(self) -> SQLiteWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
