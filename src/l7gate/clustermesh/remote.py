"""Watching one remote cluster's etcd: connect, check, wait for canaries, list, watch, reconnect.

Theory of operation
-------------------
A `RemoteCluster` runs one thread that repeats *sessions* against the remote's etcd, one endpoint
after another, until it is stopped. A session:

1. Connects (a new store: a session never reuses an etcd connection, its revisions or its
   watch) and reads `cilium/cluster-config/<name>` and the remote's canaries
   (`cilium/synced/<name>/...`); then opens ONE watch on `cilium/` from just after the first
   read's revision, so every later change to the config, the canaries and the data arrives in
   revision order on one stream.
2. Checks the cluster-config (`_accept`): a cluster ID is required, in 1..255, not ours and not
   another remote's (the mesh's `ClusterIDRegistry`), and the layout must be the one l7gate
   reads. A refused remote merges nothing, and what it had merged is removed; it is retried
   every `refused_retry` seconds. A remote whose ID changed since the last session (another
   cluster behind the same name, cilium#32005) has every entry removed before it is checked.
   Without a cluster-config yet, the session waits for one on the watch.
3. Lists each of the four paths (identities, nodes, ipcache, global services) once its sync
   canary is there
   (at once if the remote's config says it writes no canaries), never before: a listing before
   the canary may be partial, and acting on it would remove entries the remote still has. The
   listing is the fresh view: every entry known for that path from before (from an earlier
   session) is *stale* unless the listing holds it again, and the stale ones are removed right
   after it (cilium#24740, #25499). Entries it holds unchanged produce no change at all.
4. Applies watch events of a listed path whose revision is above that listing's revision (the
   listing already holds the earlier ones). Events of unlisted paths wait for their listing.
5. Ends when the watch or a call fails (etcd killed, frozen: the store's HTTP/2 keepalive
   notices, partitioned, replaced): the remote is marked disconnected, *every entry is kept*
   (as Cilium does: a remote pod's traffic keeps its identity through an etcd outage), and the
   next session starts after a bounded, jittered back-off.

Values are decoded by `wire` and checked against the remote: an identity must lie in the
remote's range [N<<16, (N+1)<<16 - 1] and carry its cluster label; an ipcache entry's identity
must lie in that range or be reserved (< 256; a remote's `host` becomes `remote-node`); a node
must name the remote's cluster and ID; a global service (`ClusterService`) must name the
remote's cluster and ID, and the namespace and name of its key (Cilium's ClusterNameValidator,
ClusterIDValidator and NamespacedNameValidator). Only `cilium/state/services/v1/<remote>/` is
read: a remote's etcd speaks for its own cluster. A value that cannot be decoded is counted (`malformed`)
and a value that fails a check is counted (`refused`); either way the key is treated as absent
(a previously known value for it is removed), logged, and the watcher goes on.

Changes are collected per key (first old value, last new value) and handed to `emit` as one
batch per burst of events (at most `max_batch` changes), from this thread.

Thread safety: `status`, `snapshot`, `stop`, `reconfigure` may be called from any thread. The
merged entries are changed only by this remote's thread (and by `drain` once it is stopped).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from l7gate.clock import Clock
from l7gate.clustermesh.types import MeshTuning, RemoteConfig, RemoteEndpoint, RemoteIdentity, RemoteStatus
from l7gate.clustermesh.wire import (
    BASE,
    IDENTITIES_PATH,
    IDENTITY_ID_PREFIX,
    IP_PATH,
    IP_PREFIX,
    MAX_CONNECTED_CLUSTERS,
    NODES_PATH,
    SERVICES_PATH,
    SYNCED_PATHS,
    ClusterConfig,
    ClusterService,
    NodeRecord,
    WireError,
    cluster_config_key,
    decode_cluster_config,
    decode_cluster_service,
    decode_ip_identity,
    decode_label_string,
    decode_node,
    decode_synced,
    nodes_prefix,
    parse_identity_id_key,
    parse_ip_key,
    parse_node_key,
    parse_service_key,
    parse_synced_key,
    services_prefix,
    synced_prefix,
)
from l7gate.identity.numeric import (
    CLUSTER_ID_MAX,
    HOST,
    MAX_RESERVED,
    REMOTE_NODE,
    allocation_range,
)
from l7gate.kvstore.api import Event, EventType, KVStore, KVStoreError, Watch
from l7gate.policy.labels import CLUSTER_KEY

log = logging.getLogger(__name__)

StoreFactory = Callable[[RemoteConfig, str, MeshTuning], KVStore]
"""Opens a store on one endpoint of a remote (the default: `EtcdKVStore` with its TLS files)."""

_IDENTITY, _ENDPOINT, _NODE, _SERVICE = "identity", "endpoint", "node", "service"


def etcd_store_factory(config: RemoteConfig, endpoint: str, tuning: MeshTuning) -> KVStore:
    from l7gate.kvstore.etcd import EtcdKVStore

    return EtcdKVStore(endpoint, ca_file=config.ca_file, cert_file=config.cert_file,
                       key_file=config.key_file, server_name=config.server_name,
                       timeout=tuning.rpc_timeout, keepalive_time=tuning.keepalive_time,
                       keepalive_timeout=tuning.keepalive_timeout)


class ClusterIDRegistry:
    """Which cluster uses which cluster ID: the local cluster, and each accepted remote. Thread-safe."""

    def __init__(self, local_name: str, local_id: int) -> None:
        self.local_name = local_name
        self.local_id = local_id
        self._lock = threading.Lock()
        self._by_id: dict[int, str] = {}

    def claim(self, name: str, cluster_id: int) -> str | None:
        """Give `cluster_id` to remote `name`; None if done, else why not."""
        with self._lock:
            if cluster_id == self.local_id:
                return (f"cluster ID {cluster_id} of remote {name!r} collides with the local cluster "
                        f"{self.local_name!r}: refused, nothing merged")
            holder = self._by_id.get(cluster_id)
            if holder is not None and holder != name:
                return (f"cluster ID {cluster_id} of remote {name!r} collides with remote {holder!r}, "
                        "which holds it already: refused, nothing merged")
            for other_id, other in list(self._by_id.items()):
                if other == name and other_id != cluster_id:
                    del self._by_id[other_id]
            self._by_id[cluster_id] = name
            return None

    def release(self, name: str) -> None:
        with self._lock:
            for cluster_id, holder in list(self._by_id.items()):
                if holder == name:
                    del self._by_id[cluster_id]


class Changes:
    """Changes of one batch, per key: the value before the batch and the value after it."""

    def __init__(self) -> None:
        self.touched: dict[tuple[str, Any], tuple[Any, Any]] = {}
        self.resync = False

    def record(self, kind: str, key: Any, old: Any, new: Any) -> None:
        slot = (kind, key)
        before = self.touched.get(slot)
        self.touched[slot] = (old if before is None else before[0], new)

    def __len__(self) -> int:
        return len(self.touched)

    def split(self) -> dict[str, tuple[list[Any], list[Any]]]:
        """Per kind: (added or changed, removed), unordered (the mesh sorts what it emits); keys
        whose value did not change are left out."""
        out: dict[str, tuple[list[Any], list[Any]]] = {k: ([], []) for k in (_IDENTITY, _ENDPOINT, _NODE, _SERVICE)}
        for (kind, key), (old, new) in self.touched.items():
            if new is not None and new != old:
                out[kind][0].append(new)
            elif new is None and old is not None:
                out[kind][1].append(old)
        return out


class _Refused(Exception):
    """The remote's cluster-config is not acceptable: merge nothing from it."""


