"""Kubernetes NetworkPolicy (networking.k8s.io/v1) translated into l7gate's rules: upstream
semantics, read through the reference evaluator (the verdicts a user would see), every peer
kind, `policyTypes`, ports, the union with CiliumNetworkPolicies, bad input with field paths,
and `l7gate policy trace` / `validate` on NetworkPolicy files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.cli import main as cli_main
from l7gate.identity.allocator import cidr_labels
from l7gate.identity.filter import identity_labels
from l7gate.offline.trace import TraceRequest, run_trace
from l7gate.offline.validate import validate_paths
from l7gate.policy.errors import PolicyValidationError
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.selector import CIDRSelector
from l7gate.policy.types import ALL_PORTS, Direction, Policy, PortProtocol, PortRange, Protocol

CLUSTER = "cluster-a"
NS_LABELS = {
    "payments": {"team": "pay", "env": "prod", "kubernetes.io/metadata.name": "payments"},
    "web": {"team": "web", "env": "prod", "kubernetes.io/metadata.name": "web"},
    "lab": {"team": "web", "env": "dev", "kubernetes.io/metadata.name": "lab"},
}
WORLD = Labels.of({"reserved:world": ""})
HOST = Labels.of({"reserved:host": ""})


def pod(ns: str, known_namespace: bool = True, **labels: str) -> Labels:
    return identity_labels(labels, namespace=ns, cluster=CLUSTER,
                           namespace_labels=NS_LABELS[ns] if known_namespace else None)


BILLING = pod("payments", app="billing")
LEDGER = pod("payments", app="ledger")
FRONTEND = pod("web", app="frontend")
REPORTS = pod("web", app="reports")
LAB_FRONTEND = pod("lab", app="frontend")


def knp(spec: dict[str, Any] | None = None, *, name: str = "np", namespace: str | None = "payments",
        **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    doc: dict[str, Any] = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta}
    if spec is not None:
        doc["spec"] = spec
    doc.update(extra)
    return doc


def billing_ingress(*rules: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return knp({"podSelector": {"matchLabels": {"app": "billing"}}, "ingress": list(rules), **spec})


def parse(doc: dict[str, Any]) -> Policy:
    return parse_policy(doc, cluster_name=CLUSTER)


def errors_of(doc: Any) -> dict[str, str]:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(doc, cluster_name=CLUSTER)
    return {e.path: e.message for e in ei.value.errors}


def allowed(docs: list[dict[str, Any]], src: Labels, dst: Labels, port: int = 80, proto: str = "TCP", *,
            egress: bool = False) -> bool:
    """The verdict on one side: ingress of `dst` (default), or egress of `src`."""
    rules = [r for d in docs for r in parse(d).rules]
    flow = Flow(Peer(100, src, managed=egress), Peer(200, dst, managed=not egress), port, Protocol(proto))
    return evaluate(rules, flow).allowed


# -- who the policy applies to -------------------------------------------------------------------


def test_pod_selector_selects_pods_of_the_policy_namespace_only() -> None:
    deny = knp({"podSelector": {"matchLabels": {"app": "frontend"}}, "policyTypes": ["Ingress"]}, namespace="web")
    assert not allowed([deny], BILLING, FRONTEND)
    assert allowed([deny], BILLING, LAB_FRONTEND)  # same labels, another namespace
    assert allowed([deny], BILLING, REPORTS)


def test_empty_pod_selector_selects_every_pod_of_the_namespace_and_the_namespace_defaults() -> None:
    deny = knp({"podSelector": {}}, namespace=None)
    p = parse_policy(deny, default_namespace="web", cluster_name=CLUSTER)
    assert p.key == "NetworkPolicy/web/np"
    rules = list(p.rules)
    for dst, isolated in ((FRONTEND, True), (REPORTS, True), (BILLING, False)):
        flow = Flow(Peer(1, BILLING, managed=False), Peer(2, dst), 80, Protocol.TCP)
        assert evaluate(rules, flow).allowed is not isolated


def test_match_expressions_in_notin_exists_doesnotexist() -> None:
    def isolated(expr: dict[str, Any], dst: Labels) -> bool:
        doc = knp({"podSelector": {"matchExpressions": [expr]}, "policyTypes": ["Ingress"]})
        return not allowed([doc], FRONTEND, dst)

    tiered = pod("payments", app="billing", tier="backend")
    assert isolated({"key": "app", "operator": "In", "values": ["billing", "x"]}, BILLING)
    assert not isolated({"key": "app", "operator": "In", "values": ["ledger"]}, BILLING)
    assert isolated({"key": "app", "operator": "NotIn", "values": ["ledger"]}, BILLING)
    assert isolated({"key": "tier", "operator": "NotIn", "values": ["backend"]}, BILLING)  # no key: NotIn holds
    assert not isolated({"key": "tier", "operator": "NotIn", "values": ["backend"]}, tiered)
    assert isolated({"key": "tier", "operator": "Exists"}, tiered)
    assert not isolated({"key": "tier", "operator": "Exists"}, BILLING)
    assert isolated({"key": "tier", "operator": "DoesNotExist"}, BILLING)
    assert not isolated({"key": "tier", "operator": "DoesNotExist"}, tiered)


# -- policyTypes ------------------------------------------------------------------------------------


def test_policy_types_default_to_ingress_and_egress_only_when_egress_has_rules() -> None:
    only_ingress = parse(knp({"podSelector": {}, "ingress": []}))
    (rule,) = only_ingress.rules
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (True, False)
    with_egress = parse(knp({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}))
    (rule,) = with_egress.rules
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (True, True)
    # `egress: []` is no egress rule: the default leaves egress alone
    (rule,) = parse(knp({"podSelector": {}, "egress": []})).rules
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (True, False)
    # `policyTypes: []` is the default too, as the API server fills it in
    (rule,) = parse(knp({"podSelector": {}, "policyTypes": [], "egress": [{}]})).rules
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (True, True)


def test_a_listed_type_without_rules_denies_that_direction() -> None:
    deny_egress = knp({"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Egress"]})
    assert not allowed([deny_egress], BILLING, FRONTEND, egress=True)
    assert allowed([deny_egress], FRONTEND, BILLING)  # ingress: not listed, left alone
    deny_both = knp({"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Ingress", "Egress"]})
    assert not allowed([deny_both], BILLING, FRONTEND, egress=True)
    assert not allowed([deny_both], FRONTEND, BILLING)
    assert not allowed([deny_both], WORLD, BILLING)


def test_a_type_not_listed_is_left_alone_and_its_rules_are_ignored_with_a_warning() -> None:
    doc = knp({"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Egress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "ledger"}}}]}],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "ledger"}}}]}]})
    p = parse(doc)
    assert [(w.path, w.code) for w in p.warnings] == [("spec.ingress", "ignored-rules")]
    assert "does not list Ingress" in p.warnings[0].message
    assert all(r.direction is Direction.EGRESS for r in p.rules[0].rules)
    assert allowed([doc], FRONTEND, BILLING)  # ingress not isolated: the ledger-only rule does not apply
    assert allowed([doc], BILLING, LEDGER, egress=True)
    assert not allowed([doc], BILLING, FRONTEND, egress=True)


# -- peers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{}, {"from": []}, {"from": None}, {"ports": []}, {"from": [], "ports": []}])
def test_a_rule_without_peers_allows_every_source_the_world_included(rule: dict[str, Any]) -> None:
    doc = billing_ingress(rule)
    for src in (FRONTEND, LAB_FRONTEND, WORLD, HOST, Labels.of(cidr_labels("203.0.113.0/24"))):
        assert allowed([doc], src, BILLING, 80) and allowed([doc], src, BILLING, 53, "UDP")
    assert not allowed([billing_ingress()], FRONTEND, BILLING)  # `ingress: []` under Ingress: deny all


def test_from_null_is_read_as_missing_with_a_warning() -> None:
    p = parse(billing_ingress({"from": None}))
    assert [(w.path, w.code) for w in p.warnings] == [("spec.ingress[0].from", "null-field")]
    assert p.rules[0].rules[0].peers is None


def test_pod_selector_peer_is_pods_of_the_policy_namespace() -> None:
    doc = billing_ingress({"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]})
    assert not allowed([doc], FRONTEND, BILLING)  # frontend lives in web, the policy in payments
    doc = billing_ingress({"from": [{"podSelector": {"matchLabels": {"app": "ledger"}}}]})
    assert allowed([doc], LEDGER, BILLING)
    assert not allowed([doc], FRONTEND, BILLING) and not allowed([doc], WORLD, BILLING)
    everyone_here = billing_ingress({"from": [{"podSelector": {}}]})
    assert allowed([everyone_here], LEDGER, BILLING)
    assert not allowed([everyone_here], FRONTEND, BILLING)
    assert not allowed([everyone_here], WORLD, BILLING) and not allowed([everyone_here], HOST, BILLING)


def test_namespace_selector_peer_is_every_pod_of_the_matching_namespaces() -> None:
    doc = billing_ingress({"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]})
    assert allowed([doc], FRONTEND, BILLING) and allowed([doc], REPORTS, BILLING)
    assert allowed([doc], LAB_FRONTEND, BILLING)  # lab is team=web too
    assert not allowed([doc], LEDGER, BILLING) and not allowed([doc], WORLD, BILLING)
    every_namespace = billing_ingress({"from": [{"namespaceSelector": {}}]})
    for src in (FRONTEND, LEDGER, LAB_FRONTEND):
        assert allowed([every_namespace], src, BILLING)
    for src in (WORLD, HOST, Labels.of(cidr_labels("10.0.0.0/8"))):
        assert not allowed([every_namespace], src, BILLING)


def test_namespace_selector_with_pod_selector_is_an_and_two_peers_are_an_or() -> None:
    both = billing_ingress({"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}},
                                      "podSelector": {"matchLabels": {"app": "frontend"}}}]})
    assert allowed([both], FRONTEND, BILLING) and allowed([both], LAB_FRONTEND, BILLING)
    assert not allowed([both], REPORTS, BILLING)  # right namespace, wrong pod
    assert not allowed([both], pod("payments", app="frontend"), BILLING)  # right pod, wrong namespace
    either = billing_ingress({"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}},
                                       {"podSelector": {"matchLabels": {"app": "frontend"}}}]})
    assert allowed([either], REPORTS, BILLING)
    assert allowed([either], pod("payments", app="frontend"), BILLING)
    assert not allowed([either], LEDGER, BILLING)


def test_namespace_selector_notin_and_doesnotexist_never_select_the_world_or_the_host() -> None:
    for expr in ({"key": "team", "operator": "NotIn", "values": ["pay"]},
                 {"key": "nothing", "operator": "DoesNotExist"}):
        doc = billing_ingress({"from": [{"namespaceSelector": {"matchExpressions": [expr]}}]})
        assert allowed([doc], FRONTEND, BILLING)
        assert not allowed([doc], WORLD, BILLING) and not allowed([doc], HOST, BILLING)
    doc = billing_ingress({"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "team", "operator": "NotIn", "values": ["pay"]}]}}]})
    assert not allowed([doc], LEDGER, BILLING)


def test_the_namespace_name_label_selects_even_where_the_namespace_labels_are_unknown() -> None:
    doc = billing_ingress({"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}}}]})
    assert allowed([doc], FRONTEND, BILLING)
    assert allowed([doc], pod("web", known_namespace=False, app="frontend"), BILLING)
    assert not allowed([doc], LAB_FRONTEND, BILLING)
    not_web = billing_ingress({"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["web"]}]}}]})
    assert allowed([not_web], LAB_FRONTEND, BILLING) and not allowed([not_web], FRONTEND, BILLING)
    assert not allowed([not_web], WORLD, BILLING)
    # another namespace label needs the namespace's labels: unknown, the pod is not selected
    team = billing_ingress({"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]})
    assert not allowed([team], pod("web", known_namespace=False, app="frontend"), BILLING)


def test_ip_block_allows_its_cidr_but_not_the_except_ranges_nor_pods() -> None:
    doc = billing_ingress({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.0/24"]}}]})
    (peer,) = parse(doc).rules[0].rules[0].peers or ()
    assert isinstance(peer, CIDRSelector) and len(peer.excepts) == 2
    for prefix, want in (("10.0.0.0/8", True), ("10.9.0.0/16", True), ("10.1.0.0/16", False),
                         ("10.1.2.0/24", False), ("10.2.3.4/32", False), ("10.2.4.0/24", True),
                         ("192.168.0.0/16", False)):
        assert allowed([doc], Labels.of(cidr_labels(prefix)), BILLING) is want, prefix
    assert not allowed([doc], WORLD, BILLING)  # an address outside 10/8
    assert not allowed([doc], FRONTEND, BILLING)  # a pod is never an ipBlock peer (as in Cilium)


def test_ip_block_of_the_whole_family_is_the_world_except_its_except_ranges() -> None:
    everything = billing_ingress({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    assert allowed([everything], WORLD, BILLING)
    assert not allowed([everything], FRONTEND, BILLING)
    # "the internet but not the private ranges": an address inside an except range has the CIDR
    # identity of that range (longest prefix), never `world`, so world itself is let in.
    but = billing_ingress({"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]})
    assert allowed([but], WORLD, BILLING)
    assert allowed([but], Labels.of(cidr_labels("192.168.0.0/16")), BILLING)
    assert not allowed([but], Labels.of(cidr_labels("10.0.0.0/8")), BILLING)
    assert not allowed([but], Labels.of(cidr_labels("10.1.0.0/16")), BILLING)
    assert not allowed([but], FRONTEND, BILLING)
    # the same for a CiliumNetworkPolicy's toCIDRSet, which shares the selector
    cnp_but = cnp([{"fromCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}]}])
    assert allowed([cnp_but], WORLD, BILLING)
    assert not allowed([cnp_but], Labels.of(cidr_labels("10.1.0.0/16")), BILLING)


def test_egress_peers_are_read_the_same_way() -> None:
    doc = knp({"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "web"}},
                                   "podSelector": {"matchLabels": {"app": "frontend"}}},
                                  {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                           "ports": [{"port": 443}]}]})
    assert allowed([doc], BILLING, FRONTEND, 443, egress=True)
    assert not allowed([doc], BILLING, FRONTEND, 80, egress=True)
    assert not allowed([doc], BILLING, REPORTS, 443, egress=True)
    assert allowed([doc], BILLING, Labels.of(cidr_labels("192.168.2.0/24")), 443, egress=True)
    assert not allowed([doc], BILLING, Labels.of(cidr_labels("192.168.1.0/24")), 443, egress=True)
    assert not allowed([doc], BILLING, WORLD, 443, egress=True)


# -- ports ------------------------------------------------------------------------------------------------


def test_ports_protocol_defaults_to_tcp_and_a_missing_port_is_every_port_of_it() -> None:
    doc = billing_ingress({"ports": [{"port": 80}, {"protocol": "UDP"}, {"protocol": "SCTP", "port": 9000}]})
    (rule,) = parse(doc).rules[0].rules
    assert rule.port_rules[0].ports == (
        PortProtocol(ALL_PORTS, Protocol.UDP),
        PortProtocol(PortRange(80, 80), Protocol.TCP),
        PortProtocol(PortRange(9000, 9000), Protocol.SCTP),
    )
    assert allowed([doc], FRONTEND, BILLING, 80, "TCP")
    assert not allowed([doc], FRONTEND, BILLING, 80, "SCTP") and not allowed([doc], FRONTEND, BILLING, 81, "TCP")
    assert allowed([doc], FRONTEND, BILLING, 53, "UDP") and allowed([doc], FRONTEND, BILLING, 65535, "UDP")
    assert allowed([doc], FRONTEND, BILLING, 9000, "SCTP")
    assert not allowed([doc], FRONTEND, BILLING, 9000, "TCP")


def test_end_port_is_an_inclusive_range() -> None:
    doc = billing_ingress({"ports": [{"port": 32000, "endPort": 32768}]})
    for port, want in ((31999, False), (32000, True), (32500, True), (32768, True), (32769, False)):
        assert allowed([doc], FRONTEND, BILLING, port) is want, port
    assert not allowed([doc], FRONTEND, BILLING, 32500, "UDP")
    single = billing_ingress({"ports": [{"port": 8080, "endPort": 8080}]})
    assert allowed([single], FRONTEND, BILLING, 8080) and not allowed([single], FRONTEND, BILLING, 8081)


def test_ports_and_peers_of_one_rule_must_both_match_rules_are_a_union() -> None:
    doc = billing_ingress(
        {"from": [{"podSelector": {"matchLabels": {"app": "ledger"}}}], "ports": [{"port": 80}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}], "ports": [{"port": 443}]},
    )
    assert allowed([doc], LEDGER, BILLING, 80) and not allowed([doc], LEDGER, BILLING, 443)
    assert allowed([doc], FRONTEND, BILLING, 443) and not allowed([doc], FRONTEND, BILLING, 80)


# -- beside CiliumNetworkPolicies ---------------------------------------------------------------------------


def cnp(ingress: list[dict[str, Any]], field: str = "ingress") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "cnp", "namespace": "payments"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "billing"}}, field: ingress}}


def test_allows_of_network_policies_and_cnps_are_a_union_and_a_cnp_deny_wins() -> None:
    np_ledger = billing_ingress({"from": [{"podSelector": {"matchLabels": {"app": "ledger"}}}], "ports": [{"port": 80}]})
    cnp_web = cnp([{"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "web"}}],
                    "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}])
    both = [np_ledger, cnp_web]
    assert allowed(both, LEDGER, BILLING, 80) and allowed(both, FRONTEND, BILLING, 443)
    assert not allowed(both, LEDGER, BILLING, 443) and not allowed(both, FRONTEND, BILLING, 80)
    deny = cnp([{"fromEndpoints": [{"matchLabels": {"app": "ledger"}}]}], "ingressDeny")
    assert not allowed([np_ledger, deny], LEDGER, BILLING, 80)
    # an egress-only NetworkPolicy does not put ingress in default-deny beside a CNP that allows
    egress_only = knp({"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Egress"]})
    assert allowed([egress_only], REPORTS, BILLING, 80)
    assert allowed([egress_only, cnp_web], FRONTEND, BILLING, 443)


def test_the_translation_is_what_a_hand_written_cnp_gives() -> None:
    doc = billing_ingress({"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}},
                                     "podSelector": {"matchLabels": {"app": "frontend"}}}],
                           "ports": [{"port": 8080, "protocol": "TCP"}]})
    hand = cnp([{"fromEndpoints": [{"matchLabels": {"app": "frontend", "io.cilium.k8s.namespace.labels.team": "web"},
                                    "matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}],
                 "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}])
    (np_rule,), (cnp_rule,) = parse(doc).rules, parse(hand).rules
    assert np_rule.subject == cnp_rule.subject
    assert (np_rule.default_deny_ingress, np_rule.default_deny_egress) == (cnp_rule.default_deny_ingress,
                                                                          cnp_rule.default_deny_egress)
    assert [(r.peers, r.port_rules) for r in np_rule.rules] == [(r.peers, r.port_rules) for r in cnp_rule.rules]


# -- bad input --------------------------------------------------------------------------------------------------


def _peer(peer: Any, at: int = 1) -> dict[str, Any]:
    peers: list[Any] = [{"podSelector": {}}] * at + [peer]
    return billing_ingress({"from": peers})


def _port(port: Any) -> dict[str, Any]:
    return billing_ingress({"ports": [port]})


@pytest.mark.parametrize(
    "doc, path, words",
    [
        (_peer({"ipBlock": {"cidr": "10.0.0.300/8"}}), "spec.ingress[0].from[1].ipBlock.cidr", "invalid CIDR"),
        (_peer({"ipBlock": {"cidr": "10.0.0.1"}}), "spec.ingress[0].from[1].ipBlock.cidr", "prefix length"),
        (_peer({"ipBlock": {}}), "spec.ingress[0].from[1].ipBlock.cidr", "is required"),
        (_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}),
         "spec.ingress[0].from[1].ipBlock.except[0]", "not inside"),
        (_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}),
         "spec.ingress[0].from[1].ipBlock.except[0]", "strict subset"),
        (_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["::/64"]}}),
         "spec.ingress[0].from[1].ipBlock.except[0]", "not inside"),
        (_peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}), "spec.ingress[0].from[1]", "cannot be combined"),
        (_peer({}), "spec.ingress[0].from[1]", "a peer needs podSelector, namespaceSelector or ipBlock"),
        (_peer({"podSelector": {"matchLabels": {"k8s:app": "x"}}}),
         "spec.ingress[0].from[1].podSelector.matchLabels.k8s:app", "':' is not allowed"),
        (_peer({"namespaceSelector": {"matchExpressions": [{"key": "reserved:host", "operator": "Exists"}]}}),
         "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].key", "':' is not allowed"),
        (_peer({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["x"]}]}}),
         "spec.ingress[0].from[1].podSelector.matchExpressions[0].operator", "must be one of In, NotIn"),
        (_peer({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
         "spec.ingress[0].from[1].podSelector.matchExpressions[0].values", "needs at least one value"),
        (_peer({"podSelector": {"matchLabels": {"app": "a b"}}}),
         "spec.ingress[0].from[1].podSelector.matchLabels.app", "label value"),
        (_peer({"serviceAccount": {}}), "spec.ingress[0].from[1].serviceAccount", "unknown field"),
        (_port({"port": "HTTP"}), "spec.ingress[0].ports[0].port", "'H' is not allowed (lowercase letters"),
        (_port({"port": "http", "endPort": 90}), "spec.ingress[0].ports[0].endPort", "not the port name 'http'"),
        (_port({"port": "80"}), "spec.ingress[0].ports[0].port", "without quotes"),
        (_port({"port": "Not A Name"}), "spec.ingress[0].ports[0].port", "port name"),
        (_port({"port": 0}), "spec.ingress[0].ports[0].port", "out of range 1-65535"),
        (_port({"port": 70000}), "spec.ingress[0].ports[0].port", "out of range 1-65535"),
        (_port({"port": 80.5}), "spec.ingress[0].ports[0].port", "must be a port number"),
        (_port({"endPort": 90}), "spec.ingress[0].ports[0].endPort", "needs a port number"),
        (_port({"port": 90, "endPort": 80}), "spec.ingress[0].ports[0].endPort", "between port 90 and 65535"),
        (_port({"port": 90, "endPort": 70000}), "spec.ingress[0].ports[0].endPort", "between port 90 and 65535"),
        (_port({"protocol": "tcp"}), "spec.ingress[0].ports[0].protocol", "TCP, UDP, SCTP"),
        (_port({"protocol": "ANY"}), "spec.ingress[0].ports[0].protocol", "TCP, UDP, SCTP"),
        (_port({"port": 80, "rules": {"http": [{}]}}), "spec.ingress[0].ports[0].rules", "unknown field"),
        (billing_ingress(policyTypes=["Ingress", "Bogus"]), "spec.policyTypes[1]", "Ingress or Egress"),
        (billing_ingress(policyTypes=["Egress", "Egress"]), "spec.policyTypes[1]", "listed twice"),
        (billing_ingress({"fromEndpoints": [{}]}), "spec.ingress[0].fromEndpoints", "unknown field"),
        (knp({"podSelector": {}, "egress": [{"to": [{"podSelector": {}}], "from": []}]}), "spec.egress[0].from",
         "unknown field"),
        (knp({"podSelector": {}, "ingress": {"from": []}}), "spec.ingress", "must be a list"),
        (knp({"podSelector": None}), "spec.podSelector", ""),
        (knp({"endpointSelector": {}}), "spec.endpointSelector", "unknown field"),
        (knp(None), "spec", "is required"),
        (knp({"podSelector": {}}, apiVersion="networking.k8s.io/v1beta1"), "apiVersion", "networking.k8s.io/v1"),
        (knp({"podSelector": {}}, apiVersion="projectcalico.org/v3"), "apiVersion", "Calico"),
        (knp({"podSelector": {}}, name="Bad_Name"), "metadata.name", "DNS subdomain"),
        (knp({"podSelector": {}}, namespace="a.b"), "metadata.namespace", "DNS label"),
    ],
)
def test_bad_input_is_refused_with_its_field_path(doc: dict[str, Any], path: str, words: str) -> None:
    if path == "spec.podSelector":  # null is read as missing: every pod, with a warning
        p = parse(doc)
        assert [(w.path, w.code) for w in p.warnings] == [("spec.podSelector", "null-field")]
        return
    errors = errors_of(doc)
    assert path in errors, errors
    assert words in errors[path], errors[path]


def test_every_error_is_reported_at_once_and_the_resource_is_named() -> None:
    doc = billing_ingress({"from": [{}], "ports": [{"port": "http_"}, {"protocol": "ICMP"}]},
                          {"from": [{"ipBlock": {"cidr": "x"}}]})
    with pytest.raises(PolicyValidationError) as ei:
        parse(doc)
    assert ei.value.resource == "NetworkPolicy/payments/np"
    assert {e.path for e in ei.value.errors} == {
        "spec.ingress[0].from[0]", "spec.ingress[0].ports[0].port", "spec.ingress[0].ports[1].protocol",
        "spec.ingress[1].from[0].ipBlock.cidr"}


def test_the_parser_does_not_modify_its_input() -> None:
    doc = billing_ingress({"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}],
                           "ports": [{"port": 80}]})
    before = copy.deepcopy(doc)
    parse(doc)
    assert doc == before


# -- policy validate / trace -------------------------------------------------------------------------------

INVENTORY = """\
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {team: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-1, namespace: web, labels: {app: frontend}}
status: {podIP: 10.0.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reports-1, namespace: web, labels: {app: reports}}
status: {podIP: 10.0.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: billing-1, namespace: payments, labels: {app: billing}}
status: {podIP: 10.0.1.10}
"""
NETWORK_POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: billing-from-web-frontends, namespace: payments}
spec:
  podSelector: {matchLabels: {app: billing}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {team: web}}
          podSelector: {matchLabels: {app: frontend}}
      ports:
        - port: 8080
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    (tmp_path / "np.yaml").write_text(NETWORK_POLICY)
    return tmp_path


@pytest.mark.parametrize(
    "src, port, verdict",
    [("web/frontend-1", 8080, "allowed"), ("web/reports-1", 8080, "denied"), ("web/frontend-1", 9090, "denied"),
     ("world", 8080, "denied")],
)
def test_policy_trace_reads_a_network_policy(files: Path, src: str, port: int, verdict: str) -> None:
    r = run_trace(TraceRequest((str(files),), src, "payments/billing-1", port))
    assert r.verdict.verdict == verdict, r.verdict.reasons
    assert r.verdict.policies == ("NetworkPolicy/payments/billing-from-web-frontends",)
    assert not r.verdict.redirected  # L3/L4 only: never the proxy
    if verdict == "denied":
        assert r.verdict.layer is not None and r.verdict.layer.value == "l3l4"


def test_policy_trace_cli_names_the_network_policy(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["policy", "trace", "-f", str(files), "--from", "web/frontend-1", "--to", "payments/billing-1",
                   "--port", "8080", "-o", "json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out)
    assert result["verdict"] == "allowed" and result["policies"] == ["NetworkPolicy/payments/billing-from-web-frontends"]
    assert any("selected by NetworkPolicy/payments/billing-from-web-frontends" in r for r in result["reasons"])


def test_policy_validate_reports_network_policy_errors_and_warnings(tmp_path: Path) -> None:
    doc = yaml.safe_load(NETWORK_POLICY)
    doc["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}})
    doc["spec"]["egress"] = [{"to": [{"podSelector": {}}]}]
    f = tmp_path / "np.yaml"
    f.write_text(yaml.safe_dump(doc))
    report = validate_paths([str(f)])
    assert report.checked == 1 and report.invalid == 1
    assert [(i.resource, i.path, i.code) for i in report.errors] == [
        ("NetworkPolicy/payments/billing-from-web-frontends", "spec.ingress[0].from[1].ipBlock.except[0]", "cidr-except")]
    doc["spec"]["ingress"][0]["from"].pop()
    f.write_text(yaml.safe_dump(doc))
    report = validate_paths([str(f)])
    assert report.checked == 1 and report.invalid == 0 and not report.errors
    assert [(i.path, i.code) for i in report.warnings] == [("spec.egress", "ignored-rules")]


EGRESS_POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: billing-to-the-internet, namespace: payments}
spec:
  podSelector: {matchLabels: {app: billing}}
  policyTypes: [Egress]
  egress:
    - to:
        - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}
      ports:
        - port: 443
"""


