"""The etcd kvstore: the `KVStore` contract over a real etcd v3 cluster (one per cluster mesh member).

Theory of operation
-------------------
The client is a thin synchronous layer over one grpcio channel and the etcd v3 gRPC stubs that
the `aetcd` package ships (`aetcd.rpc`); aetcd's own asyncio client is not used. Every KVStore
call is one unary RPC (a range, a put, a txn, a lease call) with a deadline of `timeout`
seconds, or a short series of them (a paged listing); a watch is one bidirectional stream read by
one thread. Every gRPC failure becomes a `KVStoreError` naming the endpoint, the operation and
the gRPC status; nothing else escapes.

Revisions are etcd's own, unchanged, so they agree with `etcdctl`, etcd's logs and any other
client of the same cluster: a new etcd reports revision 1 (not 0 as a new SQLite store) and its
first write is revision 2. All writes of one transaction share one revision (etcd's rule).

- `create` is one txn: `create_revision(key) == 0` → put. `delete(prev_value=...)` is one txn:
  `value(key) == prev_value` → delete. Both are atomic on the server.
- `list_prefix_with_revision` pages through the range (`page_size` keys per request, halved
  when a page would exceed the gRPC receive limit), every page read at the revision of the
  first, so the listing is one consistent snapshot however large it is. If that revision is
  compacted away mid-listing, the listing starts again (twice at most).
- Leases: TTLs are whole seconds on the wire, so `grant_lease` rounds up (`ceil`); etcd itself
  raises a TTL below its minimum (2 s with default election settings) to that minimum, and
  `keepalive` returns the TTL etcd granted. Expired leases are revoked by etcd's leader, which
  checks every 500 ms: a key may outlive its lease by up to about that long (SQLite: never).
- Batches (`batch()`): writes made inside are buffered in the calling thread and sent at the
  end as ONE etcd transaction: all or nothing, one revision. Reads inside see the batch's own
  writes over a snapshot of the server taken at the batch's first read. Every point read,
  `create` and `delete` decided inside the batch adds a guard `mod_revision(key) == seen`; a
  listing adds `mod_revision < snapshot + 1` over its range (which catches keys created or
  changed in it since, not keys deleted from it). If another writer changed a guarded key first,
  the transaction is not applied and the batch raises KVStoreError naming the keys: nothing of
  it was written, and the caller may run it again. Writes to one key coalesce to the last one
  (etcd refuses a txn that writes a key twice), so watchers see one event per key per batch.
  etcd refuses a txn of more than `--max-txn-ops` (default 128) operations or compares: this
  store refuses such a batch at the write or read that crosses `max_txn_ops`, and at its end,
  with a KVStoreError and nothing written — it does not split a batch, because a split batch is
  not all-or-nothing: an exception or a refused chunk would leave earlier chunks applied, which
  is exactly what a caller of `batch()` rules out. Bulk writes that need no atomicity (the
  cluster mesh publishing thousands of entries before its sync canary) use `put_many`, which
  says what it does: one transaction per `max_txn_ops` keys. Inside a batch, `put` returns 0
  (the revision is known only when the batch commits), lease calls are not part of the batch
  (they act at once), and other threads neither wait for the batch nor see its writes until
  it commits.
- Watches: one gRPC stream per `watch_prefix`, with `hasleader` metadata (a member that loses
  its quorum ends the stream instead of going silent). `watch_prefix` returns once etcd has
  created the watch; a start revision already compacted raises KVStoreError there, naming
  etcd's `compact_revision`. etcd starts a replay at its next sync tick (<= 100 ms) and sends
  up to 1,000 revisions of events in one response: 50k small keys written 128 per txn is ~6 MB,
  over gRPC's default 4 MiB receive limit, so the limit is raised to `max_message_bytes`
  (64 MiB). A response larger still fails the stream with RESOURCE_EXHAUSTED; the watch then
  reopens itself once, from `resume_revision` (no gap, no duplicate), with etcd's `fragment`
  option, which splits responses at etcd's request limit (1.5 MiB by default). Fragments are
  not the default because etcd 3.4 makes them slow: a 50k-event replay took 2.9 s fragmented,
  0.18 s whole. A reader thread moves events into a bounded queue (`max_pending`; when it is
  full, the thread stops reading and gRPC's flow control holds etcd back).
- A watch never reconnects by itself. When the stream fails (etcd killed, restarted,
  partitioned, or frozen: HTTP/2 keepalive pings every `keepalive_time` seconds with a
  `keepalive_timeout` answer deadline end a stream to a frozen server after about their sum),
  `get` first hands out every event already received, then raises KVStoreError, again on every
  call until the watch is closed. The error says `resume_revision` (also a property): every
  event before it was delivered, so a new watch from there continues with no gap. Reconnecting
  is left to the caller on purpose: the cluster mesh must notice the break, mark its entries
  stale and resync (and a resync against a different etcd must not be mistaken for a resume).
- Every response carries etcd's cluster ID; the store remembers the first one it sees and fails
  every later response from another cluster (etcd wiped and recreated behind the same address):
  its revisions, leases and history mean nothing to this store. Make a new store and resync.

TLS: `ca_file` (or an https:// endpoint) turns TLS on; `cert_file` + `key_file` present a client
certificate, as Cilium's clustermesh does against an etcd run with `--client-cert-auth`. A
handshake the server refuses surfaces as a KVStoreError that says so.

Ownership and thread safety: an `EtcdKVStore` is thread-safe (the gRPC channel is; batches are
per thread). The caller owns it and must `close` it, which also closes its watches. An
`EtcdWatch` is thread-safe and owned by the caller of `watch_prefix`.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

from l7gate.kvstore.api import (Event, EventType, KVStoreError, check_int64, check_key, check_prefix,
                                check_value)

# etcd's own default --max-txn-ops.
DEFAULT_MAX_TXN_OPS = 128
_COMPACTED = "required revision has been compacted"
_FUTURE = "required revision is a future revision"
_LEASE_NOT_FOUND = "requested lease not found"
_PUT, _DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE


class _RPCFailed(KVStoreError):
    """A failed etcd RPC; `code` is the gRPC status name (UNAVAILABLE, OUT_OF_RANGE, ...)."""

    def __init__(self, message: str, code: str, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _int64(value: object, what: str, *, optional: bool = False) -> int:
    """A lease id or revision as etcd's int64 (None → 0 when `optional`); KVStoreError otherwise."""
    if value is None and optional:
        return 0
    return check_int64(value, what)


