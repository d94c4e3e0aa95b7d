"""The cluster mesh's allocator, publisher and merge logic over the embedded SQLite store (no
etcd: tests/integration/test_clustermesh.py runs the same machinery against real etcd, with
outages, TLS and races). A "remote cluster" here is a SQLite file its writer and the mesh's
reader open separately, as two processes would."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.clustermesh import (
    IDENTITIES_PATH,
    IP_PATH,
    NODES_PATH,
    SERVICES_PATH,
    ClusterMesh,
    MeshDelta,
    MeshError,
    MeshIdentityAllocator,
    MeshLease,
    MeshPublisher,
    MeshTuning,
    NodeAddress,
    NodeRecord,
    RemoteConfig,
)
from l7gate.clustermesh import wire
from l7gate.clustermesh.remote import Changes
from l7gate.identity import IdentityAllocator, IdentityError, identity_labels
from l7gate.kvstore import KVStore, KVStoreError, SQLiteKVStore
from l7gate.testing.clock import ManualClock
from l7gate.testing.wait import eventually

FAST = MeshTuning(rpc_timeout=2, backoff_initial=0.02, backoff_max=0.1, refused_retry=0.1)


def labels(app: str, cluster: str = "c2", ns: str = "default") -> Any:
    return identity_labels({"app": app}, namespace=ns, cluster=cluster)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteKVStore]:
    with SQLiteKVStore(str(tmp_path / "c2.db"), poll_interval=0.01) as s:
        yield s


class View:
    """The agent's side: applies deltas the way the package docstring tells it to."""

    def __init__(self) -> None:
        self.deltas: list[MeshDelta] = []
        self.identities: dict[tuple[str, int], Any] = {}
        self.endpoints: dict[tuple[str, Any], Any] = {}
        self.nodes: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()

    def __call__(self, delta: MeshDelta) -> None:
        with self.lock:
            self.deltas.append(delta)
            for i in delta.identities_removed:
                del self.identities[(i.cluster, i.id)]
            for i in delta.identities_added:
                self.identities[(i.cluster, i.id)] = i
            for e in delta.endpoints_removed:
                del self.endpoints[(e.cluster, e.prefix)]
            for e in delta.endpoints_added:
                self.endpoints[(e.cluster, e.prefix)] = e
            for n in delta.nodes_removed:
                del self.nodes[(delta.cluster, n.name)]
            for n in delta.nodes_added:
                self.nodes[(delta.cluster, n.name)] = n

    def ips(self) -> set[str]:
        with self.lock:
            return {str(p.network_address) for _, p in self.endpoints}


def sqlite_factory(paths: dict[str, Path]) -> Callable[[RemoteConfig, str, MeshTuning], KVStore]:
    def factory(config: RemoteConfig, endpoint: str, tuning: MeshTuning) -> KVStore:
        return SQLiteKVStore(str(paths[endpoint]), poll_interval=0.01)

    return factory


# -- the allocator ---------------------------------------------------------------------------------


def test_two_nodes_share_numbers_in_ciliums_layout(store: SQLiteKVStore) -> None:
    a = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1")
    b = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n2")
    web, db = a.allocate(labels("web")), a.allocate(labels("db"))
    assert web.id == 2 << 16 and db.id == (2 << 16) + 1
    assert b.allocate(labels("db")).id == db.id
    text = wire.encode_label_string(labels("db"))
    assert store.get(wire.identity_id_key(db.id)) == text.encode()
    assert dict(store.list_prefix(wire.identity_value_prefix(text))) == {
        wire.identity_value_key(text, "n1"): str(db.id).encode(),
        wire.identity_value_key(text, "n2"): str(db.id).encode(),
    }
    assert b.lookup_by_labels(labels("web")) == web and b.lookup_by_id(web.id) == web
    assert a.release(db) and not store.get(wire.identity_value_key(text, "n1"))
    assert a.gc() == []  # n2 still references db; web is held
    assert b.release(db)
    assert a.gc() == [db.id] and store.get(wire.identity_id_key(db.id)) is None
    assert a.allocate(labels("db")).id == db.id + 1  # a freed number rests a while


