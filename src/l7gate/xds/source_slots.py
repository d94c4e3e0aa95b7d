"""Source-address slots: one proxied port's RBAC table split by source address into ECDS
resources, so that a change re-sends a small piece of it.

Theory of operation. At 10,000 identities one port's RBAC matcher (`rbac.rbac_matcher`) is
~0.7 MB, too much to re-send for one new pod. So a classifier filter picks, by a trie lookup on
the source address, the one RBAC filter (the slot of the address's /26 or /122 block, or the
"rest" for addresses in no block) that decides the request, and a change re-sends the slots it
touches. The tunnel listener (`mtls_translate`) keeps the single matcher per route over RDS
(`resources.route_configuration`).

Every prefix at least as long as a block (/26, /122) lies in exactly one block, and a block lies
in slot `slot_of(block)` (its number folded into 0..SOURCE_SLOTS-1). Prefixes shorter than a
block are "broad". The classifier lists blocks a group (/16, /112) at a time: every block of
every group that holds a prefix, empty ones too, so the first pod of a new block changes its
slot only; a slot decides an empty block's addresses by the broad prefix holding it, or world.

  HCM http filter <classifier> (ECDS, no default: the listener warms until it arrives)
    ExtensionWithMatcher: DirectSourceIPInput ─ IPMatcher
       ├─ blocks of slot 0 (8 per listed group) → composite ExecuteFilterAction(dynamic_config <slot 0>)
       ├─ ...  (every slot is named, the empty ones by a discard-prefix range)
       └─ on_no_match     → ExecuteFilterAction(dynamic_config <rest>)
    <slot i>: RBAC(matcher = rbac_matcher over the prefixes in slot i's listed blocks, plus each
              block itself as the longest broad prefix covering it; on_no_match world's decision)
    <rest>:   RBAC(matcher = rbac_matcher over the broad prefixes; on_no_match world's decision)

Exactly one RBAC filter decides each request. Longest-prefix semantics are kept: an address in a
block is decided by the prefixes in its block or, failing those, by the longest broad prefix
holding the block (whole blocks are inside or outside any broad prefix); an address in no block
is decided by the broad prefixes alone. A slot Envoy has not received yet uses its default
config, deny-all (fail closed). The publisher renders slots one by one as they change
(`source_slot_config`); all of this is pure.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from envoy.config.core.v3 import extension_pb2 as core_extension_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from google.protobuf import any_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2

from ..identity.ipcache import IPNetwork, prefix_sort_key
from ..policy.mapstate import Decision
from .pb import cidr, ecds_source, pack, typed_ext
from .rbac import WORLD_ID, PortDecisions, deny_all_rbac, leaf_key, rbac_matcher

# A flush's renderings by what decides them (`source_slot_config`'s `memo`): the slot, then the
# leaves of world and of every peer whose leaf is not world's.
SlotMemo = dict[tuple[int, bool, bytes, tuple[tuple[int, bytes], ...]], any_pb2.Any]


# Sizes, measured at 1,000 policies x 10,000 identities (bench_envoy's BIG world, one distinct
# decision per pod in a block): Envoy's cost to take a slot grows with its leaves (~40 µs each);
# with /26 blocks over 128 slots a slot holds ~64-128 pods and one new pod is ACKed ~4-6 ms
# after it is sent (/24 over 64: ~12 ms). Every slot is a resource per port, even when empty
# (~0.6 kB).
SOURCE_SLOTS = 128  # a power of two
BLOCK_PREFIXLEN = {4: 26, 6: 122}
# The classifier lists every block of a group (a /16, a /112: 1,024 blocks, 8 per slot) as soon
# as one block of the group holds a prefix, so that the first pod of a new block changes its
# slot alone. A classifier change makes Envoy build every slot's RBAC anew (~0.25-0.3 s at
# 1,000 policies x 10,000 identities); it now happens when a group appears or empties (a pod
# network's first or last pod), not with every 64 addresses.
GROUP_PREFIXLEN = {4: 16, 6: 112}
REST = -1  # the slot of addresses in no block
# A port's split (`split_for`): a slot of ~32 kB costs Envoy ~5 ms to take. Estimates per
# source prefix (a range in a slot's trie) and per slot (its RBAC and world's leaf).
SLOT_TARGET_BYTES = 32 * 1024
# A port whose slot passes this many times the target moves to a new listener, split more
# ways (`Publisher`): rare by construction, as a move costs a listener built anew.
SLOT_MOVE_FACTOR = 4
_RANGE_BYTES = 16
_SLOT_BYTES = 600
# RFC 6666 discard-only prefix: no TCP peer has one. Names an empty slot in the classifier.
_DISCARD = ipaddress.IPv6Network("100::/64")
COMPOSITE_FILTER = "envoy.filters.http.composite"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
CLASSIFIER_TYPE = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"


def block_of(net: IPNetwork) -> IPNetwork | None:
    """The block holding `net`, or None if `net` is broader than a block."""
    plen = BLOCK_PREFIXLEN[net.version]
    if net.prefixlen < plen:
        return None
    return net.supernet(new_prefix=plen) if net.prefixlen > plen else net


def placement(net: IPNetwork) -> tuple[IPNetwork, IPNetwork, int] | None:
    """(`block_of`, its `group_of`, its `slot_of`) for a prefix, or None if `net` is broader
    than a block: remembered per block (an initial sync places thousands of pods' addresses,
    ~64 per block)."""
    plen = BLOCK_PREFIXLEN[net.version]
    if net.prefixlen < plen:
        return None
    return _placement(net.version, int(net.network_address) >> (net.max_prefixlen - plen))


@functools.lru_cache(maxsize=65536)
def _placement(version: int, number: int) -> tuple[IPNetwork, IPNetwork, int]:
    plen = BLOCK_PREFIXLEN[version]
    block: IPNetwork
    if version == 4:
        block = ipaddress.IPv4Network((number << (32 - plen), plen))
    else:
        block = ipaddress.IPv6Network((number << (128 - plen), plen))
    return block, group_of(block), slot_of(block)


def group_of(net: IPNetwork) -> IPNetwork:
    """The group (`GROUP_PREFIXLEN`) holding a block, or the group a broader network starts."""
    plen = GROUP_PREFIXLEN[net.version]
    return net.supernet(new_prefix=plen) if net.prefixlen > plen else net


@functools.lru_cache(maxsize=256)
def group_slots(group: IPNetwork) -> tuple[tuple[IPNetwork, ...], ...]:
    """The blocks of a group, by slot (index i: the blocks `slot_of` sends to slot i)."""
    out: list[list[IPNetwork]] = [[] for _ in range(SOURCE_SLOTS)]
    for b in group.subnets(new_prefix=BLOCK_PREFIXLEN[group.version]):
        out[slot_of(b)].append(b)
    return tuple(tuple(x) for x in out)


@functools.lru_cache(maxsize=256)
def _group_ranges(group: IPNetwork) -> tuple[tuple[Any, ...], ...]:
    # A group's blocks as classifier ranges, by slot: built once (1,024 per group, and every
    # port's classifier lists them all). Shared, never mutated: extend() copies.
    return tuple(tuple(cidr(b) for b in sorted(blocks, key=prefix_sort_key)) for blocks in group_slots(group))


@functools.lru_cache(maxsize=64)
def _classifier_ranges(groups: frozenset[IPNetwork]) -> ip_pb2.IPMatcher:
    # The classifier's ranges for a set of groups, one range matcher per slot, without the
    # actions (which name the port's slots): every port of the node lists the same groups, so
    # each classifier copies this (one C++ copy) instead of building 1,024 ranges per group.
    # Shared, never mutated.
    ipm = ip_pb2.IPMatcher()
    ordered = sorted(groups, key=prefix_sort_key)
    for i in range(SOURCE_SLOTS):
        rm = ipm.range_matchers.add(exclusive=True)
        for g in ordered:
            rm.ranges.extend(_group_ranges(g)[i])
        if not ordered:
            rm.ranges.append(cidr(ipaddress.IPv6Network((int(_DISCARD.network_address) + i, 128))))
    return ipm


@functools.lru_cache(maxsize=64)
def _folded_ranges(groups: frozenset[IPNetwork], split: int) -> ip_pb2.IPMatcher:
    # `_classifier_ranges` with the range matchers of the slots one fold sends to one slot
    # merged: range matcher j lists the blocks of every slot i with fold(i, split) == j.
    whole = _classifier_ranges(groups)
    if split == SOURCE_SLOTS:
        return whole
    ipm = ip_pb2.IPMatcher()
    if split == 1 and groups:
        # One slot: the groups themselves, which their blocks tile (1,024 ranges a group
        # fewer for Envoy to build, per port).
        ipm.range_matchers.add(exclusive=True).ranges.extend(cidr(g) for g in sorted(groups, key=prefix_sort_key))
        return ipm
    for j in range(split):
        rm = ipm.range_matchers.add(exclusive=True)
        for i in range(j, SOURCE_SLOTS, split):
            rm.ranges.extend(whole.range_matchers[i].ranges)
    return ipm


def blocks_within(net: IPNetwork, groups: Iterable[IPNetwork]) -> Iterable[IPNetwork]:
    """The listed blocks (those of `groups`) inside a network broader than a block."""
    for g in groups:
        if g.version != net.version:
            continue
        if g.subnet_of(net):  # type: ignore[arg-type]
            for blocks in group_slots(g):
                yield from blocks
        elif net.subnet_of(g):  # type: ignore[arg-type]
            yield from net.subnets(new_prefix=BLOCK_PREFIXLEN[net.version])


def slot_of(block: IPNetwork) -> int:
    """The block number folded (XOR of its 7-bit pieces) into 0..127: consecutive blocks (node
    pod CIDRs usually are) land in different slots, and so do blocks of different /16s."""
    n = int(block.network_address) >> (block.max_prefixlen - block.prefixlen)
    slot = 0
    while n:
        slot ^= n & (SOURCE_SLOTS - 1)
        n >>= SOURCE_SLOTS.bit_length() - 1
    return slot


def classifier_name(ip: str, port: int, gen: int = 0, split: int = SOURCE_SLOTS) -> str:
    """The classifier of one incarnation `gen` of a port's listener, split `split` ways. A
    listener built anew (the port removed and proxied again, or its listener changed) takes
    new names for its classifier and slots: Envoy builds the filters of an ECDS resource once,
    under the listener that first subscribed to it, and a new listener that reused the names
    of a draining one kept none of the slots' subscriptions (every request 403 until the agent
    restarted). The split is in the name, and so in the listener (which names its classifier):
    Envoy subscribes to the slots a classifier names only while it builds the listener, never
    for a name a later classifier update brings (measured: such a slot stays at its deny-all
    default), so another split must come with a listener built anew."""
    return f"l7g_src_{ip}_{port}" + (f"_g{gen}" if gen else "") + ("" if split == SOURCE_SLOTS else f"_n{split}")


def slot_name(ip: str, port: int, slot: int, gen: int = 0, split: int = SOURCE_SLOTS) -> str:
    """Slot `slot` (or the rest) of a port whose blocks are split `split` ways (`fold`)."""
    return f"{classifier_name(ip, port, gen, split)}_{'rest' if slot == REST else slot}"


def slot_names(ip: str, port: int, gen: int = 0, split: int = SOURCE_SLOTS) -> list[str]:
    """Every ECDS resource of one port: the classifier, the slots, the rest."""
    return [classifier_name(ip, port, gen, split),
            *(slot_name(ip, port, i, gen, split) for i in (*range(split), REST))]


def fold(slot: int, split: int) -> int:
    """The slot, of a port split `split` ways (a power of two dividing 128), holding the blocks
    `slot_of` sends to `slot` of 128: a port with a small table needs few ECDS resources
    (Envoy's initial sync costs ~0.24 ms per resource here), a large one many small ones (a
    one-pod change re-sends one)."""
    return slot if slot == REST else slot & (split - 1)


def split_for(ranges: int, leaves: Iterable[tuple[int, int]], target: int) -> int:
    """The fewest slots (a power of two, at most 128) whose estimated size is at most `target`
    bytes each, for a port table of `ranges` source prefixes whose distinct non-world leaves
    have `(bytes, prefixes)` each. A leaf is copied into every slot holding one of its
    prefixes: into min(split, prefixes) slots at most."""
    sized = list(leaves)
    split = 1
    while split < SOURCE_SLOTS:
        est = _RANGE_BYTES * ranges + sum(size * min(split, n) for size, n in sized) + _SLOT_BYTES * split
        if est <= target * split:
            break
        split *= 2
    return split


def covering(block: IPNetwork, broad: Mapping[IPNetwork, int]) -> tuple[IPNetwork, int] | None:
    """The longest broad prefix holding `block`, with its identity."""
    best: tuple[IPNetwork, int] | None = None
    for net, ident in broad.items():
        if net.version == block.version and block.subnet_of(net):  # type: ignore[arg-type]
            if best is None or net.prefixlen > best[0].prefixlen:
                best = (net, ident)
    return best


def slot_prefixes(
    blocks: Iterable[IPNetwork],
    by_block: Mapping[IPNetwork, Mapping[IPNetwork, int]],
    broad: Mapping[IPNetwork, int],
) -> dict[int, list[IPNetwork]]:
    """The ipcache as seen by the slot holding `blocks`: by identity, the prefixes inside those
    blocks, and each block itself under the identity of the longest broad prefix holding it (what
    an address of the block that no longer prefix holds belongs to)."""
    out: dict[int, list[IPNetwork]] = defaultdict(list)
    for b in blocks:
        for net, ident in by_block.get(b, {}).items():
            out[ident].append(net)
        cover = covering(b, broad)
        if cover is not None and b not in by_block.get(b, {}):
            out[cover[1]].append(b)
    return {k: sorted(v, key=prefix_sort_key) for k, v in sorted(out.items())}


def rbac_filter_config(name: str, matcher: matcher_pb2.Matcher) -> core_extension_pb2.TypedExtensionConfig:
    """An ECDS resource: one RBAC filter deciding by `matcher`."""
    return core_extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(rbac_pb2.RBAC(matcher=matcher)))


@functools.lru_cache(maxsize=1)
def _slot_source() -> Any:
    # The same for every slot; copied into each action. A new listener warms until every slot
    # its classifier names has arrived (measured on Envoy 1.40: the old listener of the port,
    # if any, serves meanwhile), so no request meets a slot Envoy lacks; deny-all if a slot
    # does not arrive within the initial fetch timeout, or is removed.
    return ecds_source(RBAC_TYPE, deny_all_rbac(), warm=True)


def _run_slot(ip: str, port: int, slot: int, gen: int = 0, split: int = SOURCE_SLOTS) -> matcher_pb2.Matcher.OnMatch:
    act = composite_pb2.ExecuteFilterAction(
        dynamic_config=composite_pb2.DynamicConfig(name=slot_name(ip, port, slot, gen, split),
                                                   config_discovery=_slot_source())
    )
    return matcher_pb2.Matcher.OnMatch(action=typed_ext("slot", act))


def classifier_config(ip: str, port: int, blocks: Iterable[IPNetwork],
                      gen: int = 0, split: int = SOURCE_SLOTS) -> core_extension_pb2.TypedExtensionConfig:
    """The ECDS resource that sends each request to the RBAC of its source address's slot, of
    a port split `split` ways. Every block of the groups of `blocks` (`group_of`) is listed:
    the classifier changes only when a group appears or empties.

    Every slot is named (an empty one by a range no peer has), so Envoy subscribes to all of
    them when the listener first loads it and a new block never waits for a new subscription."""
    ipm = ip_pb2.IPMatcher()
    ipm.CopyFrom(_folded_ranges(frozenset(group_of(b) for b in blocks), split))
    for i, rm in enumerate(ipm.range_matchers):
        rm.on_match.CopyFrom(_run_slot(ip, port, i, gen, split))
    tree = matcher_pb2.Matcher.MatcherTree(
        input=typed_ext("direct-source-ip", network_inputs_pb2.DirectSourceIPInput()),
        custom_match=typed_ext("ip-matcher", ipm),
    )
    wrapper = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=matcher_pb2.Matcher(matcher_tree=tree, on_no_match=_run_slot(ip, port, REST, gen, split)),
        extension_config=core_extension_pb2.TypedExtensionConfig(
            name=COMPOSITE_FILTER, typed_config=pack(composite_pb2.Composite())
        ),
    )
    name = classifier_name(ip, port, gen, split)
    return core_extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(wrapper))


def source_index(
    prefixes: Mapping[int, Sequence[IPNetwork]],
) -> tuple[dict[IPNetwork, dict[IPNetwork, int]], dict[IPNetwork, int]]:
    """The ipcache split into blocks (block -> prefix -> identity) and broad prefixes."""
    by_block: dict[IPNetwork, dict[IPNetwork, int]] = defaultdict(dict)
    broad: dict[IPNetwork, int] = {}
    for ident, nets in prefixes.items():
        for net in nets:
            b = block_of(net)
            if b is None:
                broad[net] = ident
            else:
                by_block[b][net] = ident
    return dict(by_block), broad


def slot_table(
    slot: int,
    by_block: Mapping[IPNetwork, Mapping[IPNetwork, int]],
    broad: Mapping[IPNetwork, int],
    blocks: Iterable[IPNetwork] = (),
) -> dict[int, list[IPNetwork]]:
    """What a slot's RBAC decides on, by identity: `slot_prefixes` of its blocks, or for the
    rest (`slot == REST`) the broad prefixes. The same for every port of the node."""
    if slot != REST:
        return slot_prefixes(blocks, by_block, broad)
    table: dict[int, list[IPNetwork]] = defaultdict(list)
    for net, ident in sorted(broad.items(), key=lambda kv: prefix_sort_key(kv[0])):
        table[ident].append(net)
    return dict(table)


def source_slot_config(
    ip: str,
    port: int,
    slot: int,
    decide: Callable[[int], Decision],
    world: Decision,
    by_block: Mapping[IPNetwork, Mapping[IPNetwork, int]],
    broad: Mapping[IPNetwork, int],
    blocks: Iterable[IPNetwork] = (),
    *,
    auth_verified: bool = False,
    table: Mapping[int, Sequence[IPNetwork]] | None = None,
    memo: SlotMemo | None = None,
    gen: int = 0,
    named: AbstractSet[int] | None = None,
    split: int = SOURCE_SLOTS,
) -> core_extension_pb2.TypedExtensionConfig:
    """One slot's RBAC (`blocks` are the slot's blocks), or the rest's (`slot == REST`: the
    broad prefixes). `decide(identity)` is the port's decision for an identity. `table`: the
    slot's `slot_table`, if the caller has it (it is the same for every port). `memo`: for
    calls over one and the same ipcache (one flush), the RBAC already rendered for another port
    whose leaves are the same is reused (ports of replicas of one workload, ports without
    policy): rendering is deterministic, so the bytes are those a rendering would give. `named`:
    if given, the identities whose decision may differ from `world` (every other one decides as
    world), the only ones `decide` is asked about: a port's named peers are a few of the
    identities a slot holds."""
    if table is None:
        table = slot_table(slot, by_block, broad, blocks)
    if not table:
        return core_extension_pb2.TypedExtensionConfig(
            name=slot_name(ip, port, slot, gen, split), typed_config=_world_only(world, auth_verified)
        )
    peers = {}
    differs: dict[int, bool] = {}  # id(decision) -> != world: a slot's peers share a few decisions
    for ident in sorted(table) if named is None else sorted(table.keys() & named):
        d = world if ident == WORLD_ID else decide(ident)
        if d is world:
            continue
        ne = differs.get(id(d))
        if ne is None:
            ne = differs[id(d)] = d != world
        if ne:
            peers[ident] = d
    if memo is None:
        matcher = rbac_matcher(PortDecisions(world, peers), table, auth_verified=auth_verified)
        return rbac_filter_config(slot_name(ip, port, slot, gen, split), matcher)
    world_key = leaf_key(world, auth_verified)
    key = (slot if slot == REST else split * 1024 + slot, auth_verified, world_key,
           tuple((i, k) for i, d in peers.items() if (k := leaf_key(d, auth_verified)) != world_key))
    packed = memo.get(key)
    if packed is None:
        matcher = rbac_matcher(PortDecisions(world, peers), table, auth_verified=auth_verified)
        packed = memo[key] = pack(rbac_pb2.RBAC(matcher=matcher))
    return core_extension_pb2.TypedExtensionConfig(name=slot_name(ip, port, slot, gen, split), typed_config=packed)


@functools.lru_cache(maxsize=4096)
def _world_only(world: Decision, auth_verified: bool) -> any_pb2.Any:
    # The RBAC of a slot that holds no prefix, which is most slots of a port: world's decision
    # for every address. A port's slots are all rendered whenever what every peer shares
    # changes (a bulk apply does so for every port); built and packed once per decision, they
    # cost a copy each. Shared, never mutated: protobuf copies a message assigned to a field.
    return pack(rbac_pb2.RBAC(matcher=rbac_matcher(PortDecisions(world, {}), {}, auth_verified=auth_verified)))


def prefixes_by_identity(entries: Iterable[tuple[IPNetwork, int]]) -> dict[int, list[IPNetwork]]:
    out: dict[int, list[IPNetwork]] = defaultdict(list)
    for net, ident in entries:
        out[ident].append(net)
    return {k: sorted(v, key=prefix_sort_key) for k, v in sorted(out.items())}
