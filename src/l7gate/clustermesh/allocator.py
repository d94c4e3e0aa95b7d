"""Identity allocation in a cluster's etcd, in Cilium's key layout, shared by that cluster's agents.

Theory of operation
-------------------
Cilium's kvstore allocator layout (pkg/kvstore/allocator), with L a label string
(`wire.encode_label_string`) and n a number in this cluster's range [N<<16, (N+1)<<16 - 1]:

    cilium/state/identities/v1/id/<n>              -> L      the number's owner ("master key")
    cilium/state/identities/v1/value/<L>/<node>    -> "<n>"  node <node> uses n for L, on the
                                                             node's lease ("slave key")
    cilium/state/identities/v1/locks/<L>           -> owner  held while a node allocates for L

To allocate L, a node first looks for a number others already use: the value keys under
`value/<L>/` (exactly L: what follows is one path segment, Cilium's prefixMatchesKey) name
numbers; the lowest n whose `id/n` holds L is the answer, and the node adds its own value key,
which is also its reference. Only if there is none does it take the lock of L (a `create` of
`locks/<L>` on its lease: etcd's put-if-absent), look again under the lock, and claim a new
number: the next candidate n with `create(id/n, L)`; losing that `create` means n belongs to
someone else, so it tries n+1 (after a few misses it lists the range and jumps to a free
number). Then it writes its value key and lets go of the lock (compare-and-delete).

Guarantees, the same as `identity.IdentityAllocator`'s:
- Every claim of a number is a `create`; `id/n` is deleted only by compare-and-delete of the
  labels it holds. So a number is never given to two label sets, whatever runs concurrently.
- Two nodes allocating for the same L at the same time get the same number: the lock makes one
  of them claim and the other find the claim. (Without the lock both would win a `create` of
  different numbers: the layout has no labels→number key to create, unlike l7gate's own.)
- A lock whose holder died goes with its lease; a lock without a lease, or older than
  `stale_lock` seconds, is broken by compare-and-delete.

References are the value keys themselves: the first `allocate` of L on this node writes
`value/<L>/<node>`, the last `release` deletes it. Numbers no value key references are
collected by `gc()`, which takes each label set's lock and looks again before it deletes, so it
never deletes a number an allocator is about to reference. Run it from one place, rarely.

When the node's lease is granted again (its keys expired during an outage), `rewrite` puts back
the value keys of every identity this allocator holds, and any `id/n` that was collected.

Reserved label sets give their reserved identity (never stored). CIDR label sets are node-local
identities: they go to the `local` allocator if one is given (an `identity.IdentityAllocator`
keeping them under l7gate's own prefix), else they are refused.

Thread safety: one allocator may be used from many threads; it serialises its own calls.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping

from l7gate.clock import Clock
from l7gate.clustermesh.lease import MeshLease
from l7gate.clustermesh.wire import (
    IDENTITY_ID_PREFIX,
    IDENTITY_VALUE_PREFIX,
    WireError,
    check_cluster_name,
    check_mesh_cluster_id,
    check_node_name,
    decode_identity_number,
    decode_label_string,
    encode_identity_number,
    encode_label_string,
    identity_id_key,
    identity_lock_key,
    identity_value_key,
    identity_value_prefix,
    parse_identity_id_key,
    parse_identity_value_key,
)
from l7gate.identity.allocator import (MAX_MISSES, IdentityAllocator, NumberCursor, as_labels, cidr_labels,
                                       is_cidr_labels)
from l7gate.identity.filter import is_node_labels
from l7gate.identity.numeric import (
    RESERVED,
    Identity,
    IdentityError,
    allocation_range,
    is_local,
    is_reserved,
    reserved_for_labels,
)
from l7gate.identity.ipcache import IPNetwork
from l7gate.kvstore.api import KVStore, KVStoreError
from l7gate.policy.labels import CLUSTER_KEY, Labels

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 100


class MeshIdentityAllocator:
    """Numeric identities for label sets, in cluster `cluster_id`'s range, in that cluster's
    etcd, in Cilium's layout (module doc). `node` is this node's suffix in value keys (Cilium
    uses the node's IP address; any name without '/' unique in the cluster will do). The store
    and the lease are not owned. Thread-safe."""

    def __init__(
        self,
        store: KVStore,
        *,
        cluster: str,
        cluster_id: int,
        node: str,
        lease: MeshLease | None = None,
        local: IdentityAllocator | None = None,
        lock_timeout: float = 10.0,
        stale_lock: float = 30.0,
        clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cluster = check_cluster_name(cluster)
        try:
            self.cluster_id = check_mesh_cluster_id(cluster_id)
            self.node = check_node_name(node)
        except WireError as e:
            raise IdentityError(str(e)) from None
        self._store = store
        self._lease = lease
        self._local = local
        self._range = allocation_range(cluster_id)
        self._lock_timeout = lock_timeout
        self._stale_lock = stale_lock
        self._clock = clock
        self._sleep = sleep
        self._owner = f"{node}:{uuid.uuid4().hex[:8]}"
        self._mutex = threading.RLock()
        self._held: dict[int, int] = {}  # number -> references on this node
        self._text: dict[int, str] = {}  # number -> label string
        self._by_text: dict[str, int] = {}
        self._candidates = NumberCursor(self._range)
        if lease is not None:
            lease.subscribe(self.rewrite)

    # -- allocation -------------------------------------------------------------------------------

    def allocate(self, labels: Labels | Mapping[str, str]) -> Identity:
        """The identity for `labels`, allocating a number if no node of the cluster has one,
        and one more reference to it from this node. Synchronous: KVStoreError if the store
        cannot be reached (the identity is not held then: call again); IdentityError for
        labels that cannot have a cluster identity."""
        labels = as_labels(labels)
        if not labels:
            raise IdentityError("cannot allocate an identity for an empty label set")
        found = reserved_for_labels(labels)
        if found is not None:
            return found
        if is_cidr_labels(labels) or is_node_labels(labels):
            if self._local is None:
                raise IdentityError(f"node-local labels {labels} (a CIDR's, another node's) need a node-local allocator")
            return self._local.allocate(labels)
        if labels.is_reserved():
            raise IdentityError(f"labels {labels} hold a reserved label but are not reserved")
        if labels.get(CLUSTER_KEY) != self.cluster:
            # Every remote reader refuses an identity whose cluster label names another cluster.
            raise IdentityError(f"labels {labels} must carry {CLUSTER_KEY}={self.cluster}")
        try:
            text = encode_label_string(labels)
        except WireError as e:
            raise IdentityError(f"labels {labels} cannot be stored: {e}") from None
        for attempt in (1, 2):
            stale = self._lease.current if self._lease is not None else None
            try:
                with self._mutex:
                    number = self._by_text.get(text)
                    if number is None:
                        number = self._acquire(text)
                        self._by_text[text] = number
                        self._text[number] = text
                    self._held[number] = self._held.get(number, 0) + 1
                return Identity(number, labels)
            except KVStoreError as e:
                # The node's lease is gone (etcd was down longer than its TTL, or replaced) and
                # the keepalive has not noticed yet: grant a new one now and try once more.
                if attempt == 2 or self._lease is None or stale is None or "lease not found" not in str(e):
                    raise
                self._lease.replace(stale)
        raise AssertionError("unreachable")

    def release(self, identity: Identity | int) -> bool:
        """Drop one reference; True when it was this node's last (its value key is deleted: the
        number becomes collectable once no node references it)."""
        number = identity.id if isinstance(identity, Identity) else identity
        if is_reserved(number):
            return False
        if is_local(number):
            if self._local is None:
                raise IdentityError(f"identity {number} is node-local and there is no local allocator")
            return self._local.release(number)
        with self._mutex:
            count = self._held.get(number, 0)
            if count == 0:
                raise IdentityError(f"identity {number} is not held by this allocator")
            if count > 1:
                self._held[number] = count - 1
                return False
            del self._held[number]
            text = self._text.pop(number)
            del self._by_text[text]
            self._store.delete(identity_value_key(text, self.node))
            return True

    def _lease_id(self) -> int | None:
        return self._lease.id if self._lease is not None else None

    def _acquire(self, text: str) -> int:
        data = text.encode()
        for _ in range(_MAX_ATTEMPTS):
            number = self._find(text, heal=False)
            if number is not None:
                self._store.put(identity_value_key(text, self.node), encode_identity_number(number),
                                lease=self._lease_id())
                if self._store.get(identity_id_key(number)) == data:
                    return number
                # collected between finding and referencing it: do it under the lock
                self._store.delete(identity_value_key(text, self.node))
            token = self._take_lock(text)
            try:
                number = self._find(text, heal=True)
                if number is None:
                    number = self._claim(text)
                self._store.put(identity_value_key(text, self.node), encode_identity_number(number),
                                lease=self._lease_id())
                return number
            finally:
                self._store.delete(identity_lock_key(text), prev_value=token)
        raise IdentityError(f"could not allocate an identity for {text}: too much contention")

    def _find(self, text: str, *, heal: bool) -> int | None:
        """The lowest number another node references for exactly `text` whose id key holds it.
        With `heal` (under the lock), an id key that was collected is created again."""
        prefix = identity_value_prefix(text)
        numbers: set[int] = set()
        for key, value in self._store.list_prefix(prefix):
            rest = key[len(prefix):]
            if not rest or "/" in rest:
                continue  # a longer label string's key, or not a node's
            try:
                number = decode_identity_number(value)
            except WireError:
                continue
            if number in self._range:
                numbers.add(number)
        data = text.encode()
        for number in sorted(numbers):
            held = self._store.get(identity_id_key(number))
            if held == data:
                return number
            if held is None and heal and self._store.create(identity_id_key(number), data):
                log.warning("identity %d of %s: id key was missing, created it again", number, text)
                return number
        return None

    def _claim(self, text: str) -> int:
        data = text.encode()
        for _ in range(self._range.stop - self._range.start + MAX_MISSES):
            number = self._candidates.next(self._numbers)
            claimed = self._store.create(identity_id_key(number), data)
            self._candidates.claimed(claimed)
            if claimed:
                return number
        raise IdentityError(f"identity range {self._range.start}..{self._range.stop - 1} is exhausted")

    def _numbers(self) -> list[int]:
        out = []
        for key, _ in self._store.list_prefix(IDENTITY_ID_PREFIX):
            try:
                number = parse_identity_id_key(key)
            except WireError:
                continue
            if number in self._range:
                out.append(number)
        return out

    # -- the allocation lock ----------------------------------------------------------------------

    def _take_lock(self, text: str, *, wait: bool = True) -> bytes:
        key = identity_lock_key(text)
        deadline = self._clock() + self._lock_timeout
        delay = 0.002
        while True:
            token = f"{self._owner}@{self._clock():.3f}".encode()
            if self._store.create(key, token, lease=self._lease_id()):
                return token
            held = self._store.get(key)
            if held is not None and self._is_stale(held):
                log.warning("identity lock %s held by %r is stale: breaking it", key, held)
                self._store.delete(key, prev_value=held)
                continue
            if not wait or self._clock() >= deadline:
                raise IdentityError(f"identity lock {key} is held by {held!r}")
            self._sleep(delay)
            delay = min(delay * 2, 0.05)

    def _is_stale(self, token: bytes) -> bool:
        _, at, stamp = token.decode(errors="replace").rpartition("@")
        try:
            return bool(at) and self._clock() - float(stamp) > self._stale_lock
        except ValueError:
            return False

    # -- lease renewal ----------------------------------------------------------------------------

    def rewrite(self, lease: int | None = None) -> None:
        """Write again the value key of every identity this node holds (and its id key if it
        was collected): after the node's lease was granted again, its keys are gone."""
        lease = lease if lease is not None else self._lease_id()
        with self._mutex:
            held = dict(self._text)
        for number, text in sorted(held.items()):
            data = text.encode()
            if not self._store.create(identity_id_key(number), data):
                if self._store.get(identity_id_key(number)) != data:
                    log.error("identity %d of %s now belongs to other labels: this node's "
                              "endpoints with it must be given a new identity", number, text)
                    continue
            self._store.put(identity_value_key(text, self.node), encode_identity_number(number), lease=lease)

    # -- garbage collection -----------------------------------------------------------------------

    def gc(self) -> list[int]:
        """Delete the id keys of this cluster's numbers no node references (Cilium's operator
        GC, here with the label set's lock held while it looks again). Returns them, sorted."""
        referenced: set[str] = set()
        for key, _ in self._store.list_prefix(IDENTITY_VALUE_PREFIX):
            try:
                referenced.add(parse_identity_value_key(key)[0])
            except WireError:
                continue
        removed = []
        for key, data in self._store.list_prefix(IDENTITY_ID_PREFIX):
            try:
                number = parse_identity_id_key(key)
            except WireError:
                continue
            text = data.decode(errors="replace")
            if number not in self._range or text in referenced:
                continue
            with self._mutex:
                if number in self._held:
                    continue
                try:
                    token = self._take_lock(text, wait=False)
                except IdentityError:
                    continue  # someone allocates it right now
                try:
                    if self._find_any(text):
                        continue
                    if self._store.delete(key, prev_value=data):
                        removed.append(number)
                finally:
                    self._store.delete(identity_lock_key(text), prev_value=token)
        return sorted(removed)

    def _find_any(self, text: str) -> bool:
        prefix = identity_value_prefix(text)
        return any("/" not in k[len(prefix):] for k, _ in self._store.list_prefix(prefix))

    # -- lookups ------------------------------------------------------------------------------------

    def held(self) -> dict[int, int]:
        """References this node holds per number (a copy; local identities included)."""
        with self._mutex:
            out = dict(self._held)
        if self._local is not None:
            out.update({n: c for n, c in self._local.held().items() if is_local(n)})
        return out

    def lookup_by_id(self, number: int) -> Identity | None:
        if number in RESERVED:
            return RESERVED[number]
        if is_local(number):
            return self._local.lookup_by_id(number) if self._local is not None else None
        data = self._store.get(identity_id_key(number))
        if data is None:
            return None
        try:
            return Identity(number, decode_label_string(data.decode()))
        except (WireError, UnicodeDecodeError) as e:
            raise IdentityError(f"identity {number}: corrupt labels in the store: {e}") from None

    def lookup_by_labels(self, labels: Labels | Mapping[str, str]) -> Identity | None:
        """The identity some node of the cluster uses for `labels`, without referencing it."""
        labels = as_labels(labels)
        found = reserved_for_labels(labels)
        if found is not None:
            return found
        if is_cidr_labels(labels) or is_node_labels(labels):
            return self._local.lookup_by_labels(labels) if self._local is not None else None
        try:
            text = encode_label_string(labels)
        except WireError:
            return None
        number = self._find(text, heal=False)
        return Identity(number, labels) if number is not None else None

    def allocate_cidr(self, prefix: str | IPNetwork) -> Identity:
        return self.allocate(cidr_labels(prefix))

