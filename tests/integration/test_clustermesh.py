"""The cluster mesh against real etcd (Debian etcd-server 3.4): one etcd per cluster, each
started by l7gate.testing.etcd on free loopback ports and a temp data dir, stopped by PID.

Cluster "c2" (ID 2) is written by an agent's writer side (lease, allocator, publisher); cluster
"c1" (ID 1) reads it with a `ClusterMesh`, whose deltas are applied to a `View` exactly as the
package docstring tells the agent to. Outages are real: SIGSTOP and SIGKILL of c2's etcd, a TCP
proxy cut between the mesh and etcd while the remote keeps changing, an etcd wiped and replaced
behind the same address, and TLS with client certificates.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable

from l7gate.clustermesh import (
    IP_PATH,
    ClusterMesh,
    MeshDelta,
    MeshIdentityAllocator,
    MeshLease,
    MeshPublisher,
    MeshTuning,
    NodeAddress,
    NodeRecord,
    RemoteConfig,
)
from l7gate.clustermesh import wire
from l7gate.identity import Identity, identity_labels
from l7gate.kvstore.etcd import EtcdKVStore
from l7gate.testing.wait import eventually
from l7gate.testing.etcd import EtcdServer, TLSFiles, free_port, make_tls

pytestmark = pytest.mark.integration

ETCD_HINT = "Debian etcd-server: bash scripts/install.sh"
# etcd refuses client pings more often than --grpc-keepalive-min-time (5 s): let tests ping at 1 s
ETCD_ARGS = ("--grpc-keepalive-min-time=1s",)
FAST = MeshTuning(rpc_timeout=2, keepalive_time=1, keepalive_timeout=1, backoff_initial=0.05,
                  backoff_max=0.5, refused_retry=0.3)


@pytest.fixture
def etcd_binary(require_binary: Callable[..., str]) -> str:
    return require_binary("etcd", hint=ETCD_HINT)


@pytest.fixture
def servers(etcd_binary: str, tmp_path: Path) -> Iterator[Callable[..., EtcdServer]]:
    started: list[EtcdServer] = []

    def start(name: str, tls: TLSFiles | None = None) -> EtcdServer:
        server = EtcdServer(etcd_binary, tmp_path / f"etcd-{name}", tls=tls, extra_args=ETCD_ARGS)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


class Cluster:
    """One cluster's etcd and one agent's writer side on it."""

    def __init__(self, name: str, cluster_id: int, server: EtcdServer, node: str = "n1",
                 ttl: float = 30, **tls: str) -> None:
        self.name, self.id, self.server, self.node = name, cluster_id, server, node
        self.store = EtcdKVStore(server.endpoint, **tls)
        self.lease = MeshLease(self.store, ttl, name=f"{name}/{node}")
        self.alloc = MeshIdentityAllocator(self.store, cluster=name, cluster_id=cluster_id, node=node,
                                           lease=self.lease)
        self.pub = MeshPublisher(self.store, cluster=name, cluster_id=cluster_id, node=node, lease=self.lease)
        self.pub.start()
        self.node_ip = f"192.168.{cluster_id}.1"
        self.pub.set_node(NodeRecord(node, name, cluster_id, (NodeAddress("InternalIP", self.node_ip),)))

    def pod(self, ip: str, app: str, name: str | None = None, ns: str = "default") -> Identity:
        ident = self.alloc.allocate(identity_labels({"app": app}, namespace=ns, cluster=self.name))
        self.pub.upsert_endpoint(ip, ident.id, host_ip=self.node_ip, namespace=ns, pod_name=name or app)
        return ident

    def synced(self, *paths: str) -> None:
        self.pub.synced(*paths)
        assert self.pub.flush(10)

    def remote(self, **kw: Any) -> RemoteConfig:
        return RemoteConfig(self.name, (kw.pop("endpoint", self.server.endpoint),), **kw)

    def close(self) -> None:
        self.pub.close(revoke=False)
        self.lease.close(revoke=False)
        self.store.close()


@pytest.fixture
def c2(servers: Callable[..., EtcdServer]) -> Iterator[Cluster]:
    cluster = Cluster("c2", 2, servers("c2"))
    yield cluster
    cluster.close()


class View:
    """The agent's side of `on_change`: applies every delta to its own tables."""

    def __init__(self) -> None:
        self.deltas: list[MeshDelta] = []
        self.identities: dict[tuple[str, int], Any] = {}
        self.endpoints: dict[tuple[str, Any], Any] = {}
        self.nodes: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()

    def __call__(self, delta: MeshDelta) -> None:
        with self.lock:
            assert not self.deltas or delta.sequence == self.deltas[-1].sequence + 1
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

    def ips(self, cluster: str = "c2") -> dict[str, int]:
        with self.lock:
            return {str(p.network_address): e.identity for (c, p), e in self.endpoints.items() if c == cluster}

    def count(self) -> int:
        with self.lock:
            return len(self.deltas)

    def since(self, n: int) -> list[MeshDelta]:
        with self.lock:
            return self.deltas[n:]


