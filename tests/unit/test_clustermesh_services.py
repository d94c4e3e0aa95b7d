"""Global services over the cluster mesh without etcd: Cilium's ClusterService value
(`cilium/state/services/v1/<cluster>/<ns>/<name>`), a remote's services merged into deltas over
SQLite, several agents of one cluster publishing the same service key, and the agent core
turning a remote's backends into the kernel load balancer's desired state (and publishing its
own cluster's). tests/integration/test_agent_clustermesh.py runs the same against real etcd."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.clustermesh import ClusterMesh, MeshDelta, MeshPublisher, MeshTuning, RemoteConfig, RemoteEndpoint, wire
from l7gate.clustermesh.wire import ClusterService, L4Addr, WireError, decode_cluster_service, encode_cluster_service
from l7gate.kvstore import KVStore, SQLiteKVStore
from l7gate.testing.wait import eventually
from l7gate.xds.cache import SnapshotCache

FAST = MeshTuning(rpc_timeout=2, backoff_initial=0.02, backoff_max=0.1, refused_retry=0.1)
TCP = "TCP"

# The clustermesh-apiserver's output for a global service (Cilium's
# clustermesh-apiserver/clustermesh/testdata/globalnamespace-services.txtar, `kvstore/list -o json`).
CILIUM_PRETTY = b"""{
  "cluster": "cluster3",
  "namespace": "ns-alpha",
  "name": "echo-service",
  "frontends": {"10.96.0.10": {"http": {"Protocol": "TCP", "Port": 80}}},
  "backends": {"10.244.1.10": {"http": {"Protocol": "TCP", "Port": 8080}}},
  "labels": {},
  "selector": {"app": "echo"},
  "includeExternal": true,
  "shared": true,
  "clusterID": 3
}"""

BILLING_A = ClusterService.of(
    "cluster-a", "payments", "billing-service",
    frontends={"10.96.0.10": {"http": L4Addr(TCP, 8080)}},
    backends={"10.0.1.10": {"http": L4Addr(TCP, 8080)}, "10.0.2.10": {"http": L4Addr(TCP, 8080)}},
    labels={"team": "payments"}, selector={"app": "billing-service"}, cluster_id=1)


# -- the value ----------------------------------------------------------------------------------------


def test_cluster_service_is_ciliums_json() -> None:
    data = encode_cluster_service(BILLING_A)
    # Go's json.Marshal of store.ClusterService: struct fields in order, map keys sorted,
    # loadbalancer.L4Addr without JSON tags; hostnames and zones are omitempty.
    assert data == (
        b'{"cluster":"cluster-a","namespace":"payments","name":"billing-service",'
        b'"frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":8080}}},'
        b'"backends":{"10.0.1.10":{"http":{"Protocol":"TCP","Port":8080}},'
        b'"10.0.2.10":{"http":{"Protocol":"TCP","Port":8080}}},'
        b'"labels":{"team":"payments"},"selector":{"app":"billing-service"},'
        b'"includeExternal":true,"shared":true,"clusterID":1}')
    assert decode_cluster_service(data) == BILLING_A
    got = decode_cluster_service(CILIUM_PRETTY)
    assert (got.cluster, got.ref, got.cluster_id, got.shared, got.include_external) == (
        "cluster3", "ns-alpha/echo-service", 3, True, True)
    assert got.backend_ports("http", TCP) == (("10.244.1.10", 8080),)
    assert got.backend_ports("http", "UDP") == () and got.backend_ports("grpc", TCP) == ()
    assert got.frontends == (("10.96.0.10", (("http", L4Addr(TCP, 80)),)),)
    # Cilium's zero values: a writer that leaves out shared and includeExternal means false;
    # hostnames and zones are not read; null maps are empty.
    bare = decode_cluster_service(b'{"cluster":"c","namespace":"n","name":"s","frontends":null,"backends":null,'
                                  b'"labels":null,"hostnames":{"10.0.0.1":"h"},"zones":{"10.0.0.1":{}}}')
    assert bare == ClusterService("c", "n", "s", include_external=False, shared=False)


_NAME = st.text(alphabet="abcdefgh-", min_size=1, max_size=6).filter(lambda s: s[0] != "-" and s[-1] != "-")
_PORTS = st.dictionaries(st.text(alphabet="abc", max_size=3),
                         st.builds(L4Addr, st.sampled_from(["TCP", "UDP", "SCTP"]), st.integers(0, 65535)),
                         max_size=3)
# Canonical addresses: an IPv4-mapped IPv6 address is read as the IPv4 address it maps.
_ADDRESSES = st.dictionaries(st.ip_addresses().filter(lambda a: getattr(a, "ipv4_mapped", None) is None).map(str),
                             _PORTS, max_size=4)


@settings(max_examples=200, deadline=None)
@given(_NAME, _NAME, _NAME, _ADDRESSES, _ADDRESSES, st.dictionaries(_NAME, _NAME, max_size=2),
       st.booleans(), st.integers(0, 255))
def test_cluster_service_round_trip(cluster: str, namespace: str, name: str, frontends: dict[str, Any],
                                    backends: dict[str, Any], labels: dict[str, str], shared: bool,
                                    cluster_id: int) -> None:
    svc = ClusterService.of(cluster, namespace, name, frontends=frontends, backends=backends, labels=labels,
                            selector=labels, shared=shared, cluster_id=cluster_id)
    data = encode_cluster_service(svc)
    assert decode_cluster_service(data) == svc
    assert encode_cluster_service(decode_cluster_service(data)) == data  # the same bytes every time


@pytest.mark.parametrize(("patch", "field"), [
    ({"cluster": ""}, "cluster service: cluster must be a non-empty string"),
    ({"namespace": 5}, "cluster service: namespace must be a non-empty string"),
    ({"name": None}, "cluster service: name must be a non-empty string"),
    ({"name": "a/b"}, "cluster service: name 'a/b' holds '/'"),
    ({"frontends": []}, "cluster service: frontends must be an object or null"),
    ({"backends": {"10.0.0.x": {}}}, "cluster service: backends: key: '10.0.0.x' is not an IP address"),
    ({"backends": {"fe80::1%eth0": {}}}, "cluster service: backends: unsupported IPv6 zone"),
    ({"backends": {"10.0.0.1": []}}, "cluster service: backends['10.0.0.1'] must be an object of ports by name"),
    ({"backends": {"10.0.0.1": {"http": 8080}}}, "cluster service: backends['10.0.0.1']['http'] must be an object"),
    ({"backends": {"10.0.0.1": {"http": {"Protocol": "tcp", "Port": 1}}}},
     "cluster service: backends['10.0.0.1']['http'].Protocol must be one of"),
    ({"frontends": {"10.96.0.1": {"http": {"Protocol": "TCP", "Port": 70000}}}},
     "cluster service: frontends['10.96.0.1']['http'].Port must be an integer 0..65535, got 70000"),
    ({"backends": {"10.0.0.1": {"": {"Protocol": "TCP", "Port": "80"}}}},
     "cluster service: backends['10.0.0.1']['']"),
    ({"labels": {"a": 1}}, "cluster service: labels must map strings to strings"),
    ({"selector": ["app"]}, "cluster service: selector must map strings to strings"),
    ({"shared": "true"}, "cluster service: shared must be true or false"),
    ({"includeExternal": 1}, "cluster service: includeExternal must be true or false"),
    ({"clusterID": -1}, "cluster service: clusterID must be an integer 0..4294967295"),
])
def test_cluster_service_refuses_naming_the_field(patch: dict[str, Any], field: str) -> None:
    doc = json.loads(encode_cluster_service(BILLING_A))
    doc.update(patch)
    with pytest.raises(WireError) as err:
        decode_cluster_service(json.dumps(doc).encode())
    assert field in str(err.value)


def test_cluster_service_refuses_what_is_no_json_object() -> None:
    for data in (b"", b"[]", b'"x"', b"\xff", b"{"):
        with pytest.raises(WireError, match="cluster service: not"):
            decode_cluster_service(data)


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["cluster", "namespace", "name", "frontends", "backends", "labels",
                                             "selector", "shared", "includeExternal", "clusterID", "Protocol",
                                             "Port", "10.0.0.1", "http", ""]), inner, max_size=6),
                        max_leaves=16)


@settings(max_examples=400, deadline=None)
@given(_JSONISH)
def test_cluster_service_decoder_parses_or_raises_its_error(doc: object) -> None:
    """CONVENTIONS 12: a remote's value never raises anything but WireError."""
    try:
        decode_cluster_service(json.dumps(doc).encode())
    except WireError:
        pass


