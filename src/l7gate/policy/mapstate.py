"""Map state: what a resolved policy is, and the one decision read from it.

An endpoint's resolved policy (`EndpointPolicy`) is, per direction, a map
`MapKey(peer, protocol, ports) → MapEntry(allow | deny | proxy with L7 rules, auth, origins)`,
after Cilium's policy map state. The resolver (`resolve.Resolver`) computes the maps and hands
out `PolicyDelta`s (keys upserted and deleted per endpoint and direction); every enforcement
backend reads them through `decide` (one (peer, port) of a map) or a `PortView` (one port of a
map, indexed by peer, kept up to date by applying the deltas' keys with `PortView.set`). Both
end in `decide_hits`, the only place a `Decision` is made.

A rule's origin stays typed (`types.Origin`) from the parser to the decision; it becomes text
only where it is shown.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

from .evaluate import Layer, Verdict
from .fqdn import NameMatch, server_name_matches
from .pathnorm import normalize_path
from .types import AuthMode, Direction, HTTPRequest, HTTPRule, L7Rules, Origin, PortRange, Protocol

ANY_PEER = 0


@dataclass(frozen=True, slots=True, order=True)
class MapKey:
    peer: int  # identity, or ANY_PEER
    protocol: Protocol
    ports: PortRange

    def covers(self, peer: int, port: int, protocol: Protocol) -> bool:
        return (
            (self.peer == ANY_PEER or self.peer == peer)
            and self.protocol.covers(protocol)
            and self.ports.contains(port)
        )

    def __str__(self) -> str:
        who = "*" if self.peer == ANY_PEER else str(self.peer)
        return f"{who} {self.ports}/{self.protocol.value}"


@dataclass(frozen=True, slots=True)
class MapEntry:
    deny: bool
    l7: L7Rules | None  # None: no L7 restriction (always None for deny)
    redirect: bool  # send through the L7 proxy
    auth: AuthMode | None
    derived_from: tuple[Origin, ...]  # the rules behind it, sorted as text

    @property
    def action(self) -> str:
        if self.deny:
            return "deny"
        return "proxy" if self.redirect else "allow"


@dataclass(frozen=True, slots=True)
class Contribution:
    deny: bool
    l7: L7Rules | None
    auth: AuthMode | None
    origin: Origin
    # The entry of a key this contribution alone puts something on: one object, shared by
    # every such key (so that consumers can tell equal entries by identity, see `PortView`).
    alone: MapEntry = field(init=False, compare=False, hash=False, repr=False)
    # Hashed once: merges put contributions in frozensets, and L7 rules hash deep.
    _hash: int = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.deny:
            entry = MapEntry(True, None, False, None, (self.origin,))
        else:
            # One rule's L7 rules are already canonical.
            entry = MapEntry(False, self.l7, self.l7 is not None, self.auth, (self.origin,))
        object.__setattr__(self, "alone", entry)
        object.__setattr__(self, "_hash", hash((self.deny, self.l7, self.auth, self.origin)))

    def __hash__(self) -> int:
        return self._hash


def merge(contribs: Iterable[Contribution]) -> MapEntry:
    """The entry a key gets from every rule that contributes to it (deny wins; allows are a
    union; no L7 restriction if any allow has none; the strongest auth mode)."""
    cs = tuple(contribs)
    first = cs[0]
    if all(c is first for c in cs):
        return first.alone  # the common case, kept cheap: nothing hashed
    uniq = frozenset(cs)
    if len(uniq) == 1:
        return first.alone
    return _merge_many(uniq)


@lru_cache(maxsize=16384)
def _merge_many(cs: frozenset[Contribution]) -> MapEntry:
    # Many keys (every peer a selector selects) share one set of contributions: merge it once.
    denies = [c for c in cs if c.deny]
    if denies:
        return MapEntry(True, None, False, None, tuple(sorted({c.origin for c in denies}, key=str)))
    redirect = any(c.l7 is not None for c in cs)
    l7: L7Rules | None = None
    if cs and all(c.l7 is not None for c in cs):
        rules: set[HTTPRule] = set()
        names: set[NameMatch] = set()
        sni: set[NameMatch] = set()
        for c in cs:
            assert c.l7 is not None
            rules.update(c.l7.http)
            names.update(c.l7.dns)
            sni.update(c.l7.sni)
        l7 = L7Rules.of(rules, names, sni)
    modes = [c.auth for c in cs if c.auth is not None]
    auth = max(modes, key=lambda m: m.strength) if modes else None
    return MapEntry(False, l7, redirect, auth, tuple(sorted({c.origin for c in cs}, key=str)))




@dataclass(frozen=True, slots=True)
class DirectionDelta:
    upserted: Mapping[MapKey, MapEntry]
    deleted: frozenset[MapKey]


@dataclass(slots=True)
class PolicyDelta:
    """What one resolver call changed, exactly: applying `removed_endpoints` (drop the whole
    map) and then `changes` (per endpoint and direction: upsert these keys, delete those) to
    the maps as they were before the call gives the maps after it. A new endpoint appears in
    `changes` for both directions, even when its maps are empty; so does an endpoint whose
    policies or default-deny changed when none of its keys did."""

    revision: int
    changes: dict[int, dict[Direction, DirectionDelta]] = field(default_factory=dict)
    removed_endpoints: set[int] = field(default_factory=set)
    # Per touched (endpoint, direction), each touched key's entry before the call (None: absent).
    _baseline: dict[tuple[int, Direction], dict[MapKey, MapEntry | None]] = field(
        default_factory=dict, repr=False
    )
    # Endpoints that must appear in `changes` even without key changes (new, or new metadata).
    _new: set[int] = field(default_factory=set, repr=False)

    @property
    def empty(self) -> bool:
        return not self.changes and not self.removed_endpoints

    def entries_changed(self) -> int:
        return sum(
            len(d.upserted) + len(d.deleted) for per in self.changes.values() for d in per.values()
        )


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """An immutable snapshot of one endpoint identity's resolved policy."""

    identity: int
    revision: int
    policies: tuple[str, ...]
    default_deny_ingress: bool
    default_deny_egress: bool
    ingress: Mapping[MapKey, MapEntry]
    egress: Mapping[MapKey, MapEntry]

    def entries(self, direction: Direction) -> Mapping[MapKey, MapEntry]:
        return self.ingress if direction is Direction.INGRESS else self.egress

    def default_deny(self, direction: Direction) -> bool:
        return self.default_deny_ingress if direction is Direction.INGRESS else self.default_deny_egress