def assert_view_is_snapshot(mesh: ClusterMesh, view: View) -> None:
    snap = mesh.snapshot()
    with view.lock:
        assert {(e.cluster, e.prefix): e for e in snap.endpoints} == view.endpoints
        assert {(i.cluster, i.id): i for i in snap.identities} == view.identities
        assert {(n.cluster, n.name) for n in snap.nodes} == set(view.nodes)


def status(mesh: ClusterMesh, name: str = "c2") -> Any:
    found = mesh.status().remote(name)
    assert found is not None
    return found


# -- publish and merge -----------------------------------------------------------------------------


def test_publish_from_one_cluster_merge_in_another(c2: Cluster) -> None:
    web = c2.pod("10.2.0.1", "web", "web-1")
    c2.pod("10.2.0.2", "web", "web-2")
    db = c2.pod("10.2.0.3", "db", ns="data")
    c2.synced()
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(15), mesh.status()
        assert view.ips() == {"10.2.0.1": web.id, "10.2.0.2": web.id, "10.2.0.3": db.id}
        assert web.id == 2 << 16 and db.id == (2 << 16) + 1  # cluster 2's range
        ep = view.endpoints[("c2", ipaddress.ip_network("10.2.0.3/32"))]
        assert (ep.host_ip, ep.namespace, ep.pod_name) == ("192.168.2.1", "data", "db")
        assert view.identities[("c2", db.id)].labels == db.labels
        assert view.nodes[("c2", "n1")].ips() == ("192.168.2.1",)
        first = view.deltas[0]
        assert first.resync and len(first.identities_added) == 2 and len(first.endpoints_added) == 3
        s = status(mesh)
        assert (s.configured, s.connected, s.ready, s.cluster_id) == (True, True, True, 2)
        assert (s.nodes, s.endpoints, s.identities, s.reconnections) == (1, 3, 2, 0)
        # live changes: one small delta each, with only what changed
        n = view.count()
        c2.pod("10.2.0.4", "db", ns="data")
        c2.pub.delete_endpoint("10.2.0.1")
        eventually(lambda: set(view.ips()) == {"10.2.0.2", "10.2.0.3", "10.2.0.4"}, 10, "live changes")
        changed = view.since(n)
        assert sum(len(d) for d in changed) == 2 and not any(d.identities_added for d in changed)
        assert_view_is_snapshot(mesh, view)


