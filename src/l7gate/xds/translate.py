"""Resolved policy → Envoy resources, built as protobuf messages (no JSON round trip).

Theory of operation. For every (local endpoint, proxied port) the agent asks `port_decisions`
what the endpoint's ingress map says about each peer identity on that port (`policy.decide`):
ALLOW, DENY, AUTH_FAIL or HTTP(rules). The decision `world` gets is the default: unknown
addresses are world. Only identities whose decision differs from world's are listed.

That table becomes RBAC `matcher`s (the unified matcher API), delivered over ECDS so a change
reaches the next request on an open connection (a listener change would not):

    DirectSourceIPInput ─ IPMatcher (longest prefix, every range exclusive)
       ├─ ranges of identities with decision A → action / nested HTTP matcher
       ├─ ranges of identities with decision B → ...
       └─ on_no_match → world's decision
    HTTP matcher: matcher_list, one predicate per HTTP rule (AND of :method, :path, :authority
       and header predicates, RE2 full match) → ALLOW; on_no_match → DENY (403)

At 10,000 identities one such matcher is ~0.7 MB, too much to re-send for one new pod, so a
port's table is split by source address into slots (see "source-address slots" below): a
classifier filter picks, by a trie lookup on the source address, the one RBAC filter (the slot
of the address's /26 or /122 block, or the "rest" for addresses in no block) that decides the
request. A change re-sends the slots it touches. The tunnel listener (mtls_translate) keeps the
single matcher per route over RDS (`route_configuration`).

The source is the peer's address as Envoy sees it on the socket (`direct_remote_ip`), never
X-Forwarded-For. The IP matcher is a trie, so the lookup cost does not grow with the number of
identities. Identities whose ranges sit inside a broader listed range with another decision
(a pod inside a `fromCIDR` prefix) are listed too, so longest-prefix match gives each address
its own identity's decision.

RBAC action names carry the verdict for flows: `allow|<policies>`, `deny-l3l4|<policies>`,
`deny-l7|<policies>`, `deny-auth|<policies>`.

Listener and cluster are per (endpoint, port) in loopback mode: the listener takes the pod's
address and port, the pod's server listens on the same address at `port + offset`, and the
route sends allowed requests there. All of this is pure: nothing here does I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, protocol_pb2
from envoy.config.core.v3 import extension_pb2 as core_extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import cidr_pb2, extension_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2, regex_pb2, string_pb2

from ..envoy_names import HTTP_PROTOCOL_OPTIONS
from ..policy.resolve import Action, Decision, EndpointPolicy, PortView
from ..policy.types import Direction, HeaderMatch, HTTPRule, Protocol

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

WORLD_ID = 2
RBAC_FILTER = "envoy.filters.http.rbac"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"


def _any(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _ext(name: str, msg: Message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=_any(msg))


# -- names ---------------------------------------------------------------------------------------


def listener_name(ip: str, port: int) -> str:
    return f"l7g_ep_{ip}_{port}"


def route_name(ip: str, port: int) -> str:
    return f"l7g_rc_{ip}_{port}"


def cluster_name(ip: str, port: int) -> str:
    return f"l7g_up_{ip}_{port}"


# -- decisions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortDecisions:
    """Per peer identity, what the endpoint's ingress policy decides on one port."""

    world: Decision
    peers: Mapping[int, Decision]  # only identities whose decision differs from world's
    everyone: bool = False  # peers no rule names differ from world: every identity is listed

    def for_identity(self, identity: int) -> Decision:
        return self.peers.get(identity, self.world)


def port_decisions(
    policy: EndpointPolicy | None, port: int, known_identities: Iterable[int]
) -> PortDecisions:
    """Decisions for every identity the ipcache knows, compressed to those that differ from
    world's. Peers not named by any map key share the decision of the ANY entries."""
    view = PortView(policy, Direction.INGRESS, port, Protocol.TCP)
    world = view.decide(WORLD_ID)
    if policy is None:
        return PortDecisions(world, {})
    named = view.named
    unnamed = view.decide(-1)
    peers: dict[int, Decision] = {}
    for ident in named:
        d = view.decide(ident)
        if d != world:
            peers[ident] = d
    if unnamed != world:
        named_set = set(named)
        for ident in known_identities:
            if ident not in named_set and ident != WORLD_ID:
                peers[ident] = unnamed
    return PortDecisions(world, dict(sorted(peers.items())), unnamed != world)