def test_service_keys() -> None:
    assert wire.service_key("cluster-a", "payments", "billing-service") == (
        "cilium/state/services/v1/cluster-a/payments/billing-service")
    assert wire.parse_service_key("cluster-a", "cilium/state/services/v1/cluster-a/payments/billing-service") == (
        "payments", "billing-service")
    for bad in ("cilium/state/services/v1/cluster-a/payments", "cilium/state/services/v1/cluster-a/a/b/c",
                "cilium/state/services/v1/cluster-ab/payments/x", "cilium/state/services/v1/cluster-a//x"):
        with pytest.raises(WireError):
            wire.parse_service_key("cluster-a", bad)
    with pytest.raises(WireError):
        wire.service_key("cluster-a", "pay/ments", "x")
    assert wire.synced_key("cluster-a", wire.SERVICES_PATH) == "cilium/synced/cluster-a/cilium/state/services/v1"


# -- a remote's services, merged (RemoteCluster over SQLite) ------------------------------------------


class Services:
    """The agent's side, for services: what the deltas say each remote publishes."""

    def __init__(self) -> None:
        self.deltas: list[MeshDelta] = []
        self.now: dict[tuple[str, str], ClusterService] = {}
        self.lock = threading.Lock()

    def __call__(self, delta: MeshDelta) -> None:
        with self.lock:
            self.deltas.append(delta)
            for s in delta.services_removed:
                del self.now[(delta.cluster, s.ref)]
            for s in delta.services_added:
                self.now[(delta.cluster, s.ref)] = s

    def get(self) -> dict[tuple[str, str], ClusterService]:
        with self.lock:
            return dict(self.now)


