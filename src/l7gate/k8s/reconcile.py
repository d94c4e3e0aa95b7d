"""What the Kubernetes watch does with what it sees: the pure half of `k8s.watch`.

Theory of operation
-------------------
The watch (`k8s.watch`) lists and watches eight resources (`RESOURCES`). Each object it gets is
projected here, once, onto what the agent reads of it (`project`): a `Desired` holding the
object's key (the one the agent's `delete_*` takes), the document to apply — or None when the
object is absent for l7gate (a pod without an address yet, a host-network pod, a finished
pod; an EndpointSlice Kubernetes' endpoint slice controller manages, which belongs to a Service
with a selector: l7gate computes those backends from the pods, and toServices never selects such
a Service) — and the `ObjectRef` that names the object to a user (for an Event, a log line).

Listings and watch events queue up and are merged (`Pending`): per resource, either a full
listing with the events that came after it folded in, or only events, the last per key winning.
`Reconciler.run` then brings the agent to that state through an `ObjectSink` (the agent's own
apply and delete, the path the admin API takes), resource by resource in `RESOURCES` order
(namespaces, nodes, CIDR groups, policies of the three kinds, Services, EndpointSlices, then pods):

- events: the objects now absent are deleted; the others go to the sink as ONE apply;
- a listing (the initial one, or a relist after "410 Gone"): the objects the agent holds *from
  the API* that the listing no longer has are deleted — nothing missed, no phantom — then the
  listed objects go to the sink as one apply (the agent answers "unchanged" for the same
  document: a relist changes only what changed).

Ownership. Every document applied carries the annotation `l7gate.io/source: kubernetes`
(`MARKER`), stored with it by the agent, so it survives an agent restart; the sink's `owned`
answers from it and its `delete` removes only marked objects. A relist therefore deletes only
what came from the API: an object applied with `l7gate policy apply` is never removed by a
relist, and an object the CLI re-applies under the same key becomes the CLI's (the last writer
owns it) until the API changes it again.

A refused batch changes nothing (the agent's apply is all or nothing); it is split in halves
and each half applied again, down to the single objects at fault, so one invalid policy costs
O(log n) extra applies and blocks none of the others. Each refused object goes to the
`Reporter` (the watch logs it and, for a policy, posts an Event) and stays in `refusals` for
the status until it is fixed or gone. A refused object that was in force keeps its previous
version in force, as `l7gate policy apply` of a bad revision does.

Everything here is single-threaded and does no I/O: the watch runs it on one thread.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from .objects import CLUSTER_ANNOTATION, ENDPOINT_SLICE_CONTROLLER, MANAGED_BY_LABEL

#: The annotation that marks a document the watch applied: the ownership rule (module doc).
MARKER = "l7gate.io/source"
MARKER_VALUE = "kubernetes"

# Annotations l7gate never reads and that only cost memory and spurious changes.
_DROPPED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource the watch lists and watches, across all namespaces. `older_versions`: API
    versions of the same resource to read when the server does not serve `api_version` (404),
    in order of preference (CiliumCIDRGroup: v2 from Cilium 1.18, v2alpha1 before)."""

    kind: str
    api_version: str
    path: str  # the collection, all namespaces: /api/v1/pods
    namespaced: bool
    older_versions: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The plural name, as `kubectl get` takes it."""
        return self.path.rsplit("/", 1)[1]

    @property
    def versions(self) -> tuple[str, ...]:
        return (self.api_version, *self.older_versions)

    def path_for(self, api_version: str) -> str:
        """The collection's path in another version of its group."""
        if api_version == self.api_version:
            return self.path
        return f"/apis/{api_version}/{self.name}"


NAMESPACES = Resource("Namespace", "v1", "/api/v1/namespaces", False)
NODES = Resource("Node", "v1", "/api/v1/nodes", False)
PODS = Resource("Pod", "v1", "/api/v1/pods", True)
SERVICES = Resource("Service", "v1", "/api/v1/services", True)
ENDPOINTSLICES = Resource("EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1/endpointslices", True)
CNPS = Resource("CiliumNetworkPolicy", "cilium.io/v2", "/apis/cilium.io/v2/ciliumnetworkpolicies", True)
CCNPS = Resource("CiliumClusterwideNetworkPolicy", "cilium.io/v2",
                 "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies", False)
