"""`toServices` in the policy core: parsing (Cilium's sanitizer checks, each error naming its
field), what an entry selects with the Services in force — read by the reference evaluator and
by the expansion the agent resolves, which must agree — and what a Service with a selector, a
missing Service or a deny rule does."""

from __future__ import annotations

from typing import Any

import pytest

from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.mapstate import lookup
from l7gate.policy.parse import parse_policy
from l7gate.policy.references import expand_policy, references, references_services
from l7gate.policy.resolve import Resolver
from l7gate.policy.selector import CIDRSelector, ServicePeer
from l7gate.policy.toservices import ServiceTarget, selected_services, service_selectors
from l7gate.policy.types import Direction, Protocol

from .test_policy_cilium_sanitizer import errors_of, only_error, warnings_of
from .test_policy_parse import cnp

EXT = ServiceTarget.of("ext", "ext", {"role": "partner"}, has_selector=False, addresses=["192.0.2.10", "192.0.2.11"])
DB = ServiceTarget.of("data", "db", {"role": "partner"}, has_selector=False, addresses=["198.51.100.7"])
PODS = ServiceTarget.of("ext", "pods", {"role": "partner"}, has_selector=True, addresses=[])
SERVICES = {t.key: t for t in (EXT, DB, PODS)}


def egress(*entries: dict[str, Any], deny: bool = False, **rule: Any) -> dict[str, Any]:
    return cnp({"endpointSelector": {}, "egressDeny" if deny else "egress": [{"toServices": list(entries), **rule}]})


def by_name(name: str, namespace: str | None = "ext") -> dict[str, Any]:
    ref: dict[str, Any] = {"serviceName": name}
    if namespace is not None:
        ref["namespace"] = namespace
    return {"k8sService": ref}


def by_labels(selector: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"selector": selector}
    if namespace is not None:
        entry["namespace"] = namespace
    return {"k8sServiceSelector": entry}


def peers(doc: dict[str, Any]) -> list[Any]:
    return [p for r in parse_policy(doc).rules for pr in r.rules for p in pr.peers or ()]


# -- parsing ------------------------------------------------------------------------------------------


def test_entries_by_name_and_by_labels() -> None:
    assert peers(egress(by_name("ext"))) == [ServicePeer(namespace="ext", name="ext")]
    [sel] = peers(egress(by_labels({"matchLabels": {"k8s:role": "partner"}}, "ext")))
    assert isinstance(sel, ServicePeer) and sel.namespace == "ext" and sel.name is None
    assert sel.selects_service("ext", "any", Labels.of({"role": "partner"}))
    assert not sel.selects_service("other", "any", Labels.of({"role": "partner"}))
    assert not sel.selects_service("ext", "any", Labels.of({"role": "office"}))


def test_toservices_beside_toports_is_refused_as_cilium_refuses_it() -> None:
    ports = [{"ports": [{"port": "443", "protocol": "TCP"}]}]
    only_error(egress(by_name("ext"), toPorts=ports), "spec.egress[0].toServices", "services-with-ports",
               "Combining ToServices and ToPorts is not supported yet")
    only_error(egress(by_name("ext"), toPorts=ports, deny=True), "spec.egressDeny[0].toServices",
               "services-with-ports")
    # an empty toPorts is no toPorts (Cilium counts entries); icmps are allowed beside it
    assert peers(egress(by_name("ext"), toPorts=[]))
    assert peers(egress(by_name("ext"), icmps=[{"fields": [{"type": 8}]}]))


def test_toservices_is_one_kind_of_peer() -> None:
    only_error(cnp({"endpointSelector": {}, "egress": [{"toServices": [by_name("ext")], "toEndpoints": [{}]}]}),
               "spec.egress[0].toEndpoints", "peer-kinds", "toServices")
    only_error(cnp({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/8"], "toServices": [by_name("ext")]}]}),
               "spec.egress[0].toServices", "peer-kinds")


def test_toservices_is_egress_only() -> None:
    errs = errors_of(cnp({"endpointSelector": {}, "ingress": [{"fromServices": [by_name("ext")]}]}))
    assert errs["spec.ingress[0].fromServices"].code == "unknown-field"


@pytest.mark.parametrize("entry, path, code", [
    ({}, "spec.egress[0].toServices[0]", "required"),
    ({"k8sService": {"serviceName": "ext"}, "k8sServiceSelector": {"selector": {}}},
     "spec.egress[0].toServices[0].k8sService", "service-kinds"),
    ({"k8sService": {"namespace": "ext"}}, "spec.egress[0].toServices[0].k8sService.serviceName", "required"),
    ({"k8sService": {"serviceName": "Ext"}}, "spec.egress[0].toServices[0].k8sService.serviceName", "name"),
    ({"k8sService": {"serviceName": "1ext"}}, "spec.egress[0].toServices[0].k8sService.serviceName", "name"),
    ({"k8sService": {"serviceName": "ext", "namespace": "a/b"}},
     "spec.egress[0].toServices[0].k8sService.namespace", "name"),
    ({"k8sService": {"serviceName": "ext", "port": 80}}, "spec.egress[0].toServices[0].k8sService.port",
     "unknown-field"),
    ({"k8sServiceSelector": {"namespace": "ext"}}, "spec.egress[0].toServices[0].k8sServiceSelector.selector",
     "required"),
    ({"k8sServiceSelector": {"selector": {"matchLabels": {"a": "b c"}}}},
     "spec.egress[0].toServices[0].k8sServiceSelector.selector.matchLabels.a", "label-value"),
    ("ext", "spec.egress[0].toServices[0]", "type"),
])
def test_bad_entries_name_their_field(entry: Any, path: str, code: str) -> None:
    only_error(egress(entry), path, code)


def test_warnings_say_what_the_entry_selects() -> None:
    # Cilium does not scope toServices to a CiliumNetworkPolicy's namespace
    w = warnings_of(egress(by_name("ext", namespace=None)))
    assert w["spec.egress[0].toServices[0].k8sService"].code == "services-any-namespace"
    assert "every namespace" in w["spec.egress[0].toServices[0].k8sService"].message
    ccnp = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "c"},
            "spec": {"endpointSelector": {}, "egress": [{"toServices": [by_name("ext", namespace=None)]}]}}
    assert warnings_of(ccnp) == {}
    w = warnings_of(egress(by_labels({}, "ext")))
    assert w["spec.egress[0].toServices[0].k8sServiceSelector.selector"].code == "services-selector-empty"
    # in a deny rule: Cilium expands toServices in egress rules only (its deny rule denies nothing)
    w = warnings_of(egress(by_name("ext"), deny=True))
    assert w["spec.egressDeny[0].toServices"].code == "services-deny"


