"""The agent's state and its reconcile steps: policies, pods, nodes, identities, ipcache, xDS.

Theory of operation. Inputs arrive as Kubernetes objects (CNP/CCNP/NetworkPolicy, CiliumCIDRGroup,
Pod, Namespace, Service, EndpointSlice, Node) through
`apply` and `delete` (the admin API, and the Kubernetes watch through `agent/kube.py`: the same path).
Each call is all-or-nothing: every object is parsed and checked first; one invalid object
(or the same object twice, or a pod address this datapath cannot serve) refuses the whole
request and nothing in force changes. A valid request then, in order:

1. in one kvstore transaction, persists the objects (so a restarted agent comes back with
   them) and, for pods, allocates identities (the pod's cluster decides the numeric range),
   updates the resolver's identities and the ipcache, registers local pods as endpoints and
   their ports as proxied ports;
2. for policies, once that transaction is committed: upserts them into the resolver's
   repository, all of them as one change (`Resolver.upsert_policies`), so 10,000 policies
   cost one recompute of each endpoint they select, not 10,000. A policy whose CIDR rules name
   CiliumCIDRGroups, or whose `toServices` rules name Services, goes in expanded with the groups
   and the Services' endpoints in force (`references.expand_policy`); the core keeps it as
   parsed too, and when a group, a Service or an EndpointSlice is created, changed or deleted,
   every such policy is expanded again and those whose expansion changed are upserted in the
   same change;
3. feeds every resulting `PolicyDelta` and ipcache change to the xDS publisher and flushes it,
   so the change is in Envoy's snapshot before the call returns. Node addresses (the Nodes', the
   pods' hostIP) get their identities at the flush (`_sync_node_identities`): this node's is
   `host`, another node's its own, from its Node's labels (`remote-node` while none is known).

Every change takes one lock: the admin server's threads are serialized here. Readers do not
take it for long: they answer from a `StateView`, the state as of the last completed change,
which a long apply keeps from before it starts (`view`).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from ..clustermesh.publisher import MeshPublisher
from ..clustermesh.types import MeshDelta, MeshError, RemoteEndpoint, RemoteIdentity
from ..clustermesh.wire import ClusterService, L4Addr, WireError, decode_cluster_service, encode_cluster_service
from ..identity.allocator import IdentityAllocator, fqdn_cidr_labels
from ..identity.fqdncache import FQDNCache
from ..identity.ipcache import IPCache, IPNetwork
from ..identity.numeric import HOST, REMOTE_NODE, RESERVED, WORLD_IPV4, WORLD_IPV6, Identity, IdentityError, ip_address
from ..k8s.objects import (
    ANY_CLUSTER, ENDPOINT_KINDS, K8sObjectError, Namespace, Node, Pod, namespace_of, node_addresses,
    node_identity_labels, parse_endpoint_slice, parse_node, parse_pod, parse_service, pod_backend,
    pod_identity_labels, scoped_namespace, service_target,
)
from ..kvstore.api import KVStoreError
from ..kvstore.sqlite import SQLiteKVStore
from ..policy.cidrgroup import CIDRGroup, parse_cidr_group
from ..policy.errors import PolicyValidationError
from ..policy.labels import Labels
from ..policy.parse import KIND_CIDR_GROUP, POLICY_INPUT_KINDS, POLICY_KINDS, parse_policy
from ..policy.mapstate import Action, Decision, EndpointPolicy, PolicyDelta, decide
from ..policy.namedports import NamedPorts
from ..policy.references import expand_policy, references, references_groups, references_services
from ..policy.resolve import Resolver
from ..policy.fqdn import FQDNSelector, fqdn
from ..policy.selector import CIDRSelector, PeerSelector
from ..policy.types import AuthMode, Direction
from ..policy.types import Protocol as L4Protocol
from ..policy.toservices import ServiceTarget
from ..policy.types import Policy
from ..redirect_bpf.applier import IptablesRedirect, KernelApplier
from ..redirect_bpf.loader import KernelDatapath
from ..services import Backend, EndpointSlice, Frontend, FrontendEntry, Service, ServiceTable
from ..envoy_names import TLS_STATE
from ..observe.als import tcp_grpc_access_log
from ..xds.egress import EgressPublisher, LocalPod, egress_http_ports, ingress_http_ports
from ..xds.publisher import Publisher, ResourceSink
from ..xds.resources import ProxiedPort
from ..xds.tunnel_plan import PodView, TunnelInputs
from .config import AgentConfig
from .heap import collector_paused, settle_heap

PREFIX = "l7gate/v1/"
POLICY_PREFIX = PREFIX + "policies/"
POD_PREFIX = PREFIX + "pods/"
NAMESPACE_PREFIX = PREFIX + "namespaces/"
SERVICE_PREFIX = PREFIX + "services/"  # <cluster>/<namespace>/<name>
ENDPOINT_SLICE_PREFIX = PREFIX + "endpointslices/"  # <cluster>/<namespace>/<name>
NODE_PREFIX = PREFIX + "nodes/"  # <cluster>/<name>
CIDR_GROUP_PREFIX = PREFIX + "cidrgroups/"  # <name>: a CiliumCIDRGroup as applied
FQDN_PREFIX = PREFIX + "fqdn/"  # <name>: what the DNS proxy learned for it (identity.fqdncache)
MESH_PREFIX = PREFIX + "mesh/"  # remote clusters' entries as last seen: <cluster>/identities|endpoints|services/<key>


T = TypeVar("T")


class ApplyError(Exception):
    """A request refused as a whole: `errors` names every object and field at fault."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True, slots=True)
class PodRecord:
    pod: Pod
    identity: int
    labels: Labels
    local: bool


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A Node in force and what the agent made of it: the identity its addresses have (None:
    it has no IPv4 address), whether it is this agent's node."""

    node: Node
    identity: int | None
    local: bool


@dataclass(slots=True)
class ApplyResult:
    created: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # applied, but not in force as written (e.g. auth required without mutual auth)
    warnings: list[str] = field(default_factory=list)
    # Seconds the agent spent, per step (check, persist, resolve, publish) and in total: what
    # a long apply is told about where its time went.
    timing: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "configured": self.configured,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "warnings": self.warnings,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
        }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# A request with this many objects takes a view for readers before it changes anything
# (`AgentCore.view`); a smaller one holds the lock for milliseconds, and readers wait for it.
LONG_APPLY = 64


@dataclass(frozen=True, slots=True)
class StateView:
    """What the agent holds as of one completed change: immutable values and read-only copies
    of the core's indexes. Readers (the admin API, metrics) answer from it without the core's
    lock, so a long apply never makes them wait: until it completes they see the state before
    it. Owned by no one; safe to share between threads."""

    revision: int  # the core's change counter
    policy_revision: int  # the resolver's repository revision
    policy_docs: Mapping[str, Any]  # policy key → the object as applied
    pods: Mapping[str, PodRecord]  # pod ref → record
    identities: Mapping[int, Labels]
    endpoints: Mapping[int, EndpointPolicy]  # local endpoint identity → its resolved policy
    services: tuple[Service, ...] = ()
    frontends: Mapping[Frontend, FrontendEntry] = field(default_factory=dict)
    # (backend address, port) → the Services ("namespace/name") it is a backend of, for flows
    backends: Mapping[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)
    # remote cluster → the global services it publishes (cluster mesh), by namespace/name
    remote_services: Mapping[str, tuple[ClusterService, ...]] = field(default_factory=dict)
    # namespace/name of the global Services this agent publishes to its cluster's etcd
    published_services: tuple[str, ...] = ()
    # CiliumCIDRGroup/<name> → the object as applied
    cidr_group_docs: Mapping[str, Any] = field(default_factory=dict)
    # namespace/name → what toServices reads of the Service (its endpoints' addresses)
    service_targets: Mapping[str, ServiceTarget] = field(default_factory=dict)
    nodes: Mapping[str, NodeRecord] = field(default_factory=dict)  # <cluster>/<name> → record

    def pods_of(self) -> dict[int, list[str]]:
        """Identity → the refs of its pods, sorted."""
        out: dict[int, list[str]] = {}
        for ref in sorted(self.pods):
            out.setdefault(self.pods[ref].identity, []).append(ref)
        return out

    @property
    def map_entries(self) -> int:
        return sum(len(p.ingress) + len(p.egress) for p in self.endpoints.values())


