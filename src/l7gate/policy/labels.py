"""Labels: the identity-relevant key/value set of a workload, and the keys policy talks about.

A label key is stored without its Kubernetes source prefix (`app`, not `k8s:app`), because
policy selectors match a key whatever its source. Reserved labels keep their source, since that
is what makes them reserved: `reserved:world`, `reserved:host`. CIDR identities carry
`cidr:<prefix>` keys; node identities carry their Node's labels as `node:<key>`. Values are strings; reserved and CIDR labels have the value "".

`Labels` is immutable and hashable; two equal label sets are interchangeable everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

# Well-known keys (Cilium's names, so that policies written for Cilium select the same pods).
NAMESPACE_KEY = "io.kubernetes.pod.namespace"
CLUSTER_KEY = "io.cilium.k8s.policy.cluster"
SERVICE_ACCOUNT_KEY = "io.cilium.k8s.policy.serviceaccount"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."

RESERVED_SOURCE = "reserved"
CIDR_SOURCE = "cidr"
# Cilium's source for a node's own labels on its identity (`node:role`): a node's labels never
# mix with the keys the agent sets (a node labelled `io.kubernetes.pod.namespace` is no pod).
NODE_SOURCE = "node"

# Sources that are stripped: a selector on `k8s:app` or `any:app` selects label `app`.
_STRIPPED_SOURCES = ("k8s:", "any:", "container:", "unspec:")


@functools.lru_cache(maxsize=8192)  # the same few keys, on every pod
def normalize_key(key: str) -> str:
    """Canonical form of a label or selector key: drop a k8s/any source, keep reserved/cidr."""
    for prefix in _STRIPPED_SOURCES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def reserved(name: str) -> str:
    """The key of a reserved label: reserved("world") == "reserved:world"."""
    return f"{RESERVED_SOURCE}:{name}"


def node_label(key: str) -> str:
    """The key a node's label `key` has on the node's identity: node_label("role") == "node:role"."""
    return f"{NODE_SOURCE}:{key}"


@dataclass(frozen=True, slots=True)
class Labels(Mapping[str, str]):
    """An immutable, sorted set of labels. Safe to share between threads."""

    items_: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, mapping: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> Labels:
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        merged: dict[str, str] = {}
        for key, value in pairs:
            merged[normalize_key(key)] = value
        return cls(tuple(sorted(merged.items())))

    def __getitem__(self, key: str) -> str:
        for k, v in self.items_:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self.items_)

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        for k, v in self.items_:
            if k == key:
                return v
        return default

    def with_labels(self, extra: Mapping[str, str]) -> Labels:
        return Labels.of({**dict(self.items_), **{normalize_key(k): v for k, v in extra.items()}})

    def is_reserved(self) -> bool:
        return any(k.startswith(RESERVED_SOURCE + ":") for k, _ in self.items_)

    @property
    def namespace(self) -> str | None:
        return self.get(NAMESPACE_KEY)

    @property
    def cluster(self) -> str | None:
        return self.get(CLUSTER_KEY)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" if v else k for k, v in self.items_)

    def __repr__(self) -> str:
        return f"Labels({str(self)!r})"