# -- RBAC matcher ----------------------------------------------------------------------------------


def _action(name: str, allow: bool) -> matcher_pb2.Matcher.OnMatch:
    act = rbac_config_pb2.Action(
        name=name,
        action=rbac_config_pb2.RBAC.Action.ALLOW if allow else rbac_config_pb2.RBAC.Action.DENY,
    )
    return matcher_pb2.Matcher.OnMatch(action=_ext("rbac-action", act))


def _header_predicate(header: str, value: string_pb2.StringMatcher) -> matcher_pb2.Matcher.MatcherList.Predicate:
    single = matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
        input=_ext("request-header", http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header)),
        value_match=value,
    )
    return matcher_pb2.Matcher.MatcherList.Predicate(single_predicate=single)


_RE2_SPECIAL = frozenset("\\.^$|?*+()[]{}")


def _regex(pattern: str) -> string_pb2.StringMatcher:
    """An RE2 full match. A pattern without any special character matches only itself, so it
    becomes an exact match: Envoy compiles a regex for every leaf of every slot it loads."""
    if not _RE2_SPECIAL.intersection(pattern):
        return string_pb2.StringMatcher(exact=pattern)
    return string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=pattern)
    )


def _header_match_predicate(h: HeaderMatch) -> matcher_pb2.Matcher.MatcherList.Predicate | None:
    if h.mismatch is not None:
        return None  # a mismatch action never denies (logged/rewritten instead)
    if h.value is None:
        return _header_predicate(h.name, _regex("(?s).*"))
    return _header_predicate(h.name, string_pb2.StringMatcher(exact=h.value))


def _rule_predicate(rule: HTTPRule) -> matcher_pb2.Matcher.MatcherList.Predicate | None:
    preds: list[matcher_pb2.Matcher.MatcherList.Predicate] = []
    if rule.method is not None:
        preds.append(_header_predicate(":method", _regex(rule.method)))
    if rule.path is not None:
        preds.append(_header_predicate(":path", _regex(rule.path)))
    if rule.host is not None:
        preds.append(_header_predicate(":authority", _regex(rule.host)))
    for h in rule.headers:
        p = _header_match_predicate(h)
        if p is not None:
            preds.append(p)
    if not preds:
        return None  # matches every request
    if len(preds) == 1:
        return preds[0]
    return matcher_pb2.Matcher.MatcherList.Predicate(
        and_matcher=matcher_pb2.Matcher.MatcherList.Predicate.PredicateList(predicate=preds)
    )


MAX_NAMED_POLICIES = 3


def _policies(d: Decision) -> str:
    """The policies behind a decision, for flows; at most a few (Envoy copies the action name
    into every access log entry, and a default deny can involve every policy on the pod).

    No count of the others: world's default deny names the endpoint's policies and sits in
    every source-address slot, so a count would make any policy added to or removed from the
    endpoint re-send every slot; without it, only a change among the first names does."""
    pols = d.policies
    if len(pols) <= MAX_NAMED_POLICIES:
        return ",".join(pols)
    return ",".join(pols[:MAX_NAMED_POLICIES]) + ",+more"


def decision_on_match(d: Decision, *, auth_verified: bool = False) -> matcher_pb2.Matcher.OnMatch:
    """One decision as a matcher leaf (or a nested HTTP matcher)."""
    pols = _policies(d)
    if d.action is Action.DENY:
        return _action(f"deny-l3l4|{pols}", False)
    if d.action is Action.AUTH_FAIL or (d.auth_required and not auth_verified):
        # Loopback mode cannot verify a peer's identity cryptographically: fail closed.
        return _action(f"deny-auth|{pols}", False)
    if d.action is Action.ALLOW:
        return _action(f"allow|{pols}", True)
    preds = [_rule_predicate(r) for r in d.http]
    if any(p is None for p in preds):
        return _action(f"allow|{pols}", True)
    field_matchers = [
        matcher_pb2.Matcher.MatcherList.FieldMatcher(predicate=p, on_match=_action(f"allow|{pols}", True))
        for p in preds
        if p is not None
    ]
    nested = matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(matchers=field_matchers),
        on_no_match=_action(f"deny-l7|{pols}", False),
    )
    return matcher_pb2.Matcher.OnMatch(matcher=nested)


