"""DNS names in policy (`policy.fqdn`), the FQDN cache (`identity.fqdncache`), `toFQDNs` and
`rules.dns` in the parser and the reference evaluator, and DNS flows: pure parts of toFQDNs."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l7gate.identity.allocator import fqdn_cidr_labels
from l7gate.identity.fqdncache import FQDNCache
from l7gate.observe.dns_flows import dns_flows
from l7gate.observe.flow import Verdict, flow_from_json, flow_to_json
from l7gate.observe.ingest_context import IngestContext, PeerInfo
from l7gate.policy.errors import PolicyValidationError
from l7gate.policy.evaluate import Flow, Layer, Peer, evaluate
from l7gate.policy.fqdn import FQDNError, FQDNSelector, NameMatch, fqdn
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.types import Protocol
from l7gate.records import DNSRecord

label = st.from_regex(r"[a-z0-9][-a-z0-9_]{0,10}", fullmatch=True)
names = st.lists(label, min_size=1, max_size=5).map(".".join)


@pytest.mark.parametrize("pattern, name, hit", [
    ("*.example.test", "api.example.test", True),
    ("*.example.test", "API.Example.Test.", True),
    ("*.example.test", "example.test", False),
    ("*.example.test", "a.b.example.test", False),  # `*` stays within one label
    ("*.example.test", "xexample.test", False),
    ("api*.example.test", "api-v2.example.test", True),
    ("api*.example.test", "web.example.test", False),
    ("*", "anything.at.all", True),
    ("*", "x", True),
    ("sub.*.test", "sub.a.test", True),
])
def test_match_pattern(pattern: str, name: str, hit: bool) -> None:
    assert NameMatch.pattern(pattern).matches(fqdn(name)) is hit


def test_match_name_is_one_name_in_any_case() -> None:
    m = NameMatch.name("API.example.test")
    assert m.match_name == "api.example.test." and m.matches(fqdn("api.EXAMPLE.test."))
    assert not m.matches(fqdn("www.api.example.test"))


@pytest.mark.parametrize("value", ["a b", "x.[y]", "", "a..b", "ex$mple.test", "x/y"])
def test_invalid_names_and_patterns_are_refused(value: str) -> None:
    with pytest.raises(FQDNError):
        NameMatch.name(value)
    with pytest.raises(FQDNError):
        NameMatch.pattern(value)
    with pytest.raises(FQDNError):
        NameMatch.name("*.example.test")  # a name has no wildcard


@given(names)
def test_star_alone_matches_every_name_and_a_pattern_without_star_is_a_name(name: str) -> None:
    assert NameMatch.pattern("*").matches(fqdn(name))
    assert NameMatch.pattern(name).matches(fqdn(name)) == NameMatch.name(name).matches(fqdn(name))


@given(names, label)
def test_a_leading_star_matches_one_label_exactly(base: str, first: str) -> None:
    p = NameMatch.pattern("*." + base)
    assert p.matches(fqdn(f"{first}.{base}"))
    assert not p.matches(fqdn(f"{first}.{first}.{base}"))
    # the regex is Cilium's: `*` → [-a-zA-Z0-9_]*, anchored
    assert re.fullmatch(r"\^.*\$", p._re.pattern if p._re else "")  # type: ignore[union-attr]


def test_fqdn_selectors_select_identities_labelled_for_them() -> None:
    sel = FQDNSelector(NameMatch.pattern("*.svc.example.test"))
    labels = fqdn_cidr_labels("10.0.0.1/32", [sel.key])
    assert sel.matches(labels) and not FQDNSelector(NameMatch.name("x.test")).matches(labels)
    assert "cidr:10.0.0.1/32" in labels and "reserved:world" in labels


def test_cache_ttl_min_ttl_cap_expiry_and_persistence() -> None:
    c = FQDNCache(min_ttl=10, max_ips_per_name=2)
    assert c.learn("api.example.test", ["10.0.0.1"], 3, now=100.0, source="web/a") == {"10.0.0.1"}
    assert c.learn("API.example.test.", ["10.0.0.1"], 3, now=101.0, source="web/b") == set()  # nothing new
    assert c.names_of("10.0.0.1") == {"api.example.test."}
    assert c.expire(109.0) == set()  # min TTL 10 s from the last answer
    c.learn("api.example.test", ["10.0.0.2", "10.0.0.3"], 60, now=102.0)
    assert c.ips() == {"10.0.0.2", "10.0.0.3"}  # at most 2 per name: the one expiring first went
    saved = c.name_json("api.example.test")
    assert saved is not None
    restored = FQDNCache()
    assert restored.load_name("api.example.test.", saved, now=120.0) == {"10.0.0.2", "10.0.0.3"}
    assert c.expire(200.0) == {"10.0.0.2", "10.0.0.3"} and len(c) == 0
    assert FQDNCache().load_name("x.test", {"10.0.0.9": {"expires": 50.0, "ttl": 1}}, now=60.0) == set()  # expired


def cnp(egress: list[dict[str, Any]], ingress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": egress}
    if ingress is not None:
        spec["ingress"] = ingress
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "web"}, "spec": spec}


DNS53 = {"ports": [{"port": "53", "protocol": "ANY"}], "rules": {"dns": [{"matchPattern": "*.example.test"}]}}


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(doc, cluster_name="c")
    return str(ei.value)


def test_parser_takes_to_fqdns_and_dns_rules_and_names_every_error() -> None:
    p = parse_policy(cnp([{"toEndpoints": [{}], "toPorts": [DNS53]},
                          {"toFQDNs": [{"matchName": "api.example.test"}], "toPorts": [{"ports": [{"port": "443"}]}]}]),
                     cluster_name="c")
    (rule,) = p.rules
    dns_rule, fq_rule = rule.rules
    assert dns_rule.port_rules[0].l7 is not None and dns_rule.port_rules[0].l7.dns == (NameMatch.pattern("*.example.test"),)
    assert fq_rule.peers == (FQDNSelector(NameMatch.name("api.example.test")),)
    text = errors_of(cnp([{"toFQDNs": [{"matchName": "a b"}, {}]}]))
    assert "spec.egress[0].toFQDNs[0].matchName" in text and "spec.egress[0].toFQDNs[1]: needs exactly one" in text
    text = errors_of(cnp([{"toFQDNs": [{"matchName": "x.test"}], "toCIDR": ["10.0.0.0/8"]}]))
    assert "peer-kinds" in text or "combines" in text
    text = errors_of(cnp([{"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "5353"}], "rules": {"dns": [{"matchName": "a.b"}]}}]}]))
    assert "spec.egress[0].toPorts[0].ports[0]" in text and "port 53" in text
    text = errors_of(cnp([], ingress=[{"fromEndpoints": [{}], "toPorts": [DNS53]}]))
    assert "egress only" in text
    text = errors_of(cnp([{"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "53"}],
                                                            "rules": {"dns": [{"matchName": "a"}], "http": [{}]}}]}]))
    assert "http or dns" in text
    doc = cnp([])
    doc["spec"]["egressDeny"] = [{"toFQDNs": [{"matchName": "x.test"}]}]
    assert "deny rules" in errors_of(doc)


def test_evaluator_judges_dns_queries_and_fqdn_peers() -> None:
    doc = cnp([{"toEndpoints": [{"matchLabels": {"k8s-app": "kube-dns"}}], "toPorts": [DNS53]},
               {"toFQDNs": [{"matchName": "api.example.test"}], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}])
    rules = parse_policy(doc, cluster_name="c").rules
    client = Peer(100, Labels.of({"app": "client", "io.kubernetes.pod.namespace": "web"}), True, "client")
    dns_pod = Peer(101, Labels.of({"k8s-app": "kube-dns", "io.kubernetes.pod.namespace": "web"}), False, "coredns")
    ok = evaluate(rules, Flow(client, dns_pod, 53, Protocol.UDP, dns="api.example.test"))
    assert ok.allowed and ok.redirected
    bad = evaluate(rules, Flow(client, dns_pod, 53, Protocol.UDP, dns="evil.test"))
    assert not bad.allowed and bad.layer is Layer.L7 and any("REFUSED" in r for r in bad.reasons)
    learned = Peer(2, fqdn_cidr_labels("10.9.0.1/32", [FQDNSelector(NameMatch.name("api.example.test")).key]), False)
    plain = Peer(2, fqdn_cidr_labels("10.9.0.2/32", []), False)
    assert evaluate(rules, Flow(client, learned, 443)).allowed
    assert not evaluate(rules, Flow(client, plain, 443)).allowed


def test_dns_records_become_hubble_dns_flows() -> None:
    ctx = IngestContext(lambda ip: PeerInfo(7 if ip == "10.0.1.5" else 8), node_name="c/n1")
    req = DNSRecord("request", ("10.0.1.5", 40000), ("10.0.1.53", 53), "api.example.test", "A", "udp", 1.7e9,
                    policies=("p",))
    (f,) = dns_flows(req, ctx)
    assert f.verdict is Verdict.FORWARDED and f.l7 is not None and f.l7.dns is not None
    assert f.l7.dns.query == "api.example.test." and f.protocol == "UDP"
    assert flow_from_json(flow_to_json(f)) == f
    denied = DNSRecord("request", ("10.0.1.5", 40000), ("10.0.1.53", 53), "evil.test", "A", "udp", 1.7e9,
                       allowed=False, rcode="REFUSED")
    (d,) = dns_flows(denied, ctx)
    assert d.verdict is Verdict.DROPPED and d.l7 is not None and d.l7.dns is not None and d.l7.dns.rcode == 5
    resp = DNSRecord("response", ("10.0.1.5", 40000), ("10.0.1.53", 53), "api.example.test", "A", "udp", 1.7e9,
                     rcode="NOERROR", ips=("10.9.0.1",), ttl=60, latency=0.002)
    (r,) = dns_flows(resp, ctx)
    assert r.is_reply and r.l7 is not None and r.l7.dns is not None and r.l7.dns.ips == ("10.9.0.1",)
    assert r.l7.latency_ns == 2_000_000 and 'DNS Answer "10.9.0.1" TTL: 60' in r.summary
    assert flow_from_json(flow_to_json(r)) == r
