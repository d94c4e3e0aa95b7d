"""The publisher's source-address slots: what a change re-sends, and that the slots, however
they were reached incrementally, decide every address exactly as one longest-prefix table would.

The decision an address gets from the ECDS configuration is read by walking it the way Envoy
does (classifier trie → slot name → slot's trie → leaf); the expected one comes from a plain
longest-prefix lookup in the ipcache and `rbac.port_decisions`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Mapping
from typing import Any

import pytest
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from google.protobuf.message import Message
from xds.type.matcher.v3 import ip_pb2

from l7gate.identity.ipcache import IPCacheChange
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.mapstate import PolicyDelta
from l7gate.policy.resolve import Resolver
from l7gate.xds import rbac, resources, source_slots
from l7gate.xds.cache import EXTENSION_CONFIG, LISTENER, ROUTE, SnapshotCache, SnapshotDelta
from l7gate.xds.publisher import Publisher

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NODE = "node-t"
BILLING = 1001
BILLING_IP = "10.9.1.10"
PORT = 8080


def ccnp(name: str, ingress: list[dict[str, Any]], deny: list[dict[str, Any]] | None = None) -> Any:
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": {"app": "billing"}}, "ingress": ingress}
    if deny:
        spec["ingressDeny"] = deny
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": name},
           "spec": spec}
    return parse_policy(doc, cluster_name="c")


def to_port(http: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    tp: dict[str, Any] = {"ports": [{"port": str(PORT), "protocol": "TCP"}]}
    if http is not None:
        tp["rules"] = {"http": http}
    return [tp]


def group_policy(g: int) -> Any:
    return ccnp(f"group-{g}", [{"fromEndpoints": [{"matchLabels": {"group": f"g{g}"}}],
                                "toPorts": to_port([{"method": "GET", "path": f"/g{g}"}])}])


class Recorder:
    """A snapshot cache that remembers what each `apply` handed it, per type."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.calls: list[tuple[str, list[str], list[str], int]] = []
        self.applies = 0

    def apply(self, node_id: str, delta: SnapshotDelta) -> object:
        self.applies += 1
        for type_url in sorted(delta.types):
            upserted = delta.upserted.get(type_url, {})
            size = sum(m.ByteSize() for m in upserted.values())
            self.calls.append((type_url, sorted(upserted), sorted(delta.removed.get(type_url, ())), size))
        return self.cache.apply(node_id, delta)

    def sent(self, type_url: str) -> list[str]:
        return [n for tu, names, _, _ in self.calls if tu == type_url for n in names]

    def clear(self) -> None:
        self.calls.clear()


class World:
    """A resolver, an ipcache and a publisher fronting billing:8080, driven like the agent."""

    def __init__(self, split: int | None = source_slots.SOURCE_SLOTS, **kw: Any) -> None:
        self.r = Resolver()
        self.ipcache: dict[IPNetwork, int] = {}
        self.rev = 0
        self.sink = Recorder()
        self.pub = Publisher(self.sink, NODE, self.r.endpoint_policy, slot_split=split, **kw)
        self.r.update_identities({BILLING: Labels.of({"app": "billing"})})
        self.pub.on_policy_delta(self.r.add_endpoint(BILLING))
        self.set_ip(ipaddress.ip_network(f"{BILLING_IP}/32"), BILLING)
        self.pub.set_ports([resources.ProxiedPort(BILLING, BILLING_IP, PORT, BILLING_IP, PORT + 10000)])

    def delta(self, d: PolicyDelta) -> None:
        self.pub.on_policy_delta(d)

    def set_ip(self, net: IPNetwork, ident: int | None) -> None:
        old = self.ipcache.get(net)
        if ident is None:
            self.ipcache.pop(net, None)
        else:
            self.ipcache[net] = ident
        self.rev += 1
        self.pub.on_ipcache_change(IPCacheChange(net, old, ident, self.rev))

    def add_identity(self, ident: int, labels: dict[str, str]) -> None:
        self.delta(self.r.update_identities({ident: Labels.of(labels)}))

    def add_pod(self, ident: int, ip: str, labels: dict[str, str]) -> None:
        self.add_identity(ident, {"app": "peer", "io.kubernetes.pod.namespace": "web", **labels})
        self.set_ip(ipaddress.ip_network(ip), ident)

    def add_cidr(self, ident: int, prefix: str) -> None:
        self.add_identity(ident, {f"cidr:{prefix}": ""})
        self.set_ip(ipaddress.ip_network(prefix), ident)

    def ecds(self) -> dict[str, Message]:
        snap = self.sink.cache.get_snapshot(NODE)
        assert snap is not None
        return snap.messages(EXTENSION_CONFIG)

    def lookup(self, addr: str) -> int:
        a = ipaddress.ip_address(addr)
        best: tuple[int, int] | None = None
        for net, ident in self.ipcache.items():
            if net.version == a.version and a in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, ident)
        return best[1] if best else rbac.WORLD_ID

    def expected(self, addr: str) -> bytes:
        ids: dict[int, list[IPNetwork]] = {}
        for net, ident in self.ipcache.items():
            ids.setdefault(ident, []).append(net)
        d = rbac.port_decisions(self.r.endpoint_policy(BILLING), PORT, ids).for_identity(self.lookup(addr))
        return bytes(rbac.decision_on_match(d).SerializeToString(deterministic=True))


