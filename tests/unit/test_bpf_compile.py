"""The kernel policy-map compiler agrees with `decide` on every port, peer and protocol (ICMP
types included), and with the reference evaluator on generated policies and flows."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, note, settings

from l7gate.policy.evaluate import Layer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.mapstate import decide
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import Direction, Protocol
from l7gate.redirect_bpf.compile import (
    DIR_NUMBERS, PROTO_NUMBERS, PROTOCOLS, KAction, KFlag, compile_endpoint, kernel_value, lookup, prefix_blocks,
)
from tests.unit import strategies as gen
from tests.unit.test_policy_properties import SCALE, as_json, build_resolver, event, parse_all, rules_of

A, B, C, W = 70001, 65601, 70002, 2
IDS = {
    A: Labels.of({"app": "a", "io.kubernetes.pod.namespace": "ns"}),
    B: Labels.of({"app": "b", "io.kubernetes.pod.namespace": "ns"}),
    C: Labels.of({"app": "c", "io.kubernetes.pod.namespace": "ns"}),
    W: Labels.of({"reserved:world": ""}),
}


def ccnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": name}, "spec": spec}


POLICIES = [
    ccnp("l7", {"endpointSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"app": "a"}}], "toPorts": [
            {"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]},
        {"fromEndpoints": [{"matchLabels": {"app": "c"}}], "toPorts": [{"ports": [{"port": "8000", "endPort": 8100}]}],
         "authentication": {"mode": "required"}},
        {"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]},
    ], "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "0", "protocol": "ANY"}]}]},
                       {"fromEndpoints": [{"matchLabels": {"app": "c"}}], "toPorts": [{"ports": [{"port": "8050"}]}]}],
     "egress": [{"toEntities": ["world"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}],
                 "authentication": {"mode": "test-always-fail"}}]}),
]


def test_prefix_blocks_cover_exactly() -> None:
    rnd = random.Random(7)
    for _ in range(200):
        lo = rnd.randrange(0, 65536)
        hi = rnd.randrange(lo, 65536)
        covered = []
        for start, plen in prefix_blocks(lo, hi):
            size = 1 << (16 - plen)
            assert start % size == 0
            covered.append((start, start + size - 1))
        assert covered[0][0] == lo and covered[-1][1] == hi
        assert all(a[1] + 1 == b[0] for a, b in zip(covered, covered[1:]))
        assert len(covered) <= 30


def test_kernel_entries_agree_with_decide() -> None:
    r = Resolver()
    r.update_identities(IDS)
    for d in POLICIES:
        r.upsert_policy(parse_policy(d))
    r.add_endpoint(B)
    pol = r.endpoint_policy(B)
    assert pol is not None
    entries = compile_endpoint(pol)
    ports = {0, 1, 52, 53, 54, 442, 443, 444, 7999, 8000, 8049, 8050, 8051, 8079, 8080, 8081, 8100, 8101, 65535}
    ports |= {random.Random(1).randrange(65536) for _ in range(50)}
    for direction in Direction:
        for proto in PROTOCOLS:
            for peer in (A, B, C, W, 999_999):
                for port in ports:
                    want = kernel_value(decide(pol, direction, peer, port, proto))
                    got = lookup(entries, B, DIR_NUMBERS[direction], PROTO_NUMBERS[proto], peer, port)
                    assert got == want, (direction, proto, peer, port)
    # spot checks of the meaning
    assert lookup(entries, B, 0, 6, A, 8080).action is KAction.REDIRECT  # type: ignore[union-attr]
    assert lookup(entries, B, 0, 6, C, 8050).action is KAction.DENY  # type: ignore[union-attr]
    assert lookup(entries, B, 0, 6, W, 53).action is KAction.DENY  # type: ignore[union-attr]
    assert lookup(entries, B, 0, 17, A, 53).action is KAction.ALLOW  # type: ignore[union-attr]


def test_compression_writes_named_peers_only_where_they_differ() -> None:
    r = Resolver()
    r.update_identities(IDS)
    r.upsert_policy(parse_policy(POLICIES[0]))
    r.add_endpoint(B)
    entries = compile_endpoint(r.endpoint_policy(B))  # type: ignore[arg-type]
    a_entries = [k for k in entries if k.peer == A]
    assert [(k.proto, k.port, k.port_prefix) for k in a_entries] == [(6, 8080, 16)]



def test_dns_rules_redirect_to_the_dns_proxy_and_http_rules_do_not_carry_the_flag() -> None:
    from l7gate.policy.fqdn import NameMatch
    from l7gate.policy.mapstate import Action, Decision
    from l7gate.policy.types import HTTPRule
    from l7gate.redirect_bpf.compile import KAction, KFlag, kernel_value

    dns = kernel_value(Decision(Action.HTTP, dns=(NameMatch.pattern("*.example.test"),)))
    assert dns.action is KAction.REDIRECT and dns.flags & KFlag.DNS
    http = kernel_value(Decision(Action.HTTP, http=(HTTPRule(method="GET"),)))
    assert http.action is KAction.REDIRECT and not http.flags & KFlag.DNS


# -- generated policies: kernel entries vs decide vs the reference evaluator ------------------------


def test_icmp_rules_compile_under_protocol_1() -> None:
    r = Resolver()
    r.update_identities(IDS)
    r.upsert_policy(parse_policy(ccnp("icmp", {"endpointSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"app": "a"}}], "icmps": [{"fields": [{"type": "EchoRequest"}]}]},
        {"fromEndpoints": [{"matchLabels": {"app": "c"}}]}]})))
    r.add_endpoint(B)
    entries = compile_endpoint(r.endpoint_policy(B))  # type: ignore[arg-type]
    assert lookup(entries, B, 0, 1, A, 8).action is KAction.ALLOW  # type: ignore[union-attr]
    assert lookup(entries, B, 0, 1, A, 0).action is KAction.DENY  # type: ignore[union-attr]
    assert lookup(entries, B, 0, 6, A, 8).action is KAction.DENY  # type: ignore[union-attr]
    assert all(lookup(entries, B, 0, 1, C, t).action is KAction.ALLOW for t in (0, 3, 8, 255))  # type: ignore[union-attr]
    assert lookup(entries, B, 0, 1, W, 8).action is KAction.DENY  # type: ignore[union-attr]


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(gen.scenarios())
def test_kernel_entries_agree_with_decide_and_the_reference_evaluator(scn: dict[str, Any]) -> None:
    """For every generated flow (ICMP ones included) and each managed side: the kernel's two LPM
    lookups give `kernel_value(decide(...))`, and that value says what the reference evaluator
    says at L3/L4 — dropped (policy or test-always-fail), or passed (to the proxy only when it
    redirects, with the auth flag when it requires auth)."""
    note("corpus JSON (tests/corpus/differential/):\n" + as_json(scn))
    identities = gen.identities_of(scn)
    endpoints = set(scn["endpoints"])
    policies = parse_all(scn["policies"], default_namespace=scn["default_namespace"], cluster_name=scn["cluster_name"])
    rules = rules_of(policies)
    resolver = build_resolver(identities, endpoints, policies)
    entries = {ep: compile_endpoint(pol) for ep in endpoints if (pol := resolver.endpoint_policy(ep)) is not None}
    for f in scn["flows"]:
        proto = Protocol(f["protocol"])
        sides = []
        if f["src"] in endpoints:
            sides.append((Direction.EGRESS, f["src"], f["dst"], True))
        if f["dst"] in endpoints:
            sides.append((Direction.INGRESS, f["dst"], f["src"], False))
        for direction, ep, peer, source_side in sides:
            got = lookup(entries[ep], ep, DIR_NUMBERS[direction], PROTO_NUMBERS[proto], peer, f["port"])
            want = kernel_value(decide(resolver.endpoint_policy(ep), direction, peer, f["port"], proto))
            assert got == want, (f, direction.value)
            ref = evaluate(rules, gen.flow_of(f, identities, source_managed=source_side, destination_managed=not source_side))
            event(f"{proto.value} {direction.value}: {ref.verdict}" + (f" at {ref.layer.value}" if ref.layer else ""))
            dropped = got.action is KAction.DENY
            assert dropped == (not ref.allowed and ref.layer in (Layer.L3L4, Layer.AUTH) and not (
                ref.layer is Layer.AUTH and got.flags & KFlag.AUTH)), (f, direction.value, got, ref.reasons)
            if not dropped and ref.layer is Layer.AUTH:
                # no valid auth entry: the kernel looks for one and drops ("Authentication required")
                assert got.flags & KFlag.AUTH and not f["authenticated"], (f, got, ref.reasons)
            elif not dropped:
                # (Not `==`: where an L3/L4 allow makes a port's L7 rules moot, the reference
                # counts the port as redirected, while the kernel lets it through directly.)
                assert got.action is not KAction.REDIRECT or ref.redirected, (f, got, ref.reasons)
                assert bool(got.flags & KFlag.AUTH) == ref.auth_required, (f, got, ref.reasons)
            if proto is Protocol.ICMP:
                assert got.action is not KAction.REDIRECT  # nothing sends ICMP to a proxy
