"""Cilium's `icmps` rules: type names and numbers, parsing (every error names its field), what
the rules mean (reference evaluator, resolved maps, kernel entries), ICMP drops as flows, and
`l7gate policy trace --icmp-type`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.cli import main
from l7gate.observe.flow import ICMP, flow_from_json, flow_to_json
from l7gate.observe.ingest_context import IngestContext, PeerInfo
from l7gate.observe.kernel_flows import kernel_drop_flows
from l7gate.observe.render import compact_line
from l7gate.policy.errors import Finding, PolicyValidationError
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.icmp import ICMPV4_TYPES, ICMPTypeError, describe_icmp_type, icmp_type_name, parse_icmp_type
from l7gate.policy.labels import Labels
from l7gate.policy.mapstate import ANY_PEER, MapKey, lookup
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import ALL_ICMP_TYPES, ALL_PORTS, Direction, PortRange, Protocol
from l7gate.records import KernelDrop
from l7gate.redirect_bpf.compile import KAction, compile_endpoint
from l7gate.redirect_bpf.compile import lookup as kernel_lookup

CLIENT, SERVER, OTHER, WORLD = 1001, 1002, 1003, 2
IDS = {
    CLIENT: Labels.of({"app": "client", "io.kubernetes.pod.namespace": "ns"}),
    SERVER: Labels.of({"app": "server", "io.kubernetes.pod.namespace": "ns"}),
    OTHER: Labels.of({"app": "other", "io.kubernetes.pod.namespace": "ns"}),
    WORLD: Labels.of({"reserved:world": ""}),
}
FROM_CLIENT = {"fromEndpoints": [{"matchLabels": {"app": "client"}}]}


def cnp(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "server"}}, **spec}}


def icmps(*fields: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"fields": list(fields)}]


def errors_of(doc: dict[str, Any]) -> dict[str, Finding]:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(doc)
    return {e.path: e for e in ei.value.errors}


def warnings_of(doc: dict[str, Any]) -> dict[str, Finding]:
    return {w.path: w for w in parse_policy(doc).warnings}


# -- names and numbers ------------------------------------------------------------------------


def test_every_cilium_name_resolves_and_numbers_show_their_name() -> None:
    assert {n: parse_icmp_type(n) for n in ICMPV4_TYPES} == dict(ICMPV4_TYPES)
    assert parse_icmp_type("Echo") == parse_icmp_type("EchoRequest") == 8
    assert (parse_icmp_type(0), parse_icmp_type("255"), parse_icmp_type(255)) == (0, 255, 255)
    assert icmp_type_name(8) == "EchoRequest" and icmp_type_name(0) == "EchoReply"
    assert icmp_type_name(7) is None
    for name, number in ICMPV4_TYPES.items():
        assert parse_icmp_type(icmp_type_name(number) or "") == number, name
    assert describe_icmp_type(3) == "3 (DestinationUnreachable)" and describe_icmp_type(200) == "200"


@pytest.mark.parametrize(
    "value, words",
    [
        (256, "out of range 0-255"),
        (-1, "out of range 0-255"),
        ("256", "out of range 0-255"),
        ("99999999999", "out of range 0-255"),
        ("08", "without leading zeros"),
        ("echoRequest", "did you mean 'EchoRequest'"),
        ("Echo Request", "did you mean 'EchoRequest'"),
        ("PacketTooBig", "ICMPv6 type name"),
        ("ExtendedEcho Reply", "unknown ICMP type"),
        ("", "unknown ICMP type"),
        (True, "ICMP type number 0-255 or name"),
    ],
)
def test_bad_types_say_why(value: Any, words: str) -> None:
    with pytest.raises(ICMPTypeError, match=words):
        parse_icmp_type(value)


# -- parsing ------------------------------------------------------------------------------------


def test_types_by_number_and_name_become_icmp_ports_of_one_port_rule() -> None:
    p = parse_policy(cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": 8}, {"type": "EchoReply", "family": "IPv4"},
                                                                   {"type": "8"})}]))
    (pr,) = p.rules[0].rules
    (port_rule,) = pr.port_rules
    assert [(pp.protocol, pp.ports) for pp in port_rule.ports] == [
        (Protocol.ICMP, PortRange(0, 0)), (Protocol.ICMP, PortRange(8, 8))]
    assert port_rule.l7 is None and pr.peers and not p.warnings


def test_icmps_without_a_peer_field_is_about_every_peer_and_each_entry_is_a_port_rule() -> None:
    (pr,) = parse_policy(cnp(ingress=[{"icmps": [{"fields": [{"type": 8}]}, {"fields": [{"type": 13}]}]}])).rules[0].rules
    assert pr.peers is None and len(pr.port_rules) == 2


def test_icmps_in_deny_rules_and_egress() -> None:
    p = parse_policy(cnp(ingressDeny=[{**FROM_CLIENT, "icmps": icmps({"type": 8})}],
                         egressDeny=[{"toEntities": ["world"], "icmps": icmps({"type": "TimeExceeded"})}],
                         egress=[{"toCIDR": ["10.0.0.0/8"], "icmps": icmps({"type": 0}), "authentication": {"mode": "required"}}]))
    kinds = {(r.direction, r.deny): r.port_rules[0].ports[0].ports.lo for r in p.rules[0].rules}
    assert kinds == {(Direction.INGRESS, True): 8, (Direction.EGRESS, True): 11, (Direction.EGRESS, False): 0}


def test_ipv6_family_is_refused_as_not_supported() -> None:
    errs = errors_of(cnp(ingress=[{"icmps": icmps({"type": 128, "family": "IPv6"})}]))
    f = errs["spec.ingress[0].icmps[0].fields[0].family"]
    assert f.code == "unsupported" and "ICMPv6 rules are not supported by l7gate (IPv6 is not enforced" in f.message


@pytest.mark.parametrize(
    "rule, path, code, words",
    [
        ({"icmps": {"fields": []}}, "spec.ingress[0].icmps", "type", "must be a list"),
        ({"icmps": ["EchoRequest"]}, "spec.ingress[0].icmps[0]", "type", "must be a mapping"),
        ({"icmps": [{"types": [8]}]}, "spec.ingress[0].icmps[0].types", "unknown-field", "expected one of: fields"),
        ({"icmps": [{"fields": {"type": 8}}]}, "spec.ingress[0].icmps[0].fields", "type", "must be a list"),
        ({"icmps": [{"fields": [8]}]}, "spec.ingress[0].icmps[0].fields[0]", "type", "must be a mapping"),
        ({"icmps": icmps({"type": 8, "code": 0})}, "spec.ingress[0].icmps[0].fields[0].code", "unknown-field", "family, type"),
        ({"icmps": icmps({"family": "IPv4"})}, "spec.ingress[0].icmps[0].fields[0].type", "required", "is required"),
        ({"icmps": icmps({"type": None})}, "spec.ingress[0].icmps[0].fields[0].type", "required", "is required"),
        ({"icmps": icmps({"type": True})}, "spec.ingress[0].icmps[0].fields[0].type", "type", "got boolean"),
        ({"icmps": icmps({"type": 8.0})}, "spec.ingress[0].icmps[0].fields[0].type", "type", "got number"),
        ({"icmps": icmps({"type": 256})}, "spec.ingress[0].icmps[0].fields[0].type", "icmp-type", "out of range 0-255"),
        ({"icmps": icmps({"type": "Ping"})}, "spec.ingress[0].icmps[0].fields[0].type", "icmp-type", "unknown ICMP type 'Ping'"),
        ({"icmps": icmps({"type": "NeighborSolicitation"})}, "spec.ingress[0].icmps[0].fields[0].type", "icmp-type",
         "ICMPv6 type name"),
        ({"icmps": icmps({"type": 8, "family": "ipv4"})}, "spec.ingress[0].icmps[0].fields[0].family", "icmp-family",
         "wrong family"),
        ({"toPorts": [{"ports": [{"port": "8", "protocol": "ICMP"}]}]}, "spec.ingress[0].toPorts[0].ports[0].protocol",
         "protocol", "write ICMP rules as `icmps`"),
    ],
)
def test_every_error_names_its_field(rule: dict[str, Any], path: str, code: str, words: str) -> None:
    errs = errors_of(cnp(ingress=[rule]))
    assert list(errs) == [path], errs
    assert errs[path].code == code and words in errs[path].message, errs[path]


def test_all_errors_of_a_rule_are_reported_at_once() -> None:
    errs = errors_of(cnp(ingress=[{"icmps": icmps({"type": 300}, {"type": "Nope"}, {"type": 8, "family": "IPv6"})}]))
    assert set(errs) == {f"spec.ingress[0].icmps[0].fields[{i}].{k}" for i, k in ((0, "type"), (1, "type"), (2, "family"))}


def test_empty_icmps_warn_and_an_entry_without_fields_matches_nothing() -> None:
    w = warnings_of(cnp(ingress=[{**FROM_CLIENT, "icmps": []}]))
    assert w["spec.ingress[0].icmps"].code == "empty-icmps"
    doc = cnp(ingress=[{**FROM_CLIENT, "icmps": [{}]}])
    assert warnings_of(doc)["spec.ingress[0].icmps[0]"].code == "empty-icmp-fields"
    (pr,) = parse_policy(doc).rules[0].rules
    assert pr.peers == ()  # matches nothing (not an L3-only rule)
    rules = parse_policy(doc).rules
    assert not evaluate(rules, icmp_flow(CLIENT, SERVER, 8)).allowed  # and the endpoint is in default deny


def test_null_family_is_ipv4_and_extended_echo_reply_is_outside_ciliums_crd() -> None:
    w = warnings_of(cnp(ingress=[{"icmps": icmps({"type": 8, "family": None}, {"type": "ExtendedEchoReply"})}]))
    assert w["spec.ingress[0].icmps[0].fields[0].family"].code == "null-field"
    crd = w["spec.ingress[0].icmps[0].fields[1].type"]
    assert crd.code == "crd-icmp-type" and "Write its number, 43" in crd.message


# -- what the rules mean: reference evaluator, resolved maps, kernel entries ---------------------


def icmp_flow(src: int, dst: int, icmp_type: int, *, src_managed: bool = False, dst_managed: bool = True) -> Flow:
    return Flow(Peer(src, IDS[src], managed=src_managed), Peer(dst, IDS[dst], managed=dst_managed), icmp_type, Protocol.ICMP)


def resolved(*docs: dict[str, Any]) -> Resolver:
    r = Resolver()
    r.update_identities(IDS)
    for i, d in enumerate(docs):
        r.upsert_policy(parse_policy({**d, "metadata": {"name": f"p{i}", "namespace": "ns"}}))
    r.add_endpoint(SERVER)
    return r


CASES: list[tuple[str, list[dict[str, Any]], dict[tuple[int, int], bool]]] = [
    ("no policy: everything", [], {(CLIENT, 8): True, (OTHER, 13): True}),
    ("L3-only allow: every type from its peers",
     [cnp(ingress=[FROM_CLIENT])], {(CLIENT, 8): True, (CLIENT, 0): True, (CLIENT, 255): True, (OTHER, 8): False}),
    ("icmps: exactly its types from its peers",
     [cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": "EchoRequest"}, {"type": 13})}])],
     {(CLIENT, 8): True, (CLIENT, 13): True, (CLIENT, 0): False, (CLIENT, 14): False, (OTHER, 8): False}),
    ("icmps without peers: from every peer",
     [cnp(ingress=[{"icmps": icmps({"type": 8})}])], {(CLIENT, 8): True, (WORLD, 8): True, (WORLD, 0): False}),
    ("toPorts ANY covers TCP, UDP and SCTP, not ICMP",
     [cnp(ingress=[{**FROM_CLIENT, "toPorts": [{"ports": [{"port": "0", "protocol": "ANY"}]}]}])],
     {(CLIENT, 8): False, (CLIENT, 0): False}),
    ("default deny", [cnp(ingress=[{}])], {(CLIENT, 8): False}),
    ("deny wins over an L3 allow",
     [cnp(ingress=[FROM_CLIENT], ingressDeny=[{**FROM_CLIENT, "icmps": icmps({"type": 8})}])],
     {(CLIENT, 8): False, (CLIENT, 0): True}),
    ("an L3-only deny denies ICMP",
     [cnp(ingress=[{"fromEntities": ["all"]}], ingressDeny=[FROM_CLIENT])], {(CLIENT, 8): False, (OTHER, 8): True}),
    ("an ICMP allow leaves TCP in default deny", [cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": 8})}])],
     {(CLIENT, 8): True}),
]


@pytest.mark.parametrize("docs, expected", [pytest.param(d, e, id=n) for n, d, e in CASES])
def test_reference_maps_and_kernel_agree(docs: list[dict[str, Any]], expected: dict[tuple[int, int], bool]) -> None:
    rules = [r for i, d in enumerate(docs) for r in parse_policy(d).rules]
    pol = resolved(*docs).endpoint_policy(SERVER)
    entries = compile_endpoint(pol) if pol is not None else {}
    for (peer, icmp_type), allowed in expected.items():
        ref = evaluate(rules, icmp_flow(peer, SERVER, icmp_type))
        assert ref.allowed is allowed, (peer, icmp_type, ref.reasons)
        assert lookup(pol, Direction.INGRESS, peer, icmp_type, Protocol.ICMP).allowed is allowed, (peer, icmp_type)
        kv = kernel_lookup(entries, SERVER, 0, 1, peer, icmp_type)
        assert kv is not None and (kv.action is KAction.ALLOW) is allowed, (peer, icmp_type, kv)


def test_icmp_allow_does_not_open_tcp() -> None:
    doc = cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": 8})}])
    rules = parse_policy(doc).rules
    tcp = Flow(Peer(CLIENT, IDS[CLIENT], managed=False), Peer(SERVER, IDS[SERVER]), 8, Protocol.TCP)
    assert not evaluate(rules, tcp).allowed
    assert not lookup(resolved(doc).endpoint_policy(SERVER), Direction.INGRESS, CLIENT, 8, Protocol.TCP).allowed


def test_map_keys_are_icmp_types_and_an_l3_rule_keys_every_type() -> None:
    icmp_only = resolved(cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": 8}, {"type": 0})}])).endpoint_policy(SERVER)
    assert icmp_only is not None
    assert list(icmp_only.ingress) == [MapKey(CLIENT, Protocol.ICMP, PortRange(0, 0)), MapKey(CLIENT, Protocol.ICMP, PortRange(8, 8))]
    l3 = resolved(cnp(ingress=[{"fromEntities": ["all"]}])).endpoint_policy(SERVER)
    assert l3 is not None
    assert set(l3.ingress) == {MapKey(ANY_PEER, Protocol.ANY, ALL_PORTS), MapKey(ANY_PEER, Protocol.ICMP, ALL_ICMP_TYPES)}


def test_kernel_entries_key_icmp_by_type_under_protocol_1() -> None:
    pol = resolved(cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": 8})}])).endpoint_policy(SERVER)
    assert pol is not None
    entries = compile_endpoint(pol)
    client_icmp = sorted((k.port, k.port_prefix) for k in entries if k.peer == CLIENT and k.proto == 1)
    assert client_icmp == [(8, 16)]  # the one type the client differs from ANY on
    assert kernel_lookup(entries, SERVER, 0, 1, CLIENT, 8).action is KAction.ALLOW  # type: ignore[union-attr]
    assert kernel_lookup(entries, SERVER, 0, 1, CLIENT, 0).action is KAction.DENY  # type: ignore[union-attr]
    assert kernel_lookup(entries, SERVER, 0, 6, CLIENT, 8).action is KAction.DENY  # type: ignore[union-attr]
    assert kernel_lookup(entries, SERVER, 1, 1, CLIENT, 8).action is KAction.ALLOW  # type: ignore[union-attr]  # egress: no policy


def test_reasons_name_the_icmp_type() -> None:
    rules = parse_policy(cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": 13})}])).rules
    v = evaluate(rules, icmp_flow(CLIENT, SERVER, 8))
    assert any("on ICMP type 8 (EchoRequest)" in r for r in v.reasons), v.reasons


# -- ICMP drops as flows ------------------------------------------------------------------------


def resolve_peer(ip: str) -> PeerInfo:
    return {"10.0.1.10": PeerInfo(SERVER, "c1", "ns", "server", ("k8s:app=server",), True)}.get(
        ip, PeerInfo(CLIENT, "c1", "ns", "client", ("k8s:app=client",)))


def test_an_icmp_drop_is_a_flow_with_hubbles_icmpv4_section() -> None:
    ev = KernelDrop("10.0.1.11", "10.0.1.10", 0, 0, 1, "Policy denied", "ingress", CLIENT, SERVER, 5,
                    icmp_type=8, icmp_code=0)
    (f,) = kernel_drop_flows(ev, IngestContext(resolve_peer, node_name="c1/n1"))
    assert f.protocol == "ICMPv4" and f.icmp == ICMP(8, 0)
    assert f.summary == "Policy denied (ICMPv4 EchoRequest)" and f.drop_reason_desc == "Policy denied"
    j = flow_to_json(f)
    assert j["l4"] == {"ICMPv4": {"type": 8, "code": 0}}
    assert flow_from_json(j) == f
    assert "ns/client (ID:1001) -> ns/server (ID:1002) drop DROPPED (Policy denied (ICMPv4 EchoRequest))" in compact_line(f)
    unnamed = KernelDrop("10.0.1.11", "10.0.1.10", 0, 0, 1, "No policy", "ingress", CLIENT, SERVER, 5, icmp_type=7, icmp_code=1)
    (g,) = kernel_drop_flows(unnamed, IngestContext(resolve_peer))
    assert g.summary == "No policy (ICMPv4 type 7)" and flow_to_json(g)["l4"] == {"ICMPv4": {"type": 7, "code": 1}}


# -- policy trace --icmp-type -------------------------------------------------------------------


def inventory(tmp_path: Path, *docs: dict[str, Any]) -> Path:
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "namespace": "ns", "labels": {"app": n}},
             "status": {"podIP": ip}} for n, ip in (("client", "10.0.1.11"), ("server", "10.0.1.10"))]
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump_all([*pods, *docs]))
    return path


def trace(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> tuple[int, str, str]:
    try:
        rc = main(["policy", "trace", "-f", str(path), "--from", "ns/client", "--to", "ns/server", *extra])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_trace_an_icmp_message_by_name_or_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = inventory(tmp_path, cnp(ingress=[{**FROM_CLIENT, "icmps": icmps({"type": "EchoRequest"})}]))
    rc, out, err = trace(capsys, path, "--icmp-type", "EchoRequest", "-o", "json")
    assert rc == 0, err
    d = json.loads(out)
    assert (d["verdict"], d["protocol"], d["port"], d["icmp"], d["http"]) == (
        "allowed", "ICMP", None, {"type": 8, "name": "EchoRequest"}, None)
    rc, out, _ = trace(capsys, path, "--protocol", "icmp", "--icmp-type", "0")
    assert rc == 0
    assert "Trace default/ns/client -> default/ns/server on ICMP type 0 (EchoReply)" in out
    assert "no rule allows default/ns/client on ICMP type 0 (EchoReply)" in out
    assert "Verdict: DENIED at L3/L4: the ICMP message is dropped in the kernel" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--icmp-type", "256"), "out of range 0-255"),
        (("--icmp-type", "Ping"), "unknown ICMP type"),
        (("--icmp-type", "8", "--port", "80"), "not allowed with"),
        (("--icmp-type", "8", "--protocol", "TCP"), "--icmp-type is about ICMP, not --protocol TCP"),
        (("--port", "80", "--protocol", "ICMP"), "--protocol ICMP takes --icmp-type"),
        (("--icmp-type", "8", "--method", "GET"), "--method: an ICMP message has no HTTP request"),
        ((), "one of the arguments --port --icmp-type is required"),
    ],
)
def test_trace_icmp_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...],
                                 words: str) -> None:
    rc, _, err = trace(capsys, inventory(tmp_path), *extra)
    assert rc == 2 and words in err, err


def test_a_network_policy_rule_without_ports_allows_icmp_and_one_with_ports_does_not() -> None:
    def knp(rule: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "np", "namespace": "ns"},
                "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [rule]}}

    from_client = {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}
    all_ports = parse_policy(knp(from_client))
    tcp_only = parse_policy(knp({**from_client, "ports": [{"port": 80}]}))
    assert evaluate(all_ports.rules, icmp_flow(CLIENT, SERVER, 8)).allowed
    assert not evaluate(tcp_only.rules, icmp_flow(CLIENT, SERVER, 8)).allowed
    assert not evaluate(all_ports.rules, icmp_flow(OTHER, SERVER, 8)).allowed
