"""l7gate.clustermesh: Cilium Cluster Mesh, in Cilium's etcd layout (DESIGN decision 9).

One etcd per cluster. Each agent writes its share of its own cluster's state there, and reads
every remote cluster's etcd. Keys and value formats are Cilium's (`wire`; docs/clustermesh.md
lists every key with its Cilium source), so `etcdctl get --prefix cilium/` reads as usual.

What the agent uses (nothing here knows about the agent; it wires these in):

Writing its own cluster (one of each per agent, on the local cluster's `EtcdKVStore`)::

    lease = MeshLease(store, ttl=15, name=f"{cluster}/{node}")       # keepalive thread
    allocator = MeshIdentityAllocator(store, cluster=cluster, cluster_id=cid, node=node,
                                      lease=lease, local=IdentityAllocator(...))  # CIDR ids
    publisher = MeshPublisher(store, cluster=cluster, cluster_id=cid, node=node, lease=lease)
    publisher.start()                      # checks/writes cilium/cluster-config/<cluster>
    publisher.set_node(NodeRecord(node, cluster, cid, (NodeAddress("InternalIP", ip),)))
    ident = allocator.allocate(pod_labels)          # shared with the cluster's other agents
    publisher.upsert_endpoint(pod_ip, ident.id, host_ip=node_ip, namespace=ns, pod_name=name)
    publisher.upsert_service(ClusterService.of(cluster, ns, svc_name, frontends=..., backends=...))
    publisher.synced()                     # canaries, once the initial state is queued
    ...
    publisher.delete_endpoint(pod_ip); allocator.release(ident)
    publisher.close(); lease.close()       # revokes the lease: this node's keys go at once

`MeshIdentityAllocator` has the calls of `identity.IdentityAllocator` the agent uses
(`allocate`, `release`, `lookup_by_id`, `lookup_by_labels`, `held`, `gc`).

Reading the remote clusters::

    mesh = ClusterMesh(cluster, cid, [RemoteConfig("c2", ("https://10.0.0.2:2379",),
                                                   ca_file=..., cert_file=..., key_file=...)],
                       on_change=apply_delta)
    mesh.start(); mesh.wait_ready(timeout)
    mesh.reconfigure(new_remotes)          # add / remove / change remotes, no restart
    mesh.status()                          # MeshStatus: what `l7gate clustermesh status` prints
    mesh.snapshot()                        # MeshSnapshot: everything merged now
    mesh.stop()

`on_change(MeshDelta)` is called from the mesh's threads, one delta at a time, in `sequence`
order. A delta names its remote cluster and carries `identities_added/removed`
(`RemoteIdentity`: cluster, id, labels), `endpoints_added/removed` (`RemoteEndpoint`: cluster,
prefix, identity, host_ip, namespace, pod_name), `nodes_added/removed` (`NodeRecord`) and
`services_added/removed` (`ClusterService`: a global service, its frontends and ready backends
with their ports by name).
"Added" means new or changed (replace what you had for that key); a key is in at most one list
of a delta. Apply identities before endpoints. An outage removes nothing: entries stay until the
remote's next listing says they are gone. The callback must be quick, must not raise, and must
not call `reconfigure` or `stop`.

Modules: `wire` (keys and codecs), `types` (the values above), `lease`, `allocator`,
`publisher`, `remote` (one remote's watcher), `mesh`.
"""

from l7gate.clustermesh.allocator import MeshIdentityAllocator
from l7gate.clustermesh.lease import MeshLease
from l7gate.clustermesh.mesh import ClusterMesh
from l7gate.clustermesh.publisher import MeshPublisher
from l7gate.clustermesh.remote import ClusterIDRegistry, RemoteCluster, etcd_store_factory
from l7gate.clustermesh.types import (
    MeshDelta,
    MeshError,
    MeshSnapshot,
    MeshStatus,
    MeshTuning,
    RemoteConfig,
    RemoteEndpoint,
    RemoteIdentity,
    RemoteStatus,
)
from l7gate.clustermesh.wire import (
    IDENTITIES_PATH,
    IP_PATH,
    NODES_PATH,
    SERVICES_PATH,
    ClusterConfig,
    ClusterService,
    IPIdentityPair,
    L4Addr,
    NodeAddress,
    NodeRecord,
    WireError,
)

__all__ = [
    "IDENTITIES_PATH",
    "IP_PATH",
    "NODES_PATH",
    "SERVICES_PATH",
    "ClusterConfig",
    "ClusterIDRegistry",
    "ClusterService",
    "ClusterMesh",
    "IPIdentityPair",
    "L4Addr",
    "MeshDelta",
    "MeshError",
    "MeshIdentityAllocator",
    "MeshLease",
    "MeshPublisher",
    "MeshSnapshot",
    "MeshStatus",
    "MeshTuning",
    "NodeAddress",
    "NodeRecord",
    "RemoteCluster",
    "RemoteConfig",
    "RemoteEndpoint",
    "RemoteIdentity",
    "RemoteStatus",
    "WireError",
    "etcd_store_factory",
]
