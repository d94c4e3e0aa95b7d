"""`l7gate agent`: wiring of one node's agent, and its clean shutdown.

Start order: kvstore → snapshot cache → core (restores policies and pods from the kvstore and
fills the cache) → xDS server → Envoy supervisor → admin endpoint → the Kubernetes watch (when
configured: it feeds the core the objects of the API; until its initial lists are applied the
agent enforces what it restored, and /healthz says it is not ready). The xDS server starts after
the cache holds the restored state, so the first configuration any Envoy gets — a new one, or
one that outlived the previous agent and reconnects — is already the whole enforcing one.
SIGTERM or SIGINT stops everything in reverse order.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import deque
from collections.abc import Sequence
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..clustermesh.allocator import MeshIdentityAllocator
from ..clustermesh.config import RemotesWatch, describe, load_remotes
from ..clustermesh.lease import MeshLease
from ..clustermesh.mesh import ClusterMesh
from ..clustermesh.publisher import MeshPublisher
from ..clustermesh.types import MeshError
from ..clustermesh.wire import NodeAddress, NodeRecord
from ..identity.allocator import IdentityAllocator
from ..k8s.watch import FirstPages, KubeConfigError, Watcher
from ..kvstore.etcd import EtcdKVStore
from ..kvstore.sqlite import SQLiteKVStore
from ..mtls.auth import AuthManager, boot_ns_for
from ..mtls.ca import BuiltinCA
from ..mtls.handshake import MutualAuthServer
from ..mtls.store import SVIDSource, SVIDStore
from ..observe.flow import AUTH_REQUIRED
from ..redirect_bpf.applier import IptablesRedirect, ensure_policy_routing
from ..redirect_bpf.lb import SocketLB
from ..redirect_bpf.loader import DatapathError, KernelDatapath
from ..records import KernelDrop
from ..observe.als import AccessLogReceiver, http_grpc_access_log, tcp_grpc_access_log
from ..observe.api import FlowQuery, stream
from ..envoy_names import EXTENSION_CONFIG, ORIGINAL_DST_HEADER
from ..observe.ingest import Ingestor
from ..observe.ingest_context import IngestContext
from ..observe.kernel_flows import SOURCE_KERNEL
from ..observe.metrics import FlowCollector
from ..observe.ring import FlowRing
from ..l7proxy.bootstrap import ApiType, BootstrapConfig, parse_xds_address
from ..observe.dns_flows import SOURCE_DNS
from ..observe.envoy_flows import SOURCE_H11
from ..records import DNSRecord, HTTPRecord
from ..l7proxy.supervisor import EnvoyOptions, EnvoySupervisor
from ..xds.cache import LISTENER, SnapshotCache
from ..xds.server import XdsServer
from .admin import AdminApp, AdminHooks, AdminServer, TokenError, load_token_file
from .config import AgentConfig
from .health import EnforcementWatch
from .httpd import Limits, descriptor_budget
from . import heap, views
from .core import AgentCore
from .kube import open_watcher
from ..xds.tunnel import Tunnels
from ..xds.tunnel_plan import plan as tunnel_plan
from .metrics import AgentMetrics

# Imported where they are started, by the agents whose configuration asks for them: ~0.2 s of
# every other agent's start-up (the SPIFFE library, the DNS proxy, the h11 engine).
if TYPE_CHECKING:
    from ..dnsproxy import DNSAnswer, DNSEvent, DNSProxy
    from ..l7proxy.h11engine import H11Engine


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} l7gate agent: {msg}", file=sys.stderr, flush=True)


@dataclass
class Agent:
    config: AgentConfig
    store: SQLiteKVStore
    cache: SnapshotCache
    xds: XdsServer
    core: AgentCore
    envoy: EnvoySupervisor | None
    admin: AdminServer
    metrics: AgentMetrics
    als: AccessLogReceiver
    started: float
    datapath_info: dict[str, Any]
    drops: deque[KernelDrop]
    flows: FlowRing
    ingestor: Ingestor
    watch: EnforcementWatch
    mtls: MutualAuth | None = None
    local_mesh: LocalMesh | None = None  # this cluster's etcd: shared identities, this node published
    mesh: ClusterMesh | None = None  # the remote clusters
    mesh_config_errors: tuple[str, ...] = ()
    kube: Watcher | None = None  # the Kubernetes API as a source (kubernetes.enabled)
    engine: H11Engine | None = None  # proxy.engine: h11, instead of Envoy
    dns: DNSProxy | None = None  # kernel mode: the DNS proxy of toFQDNs and rules.dns
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)

    def stop(self) -> None:
        log("stopping")
        self.stopping.set()
        if self.kube is not None:
            self.kube.stop()  # first: nothing from the API lands in a core that is stopping
        if self.mesh is not None:
            self.mesh.stop()  # entries merged stay in force (and in the store) for the next run
        if self.local_mesh is not None:
            self.local_mesh.close()
        if self.mtls is not None:
            self.mtls.stop()  # auth map entries stay until they expire (decision 7)
        if self.core.kernel is not None:
            self.core.kernel.dp.close()  # programs stay attached and maps pinned (decision 7)
        if self.core.socket_lb is not None:
            self.core.socket_lb.close()  # the same for the socket load balancer
        self.flows.close()  # ends `observe --follow` streams, so the admin server can stop
        self.watch.stop()
        self.admin.stop()
        if self.envoy is not None:
            self.envoy.stop()
        if self.engine is not None:
            self.engine.stop()
        if self.dns is not None:
            self.dns.stop()
        self.xds.stop()
        self.ingestor.stop()
        self.store.close()
        log("stopped")


def start_agent(config: AgentConfig, *, first_pages: FirstPages | None = None) -> Agent:
    """The agent of `config`, started (module doc); `first_pages`: the Kubernetes listings'
    first pages, already asked for (`k8s.watch.FirstPages`)."""
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    # The admin API may hold only so many descriptors that Envoy can always be restarted.
    max_conns, nofile = descriptor_budget(config.admin_max_connections)
    if max_conns < config.admin_max_connections:
        log(f"admin.maxConnections {config.admin_max_connections} lowered to {max_conns}: the descriptor "
            f"limit is {nofile}")
    token = None
    if not config.admin_listen.startswith("unix:"):
        try:
            token = load_token_file(Path(config.admin_token_path), create=True)
        except TokenError as exc:
            raise RuntimeError(str(exc)) from None
    store = SQLiteKVStore(str(state / "kv.db"))
    if store.created:
        log(f"first start: created a new store at {state / 'kv.db'}")
    metrics = AgentMetrics()
    cache = SnapshotCache()
    als = AccessLogReceiver()
    xds = XdsServer(
        cache, config.xds_listen, on_ack=metrics.on_ack, on_nack=metrics.on_nack,
        extra_handlers=[als.handler()],
    )
    datapath, fallback, datapath_info = _open_datapath(config)
    socket_lb = _open_socket_lb(config, datapath is not None)
    local_mesh = LocalMesh.open(config, store) if config.clustermesh.enabled else None
    core = AgentCore(
        config, store, cache, access_logs=[http_grpc_access_log()], datapath=datapath, fallback=fallback,
        mesh_allocator=local_mesh.allocator if local_mesh else None,
        mesh_publisher=local_mesh.publisher if local_mesh else None,
        socket_lb=socket_lb,
    )
    kernel = core.kernel
    # A port that moved to a larger split keeps its old names while Envoy drains their listener.
    core.publisher.subscribed = lambda names: xds.subscribed(config.node_id, EXTENSION_CONFIG, names)
    kube: Watcher | None = None
    if config.kubernetes.enabled:
        try:  # before anything starts: a configuration that cannot work stops the agent here
            kube = open_watcher(config, core, log, first_pages)
        except KubeConfigError as exc:
            raise RuntimeError(f"kubernetes: {exc}") from None
    mesh: ClusterMesh | None = None
    if local_mesh is not None:
        # This node's endpoints are queued by the restore above: the canaries follow them.
        local_mesh.publisher.synced()
        mesh = ClusterMesh(config.cluster_name, config.cluster_id, (), on_change=core.apply_mesh)
    # Only now: an Envoy that outlived the previous agent reconnects as soon as the socket
    # exists, and must find the whole restored configuration, never a half-built one (a
    # resource missing from a partial snapshot is a removal for Envoy).
    xds_address = xds.start()
    drops: deque[KernelDrop] = deque(maxlen=1024)
    metrics.attach(core)
    metrics.attach_xds(xds.status)
    flows = FlowRing(config.observe.ring_size, config.observe.follow_buffer)
    ingestor = Ingestor(flows, IngestContext(views.PeerIndex(core), node_name=f"{config.cluster_name}/{config.node}",
                                             service_of=views.service_of(core)))
    ingestor.start()
    als.set_batch_sink(ingestor.http_access_logs)
    als.set_tcp_batch_sink(ingestor.tcp_access_logs)
    if kernel is not None:
        kernel.attach_links(config.links)
        if not config.mtls.tunnel and kernel.dp.set_tunnels(()):
            log("encryption in transit is off: removed the tunnel redirects a previous run left in the kernel")

        def on_drop(e: KernelDrop) -> None:
            drops.append(e)
            if e.reason == AUTH_REQUIRED and mtls is not None:
                # On-demand fallback of the proactive handshakes.
                local, remote = (e.dst_identity, e.src_identity) if e.direction == "ingress" else (
                    e.src_identity, e.dst_identity)
                mtls.manager.request(local, remote)
            ingestor.offer(SOURCE_KERNEL, [e])

        kernel.dp.poll_events(on_drop)
    mtls: MutualAuth | None = None
    if config.mtls.enabled:
        if kernel is None:
            raise RuntimeError(
                "mtls.enabled needs the kernel datapath (datapath.mode: kernel with bcc); "
                "without it, traffic under `authentication: required` is refused"
            )
        mtls = MutualAuth.start(config, core, kernel.dp, xds, cache)
    metrics.registry.register(FlowCollector(ingestor, flows, lambda: als.malformed))
    envoy: EnvoySupervisor | None = None
    engine: H11Engine | None = None
    if config.proxy_engine == "h11":
        engine = _start_h11_engine(config, core, ingestor)
    elif config.envoy.enabled:
        envoy = EnvoySupervisor(
            EnvoyOptions(
                state_dir=state / "envoy",
                bootstrap=BootstrapConfig(
                    node_id=config.node_id,
                    xds=parse_xds_address(xds_address),
                    cluster=config.cluster_name,
                    api_type=ApiType[config.xds_api_type],
                    admin_socket=str(state / "envoy" / "admin.sock"),
                ),
                concurrency=config.envoy.concurrency,
                log_level=config.envoy.log_level,
                hot_restart_base_id=config.envoy.base_id,
            )
        )
        envoy.start()
    node_id = config.node_id

    def served_listeners() -> frozenset[str]:
        snap = cache.get_snapshot(node_id)
        return frozenset(snap.messages(LISTENER)) if snap is not None else frozenset()

    agent: Agent
    # Through `agent`: the xDS server it holds may be replaced (a restarted server).
    watch = EnforcementWatch(envoy, lambda: agent.xds.status(), served_listeners, node_id,
                             lds_rows=lambda: agent.xds.status(LISTENER))
    if kube is not None:
        watch.add_check(kube.problems)
    if engine is not None:
        watch.add_check(engine.problems)
    dns = _start_dns_proxy(config, core, ingestor) if kernel is not None and config.dns.proxy else None
    if dns is not None:
        watch.add_check(dns.problems)
    hooks = AdminHooks(
        status=lambda: views.status(agent),
        xds_status=lambda: agent.xds.status_json(),
        xds_config=lambda n, t: views.xds_config(cache, n, t),
        metrics=metrics.render,
        flows=lambda q: stream(flows, FlowQuery.from_query(q)),
        auth=mtls.status if mtls is not None else None,
        tunnel=mtls.tunnels.status if mtls is not None and mtls.tunnels is not None else None,
        health=watch.problems,
        clustermesh=lambda: views.clustermesh(agent),
        dns=dns.status if dns is not None else None,
    )
    admin = AdminServer(AdminApp(core, hooks, token), config.admin_listen, group=config.admin_group,
                        limits=Limits(max_connections=max_conns))
    agent = Agent(config, store, cache, xds, core, envoy, admin, metrics, als, time.monotonic(),
                  datapath_info, drops, flows=flows, ingestor=ingestor, watch=watch, mtls=mtls,
                  local_mesh=local_mesh, mesh=mesh, kube=kube, engine=engine, dns=dns)
    if mesh is not None:
        mesh.start()
        if config.clustermesh.config_dir:
            threading.Thread(target=_follow_remotes, args=(agent, mesh), name="l7g-mesh-config",
                             daemon=True).start()
    watch.start()
    admin.start()  # only now: its handlers read `agent`
    if kube is not None:
        log(f"kubernetes: watching {kube.api.host} as node {config.node}")
        kube.start()
    threading.Thread(target=heap.settle_periodically, args=(agent.stopping, core.exclusive, log), name="l7g-heap",
                     daemon=True).start()
    threading.Thread(target=_retire_drained, args=(agent.stopping, core), name="l7g-slots-retire",
                     daemon=True).start()
    return agent


def _retire_drained(stopping: threading.Event, core: AgentCore) -> None:
    """Every second while a port keeps the names of a listener it replaced (a move to a larger
    split, `xds.publisher`): drop those Envoy no longer subscribes to (the listener drained)."""
    while not stopping.wait(1.0):
        if core.publisher.retiring:
            try:
                core.retire_drained()
            except Exception as exc:  # noqa: BLE001 - the next second tries again; the names only stay longer
                log(f"slots: retiring a replaced listener's names failed: {exc}")


class _CorePolicy:
    """The h11 engine's view of the core (`l7proxy.h11engine.PolicySource`)."""

    def __init__(self, core: AgentCore) -> None:
        self.revision = core.l7_revision
        self.decision = core.l7_decision


