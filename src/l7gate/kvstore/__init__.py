"""l7gate.kvstore: a small etcd-shaped key/value interface, its embedded SQLite backend and its
etcd backend.

See `api` for the contract, `sqlite` and `etcd` for each backend's theory of operation. The etcd
backend (gRPC, generated stubs) is imported on first use of `EtcdKVStore` / `EtcdWatch`, so that
a single-node agent on SQLite does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from l7gate.kvstore.api import Event, EventType, KVStore, KVStoreError, Watch
from l7gate.kvstore.sqlite import SQLiteKVStore, SQLiteWatch

if TYPE_CHECKING:
    from l7gate.kvstore.etcd import EtcdKVStore, EtcdWatch

__all__ = [
    "EtcdKVStore",
    "EtcdWatch",
    "Event",
    "EventType",
    "KVStore",
    "KVStoreError",
    "SQLiteKVStore",
    "SQLiteWatch",
    "Watch",
]


def __getattr__(name: str) -> Any:
    if name in ("EtcdKVStore", "EtcdWatch"):
        from l7gate.kvstore import etcd

        return getattr(etcd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
