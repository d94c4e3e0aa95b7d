"""The ipcache: which security identity an IP address belongs to.

Theory of operation
-------------------
Entries map a prefix (a pod's /32 or /128, a node address, a `fromCIDR` peer's prefix) to an
identity number. A lookup returns the identity of the longest prefix holding the address; an
address no prefix holds is `world` (2), as DESIGN decision 6 demands ("unknown source -> world").
Cilium answers world-ipv4 (9) or world-ipv6 (10) in dual-stack mode; l7gate answers 2 for both
families. Policy loses nothing: the `world` entity and the catch-all CIDRs `0.0.0.0/0` and `::/0`
all select 2.

IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack socket reports for an IPv4 peer)
are looked up as the IPv4 address they carry.

Per address family, entries sit in one dict per prefix length, keyed by the network address as
an integer; the lengths in use are kept sorted longest first. A lookup masks the address once per
length in use and probes that dict, so it costs at most 33 (IPv4) or 129 (IPv6) dict probes
however many entries there are.

Every change (upsert that adds or alters, delete that removes) bumps `revision` and is reported
to listeners as an `IPCacheChange`, in order, synchronously, while the cache's lock is held: a
listener sees changes in exactly the order they happened and may read the cache, but must be
quick and must not block on another thread that uses the cache.

Thread safety: every method may be called from any thread.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from l7gate.identity.numeric import WORLD, IdentityError, ip_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class IPCacheEntry:
    prefix: IPNetwork
    identity: int


@dataclass(frozen=True, slots=True)
class IPCacheChange:
    """One change to one prefix: `old` None means added, `new` None means deleted."""

    prefix: IPNetwork
    old: int | None
    new: int | None
    revision: int


Listener = Callable[[IPCacheChange], None]


@functools.lru_cache(maxsize=65536)
def _host_prefix(text: str) -> IPNetwork:
    addr = _unmap(ip_address(text))  # the address is parsed (and remembered) once
    # from its number: a third of what ip_network(addr) costs, which parses its text again
    if addr.version == 4:
        return ipaddress.IPv4Network((int(addr), 32))
    if addr.scope_id is None:
        return ipaddress.IPv6Network((int(addr), 128))
    return ipaddress.ip_network(addr)


def parse_prefix(prefix: str | IPNetwork | IPAddress) -> IPNetwork:
    """A prefix from `10.0.0.0/8`, a bare address (a host prefix), or an ipaddress object.
    Host bits must be zero. IPv4-mapped IPv6 host addresses become IPv4."""
    if isinstance(prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return prefix
    if isinstance(prefix, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(_unmap(prefix))
    try:
        if "/" not in prefix:
            return _host_prefix(prefix)
        return ipaddress.ip_network(prefix, strict=True)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"invalid IP prefix {prefix!r}: {e}") from None


def parse_address(address: str | IPAddress) -> IPAddress:
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _unmap(address)
    try:
        return _unmap(ipaddress.ip_address(address))
    except (ValueError, TypeError) as e:
        raise IdentityError(f"invalid IP address {address!r}: {e}") from None


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _Family:
    """The entries of one address family."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, int]] = {}
        self.lengths: list[int] = []  # longest first
        self.masks = [((1 << bits) - 1) ^ ((1 << (bits - n)) - 1) for n in range(bits + 1)]

    def lookup(self, address: int) -> tuple[int, int] | None:
        for length in self.lengths:
            network = address & self.masks[length]
            identity = self.by_length[length].get(network)
            if identity is not None:
                return length, identity
        return None

    def set(self, network: int, length: int, identity: int) -> None:
        table = self.by_length.get(length)
        if table is None:
            table = self.by_length[length] = {}
            self.lengths = sorted(self.by_length, reverse=True)
        table[network] = identity

    def remove(self, network: int, length: int) -> None:
        table = self.by_length[length]
        del table[network]
        if not table:
            del self.by_length[length]
            self.lengths = sorted(self.by_length, reverse=True)


