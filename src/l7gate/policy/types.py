"""The internal, validated form of CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy.

Everything here is immutable. Parsing (`parse.py`) is the one place YAML-shaped dicts become
these values; nothing downstream ever sees a raw dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from .errors import Finding
from .fqdn import NameMatch
from .labels import Labels
from .regex import full_match
from .selector import LabelSelector, PeerSelector


class Direction(str, Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


class Protocol(str, Enum):
    ANY = "ANY"
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"
    ICMP = "ICMP"  # ICMPv4, from `icmps` rules; its "port" is the ICMP type (0-255)

    def covers(self, other: Protocol) -> bool:
        """ANY is what Cilium makes of `protocol: ANY` in toPorts: TCP, UDP and SCTP, never
        ICMP. ICMP is covered by `icmps` rules, and by rules without ports (L3 only)."""
        return self is other or (self is Protocol.ANY and other is not Protocol.ICMP)


class AuthMode(str, Enum):
    DISABLED = "disabled"
    REQUIRED = "required"
    ALWAYS_FAIL = "test-always-fail"

    @property
    def strength(self) -> int:
        return {"disabled": 0, "required": 1, "test-always-fail": 2}[self.value]


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """Inclusive port range; 0-65535 is "all ports" (Cilium writes it as port 0)."""

    lo: int
    hi: int

    def contains(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    @property
    def is_all(self) -> bool:
        return self.lo == 0 and self.hi == 65535

    def __str__(self) -> str:
        if self.is_all:
            return "*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


ALL_PORTS = PortRange(0, 65535)


#: Every ICMP type: what a rule without ports (L3 only) allows or denies of ICMP.
ALL_ICMP_TYPES = PortRange(0, 255)


@dataclass(frozen=True, slots=True, order=True)
class PortProtocol:
    """Ports of a protocol; for ICMP, types (`PortRange(8, 8)`: echo request)."""

    ports: PortRange
    protocol: Protocol

    def covers(self, port: int, protocol: Protocol) -> bool:
        return self.protocol.covers(protocol) and self.ports.contains(port)

    def __str__(self) -> str:
        if self.protocol is Protocol.ICMP:
            return "ICMP type " + ("*" if self.ports == ALL_ICMP_TYPES else str(self.ports))
        return f"{self.ports}/{self.protocol.value}"


ANY_PORT = PortProtocol(ALL_PORTS, Protocol.ANY)
ANY_ICMP = PortProtocol(ALL_ICMP_TYPES, Protocol.ICMP)


@dataclass(frozen=True, slots=True, order=True)
class NamedPort:
    """`port: http`: a container port of the flow's destination, by its name. Which number it
    is depends on the destination (the endpoint itself for ingress, the peer for egress) and
    is resolved against the named container ports of its pods (`namedports.NamedPorts`), per
    concrete protocol `protocol` covers; a name the destination does not declare selects
    nothing. `name` is lower-case (Cilium compares port names case-insensitively)."""

    name: str
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.name}/{self.protocol.value}"


Port = PortProtocol | NamedPort


def port_sort_key(p: Port) -> tuple[int, int, int, str, str]:
    """One order for numbered and named ports (they do not compare with each other)."""
    if isinstance(p, NamedPort):
        return (1, 0, 0, p.protocol.value, p.name)
    return (0, p.ports.lo, p.ports.hi, p.protocol.value, "")


class MismatchAction(str, Enum):
    LOG = "LOG"
    ADD = "ADD"
    DELETE = "DELETE"
    REPLACE = "REPLACE"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header that must be present (value None) or equal `value` exactly.

    With a `mismatch` action the rule does not deny on a mismatch: Envoy logs or rewrites the
    header instead (Cilium's headerMatches semantics).
    """

    name: str
    value: str | None = None
    mismatch: MismatchAction | None = None

    def matches(self, headers: Mapping[str, str]) -> bool:
        if self.mismatch is not None:
            return True
        actual = headers.get(self.name.lower())
        if actual is None:
            return False
        return self.value is None or actual == self.value

    def __str__(self) -> str:
        s = self.name if self.value is None else f"{self.name}: {self.value}"
        return s + (f" (on mismatch {self.mismatch.value})" if self.mismatch else "")


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """What the L7 rules see. `path` is the whole `:path` (query included), before normalization;
    header names are lower-case."""

    method: str
    path: str
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HTTPRule:
    """All given fields must match. A rule with no fields allows every request."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[HeaderMatch, ...] = ()

    @property
    def sort_key(self) -> tuple[str, str, str, tuple[str, ...]]:
        return (
            self.method or "",
            self.path or "",
            self.host or "",
            tuple(str(h) for h in self.headers),
        )

    def matches(self, req: HTTPRequest, normalized_path: str) -> bool:
        if self.method is not None and not full_match(self.method, req.method):
            return False
        if self.path is not None and not full_match(self.path, normalized_path):
            return False
        if self.host is not None and not full_match(self.host, req.host):
            return False
        return all(h.matches(req.headers) for h in self.headers)

    def __str__(self) -> str:
        parts = []
        if self.method is not None:
            parts.append(f"method={self.method}")
        if self.path is not None:
            parts.append(f"path={self.path}")
        if self.host is not None:
            parts.append(f"host={self.host}")
        parts.extend(f"header[{h}]" for h in self.headers)
        return "{" + " ".join(parts) + "}" if parts else "{any request}"


@dataclass(frozen=True, slots=True)
class L7Rules:
    """L7 rules on one port: HTTP rules (a request is allowed when any rule matches it), DNS
    rules (`rules.dns`: a query is allowed when any name match selects its name), or TLS server
    names (`serverNames`: a TLS connection is allowed when its SNI matches one; a connection
    without TLS, or without SNI, is not)."""

    http: tuple[HTTPRule, ...]
    dns: tuple[NameMatch, ...] = ()
    sni: tuple[NameMatch, ...] = ()  # `serverNames`, as canonical patterns

    @classmethod
    def of(cls, rules: Iterable[HTTPRule], dns: Iterable[NameMatch] = (), sni: Iterable[NameMatch] = ()) -> L7Rules:
        """Deduplicated and sorted, so equal rule sets compare and hash equal."""
        return cls(tuple(sorted(set(rules), key=lambda r: r.sort_key)), tuple(sorted(set(dns), key=lambda m: m.key)),
                   tuple(sorted(set(sni), key=lambda m: m.key)))

    def allows_query(self, name: str) -> bool:
        """Whether a DNS query for the (canonical, `fqdn.fqdn`) `name` is allowed."""
        return any(m.matches(name) for m in self.dns)

    @property
    def allows_all(self) -> bool:
        return any(r == HTTPRule() for r in self.http)


@dataclass(frozen=True, slots=True)
class PortRule:
    """One `toPorts` entry, or one `icmps` entry (ICMP types as ports, never L7 rules)."""

    # "all ports" is ANY_PORT; empty for a `toPorts` entry without ports, which selects no port
    # (as in Cilium); sorted by `port_sort_key`
    ports: tuple[Port, ...]
    l7: L7Rules | None = None

    @property
    def named(self) -> bool:
        return any(isinstance(p, NamedPort) for p in self.ports)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a rule came from, for verdict explanations: `CiliumNetworkPolicy/ns/name`."""

    kind: str
    namespace: str
    name: str
    path: str  # e.g. spec.ingress[0]

    @property
    def policy(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{ns}{self.name}"

    def __str__(self) -> str:
        return f"{self.policy} {self.path}"


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One element of ingress, ingressDeny, egress or egressDeny.

    `peers is None` means the rule names no peer (only toPorts or icmps): it applies to every
    peer. An empty tuple never matches (Cilium's `- {}`: selects nothing, still enables default
    deny). `port_rules` come from `toPorts` or from `icmps` (Cilium refuses both in one rule);
    empty means neither: the rule is about every protocol, ICMP included.
    """

    direction: Direction
    deny: bool
    peers: tuple[PeerSelector, ...] | None
    port_rules: tuple[PortRule, ...]  # empty: all ports
    auth: AuthMode | None
    origin: Origin

    @property
    def effective_port_rules(self) -> tuple[PortRule, ...]:
        return self.port_rules or _L3_ONLY


# A rule without ports covers every protocol: TCP, UDP and SCTP on every port (ANY), and every
# ICMP type, as Cilium's L3-only rule (a wildcard protocol in its policy map) does.
_L3_ONLY = (PortRule((ANY_PORT, ANY_ICMP)),)


@dataclass(frozen=True, slots=True)
class Rule:
    """One spec of a policy: who it applies to, and its peer rules per direction."""

    subject: LabelSelector
    node_selector: bool
    rules: tuple[PeerRule, ...]
    default_deny_ingress: bool
    default_deny_egress: bool
    origin: Origin
    description: str = ""
    labels: Labels = Labels()

    def selects(self, labels: Labels) -> bool:
        return self.subject.matches(labels)

    def default_deny(self, direction: Direction) -> bool:
        if direction is Direction.INGRESS:
            return self.default_deny_ingress
        return self.default_deny_egress


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed CNP or CCNP: one resource, one or more rules, plus lint warnings."""

    kind: str
    namespace: str
    name: str
    rules: tuple[Rule, ...]
    warnings: tuple[Finding, ...] = ()

    @property
    def key(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{ns}{self.name}"
