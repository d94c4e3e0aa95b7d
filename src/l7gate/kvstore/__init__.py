"""l7gate.kvstore: a small etcd-shaped key/value interface and its embedded SQLite backend.

See `api` for the contract and `sqlite` for the backend's theory of operation.
"""

from l7gate.kvstore.api import Event, EventType, KVStore, KVStoreError, Watch
from l7gate.kvstore.sqlite import SQLiteKVStore, SQLiteWatch

__all__ = [
    "Event",
    "EventType",
    "KVStore",
    "KVStoreError",
    "SQLiteKVStore",
    "SQLiteWatch",
    "Watch",
]
