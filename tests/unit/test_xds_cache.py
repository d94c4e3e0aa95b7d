"""SnapshotCache: consistency refusal, content-hash versions, incremental updates, watchers."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import any_pb2

from l7gate.xds.cache import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    ROUTE,
    SECRET,
    WILDCARD_NODE,
    InconsistentSnapshot,
    SnapshotCache,
    SnapshotDelta,
)


def packed(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def http_listener(name: str, route_name: str, port: int = 10000, ecds: str = "") -> Any:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name, rds=hcm_pb2.Rds(route_config_name=route_name, config_source=ads())
    )
    if ecds:
        hcm.http_filters.add(
            name=ecds,
            config_discovery=config_source_pb2.ExtensionConfigSource(
                config_source=ads(), type_urls=["type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"]
            ),
        )
    hcm.http_filters.add(name="envoy.filters.http.router", typed_config=packed(router_pb2.Router()))
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=packed(hcm)
                    )
                ]
            )
        ],
    )


def tcp_listener(name: str, cluster: str) -> Any:
    tcp = tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)
    return listener_pb2.Listener(
        name=name,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=packed(tcp))]
            )
        ],
    )


def route(name: str, cluster: str | None = None, *, status: int = 0, weighted: tuple[str, ...] = ()) -> Any:
    r = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"))
    if status:
        r.direct_response.status = status
    elif weighted:
        for c in weighted:
            r.route.weighted_clusters.clusters.add(name=c, weight={"value": 1})
    else:
        r.route.cluster = cluster or ""
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[route_components_pb2.VirtualHost(name="all", domains=["*"], routes=[r])]
    )


def static_cluster(name: str, port: int = 8080) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
                                )
                            )
                        )
                    ]
                )
            ],
        ),
    )


def original_dst_cluster(name: str) -> Any:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.ORIGINAL_DST, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED
    )


def eds_cluster(name: str) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads()),
    )


def good() -> dict[str, dict[str, Any]]:
    return {
        LISTENER: {"l": http_listener("l", "r")},
        ROUTE: {"r": route("r", "c")},
        CLUSTER: {"c": static_cluster("c")},
    }


# -- consistency ---------------------------------------------------------------------------------


def test_consistent_snapshot_is_stored() -> None:
    cache = SnapshotCache()
    snap = cache.set_snapshot("n1", good())
    assert cache.get_snapshot("n1") is snap
    assert set(snap.resources[LISTENER]) == {"l"}
    assert snap.resources[SECRET] == {}


def test_listener_naming_a_missing_route_is_refused_and_named() -> None:
    cache = SnapshotCache()
    res = good()
    res[LISTENER]["l2"] = http_listener("l2", "nope", port=10001)
    with pytest.raises(InconsistentSnapshot) as err:
        cache.set_snapshot("n1", res)
    assert "'nope'" in str(err.value) and "RDS" in str(err.value) and "'l2'" in str(err.value)
    assert err.value.missing[0][1:] == (ROUTE, "nope")
    assert cache.get_snapshot("n1") is None  # nothing published


def test_route_naming_a_missing_cluster_is_refused_and_named() -> None:
    cache = SnapshotCache()
    res = good()
    res[ROUTE]["r"] = route("r", "ghost")
    with pytest.raises(InconsistentSnapshot, match=r"CDS 'ghost'"):
        cache.set_snapshot("n1", res)


def test_weighted_and_tcp_proxy_clusters_are_checked() -> None:
    cache = SnapshotCache()
    res = good()
    res[ROUTE]["r"] = route("r", weighted=("c", "w2"))
    res[LISTENER]["t"] = tcp_listener("t", "tcp-c")
    with pytest.raises(InconsistentSnapshot) as err:
        cache.set_snapshot("n1", res)
    assert {m[2] for m in err.value.missing} == {"w2", "tcp-c"}
    res[CLUSTER]["w2"] = static_cluster("w2")
    res[CLUSTER]["tcp-c"] = original_dst_cluster("tcp-c")  # ORIGINAL_DST counts as present
    cache.set_snapshot("n1", res)


def test_direct_response_routes_need_no_cluster() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n1", {LISTENER: {"l": http_listener("l", "r")}, ROUTE: {"r": route("r", status=403)}})


def test_eds_sds_ecds_references_are_checked() -> None:
    cache = SnapshotCache()
    res = good()
    res[CLUSTER]["e"] = eds_cluster("e")
    res[LISTENER]["l"] = http_listener("l", "r", ecds="policy-filter")
    tls = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[secret_pb2.SdsSecretConfig(name="svid", sds_config=ads())]
        )
    )
    res[CLUSTER]["c"].transport_socket.CopyFrom(
        base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=packed(tls))
    )
    with pytest.raises(InconsistentSnapshot) as err:
        cache.set_snapshot("n1", res)
    assert {(m[1], m[2]) for m in err.value.missing} == {
        (ENDPOINT, "e"),
        (EXTENSION_CONFIG, "policy-filter"),
        (SECRET, "svid"),
    }
    res[ENDPOINT] = {"e": endpoint_pb2.ClusterLoadAssignment(cluster_name="e")}
    res[EXTENSION_CONFIG] = {"policy-filter": extension_pb2.TypedExtensionConfig(name="policy-filter", typed_config=packed(router_pb2.Router()))}
    res[SECRET] = {"svid": secret_pb2.Secret(name="svid", tls_certificate=common_pb2.TlsCertificate())}
    cache.set_snapshot("n1", res)


def test_wrong_message_type_or_name_is_refused() -> None:
    cache = SnapshotCache()
    with pytest.raises(TypeError):
        cache.set_snapshot("n1", {ROUTE: {"c": static_cluster("c")}})
    with pytest.raises(ValueError, match="named 'c'"):
        cache.set_snapshot("n1", {CLUSTER: {"other": static_cluster("c")}})
    with pytest.raises(ValueError, match="unknown type"):
        cache.set_snapshot("n1", {"type.googleapis.com/foo.Bar": {}})


# -- versions ------------------------------------------------------------------------------------


def test_versions_are_content_hashes() -> None:
    a = SnapshotCache().set_snapshot("n1", good())
    b = SnapshotCache().set_snapshot("other-node", good())
    assert dict(a.versions) == dict(b.versions)  # reproducible: same content, same versions
    assert a.resources[ROUTE]["r"].version == b.resources[ROUTE]["r"].version
    changed = good()
    changed[ROUTE]["r"] = route("r", status=403)
    c = SnapshotCache().set_snapshot("n1", changed)
    assert c.versions[ROUTE] != a.versions[ROUTE]
    assert c.resources[ROUTE]["r"].version != a.resources[ROUTE]["r"].version
    assert c.versions[LISTENER] == a.versions[LISTENER]  # untouched types keep their version
    assert c.versions[CLUSTER] == a.versions[CLUSTER]
    assert c.versions[SECRET] == a.versions[ENDPOINT]  # both empty


def test_packed_bytes_are_what_the_version_hashes() -> None:
    snap = SnapshotCache().set_snapshot("n1", good())
    res = snap.resources[ROUTE]["r"]
    assert res.packed.type_url == ROUTE
    assert route_pb2.RouteConfiguration.FromString(res.packed.value) == route("r", "c")


# -- incremental update --------------------------------------------------------------------------


def test_update_changes_one_type_only() -> None:
    cache = SnapshotCache()
    before = cache.set_snapshot("n1", good())
    version = cache.update("n1", ROUTE, {"r": route("r", status=403)})
    after = cache.get_snapshot("n1")
    assert after is not None
    assert version == after.versions[ROUTE] != before.versions[ROUTE]
    assert after.resources[CLUSTER] is before.resources[CLUSTER]  # shared, not rebuilt
    assert after.versions[LISTENER] == before.versions[LISTENER]
    # The same content again is the same version, and nobody is woken for it.
    woken: list[frozenset[str]] = []
    cache.watch(woken.append)
    assert cache.update("n1", ROUTE, {"r": route("r", status=403)}) == version
    assert woken == []


def test_update_is_checked_and_refused_atomically() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n1", good())
    with pytest.raises(InconsistentSnapshot, match="CDS 'c'"):
        cache.update("n1", CLUSTER, {}, removed=["c"])  # route r still needs it
    with pytest.raises(InconsistentSnapshot, match="RDS 'r2'"):
        cache.update("n1", LISTENER, {"l2": http_listener("l2", "r2", 10001)})
    snap = cache.get_snapshot("n1")
    assert snap is not None and set(snap.resources[CLUSTER]) == {"c"} and set(snap.resources[LISTENER]) == {"l"}
    # Make before break: add, repoint, then remove.
    cache.update("n1", CLUSTER, {"c2": static_cluster("c2", 9090)})
    cache.update("n1", ROUTE, {"r": route("r", "c2")})
    cache.update("n1", CLUSTER, {}, removed=["c", "not-there"])
    snap = cache.get_snapshot("n1")
    assert snap is not None and set(snap.resources[CLUSTER]) == {"c2"}


def test_a_delta_of_every_type_lands_as_one_snapshot() -> None:
    """A producer's flush (new listener, route and cluster; the old ones gone) is one change:
    no order of types to keep, one consistency check, one notification."""
    cache = SnapshotCache()
    cache.set_snapshot("n1", good())
    heard: list[frozenset[str]] = []
    cache.watch(heard.append)
    delta = SnapshotDelta()
    delta.put(LISTENER, {"l2": http_listener("l2", "r2", 10001)})
    delta.put(ROUTE, {"r2": route("r2", "c2")})
    delta.put(CLUSTER, {"c2": static_cluster("c2", 9090)})
    delta.remove(LISTENER, ["l"])
    delta.remove(ROUTE, ["r"])
    delta.remove(CLUSTER, ["c", "not-there"])
    snap = cache.apply("n1", delta)
    assert cache.get_snapshot("n1") is snap and heard == [frozenset({"n1"})]
    assert {t: set(snap.resources[t]) for t in (LISTENER, ROUTE, CLUSTER)} == {
        LISTENER: {"l2"}, ROUTE: {"r2"}, CLUSTER: {"c2"}}
    # The same change again changes nothing and wakes nobody.
    assert cache.apply("n1", delta).versions == snap.versions and heard == [frozenset({"n1"})]


def test_an_inconsistent_delta_changes_no_type() -> None:
    cache = SnapshotCache()
    before = cache.set_snapshot("n1", good())
    delta = SnapshotDelta()
    delta.put(CLUSTER, {"c2": static_cluster("c2", 9090)})
    delta.put(LISTENER, {"l2": http_listener("l2", "r2", 10001)})  # r2 is nowhere
    with pytest.raises(InconsistentSnapshot, match="RDS 'r2'"):
        cache.apply("n1", delta)
    assert cache.get_snapshot("n1") is before
    with pytest.raises(ValueError, match="unknown type URLs"):
        cache.apply("n1", SnapshotDelta({"type.googleapis.com/nope": {}}))


def test_update_of_unknown_node_starts_empty() -> None:
    cache = SnapshotCache()
    cache.update("fresh", CLUSTER, {"c": static_cluster("c")})
    snap = cache.get_snapshot("fresh")
    assert snap is not None and set(snap.resources[CLUSTER]) == {"c"}


# -- wildcard node, watchers, threads ------------------------------------------------------------


def test_wildcard_snapshot_serves_nodes_without_their_own() -> None:
    cache = SnapshotCache()
    assert cache.snapshot_for("a") is None
    shared = cache.set_snapshot(WILDCARD_NODE, good())
    own = cache.set_snapshot("b", {CLUSTER: {"c": static_cluster("c")}})
    assert cache.snapshot_for("a") is shared
    assert cache.snapshot_for("b") is own
    assert cache.get_snapshot("a") is None
    cache.clear_snapshot("b")
    assert cache.snapshot_for("b") is shared


def test_watchers_hear_which_node_changed_and_can_unsubscribe() -> None:
    cache = SnapshotCache()
    heard: list[frozenset[str]] = []
    cancel = cache.watch(heard.append)
    cache.set_snapshot("n1", good())
    cache.update("n2", CLUSTER, {"c": static_cluster("c")})
    cancel()
    cache.set_snapshot("n3", good())
    assert heard == [frozenset({"n1"}), frozenset({"n2"})]


def test_concurrent_updates_of_one_node_lose_nothing() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n1", {})

    def writer(k: int) -> None:
        for i in range(50):
            cache.update("n1", CLUSTER, {f"c{k}-{i}": static_cluster(f"c{k}-{i}")})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = cache.get_snapshot("n1")
    assert snap is not None and len(snap.resources[CLUSTER]) == 200
