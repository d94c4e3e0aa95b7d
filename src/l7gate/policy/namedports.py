"""Named ports: what `port: http` in a rule means for one destination.

A rule's `NamedPort` names a container port of the flow's *destination*: on ingress the
endpoint the rule selects, on egress the peer it selects. l7gate, like Cilium's egress path
(`pkg/policy/types`, a named port map per numeric identity), resolves it per destination
*identity*: the pods of an identity together declare a set of (name, protocol, number), and a
name resolves, for one concrete protocol, to the number those pods declare for it when they all
agree on one. It resolves to nothing (the rule item selects nothing) when

- no pod of the identity declares the name for that protocol (a name nobody declares, a
  protocol the declaration does not have, a peer that is no pod: world, a CIDR, the host);
- the identity's pods declare the name with different numbers for that protocol (a Deployment
  whose new pods moved the port; Cilium's `ErrDuplicateNamedPorts`).

Cilium resolves an ingress named port per pod, from the endpoint's own container ports; l7gate
keeps one policy map per identity, so pods of one identity that disagree resolve to nothing
(fail closed, docs/deviations.md). `protocol: ANY` (or none) resolves per protocol: the name's
TCP number on TCP, its UDP number on UDP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .types import NamedPort, Protocol

CONCRETE = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


@dataclass(frozen=True, slots=True)
class NamedPorts:
    """The named container ports the pods of one identity declare: (name, protocol, number)
    triples. Immutable; equal declarations compare (and hash) equal."""

    declared: frozenset[tuple[str, Protocol, int]] = frozenset()
    _index: Mapping[tuple[str, Protocol], frozenset[int]] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        index: dict[tuple[str, Protocol], set[int]] = {}
        for name, proto, number in self.declared:
            index.setdefault((name, proto), set()).add(number)
        object.__setattr__(self, "_index", {k: frozenset(v) for k, v in index.items()})

    @classmethod
    def of(cls, declared: Iterable[tuple[str, int, str | Protocol]]) -> NamedPorts:
        """From (name, containerPort, protocol) as a Pod spec gives them (`Pod.named_ports`),
        of any number of pods."""
        return cls(frozenset((name, Protocol(proto), number) for name, number, proto in declared))

    def __bool__(self) -> bool:
        return bool(self.declared)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self._index)

    def numbers(self, name: str, protocol: Protocol) -> frozenset[int]:
        """Every number the pods declare `name` with for `protocol` (a concrete protocol)."""
        return self._index.get((name, protocol), frozenset())

    def number(self, name: str, protocol: Protocol) -> int | None:
        """The one number `name` resolves to for `protocol`, or None (not declared, or
        declared with different numbers)."""
        found = self._index.get((name, protocol))
        if found is None or len(found) != 1:
            return None
        return next(iter(found))

    def resolve(self, port: NamedPort) -> tuple[tuple[Protocol, int], ...]:
        """The (protocol, number) pairs `port` selects on this destination: one per concrete
        protocol its protocol covers whose name resolves."""
        out: list[tuple[Protocol, int]] = []
        for proto in CONCRETE:
            if port.protocol.covers(proto):
                n = self.number(port.name, proto)
                if n is not None:
                    out.append((proto, n))
        return tuple(out)

    def explain(self, port: NamedPort, protocol: Protocol) -> str:
        """What `port` is on this destination for `protocol`, in words (flow reasons)."""
        if not port.protocol.covers(protocol):
            return f"port {port} does not cover {protocol.value}"
        found = self.numbers(port.name, protocol)
        if not found:
            return f"port name {port.name!r} is not declared for {protocol.value}: it selects nothing"
        if len(found) > 1:
            nums = ", ".join(str(n) for n in sorted(found))
            return (f"port name {port.name!r} is declared as {nums} for {protocol.value} by pods of one "
                    "identity: it selects nothing")
        return f"port name {port.name!r} is {next(iter(found))}/{protocol.value}"

    def __str__(self) -> str:
        return ", ".join(f"{n}={num}/{p.value}" for n, p, num in sorted(self.declared, key=lambda d: (d[0], d[1].value, d[2])))


NO_NAMED_PORTS = NamedPorts()
