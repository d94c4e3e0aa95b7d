"""The values the mesh hands out and takes in: remote configuration, deltas, status. All
immutable (CONVENTIONS 4) and safe to share between threads."""

from __future__ import annotations

from dataclasses import dataclass, field

from l7gate.clustermesh.wire import ClusterService, NodeRecord, WireError, check_cluster_name
from l7gate.identity.ipcache import IPNetwork
from l7gate.policy.labels import Labels


class MeshError(Exception):
    """A mesh configuration the mesh refuses (a bad remote name, a duplicate, our own name or
    cluster ID reused), or a writer's conflict with its cluster's store (another cluster ID in
    `cilium/cluster-config/<cluster>`)."""


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """How to reach one remote cluster's etcd, as Cilium's clustermesh config file says it:
    endpoints tried in order, and PEM files for TLS (`ca_file` turns TLS on; `cert_file` and
    `key_file` present a client certificate, which an etcd run with `--client-cert-auth`
    requires)."""

    name: str
    endpoints: tuple[str, ...]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # TLS name to verify, when it differs from the endpoint host

    def __post_init__(self) -> None:
        try:
            check_cluster_name(self.name)
        except WireError as e:
            raise MeshError(f"remote cluster: {e}") from None
        if isinstance(self.endpoints, str) or not self.endpoints:
            raise MeshError(f"remote cluster {self.name!r}: endpoints must be a non-empty sequence")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if (self.cert_file is None) != (self.key_file is None):
            raise MeshError(f"remote cluster {self.name!r}: cert_file and key_file go together")


@dataclass(frozen=True, slots=True)
class MeshTuning:
    """Timings of the mesh's connections. The defaults suit production; tests shorten them.

    `rpc_timeout` bounds every etcd call; `keepalive_time` + `keepalive_timeout` is how long a
    frozen etcd can hold a watch (etcd refuses pings more often than its
    `--grpc-keepalive-min-time`, 5 s by default); reconnects back off from `backoff_initial`
    doubling to `backoff_max` (with jitter); a refused remote (cluster ID collision, bad
    cluster-config) is retried every `refused_retry` seconds; at most `max_batch` changes go
    into one delta."""

    rpc_timeout: float = 5.0
    keepalive_time: float = 5.0
    keepalive_timeout: float = 2.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    refused_retry: float = 15.0
    max_batch: int = 20_000

    def __post_init__(self) -> None:
        if min(self.rpc_timeout, self.keepalive_time, self.keepalive_timeout,
               self.backoff_initial, self.backoff_max, self.refused_retry) <= 0 or self.max_batch < 1:
            raise MeshError("mesh tuning: every timing and max_batch must be positive")


# -- deltas ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteIdentity:
    """An identity a remote cluster allocated: its number (in that cluster's range) and labels."""

    cluster: str
    id: int
    labels: Labels


@dataclass(frozen=True, slots=True)
class RemoteEndpoint:
    """A remote ipcache entry: `prefix` belongs to `identity` and lives on the node whose
    address is `host_ip` (None if the remote did not say); pods carry their namespace and name.
    A remote's `host` identity (1) arrives as `remote-node` (6), as Cilium maps it."""

    cluster: str
    prefix: IPNetwork
    identity: int
    host_ip: str | None = None
    namespace: str | None = None
    pod_name: str | None = None
    encryption_key: int = 0


@dataclass(frozen=True, slots=True)
class MeshDelta:
    """What changed in one remote cluster, in one batch.

    `*_added` holds entries that are new or changed: the value given replaces whatever was known
    for that key (identity number, prefix, node name). `*_removed` holds entries that are gone,
    with the last value known. A key is in at most one list of a delta, so the lists may be
    applied in any order; applying identities before endpoints keeps a new endpoint's identity
    known when its address arrives (cilium#32060). `sequence` increases by one per delta the
    mesh emits (across remotes). `resync` is True for the delta that ends a (re)connection's
    listing: everything the remote holds is known after it."""

    cluster: str
    sequence: int
    identities_added: tuple[RemoteIdentity, ...] = ()
    identities_removed: tuple[RemoteIdentity, ...] = ()
    endpoints_added: tuple[RemoteEndpoint, ...] = ()
    endpoints_removed: tuple[RemoteEndpoint, ...] = ()
    nodes_added: tuple[NodeRecord, ...] = ()
    nodes_removed: tuple[NodeRecord, ...] = ()
    resync: bool = False
    # the remote's global services (`ClusterService`, keyed by namespace/name)
    services_added: tuple[ClusterService, ...] = ()
    services_removed: tuple[ClusterService, ...] = ()

    def __len__(self) -> int:
        return (len(self.identities_added) + len(self.identities_removed) + len(self.endpoints_added)
                + len(self.endpoints_removed) + len(self.nodes_added) + len(self.nodes_removed)
                + len(self.services_added) + len(self.services_removed))

    @property
    def empty(self) -> bool:
        return len(self) == 0


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    """Everything merged from every remote at one moment, sorted (by cluster, then key)."""

    identities: tuple[RemoteIdentity, ...]
    endpoints: tuple[RemoteEndpoint, ...]
    nodes: tuple[NodeRecord, ...]
    services: tuple[ClusterService, ...] = ()


# -- status ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteStatus:
    """One remote cluster, as `l7gate clustermesh status` prints it (cf. `cilium clustermesh
    status`).

    - `configured`: its configuration was accepted (endpoints, readable TLS files).
    - `connected`: a session with its etcd is up now.
    - `ready`: connected, its cluster-config accepted, and every prefix listed after its sync
      canary: what the remote holds is merged.
    - `nodes`, `endpoints`, `identities`, `services`: entries merged now (kept through an
      outage); `services` counts the remote's global services.
    - `last_sync`: when the last (re)connection's listing completed (wall clock), and
      `last_sync_seconds` how long it took from connecting.
    - `reconnections`: sessions after the first; `etcd_replaced`: times its etcd answered as
      another etcd cluster than before (cilium#32005).
    - `malformed`: values that could not be decoded (skipped); `refused`: entries outside the
      remote's identity range or naming another cluster (skipped).
    - `last_error` (and `last_error_time`): the last failure, None once the remote is ready
      again unless it was a refusal that still holds.
    """

    name: str
    configured: bool
    connected: bool
    ready: bool
    cluster_id: int | None
    endpoint: str | None
    nodes: int
    endpoints: int
    identities: int
    last_sync: float | None
    last_sync_seconds: float | None
    reconnections: int
    etcd_replaced: int
    malformed: int
    refused: int
    last_error: str | None
    last_error_time: float | None
    synced_prefixes: tuple[str, ...] = ()
    services: int = 0


@dataclass(frozen=True, slots=True)
class MeshStatus:
    """The local cluster and every configured remote, sorted by name."""

    cluster: str
    cluster_id: int
    remotes: tuple[RemoteStatus, ...] = field(default_factory=tuple)

    @property
    def ready(self) -> bool:
        """Every configured remote is ready (True with no remotes)."""
        return all(r.ready for r in self.remotes)

    def remote(self, name: str) -> RemoteStatus | None:
        return next((r for r in self.remotes if r.name == name), None)
