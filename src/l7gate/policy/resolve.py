"""Resolution: rules + identities → per-endpoint policy maps, kept up to date incrementally.

Theory of operation (after Cilium's repository → selector policy → map state pipeline):

1. Every rule's subject selector and peer selectors live in the `SelectorCache`.
2. An endpoint identity's *template* is computed from the set of rules that select it: per
   direction, default-deny, and a list of items `(peer selector | ANY, port/protocol,
   contribution)`. Templates do not mention peer identities, so endpoints selected by the same
   rules share one template.
3. An endpoint's *map* expands each template item over the identities its selector selects:
   `MapKey(peer, protocol, ports) → MapEntry(allow | deny | proxy with L7 rules, auth)`.
   Each key remembers which items contributed to it, and its entry is the merge of them:
   deny wins; allows are a union; no L7 rules in any allow means no L7 restriction; the
   strongest auth mode wins.
4. A new identity updates the selector cache, which reports the selectors that gained it; only
   the template items using those selectors are expanded for it (O(change)). If it is itself an
   endpoint, only its own map is computed. A policy change recomputes the templates and maps of
   the endpoints the old or the new rules select, and diffs them.

Every change returns a `PolicyDelta` (per endpoint and direction: keys upserted, keys deleted),
which is what incremental appliers (BPF maps, xDS) consume.

`Resolver` is not thread-safe: its owner serializes calls. The `EndpointPolicy` values it hands
out are immutable snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from enum import Enum
from types import MappingProxyType

from .evaluate import Layer, Verdict
from .labels import Labels
from .pathnorm import normalize_path
from .repository import Repository
from .selector import WILDCARD, EntitySelector, PeerSelector
from .selectorcache import SelectionChange, SelectorCache
from .types import (
    AuthMode,
    Direction,
    HTTPRequest,
    HTTPRule,
    L7Rules,
    Origin,
    Policy,
    PortProtocol,
    PortRange,
    Protocol,
    Rule,
)

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
class Contribution:
    deny: bool
    l7: L7Rules | None
    auth: AuthMode | None
    origin: Origin


@dataclass(frozen=True, slots=True)
class MapEntry:
    deny: bool
    l7: L7Rules | None  # None: no L7 restriction (always None for deny)
    redirect: bool  # send through the L7 proxy
    auth: AuthMode | None
    derived_from: tuple[str, ...]  # the rules behind it, "Kind/ns/name spec.ingress[0]"

    @property
    def action(self) -> str:
        if self.deny:
            return "deny"
        return "proxy" if self.redirect else "allow"


def merge(contribs: Iterable[Contribution]) -> MapEntry:
    """The entry a key gets from every rule that contributes to it (deny wins; allows are a
    union; no L7 restriction if any allow has none; the strongest auth mode)."""
    cs = frozenset(contribs)
    if len(cs) == 1:
        (c,) = cs
        # The common case, kept cheap: one rule's entry (its L7 rules are already canonical).
        if c.deny:
            return MapEntry(True, None, False, None, (str(c.origin),))
        return MapEntry(False, c.l7, c.l7 is not None, c.auth, (str(c.origin),))
    return _merge_many(cs)


@lru_cache(maxsize=16384)
def _merge_many(cs: frozenset[Contribution]) -> MapEntry:
    # Many keys (every peer a selector selects) share one set of contributions: merge it once.
    denies = [c for c in cs if c.deny]
    if denies:
        return MapEntry(True, None, False, None, tuple(sorted({str(c.origin) for c in denies})))
    redirect = any(c.l7 is not None for c in cs)
    l7: L7Rules | None = None
    if cs and all(c.l7 is not None for c in cs):
        rules: set[HTTPRule] = set()
        for c in cs:
            assert c.l7 is not None
            rules.update(c.l7.http)
        l7 = L7Rules.of(rules)
    modes = [c.auth for c in cs if c.auth is not None]
    auth = max(modes, key=lambda m: m.strength) if modes else None
    return MapEntry(False, l7, redirect, auth, tuple(sorted({str(c.origin) for c in cs})))


@dataclass(frozen=True, slots=True)
class TemplateItem:
    direction: Direction
    selector: PeerSelector | None  # None: every peer (ANY_PEER)
    port: PortProtocol
    contribution: Contribution


@dataclass(frozen=True, slots=True)
class Template:
    rules: tuple[Rule, ...]
    default_deny_ingress: bool
    default_deny_egress: bool
    items: tuple[TemplateItem, ...]

    def default_deny(self, direction: Direction) -> bool:
        return self.default_deny_ingress if direction is Direction.INGRESS else self.default_deny_egress


def build_template(rules: tuple[Rule, ...]) -> Template:
    items: list[TemplateItem] = []
    for rule in rules:
        for pr in rule.rules:
            selectors: tuple[PeerSelector | None, ...]
            if pr.peers is None:
                selectors = (None,)
            else:
                selectors = tuple(
                    None if isinstance(s, EntitySelector) and s.entity is WILDCARD.entity else s
                    for s in pr.peers
                )
            for port_rule in pr.effective_port_rules:
                contrib = Contribution(pr.deny, port_rule.l7, pr.auth, pr.origin)
                for sel in selectors:
                    for pp in port_rule.ports:
                        items.append(TemplateItem(pr.direction, sel, pp, contrib))
    return Template(
        rules,
        any(r.default_deny_ingress for r in rules),
        any(r.default_deny_egress for r in rules),
        tuple(items),
    )


@dataclass(frozen=True, slots=True)
class DirectionDelta:
    upserted: Mapping[MapKey, MapEntry]
    deleted: frozenset[MapKey]


@dataclass(slots=True)
class PolicyDelta:
    """What one resolver call changed, exactly: applying `removed_endpoints` (drop the whole
    map) and then `changes` (per endpoint and direction: upsert these keys, delete those) to
    the maps as they were before the call gives the maps after it. A new endpoint appears in
    `changes` for both directions, even when its maps are empty."""

    revision: int
    changes: dict[int, dict[Direction, DirectionDelta]] = field(default_factory=dict)
    removed_endpoints: set[int] = field(default_factory=set)
    # Per touched (endpoint, direction), each touched key's entry before the call (None: absent).
    _baseline: dict[tuple[int, Direction], dict[MapKey, MapEntry | None]] = field(
        default_factory=dict, repr=False
    )
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


class _EndpointState:
    __slots__ = ("identity", "template", "contribs", "entries")

    def __init__(self, identity: int, template: Template) -> None:
        self.identity = identity
        self.template = template
        self.contribs: dict[Direction, dict[MapKey, dict[int, Contribution]]] = {
            Direction.INGRESS: {},
            Direction.EGRESS: {},
        }
        self.entries: dict[Direction, dict[MapKey, MapEntry]] = {
            Direction.INGRESS: {},
            Direction.EGRESS: {},
        }


def _rule_id(rule: Rule) -> tuple[str, str]:
    return (rule.origin.policy, rule.origin.path)


class Resolver:
    """Owns the repository, the selector cache and every endpoint's resolved map."""

    def __init__(self, repository: Repository | None = None) -> None:
        self.repository = repository or Repository()
        self.cache = SelectorCache()
        self._rules: dict[tuple[str, str], Rule] = {}
        self._subject_users: dict[str, set[tuple[str, str]]] = {}
        self._endpoints: dict[int, _EndpointState] = {}
        self._templates: dict[frozenset[tuple[str, str]], Template] = {}
        # selector key → template item indexes using it, per template (by rule set)
        self._users: dict[str, dict[frozenset[tuple[str, str]], list[int]]] = {}
        self._template_endpoints: dict[frozenset[tuple[str, str]], set[int]] = {}
        for p in self.repository.policies():
            self._add_rules(p.rules)

    # -- queries ----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self.repository.revision

    @property
    def identities(self) -> Mapping[int, Labels]:
        return self.cache.identities

    def endpoints(self) -> list[int]:
        return sorted(self._endpoints)

    def endpoint_policy(self, identity: int) -> EndpointPolicy | None:
        st = self._endpoints.get(identity)
        if st is None:
            return None
        t = st.template
        return EndpointPolicy(
            identity,
            self.revision,
            tuple(sorted({r.origin.policy for r in t.rules})),
            t.default_deny_ingress,
            t.default_deny_egress,
            MappingProxyType(dict(sorted(st.entries[Direction.INGRESS].items()))),
            MappingProxyType(dict(sorted(st.entries[Direction.EGRESS].items()))),
        )

    def map_size(self) -> int:
        return sum(len(e) for st in self._endpoints.values() for e in st.entries.values())

    # -- identities and endpoints -------------------------------------------------------------

    def update_identities(
        self, upserted: Mapping[int, Labels], deleted: Iterable[int] = ()
    ) -> PolicyDelta:
        """Identities appeared, changed labels or went away (local or remote)."""
        deleted = list(deleted)
        changes = self.cache.update_identities(upserted, deleted)
        delta = PolicyDelta(self.revision)
        for key, change in changes.items():
            self._apply_selection_change(key, change, delta)
        # Endpoints whose own labels changed may now be selected by other rules.
        for ident in list(upserted):
            if ident in self._endpoints:
                self._recompute_endpoint(ident, delta)
        for ident in deleted:
            if ident in self._endpoints:
                self._drop_endpoint(ident, delta)
        return self._finish(delta)

    def add_endpoint(self, identity: int) -> PolicyDelta:
        """Start resolving policy for a local endpoint identity (its labels must be known)."""
        delta = PolicyDelta(self.revision)
        if identity in self._endpoints:
            return delta
        if identity not in self.cache.identities:
            raise KeyError(f"identity {identity} is not known; add its labels first")
        self._recompute_endpoint(identity, delta)
        return self._finish(delta)

    def remove_endpoint(self, identity: int) -> PolicyDelta:
        delta = PolicyDelta(self.revision)
        if identity in self._endpoints:
            self._drop_endpoint(identity, delta)
        return self._finish(delta)

    # -- policies ----------------------------------------------------------------------------

    def upsert_policy(self, policy: Policy) -> PolicyDelta:
        old = self.repository.upsert(policy)
        affected = self._affected_by(old.rules if old else ())
        if old is not None:
            self._remove_rules(old.rules)
        self._add_rules(policy.rules)
        affected |= self._affected_by(policy.rules)
        return self._recompute(affected)

    def delete_policy(self, key: str) -> PolicyDelta:
        old = self.repository.delete(key)
        if old is None:
            return PolicyDelta(self.revision)
        affected = self._affected_by(old.rules)
        self._remove_rules(old.rules)
        return self._recompute(affected)

    def recompute_all(self) -> PolicyDelta:
        """Recompute every endpoint from scratch (startup, and the benchmark's baseline)."""
        self._templates.clear()
        self._users.clear()
        self._template_endpoints.clear()
        return self._recompute(set(self._endpoints), force=True)

    # -- internals ---------------------------------------------------------------------------

    def _add_rules(self, rules: Iterable[Rule]) -> None:
        for rule in rules:
            rid = _rule_id(rule)
            self._rules[rid] = rule
            self.cache.add_selector(rule.subject)
            self._subject_users.setdefault(rule.subject.key, set()).add(rid)
            for pr in rule.rules:
                for sel in pr.peers or ():
                    self.cache.add_selector(sel)

    def _remove_rules(self, rules: Iterable[Rule]) -> None:
        for rule in rules:
            rid = _rule_id(rule)
            self._rules.pop(rid, None)
            users = self._subject_users.get(rule.subject.key)
            if users is not None:
                users.discard(rid)
                if not users:
                    del self._subject_users[rule.subject.key]
            self.cache.remove_selector(rule.subject)
            for pr in rule.rules:
                for sel in pr.peers or ():
                    self.cache.remove_selector(sel)
            stale = [k for k in self._templates if rid in k]
            for k in stale:
                self._forget_template(k)

    def _affected_by(self, rules: Iterable[Rule]) -> set[int]:
        out: set[int] = set()
        for rule in rules:
            out |= self.cache.selections_view(rule.subject.key) & self._endpoints.keys()
        return out

    def _selecting_rules(self, identity: int) -> frozenset[tuple[str, str]]:
        rids: set[tuple[str, str]] = set()
        for key, users in self._subject_users.items():
            if identity in self.cache.selections_view(key):
                rids |= users
        return frozenset(rids)

    def _template_for(self, rids: frozenset[tuple[str, str]]) -> Template:
        t = self._templates.get(rids)
        if t is None:
            rules = tuple(self._rules[r] for r in sorted(rids))
            t = build_template(rules)
            self._templates[rids] = t
            for idx, item in enumerate(t.items):
                if item.selector is not None:
                    self._users.setdefault(item.selector.key, {}).setdefault(rids, []).append(idx)
            self._template_endpoints[rids] = set()
        return t

    def _forget_template(self, rids: frozenset[tuple[str, str]]) -> None:
        t = self._templates.pop(rids, None)
        self._template_endpoints.pop(rids, None)
        if t is None:
            return
        for item in t.items:
            if item.selector is not None:
                per = self._users.get(item.selector.key)
                if per is not None:
                    per.pop(rids, None)
                    if not per:
                        del self._users[item.selector.key]

    def _expand(self, st: _EndpointState) -> None:
        for d in Direction:
            st.contribs[d].clear()
            st.entries[d].clear()
        for idx, item in enumerate(st.template.items):
            peers: Iterable[int]
            if item.selector is None:
                peers = (ANY_PEER,)
            else:
                peers = self.cache.selections_view(item.selector.key)
            per_dir = st.contribs[item.direction]
            for peer in peers:
                key = MapKey(peer, item.port.protocol, item.port.ports)
                per_dir.setdefault(key, {})[idx] = item.contribution
        for d in Direction:
            entries = st.entries[d]
            for key, cs in st.contribs[d].items():
                entries[key] = merge(cs.values())

    def _recompute_endpoint(self, identity: int, delta: PolicyDelta, force: bool = False) -> None:
        rids = self._selecting_rules(identity)
        template = self._template_for(rids)
        old = self._endpoints.get(identity)
        if old is not None and old.template is template and not force:
            return
        st = _EndpointState(identity, template)
        self._expand(st)
        if old is not None:
            oldrids = frozenset(_rule_id(r) for r in old.template.rules)
            eps = self._template_endpoints.get(oldrids)
            if eps is not None:
                eps.discard(identity)
            for d in Direction:
                base = delta._baseline.setdefault((identity, d), {})
                for k, e in old.entries[d].items():
                    base.setdefault(k, e)
        else:
            delta._new.add(identity)
        for d in Direction:
            base = delta._baseline.setdefault((identity, d), {})
            for k in st.entries[d]:
                base.setdefault(k, None)
        self._template_endpoints.setdefault(rids, set()).add(identity)
        self._endpoints[identity] = st

    def _drop_endpoint(self, identity: int, delta: PolicyDelta) -> None:
        st = self._endpoints.pop(identity)
        rids = frozenset(_rule_id(r) for r in st.template.rules)
        eps = self._template_endpoints.get(rids)
        if eps is not None:
            eps.discard(identity)
        for d in Direction:
            delta._baseline.pop((identity, d), None)
        delta._new.discard(identity)
        delta.removed_endpoints.add(identity)

    def _touch(self, delta: PolicyDelta, st: _EndpointState, d: Direction, key: MapKey) -> None:
        base = delta._baseline.setdefault((st.identity, d), {})
        if key not in base:
            base[key] = st.entries[d].get(key)

    def _finish(self, delta: PolicyDelta) -> PolicyDelta:
        """Turn the recorded baselines into exact per-key changes."""
        for (ident, d), base in sorted(delta._baseline.items()):
            st = self._endpoints.get(ident)
            if st is None:
                continue
            cur = st.entries[d]
            up = {k: cur[k] for k in sorted(base) if k in cur and cur[k] != base[k]}
            gone = frozenset(k for k in base if k not in cur and base[k] is not None)
            if up or gone or ident in delta._new:
                delta.changes.setdefault(ident, {})[d] = DirectionDelta(up, gone)
        for ident in delta._new:
            if ident in self._endpoints:
                per = delta.changes.setdefault(ident, {})
                for d in Direction:
                    per.setdefault(d, DirectionDelta({}, frozenset()))
        delta._baseline.clear()
        delta._new.clear()
        return delta

    def _recompute(self, affected: set[int], force: bool = False) -> PolicyDelta:
        delta = PolicyDelta(self.revision)
        for ident in sorted(affected):
            if ident in self._endpoints:
                self._recompute_endpoint(ident, delta, force=force)
        return self._finish(delta)

    def _apply_selection_change(self, key: str, change: SelectionChange, delta: PolicyDelta) -> None:
        for rids, idxs in list(self._users.get(key, {}).items()):
            for ident in list(self._template_endpoints.get(rids, ())):
                st = self._endpoints[ident]
                touched: dict[Direction, set[MapKey]] = {}
                for idx in idxs:
                    item = st.template.items[idx]
                    per_dir = st.contribs[item.direction]
                    for peer in change.removed:
                        k = MapKey(peer, item.port.protocol, item.port.ports)
                        cs = per_dir.get(k)
                        if cs is not None and cs.pop(idx, None) is not None:
                            touched.setdefault(item.direction, set()).add(k)
                    for peer in change.added:
                        k = MapKey(peer, item.port.protocol, item.port.ports)
                        per_dir.setdefault(k, {})[idx] = item.contribution
                        touched.setdefault(item.direction, set()).add(k)
                for d, keys in touched.items():
                    entries = st.entries[d]
                    for k in keys:
                        self._touch(delta, st, d, k)
                        cs = st.contribs[d].get(k)
                        if not cs:
                            st.contribs[d].pop(k, None)
                            entries.pop(k, None)
                        else:
                            entries[k] = merge(cs.values())


