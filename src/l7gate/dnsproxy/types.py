"""The values the DNS proxy hands to its owner: verdicts it asks for, answers it learned, events.

All are immutable; the proxy never keeps a reference it later changes, so a receiver may store
them as they are, from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class DNSVerdict:
    """The owner's decision on one query. `reason` and `policies` only travel into events."""

    allowed: bool
    reason: str = ""
    policies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DNSAnswer:
    """Addresses an allowed answer gave for one name.

    The query name and every CNAME target on the chain from it each get one `DNSAnswer` with
    the chain's final A/AAAA addresses; `ttl` is the smallest TTL on the chain from that name
    on (its own CNAME record's, the later ones', the addresses'). Names follow the proxy's
    convention (`normalize_name`): lower case, no trailing dot.
    """

    name: str
    ips: tuple[str, ...]
    ttl: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DNSEvent:
    """One flow record. A query gives a ``request`` event once judged (denied ones: that is the
    only event, with the `rcode` of the synthesized answer); an allowed one then gives a
    ``response`` event when its answer is released, or when it failed (`error` says why; `rcode`
    is SERVFAIL when one was sent, empty when nothing was sent, as after an upstream timeout).

    `source` is the client, `server` the address the client sent the query to (its original
    destination: in transparent mode the resolver's; otherwise the proxy's own). `latency` is
    seconds from receiving the query to releasing the answer. `time` is wall-clock seconds.
    """

    kind: Literal["request", "response"]
    source: tuple[str, int]
    server: tuple[str, int]
    qname: str
    qtype: str
    protocol: Literal["udp", "tcp"]
    time: float
    id: int = 0
    verdict: DNSVerdict | None = None
    rcode: str = ""
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    latency: float = 0.0
    error: str = ""