class AgentCore:
    def __init__(
        self,
        config: AgentConfig,
        store: SQLiteKVStore,  # the node's own: a request's objects go in with one put_many, in its batch
        sink: ResourceSink,
        access_logs: Sequence[Message] = (),
        datapath: KernelDatapath | None = None,
        fallback: IptablesRedirect | None = None,
        *,
        mesh_allocator: Allocator | None = None,
        mesh_publisher: MeshPublisher | None = None,
        socket_lb: ServiceDatapath | None = None,
    ) -> None:
        """`datapath`: the kernel datapath (kernel mode with bcc), whose maps this core keeps in
        line with its resolved policy through a `KernelApplier` it owns; `fallback`: the
        iptables redirect instead. Neither: loopback mode.

        In a cluster mesh (docs/clustermesh.md): `mesh_allocator` allocates this cluster's
        identities in its etcd, shared with the cluster's other agents; `mesh_publisher` is
        told this node's endpoints; remote clusters' identities and endpoints arrive through
        `apply_mesh`, and pods of other clusters are not applied by hand.

        Services (docs/services.md): the core keeps the service table; `socket_lb`, the kernel's
        socket load balancer, is told every frontend and its backends after each change. Without
        it (loopback mode, the iptables fallback, kernel mode without a cgroup) ClusterIPs are
        not served, and the status says so."""
        self.config = config
        self.store = store
        self._lock = threading.RLock()
        self.resolver = Resolver()
        # The reserved identities an address can have: entities select them (`world`, the
        # identity of every address the ipcache does not know; `host`, `remote-node`: node
        # addresses are in the ipcache as such; a mesh may publish others). world-ipv4/-ipv6
        # are not used: an unknown IPv4 address is `world`.
        self.resolver.update_identities(
            {i.id: i.labels for n, i in RESERVED.items() if n not in (WORLD_IPV4, WORLD_IPV6)})
        self.ipcache = IPCache()
        ids = {config.cluster_id, *config.clusters.values()}
        self._allocators: dict[int, Allocator] = {
            cid: IdentityAllocator(store, cluster_id=cid, owner=config.allocator_owner) for cid in ids}
        if mesh_allocator is not None:
            self._allocators[config.cluster_id] = mesh_allocator
        self._mesh_publisher = mesh_publisher
        # Remote clusters' state (apply_mesh): identity → (cluster, labels); (cluster, prefix) →
        # the pod ref its record is under; and, after a restart, the entries restored from the
        # store that their cluster's first listing has not confirmed yet.
        self._mesh_identities: dict[int, tuple[str, Labels]] = {}
        self._mesh_endpoints: dict[tuple[str, str], str] = {}
        self._mesh_unconfirmed: dict[str, set[tuple[str, str]]] = {}
        # Global services (docs/clustermesh.md, "Global services"): what each remote cluster
        # publishes, by namespace/name, and the backend addresses that turned into (to name their
        # pods once the remote's endpoints arrive); the Services this agent publishes, and
        # whether a change of Services or pods may have changed them.
        self._mesh_services: dict[str, dict[str, ClusterService]] = {}
        self._mesh_service_ips: dict[str, set[str]] = {}
        self._published_services: set[str] = set()
        self._publish_dirty = True
        self._local_services_changed = False
        self.mesh_services_error = ""  # the last global service the publisher refused
        self._policy_docs: dict[str, Any] = {}
        # CiliumCIDRGroups by name (and their documents by key, CiliumCIDRGroup/<name>); the
        # Services as toServices reads them (namespace/name → target: their EndpointSlices'
        # addresses); and the policies that name groups or Services, as parsed: the resolver
        # holds them expanded with the groups and Services in force.
        self._cidr_groups: dict[str, CIDRGroup] = {}
        self._cidr_group_docs: dict[str, Any] = {}
        self._service_targets: dict[str, ServiceTarget] = {}
        self._ref_policies: dict[str, Policy] = {}
        self._pods: dict[str, PodRecord] = {}
        # Indexes over `_pods`, so that one change costs O(change), not O(pods).
        self._local_pods: dict[str, PodRecord] = {}
        self._ip_owner: dict[str, str] = {}  # pod IP → pod ref
        self._pod_nodes: dict[str, str] | None = None  # pod IP → host IP, rebuilt after a change
        self._pod_docs: dict[str, Any] = {}
        self._namespaces: dict[tuple[str, str], Namespace] = {}
        self._namespace_docs: dict[str, Any] = {}  # <cluster or *>/<name> → the object as applied
        self._identity_pods: dict[int, set[str]] = {}
        # The named container ports the pods of each identity declare, counted per pod: each
        # (name, port, protocol), and each (name, protocol) once per pod declaring it (policies'
        # named ports resolve against them, `policy.namedports`; on ingress every pod must
        # declare the name, so a pod without it counts too).
        self._named_declared: dict[int, Counter[tuple[str, int, str]]] = {}
        self._named_pods: dict[int, Counter[tuple[str, str]]] = {}
        # CIDR identities (Cilium's): each prefix a policy's CIDR selector names (its `except`s
        # too) has a local identity labelled `cidr:<prefix>` in the ipcache, so that an address
        # inside it is that identity (longest prefix: a pod's own /32 wins) and the selector
        # selects it. Prefix → identity number.
        self._cidr_identities: dict[IPNetwork, int] = {}
        # Node addresses (Cilium's `host` and `remote-node` entities): this node's address, its
        # Nodes' addresses and the pods' `status.hostIP` are in the ipcache as `host` (1) for
        # this node, for every other node the identity of its Node's labels (remote-node scope),
        # or `remote-node` (6) while no Node says what they are; /32 → identity, as written
        # (`_sync_node_identities`). Nodes by <cluster>/<name>, with the object as applied.
        self._nodes: dict[str, Node] = {}
        self._node_docs: dict[str, Any] = {}
        self._node_records: dict[str, NodeRecord] = {}
        self._node_idents: dict[str, Identity] = {}  # another node's ref → its allocated identity
        self._node_identities: dict[IPNetwork, int] = {}
        self._nodes_dirty = True
        # toFQDNs (docs/fqdn.md): what the DNS proxy learned, the policies' FQDN selectors, and
        # the local identity of each learned address some selector matches (ip → number, labels).
        self.fqdn = FQDNCache(config.dns.min_ttl, config.dns.max_ips_per_name)
        self._fqdn_selectors: tuple[FQDNSelector, ...] = ()
        self._fqdn_identities: dict[str, tuple[int, Labels]] = {}
        # The expiry last written per name (a refresh that extends it little is not written
        # again: one store commit per answer was most of a lookup's cost), the earliest expiry
        # in the cache, and the DNS decision per (pod address, resolver address) as of a revision.
        self._fqdn_persisted: dict[str, float] = {}
        self._fqdn_next_expiry = float("inf")
        self._dns_decisions: dict[tuple[str, str], tuple[tuple[int, int], Decision | None, tuple[str, ...]]] = {}
        self.services = ServiceTable()
        self._service_docs: dict[str, Any] = {}  # <cluster>/<namespace>/<name> → the object as applied
        self._slice_docs: dict[str, Any] = {}  # EndpointSlices: <cluster>/<namespace>/<name> → as applied
        self.socket_lb = socket_lb
        self._services_dirty = socket_lb is not None  # the kernel's maps are reconciled at start
        self.services_error = ""  # the socket LB's last refusal, for the status
        # The state as of the last completed change, for readers; None until one asks for it
        # again (or a long apply keeps it) after a change.
        self._view: StateView | None = None
        # Inside `batch()`: how deep, and whether a change inside it waits for its publication.
        self._batch_depth = 0
        self._flush_deferred = False
        # The kernel checks mutual auth before it redirects a connection to Envoy; without it
        # (loopback, the iptables fallback) Envoy refuses auth-required peers itself.
        tls_logs = [tcp_grpc_access_log(filter_state_objects=[TLS_STATE])] if access_logs else []
        self.publisher = Publisher(sink, config.node_id, self.resolver.endpoint_policy, access_logs,
                                   auth_verified=datapath is not None, tcp_access_logs=tls_logs)
        # Egress HTTP rules (kernel mode with Envoy): the egress listener the kernel hands such
        # connections to (xds/egress.py); rendered when the policies, the ipcache or the local
        # pods changed since the last flush.
        self.egress = (EgressPublisher(sink, config.node_id, config.proxy_egress_port, access_logs,
                                       tcp_access_logs=tls_logs)
                       if datapath is not None and config.proxy_egress_port else None)
        self._egress_seen: tuple[int, int, int, frozenset[tuple[str, int]]] | None = None
        self._port_memo: dict[int, tuple[object, frozenset[int]]] = {}  # identity → (ingress map, ports)
        self.ipcache.subscribe(self.publisher.on_ipcache_change)
        self.kernel = (KernelApplier(datapath, self.resolver.endpoint_policy, tunnel=config.mtls.tunnel)
                       if datapath is not None else None)
        kernel = self.kernel
        self.fallback = fallback
        # Called (under the core's lock) after every change is flushed: mutual auth follows it.
        self._change_listeners: list[Callable[[], None]] = []
        if kernel is not None:
            self.ipcache.subscribe(kernel.on_ipcache_change)
        self.revision = 0
        self._restore()
        if kernel is not None:
            with self._lock:
                # Reconcile, never flush: whatever the pinned maps hold is corrected in place.
                kernel.resync(
                    self.resolver.endpoints(),
                    {e.prefix: e.identity for e in self.ipcache.snapshot()},
                    self._local_pod_ips(),
                )

    # -- restore ----------------------------------------------------------------------------

    def _restore(self) -> None:
        with self._lock:
            self._restore_mesh()
            docs: list[Any] = []
            for prefix in (NAMESPACE_PREFIX, NODE_PREFIX, POD_PREFIX, SERVICE_PREFIX, ENDPOINT_SLICE_PREFIX, CIDR_GROUP_PREFIX,
                           POLICY_PREFIX):
                for _, value in self.store.list_prefix(prefix):
                    docs.append(json.loads(value))
            if docs:
                with collector_paused():
                    self._apply_locked(docs, persist=False)
                settle_heap()
            else:
                self.publisher.flush()
                self._flush_services()
            # What DNS taught before the restart: learned addresses stay allowed while pods
            # look them up again (issue: toFQDNs survives an agent restart).
            self._restore_fqdn()
            if self.fqdn.ips():
                self._flush()

    # -- apply / delete ----------------------------------------------------------------------

    def apply(self, docs: Iterable[Any]) -> ApplyResult:
        docs = list(docs)
        with self._lock:
            long = len(docs) >= LONG_APPLY
            if long:
                # Readers answer from the state in force until this request is, not after it.
                self._keep_view()
            with collector_paused() if long else nullcontext():
                result = self._apply_locked(docs, persist=True)
        settle_heap()
        return result

    def _check(self, docs: list[Any]) -> _Checked:
        errors: list[str] = []
        policies: list[tuple[Policy, Any]] = []
        namespaces: list[tuple[Namespace, Any]] = []
        pods: list[tuple[Pod, Any]] = []
        services: list[tuple[Service, Any]] = []
        slices: list[tuple[EndpointSlice, Any]] = []
        groups: list[tuple[CIDRGroup, Any]] = []
        nodes: list[tuple[Node, Any]] = []
        # One request, one object per key: applying both would keep the later one silently.
        first: dict[str, int] = {}

        def once(key: str, i: int, what: str) -> bool:
            if key in first:
                errors.append(
                    f"object {i + 1}: {key} is also object {first[key]} of this request: a request may "
                    f"hold each {what}; remove or rename one"
                )
                return False
            first[key] = i + 1
            return True

        for i, doc in enumerate(docs):
            kind = doc.get("kind") if isinstance(doc, dict) else None
            try:
                if kind in POLICY_KINDS:
                    policy = parse_policy(doc, cluster_name=self.config.cluster_name)
                    if once(policy.key, i, "policy once (same kind, namespace and name)"):
                        policies.append((policy, doc))
                elif kind == KIND_CIDR_GROUP:
                    group = parse_cidr_group(doc)
                    if once(group.key, i, "CiliumCIDRGroup once (same name)"):
                        groups.append((group, doc))
                elif kind == "Pod":
                    pod = parse_pod(doc, default_cluster=self.config.cluster_name)
                    if self.config.cluster_id_of(pod.cluster) is None:
                        errors.append(
                            f"Pod {pod.ref}: cluster {pod.cluster!r} has no id: add it to the "
                            f"agent's `clusters` map"
                        )
                    elif self.config.clustermesh.enabled and pod.cluster != self.config.cluster_name:
                        errors.append(
                            f"Pod {pod.ref}: pods of cluster {pod.cluster} come from the cluster mesh (their "
                            f"cluster's agents publish them); this agent takes pods of {self.config.cluster_name} only"
                        )
                    elif pod.ip is None:
                        errors.append(f"Pod {pod.ref}: status.podIP is required")
                    elif problems := self._address_errors(pod):
                        errors.extend(problems)
                    elif once(f"pod/{pod.ref}", i, "pod once (same cluster, namespace and name)"):
                        pods.append((pod, doc))
                elif kind == "Service":
                    svc = parse_service(doc, default_cluster=self.config.cluster_name)
                    if svc.cluster != self.config.cluster_name:
                        errors.append(
                            f"Service {svc.cluster}/{svc.ref}: this agent takes Services of its own cluster "
                            f"({self.config.cluster_name}); other clusters' global Services come from the "
                            f"cluster mesh"
                        )
                    elif once(f"service/{svc.cluster}/{svc.ref}", i, "Service once (same namespace and name)"):
                        services.append((svc, doc))
                elif kind == "EndpointSlice":
                    es = parse_endpoint_slice(doc, default_cluster=self.config.cluster_name)
                    if es.cluster != self.config.cluster_name:
                        errors.append(
                            f"EndpointSlice {es.cluster}/{es.ref}: this agent takes EndpointSlices of its own "
                            f"cluster ({self.config.cluster_name})"
                        )
                    elif once(f"endpointslice/{es.cluster}/{es.ref}", i, "EndpointSlice once (same namespace and name)"):
                        slices.append((es, doc))
                elif kind == "Namespace":
                    # A Namespace without the cluster annotation describes that namespace in
                    # every cluster (as `l7gate policy trace` reads it): stored under "*".
                    ns = scoped_namespace(doc, default_cluster=self.config.cluster_name)
                    if once(f"namespace/{ns.cluster}/{ns.name}", i, "namespace once"):
                        namespaces.append((ns, doc))
                elif kind == "Node":
                    node = parse_node(doc, default_cluster=self.config.cluster_name)
                    if self.config.cluster_id_of(node.cluster) is None:
                        errors.append(f"Node {node.ref}: cluster {node.cluster!r} has no id: add it to the "
                                      f"agent's `clusters` map")
                    elif self.config.clustermesh.enabled and node.cluster != self.config.cluster_name:
                        errors.append(f"Node {node.ref}: with the cluster mesh this agent takes Nodes of "
                                      f"{self.config.cluster_name} only, as it takes its pods")
                    elif once(f"node/{node.ref}", i, "Node once (same cluster and name)"):
                        nodes.append((node, doc))
                else:
                    errors.append(
                        f"object {i + 1}: kind {kind!r} is not one of "
                        f"{', '.join((*POLICY_INPUT_KINDS, *ENDPOINT_KINDS))}"
                    )
            except PolicyValidationError as exc:
                errors.extend(f"{exc.resource}: {e}" for e in exc.errors)
            except K8sObjectError as exc:
                errors.extend(f"{exc.resource}: {e}" for e in exc.errors)
        claimed: dict[str, str] = {}  # this request's IPs, over those of the pods in force
        for pod, _ in pods:
            for ip in pod.ips:
                owner = claimed.get(ip) or self._ip_owner.get(ip)
                if owner is not None and owner != pod.ref:
                    errors.append(f"Pod {pod.ref}: IP {ip} is already used by {owner}")
                claimed[ip] = pod.ref
        errors.extend(self._node_address_errors(nodes))
        if errors:
            raise ApplyError(errors)
        return _Checked(policies, namespaces, pods, services, groups, slices, nodes)

    def _node_address_errors(self, nodes: list[tuple[Node, Any]]) -> list[str]:
        """One address, one node: a request's Nodes against each other and against the Nodes in
        force that it does not replace."""
        replaced = {node.ref for node, _ in nodes}
        owner = {ip: ref for ref, n in self._nodes.items() if ref not in replaced for ip in n.addresses}
        errors: list[str] = []
        for node, _ in nodes:
            for ip, where in zip(node.addresses, node.address_fields):
                other = owner.get(ip)
                if other is not None and other != node.ref:
                    errors.append(f"Node {node.ref}: {where}: {ip} is already the address of Node {other}")
                owner.setdefault(ip, node.ref)
        return errors

    def _apply_locked(self, docs: list[Any], *, persist: bool) -> ApplyResult:
        t0 = time.perf_counter()
        checked = self._check(docs)
        policies = checked.policies
        t1 = time.perf_counter()
        try:
            # One transaction (one fsync) per request, committed before any policy of the
            # request comes into force: if the store refuses it, the policies in force stay.
            with self.store.batch():
                result, changed, changed_groups, touched = self._stage(checked, persist=persist)
            t2 = time.perf_counter()
            # The groups (and the Services' endpoints) come into force with the policies, once
            # the store has them.
            for group, doc in changed_groups:
                self._cidr_groups[group.name] = group
                self._cidr_group_docs[group.key] = doc
            services_changed = self._sync_service_targets(touched)
            # One resolver change for the whole request: each endpoint is recomputed once.
            self._feed(self.resolver.upsert_policies(
                self._expanded([p for p, _ in changed], groups_changed=bool(changed_groups),
                               services_changed=services_changed)))
            self._policy_docs.update((p.key, doc) for p, doc in changed)
            if changed or changed_groups or services_changed:
                self._sync_cidr_identities()
                self._sync_fqdn_selectors()
            result.warnings.extend(_slice_warnings(checked.slices))
            t3 = time.perf_counter()
            if not self.config.mtls.enabled:
                result.warnings.extend(w for policy, _ in policies for w in _auth_without_mtls(policy))
            if self.egress is None:
                result.warnings.extend(w for policy, _ in policies for w in self._egress_http_unenforced(policy))
            self._sync_ports()
            self._flush()
        finally:
            self._drop_view()  # readers see this change now (or whatever a failure left)
        # After the view is dropped: whoever sees the new revision reads the new state.
        self.revision += 1
        t4 = time.perf_counter()
        result.timing = {"check": t1 - t0, "persist": t2 - t1, "resolve": t3 - t2, "publish": t4 - t3,
                         "total": t4 - t0}
        return result

    def _stage(
        self, checked: _Checked, *, persist: bool
    ) -> tuple[ApplyResult, list[tuple[Policy, Any]], list[tuple[CIDRGroup, Any]], set[str]]:
        """Inside the request's store transaction: namespaces, pods, Services and EndpointSlices
        into force (pods' identities are allocated in the store), every changed object into the
        store. Returns the policies and the CIDR groups that change, and the Services
        (namespace/name) whose Service or EndpointSlices changed, for the caller to bring into
        force once the store has them (the policies naming groups or Services are then expanded
        again)."""
        policies, namespaces, pods = checked.policies, checked.namespaces, checked.pods
        result = ApplyResult()
        touched: set[str] = set()
        writes: list[tuple[str, bytes]] = []  # into the store at the end, in one statement
        for ns, doc in namespaces:
            key = f"{ns.cluster}/{ns.name}"
            old = self._namespaces.get((ns.cluster, ns.name))
            self._namespaces[(ns.cluster, ns.name)] = ns
            self._namespace_docs[key] = doc
            if persist:
                writes.append((NAMESPACE_PREFIX + key, _canonical(doc)))
            self._record(result, f"namespace/{key}", old is None, old == ns)
            # A namespace seen for the first time relabels its pods too: pods applied before it
            # have no namespace labels yet, and a NetworkPolicy's namespaceSelector reads them.
            # Only pods applied here: a remote cluster's pods (cluster mesh) carry the identity
            # their own cluster gave them, labels included.
            if old != ns:
                for ref, rec in list(self._pods.items()):
                    if ref not in self._pod_docs:
                        continue
                    if rec.pod.namespace == ns.name and ns.cluster in (rec.pod.cluster, ANY_CLUSTER):
                        self._remove_pod(ref)
                        self._add_pod(rec.pod)
        for pod, doc in pods:
            old_doc = self._pod_docs.get(pod.ref)
            same = old_doc is not None and _canonical(old_doc) == _canonical(doc)
            if not same:
                if old_doc is not None:
                    self._remove_pod(pod.ref)
                self._add_pod(pod)
                self._pod_docs[pod.ref] = doc
                if persist:
                    writes.append((POD_PREFIX + pod.ref, _canonical(doc)))
            self._record(result, f"pod/{pod.ref}", old_doc is None, same)
        for svc, doc in checked.services:
            key = f"{svc.cluster}/{svc.ref}"
            old_doc = self._service_docs.get(key)
            same = old_doc is not None and _canonical(old_doc) == _canonical(doc)
            if not same:
                self.services.upsert_service(svc)
                self._services_changed(local_service=True)
                self._service_docs[key] = doc
                if persist:
                    writes.append((SERVICE_PREFIX + key, _canonical(doc)))
            self._record(result, f"service/{key}", old_doc is None, same)
            if not same:
                touched.add(svc.ref)
        for es, doc in checked.slices:
            key = f"{es.cluster}/{es.ref}"
            old_doc = self._slice_docs.get(key)
            same = old_doc is not None and _canonical(old_doc) == _canonical(doc)
            if not same:
                touched.update(self._upsert_slice(es))
                self._slice_docs[key] = doc
                if persist:
                    writes.append((ENDPOINT_SLICE_PREFIX + key, _canonical(doc)))
            self._record(result, f"endpointslice/{key}", old_doc is None, same)
        for node, doc in checked.nodes:
            old_doc = self._node_docs.get(node.ref)
            same = old_doc is not None and _canonical(old_doc) == _canonical(doc)
            if not same:
                self._nodes[node.ref] = node
                self._node_docs[node.ref] = doc
                self._nodes_dirty = True
                if persist:
                    writes.append((NODE_PREFIX + node.ref, _canonical(doc)))
            self._record(result, f"node/{node.ref}", old_doc is None, same)
        changed_groups: list[tuple[CIDRGroup, Any]] = []
        for group, doc in checked.groups:
            old_doc = self._cidr_group_docs.get(group.key)
            same = old_doc is not None and _canonical(old_doc) == _canonical(doc)
            if not same:
                changed_groups.append((group, doc))
                if persist:
                    writes.append((CIDR_GROUP_PREFIX + group.name, _canonical(doc)))
            self._record(result, group.key, old_doc is None, same)
        changed: list[tuple[Policy, Any]] = []
        for policy, doc in policies:
            old = self._policy_docs.get(policy.key)
            canonical = _canonical(doc) if persist or old is not None else None
            same = old is not None and _canonical(old) == canonical
            if not same:
                changed.append((policy, doc))
                if canonical is not None and persist:
                    writes.append((POLICY_PREFIX + policy.key, canonical))
            self._record(result, policy.key, old is None, same)
        self.store.put_many(writes)
        return result, changed, changed_groups, touched

    def _expanded(self, changed: Sequence[Policy], *, groups_changed: bool = False,
                  services_changed: bool = False) -> list[Policy]:
        """What the resolver is to upsert: the `changed` policies expanded with the CIDR groups
        and the Services in force, and, when a group (a Service) changed, every other policy
        naming groups (Services) whose expansion is no longer the one in force."""
        out: list[Policy] = []
        for p in changed:
            if references(p):
                self._ref_policies[p.key] = p
            else:
                self._ref_policies.pop(p.key, None)
            out.append(expand_policy(p, self._cidr_groups, self._service_targets))
        if groups_changed or services_changed:
            keys = {p.key for p in changed}
            for key in sorted(self._ref_policies.keys() - keys):
                policy = self._ref_policies[key]
                if not ((groups_changed and references_groups(policy))
                        or (services_changed and references_services(policy))):
                    continue
                new = expand_policy(policy, self._cidr_groups, self._service_targets)
                if new != self.resolver.repository.get(key):
                    out.append(new)
        return out

    def _upsert_slice(self, es: EndpointSlice) -> set[str]:
        """`es` into the service table; the Services (namespace/name) it named and names."""
        old = self.services.slice(es.namespace, es.name)
        self.services.upsert_slice(es)
        self._services_changed(local_service=True)
        return {ref for ref in (es.service_ref, old.service_ref if old is not None else None) if ref is not None}

    def _sync_service_targets(self, keys: Iterable[str]) -> bool:
        """What `toServices` reads of the Services `keys` (namespace/name), after a change of them
        or of their EndpointSlices; whether it changed for any of them."""
        changed = False
        for key in sorted(keys):
            svc = self.services.service(key)
            new = None
            if svc is not None:
                new = service_target(svc, self.services.endpoint_addresses(svc.namespace, svc.name))
            if self._service_targets.get(key) == new:
                continue
            changed = True
            if new is None:
                del self._service_targets[key]
            else:
                self._service_targets[key] = new
        return changed

    def _services_into_force(self, keys: Iterable[str]) -> None:
        """After a Service or an EndpointSlice went: the policies naming Services follow."""
        if self._sync_service_targets(keys):
            self._feed(self.resolver.upsert_policies(self._expanded((), services_changed=True)))
            self._sync_cidr_identities()

    def _address_errors(self, pod: Pod) -> list[str]:
        """What this agent's datapath cannot do with the pod's addresses. (Addresses no pod can
        have, such as 0.0.0.0, are refused by `parse_pod` in every mode.)"""
        loopback = self.config.datapath_mode == "loopback"
        local = self._is_local(pod)
        out: list[str] = []
        for n, ip in enumerate(pod.ips):
            where = pod.ip_fields[n] if n < len(pod.ip_fields) else "status.podIPs"
            addr = ip_address(ip)  # parsed once per text, shared with parse_pod and the ipcache
            if addr.version == 6:
                problem = (
                    f"{ip} is an IPv6 address: IPv6 pod addresses are not supported by l7gate (its "
                    "datapath is IPv4, so traffic to this address would not be policed); give the "
                    "pod's IPv4 address only"
                )
            elif loopback and local and not addr.is_loopback:
                # Envoy would be told to listen on an address this host does not have.
                problem = (
                    f"{ip} is outside 127.0.0.0/8: with datapath.mode: loopback the node's Envoy "
                    "listens on each local pod's own address, on the loopback interface. Give the pod "
                    "a 127.x address, run the agent with datapath.mode: kernel, or set spec.nodeName "
                    "if the pod runs on another node"
                )
            elif not loopback and addr.is_loopback:
                problem = (
                    f"{ip} is a loopback address: with datapath.mode: {self.config.datapath_mode} a "
                    "pod's address is its own on the pod network (127.0.0.0/8 is for datapath.mode: "
                    "loopback)"
                )
            else:
                continue
            out.append(f"Pod {pod.ref}: {where}: {problem}")
        return out

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The changes made inside (applies, deletes, from this thread) come into force
        together: Envoy, the kernel's maps and the mesh get one publication, when the batch
        ends, of the state they leave, never a state halfway through it (pods published before
        the policies that select them were, for one). Holds the core's lock for the batch:
        other writers wait; readers answer from the state before it (`view`), as during a long
        apply. Nests: the outermost batch publishes."""
        with self._lock:
            self._keep_view()
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if not self._batch_depth:
                    try:
                        if self._flush_deferred:
                            self._flush_deferred = False
                            with collector_paused():  # a batch's publication can be large
                                self._flush()
                    finally:
                        self._view = None
                        self.revision += 1

    def retire_drained(self) -> None:
        """The names of listeners Envoy replaced and no longer holds go (`Publisher.retiring`);
        inside a batch, its end does it."""
        with self._lock:
            if not self._batch_depth and self.publisher.retiring:
                self.publisher.flush()

    def _drop_view(self) -> None:
        """After a change: readers take a new view at their next read (inside a batch, the
        one from before the batch stays until it ends)."""
        if not self._batch_depth:
            self._view = None

    def _flush(self) -> None:
        if self._batch_depth:
            self._flush_deferred = True
            return
        if self._nodes_dirty:
            self._sync_node_identities()
        if self.config.datapath_mode == "kernel":
            self._sync_ports()  # the ports the policies proxy may have changed with them
        self.publisher.flush()
        if self.egress is not None:
            self._flush_egress(self.egress)
        self._flush_services()
        for listener in self._change_listeners:
            listener()
        if self.kernel is not None:
            self.kernel.flush()
            self.kernel.set_local_pods(self._local_pod_ips())
            if self._pod_nodes is None:
                self._pod_nodes = {
                    ip: rec.pod.host_ip for rec in self._pods.values() if rec.pod.host_ip for ip in rec.pod.ips
                }
            self.kernel.set_pod_nodes(dict(self._pod_nodes))
        if self.fallback is not None:
            self.fallback.set_local_pods(self._local_pod_ips())

    def _egress_http_unenforced(self, policy: Policy) -> list[str]:
        """Egress HTTP rules on an agent without the egress proxy: what happens to their traffic."""
        if self.config.datapath_mode != "kernel":
            what = ("not enforced in loopback mode (no kernel redirects a pod's own connections): "
                    "the destination's ingress policy still applies")
        elif self.kernel is None:
            what = ("not enforced by the iptables fallback (it redirects connections to local pods only): "
                    "the destination's ingress policy still applies")
        elif self.config.proxy_engine != "envoy":
            what = (f"not enforced with proxy.engine {self.config.proxy_engine} (only Envoy's egress listener "
                    "applies them): connections under them are dropped (\"Egress proxy not listening\")")
        else:
            what = ("not enforced: proxy.egressPort is 0, so there is no egress listener; connections under "
                    "them are dropped (\"Egress proxy not listening\")")
        return [f"{policy.key}: {path}: egress {kind} are {what}" for path, kind in _egress_http_rules(policy)]

    def _flush_egress(self, egress: EgressPublisher) -> None:
        pods = frozenset((ip, rec.identity) for rec in self._local_pods.values() for ip in rec.pod.ips
                         if ":" not in ip)
        seen = (self.revision, self.resolver.revision, self.ipcache.revision, pods)
        if seen == self._egress_seen:
            return
        self._egress_seen = seen
        prefixes: dict[int, list[IPNetwork]] = {}
        if any(egress_http_ports(self.resolver.endpoint_policy(ident)) for _, ident in pods):
            for e in self.ipcache.snapshot():
                prefixes.setdefault(e.identity, []).append(e.prefix)
        egress.publish([LocalPod(ip, ident) for ip, ident in sorted(pods)], self.resolver.endpoint_policy, prefixes)

    def _services_changed(self, *, local_service: bool = False) -> None:
        """A Service or a pod of this cluster changed: the kernel's LB and what this agent
        publishes to the mesh follow at the next flush; a Service's ports also decide which of
        a remote's backend ports are its (`_sync_remote_services`)."""
        self._services_dirty = True
        self._publish_dirty = True
        if local_service:
            self._local_services_changed = True

    def _flush_services(self) -> None:
        """The kernel's socket LB, after a change of Services or of their pods. A refusal is kept
        for the status and retried with the next change; the maps keep what they had."""
        self._mesh_services_step()
        if self.socket_lb is None or not self._services_dirty:
            return
        desired = {
            (f.ip, f.port, f.protocol): [(b.ip, b.port) for b in e.backends]
            for f, e in self.services.frontends().items()
        }
        try:
            self.socket_lb.set_services(desired)
        except Exception as exc:  # noqa: BLE001 - a datapath error must not fail the apply
            self.services_error = f"{type(exc).__name__}: {exc}"
            return
        self.services_error = ""
        self._services_dirty = False

    def _local_pod_ips(self) -> dict[str, int]:
        return {ip: rec.identity for rec in self._local_pods.values() for ip in rec.pod.ips}

    @staticmethod
    def _record(result: ApplyResult, name: str, created: bool, unchanged: bool) -> None:
        if unchanged:
            result.unchanged.append(name)
        elif created:
            result.created.append(name)
        else:
            result.configured.append(name)

    def _policy_peers(self) -> Iterator[PeerSelector]:
        """Every peer selector of every rule of the policies in force."""
        for policy in self.resolver.repository.policies():
            for rule in policy.rules:
                for pr in rule.rules:
                    yield from pr.peers or ()

    def _sync_cidr_identities(self) -> None:
        """Every prefix the policies' CIDR selectors name gets its CIDR identity (allocated in the
        store, so the number stays across restarts), in the resolver and the ipcache; a prefix no
        policy names any more loses it. `0.0.0.0/0` and `::/0` are `world` already."""
        wanted: set[IPNetwork] = set()
        for sel in self._policy_peers():
            if isinstance(sel, CIDRSelector):
                wanted.update(n for n in (sel.cidr, *sel.excepts) if n.prefixlen)
        have = self._cidr_identities
        if wanted == have.keys():
            return
        allocator = self._allocators[self.config.cluster_id]
        added: dict[int, Labels] = {}
        for net in sorted(wanted - have.keys(), key=lambda n: (n.version, int(n.network_address), n.prefixlen)):
            ident = allocator.allocate_cidr(net)
            have[net] = ident.id
            added[ident.id] = ident.labels
        gone = {net: have.pop(net) for net in list(have) if net not in wanted}
        if added:
            self._feed(self.resolver.update_identities(added))
            for net, ident_id in have.items():
                if ident_id in added and self.ipcache.get(net) is None:
                    self.ipcache.upsert(net, ident_id)
        for net, ident_id in gone.items():
            if self.ipcache.get(net) == ident_id:
                self.ipcache.delete(net)
        if gone:
            self._feed(self.resolver.update_identities({}, deleted=list(gone.values())))
            for ident_id in gone.values():
                try:
                    allocator.release(ident_id)
                except (IdentityError, KVStoreError):
                    pass  # not held by this run (restored): the number is reclaimed by GC

    def _sync_node_identities(self) -> None:
        """Node addresses in the ipcache, as Cilium has them with node selector labels: this
        node's (`clustermesh.nodeAddress`, its Node's addresses, the `status.hostIP` of its own
        pods) as `host`, every other node's as that node's identity: the one its Node's labels
        give (`node_identity_labels`, remote-node scope), or `remote-node` (6) while no Node of
        that name is known (the hostIP of another node's pods, local or from the mesh). This
        node's Node labels `host` (1) itself. So `toEntities: [host]` reaches the node a pod runs
        on, `fromEntities: [remote-node]` admits other nodes, `fromNodes`/`toNodes` select them
        by their labels, and `world` and CIDR rules select none (Cilium's default).

        An address that is a pod's own (hostNetwork pods are not endpoints) or that another
        entry already holds is left as it is; loopback addresses are never node addresses
        (loopback mode: pods are 127.x addresses on the one machine)."""
        self._nodes_dirty = False
        mine = (self.config.cluster_name, self.config.node)
        where = node_addresses(self._nodes.values(), (rec.pod for rec in self._pods.values()))
        if self.config.clustermesh.node_address:
            where[self.config.clustermesh.node_address] = mine

        def local(cluster: str, name: str | None) -> bool:
            return cluster == mine[0] and name in (None, mine[1])

        # this node's labels on `host`
        me = self._nodes.get(f"{mine[0]}/{mine[1]}")
        host = node_identity_labels(me, local=True) if me is not None else RESERVED[HOST].labels
        if self.resolver.identities.get(HOST) != host:
            self._feed(self.resolver.update_identities({HOST: host}))
        # other nodes' identities, allocated from their labels
        allocator = self._allocators[self.config.cluster_id]
        used = {f"{c}/{n}" for c, n in where.values() if n is not None and not local(c, n)}
        old_idents = dict(self._node_idents)
        for ref in sorted(used & self._nodes.keys()):
            labels = node_identity_labels(self._nodes[ref], local=False)
            held = self._node_idents.get(ref)
            if held is None or held.labels != labels:
                try:
                    self._node_idents[ref] = allocator.allocate(labels)
                except (IdentityError, KVStoreError):
                    # no number now: `remote-node` until the next change tries again
                    self._node_idents.pop(ref, None)
                    self._nodes_dirty = True
        for ref in list(self._node_idents):
            if ref not in used or ref not in self._nodes:
                del self._node_idents[ref]
        numbers = {i.id: i.labels for i in self._node_idents.values()}
        before = {i.id for i in old_idents.values()}
        added = {n: lab for n, lab in numbers.items() if n not in before}
        if added:
            self._feed(self.resolver.update_identities(added))
        wanted: dict[IPNetwork, int] = {}
        for ip, (cluster, name) in where.items():
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                continue
            if addr.is_loopback or addr.is_unspecified or ip in self._ip_owner:
                continue
            held = self._node_idents.get(f"{cluster}/{name}")
            wanted[ipaddress.ip_network(addr)] = (HOST if local(cluster, name)
                                                  else held.id if held is not None else REMOTE_NODE)
        have = self._node_identities
        for net, ident in list(have.items()):
            if net not in wanted:
                del have[net]
                if self.ipcache.get(net) == ident:
                    self.ipcache.delete(net)
        for net, ident in wanted.items():
            old = have.get(net)
            if old == ident:
                continue
            current = self.ipcache.get(net)
            if current is None or current == old:
                self.ipcache.upsert(net, ident)  # over the old number at once: never world between
                have[net] = ident
            elif old is not None:
                del have[net]  # another entry took the address
        gone = [n for n in before if n not in numbers]
        if gone:
            self._feed(self.resolver.update_identities({}, deleted=gone))
        for ref, was in old_idents.items():
            if self._node_idents.get(ref) != was:
                try:
                    allocator.release(was.id)
                except (IdentityError, KVStoreError):
                    pass  # not held by this run (restored): the number is reclaimed by GC
        by_node: dict[str, int] = {}
        for ip, (cluster, name) in where.items():
            number = have.get(ipaddress.ip_network(ip)) if ":" not in ip else None
            if name is not None and number is not None:
                by_node.setdefault(f"{cluster}/{name}", number)
        self._node_records = {ref: NodeRecord(n, by_node.get(ref), local(n.cluster, n.name))
                              for ref, n in sorted(self._nodes.items())}

    # -- toFQDNs ---------------------------------------------------------------------------------

    def _sync_fqdn_selectors(self) -> None:
        """The policies' `toFQDNs` selectors; when they change, every learned address's labels."""
        sels = {p for p in self._policy_peers() if isinstance(p, FQDNSelector)}
        ordered = tuple(sorted(sels, key=lambda s: s.key))
        if ordered != self._fqdn_selectors:
            self._fqdn_selectors = ordered
            self._sync_fqdn_identities(self.fqdn.ips() | set(self._fqdn_identities))

    def _sync_fqdn_identities(self, ips: Iterable[str]) -> None:
        """Each address in `ips` gets the local identity labelled with the FQDN selectors that
        match one of its live names (`cidr:<ip>/32`, `fqdn:<selector>`...), or none when no
        selector does. A pod's own address keeps the pod's identity."""
        allocator = self._allocators[self.config.cluster_id]
        upserted: dict[int, Labels] = {}
        deleted: list[int] = []
        released: list[int] = []
        for ip in sorted(ips):
            names = self.fqdn.names_of(ip)
            keys = sorted({sel.key for sel in self._fqdn_selectors for n in names if sel.match.matches(n)})
            old = self._fqdn_identities.get(ip)
            net = ipaddress.ip_network(ip)
            if not keys:
                if old is not None:
                    del self._fqdn_identities[ip]
                    if self.ipcache.get(net) == old[0]:
                        self.ipcache.delete(net)
                    deleted.append(old[0])
                    released.append(old[0])
                continue
            labels = fqdn_cidr_labels(net, keys)
            if old is not None and old[1] == labels:
                continue
            ident = allocator.allocate(labels)
            self._fqdn_identities[ip] = (ident.id, labels)
            upserted[ident.id] = labels
            if ip not in self._ip_owner:
                self.ipcache.upsert(net, ident.id)
            if old is not None and old[0] != ident.id:
                deleted.append(old[0])
                released.append(old[0])
        if upserted or deleted:
            still = {i for i, _ in self._fqdn_identities.values()}
            self._feed(self.resolver.update_identities(upserted, deleted=[d for d in deleted if d not in still]))
        for ident_id in released:
            try:
                allocator.release(ident_id)
            except (IdentityError, KVStoreError):
                pass

    def dns_verdict(self, source_ip: str, server_ip: str, qname: str) -> tuple[bool, str, tuple[str, ...]]:
        """What the egress policy of the local pod at `source_ip` says about a DNS query for
        `qname` to `server_ip` port 53: (allowed, why, policies). Not a local pod: denied.
        The decision is kept per (pod, resolver) until the core or the ipcache changes, so a
        query takes the core's lock only after a change."""
        rev = self.l7_revision()
        cached = self._dns_decisions.get((source_ip, server_ip))
        if cached is None or cached[0] != rev:
            with self._lock:
                rev = self.l7_revision()
                ref = self._ip_owner.get(source_ip)
                rec = self._local_pods.get(ref) if ref is not None else None
                d: Decision | None = None
                why: tuple[str, ...] = (f"{source_ip} is no local pod",)
                if rec is not None:
                    try:
                        server = self.ipcache.lookup(server_ip)
                        d = decide(self.resolver.endpoint_policy(rec.identity), Direction.EGRESS, server, 53,
                                   L4Protocol.UDP)
                    except IdentityError:
                        why = (f"{server_ip!r} is not an address",)
            if len(self._dns_decisions) > 10_000:
                self._dns_decisions.clear()
            cached = self._dns_decisions[(source_ip, server_ip)] = (rev, d, why)
        _, d, why = cached
        if d is None:
            return False, why[0], ()
        if d.action is Action.ALLOW and d.auth is None:
            return True, d.reason, d.policies
        if d.action is Action.HTTP and d.dns:
            name = fqdn(qname)
            if any(m.matches(name) for m in d.dns):
                return True, f"{qname} matches the DNS rules of {', '.join(d.policies)}", d.policies
            return False, (f"{qname} matches none of the DNS rules " + ", ".join(str(m) for m in d.dns)), d.policies
        return False, d.reason or "denied", d.policies

    def dns_learned(self, source_ip: str, answers: Iterable[tuple[str, tuple[str, ...], int]]) -> None:
        """The DNS proxy's allowed answer for the pod at `source_ip`: (name, addresses, TTL) per
        name. Returns once the addresses are in the ipcache, the kernel and Envoy (the proxy
        releases the answer then), and in the store."""
        with self._lock:
            now = time.time()
            who = self._ip_owner.get(source_ip, source_ip)
            changed: set[str] = set()
            names: set[str] = set()
            for name, ips, ttl in answers:
                new = self.fqdn.learn(name, ips, ttl, now, who)
                changed |= new
                n = fqdn(name)
                saved = self._fqdn_persisted.get(n, 0.0)
                expires = now + max(ttl, self.fqdn.min_ttl)
                self._fqdn_next_expiry = min(self._fqdn_next_expiry, expires)
                # Written when it taught something, or when what the store says would expire
                # much earlier than what is now known (restart safety within a margin).
                if new or expires - saved > max(30.0, (expires - now) / 2):
                    names.add(n)
            self._persist_fqdn(names)
            if changed:
                self._drop_view()
                self._sync_fqdn_identities(changed)
                self._flush()
                self.revision += 1

    def expire_fqdn(self, now: float | None = None) -> int:
        """Drop learned addresses whose TTL ran out (open connections are kept: the kernel's
        conntrack); how many addresses changed."""
        now = time.time() if now is None else now
        if now < self._fqdn_next_expiry:
            return 0
        with self._lock:
            before = {r.name for r in self.fqdn.rows()}
            changed = self.fqdn.expire(now)
            self._fqdn_next_expiry = self.fqdn.next_expiry() or float("inf")
            if not changed:
                return 0
            after = {r.name for r in self.fqdn.rows()}
            self._persist_fqdn(before - after)
            self._drop_view()
            self._sync_fqdn_identities(changed)
            self._flush()
            self.revision += 1
            return len(changed)

    def _persist_fqdn(self, names: Iterable[str]) -> None:
        for name in names:
            data = self.fqdn.name_json(name)
            try:
                if data is None:
                    self.store.delete(FQDN_PREFIX + name)
                    self._fqdn_persisted.pop(name, None)
                else:
                    self.store.put(FQDN_PREFIX + name, json.dumps(data, sort_keys=True).encode())
                    self._fqdn_persisted[name] = min(e["expires"] for e in data.values())
            except KVStoreError:
                pass  # kept in memory; the next answer or expiry writes it again

    def _restore_fqdn(self) -> None:
        now = time.time()
        changed: set[str] = set()
        for key, value in self.store.list_prefix(FQDN_PREFIX):
            try:
                changed |= self.fqdn.load_name(key[len(FQDN_PREFIX):], json.loads(value), now)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a corrupt record teaches nothing
        if changed:
            self._sync_fqdn_identities(changed)
        self._fqdn_next_expiry = self.fqdn.next_expiry() or float("inf")

    def fqdn_rows(self) -> list[dict[str, Any]]:
        """`l7gate fqdn cache list`: every learned (name, address), its TTL left, who asked,
        and the identity the address has (None: no toFQDNs selector matches its names)."""
        with self._lock:
            now = time.time()
            return [{"name": r.name, "ip": r.ip, "ttl": r.ttl, "expires_in": round(max(0.0, r.expires - now), 1),
                     "sources": list(r.sources),
                     "identity": (self._fqdn_identities.get(r.ip) or (None,))[0]} for r in self.fqdn.rows()]

    def delete_policy(self, key: str) -> bool:
        """Remove the policy `key` (`CiliumNetworkPolicy/<ns>/<name>`, ...), or the CIDR group
        `CiliumCIDRGroup/<name>`; False if there is none."""
        if key.startswith(KIND_CIDR_GROUP + "/"):
            return self.delete_cidr_group(key)
        with self._lock:
            if key not in self._policy_docs:
                return False
            self._drop_view()
            self._feed(self.resolver.delete_policy(key))
            del self._policy_docs[key]
            self._ref_policies.pop(key, None)
            self._sync_cidr_identities()
            self._sync_fqdn_selectors()
            self.store.delete(POLICY_PREFIX + key)
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def delete_cidr_group(self, key: str) -> bool:
        """Remove the CiliumCIDRGroup `CiliumCIDRGroup/<name>`: the policies naming it select its
        CIDRs no more (a missing group selects nothing). False if there is none."""
        with self._lock:
            if key not in self._cidr_group_docs:
                return False
            self._drop_view()
            del self._cidr_group_docs[key]
            name = key.split("/", 1)[1]
            self._cidr_groups.pop(name, None)
            self._feed(self.resolver.upsert_policies(self._expanded((), groups_changed=True)))
            self._sync_cidr_identities()
            self.store.delete(CIDR_GROUP_PREFIX + name)
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def delete_node(self, key: str) -> bool:
        """Remove the Node `<cluster>/<name>` (or `<name>` of this cluster): its addresses lose
        the identity of its labels (those still a pod's hostIP become `remote-node`, or `host`).
        False if there is none."""
        if "/" not in key:
            key = f"{self.config.cluster_name}/{key}"
        with self._lock:
            if key not in self._node_docs:
                return False
            self._drop_view()
            del self._node_docs[key]
            self._nodes.pop(key, None)
            self._nodes_dirty = True
            self.store.delete(NODE_PREFIX + key)
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def delete_service(self, key: str) -> bool:
        """Remove the Service `<cluster>/<namespace>/<name>` (or `<namespace>/<name>` of this
        cluster); False if there is none."""
        def drop(namespace: str, name: str) -> set[str]:
            self.services.delete_service(namespace, name)
            return {f"{namespace}/{name}"}

        return self._delete_from_table(key, self._service_docs, SERVICE_PREFIX, drop)

    def delete_endpoint_slice(self, key: str) -> bool:
        """Remove the EndpointSlice `<cluster>/<namespace>/<name>` (or `<namespace>/<name>` of this
        cluster): its Service loses those backends, and the toServices rules naming the Service
        those addresses. False if there is none."""
        def drop(namespace: str, name: str) -> set[str]:
            old = self.services.slice(namespace, name)
            self.services.delete_slice(namespace, name)
            return {old.service_ref} if old is not None and old.service_ref is not None else set()

        return self._delete_from_table(key, self._slice_docs, ENDPOINT_SLICE_PREFIX, drop)

    def _delete_from_table(self, key: str, docs: dict[str, Any], prefix: str,
                           drop: Callable[[str, str], set[str]]) -> bool:
        """Remove the object `key` of the service table (`drop(namespace, name)` takes it out and
        names the Services it touched), its document and its stored copy; the load balancer and
        the policies naming those Services follow."""
        if key.count("/") == 1:
            key = f"{self.config.cluster_name}/{key}"
        with self._lock:
            if key not in docs:
                return False
            self._drop_view()
            _, namespace, name = key.split("/", 2)
            touched = drop(namespace, name)
            self._services_changed(local_service=True)
            del docs[key]
            self.store.delete(prefix + key)
            self._services_into_force(touched)
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def delete_namespace(self, key: str) -> bool:
        """Remove the Namespace `<cluster>/<name>` (`*/<name>`: the one for every cluster); its
        pods keep running under the labels they have without it. False if there is none."""
        with self._lock:
            if key not in self._namespace_docs:
                return False
            self._drop_view()
            cluster, name = key.split("/", 1)
            del self._namespace_docs[key]
            self._namespaces.pop((cluster, name), None)
            self.store.delete(NAMESPACE_PREFIX + key)
            for ref, rec in list(self._pods.items()):
                if rec.pod.namespace == name and cluster in (rec.pod.cluster, ANY_CLUSTER) and ref in self._pod_docs:
                    self._remove_pod(ref)
                    self._add_pod(rec.pod)
            self._sync_ports()
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def documents(self, kind: str) -> dict[str, Any]:
        """The objects of `kind` (a policy kind, CiliumCIDRGroup, Pod, Service, Namespace or Node) in force: the key
        its `delete_*` takes → the document as applied. A copy, taken under the lock."""
        with self._lock:
            if kind in POLICY_KINDS:
                return {k: d for k, d in self._policy_docs.items() if k.startswith(kind + "/")}
            return dict(self._docs_of(kind))

    def document(self, kind: str, key: str) -> Any | None:
        """The document in force as `key` of `kind` (see `documents`), or None."""
        with self._lock:
            if kind in POLICY_KINDS:
                return self._policy_docs.get(key) if key.startswith(kind + "/") else None
            return self._docs_of(kind).get(key)

    def _docs_of(self, kind: str) -> Mapping[str, Any]:
        docs = {"Pod": self._pod_docs, "Service": self._service_docs, "Namespace": self._namespace_docs,
                "EndpointSlice": self._slice_docs, "Node": self._node_docs, KIND_CIDR_GROUP: self._cidr_group_docs}.get(kind)
        if docs is None:
            raise ValueError(f"no documents of kind {kind!r}")
        return docs

    def delete_pod(self, ref: str) -> bool:
        """`ref` is cluster/namespace/name, or namespace/name in the agent's cluster."""
        with self._lock:
            if ref.count("/") == 1:
                ref = f"{self.config.cluster_name}/{ref}"
            if ref not in self._pods:
                return False
            self._drop_view()
            self._remove_pod(ref)
            self._pod_docs.pop(ref, None)
            self.store.delete(POD_PREFIX + ref)
            self._sync_ports()
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change is flushed, under the core's lock (mutual auth
        and the tunnel follow policy this way). It must not call back into the core's changes."""
        with self._lock:
            self._change_listeners.append(listener)

    def l7_revision(self) -> tuple[int, int]:
        """Changes whenever `l7_decision` may answer otherwise (the core's and the ipcache's
        change counters)."""
        return (self.revision, self.ipcache.revision)

    def l7_decision(self, local_ip: str, port: int, source_ip: str) -> Decision:
        """What the ingress policy of the local pod at `local_ip` says about a TCP connection
        from `source_ip` to its `port`: the decision Envoy's matcher leaf for that source
        address is built from (`xds.rbac`), for the h11 engine. A source address the ipcache
        does not hold is `world`; an address that is no local pod is denied (fail closed)."""
        with self._lock:
            ref = self._ip_owner.get(local_ip)
            rec = self._local_pods.get(ref) if ref is not None else None
            if rec is None:
                return Decision(Action.DENY, reason=f"{local_ip} is no local pod")
            try:
                peer = self.ipcache.lookup(source_ip)
            except IdentityError:
                return Decision(Action.DENY, reason=f"{source_ip!r} is not an address")
            return decide(self.resolver.endpoint_policy(rec.identity), Direction.INGRESS, peer, port, L4Protocol.TCP)

    def tunnel_inputs(self) -> TunnelInputs:
        """What the tunnel planner reads (`xds.tunnel_plan`), consistent under the core's lock:
        every pod with an IPv4 address, the policies in the repository, the identities, and the
        resolver's live lookup of an endpoint's policy."""
        with self._lock:
            return TunnelInputs(_pod_views(self._pods.values()), tuple(self.resolver.repository.policies()),
                                dict(self.resolver.identities), self.resolver.endpoint_policy,
                                dict(self.resolver.named_ports))

    # -- the cluster mesh ----------------------------------------------------------------------

    def apply_mesh(self, delta: MeshDelta) -> None:
        """One remote cluster's changes (`clustermesh.ClusterMesh`'s callback): its identities
        into the resolver, its endpoints into the ipcache (the kernel and Envoy follow), each
        endpoint named for flows, its global services' backends into the service table (the
        kernel's socket LB follows); persisted, so that a restarted agent enforces them before the
        mesh has resynced (cilium#26462). The `resync` delta ending a listing removes what was
        restored from the store and the listing did not confirm. Called from the mesh's thread."""
        cluster = delta.cluster
        with self._lock:
            with self.store.batch():
                added: list[_MeshEntry] = [*delta.identities_added, *delta.endpoints_added, *delta.services_added]
                removed: list[_MeshEntry] = [*delta.identities_removed, *delta.endpoints_removed,
                                             *delta.services_removed]
                for entry in added:
                    self.store.put(*_encode_mesh_entry(cluster, entry))
                for entry in removed:
                    self.store.delete(_encode_mesh_entry(cluster, entry)[0])
            self._apply_mesh_locked(delta)
            if delta.resync:
                stale = self._mesh_unconfirmed.pop(cluster, set())
                if stale:
                    self._drop_mesh_entries(cluster, stale)
            self._sync_ports()
            self._flush()
        settle_heap()

    def _apply_mesh_locked(self, delta: MeshDelta) -> None:
        cluster = delta.cluster
        unconfirmed = self._mesh_unconfirmed.get(cluster)
        added = {i.id: i.labels for i in delta.identities_added}
        removed = [i.id for i in delta.identities_removed if i.id in self._mesh_identities]
        for ident, labels in added.items():
            self._mesh_identities[ident] = (cluster, labels)
            if unconfirmed is not None:
                unconfirmed.discard((_IDENTITY, str(ident)))
            for ref in self._identity_pods.get(ident, ()):
                rec = self._pods[ref]
                host = ipaddress.ip_network(rec.pod.ips[0]).with_prefixlen
                if rec.labels != labels and (cluster, host) in self._mesh_endpoints:
                    self._pods[ref] = PodRecord(rec.pod, rec.identity, labels, rec.local)
        for ident in removed:
            self._mesh_identities.pop(ident, None)
        if added:
            self._feed(self.resolver.update_identities(added))
        for ep in delta.endpoints_removed:
            self._remove_mesh_endpoint(cluster, ep.prefix.with_prefixlen)
        for ep in delta.endpoints_added:
            self._remove_mesh_endpoint(cluster, ep.prefix.with_prefixlen)
            self._add_mesh_endpoint(ep)
            if unconfirmed is not None:
                unconfirmed.discard((_ENDPOINT, ep.prefix.with_prefixlen))
        if removed:
            self._feed(self.resolver.update_identities({}, deleted=removed))
        services = self._mesh_services.setdefault(cluster, {})
        for svc in delta.services_removed:
            services.pop(svc.ref, None)
        for svc in delta.services_added:
            services[svc.ref] = svc
            if unconfirmed is not None:
                unconfirmed.discard((_SERVICE, svc.ref))
        # A remote backend is named after its pod once the remote's endpoint is known.
        touched = {str(ep.prefix.network_address) for ep in (*delta.endpoints_added, *delta.endpoints_removed)}
        if delta.services_added or delta.services_removed or not touched.isdisjoint(
                self._mesh_service_ips.get(cluster, ())):
            self._sync_remote_services(cluster)
        self.revision += 1
        self._drop_view()

    # -- global services over the mesh -----------------------------------------------------------

    def _mesh_services_step(self) -> None:
        """Before the socket LB is told: remote backends re-read against changed local Services
        (their ports name which remote ports are theirs), and this cluster's global Services
        published again if a Service or a pod changed."""
        if self._local_services_changed:
            self._local_services_changed = False
            for cluster in sorted(self._mesh_services):
                self._sync_remote_services(cluster)
        if self._mesh_publisher is not None and self._publish_dirty:
            self._publish_dirty = False
            self._publish_services(self._mesh_publisher)

    def _sync_remote_services(self, cluster: str) -> None:
        """What `cluster` publishes → the service table's remote backends of that cluster, as
        Cilium's agent merges a remote ClusterService: only a shared one offers backends; a
        backend serves the local Service's port whose name and protocol its port has (Cilium
        matches ports by name, so the clusters' port numbers may differ). A remote service
        without a local Service of the same namespace/name is still handed over, without ports,
        so that the table names it (`missing_locally`)."""
        published = self._mesh_services.get(cluster, {})
        table: dict[str, dict[tuple[int, str], tuple[Backend, ...]]] = {}
        ips: set[str] = set()
        for ref, remote in published.items():
            if not remote.shared:
                continue
            ports: dict[tuple[int, str], tuple[Backend, ...]] = {}
            local = self.services.service(ref)
            for sp in local.ports if local is not None else ():
                found = remote.backend_ports(sp.name, sp.protocol)
                if found:
                    ports[(sp.port, sp.protocol)] = tuple(
                        Backend(ip, port, self._remote_pod_ref(cluster, ip), cluster) for ip, port in found)
                    ips.update(ip for ip, _ in found)
            table[ref] = ports
        self.services.set_remote_backends(cluster, table)
        self._mesh_service_ips[cluster] = ips
        self._services_dirty = True

    def _remote_pod_ref(self, cluster: str, ip: str) -> str:
        ref = self._ip_owner.get(ip)
        return ref if ref is not None and ref.startswith(cluster + "/") else f"{cluster}/-/{ip}"

    def _publish_services(self, publisher: MeshPublisher) -> None:
        """This cluster's global, shared Services into its etcd with their ready backends, as
        Cilium's clustermesh-apiserver does; one that is deleted, or no longer global or shared,
        is withdrawn. Every agent of the cluster does this (docs/clustermesh.md, "Global
        services")."""
        wanted = {svc.ref: svc for svc in self.services.services() if svc.global_ and svc.shared}
        errors: list[str] = []
        for ref in sorted(self._published_services - wanted.keys()):
            namespace, name = ref.split("/", 1)
            publisher.delete_service(namespace, name)
        for ref, svc in sorted(wanted.items()):
            try:
                publisher.upsert_service(self._cluster_service(svc))
            except MeshError as exc:
                errors.append(str(exc))
        self._published_services = set(wanted)
        self.mesh_services_error = "; ".join(errors)

    def _cluster_service(self, svc: Service) -> ClusterService:
        """Cilium's ClusterService of a local Service: its ClusterIP's ports by name, and each
        ready backend's address with its target port under the same names."""
        frontends: dict[str, dict[str, L4Addr]] = {}
        if svc.cluster_ip is not None:
            frontends[svc.cluster_ip] = {sp.name: L4Addr(sp.protocol, sp.port) for sp in svc.ports}
        backends: dict[str, dict[str, L4Addr]] = {}
        for sp, found in self.services.own_backends(svc.namespace, svc.name):
            for b in found:
                backends.setdefault(b.ip, {})[sp.name] = L4Addr(sp.protocol, b.port)
        return ClusterService.of(self.config.cluster_name, svc.namespace, svc.name, frontends=frontends,
                                 backends=backends, labels=dict(svc.labels), selector=dict(svc.selector or {}),
                                 cluster_id=self.config.cluster_id)

    def _add_mesh_endpoint(self, ep: RemoteEndpoint) -> None:
        prefix = ep.prefix.with_prefixlen
        ip = str(ep.prefix.network_address)
        name = ep.pod_name or ip
        namespace = ep.namespace or "-"
        ref = f"{ep.cluster}/{namespace}/{name}"
        known = self._mesh_identities.get(ep.identity)
        labels = known[1] if known is not None else Labels.of({})
        pod = Pod(cluster=ep.cluster, namespace=namespace, name=name, ip=ip, ips=(ip,), host_ip=ep.host_ip)
        self._pods[ref] = PodRecord(pod, ep.identity, labels, False)
        self._mesh_endpoints[(ep.cluster, prefix)] = ref
        self._ip_owner[ip] = ref
        self._identity_pods.setdefault(ep.identity, set()).add(ref)
        self._pod_nodes = None
        self._nodes_dirty = True
        self.ipcache.upsert(prefix, ep.identity)

    def _remove_mesh_endpoint(self, cluster: str, prefix: str) -> None:
        ref = self._mesh_endpoints.pop((cluster, prefix), None)
        if ref is None:
            return
        rec = self._pods.pop(ref, None)
        if rec is None:
            return
        for ip in rec.pod.ips:
            if self._ip_owner.get(ip) == ref:
                del self._ip_owner[ip]
        users = self._identity_pods.get(rec.identity)
        if users is not None:
            users.discard(ref)
            if not users:
                del self._identity_pods[rec.identity]
        self._pod_nodes = None
        self._nodes_dirty = True
        if self.ipcache.get(prefix) == rec.identity:
            self.ipcache.delete(prefix)

    def _drop_mesh_entries(self, cluster: str, keys: set[tuple[str, str]]) -> None:
        """Restored entries of `cluster` that its fresh listing did not confirm: gone remotely."""
        with self.store.batch():
            gone_ids = []
            gone_services = False
            for kind, key in sorted(keys):
                if kind == _ENDPOINT:
                    self._remove_mesh_endpoint(cluster, key)
                elif kind == _SERVICE:
                    gone_services |= self._mesh_services.get(cluster, {}).pop(key, None) is not None
                else:
                    ident = int(key)
                    if self._mesh_identities.pop(ident, None) is not None:
                        gone_ids.append(ident)
                self.store.delete(_mesh_key(cluster, kind, key))
        if gone_ids:
            self._feed(self.resolver.update_identities({}, deleted=gone_ids))
        if gone_services:
            self._sync_remote_services(cluster)
        self.revision += 1
        self._drop_view()

    def _restore_mesh(self) -> None:
        """The remote clusters' entries as last seen, into force until each cluster's first
        listing confirms or drops them (`apply_mesh`)."""
        by_cluster: dict[str, tuple[list[RemoteIdentity], list[RemoteEndpoint], list[ClusterService]]] = {}
        for key, value in self.store.list_prefix(MESH_PREFIX):
            entry = _decode_mesh_entry(key, value)
            if entry is None:
                continue
            ids, eps, svcs = by_cluster.setdefault(entry.cluster, ([], [], []))
            if isinstance(entry, RemoteIdentity):
                ids.append(entry)
            elif isinstance(entry, ClusterService):
                svcs.append(entry)
            else:
                eps.append(entry)
        for cluster, (ids, eps, svcs) in by_cluster.items():
            self._apply_mesh_locked(MeshDelta(cluster, 0, identities_added=tuple(ids), endpoints_added=tuple(eps),
                                              services_added=tuple(svcs)))
            self._mesh_unconfirmed[cluster] = (
                {(_IDENTITY, str(i.id)) for i in ids} | {(_ENDPOINT, e.prefix.with_prefixlen) for e in eps}
                | {(_SERVICE, s.ref) for s in svcs})

    def exclusive(self, fn: Callable[[], T]) -> T:
        """`fn()` between changes (under the core's lock): what must never land inside one."""
        with self._lock:
            return fn()

    # -- pods ---------------------------------------------------------------------------------

    def _is_local(self, pod: Pod) -> bool:
        return pod.cluster == self.config.cluster_name and pod.node_name in (None, self.config.node)

    def _add_pod(self, pod: Pod) -> None:
        labels = pod_identity_labels(pod, namespace_of(pod, self._namespaces))
        cid = self.config.cluster_id_of(pod.cluster)
        assert cid is not None
        try:
            ident = self._allocators[cid].allocate(labels).id
        except IdentityError as exc:
            raise ApplyError([f"Pod {pod.ref}: {exc}"]) from None
        except KVStoreError as exc:
            raise ApplyError([f"Pod {pod.ref}: cannot allocate its identity in this cluster's store: {exc}"]) from None
        local = self._is_local(pod)
        rec = PodRecord(pod, ident, labels, local)
        self._pods[pod.ref] = rec
        if local:
            self._local_pods[pod.ref] = rec
        for ip in pod.ips:
            self._ip_owner[ip] = pod.ref
        self._pod_nodes = None
        self._nodes_dirty = True
        users = self._identity_pods.setdefault(ident, set())
        first = not users
        users.add(pod.ref)
        if first:
            self._feed(self.resolver.update_identities({ident: labels}))
        self._count_named_ports(ident, pod, +1)
        for ip in pod.ips:
            self.ipcache.upsert(ip, ident)
        if local and not self.resolver.has_endpoint(ident):
            self._feed(self.resolver.add_endpoint(ident))
            self.publisher.mark_identity(ident)
        if pod.cluster == self.config.cluster_name and pod.ip is not None:
            backend = pod_backend(pod)
            if backend is not None:
                self.services.upsert_pod(backend)
                self._services_changed()
        if local and self._mesh_publisher is not None:
            for ip in pod.ips:
                self._mesh_publisher.upsert_endpoint(ip, ident, host_ip=pod.host_ip or self.config.clustermesh.node_address
                                                     or None, namespace=pod.namespace, pod_name=pod.name)

    def _remove_pod(self, ref: str) -> None:
        rec = self._pods.pop(ref)
        self._local_pods.pop(ref, None)
        if rec.pod.cluster == self.config.cluster_name:
            self.services.delete_pod(ref)
            self._services_changed()
        if rec.local and self._mesh_publisher is not None:
            for ip in rec.pod.ips:
                self._mesh_publisher.delete_endpoint(ip)
        for ip in rec.pod.ips:
            if self._ip_owner.get(ip) == ref:
                del self._ip_owner[ip]
        self._pod_nodes = None
        self._nodes_dirty = True
        for ip in rec.pod.ips:
            if self.ipcache.get(ip) == rec.identity:
                self.ipcache.delete(ip)
        users = self._identity_pods.get(rec.identity, set())
        users.discard(ref)
        self._count_named_ports(rec.identity, rec.pod, -1)
        still_local = any(self._pods[r].local for r in users)
        if rec.local and not still_local:
            self._feed(self.resolver.remove_endpoint(rec.identity))
        if not users:
            self._identity_pods.pop(rec.identity, None)
            self._feed(self.resolver.update_identities({}, deleted=[rec.identity]))
        cid = self.config.cluster_id_of(rec.pod.cluster)
        if cid is not None:
            try:
                self._allocators[cid].release(rec.identity)
            except (IdentityError, KVStoreError):
                # Not held by this run (restored state), or the cluster's etcd is unreachable:
                # the pod is gone all the same; the reference expires with this node's lease
                # (mesh) or GC reclaims the number.
                pass

    def _count_named_ports(self, ident: int, pod: Pod, sign: int) -> None:
        """A pod of `ident` came (+1) or went (-1) (`_identity_pods` already says so): when what
        the identity's pods declare changes, the resolver re-resolves the named ports that
        depend on it. O(the pod's ports + the identity's distinct names)."""
        if not pod.named_ports and ident not in self._named_declared:
            return
        counts = self._named_declared.setdefault(ident, Counter())
        per_pod = self._named_pods.setdefault(ident, Counter())
        for decl in pod.named_ports:
            counts[decl] += sign
        for key in {(name, proto) for name, _, proto in pod.named_ports}:
            per_pod[key] += sign
        for c in (counts, per_pod):
            for k in [k for k, n in c.items() if n <= 0]:
                del c[k]
        pods = len(self._identity_pods.get(ident, ()))
        ports = NamedPorts.of(counts, [k for k, n in per_pod.items() if n < pods])
        if not counts:
            del self._named_declared[ident]
            del self._named_pods[ident]
        self._feed(self.resolver.update_named_ports({ident: ports}))  # nothing if unchanged

    def _feed(self, delta: PolicyDelta) -> None:
        self.publisher.on_policy_delta(delta)
        if self.kernel is not None:
            self.kernel.on_policy_delta(delta)

    def _sync_ports(self) -> None:
        """The ports the node's L7 proxy fronts per local pod: its declared TCP container ports,
        and in kernel mode every port its ingress policy sends through the proxy (HTTP rules,
        a range's ports one by one), declared or not, as Cilium needs no declaration."""
        ports: list[ProxiedPort] = []
        kernel_mode = self.config.datapath_mode == "kernel"
        offset = 0 if kernel_mode else self.config.upstream_port_offset
        for rec in self._local_pods.values():
            if rec.pod.ip is None:
                continue
            wanted = {port for port, proto in rec.pod.ports if proto == "TCP" and port + offset <= 65535}
            if kernel_mode:
                wanted |= self._policy_ports(rec.identity)
            for port in sorted(wanted):
                ports.append(ProxiedPort(rec.identity, rec.pod.ip, port, rec.pod.ip, port + offset, kernel_mode))
        self.publisher.set_ports(ports)

    def _policy_ports(self, identity: int) -> frozenset[int]:
        """The ports an endpoint's ingress policy proxies, recomputed when its map changed."""
        policy = self.resolver.endpoint_policy(identity)
        if policy is None:
            return frozenset()
        memo = self._port_memo.get(identity)
        if memo is not None and memo[0] is policy.ingress:
            return memo[1]
        ports = frozenset(ingress_http_ports(policy))
        self._port_memo[identity] = (policy.ingress, ports)
        return ports

    # -- mutual authentication ---------------------------------------------------------------

    def local_identities(self) -> set[int]:
        with self._lock:
            return {rec.identity for rec in self._local_pods.values()}

    def auth_wanted(self, port: int) -> dict[tuple[int, int], set[tuple[str, int]]]:
        """(local identity, remote identity) pairs the resolved policy requires mutual auth
        for, each with the mutual-auth servers of the nodes the remote identity's pods run on."""
        with self._lock:
            pods_of = self._identity_pods
            workloads: list[int] | None = None
            out: dict[tuple[int, int], set[tuple[str, int]]] = {}
            for ep in self.resolver.endpoints():
                for direction in Direction:
                    # Only the entries that require auth: not a pass over the whole map.
                    for key, entry in self.resolver.auth_required(ep, direction):
                        assert not entry.deny and entry.auth is AuthMode.REQUIRED
                        if key.peer == 0 and workloads is None:
                            workloads = [i for i in self.resolver.identities if i >= 256]
                        for remote in ([key.peer] if key.peer != 0 else workloads or []):
                            nodes = {
                                (self._pods[r].pod.host_ip or "", port)
                                for r in pods_of.get(remote, ())
                                if self._pods[r].pod.host_ip
                            }
                            if nodes:
                                out.setdefault((ep, remote), set()).update(nodes)
            return out

    # -- queries -------------------------------------------------------------------------------

    def view(self) -> StateView:
        """The state as of the last completed change. Waits for a short change in progress (it
        holds the lock for milliseconds), never for a long apply: that one kept the view of
        the state before it (`_keep_view`), which is what readers get until it completes."""
        while True:
            v = self._view
            if v is not None:
                return v
            # In slices: a long apply may start keeping a view while this thread waits.
            if self._lock.acquire(timeout=0.05):
                try:
                    if self._view is None:
                        self._view = self._take_view()
                    return self._view
                finally:
                    self._lock.release()

    def _keep_view(self) -> None:
        """Under the lock, before a long change: readers answer from the state before it."""
        if self._view is None:
            self._view = self._take_view()

    def _take_view(self) -> StateView:
        r = self.resolver
        endpoints = {i: p for i in r.endpoints() if (p := r.endpoint_policy(i)) is not None}
        frontends = self.services.frontends()
        return StateView(
            self.revision,
            r.revision,
            MappingProxyType(dict(self._policy_docs)),
            MappingProxyType(dict(self._pods)),
            MappingProxyType(dict(r.identities)),
            MappingProxyType(endpoints),
            tuple(self.services.services()),
            MappingProxyType(frontends),
            MappingProxyType(self.services.backend_index()),
            MappingProxyType({c: tuple(svcs[r] for r in sorted(svcs)) for c, svcs in sorted(self._mesh_services.items())
                              if svcs}),
            tuple(sorted(self._published_services)),
            MappingProxyType(dict(self._cidr_group_docs)),
            MappingProxyType(dict(self._service_targets)),
            MappingProxyType(dict(self._node_records)),
        )


