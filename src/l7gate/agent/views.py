"""What the admin API shows: the agent's state as JSON-ready values, and the flows' peer lookup.

Every view reads a `StateView` (the state as of the last completed change: `AgentCore.view()`)
or another value it is handed; none takes the core's lock or changes anything. The agent's own
status (`status`) gathers the daemon's parts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from ..identity.ipcache import IPCache
from ..identity.numeric import RESERVED, IdentityError
from ..observe.flow import Service as FlowService
from ..observe.ingest_context import PeerInfo, hubble_labels
from ..policy.mapstate import MapEntry, MapKey
from ..policy.toservices import ServiceTarget
from ..xds.cache import SnapshotCache
from .core import AgentCore, StateView

if TYPE_CHECKING:
    from .daemon import Agent


def policies(v: StateView) -> list[dict[str, Any]]:
    """The policies in force and the CiliumCIDRGroups their CIDR rules may name, by key."""
    docs = {**v.policy_docs, **v.cidr_group_docs}
    return [{"key": k, "object": docs[k]} for k in sorted(docs)]


def pod_counts(v: StateView) -> dict[str, int]:
    """What `l7gate status` counts: every pod the agent knows (what `endpoint list` shows),
    and the local ones, whose ingress this node enforces."""
    return {"known": len(v.pods), "local": sum(1 for rec in v.pods.values() if rec.local)}


def pods(v: StateView) -> list[dict[str, Any]]:
    return [
        {
            "ref": ref,
            "identity": rec.identity,
            "ips": list(rec.pod.ips),
            "local": rec.local,
            "ports": [f"{p}/{proto}" for p, proto in rec.pod.ports],
            "labels": dict(rec.labels),
        }
        for ref, rec in sorted(v.pods.items())
    ]


def services_datapath(core: AgentCore) -> str:
    """Whether this node serves ClusterIPs, and if not why, in words."""
    c = core.config
    if core.socket_lb is not None:
        return f"served: the kernel's socket load balancer on cgroup {c.cgroup}"
    if c.datapath_mode == "loopback":
        return ("not served: loopback mode has no kernel load balancer; a ClusterIP is not an address "
                "of this host (call a backend pod's address, or run with datapath.mode: kernel)")
    if core.fallback is not None:
        return "not served: the iptables fallback balances nothing (the kernel datapath did not load)"
    if not c.cgroup:
        return "not served: no datapath.cgroup (the socket load balancer attaches to the pods' cgroup)"
    if not c.socket_lb:
        return "not served: datapath.socketLB is false"
    return "not served: the socket load balancer did not load (see the agent's log)"


def services(v: StateView, core: AgentCore) -> dict[str, Any]:
    """`GET /v1/services`: every Service with its frontends and backends, as `cilium service
    list` shows them, and whether this node's datapath serves them."""
    by_service: dict[str, list[dict[str, Any]]] = {}
    for f, e in sorted(v.frontends.items()):
        by_service.setdefault(e.service, []).append({
            "frontend": f"{f.ip}:{f.port}/{f.protocol}",
            "port_name": e.port_name,
            "backends": [{"address": f"{b.ip}:{b.port}", "pod": b.pod, "cluster": b.cluster}
                         for b in e.backends],
        })
    out = []
    for svc in sorted(v.services, key=lambda s: (s.namespace, s.name)):
        out.append({
            "service": svc.ref,
            "cluster": svc.cluster,
            "cluster_ip": svc.cluster_ip,
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol, "target_port": p.target}
                      for p in svc.ports],
            "selector": dict(svc.selector) if svc.selector is not None else None,
            "global": svc.global_,
            "shared": svc.shared,
            "affinity": svc.affinity,
            "frontends": by_service.get(svc.ref, []),
            "labels": dict(svc.labels),
            "to_services": _to_services(v.service_targets.get(svc.ref)),
        })
    return {"datapath": services_datapath(core), "error": core.services_error, "services": out}