def _key_bytes(key: str) -> bytes:
    return check_key(key).encode("utf-8")


def _key_str(raw: bytes) -> str:
    # Keys written by other clients need not be UTF-8; keep their bytes rather than fail a listing.
    return raw.decode("utf-8", errors="surrogateescape")


def _range_of(prefix: str) -> tuple[bytes, bytes]:
    """etcd's (key, range_end) for every key starting with `prefix`; ("\\0", "\\0") is all keys."""
    if not prefix:
        return b"\x00", b"\x00"
    start = prefix.encode("utf-8")
    end = bytearray(start)
    while end and end[-1] == 0xFF:  # never in UTF-8, but be exact
        end.pop()
    if not end:
        return start, b"\x00"
    end[-1] += 1
    return start, bytes(end)


def _split_endpoint(endpoint: str) -> tuple[str, bool | None]:
    """("host:port", TLS wanted by the scheme: True for https, False for http, None if bare)."""
    for scheme, tls in (("https://", True), ("http://", False)):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme):].rstrip("/"), tls
    return endpoint, None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise KVStoreError(f"etcd TLS {what} {path}: {e.strerror or e}") from e


@dataclass(slots=True)
class _Batch:
    """The calling thread's open batch: final write per key, and the reads it depends on."""

    depth: int = 0
    writes: dict[bytes, tuple[bytes, int] | None] = field(default_factory=dict)  # None = delete
    guards: dict[bytes, int] = field(default_factory=dict)  # key → mod_revision seen (0: absent)
    range_guards: list[tuple[bytes, bytes]] = field(default_factory=list)
    snapshot: int = 0  # revision the batch reads at (0 until its first read)
    refused: KVStoreError | None = None


