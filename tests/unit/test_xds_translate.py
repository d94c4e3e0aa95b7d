"""Envoy translation details that the end-to-end tests do not pin down."""

from __future__ import annotations

import ipaddress


def test_envoy_matcher_merges_only_exact_runs_of_pod_addresses() -> None:
    import ipaddress

    from l7gate.policy.mapstate import Action, Decision
    from l7gate.xds.rbac import PortDecisions, rbac_matcher

    allow = Decision(Action.ALLOW, policies=("P",))
    deny = Decision(Action.DENY, policies=("P",))
    peers = {i: allow for i in range(1000, 1004)} | {2000: allow}
    prefixes = {i: [ipaddress.ip_network(f"10.0.0.{i - 1000}/32")] for i in range(1000, 1004)}
    prefixes[2000] = [ipaddress.ip_network("10.0.0.5/32")]  # .4 is unknown: .5 must stay alone
    m = rbac_matcher(PortDecisions(deny, peers), prefixes)
    from xds.type.matcher.v3 import ip_pb2

    ipm = ip_pb2.IPMatcher()
    m.matcher_tree.custom_match.typed_config.Unpack(ipm)
    ranges = [(r.address_prefix, r.prefix_len.value) for rm in ipm.range_matchers for r in rm.ranges]
    assert ranges == [("10.0.0.0", 30), ("10.0.0.5", 32)]


def test_port_policy_is_one_classifier_filter_and_slots_fail_closed() -> None:
    from envoy.extensions.common.matching.v3 import extension_matcher_pb2
    from envoy.extensions.filters.http.composite.v3 import composite_pb2
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    from xds.type.matcher.v3 import ip_pb2

    from l7gate.xds import rbac, resources, source_slots

    lst = resources.listener("l", "10.0.0.1", 8080, "r")
    hcm = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    cls_filter, router = hcm.http_filters
    assert router.name == resources.ROUTER_FILTER
    assert cls_filter.name == source_slots.classifier_name("10.0.0.1", 8080)
    # No default config: the listener warms (takes no connection) until the classifier arrives.
    assert not cls_filter.config_discovery.HasField("default_config")
    assert not resources.upstream_route("r", "c").virtual_hosts[0].routes[0].typed_per_filter_config

    cls = source_slots.classifier_config("10.0.0.1", 8080, [ipaddress.ip_network("10.1.2.0/24")])
    wrapper = extension_matcher_pb2.ExtensionWithMatcher()
    cls.typed_config.Unpack(wrapper)
    ipm = ip_pb2.IPMatcher()
    wrapper.xds_matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    names = set()
    for on in [*(rm.on_match for rm in ipm.range_matchers), wrapper.xds_matcher.on_no_match]:
        act = composite_pb2.ExecuteFilterAction()
        on.action.typed_config.Unpack(act)
        names.add(act.dynamic_config.name)
        # A slot Envoy has not received (or had removed) is the default: deny everything.
        src = act.dynamic_config.config_discovery
        assert src.apply_default_config_without_warming
        deny = rbac_pb2.RBAC()
        src.default_config.Unpack(deny)
        assert deny == rbac.deny_all_rbac() and not deny.rules.policies
    # Every slot is named whether or not it holds a block, so Envoy subscribes to all at once.
    assert names == set(source_slots.slot_names("10.0.0.1", 8080)[1:])


def test_aligned_blocks_are_what_collapse_addresses_gives() -> None:
    import random

    from l7gate.xds.rbac import _aligned_blocks

    rnd = random.Random(1)
    for _ in range(500):
        bits = rnd.choice((32, 128))
        base = rnd.choice((0, rnd.randrange(0, 2**bits - 5000)))
        xs = sorted({base + rnd.randrange(0, rnd.choice((8, 64, 600))) for _ in range(rnd.randrange(1, 80))})
        if bits == 32:
            v4 = ipaddress.collapse_addresses([ipaddress.IPv4Network((x, 32)) for x in xs])
            want = [(int(n.network_address), n.prefixlen) for n in v4]
        else:
            v6 = ipaddress.collapse_addresses([ipaddress.IPv6Network((x, 128)) for x in xs])
            want = [(int(n.network_address), n.prefixlen) for n in v6]
        assert _aligned_blocks(xs, bits) == want


def test_literal_patterns_become_exact_matches_and_others_stay_re2() -> None:
    from l7gate.xds.rbac import _regex

    assert _regex("GET").exact == "GET" and _regex("/v1/charge").exact == "/v1/charge"
    for pattern in ("GET|HEAD", "/v1/.*", "/v2/items/[0-9]+", "/v1/charge\\?.*", "P.*", "a{2}"):
        m = _regex(pattern)
        assert not m.exact and m.safe_regex.regex == pattern