@dataclass(frozen=True, slots=True)
class _Checked:
    """One request's objects, checked (`AgentCore._check`), each with the document applied."""

    policies: list[tuple[Policy, Any]]
    namespaces: list[tuple[Namespace, Any]]
    pods: list[tuple[Pod, Any]]
    services: list[tuple[Service, Any]]
    groups: list[tuple[CIDRGroup, Any]] = field(default_factory=list)
    slices: list[tuple[EndpointSlice, Any]] = field(default_factory=list)
    nodes: list[tuple[Node, Any]] = field(default_factory=list)


class ServiceDatapath(Protocol):
    """What the core asks of the kernel's socket load balancer (`redirect_bpf`'s)."""

    def set_services(self, desired: Mapping[tuple[str, int, str], Sequence[tuple[str, int]]]) -> int: ...

    def close(self) -> None: ...


class Allocator(Protocol):
    """What the core asks of an identity allocator (`IdentityAllocator`, or the mesh's)."""

    def allocate(self, labels: Labels) -> Identity: ...

    def allocate_cidr(self, prefix: str | IPNetwork) -> Identity: ...

    def release(self, identity: int) -> bool: ...


# -- the one encode/decode pair for remote clusters' entries in the store (MESH_PREFIX) -------

_IDENTITY, _ENDPOINT, _SERVICE = "identity", "endpoint", "service"
_MESH_PATHS = {_IDENTITY: "identities", _ENDPOINT: "endpoints", _SERVICE: "services"}
_MESH_KINDS = {path: kind for kind, path in _MESH_PATHS.items()}
_MeshEntry = RemoteIdentity | RemoteEndpoint | ClusterService