def key_order(k: MapKey) -> tuple[int, str, int, int]:
    # MapKey's own ordering, without a generated __lt__ call per comparison.
    return (k.peer, k.protocol.value, k.ports.lo, k.ports.hi)


class _SortedItems(ItemsView[MapKey, MapEntry]):
    __slots__ = ("_keys", "_get")

    def __init__(self, m: SortedMap) -> None:
        super().__init__(m)
        self._keys = m._keys
        self._get = m._d.__getitem__

    def __iter__(self) -> Iterator[tuple[MapKey, MapEntry]]:
        return zip(self._keys, map(self._get, self._keys))


class SortedMap(Mapping[MapKey, MapEntry]):
    """A read-only copy of one direction of an endpoint's map that iterates in key order.

    Built from the resolver's live dict and its sorted key list, which the resolver keeps in
    order as keys come and go: a snapshot costs two C-level copies, not a sort."""

    __slots__ = ("_d", "_keys")

    def __init__(self, entries: dict[MapKey, MapEntry], order: list[MapKey]) -> None:
        self._d = dict(entries)
        self._keys = tuple(order)

    def __getitem__(self, key: MapKey) -> MapEntry:
        return self._d[key]

    def __iter__(self) -> Iterator[MapKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def items(self) -> _SortedItems:
        return _SortedItems(self)

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self.items())}}}"




# -- the decision, over a resolved map ----------------------------------------------------------