# -- the fast lookup, over a resolved map ------------------------------------------------------


class Action(str, Enum):
    ALLOW = "allow"  # everything on this port, no L7 restriction
    HTTP = "http"  # only requests matching `http`
    DENY = "deny"  # dropped at L3/L4
    AUTH_FAIL = "auth-fail"  # `test-always-fail`: never authenticated


@dataclass(frozen=True, slots=True)
class Decision:
    """What one endpoint's policy says about one peer on one port, before any request is seen.

    This is the unit every enforcement backend compiles: a BPF map value, an Envoy matcher leaf.
    `auth` is the mutual-authentication mode the peer must satisfy for ALLOW/HTTP.
    """

    action: Action
    http: tuple[HTTPRule, ...] = ()
    auth: AuthMode | None = None
    redirect: bool = False
    origins: tuple[str, ...] = ()
    reason: str = ""

    @property
    def auth_required(self) -> bool:
        return self.auth is AuthMode.REQUIRED

    @property
    def policies(self) -> tuple[str, ...]:
        return _pols(self.origins)


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
    costs O(entries of that peer), not O(map) — for backends that ask about every identity."""

    def __init__(self, policy: EndpointPolicy | None, direction: Direction, port: int, protocol: Protocol) -> None:
        self.policy = policy
        self.direction = direction
        self.any: list[MapEntry] = []
        self.by_peer: dict[int, list[MapEntry]] = {}
        if policy is None:
            return
        for k, e in policy.entries(direction).items():
            if k.protocol.covers(protocol) and k.ports.contains(port):
                if k.peer == ANY_PEER:
                    self.any.append(e)
                else:
                    self.by_peer.setdefault(k.peer, []).append(e)

    @property
    def named(self) -> list[int]:
        return sorted(self.by_peer)

    def decide(self, peer: int) -> Decision:
        if self.policy is None or not self.policy.policies:
            return decide_hits(self.policy, self.direction, [])
        return decide_hits(self.policy, self.direction, self.any + self.by_peer.get(peer, []))


def decide_hits(policy: EndpointPolicy | None, direction: Direction, hits: list[MapEntry]) -> Decision:
    d = direction.value
    if policy is None:
        return Decision(Action.DENY, reason=f"{d}: no policy computed for the endpoint yet")
    if not policy.policies:
        return Decision(Action.ALLOW, reason=f"{d}: no policy selects the endpoint")
    denies = [e for e in hits if e.deny]
    if denies:
        origins = tuple(sorted({o for e in denies for o in e.derived_from}))
        return Decision(Action.DENY, origins=origins, reason=f"{d}: denied by {', '.join(origins)}")
    if not hits:
        if policy.default_deny(direction):
            return Decision(
                Action.DENY, origins=policy.policies, reason=f"{d}: no map entry; default-deny"
            )
        return Decision(Action.ALLOW, reason=f"{d}: no map entry; not default-deny")
    origins = tuple(sorted({o for e in hits for o in e.derived_from}))
    modes = [e.auth for e in hits if e.auth is not None]
    mode = max(modes, key=lambda m: m.strength) if modes else None
    redirect = any(e.redirect for e in hits)
    if mode is AuthMode.ALWAYS_FAIL:
        return Decision(
            Action.AUTH_FAIL, auth=mode, redirect=redirect, origins=origins,
            reason=f"{d}: authentication test-always-fail",
        )
    if any(e.l7 is None for e in hits):
        return Decision(
            Action.ALLOW, auth=mode, redirect=redirect, origins=origins,
            reason=f"{d}: allowed by {', '.join(origins)}",
        )
    rules: set[HTTPRule] = set()
    for e in hits:
        assert e.l7 is not None
        rules.update(e.l7.http)
    return Decision(
        Action.HTTP, L7Rules.of(rules).http, mode, True, origins,
        f"{d}: HTTP rules of {', '.join(origins)}",
    )


def lookup(
    policy: EndpointPolicy | None,
    direction: Direction,
    peer: int,
    port: int,
    protocol: Protocol,
    request: HTTPRequest | None = None,
    authenticated: bool = False,
) -> Verdict:
    """The verdict one direction of one endpoint gives, read from its resolved map only.

    Tested against `evaluate`, the reference evaluator.
    """
    dec = decide(policy, direction, peer, port, protocol)
    d = direction.value
    pols = dec.policies
    if dec.action is Action.DENY:
        return Verdict(False, Layer.L3L4, (dec.reason,), pols)
    if dec.action is Action.AUTH_FAIL or (dec.auth_required and not authenticated):
        return Verdict(False, Layer.AUTH, (f"{d}: Authentication required",), pols, dec.redirect, True)
    if dec.action is Action.ALLOW or request is None:
        return Verdict(True, None, (dec.reason,), pols, dec.redirect, dec.auth_required)
    norm = normalize_path(request.path)
    if norm.rejected is not None:
        return Verdict(False, Layer.L7, (f"{d}: {norm.rejected}",), pols, True, dec.auth_required)
    if any(h.matches(request, norm.path) for h in dec.http):
        return Verdict(True, None, (f"{d}: HTTP rule matches",), pols, True, dec.auth_required)
    return Verdict(False, Layer.L7, (f"{d}: Policy denied (L7)",), pols, True, dec.auth_required)


def _pols(origins: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({o.split(" ", 1)[0] for o in origins}))