def _to_services(target: ServiceTarget | None) -> dict[str, Any]:
    """What a `toServices` rule naming the Service selects: the addresses of its EndpointSlices'
    ready or serving endpoints, or nothing, and why."""
    if target is None or target.has_selector:
        return {"selectable": False, "addresses": [],
                "why": "it has a selector: toServices selects Services without one (use toEndpoints)"}
    return {"selectable": True, "addresses": [a.with_prefixlen for a in target.addresses]}


def nodes(v: StateView) -> list[dict[str, Any]]:
    """The Nodes the agent knows: labels, addresses, and the identity their addresses have
    (`host` for this node's, the identity of its labels for another's; None without an IPv4
    address)."""
    return [
        {"node": ref, "cluster": r.node.cluster, "name": r.node.name, "labels": dict(r.node.labels),
         "addresses": list(r.node.addresses), "identity": r.identity, "local": r.local}
        for ref, r in sorted(v.nodes.items())
    ]


def allocated_identities(v: StateView) -> int:
    """Identities allocated for pods, CIDRs and names; the reserved ones are not counted."""
    return sum(1 for ident in v.identities if ident not in RESERVED)


def identities(v: StateView) -> list[dict[str, Any]]:
    pods_of = v.pods_of()
    return [
        {
            "identity": ident,
            "labels": dict(labels),
            "pods": pods_of.get(ident, []),
            "endpoint": ident in v.endpoints,
        }
        for ident, labels in sorted(v.identities.items())
    ]


def ipcache_entries(ipcache: IPCache) -> list[dict[str, Any]]:
    return [{"prefix": e.prefix.with_prefixlen, "identity": e.identity} for e in ipcache.snapshot()]


