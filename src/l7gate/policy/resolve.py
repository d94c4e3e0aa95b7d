"""Resolution: rules + identities → per-endpoint policy maps, kept up to date incrementally.

Theory of operation (after Cilium's repository → selector policy → map state pipeline):

1. Every rule's subject selector and peer selectors live in the `SelectorCache`. A registered
   rule is compiled once into its template items `(peer selector | ANY, port/protocol,
   contribution)`; item i of a rule has the contribution id `base + i`, fixed for as long as
   that rule is registered (`CompiledRule`).
2. An endpoint identity's *template* is the set of rules that select it: per direction,
   default-deny, and the rules' items. Templates do not mention peer identities, so endpoints
   selected by the same rules share one template.
3. An endpoint's *map* expands each template item over the identities its selector selects:
   `MapKey(peer, protocol, ports) → MapEntry(allow | deny | proxy with L7 rules, auth)`.
   Each key remembers which contribution ids put something on it, and its entry is the merge
   of them: deny wins; allows are a union; no L7 rules in any allow means no L7 restriction;
   the strongest auth mode wins.
4. A new identity updates the selector cache, which reports the selectors that gained it; only
   the items of the rules using those selectors are expanded for it, in the endpoints whose
   templates hold those rules (O(change)). If it is itself an endpoint, only its own map is
   computed.
5. A policy change swaps the changed rules. Each endpoint the old or the new rules select gets
   the template of its new rule set, and its map changes by the difference only: the items of
   the rules that left are taken off their keys, those of the rules that joined are added, and
   only the keys they touch are merged again. The old rules' selectors are released after
   that, so those diffs read the selections the items were expanded over, and a selector the
   new rules use again is never rebuilt.

6. Named ports (`port: http`, `namedports`) are resolved when an item is expanded: an ingress
   item on the endpoint's own named ports (`MapKey(peer, protocol, number)`), an egress item on
   each peer's; an egress item without a peer selector is expanded over the identities whose
   pods declare the name. A change of an identity's named ports (`update_named_ports`) takes
   the keys of the named items that depend on it off with the old ports and puts them back
   with the new ones, so every expansion is always made with the named ports in force. On
   ingress a name must be declared by every pod of the identity (`namedports`).

Every change returns a `PolicyDelta` (per endpoint and direction: keys upserted, keys deleted),
which is what incremental appliers (BPF maps, xDS) consume. The map state's types and the
decision read from a map are in `mapstate`.

`Resolver` is not thread-safe: its owner serializes calls. The `EndpointPolicy` values it hands
out are immutable snapshots.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .labels import Labels
from .namedports import NO_NAMED_PORTS, NamedPorts
from .mapstate import (
    ANY_PEER,
    Contribution,
    DirectionDelta,
    EndpointPolicy,
    MapEntry,
    MapKey,
    PolicyDelta,
    SortedMap,
    key_order,
    merge,
)
from .repository import Repository
from .selector import WILDCARD, EntitySelector, PeerSelector
from .selectorcache import SelectionChange, SelectorCache
from .types import AuthMode, Direction, NamedPort, Policy, Port, PortRange, Rule


@dataclass(frozen=True, slots=True)
class TemplateItem:
    direction: Direction
    selector: PeerSelector | None  # None: every peer (ANY_PEER)
    port: Port
    contribution: Contribution


def rule_items(rule: Rule) -> tuple[TemplateItem, ...]:
    """The template items of one rule, in a fixed order (an item's index is part of its id)."""
    items: list[TemplateItem] = []
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
    return tuple(items)


RuleId = tuple[str, str]


class CompiledRule:
    """A registered rule with its template items. Item `i` is contribution id `base + i` in
    every endpoint map, for as long as this rule is registered: ids do not depend on where the
    rule sits in a template, and a replaced rule (even under the same name) gets fresh ones."""

    __slots__ = ("rid", "rule", "policy", "base", "items", "by_selector", "named")

    def __init__(self, rid: RuleId, rule: Rule, base: int) -> None:
        self.rid = rid
        self.rule = rule
        self.policy = rule.origin.policy
        self.base = base
        self.items = rule_items(rule)
        by: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            if item.selector is not None:
                by.setdefault(item.selector.key, []).append(i)
        # peer selector key → indexes of the items that use it
        self.by_selector: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in by.items()}
        # indexes of the items with a named port
        self.named = tuple(i for i, item in enumerate(self.items) if isinstance(item.port, NamedPort))


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """What the set of rules selecting an endpoint makes of it, before peers are expanded.
    Compared by identity: the resolver keeps one per rule set."""

    rids: frozenset[RuleId]
    compiled: tuple[CompiledRule, ...]  # sorted by rule id
    bases: frozenset[int]  # the compiled rules' `base`, which names them
    default_deny_ingress: bool
    default_deny_egress: bool
    policies: tuple[str, ...]

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(c.rule for c in self.compiled)

    def default_deny(self, direction: Direction) -> bool:
        return self.default_deny_ingress if direction is Direction.INGRESS else self.default_deny_egress

    def same_meta(self, other: Template) -> bool:
        return (
            self.policies == other.policies
            and self.default_deny_ingress == other.default_deny_ingress
            and self.default_deny_egress == other.default_deny_egress
        )


