"""The agent's configuration file (YAML or JSON), validated with field paths like a policy.

Every port, socket and directory is configurable so that several agents — one per simulated
node or cluster — run side by side on one machine. Defaults suit a single node:

    node: node-1
    cluster: {name: default, id: 1}
    clusters: {}                   # other clusters' IDs, for pods of other clusters
    stateDir: /var/lib/l7gate
    admin: {listen: unix:/run/l7gate/admin.sock,   # mode 0600: the agent's user only
            group: null,                          # or a group let in (socket mode 0660)
            tokenFile: <stateDir>/admin.token,    # TCP only: generated if absent, mode 0600
            maxConnections: 1024}
    xds: {listen: unix:<stateDir>/xds.sock, apiType: DELTA_GRPC}
    envoy: {enabled: true, concurrency: 1, logLevel: warning, baseId: null}
    dns: {proxy: true, minTTL: 0, maxIPsPerName: 50, rejectResponseCode: refused}
                                   # kernel mode: the DNS proxy for toFQDNs and rules.dns (docs/fqdn.md)
    proxy: {engine: envoy}         # or h11: the pure-Python L7 proxy instead of Envoy (docs/h11-engine.md), with
                                   # idleTimeout: 300, headerTimeout: 30, maxConnections: 10000 (h11 only)
                                   # egressPort: 15001: kernel mode, Envoy: the egress proxy on 127.0.0.1
                                   # for egress HTTP rules (0: none; their connections are dropped)
    # Envoy's own admin API is a unix socket, <stateDir>/envoy/admin.sock, mode 0600
    datapath: {mode: loopback, upstreamPortOffset: 10000}
    # or {mode: kernel, pinDir: /sys/fs/bpf/l7g/<node>, links: [eth1], fallback: iptables,
    #     cgroup: /sys/fs/cgroup/<pods>,   # the pods' cgroup v2: socket acceleration and the
    #     socketLB: true,                  # socket load balancer for Services attach there
    #     socketAcceleration: true}
    observe: {ringSize: 4096, followBuffer: 16384}   # flows kept; per-follower queue
    mtls: {enabled: false, trustDomain: l7gate.local, caDir: <stateDir>/ca, svidTTL: 3600,
           listen: <node address>:4250,   # kernel mode: mutual auth for `authentication: required`
           encryption: tunnel,   # or none: auth-required TCP (HTTP or not) between nodes goes Envoy to Envoy over mTLS
           tunnelPort: 15443,    # this node's tunnel listener (on the mtls.listen host); peers' too
           spireSocket: /run/spire/agent.sock}   # optional: SVIDs from SPIRE's Workload API
    clustermesh: {etcd: {endpoints: [https://10.0.1.100:2379], caFile, certFile, keyFile},
                  configDir: /var/lib/l7gate/clustermesh,   # a file per remote cluster (Cilium's)
                  nodeAddress: 10.0.1.1, leaseTTL: 15}       # docs/clustermesh.md
    kubernetes: {enabled: false,        # list+watch the API (docs/kubernetes.md, "Watching the API")
                 kubeconfig: /path,     # absent: in-cluster (service-account token and CA,
                                        #   KUBERNETES_SERVICE_HOST/PORT)
                 nodeNameEnv: NODE_NAME,  # the variable naming this node (the DaemonSet sets it
                                          #   from spec.nodeName); when set it is `node`
                 watchTimeout: 300}     # seconds a watch lasts before it is renewed (x1-2, jittered)

The admin endpoint listens on TCP only when `admin.listen` says so, and then always with a
bearer token read from `admin.tokenFile` (docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..policy.errors import Finding


#: Where the agent's admin API listens unless configured otherwise, and where the CLI looks.
DEFAULT_ADMIN = "unix:/run/l7gate/admin.sock"


class ConfigError(Exception):
    def __init__(self, source: str, errors: tuple[Finding, ...]) -> None:
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(str(e) for e in errors))


@dataclass(frozen=True, slots=True)
class EnvoySettings:
    enabled: bool = True
    concurrency: int = 1
    log_level: str = "warning"
    base_id: int | None = None


@dataclass(frozen=True, slots=True)
class ObserveSettings:
    ring_size: int = 4096  # flows the agent keeps for `l7gate observe`
    follow_buffer: int = 16384  # flows queued per `observe --follow` before it loses the oldest


@dataclass(frozen=True, slots=True)
class MTLSSettings:
    enabled: bool = False
    trust_domain: str = "l7gate.local"
    ca_dir: str = ""  # default <stateDir>/ca; agents that must trust each other share one
    svid_ttl: int = 3600  # seconds
    listen: str = ""  # HOST:PORT of this node's mutual-auth server (the node's address, port 4250)
    port: int = 4250  # where peers' servers listen
    spire_socket: str = ""  # the SPIFFE Workload API socket: SVIDs from SPIRE instead of the built-in CA
    encryption: str = "tunnel"  # "tunnel": auth-required TCP between nodes over Envoy mTLS; "none"
    tunnel_port: int = 15443

    @property
    def tunnel(self) -> bool:
        return self.enabled and self.encryption == "tunnel"


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """A cluster's etcd, as a client reaches it (TLS with a client certificate: Cilium's way)."""

    endpoints: tuple[str, ...]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterMeshSettings:
    """Cluster Mesh (docs/clustermesh.md). `etcd`: this cluster's etcd, where its agents share
    identity numbers and publish their endpoints and nodes; `config_dir`: one file per remote
    cluster (Cilium's layout, re-read when it changes); `node_address`: this node's address as
    published (InternalIP)."""

    etcd: EtcdSettings | None = None
    config_dir: str = ""
    node_address: str = ""
    lease_ttl: int = 15

    @property
    def enabled(self) -> bool:
        return self.etcd is not None


@dataclass(frozen=True, slots=True)
class DNSSettings:
    """The node's DNS proxy (kernel mode): `toFQDNs` and `rules.dns`. Cilium's flags:
    tofqdns-min-ttl, tofqdns-endpoint-max-ip-per-hostname, tofqdns-dns-reject-response-code."""

    proxy: bool = True
    min_ttl: int = 0
    max_ips_per_name: int = 50
    reject_response_code: str = "refused"  # or nameError


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """The Kubernetes API as a source of policies, pods, namespaces and Services
    (docs/kubernetes.md). `kubeconfig`: a kubeconfig file; empty: in-cluster configuration.
    `node_name_env`: the environment variable that names this node (read by `parse_config`
    into `AgentConfig.node`)."""

    enabled: bool = False
    kubeconfig: str = ""
    node_name_env: str = "NODE_NAME"
    watch_timeout: int = 300


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str = "node-1"
    cluster_name: str = "default"
    cluster_id: int = 1
    clusters: Mapping[str, int] = field(default_factory=dict)
    state_dir: str = "/var/lib/l7gate"
    admin_listen: str = DEFAULT_ADMIN
    admin_group: str | None = None
    admin_token_file: str = ""  # TCP only; default <stateDir>/admin.token
    admin_max_connections: int = 1024
    xds_listen: str = "127.0.0.1:0"
    xds_api_type: str = "DELTA_GRPC"
    envoy: EnvoySettings = EnvoySettings()
    proxy_engine: str = "envoy"  # the L7 enforcer: "envoy" or "h11" (l7proxy/h11engine.py)
    # The h11 engine's limits: seconds a connection may sit idle between requests and a request
    # head may take to arrive; open client connections it serves at once.
    proxy_idle_timeout: float = 300.0
    proxy_header_timeout: float = 30.0
    proxy_max_connections: int = 10_000
    # Kernel mode with Envoy: egress HTTP rules are enforced by Envoy's egress listener on
    # 127.0.0.1:<this port> (docs/egress-http.md); 0 turns it off.
    proxy_egress_port: int = 0
    datapath_mode: str = "loopback"
    upstream_port_offset: int = 10000
    pin_dir: str = ""  # kernel mode: where maps and programs are pinned (default /sys/fs/bpf/l7g/<node>)
    links: tuple[str, ...] = ()  # kernel mode: inter-node interfaces (traffic from other nodes)
    fallback: str = "iptables"  # kernel mode without bcc: "iptables" or "none" (refuse to start)
    bpf: bool = True  # kernel mode: false uses the iptables redirect on purpose (no BPF at all)
    cgroup: str = ""  # kernel mode: cgroup v2 of the pods (and Envoy): the socket programs' ("" = none)
    socket_lb: bool = True  # kernel mode with a cgroup: Services' ClusterIPs balanced at connect()
    socket_acceleration: bool = True  # kernel mode with a cgroup: sockops + sk_msg
    observe: ObserveSettings = ObserveSettings()
    mtls: MTLSSettings = MTLSSettings()
    clustermesh: ClusterMeshSettings = ClusterMeshSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    dns: DNSSettings = DNSSettings()

    def cluster_id_of(self, cluster: str) -> int | None:
        if cluster == self.cluster_name:
            return self.cluster_id
        return self.clusters.get(cluster)

    @property
    def node_id(self) -> str:
        """The Envoy node id this agent serves."""
        return f"l7gate~{self.cluster_name}~{self.node}"

    @property
    def allocator_owner(self) -> str:
        """This node's name in the identity allocator's keys."""
        return f"{self.cluster_name}.{self.node}"

    @property
    def admin_token_path(self) -> str:
        """The admin token file for a TCP admin listener: `admin.tokenFile`, or its default."""
        return self.admin_token_file or f"{self.state_dir.rstrip('/')}/admin.token"


def _check_listen(value: object, path: str, errors: list[Finding]) -> str | None:
    if not isinstance(value, str) or not value:
        errors.append(Finding(path, "must be HOST:PORT or unix:/path"))
        return None
    if value.startswith("unix:"):
        if len(value) <= 5:
            errors.append(Finding(path, "unix: needs a socket path"))
            return None
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        errors.append(Finding(path, f"must be HOST:PORT or unix:/path, got {value!r}"))
        return None
    return value


def parse_config(data: object, source: str = "<config>", environ: Mapping[str, str] | None = None) -> AgentConfig:
    """`environ` (default: the process's) is read for `kubernetes.nodeNameEnv` only."""
    errors: list[Finding] = []
    env = os.environ if environ is None else environ
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, (Finding("", "the configuration must be a mapping"),))
    known = {"node", "cluster", "clusters", "stateDir", "admin", "xds", "envoy", "datapath", "observe", "mtls",
             "clustermesh", "kubernetes", "proxy", "dns"}
    for k in data:
        if k not in known:
            errors.append(Finding(str(k), f"unknown field (expected one of: {', '.join(sorted(known))})"))

    def section(name: str, keys: set[str]) -> Mapping[str, Any]:
        v = data.get(name, {})
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            errors.append(Finding(name, "must be a mapping"))
            return {}
        for k in v:
            if k not in keys:
                errors.append(Finding(f"{name}.{k}", f"unknown field (expected one of: {', '.join(sorted(keys))})"))
        return v

    def string(v: object, path: str) -> str | None:
        if not isinstance(v, str) or not v:
            errors.append(Finding(path, "must be a non-empty string"))
            return None
        return v

    def integer(v: object, path: str, lo: int, hi: int) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            errors.append(Finding(path, f"must be an integer {lo}-{hi}, got {v!r}"))
            return None
        return v

    d = AgentConfig()
    node = string(data.get("node", d.node), "node") or d.node
    kubernetes = _kubernetes(section("kubernetes", {"enabled", "kubeconfig", "nodeNameEnv", "watchTimeout"}),
                             errors, string, integer)
    if kubernetes.enabled:
        # One ConfigMap for every node of a DaemonSet: the node's name comes from its pod.
        from_env = env.get(kubernetes.node_name_env, "")
        if from_env and "node" in data and data["node"] != from_env:
            errors.append(Finding("node", f"is {data['node']!r} but ${kubernetes.node_name_env} says {from_env!r}: "
                                          "remove `node` (the environment names the node) or make them agree"))
        elif from_env:
            node = from_env
        elif "node" not in data:
            errors.append(Finding("kubernetes.nodeNameEnv",
                                  f"${kubernetes.node_name_env} is not set and `node` is not given: the agent must "
                                  "know its node to tell its own pods (a DaemonSet sets it from spec.nodeName "
                                  "through the downward API)"))
    if "/" in node or "~" in node:
        errors.append(Finding("node", "must not contain '/' or '~'"))
    cl = section("cluster", {"name", "id"})
    cluster_name = string(cl.get("name", d.cluster_name), "cluster.name") or d.cluster_name
    cluster_id = integer(cl.get("id", d.cluster_id), "cluster.id", 0, 255)
    clusters: dict[str, int] = {}
    raw_clusters = data.get("clusters", {}) or {}
    if not isinstance(raw_clusters, Mapping):
        errors.append(Finding("clusters", "must be a mapping of cluster name to cluster id"))
    else:
        for name, cid in raw_clusters.items():
            n = integer(cid, f"clusters.{name}", 1, 255)
            if n is not None:
                clusters[str(name)] = n
        ids = [cluster_id, *clusters.values()]
        dup = {i for i in ids if ids.count(i) > 1 and i is not None}
        if dup and not (len(dup) == 1 and clusters.get(cluster_name) == cluster_id):
            errors.append(Finding("clusters", f"cluster ids must be unique, {sorted(dup)} repeated"))
    state_dir = string(data.get("stateDir", d.state_dir), "stateDir") or d.state_dir
    adm = section("admin", {"listen", "token", "tokenFile", "group", "maxConnections"})
    admin_listen = _check_listen(adm.get("listen", d.admin_listen), "admin.listen", errors) or d.admin_listen
    if "token" in adm:
        errors.append(Finding("admin.token", "a token in the configuration file is not accepted (the file is often "
                                             "readable by others): put it in a file only the agent's user can read "
                                             "(mode 0600) and name it in admin.tokenFile, or leave admin.tokenFile "
                                             "unset and the agent generates one"))
    token_file = f"{state_dir.rstrip('/')}/admin.token"
    if "tokenFile" in adm:
        token_file = string(adm["tokenFile"], "admin.tokenFile") or token_file
        if not token_file.startswith("/"):
            errors.append(Finding("admin.tokenFile", f"must be an absolute path, got {token_file!r}"))
    admin_group = None
    if adm.get("group") is not None:
        admin_group = string(adm["group"], "admin.group")
        if not admin_listen.startswith("unix:"):
            errors.append(Finding("admin.group", "applies to a unix socket only (admin.listen is TCP)"))
    max_conns = integer(adm.get("maxConnections", d.admin_max_connections), "admin.maxConnections", 16, 65536) \
        or d.admin_max_connections
    xd = section("xds", {"listen", "apiType"})
    # A unix socket in the state directory by default: the address stays the same across agent
    # restarts, so the Envoy left running reconnects to the next agent by itself.
    default_xds = f"unix:{state_dir.rstrip('/')}/xds.sock"
    xds_listen = _check_listen(xd.get("listen", default_xds), "xds.listen", errors) or default_xds
    api_type = xd.get("apiType", d.xds_api_type)
    if api_type not in ("GRPC", "DELTA_GRPC"):
        errors.append(Finding("xds.apiType", f"must be GRPC or DELTA_GRPC, got {api_type!r}"))
        api_type = d.xds_api_type
    ev = section("envoy", {"enabled", "adminPort", "concurrency", "logLevel", "baseId"})
    if "adminPort" in ev:
        errors.append(Finding("envoy.adminPort", "is no longer supported: Envoy's admin API listens only on the unix "
                                                 "socket <stateDir>/envoy/admin.sock (mode 0600), which no other "
                                                 "user can open (docs/security.md)"))
    enabled = ev.get("enabled", True)
    if not isinstance(enabled, bool):
        errors.append(Finding("envoy.enabled", "must be true or false"))
        enabled = True
    envoy = EnvoySettings(
        enabled=enabled,
        concurrency=integer(ev.get("concurrency", 1), "envoy.concurrency", 1, 64) or 1,
        log_level=string(ev.get("logLevel", "warning"), "envoy.logLevel") or "warning",
        base_id=integer(ev["baseId"], "envoy.baseId", 0, 1 << 30) if ev.get("baseId") is not None else None,
    )
    dn = section("dns", {"proxy", "minTTL", "maxIPsPerName", "rejectResponseCode"})
    dns_proxy = dn.get("proxy", True)
    if not isinstance(dns_proxy, bool):
        errors.append(Finding("dns.proxy", "must be true or false"))
        dns_proxy = True
    reject = string(dn.get("rejectResponseCode", "refused"), "dns.rejectResponseCode") or "refused"
    if reject not in ("refused", "nameError"):
        errors.append(Finding("dns.rejectResponseCode", f"must be 'refused' or 'nameError', got {reject!r}"))
        reject = "refused"
    dns = DNSSettings(
        proxy=dns_proxy,
        min_ttl=integer(dn.get("minTTL", 0), "dns.minTTL", 0, 7 * 86400) or 0,
        max_ips_per_name=integer(dn.get("maxIPsPerName", 50), "dns.maxIPsPerName", 1, 100_000) or 50,
        reject_response_code=reject,
    )
    px = section("proxy", {"engine", "idleTimeout", "headerTimeout", "maxConnections", "egressPort"})
    engine = string(px.get("engine", "envoy"), "proxy.engine") or "envoy"
    if engine not in ("envoy", "h11"):
        errors.append(Finding("proxy.engine", f"must be 'envoy' or 'h11', got {engine!r}"))
        engine = "envoy"
    for k in ("idleTimeout", "headerTimeout", "maxConnections"):
        if k in px and engine != "h11":
            errors.append(Finding(f"proxy.{k}", "applies to proxy.engine h11 only (Envoy's limits are its own)"))
    idle_timeout = integer(px.get("idleTimeout", 300), "proxy.idleTimeout", 1, 86400) or 300
    header_timeout = integer(px.get("headerTimeout", 30), "proxy.headerTimeout", 1, 3600) or 30
    proxy_max_conns = integer(px.get("maxConnections", 10_000), "proxy.maxConnections", 1, 1_000_000) or 10_000
    egress_port = integer(px.get("egressPort", 15001 if engine == "envoy" else 0), "proxy.egressPort", 0, 65535) or 0
    if egress_port and engine != "envoy":
        errors.append(Finding("proxy.egressPort", "egress HTTP rules are enforced by Envoy's egress listener: "
                                                  "with proxy.engine h11 it must be 0 (their connections are dropped)"))
        egress_port = 0
    dp = section("datapath", {"mode", "upstreamPortOffset", "pinDir", "links", "fallback", "bpf", "cgroup",
                              "socketLB", "socketAcceleration"})
    cgroup = ""
    if "cgroup" in dp:
        cgroup = string(dp["cgroup"], "datapath.cgroup") or ""
        if cgroup and not cgroup.startswith("/sys/fs/cgroup"):
            errors.append(Finding("datapath.cgroup", f"must be a cgroup v2 directory under /sys/fs/cgroup, got {cgroup!r}"))
    socket_flags: dict[str, bool] = {}
    for key in ("socketLB", "socketAcceleration"):
        flag = dp.get(key, True)
        if not isinstance(flag, bool):
            errors.append(Finding(f"datapath.{key}", "must be true or false"))
            flag = True
        socket_flags[key] = flag
    use_bpf = dp.get("bpf", True)
    if not isinstance(use_bpf, bool):
        errors.append(Finding("datapath.bpf", "must be true or false"))
        use_bpf = True
    mode = dp.get("mode", "loopback")
    if mode not in ("loopback", "kernel"):
        errors.append(Finding("datapath.mode", f"must be 'loopback' or 'kernel', got {mode!r}"))
    offset = integer(dp.get("upstreamPortOffset", d.upstream_port_offset), "datapath.upstreamPortOffset", 1, 60000)
    pin_dir = dp.get("pinDir", f"/sys/fs/bpf/l7g/{node}")
    if not isinstance(pin_dir, str) or not pin_dir.startswith("/sys/fs/bpf/l7g/"):
        errors.append(Finding("datapath.pinDir", f"must be a directory under /sys/fs/bpf/l7g/, got {pin_dir!r}"))
        pin_dir = f"/sys/fs/bpf/l7g/{node}"
    links_raw = dp.get("links", [])
    links: list[str] = []
    if not isinstance(links_raw, list) or not all(isinstance(x, str) and x for x in links_raw):
        errors.append(Finding("datapath.links", "must be a list of interface names"))
    else:
        links = list(links_raw)
    fallback = dp.get("fallback", "iptables")
    if fallback not in ("iptables", "none"):
        errors.append(Finding("datapath.fallback", f"must be 'iptables' or 'none', got {fallback!r}"))
    mt = section("mtls", {"enabled", "trustDomain", "caDir", "svidTTL", "listen", "port", "spireSocket",
                          "encryption", "tunnelPort"})
    spire_socket = ""
    if "spireSocket" in mt:
        spire_socket = string(mt["spireSocket"], "mtls.spireSocket") or ""
        if spire_socket and not spire_socket.startswith("/"):
            errors.append(Finding("mtls.spireSocket", f"must be an absolute path, got {spire_socket!r}"))
    mt_enabled = mt.get("enabled", False)
    if not isinstance(mt_enabled, bool):
        errors.append(Finding("mtls.enabled", "must be true or false"))
        mt_enabled = False
    td = string(mt.get("trustDomain", "l7gate.local"), "mtls.trustDomain") or "l7gate.local"
    if not all(c.isalnum() or c in ".-_" for c in td) or td != td.lower():
        errors.append(Finding("mtls.trustDomain", f"must be a lower-case trust domain name, got {td!r}"))
    ca_dir = string(mt.get("caDir", f"{state_dir.rstrip('/')}/ca"), "mtls.caDir") or f"{state_dir}/ca"
    svid_ttl = integer(mt.get("svidTTL", 3600), "mtls.svidTTL", 10, 30 * 86400) or 3600
    mt_port = integer(mt.get("port", 4250), "mtls.port", 1, 65535) or 4250
    mt_listen = ""
    if "listen" in mt:
        mt_listen = _check_listen(mt["listen"], "mtls.listen", errors) or ""
    if mt_enabled and not mt_listen:
        errors.append(Finding("mtls.listen", "is required with mtls.enabled: this node's address and port (e.g. 10.0.1.1:4250)"))
    encryption = string(mt.get("encryption", "tunnel"), "mtls.encryption") or "tunnel"
    if encryption not in ("tunnel", "none"):
        errors.append(Finding("mtls.encryption", f"must be 'tunnel' or 'none', got {encryption!r}"))
    tunnel_port = integer(mt.get("tunnelPort", 15443), "mtls.tunnelPort", 1, 65535) or 15443
    if mt_enabled and tunnel_port == mt_port:
        errors.append(Finding("mtls.tunnelPort", f"must differ from mtls.port ({mt_port})"))
    mtls = MTLSSettings(bool(mt_enabled), td, ca_dir, svid_ttl, mt_listen, mt_port, spire_socket,
                        encryption, tunnel_port)
    if engine == "h11" and mt_enabled and encryption == "tunnel":
        errors.append(Finding("proxy.engine", "h11 cannot carry the mTLS tunnel between nodes, which runs in Envoy: "
                                              "use mtls.encryption: none with it, or proxy.engine: envoy"))
    ob = section("observe", {"ringSize", "followBuffer"})
    observe = ObserveSettings(
        ring_size=integer(ob.get("ringSize", 4096), "observe.ringSize", 1, 1 << 20) or 4096,
        follow_buffer=integer(ob.get("followBuffer", 16384), "observe.followBuffer", 1, 1 << 20) or 16384,
    )
    cm = section("clustermesh", {"etcd", "configDir", "nodeAddress", "leaseTTL"})
    etcd = None
    if cm.get("etcd") is not None:
        raw = cm["etcd"]
        if not isinstance(raw, Mapping):
            errors.append(Finding("clustermesh.etcd", "must be a mapping: {endpoints: [...], caFile, certFile, keyFile}"))
        else:
            for k in raw:
                if k not in ("endpoints", "caFile", "certFile", "keyFile"):
                    errors.append(Finding(f"clustermesh.etcd.{k}", "unknown field (expected one of: caFile, certFile, "
                                                                   "endpoints, keyFile)"))
            eps = raw.get("endpoints")
            if isinstance(eps, str):
                eps = [eps]
            if not isinstance(eps, list) or not eps or not all(
                    isinstance(e, str) and e.startswith(("http://", "https://")) for e in eps):
                errors.append(Finding("clustermesh.etcd.endpoints",
                                      "must be a non-empty list of URLs (http://host:2379 or https://host:2379)"))
                eps = []
            files = {k: raw.get(k) for k in ("caFile", "certFile", "keyFile")}
            for k, v in files.items():
                if v is not None and (not isinstance(v, str) or not v.startswith("/")):
                    errors.append(Finding(f"clustermesh.etcd.{k}", f"must be an absolute path, got {v!r}"))
            if (files["certFile"] is None) != (files["keyFile"] is None):
                errors.append(Finding("clustermesh.etcd.certFile", "certFile and keyFile go together"))
            etcd = EtcdSettings(tuple(eps), files["caFile"], files["certFile"], files["keyFile"])
    config_dir = ""
    if "configDir" in cm:
        config_dir = string(cm["configDir"], "clustermesh.configDir") or ""
        if config_dir and not config_dir.startswith("/"):
            errors.append(Finding("clustermesh.configDir", f"must be an absolute path, got {config_dir!r}"))
        if config_dir and etcd is None:
            errors.append(Finding("clustermesh.configDir", "needs clustermesh.etcd: this cluster's own etcd"))
    node_address = ""
    if "nodeAddress" in cm:
        node_address = string(cm["nodeAddress"], "clustermesh.nodeAddress") or ""
    lease_ttl = integer(cm.get("leaseTTL", 15), "clustermesh.leaseTTL", 2, 3600) or 15
    if etcd is not None and not 1 <= (cluster_id or 0) <= 255:
        errors.append(Finding("cluster.id", "must be 1-255 in a cluster mesh"))
    clustermesh = ClusterMeshSettings(etcd, config_dir, node_address, lease_ttl)
    if errors:
        raise ConfigError(source, tuple(errors))
    assert cluster_id is not None and offset is not None
    return AgentConfig(
        node=node,
        cluster_name=cluster_name,
        cluster_id=cluster_id,
        clusters=clusters,
        state_dir=state_dir,
        admin_listen=admin_listen,
        admin_group=admin_group,
        admin_token_file=token_file,
        admin_max_connections=max_conns,
        xds_listen=xds_listen,
        xds_api_type=str(api_type),
        envoy=envoy,
        proxy_engine=engine,
        proxy_idle_timeout=float(idle_timeout),
        proxy_header_timeout=float(header_timeout),
        proxy_max_connections=proxy_max_conns,
        proxy_egress_port=egress_port,
        datapath_mode=str(mode),
        upstream_port_offset=offset,
        pin_dir=str(pin_dir),
        links=tuple(links),
        fallback=str(fallback),
        bpf=bool(use_bpf),
        cgroup=cgroup,
        socket_lb=socket_flags["socketLB"],
        socket_acceleration=socket_flags["socketAcceleration"],
        observe=observe,
        mtls=mtls,
        clustermesh=clustermesh,
        kubernetes=kubernetes,
        dns=dns,
    )


def _kubernetes(ku: Mapping[str, Any], errors: list[Finding], string: Callable[[object, str], str | None],
                integer: Callable[[object, str, int, int], int | None]) -> KubernetesSettings:
    d = KubernetesSettings()
    enabled = ku.get("enabled", d.enabled)
    if not isinstance(enabled, bool):
        errors.append(Finding("kubernetes.enabled", "must be true or false"))
        enabled = False
    kubeconfig = ""
    if ku.get("kubeconfig") is not None:
        kubeconfig = string(ku["kubeconfig"], "kubernetes.kubeconfig") or ""
        if kubeconfig and not kubeconfig.startswith("/"):
            errors.append(Finding("kubernetes.kubeconfig", f"must be an absolute path, got {kubeconfig!r}"))
    env_name = string(ku.get("nodeNameEnv", d.node_name_env), "kubernetes.nodeNameEnv") or d.node_name_env
    if not env_name.replace("_", "a").isalnum() or env_name[0].isdigit():
        errors.append(Finding("kubernetes.nodeNameEnv", f"must be an environment variable's name, got {env_name!r}"))
    timeout = integer(ku.get("watchTimeout", d.watch_timeout), "kubernetes.watchTimeout", 10, 3600) or d.watch_timeout
    return KubernetesSettings(enabled, kubeconfig, env_name, timeout)


def load_config(path: str) -> AgentConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(path, (Finding("", f"cannot read: {exc}"),)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, (Finding("", f"invalid YAML: {exc}"),)) from None
    return parse_config(data, path)
