"""Resolved policy → entries of the kernel policy map (pure: no bcc, no I/O).

The BPF program makes one or two lookups per new flow in an LPM trie keyed by
`(endpoint, direction, protocol, peer, port prefix)`: the peer's own entry, else the ANY
(peer 0) entry. So each entry must already hold the *merged* decision for its peer and port
block — deny winning, allows as a union, the ANY rules folded in — which is exactly what
`policy.resolve.decide` computes. This module asks `decide` for every port segment whose
decision can differ (the boundaries of the map's port ranges), for every named peer and for
ANY, and writes the result as the fewest prefix blocks:

- ANY covers all 65,536 ports of the four protocols, so a lookup never misses for a computed
  endpoint (a miss means "not computed yet": the kernel drops).
- A named peer is written only where its decision differs from ANY's.

ICMP (protocol 1) is keyed as Cilium keys it: the ICMP type in the port field (0-255; the rest
of the port axis gets the same decision as types no rule names).

Actions: ALLOW, DENY, REDIRECT (to the node's Envoy; with DNS, egress DNS rules: to the node's
DNS proxy); flags: AUTH (a valid auth entry is needed), AUTH_FAIL (`test-always-fail`: always
dropped as "Authentication required"), TUNNEL, DNS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from ..policy.mapstate import ANY_PEER, Action, Decision, EndpointPolicy, MapEntry, decide_hits, tunnel_needed
from ..policy.types import PortRange
from ..policy.types import AuthMode, Direction, Protocol

PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP)
PROTO_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132, Protocol.ICMP: 1}
DIR_NUMBERS = {Direction.INGRESS: 0, Direction.EGRESS: 1}


class KAction(IntEnum):
    ALLOW = 1
    DENY = 2
    REDIRECT = 3


class KFlag(IntEnum):
    AUTH = 1
    AUTH_FAIL = 2
    TUNNEL = 4  # from another node: only through the mTLS tunnel (plaintext refused)
    DNS = 8  # egress DNS rules: redirected to the node's DNS proxy (the query keeps its destination)


@dataclass(frozen=True, slots=True, order=True)
class PolicyKey:
    endpoint: int
    direction: int  # 0 ingress, 1 egress
    proto: int  # IP protocol number
    peer: int  # identity; 0 = ANY
    port: int  # first port of the block
    port_prefix: int  # 0..16 leading port bits that must match

    @property
    def last_port(self) -> int:
        return self.port | ((1 << (16 - self.port_prefix)) - 1)


@dataclass(frozen=True, slots=True)
class PolicyValue:
    action: KAction
    flags: int = 0


def kernel_value(d: Decision, tunnel: bool = False, protocol: Protocol = Protocol.TCP) -> PolicyValue:
    """`tunnel`: in-transit encryption is on, so auth-required traffic from other nodes that
    the tunnel can carry must come through the Envoy-to-Envoy mTLS tunnel (`tunnel_needed`
    is the same test)."""
    if d.action is Action.DENY:
        return PolicyValue(KAction.DENY)
    if d.action is Action.AUTH_FAIL:
        return PolicyValue(KAction.DENY, KFlag.AUTH_FAIL)
    flags = KFlag.AUTH if d.auth is AuthMode.REQUIRED else 0
    if tunnel and tunnel_needed(d, protocol):
        flags |= KFlag.TUNNEL
    if d.action is Action.HTTP:
        if d.dns and not d.http:
            flags |= KFlag.DNS
        return PolicyValue(KAction.REDIRECT, flags)
    return PolicyValue(KAction.ALLOW, flags)


def prefix_blocks(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The fewest aligned (start, prefix_len) blocks covering ports lo..hi (16-bit)."""
    while lo <= hi:
        size = 16
        while size > 0:
            block = 1 << (16 - (size - 1))
            if lo % block == 0 and lo + block - 1 <= hi:
                size -= 1
            else:
                break
        yield lo, size
        lo += 1 << (16 - size)


def _boundaries(policy: EndpointPolicy, direction: Direction, proto: Protocol) -> list[int]:
    cuts = {0, 65536}
    for key in policy.entries(direction):
        if key.protocol.covers(proto):
            cuts.add(key.ports.lo)
            cuts.add(key.ports.hi + 1)
    return sorted(c for c in cuts if 0 <= c <= 65536)