_PARSED: dict[bytes, dict[tuple[int, int, int], int]] = {}


def _ranges(ipm: Any) -> dict[tuple[int, int, int], int]:
    # Parsed once per distinct matcher (a classifier lists 1,024 blocks per group): (version,
    # prefix length, network as an integer) -> index of its range matcher.
    key = ipm.SerializeToString(deterministic=True)
    out = _PARSED.get(key)
    if out is None:
        out = _PARSED[key] = {}
        for i, rm in enumerate(ipm.range_matchers):
            for r in rm.ranges:
                net = ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}")
                k = (net.version, net.prefixlen, int(net.network_address))
                assert k not in out, "two ranges of one length hold an address"
                out[k] = i
    return out


def _longest(ipm: Any, addr: str) -> Any:
    a = ipaddress.ip_address(addr)
    ranges, bits, n = _ranges(ipm), a.max_prefixlen, int(a)
    for plen in range(bits, -1, -1):
        i = ranges.get((a.version, plen, n >> (bits - plen) << (bits - plen)))
        if i is not None:
            return ipm.range_matchers[i].on_match
    return None


def classifiers(ecds: Mapping[str, Message]) -> list[str]:
    """The port's classifiers: its listener's, and those of listeners it replaced that Envoy
    may still be draining."""
    prefix = f"l7g_src_{BILLING_IP}_{PORT}"
    return sorted(n for n in ecds if n == prefix or n.startswith(prefix + "_") and not n.endswith("_rest")
                  and not n.rsplit("_", 1)[1].isdigit())


def envoy_leaf(ecds: Mapping[str, Message], addr: str) -> bytes:
    """The matcher leaf Envoy reaches for a request from `addr`: the classifier picks a slot,
    the slot's trie (or its on_no_match) picks the leaf. Every classifier of the port (a
    replaced listener's too) must reach the same one."""
    leaves = {envoy_leaf_of(ecds, name, addr) for name in classifiers(ecds)}
    assert len(leaves) == 1, (addr, classifiers(ecds))
    return leaves.pop()


def envoy_leaf_of(ecds: Mapping[str, Message], classifier: str, addr: str) -> bytes:
    cls: Any = ecds[classifier]
    wrapper = extension_matcher_pb2.ExtensionWithMatcher()
    cls.typed_config.Unpack(wrapper)
    ipm = ip_pb2.IPMatcher()
    wrapper.xds_matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    on = _longest(ipm, addr) or wrapper.xds_matcher.on_no_match
    action = composite_pb2.ExecuteFilterAction()
    on.action.typed_config.Unpack(action)
    slot: Any = ecds[action.dynamic_config.name]
    rbac = rbac_pb2.RBAC()
    slot.typed_config.Unpack(rbac)
    ipm = ip_pb2.IPMatcher()
    rbac.matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    leaf = _longest(ipm, addr) or rbac.matcher.on_no_match
    return bytes(leaf.SerializeToString(deterministic=True))


