"""The selector cache: each distinct selector once, with the identities it selects right now.

Theory of operation: the cache knows every identity (number → labels) and every selector some
rule uses (by its canonical key, reference-counted). Adding a selector with an `In` requirement
matches only the identities that carry one of its (key, value) pairs (identities are indexed by
their label pairs); other selectors cost one pass over the identities. Adding, relabelling or removing an identity matches it against the candidate
selectors only: a label selector with an `In` requirement can select only identities that carry
one of its (key, value) pairs, so it is indexed under those pairs; the others (entities, CIDRs,
selectors without `In`) are always candidates. Each update returns which selectors gained or
lost which identities, so the resolver can touch exactly the policy map entries that change: a
new pod costs O(selectors that could select it), not O(policies × identities).

Not thread-safe: the resolver that owns it serializes all calls. The frozensets it returns are
snapshots and stay valid after later updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .labels import Labels
from .selector import LabelSelector, NodeSelector, Operator, PeerSelector


@dataclass(slots=True)
class _Cached:
    selector: PeerSelector
    selections: set[int] = field(default_factory=set)
    refs: int = 0


@dataclass(frozen=True, slots=True)
class SelectionChange:
    added: frozenset[int]
    removed: frozenset[int]


def _index_pairs(selector: PeerSelector) -> tuple[tuple[str, str], ...]:
    """(key, value) pairs one of which any identity the selector selects carries; () if none
    can be told from the selector alone."""
    if isinstance(selector, NodeSelector):  # its own requirements narrow it the same way
        selector = selector.selector
    if isinstance(selector, LabelSelector):
        for r in selector.requirements:
            if r.operator is Operator.IN and r.values:
                return tuple((r.key, v) for v in r.values)
    return ()


class SelectorCache:
    def __init__(self) -> None:
        self._identities: dict[int, Labels] = {}
        self._selectors: dict[str, _Cached] = {}
        self._by_pair: dict[tuple[str, str], set[str]] = {}  # label pair → selector keys
        self._unindexed: set[str] = set()  # selector keys that are candidates for any identity
        self._ids_by_pair: dict[tuple[str, str], set[int]] = {}  # label pair → identities

    def _candidates(self, *labels: Labels | None) -> list[tuple[str, _Cached]]:
        keys = set(self._unindexed)
        for lab in labels:
            if lab is not None:
                for pair in lab.items_:
                    found = self._by_pair.get(pair)
                    if found:
                        keys |= found
        return [(k, self._selectors[k]) for k in keys]

    # -- identities ---------------------------------------------------------------------------

    @property
    def identities(self) -> Mapping[int, Labels]:
        return self._identities

    def update_identities(
        self, upserted: Mapping[int, Labels], deleted: Iterable[int] = ()
    ) -> dict[str, SelectionChange]:
        """Apply identity changes; return, per selector key, the identities it gained/lost."""
        added: dict[str, set[int]] = {}
        removed: dict[str, set[int]] = {}
        for ident in deleted:
            gone = self._identities.pop(ident, None)
            if gone is None:
                continue
            self._unindex_identity(ident, gone)
            for key, c in self._candidates(gone):
                if ident in c.selections:
                    c.selections.discard(ident)
                    removed.setdefault(key, set()).add(ident)
        for ident, labels in upserted.items():
            old = self._identities.get(ident)
            if old == labels:
                continue
            self._identities[ident] = labels
            if old is not None:
                self._unindex_identity(ident, old)
            for pair in labels.items_:
                self._ids_by_pair.setdefault(pair, set()).add(ident)
            # A selector that selected it matched `old`; one that selects it now matches `labels`.
            for key, c in self._candidates(labels, old):
                now = c.selector.matches(labels)
                was = ident in c.selections
                if now and not was:
                    c.selections.add(ident)
                    added.setdefault(key, set()).add(ident)
                elif was and not now:
                    c.selections.discard(ident)
                    removed.setdefault(key, set()).add(ident)
        return {
            key: SelectionChange(frozenset(added.get(key, ())), frozenset(removed.get(key, ())))
            for key in sorted(set(added) | set(removed))
        }

    def _unindex_identity(self, ident: int, labels: Labels) -> None:
        for pair in labels.items_:
            ids = self._ids_by_pair.get(pair)
            if ids is not None:
                ids.discard(ident)
                if not ids:
                    del self._ids_by_pair[pair]

    # -- selectors ----------------------------------------------------------------------------

    def add_selector(self, selector: PeerSelector) -> None:
        c = self._selectors.get(selector.key)
        if c is None:
            c = _Cached(selector)
            pairs = _index_pairs(selector)
            if pairs:  # only identities carrying one of its pairs can match
                idents = self._identities
                cands: set[int] = set()
                for pair in pairs:
                    cands |= self._ids_by_pair.get(pair, set())
                c.selections = {i for i in cands if selector.matches(idents[i])}
            else:
                c.selections = {i for i, lab in self._identities.items() if selector.matches(lab)}
            self._selectors[selector.key] = c
            for pair in pairs:
                self._by_pair.setdefault(pair, set()).add(selector.key)
            if not pairs:
                self._unindexed.add(selector.key)
        c.refs += 1

    def remove_selector(self, selector: PeerSelector) -> None:
        c = self._selectors.get(selector.key)
        if c is None:
            return
        c.refs -= 1
        if c.refs <= 0:
            del self._selectors[selector.key]
            self._unindexed.discard(selector.key)
            for pair in _index_pairs(c.selector):
                keys = self._by_pair.get(pair)
                if keys is not None:
                    keys.discard(selector.key)
                    if not keys:
                        del self._by_pair[pair]

    def selections(self, key: str) -> frozenset[int]:
        c = self._selectors.get(key)
        return frozenset(c.selections) if c is not None else frozenset()

    def selections_view(self, key: str) -> set[int]:
        """The live set, for callers that iterate immediately and do not keep it."""
        c = self._selectors.get(key)
        return c.selections if c is not None else set()

    def __len__(self) -> int:
        return len(self._selectors)

    def __contains__(self, key: object) -> bool:
        return key in self._selectors
