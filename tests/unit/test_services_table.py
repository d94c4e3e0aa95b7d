"""The service table: which backends each ClusterIP:port balances over, as Kubernetes and Cilium
decide, kept incrementally; checked against a from-scratch recomputation on random histories."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.services import (
    Backend, BackendPod, EndpointSlice, Frontend, FrontendEntry, Service, ServicePort, ServiceTable, SliceEndpoint,
    SlicePort,
)
from tests.unit.test_layers import _plant, contract, package_copy_factory, run_lint_imports  # noqa: F401

CIP = "10.96.0.10"


def service(
    name: str = "web", namespace: str = "shop", *, cluster: str = "a", ip: str | None = CIP,
    ports: tuple[ServicePort, ...] = (ServicePort("http", 80, "TCP", 8080),),
    selector: Mapping[str, str] | None = None, **kw: Any,
) -> Service:
    return Service(cluster, namespace, name, ip, ports, {"app": name} if selector is None else selector, **kw)


def pod(
    name: str, ip: str, *, namespace: str = "shop", cluster: str = "a", app: str = "web", ready: bool = True,
    named: tuple[tuple[str, int, str], ...] = (), **labels: str,
) -> BackendPod:
    return BackendPod(f"{cluster}/{namespace}/{name}", cluster, namespace, ip, {"app": app, **labels}, ready, named)


def backends(table: ServiceTable, ip: str = CIP, port: int = 80, protocol: str = "TCP") -> list[tuple[str, int]]:
    return [(b.ip, b.port) for b in table.frontends()[Frontend(ip, port, protocol)].backends]


def remote(cluster: str, *addrs: str, port: int = 8080) -> tuple[Backend, ...]:
    return tuple(Backend(a, port, f"{cluster}/shop/{a}", cluster) for a in addrs)


# -- one cluster --------------------------------------------------------------------------------


def test_a_service_balances_over_its_ready_pods() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_pod(pod("w2", "10.0.0.12"))
    t.upsert_pod(pod("w1", "10.0.0.9"))
    t.upsert_pod(pod("w3", "10.0.0.13", ready=False))
    t.upsert_pod(pod("db", "10.0.0.20", app="db"))
    assert t.frontends() == {
        Frontend(CIP, 80, "TCP"): FrontendEntry("shop/web", "http", (
            Backend("10.0.0.9", 8080, "a/shop/w1", "a"), Backend("10.0.0.12", 8080, "a/shop/w2", "a"),
        )),
    }
    t.upsert_pod(pod("w3", "10.0.0.13", ready=True))
    assert backends(t) == [("10.0.0.9", 8080), ("10.0.0.12", 8080), ("10.0.0.13", 8080)]
    t.upsert_pod(pod("w1", "10.0.0.9", ready=False))
    assert backends(t) == [("10.0.0.12", 8080), ("10.0.0.13", 8080)]


def test_named_target_ports_are_looked_up_per_pod_with_the_ports_protocol() -> None:
    t = ServiceTable()
    t.upsert_service(service(ports=(ServicePort("http", 80, "TCP", "web"), ServicePort("dns", 53, "UDP", "dns"),
                                    ServicePort("admin", 9000, "TCP", 9901))))
    t.upsert_pod(pod("old", "10.0.0.1", named=(("web", 8080, "TCP"),)))
    t.upsert_pod(pod("new", "10.0.0.2", named=(("dns", 5353, "TCP"), ("web", 8443, "TCP"), ("web", 9443, "TCP"))))
    t.upsert_pod(pod("udp", "10.0.0.3", named=(("dns", 5353, "UDP"),)))
    assert backends(t) == [("10.0.0.1", 8080), ("10.0.0.2", 8443)]  # the first "web" wins
    assert backends(t, port=53, protocol="UDP") == [("10.0.0.3", 5353)]  # "dns" over TCP is not it
    assert backends(t, port=9000) == [("10.0.0.1", 9901), ("10.0.0.2", 9901), ("10.0.0.3", 9901)]


def test_a_selector_change_moves_the_backends() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_pod(pod("w1", "10.0.0.1", tier="blue"))
    t.upsert_pod(pod("w2", "10.0.0.2", tier="green"))
    assert len(backends(t)) == 2
    t.upsert_service(service(selector={"app": "web", "tier": "green"}))
    assert backends(t) == [("10.0.0.2", 8080)]
    t.upsert_pod(pod("w1", "10.0.0.1", tier="green"))  # relabelled into the selector
    assert backends(t) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    t.upsert_pod(pod("w2", "10.0.0.2", tier="blue"))  # and out of it
    assert backends(t) == [("10.0.0.1", 8080)]


def test_a_service_selects_only_its_own_namespace_and_cluster() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_pod(pod("w1", "10.0.0.1"))
    t.upsert_pod(pod("w2", "10.0.0.2", namespace="other"))
    t.upsert_pod(pod("w3", "10.0.0.3", cluster="b"))
    assert backends(t) == [("10.0.0.1", 8080)]


def test_no_selector_gives_no_backends_and_no_address_gives_no_frontend() -> None:
    t = ServiceTable()
    t.upsert_pod(pod("w1", "10.0.0.1"))
    t.upsert_service(service(selector={}))  # `{}` is no selector in Kubernetes: nothing managed
    assert t.frontends() == {Frontend(CIP, 80, "TCP"): FrontendEntry("shop/web", "http", ())}
    t.upsert_service(service(ip=None))  # headless, or not allocated
    assert t.frontends() == {}
    assert [s.ref for s in t.services()] == ["shop/web"]


def es(name: str = "ext-1", *addrs: str, service: str | None = "ext", ready: bool = True,
       ports: tuple[SlicePort, ...] = (SlicePort("http", 8443, "TCP"),), **kw: Any) -> EndpointSlice:
    return EndpointSlice(kw.pop("cluster", "a"), kw.pop("namespace", "shop"), name, service, kw.pop("type", "IPv4"),
                         (SliceEndpoint(addrs, ready, kw.pop("serving", ready)),), ports)


def test_a_service_without_a_selector_balances_over_its_endpoint_slices() -> None:
    t = ServiceTable()
    t.upsert_service(service("ext", selector={}))
    t.upsert_slice(es("ext-1", "192.0.2.10"))
    t.upsert_slice(es("ext-2", "192.0.2.11", "192.0.2.12"))
    t.upsert_slice(es("ext-3", "192.0.2.13", ready=False, serving=True))  # terminating, still serving
    t.upsert_slice(es("other", "192.0.2.14", service="web"))
    t.upsert_slice(es("v6", "2001:db8::1", type="IPv6"))
    t.upsert_slice(es("udp", "192.0.2.15", ports=(SlicePort("http", 8443, "UDP"),)))
    assert backends(t) == [("192.0.2.10", 8443), ("192.0.2.11", 8443), ("192.0.2.12", 8443)]
    assert t.frontends()[Frontend(CIP, 80, "TCP")].backends[0].pod == "EndpointSlice/shop/ext-1"
    # what toServices reads: every ready or serving address, whatever its port or family
    assert t.endpoint_addresses("shop", "ext") == (
        "192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.15", "2001:db8::1")
    t.upsert_slice(es("ext-2", "192.0.2.11"))
    t.delete_slice("shop", "ext-1")
    assert backends(t) == [("192.0.2.11", 8443)]
    # a slice that moves to another Service leaves this one
    t.upsert_slice(es("ext-2", "192.0.2.11", service="web"))
    assert backends(t) == []
    assert "192.0.2.11" not in t.endpoint_addresses("shop", "ext")


def test_a_service_with_a_selector_ignores_slices() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_pod(pod("w1", "10.0.0.9"))
    t.upsert_slice(es("web-1", "192.0.2.10", service="web"))
    assert backends(t) == [("10.0.0.9", 8080)]
    # the same Service without its selector: the slices instead of the pods
    t.upsert_service(service(selector={}))
    assert backends(t) == [("192.0.2.10", 8443)]


def test_deleting_a_service_or_a_pod() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_service(service("api", ip="10.96.0.11"))
    t.upsert_pod(pod("w1", "10.0.0.1"))
    t.upsert_pod(pod("w2", "10.0.0.2"))
    assert backends(t) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    t.delete_pod("a/shop/w1")
    assert backends(t) == [("10.0.0.2", 8080)]
    t.delete_service("shop", "web")
    assert list(t.frontends()) == [Frontend("10.96.0.11", 80, "TCP")]
    t.delete_service("shop", "web")  # again: nothing happens
    t.delete_pod("a/shop/w1")
    assert [s.ref for s in t.services()] == ["shop/api"]


def test_an_address_is_one_backend() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_pod(pod("w2", "10.0.0.1"))  # two pods claiming one address (a stale one, say)
    t.upsert_pod(pod("w1", "10.0.0.1"))
    assert [b.pod for b in t.frontends()[Frontend(CIP, 80, "TCP")].backends] == ["a/shop/w1"]


def test_services_of_a_backend() -> None:
    t = ServiceTable()
    t.upsert_service(service())
    t.upsert_service(service("web-canary", ip="10.96.0.11", selector={"app": "web"}))
    t.upsert_pod(pod("w1", "10.0.0.1"))
    assert t.services_of_backend("10.0.0.1", 8080) == ("shop/web", "shop/web-canary")
    assert t.services_of_backend("10.0.0.1", 80) == ()
    t.delete_service("shop", "web")
    assert t.services_of_backend("10.0.0.1", 8080) == ("shop/web-canary",)


def test_two_services_on_one_frontend_the_first_owns_it() -> None:
    t = ServiceTable()
    t.upsert_service(service("web"))
    t.upsert_service(service("api", selector={"app": "web"}))
    fe = Frontend(CIP, 80, "TCP")
    assert t.frontends()[fe].service == "shop/api"
    assert t.frontend_conflicts() == {fe: ("shop/api", "shop/web")}
    t.delete_service("shop", "api")
    assert t.frontends()[fe].service == "shop/web" and t.frontend_conflicts() == {}


def test_a_pod_change_recomputes_only_the_services_it_can_touch() -> None:
    t = ServiceTable()
    for n in range(100):
        for s in range(100):
            t.upsert_service(service(f"s{s}", f"ns{n}", ip=f"10.96.{n}.{s}"))
    t.upsert_pod(pod("p", "10.0.0.1", namespace="ns7", app="s3"))
    assert len(t.frontends()) == 10_000
    before = t.recomputed
    t.upsert_pod(pod("p", "10.0.0.1", namespace="ns7", app="s4"))  # leaves s3, joins s4
    t.upsert_pod(pod("q", "10.0.0.2", namespace="ns8", app="none-of-them"))
    t.delete_pod("nobody")
    assert backends(t, "10.96.7.4") == [("10.0.0.1", 8080)] and backends(t, "10.96.7.3") == []
    assert t.recomputed - before == 2
    before = t.recomputed
    t.upsert_service(service("s5", "ns7", ip="10.96.7.5", selector={"app": "s4"}))
    t.frontends()
    assert t.recomputed - before == 1


# -- global services ------------------------------------------------------------------------------


def global_table(**kw: Any) -> ServiceTable:
    t = ServiceTable()
    t.upsert_service(service(global_=True, **kw))
    t.upsert_pod(pod("w1", "10.0.0.1"))
    t.set_remote_backends("b", {"shop/web": {(80, "TCP"): remote("b", "10.1.0.1", "10.1.0.2")}})
    return t


def test_a_global_service_balances_over_every_cluster() -> None:
    t = global_table()
    assert [(b.ip, b.cluster) for b in t.frontends()[Frontend(CIP, 80, "TCP")].backends] == [
        ("10.0.0.1", "a"), ("10.1.0.1", "b"), ("10.1.0.2", "b"),
    ]
    # another port or protocol of the remote Service is not this one's
    t.set_remote_backends("b", {"shop/web": {(81, "TCP"): remote("b", "10.1.0.1"),
                                             (80, "UDP"): remote("b", "10.1.0.2")}})
    assert backends(t) == [("10.0.0.1", 8080)]


def test_remote_backends_need_the_local_service_to_be_global() -> None:
    t = global_table()
    t.upsert_service(service())  # the same Service, not global here
    assert backends(t) == [("10.0.0.1", 8080)]
    assert t.not_global_locally() == ["shop/web"] and t.missing_locally() == []


def test_not_shared_still_uses_remote_backends_here() -> None:
    """`shared: "false"` keeps this cluster's backends from the others (the publisher reads it);
    here the Service still balances over its own and the remote ones."""
    t = global_table(shared=False)
    assert len(backends(t)) == 3


@pytest.mark.parametrize("affinity, local_ready, expected", [
    ("local", True, ["a"]),
    ("local", False, ["b", "b"]),  # no local backend ready: the remote ones
    ("remote", True, ["b", "b"]),
    ("none", True, ["a", "b", "b"]),
])
def test_affinity(affinity: str, local_ready: bool, expected: list[str]) -> None:
    t = global_table(affinity=affinity)
    t.upsert_pod(pod("w1", "10.0.0.1", ready=local_ready))
    assert [b.cluster for b in t.frontends()[Frontend(CIP, 80, "TCP")].backends] == expected


def test_remote_affinity_falls_back_to_local_backends() -> None:
    t = global_table(affinity="remote")
    t.set_remote_backends("b", {"shop/web": {(80, "TCP"): ()}})
    assert [b.cluster for b in t.frontends()[Frontend(CIP, 80, "TCP")].backends] == ["a"]


def test_affinity_is_ignored_unless_global() -> None:
    t = global_table(affinity="remote")
    t.upsert_service(service(affinity="remote"))
    assert backends(t) == [("10.0.0.1", 8080)]


def test_a_cluster_that_publishes_nothing_is_forgotten() -> None:
    t = global_table()
    t.set_remote_backends("c", {"shop/web": {(80, "TCP"): remote("c", "10.2.0.1")}})
    assert len(backends(t)) == 4
    t.set_remote_backends("b", {})
    assert backends(t) == [("10.0.0.1", 8080), ("10.2.0.1", 8080)]


def test_remote_global_services_missing_here_are_named() -> None:
    t = global_table()
    t.set_remote_backends("c", {"shop/cart": {}, "shop/web": {}})
    assert t.missing_locally() == ["shop/cart"]
    t.upsert_service(service("cart", ip="10.96.0.12", global_=True))
    assert t.missing_locally() == []


def test_a_remote_backend_naming_another_cluster_is_refused_whole() -> None:
    t = global_table()
    with pytest.raises(ValueError, match="names cluster 'c'"):
        t.set_remote_backends("b", {"shop/web": {(80, "TCP"): remote("b", "10.1.0.9") + remote("c", "10.2.0.1")}})
    assert len(backends(t)) == 3


def test_values_reject_what_the_table_cannot_mean() -> None:
    with pytest.raises(ValueError, match="affinity"):
        service(affinity="nearest")
    with pytest.raises(ValueError, match="protocol"):
        ServicePort("x", 80, "ICMP", 80)


# -- the new import contract is real ------------------------------------------------------------


@pytest.mark.parametrize(("code", "expected"), [
    ("import socket\n", ("forbidden", "l7gate.services")),
    ("import threading\n", ("forbidden", "l7gate.services")),
    ("from l7gate.kvstore import x\n", ("forbidden", "l7gate.services")),
    ("import l7gate.identity\n", ("layers", None)),  # a sibling on its floor
    ("import l7gate.k8s\n", ("layers", None)),
])
def test_planted_import_in_the_service_table_breaks_its_contract(
    package_copy_factory: Callable[[], Path], code: str, expected: tuple[str, str | None],  # noqa: F811
) -> None:
    root = package_copy_factory()
    _plant(root, "l7gate.services._plant", code)
    rc, output, statuses = run_lint_imports(root)
    assert rc != 0 and statuses.get(contract(*expected)["name"]) == "BROKEN", output


# -- the property: incremental == from scratch ----------------------------------------------------

# Small, skewed vocabularies, so that generated selectors pick generated pods: most pods and
# Services are in one cluster and ready, most Services have an address and a selector.
NAMESPACES = ("a", "a", "a", "b")
LOCAL_CLUSTERS = ("c1", "c1", "c1", "c2")
REMOTE_CLUSTERS = ("r1", "r2")
IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.10", "10.0.0.3")  # few, so that pods share addresses
CLUSTER_IPS = ("10.96.0.1", "10.96.0.2", "10.96.0.3", None)  # few, so that Services share frontends
PORT_NAMES = ("http", "grpc")


def reference(
    services: Mapping[str, Service], pods: Mapping[str, BackendPod],
    remotes: Mapping[str, Mapping[str, Mapping[tuple[int, str], tuple[Backend, ...]]]],
    slices: Mapping[str, EndpointSlice] | None = None,
) -> tuple[dict[Frontend, FrontendEntry], dict[tuple[str, int], set[str]]]:
    """The desired state from scratch, the obvious way: (frontends, services by backend)."""

    def order(b: Backend) -> tuple[Any, ...]:
        return (ipaddress.ip_address(b.ip), b.port, b.cluster, b.pod)

    claims: dict[Frontend, dict[str, FrontendEntry]] = {}
    by_backend: dict[tuple[str, int], set[str]] = {}
    for key, s in services.items():
        if s.cluster_ip is None:
            continue
        mine: dict[Frontend, FrontendEntry] = {}
        for sp in s.ports:
            fe = Frontend(s.cluster_ip, sp.port, sp.protocol)
            if fe in mine:
                continue
            local = []
            for p in pods.values():
                if (p.cluster, p.namespace) != (s.cluster, s.namespace) or not p.ready or not s.selector:
                    continue
                if any(p.labels.get(k) != v for k, v in s.selector.items()):
                    continue
                if isinstance(sp.target, int):
                    number: int | None = sp.target
                else:
                    number = next((n for name, n, proto in p.named_ports
                                   if name == sp.target and proto == sp.protocol), None)
                if number is not None:
                    local.append(Backend(p.ip, number, p.ref, p.cluster))
            for es in (slices or {}).values():
                # a Service without a selector: its slices' ready IPv4 endpoints, on the port of
                # the service port's name and protocol
                if s.selector or (es.cluster, es.namespace, es.service) != (s.cluster, s.namespace, s.name):
                    continue
                if es.address_type != "IPv4":
                    continue
                for port in es.ports:
                    if (port.name, port.protocol) == (sp.name, sp.protocol):
                        local.extend(Backend(a, port.port, f"EndpointSlice/{es.ref}", es.cluster)
                                     for e in es.endpoints if e.ready for a in e.addresses)
            far = [b for published in remotes.values() if s.global_
                   for b in published.get(key, {}).get((sp.port, sp.protocol), ())]
            if s.global_ and s.affinity == "local" and local:
                far = []
            if s.global_ and s.affinity == "remote" and far:
                local = []
            chosen: dict[tuple[str, int], Backend] = {}
            for group in (local, far):
                for b in sorted(group, key=order):
                    chosen.setdefault((b.ip, b.port), b)
            mine[fe] = FrontendEntry(key, sp.name, tuple(sorted(chosen.values(), key=order)))
            for addr in chosen:
                by_backend.setdefault(addr, set()).add(key)
        for fe, entry in mine.items():
            claims.setdefault(fe, {})[key] = entry
    return {fe: by_key[min(by_key)] for fe, by_key in claims.items()}, by_backend


labels = st.sampled_from([{"app": "x"}, {"app": "x", "tier": "y"}, {"app": "y"}, {"tier": "y"}, {}])
selectors = st.sampled_from([{"app": "x"}, {"app": "x", "tier": "y"}, {"app": "y"}, {}, None])
ready = st.sampled_from([True, True, True, False])
service_ports = st.lists(
    st.builds(ServicePort, st.sampled_from(["", "p", "q"]), st.sampled_from([80, 81]),
              st.sampled_from(["TCP", "TCP", "UDP"]), st.sampled_from([8080, "http", 9090, "grpc"])),
    min_size=1, max_size=3,
).map(tuple)
services = st.builds(
    Service, st.sampled_from(LOCAL_CLUSTERS), st.sampled_from(NAMESPACES), st.sampled_from(["s1", "s2", "s3"]),
    st.sampled_from(CLUSTER_IPS), service_ports, selectors, st.booleans(), st.booleans(),
    st.sampled_from(["none", "local", "remote"]),
)
named_ports = st.lists(
    st.sampled_from([("http", 8080, "TCP"), ("http", 8443, "TCP"), ("grpc", 9090, "TCP"), ("http", 8080, "UDP"),
                     ("grpc", 9090, "UDP")]),
    max_size=3,
).map(tuple)
backend_pods = st.builds(
    BackendPod, st.sampled_from(["p1", "p2", "p3", "p4", "p5"]), st.sampled_from(LOCAL_CLUSTERS),
    st.sampled_from(NAMESPACES), st.sampled_from(IPS), labels, ready, named_ports,
)


@st.composite
def remote_publication(draw: st.DrawFn) -> tuple[str, dict[str, dict[tuple[int, str], tuple[Backend, ...]]]]:
    cluster = draw(st.sampled_from(REMOTE_CLUSTERS))
    backend = st.builds(Backend, st.sampled_from(IPS), st.sampled_from([8080, 9090]),
                        st.sampled_from(["rp1", "rp2"]).map(lambda p: f"{cluster}/{p}"), st.just(cluster))
    published = draw(st.dictionaries(
        st.sampled_from([f"{ns}/{n}" for ns in NAMESPACES for n in ("s1", "s2", "s3", "s9")]),
        st.dictionaries(st.tuples(st.sampled_from([80, 81]), st.sampled_from(["TCP", "UDP"])),
                        st.lists(backend, max_size=3).map(tuple), max_size=2),
        max_size=3,
    ))
    return cluster, published


slice_endpoints = st.builds(SliceEndpoint, st.lists(st.sampled_from(IPS), min_size=1, max_size=2).map(tuple),
                            ready, st.booleans())
endpoint_slices = st.builds(
    EndpointSlice, st.sampled_from(LOCAL_CLUSTERS), st.sampled_from(NAMESPACES),
    st.sampled_from(["e1", "e2", "e3"]), st.sampled_from(["s1", "s1", "s2", "s3", None]),
    st.sampled_from(["IPv4", "IPv4", "IPv4", "IPv6", "FQDN"]), st.lists(slice_endpoints, min_size=1, max_size=3).map(tuple),
    st.lists(st.builds(SlicePort, st.sampled_from(["", "p", "q"]), st.sampled_from([8080, 9090]),
                       st.sampled_from(["TCP", "TCP", "UDP"])), min_size=1, max_size=2).map(tuple),
)


def reference_addresses(slices: Mapping[str, EndpointSlice], namespace: str, name: str) -> tuple[str, ...]:
    """What `toServices` reads of a Service's slices, the obvious way."""
    found = {a for es in slices.values() if (es.namespace, es.service) == (namespace, name)
             and es.address_type != "FQDN" for e in es.endpoints if e.ready or e.serving for a in e.addresses}
    return tuple(sorted(found, key=ipaddress.ip_address))


