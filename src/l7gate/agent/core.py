"""The agent's state and its reconcile steps: policies, pods, identities, ipcache, xDS.

Theory of operation. Inputs arrive as Kubernetes objects (CNP/CCNP, Pod, Namespace) through
`apply` and `delete` (the admin API today; the Kubernetes watch later feeds the same path).
Each call is all-or-nothing: every object is parsed and checked first; one invalid object
refuses the whole request and nothing in force changes. A valid request then, in order:

1. persists the objects in the kvstore (so a restarted agent comes back with them);
2. for pods: allocates identities (the pod's cluster decides the numeric range), updates the
   resolver's identities and the ipcache, registers local pods as endpoints and their ports
   as proxied ports;
3. for policies: upserts them into the resolver's repository;
4. feeds every resulting `PolicyDelta` and ipcache change to the xDS publisher and flushes it,
   so the change is in Envoy's snapshot before the call returns.

All public methods take one lock: the admin server's threads are serialized here.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from ..identity.allocator import IdentityAllocator
from ..identity.filter import identity_labels
from ..identity.ipcache import IPCache
from ..identity.numeric import IdentityError
from ..k8s.objects import CLUSTER_ANNOTATION, K8sObjectError, Namespace, Pod, parse_namespace, parse_pod
from ..kvstore.api import KVStore
from ..policy.errors import PolicyValidationError
from ..policy.labels import Labels
from ..policy.parse import POLICY_KINDS, parse_policy
from ..policy.resolve import PolicyDelta, Resolver
from ..policy.types import AuthMode, Direction
from ..policy.types import Policy
from ..redirect_bpf.applier import IptablesRedirect, KernelApplier
from ..xds.publisher import Publisher, ResourceSink
from ..xds.translate import ProxiedPort
from .config import AgentConfig

PREFIX = "l7gate/v1/"
POLICY_PREFIX = PREFIX + "policies/"
POD_PREFIX = PREFIX + "pods/"
NAMESPACE_PREFIX = PREFIX + "namespaces/"
ANY_CLUSTER = "*"


class ApplyError(Exception):
    """A request refused as a whole: `errors` names every object and field at fault."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def settle_heap() -> None:
    """After a change: collect the youngest generation (the garbage the change made), then move
    every surviving object to the collector's permanent generation. With 10,000 identities the
    agent holds millions of long-lived objects, and one full collection of them took ~190 ms,
    stalling whatever thread triggered it (a policy apply, the xDS server). Frozen objects are
    still freed by reference counting; only cyclic garbage among them waits for
    `AgentCore.compact_heap`, which the daemon runs every few minutes. (Collecting generation 1
    too cost ~1 ms per pod added at that size; generation 0 alone costs nothing measurable.)"""
    gc.collect(0)
    gc.freeze()


@dataclass(frozen=True, slots=True)
class PodRecord:
    pod: Pod
    identity: int
    labels: Labels
    local: bool