def test_operators_read_the_mesh_with_etcdctl(c2: Cluster) -> None:
    """DESIGN decision 9: the keys are Cilium's, readable with `etcdctl get --prefix cilium/`."""
    etcdctl = subprocess.run(["which", "etcdctl"], capture_output=True, text=True).stdout.strip()
    if not etcdctl:
        unavailable("no etcdctl on PATH (scripts/install.sh installs etcd-client)")
    c2.pod("10.2.0.1", "web")
    c2.synced()
    out = subprocess.run([etcdctl, "--endpoints", c2.server.endpoint, "get", "--prefix", "cilium/", "--keys-only"],
                         capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=20)
    keys = [k for k in out.stdout.splitlines() if k]
    text = "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c2;k8s:io.kubernetes.pod.namespace=default;"
    assert keys == [
        "cilium/cluster-config/c2",
        "cilium/state/identities/v1/id/131072",
        f"cilium/state/identities/v1/value/{text}/n1",
        "cilium/state/ip/v1/default/10.2.0.1",
        "cilium/state/nodes/v1/c2/n1",
        "cilium/synced/c2/cilium/state/identities/v1",
        "cilium/synced/c2/cilium/state/ip/v1",
        "cilium/synced/c2/cilium/state/nodes/v1",
        "cilium/synced/c2/cilium/state/services/v1",
    ]


def test_a_listing_before_the_canary_is_not_acted_on(c2: Cluster) -> None:
    c2.pod("10.2.0.1", "web")
    assert c2.pub.flush(10)  # written, but no canary: another writer may still be publishing
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        eventually(lambda: status(mesh).connected and status(mesh).cluster_id == 2, 10, "connected")
        time.sleep(1)
        assert view.deltas == [] and not status(mesh).ready and status(mesh).endpoints == 0
        c2.synced(IP_PATH)  # one path's canary: that path alone is listed
        eventually(lambda: view.ips() == {"10.2.0.1": 2 << 16}, 10, "ipcache merged")
        assert view.identities == {} and not status(mesh).ready
        assert status(mesh).synced_prefixes == (IP_PATH,)
        c2.synced()
        assert mesh.wait_ready(10)
        assert list(view.identities) == [("c2", 2 << 16)] and len(view.nodes) == 1


# -- outages ------------------------------------------------------------------------------------------


def test_frozen_remote_etcd_keeps_entries_then_reconnects(c2: Cluster) -> None:
    c2.pod("10.2.0.1", "web")
    c2.pod("10.2.0.2", "db")
    c2.synced()
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(15)
        before = dict(view.ips())
        n = view.count()
        c2.server.freeze()  # SIGSTOP: the connection stays, nothing answers
        try:
            eventually(lambda: not status(mesh).connected, 15, "the frozen etcd noticed")
            s = status(mesh)
            assert not s.ready and s.endpoints == 2 and "lost" in (s.last_error or "")
            time.sleep(1.5)  # several reconnect attempts, all timing out
            assert view.ips() == before and view.count() == n  # an outage removes nothing
        finally:
            c2.server.thaw()
        eventually(lambda: mesh.status().ready, 20, "ready again")
        assert status(mesh).reconnections >= 1 and view.ips() == before
        # the reconnect's listing found nothing new: only an empty resync delta
        assert all(d.empty and d.resync for d in view.since(n))


def test_killed_remote_etcd_keeps_entries_then_converges(c2: Cluster) -> None:
    c2.pod("10.2.0.1", "web")
    c2.pod("10.2.0.2", "web")
    c2.synced()
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(15)
        c2.server.kill()
        eventually(lambda: not status(mesh).connected, 10, "the killed etcd noticed")
        c2.pub.delete_endpoint("10.2.0.1")  # the remote agent's changes, queued while etcd is down
        c2.pod("10.2.0.5", "web")
        time.sleep(2)  # back-off rounds against a closed port
        assert view.ips() == {"10.2.0.1": 2 << 16, "10.2.0.2": 2 << 16} and status(mesh).endpoints == 2
        c2.server.restart()  # same data, same cluster
        assert c2.pub.flush(20)
        eventually(lambda: view.ips() == {"10.2.0.2": 2 << 16, "10.2.0.5": 2 << 16}, 20, "converged")
        assert mesh.wait_ready(10) and status(mesh).reconnections >= 1 and status(mesh).etcd_replaced == 0
        assert_view_is_snapshot(mesh, view)


