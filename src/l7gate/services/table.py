"""The service table: Services and pods in, frontends (ClusterIP:port/protocol) → backends out.

Theory of operation
-------------------
The table holds four inputs: local Services (keyed `namespace/name`), pods (`BackendPod`,
keyed by ref), EndpointSlices (keyed `namespace/name`, indexed by the Service they name) and,
per remote cluster, the backends that cluster publishes for its global, shared Services
(`set_remote_backends`). Its output, `frontends()`, is the desired state of the
load balancer: one `FrontendEntry` per ClusterIP, service port and protocol.

The output is computed per Service and cached. A change marks only the Services it can affect:

- a Service upserted or deleted: that Service;
- a pod upserted or deleted: the Services of the pod's cluster and namespace whose selector
  matches its old or its new labels, and only if it was or is ready (a pod that is not ready
  is no backend). Services are indexed by one (key, value) pair of their selector, so finding
  them costs the number of the pod's labels, not the number of Services;
- an EndpointSlice upserted or deleted: the Service it names (before and after);
- a remote cluster's backends: the Services whose published backends changed.

`frontends()` recomputes the marked Services and patches the merged result, so calling it after
every change costs O(what changed) plus a copy of the result.

Semantics (Kubernetes' endpoints controller, Cilium's service load balancer and cluster mesh):

- A Service selects the ready pods of its own cluster and namespace whose labels contain every
  pair of its selector. A Service without a selector (None) has no backends of its own: in
  Kubernetes its endpoints are managed by someone else, and the API server cannot tell an empty
  selector `{}` from an absent one (kubernetes/kubernetes#25836), so `{}` selects nothing too.
- A Service without a selector takes its backends from its EndpointSlices (those in its
  namespace whose `kubernetes.io/service-name` label is its name), as Kubernetes' proxies do:
  each ready endpoint's IPv4 addresses, on the slice port with the service port's name and
  protocol. A slice of a Service with a selector is ignored (the endpoint controllers write
  what the pods give, which the table computes itself). `endpoint_addresses` gives the
  addresses of every ready or serving endpoint of a Service's slices, whatever its ports: what
  `toServices` selects (Cilium's reading).
- A numeric target port is used as is. A named one is the first container port of the pod
  with that name and the service port's protocol (Kubernetes' `FindPort`); a pod without one is
  no backend of that service port.
- Only a Service with a ClusterIP has frontends. One with no backends still has its frontends,
  with no backends: a connection to it is refused instead of leaving unbalanced.
- A global Service balances over its local backends (whether it is shared or not: `shared`
  only says whether this cluster offers its backends to others, which the publisher decides)
  and the backends remote clusters publish for the same `namespace/name` and the same
  (port, protocol). Remote backends are used only when the local Service is global too, as in
  Cilium. Affinity, per service port: `local` uses the local backends while there is at least
  one, else the remote ones; `remote` the reverse; `none` all of them. A non-global Service
  ignores its affinity. The table trusts the remote clusters' lists: it sees only what they
  publish (a Service with `shared: "false"` publishes nothing), and treats every published
  backend as ready.
- Backends are sorted (address, port, cluster, pod) and unique per (address, port): if two
  pods claim one address, a local one wins over a remote one, then the first in that order.
- Two Services claiming one frontend (the same ClusterIP, port and protocol; Kubernetes never
  allocates a ClusterIP twice, hand-written files can): the first `namespace/name` in sort
  order owns it; `frontend_conflicts()` names them.

Ownership and threads: the table is owned by one caller and is not thread-safe; callers that
share it must lock around it. Every value it returns is immutable or a fresh container the
caller owns.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache

from l7gate.services.types import Backend, BackendPod, EndpointSlice, Frontend, FrontendEntry, Service, ServicePort

#: (service port, protocol) → that port's backends, as a remote cluster publishes them
PortBackends = Mapping[tuple[int, str], tuple[Backend, ...]]
_Scope = tuple[str, str]  # (cluster, namespace)
_Pair = tuple[str, str]  # one (label key, value)


@lru_cache(maxsize=65536)
def _ip_key(ip: str) -> tuple[int, int]:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return (99, 0)  # not an address: after every address, then by its text
    return (addr.version, int(addr))


def backend_sort_key(b: Backend) -> tuple[tuple[int, int], str, int, str, str]:
    """Backends' order: address (numerically), port, cluster, pod."""
    return (_ip_key(b.ip), b.ip, b.port, b.cluster, b.pod)


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Whether a Service's selector picks a pod with `labels`: every pair present; no selector
    (None or empty) picks nothing."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def _addresses(es: EndpointSlice) -> list[str]:
    """The addresses of a slice's ready or serving endpoints (none for an FQDN slice)."""
    if es.address_type == "FQDN":
        return []
    return [a for e in es.endpoints if e.ready or e.serving for a in e.addresses]


