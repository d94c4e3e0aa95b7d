"""Versioned, consistent xDS snapshots per node id (CONVENTIONS.md 5 and 7).

Theory of operation
-------------------
The agent computes Envoy resources (listeners, routes, clusters, endpoints, secrets, extension
configs) and hands them to a `SnapshotCache`; the ADS server (`xds/server.py`) reads from it and
never from anywhere else. The cache holds, per node id, one immutable `Snapshot`:
``type_url -> name -> CachedResource``.

Versions are content hashes, never counters:

- a resource's version is a short hash of its deterministic serialization;
- a type's version is a hash of the sorted ``(name, resource version)`` pairs of that type.

So identical content always gets the same version (across agent restarts too, which lets a
reconnecting Envoy say "I have version V" and receive nothing), and only resources whose bytes
changed are ever re-sent. The serialized bytes are computed once, on insertion, and shared by
every stream that sends the resource (packed as a `google.protobuf.Any`).

A snapshot is *consistent* or it is refused: every route configuration a listener names over
RDS, every cluster a route or a TCP proxy names, every ClusterLoadAssignment an EDS cluster
needs, every secret fetched over SDS and every filter config fetched over ECDS (by a listener, or
by a composite filter's action inside another ECDS resource) must be in the same snapshot.
`set_snapshot` (full replacement), `apply` (a producer's whole flush: every type it changed, as
one `SnapshotDelta`, in one new snapshot) and `update` (one type: "one pod changed one
resource") all check the snapshot they would produce, in one place, and raise
`InconsistentSnapshot`, naming every missing reference, instead of publishing it. Because a
flush lands as one snapshot, a producer never orders its per-type writes to keep intermediate
snapshots consistent: there are none. Each resource's
outgoing references are extracted once when it enters the cache, so checking a snapshot costs a
set lookup per reference, not a walk of every protobuf.

A snapshot stored under `WILDCARD_NODE` ("*") serves every node id that has none of its own.
A node with no snapshot at all (and no wildcard) gets nothing: the server waits rather than
push an empty configuration that would tear down whatever the Envoy is enforcing.

Watchers (`watch`) are called after every change with the set of node ids whose snapshot
changed ({"*"} for the wildcard, meaning "possibly every node"). The ADS server registers one
watcher and wakes the affected streams itself.

Thread-safety: every method may be called from any thread. Snapshots are immutable once built
and are replaced, never edited, under one lock; watchers run in the calling thread after that
lock is released, so a watcher may read the cache but must not block. The cache takes ownership
of the protobuf messages passed in: callers must not mutate them afterwards (what is sent is the
bytes serialized at insertion, but consistency checks and config dumps read the messages).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from xds.type.matcher.v3 import ip_pb2

# The type URLs are defined once, in l7gate.envoy_names; the cache re-exports them.
from ..envoy_names import CLUSTER as CLUSTER
from ..envoy_names import TYPE_PREFIX
from ..envoy_names import ENDPOINT as ENDPOINT
from ..envoy_names import EXTENSION_CONFIG as EXTENSION_CONFIG
from ..envoy_names import LISTENER as LISTENER
from ..envoy_names import ROUTE as ROUTE
from ..envoy_names import SECRET as SECRET
from ..envoy_names import SHORT_NAMES as SHORT_NAMES

# Make-before-break order (Envoy's xDS docs, "eventual consistency considerations"): clusters
# and their endpoints and secrets exist before the listeners and routes that point at them.
TYPE_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE, EXTENSION_CONFIG)
TYPE_URLS: frozenset[str] = frozenset(TYPE_ORDER)
# Types an Envoy subscribes to as a whole (SotW: resource_names ignored); the others are
# requested by name.
WILDCARD_TYPES: frozenset[str] = frozenset({LISTENER, CLUSTER})

WILDCARD_NODE = "*"

# The field holding each type's resource name (ClusterLoadAssignment is named by its cluster).
_NAME_FIELD: Mapping[str, str] = MappingProxyType(
    {
        LISTENER: "name",
        ROUTE: "name",
        CLUSTER: "name",
        ENDPOINT: "cluster_name",
        SECRET: "name",
        EXTENSION_CONFIG: "name",
    }
)

_HCM_TYPE = (
    TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_EXTENSION_WITH_MATCHER_TYPE = TYPE_PREFIX + "envoy.extensions.common.matching.v3.ExtensionWithMatcher"
_EXECUTE_FILTER_TYPE = TYPE_PREFIX + "envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
_IP_MATCHER_TYPE = TYPE_PREFIX + "xds.type.matcher.v3.IPMatcher"
_TCP_PROXY_TYPE = TYPE_PREFIX + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_DOWNSTREAM_TLS_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


class InconsistentSnapshot(ValueError):
    """A snapshot names a resource it does not contain; nothing was published.

    `missing` lists ``(referrer, type_url, name)``: e.g.
    ``("listener 'ingress_8080' filter_chains[0]", ROUTE, "rules_8080")``.
    """

    def __init__(self, node_id: str, missing: Iterable[tuple[str, str, str]]) -> None:
        self.node_id = node_id
        self.missing: tuple[tuple[str, str, str], ...] = tuple(sorted(set(missing)))
        lines = [
            f"{referrer} references {SHORT_NAMES.get(type_url, type_url)} {name!r}, "
            "which is not in the snapshot"
            for referrer, type_url, name in self.missing
        ]
        super().__init__(f"inconsistent snapshot for node {node_id!r}: " + "; ".join(lines))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


_MASK64 = (1 << 64) - 1


def entry_hash(name: str, version: str) -> int:
    """One resource's share of the version of a set of resources (`version_of`)."""
    return int.from_bytes(hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=8).digest(), "big")