upsert_pod = st.tuples(st.just("upsert_pod"), backend_pods)
upsert_service = st.tuples(st.just("upsert_service"), services)
operations = st.sampled_from([  # upserts more often than deletes, so that the table fills up
    upsert_pod, upsert_pod, upsert_pod, upsert_pod, upsert_service, upsert_service, upsert_service,
    st.tuples(st.just("delete_service"), st.sampled_from(NAMESPACES), st.sampled_from(["s1", "s2", "s3"])),
    st.tuples(st.just("delete_pod"), st.sampled_from(["p1", "p2", "p3", "p4", "p5"])),
    st.tuples(st.just("set_remote_backends"), remote_publication()),
    st.tuples(st.just("upsert_slice"), endpoint_slices), st.tuples(st.just("upsert_slice"), endpoint_slices),
    st.tuples(st.just("delete_slice"), st.sampled_from(NAMESPACES), st.sampled_from(["e1", "e2", "e3"])),
]).flatmap(lambda op: op)


# Services without a selector, fed by EndpointSlices only: the slices' own history.
selector_less = st.builds(
    Service, st.sampled_from(LOCAL_CLUSTERS), st.sampled_from(NAMESPACES), st.sampled_from(["s1", "s2"]),
    st.sampled_from(CLUSTER_IPS[:2]), service_ports, st.none())