@dataclass(slots=True)
class ApplyResult:
    created: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        return {
            "created": self.created,
            "configured": self.configured,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
        }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class AgentCore:
    def __init__(
        self,
        config: AgentConfig,
        store: KVStore,
        sink: ResourceSink,
        access_logs: Sequence[Message] = (),
        kernel: KernelApplier | None = None,
        fallback: IptablesRedirect | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._lock = threading.RLock()
        self.resolver = Resolver()
        self.ipcache = IPCache()
        owner = f"{config.cluster_name}.{config.node}"
        ids = {config.cluster_id, *config.clusters.values()}
        self._allocators = {cid: IdentityAllocator(store, cluster_id=cid, owner=owner) for cid in ids}
        self._policy_docs: dict[str, Any] = {}
        self._pods: dict[str, PodRecord] = {}
        # Indexes over `_pods`, so that one change costs O(change), not O(pods).
        self._local_pods: dict[str, PodRecord] = {}
        self._ip_owner: dict[str, str] = {}  # pod IP → pod ref
        self._pod_nodes: dict[str, str] | None = None  # pod IP → host IP, rebuilt after a change
        self._pod_docs: dict[str, Any] = {}
        self._namespaces: dict[tuple[str, str], Namespace] = {}
        self._identity_pods: dict[int, set[str]] = {}
        self.publisher = Publisher(sink, config.node_id, self.resolver.endpoint_policy, access_logs)
        self.ipcache.subscribe(self.publisher.on_ipcache_change)
        self.kernel = kernel
        self.fallback = fallback
        # Called (under the core's lock) after every change is flushed: mutual auth follows it.
        self.on_change: Callable[[], None] | None = None
        # The kernel checks mutual auth before it redirects a connection to Envoy; without it
        # (loopback, the iptables fallback) Envoy refuses auth-required peers itself.
        self.publisher.auth_verified = kernel is not None
        if kernel is not None:
            kernel.policy_of = self.resolver.endpoint_policy
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
            docs: list[Any] = []
            for prefix in (NAMESPACE_PREFIX, POD_PREFIX, POLICY_PREFIX):
                for _, value in self.store.list_prefix(prefix):
                    docs.append(json.loads(value))
            if docs:
                self._apply_locked(docs, persist=False)
            else:
                self.publisher.flush()

    # -- apply / delete ----------------------------------------------------------------------

    def apply(self, docs: Iterable[Any]) -> ApplyResult:
        with self._lock, self.store.batch():  # one commit (one fsync) per request
            result = self._apply_locked(list(docs), persist=True)
        settle_heap()
        return result

    def _check(self, docs: list[Any]) -> tuple[list[tuple[Policy, Any]], list[tuple[Namespace, Any]], list[tuple[Pod, Any]]]:
        errors: list[str] = []
        policies: list[tuple[Policy, Any]] = []
        namespaces: list[tuple[Namespace, Any]] = []
        pods: list[tuple[Pod, Any]] = []
        for i, doc in enumerate(docs):
            kind = doc.get("kind") if isinstance(doc, dict) else None
            try:
                if kind in POLICY_KINDS:
                    policies.append((parse_policy(doc, cluster_name=self.config.cluster_name), doc))
                elif kind == "Pod":
                    pod = parse_pod(doc, default_cluster=self.config.cluster_name)
                    if self.config.cluster_id_of(pod.cluster) is None:
                        errors.append(
                            f"Pod {pod.ref}: cluster {pod.cluster!r} has no id: add it to the "
                            f"agent's `clusters` map"
                        )
                    elif pod.ip is None:
                        errors.append(f"Pod {pod.ref}: status.podIP is required")
                    else:
                        pods.append((pod, doc))
                elif kind == "Namespace":
                    # A Namespace without the cluster annotation describes that namespace in
                    # every cluster (as `l7gate policy trace` reads it): stored under "*".
                    annotated = CLUSTER_ANNOTATION in ((doc.get("metadata") or {}).get("annotations") or {})
                    ns = parse_namespace(doc, default_cluster=self.config.cluster_name)
                    if not annotated:
                        ns = Namespace(ns.name, ns.labels, ANY_CLUSTER)
                    namespaces.append((ns, doc))
                else:
                    errors.append(
                        f"object {i + 1}: kind {kind!r} is not one of "
                        f"{', '.join((*POLICY_KINDS, 'Pod', 'Namespace'))}"
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
        if errors:
            raise ApplyError(errors)
        return policies, namespaces, pods

    def _apply_locked(self, docs: list[Any], *, persist: bool) -> ApplyResult:
        policies, namespaces, pods = self._check(docs)
        result = ApplyResult()
        for ns, doc in namespaces:
            key = f"{ns.cluster}/{ns.name}"
            old = self._namespaces.get((ns.cluster, ns.name))
            self._namespaces[(ns.cluster, ns.name)] = ns
            if persist:
                self.store.put(NAMESPACE_PREFIX + key, _canonical(doc))
            self._record(result, f"namespace/{key}", old is None, old == ns)
            if old is not None and old != ns:
                for ref, rec in list(self._pods.items()):
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
                    self.store.put(POD_PREFIX + pod.ref, _canonical(doc))
            self._record(result, f"pod/{pod.ref}", old_doc is None, same)
        for policy, doc in policies:
            old = self._policy_docs.get(policy.key)
            same = old is not None and _canonical(old) == _canonical(doc)
            if not same:
                self._feed(self.resolver.upsert_policy(policy))
                self._policy_docs[policy.key] = doc
                if persist:
                    self.store.put(POLICY_PREFIX + policy.key, _canonical(doc))
            self._record(result, policy.key, old is None, same)
        self._sync_ports()
        self._flush()
        self.revision += 1
        return result

    def _flush(self) -> None:
        self.publisher.flush()
        if self.on_change is not None:
            self.on_change()
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

    def delete_policy(self, key: str) -> bool:
        with self._lock:
            if key not in self._policy_docs:
                return False
            self._feed(self.resolver.delete_policy(key))
            del self._policy_docs[key]
            self.store.delete(POLICY_PREFIX + key)
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def delete_pod(self, ref: str) -> bool:
        """`ref` is cluster/namespace/name, or namespace/name in the agent's cluster."""
        with self._lock:
            if ref.count("/") == 1:
                ref = f"{self.config.cluster_name}/{ref}"
            if ref not in self._pods:
                return False
            self._remove_pod(ref)
            self._pod_docs.pop(ref, None)
            self.store.delete(POD_PREFIX + ref)
            self._sync_ports()
            self._flush()
            self.revision += 1
        settle_heap()
        return True

    def compact_heap(self) -> float:
        """A full garbage collection of everything, frozen state included, then freeze again;
        seconds it took. The agent runs it rarely (see `settle_heap`)."""
        with self._lock:
            t0 = time.monotonic()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            return time.monotonic() - t0

    # -- pods ---------------------------------------------------------------------------------

    def _is_local(self, pod: Pod) -> bool:
        return pod.cluster == self.config.cluster_name and pod.node_name in (None, self.config.node)

    def _add_pod(self, pod: Pod) -> None:
        ns = self._namespaces.get((pod.cluster, pod.namespace)) or self._namespaces.get(
            (ANY_CLUSTER, pod.namespace)
        )
        labels = identity_labels(
            pod.labels,
            namespace=pod.namespace,
            cluster=pod.cluster,
            service_account=pod.service_account,
            namespace_labels=ns.labels if ns else None,
        )
        cid = self.config.cluster_id_of(pod.cluster)
        assert cid is not None
        try:
            ident = self._allocators[cid].allocate(labels).id
        except IdentityError as exc:
            raise ApplyError([f"Pod {pod.ref}: {exc}"]) from None
        local = self._is_local(pod)
        rec = PodRecord(pod, ident, labels, local)
        self._pods[pod.ref] = rec
        if local:
            self._local_pods[pod.ref] = rec
        for ip in pod.ips:
            self._ip_owner[ip] = pod.ref
        self._pod_nodes = None
        users = self._identity_pods.setdefault(ident, set())
        first = not users
        users.add(pod.ref)
        if first:
            self._feed(self.resolver.update_identities({ident: labels}))
        for ip in pod.ips:
            self.ipcache.upsert(ip, ident)
        if local and not self.resolver.has_endpoint(ident):
            self._feed(self.resolver.add_endpoint(ident))
            self.publisher.mark_identity(ident)

    def _remove_pod(self, ref: str) -> None:
        rec = self._pods.pop(ref)
        self._local_pods.pop(ref, None)
        for ip in rec.pod.ips:
            if self._ip_owner.get(ip) == ref:
                del self._ip_owner[ip]
        self._pod_nodes = None
        for ip in rec.pod.ips:
            if self.ipcache.get(ip) == rec.identity:
                self.ipcache.delete(ip)
        users = self._identity_pods.get(rec.identity, set())
        users.discard(ref)
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
            except IdentityError:
                pass  # not held by this run (restored state); GC reclaims it

    def _feed(self, delta: PolicyDelta) -> None:
        self.publisher.on_policy_delta(delta)
        if self.kernel is not None:
            self.kernel.on_policy_delta(delta)

    def _sync_ports(self) -> None:
        ports: list[ProxiedPort] = []
        kernel_mode = self.config.datapath_mode == "kernel"
        offset = 0 if kernel_mode else self.config.upstream_port_offset
        for rec in self._local_pods.values():
            if rec.pod.ip is None:
                continue
            for port, proto in rec.pod.ports:
                if proto == "TCP" and port + offset <= 65535:
                    ports.append(
                        ProxiedPort(rec.identity, rec.pod.ip, port, rec.pod.ip, port + offset, kernel_mode)
                    )
        self.publisher.set_ports(ports)

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

    def policies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"key": k, "object": self._policy_docs[k]} for k in sorted(self._policy_docs)
            ]

    def pod_counts(self) -> dict[str, int]:
        """What `l7gate status` counts: every pod the agent knows (what `endpoint list` shows),
        and the local ones, whose ingress this node enforces."""
        with self._lock:
            return {"known": len(self._pods), "local": len(self._local_pods)}

    def pods(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "ref": ref,
                    "identity": rec.identity,
                    "ips": list(rec.pod.ips),
                    "local": rec.local,
                    "ports": [f"{p}/{proto}" for p, proto in rec.pod.ports],
                    "labels": dict(rec.labels),
                }
                for ref, rec in sorted(self._pods.items())
            ]

    def identities(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "identity": ident,
                    "labels": dict(labels),
                    "pods": sorted(self._identity_pods.get(ident, ())),
                    "endpoint": self.resolver.has_endpoint(ident),
                }
                for ident, labels in sorted(self.resolver.identities.items())
            ]

    def ipcache_entries(self) -> list[dict[str, Any]]:
        return [
            {"prefix": e.prefix.with_prefixlen, "identity": e.identity}
            for e in self.ipcache.snapshot()
        ]

    def endpoint_policies(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for ident in self.resolver.endpoints():
                pol = self.resolver.endpoint_policy(ident)
                if pol is None:
                    continue
                out.append(
                    {
                        "identity": ident,
                        "pods": sorted(r for r in self._identity_pods.get(ident, ()) if self._pods[r].local),
                        "revision": pol.revision,
                        "policies": list(pol.policies),
                        "ingress": {
                            "default_deny": pol.default_deny_ingress,
                            "entries": [_entry_json(k, e) for k, e in pol.ingress.items()],
                        },
                        "egress": {
                            "default_deny": pol.default_deny_egress,
                            "entries": [_entry_json(k, e) for k, e in pol.egress.items()],
                        },
                    }
                )
            return out


def _entry_json(key: Any, entry: Any) -> dict[str, Any]:
    return {
        "peer": "any" if key.peer == 0 else key.peer,
        "protocol": key.protocol.value,
        "ports": str(key.ports),
        "action": entry.action,
        "auth": entry.auth.value if entry.auth else None,
        "http": [str(h) for h in entry.l7.http] if entry.l7 is not None else None,
        "derived_from": list(entry.derived_from),
    }