def from_scratch(w: World) -> dict[str, bytes]:
    """Every ECDS resource of a publisher that saw the final state only."""
    rec = Recorder()
    pub = Publisher(rec, NODE, w.r.endpoint_policy, slot_split=w.pub.slot_split)
    pub.load_ipcache(w.ipcache.items())
    pub.set_ports(w.pub.ports)
    pub.flush()
    snap = rec.cache.get_snapshot(NODE)
    assert snap is not None
    return {n: m.SerializeToString(deterministic=True) for n, m in snap.messages(EXTENSION_CONFIG).items()}


def big_world(blocks: int = 6, per_block: int = 40, groups: int = 7) -> World:
    w = World()
    for g in range(groups):
        w.delta(w.r.upsert_policy(group_policy(g)))
    n = 0
    for b in range(blocks):
        for i in range(per_block):
            w.add_pod(20_000 + n, f"10.1.{b}.{i + 1}", {"peer": f"p{n}", "group": f"g{n % groups}"})
            n += 1
    w.pub.flush()
    w.sink.clear()
    return w


def test_a_flush_changes_the_snapshot_once() -> None:
    """Every type a flush changes (here: a new port's listener, route, cluster and ECDS; then a
    port removed) reaches the cache in one `apply`; a flush with nothing dirty, in none."""
    w = World()
    w.pub.flush()
    assert w.sink.applies == 1 and {c[0] for c in w.sink.calls} >= {LISTENER, ROUTE, EXTENSION_CONFIG}
    w.pub.flush()
    assert w.sink.applies == 1
    w.pub.set_ports([])
    w.pub.flush()
    assert w.sink.applies == 2
    snap = w.sink.cache.get_snapshot(NODE)
    assert snap is not None and not snap.resources[LISTENER] and not snap.resources[EXTENSION_CONFIG]


def test_one_pod_added_sends_one_slot() -> None:
    w = big_world()
    total = sum(m.ByteSize() for m in w.ecds().values())
    w.add_pod(30_000, "10.1.2.50", {"peer": "new", "group": "g1"})  # an existing block
    stats = w.pub.flush()
    block = source_slots.block_of(ipaddress.ip_network("10.1.2.50/32"))
    assert block is not None and w.sink.sent(EXTENSION_CONFIG) == [source_slots.slot_name(BILLING_IP, PORT, source_slots.slot_of(block))]
    assert w.sink.sent(LISTENER) == [] and w.sink.sent(ROUTE) == []
    assert stats.slots_translated == 1 and stats.resources_sent == 1
    assert stats.bytes_sent < total / 5
    assert envoy_leaf(w.ecds(), "10.1.2.50") == w.expected("10.1.2.50")
    assert w.expected("10.1.2.50") != w.expected("10.1.2.51")  # the new pod is listed


def test_pod_in_a_new_block_of_a_listed_group_sends_its_slot_alone() -> None:
    # The classifier lists every block of 10.1.0.0/16 already: the first pod of a new block
    # changes its slot, not the classifier (which would make Envoy build every slot anew).
    w = big_world()
    w.add_pod(30_001, "10.1.77.5", {"peer": "new", "group": "g2"})
    w.pub.flush()
    block = source_slots.block_of(ipaddress.ip_network("10.1.77.5/32"))
    assert block is not None
    assert w.sink.sent(EXTENSION_CONFIG) == [source_slots.slot_name(BILLING_IP, PORT, source_slots.slot_of(block))]
    for a in ("10.1.77.5", "10.1.77.6", "10.1.200.1", "10.2.0.1"):
        assert envoy_leaf(w.ecds(), a) == w.expected(a), a
    w.sink.clear()
    w.set_ip(ipaddress.ip_network("10.1.77.5/32"), None)  # the block empties: its slot again
    w.pub.flush()
    assert w.sink.sent(EXTENSION_CONFIG) == [source_slots.slot_name(BILLING_IP, PORT, source_slots.slot_of(block))]
    assert envoy_leaf(w.ecds(), "10.1.77.5") == w.expected("10.1.77.5")


