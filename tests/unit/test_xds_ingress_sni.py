"""Ingress `serverNames`: a proxied port whose ingress policy has them gets a TLS chain in its
listener (xds/publisher.py, resources.tls_filter_chain), whose network RBAC decides each source
address by the SNI; the listener is re-sent when that chain changes, and only then."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from xds.type.matcher.v3 import ip_pb2

from l7gate.identity.ipcache import IPCacheChange
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.xds import resources
from l7gate.xds.cache import LISTENER, SnapshotCache, SnapshotDelta
from l7gate.xds.publisher import Publisher

NODE, API, API_IP, PORT = "n", 1001, "10.9.1.10", 8443


class Sink:
    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.listeners: list[str] = []

    def apply(self, node_id: str, delta: SnapshotDelta) -> object:
        self.listeners.extend(delta.upserted.get(LISTENER, {}))
        return self.cache.apply(node_id, delta)


def policy(*port_rules: dict[str, Any]) -> Any:
    return parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                         "metadata": {"name": "api-in", "namespace": "web"},
                         "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                               "toPorts": list(port_rules)}]}})


SNI = {"ports": [{"port": str(PORT), "protocol": "TCP"}], "serverNames": ["api.example.test"]}


class World:
    def __init__(self, *port_rules: dict[str, Any]) -> None:
        self.r = Resolver()
        self.sink = Sink()
        self.pub = Publisher(self.sink, NODE, self.r.endpoint_policy, auth_verified=True)
        self.rev = 0
        self.r.update_identities({API: Labels.of({"app": "api", "io.kubernetes.pod.namespace": "web"})})
        self.pub.on_policy_delta(self.r.add_endpoint(API))
        self.pub.on_policy_delta(self.r.upsert_policy(policy(*port_rules)))
        self.set_ip(f"{API_IP}/32", API)
        self.pub.set_ports([resources.ProxiedPort(API, API_IP, PORT, API_IP, PORT, transparent=True)])
        self.pub.flush()

    def set_ip(self, prefix: str, ident: int) -> None:
        self.rev += 1
        self.pub.on_ipcache_change(IPCacheChange(ipaddress.ip_network(prefix), None, ident, self.rev))

    def add_pod(self, ident: int, ip: str, app: str) -> None:
        self.pub.on_policy_delta(self.r.update_identities(
            {ident: Labels.of({"app": app, "io.kubernetes.pod.namespace": "web"})}))
        self.set_ip(f"{ip}/32", ident)

    def listener(self) -> Any:
        snap = self.sink.cache.get_snapshot(NODE)
        assert snap is not None
        return snap.messages(LISTENER)[resources.listener_name(API_IP, PORT)]


def test_the_port_gets_a_tls_chain_to_the_pod() -> None:
    w = World(SNI)
    # no source the rule names exists yet: no map entry has server names, no chain
    assert len(w.listener().filter_chains) == 1
    w.add_pod(2001, "10.9.2.5", "client")
    w.pub.flush()
    lis = w.listener()
    assert [c.name for c in lis.filter_chains] == ["", f"tls-{PORT}"]
    assert [f.name for f in lis.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    tls = lis.filter_chains[1]
    assert tls.filter_chain_match.transport_protocol == "tls"
    proxy = tcp_proxy_pb2.TcpProxy()
    tls.filters[-1].typed_config.Unpack(proxy)
    assert proxy.cluster == resources.cluster_name(API_IP, PORT)
    assert proxy.upstream_connect_mode == tcp_proxy_pb2.ON_DOWNSTREAM_DATA


def test_a_source_the_rule_names_is_judged_by_sni_others_denied() -> None:
    w = World(SNI)
    w.add_pod(2001, "10.9.2.5", "client")
    w.add_pod(2002, "10.9.2.6", "other")
    w.pub.flush()
    rbac_cfg = network_rbac_pb2.RBAC()
    w.listener().filter_chains[1].filters[0].typed_config.Unpack(rbac_cfg)
    ipm = ip_pb2.IPMatcher()
    rbac_cfg.matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    by_range = {r.ranges[0].address_prefix: r.on_match for r in ipm.range_matchers}
    client = by_range["10.9.2.5"]
    assert client.HasField("matcher")  # a nested SNI matcher: a well-formed name AND a pattern
    preds = client.matcher.matcher_list.matchers[0].predicate.and_matcher.predicate
    regex = preds[1].single_predicate.value_match.safe_regex.regex
    assert re.fullmatch(regex, "api.example.test") and not re.fullmatch(regex, "evil.test")
    assert "deny-l3l4" in str(rbac_cfg.matcher.on_no_match)  # world and `other`: default deny


def test_the_listener_is_re_sent_only_when_the_chain_changes() -> None:
    w = World(SNI)
    w.add_pod(2001, "10.9.2.5", "client")
    w.pub.flush()
    w.sink.listeners.clear()
    w.add_pod(2002, "10.9.2.6", "other")  # default deny, like world: the chain does not change
    w.pub.flush()
    assert w.sink.listeners == []
    w.add_pod(2003, "10.9.2.7", "client")  # a new allowed source: the chain changes
    w.pub.flush()
    assert w.sink.listeners == [resources.listener_name(API_IP, PORT)]


def test_http_rules_alone_keep_the_plain_listener() -> None:
    w = World({"ports": [{"port": str(PORT), "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}})
    lis = w.listener()
    assert len(lis.filter_chains) == 1 and not lis.listener_filters


def test_an_address_moving_between_identities_re_renders_the_chain() -> None:
    """An ipcache change the HTTP slots do not see (both identities' plain-text leaves are
    deny-l7) must still reach the TLS chain: the address's old SNI allow goes with it."""
    w = World({"ports": [{"port": str(PORT), "protocol": "TCP"}], "serverNames": ["secret.test"]})
    # one policy (the same policy names on every leaf): the plain-text leaves of `client` and
    # `other` are alike (deny-l7|api-in), so the HTTP slots see no change when the address moves
    w.pub.on_policy_delta(w.r.upsert_policy(parse_policy({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "api-in", "namespace": "web"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                 "ingress": [{"fromEntities": ["all"], "toPorts": [
                     {"ports": [{"port": str(PORT), "protocol": "TCP"}], "serverNames": ["public.test"]}]},
                             {"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": [
                     {"ports": [{"port": str(PORT), "protocol": "TCP"}], "serverNames": ["secret.test"]}]}]}})))
    w.add_pod(2001, "10.9.2.5", "client")
    w.pub.on_policy_delta(w.r.update_identities({2002: Labels.of({"app": "other", "io.kubernetes.pod.namespace": "web"})}))
    w.pub.flush()
    assert _allows(w, "10.9.2.5", "secret.test") and _allows(w, "10.9.2.5", "public.test")
    w.rev += 1
    w.pub.on_ipcache_change(IPCacheChange(ipaddress.ip_network("10.9.2.5/32"), 2001, 2002, w.rev))
    w.pub.flush()
    assert not _allows(w, "10.9.2.5", "secret.test") and _allows(w, "10.9.2.5", "public.test")