def endpoint_policies(v: StateView) -> list[dict[str, Any]]:
    pods_of = v.pods_of()
    return [
        {
            "identity": ident,
            "pods": [r for r in pods_of.get(ident, ()) if v.pods[r].local],
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
        for ident, pol in sorted(v.endpoints.items())
    ]


def _entry_json(key: MapKey, entry: MapEntry) -> dict[str, Any]:
    return {
        "peer": "any" if key.peer == 0 else key.peer,
        "protocol": key.protocol.value,
        "ports": str(key.ports),
        "action": entry.action,
        "auth": entry.auth.value if entry.auth else None,
        "http": [str(h) for h in entry.l7.http] if entry.l7 is not None else None,
        "derived_from": [str(o) for o in entry.derived_from],
    }


def xds_config(cache: SnapshotCache, node: str | None, type_url: str | None) -> dict[str, Any]:
    """The resources served, per node and type (`l7gate xds dump`)."""
    out: dict[str, Any] = {}
    for node_id in cache.node_ids():
        if node is not None and node_id != node:
            continue
        snap = cache.get_snapshot(node_id)
        if snap is None:
            continue
        types: dict[str, Any] = {}
        for t in sorted(snap.resources):
            if type_url is not None and t != type_url:
                continue
            types[t] = {
                "version": snap.version(t),
                "resources": {
                    name: json_format.MessageToDict(msg, preserving_proto_field_name=True)
                    for name, msg in sorted(snap.messages(t).items())
                },
            }
        out[node_id] = types
    return {"nodes": out}


def status(agent: Agent) -> dict[str, Any]:
    """`GET /v1/status`: the node, its datapath, Envoy, counts and health."""
    env = agent.envoy.status() if agent.envoy else None
    problems = agent.watch.problems()
    view = agent.core.view()
    return {
        "health": {"healthy": not problems, "problems": problems},
        "node": agent.config.node,
        "cluster": {"name": agent.config.cluster_name, "id": agent.config.cluster_id},
        "node_id": agent.config.node_id,
        "datapath": datapath_status(agent),
        "admin": {"address": agent.admin.address, **agent.admin.stats()},
        "xds": agent.xds.address,
        "envoy": None if env is None else {
            "state": env.state.value,
            "pid": env.pid,
            "restarts": env.restarts,
            "adopted": env.adopted,
            "admin": env.admin_address,
            "uptime": env.uptime,
            "last_exit": env.last_exit.describe() if env.last_exit else None,
            "error": env.error,
        },
        # The DNS proxy of toFQDNs/rules.dns (kernel mode), and what it taught.
        "dns_proxy": None if agent.dns is None else {**agent.dns.status(), "learned": len(agent.core.fqdn)},
        # The L7 enforcer: Envoy (above) or the h11 engine, with its listeners and counters.
        "proxy": agent.engine.status() if agent.engine is not None else {
            "engine": "envoy" if agent.envoy is not None else "none"},
        # As of the last completed change: an apply under way shows when it is done.
        "policies": len(view.policy_docs),
        "cidr_groups": len(view.cidr_group_docs),
        "policy_revision": view.policy_revision,
        "identities": allocated_identities(view),
        # known: every pod `endpoint list` shows (all clusters); local: those on this node,
        # whose ingress this agent enforces.
        "pods": pod_counts(view),
        "services": {"count": len(view.services), "frontends": len(view.frontends),
                     "datapath": services_datapath(agent.core), "error": agent.core.services_error},
        "proxied_ports": [f"{p.ip}:{p.port}" for p in agent.core.publisher.ports],
        # egress HTTP rules (docs/egress-http.md): Envoy's egress listener and the ports it has a
        # filter chain for; port 0: none (their connections are dropped)
        "egress_proxy": ({"port": agent.core.egress.proxy_port, "ports": list(agent.core.egress.ports)}
                         if agent.core.egress is not None else {"port": 0, "ports": []}),
        "access_logs": {"entries": agent.als.entries, "errors": agent.als.errors, "streams": agent.als.streams,
                        "malformed": agent.als.malformed},
        "flows": dataclasses.asdict(agent.flows.stats()),
        # the API connection, the last sync and counts per resource, refusals (docs/kubernetes.md)
        "kubernetes": agent.kube.status() if agent.kube is not None else {"enabled": False},
        "uptime": round(time.monotonic() - agent.started, 3),
    }


def datapath_status(agent: Agent) -> dict[str, Any]:
    info = dict(agent.datapath_info)
    mode = info["mode"]
    if mode == "loopback":
        info["description"] = ("loopback: Envoy fronts each local pod's ports on the pod's own "
                               "address; L3/L4 and L7 verdicts are made in Envoy (no kernel datapath). "
                               "NOT A SECURE MODE: each pod's server is reachable directly on its "
                               f"port + {agent.config.upstream_port_offset} by any local process")
        info["secure"] = False
    elif mode == "kernel":
        info["description"] = ("kernel: BPF programs on the pods' veths make L3/L4 verdicts; "
                               "connections to ports with HTTP rules are redirected to Envoy")
        if agent.core.kernel is not None:
            info["policy_entries"] = agent.core.kernel.dp.policy_entries()
        info["drops"] = len(agent.drops)
    else:
        info["description"] = ("iptables fallback: every TCP connection to a local pod is "
                               "redirected to Envoy, which makes the L3/L4 and L7 verdicts")
    return info


def service_of(core: AgentCore) -> Callable[[str, int], FlowService | None]:
    """(address, port) → the Service it is a backend of (the first by name when several), for
    flows' `destination_service`. Reads the core's current view; called by the ingestion thread."""

    def lookup(ip: str, port: int) -> FlowService | None:
        refs = core.view().backends.get((ip, port))
        if not refs:
            return None
        namespace, name = refs[0].split("/", 1)
        return FlowService(name, namespace)

    return lookup


class PeerIndex:
    """IP → PeerInfo for flows, from the core's pods and its ipcache; rebuilt when either
    changes (their revisions), so a lookup is one dict probe. Called by the ingestion thread."""

    _MAX_OTHER = 10_000  # addresses that are no pod (world, CIDRs), cached until a change

    def __init__(self, core: AgentCore) -> None:
        self.core = core
        self._key: tuple[int, int] | None = None
        self._pods: dict[str, PeerInfo] = {}
        self._other: dict[str, PeerInfo] = {}

    def __call__(self, ip: str) -> PeerInfo:
        key = (self.core.revision, self.core.ipcache.revision)
        if key != self._key:
            by_ip: dict[str, PeerInfo] = {}
            for ref, rec in self.core.view().pods.items():
                cluster, ns, name = ref.split("/", 2)
                peer = PeerInfo(rec.identity, cluster, ns, name, hubble_labels(dict(rec.labels)), rec.local)
                for pod_ip in rec.pod.ips:
                    by_ip[pod_ip] = peer
            self._pods, self._other, self._key = by_ip, {}, key
        info = self._pods.get(ip) or self._other.get(ip)
        if info is None:
            try:
                ident = self.core.ipcache.lookup(ip)
            except IdentityError as exc:  # not an address
                raise ValueError(str(exc)) from None
            labels = self.core.resolver.identities.get(ident)
            if labels is None and ident in RESERVED:
                labels = RESERVED[ident].labels
            info = PeerInfo(ident, labels=hubble_labels(labels) if labels else ())
            if len(self._other) < self._MAX_OTHER:
                self._other[ip] = info
        return info


def clustermesh(agent: Agent) -> dict[str, Any]:
    """`GET /v1/clustermesh`: this cluster and every remote one, as `cilium clustermesh status`
    shows them."""
    if agent.mesh is None:
        return {"enabled": False, "remotes": []}
    st = agent.mesh.status()
    local = agent.local_mesh
    view = agent.core.view()
    services, problems = global_services(view)
    remotes = []
    for r in st.remotes:
        remote = dataclasses.asdict(r)
        remote["global_services"] = services.get(r.name, [])
        remotes.append(remote)
    return {
        "enabled": True,
        "cluster": {"name": st.cluster, "id": st.cluster_id},
        "ready": st.ready,
        "publishing": None if local is None else {
            "synced": list(local.publisher.synced_paths()), "pending": local.publisher.pending,
            "endpoints": local.publisher.endpoint_count(), "services": list(view.published_services),
            "services_error": agent.core.mesh_services_error,
        },
        "config_errors": list(agent.mesh_config_errors),
        "remotes": remotes,
        "service_problems": problems,
    }


GLOBAL_ANNOTATION = 'service.cilium.io/global: "true"'


def global_services(v: StateView) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Per remote cluster, the global services it publishes and what this cluster does with
    each (`here`): "global" (its backends are balanced over here), "missing" (no Service of that
    namespace/name here), "not global" (the Service here is not global), "not shared" (the remote
    offers no backends). And, by name, every one that needs the user: as in Cilium, a global
    service is balanced over only from clusters that have the Service too, global."""
    local = {svc.ref: svc for svc in v.services}
    out: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    for cluster, published in sorted(v.remote_services.items()):
        rows = []
        for cs in published:
            svc = local.get(cs.ref)
            if not cs.shared:
                here = "not shared"
            elif svc is None:
                here = "missing"
                problems.append(
                    f"global service {cs.ref} exists in {cluster} but not here: create it in this cluster too, "
                    f"as Cilium requires (a Service {cs.name} in namespace {cs.namespace}, annotated "
                    f"{GLOBAL_ANNOTATION}); until then nothing here is balanced over {cluster}'s backends")
            elif not svc.global_:
                here = "not global"
                problems.append(
                    f"global service {cs.ref} of {cluster} is not global here: annotate this cluster's "
                    f"Service {cs.ref} with {GLOBAL_ANNOTATION} to balance over {cluster}'s backends too")
            else:
                here = "global"
            rows.append({
                "service": cs.ref,
                "frontends": [f"{ip}:{l4.port}/{l4.protocol}" for ip, ports in cs.frontends for _, l4 in ports],
                "backends": len(cs.backends),
                "shared": cs.shared,
                "here": here,
            })
        out[cluster] = rows
    return out, problems