def _cidr(net: IPNetwork) -> cidr_pb2.CidrRange:
    return cidr_pb2.CidrRange(
        address_prefix=str(net.network_address), prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen)
    )


def _cidr_int(version: int, addr: int, prefixlen: int) -> cidr_pb2.CidrRange:
    if version == 4:
        text = f"{addr >> 24}.{(addr >> 16) & 255}.{(addr >> 8) & 255}.{addr & 255}"
    else:
        text = str(ipaddress.IPv6Address(addr))
    return cidr_pb2.CidrRange(address_prefix=text, prefix_len=wrappers_pb2.UInt32Value(value=prefixlen))


def _aligned_blocks(addrs: Sequence[int], bits: int) -> list[tuple[int, int]]:
    """Sorted distinct host addresses → the fewest aligned (start, prefix length) blocks that
    hold exactly them (what `ipaddress.collapse_addresses` gives, on integers)."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(addrs)
    while i < n:
        j = i
        while j + 1 < n and addrs[j + 1] == addrs[j] + 1:
            j += 1
        lo, hi = addrs[i], addrs[j]
        while lo <= hi:
            size = lo & -lo if lo else 1 << bits
            while size > hi - lo + 1:
                size >>= 1
            out.append((lo, bits - size.bit_length() + 1))
            lo += size
        i = j + 1
    return out


def _net_key(n: IPNetwork) -> tuple[int, int, int]:
    return (n.version, int(n.network_address), n.prefixlen)


@functools.lru_cache(maxsize=65536)
def _leaf(d: Decision, auth_verified: bool) -> matcher_pb2.Matcher.OnMatch:
    # Shared, never mutated: protobuf copies a message assigned to a field. A slot re-renders
    # hundreds of decisions that did not change; building each leaf once saves most of that.
    return decision_on_match(d, auth_verified=auth_verified)


@functools.lru_cache(maxsize=65536)
def _leaf_key(d: Decision, auth_verified: bool) -> bytes:
    return bytes(_leaf(d, auth_verified).SerializeToString(deterministic=True))


def renders_alike(a: Decision, b: Decision, *, auth_verified: bool = False) -> bool:
    """Whether two decisions become the same matcher leaf (e.g. default denies whose policy
    lists differ only past the names an action carries)."""
    return a is b or _leaf_key(a, auth_verified) == _leaf_key(b, auth_verified)


def rbac_matcher(
    decisions: PortDecisions,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    *,
    auth_verified: bool = False,
) -> matcher_pb2.Matcher:
    """The source-address matcher for one (endpoint, port). `prefixes` is the ipcache, by
    identity. Deterministic: equal inputs give byte-identical output."""
    # Grouped by the leaf a decision becomes: decisions that render alike share one range
    # matcher, and one that renders like world's needs none.
    world_key = _leaf_key(decisions.world, auth_verified)
    leaf_of: dict[bytes, Decision] = {world_key: decisions.world}
    groups: dict[bytes, list[IPNetwork]] = defaultdict(list)
    any_broad = False
    for ident, d in decisions.peers.items():
        nets = prefixes.get(ident)
        if nets:
            key = _leaf_key(d, auth_verified)
            if key == world_key:
                continue
            leaf_of.setdefault(key, d)
            groups[key].extend(nets)
            any_broad = any_broad or any(n.prefixlen < n.max_prefixlen for n in nets)
    # Longest-prefix match must land on each address's own identity: list any prefix that sits
    # inside a broader listed range whose decision is not its own.
    broad: list[IPNetwork] = []
    if any_broad:
        listed = {net: key for key, nets in groups.items() for net in nets}
        broad = [n for n in listed if n.prefixlen < n.max_prefixlen]
        for ident, all_nets in prefixes.items():
            d = decisions.for_identity(ident)
            key = _leaf_key(d, auth_verified)
            for net in all_nets:
                if net in listed:
                    continue
                for b in broad:
                    if b.version == net.version and net.subnet_of(b) and listed[b] != key:  # type: ignore[arg-type]
                        leaf_of.setdefault(key, d)
                        groups[key].append(net)
                        listed[net] = key
                        break
    # Ranges are added in place: a leaf is copied once into the matcher (building each
    # IPRangeMatcher apart copied it twice, which was most of a slot's cost when leaves hold
    # hundreds of HTTP rules).
    ip_matcher = ip_pb2.IPMatcher()
    if not broad:
        # Only host prefixes (pods): merge runs of addresses with one decision into the exact
        # CIDR blocks they fill (pod IPs come from node CIDRs, so runs are common). The blocks
        # cover exactly the same addresses, so no unknown address changes decision. Integer
        # arithmetic: a slot is re-rendered for every change to it.
        blocks: list[tuple[tuple[int, int, int], list[tuple[int, int, int]], Decision]] = []
        for key, nets in groups.items():
            merged: list[tuple[int, int, int]] = []
            for version, bits in ((4, 32), (6, 128)):
                same = sorted({int(n.network_address) for n in nets if n.version == version})
                merged.extend((version, lo, plen) for lo, plen in _aligned_blocks(same, bits))
            blocks.append((merged[0], merged, leaf_of[key]))
        for _, merged, d in sorted(blocks, key=lambda b: b[0]):
            ip_matcher.range_matchers.add(
                ranges=[_cidr_int(*k) for k in merged], on_match=_leaf(d, auth_verified), exclusive=True
            )
    else:
        for key, nets in sorted(groups.items(), key=lambda kv: min(_net_key(n) for n in kv[1])):
            ip_matcher.range_matchers.add(
                ranges=[_cidr(n) for n in sorted(set(nets), key=_net_key)],
                on_match=_leaf(leaf_of[key], auth_verified),
                exclusive=True,
            )
    if not ip_matcher.range_matchers:
        # An IP matcher needs at least one range: 255.255.255.255/32 is never a TCP peer.
        ip_matcher.range_matchers.add(
            ranges=[_cidr(ipaddress.ip_network("255.255.255.255/32"))],
            on_match=_leaf(decisions.world, auth_verified),
            exclusive=True,
        )
    tree = matcher_pb2.Matcher.MatcherTree(
        input=_ext("direct-source-ip", network_inputs_pb2.DirectSourceIPInput()),
        custom_match=_ext("ip-matcher", ip_matcher),
    )
    return matcher_pb2.Matcher(
        matcher_tree=tree,
        on_no_match=_leaf(decisions.world, auth_verified),
    )


# -- source-address slots (ECDS) -----------------------------------------------------------------
#
# One port's source-address table is split so that a change re-sends a small piece: every prefix
# at least as long as a block (/26, /122) lies in exactly one block, and a block lies in slot
# `slot_of(block)` (its number folded into 0..SOURCE_SLOTS-1). Prefixes shorter than a block are
# "broad".
#
#   HCM http filter <classifier> (ECDS, no default: the listener warms until it arrives)
#     ExtensionWithMatcher: DirectSourceIPInput ─ IPMatcher
#        ├─ blocks of slot 0 → composite ExecuteFilterAction(dynamic_config <slot 0>)
#        ├─ ...  (every slot is named, the empty ones by a discard-prefix range)
#        └─ on_no_match     → ExecuteFilterAction(dynamic_config <rest>)
#     <slot i>: RBAC(matcher = rbac_matcher over the prefixes in slot i's blocks, plus each block
#               itself as the longest broad prefix covering it; on_no_match world's decision)
#     <rest>:   RBAC(matcher = rbac_matcher over the broad prefixes; on_no_match world's decision)
#
# Exactly one RBAC filter decides each request. Longest-prefix semantics are kept: an address in a
# block is decided by the prefixes in its block or, failing those, by the longest broad prefix
# holding the block (whole blocks are inside or outside any broad prefix); an address in no block
# is decided by the broad prefixes alone. A slot Envoy has not received yet uses its default
# config, deny-all (fail closed).

# Sizes, measured at 1,000 policies x 10,000 identities (bench_envoy's BIG world, one distinct
# decision per pod in a block): Envoy's cost to take a slot grows with its leaves (~40 µs each);
# with /26 blocks over 128 slots a slot holds ~64-128 pods and one new pod is ACKed ~4-6 ms
# after it is sent (/24 over 64: ~12 ms). Every slot is a resource per port, even when empty
# (~0.6 kB).
SOURCE_SLOTS = 128  # a power of two
BLOCK_PREFIXLEN = {4: 26, 6: 122}
REST = -1  # the slot of addresses in no block
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


def slot_of(block: IPNetwork) -> int:
    """The block number folded (XOR of its 7-bit pieces) into 0..127: consecutive blocks (node
    pod CIDRs usually are) land in different slots, and so do blocks of different /16s."""
    n = int(block.network_address) >> (block.max_prefixlen - block.prefixlen)
    slot = 0
    while n:
        slot ^= n & (SOURCE_SLOTS - 1)
        n >>= SOURCE_SLOTS.bit_length() - 1
    return slot


def classifier_name(ip: str, port: int) -> str:
    return f"l7g_src_{ip}_{port}"


def slot_name(ip: str, port: int, slot: int) -> str:
    return f"l7g_src_{ip}_{port}_{'rest' if slot == REST else slot}"


def slot_names(ip: str, port: int) -> list[str]:
    """Every ECDS resource of one port: the classifier, the slots, the rest."""
    return [classifier_name(ip, port), *(slot_name(ip, port, i) for i in (*range(SOURCE_SLOTS), REST))]


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
    return {k: sorted(v, key=_net_key) for k, v in sorted(out.items())}


def rbac_filter_config(name: str, matcher: matcher_pb2.Matcher) -> core_extension_pb2.TypedExtensionConfig:
    """An ECDS resource: one RBAC filter deciding by `matcher`."""
    return core_extension_pb2.TypedExtensionConfig(name=name, typed_config=_any(rbac_pb2.RBAC(matcher=matcher)))


def deny_all_rbac() -> rbac_pb2.RBAC:
    # An ALLOW policy set with no policies denies everything (action name "none").
    return rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.Action.ALLOW))


def _ecds_source(type_url: str, default: Message | None = None) -> config_source_pb2.ExtensionConfigSource:
    src = config_source_pb2.ExtensionConfigSource(config_source=_ads(), type_urls=[type_url])
    if default is not None:
        src.default_config.CopyFrom(_any(default))
        src.apply_default_config_without_warming = True
    return src


def _run_slot(ip: str, port: int, slot: int) -> matcher_pb2.Matcher.OnMatch:
    act = composite_pb2.ExecuteFilterAction(
        dynamic_config=composite_pb2.DynamicConfig(
            name=slot_name(ip, port, slot), config_discovery=_ecds_source(RBAC_TYPE, deny_all_rbac())
        )
    )
    return matcher_pb2.Matcher.OnMatch(action=_ext("slot", act))


def classifier_config(ip: str, port: int, blocks: Iterable[IPNetwork]) -> core_extension_pb2.TypedExtensionConfig:
    """The ECDS resource that sends each request to the RBAC of its source address's slot.

    Every slot is named (an empty one by a range no peer has), so Envoy subscribes to all of
    them when the listener first loads it and a new block never waits for a new subscription."""
    by_slot: dict[int, list[IPNetwork]] = defaultdict(list)
    for b in blocks:
        by_slot[slot_of(b)].append(b)
    range_matchers = []
    for i in range(SOURCE_SLOTS):
        nets = sorted(by_slot.get(i, []), key=_net_key) or [
            ipaddress.IPv6Network((int(_DISCARD.network_address) + i, 128))
        ]
        range_matchers.append(
            ip_pb2.IPMatcher.IPRangeMatcher(
                ranges=[_cidr(n) for n in nets], on_match=_run_slot(ip, port, i), exclusive=True
            )
        )
    tree = matcher_pb2.Matcher.MatcherTree(
        input=_ext("direct-source-ip", network_inputs_pb2.DirectSourceIPInput()),
        custom_match=_ext("ip-matcher", ip_pb2.IPMatcher(range_matchers=range_matchers)),
    )
    wrapper = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=matcher_pb2.Matcher(matcher_tree=tree, on_no_match=_run_slot(ip, port, REST)),
        extension_config=core_extension_pb2.TypedExtensionConfig(
            name=COMPOSITE_FILTER, typed_config=_any(composite_pb2.Composite())
        ),
    )
    name = classifier_name(ip, port)
    return core_extension_pb2.TypedExtensionConfig(name=name, typed_config=_any(wrapper))


# -- resources ---------------------------------------------------------------------------------


def route_configuration(name: str, upstream_cluster: str, matcher: matcher_pb2.Matcher) -> route_pb2.RouteConfiguration:
    """A route carrying its RBAC matcher per route (RDS): the tunnel listener's shape, paired
    with `http_connection_manager`."""
    per_route = rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(matcher=matcher))
    route = route_components_pb2.Route(
        name="l7gate",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=upstream_cluster),
        typed_per_filter_config={RBAC_FILTER: _any(per_route)},
    )
    vhost = route_components_pb2.VirtualHost(name="l7gate", domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def upstream_route(name: str, upstream_cluster: str) -> route_pb2.RouteConfiguration:
    """A proxied port's route: everything to the pod. Policy is in the port's ECDS slots."""
    route = route_components_pb2.Route(
        name="l7gate",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=upstream_cluster),
    )
    vhost = route_components_pb2.VirtualHost(name="l7gate", domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _hcm(
    stat_prefix: str, rds_name: str, policy_filter: hcm_pb2.HttpFilter, access_logs: Sequence[Message]
) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=rds_name),
        http_filters=[
            policy_filter,
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_any(router_pb2.Router())),
        ],
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        access_log=list(access_logs),
        # WebSocket upgrades pass where the rules allow the request that asks for them (the
        # policy filter judges it like any request); other upgrades (h2c, CONNECT) are refused
        # or ignored by Envoy. As Cilium's proxy does.
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
    )


def http_connection_manager(stat_prefix: str, rds_name: str, access_logs: Sequence[Message] = ()) -> hcm_pb2.HttpConnectionManager:
    """HCM whose RBAC policy comes per route (`route_configuration`)."""
    # Filter-level RBAC denies everything: a route without its per-route policy fails closed.
    rbac = hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=_any(deny_all_rbac()))
    return _hcm(stat_prefix, rds_name, rbac, access_logs)


def source_http_connection_manager(
    stat_prefix: str, rds_name: str, classifier: str, access_logs: Sequence[Message] = ()
) -> hcm_pb2.HttpConnectionManager:
    """HCM whose policy is the ECDS classifier `classifier` and its slots (`classifier_config`).
    No default config: the listener stays warming, taking no connection, until it arrives."""
    cls = hcm_pb2.HttpFilter(name=classifier, config_discovery=_ecds_source(CLASSIFIER_TYPE))
    return _hcm(stat_prefix, rds_name, cls, access_logs)


def listener(
    name: str, ip: str, port: int, rds_name: str, access_logs: Sequence[Message] = (), transparent: bool = False
) -> listener_pb2.Listener:
    """A proxied port's listener; its policy filter is the port's classifier (ECDS)."""
    hcm = source_http_connection_manager(name, rds_name, classifier_name(ip, port), access_logs)
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_any(hcm))]
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
        ),
        filter_chains=[chain],
        # Kernel mode: the pod's address is not local to the node; IP_TRANSPARENT lets Envoy
        # listen on it and answer from it, for the connections the datapath marks for it.
        transparent=wrappers_pb2.BoolValue(value=True) if transparent else None,
    )




def downstream_protocol_options() -> any_pb2.Any:
    """The upstream protocol follows the downstream one: HTTP/1.1 stays HTTP/1.1, h2c stays h2c
    (gRPC). Envoy's default is HTTP/1.1 upstream whatever came in, which breaks every gRPC call
    to a server that speaks only HTTP/2. Cilium's proxy configures its clusters the same way."""
    return _any(http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        )
    ))


