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
  whose new pods moved the port; Cilium's `ErrDuplicateNamedPorts`);
- on ingress only: some pods of the identity do not declare it at all (`partial`).

Cilium resolves an ingress named port per pod, from the endpoint's own container ports; l7gate
keeps one policy map per identity, so on ingress a name resolves only when every pod of the
identity declares it with the same number (then per pod and per identity agree); otherwise it
resolves to nothing, fail closed (docs/named-ports.md). On egress, as in Cilium, the pods that
declare the name decide. `protocol: ANY` (or none) resolves per protocol: the name's TCP number
on TCP, its UDP number on UDP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .types import NamedPort, Protocol

CONCRETE = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


@dataclass(frozen=True, slots=True)
class NamedPorts:
    """The named container ports the pods of one identity declare: (name, protocol, number)
    triples, and the (name, protocol) pairs some of its pods do not declare (`partial`).
    Immutable; equal declarations compare (and hash) equal."""

    declared: frozenset[tuple[str, Protocol, int]] = frozenset()
    partial: frozenset[tuple[str, Protocol]] = frozenset()
    _index: Mapping[tuple[str, Protocol], frozenset[int]] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        index: dict[tuple[str, Protocol], set[int]] = {}
        for name, proto, number in self.declared:
            index.setdefault((name, proto), set()).add(number)
        object.__setattr__(self, "_index", {k: frozenset(v) for k, v in index.items()})

    @classmethod
    def of(cls, declared: Iterable[tuple[str, int, str | Protocol]],
           partial: Iterable[tuple[str, str | Protocol]] = ()) -> NamedPorts:
        """From (name, containerPort, protocol) as a Pod spec gives them (`Pod.named_ports`),
        of any number of pods, and the (name, protocol) pairs some pods lack."""
        return cls(frozenset((name, Protocol(proto), number) for name, number, proto in declared),
                   frozenset((name, Protocol(proto)) for name, proto in partial))

    @classmethod
    def of_pods(cls, pods: Iterable[Iterable[tuple[str, int, str | Protocol]]]) -> NamedPorts:
        """From the named ports of each pod of one identity."""
        each = [{(name, Protocol(proto), number) for name, number, proto in pod} for pod in pods]
        keys = [{(name, proto) for name, proto, _ in pod} for pod in each]
        every = set.intersection(*keys) if keys else set()
        return cls(frozenset().union(*each), frozenset(set().union(*keys) - every))

    def __bool__(self) -> bool:
        return bool(self.declared)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self._index)

    def numbers(self, name: str, protocol: Protocol) -> frozenset[int]:
        """Every number the pods declare `name` with for `protocol` (a concrete protocol)."""
        return self._index.get((name, protocol), frozenset())

    def number(self, name: str, protocol: Protocol, *, every_pod: bool = False) -> int | None:
        """The one number `name` resolves to for `protocol`, or None (not declared, declared
        with different numbers, or — `every_pod`, ingress — not declared by every pod)."""
        found = self._index.get((name, protocol))
        if found is None or len(found) != 1 or (every_pod and (name, protocol) in self.partial):
            return None
        return next(iter(found))

    def resolve(self, port: NamedPort, *, every_pod: bool = False) -> tuple[tuple[Protocol, int], ...]:
        """The (protocol, number) pairs `port` selects on this destination: one per concrete
        protocol its protocol covers whose name resolves."""
        out: list[tuple[Protocol, int]] = []
        for proto in CONCRETE:
            if port.protocol.covers(proto):
                n = self.number(port.name, proto, every_pod=every_pod)
                if n is not None:
                    out.append((proto, n))
        return tuple(out)

    def explain(self, port: NamedPort, protocol: Protocol, *, every_pod: bool = False) -> str:
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
        if every_pod and (port.name, protocol) in self.partial:
            return (f"port name {port.name!r} is declared for {protocol.value} by some pods of the identity "
                    "only (on ingress every pod must declare it): it selects nothing")
        return f"port name {port.name!r} is {next(iter(found))}/{protocol.value}"

    def __str__(self) -> str:
        return ", ".join(f"{n}={num}/{p.value}" for n, p, num in sorted(self.declared, key=lambda d: (d[0], d[1].value, d[2])))


NO_NAMED_PORTS = NamedPorts()