NETPOLS = Resource("NetworkPolicy", "networking.k8s.io/v1", "/apis/networking.k8s.io/v1/networkpolicies", True)
CIDRGROUPS = Resource("CiliumCIDRGroup", "cilium.io/v2", "/apis/cilium.io/v2/ciliumcidrgroups", False,
                      older_versions=("cilium.io/v2alpha1",))
#: In the order a sync applies them: a namespace before what lives in it, the nodes before the
#: pods on them (a pod's hostIP is then its node's address, with its labels, from the start),
#: the CIDR groups before the policies naming them (a policy applied first would select nothing
#: through them for a moment), and the policies before the pods they select, so that a new pod is enforced
#: with its policies from the moment it is applied, never "no policy selects it, allow all"
#: first (it is also cheaper: the pods' ports are rendered once, with their policies).
#: Services before pods too: a Service's backends are the pods applied after it; a Service's
#: EndpointSlices right after it (a policy naming it with toServices selects their addresses).
RESOURCES = (NAMESPACES, NODES, CIDRGROUPS, CNPS, CCNPS, NETPOLS, SERVICES, ENDPOINTSLICES, PODS)
POLICY_KINDS = frozenset({CNPS.kind, CCNPS.kind, NETPOLS.kind})
#: The kinds the agent files as KIND/[NAMESPACE/]NAME (its policy API's keys).
POLICY_API_KINDS = POLICY_KINDS | {CIDRGROUPS.kind}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An object as the API names it: what an Event's involvedObject and a log line say."""

    kind: str
    api_version: str
    namespace: str  # "" for cluster-scoped objects
    name: str
    uid: str = ""
    resource_version: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"


@dataclass(frozen=True, slots=True)
class Desired:
    """One object as the API has it now: `doc` to apply, or None when l7gate has nothing to
    apply for it (deleted, or absent for l7gate: see `project`)."""

    key: str
    doc: Mapping[str, Any] | None
    ref: ObjectRef


def from_api(doc: Any) -> bool:
    """Whether a document in force was applied by the watch (it carries `MARKER`)."""
    meta = doc.get("metadata") if isinstance(doc, Mapping) else None
    ann = meta.get("annotations") if isinstance(meta, Mapping) else None
    return isinstance(ann, Mapping) and ann.get(MARKER) == MARKER_VALUE


def object_key(resource: Resource, namespace: str, name: str, cluster: str) -> str:
    """The key the agent files an object of `resource` under (its `delete_*` argument)."""
    if resource is NAMESPACES or resource is NODES:
        return f"{cluster}/{name}"
    if resource.kind in POLICY_API_KINDS:
        return f"{resource.kind}/{namespace}/{name}" if resource.namespaced else f"{resource.kind}/{name}"
    return f"{cluster}/{namespace}/{name}"


def ref_of(resource: Resource, obj: Mapping[str, Any], api_version: str = "") -> ObjectRef:
    meta = _map(obj, "metadata")
    return ObjectRef(resource.kind, api_version or resource.api_version,
                     str(meta.get("namespace") or "") if resource.namespaced else "",
                     str(meta.get("name") or ""), str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))


