"""`serverNames` (TLS SNI on egress, without interception): the parser's checks, Cilium's
wildcards, the reference evaluator, the resolved map (`lookup`) and `policy trace` agreeing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.cli import main
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.fqdn import NameMatch, fqdn, server_name_matches
from l7gate.policy.labels import Labels
from l7gate.policy.mapstate import lookup
import yaml

from l7gate.policy.errors import PolicyValidationError
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import Direction, HTTPRequest, Protocol

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tls-out, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      serverNames: ["api.example.test", "*.cdn.test", "**.deep.test"]
  - toEntities: [world]
    toPorts:
    - ports: [{port: "8443", protocol: TCP}]
      serverNames: ["mixed.test"]
  - toEntities: [world]
    toPorts:
    - ports: [{port: "8443", protocol: TCP}]
      rules: {http: [{method: GET}]}
  - toEntities: [world]
    toPorts:
    - ports: [{port: "9443", protocol: TCP}]
      serverNames: ["l4.test"]
  - toEntities: [world]
    toPorts:
    - ports: [{port: "9443", protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
status: {podIP: 10.0.1.5}
"""


def _errors(text: str) -> list[tuple[str, str]]:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(yaml.safe_load(text))
    return [(f.path, f.code) for f in ei.value.errors]


def _doc(port_rule: str, direction: str = "egress", deny: bool = False) -> str:
    key = direction + ("Deny" if deny else "")
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p, namespace: default}}
spec:
  endpointSelector: {{}}
  {key}:
  - toPorts:
    - {port_rule}
