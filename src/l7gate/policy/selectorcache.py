"""The selector cache: each distinct selector once, with the identities it selects right now.

Theory of operation: the cache knows every identity (number → labels) and every selector some
rule uses (by its canonical key, reference-counted). Adding a selector costs one pass over the
identities; adding or removing an identity costs one match per cached selector. Each update
returns which selectors gained or lost which identities, so the resolver can touch exactly the
policy map entries that change: a new pod costs O(selectors), not O(policies × identities).

Not thread-safe: the resolver that owns it serializes all calls. The frozensets it returns are
snapshots and stay valid after later updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .labels import Labels
from .selector import PeerSelector


@dataclass(slots=True)
class _Cached:
    selector: PeerSelector
    selections: set[int] = field(default_factory=set)
    refs: int = 0


@dataclass(frozen=True, slots=True)
class SelectionChange:
    added: frozenset[int]
    removed: frozenset[int]


class SelectorCache:
    def __init__(self) -> None:
        self._identities: dict[int, Labels] = {}
        self._selectors: dict[str, _Cached] = {}

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
            if self._identities.pop(ident, None) is None:
                continue
            for key, c in self._selectors.items():
                if ident in c.selections:
                    c.selections.discard(ident)
                    removed.setdefault(key, set()).add(ident)
        for ident, labels in upserted.items():
            old = self._identities.get(ident)
            if old == labels:
                continue
            self._identities[ident] = labels
            for key, c in self._selectors.items():
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

    # -- selectors ----------------------------------------------------------------------------

    def add_selector(self, selector: PeerSelector) -> None:
        c = self._selectors.get(selector.key)
        if c is None:
            c = _Cached(selector)
            c.selections = {i for i, lab in self._identities.items() if selector.matches(lab)}
            self._selectors[selector.key] = c
        c.refs += 1

    def remove_selector(self, selector: PeerSelector) -> None:
        c = self._selectors.get(selector.key)
        if c is None:
            return
        c.refs -= 1
        if c.refs <= 0:
            del self._selectors[selector.key]

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