class _Restart(Exception):
    """Start a new session at once (the remote's cluster ID changed)."""


@dataclass
class _Session:
    store: KVStore
    started: float
    config: ClusterConfig | None = None
    canaries: set[str] = field(default_factory=set)
    listed: dict[str, int] = field(default_factory=dict)  # path -> revision of its listing


class RemoteCluster:
    """One remote cluster, watched by one thread (module doc). Created and owned by a
    `ClusterMesh`, which calls `start` and `stop`."""

    def __init__(
        self,
        config: RemoteConfig,
        *,
        registry: ClusterIDRegistry,
        emit: Callable[[RemoteCluster, Changes], None],
        tuning: MeshTuning,
        store_factory: StoreFactory = etcd_store_factory,
        clock: Clock = time.time,
    ) -> None:
        self.name = config.name
        self._config = config
        self._registry = registry
        self._emit = emit
        self._tuning = tuning
        self._factory = store_factory
        self._clock = clock
        self._lock = threading.Lock()  # guards the merged entries and the status fields
        self._identities: dict[int, RemoteIdentity] = {}
        self._endpoints: dict[str, RemoteEndpoint] = {}
        self._nodes: dict[str, NodeRecord] = {}
        self._services: dict[str, ClusterService] = {}  # by namespace/name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._restart = False
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._watch: Watch | None = None
        # status
        self._configured = True
        self._connected = False
        self._ready = False
        self._cluster_id: int | None = None  # the accepted ID (kept through outages)
        self._endpoint: str | None = None
        self._sessions = 0
        self._etcd_cluster: int | None = None
        self._etcd_replaced = 0
        self._malformed = 0
        self._refused = 0
        self._last_sync: float | None = None
        self._last_sync_seconds: float | None = None
        self._last_error: str | None = None
        self._last_error_time: float | None = None
        self._last_error_refusal = False  # the last error is an entry refused (outside the range...)
        self._synced_paths: tuple[str, ...] = ()

    # -- control ----------------------------------------------------------------------------------

    @property
    def config(self) -> RemoteConfig:
        return self._config

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mesh-remote {self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the current session and the thread. Merged entries stay (see `drain`)."""
        self._stop.set()
        self._interrupt()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)
        self._registry.release(self.name)

    def reconfigure(self, config: RemoteConfig) -> None:
        """Reconnect with new endpoints or TLS files, keeping what is merged (the next listing
        reconciles it)."""
        with self._lock:
            self._config = config
            self._restart = True
        self._interrupt()

    def _interrupt(self) -> None:
        with self._lock:
            session, watch = self._session, self._watch
        self._wake.set()
        if watch is not None:
            watch.close()
        if session is not None:
            session.store.close()

    def drain(self) -> Changes:
        """Remove every merged entry (the remote was removed or refused); the removals."""
        changes = Changes()
        with self._lock:
            for number, ident in self._identities.items():
                changes.record(_IDENTITY, number, ident, None)
            for key, ep in self._endpoints.items():
                changes.record(_ENDPOINT, key, ep, None)
            for name, node in self._nodes.items():
                changes.record(_NODE, name, node, None)
            for ref, svc in self._services.items():
                changes.record(_SERVICE, ref, svc, None)
            self._identities.clear()
            self._endpoints.clear()
            self._nodes.clear()
            self._services.clear()
        return changes

    # -- reading ----------------------------------------------------------------------------------

    def status(self) -> RemoteStatus:
        with self._lock:
            return RemoteStatus(
                name=self.name, configured=self._configured, connected=self._connected,
                ready=self._ready, cluster_id=self._cluster_id, endpoint=self._endpoint,
                nodes=len(self._nodes), endpoints=len(self._endpoints), identities=len(self._identities),
                last_sync=self._last_sync, last_sync_seconds=self._last_sync_seconds,
                reconnections=max(self._sessions - 1, 0), etcd_replaced=self._etcd_replaced,
                malformed=self._malformed, refused=self._refused, last_error=self._last_error,
                last_error_time=self._last_error_time, synced_prefixes=self._synced_paths,
                services=len(self._services),
            )

    def snapshot(self) -> tuple[list[RemoteIdentity], list[RemoteEndpoint], list[NodeRecord], list[ClusterService]]:
        with self._lock:
            return (list(self._identities.values()), list(self._endpoints.values()), list(self._nodes.values()),
                    list(self._services.values()))

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        backoff = self._tuning.backoff_initial
        while not self._stop.is_set():
            with self._lock:
                config = self._config
                self._restart = False
            endpoint = config.endpoints[attempt % len(config.endpoints)]
            attempt += 1
            try:
                outcome = self._one_session(config, endpoint)
            except Exception as e:  # a bug must not end the watcher: report it and go on
                log.exception("remote %s: unexpected failure", self.name)
                self._error(f"remote {self.name!r}: unexpected {type(e).__name__}: {e}", level=logging.ERROR)
                outcome = "lost"
            if self._stop.is_set():
                return
            if outcome == "ready-lost":
                backoff = self._tuning.backoff_initial  # it worked: start the back-off again
            if outcome in ("restart", "reconfigured"):
                delay = 0.0
            elif outcome == "refused":
                delay = self._tuning.refused_retry
            else:
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, self._tuning.backoff_max)
            if delay:
                self._wake.wait(delay)
            self._wake.clear()

    def _one_session(self, config: RemoteConfig, endpoint: str) -> str:
        """Run one session; its outcome: "stopped", "reconfigured", "restart", "refused", "lost"
        (before it was ready) or "ready-lost"."""
        started = self._clock()
        try:
            store = self._factory(config, endpoint, self._tuning)
        except Exception as e:  # KVStoreError (unreadable TLS files, bad endpoint) or a factory's own
            with self._lock:
                self._configured = False
            self._error(f"configuration of remote {self.name!r} refused: {e}")
            return "refused"
        session = _Session(store, started)
        with self._lock:
            self._configured = True
            self._endpoint = endpoint
            self._session = session
        if self._stop.is_set() or self._restart:
            store.close()
            return "stopped" if self._stop.is_set() else "reconfigured"
        try:
            self._sync(session)
            return "reconfigured" if self._restart and not self._stop.is_set() else "stopped"
        except _Refused as e:
            self._error(str(e), level=logging.ERROR)
            self._registry.release(self.name)
            with self._lock:
                self._cluster_id = None
            self._emit_changes(self.drain())
            return "refused"
        except _Restart as e:
            log.warning("remote %s: %s", self.name, e)
            return "restart"
        except KVStoreError as e:
            if self._stop.is_set():
                return "stopped"
            if self._restart:
                return "reconfigured"
            with self._lock:
                was_ready = self._ready
            self._error(f"connection to {endpoint} lost: {e}")
            return "ready-lost" if was_ready else "lost"
        finally:
            with self._lock:
                self._session = None
                watch, self._watch = self._watch, None
                self._connected = False
                self._ready = False
            if watch is not None:
                watch.close()
            store.close()

    def _sync(self, session: _Session) -> None:
        store = session.store
        ckey = cluster_config_key(self.name)
        items, revision = store.list_prefix_with_revision(ckey)
        self._connected_to(store)
        canaries, _ = store.list_prefix_with_revision(synced_prefix(self.name))
        watch = store.watch_prefix(BASE, start_revision=revision + 1)
        with self._lock:
            self._watch = watch
        if self._stop.is_set() or self._restart:
            return
        changes = Changes()
        raw = next((v for k, v in items if k == ckey), None)
        if raw is None:
            self._error(f"remote {self.name!r} has no {ckey} yet: waiting for it")
        else:
            self._accept(session, raw, changes)
        for key, value in canaries:
            self._on_canary(session, key, value, changes)
        self._list_due(session, changes)
        self._emit_changes(changes)
        while True:
            event = watch.get(timeout=None)
            if event is None:  # closed: stop or reconfigure
                return
            changes = Changes()
            self._on_event(session, event, changes)
            while len(changes) < self._tuning.max_batch:
                event = watch.get(timeout=0)
                if event is None:
                    break
                self._on_event(session, event, changes)
            self._emit_changes(changes)

    def _connected_to(self, store: KVStore) -> None:
        etcd_cluster = getattr(store, "cluster_id", None)
        with self._lock:
            self._connected = True
            self._sessions += 1
            self._synced_paths = ()
            replaced = (etcd_cluster is not None and self._etcd_cluster is not None
                        and etcd_cluster != self._etcd_cluster)
            if replaced:
                self._etcd_replaced += 1
            if etcd_cluster is not None:
                previous, self._etcd_cluster = self._etcd_cluster, etcd_cluster
        if replaced:
            self._error(f"the etcd behind remote {self.name!r} is another etcd cluster than before "
                        f"({previous:x} -> {etcd_cluster:x}): resyncing from a fresh listing; "
                        "entries it does not hold are removed after it", level=logging.WARNING)
        elif self._sessions > 1:
            log.info("remote %s: reconnected", self.name)

    # -- cluster-config -----------------------------------------------------------------------

    def _accept(self, session: _Session, raw: bytes, changes: Changes) -> None:
        try:
            config = decode_cluster_config(raw)
        except WireError as e:
            with self._lock:
                self._malformed += 1
            raise _Refused(f"remote {self.name!r}: malformed cluster-config ({e}): refused, nothing merged")
        problem = None
        if config.id == 0:
            problem = "publishes no cluster ID"
        elif config.id > CLUSTER_ID_MAX:
            problem = f"has cluster ID {config.id}, above {CLUSTER_ID_MAX}"
        elif config.cached:
            problem = "publishes kvstoremesh's cached layout (cilium/cache/), which l7gate does not read"
        elif config.max_connected_clusters not in (0, MAX_CONNECTED_CLUSTERS):
            problem = (f"is configured for {config.max_connected_clusters} clusters; l7gate's identity "
                       f"layout is that of {MAX_CONNECTED_CLUSTERS}")
        if problem:
            raise _Refused(f"remote {self.name!r} {problem}: refused, nothing merged")
        with self._lock:
            previous = self._cluster_id
        if previous is not None and previous != config.id:
            log.warning("remote %s: cluster ID changed from %d to %d: removing everything merged "
                        "under the old ID", self.name, previous, config.id)
            self._registry.release(self.name)
            drained = self.drain()
            for slot, value in drained.touched.items():
                changes.record(slot[0], slot[1], *value)
        refusal = self._registry.claim(self.name, config.id)
        if refusal is not None:
            raise _Refused(refusal)
        with self._lock:
            self._cluster_id = config.id
        session.config = config
        log.info("remote %s: cluster ID %d accepted (synced canaries: %s)", self.name, config.id,
                 config.synced_canaries)

    # -- events -----------------------------------------------------------------------------------

    def _on_event(self, session: _Session, event: Event, changes: Changes) -> None:
        key = event.key
        if key == cluster_config_key(self.name):
            if event.type is EventType.DELETE:
                log.warning("remote %s: its cluster-config was deleted; keeping the ID %s",
                            self.name, self._cluster_id)
                return
            if session.config is None:
                self._accept(session, event.value, changes)
                self._list_due(session, changes)
                return
            try:
                config = decode_cluster_config(event.value)
            except WireError as e:
                with self._lock:
                    self._malformed += 1
                self._error(f"remote {self.name!r}: malformed cluster-config update ignored: {e}")
                return
            if config.id != session.config.id:
                raise _Restart(f"cluster ID changed from {session.config.id} to {config.id}: reconnecting")
            return
        if parse_synced_key(self.name, key) is not None:
            if event.type is EventType.PUT:
                self._on_canary(session, key, event.value, changes)
                self._list_due(session, changes)
            return
        path = _path_of(key, self.name)
        if path is None or path not in session.listed or event.revision <= session.listed[path]:
            return
        self._apply(path, key, event.value if event.type is EventType.PUT else None, changes)

    def _on_canary(self, session: _Session, key: str, value: bytes, changes: Changes) -> None:
        path = parse_synced_key(self.name, key)
        if path not in SYNCED_PATHS:
            return
        try:
            decode_synced(value)
        except WireError as e:
            with self._lock:
                self._malformed += 1
            self._error(f"remote {self.name!r}: malformed sync canary {key}: {e}")
            return
        session.canaries.add(path)

    def _list_due(self, session: _Session, changes: Changes) -> None:
        """List every path whose canary is there (or every path, for a remote without canaries)
        and that is not listed yet in this session: identities first, so that endpoints find
        their identity known."""
        if session.config is None:
            return
        listed = False
        for path in SYNCED_PATHS:
            if path in session.listed:
                continue
            if session.config.synced_canaries and path not in session.canaries:
                continue
            self._list(session, path, changes)
            listed = True
        if listed and len(session.listed) == len(SYNCED_PATHS):
            now = self._clock()
            with self._lock:
                self._ready = True
                self._last_sync = now
                self._last_sync_seconds = now - session.started
                # What went wrong on the way (a lost connection, a cluster-config not there yet)
                # is over; an entry this remote may not publish stays shown.
                if not self._last_error_refusal:
                    self._last_error, self._last_error_time = None, None
                counts = len(self._identities), len(self._endpoints), len(self._nodes), len(self._services)
            changes.resync = True
            log.info("remote %s: synced (%d identities, %d endpoints, %d nodes, %d global services)",
                     self.name, *counts)

    def _list(self, session: _Session, path: str, changes: Changes) -> None:
        prefix = _prefix_of(path, self.name)
        items, revision = session.store.list_prefix_with_revision(prefix)
        kind = _kind_of(path)
        with self._lock:
            known = set(self._table(kind))
        stale = set(known)  # every entry known from before is stale until listed again
        for key, value in items:
            stale.discard(self._key_of(kind, key))
            self._apply(path, key, value, changes)
        for key in stale:
            self._remove(kind, key, changes)
        session.listed[path] = revision
        with self._lock:
            self._synced_paths = tuple(sorted(session.listed))
        if stale:
            log.info("remote %s: %d stale %s entries removed after the listing", self.name, len(stale), kind)

    # -- entries ----------------------------------------------------------------------------------

    def _table(self, kind: str) -> dict[Any, Any]:
        tables: dict[str, dict[Any, Any]] = {_IDENTITY: self._identities, _ENDPOINT: self._endpoints,
                                             _NODE: self._nodes, _SERVICE: self._services}
        return tables[kind]

    def _key_of(self, kind: str, key: str) -> Any:
        """The table key of an etcd key (identities by number, services by namespace/name; else
        the etcd key's last part)."""
        if kind == _IDENTITY:
            try:
                return parse_identity_id_key(key)
            except WireError:
                return key
        if kind == _ENDPOINT:
            return key[len(IP_PREFIX):]
        if kind == _SERVICE:
            try:
                return "/".join(parse_service_key(self.name, key))
            except WireError:
                return key
        return key.rpartition("/")[2]

    def _apply(self, path: str, key: str, value: bytes | None, changes: Changes) -> None:
        """Merge one key's value (None: deleted). A value that does not decode or fails its check
        is counted and treated as absent."""
        kind = _kind_of(path)
        if value is None:
            self._remove(kind, self._key_of(kind, key), changes)
            return
        try:
            entry = self._decode(kind, key, value)
        except WireError as e:
            with self._lock:
                self._malformed += 1
            log.warning("remote %s: malformed %s value at %s skipped: %s", self.name, kind, key, e)
            self._remove(kind, self._key_of(kind, key), changes)
            return
        except _Invalid as e:
            with self._lock:
                self._refused += 1
            self._error(f"remote {self.name!r}: {kind} at {key} refused: {e}", level=logging.WARNING, refusal=True)
            self._remove(kind, self._key_of(kind, key), changes)
            return
        table_key = self._key_of(kind, key)
        with self._lock:
            table = self._table(kind)
            old = table.get(table_key)
            if old == entry:
                return
            table[table_key] = entry
        changes.record(kind, table_key, old, entry)

    def _remove(self, kind: str, table_key: Any, changes: Changes) -> None:
        with self._lock:
            old = self._table(kind).pop(table_key, None)
        if old is not None:
            changes.record(kind, table_key, old, None)

    def _decode(self, kind: str, key: str, value: bytes) -> Any:
        cluster_id = self._cluster_id
        assert cluster_id is not None
        numbers = allocation_range(cluster_id)
        if kind == _IDENTITY:
            number = parse_identity_id_key(key)
            try:
                labels = decode_label_string(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise WireError("labels are not UTF-8") from None
            if number not in numbers:
                raise _Invalid(f"identity {number} is outside cluster ID {cluster_id}'s range "
                               f"{numbers.start}..{numbers.stop - 1}")
            if labels.get(CLUSTER_KEY) != self.name:
                raise _Invalid(f"identity {number}'s labels name cluster {labels.get(CLUSTER_KEY)!r}, "
                               f"not {self.name!r}")
            return RemoteIdentity(self.name, number, labels)
        if kind == _ENDPOINT:
            prefix = parse_ip_key(key)
            pair = decode_ip_identity(value)
            if pair.prefix != prefix:
                raise WireError(f"value is for {pair.prefix}, key for {prefix}")
            identity = pair.identity
            if identity not in numbers and identity > MAX_RESERVED:
                raise _Invalid(f"identity {identity} of {prefix} is outside cluster ID {cluster_id}'s "
                               f"range {numbers.start}..{numbers.stop - 1} and not reserved")
            if identity == HOST:
                identity = REMOTE_NODE  # another cluster's host is a remote node here, as in Cilium
            return RemoteEndpoint(self.name, prefix, identity, pair.host_ip, pair.namespace,
                                  pair.pod_name, pair.encryption_key)
        if kind == _SERVICE:
            namespace, name = parse_service_key(self.name, key)
            svc = decode_cluster_service(value)
            if (svc.namespace, svc.name) != (namespace, name):
                raise WireError(f"value is for {svc.namespace}/{svc.name}, key for {namespace}/{name}")
            if svc.cluster != self.name:
                raise _Invalid(f"global service {namespace}/{name} names cluster {svc.cluster!r}, not {self.name!r}")
            if svc.cluster_id != cluster_id:
                raise _Invalid(f"global service {namespace}/{name} has cluster ID {svc.cluster_id}, not {cluster_id}")
            return svc
        cluster, name = parse_node_key(key)
        node = decode_node(value)
        if node.name != name:
            raise WireError(f"value names node {node.name!r}, key {name!r}")
        if node.cluster != self.name or cluster != self.name:
            raise _Invalid(f"node {name} names cluster {node.cluster!r}, not {self.name!r}")
        if node.cluster_id != cluster_id:
            raise _Invalid(f"node {name} has cluster ID {node.cluster_id}, not {cluster_id}")
        return node

    # -- emitting and errors ----------------------------------------------------------------------

    def _emit_changes(self, changes: Changes) -> None:
        if len(changes) or changes.resync:
            self._emit(self, changes)

    def _error(self, message: str, *, level: int = logging.WARNING, refusal: bool = False) -> None:
        log.log(level, "cluster mesh: %s", message)
        with self._lock:
            self._last_error = message
            self._last_error_time = self._clock()
            self._last_error_refusal = refusal


class _Invalid(Exception):
    """A value that decodes but that this remote may not publish."""


def _path_of(key: str, cluster: str) -> str | None:
    if key.startswith(IP_PREFIX):
        return IP_PATH
    if key.startswith(IDENTITY_ID_PREFIX):
        return IDENTITIES_PATH
    if key.startswith(nodes_prefix(cluster)):
        return NODES_PATH
    if key.startswith(services_prefix(cluster)):
        return SERVICES_PATH
    return None


def _prefix_of(path: str, cluster: str) -> str:
    return {IDENTITIES_PATH: IDENTITY_ID_PREFIX, NODES_PATH: nodes_prefix(cluster), IP_PATH: IP_PREFIX,
            SERVICES_PATH: services_prefix(cluster)}[path]


def _kind_of(path: str) -> str:
    return {IDENTITIES_PATH: _IDENTITY, NODES_PATH: _NODE, IP_PATH: _ENDPOINT, SERVICES_PATH: _SERVICE}[path]