def version_from_total(total: int) -> str:
    """`version_of` from the sum of the resources' `entry_hash`es."""
    return f"{total & _MASK64:016x}"


def version_of(pairs: Iterable[tuple[str, str]]) -> str:
    """The version of a set of resources: the sum (mod 2^64) of their (name, version) pairs'
    hashes.

    Used for a type's version, and by the server for the subset of a type one Envoy asked for.
    Order-independent, so that a stream keeps the version of its subscription up to date one
    name at a time: Envoy subscribes to a node's 13,000 ECDS slots a few at a time, and
    recomputing the version over all of them for each request made a node's sync quadratic
    (110 s of agent CPU for 100 proxied ports).
    """
    return version_from_total(sum(entry_hash(n, v) for n, v in pairs))


def version_of_resources(resources: Iterable[CachedResource]) -> str:
    """`version_of` the resources' (name, version) pairs, from their precomputed hashes."""
    return version_from_total(sum(r.hash for r in resources))


@dataclass(frozen=True, slots=True)
class Ref:
    """One outgoing reference: the resource at `where` (for messages) needs `type_url` `name`."""

    where: str
    type_url: str
    name: str


@dataclass(frozen=True, slots=True)
class CachedResource:
    """One resource as served: its message, version, packed bytes and outgoing references.

    `message` and `packed` are shared by every reader and must never be mutated.
    """

    type_url: str
    name: str
    version: str
    message: Message
    packed: any_pb2.Any
    refs: tuple[Ref, ...]
    # `entry_hash(name, version)`, computed once: every version over a set of resources sums
    # these, and hashing 13,000 ECDS names anew on each flush and each status read cost the
    # agent tens of ms apiece during a node's initial sync.
    hash: int = 0

    @classmethod
    def build(cls, type_url: str, name: str, message: Message) -> CachedResource:
        if type_url not in TYPE_URLS:
            raise ValueError(f"unknown type URL {type_url!r}")
        full_name = message.DESCRIPTOR.full_name
        if TYPE_PREFIX + full_name != type_url:
            raise TypeError(f"{SHORT_NAMES[type_url]} resource {name!r} is a {full_name}")
        own_name = getattr(message, _NAME_FIELD[type_url])
        if own_name != name:
            # Envoy keys SotW resources by the name inside the message, delta ones by the
            # Resource.name beside it: the two must agree or the two protocols diverge.
            raise ValueError(
                f"{SHORT_NAMES[type_url]} resource filed as {name!r} is named {own_name!r}"
            )
        data = message.SerializeToString(deterministic=True)
        version = _digest(data)
        return cls(
            type_url=type_url,
            name=name,
            version=version,
            message=message,
            packed=any_pb2.Any(type_url=type_url, value=data),
            refs=tuple(_references(type_url, name, message)),
            hash=entry_hash(name, version),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable, consistent set of resources for one node, with versions.

    `resources[type_url][name]` and `versions[type_url]` exist for every type in `TYPE_URLS`
    (an empty type has the version of the empty set).
    """

    resources: Mapping[str, Mapping[str, CachedResource]]
    versions: Mapping[str, str]

    @classmethod
    def empty(cls) -> Snapshot:
        return cls._of({t: {} for t in TYPE_URLS})

    @classmethod
    def _of(cls, by_type: Mapping[str, Mapping[str, CachedResource]]) -> Snapshot:
        resources = {t: MappingProxyType(dict(by_type.get(t, {}))) for t in TYPE_URLS}
        versions = {t: version_of_resources(resources[t].values()) for t in TYPE_URLS}
        return cls(MappingProxyType(resources), MappingProxyType(versions))

    def replacing(self, type_url: str, by_name: Mapping[str, CachedResource]) -> Snapshot:
        """A copy with one type replaced; the other types' mappings and versions are reused."""
        resources = dict(self.resources)
        resources[type_url] = MappingProxyType(dict(by_name))
        versions = dict(self.versions)
        versions[type_url] = version_of_resources(by_name.values())
        return Snapshot(MappingProxyType(resources), MappingProxyType(versions))

    def version(self, type_url: str) -> str:
        return self.versions[type_url]

    def messages(self, type_url: str) -> dict[str, Message]:
        """The messages of one type by name (shared: do not mutate)."""
        return {name: r.message for name, r in self.resources[type_url].items()}

    def missing_references(self) -> list[tuple[str, str, str]]:
        return [
            (ref.where, ref.type_url, ref.name)
            for by_name in self.resources.values()
            for res in by_name.values()
            for ref in res.refs
            if ref.name not in self.resources[ref.type_url]
        ]


Watcher = Callable[[frozenset[str]], None]


@dataclass(slots=True)
class SnapshotDelta:
    """What one producer changes in one node's snapshot in one flush: per type, resources to
    add or replace and names to remove (a name both removed and upserted ends up upserted).
    Gathered with `put` and `remove`, applied at once by `SnapshotCache.apply`."""

    upserted: dict[str, dict[str, Message]] = field(default_factory=dict)
    removed: dict[str, set[str]] = field(default_factory=dict)

    def put(self, type_url: str, resources: Mapping[str, Message]) -> None:
        if resources:
            self.upserted.setdefault(type_url, {}).update(resources)

    def remove(self, type_url: str, names: Iterable[str]) -> None:
        names = set(names)
        if names:
            self.removed.setdefault(type_url, set()).update(names)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self.upserted) | frozenset(self.removed)

    def messages(self) -> list[Message]:
        """Every upserted message (for size accounting)."""
        return [m for by_name in self.upserted.values() for m in by_name.values()]