class Action(str, Enum):
    ALLOW = "allow"  # everything on this port, no L7 restriction
    HTTP = "http"  # only requests matching `http`
    DENY = "deny"  # dropped at L3/L4
    AUTH_FAIL = "auth-fail"  # `test-always-fail`: never authenticated


@dataclass(frozen=True, slots=True)
class Decision:
    """What one endpoint's policy says about one peer on one port, before any request is seen.

    This is the unit every enforcement backend compiles: a BPF map value, an Envoy matcher leaf.
    `auth` is the mutual-authentication mode the peer must satisfy for ALLOW/HTTP. `origins`
    are the rules behind it; `policies` the names of the policies behind it (for a default
    deny, which no rule states, the endpoint's policies).
    """

    action: Action
    http: tuple[HTTPRule, ...] = ()
    auth: AuthMode | None = None
    redirect: bool = False
    origins: tuple[Origin, ...] = ()
    reason: str = ""
    policies: tuple[str, ...] = ()
    # DNS rules (`rules.dns`, egress to port 53): the names a query may ask for, through the
    # node's DNS proxy. With HTTP: the union of both kinds of L7 rules on the port.
    dns: tuple[NameMatch, ...] = ()
    # TLS server names (`serverNames`): a TLS connection whose SNI one of them matches is
    # allowed as a whole (its bytes are not read); `http` then judges only plain-text requests,
    # and a connection of the other kind than the rules expect is refused.
    sni: tuple[NameMatch, ...] = ()
    # The hash, computed once: decisions key the matcher caches of every backend, and hashing
    # one anew walks all its HTTP rules and origins (most of a bulk apply's xDS cost was that).
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        h = self._hash
        if not h:
            h = hash((self.action, self.http, self.auth, self.redirect, self.origins, self.reason,
                      self.policies, self.dns, self.sni)) or 1
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def auth_required(self) -> bool:
        return self.auth is AuthMode.REQUIRED


def tunnel_needed(d: Decision, protocol: Protocol = Protocol.TCP) -> bool:
    """Whether an ingress decision sends a remote peer through the mTLS tunnel: allowed, with
    mutual auth required, and something the tunnel carries. HTTP rules: the requests (the
    HTTP variant). An L3/L4 allow over TCP: the connection's bytes (the TCP variant, one
    HTTP/2 CONNECT stream per connection). An L3/L4 allow over UDP, SCTP or ICMP stays on the
    mutual-auth handshake path, in plain text."""
    if d.auth is not AuthMode.REQUIRED:
        return False
    return d.action is Action.HTTP or (d.action is Action.ALLOW and protocol is Protocol.TCP)


def tunnel_tcp(d: Decision) -> bool:
    """A tunnelled decision that takes the TCP variant (any bytes, not only HTTP requests)."""
    return tunnel_needed(d) and d.action is Action.ALLOW


def decide(
    policy: EndpointPolicy | None, direction: Direction, peer: int, port: int, protocol: Protocol
) -> Decision:
    """The decision one direction of one endpoint's resolved map gives for (peer, port).

    `policy is None` means no policy has been computed for the endpoint yet: deny (fail closed).
    A computed policy that no rule contributes to allows everything.
    """
    if policy is None or not policy.policies:
        return decide_hits(policy, direction, [])
    hits = [e for k, e in policy.entries(direction).items() if k.covers(peer, port, protocol)]
    return decide_hits(policy, direction, hits)


