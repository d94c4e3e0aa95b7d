"""What each Envoy has of its configuration: the rows of `l7gate xds status`.

Theory of operation
-------------------
For every (node id, resource type) the ADS server tracks the version it last sent, the version
the Envoy last acknowledged and the last rejection (NACK) with Envoy's own error text. Set
against the version the cache would serve that node now, these give one state, as
`istioctl proxy-status` does:

- ``DISCONNECTED`` the Envoy has no open stream to this server: whatever it acknowledged
               before, nothing says it still enforces it (it may have restarted empty);
- ``SYNCED``   the Envoy is connected and acknowledged exactly what the cache serves now;
- ``NACKED``   the Envoy rejected what the cache serves now; it keeps enforcing its last good
               configuration, and nothing is re-sent until the cache changes;
- ``STALE``    the cache is ahead of what the Envoy acknowledged (a push is in flight, or the
               Envoy is disconnected and will be brought up to date when it reconnects);
- ``NOT SENT`` nothing of this type was ever sent to, or reported by, this Envoy.

This module holds only values and the classification; the server fills them in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class SyncState(enum.StrEnum):
    DISCONNECTED = "DISCONNECTED"
    SYNCED = "SYNCED"
    STALE = "STALE"
    NACKED = "NACKED"
    NOT_SENT = "NOT SENT"


@dataclass(frozen=True, slots=True)
class Nack:
    """A rejected response: its version, Envoy's error text, when (wall-clock seconds)."""

    version: str
    error: str
    at: float
    nonce: str


@dataclass(frozen=True, slots=True)
class StatusRow:
    """The xDS state of one resource type at one Envoy (node id).

    Times are wall-clock seconds since the epoch; `ack_latency` is the monotonic time from the
    last acknowledged response being sent to its ACK arriving. `cache_version` is what the
    cache serves this node now, for this node's subscription (None: no snapshot), `resources`
    how many resources that is.
    """

    node_id: str
    type_url: str
    type: str  # short name: CDS, EDS, SDS, LDS, RDS, ECDS
    protocol: str  # "sotw" or "delta"
    connected: bool
    state: SyncState
    cache_version: str | None
    sent_version: str | None
    acked_version: str | None
    nonce: str | None
    resources: int
    last_sent: float | None
    last_ack: float | None
    ack_latency: float | None
    last_nack: Nack | None
    pushes: int = 0  # responses sent for this (node, type) since the server started

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "type_url": self.type_url,
            "type": self.type,
            "protocol": self.protocol,
            "connected": self.connected,
            "state": self.state.value,
            "cache_version": self.cache_version,
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "nonce": self.nonce,
            "resources": self.resources,
            "last_sent": self.last_sent,
            "last_ack": self.last_ack,
            "ack_latency": self.ack_latency,
            "last_nack": None
            if self.last_nack is None
            else {
                "version": self.last_nack.version,
                "error": self.last_nack.error,
                "at": self.last_nack.at,
                "nonce": self.last_nack.nonce,
            },
        }


def classify(
    cache_version: str | None,
    sent_version: str | None,
    acked_version: str | None,
    last_nack: Nack | None,
    connected: bool = True,
) -> SyncState:
    """The state of one row (see the module docstring)."""
    if not connected and (sent_version is not None or acked_version is not None):
        return SyncState.DISCONNECTED
    if last_nack is not None and last_nack.version == cache_version and acked_version != cache_version:
        return SyncState.NACKED
    if acked_version is not None and acked_version == cache_version:
        return SyncState.SYNCED
    if sent_version is None and acked_version is None:
        return SyncState.NOT_SENT
    return SyncState.STALE


def rows_to_json(rows: list[StatusRow]) -> dict[str, Any]:
    """Rows grouped by node, as `/v1/xds/status` answers: one entry per Envoy, one per type."""
    nodes: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r.node_id, r.type)):
        node = nodes.setdefault(
            row.node_id,
            {"node_id": row.node_id, "connected": False, "protocol": row.protocol, "types": {}},
        )
        node["connected"] = node["connected"] or row.connected
        node["types"][row.type] = row.to_json()
    return {"nodes": list(nodes.values())}