def test_a_number_is_never_given_to_two_label_sets(store: SQLiteKVStore) -> None:
    # Another writer (a node whose lock view differs, a hand edit) took the next number first.
    store.put(wire.identity_id_key(2 << 16), b"k8s:app=other;k8s:io.cilium.k8s.policy.cluster=c2;")
    a = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1")
    assert a.allocate(labels("web")).id == (2 << 16) + 1


def test_allocator_refuses_labels_readers_would_refuse(store: SQLiteKVStore) -> None:
    a = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1")
    with pytest.raises(IdentityError, match="must carry io.cilium.k8s.policy.cluster=c2"):
        a.allocate(labels("web", cluster="c3"))
    with pytest.raises(IdentityError, match="node-local allocator"):
        a.allocate_cidr("10.0.0.0/8")
    assert a.allocate({"reserved:host": ""}).id == 1
    local = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1",
                                  local=IdentityAllocator(store, cluster_id=2, owner="c2.n1"))
    cidr = local.allocate_cidr("10.0.0.0/8")
    assert cidr.local and local.lookup_by_id(cidr.id) == cidr and local.release(cidr)


def test_a_dead_holders_lock_is_broken(store: SQLiteKVStore) -> None:
    clock = ManualClock(start=1000.0)
    text = wire.encode_label_string(labels("web"))
    store.put(wire.identity_lock_key(text), b"crashed-node:1234@1000.000")
    a = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1", clock=clock,
                              sleep=lambda s: clock.advance(s), lock_timeout=5, stale_lock=30)
    with pytest.raises(IdentityError, match="is held by"):
        a.allocate(labels("web"))  # 5 s of waiting: the holder may still be alive
    clock.advance(30)
    assert a.allocate(labels("web")).id == 2 << 16
    assert store.get(wire.identity_lock_key(text)) is None


def test_a_new_lease_writes_the_keys_again(store: SQLiteKVStore) -> None:
    lease = MeshLease(store, ttl=60)
    a = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1", lease=lease)
    web = a.allocate(labels("web"))
    text = wire.encode_label_string(labels("web"))
    store.revoke(lease.id)  # as etcd does when the lease expires: the node's value key is gone
    store.delete(wire.identity_id_key(web.id))  # and GC collected the number meanwhile
    a.rewrite(store.grant_lease(60))
    assert store.get(wire.identity_value_key(text, "n1")) == str(web.id).encode()
    assert store.get(wire.identity_id_key(web.id)) == text.encode()
    lease.close()


# -- the publisher -------------------------------------------------------------------------------------


class Flaky:
    """A store whose bulk writes fail while `down` is set."""

    def __init__(self, inner: SQLiteKVStore) -> None:
        self.inner = inner
        self.down = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def batch(self) -> Any:
        if self.down.is_set():
            raise KVStoreError("etcd unreachable (test)")
        return self.inner.batch()

    def put_many(self, items: Any, lease: int | None = None) -> int:
        if self.down.is_set():
            raise KVStoreError("etcd unreachable (test)")
        return self.inner.put_many(items, lease=lease)


def test_canary_only_after_every_initial_upsert_succeeded(store: SQLiteKVStore) -> None:
    flaky = Flaky(store)
    pub = MeshPublisher(flaky, cluster="c2", cluster_id=2, node="n1", retry_initial=0.01, retry_max=0.02)  # type: ignore[arg-type]
    pub.start()
    flaky.down.set()
    pub.upsert_endpoint("10.2.0.1", 2 << 16, namespace="default", pod_name="a")
    pub.set_node(NodeRecord("n1", "c2", 2, (NodeAddress("InternalIP", "192.168.2.1"),)))
    pub.synced()
    assert eventually(lambda: pub.failures >= 3, 5, "failed writes")
    canaries = wire.synced_prefix("c2")
    assert store.list_prefix(canaries) == [] and store.list_prefix(wire.IP_PREFIX) == []
    assert pub.last_error and "unreachable" in pub.last_error
    flaky.down.clear()
    assert pub.flush(5)
    assert [k for k, _ in store.list_prefix(canaries)] == [
        wire.synced_key("c2", p) for p in sorted((IDENTITIES_PATH, IP_PATH, NODES_PATH, SERVICES_PATH))]
    assert store.get(wire.ip_key(ipaddress.ip_network("10.2.0.1/32"))) is not None
    pub.close()