def sqlite_at(path: Path) -> Callable[[RemoteConfig, str, MeshTuning], KVStore]:
    def factory(config: RemoteConfig, endpoint: str, tuning: MeshTuning) -> KVStore:
        return SQLiteKVStore(str(path), poll_interval=0.01)

    return factory


@pytest.fixture
def cluster_a(tmp_path: Path) -> Iterator[tuple[Path, SQLiteKVStore, MeshPublisher]]:
    path = tmp_path / "cluster-a.db"
    store = SQLiteKVStore(str(path), poll_interval=0.01)
    pub = MeshPublisher(store, cluster="cluster-a", cluster_id=1, node="a1", retry_initial=0.01, retry_max=0.05)
    pub.start()
    yield path, store, pub
    pub.close()
    store.close()


def test_a_remotes_global_services_arrive_change_and_leave(cluster_a: tuple[Path, SQLiteKVStore, MeshPublisher]) -> None:
    path, store, pub = cluster_a
    pub.upsert_service(BILLING_A)
    assert pub.flush(5)
    seen = Services()
    with ClusterMesh("cluster-b", 2, [RemoteConfig("cluster-a", ("x",))], seen, tuning=FAST,
                     store_factory=sqlite_at(path)) as mesh:
        time.sleep(0.3)
        # No services canary yet: the listing may be partial, nothing is merged and not ready.
        assert seen.get() == {} and not mesh.status().ready
        pub.synced()
        assert mesh.wait_ready(10)
        assert seen.get() == {("cluster-a", "payments/billing-service"): BILLING_A}
        assert mesh.status().remotes[0].services == 1 and mesh.snapshot().services == (BILLING_A,)
        # A backend deleted while connected leaves the rotation: the value changes.
        one = ClusterService.of("cluster-a", "payments", "billing-service", frontends={"10.96.0.10": {"http": L4Addr(TCP, 8080)}},
                                backends={"10.0.1.10": {"http": L4Addr(TCP, 8080)}}, cluster_id=1)
        pub.upsert_service(one)
        eventually(lambda: seen.get()[("cluster-a", "payments/billing-service")].backend_ports("http", TCP)
                   == (("10.0.1.10", 8080),), 10, "the changed backends")
        pub.delete_service("payments", "billing-service")
        eventually(lambda: seen.get() == {}, 10, "the service removed")
        assert seen.deltas[-1].services_removed == (one,)