class IPCache:
    """IP/CIDR -> identity with longest-prefix match. Thread-safe; see the module docstring."""

    def __init__(self, *, default_identity: int = WORLD) -> None:
        self._default = default_identity
        self._lock = threading.RLock()
        self._families = {4: _Family(32), 6: _Family(128)}
        self._entries: dict[IPNetwork, int] = {}
        self._by_identity: dict[int, set[IPNetwork]] = {}
        self._listeners: list[Listener] = []
        self._revision = 0

    @property
    def revision(self) -> int:
        """Bumped by every change; 0 for a new cache."""
        return self._revision

    def __len__(self) -> int:
        return len(self._entries)

    def upsert(self, prefix: str | IPNetwork | IPAddress, identity: int) -> bool:
        """Map `prefix` to `identity`. True if that changed anything."""
        net = parse_prefix(prefix)
        if isinstance(identity, bool) or not isinstance(identity, int) or identity <= 0:
            raise IdentityError(f"identity must be a positive integer, got {identity!r}")
        with self._lock:
            old = self._entries.get(net)
            if old == identity:
                return False
            self._entries[net] = identity
            self._families[net.version].set(int(net.network_address), net.prefixlen, identity)
            if old is not None:
                self._unindex(old, net)
            self._by_identity.setdefault(identity, set()).add(net)
            self._publish(net, old, identity)
            return True

    def delete(self, prefix: str | IPNetwork | IPAddress) -> bool:
        """Forget `prefix`. True if it was there."""
        net = parse_prefix(prefix)
        with self._lock:
            old = self._entries.pop(net, None)
            if old is None:
                return False
            self._families[net.version].remove(int(net.network_address), net.prefixlen)
            self._unindex(old, net)
            self._publish(net, old, None)
            return True

    def _unindex(self, identity: int, net: IPNetwork) -> None:
        nets = self._by_identity[identity]
        nets.discard(net)
        if not nets:
            del self._by_identity[identity]

    def _publish(self, net: IPNetwork, old: int | None, new: int | None) -> None:
        self._revision += 1
        change = IPCacheChange(net, old, new, self._revision)
        for listener in list(self._listeners):
            listener(change)

    def lookup(self, address: str | IPAddress) -> int:
        """The identity of the longest prefix holding `address`; `world` if there is none."""
        addr = parse_address(address)
        family = self._families[addr.version]
        with self._lock:
            found = family.lookup(int(addr))
        return self._default if found is None else found[1]

    def lookup_entry(self, address: str | IPAddress) -> IPCacheEntry | None:
        """The longest-prefix entry holding `address`, or None."""
        addr = parse_address(address)
        family = self._families[addr.version]
        with self._lock:
            found = family.lookup(int(addr))
        if found is None:
            return None
        length, identity = found
        net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
        return IPCacheEntry(net, identity)

    def get(self, prefix: str | IPNetwork | IPAddress) -> int | None:
        """The identity stored for exactly this prefix (no longest-prefix match)."""
        with self._lock:
            return self._entries.get(parse_prefix(prefix))

    def prefixes_of(self, identity: int) -> tuple[IPNetwork, ...]:
        """The prefixes mapped to `identity`, sorted (IPv4 first, then by address, length)."""
        with self._lock:
            return tuple(sorted(self._by_identity.get(identity, ()), key=prefix_sort_key))

    def snapshot(self) -> tuple[IPCacheEntry, ...]:
        """Every entry, sorted (IPv4 first, then by address, then by length)."""
        with self._lock:
            items = list(self._entries.items())
        return tuple(IPCacheEntry(n, i) for n, i in sorted(items, key=lambda e: prefix_sort_key(e[0])))

    def snapshot_with_revision(self) -> tuple[tuple[IPCacheEntry, ...], int]:
        with self._lock:
            return self.snapshot(), self._revision

    def __iter__(self) -> Iterator[IPCacheEntry]:
        return iter(self.snapshot())

    def subscribe(self, listener: Listener, *, replay: bool = False) -> Callable[[], None]:
        """Call `listener` for every later change. With `replay`, first call it with an "added"
        change for every current entry (under the lock, so nothing is missed or doubled).
        Returns a function that unsubscribes."""
        with self._lock:
            if replay:
                for entry in self.snapshot():
                    listener(IPCacheChange(entry.prefix, None, entry.identity, self._revision))
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe


def prefix_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    """Prefixes in address order: IPv4 first, then by address, then by length."""
    return net.version, int(net.network_address), net.prefixlen