class SnapshotCache:
    """Consistent, versioned snapshots per node id. Thread-safe (see the module docstring).

    Returned `Snapshot`s are immutable and may be kept and read from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: list[Watcher] = []

    # -- writing -------------------------------------------------------------------------

    def set_snapshot(
        self, node_id: str, resources: Mapping[str, Mapping[str, Message]]
    ) -> Snapshot:
        """Replace node `node_id`'s snapshot with `resources` (type_url -> name -> message).

        Types left out are empty. Raises `InconsistentSnapshot` (and keeps the old snapshot)
        if anything referenced is missing; `ValueError`/`TypeError` for an unknown type URL,
        a message of the wrong type or a name that differs from the message's own.
        """
        unknown = set(resources) - TYPE_URLS
        if unknown:
            raise ValueError(f"unknown type URLs: {sorted(unknown)}")
        built = {
            t: {name: CachedResource.build(t, name, msg) for name, msg in by_name.items()}
            for t, by_name in resources.items()
        }
        snap = Snapshot._of(built)
        self._check(node_id, snap)
        with self._lock:
            self._snapshots[node_id] = snap
        self._notify(node_id)
        return snap

    def apply(self, node_id: str, delta: SnapshotDelta) -> Snapshot:
        """Change `node_id`'s snapshot by every type of `delta` at once, as one new snapshot.

        Starts from an empty snapshot if the node has none. Names in `delta.removed` that are
        absent are ignored. Returns the new snapshot (the old one if nothing changed). Raises
        `InconsistentSnapshot` if the result would be inconsistent; nothing changes then.
        """
        types = delta.types
        unknown = types - TYPE_URLS
        if unknown:
            raise ValueError(f"unknown type URLs: {sorted(unknown)}")
        fresh = {
            t: {name: CachedResource.build(t, name, msg) for name, msg in by_name.items()}
            for t, by_name in delta.upserted.items()
        }
        # Serialization and reference extraction happen outside the lock; the lock is held
        # only to swap, and a concurrent writer of the same node is detected by identity.
        while True:
            with self._lock:
                base = self._snapshots.get(node_id)
            current = base or Snapshot.empty()
            snap = current
            for t in sorted(types):
                by_name = dict(current.resources[t])
                for name in delta.removed.get(t, ()):
                    by_name.pop(name, None)
                by_name.update(fresh.get(t, {}))
                snap = snap.replacing(t, by_name)
            self._check(node_id, snap)
            with self._lock:
                if self._snapshots.get(node_id) is not base:
                    continue
                self._snapshots[node_id] = snap
            break
        if base is None or any(snap.versions[t] != current.versions[t] for t in types):
            self._notify(node_id)
        return snap

    def update(
        self,
        node_id: str,
        type_url: str,
        upserted: Mapping[str, Message] | None = None,
        removed: Iterable[str] = (),
    ) -> str:
        """Change one type of `node_id`'s snapshot (`apply` with one type). Returns the type's
        new version (unchanged if the content is)."""
        if type_url not in TYPE_URLS:
            raise ValueError(f"unknown type URL {type_url!r}")
        delta = SnapshotDelta({type_url: dict(upserted or {})}, {type_url: set(removed)})
        return self.apply(node_id, delta).versions[type_url]

    def clear_snapshot(self, node_id: str) -> None:
        """Forget `node_id`'s snapshot. Its Envoy keeps what it has (nothing is sent)."""
        with self._lock:
            existed = self._snapshots.pop(node_id, None) is not None
        if existed:
            self._notify(node_id)

    # -- reading -------------------------------------------------------------------------

    def get_snapshot(self, node_id: str) -> Snapshot | None:
        """The snapshot stored under exactly `node_id` (no wildcard fallback)."""
        with self._lock:
            return self._snapshots.get(node_id)

    def snapshot_for(self, node_id: str) -> Snapshot | None:
        """The snapshot that serves `node_id`: its own, else the wildcard one, else None."""
        with self._lock:
            snap = self._snapshots.get(node_id)
            return snap if snap is not None else self._snapshots.get(WILDCARD_NODE)

    def node_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    # -- watching ------------------------------------------------------------------------

    def watch(self, callback: Watcher) -> Callable[[], None]:
        """Call `callback(changed_node_ids)` after every change; returns an unsubscribe function.

        `callback` runs in the writer's thread, outside the cache lock; it must not block.
        """
        with self._lock:
            self._watchers.append(callback)

        def cancel() -> None:
            with self._lock:
                if callback in self._watchers:
                    self._watchers.remove(callback)

        return cancel

    # -- internals -----------------------------------------------------------------------

    def _check(self, node_id: str, snap: Snapshot) -> None:
        missing = snap.missing_references()
        if missing:
            raise InconsistentSnapshot(node_id, missing)

    def _notify(self, node_id: str) -> None:
        with self._lock:
            watchers = list(self._watchers)
        changed = frozenset({node_id})
        for w in watchers:
            w(changed)


