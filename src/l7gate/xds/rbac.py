"""Resolved policy → RBAC matchers: what an endpoint's ingress map decides per peer identity
on one port, and that table as an Envoy RBAC `matcher` (the unified matcher API).

Theory of operation. For every (local endpoint, proxied port) the agent asks `port_decisions`
what the endpoint's ingress map says about each peer identity on that port (`policy.decide`):
ALLOW, DENY, AUTH_FAIL or HTTP(rules). The decision `world` gets is the default: unknown
addresses are world. Only identities whose decision differs from world's are listed.

That table becomes an RBAC `matcher` (`rbac_matcher`), delivered over ECDS so a change
reaches the next request on an open connection (a listener change would not):

    DirectSourceIPInput ─ IPMatcher (longest prefix, every range exclusive)
       ├─ ranges of identities with decision A → action / nested HTTP matcher
       ├─ ranges of identities with decision B → ...
       └─ on_no_match → world's decision
    HTTP matcher: matcher_list, one predicate per HTTP rule (AND of :method, :path, :authority
       and header predicates, RE2 full match) → ALLOW; on_no_match → DENY (403). Rules that
       differ only in their path share one predicate, their paths one alternation
       `(?:a)|(?:b)` (as many as Envoy's RE2 program-size limit needs): a decision is repeated
       in every slot holding one of its peers, and Envoy's work on a node's slots grows with
       their bytes (`_rules_predicates`)

A proxied port's table is split by source address into slots, one such matcher each
(`source_slots`); the tunnel listener (`mtls_translate`) keys its leaves (`decision_on_match`)
by the peer certificate instead.

The source is the peer's address as Envoy sees it on the socket (`direct_remote_ip`), never
X-Forwarded-For. The IP matcher is a trie, so the lookup cost does not grow with the number of
identities. Identities whose ranges sit inside a broader listed range with another decision
(a pod inside a `fromCIDR` prefix) are listed too, so longest-prefix match gives each address
its own identity's decision.

RBAC action names carry the verdict for flows: `allow|<policies>`, `deny-l3l4|<policies>`,
`deny-l7|<policies>`, `deny-auth|<policies>`. All of this is pure: nothing here does I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import wrappers_pb2
from xds.core.v3 import cidr_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2, regex_pb2, string_pb2

from ..envoy_names import EGRESS_ACTION_PREFIX as EGRESS_ACTION_PREFIX
from ..identity.ipcache import IPNetwork, prefix_sort_key
from ..identity.numeric import WORLD
from ..policy.fqdn import SERVER_NAME_RE2, server_name_re2
from ..policy.httpverdict import named_policies
from ..policy.regex import MAX_PROGRAM_SIZE, compile_regex_size
from ..policy.mapstate import Action, Decision, EndpointPolicy, MapEntry, MapKey, PortView
from ..policy.types import Direction, HeaderMatch, HTTPRule, Protocol
from .pb import cidr, typed_ext

WORLD_ID = WORLD  # the reserved identity of every address outside the cluster


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
    policy: EndpointPolicy | None, port: int, known_identities: Iterable[int],
    direction: Direction = Direction.INGRESS,
) -> PortDecisions:
    """Decisions for every identity the ipcache knows, compressed to those that differ from
    world's. Peers not named by any map key share the decision of the ANY entries. Egress:
    the peers are destinations."""
    view = PortView(policy, direction, port, Protocol.TCP)
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


def sni_range(k: MapKey, e: MapEntry, max_range: int) -> tuple[int, int] | None:
    """The TCP ports (lo, hi) one map entry puts `serverNames` on, or None (ranges wider than
    `max_range` are refused by the parser)."""
    if (e.redirect and not e.deny and e.l7 is not None and e.l7.sni and k.protocol.covers(Protocol.TCP)
            and k.ports.hi - k.ports.lo < max_range):
        return k.ports.lo, k.ports.hi
    return None


def sni_ports(entries: Mapping[MapKey, MapEntry], max_range: int) -> set[int]:
    """The TCP ports a direction of a resolved map has `serverNames` on (a TLS chain each), a
    range's ports one by one."""
    out: set[int] = set()
    for k, e in entries.items():
        r = sni_range(k, e, max_range)
        if r is not None:
            out.update(range(r[0], r[1] + 1))
    return out


# -- RBAC matcher ----------------------------------------------------------------------------------


def _action(name: str, allow: bool) -> matcher_pb2.Matcher.OnMatch:
    act = rbac_config_pb2.Action(
        name=name,
        action=rbac_config_pb2.RBAC.Action.ALLOW if allow else rbac_config_pb2.RBAC.Action.DENY,
    )
    return matcher_pb2.Matcher.OnMatch(action=typed_ext("rbac-action", act))


def _header_predicate(header: str, value: string_pb2.StringMatcher) -> matcher_pb2.Matcher.MatcherList.Predicate:
    single = matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
        input=typed_ext("request-header", http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header)),
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


