"""Keeps one Envoy's resources in step with resolved policy, the ipcache and the proxied ports.

Theory of operation: every (local endpoint, port) the node's Envoy fronts owns three resources
(listener, route, cluster; see `translate`). The publisher remembers, per port, which
identities its route lists and whether the route lists every identity (when peers no rule names
are treated differently from `world`) or holds a broad range (a CIDR peer). A change then
touches only the routes it can affect:

- a policy delta: the routes of the endpoints it names;
- an ipcache change for identity X: routes that list X, plus routes that list everyone or hold
  a broad range;
- ports appearing or disappearing: their own three resources.

`flush()` translates the dirty ports and hands the changed resources to the snapshot cache in
one `update` per type, clusters first, so that a route never names a missing cluster. Because
the cache versions resources by content, re-translating a port that did not really change
sends nothing to Envoy.

Not thread-safe: the agent's reconcile loop owns it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from ..identity.ipcache import IPCacheChange
from ..policy.resolve import EndpointPolicy, PolicyDelta
from . import translate as t

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


class ResourceSink(Protocol):
    """What the publisher needs from the snapshot cache (xds/cache.py provides it)."""

    def update(
        self, node_id: str, type_url: str, upserted: Mapping[str, Message], removed: Iterable[str]
    ) -> object: ...


@dataclass(slots=True)
class _PortState:
    port: t.ProxiedPort
    listed: frozenset[int] = frozenset()
    lists_everyone: bool = False
    has_broad_range: bool = False


@dataclass(slots=True)
class PublishStats:
    ports_translated: int = 0
    resources_sent: int = 0
    removed: int = 0


@dataclass(slots=True)
class Publisher:
    sink: ResourceSink
    node_id: str
    policy_of: Callable[[int], EndpointPolicy | None]
    access_logs: Sequence[Message] = ()
    auth_verified: bool = False  # mutual auth is checked before traffic reaches Envoy (kernel)
    _ports: dict[tuple[str, int], _PortState] = field(default_factory=dict)
    _prefixes: dict[int, list[IPNetwork]] = field(default_factory=dict)
    _dirty: set[tuple[str, int]] = field(default_factory=set)
    _removed: set[tuple[str, int]] = field(default_factory=set)
    _initialized: bool = False

    # -- inputs -------------------------------------------------------------------------------

    def load_ipcache(self, entries: Iterable[tuple[IPNetwork, int]]) -> None:
        self._prefixes = t.prefixes_by_identity(entries)
        self._dirty |= set(self._ports)

    def set_ports(self, ports: Iterable[t.ProxiedPort]) -> None:
        wanted = {(p.ip, p.port): p for p in ports}
        for key in list(self._ports):
            if key not in wanted:
                del self._ports[key]
                self._removed.add(key)
                self._dirty.discard(key)
        for key, p in wanted.items():
            st = self._ports.get(key)
            if st is None or st.port != p:
                self._ports[key] = _PortState(p)
                self._dirty.add(key)
                self._removed.discard(key)

    def on_policy_delta(self, delta: PolicyDelta) -> None:
        touched = set(delta.changes) | delta.removed_endpoints
        for key, st in self._ports.items():
            if st.port.identity in touched:
                self._dirty.add(key)

    def mark_identity(self, identity: int) -> None:
        """An endpoint's policy was recomputed outside a delta (e.g. new endpoint)."""
        for key, st in self._ports.items():
            if st.port.identity == identity:
                self._dirty.add(key)

    def on_ipcache_change(self, change: IPCacheChange) -> None:
        for ident in (change.old, change.new):
            if ident is None:
                continue
            nets = self._prefixes.setdefault(ident, [])
            if ident == change.old and change.prefix in nets:
                nets.remove(change.prefix)
            if ident == change.new and change.prefix not in nets:
                nets.append(change.prefix)
                nets.sort(key=lambda n: (n.version, int(n.network_address), n.prefixlen))
            if not nets:
                self._prefixes.pop(ident, None)
        changed = {i for i in (change.old, change.new) if i is not None}
        for key, st in self._ports.items():
            if st.lists_everyone or st.has_broad_range or (st.listed & changed):
                self._dirty.add(key)
            elif change.prefix.prefixlen < change.prefix.max_prefixlen:
                self._dirty.add(key)  # a new broad prefix may cover listed addresses

    # -- output -------------------------------------------------------------------------------

    def flush(self) -> PublishStats:
        stats = PublishStats()
        listeners: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        clusters: dict[str, Message] = {}
        for key in sorted(self._dirty):
            st = self._ports.get(key)
            if st is None:
                continue
            p = st.port
            policy = self.policy_of(p.identity)
            decisions = t.port_decisions(policy, p.port, self._prefixes.keys())
            matcher = t.rbac_matcher(decisions, self._prefixes, auth_verified=self.auth_verified)
            listed = set(decisions.peers)
            st.lists_everyone = decisions.everyone
            st.has_broad_range = any(
                n.prefixlen < n.max_prefixlen for i in listed for n in self._prefixes.get(i, ())
            )
            st.listed = frozenset(listed)
            rname, cname, lname = (
                t.route_name(p.ip, p.port), t.cluster_name(p.ip, p.port), t.listener_name(p.ip, p.port)
            )
            clusters[cname] = t.static_cluster(cname, p.upstream_ip, p.upstream_port)
            routes[rname] = t.route_configuration(rname, cname, matcher)
            listeners[lname] = t.listener(lname, p.ip, p.port, rname, self.access_logs, p.transparent)
            stats.ports_translated += 1
        removed = sorted(self._removed)
        self._dirty.clear()
        self._removed.clear()
        if not self._initialized or clusters or listeners or routes or removed:
            gone_l = [t.listener_name(ip, port) for ip, port in removed]
            gone_r = [t.route_name(ip, port) for ip, port in removed]
            gone_c = [t.cluster_name(ip, port) for ip, port in removed]
            # Order keeps every intermediate snapshot consistent: add clusters before the
            # routes naming them, remove listeners before their routes and clusters.
            self.sink.update(self.node_id, CLUSTER_TYPE, clusters, ())
            self.sink.update(self.node_id, LISTENER_TYPE, {}, gone_l)
            self.sink.update(self.node_id, ROUTE_TYPE, routes, gone_r)
            self.sink.update(self.node_id, LISTENER_TYPE, listeners, ())
            self.sink.update(self.node_id, CLUSTER_TYPE, {}, gone_c)
            self._initialized = True
        stats.resources_sent = len(listeners) + len(routes) + len(clusters)
        stats.removed = len(removed)
        return stats

    @property
    def ports(self) -> list[t.ProxiedPort]:
        return [st.port for _, st in sorted(self._ports.items())]
