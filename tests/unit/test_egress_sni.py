"""serverNames in the egress listener (xds/egress.py): a TLS chain per port with serverNames,
whose network RBAC leaves match the SNI with the same wildcards as the policy engine, and the
flows of its TCP access log entries (observe/envoy_flows.py)."""

from __future__ import annotations

import ipaddress

import pytest
import yaml
from envoy.data.accesslog.v3.accesslog_pb2 import TCPAccessLogEntry
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2
from google.protobuf.wrappers_pb2 import StringValue
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.envoy_names import CLUSTER, TLS_STATE, LISTENER
from l7gate.observe.envoy_flows import tcp_log_flows
from l7gate.observe.flow import TrafficDirection, Verdict
from l7gate.observe.ingest_context import IngestContext, MalformedEvent, PeerInfo
from l7gate.policy.fqdn import SERVER_NAME_RE2, NameMatch, server_name_matches, server_name_re2
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.xds.egress import EGRESS_TCP_CLUSTER, EgressPublisher, LocalPod

CLIENT = Labels.of({"k8s:app": "client", "k8s:io.kubernetes.pod.namespace": "web"})
WORLD = Labels.of({"reserved:world": ""})


def policy(**port_rule: object) -> dict[str, object]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "web"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                     "egress": [{"toEntities": ["world"], "toPorts": [port_rule]}]}}


class _Sink:
    def apply(self, node_id: str, delta: object) -> None:
        pass


def render(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    r = Resolver()
    r.update_identities({100: CLIENT, 2: WORLD})
    r.upsert_policy(parse_policy(doc))
    r.add_endpoint(100)
    pub = EgressPublisher(_Sink(), "n", 15001)  # type: ignore[arg-type]
    return pub.render([LocalPod("10.0.0.5", 100)], r.endpoint_policy, {100: [ipaddress.ip_network("10.0.0.5/32")]})


def test_a_server_names_port_gets_a_tls_chain_and_the_inspector() -> None:
    out = render(policy(ports=[{"port": "443", "protocol": "TCP"}], serverNames=["a.example.test"]))
    lis = out[LISTENER]["l7g_egress"]
    names = [c.name for c in lis.filter_chains]
    assert names == ["port-443", "tls-port-443"]
    tls = lis.filter_chains[1]
    assert tls.filter_chain_match.transport_protocol == "tls"
    assert [f.name for f in tls.filters] == ["l7g.dst_ingress", "l7g.egress", "envoy.filters.network.set_filter_state",
                                             "envoy.filters.network.tcp_proxy"]
    proxy = tcp_proxy_pb2.TcpProxy()
    tls.filters[3].typed_config.Unpack(proxy)
    assert proxy.cluster == EGRESS_TCP_CLUSTER and proxy.upstream_connect_mode == tcp_proxy_pb2.ON_DOWNSTREAM_DATA
    assert "envoy.filters.listener.tls_inspector" in [f.name for f in lis.listener_filters]
    assert EGRESS_TCP_CLUSTER in out[CLUSTER]
    rbac = network_rbac_pb2.RBAC()
    tls.filters[1].typed_config.Unpack(rbac)
    text = str(rbac.matcher)
    assert "ServerNameInput" in text and server_name_re2("a.example.test.").replace("\\", "\\\\") in text


def test_http_rules_alone_add_no_tls_chain_nor_inspector() -> None:
    out = render(policy(ports=[{"port": "80", "protocol": "TCP"}], rules={"http": [{"method": "GET"}]}))
    lis = out[LISTENER]["l7g_egress"]
    assert [c.name for c in lis.filter_chains] == ["port-80"]
    assert "envoy.filters.listener.tls_inspector" not in [f.name for f in lis.listener_filters]
    assert EGRESS_TCP_CLUSTER not in out[CLUSTER]


PATTERNS = ["a.example.test", "*.cdn.test", "**.deep.test", "api-*.test", "*", "**", "x*y.z", "api.*", "*.example.*",
            "*.*", "a*.*", "*.a.*"]
LABELS = ["a", "cdn", "deep", "api-eu", "xay", "z", "test", "example", "A", "_", "", "K", "\u212a", "ſ", " a", "a\n"]


def envoy_allows(pattern: str, name: str) -> bool:
    """What the TLS chain's leaf accepts, evaluated by RE2 itself (Envoy's engine): a
    well-formed name AND one pattern, each a full match."""
    import re2

    m = NameMatch.pattern(pattern)
    return (re2.fullmatch(f"(?:{SERVER_NAME_RE2})", name) is not None
            and re2.fullmatch(f"(?:{server_name_re2(m.match_pattern or '')})", name) is not None)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PATTERNS), st.lists(st.sampled_from(LABELS), min_size=1, max_size=5), st.booleans())