def test_pod_in_a_new_group_sends_the_classifier_and_every_slot() -> None:
    w = big_world()
    w.add_pod(30_001, "10.7.0.5", {"peer": "new", "group": "g2"})
    stats = w.pub.flush()
    sent = w.sink.sent(EXTENSION_CONFIG)
    assert source_slots.classifier_name(BILLING_IP, PORT) in sent
    assert stats.slots_translated == source_slots.SOURCE_SLOTS
    for a in ("10.7.0.5", "10.7.0.6", "10.7.99.1", "10.1.0.1"):
        assert envoy_leaf(w.ecds(), a) == w.expected(a), a
    w.sink.clear()
    w.set_ip(ipaddress.ip_network("10.7.0.5/32"), None)  # the group empties: out again
    w.pub.flush()
    assert source_slots.classifier_name(BILLING_IP, PORT) in w.sink.sent(EXTENSION_CONFIG)
    assert envoy_leaf(w.ecds(), "10.7.0.5") == w.expected("10.7.0.5")


def test_pod_whose_decision_is_worlds_sends_nothing() -> None:
    w = big_world()
    w.add_pod(30_002, "10.1.3.50", {"peer": "unlisted"})  # no group: default deny, like world
    stats = w.pub.flush()
    assert w.sink.sent(EXTENSION_CONFIG) == [] and stats.slots_translated == 0


def test_policy_change_for_one_peer_resends_only_its_slot() -> None:
    w = big_world()
    pol = ccnp("just-p3", [{"fromEndpoints": [{"matchLabels": {"peer": "p3"}}], "toPorts": to_port([{"path": "/x"}])}])
    w.delta(w.r.upsert_policy(pol))
    # A new policy on billing, named after its first three: world's default deny is named as
    # before ("+more"), so only p3's slot changes.
    w.pub.flush()
    p3_block = source_slots.block_of(ipaddress.ip_network("10.1.0.4/32"))  # pod n=3
    assert p3_block is not None
    assert w.sink.sent(EXTENSION_CONFIG) == [source_slots.slot_name(BILLING_IP, PORT, source_slots.slot_of(p3_block))]
    w.sink.clear()
    pol2 = ccnp("just-p3", [{"fromEndpoints": [{"matchLabels": {"peer": "p3"}}], "toPorts": to_port([{"path": "/y"}])}])
    w.delta(w.r.upsert_policy(pol2))
    w.pub.flush()
    assert w.sink.sent(EXTENSION_CONFIG) == [source_slots.slot_name(BILLING_IP, PORT, source_slots.slot_of(p3_block))]


def test_policy_among_the_first_names_resends_only_its_peers_slot() -> None:
    # World's default deny names no policy (`named_policies`): a policy whose name sorts first
    # on the endpoint changes the slots of the peers it names, not every slot's default.
    w = big_world()
    pol = ccnp("a-first", [{"fromEndpoints": [{"matchLabels": {"peer": "p3"}}], "toPorts": to_port([{"path": "/x"}])}])
    w.delta(w.r.upsert_policy(pol))
    w.pub.flush()
    p3_block = source_slots.block_of(ipaddress.ip_network("10.1.0.4/32"))  # pod n=3
    assert p3_block is not None
    assert w.sink.sent(EXTENSION_CONFIG) == [source_slots.slot_name(BILLING_IP, PORT, source_slots.slot_of(p3_block))]
    for a in ("10.1.0.4", "10.1.0.5", "10.9.9.9"):
        assert envoy_leaf(w.ecds(), a) == w.expected(a), a


def test_cidr_spanning_slots_keeps_longest_prefix_semantics() -> None:
    w = big_world(blocks=4, per_block=10)
    allow_cidr = ccnp("from-cidr", [{"fromCIDR": ["10.1.0.0/22"], "toPorts": to_port()}])
    w.delta(w.r.upsert_policy(allow_cidr))
    w.add_cidr(40_000, "10.1.0.0/22")  # spans the 4 blocks, so 4 slots, and the rest
    w.pub.flush()
    w.sink.clear()
    blocks = {source_slots.block_of(ipaddress.ip_network(f"10.1.{b}.1/32")) for b in range(4)}
    slots = {source_slots.slot_of(b) for b in blocks if b is not None}
    assert len(slots) == 4 and source_slots.block_of(ipaddress.ip_network("10.1.0.0/22")) is None
    probes = ["10.1.0.1", "10.1.0.200", "10.1.3.250", "10.1.4.1", "10.1.1.5", "10.2.0.1"]
    for a in probes:
        assert envoy_leaf(w.ecds(), a) == w.expected(a), a
    # inside the prefix, not a pod: the prefix's decision (allowed at L4); a pod keeps its own
    assert w.expected("10.1.0.200") != w.expected("10.1.0.1")
    w.set_ip(ipaddress.ip_network("10.1.0.0/22"), None)
    w.pub.flush()
    sent = set(w.sink.sent(EXTENSION_CONFIG))
    assert {source_slots.slot_name(BILLING_IP, PORT, s) for s in slots} | {source_slots.slot_name(BILLING_IP, PORT, source_slots.REST)} <= sent
    for a in probes:
        assert envoy_leaf(w.ecds(), a) == w.expected(a), a