def test_publisher_coalesces_and_deletes(store: SQLiteKVStore) -> None:
    flaky = Flaky(store)
    pub = MeshPublisher(flaky, cluster="c2", cluster_id=2, node="n1", retry_initial=0.01, retry_max=0.02)  # type: ignore[arg-type]
    pub.start()
    flaky.down.set()
    for i in range(1, 200):
        pub.upsert_endpoint("10.2.0.1", (2 << 16) + i)
    pub.upsert_endpoint("10.2.0.2", 6)  # a reserved identity is any cluster's to publish
    pub.delete_endpoint("10.2.0.2")
    eventually(lambda: pub.failures >= 2, 5, "failed writes")
    flaky.down.clear()
    assert pub.flush(5)
    assert [k for k, _ in store.list_prefix(wire.IP_PREFIX)] == ["cilium/state/ip/v1/default/10.2.0.1"]
    assert wire.decode_ip_identity(store.get("cilium/state/ip/v1/default/10.2.0.1") or b"").identity == (2 << 16) + 199
    assert pub.writes <= 3  # 199 values of one key while etcd was away: written once (+ the delete)
    with pytest.raises(MeshError, match="outside cluster c2's range"):
        pub.upsert_endpoint("10.2.0.3", 3 << 16)
    pub.close()
    assert store.list_prefix(wire.IP_PREFIX) == []  # close revokes its lease: the node's keys go


def test_publisher_refuses_a_store_of_another_cluster_id(store: SQLiteKVStore) -> None:
    store.put(wire.cluster_config_key("c2"), wire.encode_cluster_config(wire.ClusterConfig(id=3)))
    pub = MeshPublisher(store, cluster="c2", cluster_id=2, node="n1")
    with pytest.raises(MeshError, match="has ID 3, but this agent is configured with ID 2"):
        pub.start()
    pub.close()
    assert wire.decode_cluster_config(store.get(wire.cluster_config_key("c2")) or b"").id == 3


# -- the merge -------------------------------------------------------------------------------------------


def test_changes_keep_first_old_and_last_new() -> None:
    c = Changes()
    c.record("endpoint", "a", None, 1)
    c.record("endpoint", "a", 1, None)  # added and gone within one batch: no change at all
    c.record("endpoint", "b", 1, 2)
    c.record("endpoint", "b", 2, 1)  # changed and changed back: no change
    c.record("endpoint", "c", 1, 2)
    c.record("endpoint", "d", 4, None)
    assert c.split()["endpoint"] == ([2], [4])


def test_mesh_refuses_bad_configurations() -> None:
    def ok(d: MeshDelta) -> None:
        pass

    with pytest.raises(MeshError, match="local cluster's name"):
        ClusterMesh("c1", 1, [RemoteConfig("c1", ("x",))], ok)
    with pytest.raises(MeshError, match="twice"):
        ClusterMesh("c1", 1, [RemoteConfig("c2", ("x",)), RemoteConfig("c2", ("y",))], ok)
    with pytest.raises(MeshError, match="1..255"):
        ClusterMesh("c1", 0, [], ok)
    with pytest.raises(MeshError, match="lower-case"):
        RemoteConfig("C2", ("x",))
    with pytest.raises(MeshError, match="go together"):
        RemoteConfig("c2", ("x",), cert_file="c.pem")


