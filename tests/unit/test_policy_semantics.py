"""Cilium semantics, checked on both the reference evaluator and the resolved maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.policy.evaluate import Flow, Layer, Peer, Verdict, evaluate, peer_for
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.mapstate import ANY_PEER, MapKey, lookup
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import Direction, HTTPRequest, PortRange, Protocol, Rule

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed"

FRONTEND = 70_001
BILLING = 65_601
OTHER = 70_002
WORLD = 2
FE_LABELS = Labels.of(
    {"app": "frontend-service", "team": "web", "env": "prod",
     "io.kubernetes.pod.namespace": "web", "io.cilium.k8s.policy.cluster": "cluster-b"}
)
BILL_LABELS = Labels.of(
    {"app": "billing-service", "team": "payments", "env": "prod",
     "io.kubernetes.pod.namespace": "payments", "io.cilium.k8s.policy.cluster": "cluster-a"}
)
OTHER_LABELS = Labels.of(
    {"app": "reporting-job", "team": "web", "env": "prod",
     "io.kubernetes.pod.namespace": "web", "io.cilium.k8s.policy.cluster": "cluster-b"}
)
IDS = {FRONTEND: FE_LABELS, BILLING: BILL_LABELS, OTHER: OTHER_LABELS, WORLD: Labels.of({"reserved:world": ""})}


def seed_docs() -> list[dict[str, Any]]:
    docs = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((SEED / name).read_text()))
    return docs


def rules_of(docs: list[dict[str, Any]]) -> list[Rule]:
    return [r for d in docs for r in parse_policy(d).rules]


def resolver_of(docs: list[dict[str, Any]], endpoints: tuple[int, ...] = (BILLING, FRONTEND, OTHER)) -> Resolver:
    r = Resolver()
    r.update_identities(IDS)
    for d in docs:
        r.upsert_policy(parse_policy(d))
    for e in endpoints:
        r.add_endpoint(e)
    return r


def both_ingress(docs: list[dict[str, Any]], src: int, dst: int, port: int, req: HTTPRequest | None = None,
                 proto: Protocol = Protocol.TCP, authenticated: bool = False) -> Verdict:
    """Ingress verdict at `dst` from the evaluator; asserts the resolved map agrees."""
    flow = Flow(peer_for(IDS, src), Peer(dst, IDS[dst], True), port, proto, req, authenticated)
    ref = evaluate(rules_of(docs), flow)
    fast = lookup(resolver_of(docs).endpoint_policy(dst), Direction.INGRESS, flow.source.identity,
                  port, proto, req, authenticated)
    assert (ref.allowed, ref.layer) == (fast.allowed, fast.layer), (ref, fast)
    return ref


@pytest.mark.parametrize(
    "src, port, method, path, allowed, layer",
    [
        (FRONTEND, 8080, "POST", "/v1/charge", True, None),
        (FRONTEND, 8080, "GET", "/v1/transactions", False, Layer.L7),
        (FRONTEND, 8080, "POST", "/v1/refund", False, Layer.L7),
        (FRONTEND, 9090, "POST", "/v1/charge", False, Layer.L3L4),
        (OTHER, 8080, "POST", "/v1/charge", False, Layer.L3L4),
        (FRONTEND, 8080, "POST", "/v1//charge", True, None),
        (FRONTEND, 8080, "POST", "/v1/x/../refund", False, Layer.L7),
        (FRONTEND, 8080, "POST", "/v1/%72efund", False, Layer.L7),
        (FRONTEND, 8080, "POST", "/v1%2Fcharge", False, Layer.L7),
        (FRONTEND, 8080, "POST", "/V1/charge", False, Layer.L7),
        (FRONTEND, 8080, "POST", "/v1/charge#x", False, Layer.L7),
        (FRONTEND, 8080, "POST", "/v1/charge?amount=1", False, Layer.L7),
        (WORLD, 8080, "POST", "/v1/charge", False, Layer.L3L4),
        (123456, 8080, "POST", "/v1/charge", False, Layer.L3L4),  # unknown identity is world
    ],
)
def test_seed_table(src: int, port: int, method: str, path: str, allowed: bool, layer: Layer | None) -> None:
    v = both_ingress(seed_docs(), src, BILLING, port, HTTPRequest(method, path))
    assert (v.allowed, v.layer) == (allowed, layer), v.reasons


def test_seed_default_deny_all_alone_changes_nothing() -> None:
    docs = seed_docs()[:1]
    v = both_ingress(docs, OTHER, BILLING, 9999, HTTPRequest("GET", "/"))
    assert v.allowed


def ccnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


BILL_SEL = {"matchLabels": {"app": "billing-service"}}
FE_SEL = {"matchLabels": {"app": "frontend-service"}}
HTTP_CHARGE = {"ports": [{"port": "8080", "protocol": "TCP"}],
               "rules": {"http": [{"method": "POST", "path": "/v1/charge"}]}}


def test_deny_wins_over_allow() -> None:
    docs = [
        ccnp("allow", {"endpointSelector": BILL_SEL, "ingress": [{"fromEndpoints": [FE_SEL]}]}),
        ccnp("deny", {"endpointSelector": BILL_SEL, "ingressDeny": [{"fromEndpoints": [FE_SEL], "toPorts": [{"ports": [{"port": "8080"}]}]}]}),
    ]
    v = both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("GET", "/"))
    assert not v.allowed and v.layer is Layer.L3L4
    assert v.policies == ("CiliumClusterwideNetworkPolicy/deny",)
    assert both_ingress(docs, FRONTEND, BILLING, 8081).allowed


def test_l4_allow_makes_l7_rules_moot() -> None:
    docs = [
        ccnp("l7", {"endpointSelector": BILL_SEL, "ingress": [{"fromEndpoints": [FE_SEL], "toPorts": [HTTP_CHARGE]}]}),
        ccnp("l4", {"endpointSelector": BILL_SEL, "ingress": [{"toPorts": [{"ports": [{"port": "8080"}]}]}]}),
    ]
    assert both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("DELETE", "/anything")).allowed
    assert both_ingress(docs[:1], FRONTEND, BILLING, 8080, HTTPRequest("DELETE", "/anything")).layer is Layer.L7


def test_empty_http_rule_allows_all_through_proxy() -> None:
    docs = [ccnp("p", {"endpointSelector": BILL_SEL, "ingress": [{"fromEndpoints": [FE_SEL], "toPorts": [
        {"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [{}]}}]}]})]
    v = both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("PATCH", "/x"))
    assert v.allowed and v.redirected
    entry = resolver_of(docs).endpoint_policy(BILLING).ingress[MapKey(FRONTEND, Protocol.TCP, PortRange(8080, 8080))]  # type: ignore[union-attr]
    assert entry.redirect and entry.action == "proxy"


def test_allows_are_a_union() -> None:
    docs = [
        ccnp("a", {"endpointSelector": BILL_SEL, "ingress": [{"fromEndpoints": [FE_SEL], "toPorts": [HTTP_CHARGE]}]}),
        ccnp("b", {"endpointSelector": BILL_SEL, "ingress": [{"fromEndpoints": [FE_SEL], "toPorts": [
            {"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [{"method": "GET", "path": "/v1/transactions"}]}}]}]}),
    ]
    assert both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("POST", "/v1/charge")).allowed
    assert both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("GET", "/v1/transactions")).allowed
    assert not both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("GET", "/v1/charge")).allowed


def test_ingress_empty_rule_denies_all() -> None:
    docs = [ccnp("p", {"endpointSelector": BILL_SEL, "ingress": [{}]})]
    assert both_ingress(docs, FRONTEND, BILLING, 8080).layer is Layer.L3L4


def test_enable_default_deny_false_keeps_other_traffic_allowed_but_enforces_l7() -> None:
    docs = [ccnp("p", {"endpointSelector": BILL_SEL, "enableDefaultDeny": {"ingress": False},
                       "ingress": [{"fromEndpoints": [FE_SEL], "toPorts": [HTTP_CHARGE]}]})]
    assert both_ingress(docs, OTHER, BILLING, 8080, HTTPRequest("GET", "/")).allowed
    assert both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("GET", "/")).layer is Layer.L7


@pytest.mark.parametrize("mode, authenticated, allowed", [
    ("required", False, False), ("required", True, True), ("disabled", False, True),
    ("test-always-fail", True, False),
])
def test_authentication(mode: str, authenticated: bool, allowed: bool) -> None:
    docs = [ccnp("p", {"endpointSelector": BILL_SEL, "ingress": [
        {"fromEndpoints": [FE_SEL], "toPorts": [HTTP_CHARGE], "authentication": {"mode": mode}}]})]
    v = both_ingress(docs, FRONTEND, BILLING, 8080, HTTPRequest("POST", "/v1/charge"), authenticated=authenticated)
    assert v.allowed is allowed
    if not allowed:
        assert v.layer is Layer.AUTH


def test_egress_to_world_entity_and_port_range() -> None:
    docs = [ccnp("egress", {"endpointSelector": FE_SEL, "egress": [
        {"toEntities": ["world"], "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}]}]})]
    rules = rules_of(docs)
    fe = Peer(FRONTEND, FE_LABELS, True)

    def out(dst: int, port: int) -> Verdict:
        flow = Flow(fe, peer_for(IDS, dst), port, Protocol.TCP)
        ref = evaluate(rules, flow)
        fast = lookup(resolver_of(docs).endpoint_policy(FRONTEND), Direction.EGRESS, flow.destination.identity, port, Protocol.TCP)
        assert (ref.allowed, ref.layer) == (fast.allowed, fast.layer)
        return ref

    assert out(WORLD, 8050).allowed
    assert not out(WORLD, 8101).allowed
    assert not out(BILLING, 8050).allowed  # a pod is not `world`


def test_protocol_matters() -> None:
    docs = [ccnp("p", {"endpointSelector": BILL_SEL, "ingress": [{"fromEndpoints": [FE_SEL], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]})]
    assert both_ingress(docs, FRONTEND, BILLING, 53, proto=Protocol.UDP).allowed
    assert not both_ingress(docs, FRONTEND, BILLING, 53, proto=Protocol.TCP).allowed


def test_lookup_without_computed_policy_fails_closed() -> None:
    v = lookup(None, Direction.INGRESS, FRONTEND, 8080, Protocol.TCP)
    assert not v.allowed and v.layer is Layer.L3L4


def test_wildcard_peer_is_any_key() -> None:
    docs = [ccnp("p", {"endpointSelector": BILL_SEL, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]})]
    pol = resolver_of(docs).endpoint_policy(BILLING)
    assert pol is not None
    assert list(pol.ingress) == [MapKey(ANY_PEER, Protocol.TCP, PortRange(80, 80))]


# -- incremental resolution -------------------------------------------------------------------


def test_new_identity_updates_only_affected_entries() -> None:
    r = resolver_of(seed_docs())
    new_fe = 70_050
    labels = FE_LABELS.with_labels({"version": "2"})
    delta = r.update_identities({new_fe: labels})
    assert set(delta.changes) == {BILLING}
    d = delta.changes[BILLING][Direction.INGRESS]
    assert list(d.upserted) == [MapKey(new_fe, Protocol.TCP, PortRange(8080, 8080))]
    assert not d.deleted
    delta = r.update_identities({}, deleted=[new_fe])
    assert delta.changes[BILLING][Direction.INGRESS].deleted == frozenset(
        {MapKey(new_fe, Protocol.TCP, PortRange(8080, 8080))})


def test_policy_change_and_delete_produce_deltas_and_revisions() -> None:
    r = resolver_of(seed_docs())
    rev = r.revision
    allow = seed_docs()[1]
    allow["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "9090"
    delta = r.upsert_policy(parse_policy(allow))
    assert r.revision == rev + 1
    ing = delta.changes[BILLING][Direction.INGRESS]
    assert MapKey(FRONTEND, Protocol.TCP, PortRange(9090, 9090)) in ing.upserted
    assert MapKey(FRONTEND, Protocol.TCP, PortRange(8080, 8080)) in ing.deleted
    delta = r.delete_policy("CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api")
    pol = r.endpoint_policy(BILLING)
    assert pol is not None and not pol.ingress and not pol.default_deny_ingress


def test_endpoint_label_change_reselects_rules() -> None:
    r = resolver_of(seed_docs())
    assert r.endpoint_policy(OTHER).default_deny_ingress is False  # type: ignore[union-attr]
    r.update_identities({OTHER: BILL_LABELS.with_labels({"version": "x"})})
    assert r.endpoint_policy(OTHER).default_deny_ingress is True  # type: ignore[union-attr]


def test_incremental_equals_full_recompute() -> None:
    r = resolver_of(seed_docs())
    r.update_identities({70_100 + i: FE_LABELS.with_labels({"version": str(i)}) for i in range(5)})
    before = r.endpoint_policy(BILLING)
    r.recompute_all()
    after = r.endpoint_policy(BILLING)
    assert before is not None and after is not None
    assert dict(before.ingress) == dict(after.ingress)
