"""DNS wire format in and out of the proxy: the one place bytes become `Query` values and
answers become `DNSAnswer` values (dnspython does the parsing). No I/O.

- `parse_query` accepts exactly what the proxy will judge and forward: a well-formed message
  (dnspython parses it whole) that is a query (QR clear) with exactly one question and at most
  `max_size` bytes. Anything else raises `Malformed`, the only exception it raises.
- `reject_answer` builds the proxy's own answer to a query (refused by policy, over the
  in-flight limit, upstream failed): the query's id, opcode, RD and CD bits and its question
  exactly as sent (case included, for 0x20 clients), the given rcode, no records.
- `parse_response` checks that an upstream's message answers the query (id, QR, question);
  `extract_answers` follows the answer section's CNAME chain from the question's name and
  collects the final A/AAAA addresses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from .types import DNSAnswer

HEADER_SIZE = 12
MAX_QUERY_SIZE = 4096  # a query carries one question and a few EDNS options; more is abuse
MAX_CNAME_CHAIN = 16  # CNAMEs followed; a longer chain learns nothing (resolvers stop sooner)

# Cilium's --tofqdns-dns-reject-response-code values, and the rcode names they stand for.
_REJECT_CODES = {"refused": dns.rcode.REFUSED, "nameerror": dns.rcode.NXDOMAIN,
                 "nxdomain": dns.rcode.NXDOMAIN}


class Malformed(ValueError):
    """A message the proxy does not take; the text says why."""


class Mismatch(ValueError):
    """A well-formed message that does not answer the query it was matched with."""


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed query. `wire` is forwarded unchanged (same id, same bytes)."""

    wire: bytes
    id: int
    flags: int
    opcode: dns.opcode.Opcode
    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    rdclass: dns.rdataclass.RdataClass

    @property
    def qname(self) -> str:
        return normalize_name(self.name)

    @property
    def qtype(self) -> str:
        return dns.rdatatype.to_text(self.rdtype)


def normalize_name(name: dns.name.Name) -> str:
    """The proxy's name convention, for `judge`, answers and events: the name's presentation
    form in lower case without the trailing dot (``api.example.com``); the root is ``.``.
    Bytes outside printable ASCII, and dots inside a label, keep their escapes (``\\.``,
    ``\\032``), so two different names never look alike."""
    return name.to_text(omit_final_dot=True).lower()


def reject_rcode(option: str) -> dns.rcode.Rcode:
    """The rcode for Cilium's ``--tofqdns-dns-reject-response-code``: ``refused`` (REFUSED) or
    ``nameError`` (NXDOMAIN); also the rcode names themselves, any case."""
    code = _REJECT_CODES.get(option.strip().lower())
    if code is None:
        raise ValueError(f"reject response code {option!r}: expected refused or nameError")
    return code


def parse_query(wire: bytes, max_size: int = MAX_QUERY_SIZE) -> Query:
    if len(wire) > max_size:
        raise Malformed(f"{len(wire)} bytes, more than {max_size}")
    if len(wire) < HEADER_SIZE:
        raise Malformed(f"{len(wire)} bytes, shorter than a DNS header")
    try:
        msg = dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        # TSIG-signed: the server the query is forwarded to checks the signature, not us.
        msg = _parse_question_only(wire)
    except Exception as exc:  # noqa: BLE001 - dnspython raises many types; all mean malformed
        raise Malformed(f"not a DNS message: {type(exc).__name__}: {exc}") from None
    if msg.flags & dns.flags.QR:
        raise Malformed("a response, not a query")
    if len(msg.question) != 1:
        raise Malformed(f"{len(msg.question)} questions, expected exactly one")
    q = msg.question[0]
    return Query(wire=bytes(wire), id=msg.id, flags=msg.flags, opcode=dns.opcode.Opcode.make(msg.opcode()),
                 name=q.name, rdtype=dns.rdatatype.RdataType.make(q.rdtype),
                 rdclass=dns.rdataclass.RdataClass.make(q.rdclass))