def _rule_predicate(method: str | None, path: str | None, host: str | None,
                    headers: Iterable[HeaderMatch]) -> matcher_pb2.Matcher.MatcherList.Predicate | None:
    preds: list[matcher_pb2.Matcher.MatcherList.Predicate] = []
    if method is not None:
        preds.append(_header_predicate(":method", _regex(method)))
    if path is not None:
        preds.append(_header_predicate(":path", _regex(path)))
    if host is not None:
        preds.append(_header_predicate(":authority", _regex(host)))
    for h in headers:
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


def _alternation(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else "|".join(f"(?:{p})" for p in paths)


def _path_alternations(paths: Iterable[str]) -> list[str]:
    """`paths` (RE2, each within Envoy's program-size limit) packed, in order, into as few
    alternations `(?:a)|(?:b)|...` as fit that limit. A full match of an alternation is a full
    match of one of its patterns (RE2 scopes a flag group like `(?s)` to its own group)."""
    unique = list(dict.fromkeys(paths))
    if len(unique) > 2 and compile_regex_size(_alternation(unique)) <= MAX_PROGRAM_SIZE:
        return [_alternation(unique)]  # the usual case, all in one: one compile, not one per path
    out: list[str] = []
    run: list[str] = []
    for path in unique:
        if run and compile_regex_size(_alternation([*run, path])) > MAX_PROGRAM_SIZE:
            out.append(_alternation(run))
            run = []
        run.append(path)
    if run:
        out.append(_alternation(run))
    return out


def _rules_predicates(rules: Sequence[HTTPRule]) -> list[matcher_pb2.Matcher.MatcherList.Predicate] | None:
    """The predicates of one decision's HTTP rules (any of them allows), or None when a rule
    matches every request. Rules that differ only in their path become one predicate, their
    paths one alternation (as many as Envoy's regex limit needs): a decision sits in every slot
    holding one of its peers, and Envoy's work on a node's slots grows with their bytes and
    regexes (a bulk policy's three GET rules: one predicate instead of three)."""
    groups: dict[tuple[str | None, str | None, tuple[HeaderMatch, ...]], list[str] | None] = {}
    for r in rules:
        key = (r.method, r.host, r.headers)
        if r.path is None:
            groups[key] = None  # any path: the others of its group add nothing
        elif key not in groups:
            groups[key] = [r.path]
        elif (paths := groups[key]) is not None:
            paths.append(r.path)
    out: list[matcher_pb2.Matcher.MatcherList.Predicate] = []
    for (method, host, headers), paths in groups.items():
        for path in [None] if paths is None else _path_alternations(paths):
            p = _rule_predicate(method, path, host, headers)
            if p is None:
                return None
            out.append(p)
    return out




def _server_name_leaf(d: Decision, pols: str, prefix: str) -> matcher_pb2.Matcher.OnMatch:
    """A TLS connection's decision under `serverNames`: its SNI (the TLS inspector's) must match
    one pattern; no SNI, or HTTP rules only (which a TLS connection cannot meet), denies."""
    deny = _action(f"{prefix}deny-l7|{pols}", False)
    if not d.sni:
        return deny

    def sni_regex(regex: str) -> matcher_pb2.Matcher.MatcherList.Predicate:
        return matcher_pb2.Matcher.MatcherList.Predicate(
            single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
                input=typed_ext("server-name", network_inputs_pb2.ServerNameInput()),
                value_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=regex)),
            ))

    # a well-formed name (no trailing dot, no empty label, ASCII) that one pattern matches
    patterns = "|".join(f"(?:{server_name_re2(m.match_pattern or '')})" for m in d.sni)
    field = matcher_pb2.Matcher.MatcherList.FieldMatcher(
        predicate=matcher_pb2.Matcher.MatcherList.Predicate(
            and_matcher=matcher_pb2.Matcher.MatcherList.Predicate.PredicateList(
                predicate=[sni_regex(SERVER_NAME_RE2), sni_regex(patterns)])),
        on_match=_action(f"{prefix}allow|{pols}", True))
    return matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(matchers=[field]), on_no_match=deny))