# -- reference extraction ----------------------------------------------------------------


def _references(type_url: str, name: str, message: Message) -> Iterator[Ref]:
    msg: Any = message  # generated protobuf classes are untyped here
    if type_url == LISTENER:
        yield from _listener_refs(name, msg)
    elif type_url == ROUTE:
        yield from _route_config_refs(f"route configuration {name!r}", msg)
    elif type_url == CLUSTER:
        yield from _cluster_refs(name, msg)
    elif type_url == EXTENSION_CONFIG:
        yield from _extension_refs(name, msg)


def _listener_refs(name: str, listener: Any) -> Iterator[Ref]:
    chains = [(f"filter_chains[{i}]", fc) for i, fc in enumerate(listener.filter_chains)]
    if listener.HasField("default_filter_chain"):
        chains.append(("default_filter_chain", listener.default_filter_chain))
    for label, chain in chains:
        where = f"listener {name!r} {label}"
        if chain.HasField("transport_socket"):
            yield from _tls_refs(where, chain.transport_socket.typed_config)
        for filt in chain.filters:
            if filt.HasField("config_discovery"):
                yield Ref(where, EXTENSION_CONFIG, filt.name)
            typed = filt.typed_config
            if typed.type_url == _HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager()
                typed.Unpack(hcm)
                yield from _hcm_refs(where, hcm)
            elif typed.type_url == _TCP_PROXY_TYPE:
                tcp = tcp_proxy_pb2.TcpProxy()
                typed.Unpack(tcp)
                if tcp.cluster:
                    yield Ref(f"{where} tcp_proxy", CLUSTER, tcp.cluster)
                for wc in tcp.weighted_clusters.clusters:
                    yield Ref(f"{where} tcp_proxy", CLUSTER, wc.name)


