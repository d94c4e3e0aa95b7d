"""ICMP types as Cilium's `icmps` rules name them.

An `icmps` field's `type` is a number 0-255 or one of Cilium's CamelCase names, which depend on
the field's `family` (the names of ICMPv6 types differ). l7gate enforces IPv4 only, so only the
IPv4 names resolve to numbers here; the IPv6 names are kept to tell a user who wrote one under
the IPv4 family (the default) what went wrong.

The ICMP type is the "port" of an ICMP rule, in the policy maps as in Cilium's: protocol ICMP,
port = type, 0-255.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: Cilium's names of ICMPv4 types (pkg/policy/api, `icmps[].fields[].type`). `Echo` and
#: `EchoRequest` are both 8.
ICMPV4_TYPES: Mapping[str, int] = MappingProxyType({
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
})

#: Names Cilium only knows for ICMPv6 (an IPv4 rule naming one is refused).
ICMPV6_ONLY_NAMES = frozenset({
    "PacketTooBig", "MulticastListenerQuery", "MulticastListenerReport", "MulticastListenerDone",
    "RouterSolicitation", "NeighborSolicitation", "NeighborAdvertisement", "RedirectMessage",
    "RouterRenumbering", "ICMPNodeInformationQuery", "ICMPNodeInformationResponse",
    "InverseNeighborDiscoverySolicitation", "InverseNeighborDiscoveryAdvertisement",
    "HomeAgentAddressDiscoveryRequest", "HomeAgentAddressDiscoveryReply",
    "MobilePrefixSolicitation", "MobilePrefixAdvertisement", "DuplicateAddressRequestCodeSuffix",
    "DuplicateAddressConfirmationCodeSuffix",
})

#: Names the agent accepts but the type pattern of Cilium's CRD leaves out (it spells this one
#: "ExtendedEcho Reply"): the API server refuses them.
NAMES_NOT_IN_CRD = frozenset({"ExtendedEchoReply"})

ICMP_TYPE_MAX = 255

# The name shown for a number: the first name Cilium lists for it (EchoRequest, not Echo).
_SHOWN = {"Echo"}
_NAME_OF: Mapping[int, str] = MappingProxyType(
    {n: name for name, n in ICMPV4_TYPES.items() if name not in _SHOWN}
)


def icmp_type_name(icmp_type: int) -> str | None:
    """Cilium's name of an ICMPv4 type (8 → "EchoRequest"), or None for a number it has none."""
    return _NAME_OF.get(icmp_type)


def describe_icmp_type(icmp_type: int) -> str:
    """"8 (EchoRequest)", or "7" for a type without a name."""
    name = icmp_type_name(icmp_type)
    return f"{icmp_type} ({name})" if name else str(icmp_type)


class ICMPTypeError(ValueError):
    """A type that is neither a number 0-255 nor one of Cilium's ICMPv4 names."""


def parse_icmp_type(value: str | int) -> int:
    """A number 0-255 (int, or decimal digits without leading zeros) or an ICMPv4 type name →
    the type number. Raises ICMPTypeError saying why not."""
    if isinstance(value, bool):
        raise ICMPTypeError(f"must be an ICMP type number 0-255 or name, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= ICMP_TYPE_MAX:
            raise ICMPTypeError(f"ICMP type {value} is out of range 0-{ICMP_TYPE_MAX}")
        return value
    if value.isascii() and value.isdigit():
        if len(value) > 1 and value.startswith("0"):
            raise ICMPTypeError(f"{value!r}: write the ICMP type without leading zeros")
        if len(value) > 3 or int(value) > ICMP_TYPE_MAX:
            raise ICMPTypeError(f"ICMP type {value[:10]} is out of range 0-{ICMP_TYPE_MAX}")
        return int(value)
    if value in ICMPV4_TYPES:
        return ICMPV4_TYPES[value]
    if value in ICMPV6_ONLY_NAMES:
        raise ICMPTypeError(f"{value!r} is an ICMPv6 type name; this field's family is IPv4")
    near = [n for n in ICMPV4_TYPES if n.lower() == value.lower().replace(" ", "").replace("-", "")]
    hint = f" (did you mean {near[0]!r}? names are case-sensitive)" if near else ""
    raise ICMPTypeError(
        f"unknown ICMP type {value[:40]!r}{hint}: expected a number 0-{ICMP_TYPE_MAX} or one of "
        + ", ".join(sorted(ICMPV4_TYPES))
    )
