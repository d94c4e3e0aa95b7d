"""The cluster mesh an agent owns: its remote clusters, merged into one stream of deltas.

Theory of operation
-------------------
`ClusterMesh` holds one `RemoteCluster` per configured remote, each with its own thread (see
`remote` for a session's life). It owns the cluster-ID registry shared by the remotes (so that a
remote's ID may collide neither with ours nor with another remote's) and the one path out:
every batch of changes of every remote becomes a `MeshDelta` with the next `sequence` number
and is handed to `on_change` under one lock, so the agent sees one delta at a time, in order.

`reconfigure` applies a new list of remotes without a restart: a new remote is started; a
removed one is stopped and a delta removes everything it had merged; one whose endpoints or TLS
files changed reconnects, keeping its entries until its next listing reconciles them.

Thread safety and ownership: every public method may be called from any thread, except that
`on_change` runs on a remote's thread and must not call `reconfigure` or `stop` (they wait for
that thread); it may call `status` and `snapshot`. `on_change` should not raise: an exception
is logged and the mesh goes on (the agent may then resync from `snapshot`). The caller owns the
mesh and must `stop` it; the mesh owns its remotes and their etcd connections.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from l7gate.clock import Clock
from l7gate.clustermesh.remote import (
    Changes,
    ClusterIDRegistry,
    RemoteCluster,
    StoreFactory,
    etcd_store_factory,
)
from l7gate.clustermesh.types import (
    MeshDelta,
    MeshError,
    MeshSnapshot,
    MeshStatus,
    MeshTuning,
    RemoteConfig,
    RemoteEndpoint,
    RemoteIdentity,
)
from l7gate.clustermesh.wire import (
    ClusterService,
    NodeRecord,
    WireError,
    check_cluster_name,
    check_mesh_cluster_id,
)
from l7gate.identity.ipcache import prefix_sort_key

log = logging.getLogger(__name__)


class ClusterMesh:
    """The remote clusters of local cluster `cluster` (ID `cluster_id`), merged (module doc).
    Nothing runs before `start`; `stop` ends every remote. Usable as a context manager."""

    def __init__(
        self,
        cluster: str,
        cluster_id: int,
        remotes: Iterable[RemoteConfig],
        on_change: Callable[[MeshDelta], None],
        *,
        tuning: MeshTuning | None = None,
        store_factory: StoreFactory = etcd_store_factory,
        clock: Clock = time.time,
    ) -> None:
        try:
            self.cluster = check_cluster_name(cluster)
            self.cluster_id = check_mesh_cluster_id(cluster_id)
        except WireError as e:
            raise MeshError(f"local cluster: {e}") from None
        self._on_change = on_change
        self._tuning = tuning or MeshTuning()
        self._factory = store_factory
        self._clock = clock
        self._registry = ClusterIDRegistry(cluster, cluster_id)
        self._control = threading.Lock()  # reconfigure / start / stop, one at a time
        self._table = threading.Lock()  # the remotes dict, held briefly (never across a join)
        self._emit_lock = threading.Lock()
        self._ready = threading.Condition()
        self._sequence = 0
        self._remotes: dict[str, RemoteCluster] = {}
        self._started = False
        self._stopped = False
        for config in self._checked(remotes).values():
            self._remotes[config.name] = self._new_remote(config)

    def _checked(self, remotes: Iterable[RemoteConfig]) -> dict[str, RemoteConfig]:
        out: dict[str, RemoteConfig] = {}
        for config in remotes:
            if not isinstance(config, RemoteConfig):
                raise MeshError(f"a remote must be a RemoteConfig, got {type(config).__name__}")
            if config.name == self.cluster:
                raise MeshError(f"remote {config.name!r} has the local cluster's name")
            if config.name in out:
                raise MeshError(f"remote {config.name!r} is configured twice")
            out[config.name] = config
        return out

    def _new_remote(self, config: RemoteConfig) -> RemoteCluster:
        return RemoteCluster(config, registry=self._registry, emit=self._emit, tuning=self._tuning,
                             store_factory=self._factory, clock=self._clock)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching every configured remote. Idempotent."""
        with self._control:
            if self._stopped:
                raise MeshError("the mesh was stopped")
            self._started = True
            for remote in self._remotes.values():
                remote.start()

    def stop(self) -> None:
        """Stop every remote (no removal deltas: the agent is going away). Idempotent."""
        with self._control:
            self._stopped = True
            with self._table:
                remotes = list(self._remotes.values())
        for remote in remotes:
            remote.stop()

    def __enter__(self) -> ClusterMesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reconfigure(self, remotes: Iterable[RemoteConfig]) -> None:
        """Make the configured remotes exactly `remotes` (module doc). MeshError, and nothing
        changed, if the list is invalid."""
        wanted = self._checked(remotes)
        with self._control:
            if self._stopped:
                raise MeshError("the mesh was stopped")
            with self._table:
                removed = [self._remotes.pop(name) for name in sorted(set(self._remotes) - set(wanted))]
            for gone in removed:
                gone.stop()
                log.info("cluster mesh: remote %s removed: removing what it merged", gone.name)
                self._emit(gone, gone.drain())
            for name, config in sorted(wanted.items()):
                existing = self._remotes.get(name)
                if existing is None:
                    remote = self._new_remote(config)
                    with self._table:
                        self._remotes[name] = remote
                    log.info("cluster mesh: remote %s added", name)
                    if self._started:
                        remote.start()
                elif existing.config != config:
                    log.info("cluster mesh: remote %s reconfigured: reconnecting", name)
                    existing.reconfigure(config)
        with self._ready:
            self._ready.notify_all()

    # -- the one path out -------------------------------------------------------------------------

    def _emit(self, remote: RemoteCluster, changes: Changes) -> None:
        parts = changes.split()
        with self._emit_lock:
            self._sequence += 1
            identities, endpoints, nodes = parts["identity"], parts["endpoint"], parts["node"]
            services = parts["service"]
            delta = MeshDelta(
                cluster=remote.name,
                sequence=self._sequence,
                identities_added=tuple(_sorted_identities(identities[0])),
                identities_removed=tuple(_sorted_identities(identities[1])),
                endpoints_added=tuple(_sorted_endpoints(endpoints[0])),
                endpoints_removed=tuple(_sorted_endpoints(endpoints[1])),
                nodes_added=tuple(sorted(nodes[0], key=lambda n: n.name)),
                nodes_removed=tuple(sorted(nodes[1], key=lambda n: n.name)),
                resync=changes.resync,
                services_added=tuple(_sorted_services(services[0])),
                services_removed=tuple(_sorted_services(services[1])),
            )
            if not delta.empty or delta.resync:
                try:
                    self._on_change(delta)
                except Exception:
                    log.exception("cluster mesh: on_change failed on delta %d of remote %s",
                                  delta.sequence, remote.name)
        with self._ready:
            self._ready.notify_all()

    # -- reading ----------------------------------------------------------------------------------

    def status(self) -> MeshStatus:
        with self._table:
            remotes = sorted(self._remotes.values(), key=lambda r: r.name)
        return MeshStatus(self.cluster, self.cluster_id, tuple(r.status() for r in remotes))

    def snapshot(self) -> MeshSnapshot:
        """Everything merged now, from every remote (sorted)."""
        with self._table:
            remotes = sorted(self._remotes.values(), key=lambda r: r.name)
        identities: list[RemoteIdentity] = []
        endpoints: list[RemoteEndpoint] = []
        nodes: list[NodeRecord] = []
        services: list[ClusterService] = []
        for remote in remotes:
            i, e, n, s = remote.snapshot()
            identities += _sorted_identities(i)
            endpoints += _sorted_endpoints(e)
            nodes += sorted(n, key=lambda x: x.name)
            services += _sorted_services(s)
        return MeshSnapshot(tuple(identities), tuple(endpoints), tuple(nodes), tuple(services))

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every configured remote is ready; False if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while True:
                if self.status().ready:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(min(left, 0.1))


def _sorted_identities(items: list[RemoteIdentity]) -> list[RemoteIdentity]:
    return sorted(items, key=lambda i: i.id)


def _sorted_endpoints(items: list[RemoteEndpoint]) -> list[RemoteEndpoint]:
    return sorted(items, key=lambda e: prefix_sort_key(e.prefix))


def _sorted_services(items: list[ClusterService]) -> list[ClusterService]:
    return sorted(items, key=lambda s: (s.namespace, s.name))