class PortView:
    """One endpoint's map for one direction, port and protocol, indexed by peer: `decide(peer)`
    costs O(entries of that peer), not O(map), for backends that ask about every identity.

    A long-lived view follows the resolver: `set` applies one key of a `PolicyDelta` (None:
    deleted) and `set_policy` the endpoint's new snapshot, so nothing is rebuilt from the
    whole map."""

    __slots__ = ("policy", "direction", "port", "protocol", "any", "by_peer", "_memo")

    def __init__(
        self, policy: EndpointPolicy | None, direction: Direction, port: int, protocol: Protocol = Protocol.TCP
    ) -> None:
        self.policy = policy
        self.direction = direction
        self.port = port
        self.protocol = protocol
        self.any: dict[MapKey, MapEntry] = {}
        self.by_peer: dict[int, dict[MapKey, MapEntry]] = {}
        # Peers with the same entries get the same decision (the resolver shares one entry
        # object among equal keys); keyed by the entries' ids. Each value keeps its entries
        # alive, so that an id in a key is never reused by another object.
        self._memo: dict[tuple[int, ...], tuple[list[MapEntry], Decision]] = {}
        if policy is not None:
            for k, e in policy.entries(direction).items():
                if self.covers(k):
                    self.set(k, e)

    def covers(self, key: MapKey) -> bool:
        """Whether `key` is about this view's port and protocol."""
        return key.protocol.covers(self.protocol) and key.ports.contains(self.port)

    def set(self, key: MapKey, entry: MapEntry | None) -> None:
        """Apply one changed key (`entry is None`: deleted). The caller checks `covers`."""
        if key.peer == ANY_PEER:
            target = self.any
            self._memo.clear()
        else:
            target = self.by_peer.setdefault(key.peer, {})
        if entry is None:
            target.pop(key, None)
            if key.peer != ANY_PEER and not target:
                del self.by_peer[key.peer]
        else:
            target[key] = entry

    def set_policy(self, policy: EndpointPolicy | None) -> bool:
        """Take the endpoint's new snapshot, whose keys were applied with `set`. Returns whether
        what decisions depend on besides the keys (the policies, default deny) changed: then
        every peer's decision may have changed, also for peers without keys of their own."""
        changed = _meta(policy, self.direction) != _meta(self.policy, self.direction)
        if changed:
            self._memo.clear()
        self.policy = policy
        return changed

    @property
    def named(self) -> list[int]:
        return sorted(self.by_peer)

    def decide(self, peer: int) -> Decision:
        if self.policy is None or not self.policy.policies:
            return decide_hits(self.policy, self.direction, [])
        own = self.by_peer.get(peer)
        hits = [*self.any.values(), *own.values()] if own else list(self.any.values())
        key = tuple(map(id, hits))
        got = self._memo.get(key)
        if got is not None:
            return got[1]
        if len(self._memo) > 2 * len(self.by_peer) + 1024:
            self._memo.clear()  # entries replaced since: drop what they pinned
        d = decide_hits(self.policy, self.direction, hits)
        self._memo[key] = (hits, d)
        return d


def _meta(policy: EndpointPolicy | None, direction: Direction) -> object:
    """What of a policy, besides its map, a decision depends on."""
    return None if policy is None else (policy.policies, policy.default_deny(direction))


def _names(origins: Iterable[Origin]) -> tuple[str, ...]:
    return tuple(sorted({o.policy for o in origins}))


def _text(origins: Iterable[Origin]) -> str:
    return ", ".join(map(str, origins))