def decision_on_match(d: Decision, *, auth_verified: bool = False, prefix: str = "",
                      tls: bool = False) -> matcher_pb2.Matcher.OnMatch:
    """One decision as a matcher leaf (or a nested HTTP matcher): `policy.httpverdict.request_verdict`
    as Envoy's matcher, with the same action names (after `prefix`: EGRESS_ACTION_PREFIX for
    the egress proxy's verdicts). `tls`: for a network RBAC filter judging a TLS connection
    by its server name (`serverNames`) instead of HTTP requests."""
    pols = named_policies(d)
    if d.action is Action.DENY:
        return _action(f"{prefix}deny-l3l4|{pols}", False)
    if d.action is Action.AUTH_FAIL or (d.auth_required and not auth_verified):
        # Loopback mode cannot verify a peer's identity cryptographically: fail closed.
        return _action(f"{prefix}deny-auth|{pols}", False)
    if d.action is Action.ALLOW:
        return _action(f"{prefix}allow|{pols}", True)
    if tls:
        return _server_name_leaf(d, pols, prefix)
    if not d.http or d.sni:
        # serverNames (Cilium: then all traffic to that peer and port must be TLS), or DNS
        # rules only: no plain-text request is allowed
        return _action(f"{prefix}deny-l7|{pols}", False)
    preds = _rules_predicates(d.http)
    if preds is None:
        return _action(f"{prefix}allow|{pols}", True)
    allow = _action(f"{prefix}allow|{pols}", True)
    field_matchers = [matcher_pb2.Matcher.MatcherList.FieldMatcher(predicate=p, on_match=allow) for p in preds]
    nested = matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(matchers=field_matchers),
        on_no_match=_action(f"{prefix}deny-l7|{pols}", False),
    )
    return matcher_pb2.Matcher.OnMatch(matcher=nested)


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


@functools.lru_cache(maxsize=65536)
def _leaf(d: Decision, auth_verified: bool, prefix: str = "", tls: bool = False) -> matcher_pb2.Matcher.OnMatch:
    # Shared, never mutated: protobuf copies a message assigned to a field. A slot re-renders
    # hundreds of decisions that did not change; building each leaf once saves most of that.
    return decision_on_match(d, auth_verified=auth_verified, prefix=prefix, tls=tls)


@functools.lru_cache(maxsize=65536)
def _leaf_key(d: Decision, auth_verified: bool, tls: bool = False) -> bytes:
    return bytes(_leaf(d, auth_verified, "", tls).SerializeToString(deterministic=True))


def leaf_key(d: Decision, auth_verified: bool = False) -> bytes:
    """The bytes of the matcher leaf a decision becomes: equal keys, equal leaves."""
    return _leaf_key(d, auth_verified)


def renders_alike(a: Decision, b: Decision, *, auth_verified: bool = False) -> bool:
    """Whether two decisions become the same matcher leaf (e.g. default denies whose policy
    lists differ only past the names an action carries)."""
    return a is b or _leaf_key(a, auth_verified) == _leaf_key(b, auth_verified)


def rbac_matcher(
    decisions: PortDecisions,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    *,
    auth_verified: bool = False,
    destination: bool = False,
    prefix: str = "",
    tls: bool = False,
) -> matcher_pb2.Matcher:
    """The source-address matcher for one (endpoint, port). `prefixes` is the ipcache, by
    identity. Deterministic: equal inputs give byte-identical output. `destination`: matched
    on the destination address instead (an egress policy's peers); `prefix`: of every action
    name (`decision_on_match`)."""
    # Grouped by the leaf a decision becomes: decisions that render alike share one range
    # matcher, and one that renders like world's needs none.
    world_key = _leaf_key(decisions.world, auth_verified, tls)
    leaf_of: dict[bytes, Decision] = {world_key: decisions.world}
    groups: dict[bytes, list[IPNetwork]] = defaultdict(list)
    any_broad = False
    for ident, d in decisions.peers.items():
        nets = prefixes.get(ident)
        if nets:
            key = _leaf_key(d, auth_verified, tls)
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
            key = _leaf_key(d, auth_verified, tls)
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
                ranges=[_cidr_int(*k) for k in merged], on_match=_leaf(d, auth_verified, prefix, tls), exclusive=True
            )
    else:
        for key, nets in sorted(groups.items(), key=lambda kv: min(prefix_sort_key(n) for n in kv[1])):
            ip_matcher.range_matchers.add(
                ranges=[cidr(n) for n in sorted(set(nets), key=prefix_sort_key)],
                on_match=_leaf(leaf_of[key], auth_verified, prefix, tls),
                exclusive=True,
            )
    if not ip_matcher.range_matchers:
        # An IP matcher needs at least one range: 255.255.255.255/32 is never a TCP peer.
        ip_matcher.range_matchers.add(
            ranges=[cidr(ipaddress.ip_network("255.255.255.255/32"))],
            on_match=_leaf(decisions.world, auth_verified, prefix, tls),
            exclusive=True,
        )
    tree = matcher_pb2.Matcher.MatcherTree(
        input=(typed_ext("destination-ip", network_inputs_pb2.DestinationIPInput()) if destination
               else typed_ext("direct-source-ip", network_inputs_pb2.DirectSourceIPInput())),
        custom_match=typed_ext("ip-matcher", ip_matcher),
    )
    return matcher_pb2.Matcher(
        matcher_tree=tree,
        on_no_match=_leaf(decisions.world, auth_verified, prefix, tls),
    )


def deny_all_rbac() -> rbac_pb2.RBAC:
    # An ALLOW policy set with no policies denies everything (action name "none").
    return rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.Action.ALLOW))