def _start_h11_engine(config: AgentConfig, core: AgentCore, ingestor: Ingestor) -> H11Engine:
    """`proxy.engine: h11`: the engine instead of Envoy, on the ports Envoy would proxy, its
    requests' access logs through the same flow ingestion as Envoy's."""
    from ..l7proxy.h11engine import EngineLimits, EnginePort, H11Engine

    if config.mtls.tunnel:
        raise RuntimeError("proxy.engine h11 cannot carry the mTLS tunnel (mtls.encryption: tunnel), which runs in "
                           "Envoy")
    limits = EngineLimits(idle_timeout=config.proxy_idle_timeout, header_timeout=config.proxy_header_timeout,
                          max_connections=config.proxy_max_connections)
    def on_records(recs: Sequence[HTTPRecord]) -> None:
        ingestor.offer(SOURCE_H11, recs)

    engine = H11Engine(_CorePolicy(core), auth_verified=core.kernel is not None, on_records=on_records,
                       limits=limits, log=log)
    engine.start()

    def follow_ports() -> None:
        engine.set_ports(EnginePort(p.ip, p.port, p.upstream_ip, p.upstream_port, p.transparent)
                         for p in core.publisher.ports)

    core.on_change(follow_ports)
    core.exclusive(follow_ports)
    log(f"L7 proxy: the h11 engine ({engine.status()['loop']}), not Envoy")
    return engine