def test_a_malformed_or_foreign_service_is_treated_as_absent(cluster_a: tuple[Path, SQLiteKVStore, MeshPublisher]) -> None:
    path, store, pub = cluster_a
    pub.upsert_service(BILLING_A)
    pub.synced()
    assert pub.flush(5)
    seen = Services()
    key = wire.service_key("cluster-a", "payments", "billing-service")
    with ClusterMesh("cluster-b", 2, [RemoteConfig("cluster-a", ("x",))], seen, tuning=FAST,
                     store_factory=sqlite_at(path)) as mesh:
        assert mesh.wait_ready(10) and len(seen.get()) == 1
        bad = json.loads(encode_cluster_service(BILLING_A))
        bad["backends"]["10.0.1.10"]["http"]["Port"] = "8080"
        store.put(key, json.dumps(bad).encode())
        eventually(lambda: seen.get() == {}, 10, "a malformed value removing what was known")
        assert mesh.status().remotes[0].malformed == 1
        for foreign, why in (({"cluster": "cluster-c"}, "names cluster 'cluster-c'"), ({"clusterID": 7}, "cluster ID 7"),
                             ({"name": "other"}, None)):
            store.put(key, encode_cluster_service(BILLING_A))
            eventually(lambda: len(seen.get()) == 1, 10, "the good value back")
            doc = json.loads(encode_cluster_service(BILLING_A))
            doc.update(foreign)
            store.put(key, json.dumps(doc).encode())
            eventually(lambda: seen.get() == {}, 10, f"{foreign} refused")
            if why is not None:
                assert why in (mesh.status().remotes[0].last_error or "")
        st_ = mesh.status().remotes[0]
        assert (st_.malformed, st_.refused) == (2, 2)  # the name mismatch is malformed, as for nodes
        # Another cluster's services in this etcd are not this remote's to speak for.
        store.put(wire.service_key("cluster-c", "payments", "x"),
                  encode_cluster_service(ClusterService.of("cluster-c", "payments", "x", cluster_id=3)))
        store.put(key, encode_cluster_service(BILLING_A))
        eventually(lambda: list(seen.get()) == [("cluster-a", "payments/billing-service")], 10, "only cluster-a's")


def test_agents_of_one_cluster_share_a_service_key(cluster_a: tuple[Path, SQLiteKVStore, MeshPublisher]) -> None:
    """Every agent of cluster-a publishes billing-service; the key lives on the lease of the agent
    that wrote it last. When that agent goes (its lease revoked), another writes it again."""
    path, store, first = cluster_a
    key = wire.service_key("cluster-a", "payments", "billing-service")
    value = encode_cluster_service(BILLING_A)

    def agent(node: str) -> MeshPublisher:
        pub = MeshPublisher(store, cluster="cluster-a", cluster_id=1, node=node, retry_initial=0.01, retry_max=0.05)
        pub.start()
        pub.upsert_service(BILLING_A)
        assert pub.flush(5)
        return pub

    first.upsert_service(BILLING_A)
    assert first.flush(5)
    second = agent("a2")
    others: list[MeshPublisher] = [second]
    try:
        assert store.get(key) == value
        revision = store.revision
        second.upsert_service(BILLING_A)  # the same bytes: nothing to write
        assert second.flush(5) and store.revision == revision

        def hand_over(last: MeshPublisher, stays: MeshPublisher) -> None:
            store.put(key, value, lease=last.lease.id)  # `last` wrote it last: the key is on its lease
            before = stays.rewritten
            last.close()  # revokes its lease: the key goes with it
            eventually(lambda: store.get(key) == value and stays.rewritten > before, 10,
                       f"the key written again by {stays.node} once {last.node} is gone")

        hand_over(first, second)
        first = agent("a1")  # a1 restarts
        others.append(first)
        hand_over(second, first)
        # The Service deleted in the cluster: every agent withdraws it, and it stays gone.
        third = agent("a3")
        others.append(third)
        first.delete_service("payments", "billing-service")
        third.delete_service("payments", "billing-service")
        eventually(lambda: store.get(key) is None and first.pending == 0 and third.pending == 0, 10, "withdrawn")
        time.sleep(0.3)
        assert store.get(key) is None and first.services() == () and third.services() == ()
    finally:
        for pub in others:
            pub.close()