def _mesh_key(cluster: str, kind: str, name: str) -> str:
    return f"{MESH_PREFIX}{cluster}/{_MESH_PATHS[kind]}/{name}"


def _encode_mesh_entry(cluster: str, entry: _MeshEntry) -> tuple[str, bytes]:
    if isinstance(entry, RemoteIdentity):
        return _mesh_key(cluster, _IDENTITY, str(entry.id)), _canonical(dict(entry.labels))
    if isinstance(entry, ClusterService):  # as the remote wrote it: Cilium's JSON
        return _mesh_key(cluster, _SERVICE, entry.ref), encode_cluster_service(entry)
    return (_mesh_key(cluster, _ENDPOINT, entry.prefix.with_prefixlen),
            _canonical({"identity": entry.identity, "host_ip": entry.host_ip,
                        "namespace": entry.namespace, "pod_name": entry.pod_name}))


def _decode_mesh_entry(key: str, value: bytes) -> _MeshEntry | None:
    cluster, path, name = key[len(MESH_PREFIX):].split("/", 2)
    kind = _MESH_KINDS.get(path)
    if kind == _SERVICE:
        try:
            return decode_cluster_service(value)
        except WireError:
            return None  # written by this agent from a value it decoded: only a damaged store
    data = json.loads(value)
    if kind == _IDENTITY:
        return RemoteIdentity(cluster, int(name), Labels.of(data))
    if kind == _ENDPOINT:
        return RemoteEndpoint(cluster, ipaddress.ip_network(name), int(data["identity"]),
                              data.get("host_ip"), data.get("namespace"), data.get("pod_name"))
    return None