@pytest.mark.parametrize(
    "dst, port, verdict",
    [("8.8.8.8", 443, "allowed"), ("world", 443, "allowed"), ("10.1.2.3", 443, "denied"),
     ("192.168.7.1", 443, "denied"), ("8.8.8.8", 80, "denied"), ("web/frontend-1", 443, "denied")],
)
def test_policy_trace_of_an_egress_ip_block_to_addresses(files: Path, dst: str, port: int, verdict: str) -> None:
    (files / "np.yaml").write_text(EGRESS_POLICY)
    r = run_trace(TraceRequest((str(files),), "payments/billing-1", dst, port))
    assert r.verdict.verdict == verdict, r.verdict.reasons
    assert r.verdict.policies == ("NetworkPolicy/payments/billing-to-the-internet",)


# -- named ports (upstream: the destination pod's container port of that name and protocol) --------


def test_named_ports_resolve_on_the_destination_pods_as_upstream_says() -> None:
    from l7gate.policy.namedports import NamedPorts
    from l7gate.policy.types import NamedPort

    ingress = billing_ingress({"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}, "namespaceSelector": {}}],
                              "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]})
    assert set(parse(ingress).rules[0].rules[0].port_rules[0].ports) == {
        NamedPort("http", Protocol.TCP), NamedPort("dns", Protocol.UDP)}  # TCP unless it says otherwise
    billing_ports = NamedPorts.of([("http", 8080, "TCP"), ("dns", 5353, "UDP"), ("admin", 9000, "TCP")])
    rules = list(parse(ingress).rules)

    def verdict(port: int, proto: str = "TCP", ports: NamedPorts = billing_ports) -> bool:
        flow = Flow(Peer(1, FRONTEND, managed=False), Peer(2, BILLING, named_ports=ports), port, Protocol(proto))
        return evaluate(rules, flow).allowed

    assert verdict(8080) and verdict(5353, "UDP")
    assert not verdict(80) and not verdict(9000) and not verdict(8080, "UDP") and not verdict(5353, "TCP")
    assert not verdict(8080, ports=NamedPorts())  # a pod that does not declare it: nothing
    # egress: the peer's port of that name; an ipBlock peer has no container ports
    egress = knp({"podSelector": {"matchLabels": {"app": "frontend"}}, "policyTypes": ["Egress"],
                  "egress": [{"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                              "ports": [{"port": "http"}]}]}, namespace="web")
    erules = list(parse(egress).rules)
    peer = pod("web", app="reports")

    def out(port: int, ports: NamedPorts, labels: Labels = peer) -> bool:
        flow = Flow(Peer(1, FRONTEND), Peer(2, labels, managed=False, named_ports=ports), port, Protocol.TCP)
        return evaluate(erules, flow).allowed

    assert out(8080, billing_ports) and not out(80, billing_ports)
    assert out(8081, NamedPorts.of([("http", 8081, "TCP")]))  # each peer its own number
    assert not out(8080, NamedPorts(), Labels.of({**cidr_labels("10.1.2.3/32")}))
