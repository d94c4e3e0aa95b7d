"""The rules Cilium refuses, refused by `l7gate policy validate` too, with the field at fault.

Each case is one of Cilium's checks (its rule sanitizer, or its CRD schema where noted): the
finding's path, its code, and that its message says Cilium refuses it and why. Then `null`
fields, which the API server drops: l7gate reads them as absent, with a warning. Then the one
semantic rule that came with them: a peer field given as `[]` selects no peer.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from l7gate.policy.errors import Finding, PolicyValidationError
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.parse import MAX_ICMP_FIELDS, MAX_PORTS, parse_policy
from l7gate.policy.types import PortProtocol, PortRange, Protocol

from .test_policy_parse import ccnp, cnp

HTTP = {"http": [{"method": "GET"}]}


def ingress(*rules: dict[str, Any]) -> dict[str, Any]:
    return cnp({"endpointSelector": {}, "ingress": list(rules)})


def errors_of(doc: dict[str, Any]) -> dict[str, Finding]:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(doc)
    return {e.path: e for e in ei.value.errors}


def only_error(doc: dict[str, Any], path: str, code: str, *words: str) -> Finding:
    errs = errors_of(doc)
    assert list(errs) == [path], errs
    f = errs[path]
    assert f.code == code, f
    for w in words:
        assert w in f.message, f.message
    return f


def warnings_of(doc: dict[str, Any]) -> dict[str, Finding]:
    return {w.path: w for w in parse_policy(doc).warnings}


# -- one kind of peer per rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    "direction, first, second",
    [
        ("egress", {"toCIDR": ["10.0.0.0/8"]}, {"toCIDRSet": [{"cidr": "192.168.0.0/16"}]}),
        ("egress", {"toCIDR": ["10.0.0.0/8"]}, {"toEndpoints": [{}]}),
        ("egress", {"toEntities": ["world"]}, {"toEndpoints": [{"matchLabels": {"app": "db"}}]}),
        ("ingress", {"fromCIDR": ["10.0.0.0/8"]}, {"fromEntities": ["world"]}),
        ("ingress", {"fromEndpoints": [{}]}, {"fromCIDRSet": [{"cidr": "10.0.0.0/8"}]}),
        ("ingressDeny", {"fromEntities": ["world"]}, {"fromEndpoints": [{}]}),
        ("egressDeny", {"toEndpoints": [{}]}, {"toCIDR": ["10.0.0.0/8"]}),
    ],
)
def test_two_kinds_of_peer_in_one_rule_are_refused(
    direction: str, first: dict[str, Any], second: dict[str, Any]
) -> None:
    (a,), (b,) = first, second
    doc = cnp({"endpointSelector": {}, direction: [{**first, **second, "toPorts": [{"ports": [{"port": "80"}]}]}]})
    only_error(doc, f"spec.{direction}[0].{b}", "peer-kinds", f"Cilium refuses a rule that combines `{a}` and `{b}`", "Split it")


def test_each_extra_kind_is_named_and_one_kind_per_rule_is_fine() -> None:
    doc = ingress({"fromEndpoints": [{}], "fromEntities": ["world"], "fromCIDR": ["10.0.0.0/8"]})
    errs = errors_of(doc)
    assert set(errs) == {"spec.ingress[0].fromEntities", "spec.ingress[0].fromCIDR"}
    assert all(f.code == "peer-kinds" for f in errs.values())
    split = ingress({"fromEndpoints": [{}]}, {"fromEntities": ["world"]}, {"fromCIDR": ["10.0.0.0/8"]})
    assert len(parse_policy(split).rules[0].rules) == 3


# -- ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["ingress", "ingressDeny"])
def test_more_than_40_ports_in_one_entry_are_refused(field: str) -> None:
    ports = [{"port": str(1000 + i), "protocol": "TCP"} for i in range(MAX_PORTS + 1)]
    doc = cnp({"endpointSelector": {}, field: [{"fromEntities": ["world"], "toPorts": [{"ports": ports}]}]})
    only_error(doc, f"spec.{field}[0].toPorts[0].ports", "too-many-ports", "Cilium refuses more than 40 ports", "has 41")
    doc["spec"][field][0]["toPorts"][0]["ports"] = ports[:MAX_PORTS]
    assert len(parse_policy(doc).rules[0].rules[0].port_rules[0].ports) == MAX_PORTS


# -- ICMP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["ingress", "ingressDeny", "egress", "egressDeny"])
def test_icmps_beside_to_ports_are_refused(field: str) -> None:
    peer = {"fromEntities": ["world"]} if field.startswith("ingress") else {"toEntities": ["world"]}
    doc = cnp({"endpointSelector": {}, field: [{**peer, "icmps": [{"fields": [{"type": 8}]}], "toPorts": [TCP80]}]})
    only_error(doc, f"spec.{field}[0].icmps", "icmps-with-ports", "Cilium refuses a rule with both `icmps` and `toPorts`",
               "the ICMPs block may only be present without ToPorts", "a rule of their own")
    split = cnp({"endpointSelector": {}, field: [{**peer, "icmps": [{"fields": [{"type": 8}]}]}, {**peer, "toPorts": [TCP80]}]})
    assert len(parse_policy(split).rules[0].rules) == 2
    # an empty toPorts is no toPorts, for Cilium too
    parse_policy(cnp({"endpointSelector": {}, field: [{**peer, "icmps": [{"fields": [{"type": 8}]}], "toPorts": []}]}))


@pytest.mark.parametrize("field", ["ingress", "egressDeny"])
def test_more_than_40_icmp_types_in_one_entry_are_refused(field: str) -> None:
    fields = [{"type": i} for i in range(MAX_ICMP_FIELDS + 1)]
    doc = cnp({"endpointSelector": {}, field: [{"icmps": [{"fields": fields}]}]})
    only_error(doc, f"spec.{field}[0].icmps[0].fields", "too-many-icmp-fields",
               "Cilium refuses more than 40 ICMP types", "too many types", "has 41")
    doc["spec"][field][0]["icmps"][0]["fields"] = fields[:MAX_ICMP_FIELDS]
    assert len(parse_policy(doc).rules[0].rules[0].port_rules[0].ports) == MAX_ICMP_FIELDS


@pytest.mark.parametrize("family", ["ipv4", "IPv5", " IPv4", 4])
def test_an_icmp_family_cilium_does_not_know_is_refused(family: Any) -> None:
    only_error(ingress({"icmps": [{"fields": [{"type": 8, "family": family}]}]}),
               "spec.ingress[0].icmps[0].fields[0].family", "icmp-family", "must be IPv4 or IPv6", "wrong family")


def test_ipv6_icmp_is_named_as_unsupported() -> None:
    only_error(ingress({"icmps": [{"fields": [{"type": "EchoRequest", "family": "IPv6"}]}]}),
               "spec.ingress[0].icmps[0].fields[0].family", "unsupported",
               "ICMPv6 rules are not supported by l7gate (IPv6 is not enforced")


def test_icmp_values_only_ciliums_crd_refuses_warn() -> None:
    w = warnings_of(ingress({"icmps": [{"fields": [{"type": "ExtendedEchoReply"}, {"type": 8, "family": ""}]}]}))
    f = w["spec.ingress[0].icmps[0].fields[0].type"]
    assert f.code == "crd-icmp-type" and "the API server refuses this policy" in f.message
    f = w["spec.ingress[0].icmps[0].fields[1].family"]
    assert f.code == "crd-icmp-family" and "IPv4 to Cilium's agent" in f.message


@pytest.mark.parametrize(
    "port, words",
    [
        ("010", "Cilium reads '010' as port 8"),
        ("0080", "'0080' is not an octal number, so Cilium refuses it"),
        ("00", "Cilium reads '00' as port 0"),
    ],
)
def test_ports_with_a_leading_zero_are_refused_as_octal(port: str, words: str) -> None:
    doc = ingress({"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]})
    only_error(doc, "spec.ingress[0].toPorts[0].ports[0].port", "port-octal", words, "without the leading zeros")


@pytest.mark.parametrize("proto", ["VRRP", "IGMP", "GRE", "ESP"])
def test_protocols_cilium_has_and_l7gate_lacks_are_named(proto: str) -> None:
    doc = ingress({"toPorts": [{"ports": [{"port": "0", "protocol": proto}]}]})
    only_error(doc, "spec.ingress[0].toPorts[0].ports[0].protocol", "unsupported", f"protocol {proto} is not supported by l7gate")


# -- HTTP rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_http_rules_in_a_host_policy_are_refused(direction: str) -> None:
    doc = ccnp({
        "nodeSelector": {},
        direction: [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": HTTP}]}],
    })
    only_error(doc, f"spec.{direction}[0].toPorts[0].rules", "host-l7", "Cilium refuses HTTP rules in a host policy")
    doc["spec"] = {"endpointSelector": {}, direction: doc["spec"][direction]}
    assert parse_policy(doc).rules


@pytest.mark.parametrize("proto", ["UDP", "SCTP"])
def test_http_rules_on_udp_or_sctp_are_refused(proto: str) -> None:
    doc = ingress({"toPorts": [{"ports": [{"port": "80", "protocol": proto}], "rules": HTTP}]})
    only_error(doc, "spec.ingress[0].toPorts[0].ports[0].protocol", "l7-protocol", "Cilium refuses them unless the port says `protocol: TCP`", f"this one is {proto}")


def test_http_rules_on_port_zero_are_refused() -> None:
    doc = ingress({"toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}], "rules": HTTP}]})
    only_error(doc, "spec.ingress[0].toPorts[0].ports[0]", "l7-port-range", "Cilium refuses them on port 0")


@pytest.mark.parametrize(
    "port, path, words",
    [
        ({"port": "80", "protocol": "ANY"}, "spec.ingress[0].toPorts[0].ports[0].protocol", "(this one is ANY)"),
        ({"port": "80"}, "spec.ingress[0].toPorts[0].ports[0]", "the default when protocol is left out"),
    ],
)
def test_http_rules_on_any_protocol_are_refused_as_cilium_refuses_them(port: dict[str, Any], path: str, words: str) -> None:
    only_error(ingress({"toPorts": [{"ports": [port], "rules": HTTP}]}), path, "l7-protocol-any",
               "Cilium refuses HTTP rules unless the port says `protocol: TCP`", words)
    # DNS rules are the exception: Cilium takes them on ANY (a resolver answers on UDP and TCP)
    dns = {"toPorts": [{"ports": [{**port, "port": "53"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}
    assert not parse_policy(cnp({"endpointSelector": {}, "egress": [dns]})).warnings


def test_rules_without_http_warn_that_the_crd_refuses_them() -> None:
    w = warnings_of(ingress({"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {}}]}))
    f = w["spec.ingress[0].toPorts[0].rules"]
    assert f.code == "crd-empty-rules" and "Cilium's CRD requires exactly one of http or dns" in f.message


# -- selectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, words",
    [
        ("bad key", "the name 'bad key' is not a valid name"),
        ("a:b:c", "only one ':' is allowed"),
        ("k-8s:app", "the source 'k-8s' before ':' must be letters and digits only"),
        ("example.com/team/app", "at most one '/' is allowed"),
        ("Example.com/app", "the prefix 'Example.com' before '/' is not a DNS subdomain"),
        ("x" * 64, "the name is 64 characters long"),
        ("app-", "not a valid name"),
    ],
)
def test_selector_keys_cilium_refuses(key: str, words: str) -> None:
    doc = ingress({"fromEndpoints": [{"matchLabels": {key: "x"}}]})
    only_error(doc, f"spec.ingress[0].fromEndpoints[0].matchLabels.{key}", "label-key", f"Cilium refuses the label key {key!r}", words)
    expr = cnp({"endpointSelector": {"matchExpressions": [{"key": key, "operator": "Exists"}]}, "ingress": [{}]})
    only_error(expr, "spec.endpointSelector.matchExpressions[0].key", "label-key", words)


@pytest.mark.parametrize(
    "key", ["app.kubernetes.io/name", "k8s:io.kubernetes.pod.namespace", "reserved:host", "any:app_1",
            "io.cilium.k8s.namespace.labels.team", "k8s:io.cilium.k8s.namespace.labels.example.com/tier"],
)
def test_selector_keys_cilium_accepts(key: str) -> None:
    assert parse_policy(ingress({"fromEndpoints": [{"matchLabels": {key: "v"}}]})).rules


@pytest.mark.parametrize(
    "value, words",
    [
        ("has space", "the value 'has space' is not a valid name"),
        ("-lead", "not a valid name"),
        ("v" * 64, "the value is 64 characters long"),
    ],
)
def test_selector_values_cilium_refuses(value: str, words: str) -> None:
    doc = cnp({"endpointSelector": {"matchLabels": {"app": value}}, "ingress": [{}]})
    only_error(doc, "spec.endpointSelector.matchLabels.app", "label-value", f"Cilium refuses the label value {value!r}", words)
    expr = ingress({"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", value]}]}]})
    only_error(expr, "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values[1]", "label-value", words)


# -- entities ------------------------------------------------------------------------------------


def test_entity_none_is_named_as_unsupported() -> None:
    only_error(ingress({"fromEntities": ["none"]}), "spec.ingress[0].fromEntities[0]", "unsupported", "entity 'none' is not supported by l7gate")


@pytest.mark.parametrize("entity", ["world-ipv4", "world-ipv6"])
def test_entities_missing_from_ciliums_crd_warn(entity: str) -> None:
    f = warnings_of(ingress({"fromEntities": [entity]}))["spec.ingress[0].fromEntities[0]"]
    assert f.code == "crd-entity" and "missing from the entity list in Cilium's CRD" in f.message


# -- specs without rules, ports as numbers ------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"enableDefaultDeny": {"ingress": True}}, {"description": "only a description"}],
)
def test_spec_without_any_rule_list_warns_that_cilium_refuses_it(extra: dict[str, Any]) -> None:
    f = warnings_of(cnp({"endpointSelector": {}, **extra}))["spec"]
    assert f.code == "no-rules"
    assert "Cilium 1.17 and later refuse a spec without any ingress" in f.message
    assert "its CRD requires one of those fields" in f.message


def test_spec_whose_rule_lists_are_all_empty_warns_once_that_cilium_refuses_it() -> None:
    w = parse_policy(ccnp({"endpointSelector": {}, "ingress": [], "egress": []})).warnings
    assert [(f.path, f.code) for f in w] == [("spec.ingress", "empty-direction"), ("spec.egress", "empty-direction")]
    assert "Cilium 1.17 and later refuse" in w[0].message and "Cilium" not in w[1].message
    # with both directions set explicitly there is no per-direction warning to carry it
    explicit = ccnp({"endpointSelector": {}, "ingress": [], "enableDefaultDeny": {"ingress": True, "egress": False}})
    (f,) = parse_policy(explicit).warnings
    assert (f.path, f.code) == ("spec", "no-rules") and "its CRD requires" not in f.message
    # one non-empty list anywhere in the spec is enough
    assert not any(f.code == "no-rules" for f in warnings_of(ccnp({"endpointSelector": {}, "ingress": [], "egress": [{}]})).values())


def test_unquoted_port_numbers_warn_that_ciliums_crd_wants_a_string() -> None:
    f = warnings_of(ingress({"toPorts": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}))["spec.ingress[0].toPorts[0].ports[0].port"]
    assert f.code == "crd-port-type" and 'Quote it: port: "80"' in f.message


# -- null is absent ------------------------------------------------------------------------------

TCP80 = {"ports": [{"port": "80", "protocol": "TCP"}]}


@pytest.mark.parametrize(
    "spec, where, meaning",
    [
        ({"endpointSelector": {}, "ingress": [{"fromEndpoints": None, "toPorts": [TCP80]}]},
         ["ingress", 0, "fromEndpoints"], "with no peer field left, this rule allows its ports from every peer"),
        ({"endpointSelector": {}, "egressDeny": [{"toEntities": None}]},
         ["egressDeny", 0, "toEntities"], "with no peer field and no ports, this rule selects no peer"),
        ({"endpointSelector": {}, "ingress": [{"fromEntities": ["world"], "toPorts": None}]},
         ["ingress", 0, "toPorts"], "the rule then covers every port"),
        ({"endpointSelector": {}, "ingress": [{"toPorts": [{**TCP80, "rules": None}]}]},
         ["ingress", 0, "toPorts", 0, "rules"], "the ports are then allowed without HTTP filtering"),
        ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "endPort": None}]}]}]},
         ["ingress", 0, "toPorts", 0, "ports", 0, "endPort"], "the entry is then a single port"),
        ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": None}]}]}]},
         ["ingress", 0, "toPorts", 0, "ports", 0, "protocol"], "TCP, UDP and SCTP (ANY)"),
        ({"endpointSelector": {}, "ingress": [{"fromEntities": ["world"], "authentication": None}]},
         ["ingress", 0, "authentication"], "no authentication is then required"),
        ({"endpointSelector": {}, "ingress": [{}], "egress": None}, ["egress"], ""),
        ({"endpointSelector": {}, "ingress": [{}], "enableDefaultDeny": None},
         ["enableDefaultDeny"], "default-deny then follows the rule lists"),
        ({"endpointSelector": {}, "ingress": [{}], "enableDefaultDeny": {"ingress": None}},
         ["enableDefaultDeny", "ingress"], "follows whether it has rules"),
        ({"endpointSelector": {"matchLabels": None}, "ingress": [{}]}, ["endpointSelector", "matchLabels"], ""),
        ({"endpointSelector": {"matchExpressions": None}, "ingress": [{}]}, ["endpointSelector", "matchExpressions"], ""),
        ({"endpointSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": None}]}, "ingress": [{}]},
         ["endpointSelector", "matchExpressions", 0, "values"], ""),
        ({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": None}]}]},
         ["egress", 0, "toCIDRSet", 0, "except"], "no address is left out of the CIDR"),
        ({"endpointSelector": {}, "ingress": [{"toPorts": [{**TCP80, "rules": {"http": [{"method": None, "path": "/"}]}}]}]},
         ["ingress", 0, "toPorts", 0, "rules", "http", 0, "method"], "any method matches"),
        ({"endpointSelector": {}, "ingress": [{"toPorts": [{**TCP80, "rules": {"http": [{"headerMatches": [{"name": "x", "value": None}]}]}}]}]},
         ["ingress", 0, "toPorts", 0, "rules", "http", 0, "headerMatches", 0, "value"], "only the header's presence is checked"),
        ({"endpointSelector": {}, "egress": [{"toFQDNs": None, "toEntities": ["world"]}]}, ["egress", 0, "toFQDNs"], ""),
        ({"endpointSelector": {}, "ingress": [{}], "description": None}, ["description"], ""),
        ({"endpointSelector": {}, "ingress": [{"fromEndpoints": None, "icmps": [{"fields": [{"type": 8}]}]}]},
         ["ingress", 0, "fromEndpoints"], "with no peer field left, this rule allows its ICMP types from every peer"),
        ({"endpointSelector": {}, "ingress": [{"fromEntities": ["world"], "icmps": None}]},
         ["ingress", 0, "icmps"], "the rule then covers every ICMP type"),
        ({"endpointSelector": {}, "ingress": [{"icmps": [{"fields": None}]}]},
         ["ingress", 0, "icmps", 0, "fields"], "the entry then matches no ICMP type"),
        ({"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{"type": 8, "family": None}]}]}]},
         ["ingress", 0, "icmps", 0, "fields", 0, "family"], "the family is then IPv4"),
    ],
)
def test_null_is_read_as_absent_with_a_warning(spec: dict[str, Any], where: list[Any], meaning: str) -> None:
    doc = cnp(spec)
    absent = copy.deepcopy(doc)
    parent: Any = absent["spec"]
    for step in where[:-1]:
        parent = parent[step]
    del parent[where[-1]]
    path = "spec" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in where)

    p = parse_policy(doc)
    f = {w.path: w for w in p.warnings}[path]
    assert f.code == "null-field"
    assert f"null is the same as leaving `{where[-1]}` out (the API server drops it)" in f.message
    assert meaning in f.message
    assert p.rules == parse_policy(absent).rules


def test_null_spec_and_null_required_fields_stay_errors() -> None:
    assert "spec" in errors_of(cnp({}) | {"spec": None})
    only_error(ingress({"toPorts": [{"ports": [{"port": None}]}]}), "spec.ingress[0].toPorts[0].ports[0].port", "required")
    only_error(cnp({"endpointSelector": None, "ingress": [{}]}), "spec.endpointSelector", "type")
    # a spec whose only rule list is null has no rule list left
    assert warnings_of(cnp({"endpointSelector": {}, "ingress": None}))["spec"].code == "no-rules"


# -- `[]` selects no peer ------------------------------------------------------------------------


def world_flow(port: int) -> Flow:
    pod = Labels.of({"io.kubernetes.pod.namespace": "payments", "io.cilium.k8s.policy.cluster": "default"})
    return Flow(Peer(2, Labels.of({"reserved:world": ""}), False), Peer(1001, pod, True), port, Protocol.TCP, None, False)


@pytest.mark.parametrize("field", ["fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet"])
def test_an_empty_peer_list_selects_no_peer_unlike_a_missing_field(field: str) -> None:
    empty = parse_policy(ingress({field: [], "toPorts": [TCP80]}))
    (w,) = empty.warnings
    assert (w.path, w.code) == (f"spec.ingress[0].{field}", "empty-peer-list")
    assert "an empty list selects no peer" in w.message and f"leave `{field}` out to allow its ports from every peer" in w.message
    assert empty.rules[0].rules[0].peers == ()
    assert not evaluate(list(empty.rules), world_flow(80)).allowed

    missing = parse_policy(ingress({"toPorts": [TCP80]}))
    assert missing.rules[0].rules[0].peers is None
    assert evaluate(list(missing.rules), world_flow(80)).allowed


def test_an_empty_peer_list_beside_a_full_one_still_selects_no_peer() -> None:
    p = parse_policy(ingress({"fromEntities": ["world"], "fromEndpoints": [], "toPorts": [TCP80]}))
    assert p.rules[0].rules[0].peers == ()
    assert not evaluate(list(p.rules), world_flow(80)).allowed


@pytest.mark.parametrize("entry, path", [
    ({}, "spec.ingress[0].toPorts[0]"),
    ({"ports": []}, "spec.ingress[0].toPorts[0].ports"),
])
def test_a_to_ports_entry_without_ports_selects_no_port(entry: dict[str, Any], path: str) -> None:
    """Cilium adds a policy key per listed port: none listed, none added. The rule still makes
    ingress default-deny, so the endpoint is reachable on no port (it was every port once)."""
    from l7gate.policy.evaluate import Flow, Peer, evaluate
    from l7gate.policy.labels import Labels
    from l7gate.policy.types import Direction

    p = parse_policy(ingress({"fromEntities": ["world"], "toPorts": [entry]}))
    (w,) = [w for w in p.warnings if w.code == "empty-ports"]
    assert w.path == path and "selects no port" in w.message
    assert p.rules[0].rules[0].port_rules[0].ports == ()
    world = Peer(2, Labels.of({"reserved:world": ""}), managed=False)
    me = Peer(65536, Labels.of({"k8s:io.kubernetes.pod.namespace": "payments"}), managed=True)
    v = evaluate(p.rules, Flow(world, me, 80, Protocol.TCP, None))
    assert not v.allowed and p.rules[0].rules[0].direction is Direction.INGRESS


def test_http_rules_on_a_port_range_are_taken_up_to_128_ports() -> None:
    ok = parse_policy(ingress({"toPorts": [{"ports": [{"port": "9000", "endPort": 9127, "protocol": "TCP"}],
                                            "rules": HTTP}]}))
    assert ok.rules[0].rules[0].port_rules[0].ports == (PortProtocol(PortRange(9000, 9127), Protocol.TCP),)
    only_error(ingress({"toPorts": [{"ports": [{"port": "9000", "endPort": 9128, "protocol": "TCP"}], "rules": HTTP}]}),
               "spec.ingress[0].toPorts[0].ports[0]", "l7-port-range", "range of 129 ports", "at most 128")


@pytest.mark.parametrize("field, value, words", [
    ("originatingTLS", {"secret": {"name": "s"}}, "TLS interception is not supported by l7gate"),
    ("terminatingTLS", {"secret": {"name": "s"}}, "TLS interception is not supported by l7gate"),
    ("listener", {"envoyConfig": {"kind": "CiliumEnvoyConfig", "name": "x"}, "name": "l"},
     "custom Envoy listeners are not supported by l7gate"),
])
def test_refused_fields_say_so_in_good_grammar(field: str, value: Any, words: str) -> None:
    doc = ingress({"toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}], field: value}]})
    only_error(doc, f"spec.ingress[0].toPorts[0].{field}", "unsupported", words)
