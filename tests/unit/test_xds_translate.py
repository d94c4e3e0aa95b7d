"""Envoy translation details that the end-to-end tests do not pin down."""

from __future__ import annotations


def test_envoy_matcher_merges_only_exact_runs_of_pod_addresses() -> None:
    import ipaddress

    from l7gate.policy.resolve import Action, Decision
    from l7gate.xds.translate import PortDecisions, rbac_matcher

    allow = Decision(Action.ALLOW, origins=("P spec.ingress[0]",))
    deny = Decision(Action.DENY, origins=("P",))
    peers = {i: allow for i in range(1000, 1004)} | {2000: allow}
    prefixes = {i: [ipaddress.ip_network(f"10.0.0.{i - 1000}/32")] for i in range(1000, 1004)}
    prefixes[2000] = [ipaddress.ip_network("10.0.0.5/32")]  # .4 is unknown: .5 must stay alone
    m = rbac_matcher(PortDecisions(deny, peers), prefixes)
    from xds.type.matcher.v3 import ip_pb2

    ipm = ip_pb2.IPMatcher()
    m.matcher_tree.custom_match.typed_config.Unpack(ipm)
    ranges = [(r.address_prefix, r.prefix_len.value) for rm in ipm.range_matchers for r in rm.ranges]
    assert ranges == [("10.0.0.0", 30), ("10.0.0.5", 32)]