def _hcm_refs(where: str, hcm: Any) -> Iterator[Ref]:
    if hcm.HasField("rds"):
        yield Ref(where, ROUTE, hcm.rds.route_config_name)
    elif hcm.HasField("route_config"):
        yield from _route_config_refs(f"{where} inline route_config", hcm.route_config)
    for hf in hcm.http_filters:
        if hf.HasField("config_discovery"):
            # ECDS resources are named by the filter that fetches them.
            yield Ref(f"{where} http filter", EXTENSION_CONFIG, hf.name)


def _route_config_refs(where: str, rc: Any) -> Iterator[Ref]:
    for vh in rc.virtual_hosts:
        for route in vh.routes:
            if not route.HasField("route"):
                continue  # direct_response, redirect, filter_action: no cluster
            action = route.route
            here = f"{where} virtual host {vh.name!r} route {_route_label(route)}"
            if action.cluster:
                yield Ref(here, CLUSTER, action.cluster)
            for wc in action.weighted_clusters.clusters:
                yield Ref(here, CLUSTER, wc.name)
            for mirror in action.request_mirror_policies:
                if mirror.cluster:
                    yield Ref(here, CLUSTER, mirror.cluster)


def _cluster_refs(name: str, cluster: Any) -> Iterator[Ref]:
    where = f"cluster {name!r}"
    if cluster.HasField("type") and cluster.type == cluster_pb2.Cluster.EDS:
        service = cluster.eds_cluster_config.service_name or name
        yield Ref(where, ENDPOINT, service)
    if cluster.HasField("transport_socket"):
        yield from _tls_refs(where, cluster.transport_socket.typed_config)