def _start_dns_proxy(config: AgentConfig, core: AgentCore, ingestor: Ingestor) -> DNSProxy:
    """Kernel mode: the node's transparent DNS proxy on port 53 (docs/fqdn.md). The datapath
    sends it the queries of pods whose egress policy has DNS rules; it asks the core's policy,
    and hands the core each allowed answer's addresses before the pod gets it. Its events are
    flows; a thread expires learned addresses."""
    from ..dnsproxy import DNSProxy, DNSVerdict

    def judge(src: str, server: str, qname: str, qtype: str) -> DNSVerdict:
        allowed, why, policies = core.dns_verdict(src, server, qname)
        return DNSVerdict(allowed, why, policies)

    def on_answer(src: str, answers: list[DNSAnswer]) -> None:
        core.dns_learned(src, [(a.name, a.ips, a.ttl) for a in answers])

    def on_event(ev: DNSEvent) -> None:
        v = ev.verdict
        ingestor.offer(SOURCE_DNS, [DNSRecord(
            ev.kind, ev.source, ev.server, ev.qname, ev.qtype, ev.protocol, ev.time,
            allowed=v.allowed if v is not None else True, reason=v.reason if v is not None else "",
            policies=v.policies if v is not None else (), rcode=ev.rcode, ips=ev.ips, ttl=ev.ttl,
            cnames=ev.cnames, latency=ev.latency, error=ev.error)])

    proxy = DNSProxy(judge, on_answer, on_event, listen=("0.0.0.0", 53), transparent=True,
                     refused_rcode=config.dns.reject_response_code, log=log)
    proxy.start()

    def expire() -> None:
        while True:
            time.sleep(1.0)
            try:
                core.expire_fqdn()
            except Exception as exc:  # noqa: BLE001 - expiry must go on
                log(f"fqdn: expiry failed: {exc}")

    threading.Thread(target=expire, name="l7g-fqdn-expiry", daemon=True).start()
    log("DNS proxy on :53 (udp, tcp) for toFQDNs and rules.dns")
    return proxy