def test_merge_over_sqlite_stale_marking_on_reconnect(tmp_path: Path) -> None:
    """The remote's thread reconnects on `reconfigure`: entries it still holds produce no change,
    the one deleted meanwhile is removed, the new one added, in one resync delta."""
    path = tmp_path / "c2.db"
    writer = SQLiteKVStore(str(path), poll_interval=0.01)
    pub = MeshPublisher(writer, cluster="c2", cluster_id=2, node="n1")
    alloc = MeshIdentityAllocator(writer, cluster="c2", cluster_id=2, node="n1", lease=pub.lease)
    pub.start()
    web = alloc.allocate(labels("web"))
    for i in range(1, 4):
        pub.upsert_endpoint(f"10.2.0.{i}", web.id, namespace="default", pod_name=f"web-{i}")
    pub.synced()
    assert pub.flush(10)
    view = View()
    mesh = ClusterMesh("c1", 1, [RemoteConfig("c2", ("one",))], view, tuning=FAST,
                       store_factory=sqlite_factory({"one": path, "two": path}))
    with mesh:
        assert mesh.wait_ready(10)
        assert view.ips() == {"10.2.0.1", "10.2.0.2", "10.2.0.3"}
        n = len(view.deltas)
        mesh.reconfigure([RemoteConfig("c2", ("two",))])
        pub.delete_endpoint("10.2.0.1")
        pub.upsert_endpoint("10.2.0.4", web.id)
        assert pub.flush(5)
        eventually(lambda: view.ips() == {"10.2.0.2", "10.2.0.3", "10.2.0.4"}, 10, "converged view")
        eventually(lambda: mesh.status().ready, 10, "ready again")
        status = mesh.status().remotes[0]
        assert status.reconnections == 1 and status.endpoint == "two"
        touched = [e for d in view.deltas[n:] for e in d.endpoints_added + d.endpoints_removed]
        assert {str(e.prefix.network_address) for e in touched} == {"10.2.0.1", "10.2.0.4"}
        snap = mesh.snapshot()
        assert {(e.cluster, e.prefix) for e in snap.endpoints} == set(view.endpoints)
        assert [i.id for i in snap.identities] == [web.id]
    pub.close()
    writer.close()


def test_publisher_writes_everything_again_on_a_new_lease(tmp_path: Path) -> None:
    """etcd unreachable for longer than the TTL: the lease expired and took the node's keys.
    The keepalive grants a new lease and the publisher and allocator write them again."""
    clock = ManualClock(start=1000.0)
    store = SQLiteKVStore(str(tmp_path / "c2.db"), clock=clock, poll_interval=0.01)
    lease = MeshLease(store, ttl=1.5, name="c2/n1")
    pub = MeshPublisher(store, cluster="c2", cluster_id=2, node="n1", lease=lease)
    alloc = MeshIdentityAllocator(store, cluster="c2", cluster_id=2, node="n1", lease=lease)
    pub.start()
    web = alloc.allocate(labels("web"))
    pub.upsert_endpoint("10.2.0.1", web.id)
    pub.set_node(NodeRecord("n1", "c2", 2))
    pub.upsert_service(wire.ClusterService.of("c2", "default", "web", backends={"10.2.0.1": {"": wire.L4Addr("TCP", 80)}}))
    pub.synced()
    assert pub.flush(5)
    first = lease.current
    clock.advance(60)
    store.reap_expired_leases()
    assert store.list_prefix(wire.IP_PREFIX) == [] and store.list_prefix(wire.IDENTITY_VALUE_PREFIX) == []
    eventually(lambda: lease.current != first and lease.regrants == 1, 10, "a new lease")
    assert pub.flush(5)
    assert [k for k, _ in store.list_prefix(wire.IP_PREFIX)] == ["cilium/state/ip/v1/default/10.2.0.1"]
    assert store.get(wire.node_key("c2", "n1")) is not None
    assert len(store.list_prefix(wire.IDENTITY_VALUE_PREFIX)) == 1
    assert store.get(wire.service_key("c2", "default", "web")) is not None
    assert len(store.list_prefix(wire.synced_prefix("c2"))) == 4
    pub.close()
    lease.close()
    store.close()
