"""The DNS proxy's pure parts, on packets built with dnspython: what counts as a query, the
answer a refused query gets, the addresses an answer teaches (CNAME chains, TTLs), the socket
control messages of transparent mode."""

from __future__ import annotations

import socket
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.dnsproxy import DNSAnswer, sockets
from l7gate.dnsproxy.messages import (MAX_CNAME_CHAIN, Malformed, Mismatch, extract_answers,
                                      normalize_name, parse_query, parse_response, reject_answer,
                                      reject_rcode)


def query(name: str = "api.example.com", rdtype: str = "A", **kwargs: object) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]


def response(q: dns.message.Message, *records: str, rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
    """A response to `q` whose answer section holds `records` (zone-file lines, in order)."""
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.Rcode.make(rcode))
    for line in records:
        name, ttl, _in, rdtype, *data = line.split()
        rrset = dns.rrset.from_text(name, int(ttl), "IN", rdtype, " ".join(data))
        r.answer.append(rrset)
    return r


# --- queries -----------------------------------------------------------------------------------


def test_a_query_is_parsed_with_its_normalized_name() -> None:
    q = query("ApI.Example.COM.", "AAAA")
    parsed = parse_query(q.to_wire())
    assert (parsed.qname, parsed.qtype, parsed.id) == ("api.example.com", "AAAA", q.id)
    assert parsed.wire == q.to_wire()
    assert parsed.name == dns.name.from_text("api.example.com")


def test_name_convention_lower_case_without_trailing_dot() -> None:
    assert normalize_name(dns.name.from_text("WWW.Example.Org.")) == "www.example.org"
    assert normalize_name(dns.name.root) == "."
    # a dot inside a label and a byte outside printable ASCII keep their escapes
    assert normalize_name(dns.name.from_text(r"a\.b.example.")) == r"a\.b.example"
    assert normalize_name(dns.name.from_text(r"a\032b.example.")) == r"a\032b.example"


def _two_questions() -> bytes:
    q = query()
    q.question.append(dns.rrset.RRset(dns.name.from_text("other.example.com"), dns.rdataclass.IN, dns.rdatatype.A))
    return q.to_wire()


def _no_question() -> bytes:
    q = query()
    q.question = []
    return q.to_wire()


MALFORMED = {
    "garbage": b"\x00\x01not a dns message at all",
    "short header": b"\x12\x34\x01",
    "empty": b"",
    "no question": _no_question(),
    "two questions": _two_questions(),
    "a response": dns.message.make_response(query()).to_wire(),
    "truncated question": query().to_wire()[:-3],
    "trailing junk": query().to_wire() + b"\x00\x00junk",
    "oversized": query(use_edns=0, options=[dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"x" * 5000)]).to_wire(
        max_size=65535),
}


@pytest.mark.parametrize("wire", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_raise_malformed(wire: bytes) -> None:
    with pytest.raises(Malformed):
        parse_query(wire)


def test_a_tsig_signed_query_is_taken_for_the_server_to_verify() -> None:
    q = query()
    q.use_tsig(dns.tsigkeyring.from_text({"k.": "MTIzNDU2Nzg5MDEyMzQ1Ng=="}), keyname="k.")
    wire = q.to_wire()
    parsed = parse_query(wire)
    assert parsed.qname == "api.example.com" and parsed.wire == wire


def test_an_update_is_parsed_with_its_opcode() -> None:
    u = dns.message.Message()
    u.set_opcode(dns.opcode.UPDATE)
    u.question = [dns.rrset.RRset(dns.name.from_text("example.com"), dns.rdataclass.IN, dns.rdatatype.SOA)]
    assert parse_query(u.to_wire()).opcode == dns.opcode.UPDATE


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_parse_query_either_parses_or_raises_malformed(data: bytes) -> None:
    try:
        parse_query(data)
    except Malformed:
        pass


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 60), st.binary(min_size=1, max_size=8))
def test_parse_query_on_damaged_queries(cut: int, noise: bytes) -> None:
    wire = bytearray(query("x.example.com", "AAAA", use_edns=0).to_wire())
    pos = cut % len(wire)
    wire[pos:pos + len(noise)] = noise
    try:
        q = parse_query(bytes(wire))
    except Malformed:
        return
    assert q.wire == bytes(wire)


# --- refused answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "rcode"), [("refused", dns.rcode.REFUSED), ("REFUSED", dns.rcode.REFUSED),
                                               ("nameError", dns.rcode.NXDOMAIN), ("NXDOMAIN", dns.rcode.NXDOMAIN)])
def test_reject_rcode_takes_ciliums_option_values(option: str, rcode: int) -> None:
    assert reject_rcode(option) == rcode