"""


@pytest.mark.parametrize("rule, direction, deny, expected", [
    ('{ports: [{port: "443"}], serverNames: ["a.test"]}', "egress", True,
     ("spec.egressDeny[0].toPorts[0].serverNames", "deny-l7")),
    ('{ports: [{port: "443", protocol: TCP}], serverNames: [""]}', "egress", False,
     ("spec.egress[0].toPorts[0].serverNames[0]", "sni-empty")),
    ('{ports: [{port: "443", protocol: TCP}], serverNames: ["a b"]}', "egress", False,
     ("spec.egress[0].toPorts[0].serverNames[0]", "sni-name")),
    ('{ports: [{port: "443", protocol: TCP}], serverNames: [7]}', "egress", False,
     ("spec.egress[0].toPorts[0].serverNames[0]", "type")),
    ('{ports: [{port: "443", protocol: UDP}], serverNames: ["a.test"]}', "egress", False,
     ("spec.egress[0].toPorts[0].ports[0].protocol", "sni-protocol")),
    ('{ports: [{port: "0", protocol: TCP}], serverNames: ["a.test"]}', "egress", False,
     ("spec.egress[0].toPorts[0].ports[0]", "l7-port-range")),
    ('{ports: [{port: "443", protocol: TCP}], serverNames: ["a.test"], rules: {http: [{}]}}', "egress", False,
     ("spec.egress[0].toPorts[0].serverNames", "sni-with-l7")),
    ('{serverNames: ["a.test"]}', "egress", False, ("spec.egress[0].toPorts[0].ports", "l7-port")),
])
def test_refused_with_the_field_at_fault(rule: str, direction: str, deny: bool, expected: tuple[str, str]) -> None:
    errors = _errors(_doc(rule, direction, deny))
    assert expected[1] in {c for _, c in errors} or expected in errors, errors
    assert any(p.startswith(expected[0]) for p, _ in errors), errors


def test_ingress_is_taken_and_a_host_policy_refused() -> None:
    pol = parse_policy(yaml.safe_load(_doc('{ports: [{port: "443", protocol: TCP}], serverNames: ["a.test"]}',
                                           "ingress")))
    assert pol.rules[0].rules[0].port_rules[0].l7 is not None
    doc = yaml.safe_load(_doc('{ports: [{port: "443", protocol: TCP}], serverNames: ["a.test"]}', "ingress"))
    doc["spec"]["nodeSelector"] = doc["spec"].pop("endpointSelector")
    doc["kind"] = "CiliumClusterwideNetworkPolicy"
    del doc["metadata"]["namespace"]
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(doc)
    assert [(e.path, e.code) for e in ei.value.errors] == [("spec.ingress[0].toPorts[0].serverNames", "host-l7")]


def test_server_names_beside_any_l7_field_are_refused_as_cilium_does() -> None:
    for rules in ('{http: []}', '{dns: []}'):
        errors = _errors(_doc('{ports: [{port: "443", protocol: TCP}], serverNames: ["a.test"], rules: ' + rules + '}'))
        assert ("spec.egress[0].toPorts[0].serverNames", "sni-with-l7") in errors, (rules, errors)
    for rules in ('{}', 'null'):
        parse_policy(yaml.safe_load(_doc('{ports: [{port: "443", protocol: TCP}], serverNames: ["a.test"], rules: '
                                         + rules + '}')))


def test_deny_rules_name_the_field() -> None:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(yaml.safe_load(_doc('{ports: [{port: "443"}], serverNames: ["a.test"]}', "egress", True)))
    e = ei.value.errors[0]
    assert "serverNames" in e.message + e.path


def test_any_protocol_warns_and_keeps_tcp_only() -> None:
    pol = parse_policy(yaml.safe_load(_doc('{ports: [{port: "443"}], serverNames: ["a.test"]}')))
    assert "sni-protocol-any" in {w.code for w in pol.warnings}
    (rule,) = pol.rules
    (pr,) = rule.rules
    (port_rule,) = pr.port_rules
    assert {p.protocol for p in port_rule.ports} == {Protocol.TCP}
    assert port_rule.l7 is not None and [m.match_pattern for m in port_rule.l7.sni] == ["a.test."]


def test_empty_list_warns_and_means_no_filtering() -> None:
    pol = parse_policy(yaml.safe_load(_doc('{ports: [{port: "443", protocol: TCP}], serverNames: []}')))
    assert "empty-server-names" in {w.code for w in pol.warnings}
    assert pol.rules[0].rules[0].port_rules[0].l7 is None


@pytest.mark.parametrize("pattern, name, matches", [
    ("api.example.test", "api.example.test", True),
    ("api.example.test", "API.Example.Test", True),
    ("api.example.test", "x.api.example.test", False),
    ("*.cdn.test", "a.cdn.test", True),
    ("*.cdn.test", "a.b.cdn.test", False),
    ("*.cdn.test", "cdn.test", False),
    ("**.deep.test", "a.deep.test", True),
    ("**.deep.test", "a.b.c.deep.test", True),
    ("**.deep.test", "deep.test", False),
    ("**.deep.test", "xdeep.test", False),
    ("api-*.test", "api-eu.test", True),
    ("api-*.test", "api-eu.x.test", False),
    ("*", "anything.test", True),
])
def test_cilium_wildcards(pattern: str, name: str, matches: bool) -> None:
    assert NameMatch.pattern(pattern).matches(fqdn(name)) is matches


# -- the evaluator, the resolved map and trace agree --------------------------------------------

CLIENT = Labels.of({"k8s:app": "client", "k8s:io.kubernetes.pod.namespace": "web"})
WORLD = Labels.of({"reserved:world": ""})

# (port, TLS server name or None for a plain-text GET, allowed)
TABLE = [
    (443, "api.example.test", True),
    (443, "evil.test", False),
    (443, "", False),  # TLS without SNI
    (443, "a.cdn.test", True),
    (443, "a.b.cdn.test", False),
    (443, "x.y.deep.test", True),
    (443, None, False),  # plain text on a serverNames-only port
    (8443, "mixed.test", True),
    (8443, "other.test", False),
    (8443, None, False),  # plain text: Cilium requires TLS where any rule has serverNames
    (443, "api.example.test.", False),  # not a well-formed server name (trailing dot)
    (443, " api.example.test", False),
    (443, "\u212a.cdn.test", False),  # the Kelvin sign is not ASCII k
    (9443, "anything.test", True),  # an L3/L4 allow on the port makes serverNames moot
    (9443, None, True),
]


def _resolved() -> tuple[list, Resolver]:
    pol = parse_policy(next(yaml.safe_load_all(POLICY)))
    resolver = Resolver()
    resolver.update_identities({100: CLIENT, 2: WORLD})
    resolver.upsert_policy(pol)
    resolver.add_endpoint(100)
    return list(pol.rules), resolver


@pytest.mark.parametrize("port, sni, allowed", TABLE)
def test_evaluator_and_map_agree(port: int, sni: str | None, allowed: bool) -> None:
    rules, resolver = _resolved()
    req = HTTPRequest(method="GET", path="/", host="x") if sni is None else None
    flow = Flow(Peer(100, CLIENT), Peer(2, WORLD, managed=False), port, Protocol.TCP, req, tls_sni=sni)
    ref = evaluate(rules, flow)
    fast = lookup(resolver.endpoint_policy(100), Direction.EGRESS, 2, port, Protocol.TCP, req, tls_sni=sni)
    assert ref.allowed is allowed, ref.reasons
    assert fast.allowed is allowed, fast.reasons
    assert (ref.layer, fast.layer) == ((None, None) if allowed else (ref.layer, ref.layer))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "cdn", "deep", "example", "api", "x-1"]), min_size=1, max_size=5),
       st.sampled_from(["test", "example"]), st.sampled_from([443, 8443]))
def test_generated_names_agree(labels: list[str], tld: str, port: int) -> None:
    rules, resolver = _resolved()
    name = ".".join([*labels, tld])
    flow = Flow(Peer(100, CLIENT), Peer(2, WORLD, managed=False), port, Protocol.TCP, None, tls_sni=name)
    ref = evaluate(rules, flow)
    fast = lookup(resolver.endpoint_policy(100), Direction.EGRESS, 2, port, Protocol.TCP, None, tls_sni=name)
    assert ref.allowed is fast.allowed, (name, ref.reasons, fast.reasons)


@pytest.mark.parametrize("port, sni, allowed", [t for t in TABLE if t[1] is not None])
def test_trace_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], port: int, sni: str, allowed: bool) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    assert main(["policy", "trace", "-f", str(pol), "--from", "web/client", "--to", "203.0.113.7",
                 "--port", str(port), "--sni", sni, "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == ("allowed" if allowed else "denied"), out["reasons"]
    if not allowed:
        assert out["layer"] == "l7"


def test_trace_text_says_what_the_proxy_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    assert main(["policy", "trace", "-f", str(pol), "--from", "web/client", "--to", "203.0.113.7",
                 "--port", "443", "--sni", "evil.test"]) == 0
    text = capsys.readouterr().out
    assert "TLS, server name evil.test" in text
    assert "the egress proxy closes the TLS connection" in text
    assert main(["policy", "trace", "-f", str(pol), "--from", "web/client", "--to", "203.0.113.7",
                 "--port", "443", "--sni", "a.test", "--path", "/x"]) == 2
    assert "--path" in capsys.readouterr().err


CILIUM_SHAPES = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress-tls-sni, namespace: default}
specs:
- description: "L7 policy with TLS SNI"
  endpointSelector: {matchLabels: {kind: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: UDP}, {port: "53", protocol: TCP}]
      rules: {dns: [{matchPattern: "*"}]}
  - toFQDNs: [{matchName: "one.one.one.one"}]
    toPorts:
    - ports: [{port: "443", protocol: "TCP"}]
      serverNames: ["one.one.one.one"]
- description: "TLS SNI policy with wildcard"
  endpointSelector: {matchLabels: {kind: client}}
  egress:
  - toPorts:
    - ports: [{port: "443", protocol: "TCP"}]
      serverNames: ["*.one.one.one"]
- description: "TLS SNI policy with wildcard multiple"
  endpointSelector: {matchLabels: {kind: client}}
  egress:
  - toPorts:
    - ports: [{port: "443", protocol: "TCP"}]
      serverNames: ["**.one.one"]
"""


def test_the_shapes_of_ciliums_own_sni_examples_are_taken() -> None:
    """The forms Cilium's own SNI policies use (its examples and e2e manifests: toFQDNs with
    serverNames, `*.` and `**.` wildcards, several specs)."""
    pol = parse_policy(yaml.safe_load(CILIUM_SHAPES))
    sni = [pr.l7.sni for rule in pol.rules for p in rule.rules for pr in p.port_rules if pr.l7 is not None and pr.l7.sni]
    assert [[m.match_pattern for m in s] for s in sni] == [["one.one.one.one."], ["*.one.one.one."], ["**.one.one."]]
    deep = sni[2][0]
    assert server_name_matches(deep, "a.b.one.one") and not server_name_matches(deep, "one.one")
