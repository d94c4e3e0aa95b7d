"""The TCP variant's Envoy resources, without Envoy (tests/integration/test_envoy_mtls_tunnel.py
runs them in real Envoys)."""

from __future__ import annotations

import pytest

from l7gate.policy.mapstate import Action, Decision
from l7gate.policy.types import AuthMode, HTTPRule
from l7gate.xds import mtls_translate as m
from l7gate.xds.rbac import PortDecisions

TD = "l7gate.local"
REMOTE = m.RemotePort("10.0.1.10", 9000, 2002, "b1", "10.0.1.1")


def test_one_filter_chain_per_source_address() -> None:
    """A pod appearing adds its own chain; the chains of the others are unchanged bytes (Envoy
    drains only changed chains)."""
    before = m.tunnel_egress(REMOTE, TD, {1001: ["10.0.2.10"]}, tcp_sources={1001})
    after = m.tunnel_egress(REMOTE, TD, {1001: ["10.0.2.10", "10.0.2.11"]}, tcp_sources={1001})
    chains_before = {c.name: c for c in before.listener.filter_chains}
    chains_after = {c.name: c for c in after.listener.filter_chains}
    assert set(chains_after) - set(chains_before) == {"tcp-10.0.2.11"}
    assert chains_after["tcp-10.0.2.10"] == chains_before["tcp-10.0.2.10"]
    # The HTTP chain (no match) stays last, for every other source.
    assert not after.listener.filter_chains[-1].HasField("filter_chain_match")


def test_an_address_under_two_identities_is_refused() -> None:
    with pytest.raises(ValueError, match="10.0.2.10"):
        m.tunnel_egress(REMOTE, TD, {1001: ["10.0.2.10"], 1002: ["10.0.2.10"]}, tcp_sources={1001})


def test_connect_is_refused_where_the_peer_has_http_rules() -> None:
    http = Decision(Action.HTTP, http=(HTTPRule(method="GET"),), auth=AuthMode.REQUIRED, policies=("p",))
    l4 = Decision(Action.ALLOW, auth=AuthMode.REQUIRED, policies=("q",))
    world = Decision(Action.DENY, policies=("d",))
    dec = PortDecisions(world, {1001: l4, 1002: http})
    ing = m.tunnel_ingress("10.0.1.1", TD, {("10.0.1.10", 9000): dec}, [2002])
    routes = ing.route.virtual_hosts[0].routes
    assert routes[0].match.HasField("connect_matcher") and routes[1].match.prefix == "/"
    assert [(u.upgrade_type, u.enabled.value) for u in routes[1].route.upgrade_configs] == [("CONNECT", False)]
    # The route carries this matcher (packed); check the matcher itself.
    connect = m.tunnel_matcher(TD, {("10.0.1.10", 9000): dec}, connect=True)
    by_san = connect.matcher_tree.exact_match_map.map["10.0.1.10:9000"].matcher.matcher_tree.exact_match_map.map
    action = lambda om: om.action.typed_config  # noqa: E731
    assert b"allow|q" in action(by_san[m.spiffe_id(TD, 1001)]).value
    assert b"deny-l7|p" in action(by_san[m.spiffe_id(TD, 1002)]).value