def test_removed_port_removes_its_ecds_resources() -> None:
    w = big_world(blocks=1, per_block=3)
    w.pub.set_ports([])
    w.pub.flush()
    assert w.ecds() == {}


def routed_slots(ecds: Mapping[str, Message], classifier: str | None = None) -> list[str]:
    """The slot names the classifier sends some address to (not the ones it only names)."""
    cls: Any = ecds[classifier or f"l7g_src_{BILLING_IP}_{PORT}_n1"]
    wrapper = extension_matcher_pb2.ExtensionWithMatcher()
    cls.typed_config.Unpack(wrapper)
    ipm = ip_pb2.IPMatcher()
    wrapper.xds_matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    out = []
    for rm in ipm.range_matchers:
        if all(ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}").subnet_of(
                ipaddress.ip_network("100::/64")) for r in rm.ranges if ":" in r.address_prefix) and all(
                ":" in r.address_prefix for r in rm.ranges):
            continue  # only discard-prefix ranges: named, never reached
        action = composite_pb2.ExecuteFilterAction()
        rm.on_match.action.typed_config.Unpack(action)
        out.append(action.dynamic_config.name)
    return out


def distinct_world(w: World, pods: int, start: int = 0) -> None:
    """`pods` peers in 10.1.0.0/16, each with an HTTP rule of its own (a leaf of its own)."""
    for n in range(start, start + pods):
        ident = 30_000 + n
        w.delta(w.r.upsert_policy(ccnp(f"peer-{n}", [{"fromEndpoints": [{"matchLabels": {"peer": f"q{n}"}}],
                                                     "toPorts": to_port([{"method": "GET", "path": f"/only/{n}"}])}])))
        w.add_pod(ident, peer_ip(n), {"peer": f"q{n}"})


def peer_ip(n: int) -> str:
    return f"10.1.{n // 4}.{n % 4 * 64 + 1}"  # a /26 block of its own


def test_a_port_is_split_by_the_size_of_its_table() -> None:
    """Few slots for a small table (Envoy's initial sync pays per resource), more for a large
    one (a one-pod change re-sends one slot); the rest keeps its name."""
    small = World(split=None)
    small.add_pod(20_001, "10.1.0.1", {"group": "g0"})
    small.delta(small.r.upsert_policy(group_policy(0)))
    small.pub.flush()
    assert set(small.ecds()) == set(source_slots.slot_names(BILLING_IP, PORT, 0, 1)) == {
        f"l7g_src_{BILLING_IP}_{PORT}_n1", f"l7g_src_{BILLING_IP}_{PORT}_n1_0", f"l7g_src_{BILLING_IP}_{PORT}_n1_rest"}
    assert small.pub.slot_deciding(BILLING_IP, PORT, ipaddress.ip_network("10.1.0.0/26")) == f"l7g_src_{BILLING_IP}_{PORT}_n1_0"
    small.add_cidr(50_001, "10.1.128.0/17")  # a broad prefix over empty blocks of the listed group
    small.pub.flush()
    for a in ("10.1.0.1", "10.1.0.2", "10.1.64.9", "10.1.200.5", "10.2.0.1", "192.0.2.1"):
        assert envoy_leaf(small.ecds(), a) == small.expected(a)
    assert routed_slots(small.ecds()) == [f"l7g_src_{BILLING_IP}_{PORT}_n1_0"]
    large = World(split=None, slot_target=4096)
    distinct_world(large, 200)
    large.pub.flush()
    names = set(large.ecds())
    split = len(names) - 2
    assert split >= 8 and split & (split - 1) == 0, names
    assert source_slots.slot_name(BILLING_IP, PORT, 0, 0, split) in names
    for n in range(0, 200, 7):
        a = peer_ip(n)
        assert envoy_leaf(large.ecds(), a) == large.expected(a)