def _open_datapath(config: AgentConfig) -> tuple[KernelDatapath | None, IptablesRedirect | None, dict[str, Any]]:
    """Kernel mode: the BPF datapath, or — when bcc cannot compile — the iptables fallback,
    saying why. Loopback mode: neither."""
    if config.datapath_mode != "kernel":
        return None, None, {"mode": "loopback"}
    changed = ensure_policy_routing()
    if changed:
        log(f"policy routing for the proxy: {'; '.join(changed)}")
    dp = KernelDatapath(Path(config.pin_dir), egress_proxy_port=config.proxy_egress_port)
    try:
        if not config.bpf:
            raise DatapathError("datapath.bpf is false in the configuration")
        dp.open()
    except DatapathError as exc:
        if config.fallback == "none":
            raise
        log(f"kernel datapath unavailable: {exc}")
        log("FALLING BACK to iptables redirect: every TCP connection to a local pod goes through "
            "Envoy, which makes the L3/L4 verdicts; UDP/SCTP are not filtered")
        return None, IptablesRedirect(), {"mode": "iptables-fallback", "reason": str(exc)}
    for problem in dp.replaced:
        log(f"replaced a pinned map that was not ours or was corrupt: {problem}")
    acceleration = "off (no datapath.cgroup)"
    if config.cgroup and not config.socket_acceleration:
        acceleration = "off (datapath.socketAcceleration: false)"
    elif config.cgroup:
        try:
            dp.accelerate(Path(config.cgroup))
            acceleration = f"on: sockops + sk_msg for the sockets of cgroup {config.cgroup}"
        except DatapathError as exc:
            acceleration = f"off: {exc}"
        log(f"socket acceleration {acceleration}")
    return dp, None, {"mode": "kernel", "pin_dir": config.pin_dir, "replaced_maps": dp.replaced,
                           "socket_acceleration": acceleration}


