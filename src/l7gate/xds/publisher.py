"""Keeps one Envoy's resources in step with resolved policy, the ipcache and the proxied ports.

Theory of operation: every (local endpoint, port) the node's Envoy fronts owns a listener, a
route and a cluster, and over ECDS a classifier and split + 1 RBAC slots (see `source_slots`;
the split, 1 to `SOURCE_SLOTS`, follows the size of the port's table: `Publisher.slot_split`).
Slot j decides the addresses of the ipcache blocks (/26, /122) with
`fold(slot_of(block), split) == j`; the rest slot decides addresses in no block, by the
broad prefixes (shorter than a block). The publisher tracks what is dirty per (port, slot of
128), and renders the slots of the port's split those fold into:

- a policy delta for an endpoint: per port, the decision of each peer identity whose map keys
  changed is recomputed; if it changed, the slots holding that identity's prefixes are dirty.
  A changed key for every peer (ANY), or a change of world's decision or of the decision of
  peers no key names (the endpoint's default), makes every slot of the port dirty;
- an ipcache change of a prefix in a block: that block's slot, on the ports where the old or new
  identity, or the broad prefix holding the block, is listed (its leaf is not world's). The
  classifier lists whole groups (/16, /112) of blocks: a group getting its first prefix or
  losing its last changes the classifier and every slot of every port. A broad prefix: the
  rest slot and the slots of the listed blocks it holds, on every port;
- ports appearing or disappearing, `mark_identity`, `load_ipcache`: all of a port.

So one new pod re-translates one slot (~1/128 of the table) and sends one ECDS resource. Because
the cache versions resources by content, re-translating something that did not really change
sends nothing to Envoy.

`flush()` translates what is dirty and hands every changed and removed resource to the snapshot
cache as one `SnapshotDelta`: the node's snapshot changes once per flush, and the cache checks
that it is consistent (every resource a listener, route or classifier names is in it).

Not thread-safe: the agent's reconcile loop owns it.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from ..envoy_names import CLUSTER, EXTENSION_CONFIG, LISTENER, ROUTE
from ..identity.ipcache import IPCacheChange
from ..policy.parse import MAX_L7_RANGE
from ..policy.mapstate import ANY_PEER, Decision, EndpointPolicy, MapEntry, MapKey, PolicyDelta, PortView
from ..policy.types import Direction
from ..policy.types import Protocol as L4Protocol
from . import rbac, resources, source_slots
from .cache import SnapshotDelta

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TLS_RBAC_FILTER = "l7g.ingress_sni"  # the ingress TLS chain's network RBAC filter


def _same_listener(a: resources.ProxiedPort, b: resources.ProxiedPort) -> bool:
    """Whether two ports have the same Envoy listener (`resources.listener`): the identity and
    the upstream are not in it."""
    return (a.ip, a.port, a.transparent) == (b.ip, b.port, b.transparent)


def _net_order(n: IPNetwork) -> tuple[int, int, int]:
    return (n.version, int(n.network_address), n.prefixlen)



class ResourceSink(Protocol):
    """What the publisher needs from the snapshot cache (`cache.SnapshotCache` provides it)."""

    def apply(self, node_id: str, delta: SnapshotDelta) -> object: ...


@dataclass(slots=True)
class _PortState:
    port: resources.ProxiedPort
    gen: int = 0  # the listener's incarnation: its classifier's and slots' names
    # The policy the port's slots were last rendered with (None: never rendered).
    index: PortView | None = None
    world: Decision | None = None
    unnamed: Decision | None = None
    decided: dict[int, Decision] = field(default_factory=dict)  # memo of decide()
    # What is dirty.
    full: bool = True
    policy_changed: bool = False
    pending: dict[MapKey, MapEntry | None] = field(default_factory=dict)  # map changes, in order
    slots: set[int] = field(default_factory=set)  # of 128 (`source_slots.slot_of`), or REST
    classifier: bool = False
    # How many ways its blocks are split (`source_slots.fold`; 0: not chosen yet): chosen
    # when the listener is new, kept for its life (see `Publisher.slot_split`).
    split: int = 0
    # Earlier incarnations (gen, split) whose listener Envoy may still hold (draining after
    # the port moved to a larger split): their names stay, rendered like the current ones.
    retired: list[tuple[int, int]] = field(default_factory=list)

    def decide(self, ident: int) -> Decision:
        """The port's decision for `ident` as rendered (`rbac.port_decisions`' rule)."""
        if ident == rbac.WORLD_ID:
            assert self.world is not None
            return self.world
        d = self.decided.get(ident)
        if d is None:
            assert self.index is not None and self.unnamed is not None
            d = self.index.decide(ident) if ident in self.index.by_peer else self.unnamed
            self.decided[ident] = d
        return d

    @property
    def dirty(self) -> bool:
        return self.full or self.policy_changed or bool(self.slots) or self.classifier


@dataclass(slots=True)
class PublishStats:
    ports_translated: int = 0
    slots_translated: int = 0  # ECDS RBAC slots (incl. rest) translated
    resources_sent: int = 0  # resources handed to the cache (all types)
    bytes_sent: int = 0  # their serialized size
    removed: int = 0


@dataclass(slots=True)
class Publisher:
    sink: ResourceSink
    node_id: str
    policy_of: Callable[[int], EndpointPolicy | None]
    access_logs: Sequence[Message] = ()
    auth_verified: bool = False  # mutual auth is checked before traffic reaches Envoy (kernel)
    tcp_access_logs: Sequence[Message] = ()  # the TLS chains' (`serverNames`), one entry per connection
    _ports: dict[tuple[str, int], _PortState] = field(default_factory=dict)
    _prefixes: dict[int, list[IPNetwork]] = field(default_factory=dict)
    # The ipcache by block (block -> prefix -> identity), its broad prefixes, the groups the
    # classifier lists (group -> how many of its blocks hold a prefix) and their blocks by slot.
    _by_block: dict[IPNetwork, dict[IPNetwork, int]] = field(default_factory=dict)
    _broad: dict[IPNetwork, int] = field(default_factory=dict)
    _groups: dict[IPNetwork, int] = field(default_factory=dict)
    _slot_blocks: dict[int, set[IPNetwork]] = field(default_factory=dict)
    _removed: set[tuple[str, int]] = field(default_factory=set)
    # Incarnations of each port's listener so far, and the ECDS names of replaced ones.
    _gens: dict[tuple[str, int], int] = field(default_factory=dict)
    _gone_ecds: set[str] = field(default_factory=set)
    _removed_states: dict[tuple[str, int], _PortState] = field(default_factory=dict)  # until the flush
    _initialized: bool = False
    # Per port with `serverNames`: its TLS chain as last sent in its listener (serialized).
    _tls_sent: dict[tuple[str, int], bytes] = field(default_factory=dict)
    # Whether any input changed since the last flush: a TLS chain decides every source address
    # itself (not through the slots' dirty tracking), so it is re-rendered after any change.
    _inputs_changed: bool = False
    # identity → the entries of its ingress map with `serverNames` (key → port range): built by
    # one scan of the map when absent, then kept from the policy deltas. A scan per change cost
    # 5 ms at 10,000 peers (every new peer is a new map): half of a one-pod apply.
    _sni_entries: dict[int, dict[MapKey, tuple[int, int]]] = field(default_factory=dict)
    # Slots per port (`source_slots.fold`): `slot_split` fixes it (a power of two up to 128);
    # None chooses it per port from the size of its table when its listener is new
    # (`source_slots.split_for`, at most `slot_target` bytes a slot). Another split means new
    # names, and Envoy subscribes to a classifier's slots only while it builds the listener (a
    # new name in a classifier update is never asked for, and decides deny-all): so a port
    # whose slot passes `SLOT_MOVE_FACTOR` x `slot_target` moves to a new incarnation of its listener, split
    # for its table now. Envoy warms that listener until its classifier and every slot have
    # arrived, the old one serving meanwhile (`source_slots._slot_source`), then drains the
    # old one; the old names stay, kept current, until `subscribed` says Envoy no longer asks
    # for them (`retiring`). `subscribed(names)`: those the Envoy subscribes to now (None: no
    # Envoy to wait for; the old names go at the next flush).
    slot_split: int | None = None
    slot_target: int = source_slots.SLOT_TARGET_BYTES
    subscribed: Callable[[Sequence[str]], AbstractSet[str]] | None = None

    # -- inputs -------------------------------------------------------------------------------

    def load_ipcache(self, entries: Iterable[tuple[IPNetwork, int]]) -> None:
        self._inputs_changed = True
        self._prefixes = source_slots.prefixes_by_identity(entries)
        self._by_block, self._broad = source_slots.source_index(self._prefixes)
        self._groups, self._slot_blocks = {}, {}
        for b in self._by_block:
            g = source_slots.group_of(b)
            if g not in self._groups:
                self._list_group(g, True)
            self._groups[g] += 1
        for st in self._ports.values():
            st.full = True

    def _list_group(self, group: IPNetwork, listed: bool) -> None:
        """A group appears in (or leaves) the classifier: its blocks in (or out of) their slots."""
        if listed:
            self._groups[group] = 0
        else:
            del self._groups[group]
        for i, blocks in enumerate(source_slots.group_slots(group)):
            if listed:
                self._slot_blocks.setdefault(i, set()).update(blocks)
            else:
                self._slot_blocks.get(i, set()).difference_update(blocks)

    def set_ports(self, ports: Iterable[resources.ProxiedPort]) -> None:
        wanted = {(p.ip, p.port): p for p in ports}
        for key in list(self._ports):
            if key not in wanted:
                old = self._ports.pop(key)
                self._removed.add(key)
                self._removed_states[key] = old
                self._gone_ecds.update(self._ecds_names(key, old))
        for key, p in wanted.items():
            st = self._ports.get(key)
            if st is not None and st.port == p:
                continue
            # The listener's incarnation (`source_slots.classifier_name`): a new one only when
            # Envoy builds the listener anew, i.e. when it was removed from Envoy or changes.
            # A port removed and proxied again before a flush, or whose identity alone changed
            # (a pod relabelled, re-applied), keeps its listener as it is and its names: new
            # names would make Envoy build it anew, and a request can meet a new slot before it
            # arrived (a CI run saw a 500, Envoy's answer for a composite action whose dynamic
            # config is missing).
            prev = st if st is not None else self._removed_states.pop(key, None)
            if prev is not None and _same_listener(prev.port, p):
                # the names stay, and with them the split Envoy holds
                self._gone_ecds.difference_update(self._ecds_names(key, prev))
                self._ports[key] = _PortState(p, prev.gen, split=prev.split, retired=prev.retired)
            else:
                if st is not None:
                    self._gone_ecds.update(self._ecds_names(key, st))
                gen = self._gens[key] = self._gens.get(key, -1) + 1
                self._ports[key] = _PortState(p, gen)
            self._removed.discard(key)

    @staticmethod
    def _ecds_names(key: tuple[str, int], st: _PortState) -> list[str]:
        """Every ECDS name of a port as rendered: its classifier, slots and rest, and those of
        its retired incarnations."""
        names = source_slots.slot_names(*key, st.gen, st.split) if st.split else []
        for gen, split in st.retired:
            names += source_slots.slot_names(*key, gen, split)
        return names

    @property
    def retiring(self) -> bool:
        """Whether some port keeps the names of a listener Envoy may still be draining."""
        return any(st.retired for st in self._ports.values())

    def _retire(self) -> None:
        """Retired incarnations Envoy no longer subscribes to (their listener drained): their
        names go."""
        ports = [(key, st) for key, st in self._ports.items() if st.retired]
        if not ports:
            return
        names = [source_slots.classifier_name(*key, gen, split) for key, st in ports for gen, split in st.retired]
        held = self.subscribed(names) if self.subscribed is not None else frozenset()
        for key, st in ports:
            keep = []
            for gen, split in st.retired:
                if source_slots.classifier_name(*key, gen, split) in held:
                    keep.append((gen, split))
                else:
                    self._gone_ecds.update(source_slots.slot_names(*key, gen, split))
            st.retired = keep

    def slot_deciding(self, ip: str, port: int, block: IPNetwork) -> str:
        """The ECDS name of the slot that decides `block`'s addresses on a port now."""
        st = self._ports[(ip, port)]
        split = st.split or self.slot_split or source_slots.SOURCE_SLOTS
        return source_slots.slot_name(ip, port, source_slots.fold(source_slots.slot_of(block), split), st.gen, split)

    def split_of(self, ip: str, port: int) -> int:
        """How many slots the port's blocks are split into (0: not rendered yet)."""
        return self._ports[(ip, port)].split

    def on_policy_delta(self, delta: PolicyDelta) -> None:
        self._inputs_changed = True
        for ep in delta.removed_endpoints:
            self.mark_identity(ep)
        for ep, per_dir in delta.changes.items():
            ingress = per_dir.get(Direction.INGRESS)
            sni = self._sni_entries.get(ep)
            if ingress is not None and sni is not None:
                for k, e in ingress.upserted.items():
                    r = rbac.sni_range(k, e, MAX_L7_RANGE)
                    if r is None:
                        sni.pop(k, None)
                    else:
                        sni[k] = r
                for k in ingress.deleted:
                    sni.pop(k, None)
            for st in self._ports.values():
                if st.port.identity != ep:
                    continue
                st.policy_changed = True
                if ingress is None:
                    continue
                port = st.port.port
                for k, e in ingress.upserted.items():
                    if k.protocol.covers(L4Protocol.TCP) and k.ports.contains(port):
                        st.pending[k] = e
                for k in ingress.deleted:
                    if k.protocol.covers(L4Protocol.TCP) and k.ports.contains(port):
                        st.pending[k] = None

    def mark_identity(self, identity: int) -> None:
        """An endpoint's policy was recomputed outside a delta (e.g. new endpoint)."""
        self._inputs_changed = True
        self._sni_entries.pop(identity, None)
        for st in self._ports.values():
            if st.port.identity == identity:
                st.full = True

    def on_ipcache_change(self, change: IPCacheChange) -> None:
        self._inputs_changed = True
        p = change.prefix
        at = _net_order(p)
        for ident in (change.old, change.new):
            if ident is None:
                continue
            # kept sorted (by _net_order): an identity can hold thousands of pods' addresses
            nets = self._prefixes.setdefault(ident, [])
            # (addresses mostly come in order: past the last one, no search)
            i = len(nets) if not nets or _net_order(nets[-1]) < at else bisect.bisect_left(nets, at, key=_net_order)
            present = i < len(nets) and nets[i] == p
            if ident == change.old and present:
                del nets[i]
                present = False
            if ident == change.new and not present:
                nets.insert(i, p)
            if not nets:
                self._prefixes.pop(ident, None)
        placed = source_slots.placement(p)
        if placed is None:
            self._broad_changed(p, change.new)
            return
        block, group, slot = placed
        entries = self._by_block.setdefault(block, {})
        appeared = not entries
        if change.new is None:
            entries.pop(p, None)
        else:
            entries[p] = change.new
        gone = not entries
        # The classifier lists whole groups: only a group appearing or emptying changes it
        # (and the slots, which then decide its blocks' addresses instead of the rest).
        regroup = False
        if gone:
            del self._by_block[block]
            self._groups[group] -= 1
            if not self._groups[group]:
                self._list_group(group, False)
                regroup = True
        elif appeared:
            if group not in self._groups:
                self._list_group(group, True)
                regroup = True
            self._groups[group] += 1
        ports = [st for st in self._ports.values() if not st.full and st.index is not None]
        if not ports:
            return  # nothing rendered yet (a node's initial sync): no slot to mark
        # Prefixes holding p: inside one that is listed, p is listed whatever its own decision.
        cover = source_slots.covering(block, self._broad) if self._broad else None
        holders = [cover[1]] if cover is not None else []
        holders += [
            ident for net, ident in entries.items()
            if net.prefixlen < p.prefixlen and p.subnet_of(net)  # type: ignore[arg-type]
        ]
        for st in ports:
            if regroup:
                st.classifier = True
                st.slots.update(range(source_slots.SOURCE_SLOTS))
            elif (
                self._rendered(st, change.old)
                or self._rendered(st, change.new)
                or any(self._rendered(st, ident) for ident in holders)
            ):
                st.slots.add(slot)

    def _rendered(self, st: _PortState, ident: int | None) -> bool:
        """Whether prefixes of `ident` can appear in a slot (as rendered): a slot lists every
        prefix whose leaf is not world's, and, inside a listed broad prefix, every other one.
        A change among prefixes that none of this applies to leaves the slot as it is."""
        if ident is None:
            return False
        assert st.world is not None
        return not rbac.renders_alike(st.decide(ident), st.world, auth_verified=self.auth_verified)

    def _broad_changed(self, prefix: IPNetwork, new: int | None) -> None:
        if new is None:
            self._broad.pop(prefix, None)
        else:
            self._broad[prefix] = new
        inside = self._slots_within(prefix)
        for st in self._ports.values():
            st.slots.add(source_slots.REST)
            st.slots |= inside

    # -- output -------------------------------------------------------------------------------

    def _refresh_policy(self, st: _PortState) -> None:
        """Bring the port's policy index up to date; mark the slots whose leaves changed.

        Only the peers whose map keys changed can change decision, unless what every peer
        shares changed: the ANY entries (every slot is dirty), or world's or the unnamed peers'
        leaf. World's default deny names the endpoint's first policies: a policy added or
        removed changes it only when it is among them."""
        policy = self.policy_of(st.port.identity)
        idx = st.index
        alike = functools.partial(rbac.renders_alike, auth_verified=self.auth_verified)
        if st.full or idx is None or any(k.peer == ANY_PEER for k in st.pending):
            st.index = PortView(policy, Direction.INGRESS, st.port.port, L4Protocol.TCP)
            st.decided = {}
            st.world, st.unnamed = st.index.decide(rbac.WORLD_ID), st.index.decide(-1)
            st.full = True
        else:
            before = {k.peer: st.decide(k.peer) for k in st.pending}
            old_world, old_unnamed = st.world, st.unnamed
            assert old_world is not None and old_unnamed is not None
            for k, e in st.pending.items():
                idx.set(k, e)
            if idx.set_policy(policy):
                st.decided = {}  # decisions of peers without entries of their own
            else:
                for ident in before:
                    st.decided.pop(ident, None)
            st.world, st.unnamed = idx.decide(rbac.WORLD_ID), idx.decide(-1)
            if not (alike(st.world, old_world) and alike(st.unnamed, old_unnamed)):
                st.full = True
                st.decided = {}
            else:
                for ident, d in before.items():
                    if not alike(st.decide(ident), d):
                        self._mark_identity_slots(st, ident)
        st.pending.clear()
        st.policy_changed = False

    def _mark_identity_slots(self, st: _PortState, ident: int) -> None:
        for net in self._prefixes.get(ident, ()):
            placed = source_slots.placement(net)
            if placed is not None:
                st.slots.add(placed[2])
            else:
                st.slots.add(source_slots.REST)
                st.slots |= self._slots_within(net)

    def _slots_within(self, net: IPNetwork) -> set[int]:
        """The slots deciding some address of a broad prefix: those of the listed blocks in it."""
        return {source_slots.slot_of(b) for b in source_slots.blocks_within(net, self._groups)}

    def flush(self) -> PublishStats:
        stats = PublishStats()
        listeners: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        clusters: dict[str, Message] = {}
        ecds: dict[str, Message] = {}
        tables: dict[tuple[int, int], dict[int, list[IPNetwork]]] = {}  # a slot's table is every port's
        memo: source_slots.SlotMemo = {}
        changed, self._inputs_changed = self._inputs_changed, False
        self._retire()
        for key in sorted(self._ports):
            st = self._ports[key]
            if not st.dirty:
                if changed and self._tls_sent.get(key):
                    self._render_tls(key, st, listeners)
                continue
            p = st.port
            if st.full or st.policy_changed or st.index is None:
                self._refresh_policy(st)
            assert st.world is not None and st.index is not None
            # Peers without entries of their own decide as the unnamed ones: when that is
            # world's decision, only the named peers can differ from it in a slot.
            named = st.index.by_peer.keys() if st.unnamed == st.world else None
            if not st.split:  # a new listener (the split is in it: `source_slots.classifier_name`)
                st.split = self._want_split(st, named)
            self._render_tls(key, st, listeners, force=st.full)
            if st.full:
                rname, cname = resources.route_name(p.ip, p.port), resources.cluster_name(p.ip, p.port)
                clusters[cname] = resources.static_cluster(cname, p.upstream_ip, p.upstream_port)
                routes[rname] = resources.upstream_route(rname, cname)
                st.classifier = True
                stats.ports_translated += 1
            outgrown = False
            for gen, split in ((st.gen, st.split), *st.retired):
                largest = self._render_incarnation(
                    st, gen, split, None if st.full else st.slots, st.classifier, named, ecds, tables, memo, stats)
                outgrown = outgrown or (gen == st.gen and largest > source_slots.SLOT_MOVE_FACTOR * self.slot_target)
            st.full = st.classifier = False
            st.slots.clear()
            if outgrown and self.slot_split is None and st.split < source_slots.SOURCE_SLOTS:
                self._move(key, st, named, listeners, ecds, tables, memo, stats)
        removed = sorted(self._removed)
        self._removed.clear()
        for key in removed:
            self._tls_sent.pop(key, None)
        if not self._initialized or clusters or listeners or routes or ecds or removed or self._gone_ecds:
            gone_l = [resources.listener_name(ip, port) for ip, port in removed]
            gone_r = [resources.route_name(ip, port) for ip, port in removed]
            gone_c = [resources.cluster_name(ip, port) for ip, port in removed]
            gone_e = sorted(self._gone_ecds - ecds.keys())
            self._gone_ecds.clear()
            self._removed_states.clear()
            delta = SnapshotDelta()
            delta.put(CLUSTER, clusters)
            delta.put(EXTENSION_CONFIG, ecds)
            delta.put(ROUTE, routes)
            delta.put(LISTENER, listeners)
            delta.remove(LISTENER, gone_l)
            delta.remove(EXTENSION_CONFIG, gone_e)
            delta.remove(ROUTE, gone_r)
            delta.remove(CLUSTER, gone_c)
            self.sink.apply(self.node_id, delta)
            self._initialized = True
        sent = (*listeners.values(), *routes.values(), *clusters.values(), *ecds.values())
        stats.resources_sent = len(sent)
        stats.bytes_sent = sum(m.ByteSize() for m in sent)
        stats.removed = len(removed)
        return stats

    def _move(self, key: tuple[str, int], st: _PortState, named: AbstractSet[int] | None,
              listeners: dict[str, Message], ecds: dict[str, Message],
              tables: dict[tuple[int, int], dict[int, list[IPNetwork]]], memo: source_slots.SlotMemo,
              stats: PublishStats) -> None:
        """A port whose slot outgrew its split: a new incarnation of its listener, split at
        least twice as many ways, rendered whole; the current one retires (`retiring`)."""
        st.retired.append((st.gen, st.split))
        st.gen = self._gens[key] = max(self._gens.get(key, 0), st.gen) + 1
        st.split = min(source_slots.SOURCE_SLOTS, max(2 * st.split, self._want_split(st, named)))
        self._render_tls(key, st, listeners, force=True)
        self._render_incarnation(st, st.gen, st.split, None, True, named, ecds, tables, memo, stats)

    def _render_incarnation(self, st: _PortState, gen: int, split: int, dirty: Iterable[int] | None,
                            classifier: bool, named: AbstractSet[int] | None, ecds: dict[str, Message],
                            tables: dict[tuple[int, int], dict[int, list[IPNetwork]]],
                            memo: source_slots.SlotMemo, stats: PublishStats) -> int:
        """Into `ecds`: the slots of the port's incarnation (`gen`, `split`) that `dirty` (slots
        of 128, or REST) fold into, or all of them (`dirty` None), and its classifier if asked.
        Returns the largest rendered slot's size in bytes."""
        largest = 0
        for j in ((*range(split), source_slots.REST) if dirty is None
                  else sorted({source_slots.fold(i, split) for i in dirty})):
            cfg = self._render_slot(st, gen, split, j, named, tables, memo)
            ecds[cfg.name] = cfg
            stats.slots_translated += 1
            largest = max(largest, len(cfg.typed_config.value))
        if classifier:
            cls = source_slots.classifier_config(st.port.ip, st.port.port, self._groups, gen, split)
            ecds[cls.name] = cls
        return largest

    def _render_slot(self, st: _PortState, gen: int, split: int, j: int, named: AbstractSet[int] | None,
                     tables: dict[tuple[int, int], dict[int, list[IPNetwork]]],
                     memo: source_slots.SlotMemo) -> Message:
        """Slot `j` of the port's incarnation `gen` split `split` ways (the rest if `j` is REST)."""
        p = st.port
        assert st.world is not None
        at = (0 if j == source_slots.REST else split, j)  # the rest's table is every split's
        table = tables.get(at)
        if table is None:
            if j == source_slots.REST:
                blocks: Iterable[IPNetwork] = ()
            else:
                blocks = [b for i in range(j, source_slots.SOURCE_SLOTS, split) for b in self._slot_blocks.get(i, ())]
            table = tables[at] = source_slots.slot_table(j, self._by_block, self._broad, blocks)
        return source_slots.source_slot_config(
            p.ip, p.port, j, st.decide, st.world, self._by_block, self._broad,
            auth_verified=self.auth_verified, table=table, memo=memo, gen=gen, named=named, split=split,
        )

    def _want_split(self, st: _PortState, named: AbstractSet[int] | None) -> int:
        """The split for the port's table as it is (`source_slots.split_for`)."""
        if self.slot_split is not None:
            return self.slot_split
        assert st.world is not None
        # Prefixes per distinct decision first: a port's peers share a few decisions, and a
        # decision's leaf key is looked up by hashing the whole decision.
        by_decision: dict[int, tuple[Decision, int]] = {}
        for ident in (self._prefixes.keys() if named is None else named):
            nets = self._prefixes.get(ident)
            if nets:
                d = st.decide(ident)
                seen = by_decision.get(id(d))
                by_decision[id(d)] = (d, len(nets) + (seen[1] if seen is not None else 0))
        world_key = rbac.leaf_key(st.world, self.auth_verified)
        leaves: dict[bytes, int] = {}
        for d, n in by_decision.values():
            key = rbac.leaf_key(d, self.auth_verified)
            if key != world_key:
                leaves[key] = leaves.get(key, 0) + n
        return source_slots.split_for(sum(leaves.values()), ((len(k), n) for k, n in leaves.items()),
                                      self.slot_target)

    def _render_tls(self, key: tuple[str, int], st: _PortState, listeners: dict[str, Message], *,
                    force: bool = False) -> None:
        """The port's listener into `listeners` if it is new (`force`) or its TLS chain changed:
        Envoy then drains that chain alone, and the HTTP chain's connections stay."""
        p = st.port
        tls = self._tls_chain(p)
        tls_bytes = b"" if tls is None else tls.SerializeToString(deterministic=True)
        if force or tls_bytes != self._tls_sent.get(key, b""):
            lname = resources.listener_name(p.ip, p.port)
            listeners[lname] = resources.listener(lname, p.ip, p.port, resources.route_name(p.ip, p.port),
                                                  self.access_logs, p.transparent, st.gen, tls, st.split)
            self._tls_sent[key] = tls_bytes

    def _tls_chain(self, p: resources.ProxiedPort) -> Message | None:
        """The port's chain for TLS connections when its ingress policy has `serverNames`: one
        network RBAC filter over every known identity's addresses (no slots: it is rebuilt,
        and the listener re-sent, when it changes), then a TCP proxy to the pod."""
        policy = self.policy_of(p.identity)
        if policy is None:
            return None
        sni = self._sni_entries.get(p.identity)
        if sni is None:
            sni = self._sni_entries[p.identity] = {
                k: r for k, e in policy.ingress.items() if (r := rbac.sni_range(k, e, MAX_L7_RANGE)) is not None}
        if not any(lo <= p.port <= hi for lo, hi in sni.values()):
            return None
        decisions = rbac.port_decisions(policy, p.port, self._prefixes.keys())
        matcher = rbac.rbac_matcher(decisions, self._prefixes, auth_verified=self.auth_verified, tls=True)
        name = resources.listener_name(p.ip, p.port)
        return resources.tls_filter_chain(
            f"tls-{p.port}", p.port, [(TLS_RBAC_FILTER, f"{name}_sni", matcher)], resources.cluster_name(p.ip, p.port),
            f"{name}_tls", self.tcp_access_logs, original_dst=False, direction="ingress")

    @property
    def ports(self) -> list[resources.ProxiedPort]:
        return [st.port for _, st in sorted(self._ports.items())]