slice_operations = st.sampled_from([
    st.tuples(st.just("upsert_service"), selector_less),
    st.tuples(st.just("upsert_slice"), endpoint_slices), st.tuples(st.just("upsert_slice"), endpoint_slices),
    st.tuples(st.just("upsert_slice"), endpoint_slices),
    st.tuples(st.just("delete_slice"), st.sampled_from(NAMESPACES), st.sampled_from(["e1", "e2", "e3"])),
    st.tuples(st.just("delete_service"), st.sampled_from(NAMESPACES), st.sampled_from(["s1", "s2"])),
]).flatmap(lambda op: op)


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, min_size=8, max_size=60))
def test_incremental_table_equals_a_recomputation_from_scratch(ops: list[tuple[Any, ...]]) -> None:
    check_history(ops)


@settings(max_examples=200, deadline=None)
@given(st.lists(slice_operations, min_size=4, max_size=30))
def test_endpoint_slices_incrementally_equal_a_recomputation_from_scratch(ops: list[tuple[Any, ...]]) -> None:
    check_history(ops)


def check_history(ops: list[tuple[Any, ...]]) -> None:
    """Apply `ops` to a table, checking every output against `reference` after each."""
    table = ServiceTable()
    svcs: dict[str, Service] = {}
    pods: dict[str, BackendPod] = {}
    remotes: dict[str, dict[str, dict[tuple[int, str], tuple[Backend, ...]]]] = {}
    slices: dict[str, EndpointSlice] = {}
    for op, *args in ops:
        if op == "upsert_service":
            svcs[args[0].ref] = args[0]
            table.upsert_service(args[0])
        elif op == "delete_service":
            svcs.pop(f"{args[0]}/{args[1]}", None)
            table.delete_service(args[0], args[1])
        elif op == "upsert_pod":
            pods[args[0].ref] = args[0]
            table.upsert_pod(args[0])
        elif op == "delete_pod":
            pods.pop(args[0], None)
            table.delete_pod(args[0])
        elif op == "upsert_slice":
            slices[args[0].ref] = args[0]
            table.upsert_slice(args[0])
        elif op == "delete_slice":
            slices.pop(f"{args[0]}/{args[1]}", None)
            table.delete_slice(args[0], args[1])
        else:
            cluster, published = args[0]
            remotes[cluster] = published
            table.set_remote_backends(cluster, published)
        expected, by_backend = reference(svcs, pods, remotes, slices)
        assert table.frontends() == expected
        for ns in NAMESPACES:
            for name in ("s1", "s2", "s3"):
                assert table.endpoint_addresses(ns, name) == reference_addresses(slices, ns, name)
        for ip in IPS:
            for port in (8080, 8443, 9090):
                assert table.services_of_backend(ip, port) == tuple(sorted(by_backend.get((ip, port), ())))
        published_keys = {k for p in remotes.values() for k in p}
        assert table.missing_locally() == sorted(published_keys - svcs.keys())
        assert [s.ref for s in table.services()] == sorted(svcs)