# -- what an entry selects -------------------------------------------------------------------------


def test_an_entry_stands_for_the_endpoint_addresses_of_selector_less_services() -> None:
    assert service_selectors(ServicePeer("ext", "ext"), SERVICES) == [
        CIDRSelector(EXT.addresses[0]), CIDRSelector(EXT.addresses[1])]
    # a Service with a selector is not selectable, even when named
    assert service_selectors(ServicePeer("ext", "pods"), SERVICES) == []
    assert service_selectors(ServicePeer("ext", "missing"), SERVICES) == []
    # by name without a namespace: every namespace; by labels: both partners without a selector
    assert service_selectors(ServicePeer("", "db"), SERVICES) == [CIDRSelector(DB.addresses[0])]
    partner = parse_policy(egress(by_labels({"matchLabels": {"role": "partner"}})))
    [sel] = [p for r in partner.rules for pr in r.rules for p in pr.peers or ()]
    assert isinstance(sel, ServicePeer)
    assert [t.key for t in selected_services(sel, SERVICES)] == ["data/db", "ext/ext"]


def cidr_peer(address: str) -> Peer:
    return Peer(2, Labels.of({f"cidr:{address}/32": "", "reserved:world": ""}), managed=False, name=address)


CLIENT = Peer(1001, Labels.of({"io.kubernetes.pod.namespace": "payments", "app": "client"}), name="client")


@pytest.mark.parametrize("entry, deny", [
    (by_name("ext"), False), (by_name("pods"), False), (by_name("missing"), False), (by_name("db", None), False),
    (by_labels({"matchLabels": {"role": "partner"}}), False), (by_labels({}, "ext"), False), (by_name("ext"), True),
])
def test_the_evaluator_and_the_resolved_expansion_agree(entry: dict[str, Any], deny: bool) -> None:
    doc = egress(entry, deny=deny)
    if deny:  # something to deny: allow every address first
        doc["spec"]["egress"] = [{"toEntities": ["all"]}]
    policy = parse_policy(doc)
    assert references(policy) and references_services(policy)
    expanded = expand_policy(policy, {}, SERVICES)
    assert not references(expanded)
    r = Resolver()
    addresses = ["192.0.2.10", "192.0.2.11", "198.51.100.7", "203.0.113.1"]
    ids = {3000 + i: cidr_peer(a) for i, a in enumerate(addresses)}
    r.update_identities({CLIENT.identity: CLIENT.labels, **{i: p.labels for i, p in ids.items()}})
    r.upsert_policy(expanded)
    r.add_endpoint(CLIENT.identity)
    for ident, peer in ids.items():
        ref = evaluate(policy.rules, Flow(CLIENT, peer, 443), services=SERVICES)
        fast = lookup(r.endpoint_policy(CLIENT.identity), Direction.EGRESS, ident, 443, Protocol.TCP)
        assert ref.allowed == fast.allowed, (peer.name, ref.reasons)


def test_what_a_rule_selects_follows_the_services() -> None:
    policy = parse_policy(egress(by_name("ext")))
    ext = cidr_peer("192.0.2.10")
    assert evaluate(policy.rules, Flow(CLIENT, ext, 443), services=SERVICES).allowed
    # no Services given: none exists; the rule selects nothing and egress is default-deny
    v = evaluate(policy.rules, Flow(CLIENT, ext, 443))
    assert not v.allowed and any("no such Service" in r for r in v.reasons)
    # the endpoints changed: the old address is no longer selected
    moved = {**SERVICES, EXT.key: ServiceTarget.of("ext", "ext", {}, has_selector=False, addresses=["192.0.2.99"])}
    assert not evaluate(policy.rules, Flow(CLIENT, ext, 443), services=moved).allowed
    # the Service got a selector: it selects nothing
    selected = {**SERVICES, EXT.key: ServiceTarget.of("ext", "ext", {}, has_selector=True, addresses=[])}
    v = evaluate(policy.rules, Flow(CLIENT, ext, 443), services=selected)
    assert not v.allowed and any("has a selector" in r for r in v.reasons)
    # a pod at that address is not the Service's endpoint (CIDR rules never select pods)
    pod = Peer(1002, Labels.of({"io.kubernetes.pod.namespace": "ext"}), managed=False)
    assert not evaluate(policy.rules, Flow(CLIENT, pod, 443), services=SERVICES).allowed