def _open_socket_lb(config: AgentConfig, kernel: bool) -> SocketLB | None:
    """The socket load balancer for Services, when the kernel datapath loaded and the pods'
    cgroup is configured; else None (the status says why ClusterIPs are not served). A failure
    to load it is logged and leaves the rest of the datapath enforcing."""
    if not kernel or not config.cgroup or not config.socket_lb:
        return None
    lb = SocketLB(Path(config.pin_dir))
    try:
        lb.open()
        lb.attach(Path(config.cgroup))
    except DatapathError as exc:
        log(f"socket load balancer unavailable, ClusterIPs are not served: {exc}")
        lb.close()
        return None
    for problem in lb.replaced:
        log(f"replaced a pinned map that was not ours or was corrupt: {problem}")
    log(f"socket load balancer on: ClusterIPs balanced at connect() for cgroup {config.cgroup}")
    return lb


def run_agent(config: AgentConfig, *, first_pages: FirstPages | None = None) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent = start_agent(config, first_pages=first_pages)
    except Exception as exc:
        log(f"failed to start: {type(exc).__name__}: {exc}")
        return 1
    log(
        f"ready: node {config.node_id}, admin {agent.admin.address}, xds {agent.xds.address}, "
        f"datapath {config.datapath_mode}"
    )
    if agent.envoy is not None:
        try:
            st = agent.envoy.wait_ready(30)
            log(f"envoy live: pid {st.pid}, admin {st.admin_address}")
        except Exception as exc:
            log(f"envoy not ready yet: {exc}")
    stop.wait()
    agent.stop()
    return 0