def _slice_warnings(slices: Iterable[tuple[EndpointSlice, Any]]) -> list[str]:
    """EndpointSlices applied that give no Service anything."""
    return [f"EndpointSlice {es.cluster}/{es.ref}: no kubernetes.io/service-name label: it belongs to no Service, "
            "so it gives no backends and no toServices rule selects its addresses" for es, _ in slices
            if es.service is None]


def _egress_http_rules(policy: Policy) -> list[tuple[str, str]]:
    """The paths of `policy`'s egress rules with HTTP rules or serverNames (what the egress
    listener enforces), each with what it holds."""
    out: list[tuple[str, str]] = []
    for rule in policy.rules:
        for pr in rule.rules:
            if pr.direction is not Direction.EGRESS or pr.deny:
                continue
            kinds = [k for k, has in (
                ("HTTP rules", any(p.l7 is not None and p.l7.http for p in pr.port_rules)),
                ("serverNames", any(p.l7 is not None and p.l7.sni for p in pr.port_rules))) if has]
            if kinds:
                out.append((pr.origin.path, " and ".join(kinds)))
    return out


def _auth_without_mtls(policy: Policy) -> list[str]:
    """The rules of `policy` that require mutual auth, on an agent without it: fail closed."""
    return [
        f"{policy.key}: {pr.origin.path}.authentication: mode required, but mutual authentication is "
        "not enabled on this agent (mtls.enabled is false): traffic under this rule is dropped until "
        "mtls.enabled is set in the agent's configuration"
        for rule in policy.rules
        for pr in rule.rules
        if pr.auth is AuthMode.REQUIRED
    ]


def _pod_views(records: Iterable[PodRecord]) -> tuple[PodView, ...]:
    """The tunnel planner's view of the pod records (IPv4 pods only; the tunnel is IPv4)."""
    out: list[PodView] = []
    for rec in records:
        pod = rec.pod
        if pod.ip is None or ipaddress.ip_address(pod.ip).version != 4:
            continue
        ports = tuple(sorted({port for port, proto in pod.ports if proto == "TCP"}))
        out.append(PodView(rec.identity, rec.labels, pod.ip, rec.local, ports,
                           pod.node_name or (pod.host_ip or ""), pod.host_ip or ""))
    return tuple(out)