def test_reject_rcode_refuses_other_values() -> None:
    with pytest.raises(ValueError, match="refused or nameError"):
        reject_rcode("servfail")


@pytest.mark.parametrize("rcode", [dns.rcode.REFUSED, dns.rcode.NXDOMAIN])
def test_refused_answer_echoes_the_query(rcode: dns.rcode.Rcode) -> None:
    q = query("SeCrEt.Example.COM", "AAAA")
    q.flags |= dns.flags.CD
    wire = reject_answer(parse_query(q.to_wire()), rcode)
    r = dns.message.from_wire(wire)
    assert q.is_response(r)
    assert r.id == q.id and r.rcode() == rcode and r.opcode() == dns.opcode.QUERY
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RD and r.flags & dns.flags.CD
    assert not r.flags & dns.flags.AA
    assert r.answer == [] and r.authority == [] and r.additional == []
    # the question exactly as sent, case included (0x20 clients compare it)
    assert r.question[0].name.to_text() == "SeCrEt.Example.COM."
    assert r.question[0].rdtype == dns.rdatatype.AAAA


def test_refused_answer_without_rd_has_no_rd() -> None:
    q = query()
    q.flags &= ~dns.flags.RD
    r = dns.message.from_wire(reject_answer(parse_query(q.to_wire()), dns.rcode.REFUSED))
    assert not r.flags & dns.flags.RD


# --- responses and the addresses they teach ------------------------------------------------------


def test_response_must_answer_the_query() -> None:
    q = query("api.example.com")
    pq = parse_query(q.to_wire())
    ok = response(q, "api.example.com. 30 IN A 192.0.2.1")
    assert parse_response(ok.to_wire(), pq).id == q.id
    other_id = response(q)
    other_id.id = (q.id + 1) % 65536
    with pytest.raises(Mismatch):
        parse_response(other_id.to_wire(), pq)
    other_question = response(query("evil.example.com"), "evil.example.com. 30 IN A 203.0.113.6")
    other_question.id = q.id
    with pytest.raises(Mismatch):
        parse_response(other_question.to_wire(), pq)
    with pytest.raises(Mismatch):
        parse_response(q.to_wire(), pq)  # a query, not a response
    with pytest.raises(Malformed):
        parse_response(q.to_wire()[:2] + b"\x81\x80garbage", pq)


def test_response_question_case_may_differ() -> None:
    q = query("Api.Example.Com")
    r = response(query("api.example.com"), "api.example.com. 30 IN A 192.0.2.1")
    r.id = q.id
    assert parse_response(r.to_wire(), parse_query(q.to_wire())).answer


def _answers(q: dns.message.Message, *records: str) -> tuple[tuple[DNSAnswer, ...], tuple[str, ...]]:
    r = dns.message.from_wire(response(q, *records).to_wire())
    return extract_answers(r, q.question[0].name)


def test_a_records_of_the_query_name() -> None:
    q = query("API.example.com")
    answers, cnames = _answers(q, "api.example.com. 300 IN A 192.0.2.1", "api.example.com. 60 IN A 192.0.2.2")
    assert answers == (DNSAnswer("api.example.com", ("192.0.2.1", "192.0.2.2"), 60),)
    assert cnames == ()


def test_a_and_aaaa_together() -> None:
    answers, _ = _answers(query("dual.example.com", "ANY"), "dual.example.com. 100 IN A 192.0.2.1",
                          "dual.example.com. 50 IN AAAA 2001:db8::1")
    assert answers == (DNSAnswer("dual.example.com", ("192.0.2.1", "2001:db8::1"), 50),)


def test_cname_chain_gives_every_name_the_final_addresses_with_its_chains_ttl() -> None:
    answers, cnames = _answers(
        query("www.example.com"),
        "www.example.com. 20 IN CNAME edge.cdn.example.net.",
        "edge.cdn.example.net. 40 IN CNAME pop1.cdn.example.net.",
        "pop1.cdn.example.net. 60 IN A 198.51.100.7",
        "pop1.cdn.example.net. 60 IN A 198.51.100.8",
    )
    ips = ("198.51.100.7", "198.51.100.8")
    assert answers == (DNSAnswer("www.example.com", ips, 20), DNSAnswer("edge.cdn.example.net", ips, 40),
                       DNSAnswer("pop1.cdn.example.net", ips, 60))
    assert cnames == ("edge.cdn.example.net", "pop1.cdn.example.net")