def _parse_question_only(wire: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire, question_only=True)
    except Exception as exc:  # noqa: BLE001 - see parse_query
        raise Malformed(f"not a DNS message: {type(exc).__name__}: {exc}") from None


def reject_answer(query: Query, rcode: dns.rcode.Rcode) -> bytes:
    msg = dns.message.Message(id=query.id)
    msg.flags = dns.flags.QR | (query.flags & (dns.flags.RD | dns.flags.CD))
    msg.set_opcode(query.opcode)
    msg.set_rcode(rcode)
    msg.question = [dns.rrset.RRset(query.name, query.rdclass, query.rdtype)]
    return msg.to_wire()


def parse_response(wire: bytes, query: Query) -> dns.message.Message:
    """The upstream's answer to `query`; `Mismatch` if it answers something else (a stray or
    spoofed datagram: the caller keeps waiting), `Malformed` if it cannot be read."""
    try:
        msg = dns.message.from_wire(wire)
    except Exception as exc:  # noqa: BLE001 - see parse_query
        if len(wire) >= 2 and int.from_bytes(wire[:2], "big") != query.id:
            raise Mismatch(f"id {int.from_bytes(wire[:2], 'big')}, expected {query.id}") from None
        raise Malformed(f"unreadable answer: {type(exc).__name__}: {exc}") from None
    if msg.id != query.id:
        raise Mismatch(f"id {msg.id}, expected {query.id}")
    if not msg.flags & dns.flags.QR:
        raise Mismatch("not a response")
    if len(msg.question) != 1 or (msg.question[0].name, msg.question[0].rdtype, msg.question[0].rdclass) != (
            query.name, query.rdtype, query.rdclass):
        raise Mismatch("answers another question")
    return msg


def rcode_text(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())


def extract_answers(msg: dns.message.Message, qname: dns.name.Name
                    ) -> tuple[tuple[DNSAnswer, ...], tuple[str, ...]]:
    """The addresses `msg` gives for `qname`: (answers, CNAME targets in chain order).

    Only the answer section's IN-class CNAME, A and AAAA records on the chain that starts at
    `qname` count, in whatever order they come; records for other names are ignored (an
    upstream cannot teach addresses for a name the query did not lead to). A chain that loops
    or is longer than `MAX_CNAME_CHAIN` gives nothing; a chain without final addresses gives
    its CNAME targets and no answers."""
    cnames: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    addresses: dict[dns.name.Name, list[tuple[str, int]]] = {}
    for rrset in msg.answer:
        if rrset.rdclass != dns.rdataclass.IN or not len(rrset):
            continue
        if rrset.rdtype == dns.rdatatype.CNAME:
            cnames.setdefault(rrset.name, (rrset[0].target, rrset.ttl))
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addresses.setdefault(rrset.name, []).extend((rd.address, rrset.ttl) for rd in rrset)
    chain = [qname]
    link_ttls: list[int] = []
    name = qname
    while name in cnames:
        target, ttl = cnames[name]
        if target in chain or len(link_ttls) == MAX_CNAME_CHAIN:
            return (), ()
        chain.append(target)
        link_ttls.append(ttl)
        name = target
    targets = tuple(normalize_name(n) for n in chain[1:])
    final = addresses.get(name)
    if not final:
        return (), targets
    ips = tuple(_unique(ip for ip, _ in final))
    ttl = min(t for _, t in final)
    answers = []
    for i, n in enumerate(chain):
        answers.append(DNSAnswer(normalize_name(n), ips, min([ttl, *link_ttls[i:]])))
    return tuple(answers), targets


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


__all__ = ["HEADER_SIZE", "MAX_CNAME_CHAIN", "MAX_QUERY_SIZE", "Malformed", "Mismatch", "Query",
           "extract_answers", "normalize_name", "parse_query", "parse_response", "rcode_text",
           "reject_answer", "reject_rcode"]