def _runs(policy: EndpointPolicy, direction: Direction, cuts: list[int],
          keyed: list[tuple[PortRange, MapEntry]], tunnel: bool = False,
          proto: Protocol = Protocol.TCP) -> list[tuple[int, int, PolicyValue]]:
    """Decisions along the port axis for one peer, given the (port range, entry) pairs that
    apply to it (its own and the ANY ones, for one protocol)."""
    runs: list[tuple[int, int, PolicyValue]] = []
    for lo, nxt in zip(cuts, cuts[1:]):
        hits = [e for ports, e in keyed if ports.contains(lo)]
        v = kernel_value(decide_hits(policy, direction, hits), tunnel and direction is Direction.INGRESS, proto)
        if runs and runs[-1][2] == v and runs[-1][1] == lo - 1:
            runs[-1] = (runs[-1][0], nxt - 1, v)
        else:
            runs.append((lo, nxt - 1, v))
    return runs


def compile_endpoint(policy: EndpointPolicy, tunnel: bool = False) -> dict[PolicyKey, PolicyValue]:
    """Every policy-map entry for one endpoint identity, both directions. `tunnel`: ingress
    entries that need the mTLS tunnel from other nodes carry `KFlag.TUNNEL`."""
    out: dict[PolicyKey, PolicyValue] = {}
    ep = policy.identity
    for direction in Direction:
        for proto in PROTOCOLS:
            cuts = _boundaries(policy, direction, proto)
            any_keyed: list[tuple[PortRange, MapEntry]] = []
            by_peer: dict[int, list[tuple[PortRange, MapEntry]]] = {}
            for k, e in policy.entries(direction).items():
                if not k.protocol.covers(proto):
                    continue
                if k.peer == ANY_PEER:
                    any_keyed.append((k.ports, e))
                else:
                    by_peer.setdefault(k.peer, []).append((k.ports, e))
            named = sorted(by_peer)
            # A peer no key names gets the ANY rules (and default-deny) alone.
            any_runs = _runs(policy, direction, cuts, any_keyed, tunnel, proto)
            for lo, hi, v in any_runs:
                for start, plen in prefix_blocks(lo, hi):
                    out[PolicyKey(ep, DIR_NUMBERS[direction], PROTO_NUMBERS[proto], ANY_PEER, start, plen)] = v
            any_value_of = _value_lookup(any_runs)
            for peer in named:
                for lo, hi, v in _runs(policy, direction, cuts, any_keyed + by_peer[peer], tunnel, proto):
                    # Write only where the peer differs from ANY; split at ANY's own runs.
                    for seg_lo, seg_hi in _split(lo, hi, any_runs):
                        if any_value_of(seg_lo) == v:
                            continue
                        for start, plen in prefix_blocks(seg_lo, seg_hi):
                            out[PolicyKey(ep, DIR_NUMBERS[direction], PROTO_NUMBERS[proto], peer, start, plen)] = v
    return out


def _split(lo: int, hi: int, runs: list[tuple[int, int, PolicyValue]]) -> Iterator[tuple[int, int]]:
    for rlo, rhi, _ in runs:
        a, b = max(lo, rlo), min(hi, rhi)
        if a <= b:
            yield a, b


def _value_lookup(runs: list[tuple[int, int, PolicyValue]]) -> Callable[[int], PolicyValue]:
    def at(port: int) -> PolicyValue:
        for lo, hi, v in runs:
            if lo <= port <= hi:
                return v
        raise KeyError(port)

    return at


def lookup(entries: dict[PolicyKey, PolicyValue], endpoint: int, direction: int, proto: int, peer: int, port: int) -> PolicyValue | None:
    """What the kernel's two LPM lookups return for these entries (for tests)."""
    for p in (peer, ANY_PEER):
        best: tuple[int, PolicyValue] | None = None
        for k, v in entries.items():
            if (k.endpoint, k.direction, k.proto, k.peer) != (endpoint, direction, proto, p):
                continue
            if k.port <= port <= k.last_port and (best is None or k.port_prefix > best[0]):
                best = (k.port_prefix, v)
        if best is not None:
            return best[1]
    return None


def endpoints_entries(policies: Iterable[EndpointPolicy]) -> dict[PolicyKey, PolicyValue]:
    out: dict[PolicyKey, PolicyValue] = {}
    for p in policies:
        out.update(compile_endpoint(p))
    return out