def test_a_port_whose_slot_outgrew_its_split_moves_to_a_new_listener() -> None:
    """Envoy subscribes to a classifier's slots only while it builds the listener, so another
    split is a new incarnation of the listener (names, classifier, listener). The old names
    stay, rendered like the new ones, until Envoy no longer subscribes to them (it drains the
    old listener once the new one has warmed)."""
    held: set[str] = set()
    w = World(split=None, slot_target=4096, subscribed=lambda names: held & set(names))
    distinct_world(w, 4)
    w.pub.flush()
    one = f"l7g_src_{BILLING_IP}_{PORT}_n1"
    assert classifiers(w.ecds()) == [one] and routed_slots(w.ecds(), one) == [f"{one}_0"]
    held.update(w.ecds())
    distinct_world(w, 60, start=4)
    w.pub.flush()
    split = w.pub.split_of(BILLING_IP, PORT)
    new = source_slots.classifier_name(BILLING_IP, PORT, 1, split)
    assert split >= 8 and classifiers(w.ecds()) == sorted([one, new]) and w.pub.retiring
    assert set(source_slots.slot_names(BILLING_IP, PORT, 1, split)) <= set(w.ecds())
    lst = w.sink.cache.get_snapshot(NODE).messages(LISTENER)  # type: ignore[union-attr]
    assert new.encode() in lst[resources.listener_name(BILLING_IP, PORT)].SerializeToString()
    for n in range(0, 64, 3):
        assert envoy_leaf(w.ecds(), peer_ip(n)) == w.expected(peer_ip(n))  # through both classifiers
    # a change meanwhile reaches the old listener's slots too
    w.delta(w.r.delete_policy("CiliumClusterwideNetworkPolicy/peer-5"))
    w.pub.flush()
    assert classifiers(w.ecds()) == sorted([one, new])
    assert envoy_leaf(w.ecds(), peer_ip(5)) == w.expected(peer_ip(5)) != envoy_leaf_of(w.ecds(), new, peer_ip(6))
    # re-applied meanwhile (the same listener): nothing moves
    port = w.pub.ports[0]
    w.pub.set_ports([])
    w.pub.set_ports([port])
    w.pub.flush()
    assert classifiers(w.ecds()) == sorted([one, new])
    # Envoy drained the old listener: its names go, nothing else is sent
    held.clear()
    held.update(source_slots.slot_names(BILLING_IP, PORT, 1, split))
    w.sink.clear()
    w.pub.flush()
    assert classifiers(w.ecds()) == [new] and not w.pub.retiring
    assert not w.sink.sent(EXTENSION_CONFIG)
    assert sorted(n for _, _, removed, _ in w.sink.calls for n in removed) == sorted(source_slots.slot_names(BILLING_IP, PORT, 0, 1))
    for n in range(64):
        assert envoy_leaf(w.ecds(), peer_ip(n)) == w.expected(peer_ip(n))


@pytest.mark.parametrize("seed", [*range(10), 18, 28, 37, 56])  # 56: a pod inside an in-block CIDR
def test_incremental_slots_equal_a_full_render_and_decide_like_the_ipcache(seed: int) -> None:
    """Fixed 128 slots: at every step, every probe decided like the ipcache, and the ECDS
    resources byte for byte what a publisher that saw only the final state renders."""
    _walk(seed, source_slots.SOURCE_SLOTS)


def test_adaptive_slots_decide_like_the_ipcache_while_ports_move() -> None:
    """Adaptive splits (a small `slot_target`, so that ports move while the walks run, and
    Envoy drops a replaced listener's names at random times): every probe decided like the
    ipcache at every step, through every classifier the port has; the walks end at several
    splits, and several moved."""
    ends = [_walk(seed, None) for seed in range(8)]
    splits, moves = [s for s, _ in ends], [m for _, m in ends]
    assert len(set(splits)) >= 2 and max(splits) > 1 and sum(moves) >= 2, ends