def static_cluster(name: str, ip: str, port: int) -> cluster_pb2.Cluster:
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
            )
        )
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[lb])],
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: downstream_protocol_options()},
    )


@dataclass(frozen=True, slots=True)
class ProxiedPort:
    """One (local endpoint, port) the node's Envoy fronts in loopback mode."""

    identity: int
    ip: str
    port: int
    upstream_ip: str
    upstream_port: int
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class PortResources:
    listener: listener_pb2.Listener
    route: route_pb2.RouteConfiguration
    cluster: cluster_pb2.Cluster
    extension_configs: Mapping[str, core_extension_pb2.TypedExtensionConfig]  # ECDS, by name


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
) -> core_extension_pb2.TypedExtensionConfig:
    """One slot's RBAC (`blocks` are the slot's blocks), or the rest's (`slot == REST`: the
    broad prefixes). `decide(identity)` is the port's decision for an identity."""
    if slot == REST:
        table: dict[int, list[IPNetwork]] = defaultdict(list)
        for net, ident in sorted(broad.items(), key=lambda kv: _net_key(kv[0])):
            table[ident].append(net)
    else:
        table = slot_prefixes(blocks, by_block, broad)
    if not table:
        return core_extension_pb2.TypedExtensionConfig(
            name=slot_name(ip, port, slot), typed_config=_world_only(world, auth_verified)
        )
    peers = {}
    for ident in sorted(table):
        d = world if ident == WORLD_ID else decide(ident)
        if d != world:
            peers[ident] = d
    matcher = rbac_matcher(PortDecisions(world, peers), table, auth_verified=auth_verified)
    return rbac_filter_config(slot_name(ip, port, slot), matcher)


