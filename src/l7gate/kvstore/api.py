"""The kvstore interface: a small, etcd-shaped key/value store.

Every backend offers the same contract, modelled on etcd v3 so that the embedded SQLite backend
and the etcd backend are interchangeable (tests/integration/test_kvstore_contract.py runs one
suite against both):

- Keys are non-empty `str`, values are `bytes`.
- Every mutation (put, delete, lease expiry or revoke deleting a key) bumps one store-wide,
  monotonic *revision* and produces one `Event` carrying that revision. A batch is one
  revision in etcd (one transaction) and one revision per write in SQLite. Revisions are the
  backend's own: a new SQLite store is at 0, a new etcd at 1 (its first write is 2).
- `create` is an atomic put-if-absent (etcd: a txn comparing `create_revision == 0`); it is what
  lets several allocators share a store without handing one number to two owners. `delete` with
  `prev_value` is the matching compare-and-delete, for undoing or cleaning up such a claim
  without removing someone else's.
- A key may be attached to a lease. When the lease is revoked or expires, its keys are deleted,
  and watchers see DELETE events for them, as with etcd.
- `watch_prefix` returns a `Watch`, a thread-safe queue of events. A watch started with
  `start_revision` first replays every event with `revision >= start_revision` still in the
  store's history, then continues live; without it, it sees only events after the call. Use
  `list_prefix_with_revision` then `watch_prefix(prefix, start_revision=rev + 1)` to get a
  consistent snapshot followed by every later change, with no gap and no duplicate.

All operations raise `KVStoreError` (and nothing else) on failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import enum
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable


class KVStoreError(Exception):
    """Any failure of a kvstore operation: I/O, a closed store, an unknown lease, a compacted
    watch revision, an invalid key."""


def check_key(key: object) -> str:
    """`key` if it is a valid key (a non-empty `str` with no NUL, encodable as UTF-8)."""
    if not isinstance(key, str) or not key:
        raise KVStoreError(f"key must be a non-empty string, got {key!r}")
    if "\x00" in key:
        raise KVStoreError(f"key must not contain NUL: {key!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise KVStoreError(f"key is not valid Unicode: {key!r}") from e
    return key


def check_prefix(prefix: object) -> str:
    """`prefix` if it is "" (every key) or a valid key."""
    if not isinstance(prefix, str):
        raise KVStoreError(f"prefix must be a string, got {prefix!r}")
    return check_key(prefix) if prefix else prefix


def check_value(value: object) -> bytes:
    """`value` as `bytes`, if it is bytes-like."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise KVStoreError(f"value must be bytes, got {type(value).__name__}")
    return bytes(value)


def check_int64(value: object, what: str) -> int:
    """A lease id or revision: both backends store them as int64 (SQLite INTEGER, etcd int64),
    so a larger int must fail here as KVStoreError rather than later as OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63:
        raise KVStoreError(f"{what} must be an int64, got {value!r}")
    return value


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class Event:
    """One change to one key. For DELETE, `value` is b"" (etcd without `prev_kv`)."""

    type: EventType
    key: str
    value: bytes
    revision: int


@runtime_checkable
class Watch(Protocol):
    """A stream of events for one key prefix, in revision order.

    Thread-safe: any thread may call `get` or `close`. The caller that created the watch owns it
    and must `close` it (or use it as a context manager)."""

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None if `timeout` seconds pass first, or once the watch is closed.
        `timeout=0` polls; `timeout=None` waits until an event arrives or the watch is closed.
        Raises KVStoreError if the events it still had to deliver were compacted away, or (etcd)
        once its stream to the server is lost, after every event already received: the watch
        does not reconnect by itself; the caller watches again (or re-lists)."""
        ...

    def close(self) -> None:
        """Stop the watch; a `get` blocked in another thread returns None. Idempotent."""
        ...

    @property
    def closed(self) -> bool: ...

    def __enter__(self) -> Watch: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class KVStore(Protocol):
    """The store. Implementations are thread-safe."""

    def get(self, key: str) -> bytes | None: ...

    def batch(self) -> AbstractContextManager[None]:
        """Group writes into one atomic commit (etcd: one transaction, so at most etcd's
        --max-txn-ops writes: a larger batch is refused whole, never split)."""
        ...

    def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Set `key`; returns the revision of the change (etcd, inside a batch: 0, as the
        revision is known only at the commit). Attaching a lease replaces the key's previous
        lease (as in etcd); `lease=None` detaches it."""
        ...

    def put_many(self, items: Iterable[tuple[str, bytes]], lease: int | None = None) -> int:
        """Put many keys, all on `lease`, in order; returns the revision of the last. Not
        necessarily atomic (etcd: one transaction per --max-txn-ops keys, and never inside a
        batch): for bulk writes whose completeness is signalled otherwise."""
        ...

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        """Atomically set `key` only if it does not exist. True if this call created it."""
        ...

    def delete(self, key: str, *, prev_value: bytes | None = None) -> bool:
        """Delete `key`. True if it existed (and, when `prev_value` is given, held exactly that
        value: a compare-and-delete, etcd's txn on `value`)."""
        ...

    def list_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every (key, value) whose key starts with `prefix`, sorted by key."""
        ...

    def list_prefix_with_revision(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        """`list_prefix` plus the store revision the listing reflects."""
        ...

    @property
    def revision(self) -> int:
        """The revision of the latest change (0 for a new, empty SQLite store; 1 for a new
        etcd, whose revisions are reported unchanged so that they agree with etcdctl)."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> Watch: ...

    def grant_lease(self, ttl_seconds: float) -> int:
        """A new lease id; keys attached to it are deleted `ttl_seconds` after the last
        keepalive (etcd: whole seconds, rounded up, at least its minimum of 2 s)."""
        ...

    def keepalive(self, lease: int) -> float:
        """Restart the lease's TTL; returns the TTL. KVStoreError if it expired or never
        existed."""
        ...

    def revoke(self, lease: int) -> None:
        """End the lease now and delete its keys. KVStoreError if it does not exist."""
        ...

    def close(self) -> None: ...