def _walk(seed: int, split: int | None) -> tuple[int, bool]:
    """A random walk of pods, CIDRs and policies; returns the port's final split and whether
    it moved to a new listener on the way."""
    rnd = random.Random(seed)
    held: set[str] = set()
    w = World(split, **({} if split else {"slot_target": 700, "subscribed": lambda names: held & set(names)}))
    moved = False
    for g in range(3):
        w.delta(w.r.upsert_policy(group_policy(g)))
    pool = [f"10.1.{b}.{h}" for b in (0, 1, 2, 64) for h in (1, 2, 3, 4, 5, 128, 255)]
    pool += ["10.3.0.1", "fd00::1", "fd00::2", "fd00::1:1"]
    cidrs = ["10.1.0.0/16", "10.1.2.0/25", "10.0.0.0/8", "10.1.1.0/24", "10.1.2.0/30", "10.1.64.0/26", "fd00::/64"]
    cidr_ids = {c: 50_000 + i for i, c in enumerate(cidrs)}
    pods: dict[str, int] = {}
    next_id = 60_000
    toggles = [
        ccnp("tog", [{"fromCIDR": ["10.1.0.0/16"], "toPorts": to_port([{"method": "POST"}])}],
             deny=[{"fromCIDR": ["10.1.2.0/25"]}]),
        ccnp("tog", [{"fromEndpoints": [{"matchLabels": {"group": "g1"}}], "toPorts": to_port()}]),
        ccnp("tog", [{"fromEntities": ["all"], "toPorts": to_port([{"path": "/any"}])}]),
        ccnp("tog", [{"fromCIDR": ["10.0.0.0/8", "fd00::/64"], "toPorts": to_port()}],
             deny=[{"fromEndpoints": [{"matchLabels": {"group": "g0"}}]}]),
    ]
    probes = pool + ["10.1.0.77", "10.1.2.100", "10.1.2.50", "10.1.1.200", "10.200.0.1", "10.1.64.77", "fd00::9",
                     "fd01::1", "192.0.2.1"]
    for step in range(60):
        op = rnd.random()
        if op < 0.45:
            ip = rnd.choice(pool)
            next_id += 1
            if ip in pods and rnd.random() < 0.5:
                w.set_ip(ipaddress.ip_network(ip), None)
                del pods[ip]
            else:
                w.add_pod(next_id, ip, {"peer": f"p{next_id}", "group": f"g{rnd.randrange(4)}"})
                pods[ip] = next_id
        elif op < 0.7:
            c = rnd.choice(cidrs)
            net = ipaddress.ip_network(c)
            if net in w.ipcache:
                w.set_ip(net, None)
            else:
                w.add_cidr(cidr_ids[c], c)
        elif op < 0.9:
            w.delta(w.r.upsert_policy(rnd.choice(toggles)))
        else:
            w.delta(w.r.delete_policy("CiliumClusterwideNetworkPolicy/tog"))
        if split is None and rnd.random() < 0.1:  # a new listener: a split for the table now
            port = w.pub.ports[0]
            w.pub.set_ports([])
            w.pub.flush()
            w.pub.set_ports([port])
        if rnd.random() < 0.6:
            if split is None and w.sink.cache.get_snapshot(NODE) is not None:
                if rnd.random() < 0.3:
                    held.clear()  # the replaced listeners drained
                held.update(w.ecds())
            w.pub.flush()
            ecds = w.ecds()
            for a in probes:
                assert envoy_leaf(ecds, a) == w.expected(a), (step, a)
            if split:
                mine = {n: m.SerializeToString(deterministic=True) for n, m in ecds.items()}
                assert mine == from_scratch(w), step
            moved = moved or w.pub.retiring
    return w.pub.split_of(BILLING_IP, PORT), moved