def test_ttl_per_name_is_the_minimum_from_that_name_on() -> None:
    answers, _ = _answers(query("a.example.com"), "a.example.com. 300 IN CNAME b.example.com.",
                          "b.example.com. 10 IN CNAME c.example.com.", "c.example.com. 100 IN A 192.0.2.9")
    assert [(a.name, a.ttl) for a in answers] == [("a.example.com", 10), ("b.example.com", 10),
                                                  ("c.example.com", 100)]


def test_chain_records_in_any_order() -> None:
    answers, cnames = _answers(query("www.example.com"), "target.example.net. 60 IN A 192.0.2.5",
                               "www.example.com. 30 IN CNAME target.example.net.")
    assert answers == (DNSAnswer("www.example.com", ("192.0.2.5",), 30),
                       DNSAnswer("target.example.net", ("192.0.2.5",), 60))
    assert cnames == ("target.example.net",)


def test_records_off_the_chain_teach_nothing() -> None:
    answers, _ = _answers(query("api.example.com"), "api.example.com. 30 IN A 192.0.2.1",
                          "bank.example.org. 30 IN A 203.0.113.66",
                          "unrelated.example.com. 30 IN CNAME api.example.com.")
    assert answers == (DNSAnswer("api.example.com", ("192.0.2.1",), 30),)


def test_cname_without_addresses_teaches_no_addresses() -> None:
    answers, cnames = _answers(query("www.example.com"), "www.example.com. 30 IN CNAME gone.example.net.")
    assert answers == () and cnames == ("gone.example.net",)


def test_nxdomain_and_empty_answers_teach_nothing() -> None:
    q = query("nope.example.com")
    r = response(q, rcode=dns.rcode.NXDOMAIN)
    assert extract_answers(r, q.question[0].name) == ((), ())


def test_cname_loop_teaches_nothing() -> None:
    answers, cnames = _answers(query("a.example.com"), "a.example.com. 30 IN CNAME b.example.com.",
                               "b.example.com. 30 IN CNAME a.example.com.", "a.example.com. 30 IN A 192.0.2.1")
    assert (answers, cnames) == ((), ())


def test_overlong_chain_teaches_nothing() -> None:
    n = MAX_CNAME_CHAIN + 1
    records = [f"c{i}.example.com. 30 IN CNAME c{i + 1}.example.com." for i in range(n)]
    records.append(f"c{n}.example.com. 30 IN A 192.0.2.1")
    assert _answers(query("c0.example.com"), *records) == ((), ())
    ok = _answers(query("c1.example.com"), *records[1:])[0]
    assert len(ok) == MAX_CNAME_CHAIN + 1 and ok[0].ips == ("192.0.2.1",)


def test_other_record_types_are_not_learned() -> None:
    answers, _ = _answers(query("mail.example.com", "MX"), "mail.example.com. 30 IN MX 10 mx.example.com.",
                          "mail.example.com. 30 IN TXT hello")
    assert answers == ()


# --- transparent mode's control messages ---------------------------------------------------------


def test_original_destination_from_ip_origdstaddr() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_aton("10.96.0.10") + bytes(8)
    assert sockets.orig_dst([(sockets.SOL_IP, sockets.IP_ORIGDSTADDR, v4)]) == ("10.96.0.10", 53)
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 5353) + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "fd00::a") + bytes(4))
    assert sockets.orig_dst([(sockets.SOL_IPV6, sockets.IPV6_ORIGDSTADDR, v6)]) == ("fd00::a", 5353)
    assert sockets.orig_dst([]) is None
    assert sockets.orig_dst([(sockets.SOL_IP, sockets.IP_ORIGDSTADDR, b"\x02")]) is None


def test_source_control_message_is_in_pktinfo() -> None:
    level, kind, data = sockets.source_cmsg("10.96.0.10")
    assert (level, kind) == (sockets.SOL_IP, sockets.IP_PKTINFO)
    assert struct.unpack("=I4s4s", data) == (0, socket.inet_aton("10.96.0.10"), bytes(4))
    level, kind, data = sockets.source_cmsg("fd00::a")
    assert (level, kind) == (sockets.SOL_IPV6, sockets.IPV6_PKTINFO)
    assert struct.unpack("=16sI", data) == (socket.inet_pton(socket.AF_INET6, "fd00::a"), 0)


def test_loopback_datagram_reports_its_destination() -> None:
    """IP_RECVORIGDSTADDR on a real socket: a datagram to 127.0.0.1 says where it went."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sockets.set_recv_orig_dst(server)
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        client.sendto(b"x", server.getsockname())
        _data, anc, _flags, _peer = server.recvmsg(16, sockets.CMSG_BUFFER)
        assert sockets.orig_dst(anc) == server.getsockname()
    finally:
        server.close()
        client.close()