@dataclass
class MutualAuth:
    """SPIFFE mutual authentication between agents, feeding the kernel's auth map."""

    source: SVIDSource  # the built-in CA, or SPIRE
    store: SVIDStore
    server: MutualAuthServer
    manager: AuthManager
    port: int
    tunnels: Tunnels | None = None

    @classmethod
    def start(cls, config: AgentConfig, core: AgentCore, dp: KernelDatapath, xds: XdsServer,
              cache: SnapshotCache) -> MutualAuth:
        m = config.mtls
        source: SVIDSource
        if m.spire_socket:
            from ..mtls.spire import SpireSource

            source = SpireSource(m.spire_socket, m.trust_domain)
        else:
            source = BuiltinCA.load_or_create(Path(m.ca_dir), m.trust_domain, svid_ttl=m.svid_ttl)
        store = SVIDStore(source, Path(config.state_dir) / "mtls")
        store.set_identities(core.local_identities())
        store.start()
        host, _, port = m.listen.rpartition(":")
        server = MutualAuthServer(store, listen=(host, int(port)))
        server.start()
        # The kernel keys an entry by the remote node's address; the port is its auth server's.
        manager = AuthManager(
            store,
            write=lambda local, remote, node, expires: dp.set_auth(local, remote, boot_ns_for(expires), node[0]),
            delete=lambda local, remote, node: dp.delete_auth(local, remote, node[0]),
        )
        manager.start()
        tunnels: Tunnels | None = None
        if m.tunnel:
            node_id = config.node_id

            def listeners_acked(version: str, timeout: float) -> bool:
                return xds.wait(lambda rows: any(
                    r.node_id == node_id and r.type_url == LISTENER and r.acked_version == version
                    for r in rows), timeout)

            tunnels = Tunnels(
                cache, node_id, store, host, m.tunnel_port,
                set_kernel=dp.set_tunnels, listeners_acked=listeners_acked,
                # The source side logs only failures (a refused tunnel, a 403 or 5xx): the
                # destination node has every request's flow, with the verdict.
                access_logs=[http_grpc_access_log(min_status=400)],
                ingress_access_logs=[http_grpc_access_log(request_headers=[ORIGINAL_DST_HEADER])],
                listener_access_logs=[tcp_grpc_access_log()],
                tcp_access_logs=[tcp_grpc_access_log(failures_only=True)],
            )
        self = cls(source, store, server, manager, m.port, tunnels)

        def follow_policy() -> None:
            store.set_identities(core.local_identities())
            manager.set_wanted(core.auth_wanted(self.port))
            if tunnels is not None:
                tunnels.apply(tunnel_plan(core.tunnel_inputs()))

        core.on_change(follow_policy)
        follow_policy()
        origin = f"SPIRE at {m.spire_socket}" if m.spire_socket else f"built-in CA {m.ca_dir}"
        log(f"mutual auth: trust domain {m.trust_domain}, server {server.address}, SVIDs from {origin}")
        if tunnels is not None:
            log(f"encryption in transit: auth-required TCP between nodes (HTTP requests, or CONNECT streams for L3/L4 allows) through the mTLS tunnel on {host}:{m.tunnel_port}")
        return self

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "local": s.local, "remote": s.remote, "node": f"{s.node[0]}:{s.node[1]}",
                "expires_at": s.expires_at,
                "last_ok": s.last_ok, "last_error": s.last_error, "attempts": s.attempts,
                "failures": s.failures,
            }
            for s in self.manager.status()
        ]

    def stop(self) -> None:
        if self.tunnels is not None:
            self.tunnels.stop()
        self.manager.stop()
        self.server.stop()
        self.store.stop()