def target_port(port: ServicePort, pod: BackendPod) -> int | None:
    """The pod's port for a service port: the number, or the first container port with that
    name and the service port's protocol; None when the pod has none."""
    if isinstance(port.target, int):
        return port.target
    for name, number, protocol in pod.named_ports:
        if name == port.target and protocol == port.protocol:
            return number
    return None


def unique_backends(local: Iterable[Backend], remote: Iterable[Backend]) -> tuple[Backend, ...]:
    """`local` and `remote` in backend order, one per (address, port): local first, then the
    first in backend order."""
    seen: dict[tuple[str, int], Backend] = {}
    for group in (local, remote):
        for b in sorted(group, key=backend_sort_key):
            seen.setdefault((b.ip, b.port), b)
    return tuple(sorted(seen.values(), key=backend_sort_key))


def apply_affinity(affinity: str, local: list[Backend], remote: list[Backend]) -> tuple[list[Backend], list[Backend]]:
    """The (local, remote) backends a global Service's port uses under `affinity`."""
    if affinity == "local" and local:
        return local, []
    if affinity == "remote" and remote:
        return [], remote
    return local, remote


class ServiceTable:
    """Services, pods and remote backends → the load balancer's desired state. Not thread-safe;
    see the module docstring."""

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}
        self._pods: dict[str, BackendPod] = {}
        # pods by (cluster, namespace) and label pair
        self._pods_by_label: dict[_Scope, dict[_Pair, set[str]]] = {}
        # Services with a selector by (cluster, namespace) and their selector's first pair
        self._services_by_pair: dict[_Scope, dict[_Pair, set[str]]] = {}
        self._slices: dict[str, EndpointSlice] = {}
        self._slices_of: dict[str, set[str]] = {}  # Service namespace/name → its slices' refs
        self._remote: dict[str, dict[str, dict[tuple[int, str], tuple[Backend, ...]]]] = {}
        self._remote_by_service: dict[str, dict[str, dict[tuple[int, str], tuple[Backend, ...]]]] = {}
        self._results: dict[str, dict[Frontend, FrontendEntry]] = {}
        self._owners: dict[Frontend, set[str]] = {}
        self._frontends: dict[Frontend, FrontendEntry] = {}
        self._by_backend: dict[tuple[str, int], set[str]] = {}
        self._dirty: set[str] = set()
        self._recomputed = 0

    # -- inputs ---------------------------------------------------------------------------------

    def upsert_service(self, svc: Service) -> None:
        """Add or replace the Service `svc.ref` (one per namespace/name)."""
        key = svc.ref
        old = self._services.get(key)
        if old == svc:
            return
        if old is not None:
            self._index_service(old, add=False)
        self._services[key] = svc
        self._index_service(svc, add=True)
        self._dirty.add(key)

    def delete_service(self, namespace: str, name: str) -> None:
        """Remove a Service; removing one the table does not hold does nothing."""
        key = f"{namespace}/{name}"
        old = self._services.pop(key, None)
        if old is not None:
            self._index_service(old, add=False)
            self._dirty.add(key)

    def upsert_pod(self, pod: BackendPod) -> None:
        """Add or replace the pod `pod.ref`."""
        old = self._pods.get(pod.ref)
        if old == pod:
            return
        if old is not None:
            self._mark_selecting(old)
            self._index_pod(old, add=False)
        self._pods[pod.ref] = pod
        self._index_pod(pod, add=True)
        self._mark_selecting(pod)

    def delete_pod(self, ref: str) -> None:
        """Remove a pod; removing one the table does not hold does nothing."""
        old = self._pods.pop(ref, None)
        if old is not None:
            self._mark_selecting(old)
            self._index_pod(old, add=False)

    def upsert_slice(self, es: EndpointSlice) -> None:
        """Add or replace the EndpointSlice `es.ref`."""
        old = self._slices.get(es.ref)
        if old == es:
            return
        if old is not None:
            self._index_slice(old, add=False)
        self._slices[es.ref] = es
        self._index_slice(es, add=True)

    def delete_slice(self, namespace: str, name: str) -> None:
        """Remove an EndpointSlice; removing one the table does not hold does nothing."""
        old = self._slices.pop(f"{namespace}/{name}", None)
        if old is not None:
            self._index_slice(old, add=False)

    def set_remote_backends(
        self, cluster: str, services: Mapping[str, Mapping[tuple[int, str], tuple[Backend, ...]]]
    ) -> None:
        """Replace everything remote `cluster` publishes: per `namespace/name` of its global,
        shared Services, per (service port, protocol), their backends. An empty mapping forgets
        the cluster. Raises ValueError, changing nothing, for a backend that names another
        cluster."""
        new: dict[str, dict[tuple[int, str], tuple[Backend, ...]]] = {}
        for key, ports in services.items():
            copied: dict[tuple[int, str], tuple[Backend, ...]] = {}
            for port_key, backends in ports.items():
                for b in backends:
                    if b.cluster != cluster:
                        raise ValueError(
                            f"remote backend {b.ip}:{b.port} of {key} from cluster {cluster!r} names cluster {b.cluster!r}"
                        )
                copied[port_key] = tuple(backends)
            new[key] = copied
        old = self._remote.pop(cluster, {})
        for key in old.keys() | new.keys():
            if old.get(key) != new.get(key):
                self._dirty.add(key)
            by_cluster = self._remote_by_service.setdefault(key, {})
            if key in new:
                by_cluster[cluster] = new[key]
            else:
                by_cluster.pop(cluster, None)
            if not by_cluster:
                del self._remote_by_service[key]
        if new:
            self._remote[cluster] = new

    # -- outputs --------------------------------------------------------------------------------

    def frontends(self) -> dict[Frontend, FrontendEntry]:
        """The desired state: every frontend and its entry. A new dict the caller owns."""
        self._flush()
        return dict(self._frontends)

    def services(self) -> list[Service]:
        """The local Services, by `namespace/name`."""
        return [self._services[k] for k in sorted(self._services)]

    def service(self, key: str) -> Service | None:
        """The local Service `namespace/name`, if the table holds it."""
        return self._services.get(key)

    def services_of_backend(self, ip: str, port: int) -> tuple[str, ...]:
        """`namespace/name` of every Service that has `ip:port` among its backends, sorted."""
        self._flush()
        return tuple(sorted(self._by_backend.get((ip, port), ())))

    def backend_index(self) -> dict[tuple[str, int], tuple[str, ...]]:
        """Every backend (address, port) → `namespace/name` of its Services, sorted: a copy, for
        readers on other threads (flows' `destination_service`)."""
        self._flush()
        return {k: tuple(sorted(v)) for k, v in self._by_backend.items() if v}

    def own_backends(self, namespace: str, name: str) -> list[tuple[ServicePort, tuple[Backend, ...]]]:
        """Per service port, the ready backends the Service selects in its own cluster, before
        remote backends and affinity: what this cluster offers the others for a global, shared
        Service (the cluster mesh publishes them). Empty for a Service the table does not hold."""
        svc = self._services.get(f"{namespace}/{name}")
        if svc is None:
            return []
        pods = self._selected(svc)
        return [(sp, unique_backends(self._local_backends(svc, sp, pods), ())) for sp in svc.ports]

    def endpoint_addresses(self, namespace: str, name: str) -> tuple[str, ...]:
        """The addresses of every ready or serving endpoint of the EndpointSlices naming the
        Service `namespace/name` (IPv4 and IPv6; sorted, unique), whether or not the table holds
        the Service: what a `toServices` rule selecting it stands for."""
        found = {a for ref in self._slices_of.get(f"{namespace}/{name}", ()) for a in _addresses(self._slices[ref])}
        return tuple(sorted(found, key=_ip_key))

    def slice(self, namespace: str, name: str) -> EndpointSlice | None:
        """The EndpointSlice `namespace/name`, if the table holds it."""
        return self._slices.get(f"{namespace}/{name}")

    def slices(self) -> list[EndpointSlice]:
        """The EndpointSlices, by `namespace/name`."""
        return [self._slices[k] for k in sorted(self._slices)]

    def missing_locally(self) -> list[str]:
        """Global Services remote clusters publish with no local Service of the same
        `namespace/name`: as in Cilium, nothing here balances to them."""
        return sorted(k for k in self._remote_by_service if k not in self._services)

    def not_global_locally(self) -> list[str]:
        """Global Services remote clusters publish whose local Service is not global: their
        remote backends are not used here."""
        return sorted(
            k for k in self._remote_by_service if k in self._services and not self._services[k].global_
        )

    def frontend_conflicts(self) -> dict[Frontend, tuple[str, ...]]:
        """Frontends more than one Service claims, with the claimants (the first owns it)."""
        self._flush()
        return {fe: tuple(sorted(keys)) for fe, keys in self._owners.items() if len(keys) > 1}

    @property
    def recomputed(self) -> int:
        """How many per-Service computations `frontends()` has run so far: a diagnostic showing
        that a change costs the Services it touches, not all of them."""
        return self._recomputed

    # -- internals ------------------------------------------------------------------------------

    def _index_service(self, svc: Service, *, add: bool) -> None:
        if not svc.selector:
            return
        pair = min(svc.selector.items())
        scope = (svc.cluster, svc.namespace)
        by_pair = self._services_by_pair.setdefault(scope, {})
        keys = by_pair.setdefault(pair, set())
        if add:
            keys.add(svc.ref)
            return
        keys.discard(svc.ref)
        if not keys:
            del by_pair[pair]
            if not by_pair:
                del self._services_by_pair[scope]

    def _index_slice(self, es: EndpointSlice, *, add: bool) -> None:
        svc = es.service_ref
        if svc is None:
            return
        self._dirty.add(svc)
        refs = self._slices_of.setdefault(svc, set())
        if add:
            refs.add(es.ref)
        else:
            refs.discard(es.ref)
            if not refs:
                del self._slices_of[svc]

    def _index_pod(self, pod: BackendPod, *, add: bool) -> None:
        scope = (pod.cluster, pod.namespace)
        by_label = self._pods_by_label.setdefault(scope, {})
        for pair in pod.labels.items():
            refs = by_label.setdefault(pair, set())
            if add:
                refs.add(pod.ref)
                continue
            refs.discard(pod.ref)
            if not refs:
                del by_label[pair]
        if not by_label:
            del self._pods_by_label[scope]

    def _mark_selecting(self, pod: BackendPod) -> None:
        """Mark the Services that select `pod`, if it is a backend at all."""
        if not pod.ready:
            return
        by_pair = self._services_by_pair.get((pod.cluster, pod.namespace))
        if not by_pair:
            return
        for pair in pod.labels.items():
            for key in by_pair.get(pair, ()):
                if selects(self._services[key].selector, pod.labels):
                    self._dirty.add(key)

    def _selected(self, svc: Service) -> list[BackendPod]:
        if not svc.selector:
            return []
        by_label = self._pods_by_label.get((svc.cluster, svc.namespace), {})
        refs = by_label.get(min(svc.selector.items()), ())
        pods = (self._pods[r] for r in sorted(refs))
        return [p for p in pods if p.ready and selects(svc.selector, p.labels)]

    def _local_backends(self, svc: Service, sp: ServicePort, pods: list[BackendPod]) -> list[Backend]:
        """The backends of `sp` in this cluster: the selected pods' target ports, or, for a
        Service without a selector, its slices' ready endpoints on the port of that name."""
        out = [Backend(p.ip, number, p.ref, p.cluster) for p in pods if (number := target_port(sp, p)) is not None]
        if svc.selector:
            return out
        for ref in sorted(self._slices_of.get(svc.ref, ())):
            es = self._slices[ref]
            if es.address_type != "IPv4" or es.cluster != svc.cluster:
                continue
            for port in es.ports:
                if port.name != sp.name or port.protocol != sp.protocol:
                    continue
                out.extend(Backend(a, port.port, f"EndpointSlice/{es.ref}", es.cluster)
                           for e in es.endpoints if e.ready for a in e.addresses)
        return out

    def _compute(self, key: str) -> dict[Frontend, FrontendEntry]:
        self._recomputed += 1
        svc = self._services.get(key)
        if svc is None or svc.cluster_ip is None:
            return {}
        pods = self._selected(svc)
        remote = self._remote_by_service.get(key, {}) if svc.global_ else {}
        affinity = svc.affinity if svc.global_ else "none"
        out: dict[Frontend, FrontendEntry] = {}
        for sp in svc.ports:
            fe = Frontend(svc.cluster_ip, sp.port, sp.protocol)
            if fe in out:
                continue
            local = self._local_backends(svc, sp, pods)
            far = [b for c in sorted(remote) for b in remote[c].get((sp.port, sp.protocol), ())]
            local, far = apply_affinity(affinity, local, far)
            out[fe] = FrontendEntry(key, sp.name, unique_backends(local, far))
        return out

    def _flush(self) -> None:
        if not self._dirty:
            return
        touched: set[Frontend] = set()
        for key in sorted(self._dirty):
            old = self._results.pop(key, {})
            new = self._compute(key)
            if new:
                self._results[key] = new
            if old == new:
                continue
            for fe in old.keys() - new.keys():
                owners = self._owners[fe]
                owners.discard(key)
                if not owners:
                    del self._owners[fe]
            for fe in new.keys() - old.keys():
                self._owners.setdefault(fe, set()).add(key)
            touched.update(old.keys() | new.keys())
            old_backends = {(b.ip, b.port) for e in old.values() for b in e.backends}
            new_backends = {(b.ip, b.port) for e in new.values() for b in e.backends}
            for addr in old_backends - new_backends:
                keys = self._by_backend[addr]
                keys.discard(key)
                if not keys:
                    del self._by_backend[addr]
            for addr in new_backends - old_backends:
                self._by_backend.setdefault(addr, set()).add(key)
        self._dirty.clear()
        for fe in touched:
            claimants = self._owners.get(fe)
            if claimants:
                self._frontends[fe] = self._results[min(claimants)][fe]
            else:
                self._frontends.pop(fe, None)