def _map(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = obj.get(key)
    return v if isinstance(v, Mapping) else {}


def _metadata(meta: Mapping[str, Any], cluster: str | None, keep: Sequence[str]) -> dict[str, Any]:
    out = {k: meta[k] for k in ("name", "namespace", "labels", *keep) if k in meta}
    raw = meta.get("annotations")
    ann = {k: v for k, v in raw.items() if k not in _DROPPED_ANNOTATIONS} if isinstance(raw, Mapping) else {}
    ann[MARKER] = MARKER_VALUE
    if cluster is not None:
        # The API server is this cluster's: what it holds is this cluster's, whatever it says.
        ann[CLUSTER_ANNOTATION] = cluster
    out["annotations"] = ann
    return out


def _pod_absent(obj: Mapping[str, Any]) -> bool:
    """A pod l7gate has no endpoint for: no address yet; on the host's network (the node's
    address and identity, as in Cilium); or finished (its address may already be another's)."""
    spec, status = _map(obj, "spec"), _map(obj, "status")
    return (not status.get("podIP") or spec.get("hostNetwork") is True
            or status.get("phase") in ("Succeeded", "Failed"))


def _pod(obj: Mapping[str, Any], cluster: str) -> dict[str, Any]:
    """The fields `k8s.objects.parse_pod` reads, and no other: a pod's status changes often
    (probe times, restart counts) without changing anything l7gate enforces."""
    meta, spec, status = _map(obj, "metadata"), _map(obj, "spec"), _map(obj, "status")
    out_spec: dict[str, Any] = {k: spec[k] for k in ("nodeName", "serviceAccountName", "serviceAccount",
                                                     "hostNetwork") if k in spec}
    containers = spec.get("containers")
    if isinstance(containers, list):
        out_spec["containers"] = [
            {k: c[k] for k in ("name", "ports") if k in c} if isinstance(c, Mapping) else c for c in containers]
    out_status: dict[str, Any] = {k: status[k] for k in ("podIP", "podIPs", "hostIP", "phase") if k in status}
    conditions = status.get("conditions")
    if isinstance(conditions, list):
        ready = next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == "Ready"), None)
        out_status["conditions"] = [] if ready is None else [{"type": "Ready", "status": ready.get("status")}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(meta, cluster, ("deletionTimestamp",)),
            "spec": out_spec, "status": out_status}


def _endpoint_slice(obj: Mapping[str, Any], head: Mapping[str, Any], meta: Mapping[str, Any],
                    cluster: str) -> dict[str, Any]:
    """The fields `k8s.objects.parse_endpoint_slice` reads: each endpoint's addresses and
    conditions, not its node, zone, hints or target (they change without changing anything
    l7gate does)."""
    endpoints = obj.get("endpoints")
    if isinstance(endpoints, list):
        endpoints = [{k: e[k] for k in ("addresses", "conditions") if k in e} if isinstance(e, Mapping) else e
                     for e in endpoints]
    doc = {**head, "metadata": _metadata(meta, cluster, ()), "addressType": obj.get("addressType"),
           "endpoints": endpoints}
    if "ports" in obj:
        doc["ports"] = obj["ports"]
    return doc


def _node(obj: Mapping[str, Any], cluster: str) -> dict[str, Any]:
    """The fields `k8s.objects.parse_node` reads, and no other: a Node's status is rewritten every
    few seconds (heartbeats, conditions, images) and its annotations by many controllers, none of
    which changes what l7gate enforces; its labels and addresses do."""
    meta, status = _map(obj, "metadata"), _map(obj, "status")
    out_meta = _metadata(meta, cluster, ())
    out_meta["annotations"] = {k: v for k, v in out_meta["annotations"].items() if k in (MARKER, CLUSTER_ANNOTATION)}
    out_status = {"addresses": status["addresses"]} if "addresses" in status else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": out_meta, "status": out_status}


def project(resource: Resource, obj: Mapping[str, Any], cluster: str, *, deleted: bool = False,
            api_version: str = "") -> Desired:
    """The one projection of an object from the API onto what the agent applies (module doc).
    List items lack `kind` and `apiVersion`; they are set from `resource`, and `api_version`,
    the version it was read in when that is not the resource's first (`Resource.older_versions`)."""
    meta = _map(obj, "metadata")
    ref = ref_of(resource, obj, api_version)
    key = object_key(resource, ref.namespace, ref.name, cluster)
    if deleted:
        return Desired(key, None, ref)
    head = {"apiVersion": ref.api_version, "kind": resource.kind}
    doc: dict[str, Any]
    if resource is PODS:
        if _pod_absent(obj):
            return Desired(key, None, ref)
        doc = _pod(obj, cluster)
    elif resource is NAMESPACES:
        doc = {**head, "metadata": _metadata(meta, cluster, ())}
    elif resource is NODES:
        doc = _node(obj, cluster)
    elif resource is SERVICES:
        doc = {**head, "metadata": _metadata(meta, cluster, ()), "spec": obj.get("spec", {})}
    elif resource is ENDPOINTSLICES:
        if _map(meta, "labels").get(MANAGED_BY_LABEL) == ENDPOINT_SLICE_CONTROLLER:
            return Desired(key, None, ref)
        doc = _endpoint_slice(obj, head, meta, cluster)
    else:
        # A policy (or a CIDR group): its spec(s) whole, for the agent to validate; not its
        # status (Cilium's agents write theirs there; a NetworkPolicy's is unused).
        doc = {**head, "metadata": _metadata(meta, None, ())}
        doc.update({k: obj[k] for k in ("spec", "specs") if k in obj})
    return Desired(key, doc, ref)


