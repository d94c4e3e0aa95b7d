"""The cluster mesh (issue 13) at size: a remote cluster with 10,000 identities and 50,000
endpoints in its own etcd, merged by a `ClusterMesh` in this process.

One etcd (Debian etcd-server 3.4) plays the remote cluster "c2" (ID 2), started by
`l7gate.testing.etcd` on free loopback ports with its data dir in the scratch folder and
stopped by PID at the end (never port 2379). Setup, not timed: 10,000 identities written in
Cilium's allocator layout (an id key and one node's value key each, in bulk, as the cluster's
allocators would have left them), 50,000 endpoints through the real writer (`MeshPublisher`),
the node, and the sync canaries.

1. Merge: from `ClusterMesh.start()` until `on_change` has delivered every identity and every
   endpoint (connect, cluster-config, canaries, two listings, decoding, checks, one delta).
2. Resync after a reconnect: the mesh is made to reconnect (a changed endpoint list) while it
   holds all 60,000 entries: a new connection, a fresh listing, stale-marking against what it
   holds, until it is ready again. The delta must be empty (nothing changed remotely). Also
   once for real: SIGKILL of the remote etcd, restart on the same data, until ready again
   (that one includes etcd's own start and the mesh's reconnect back-off).
3. Idle CPU: the merged mesh left alone (the writer closed; its keys live on their lease) for
   10 s: this process's CPU time (every thread, gRPC's included) over wall time.

Baselines, same run: for 1 and 2, the same 60,000 values written into the embedded SQLite store
and read back with `list_prefix` and decoded with the same codecs (what merging costs without
etcd, the network or the mesh); for 3, this process idle for as long with the mesh stopped.
"""

from __future__ import annotations

import gc
import logging
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from l7gate.clustermesh import ClusterMesh, MeshDelta, MeshLease, MeshPublisher, MeshTuning, RemoteConfig
from l7gate.clustermesh import wire
from l7gate.clustermesh.wire import NodeAddress, NodeRecord
from l7gate.identity import identity_labels
from l7gate.kvstore import EtcdKVStore, SQLiteKVStore
from run import Context, Result, fmt

CLUSTER, CLUSTER_ID, NODE = "c2", 2, "n1"


def _etcd_helper() -> Any:
    """The test infrastructure's etcd launcher (l7gate.testing.etcd)."""
    from l7gate.testing import etcd

    return etcd


def _identities(n: int) -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        labels = identity_labels({"app": f"app-{i}", "team": f"team-{i % 17}"},
                                 namespace=f"ns-{i % 50}", cluster=CLUSTER)
        out.append(((CLUSTER_ID << 16) + i, wire.encode_label_string(labels)))
    return out


def _ip(i: int) -> str:
    return f"10.{2 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"