class TcpProxy:
    """A loopback TCP forwarder the test can cut (every connection reset, the port closed) and
    heal: a partition between the mesh and the remote's etcd while the remote keeps working."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.heal()

    def heal(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            socks, self._socks = self._socks, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_partition_then_stale_marking_removes_only_what_is_gone(c2: Cluster) -> None:
    """cilium#24740: a pod deleted during the outage is removed after the reconnect, one added
    appears, one whose identity changed is updated, and the entries that stayed are untouched."""
    web = c2.pod("10.2.0.1", "web")
    c2.pod("10.2.0.2", "web")
    c2.pod("10.2.0.3", "web")
    c2.synced()
    proxy = TcpProxy(c2.server.client_port)
    view = View()
    try:
        with ClusterMesh("c1", 1, [c2.remote(endpoint=f"http://127.0.0.1:{proxy.port}")], view,
                         tuning=FAST) as mesh:
            assert mesh.wait_ready(15)
            proxy.cut()
            eventually(lambda: not status(mesh).connected, 10, "the partition noticed")
            c2.pub.delete_endpoint("10.2.0.1")  # the remote changes while we cannot see it
            db = c2.pod("10.2.0.3", "db")
            c2.pod("10.2.0.4", "web")
            assert c2.pub.flush(10)
            time.sleep(1)
            assert view.ips() == {"10.2.0.1": web.id, "10.2.0.2": web.id, "10.2.0.3": web.id}
            n = view.count()
            proxy.heal()
            eventually(lambda: view.ips() == {"10.2.0.2": web.id, "10.2.0.3": db.id, "10.2.0.4": web.id},
                       20, "converged after the reconnect")
            changed = view.since(n)
            assert changed[-1].resync or mesh.wait_ready(5)
            removed = [str(e.prefix.network_address) for d in changed for e in d.endpoints_removed]
            added = [str(e.prefix.network_address) for d in changed for e in d.endpoints_added]
            assert removed == ["10.2.0.1"] and sorted(added) == ["10.2.0.3", "10.2.0.4"]
            assert [i.id for d in changed for i in d.identities_added] == [db.id]
            assert_view_is_snapshot(mesh, view)
    finally:
        proxy.cut()


def test_remote_etcd_replaced_behind_the_same_address(c2: Cluster, servers: Callable[..., EtcdServer]) -> None:
    """cilium#32005: another etcd cluster answers at the remote's address. Nothing of the old
    connection is reused; what the new etcd does not hold is removed after its listing."""
    c2.pod("10.2.0.1", "web")
    c2.synced()
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(15)
        c2.close()
        c2.server.restart_fresh()  # wiped: a new etcd cluster on the same ports
        eventually(lambda: not status(mesh).ready, 10, "the replaced etcd noticed")
        fresh = Cluster("c2", 2, c2.server, node="n7")
        try:
            fresh.pod("10.2.0.9", "db")
            fresh.synced()
            eventually(lambda: view.ips() == {"10.2.0.9": 2 << 16}, 20, "the new etcd's entries only")
            # every path's canary, not only the ipcache's: ready on the new etcd
            s = eventually(lambda: st if (st := status(mesh)).ready else None, 10, "ready on the new etcd")
            assert s.etcd_replaced == 1 and s.ready and [n for _, n in view.nodes] == ["n7"]
            # and then the new cluster-config names another ID: everything under ID 2 goes
            n = view.count()
            fresh.store.put(wire.cluster_config_key("c2"), wire.encode_cluster_config(wire.ClusterConfig(id=3)))
            eventually(lambda: status(mesh).cluster_id == 3 and view.ips() == {}, 15, "drained on the ID change")
            assert any(d.endpoints_removed for d in view.since(n))
        finally:
            fresh.close()


# -- refusals ---------------------------------------------------------------------------------------


def test_cluster_id_of_the_local_cluster_is_refused(servers: Callable[..., EtcdServer]) -> None:
    c9 = Cluster("c9", 1, servers("c9"))
    try:
        c9.pod("10.9.0.1", "web")
        c9.synced()
        view = View()
        with ClusterMesh("c1", 1, [c9.remote()], view, tuning=FAST) as mesh:
            eventually(lambda: "collides with the local cluster" in (status(mesh, "c9").last_error or ""),
                       10, "refusal")
            time.sleep(1)  # retried, refused again
            s = status(mesh, "c9")
            assert not s.ready and s.cluster_id is None and s.endpoints == 0 and view.deltas == []
    finally:
        c9.close()


def test_cluster_id_collision_between_two_remotes(c2: Cluster, servers: Callable[..., EtcdServer]) -> None:
    c3 = Cluster("c3", 2, servers("c3"))  # misconfigured: the ID of c2
    try:
        c2.pod("10.2.0.1", "web")
        c2.synced()
        c3.pod("10.3.0.1", "web")
        c3.synced()
        view = View()
        with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
            assert mesh.wait_ready(15)
            mesh.reconfigure([c2.remote(), c3.remote()])
            eventually(lambda: "collides with remote 'c2'" in (status(mesh, "c3").last_error or ""), 10, "refusal")
            assert not status(mesh, "c3").ready and status(mesh, "c2").ready
            assert view.ips("c3") == {} and view.ips("c2") == {"10.2.0.1": 2 << 16}
            mesh.reconfigure([c3.remote()])  # c2 goes: its ID is free, c3 is accepted on its retry
            eventually(lambda: view.ips("c3") == {"10.3.0.1": 2 << 16} and view.ips("c2") == {}, 15, "c3 merged")
            assert mesh.wait_ready(5)
    finally:
        c3.close()


def test_out_of_range_identities_and_endpoints_are_refused(c2: Cluster) -> None:
    web = c2.pod("10.2.0.1", "web")
    c2.pub.upsert_endpoint("10.2.0.2", 6)  # remote-node: reserved, any cluster may publish it
    c2.pub.upsert_endpoint("192.168.2.1", 1)  # host: becomes remote-node here
    foreign = 3 << 16  # cluster 3's number, written by hand into c2's store
    s = c2.store
    s.put(wire.identity_id_key(foreign), b"k8s:app=x;k8s:io.cilium.k8s.policy.cluster=c2;")
    s.put(wire.identity_id_key((2 << 16) + 9), b"k8s:app=x;k8s:io.cilium.k8s.policy.cluster=c3;")
    s.put(wire.ip_key(ipaddress.ip_network("10.2.0.66/32")),
          wire.encode_ip_identity(wire.IPIdentityPair(ipaddress.ip_network("10.2.0.66/32"), foreign)))
    s.put(wire.ip_key(ipaddress.ip_network("10.2.0.67/32")),
          wire.encode_ip_identity(wire.IPIdentityPair(ipaddress.ip_network("10.2.0.67/32"), (1 << 24) + 1)))
    c2.synced()
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(15)
        assert view.ips() == {"10.2.0.1": web.id, "10.2.0.2": 6, "192.168.2.1": 6}
        assert list(view.identities) == [("c2", web.id)]
        st = status(mesh)
        assert st.refused == 4 and st.malformed == 0 and "refused" in (st.last_error or "")


def test_malformed_values_are_counted_and_skipped(c2: Cluster) -> None:
    web = c2.pod("10.2.0.1", "web")
    c2.pod("10.2.0.2", "web")
    s = c2.store
    s.put(wire.ip_key(ipaddress.ip_network("10.2.0.50/32")), b"{not json")
    s.put(wire.identity_id_key((2 << 16) + 50), b"no-semicolon")
    s.put(wire.node_key("c2", "broken"), b'{"Name": 5}')
    c2.synced()
    view = View()
    with ClusterMesh("c1", 1, [c2.remote()], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(15)
        assert status(mesh).malformed == 3 and set(view.ips()) == {"10.2.0.1", "10.2.0.2"}
        # a known key turning malformed is removed; the watcher lives on and merges what follows
        s.put(wire.ip_key(ipaddress.ip_network("10.2.0.2/32")), b"\xff\xfe")
        c2.pod("10.2.0.3", "web")
        eventually(lambda: view.ips() == {"10.2.0.1": web.id, "10.2.0.3": web.id}, 10, "skipped and merged")
        assert status(mesh).malformed == 4 and status(mesh).connected and status(mesh).reconnections == 0


# -- TLS ------------------------------------------------------------------------------------------------


def test_tls_with_client_certificates(servers: Callable[..., EtcdServer], tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    server = servers("c2tls", tls=tls)
    files = {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert), "key_file": str(tls.client_key)}
    c2 = Cluster("c2", 2, server, **files)
    try:
        c2.pod("10.2.0.1", "web")
        c2.synced()
        view = View()
        remotes = [c2.remote(**files),
                   RemoteConfig("c3", (server.endpoint,), ca_file=str(tls.ca)),  # no client certificate
                   RemoteConfig("c4", (server.endpoint,), ca_file=str(tls.ca), cert_file=str(tls.rogue_cert),
                                key_file=str(tls.rogue_key)),  # a certificate of another CA
                   RemoteConfig("c5", (server.endpoint,), ca_file=str(tmp_path / "missing.pem"))]
        with ClusterMesh("c1", 1, remotes, view, tuning=FAST) as mesh:
            eventually(lambda: status(mesh).ready, 15, "c2 ready over TLS")
            assert view.ips() == {"10.2.0.1": 2 << 16}
            for name in ("c3", "c4"):
                eventually(lambda: "refused this client" in (status(mesh, name).last_error or ""), 15, name)
                s = status(mesh, name)
                assert not s.connected and not s.ready and s.configured and s.endpoints == 0
            eventually(lambda: not status(mesh, "c5").configured, 10, "missing CA file")
            assert "missing.pem" in (status(mesh, "c5").last_error or "")
            assert not mesh.status().ready and set(view.ips("c2")) == {"10.2.0.1"}
    finally:
        c2.close()


# -- reconfigure, leases --------------------------------------------------------------------------------


def test_reconfigure_adds_and_removes_without_restart(c2: Cluster, servers: Callable[..., EtcdServer]) -> None:
    c3 = Cluster("c3", 3, servers("c3"))
    try:
        c2.pod("10.2.0.1", "web")
        c2.synced()
        c3.pod("10.3.0.1", "web")
        c3.synced()
        view = View()
        with ClusterMesh("c1", 1, [], view, tuning=FAST) as mesh:
            assert mesh.wait_ready(1) and mesh.status().remotes == ()
            mesh.reconfigure([c2.remote()])
            assert mesh.wait_ready(15) and view.ips("c2") == {"10.2.0.1": 2 << 16}
            mesh.reconfigure([c2.remote(), c3.remote()])
            assert mesh.wait_ready(15) and view.ips("c3") == {"10.3.0.1": 3 << 16}
            mesh.reconfigure([c3.remote()])
            assert view.ips("c2") == {} and ("c2", 2 << 16) not in view.identities
            assert [r.name for r in mesh.status().remotes] == ["c3"]
            mesh.reconfigure([c3.remote(), c2.remote()])
            assert mesh.wait_ready(15) and view.ips("c2") == {"10.2.0.1": 2 << 16}
            assert_view_is_snapshot(mesh, view)
    finally:
        c3.close()


def test_a_dead_agents_entries_expire_with_its_lease(servers: Callable[..., EtcdServer]) -> None:
    server = servers("c2")
    alive = Cluster("c2", 2, server, node="n1")
    dead = Cluster("c2", 2, server, node="n2", ttl=2)
    try:
        alive.pod("10.2.0.1", "web")
        dead.pod("10.2.1.1", "web")
        alive.synced()
        dead.synced()
        view = View()
        with ClusterMesh("c1", 1, [alive.remote()], view, tuning=FAST) as mesh:
            assert mesh.wait_ready(15) and set(view.ips()) == {"10.2.0.1", "10.2.1.1"}
            dead.pub.close(revoke=False)  # the agent dies: no goodbye, no keepalive
            dead.lease.close(revoke=False)
            eventually(lambda: set(view.ips()) == {"10.2.0.1"}, 10, "the dead node's endpoint expired")
            assert [n for _, n in view.nodes] == ["n1"]
            assert list(view.identities) == [("c2", 2 << 16)]  # still n1's
    finally:
        dead.store.close()
        alive.close()


# -- identity allocation shared by a cluster's agents -----------------------------------------------------


def test_two_agents_racing_for_the_same_labels_get_the_same_number(servers: Callable[..., EtcdServer]) -> None:
    server = servers("c2")
    stores = [EtcdKVStore(server.endpoint) for _ in range(2)]
    leases = [MeshLease(s, 30) for s in stores]
    allocs = [MeshIdentityAllocator(s, cluster="c2", cluster_id=2, node=f"n{i}", lease=lease)
              for i, (s, lease) in enumerate(zip(stores, leases))]
    apps = [f"app-{i}" for i in range(40)]
    results: list[dict[str, int]] = [{}, {}]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            order = apps if i == 0 else list(reversed(apps))
            for app in order:
                results[i][app] = allocs[i].allocate(identity_labels({"app": app}, namespace="ns",
                                                                      cluster="c2")).id
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert results[0] == results[1]  # same labels, same number, on both nodes
        assert len(set(results[0].values())) == len(apps)  # one number per label set
        assert all(n in range(2 << 16, 3 << 16) for n in results[0].values())
        ids = stores[0].list_prefix(wire.IDENTITY_ID_PREFIX)
        assert len(ids) == len(apps)  # no number was claimed twice for one label set
        assert len(stores[0].list_prefix(wire.IDENTITY_VALUE_PREFIX)) == 2 * len(apps)
        assert stores[0].list_prefix(wire.IDENTITY_LOCK_PREFIX) == []
    finally:
        for lease in leases:
            lease.close()
        for s in stores:
            s.close()


def test_an_unreachable_endpoint_is_skipped_for_the_next(c2: Cluster) -> None:
    c2.pod("10.2.0.1", "web")
    c2.synced()
    view = View()
    dead = f"http://127.0.0.1:{free_port()}"
    with ClusterMesh("c1", 1, [RemoteConfig("c2", (dead, c2.server.endpoint))], view, tuning=FAST) as mesh:
        assert mesh.wait_ready(20)
        assert status(mesh).endpoint == c2.server.endpoint and view.ips() == {"10.2.0.1": 2 << 16}


def test_an_allocation_that_finds_the_lease_gone_grants_a_new_one_at_once(c2: Cluster) -> None:
    """A pod applied just after the cluster's etcd came back, before the keepalive noticed that
    the node's lease expired meanwhile: the allocation grants a new lease and succeeds, and the
    node's keys are written again on it (the keepalive runs every ttl/3 = 10 s here: too late)."""
    held = c2.pod("10.2.0.10", "first")
    old = c2.lease.id
    c2.store.revoke(old)  # as an expiry during an outage: the lease and its keys are gone
    ident = c2.alloc.allocate(identity_labels({"app": "second"}, namespace="default", cluster="c2"))
    assert c2.lease.id != old and c2.lease.regrants == 1
    # both identities' value keys are back, on the new lease
    for i in (held, ident):
        values = c2.store.list_prefix(wire.IDENTITY_VALUE_PREFIX)
        assert any(v == wire.encode_identity_number(i.id) and k.endswith("/n1") for k, v in values), values
