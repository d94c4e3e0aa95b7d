"""CiliumCIDRGroup and the CIDR rules that name groups (`cidrGroupRef`, `cidrGroupSelector`):
parsing and its errors (each naming its field; Cilium's sanitizer reasons for the CIDR rule),
what a reference selects with the groups in force, read by the reference evaluator and by the
expansion the agent resolves, which must agree; and the group parser on junk."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l7gate.policy.cidrgroup import CIDRGroup, parse_cidr_group
from l7gate.policy.references import expand_policy, references_groups
from l7gate.policy.errors import Finding, PolicyValidationError
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.mapstate import lookup
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.policy.selector import CIDRGroupPeer, CIDRSelector
from l7gate.policy.types import Direction, Protocol

from . import strategies as gen
from .test_policy_cilium_sanitizer import errors_of, only_error, warnings_of
from .test_policy_parse import cnp
from .test_policy_properties import check_finding, examples


def ccg(name: str = "partners", cidrs: Any = ("192.0.2.0/24",), *, api: str = "cilium.io/v2alpha1",
        labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, **meta}
    if labels is not None:
        m["labels"] = labels
    return {"apiVersion": api, "kind": "CiliumCIDRGroup", "metadata": m,
            "spec": {"externalCIDRs": list(cidrs) if isinstance(cidrs, (list, tuple)) else cidrs}}


def group_errors(doc: Any) -> dict[str, Finding]:
    with pytest.raises(PolicyValidationError) as ei:
        parse_cidr_group(doc)
    assert ei.value.resource.startswith("CiliumCIDRGroup")
    return {e.path: e for e in ei.value.errors}


def egress(*entries: dict[str, Any], deny: bool = False) -> dict[str, Any]:
    return cnp({"endpointSelector": {}, "egressDeny" if deny else "egress": [{"toCIDRSet": list(entries)}]})


# -- CiliumCIDRGroup -------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["cilium.io/v2alpha1", "cilium.io/v2"])
def test_a_group_in_either_version_cilium_serves(api: str) -> None:
    g = parse_cidr_group(ccg("vpn", ["10.48.0.0/24", "10.16.0.9/24", "10.48.0.0/24", "2001:db8::/32"],
                             api=api, labels={"role": "vpn"}))
    assert g.key == "CiliumCIDRGroup/vpn"
    # sorted, unique, host bits dropped (the CRD's `format: cidr` takes 10.16.0.9/24)
    assert [n.with_prefixlen for n in g.cidrs] == ["10.16.0.0/24", "10.48.0.0/24", "2001:db8::/32"]
    assert g.labels == Labels.of({"role": "vpn", "io.cilium.policy.cidrgroupname/vpn": ""})
    assert g.warnings == ()


def test_an_empty_group_is_valid_with_a_warning_and_a_namespace_is_ignored() -> None:
    g = parse_cidr_group(ccg("empty", [], namespace="payments"))
    assert g.cidrs == ()
    assert {w.path: w.code for w in g.warnings} == {"spec.externalCIDRs": "empty-group",
                                                    "metadata.namespace": "ignored-namespace"}


@pytest.mark.parametrize(
    "doc, path, code, words",
    [
        (ccg(api="cilium.io/v1"), "apiVersion", "api-version", ("'cilium.io/v2', 'cilium.io/v2alpha1'",)),
        ({**ccg(), "spec": {}}, "spec.externalCIDRs", "required", ("may be empty",)),
        ({k: v for k, v in ccg().items() if k != "spec"}, "spec", "required", ()),
        (ccg(cidrs="10.0.0.0/8"), "spec.externalCIDRs", "type", ("must be a list",)),
        (ccg(cidrs=["10.0.0.0/8", "10.0.0.1"]), "spec.externalCIDRs[1]", "cidr", ("prefix length",)),
        (ccg(cidrs=["10.0.0.0/33"]), "spec.externalCIDRs[0]", "cidr", ("invalid CIDR",)),
        (ccg(cidrs=[None]), "spec.externalCIDRs[0]", "type", ("must be a string",)),
        ({**ccg(), "spec": {"externalCIDRs": [], "cidrs": []}}, "spec.cidrs", "unknown-field", ()),
        (ccg("Partners"), "metadata.name", "name", ("DNS subdomain",)),
        (ccg(labels={"k8s:role": "x"}), "metadata.labels.k8s:role", "label-key", ("':'",)),
        (ccg(labels={"role": "a b"}), "metadata.labels.role", "label-value", ()),
        ({**ccg(), "status": {}}, "status", "unknown-field", ()),
    ],
)
def test_a_bad_group_is_refused_naming_the_field(doc: dict[str, Any], path: str, code: str,
                                                 words: tuple[str, ...]) -> None:
    errs = group_errors(doc)
    assert list(errs) == [path], errs
    assert errs[path].code == code, errs[path]
    for w in words:
        assert w in errs[path].message, errs[path].message


def test_every_error_of_a_group_at_once() -> None:
    errs = group_errors({"apiVersion": "cilium.io/v2", "kind": "CiliumCIDRGroup", "metadata": {"name": "g"},
                         "spec": {"externalCIDRs": ["x", "10.0.0.0/8", "y"]}})
    assert set(errs) == {"spec.externalCIDRs[0]", "spec.externalCIDRs[2]"}


# -- the CIDR rule: exactly one of cidr, cidrGroupRef, cidrGroupSelector (Cilium's sanitizer) ---------


@pytest.mark.parametrize(
    "entry, second",
    [
        ({"cidr": "10.0.0.0/8", "cidrGroupRef": "g"}, "cidrGroupRef"),
        ({"cidr": "10.0.0.0/8", "cidrGroupSelector": {}}, "cidrGroupSelector"),
        ({"cidrGroupRef": "g", "cidrGroupSelector": {"matchLabels": {"a": "b"}}}, "cidrGroupSelector"),
    ],
)
def test_more_than_one_kind_in_a_cidr_rule_is_refused(entry: dict[str, Any], second: str) -> None:
    only_error(egress(entry), f"spec.egress[0].toCIDRSet[0].{second}", "cidr-rule-kinds",
               "Cilium refuses", "more than one of cidr, cidrGroupRef, or cidrGroupSelector may not be set")


def test_all_three_kinds_name_both_extras() -> None:
    errs = errors_of(egress({"cidr": "10.0.0.0/8", "cidrGroupRef": "g", "cidrGroupSelector": {}}))
    assert set(errs) == {"spec.egress[0].toCIDRSet[0].cidrGroupRef", "spec.egress[0].toCIDRSet[0].cidrGroupSelector"}


@pytest.mark.parametrize("entry", [{}, {"except": ["10.0.0.0/8"]}])
def test_a_cidr_rule_without_a_kind_is_refused(entry: dict[str, Any]) -> None:
    only_error(egress(entry), "spec.egress[0].toCIDRSet[0].cidr", "required",
               "one of cidr, cidrGroupRef, or cidrGroupSelector is required")


@pytest.mark.parametrize(
    "entry, path, code",
    [
        ({"cidrGroupRef": "Bad_Name"}, "cidrGroupRef", "name"),
        ({"cidrGroupRef": ""}, "cidrGroupRef", "empty"),
        ({"cidrGroupRef": 7}, "cidrGroupRef", "type"),
        ({"cidrGroupSelector": None}, "cidrGroupSelector", "type"),
        ({"cidrGroupSelector": {"matchLabels": {"a/b/c": "x"}}}, "cidrGroupSelector.matchLabels.a/b/c", "label-key"),
        ({"cidrGroupSelector": {"matchExpressions": [{"key": "role", "operator": "Near"}]}},
         "cidrGroupSelector.matchExpressions[0].operator", "operator"),
        ({"cidrGroupRef": "g", "except": ["10.0.0.1"]}, "except[0]", "cidr"),
    ],
)
def test_a_bad_group_reference_names_its_field(entry: dict[str, Any], path: str, code: str) -> None:
    only_error(egress(entry), f"spec.egress[0].toCIDRSet[0].{path}", code)


def test_references_parse_as_group_peers_and_except_is_not_held_to_a_cidr() -> None:
    p = parse_policy(egress({"cidrGroupRef": "partners", "except": ["203.0.113.0/24", "10.0.0.0/8"]},
                            {"cidrGroupSelector": {"matchLabels": {"role": "vpn"}}},
                            {"cidr": "10.0.0.0/8"}))
    assert references_groups(p)
    peers = p.rules[0].rules[0].peers
    assert peers is not None
    by_name = [s for s in peers if isinstance(s, CIDRGroupPeer) and s.name == "partners"]
    assert [e.with_prefixlen for e in by_name[0].excepts] == ["10.0.0.0/8", "203.0.113.0/24"]
    assert any(isinstance(s, CIDRGroupPeer) and s.selector is not None for s in peers)
    assert any(isinstance(s, CIDRSelector) for s in peers)
    # unexpanded, a reference selects nothing (not even the addresses it names)
    assert not by_name[0].matches(Labels.of({"cidr:203.0.113.7/32": "", "reserved:world": ""}))
    assert not references_groups(parse_policy(egress({"cidr": "10.0.0.0/8"})))


def test_an_empty_group_selector_warns_that_it_selects_every_group() -> None:
    w = warnings_of(egress({"cidrGroupSelector": {}}))
    assert w["spec.egress[0].toCIDRSet[0].cidrGroupSelector"].code == "cidr-group-selector-empty"


def test_group_references_are_allowed_in_deny_rules_and_ingress() -> None:
    parse_policy(egress({"cidrGroupRef": "g", "except": ["10.1.0.0/16"]}, deny=True))
    parse_policy(cnp({"endpointSelector": {}, "ingress": [{"fromCIDRSet": [{"cidrGroupRef": "g"}]}],
                      "ingressDeny": [{"fromCIDRSet": [{"cidrGroupSelector": {"matchLabels": {"x": "y"}}}]}]}))


def test_a_cidr_beside_a_group_reference_in_one_list_is_one_peer_kind() -> None:
    """`toCIDRSet` is one peer kind, whatever its entries hold; `toCIDR` beside it is not."""
    parse_policy(egress({"cidr": "10.0.0.0/8"}, {"cidrGroupRef": "g"}))
    doc = cnp({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/8"], "toCIDRSet": [{"cidrGroupRef": "g"}]}]})
    only_error(doc, "spec.egress[0].toCIDRSet", "peer-kinds")


# -- what a reference selects ------------------------------------------------------------------------


def group(name: str, *cidrs: str, **labels: str) -> CIDRGroup:
    return parse_cidr_group(ccg(name, list(cidrs), labels=labels or None))


def cidr_identity(prefix: str) -> Labels:
    return Labels.of({f"cidr:{ipaddress.ip_network(prefix).with_prefixlen}": "", "reserved:world": ""})


CLIENT = 1001
WORLD = 2
PEERS: dict[int, Labels] = {
    CLIENT: Labels.of({"io.kubernetes.pod.namespace": "payments", "io.cilium.k8s.policy.cluster": "default"}),
    WORLD: Labels.of({"reserved:world": ""}),
    2001: cidr_identity("192.0.2.0/24"),
    2002: cidr_identity("192.0.2.128/25"),
    2003: cidr_identity("192.0.2.7/32"),
    2004: cidr_identity("198.51.100.0/24"),
    2005: cidr_identity("10.0.0.0/8"),
}


def verdicts(doc: dict[str, Any], groups: dict[str, CIDRGroup]) -> dict[int, bool]:
    """Egress of the client to every peer, by the reference evaluator on the policy as parsed;
    asserts that the resolver, given the policy expanded, says the same."""
    policy = parse_policy(doc)
    r = Resolver()
    r.update_identities(PEERS)
    r.upsert_policy(expand_policy(policy, groups))
    r.add_endpoint(CLIENT)
    out: dict[int, bool] = {}
    for peer, labels in PEERS.items():
        flow = Flow(Peer(CLIENT, PEERS[CLIENT]), Peer(peer, labels, managed=False), 443)
        ref = evaluate(policy.rules, flow, groups).allowed
        fast = lookup(r.endpoint_policy(CLIENT), Direction.EGRESS, peer, 443, Protocol.TCP).allowed
        assert ref == fast, (peer, ref, fast)
        out[peer] = ref
    return out


def allowed(doc: dict[str, Any], groups: dict[str, CIDRGroup]) -> set[int]:
    return {p for p, ok in verdicts(doc, groups).items() if ok}


def test_a_reference_selects_the_groups_cidrs_and_nothing_when_the_group_is_missing() -> None:
    doc = egress({"cidrGroupRef": "partners"})
    assert allowed(doc, {}) == set()  # default-deny, and nothing selected
    assert allowed(doc, {"others": group("others", "192.0.2.0/24")}) == set()
    assert allowed(doc, {"partners": group("partners", "192.0.2.0/24")}) == {2001, 2002, 2003}
    assert allowed(doc, {"partners": group("partners", "192.0.2.0/25", "198.51.100.0/24")}) == {2003, 2004}
    assert allowed(doc, {"partners": group("partners")}) == set()  # an empty group


def test_except_carves_out_and_a_cidr_inside_an_except_is_left_out_whole() -> None:
    doc = egress({"cidrGroupRef": "partners", "except": ["192.0.2.128/25", "198.51.100.0/23"]})
    groups = {"partners": group("partners", "192.0.2.0/24", "198.51.100.0/24", "10.0.0.0/8")}
    assert allowed(doc, groups) == {2001, 2003, 2005}
    expanded = expand_policy(parse_policy(doc), groups).rules[0].rules[0].peers
    assert expanded is not None
    assert [s.key for s in expanded] == ["cidr:10.0.0.0/8", "cidr:192.0.2.0/24!192.0.2.128/25"]


def test_a_selector_selects_groups_by_label_and_by_name_label() -> None:
    groups = {"a": group("a", "192.0.2.0/24", role="vpn"), "b": group("b", "198.51.100.0/24", role="office"),
              "c": group("c", "10.0.0.0/8")}
    sel = {"cidrGroupSelector": {"matchLabels": {"role": "vpn"}}}
    assert allowed(egress(sel), groups) == {2001, 2002, 2003}
    not_vpn = {"cidrGroupSelector": {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["vpn"]}]}}
    assert allowed(egress(not_vpn), groups) == {2004, 2005}  # never a pod, nor world
    by_name = {"cidrGroupSelector": {"matchExpressions": [
        {"key": "io.cilium.policy.cidrgroupname/b", "operator": "Exists"}]}}
    assert allowed(egress(by_name), groups) == {2004}
    assert allowed(egress({"cidrGroupSelector": {}}), groups) == {2001, 2002, 2003, 2004, 2005}


def test_a_group_with_a_whole_family_selects_world_and_deny_follows_groups() -> None:
    groups = {"all": group("all", "0.0.0.0/0"), "bad": group("bad", "192.0.2.0/24")}
    assert allowed(egress({"cidrGroupRef": "all"}), groups) == {WORLD, *range(2001, 2006)}
    doc = cnp({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidrGroupRef": "all"}]}],
               "egressDeny": [{"toCIDRSet": [{"cidrGroupRef": "bad"}]}]})
    assert allowed(doc, groups) == {WORLD, 2004, 2005}
    assert allowed(doc, {"all": groups["all"]}) == {WORLD, *range(2001, 2006)}  # the deny's group is gone


def test_expansion_leaves_other_rules_alone() -> None:
    policy = parse_policy(cnp({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/8"]},
                                                                  {"toCIDRSet": [{"cidrGroupRef": "g"}]}]}))
    expanded = expand_policy(policy, {})
    assert expanded.rules[0].rules[0] is policy.rules[0].rules[0]
    assert expanded.rules[0].rules[1].peers == ()  # selects no peer: never every peer
    plain = parse_policy(egress({"cidr": "10.0.0.0/8"}))
    assert expand_policy(plain, {"g": group("g", "192.0.2.0/24")}) is plain


# -- the group parser on junk (CONVENTIONS.md 12) ------------------------------------------------------

def check_group_parser(doc: Any) -> None:
    """Parses or raises PolicyValidationError (never anything else), with findings that point into
    the document, and leaves the document alone."""
    before = copy.deepcopy(doc)
    try:
        g = parse_cidr_group(doc)
    except PolicyValidationError as exc:
        assert exc.errors
        for f in exc.errors:
            check_finding(doc, f, "error")
    else:
        assert isinstance(g, CIDRGroup) and g.name
        for f in g.warnings:
            check_finding(doc, f, "warning")
    assert doc == before


@examples(200)
@given(st.one_of(gen.json_values(), st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(("cilium.io/v2alpha1", "cilium.io/v2")), "kind": st.just("CiliumCIDRGroup"),
     "metadata": gen.json_values(max_leaves=4) | st.just({"name": "g"}), "spec": gen.json_values(max_leaves=8)})))
def test_the_group_parser_on_arbitrary_json(doc: Any) -> None:
    check_group_parser(doc)


@examples(100)
@given(gen.cidr_group_docs())
def test_the_group_parser_on_generated_groups(doc: dict[str, Any]) -> None:
    check_group_parser(doc)
