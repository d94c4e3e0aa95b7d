"""The policy repository: the policies in force, with a monotonic revision.

Every change (upsert or delete of one resource) bumps the revision, so any computed policy can
say which revision it reflects. Policies are immutable values; replacing one swaps the value.
Not thread-safe: owned and serialized by the resolver (or the agent's reconcile loop).
"""

from __future__ import annotations

from collections.abc import Iterator

from .types import Policy, Rule


class Repository:
    def __init__(self) -> None:
        self._policies: dict[str, Policy] = {}
        self._revision = 0

    @property
    def revision(self) -> int:
        return self._revision

    def upsert(self, policy: Policy) -> Policy | None:
        """Store `policy` (keyed by kind/namespace/name); return the one it replaced."""
        old = self._policies.get(policy.key)
        self._policies[policy.key] = policy
        self._revision += 1
        return old

    def delete(self, key: str) -> Policy | None:
        old = self._policies.pop(key, None)
        if old is not None:
            self._revision += 1
        return old

    def get(self, key: str) -> Policy | None:
        return self._policies.get(key)

    def policies(self) -> list[Policy]:
        return [self._policies[k] for k in sorted(self._policies)]

    def rules(self) -> Iterator[Rule]:
        for p in self.policies():
            yield from p.rules

    def __len__(self) -> int:
        return len(self._policies)

    def __contains__(self, key: object) -> bool:
        return key in self._policies