# -- the agent core -----------------------------------------------------------------------------------


class FakeLB:
    """The kernel's socket load balancer, as the core sees it: the desired frontends."""

    def __init__(self) -> None:
        self.desired: dict[tuple[str, int, str], list[tuple[str, int]]] = {}

    def set_services(self, desired: Mapping[tuple[str, int, str], Sequence[tuple[str, int]]]) -> int:
        self.desired = {k: sorted(v) for k, v in desired.items()}
        return len(desired)

    def close(self) -> None:
        pass


def service(cluster: str, ip: str | None, *, selector: dict[str, str] | None = None, port: int = 8080,
            port_name: str = "http", target: int | str = 8080, **annotations: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": port_name, "port": port, "protocol": "TCP", "targetPort": target}]}
    if ip is not None:
        spec["clusterIP"] = ip
    if selector is not None:
        spec["selector"] = selector
    notes = {"l7gate.io/cluster": cluster}
    notes.update({f"service.cilium.io/{k}": v for k, v in annotations.items()})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "billing-service", "namespace": "payments", "annotations": notes,
                         "labels": {"team": "payments"}},
            "spec": spec}


def billing_pod(cluster: str, name: str, ip: str, *, ready: bool = True) -> dict[str, Any]:
    status: dict[str, Any] = {"podIP": ip}
    if not ready:
        status["conditions"] = [{"type": "Ready", "status": "False"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "payments", "labels": {"app": "billing-service"},
                         "annotations": {"l7gate.io/cluster": cluster}},
            "spec": {"nodeName": "elsewhere", "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
            "status": status}


def make_core(tmp_path: Path, store: SQLiteKVStore, cluster: str = "cluster-b", cid: int = 2,
              publisher: MeshPublisher | None = None) -> tuple[AgentCore, FakeLB]:
    cfg = AgentConfig(node="n1", cluster_name=cluster, cluster_id=cid, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    lb = FakeLB()
    return AgentCore(cfg, store, SnapshotCache(), mesh_publisher=publisher, socket_lb=lb), lb


VIP_B = ("10.97.0.10", 8080, TCP)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteKVStore]:
    with SQLiteKVStore(str(tmp_path / "kv.db")) as s:
        yield s


def test_core_balances_a_local_global_service_over_the_remotes_backends(tmp_path: Path, store: SQLiteKVStore) -> None:
    core, lb = make_core(tmp_path, store)
    core.apply([service("cluster-b", "10.97.0.10", **{"global": "true"})])  # no selector: nothing local
    assert lb.desired == {VIP_B: []}
    core.apply_mesh(MeshDelta("cluster-a", 1, services_added=(BILLING_A,), resync=True))
    assert lb.desired == {VIP_B: [("10.0.1.10", 8080), ("10.0.2.10", 8080)]}
    # Backends are named after their pods once the remote's endpoints are known.
    core.apply_mesh(MeshDelta("cluster-a", 2, endpoints_added=(
        RemoteEndpoint("cluster-a", ipaddress.ip_network("10.0.1.10/32"), (1 << 16) + 1, None, "payments",
                       "billing-service-1"),)))
    data = views.services(core.view(), core)
    (fe,) = data["services"][0]["frontends"]
    assert [(b["address"], b["pod"], b["cluster"]) for b in fe["backends"]] == [
        ("10.0.1.10:8080", "cluster-a/payments/billing-service-1", "cluster-a"),
        ("10.0.2.10:8080", "cluster-a/-/10.0.2.10", "cluster-a")]
    # A backend deleted remotely leaves the rotation.
    one = ClusterService.of("cluster-a", "payments", "billing-service",
                            backends={"10.0.2.10": {"http": L4Addr(TCP, 8080)}}, cluster_id=1)
    core.apply_mesh(MeshDelta("cluster-a", 3, services_added=(one,)))
    assert lb.desired == {VIP_B: [("10.0.2.10", 8080)]}
    core.apply_mesh(MeshDelta("cluster-a", 4, services_removed=(one,)))
    assert lb.desired == {VIP_B: []}


def test_core_matches_remote_ports_by_name_and_protocol(tmp_path: Path, store: SQLiteKVStore) -> None:
    """Cilium pairs a remote backend's port with the local Service port of the same name: the
    clusters' service port numbers may differ."""
    core, lb = make_core(tmp_path, store)
    core.apply([service("cluster-b", "10.97.0.10", port=80, **{"global": "true"})])
    core.apply_mesh(MeshDelta("cluster-a", 1, services_added=(BILLING_A,)))
    assert lb.desired == {("10.97.0.10", 80, TCP): [("10.0.1.10", 8080), ("10.0.2.10", 8080)]}
    core.apply([service("cluster-b", "10.97.0.10", port=80, port_name="web", **{"global": "true"})])
    assert lb.desired == {("10.97.0.10", 80, TCP): []}  # no remote port named "web"


def test_core_follows_ciliums_rules_for_global_shared_and_affinity(tmp_path: Path, store: SQLiteKVStore) -> None:
    core, lb = make_core(tmp_path, store)
    remote = [("10.0.1.10", 8080), ("10.0.2.10", 8080)]
    core.apply_mesh(MeshDelta("cluster-a", 1, services_added=(BILLING_A,)))
    # No local Service: nothing balances to the remote's backends; the status names it.
    assert lb.desired == {}
    services, problems = views.global_services(core.view())
    assert services["cluster-a"][0]["here"] == "missing"
    assert problems == [
        "global service payments/billing-service exists in cluster-a but not here: create it in this cluster "
        "too, as Cilium requires (a Service billing-service in namespace payments, annotated "
        'service.cilium.io/global: "true"); until then nothing here is balanced over cluster-a\'s backends']
    assert core.services.missing_locally() == ["payments/billing-service"]
    # A local Service that is not global does not use them either.
    core.apply([service("cluster-b", "10.97.0.10")])
    assert lb.desired == {VIP_B: []}
    services, problems = views.global_services(core.view())
    assert services["cluster-a"][0]["here"] == "not global" and "is not global here" in problems[0]
    core.apply([service("cluster-b", "10.97.0.10", **{"global": "true"})])
    assert lb.desired == {VIP_B: remote}
    assert views.global_services(core.view()) == (
        {"cluster-a": [{"service": "payments/billing-service", "frontends": ["10.96.0.10:8080/TCP"],
                        "backends": 2, "shared": True, "here": "global"}]}, [])
    # Affinity local: the local ready backend while there is one, else the remote ones.
    core.apply([service("cluster-b", "10.97.0.10", selector={"app": "billing-service"}, **{"global": "true",
                                                                                          "affinity": "local"}),
                billing_pod("cluster-b", "billing-b", "10.0.3.10")])
    assert lb.desired == {VIP_B: [("10.0.3.10", 8080)]}
    core.apply([billing_pod("cluster-b", "billing-b", "10.0.3.10", ready=False)])
    assert lb.desired == {VIP_B: remote}
    core.apply([service("cluster-b", "10.97.0.10", selector={"app": "billing-service"}, **{"global": "true",
                                                                                          "affinity": "remote"}),
                billing_pod("cluster-b", "billing-b", "10.0.3.10")])
    assert lb.desired == {VIP_B: remote}
    core.apply([service("cluster-b", "10.97.0.10", selector={"app": "billing-service"}, **{"global": "true"})])
    assert lb.desired == {VIP_B: sorted([("10.0.3.10", 8080), *remote])}
    # A remote that says shared: false offers no backends (Cilium's reader drops them).
    unshared = dataclasses.replace(BILLING_A, shared=False)
    core.apply_mesh(MeshDelta("cluster-a", 2, services_added=(unshared,)))
    assert lb.desired == {VIP_B: [("10.0.3.10", 8080)]}
    assert views.global_services(core.view())[0]["cluster-a"][0]["here"] == "not shared"


def test_core_keeps_remote_services_through_a_restart_until_the_resync(tmp_path: Path, store: SQLiteKVStore) -> None:
    """cilium#26462 for services: a restarted agent balances over the remote's last known
    backends (persisted under the mesh prefix) until the remote's first listing says otherwise."""
    core, lb = make_core(tmp_path, store)
    core.apply([service("cluster-b", "10.97.0.10", **{"global": "true"})])
    core.apply_mesh(MeshDelta("cluster-a", 1, services_added=(BILLING_A,), resync=True))
    assert [k for k, _ in store.list_prefix("l7gate/v1/mesh/cluster-a/services/")] == [
        "l7gate/v1/mesh/cluster-a/services/payments/billing-service"]
    again, lb2 = make_core(tmp_path, store)  # a new agent process on the same store, remote unreachable
    assert lb2.desired == {VIP_B: [("10.0.1.10", 8080), ("10.0.2.10", 8080)]}
    again.apply_mesh(MeshDelta("cluster-a", 1, resync=True))  # the first listing: the service is gone
    assert lb2.desired == {VIP_B: []}
    assert store.list_prefix("l7gate/v1/mesh/cluster-a/services/") == []


def test_core_publishes_its_global_shared_services_with_ready_backends(tmp_path: Path, store: SQLiteKVStore) -> None:
    etcd = SQLiteKVStore(str(tmp_path / "cluster-a.db"), poll_interval=0.01)
    pub = MeshPublisher(etcd, cluster="cluster-a", cluster_id=1, node="n1", retry_initial=0.01, retry_max=0.05)
    pub.start()
    key = wire.service_key("cluster-a", "payments", "billing-service")
    try:
        core, _ = make_core(tmp_path, store, "cluster-a", 1, publisher=pub)
        core.apply([service("cluster-a", "10.96.0.10", selector={"app": "billing-service"},
                            **{"global": "true"}),
                    billing_pod("cluster-a", "billing-1", "10.0.1.10"),
                    billing_pod("cluster-a", "billing-2", "10.0.2.10", ready=False)])
        assert pub.flush(5)
        got = decode_cluster_service(etcd.get(key) or b"")
        assert got == ClusterService.of(
            "cluster-a", "payments", "billing-service", frontends={"10.96.0.10": {"http": L4Addr(TCP, 8080)}},
            backends={"10.0.1.10": {"http": L4Addr(TCP, 8080)}}, labels={"team": "payments"},
            selector={"app": "billing-service"}, cluster_id=1)
        assert core.view().published_services == ("payments/billing-service",)
        core.apply([billing_pod("cluster-a", "billing-2", "10.0.2.10")])  # ready now
        assert pub.flush(5)
        assert [a for a, _ in decode_cluster_service(etcd.get(key) or b"").backends] == ["10.0.1.10", "10.0.2.10"]
        core.delete_pod("cluster-a/payments/billing-1")
        assert pub.flush(5)
        assert [a for a, _ in decode_cluster_service(etcd.get(key) or b"").backends] == ["10.0.2.10"]
        # shared: "false", then not global, then deleted: withdrawn each time.
        for doc in (service("cluster-a", "10.96.0.10", selector={"app": "billing-service"},
                            **{"global": "true", "shared": "false"}),
                    service("cluster-a", "10.96.0.10", selector={"app": "billing-service"})):
            core.apply([service("cluster-a", "10.96.0.10", selector={"app": "billing-service"}, **{"global": "true"})])
            assert pub.flush(5) and etcd.get(key) is not None
            core.apply([doc])
            assert pub.flush(5) and etcd.get(key) is None and core.view().published_services == ()
        core.apply([service("cluster-a", "10.96.0.10", selector={"app": "billing-service"}, **{"global": "true"})])
        assert pub.flush(5) and etcd.get(key) is not None
        assert core.delete_service("payments/billing-service")
        assert pub.flush(5) and etcd.get(key) is None
        # A restarted agent publishes what its store holds before the canaries are written.
        core.apply([service("cluster-a", "10.96.0.10", selector={"app": "billing-service"}, **{"global": "true"})])
        pub.close()
        pub = MeshPublisher(etcd, cluster="cluster-a", cluster_id=1, node="n1", retry_initial=0.01, retry_max=0.05)
        pub.start()
        assert etcd.get(key) is None  # went with the old lease
        make_core(tmp_path, store, "cluster-a", 1, publisher=pub)
        pub.synced()
        assert pub.flush(5) and etcd.get(key) is not None
        assert etcd.get(wire.synced_key("cluster-a", wire.SERVICES_PATH)) is not None
    finally:
        pub.close()
        etcd.close()
