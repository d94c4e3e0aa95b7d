"""DNS names in policy: Cilium's `matchName` / `matchPattern`, for `toFQDNs` peers and
`rules.dns` rules. Pure: no I/O.

Names are compared as Cilium does: lower-case and fully qualified (one trailing dot), so
`API.example.test` and `api.example.test.` are one name. A `matchName` is one name. A
`matchPattern` is a name whose `*` stands for any run of the characters a label may hold
(`[-a-zA-Z0-9_]`, never a dot): `*.example.test` matches `api.example.test` but neither
`example.test` nor `a.b.example.test`; `*` alone matches every name; a leading `**.` stands for
one or more whole labels (Cilium 1.19: `**.example.test` matches `a.example.test` and
`a.b.example.test`, not `example.test`; `**` anywhere else is two `*`). Both are refused, naming
their field, when they hold anything else (Cilium's CRD patterns:
`^([-a-zA-Z0-9_]+[.]?)+$` and `^([-a-zA-Z0-9_*]+[.]?)+$`).

`FQDNSelector` is a peer selector (`toFQDNs`): it selects the identities of addresses learned
from DNS answers for names it matches. Such an identity carries, for every selector that
matched the name it was looked up by, the label `fqdn:<selector>` (the selector's key), beside
its `cidr:<ip>/32` and `reserved:world` labels — Cilium's FQDN identities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .labels import Labels

FQDN_LABEL_PREFIX = "fqdn:"
_NAME_RE = re.compile(r"^([-a-zA-Z0-9_]+[.]?)+$")
_PATTERN_RE = re.compile(r"^([-a-zA-Z0-9_*]+[.]?)+$")
_LABEL_CHARS = "[-a-z0-9_]"
MAX_NAME = 255  # RFC 1035: a name on the wire is at most 255 octets


class FQDNError(ValueError):
    pass


def fqdn(name: str) -> str:
    """`name` as Cilium compares names: lower-case, one trailing dot."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def check_match_name(value: str) -> str:
    """The canonical `matchName`, or FQDNError saying why it is refused."""
    if not _NAME_RE.match(value) or len(value) > MAX_NAME:
        raise FQDNError(f"{value!r} is not a DNS name: only letters, digits, '-', '_' and '.' between labels")
    return fqdn(value)


def check_match_pattern(value: str) -> str:
    """The canonical `matchPattern`, or FQDNError saying why it is refused."""
    if value.strip() == "*":
        return "*"
    if not _PATTERN_RE.match(value) or len(value) > MAX_NAME:
        raise FQDNError(f"{value!r} is not a DNS name pattern: only letters, digits, '-', '_', '*' and '.' "
                        f"between labels")
    return fqdn(value)


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regex of a canonical pattern (`check_match_pattern`), anchored."""
    if pattern == "*":
        return re.compile(rf"^({_LABEL_CHARS}+[.])+$|^[.]$")
    lead = ""
    if pattern.startswith("**."):
        lead, pattern = f"({_LABEL_CHARS}+[.])+", pattern[3:]
    parts = [re.escape(part) for part in pattern.split("*")]
    return re.compile("^" + lead + f"{_LABEL_CHARS}*".join(parts) + "$")


# A TLS server name as l7gate matches it (RFC 6066: ASCII labels, no trailing dot): letters,
# digits, '-' and '_', separated by single dots. Anything else (a trailing dot, an empty label,
# spaces, non-ASCII bytes) is never allowed by `serverNames`, in Envoy as in the policy engine.
SERVER_NAME_RE2 = r"[-a-zA-Z0-9_]+(\.[-a-zA-Z0-9_]+)*"
_SERVER_NAME = re.compile(r"\A[-a-zA-Z0-9_]+(?:\.[-a-zA-Z0-9_]+)*\Z")


def server_name_matches(m: NameMatch, server_name: str) -> bool:
    """Whether `serverNames` entry `m` allows a TLS connection naming `server_name` (as the
    ClientHello sent it): a well-formed name (`SERVER_NAME_RE2`) that the pattern matches,
    without regard to ASCII case."""
    return _SERVER_NAME.match(server_name) is not None and m.matches(server_name.lower() + ".")


def server_name_re2(pattern: str) -> str:
    """A canonical pattern (`check_match_pattern`) as an RE2 regex over a well-formed server
    name (`SERVER_NAME_RE2`, which Envoy checks beside it): together they accept exactly the
    names `server_name_matches` does (tests/unit/test_egress_sni.py, against RE2 itself). ASCII
    case is spelled out (`[aA]`): RE2's case folding is Unicode's."""
    label = "[-a-zA-Z0-9_]"
    if pattern == "*":
        return rf"({label}+\.)*{label}+"
    lead = ""
    if pattern.startswith("**."):
        lead, pattern = rf"({label}+\.)+", pattern[3:]
        if pattern in ("", "."):
            return rf"({label}+\.)*{label}+"  # `**` alone: one or more labels, like `*`

    def literal(part: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in part)

    return lead + f"{label}*".join(literal(part) for part in pattern.rstrip(".").split("*"))


@dataclass(frozen=True, slots=True)
class NameMatch:
    """One `matchName` or `matchPattern` (canonical), as `toFQDNs` and `rules.dns` hold them."""

    match_name: str | None = None
    match_pattern: str | None = None
    _re: re.Pattern[str] | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def name(cls, value: str) -> NameMatch:
        return cls(match_name=check_match_name(value))

    @classmethod
    def pattern(cls, value: str) -> NameMatch:
        p = check_match_pattern(value)
        return cls(match_pattern=p, _re=pattern_regex(p))

    def matches(self, name: str) -> bool:
        """Whether the (canonical, `fqdn`) `name` is selected."""
        if self.match_name is not None:
            return name == self.match_name
        assert self._re is not None
        return self._re.match(name) is not None

    @property
    def key(self) -> str:
        if self.match_name is not None:
            return f"matchName={self.match_name}"
        return f"matchPattern={self.match_pattern}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True, slots=True)
class FQDNSelector:
    """A `toFQDNs` entry as a peer selector (`selector.PeerSelector`)."""

    match: NameMatch

    @property
    def key(self) -> str:
        return FQDN_LABEL_PREFIX + self.match.key

    def matches(self, labels: Labels) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return self.key


def fqdn_labels(selectors: list[FQDNSelector] | tuple[FQDNSelector, ...], name: str) -> dict[str, str]:
    """The `fqdn:` labels an address learned for `name` carries: one per selector matching it."""
    n = fqdn(name)
    return {s.key: "" for s in selectors if s.match.matches(n)}