class Counter:
    """on_change: counts merged entries and says when a target is reached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.identities = 0
        self.endpoints = 0
        self.deltas: list[MeshDelta] = []
        self.target = (0, 0)
        self.reached = threading.Event()

    def __call__(self, delta: MeshDelta) -> None:
        with self.lock:
            self.deltas.append(delta)
            self.identities += len(delta.identities_added) - len(delta.identities_removed)
            self.endpoints += len(delta.endpoints_added) - len(delta.endpoints_removed)
            if (self.identities, self.endpoints) == self.target:
                self.reached.set()


def _sqlite_baseline(ctx: Context, ids: list[tuple[int, str]], eps: list[tuple[str, bytes]]) -> list[float]:
    path = ctx.scratch / "baseline.db"
    store = SQLiteKVStore(str(path))
    try:
        with store.batch():
            for number, text in ids:
                store.put(wire.identity_id_key(number), text.encode())
            for key, value in eps:
                store.put(key, value)

        def read() -> None:
            for key, value in store.list_prefix(wire.IDENTITY_ID_PREFIX):
                wire.parse_identity_id_key(key)
                wire.decode_label_string(value.decode())
            for key, value in store.list_prefix(wire.IP_PREFIX):
                wire.parse_ip_key(key)
                wire.decode_ip_identity(value)

        return list(ctx.measure(read, runs=3, warmup=1).samples)
    finally:
        store.close()


def _cpu_share(seconds: float) -> float:
    gc.collect()
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return (time.process_time() - cpu) / (time.monotonic() - wall)


def run(ctx: Context) -> list[Result]:
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("needs the etcd binary (Debian etcd-server): bash scripts/install.sh")
    n_ids, n_eps = (1_000, 5_000) if ctx.quick else (10_000, 50_000)
    idle_seconds = 3.0 if ctx.quick else 10.0
    runs = 3
    helper = _etcd_helper()
    server = helper.EtcdServer(binary, Path(ctx.scratch) / "etcd-c2")
    server.start()
    ctx.log(f"etcd {server.endpoint} (pid {server.pid}) healthy in {server.started_in:.2f} s")
    tuning = MeshTuning(backoff_initial=0.1, backoff_max=1.0)
    merge: list[float] = []
    resync: list[float] = []
    resync_reported: list[float] = []
    notes: dict[str, str] = {}
    try:
        # -- the remote cluster's state (not timed) --------------------------------------------------
        ids = _identities(n_ids)
        writer = EtcdKVStore(server.endpoint)
        lease = MeshLease(writer, ttl=600, name="c2/n1")
        items = []
        for number, text in ids:
            items.append((wire.identity_id_key(number), text.encode()))
            items.append((wire.identity_value_key(text, NODE), str(number).encode()))
        writer.put_many(items, lease=lease.id)
        pub = MeshPublisher(writer, cluster=CLUSTER, cluster_id=CLUSTER_ID, node=NODE, lease=lease)
        pub.start()
        pub.set_node(NodeRecord(NODE, CLUSTER, CLUSTER_ID, (NodeAddress("InternalIP", "192.168.2.1"),)))
        started = time.perf_counter()
        for i in range(n_eps):
            pub.upsert_endpoint(_ip(i), ids[i % n_ids][0], host_ip="192.168.2.1", namespace=f"ns-{i % 50}",
                                pod_name=f"pod-{i}")
        pub.synced()
        if not pub.flush(300):
            raise RuntimeError(f"publisher did not finish: {pub.pending} pending, {pub.last_error}")
        published = time.perf_counter() - started
        ctx.log(f"published {n_eps} endpoints through MeshPublisher in {published:.2f} s")
        eps = writer.list_prefix(wire.IP_PREFIX)
        if len(eps) != n_eps:
            raise RuntimeError(f"{len(eps)} endpoints in etcd, published {n_eps}")
        baseline = _sqlite_baseline(ctx, ids, eps)
        ctx.log(f"SQLite baseline: {', '.join(fmt(b) for b in baseline)} s")

        remote = RemoteConfig(CLUSTER, (server.endpoint,))
        # -- 1. merge, from start ------------------------------------------------------------------
        for r in range(runs):
            counter = Counter()
            counter.target = (n_ids, n_eps)
            mesh = ClusterMesh("c1", 1, [remote], counter, tuning=tuning)
            gc.collect()
            t0 = time.perf_counter()
            mesh.start()
            if not counter.reached.wait(120):
                mesh.stop()
                raise RuntimeError(f"merge stalled at {counter.identities}/{counter.endpoints}: {mesh.status()}")
            merge.append(time.perf_counter() - t0)
            if r < runs - 1:
                mesh.stop()
        ctx.log(f"merge: {', '.join(fmt(t) for t in merge)} s")

        # -- 2. resync after a reconnect, the mesh holding everything --------------------------------
        for r in range(runs):
            before = mesh.status().remotes[0]
            seen = len(counter.deltas)
            endpoints = (server.endpoint,) * (2 + r % 2)  # a changed config: a fresh session
            t0 = time.perf_counter()
            mesh.reconfigure([RemoteConfig(CLUSTER, endpoints)])
            while True:
                s = mesh.status().remotes[0]
                if s.ready and s.last_sync != before.last_sync:
                    break
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"resync stalled: {s}")
                time.sleep(0.002)
            resync.append(time.perf_counter() - t0)
            resync_reported.append(s.last_sync_seconds or 0.0)
            extra = [d for d in counter.deltas[seen:] if not d.empty]
            if extra:
                raise RuntimeError(f"a reconnect with nothing changed emitted {sum(map(len, extra))} changes")
        ctx.log(f"resync: {', '.join(fmt(t) for t in resync)} s")

        # once for real: kill and restart the remote etcd under the merged mesh (quietly: the
        # mesh logs every failed reconnect attempt)
        logging.getLogger("l7gate.clustermesh").setLevel(logging.ERROR)
        server.kill()
        while mesh.status().remotes[0].connected:
            time.sleep(0.01)
        server.restart()
        t0 = time.perf_counter()
        while not mesh.status().ready:
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"no reconnect: {mesh.status()}")
            time.sleep(0.005)
        real_reconnect = time.perf_counter() - t0
        with counter.lock:
            merged = (counter.identities, counter.endpoints)
        if merged != (n_ids, n_eps):
            raise RuntimeError(f"after the restart the mesh holds {merged}")
        ctx.log(f"kill + restart: ready {real_reconnect:.2f} s after etcd was healthy again")

        # -- 3. idle CPU -----------------------------------------------------------------------------
        pub.close(revoke=False)
        lease.close(revoke=False)
        writer.close()
        time.sleep(1)
        idle = _cpu_share(idle_seconds)
        status = mesh.status().remotes[0]
        mesh.stop()
        time.sleep(1)
        background = _cpu_share(idle_seconds)
        notes["idle"] = (f"{idle_seconds:g} s; mesh ready with {status.identities} identities, "
                         f"{status.endpoints} endpoints; {status.reconnections} reconnections")
    finally:
        server.stop()

    base = statistics.median(baseline)
    size = f"{n_ids} identities + {n_eps} endpoints"
    return [
        Result(name=f"merge {size} from a remote etcd (start -> all delivered)",
               value=statistics.median(merge), unit="s",
               baseline_name="list + decode them from local SQLite", baseline_value=base,
               goal="<= 5 s", goal_met=statistics.median(merge) <= 5,
               notes=f"runs: {', '.join(fmt(t) for t in merge)} s"),
        Result(name=f"resync after a reconnect, holding {size} (stale-marked, nothing changed)",
               value=statistics.median(resync), unit="s",
               baseline_name="list + decode them from local SQLite", baseline_value=base,
               goal="<= 5 s", goal_met=statistics.median(resync) <= 5,
               notes=(f"runs: {', '.join(fmt(t) for t in resync)} s; status last_sync_seconds "
                      f"{', '.join(fmt(t) for t in resync_reported)} s; the delta was empty each time")),
        Result(name="remote etcd SIGKILLed and restarted: ready again after it is healthy",
               value=real_reconnect, unit="s", goal="<= 5 s (includes the reconnect back-off, max 1 s here)",
               goal_met=real_reconnect <= 5, notes=f"same {size}, kept through the outage"),
        Result(name="idle mesh CPU (this process, all threads)", value=100 * idle, unit="% of a core",
               baseline_name="this process idle, mesh stopped", baseline_value=100 * background,
               goal="<= 1 % of a core", goal_met=idle <= 0.01, notes=notes["idle"]),
        Result(name=f"publish {n_eps} endpoints through MeshPublisher (setup, for reference)",
               value=published, unit="s", notes="asynchronous writer: put_many, 128 keys per etcd txn"),
    ]