MESH_CONFIG_POLL = 2.0  # seconds between two looks at clustermesh.configDir


@dataclass
class LocalMesh:
    """This cluster's etcd: the lease this node's keys live on, the identity allocator the
    cluster's agents share, and the publisher of this node and its endpoints."""

    store: EtcdKVStore
    lease: MeshLease
    allocator: MeshIdentityAllocator
    publisher: MeshPublisher

    @classmethod
    def open(cls, config: AgentConfig, local_store: SQLiteKVStore) -> LocalMesh:
        cm = config.clustermesh
        assert cm.etcd is not None
        store = EtcdKVStore(cm.etcd.endpoints[0], ca_file=cm.etcd.ca_file, cert_file=cm.etcd.cert_file,
                            key_file=cm.etcd.key_file)
        lease = MeshLease(store, ttl=cm.lease_ttl, name=f"{config.cluster_name}/{config.node}")
        allocator = MeshIdentityAllocator(
            store, cluster=config.cluster_name, cluster_id=config.cluster_id, node=config.node, lease=lease,
            # CIDR identities mean something on this node only: they stay in the node's store.
            local=IdentityAllocator(local_store, cluster_id=config.cluster_id, owner=config.allocator_owner))
        publisher = MeshPublisher(store, cluster=config.cluster_name, cluster_id=config.cluster_id,
                                  node=config.node, lease=lease)
        publisher.start()
        addresses = (NodeAddress("InternalIP", cm.node_address),) if cm.node_address else ()
        publisher.set_node(NodeRecord(config.node, config.cluster_name, config.cluster_id, addresses))
        log(f"cluster mesh: this cluster's etcd {', '.join(cm.etcd.endpoints)} (cluster {config.cluster_name}, "
            f"id {config.cluster_id})")
        return cls(store, lease, allocator, publisher)

    def close(self) -> None:
        # The node's keys go with its lease: a stopped agent's endpoints leave the mesh at once
        # (its pinned datapath keeps enforcing what it had; decision 7).
        self.publisher.close(revoke=False)
        self.lease.close(revoke=True)
        self.store.close()


def _follow_remotes(agent: Agent, mesh: ClusterMesh) -> None:
    """Re-read clustermesh.configDir whenever it changes, and reconfigure the mesh: a remote
    cluster added or removed applies without a restart."""
    directory = agent.config.clustermesh.config_dir
    watch = RemotesWatch(directory)
    while not agent.stopping.is_set():
        if watch.changed():
            found = load_remotes(directory, local_cluster=agent.config.cluster_name)
            agent.mesh_config_errors = found.errors
            for err in found.errors:
                log(f"cluster mesh: {err}")
            try:
                mesh.reconfigure(found.remotes)
                log(f"cluster mesh: remote clusters {describe(found.remotes)}")
            except MeshError as exc:
                agent.mesh_config_errors = (*found.errors, str(exc))
                log(f"cluster mesh: {exc}")
        agent.stopping.wait(MESH_CONFIG_POLL)