def _template(rids: frozenset[RuleId], compiled: tuple[CompiledRule, ...]) -> Template:
    return Template(
        rids,
        compiled,
        frozenset(c.base for c in compiled),
        any(c.rule.default_deny_ingress for c in compiled),
        any(c.rule.default_deny_egress for c in compiled),
        tuple(sorted({c.policy for c in compiled})),
    )



_Touched = dict[Direction, set[MapKey]]


class _EndpointState:
    __slots__ = ("identity", "template", "contribs", "entries", "order", "auth", "snapshot")

    def __init__(self, identity: int, template: Template) -> None:
        self.identity = identity
        self.template = template
        # key → {contribution id → contribution}: every item that puts something on the key
        self.contribs: dict[Direction, dict[MapKey, dict[int, Contribution]]] = {
            Direction.INGRESS: {},
            Direction.EGRESS: {},
        }
        self.entries: dict[Direction, dict[MapKey, MapEntry]] = {
            Direction.INGRESS: {},
            Direction.EGRESS: {},
        }
        # The keys of `entries`, kept sorted (`key_order`) for snapshots.
        self.order: dict[Direction, list[MapKey]] = {Direction.INGRESS: [], Direction.EGRESS: []}
        # The keys whose entry requires mutual authentication.
        self.auth: dict[Direction, set[MapKey]] = {Direction.INGRESS: set(), Direction.EGRESS: set()}
        self.snapshot: EndpointPolicy | None = None  # dropped whenever an entry changes


def _needs_auth(entry: MapEntry) -> bool:
    return not entry.deny and entry.auth is AuthMode.REQUIRED


def _rule_id(rule: Rule) -> RuleId:
    return (rule.origin.policy, rule.origin.path)


def _no_touch() -> _Touched:
    return {Direction.INGRESS: set(), Direction.EGRESS: set()}


