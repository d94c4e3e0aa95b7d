"""Envoy translation details that the end-to-end tests do not pin down."""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.policy.httpverdict import request_verdict
from l7gate.policy.mapstate import Action, Decision
from l7gate.policy.regex import MAX_PROGRAM_SIZE, compile_regex_size, full_match
from l7gate.policy.types import HeaderMatch, HTTPRequest, HTTPRule
from l7gate.xds import rbac


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
        # A new listener warms until its slots arrive (its old incarnation, if any, serving
        # meanwhile); a slot that never arrives, or is removed, is the default: deny everything.
        src = act.dynamic_config.config_discovery
        assert not src.apply_default_config_without_warming
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


# -- a decision's HTTP rules, as few predicates as Envoy's regex limit allows --------------------

_METHODS = [None, "GET", "POST", "GET|HEAD"]
_PATHS = [None, "/v1/charge", "/v1/.*", "/api/[0-9]+/items/[0-9]+", "(?s).*refund", "/", "/v2/(a|b)+"]
_HOSTS = [None, "billing.example"]
_HEADERS = [(), (HeaderMatch("x-team", "web"),), (HeaderMatch("x-debug"),)]


def _header_value(req: HTTPRequest, path: str, name: str) -> str | None:
    if name == ":method":
        return req.method
    if name == ":path":
        return path
    if name == ":authority":
        return req.host
    return req.headers.get(name)


def _predicate_holds(p: Any, req: HTTPRequest, path: str) -> bool:
    """Envoy's matcher semantics for the predicates `decision_on_match` writes."""
    kind = p.WhichOneof("match_type")
    if kind == "and_matcher":
        return all(_predicate_holds(q, req, path) for q in p.and_matcher.predicate)
    assert kind == "single_predicate"
    header_input = http_inputs_pb2.HttpRequestHeaderMatchInput()
    assert p.single_predicate.input.typed_config.Unpack(header_input)
    value = _header_value(req, path, header_input.header_name)
    if value is None:
        return False
    vm = p.single_predicate.value_match
    if vm.WhichOneof("match_pattern") == "exact":
        return value == vm.exact
    return full_match(vm.safe_regex.regex, value)


def _envoy_allows(on_match: Any, req: HTTPRequest, path: str) -> tuple[bool, str]:
    if on_match.HasField("action"):
        act = rbac_config_pb2.Action()
        assert on_match.action.typed_config.Unpack(act)
        return act.action == rbac_config_pb2.RBAC.Action.ALLOW, act.name
    for fm in on_match.matcher.matcher_list.matchers:
        if _predicate_holds(fm.predicate, req, path):
            return _envoy_allows(fm.on_match, req, path)
    return _envoy_allows(on_match.matcher.on_no_match, req, path)


_rules = st.lists(st.builds(HTTPRule, st.sampled_from(_METHODS), st.sampled_from(_PATHS), st.sampled_from(_HOSTS),
                            st.sampled_from(_HEADERS)), min_size=1, max_size=8)
_requests = st.builds(
    HTTPRequest, st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
    st.sampled_from(["/v1/charge", "/v1/x", "/api/7/items/42", "/api/x/items/1", "/refund", "/a/refund", "/",
                     "/v2/abba", "/v2/"]),
    st.sampled_from(["billing.example", "other.example"]),
    st.sampled_from([{}, {"x-team": "web"}, {"x-debug": "1", "x-team": "ops"}]))


@settings(max_examples=400, deadline=None)
@given(_rules, st.lists(_requests, min_size=1, max_size=6))
def test_a_decisions_rules_become_predicates_envoy_judges_as_the_reference_does(
    rules: list[HTTPRule], reqs: list[HTTPRequest]
) -> None:
    d = Decision(Action.HTTP, http=tuple(rules), policies=("CiliumNetworkPolicy/ns/p",))
    leaf = rbac.decision_on_match(d)
    for req in reqs:
        want = request_verdict(d, req, req.path)
        assert _envoy_allows(leaf, req, req.path) == (want.allowed, want.action)


def test_rules_differing_only_in_path_are_one_predicate_within_envoys_regex_limit() -> None:
    three = tuple(HTTPRule("GET", f"/api/{n}/items/[0-9]+") for n in (157, 457, 757))
    leaf = rbac.decision_on_match(Decision(Action.HTTP, http=(*three, HTTPRule("POST", "/v1/charge"))))
    fms = leaf.matcher.matcher_list.matchers
    assert len(fms) == 2  # GET's three paths are one alternation; POST's rule its own predicate
    paths = [p.single_predicate.value_match for p in fms[0].predicate.and_matcher.predicate][1]
    assert paths.safe_regex.regex == "(?:/api/157/items/[0-9]+)|(?:/api/457/items/[0-9]+)|(?:/api/757/items/[0-9]+)"
    # A rule without a path covers its group; patterns beyond Envoy's limit are split.
    leaf = rbac.decision_on_match(Decision(Action.HTTP, http=(*three, HTTPRule("GET"))))
    (fm,) = leaf.matcher.matcher_list.matchers
    assert fm.predicate.single_predicate.value_match.exact == "GET"
    many = tuple(HTTPRule("GET", f"/v{n}/[a-z]+/[0-9]+/(x|y)") for n in range(40))
    fms = rbac.decision_on_match(Decision(Action.HTTP, http=many)).matcher.matcher_list.matchers
    regexes = [fm.predicate.and_matcher.predicate[1].single_predicate.value_match.safe_regex.regex for fm in fms]
    assert 1 < len(regexes) < 40
    assert all(compile_regex_size(r) <= MAX_PROGRAM_SIZE for r in regexes)
    assert sum(r.count("(?:/v") for r in regexes) == 40


_ALT_PATHS = ["/v1/charge", "/a", "(?i)/Foo/bar", "/x/[a-z]{1,5}", "/users/[0-9]+", ".*", "/api/v[0-9]+/items/.*",
              "/v7/[a-z]+/[0-9]+/(x|y)", "/health", "/api/[0-9]+/(refund|charge)/[a-f0-9]{8}"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_ALT_PATHS), min_size=1, max_size=14))
def test_path_alternations_keep_every_path_in_order_within_envoys_limit(paths: list[str]) -> None:
    out = rbac._path_alternations(paths)
    assert all(compile_regex_size(r) <= MAX_PROGRAM_SIZE for r in out)
    def parts(r: str) -> list[str]:  # no path in the pool starts with "(?:"
        return r[3:-1].split(")|(?:") if r.startswith("(?:") else [r]

    assert [p for r in out for p in parts(r)] == list(dict.fromkeys(paths))