def _tls_refs(where: str, typed: Any) -> Iterator[Ref]:
    if typed.type_url == _DOWNSTREAM_TLS_TYPE:
        ctx: Any = tls_pb2.DownstreamTlsContext()
    elif typed.type_url == _UPSTREAM_TLS_TYPE:
        ctx = tls_pb2.UpstreamTlsContext()
    else:
        return
    typed.Unpack(ctx)
    common = ctx.common_tls_context
    configs = list(common.tls_certificate_sds_secret_configs)
    if common.HasField("validation_context_sds_secret_config"):
        configs.append(common.validation_context_sds_secret_config)
    if common.HasField("combined_validation_context"):
        configs.append(common.combined_validation_context.validation_context_sds_secret_config)
    for sds in configs:
        # A secret config without sds_config names a static secret from the bootstrap.
        if sds.HasField("sds_config"):
            yield Ref(f"{where} tls", SECRET, sds.name)


def _extension_refs(name: str, ext: Any) -> Iterator[Ref]:
    # A filter wrapped in a matcher may run filters fetched over ECDS themselves (a composite
    # filter's `dynamic_config`): the configs it names must be served too.
    if ext.typed_config.type_url != _EXTENSION_WITH_MATCHER_TYPE:
        return
    wrapper: Any = extension_matcher_pb2.ExtensionWithMatcher()
    ext.typed_config.Unpack(wrapper)
    seen: set[str] = set()
    for ref in _matcher_refs(f"extension config {name!r} matcher", wrapper.xds_matcher):
        if ref.name not in seen:
            seen.add(ref.name)
            yield ref


def _matcher_refs(where: str, matcher: Any) -> Iterator[Ref]:
    if matcher.HasField("on_no_match"):
        yield from _on_match_refs(where, matcher.on_no_match)
    if matcher.HasField("matcher_list"):
        for fm in matcher.matcher_list.matchers:
            yield from _on_match_refs(where, fm.on_match)
    elif matcher.HasField("matcher_tree"):
        tree = matcher.matcher_tree
        if tree.HasField("exact_match_map"):
            for om in tree.exact_match_map.map.values():
                yield from _on_match_refs(where, om)
        elif tree.HasField("prefix_match_map"):
            for om in tree.prefix_match_map.map.values():
                yield from _on_match_refs(where, om)
        elif tree.HasField("custom_match") and tree.custom_match.typed_config.type_url == _IP_MATCHER_TYPE:
            ipm: Any = ip_pb2.IPMatcher()
            tree.custom_match.typed_config.Unpack(ipm)
            for rm in ipm.range_matchers:
                yield from _on_match_refs(where, rm.on_match)


def _on_match_refs(where: str, on_match: Any) -> Iterator[Ref]:
    if on_match.HasField("matcher"):
        yield from _matcher_refs(where, on_match.matcher)
    elif on_match.HasField("action") and on_match.action.typed_config.type_url == _EXECUTE_FILTER_TYPE:
        action: Any = composite_pb2.ExecuteFilterAction()
        on_match.action.typed_config.Unpack(action)
        if action.HasField("dynamic_config"):
            yield Ref(f"{where} composite action", EXTENSION_CONFIG, action.dynamic_config.name)


def _route_label(route: Any) -> str:
    if route.name:
        return repr(route.name)
    match = route.match
    for kind in ("prefix", "path", "path_separated_prefix"):
        if match.HasField(kind):
            return f"{kind} {getattr(match, kind)!r}"
    if match.HasField("safe_regex"):
        return f"safe_regex {match.safe_regex.regex!r}"
    return "(unnamed)"