def _leaf(w: World, addr: str) -> Any:
    cfg = network_rbac_pb2.RBAC()
    w.listener().filter_chains[1].filters[0].typed_config.Unpack(cfg)
    ipm = ip_pb2.IPMatcher()
    cfg.matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    a = ipaddress.ip_address(addr)
    for rm in ipm.range_matchers:
        if any(a in ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}") for r in rm.ranges):
            return rm.on_match
    return cfg.matcher.on_no_match


def _allows(w: World, addr: str, name: str) -> bool:
    leaf = _leaf(w, addr)
    if leaf.HasField("action"):
        return "allow|" in str(leaf.action)
    preds = leaf.matcher.matcher_list.matchers[0].predicate.and_matcher.predicate
    return all(re.fullmatch(p.single_predicate.value_match.safe_regex.regex, name) for p in preds)


def test_the_ports_with_server_names_follow_every_change_as_a_full_scan_would() -> None:
    """The publisher keeps each endpoint's `serverNames` entries from the policy deltas (a scan
    of a 10,000-peer map per change cost 5 ms): after any sequence of peers and policies coming
    and going, they are what a scan of the map gives, and the listener has a TLS chain exactly
    when the port is among them."""
    import random

    from l7gate.policy.parse import MAX_L7_RANGE
    from l7gate.xds import rbac

    http = {"ports": [{"port": str(PORT), "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}
    ranged = {"ports": [{"port": "8400", "endPort": 8500, "protocol": "TCP"}], "serverNames": ["r.example.test"]}
    other = {"ports": [{"port": "9443", "protocol": "TCP"}], "serverNames": ["o.example.test"]}
    variants = [(SNI,), (http,), (other,), (ranged,), (SNI, other), (http, ranged)]
    rng = random.Random(11)
    w = World(http)
    next_ident = 2001
    for step in range(120):
        op = rng.random()
        if op < 0.45:
            w.add_pod(next_ident, f"10.9.{2 + next_ident // 200}.{next_ident % 200 + 1}",
                      rng.choice(["client", "client", "other"]))
            next_ident += 1
        elif op < 0.85:
            w.pub.on_policy_delta(w.r.upsert_policy(policy(*rng.choice(variants))))
        else:
            w.pub.on_policy_delta(w.r.delete_policy("CiliumNetworkPolicy/web/api-in"))
        w.pub.flush()
        pol = w.r.endpoint_policy(API)
        assert pol is not None
        want = rbac.sni_ports(pol.ingress, MAX_L7_RANGE)
        kept = w.pub._sni_entries.get(API)
        if kept is not None:
            got = {p for lo, hi in kept.values() for p in range(lo, hi + 1)}
            assert got == want, step
        chains = [c.name for c in w.listener().filter_chains]
        assert (f"tls-{PORT}" in chains) == (PORT in want), (step, chains, want)
