"""Publishing one agent's share of its cluster's state into the cluster's etcd, in Cilium's layout.

Theory of operation
-------------------
Each agent has one `MeshPublisher`. It writes, under Cilium's keys (`wire`):

- `cilium/cluster-config/<cluster>`: `{"id":N,"capabilities":{"syncedCanaries":true,...}}`,
  checked at `start`: a store whose config names another cluster ID belongs to another cluster
  (or this agent is misconfigured), and the publisher refuses to write into it.
- `cilium/state/nodes/v1/<cluster>/<node>`: this node (`set_node`).
- `cilium/state/ip/v1/default/<ip>`: this node's endpoints (`upsert_endpoint`,
  `delete_endpoint`), each an IPIdentityPair with identity, node IP, namespace and pod name.
- `cilium/state/services/v1/<cluster>/<ns>/<name>`: the cluster's global, shared Services
  (`upsert_service`, `delete_service`), each a ClusterService with the cluster's ready backends.
- `cilium/synced/<cluster>/<path>`: a path's sync canary (`synced`), written only once every
  upsert of that path queued before the call has succeeded.
Identities are written by the allocator (`allocator.MeshIdentityAllocator`), synchronously:
call `synced(IDENTITIES_PATH)` once the node's initial identities are allocated.

Node, endpoint and service keys are on the node's lease (`lease.MeshLease`), so a dead agent's
entries expire. cluster-config and the canaries describe the cluster, not the node, and every agent of
the cluster writes the same ones: they carry no lease, so that one agent's death does not take
them from the others (Cilium's single clustermesh-apiserver puts them on its own lease).

Writes are asynchronous, as in Cilium's workqueue sync store: calls record the desired value
and queue the key; one worker thread writes queued keys in bulk (`put_many`: one etcd
transaction per 128 keys) and retries failures with bounded back-off, so an etcd outage never
blocks or fails the caller, and a key changed many times while etcd is away is written once.
When the lease had to be granted again (its keys expired), every desired key is queued again
and the canaries are written again after them.

Shared keys. A node's endpoints are its own, but a global service belongs to the cluster: every
agent of the cluster is told the same Services and pods, computes the same ClusterService (the
same bytes: `wire.encode_cluster_service` is deterministic) and publishes it. A put attaches
the key to the writer's lease, so the key lives on the lease of the agent that wrote it last,
and would vanish with that agent. So once it publishes a service, the publisher also watches
its cluster's service keys (`_guard`): a key it still wants that is deleted (the owning agent
died or stopped, or deleted it first) is written again on its own lease, at once; a listing
after each reconnect does the same for keys that went missing meanwhile. A value another agent
wrote is never overwritten just because it differs (two agents that disagree would fight over
the key); each agent writes when its own view changes, and the last change written wins. Cilium
has one writer per cluster instead (the clustermesh-apiserver, formerly the leader-elected
cilium-operator): docs/clustermesh.md, "Deviations".

Thread safety: every method may be called from any thread. The caller owns the publisher and
must `close` it; the store and a lease passed in are not owned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from l7gate.clock import Clock
from l7gate.clustermesh.lease import MeshLease
from l7gate.clustermesh.types import MeshError
from l7gate.clustermesh.wire import (
    IP_PATH,
    IP_PREFIX,
    NODES_PATH,
    SERVICES_PATH,
    SYNCED_PATHS,
    ClusterConfig,
    ClusterService,
    IPIdentityPair,
    NodeRecord,
    WireError,
    check_cluster_name,
    check_mesh_cluster_id,
    check_node_name,
    cluster_config_key,
    decode_cluster_config,
    encode_cluster_config,
    encode_cluster_service,
    encode_ip_identity,
    encode_node,
    encode_synced,
    ip_key,
    node_key,
    service_key,
    services_prefix,
    synced_key,
)
from l7gate.identity.ipcache import IPNetwork, parse_prefix, prefix_sort_key
from l7gate.identity.numeric import IdentityError, allocation_range, is_reserved
from l7gate.kvstore.api import EventType, KVStore, KVStoreError, Watch

log = logging.getLogger(__name__)

_CHUNK = 2048


class MeshPublisher:
    """One agent's writer (module doc). Thread-safe; owned by the caller, who must `close` it."""

    def __init__(
        self,
        store: KVStore,
        *,
        cluster: str,
        cluster_id: int,
        node: str,
        lease: MeshLease | None = None,
        lease_ttl: float = 15.0,
        clock: Clock = time.time,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        try:
            self.cluster = check_cluster_name(cluster)
            self.cluster_id = check_mesh_cluster_id(cluster_id)
            self.node = check_node_name(node)
        except WireError as e:
            raise MeshError(f"publisher: {e}") from None
        self._store = store
        self._own_lease = lease is None
        self.lease = lease if lease is not None else MeshLease(store, lease_ttl, name=f"{cluster}/{node}")
        self.lease.subscribe(self._on_new_lease)
        self._clock = clock
        self._retry = (retry_initial, retry_max)
        self._range = allocation_range(cluster_id)
        self._cond = threading.Condition()
        self._desired: dict[str, bytes] = {}  # leased keys and the values they must hold
        self._dirty: dict[str, None] = {}  # keys to write (or delete, if not desired), in order
        self._writing: set[str] = set()  # keys the writer took off `_dirty` and is writing now
        self._initial: dict[str, set[str]] = {p: set() for p in SYNCED_PATHS}
        self._canaries: set[str] = set()  # paths whose canary is due
        self._synced: set[str] = set()  # paths whose canary was written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard_thread: threading.Thread | None = None
        self._guard_watch: Watch | None = None
        self._services_prefix = services_prefix(self.cluster)
        self.rewritten = 0  # service keys written again after another agent's lease took them
        self.writes = 0
        self.failures = 0
        self.last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Check and write the cluster's cluster-config (synchronously: MeshError if the store
        belongs to a cluster with another ID, KVStoreError if it cannot be reached), then start
        the writer thread."""
        self._write_cluster_config()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"mesh-publisher {self.cluster}",
                                                daemon=True)
                self._thread.start()

    def _write_cluster_config(self) -> None:
        key = cluster_config_key(self.cluster)
        data = encode_cluster_config(ClusterConfig(id=self.cluster_id))
        if self._store.create(key, data):
            return
        existing = self._store.get(key)
        if existing == data:
            return
        if existing is not None:
            try:
                found = decode_cluster_config(existing)
            except WireError as e:
                log.warning("%s holds a malformed cluster-config (%s): writing ours", key, e)
            else:
                if found.id != self.cluster_id:
                    raise MeshError(
                        f"{key} says cluster {self.cluster!r} has ID {found.id}, but this agent is "
                        f"configured with ID {self.cluster_id}: two clusters share a name or a store, "
                        "or the agents of one cluster disagree; nothing was published")
        self._store.put(key, data)

    def close(self, *, revoke: bool = True) -> None:
        """Stop writing. With `revoke` (and a lease of its own), end the lease so this node's
        entries go now; otherwise they expire with the TTL. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            thread, guard, watch = self._thread, self._guard_thread, self._guard_watch
        if watch is not None:
            watch.close()
        for t in (thread, guard):
            if t is not None and t is not threading.current_thread():
                t.join(10)
        if self._own_lease:
            self.lease.close(revoke=revoke)

    # -- what to publish --------------------------------------------------------------------------

    def set_node(self, node: NodeRecord) -> None:
        """Publish this node (its name must be the publisher's; cluster and ID are set here)."""
        if node.name != self.node:
            raise MeshError(f"publisher of node {self.node!r} cannot publish node {node.name!r}")
        node = NodeRecord(node.name, self.cluster, self.cluster_id, node.addresses, node.ipv4_alloc_cidr,
                          node.ipv6_alloc_cidr, node.ipv4_health_ip, node.ipv6_health_ip,
                          node.encryption_key, node.labels)
        try:
            data = encode_node(node)
        except WireError as e:
            raise MeshError(f"node {node.name}: {e}") from None
        self._set(node_key(self.cluster, self.node), data)

    def upsert_endpoint(
        self,
        prefix: str | IPNetwork,
        identity: int,
        *,
        host_ip: str | None = None,
        namespace: str | None = None,
        pod_name: str | None = None,
        encryption_key: int = 0,
    ) -> None:
        """Publish that `prefix` (a pod IP, or a CIDR) is `identity` on this node."""
        try:
            net = parse_prefix(prefix)
        except IdentityError as e:
            raise MeshError(str(e)) from None
        if identity not in self._range and not is_reserved(identity):
            raise MeshError(f"endpoint {net}: identity {identity} is outside cluster {self.cluster}'s "
                            f"range {self._range.start}..{self._range.stop - 1}: every reader would refuse it")
        ref = f"{namespace}/{pod_name}" if namespace and pod_name else "0"
        pair = IPIdentityPair(net, identity, host_ip, encryption_key,
                              f"cilium-global:{self.cluster}:{self.node}:{ref}", namespace, pod_name)
        try:
            data = encode_ip_identity(pair)
        except WireError as e:
            raise MeshError(f"endpoint {net}: {e}") from None
        self._set(ip_key(net), data)

    def delete_endpoint(self, prefix: str | IPNetwork) -> None:
        try:
            net = parse_prefix(prefix)
        except IdentityError as e:
            raise MeshError(str(e)) from None
        self._unset(ip_key(net))

    def upsert_service(self, service: ClusterService) -> None:
        """Publish a global, shared Service of this cluster (its cluster and ID are set here).
        Every agent of the cluster may publish the same Service: see "Shared keys" above."""
        svc = ClusterService(self.cluster, service.namespace, service.name, service.frontends, service.backends,
                             service.labels, service.selector, service.include_external, service.shared,
                             self.cluster_id)
        try:
            data = encode_cluster_service(svc)
        except WireError as e:
            raise MeshError(f"global service {svc.ref}: {e}") from None
        self._set(service_key(self.cluster, svc.namespace, svc.name), data)
        self._start_guard()

    def delete_service(self, namespace: str, name: str) -> None:
        """Stop publishing a Service (deleted, no longer global, or no longer shared)."""
        try:
            key = service_key(self.cluster, namespace, name)
        except WireError as e:
            raise MeshError(str(e)) from None
        self._unset(key)

    def services(self) -> tuple[str, ...]:
        """`namespace/name` of every Service this publisher publishes now, sorted."""
        prefix = self._services_prefix
        with self._cond:
            return tuple(sorted(k[len(prefix):] for k in self._desired if k.startswith(prefix)))

    def endpoint_count(self) -> int:
        """How many prefixes this publisher publishes now."""
        with self._cond:
            return sum(1 for k in self._desired if k.startswith(IP_PREFIX))

    def endpoints(self) -> tuple[IPNetwork, ...]:
        """The prefixes this publisher publishes now, sorted."""
        with self._cond:
            keys = [k[len(IP_PREFIX):] for k in self._desired if k.startswith(IP_PREFIX)]
        nets = [parse_prefix(k) for k in keys]
        return tuple(sorted(nets, key=prefix_sort_key))

    def synced(self, *paths: str) -> None:
        """Write each path's sync canary (IDENTITIES_PATH, NODES_PATH, IP_PATH, SERVICES_PATH; all
        four if none is named) once every upsert of it queued so far has succeeded. Readers act on a
        path's listing only after its canary is there. Call it when the agent has published its
        initial state; later calls for the same path do nothing."""
        for path in paths or SYNCED_PATHS:
            if path not in SYNCED_PATHS:
                raise MeshError(f"no sync canary for {path!r}; one of {', '.join(SYNCED_PATHS)}")
        with self._cond:
            for path in paths or SYNCED_PATHS:
                if path not in self._synced:
                    self._canaries.add(path)
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write and due canary is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._writing and not self._canaries, timeout)

    @property
    def pending(self) -> int:
        """Keys queued or being written."""
        with self._cond:
            return len(self._dirty) + len(self._writing)

    def synced_paths(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(sorted(self._synced))

    def _set(self, key: str, data: bytes) -> None:
        with self._cond:
            if self._desired.get(key) == data:
                return
            self._desired[key] = data
            self._queue([key])

    def _unset(self, key: str) -> None:
        with self._cond:
            if self._desired.pop(key, None) is None:
                return
            self._queue([key])

    def _queue(self, keys: Iterable[str]) -> None:
        """Under the condition's lock: mark keys dirty (and part of their path's initial sync if
        its canary is not written yet)."""
        for key in keys:
            self._dirty.pop(key, None)
            self._dirty[key] = None
            path = _path_of(key)
            if path is not None and path not in self._synced:
                self._initial[path].add(key)
        self._cond.notify_all()

    def _on_new_lease(self, lease: int) -> None:
        """The lease was granted again: this node's keys are gone from etcd; write them all again,
        then every canary already written (etcd may have been wiped too)."""
        with self._cond:
            self._canaries |= self._synced
            self._synced.clear()
            self._queue(list(self._desired))
        try:
            self._write_cluster_config()
        except (MeshError, KVStoreError) as e:
            self._fail(f"rewriting cluster-config after a new lease: {e}")

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._retry[0]
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._stop.is_set() or bool(self._dirty) or self._due(), None)
                if self._stop.is_set():
                    return
                keys = list(self._dirty)[:_CHUNK]
                for key in keys:
                    del self._dirty[key]
                work = [(k, self._desired.get(k)) for k in keys]
                self._writing = set(keys)  # taken off the queue, not written yet: `flush` waits
            try:
                self._write(work)
            except KVStoreError as e:
                with self._cond:
                    for key, _ in reversed(work):  # back in front, unless queued again meanwhile
                        if key not in self._dirty:
                            self._dirty = {key: None, **self._dirty}
                    self._writing = set()
                self._fail(str(e))
                self._stop.wait(delay)
                delay = min(delay * 2, self._retry[1])
                continue
            delay = self._retry[0]
            with self._cond:
                for key, _ in work:
                    path = _path_of(key)
                    if path is not None and key not in self._dirty:
                        self._initial[path].discard(key)
                self._writing = set()
                self._cond.notify_all()
            try:
                self._write_canaries()
            except KVStoreError as e:
                self._fail(f"sync canary: {e}")
                self._stop.wait(delay)
                delay = min(delay * 2, self._retry[1])

    def _due(self) -> bool:
        return any(not self._initial[p] for p in self._canaries)

    def _write(self, work: list[tuple[str, bytes | None]]) -> None:
        puts: list[tuple[str, bytes]] = [(k, v) for k, v in work if v is not None]
        if puts:
            self._store.put_many(puts, lease=self.lease.id)
        for key, value in work:
            if value is None:
                self._store.delete(key)
        self.writes += len(work)

    def _write_canaries(self) -> None:
        with self._cond:
            due = sorted(p for p in self._canaries if not self._initial[p])
        for path in due:
            self._store.put(synced_key(self.cluster, path), encode_synced(self._clock()))
            with self._cond:
                self._canaries.discard(path)
                self._synced.add(path)
                self._cond.notify_all()
            log.info("cluster %s: %s synced (canary written by node %s)", self.cluster, path, self.node)

    # -- the guard of shared service keys ----------------------------------------------------

    def _start_guard(self) -> None:
        with self._cond:
            if self._guard_thread is None and not self._stop.is_set():
                self._guard_thread = threading.Thread(target=self._guard, name=f"mesh-services {self.cluster}",
                                                      daemon=True)
                self._guard_thread.start()

    def _guard(self) -> None:
        """Write a wanted service key again when it goes (module doc, "Shared keys"): a listing,
        then a watch from just after it; again after every failure."""
        prefix = self._services_prefix
        delay = self._retry[0]
        while not self._stop.is_set():
            watch: Watch | None = None
            try:
                items, revision = self._store.list_prefix_with_revision(prefix)
                present = {k for k, _ in items}
                self._rewrite(lambda k: k not in present)
                watch = self._store.watch_prefix(prefix, start_revision=revision + 1)
                with self._cond:
                    self._guard_watch = watch
                if self._stop.is_set():
                    return
                delay = self._retry[0]
                while True:
                    event = watch.get(timeout=None)
                    if event is None:  # closed: the publisher is closing
                        return
                    if event.type is EventType.DELETE:
                        gone = event.key
                        self._rewrite(lambda k: k == gone)
            except KVStoreError as e:
                self._fail(f"watching this cluster's global services: {e}")
                self._stop.wait(delay)
                delay = min(delay * 2, self._retry[1])
            finally:
                if watch is not None:
                    watch.close()

    def _rewrite(self, missing: Callable[[str], bool]) -> None:
        prefix = self._services_prefix
        with self._cond:
            keys = [k for k in self._desired
                    if k.startswith(prefix) and k not in self._dirty and k not in self._writing and missing(k)]
            if keys:
                self.rewritten += len(keys)
                self._queue(keys)
        if keys:
            log.info("cluster %s: %d global service key(s) gone from etcd while still wanted (another agent's "
                     "lease ended, or it deleted them first): writing them again", self.cluster, len(keys))

    def _fail(self, message: str) -> None:
        self.failures += 1
        if message != self.last_error:
            log.warning("cluster mesh publisher %s/%s: %s (retrying)", self.cluster, self.node, message)
        self.last_error = message


def _path_of(key: str) -> str | None:
    if key.startswith(IP_PREFIX):
        return IP_PATH
    if key.startswith(NODES_PATH + "/"):
        return NODES_PATH
    if key.startswith(SERVICES_PATH + "/"):
        return SERVICES_PATH
    return None  # the publisher writes no identity keys (the allocator does)