def test_ports_with_the_same_leaves_share_one_rendering_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush renders a slot once for every port whose leaves there are the same (replicas of
    one workload, ports no rule names) and names it per port; the bytes are what rendering each
    port's slot on its own gives."""
    w = big_world(blocks=4, per_block=30)
    w.add_cidr(50_001, "10.0.0.0/8")
    w.delta(w.r.upsert_policy(ccnp("other-port", [{"fromEndpoints": [{"matchLabels": {"group": "g1"}}],
                                                   "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}],
                                                                "rules": {"http": [{"path": "/x"}]}}]}])))
    ports = [resources.ProxiedPort(BILLING, BILLING_IP, p, BILLING_IP, p + 10000) for p in (PORT, 9090, 9091, 9092)]
    w.pub.set_ports(ports)
    rendered: list[int] = []
    real_matcher = source_slots.rbac_matcher
    monkeypatch.setattr(source_slots, "rbac_matcher", lambda *a, **k: rendered.append(1) or real_matcher(*a, **k))
    shared = from_scratch(w)
    with_memo = len(rendered)
    rendered.clear()
    real = source_slots.source_slot_config
    monkeypatch.setattr(source_slots, "source_slot_config", lambda *a, **k: real(*a, **{**k, "memo": None}))
    alone = from_scratch(w)
    assert shared == alone and len(shared) == len(ports) * (source_slots.SOURCE_SLOTS + 2)
    # 9091 and 9092 (no rule names them) render alike, and 9090 like them where no g1 peer is
    assert with_memo <= len(rendered) * 3 // 4 - 3, (with_memo, len(rendered))  # 9092's all reused, some of 9090's
    for slot in (*range(source_slots.SOURCE_SLOTS), source_slots.REST):
        a = shared[source_slots.slot_name(BILLING_IP, 9091, slot)]
        b = shared[source_slots.slot_name(BILLING_IP, 9092, slot)]
        assert a.replace(b"9091", b"9092") == b


def test_a_port_proxied_again_takes_new_ecds_names_and_drops_the_old() -> None:
    """Envoy builds an ECDS resource's filters once, under the listener that first subscribed:
    a listener built anew under the old names kept no slot subscriptions (403 for good). So each
    incarnation of a port's listener has names of its own, and the old ones are removed."""
    w = big_world(blocks=2, per_block=5)
    port = w.pub.ports[0]
    first = set(w.ecds())
    assert source_slots.classifier_name(BILLING_IP, PORT) in first
    w.pub.set_ports([])
    w.pub.flush()
    assert w.ecds() == {}
    w.pub.set_ports([port])
    w.pub.flush()
    again = set(w.ecds())
    assert again == set(source_slots.slot_names(BILLING_IP, PORT, 1)) and not again & first
    lst = w.sink.cache.get_snapshot(NODE).messages(LISTENER)  # type: ignore[union-attr]
    assert source_slots.classifier_name(BILLING_IP, PORT, 1).encode() in lst[resources.listener_name(BILLING_IP, PORT)].SerializeToString()
    # removed and proxied again before a flush (a pod re-applied), or with another identity (a
    # pod relabelled): Envoy's listener does not change, and neither do its names (new names
    # would make Envoy build it anew, and new slots answer 500 until they arrive)
    listener = lst[resources.listener_name(BILLING_IP, PORT)].SerializeToString()
    w.sink.clear()
    w.pub.set_ports([])
    w.pub.set_ports([port])
    w.pub.flush()
    w.pub.set_ports([dataclasses.replace(port, identity=BILLING + 1)])
    w.pub.flush()
    assert set(w.ecds()) == again
    assert not [removed for tu, _, removed, _ in w.sink.calls if removed]
    snap = w.sink.cache.get_snapshot(NODE)
    assert snap is not None
    assert snap.messages(LISTENER)[resources.listener_name(BILLING_IP, PORT)].SerializeToString() == listener
    # a listener that changes (here: no longer transparent) is a new incarnation
    w.pub.set_ports([dataclasses.replace(port, transparent=not port.transparent)])
    w.pub.flush()
    assert set(w.ecds()) == set(source_slots.slot_names(BILLING_IP, PORT, 2))


def test_placement_is_block_group_and_slot_of_any_prefix() -> None:
    rng = random.Random(7)
    nets: list[Any] = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    for _ in range(3000):
        if rng.random() < 0.5:
            plen = rng.choice([8, 16, 25, 26, 27, 31, 32])
            nets.append(ipaddress.IPv4Network((rng.getrandbits(32), plen), strict=False))
        else:
            plen = rng.choice([64, 112, 121, 122, 123, 128])
            nets.append(ipaddress.IPv6Network((rng.getrandbits(128), plen), strict=False))
    for net in nets:
        block = source_slots.block_of(net)
        placed = source_slots.placement(net)
        if block is None:
            assert placed is None
        else:
            assert placed == (block, source_slots.group_of(block), source_slots.slot_of(block))