def test_envoys_regex_accepts_what_the_policy_engine_does(pattern: str, labels: list[str], dot: bool) -> None:
    name = ".".join(labels) + ("." if dot else "")
    assert envoy_allows(pattern, name) == server_name_matches(NameMatch.pattern(pattern), name), name


@pytest.mark.parametrize("pattern, name", [
    ("api.*", "api."), ("*.example.*", "evil.example."), ("*.*", "A."), ("*", "."), ("**", "foo.com"),
    ("k.example.test", "\u212a.example.test"), ("api.example.test", "api.example.teſt"),
])
def test_the_reviewers_cases_agree(pattern: str, name: str) -> None:
    assert envoy_allows(pattern, name) == server_name_matches(NameMatch.pattern(pattern), name)


# -- flows --------------------------------------------------------------------------------------


def entry(sni: str, details: str = "", upstream_failed: bool = False, state: bool = True,
          side: str = "egress") -> TCPAccessLogEntry:
    e = TCPAccessLogEntry()
    cp = e.common_properties
    cp.downstream_remote_address.socket_address.address = "10.0.0.5"
    cp.downstream_remote_address.socket_address.port_value = 40000
    cp.downstream_local_address.socket_address.address = "203.0.113.9"
    cp.downstream_local_address.socket_address.port_value = 443
    cp.start_time.seconds = 1_800_000_000
    cp.connection_termination_details = details
    cp.response_flags.upstream_connection_failure = upstream_failed
    if state:
        packed = any_pb2.Any()
        packed.Pack(StringValue(value=f"{side}:{sni}"))
        cp.filter_state_objects[TLS_STATE].CopyFrom(packed)
    return e


CTX = IngestContext(resolve=lambda ip: PeerInfo(100 if ip == "10.0.0.5" else 2), node_name="n")


def test_a_refused_server_name_is_a_dropped_egress_flow() -> None:
    (f,) = tcp_log_flows(entry("evil.test", "rbac_access_denied_matched_policy[egress-deny-l7|CiliumNetworkPolicy/web/p]"), CTX)
    assert (f.verdict, f.traffic_direction, f.drop_reason_desc) == (Verdict.DROPPED, TrafficDirection.EGRESS,
                                                                    "Policy denied (L7)")
    assert f.policy_match == ("CiliumNetworkPolicy/web/p",)
    assert f.summary == "TLS server name evil.test: Policy denied (L7)"
    assert (f.source.ip, f.destination.ip, f.destination.port) == ("10.0.0.5", "203.0.113.9", 443)


def test_the_local_destinations_refusal_is_an_ingress_flow() -> None:
    (f,) = tcp_log_flows(entry("a.test", "rbac_access_denied_matched_policy[deny-l7|CiliumNetworkPolicy/x/y]"), CTX)
    assert f.traffic_direction is TrafficDirection.INGRESS and f.verdict is Verdict.DROPPED


def test_allowed_unreachable_and_without_sni() -> None:
    (ok,) = tcp_log_flows(entry("a.example.test"), CTX)
    assert ok.verdict is Verdict.FORWARDED and "allowed by serverNames" in ok.summary
    (err,) = tcp_log_flows(entry("a.example.test", upstream_failed=True), CTX)
    assert err.verdict is Verdict.ERROR
    (none,) = tcp_log_flows(entry("", "rbac_access_denied_matched_policy[egress-deny-l7|p]"), CTX)
    assert none.summary.startswith("TLS without a server name (SNI)")


def test_an_sni_that_is_not_utf8_is_still_a_flow_shown_escaped() -> None:
    e = entry("x")
    raw = b"egress:evil\xff\n.test"
    e.common_properties.filter_state_objects[TLS_STATE].value = b"\x0a" + bytes([len(raw)]) + raw
    e.common_properties.connection_termination_details = "rbac_access_denied_matched_policy[egress-deny-l7|p]"
    (f,) = tcp_log_flows(e, CTX)
    assert f.verdict is Verdict.DROPPED
    assert "\n" not in f.summary and "\\xff" in f.summary, f.summary


def test_an_sni_of_a_dash_is_a_name() -> None:
    (f,) = tcp_log_flows(entry("-", "rbac_access_denied_matched_policy[egress-deny-l7|p]"), CTX)
    assert f.summary.startswith("TLS server name -:")


def test_a_bad_state_object_is_malformed() -> None:
    e = entry("a.test")
    packed = any_pb2.Any()
    packed.Pack(TCPAccessLogEntry())
    e.common_properties.filter_state_objects[TLS_STATE].CopyFrom(packed)
    with pytest.raises(MalformedEvent):
        tcp_log_flows(e, CTX)