class EtcdKVStore:
    """A `KVStore` on an etcd v3 server (module doc). Thread-safe; the caller owns it and must
    `close` it."""

    def __init__(
        self,
        endpoint: str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        timeout: float = 10.0,
        keepalive_time: float = 5.0,
        keepalive_timeout: float = 2.0,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        max_message_bytes: int = 64 * 2**20,
        page_size: int = 2000,
        max_pending: int = 100_000,
    ) -> None:
        target, scheme_tls = _split_endpoint(endpoint)
        if not target:
            raise KVStoreError(f"etcd endpoint {endpoint!r}: expected [http[s]://]host:port")
        if max_txn_ops < 1 or page_size < 1 or max_pending < 1 or timeout <= 0:
            raise KVStoreError("max_txn_ops, page_size, max_pending and timeout must be positive")
        if (cert_file is None) != (key_file is None):
            raise KVStoreError("etcd TLS: cert_file and key_file go together (a client certificate and its key)")
        tls = scheme_tls if scheme_tls is not None else ca_file is not None or cert_file is not None
        if scheme_tls is False and (ca_file or cert_file):
            raise KVStoreError(f"etcd endpoint {endpoint!r} is http://, but TLS files were given: use https://")
        self.endpoint = f"{'https' if tls else 'http'}://{target}"
        self._tls = tls
        self._ca_file, self._cert_file = ca_file, cert_file
        self._timeout = timeout
        self._max_txn_ops = max_txn_ops
        self._page_size = page_size
        self._max_pending = max_pending
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A frozen or partitioned server: pings unanswered within keepalive_timeout end every
            # call and stream on the connection. etcd refuses pings more often than every 5 s
            # (--grpc-keepalive-min-time) unless it is told otherwise.
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            # Newer gRPC cores time out an unanswered ping with this one, not the one above.
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Back within about a second of etcd's return, not gRPC's default of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_file, "CA file") if ca_file else None,
                private_key=_read(key_file, "key file") if key_file else None,
                certificate_chain=_read(cert_file, "certificate file") if cert_file else None,
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._kv = rpc_pb2_grpc.KVStub(self._channel)
        self._lease = rpc_pb2_grpc.LeaseStub(self._channel)
        self._watch = rpc_pb2_grpc.WatchStub(self._channel)
        self._lock = threading.Lock()
        self._watches: set[EtcdWatch] = set()
        self._local = threading.local()
        self._cluster_id: int | None = None
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def cluster_id(self) -> int | None:
        """etcd's cluster ID as first seen by this store (None before any answer)."""
        return self._cluster_id

    def _check_open(self) -> None:
        if self._closed:
            raise KVStoreError(f"etcd {self.endpoint}: kvstore is closed")

    def _seen(self, header: Any) -> None:
        """Every answer's header: the cluster must stay the one this store first talked to."""
        cluster = int(header.cluster_id)
        if self._cluster_id is None:
            with self._lock:
                if self._cluster_id is None:
                    self._cluster_id = cluster
        if cluster != self._cluster_id:
            raise KVStoreError(
                f"etcd {self.endpoint} now answers as cluster {cluster:x}, not {self._cluster_id:x}: "
                "etcd was replaced (wiped or another cluster behind the address); this store's "
                "revisions and leases mean nothing there: make a new store and resync")

    def _failure(self, what: str, exc: grpc.RpcError) -> _RPCFailed:
        code_obj = exc.code() if hasattr(exc, "code") else None
        code = getattr(code_obj, "name", "UNKNOWN")
        details = str(exc.details() if hasattr(exc, "details") else exc) or ""
        if _LEASE_NOT_FOUND in details:
            return _RPCFailed(f"{what}: lease not found (expired or revoked)", code, details)
        msg = f"etcd {self.endpoint}: {what}: {code}: {details}"
        low = details.lower()
        if code == "UNAVAILABLE" and self._tls and any(w in low for w in ("unwrap", "data_corrupted", "alert")):
            # The server ended the handshake after seeing our certificate (or its absence).
            msg += ("; the TLS handshake with etcd failed: etcd refused this client; it requires a client "
                    "certificate signed by a CA it trusts: " + (
                        f"check {self._cert_file}" if self._cert_file else
                        "none was given (set cert_file and key_file)"))
        elif code == "UNAVAILABLE" and self._tls and any(
                w in low for w in ("ssl", "tls", "tsi", "handshake", "certificate")):
            msg += ("; the TLS handshake with etcd failed: etcd's server certificate was not accepted "
                    f"(check ca_file {self._ca_file or '(system roots)'} and the server name)")
        elif code == "UNAVAILABLE":
            msg += "; etcd is unreachable"
        elif code == "DEADLINE_EXCEEDED":
            msg += f"; no answer within {self._timeout} s"
        return _RPCFailed(msg, code, details)

    def _call(self, what: str, method: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
        self._check_open()
        try:
            response = method(request, timeout=self._timeout, **kwargs)
        except grpc.RpcError as e:
            raise self._failure(what, e) from None
        except ValueError as e:  # grpc: "Cannot invoke RPC on closed channel!"
            raise KVStoreError(f"etcd {self.endpoint}: {what}: {e}") from None
        self._seen(response.header)
        return response

    def _batch(self) -> _Batch | None:
        batch: _Batch | None = getattr(self._local, "batch", None)
        return batch if batch is not None and batch.depth else None

    def _refuse(self, batch: _Batch, message: str) -> KVStoreError:
        batch.refused = KVStoreError(message)
        return batch.refused

    # -- reads ----------------------------------------------------------------------------------

    def _range_page(self, start: bytes, end: bytes, revision: int, limit: int) -> Any:
        """One page; a page too large for the receive limit is asked for again in halves."""
        while True:
            try:
                return self._call(f"list {_key_str(start)!r}", self._kv.Range, rpc_pb2.RangeRequest(
                    key=start, range_end=end, limit=limit, revision=revision))
            except _RPCFailed as e:
                if e.code != "RESOURCE_EXHAUSTED" or limit == 1:
                    raise
                limit = max(1, limit // 2)

    def _range_all(self, start: bytes, end: bytes, revision: int = 0) -> tuple[list[tuple[str, bytes]], int]:
        """Every key in [start, end) at `revision` (0: now), paged, and the revision read."""
        for attempt in range(3):
            rev, key = revision, start
            items: list[tuple[str, bytes]] = []
            try:
                while True:
                    resp = self._range_page(key, end, rev, self._page_size)
                    if rev == 0:
                        rev = int(resp.header.revision)
                    items.extend((_key_str(kv.key), bytes(kv.value)) for kv in resp.kvs)
                    if not resp.more or not resp.kvs:
                        return items, rev
                    key = bytes(resp.kvs[-1].key) + b"\x00"
            except _RPCFailed as e:
                if _COMPACTED not in e.details or revision or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _get_kv(self, key: bytes, revision: int = 0) -> tuple[Any | None, int]:
        resp = self._call(f"get {_key_str(key)!r}", self._kv.Range, rpc_pb2.RangeRequest(key=key, revision=revision))
        return (resp.kvs[0] if resp.kvs else None), int(resp.header.revision)

    def _batch_read(self, batch: _Batch, key: bytes) -> bytes | None:
        """`key` as the batch sees it: its own write, else the snapshot (and guard it)."""
        if key in batch.writes:
            write = batch.writes[key]
            return None if write is None else write[0]
        kv, rev = self._get_kv(key, batch.snapshot)
        if not batch.snapshot:
            batch.snapshot = rev
        if key not in batch.guards:
            if len(batch.guards) + len(batch.range_guards) >= self._max_txn_ops:
                raise self._refuse(batch, self._too_many("reads it depends on"))
            batch.guards[key] = 0 if kv is None else int(kv.mod_revision)
        return None if kv is None else bytes(kv.value)

    def get(self, key: str) -> bytes | None:
        raw = _key_bytes(key)
        batch = self._batch()
        if batch is not None:
            return self._batch_read(batch, raw)
        kv, _ = self._get_kv(raw)
        return None if kv is None else bytes(kv.value)

    def list_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        return self.list_prefix_with_revision(prefix)[0]

    def list_prefix_with_revision(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        start, end = _range_of(check_prefix(prefix))
        batch = self._batch()
        if batch is None:
            return self._range_all(start, end)
        items, rev = self._range_all(start, end, batch.snapshot)
        if not batch.snapshot:
            batch.snapshot = rev
        if len(batch.guards) + len(batch.range_guards) >= self._max_txn_ops:
            raise self._refuse(batch, self._too_many("reads it depends on"))
        batch.range_guards.append((start, end))
        merged = dict(items)
        for key, write in batch.writes.items():
            if key >= start and (end == b"\x00" or key < end):
                if write is None:
                    merged.pop(_key_str(key), None)
                else:
                    merged[_key_str(key)] = write[0]
        return sorted(merged.items(), key=lambda kv: kv[0].encode("utf-8", "surrogateescape")), rev

    @property
    def revision(self) -> int:
        """etcd's current revision: 1 for a new etcd, whose first write is 2."""
        resp = self._call("revision", self._kv.Range, rpc_pb2.RangeRequest(key=b"\x00", count_only=True))
        return int(resp.header.revision)

    # -- writes ---------------------------------------------------------------------------------

    def _too_many(self, what: str) -> str:
        return (f"etcd {self.endpoint}: batch refused: more than {self._max_txn_ops} {what} "
                f"(etcd's --max-txn-ops; one batch is one atomic transaction and is never split); "
                "nothing of this batch is written. Use put_many() for bulk writes that need not be "
                "atomic, or smaller batches")

    def _batch_write(self, batch: _Batch, key: bytes, value: tuple[bytes, int] | None) -> None:
        if key not in batch.writes and len(batch.writes) >= self._max_txn_ops:
            raise self._refuse(batch, self._too_many("writes"))
        batch.writes.pop(key, None)  # keep the order of the last write
        batch.writes[key] = value

    def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Set `key`; its revision (0 inside a batch: known only when the batch commits)."""
        raw, data, lease_id = _key_bytes(key), check_value(value), _int64(lease, "lease", optional=True)
        batch = self._batch()
        if batch is not None:
            self._batch_write(batch, raw, (data, lease_id))
            return 0
        what = f"put {key!r}" + (f" with lease {lease_id}" if lease_id else "")
        resp = self._call(what, self._kv.Put, rpc_pb2.PutRequest(key=raw, value=data, lease=lease_id))
        return int(resp.header.revision)

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        raw, data, lease_id = _key_bytes(key), check_value(value), _int64(lease, "lease", optional=True)
        batch = self._batch()
        if batch is not None:
            if self._batch_read(batch, raw) is not None:
                return False
            self._batch_write(batch, raw, (data, lease_id))
            return True
        resp = self._call(f"create {key!r}", self._kv.Txn, rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=raw, target=rpc_pb2.Compare.CREATE,
                                     result=rpc_pb2.Compare.EQUAL, create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=raw, value=data, lease=lease_id))],
        ))
        return bool(resp.succeeded)

    def delete(self, key: str, *, prev_value: bytes | None = None) -> bool:
        raw = _key_bytes(key)
        expected = None if prev_value is None else check_value(prev_value)
        batch = self._batch()
        if batch is not None:
            current = self._batch_read(batch, raw)
            if current is None or (expected is not None and current != expected):
                return False
            self._batch_write(batch, raw, None)
            return True
        op = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=raw))
        if expected is None:
            resp = self._call(f"delete {key!r}", self._kv.DeleteRange, rpc_pb2.DeleteRangeRequest(key=raw))
            return int(resp.deleted) > 0
        resp = self._call(f"delete {key!r}", self._kv.Txn, rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=raw, target=rpc_pb2.Compare.VALUE,
                                     result=rpc_pb2.Compare.EQUAL, value=expected)],
            success=[op],
        ))
        return bool(resp.succeeded) and int(resp.responses[0].response_delete_range.deleted) > 0

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One atomic etcd transaction for the writes made inside, in this thread (module doc:
        guards, coalescing, the `max_txn_ops` refusal). Nested batches join the outer one. An
        exception inside discards every write; a refused or conflicting commit raises
        KVStoreError and writes nothing."""
        self._check_open()
        batch = getattr(self._local, "batch", None)
        if batch is None or not batch.depth:
            batch = self._local.batch = _Batch()
        batch.depth += 1
        try:
            yield
        except BaseException:
            batch.depth -= 1
            if not batch.depth:
                self._local.batch = None
            raise
        batch.depth -= 1
        if batch.depth:
            return
        self._local.batch = None
        if batch.refused is not None:
            raise KVStoreError(str(batch.refused))
        self._commit(batch)

    def _commit(self, batch: _Batch) -> None:
        if not batch.writes:
            return  # reads only: nothing to apply
        compares = [rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                                    mod_revision=rev) for k, rev in batch.guards.items()]
        compares += [rpc_pb2.Compare(key=s, range_end=e, target=rpc_pb2.Compare.MOD,
                                     result=rpc_pb2.Compare.LESS, mod_revision=batch.snapshot + 1)
                     for s, e in batch.range_guards]
        success = [
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=k)) if w is None
            else rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=w[0], lease=w[1]))
            for k, w in batch.writes.items()
        ]
        # On a conflict, the same txn reads the guarded keys back, to name those that changed.
        failure = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k, keys_only=True))
                   for k in batch.guards]
        resp = self._call(f"batch of {len(success)} writes", self._kv.Txn,
                          rpc_pb2.TxnRequest(compare=compares, success=success, failure=failure))
        if resp.succeeded:
            return
        changed = []
        for (key, seen), op in zip(batch.guards.items(), resp.responses):
            kvs = op.response_range.kvs
            if (int(kvs[0].mod_revision) if kvs else 0) != seen:
                changed.append(_key_str(key))
        if not changed and batch.range_guards:
            changed.append(f"a key under {', '.join(repr(_key_str(s)) for s, _ in batch.range_guards)}")
        raise KVStoreError(
            f"etcd {self.endpoint}: batch not written: {', '.join(changed) or 'a key it read'} changed "
            f"after the batch read it (revision {batch.snapshot}); nothing of the batch was applied")

    def put_many(self, items: Iterable[tuple[str, bytes]], lease: int | None = None) -> int:
        """Put many keys, NOT atomically: one transaction per `max_txn_ops` keys, in order.
        Returns the revision of the last. If a transaction fails, those before it stay written
        and the KVStoreError says how many keys were. For bulk publication whose completeness is
        signalled otherwise (a sync canary written after it), not for all-or-nothing writes."""
        if self._batch() is not None:
            raise KVStoreError("put_many is not atomic and cannot be part of a batch")
        written, rev = 0, 0
        chunk: list[Any] = []
        lease_id = _int64(lease, "lease", optional=True)

        def flush() -> None:
            nonlocal written, rev, chunk
            try:
                resp = self._call(f"put_many ({len(chunk)} keys)", self._kv.Txn, rpc_pb2.TxnRequest(success=chunk))
            except KVStoreError as e:
                raise KVStoreError(f"{e} (put_many: the first {written} keys were written)") from None
            written += len(chunk)
            rev = int(resp.header.revision)
            chunk = []

        seen: set[bytes] = set()
        for key, value in items:
            raw, data = _key_bytes(key), check_value(value)
            if raw in seen:  # etcd refuses a txn that writes one key twice
                flush()
                seen.clear()
            seen.add(raw)
            chunk.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=raw, value=data, lease=lease_id)))
            if len(chunk) >= self._max_txn_ops:
                flush()
                seen.clear()
        if chunk:
            flush()
        return rev

    # -- leases ---------------------------------------------------------------------------------

    def grant_lease(self, ttl_seconds: float) -> int:
        """A new lease of `ceil(ttl_seconds)` whole seconds (etcd raises it to its minimum, 2 s
        by default)."""
        if not (isinstance(ttl_seconds, (int, float)) and ttl_seconds > 0 and math.isfinite(ttl_seconds)):
            raise KVStoreError(f"lease TTL must be positive, got {ttl_seconds!r}")
        resp = self._call("grant lease", self._lease.LeaseGrant,
                          rpc_pb2.LeaseGrantRequest(TTL=math.ceil(ttl_seconds)))
        if resp.error:
            raise KVStoreError(f"etcd {self.endpoint}: grant lease: {resp.error}")
        return int(resp.ID)

    def keepalive(self, lease: int) -> float:
        """Restart the lease's TTL; the TTL etcd granted, in seconds."""
        lease = _int64(lease, "lease")
        self._check_open()
        try:
            stream = self._lease.LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease)]),
                                                timeout=self._timeout)
            try:
                resp = next(stream)
            finally:
                stream.cancel()
        except grpc.RpcError as e:
            raise self._failure(f"keepalive lease {lease}", e) from None
        except StopIteration:
            raise KVStoreError(f"etcd {self.endpoint}: keepalive lease {lease}: no answer") from None
        except ValueError as e:
            raise KVStoreError(f"etcd {self.endpoint}: keepalive lease {lease}: {e}") from None
        self._seen(resp.header)
        if int(resp.TTL) <= 0:
            raise KVStoreError(f"keepalive lease {lease}: lease not found (expired or revoked)")
        return float(resp.TTL)

    def revoke(self, lease: int) -> None:
        lease = _int64(lease, "lease")
        self._call(f"revoke lease {lease}", self._lease.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=lease))

    # -- watches --------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> EtcdWatch:
        """Events under `prefix`; from `start_revision` (replayed, then live) or from now.
        Returns once etcd has created the watch. KVStoreError if it cannot, or if
        `start_revision` is compacted (naming etcd's compact revision)."""
        start, end = _range_of(check_prefix(prefix))
        self._check_open()
        if start_revision is not None:
            start_revision = max(_int64(start_revision, "start_revision"), 1)  # etcd's 0 means "now"
        watch = EtcdWatch(self, prefix, start, end, start_revision)
        with self._lock:
            self._watches.add(watch)
        try:
            created_at = watch._wait_created(self._timeout)
            if start_revision is not None and start_revision <= created_at:
                self._check_not_compacted(watch, start, start_revision)
        except BaseException:
            watch.close()
            raise
        return watch

    def _check_not_compacted(self, watch: EtcdWatch, key: bytes, revision: int) -> None:
        """etcd reports a compacted start revision asynchronously (its next sync, <= 100 ms):
        a range at that revision tells at once, then the watch's cancellation says up to where."""
        try:
            self._call(f"watch {watch.prefix!r} from revision {revision}", self._kv.Range,
                       rpc_pb2.RangeRequest(key=key, revision=revision, count_only=True))
            return
        except _RPCFailed as e:
            if _COMPACTED not in e.details:
                if _FUTURE in e.details:
                    return
                raise
        error = watch._wait_error(self._timeout)
        if error is not None:
            raise KVStoreError(str(error))
        raise KVStoreError(f"watch {watch.prefix!r} from revision {revision}: etcd history compacted past it")

    def _forget(self, watch: EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(watch)

    # -- backend-specific -----------------------------------------------------------------------

    def compact(self, revision: int) -> None:
        """etcd's compaction: history before `revision` is dropped (a watch may still start at
        `revision`; SQLite's `compact` also drops `revision` itself). Waits until it is done."""
        revision = _int64(revision, "revision")
        self._call(f"compact to {revision}", self._kv.Compact,
                   rpc_pb2.CompactionRequest(revision=revision, physical=True))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
            self._watches.clear()
        for watch in watches:
            watch.close()
        self._channel.close()

    def __enter__(self) -> EtcdKVStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EtcdWatch:
    """A `Watch` on one etcd watch stream (module doc: the receive limit and fragments, the
    bounded queue, failure and `resume_revision`). Thread-safe; the caller of `watch_prefix`
    owns it."""

    def __init__(self, store: EtcdKVStore, prefix: str, start: bytes, end: bytes,
                 start_revision: int | None) -> None:
        self._store = store
        self.prefix = prefix
        self._cond = threading.Condition()
        self._queue: collections.deque[Event] = collections.deque()
        self._error: KVStoreError | None = None
        self._closed = False
        self._created: int | None = None  # the revision etcd created the watch at
        self._resume = start_revision or 0
        self._range = (start, end)
        self._fragment = False
        self._stop = threading.Event()
        self._call = self._open()
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {prefix!r}", daemon=True)
        self._thread.start()

    def _open(self) -> Any:
        """A new stream from `_resume` (0: from now); the previous one's request side ends."""
        self._stop.set()
        stop = self._stop = threading.Event()
        create = rpc_pb2.WatchCreateRequest(key=self._range[0], range_end=self._range[1],
                                            start_revision=self._resume, fragment=self._fragment)

        def requests() -> Iterator[Any]:
            yield rpc_pb2.WatchRequest(create_request=create)
            stop.wait()  # the request side stays open until the stream is closed or replaced

        try:
            return self._store._watch.Watch(requests(), metadata=(("hasleader", "true"),))
        except ValueError as e:
            raise KVStoreError(f"etcd {self._store.endpoint}: watch {self.prefix!r}: {e}") from None

    # -- the reader thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while self._stream():
            with self._cond:
                if self._closed:
                    return
                self._fragment = True
                try:
                    self._call = self._open()
                except KVStoreError as e:
                    self._error = self._error or KVStoreError(self._lost(str(e)))
                    self._cond.notify_all()
                    return

    def _stream(self) -> bool:
        """Read the current stream until it ends; True to reopen it fragmented."""
        store = self._store
        try:
            for resp in self._call:
                store._seen(resp.header)
                if resp.created:
                    with self._cond:
                        self._created = int(resp.header.revision)
                        if not self._resume:
                            self._resume = self._created + 1
                        self._cond.notify_all()
                if resp.canceled:
                    self._fail(self._cancelled(resp))
                    return False
                if resp.events:
                    self._deliver(resp)
                if self._closed:
                    return False
            self._fail(KVStoreError(self._lost("etcd ended the watch stream")))
        except grpc.RpcError as e:
            if self._closed:
                return False
            failure = store._failure(f"watch {self.prefix!r}", e)
            if failure.code == "RESOURCE_EXHAUSTED" and not self._fragment and self._resume:
                return True  # a response over max_message_bytes: again, in fragments (module doc)
            self._fail(KVStoreError(self._lost(str(failure))))
        except KVStoreError as e:
            self._fail(KVStoreError(self._lost(str(e))))
        except Exception as e:  # a decoding surprise must end the watch loudly, not the thread silently
            self._fail(KVStoreError(self._lost(f"unexpected {type(e).__name__}: {e}")))
        return False

    def _deliver(self, resp: Any) -> None:
        events = [
            Event(EventType.PUT, _key_str(ev.kv.key), bytes(ev.kv.value), int(ev.kv.mod_revision))
            if ev.type == _PUT else
            Event(EventType.DELETE, _key_str(ev.kv.key), b"", int(ev.kv.mod_revision))
            for ev in resp.events
        ]
        with self._cond:
            while len(self._queue) >= self._store._max_pending and not self._closed:
                self._cond.wait()
            self._queue.extend(events)
            if not resp.fragment:  # the last piece of its revision(s): all of them are queued
                self._resume = events[-1].revision + 1
            self._cond.notify_all()

    def _cancelled(self, resp: Any) -> KVStoreError:
        if resp.compact_revision:
            return KVStoreError(
                f"watch {self.prefix!r} needs revision {self._resume}, but etcd {self._store.endpoint} "
                f"compacted its history up to revision {resp.compact_revision} (compact_revision): "
                "list again and watch from the listing's revision + 1")
        return KVStoreError(self._lost(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}"))

    def _lost(self, why: str) -> str:
        return (f"watch {self.prefix!r} on etcd {self._store.endpoint} lost: {why}; every event before "
                f"revision {self._resume} was delivered (resume_revision): watch again from there, "
                "or list again")

    def _fail(self, error: KVStoreError) -> None:
        with self._cond:
            if self._error is None and not self._closed:
                self._error = error
            self._cond.notify_all()

    def _wait_created(self, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._created is not None or self._error is not None, timeout)
            if self._created is not None:
                return self._created
            if self._error is not None:
                raise KVStoreError(str(self._error))
        raise KVStoreError(f"etcd {self._store.endpoint}: watch {self.prefix!r}: not created within {timeout} s")

    def _wait_error(self, timeout: float) -> KVStoreError | None:
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None, timeout)
            return self._error

    # -- Watch ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def resume_revision(self) -> int:
        """Every event before this revision has been received; a new watch from here misses
        nothing and repeats nothing."""
        return self._resume

    @property
    def error(self) -> KVStoreError | None:
        """Why the stream ended, once it has (then `get` raises it after the queued events)."""
        return self._error

    def get(self, timeout: float | None = None) -> Event | None:
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._closed or bool(self._queue) or self._error is not None, timeout)
            if self._closed or not ready:
                return None
            if self._queue:
                event = self._queue.popleft()
                self._cond.notify_all()  # the reader may be waiting for room
                return event
            assert self._error is not None
            raise KVStoreError(str(self._error))

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with self._cond:
            call = self._call
        self._stop.set()
        call.cancel()
        self._store._forget(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    def __enter__(self) -> EtcdWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