class ObjectSink(Protocol):
    """What the watch asks of the agent (the agent implements it over the same apply and
    delete its admin API uses). Called from one thread at a time."""

    def apply(self, docs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Apply all of `docs` or none: [] when applied, else every error (with its object and
        field path), and nothing in force changed."""
        ...

    def delete(self, kind: str, key: str) -> bool:
        """Remove the object `key` of `kind` if it is in force and came from the API (carries
        `MARKER`); False otherwise."""
        ...

    def owned(self, kind: str) -> set[str]:
        """The keys of the objects of `kind` in force that came from the API."""
        ...

    def batch(self) -> AbstractContextManager[object]:
        """The applies and deletes made inside come into force together, when it ends (one
        publication of the state they leave). Raises, when it ends, if that publication
        failed: what was applied stays in force and the next batch publishes it."""
        ...


class Reporter(Protocol):
    def refused(self, ref: ObjectRef, errors: Sequence[str]) -> None:
        """An object the agent refused (and, for a policy, why, with field paths)."""
        ...


@dataclass(slots=True)
class Slot:
    """One resource's share of a `Pending`: a listing (`full`) with the later events folded in,
    or only events (`delta`), one `Desired` per key, the latest."""

    full: dict[str, Desired] | None = None
    delta: dict[str, Desired] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.full is not None or bool(self.delta)


class Pending:
    """Listings and events not applied yet, merged (module doc). Not thread-safe."""

    def __init__(self) -> None:
        self.slots: dict[Resource, Slot] = {r: Slot() for r in RESOURCES}

    def __bool__(self) -> bool:
        return any(self.slots.values())

    def listing(self, resource: Resource, items: Iterable[Desired]) -> None:
        """A full listing of `resource`: it supersedes every event of it before."""
        self.slots[resource] = Slot(full={d.key: d for d in items})

    def event(self, resource: Resource, d: Desired) -> None:
        slot = self.slots[resource]
        if slot.full is not None:
            slot.full[d.key] = d
        else:
            slot.delta[d.key] = d

    def listed(self, resource: Resource) -> bool:
        return self.slots[resource].full is not None

    def absorb(self, later: Pending) -> None:
        """`later`'s listings and events, as if they had come after this one's."""
        for r, slot in later.slots.items():
            if slot.full is not None:
                self.slots[r] = Slot(full=dict(slot.full))
            for d in slot.delta.values():
                self.event(r, d)


@dataclass(slots=True)
class ResourceStats:
    """What `status` shows of one resource."""

    synced_at: float | None = None  # when its last listing was applied (wall clock)
    in_force: int = 0  # its objects in force that came from the API
    applies: int = 0  # apply requests sent to the agent
    deletes: int = 0
    events: int = 0  # watch events applied
    listings: int = 0  # listings applied (the first, and one per relist)


class Reconciler:
    """Brings the agent to the state listings and events say (module doc). Single-threaded:
    the watch's applier thread owns it; `stats` and `refusals` are read by the status (a
    racy but harmless read of counters)."""

    def __init__(self, sink: ObjectSink, reporter: Reporter, *, clock: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._reporter = reporter
        self._clock = clock
        self._owned: dict[str, set[str]] = {}
        self.stats: dict[str, ResourceStats] = {r.kind: ResourceStats() for r in RESOURCES}
        # kind → key → (the object, its errors): refused and not fixed or gone since
        self.refusals: dict[str, dict[str, tuple[ObjectRef, tuple[str, ...]]]] = {r.kind: {} for r in RESOURCES}

    def run(self, pending: Pending) -> tuple[Pending, list[str]]:
        """Apply `pending`, resource by resource in `RESOURCES` order. Returns what could not be
        applied because the sink failed (not refused: failed, e.g. raised), to retry later, and
        those failures."""
        left = Pending()
        failures: list[str] = []
        try:
            # One publication for the whole run: Envoy and the kernel never get a state halfway
            # through it (a relist's deletions without the objects applied after them), and the
            # agent renders Envoy's resources once, not once per resource.
            with self._sink.batch():
                for r in RESOURCES:
                    slot = pending.slots[r]
                    if not slot:
                        continue
                    try:
                        if slot.full is not None:
                            self._replace(r, slot.full)
                        else:
                            self._update(r, slot.delta)
                    except Exception as exc:  # noqa: BLE001 - kept and retried, never lost
                        failures.append(f"{r.name}: {type(exc).__name__}: {exc}")
                        left.slots[r] = slot
        except Exception as exc:  # noqa: BLE001 - the publication failed: retry all of it
            return pending, [*failures, f"publishing: {type(exc).__name__}: {exc}"]
        return left, failures

    def _replace(self, r: Resource, listed: Mapping[str, Desired]) -> None:
        owned = self._sink.owned(r.kind)
        self._owned[r.kind] = owned
        present = [d for d in listed.values() if d.doc is not None]
        keys = {d.key for d in present}
        st = self.stats[r.kind]
        # Deletions first: a pod's address is free before another pod claims it.
        for key in sorted(owned - keys):
            st.deletes += 1
            if self._sink.delete(r.kind, key):
                owned.discard(key)
        refused = self.refusals[r.kind]
        for key in [k for k in refused if k not in keys]:
            del refused[key]
        self._apply(r, sorted(present, key=lambda d: d.key))
        st.listings += 1
        st.synced_at = self._clock()
        st.in_force = len(owned)

    def _update(self, r: Resource, changes: Mapping[str, Desired]) -> None:
        owned = self._owned.setdefault(r.kind, set())
        st = self.stats[r.kind]
        st.events += len(changes)
        refused = self.refusals[r.kind]
        for d in sorted(changes.values(), key=lambda d: d.key):
            if d.doc is None:
                refused.pop(d.key, None)
                if self._sink.delete(r.kind, d.key):
                    st.deletes += 1
                    owned.discard(d.key)
        self._apply(r, sorted((d for d in changes.values() if d.doc is not None), key=lambda d: d.key))
        st.in_force = len(owned)

    def _apply(self, r: Resource, items: Sequence[Desired]) -> None:
        if not items:
            return
        st = self.stats[r.kind]
        st.applies += 1
        errors = self._sink.apply([d.doc for d in items if d.doc is not None])
        owned = self._owned.setdefault(r.kind, set())
        refused = self.refusals[r.kind]
        if not errors:
            for d in items:
                owned.add(d.key)
                refused.pop(d.key, None)
            return
        if len(items) == 1:
            d = items[0]
            refused[d.key] = (d.ref, tuple(errors))
            self._reporter.refused(d.ref, errors)
            return
        # Nothing changed: find the objects at fault by halves (module doc).
        mid = len(items) // 2
        self._apply(r, items[:mid])
        self._apply(r, items[mid:])


class Backoff:
    """Waits between retries: exponential, bounded by `cap`, jittered so that the agents of
    every node do not come back to a restarted API server at the same instant. The n-th
    consecutive failure waits a random time in [d/2, d], d = min(cap, base * 2**n). Not
    thread-safe: one per retrying loop."""

    def __init__(self, base: float = 0.2, cap: float = 30.0, rng: Callable[[], float] = random.random) -> None:
        self.base, self.cap = base, cap
        self._rng = rng
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap, self.base * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return d / 2 + float(self._rng()) * d / 2

    def reset(self) -> None:
        self.failures = 0