@functools.lru_cache(maxsize=4096)
def _world_only(world: Decision, auth_verified: bool) -> any_pb2.Any:
    # The RBAC of a slot that holds no prefix, which is most slots of a port: world's decision
    # for every address. A port's slots are all rendered whenever what every peer shares
    # changes (a bulk apply does so for every port); built and packed once per decision, they
    # cost a copy each. Shared, never mutated: protobuf copies a message assigned to a field.
    return _any(rbac_pb2.RBAC(matcher=rbac_matcher(PortDecisions(world, {}), {}, auth_verified=auth_verified)))


def source_configs(
    ip: str,
    port: int,
    decisions: PortDecisions,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    *,
    auth_verified: bool = False,
) -> dict[str, core_extension_pb2.TypedExtensionConfig]:
    """Every ECDS resource of one port at once (the publisher renders them one by one)."""
    by_block, broad = source_index(prefixes)
    by_slot: dict[int, list[IPNetwork]] = defaultdict(list)
    for b in by_block:
        by_slot[slot_of(b)].append(b)
    out = {classifier_name(ip, port): classifier_config(ip, port, by_block)}
    for i in (*range(SOURCE_SLOTS), REST):
        cfg = source_slot_config(
            ip, port, i, decisions.for_identity, decisions.world, by_block, broad, by_slot.get(i, ()),
            auth_verified=auth_verified,
        )
        out[cfg.name] = cfg
    return out


def port_resources(
    pp: ProxiedPort,
    policy: EndpointPolicy | None,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    access_logs: Sequence[Message] = (),
) -> PortResources:
    decisions = port_decisions(policy, pp.port, prefixes.keys())
    return PortResources(
        listener(listener_name(pp.ip, pp.port), pp.ip, pp.port, route_name(pp.ip, pp.port), access_logs, pp.transparent),
        upstream_route(route_name(pp.ip, pp.port), cluster_name(pp.ip, pp.port)),
        static_cluster(cluster_name(pp.ip, pp.port), pp.upstream_ip, pp.upstream_port),
        source_configs(pp.ip, pp.port, decisions, prefixes),
    )


def prefixes_by_identity(entries: Iterable[tuple[IPNetwork, int]]) -> dict[int, list[IPNetwork]]:
    out: dict[int, list[IPNetwork]] = defaultdict(list)
    for net, ident in entries:
        out[ident].append(net)
    return {k: sorted(v, key=_net_key) for k, v in sorted(out.items())}