class Resolver:
    """Owns the repository, the selector cache and every endpoint's resolved map."""

    def __init__(self, repository: Repository | None = None) -> None:
        self.repository = repository or Repository()
        self.cache = SelectorCache()
        self._rules: dict[RuleId, CompiledRule] = {}
        self._next_item = 0
        self._subject_users: dict[str, set[RuleId]] = {}
        # peer selector key → the registered rules with items using it
        self._peer_users: dict[str, set[RuleId]] = {}
        self._endpoints: dict[int, _EndpointState] = {}
        # One template per rule set in use by some endpoint.
        self._templates: dict[frozenset[RuleId], Template] = {}
        self._rule_templates: dict[RuleId, set[frozenset[RuleId]]] = {}
        self._template_endpoints: dict[frozenset[RuleId], set[int]] = {}
        # Named container ports per identity (only identities that have some), the identities
        # declaring each name, and the registered rules with named ports.
        self.named_ports: dict[int, NamedPorts] = {}
        self._name_holders: dict[str, set[int]] = {}
        self._named_rules: set[RuleId] = set()
        for p in self.repository.policies():
            self._register(p.rules)

    # -- queries ----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self.repository.revision

    @property
    def identities(self) -> Mapping[int, Labels]:
        return self.cache.identities

    def endpoints(self) -> list[int]:
        return sorted(self._endpoints)

    def has_endpoint(self, identity: int) -> bool:
        return identity in self._endpoints

    def endpoint_policy(self, identity: int) -> EndpointPolicy | None:
        st = self._endpoints.get(identity)
        if st is None:
            return None
        snap = st.snapshot
        if snap is None:
            t = st.template
            snap = EndpointPolicy(
                identity,
                self.revision,
                t.policies,
                t.default_deny_ingress,
                t.default_deny_egress,
                SortedMap(st.entries[Direction.INGRESS], st.order[Direction.INGRESS]),
                SortedMap(st.entries[Direction.EGRESS], st.order[Direction.EGRESS]),
            )
        elif snap.revision != self.revision:
            # Same maps (immutable, shared), later repository revision.
            snap = replace(snap, revision=self.revision)
        st.snapshot = snap
        return snap

    def auth_required(self, identity: int, direction: Direction) -> list[tuple[MapKey, MapEntry]]:
        """The entries of an endpoint's map that allow with mutual authentication required,
        in key order; O(those entries), not O(map)."""
        st = self._endpoints.get(identity)
        if st is None:
            return []
        entries = st.entries[direction]
        return [(k, entries[k]) for k in sorted(st.auth[direction], key=key_order)]

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
        touched: dict[int, _Touched] = {}
        for key, change in changes.items():
            self._apply_selection_change(key, change, touched)
        for ident, t in touched.items():
            self._remerge(self._endpoints[ident], t, delta)
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

    def update_named_ports(self, changes: Mapping[int, NamedPorts]) -> PolicyDelta:
        """The named container ports of identities changed (a pod of theirs came, went or
        changed its ports): `changes` maps each to the ports of all its pods (empty: none).
        Only the named-port items that depend on them are re-expanded: ingress items of those
        identities' own maps, egress items of every map whose peers include them."""
        delta = PolicyDelta(self.revision)
        changed = {i: np for i, np in changes.items() if self.named_ports.get(i, NO_NAMED_PORTS) != np}
        if not changed:
            return delta
        work: list[tuple[_EndpointState, CompiledRule, int, tuple[int, ...]]] = []
        for rid in sorted(self._named_rules):
            c = self._rules[rid]
            for rids in self._rule_templates.get(rid, ()):
                for ident in self._template_endpoints.get(rids, ()):
                    st = self._endpoints[ident]
                    for i in c.named:
                        item = c.items[i]
                        if item.direction is Direction.INGRESS:
                            if ident in changed:
                                work.append((st, c, i, tuple(self._peers(item))))
                        else:
                            sel = item.selector
                            peers = tuple(p for p in changed if sel is None or p in self.cache.selections_view(sel.key))
                            if peers:
                                work.append((st, c, i, peers))
        touched: dict[int, _Touched] = {}
        for st, c, i, peers in work:
            item = c.items[i]
            per_dir = st.contribs[item.direction]
            td = touched.setdefault(st.identity, _no_touch())[item.direction]
            for k in self._named_keys(st.identity, item, peers):
                cs = per_dir.get(k)
                if cs is not None and cs.pop(c.base + i, None) is not None:
                    td.add(k)
        for ident, np in changed.items():
            old = self.named_ports.pop(ident, NO_NAMED_PORTS)
            for name in old.names:
                holders = self._name_holders.get(name)
                if holders is not None:
                    holders.discard(ident)
                    if not holders:
                        del self._name_holders[name]
            if np:
                self.named_ports[ident] = np
                for name in np.names:
                    self._name_holders.setdefault(name, set()).add(ident)
        for st, c, i, peers in work:
            item = c.items[i]
            per_dir = st.contribs[item.direction]
            td = touched[st.identity][item.direction]
            iid = c.base + i
            for k in self._named_keys(st.identity, item, peers):
                cs = per_dir.get(k)
                if cs is None:
                    per_dir[k] = {iid: item.contribution}
                else:
                    cs[iid] = item.contribution
                td.add(k)
        for ident, t in touched.items():
            self._remerge(self._endpoints[ident], t, delta)
        return self._finish(delta)

    # -- policies ----------------------------------------------------------------------------

    def upsert_policy(self, policy: Policy) -> PolicyDelta:
        return self.upsert_policies((policy,))

    def upsert_policies(self, policies: Iterable[Policy]) -> PolicyDelta:
        """Upsert several policies as one change, with the result of upserting them one by one
        in order (a key given twice: the later one is in force). Every endpoint they or the
        policies they replace select is recomputed once, after all of them are registered:
        one by one, an endpoint selected by k of n new policies had its map keys merged k
        times over ever more rules, O(k²), which made 10,000 policies take minutes."""
        replaced: list[Policy] = []
        affected: set[int] = set()
        for policy in policies:
            old = self.repository.upsert(policy)
            if old is not None:
                affected |= self._affected_by(old.rules)
                self._unregister(old.rules)
                replaced.append(old)
            self._register(policy.rules)
            affected |= self._affected_by(policy.rules)
        delta = self._recompute(affected)
        # Only now: the endpoints' diffs above read the old rules' peer selections, and a
        # selector the new rules use again stays cached instead of being rebuilt.
        for old in replaced:
            self._release_selectors(old.rules)
        return delta

    def delete_policy(self, key: str) -> PolicyDelta:
        old = self.repository.delete(key)
        if old is None:
            return PolicyDelta(self.revision)
        affected = self._affected_by(old.rules)
        self._unregister(old.rules)
        delta = self._recompute(affected)
        self._release_selectors(old.rules)
        return delta

    def recompute_all(self) -> PolicyDelta:
        """Recompute every endpoint from scratch (startup, and the benchmark's baseline)."""
        self._templates.clear()
        self._rule_templates.clear()
        self._template_endpoints.clear()
        return self._recompute(set(self._endpoints), force=True)

    # -- rules and templates -------------------------------------------------------------------

    def _register(self, rules: Iterable[Rule]) -> None:
        for rule in rules:
            rid = _rule_id(rule)
            self._forget_templates_with(rid)
            c = CompiledRule(rid, rule, self._next_item)
            self._next_item += len(c.items) + 1
            self._rules[rid] = c
            self.cache.add_selector(rule.subject)
            self._subject_users.setdefault(rule.subject.key, set()).add(rid)
            for pr in rule.rules:
                for sel in pr.peers or ():
                    self.cache.add_selector(sel)
            for key in c.by_selector:
                self._peer_users.setdefault(key, set()).add(rid)
            if c.named:
                self._named_rules.add(rid)

    def _unregister(self, rules: Iterable[Rule]) -> None:
        """Forget rules, but keep their selectors cached (see `_release_selectors`)."""
        for rule in rules:
            rid = _rule_id(rule)
            c = self._rules.pop(rid, None)
            self._named_rules.discard(rid)
            users = self._subject_users.get(rule.subject.key)
            if users is not None:
                users.discard(rid)
                if not users:
                    del self._subject_users[rule.subject.key]
            if c is not None:
                for key in c.by_selector:
                    peer = self._peer_users.get(key)
                    if peer is not None:
                        peer.discard(rid)
                        if not peer:
                            del self._peer_users[key]
            self._forget_templates_with(rid)

    def _release_selectors(self, rules: Iterable[Rule]) -> None:
        for rule in rules:
            self.cache.remove_selector(rule.subject)
            for pr in rule.rules:
                for sel in pr.peers or ():
                    self.cache.remove_selector(sel)

    def _affected_by(self, rules: Iterable[Rule]) -> set[int]:
        out: set[int] = set()
        for rule in rules:
            out |= self.cache.selections_view(rule.subject.key) & self._endpoints.keys()
        return out

    def _selecting_rules(self, identity: int) -> frozenset[RuleId]:
        rids: set[RuleId] = set()
        for key, users in self._subject_users.items():
            if identity in self.cache.selections_view(key):
                rids |= users
        return frozenset(rids)

    def _template_for(self, rids: frozenset[RuleId]) -> Template:
        t = self._templates.get(rids)
        if t is None:
            rules = self._rules
            t = _template(rids, tuple(map(rules.__getitem__, sorted(rids))))
            self._templates[rids] = t
            self._template_endpoints[rids] = set()
            for r in rids:
                self._rule_templates.setdefault(r, set()).add(rids)
        return t

    def _forget_template(self, rids: frozenset[RuleId]) -> None:
        self._templates.pop(rids, None)
        self._template_endpoints.pop(rids, None)
        for r in rids:
            ts = self._rule_templates.get(r)
            if ts is not None:
                ts.discard(rids)
                if not ts:
                    del self._rule_templates[r]

    def _forget_templates_with(self, rid: RuleId) -> None:
        for rids in list(self._rule_templates.get(rid, ())):
            self._forget_template(rids)

    def _leave_template(self, identity: int, template: Template) -> None:
        eps = self._template_endpoints.get(template.rids)
        if eps is None or self._templates.get(template.rids) is not template:
            return  # already forgotten (its rules changed)
        eps.discard(identity)
        if not eps:
            self._forget_template(template.rids)

    # -- endpoint maps -------------------------------------------------------------------------

    def _peers(self, item: TemplateItem) -> Iterable[int]:
        """The identities a compiled rule item is expanded over (ANY_PEER without a selector;
        an egress named port without one: the identities whose pods declare the name)."""
        if item.selector is None:
            if item.direction is Direction.EGRESS and isinstance(item.port, NamedPort):
                return self._name_holders.get(item.port.name, ())
            return (ANY_PEER,)
        return self.cache.selections_view(item.selector.key)

    def _keys(self, owner: int, item: TemplateItem, peers: Iterable[int]) -> list[MapKey]:
        """The keys item `item` puts on endpoint `owner`'s map for `peers`."""
        port = item.port
        if isinstance(port, NamedPort):
            return self._named_keys(owner, item, peers)
        proto, ports = port.protocol, port.ports
        return [MapKey(peer, proto, ports) for peer in peers]

    def _named_keys(self, owner: int, item: TemplateItem, peers: Iterable[int]) -> list[MapKey]:
        """The keys a named-port item puts on endpoint `owner`'s map for `peers`: the port
        resolved on the destination (`owner` on ingress, each peer on egress), with the named
        ports in force."""
        port = item.port
        assert isinstance(port, NamedPort)
        out: list[MapKey] = []
        if item.direction is Direction.INGRESS:
            found = self.named_ports.get(owner)
            if found is None:
                return out
            resolved = found.resolve(port, every_pod=True)  # every pod of the endpoint's identity
            for peer in peers:
                out.extend(MapKey(peer, proto, PortRange(n, n)) for proto, n in resolved)
            return out
        for peer in peers:
            found = self.named_ports.get(peer)
            if found is not None:
                out.extend(MapKey(peer, proto, PortRange(n, n)) for proto, n in found.resolve(port))
        return out

    def _expand(self, st: _EndpointState) -> None:
        """Build an endpoint's maps from scratch."""
        for d in Direction:
            st.contribs[d].clear()
            st.entries[d].clear()
        for c in st.template.compiled:
            for i, item in enumerate(c.items):
                per_dir = st.contribs[item.direction]
                iid = c.base + i
                contrib = item.contribution
                for key in self._keys(st.identity, item, self._peers(item)):
                    cs = per_dir.get(key)
                    if cs is None:
                        per_dir[key] = {iid: contrib}
                    else:
                        cs[iid] = contrib
        for d in Direction:
            entries = st.entries[d]
            for key, cs in st.contribs[d].items():
                entries[key] = merge(cs.values())
            st.order[d] = sorted(entries, key=key_order)
            st.auth[d] = {k for k, e in entries.items() if _needs_auth(e)}

    def _add_rule(self, st: _EndpointState, c: CompiledRule, touched: _Touched) -> None:
        for i, item in enumerate(c.items):
            per_dir = st.contribs[item.direction]
            t = touched[item.direction]
            iid = c.base + i
            contrib = item.contribution
            for key in self._keys(st.identity, item, self._peers(item)):
                cs = per_dir.get(key)
                if cs is None:
                    per_dir[key] = {iid: contrib}
                else:
                    cs[iid] = contrib
                t.add(key)

    def _remove_rule(self, st: _EndpointState, c: CompiledRule, touched: _Touched) -> None:
        # The rule's peer selectors are still cached, with the selections its items were
        # expanded over (selection changes reach every endpoint holding the rule).
        for i, item in enumerate(c.items):
            per_dir = st.contribs[item.direction]
            t = touched[item.direction]
            iid = c.base + i
            for key in self._keys(st.identity, item, self._peers(item)):
                cs = per_dir.get(key)
                if cs is not None and cs.pop(iid, None) is not None:
                    t.add(key)

    def _remerge(self, st: _EndpointState, touched: _Touched, delta: PolicyDelta) -> None:
        """Recompute the entries of the touched keys from their contributions."""
        for d, keys in touched.items():
            if not keys:
                continue
            entries = st.entries[d]
            contribs = st.contribs[d]
            order = st.order[d]
            auth = st.auth[d]
            base = delta._baseline.setdefault((st.identity, d), {})
            for k in keys:
                had = entries.get(k)
                if k not in base:
                    base[k] = had
                cs = contribs.get(k)
                if not cs:
                    contribs.pop(k, None)
                    if had is not None:
                        del entries[k]
                        del order[bisect_left(order, key_order(k), key=key_order)]
                        auth.discard(k)
                else:
                    entry = entries[k] = merge(cs.values())
                    if had is None:
                        insort(order, k, key=key_order)
                    if _needs_auth(entry):
                        auth.add(k)
                    else:
                        auth.discard(k)

    def _recompute_endpoint(self, identity: int, delta: PolicyDelta, force: bool = False) -> None:
        rids = self._selecting_rules(identity)
        template = self._template_for(rids)
        old = self._endpoints.get(identity)
        if old is not None and old.template is template and not force:
            return
        if old is not None and not force:
            # Only the rules that left or joined the endpoint's set touch its map.
            touched = _no_touch()
            for c in old.template.compiled:
                if c.base not in template.bases:
                    self._remove_rule(old, c, touched)
            for c in template.compiled:
                if c.base not in old.template.bases:
                    self._add_rule(old, c, touched)
            if not template.same_meta(old.template):
                delta._new.add(identity)
            self._leave_template(identity, old.template)
            old.template = template
            old.snapshot = None
            self._remerge(old, touched, delta)
            self._template_endpoints[rids].add(identity)
            return
        st = _EndpointState(identity, template)
        self._expand(st)
        if old is not None:
            self._leave_template(identity, old.template)
            if not template.same_meta(old.template):
                delta._new.add(identity)
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
        self._template_endpoints[rids].add(identity)
        self._endpoints[identity] = st

    def _drop_endpoint(self, identity: int, delta: PolicyDelta) -> None:
        st = self._endpoints.pop(identity)
        self._leave_template(identity, st.template)
        for d in Direction:
            delta._baseline.pop((identity, d), None)
        delta._new.discard(identity)
        delta.removed_endpoints.add(identity)

    def _finish(self, delta: PolicyDelta) -> PolicyDelta:
        """Turn the recorded baselines into exact per-key changes."""
        for (ident, d), base in sorted(delta._baseline.items()):
            st = self._endpoints.get(ident)
            if st is None:
                continue
            cur = st.entries[d]
            up = {k: cur[k] for k in sorted(base) if k in cur and cur[k] != base[k]}
            gone = frozenset(k for k in base if k not in cur and base[k] is not None)
            if up or gone:
                st.snapshot = None
            if up or gone or ident in delta._new:
                delta.changes.setdefault(ident, {})[d] = DirectionDelta(up, gone)
        for ident in delta._new:
            st = self._endpoints.get(ident)
            if st is not None:
                st.snapshot = None
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

    def _apply_selection_change(
        self, key: str, change: SelectionChange, touched: dict[int, _Touched]
    ) -> None:
        for rid in self._peer_users.get(key, ()):
            c = self._rules[rid]
            idxs = c.by_selector[key]
            for rids in self._rule_templates.get(rid, ()):
                for ident in self._template_endpoints.get(rids, ()):
                    st = self._endpoints[ident]
                    t = touched.get(ident)
                    if t is None:
                        t = touched[ident] = _no_touch()
                    for i in idxs:
                        item = c.items[i]
                        iid = c.base + i
                        per_dir = st.contribs[item.direction]
                        td = t[item.direction]
                        for k in self._keys(ident, item, change.removed):
                            cs = per_dir.get(k)
                            if cs is not None and cs.pop(iid, None) is not None:
                                td.add(k)
                        for k in self._keys(ident, item, change.added):
                            cs = per_dir.get(k)
                            if cs is None:
                                per_dir[k] = {iid: item.contribution}
                            else:
                                cs[iid] = item.contribution
                            td.add(k)


def resolve_endpoint(
    identity: int, identities: Mapping[int, Labels], policies: Iterable[Policy],
    named_ports: Mapping[int, NamedPorts] | None = None,
) -> EndpointPolicy | None:
    """One endpoint's resolved policy, computed apart (for an endpoint this node does not keep a
    map for, such as another node's pod): the rules of `policies` that select it, expanded over
    `identities` (which must hold `identity`) and `named_ports`, exactly as a `Resolver`
    holding them would."""
    labels = identities[identity]
    resolver = Resolver(Repository())
    resolver.upsert_policies(p for p in policies if any(r.selects(labels) for r in p.rules))
    resolver.update_identities(identities)
    if named_ports:
        resolver.update_named_ports(named_ports)
    resolver.add_endpoint(identity)
    return resolver.endpoint_policy(identity)
