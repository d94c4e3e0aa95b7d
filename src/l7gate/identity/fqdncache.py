"""What DNS taught the node: names → addresses, each with the time its answer stops counting.

Theory of operation. The DNS proxy gives every allowed answer's A/AAAA addresses to the agent
before the pod sees them (`dnsproxy`); the agent `learn`s them here. An address stays until the
last name that resolved to it expires: its answer's TTL, raised to `min_ttl` (Cilium's
`tofqdns-min-ttl`). `expire(now)` drops what has expired and says which addresses changed. The
agent gives each address a local identity labelled with the `toFQDNs` selectors that match any
of its live names (`policy.fqdn`), and removes it when none does; connections already open are
not touched (the kernel's conntrack keeps them).

A name holds at most `max_ips_per_name` addresses (Cilium's
`tofqdns-endpoint-max-ip-per-hostname`): beyond that the ones expiring first are dropped.

Pure and not thread-safe: the agent's core owns it under its lock. `to_json`/`from_json` are the
form it is persisted in, so that an agent restart keeps learned addresses allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..policy.fqdn import fqdn

DEFAULT_MIN_TTL = 0
DEFAULT_MAX_IPS_PER_NAME = 50


@dataclass(slots=True)
class _Entry:
    expires: float  # wall-clock seconds
    ttl: int  # as answered
    sources: set[str] = field(default_factory=set)  # who looked it up (pod refs or addresses)


@dataclass(frozen=True, slots=True)
class CacheRow:
    name: str
    ip: str
    expires: float
    ttl: int
    sources: tuple[str, ...]


class FQDNCache:
    def __init__(self, min_ttl: int = DEFAULT_MIN_TTL, max_ips_per_name: int = DEFAULT_MAX_IPS_PER_NAME) -> None:
        self.min_ttl = min_ttl
        self.max_ips_per_name = max_ips_per_name
        self._names: dict[str, dict[str, _Entry]] = {}
        self._ips: dict[str, set[str]] = {}

    def learn(self, name: str, ips: Iterable[str], ttl: int, now: float, source: str = "") -> set[str]:
        """Record an answer; the addresses whose set of names changed (new ones)."""
        name = fqdn(name)
        entries = self._names.setdefault(name, {})
        changed: set[str] = set()
        expires = now + max(ttl, self.min_ttl)
        for raw in ips:
            ip = str(ipaddress.ip_address(raw))
            e = entries.get(ip)
            if e is None:
                e = entries[ip] = _Entry(expires, ttl)
                if name not in self._ips.setdefault(ip, set()):
                    self._ips[ip].add(name)
                    changed.add(ip)
            else:
                e.expires, e.ttl = max(e.expires, expires), ttl
            if source:
                e.sources.add(source)
        if len(entries) > self.max_ips_per_name:
            for ip, _ in sorted(entries.items(), key=lambda kv: kv[1].expires)[: len(entries) - self.max_ips_per_name]:
                changed |= self._forget(name, ip)
        return changed

    def _forget(self, name: str, ip: str) -> set[str]:
        entries = self._names.get(name)
        if entries is None or entries.pop(ip, None) is None:
            return set()
        if not entries:
            del self._names[name]
        names = self._ips.get(ip)
        if names is not None:
            names.discard(name)
            if not names:
                del self._ips[ip]
        return {ip}

    def expire(self, now: float) -> set[str]:
        """Drop what expired by `now`; the addresses whose names changed."""
        changed: set[str] = set()
        for name in list(self._names):
            for ip, e in list(self._names[name].items()):
                if e.expires <= now:
                    changed |= self._forget(name, ip)
        return changed

    def names_of(self, ip: str) -> frozenset[str]:
        return frozenset(self._ips.get(ip, ()))

    def ips(self) -> frozenset[str]:
        return frozenset(self._ips)

    def next_expiry(self) -> float | None:
        return min((e.expires for entries in self._names.values() for e in entries.values()), default=None)

    def rows(self) -> list[CacheRow]:
        return [CacheRow(name, ip, e.expires, e.ttl, tuple(sorted(e.sources)))
                for name in sorted(self._names) for ip, e in sorted(self._names[name].items())]

    def __len__(self) -> int:
        return sum(len(v) for v in self._names.values())

    # -- persistence ----------------------------------------------------------------------------

    def name_json(self, name: str) -> dict[str, Any] | None:
        """One name's entries, as persisted (None: the name has none left)."""
        entries = self._names.get(fqdn(name))
        if not entries:
            return None
        return {ip: {"expires": e.expires, "ttl": e.ttl, "sources": sorted(e.sources)} for ip, e in sorted(entries.items())}

    def load_name(self, name: str, data: Mapping[str, Any], now: float) -> set[str]:
        """Restore one persisted name (what `name_json` gave), its expired entries left out.
        Raises ValueError on a corrupt record."""
        changed: set[str] = set()
        for ip, rec in data.items():
            expires = float(rec["expires"])
            if expires <= now:
                continue
            ttl = int(rec.get("ttl", 0))
            for src in rec.get("sources", []) or [""]:
                changed |= self.learn(name, [ip], 0, now, str(src))
            e = self._names[fqdn(name)][str(ipaddress.ip_address(ip))]
            e.expires, e.ttl = expires, ttl
        return changed