def decide_hits(policy: EndpointPolicy | None, direction: Direction, hits: list[MapEntry]) -> Decision:
    """The decision of the entries `hits` (every key of one direction of `policy` that covers
    the peer and port): deny wins; then test-always-fail; an allow without L7 rules; else the
    union of the HTTP rules. No entry: default deny, or allow."""
    d = direction.value
    if policy is None:
        return Decision(Action.DENY, reason=f"{d}: no policy computed for the endpoint yet")
    if not policy.policies:
        return Decision(Action.ALLOW, reason=f"{d}: no policy selects the endpoint")
    denies = [e for e in hits if e.deny]
    if denies:
        origins = tuple(sorted({o for e in denies for o in e.derived_from}, key=str))
        return Decision(Action.DENY, origins=origins, reason=f"{d}: denied by {_text(origins)}",
                        policies=_names(origins))
    if not hits:
        if policy.default_deny(direction):
            return Decision(
                Action.DENY, reason=f"{d}: no map entry; default-deny", policies=policy.policies
            )
        return Decision(Action.ALLOW, reason=f"{d}: no map entry; not default-deny")
    origins = tuple(sorted({o for e in hits for o in e.derived_from}, key=str))
    pols = _names(origins)
    modes = [e.auth for e in hits if e.auth is not None]
    mode = max(modes, key=lambda m: m.strength) if modes else None
    redirect = any(e.redirect for e in hits)
    if mode is AuthMode.ALWAYS_FAIL:
        return Decision(
            Action.AUTH_FAIL, auth=mode, redirect=redirect, origins=origins,
            reason=f"{d}: authentication test-always-fail", policies=pols,
        )
    if any(e.l7 is None for e in hits):
        return Decision(
            Action.ALLOW, auth=mode, redirect=redirect, origins=origins,
            reason=f"{d}: allowed by {_text(origins)}", policies=pols,
        )
    rules: set[HTTPRule] = set()
    names: set[NameMatch] = set()
    sni: set[NameMatch] = set()
    for e in hits:
        assert e.l7 is not None
        rules.update(e.l7.http)
        names.update(e.l7.dns)
        sni.update(e.l7.sni)
    l7 = L7Rules.of(rules, names, sni)
    kinds = " and ".join(k for k, v in (("HTTP", l7.http), ("DNS", l7.dns), ("TLS server name", l7.sni)) if v)
    return Decision(
        Action.HTTP, l7.http, mode, True, origins,
        f"{d}: {kinds or 'HTTP'} rules of {_text(origins)}", pols, dns=l7.dns, sni=l7.sni,
    )


def lookup(
    policy: EndpointPolicy | None,
    direction: Direction,
    peer: int,
    port: int,
    protocol: Protocol,
    request: HTTPRequest | None = None,
    authenticated: bool = False,
    tls_sni: str | None = None,
) -> Verdict:
    """The verdict one direction of one endpoint gives, read from its resolved map only.
    `tls_sni`: the connection is TLS with this server name ("" for none), judged by the
    `serverNames` of the port instead of its HTTP rules.

    Tested against `evaluate`, the reference evaluator.
    """
    dec = decide(policy, direction, peer, port, protocol)
    d = direction.value
    pols = dec.policies
    if dec.action is Action.DENY:
        return Verdict(False, Layer.L3L4, (dec.reason,), pols)
    if dec.action is Action.AUTH_FAIL or (dec.auth_required and not authenticated):
        return Verdict(False, Layer.AUTH, (f"{d}: Authentication required",), pols, dec.redirect, True)
    if dec.action is Action.ALLOW or (request is None and tls_sni is None):
        return Verdict(True, None, (dec.reason,), pols, dec.redirect, dec.auth_required)
    if tls_sni is not None:
        if any(server_name_matches(m, tls_sni) for m in dec.sni):
            return Verdict(True, None, (f"{d}: TLS server name {tls_sni!r} matches",), pols, True, dec.auth_required)
        what = f"TLS server name {tls_sni!r}" if tls_sni else "a TLS connection without a server name (SNI)"
        return Verdict(False, Layer.L7, (f"{d}: Policy denied (L7): {what} matches no serverNames",), pols, True,
                       dec.auth_required)
    assert request is not None
    if dec.sni:
        # Cilium: where any rule requires a server name, all traffic to that peer and port
        # must be TLS, whatever the HTTP rules of other rules say
        return Verdict(False, Layer.L7, (f"{d}: Policy denied (L7): plain text where serverNames require TLS",),
                       pols, True, dec.auth_required)
    norm = normalize_path(request.path)
    if norm.rejected is not None:
        return Verdict(False, Layer.L7, (f"{d}: {norm.rejected}",), pols, True, dec.auth_required)
    if any(h.matches(request, norm.path) for h in dec.http):
        return Verdict(True, None, (f"{d}: HTTP rule matches",), pols, True, dec.auth_required)
    return Verdict(False, Layer.L7, (f"{d}: Policy denied (L7)",), pols, True, dec.auth_required)
