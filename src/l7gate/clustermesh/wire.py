"""Cilium's Cluster Mesh layout in etcd: every key and value format, one encode/decode pair each.

This module is the one place where Cluster Mesh data in etcd becomes internal types and back
(CONVENTIONS 3). Every decoder raises `WireError` (and nothing else) on input it cannot accept,
so that a reader counts and skips a malformed value instead of crashing. The formats are
Cilium's, so that `etcdctl get --prefix cilium/` reads the same on an l7gate mesh as on a Cilium
one (DESIGN decision 9); `docs/clustermesh.md` lists each key with the Cilium source it follows.

Keys (one etcd per cluster; `<cluster>` is a cluster name, `<node>` a node name):

    cilium/cluster-config/<cluster>                        ClusterConfig JSON
    cilium/synced/<cluster>/<prefix>                       RFC 3339 timestamp (sync canary)
    cilium/state/identities/v1/id/<id>                     label string of identity <id>
    cilium/state/identities/v1/value/<labels>/<node>       "<id>": <node> uses that identity
    cilium/state/identities/v1/locks/<labels>              allocation lock (l7gate: owner@time)
    cilium/state/nodes/v1/<cluster>/<node>                 NodeRecord JSON (Cilium's types.Node)
    cilium/state/ip/v1/default/<ip or prefix>              IPIdentityPair JSON
    cilium/state/services/v1/<cluster>/<ns>/<name>         ClusterService JSON (a global service)

The ipcache keys carry Cilium's address space, which every Cilium writer sets to `default`
(pkg/ipcache `AddressSpace = DefaultAddressSpace`), not the cluster name that Cilium's
kvstore documentation prints: readers of Cilium's layout look under `.../ip/v1/default/`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from l7gate.identity.ipcache import IPNetwork
from l7gate.identity.numeric import CLUSTER_ID_MAX
from l7gate.policy.labels import Labels

BASE = "cilium/"
CLUSTER_CONFIG_PREFIX = "cilium/cluster-config/"
SYNCED_PREFIX = "cilium/synced/"
IDENTITIES_PATH = "cilium/state/identities/v1"
IDENTITY_ID_PREFIX = IDENTITIES_PATH + "/id/"
IDENTITY_VALUE_PREFIX = IDENTITIES_PATH + "/value/"
IDENTITY_LOCK_PREFIX = IDENTITIES_PATH + "/locks/"
NODES_PATH = "cilium/state/nodes/v1"
IP_PATH = "cilium/state/ip/v1"
IP_ADDRESS_SPACE = "default"
IP_PREFIX = f"{IP_PATH}/{IP_ADDRESS_SPACE}/"
SERVICES_PATH = "cilium/state/services/v1"

# The prefixes a reader gates on a sync canary each (Cilium's WSSWithSyncedKeyOverride names;
# the services canary is `cilium/synced/<cluster>/cilium/state/services/v1`, as the
# clustermesh-apiserver writes it).
SYNCED_PATHS = (IDENTITIES_PATH, NODES_PATH, IP_PATH, SERVICES_PATH)

# Cilium's loadbalancer.L4Type values, as a ClusterService's ports carry them.
L4_PROTOCOLS = ("NONE", "ANY", "TCP", "UDP", "SCTP", "ICMP", "ICMPv6")

# The only mesh size whose identity layout (cluster ID in bits 16..23) l7gate speaks.
MAX_CONNECTED_CLUSTERS = 255
CLUSTER_NAME_MAX = 32


class WireError(ValueError):
    """A key or value that is not in the format this module reads (or cannot be written in it)."""


# -- cluster names ------------------------------------------------------------------------------


def check_cluster_name(name: object) -> str:
    """Cilium's rule for cluster names: lower-case alphanumerics and '-', starting and ending
    with an alphanumeric, at most 32 characters. They appear in keys, so '/' is never allowed."""
    if not isinstance(name, str) or not name:
        raise WireError(f"cluster name must be a non-empty string, got {name!r}")
    if len(name) > CLUSTER_NAME_MAX:
        raise WireError(f"cluster name {name!r} is longer than {CLUSTER_NAME_MAX} characters")
    ok = all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in name)
    if not ok or name[0] == "-" or name[-1] == "-":
        raise WireError(
            f"cluster name {name!r}: lower-case alphanumerics and '-', starting and ending with "
            "an alphanumeric")
    return name


def check_mesh_cluster_id(cluster_id: object) -> int:
    """A cluster ID that can take part in a mesh: 1..255 (0 means no mesh)."""
    if isinstance(cluster_id, bool) or not isinstance(cluster_id, int) or not 1 <= cluster_id <= CLUSTER_ID_MAX:
        raise WireError(f"a mesh cluster needs a cluster ID 1..{CLUSTER_ID_MAX}, got {cluster_id!r}")
    return cluster_id


def check_node_name(node: object) -> str:
    """A node's name as it appears in keys: non-empty, without '/'."""
    if not isinstance(node, str) or not node or "/" in node:
        raise WireError(f"node must be a non-empty name without '/', got {node!r}")
    return node


def _check_segment(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or "/" in value:
        raise WireError(f"{what} must be a non-empty string without '/', got {value!r}")
    return value


# -- keys ---------------------------------------------------------------------------------------


def cluster_config_key(cluster: str) -> str:
    return CLUSTER_CONFIG_PREFIX + check_cluster_name(cluster)


def synced_key(cluster: str, path: str) -> str:
    """The sync canary of `path` (one of SYNCED_PATHS) written by `cluster`'s writers."""
    return f"{SYNCED_PREFIX}{check_cluster_name(cluster)}/{path}"


def synced_prefix(cluster: str) -> str:
    return f"{SYNCED_PREFIX}{check_cluster_name(cluster)}/"


def parse_synced_key(cluster: str, key: str) -> str | None:
    """The path whose canary `key` is, or None if it is no canary of `cluster`."""
    prefix = synced_prefix(cluster)
    return key[len(prefix):] if key.startswith(prefix) and len(key) > len(prefix) else None


def identity_id_key(number: int) -> str:
    return f"{IDENTITY_ID_PREFIX}{number}"


def parse_identity_id_key(key: str) -> int:
    suffix = key[len(IDENTITY_ID_PREFIX):] if key.startswith(IDENTITY_ID_PREFIX) else ""
    if not suffix.isascii() or not suffix.isdigit() or (len(suffix) > 1 and suffix[0] == "0"):
        raise WireError(f"{key!r} is not an identity key ({IDENTITY_ID_PREFIX}<decimal id>)")
    return int(suffix)


def identity_value_prefix(label_string: str) -> str:
    """Every node's value key for this label string starts with this (then '/<node>')."""
    return f"{IDENTITY_VALUE_PREFIX}{label_string}/"


def identity_value_key(label_string: str, node: str) -> str:
    return identity_value_prefix(label_string) + _check_segment(node, "node suffix")


def parse_identity_value_key(key: str) -> tuple[str, str]:
    """(label string, node) of a value key. Label strings may hold '/', node suffixes never do,
    so the node is what follows the last '/' (Cilium's prefixMatchesKey)."""
    if not key.startswith(IDENTITY_VALUE_PREFIX):
        raise WireError(f"{key!r} is not an identity value key")
    labels, slash, node = key[len(IDENTITY_VALUE_PREFIX):].rpartition("/")
    if not slash or not labels or not node:
        raise WireError(f"{key!r} is not an identity value key (.../value/<labels>/<node>)")
    return labels, node


def identity_lock_key(label_string: str) -> str:
    return IDENTITY_LOCK_PREFIX + label_string


def nodes_prefix(cluster: str) -> str:
    return f"{NODES_PATH}/{check_cluster_name(cluster)}/"


def node_key(cluster: str, node: str) -> str:
    return nodes_prefix(cluster) + _check_segment(node, "node name")


def parse_node_key(key: str) -> tuple[str, str]:
    """(cluster, node) of a node key."""
    prefix = NODES_PATH + "/"
    cluster, slash, node = key[len(prefix):].partition("/") if key.startswith(prefix) else ("", "", "")
    if not slash or not cluster or not node or "/" in node:
        raise WireError(f"{key!r} is not a node key ({NODES_PATH}/<cluster>/<node>)")
    return cluster, node


def services_prefix(cluster: str) -> str:
    """Every global service `cluster` publishes is under this prefix (then `<ns>/<name>`)."""
    return f"{SERVICES_PATH}/{check_cluster_name(cluster)}/"


def service_key(cluster: str, namespace: str, name: str) -> str:
    """Cilium's ClusterService.GetKeyName under ServiceStorePrefix: `<cluster>/<ns>/<name>`."""
    return (services_prefix(cluster) + _check_segment(namespace, "service namespace") + "/"
            + _check_segment(name, "service name"))


def parse_service_key(cluster: str, key: str) -> tuple[str, str]:
    """(namespace, name) of a service key of `cluster`."""
    prefix = services_prefix(cluster)
    namespace, slash, name = key[len(prefix):].partition("/") if key.startswith(prefix) else ("", "", "")
    if not slash or not namespace or not name or "/" in name:
        raise WireError(f"{key!r} is not a service key ({prefix}<namespace>/<name>)")
    return namespace, name


def ip_key(prefix: IPNetwork) -> str:
    """Cilium's PrefixString: a host prefix (/32, /128) is its bare address, others a CIDR."""
    return IP_PREFIX + _prefix_string(prefix)


def parse_ip_key(key: str) -> IPNetwork:
    if not key.startswith(IP_PREFIX):
        raise WireError(f"{key!r} is not an ipcache key ({IP_PREFIX}<ip or prefix>)")
    return _parse_prefix_string(key[len(IP_PREFIX):], key)


def _prefix_string(prefix: IPNetwork) -> str:
    if prefix.prefixlen == prefix.max_prefixlen:
        return str(prefix.network_address)
    return str(prefix)


def _parse_prefix_string(text: str, where: str) -> IPNetwork:
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=True)
        return ipaddress.ip_network(ipaddress.ip_address(text))
    except ValueError as e:
        raise WireError(f"{where}: not an IP address or prefix: {e}") from None


# -- label strings: Cilium's Labels.SortedList --------------------------------------------------
#
# `source:key=value;` per label, sorted by key (the key without its source), each ending in ';'.
# l7gate's Labels drop the `k8s` source (policy/labels.py), so it is added back on the way out;
# reserved and CIDR labels keep theirs. Cilium escapes nothing: a key holding '=' or ';', or a
# value holding ';', cannot be written (Kubernetes allows neither).

_K8S_SOURCE = "k8s"


def _cilium_parts(key: str) -> tuple[str, str]:
    source, colon, name = key.partition(":")
    return (source, name) if colon else (_K8S_SOURCE, key)


def encode_label_string(labels: Labels | Mapping[str, str]) -> str:
    """Cilium's label string of a label set (Labels.SortedList), e.g.
    `k8s:app=x;k8s:io.kubernetes.pod.namespace=y;`."""
    if not isinstance(labels, Labels):
        labels = Labels.of(labels)
    if not labels:
        raise WireError("an empty label set has no label string")
    parts: dict[str, tuple[str, str]] = {}
    for key, value in labels.items():
        source, name = _cilium_parts(key)
        if not source or not name:
            raise WireError(f"label {key!r}: empty source or key")
        for text, what in ((source, "source"), (name, "key")):
            if "=" in text or ";" in text:
                raise WireError(f"label {key!r}: its {what} holds '=' or ';', which Cilium's "
                                "label string cannot carry")
        if ";" in value:
            raise WireError(f"label {key!r}: its value holds ';', which Cilium's label string "
                            "cannot carry")
        if name in parts:
            raise WireError(f"labels {parts[name][0]}:{name} and {key} share the key {name!r}")
        parts[name] = (source, value)
    return "".join(f"{parts[n][0]}:{n}={parts[n][1]};" for n in sorted(parts))


def decode_label_string(text: str) -> Labels:
    """The label set of a Cilium label string (the inverse of `encode_label_string`). Like
    Cilium's parser, a label without '=' has the value "" and one without a source is `unspec`;
    unlike it, an empty set, an empty key, a key seen twice and a missing final ';' are errors."""
    if not isinstance(text, str) or not text:
        raise WireError("empty label string")
    if not text.endswith(";"):
        raise WireError(f"label string {text[:80]!r} does not end with ';'")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for part in text[:-1].split(";"):
        if not part:
            raise WireError(f"label string {text[:80]!r} holds an empty label")
        head, eq, value = part.partition("=")
        source, colon, name = head.partition(":")
        if not colon:
            source, name = "unspec", head
        if not source or not name:
            raise WireError(f"label {part[:80]!r}: empty source or key")
        if name in seen:
            raise WireError(f"label string {text[:80]!r} holds the key {name!r} twice")
        seen.add(name)
        key = name if source == _K8S_SOURCE else f"{source}:{name}"
        pairs.append((key, value if eq else ""))
    labels = Labels.of(pairs)
    if len(labels) != len(pairs):  # e.g. `k8s:a` and `any:a`: one label once normalised
        raise WireError(f"label string {text[:80]!r} holds one label twice")
    return labels


def encode_identity_number(number: int) -> bytes:
    return str(number).encode()


def decode_identity_number(data: bytes) -> int:
    text = data.decode("ascii", errors="replace")
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) == 0:
        raise WireError(f"not an identity number: {data[:40]!r}")
    return int(text)


# -- cluster-config: Cilium's types.CiliumClusterConfig -----------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`cilium/cluster-config/<cluster>`: the cluster's ID and what its writers support."""

    id: int
    synced_canaries: bool = True
    max_connected_clusters: int = MAX_CONNECTED_CLUSTERS
    cached: bool = False  # kvstoremesh's cilium/cache/ layout (l7gate does not read it)


def encode_cluster_config(config: ClusterConfig) -> bytes:
    caps: dict[str, Any] = {}  # Go's omitempty: false and zero fields are left out
    if config.synced_canaries:
        caps["syncedCanaries"] = True
    if config.cached:
        caps["cached"] = True
    if config.max_connected_clusters:
        caps["maxConnectedClusters"] = config.max_connected_clusters
    doc: dict[str, Any] = {}
    if config.id:
        doc["id"] = config.id
    doc["capabilities"] = caps
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_cluster_config(data: bytes) -> ClusterConfig:
    doc = _json_object(data, "cluster-config")
    caps = doc.get("capabilities", {})
    if caps is None:
        caps = {}
    if not isinstance(caps, dict):
        raise WireError("cluster-config: capabilities must be an object")
    return ClusterConfig(
        id=_uint(doc.get("id", 0), "cluster-config: id", 2**32 - 1),
        synced_canaries=_bool(caps.get("syncedCanaries", False), "capabilities.syncedCanaries"),
        max_connected_clusters=_uint(caps.get("maxConnectedClusters", 0),
                                     "capabilities.maxConnectedClusters", 2**32 - 1),
        cached=_bool(caps.get("cached", False), "capabilities.cached"),
    )


# -- sync canaries: RFC 3339 timestamps (Go's time.RFC3339) -------------------------------------


def encode_synced(when: float) -> bytes:
    stamp = _dt.datetime.fromtimestamp(int(when), tz=_dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ").encode()


def decode_synced(data: bytes) -> float:
    """Seconds since the epoch. Any RFC 3339 time is read (Go writes the writer's zone)."""
    try:
        text = data.decode("ascii")
        stamp = _dt.datetime.fromisoformat(text)
    except (UnicodeDecodeError, ValueError):
        raise WireError(f"sync canary is not an RFC 3339 time: {data[:40]!r}") from None
    if stamp.tzinfo is None or "T" not in text:
        raise WireError(f"sync canary has no time zone or no time: {text!r}")
    return stamp.timestamp()


# -- nodes: Cilium's pkg/node/types.Node ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One of a node's addresses; `type` is Cilium's AddressType (InternalIP, ExternalIP,
    CiliumInternalIP, ...)."""

    type: str
    ip: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """`cilium/state/nodes/v1/<cluster>/<node>`: the fields of Cilium's types.Node that l7gate
    writes and reads. Unknown fields of a Cilium writer are ignored. Immutable."""

    name: str
    cluster: str
    cluster_id: int
    addresses: tuple[NodeAddress, ...] = ()
    ipv4_alloc_cidr: str | None = None
    ipv6_alloc_cidr: str | None = None
    ipv4_health_ip: str | None = None
    ipv6_health_ip: str | None = None
    encryption_key: int = 0
    labels: tuple[tuple[str, str], ...] = ()

    def ips(self) -> tuple[str, ...]:
        return tuple(a.ip for a in self.addresses)


def encode_node(node: NodeRecord) -> bytes:
    _check_segment(node.name, "node name")
    check_cluster_name(node.cluster)
    doc: dict[str, Any] = {
        "Name": node.name,
        "Cluster": node.cluster,
        "IPAddresses": [{"Type": a.type, "IP": _canonical_ip(a.ip, "node address")}
                        for a in node.addresses],
        "IPv4AllocCIDR": _encode_cidr(node.ipv4_alloc_cidr, 4),
        "IPv6AllocCIDR": _encode_cidr(node.ipv6_alloc_cidr, 6),
        "IPv4HealthIP": _canonical_ip(node.ipv4_health_ip, "IPv4HealthIP") if node.ipv4_health_ip else "",
        "IPv6HealthIP": _canonical_ip(node.ipv6_health_ip, "IPv6HealthIP") if node.ipv6_health_ip else "",
        "ClusterID": node.cluster_id,
        "Source": "local",
        "EncryptionKey": node.encryption_key,
        "Labels": dict(node.labels),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_node(data: bytes) -> NodeRecord:
    doc = _json_object(data, "node")
    name = doc.get("Name")
    if not isinstance(name, str) or not name:
        raise WireError("node: Name must be a non-empty string")
    cluster = doc.get("Cluster", "")
    if not isinstance(cluster, str):
        raise WireError("node: Cluster must be a string")
    addresses: list[NodeAddress] = []
    raw = doc.get("IPAddresses")
    raw = [] if raw is None else raw
    if not isinstance(raw, list):
        raise WireError("node: IPAddresses must be a list")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise WireError(f"node: IPAddresses[{i}] must be an object")
        kind = item.get("Type", "")
        if not isinstance(kind, str):
            raise WireError(f"node: IPAddresses[{i}].Type must be a string")
        addresses.append(NodeAddress(kind, _canonical_ip(item.get("IP"), f"node: IPAddresses[{i}].IP")))
    labels = doc.get("Labels")
    labels = {} if labels is None else labels
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise WireError("node: Labels must map strings to strings")
    return NodeRecord(
        name=name,
        cluster=cluster,
        cluster_id=_uint(doc.get("ClusterID", 0), "node: ClusterID", 2**31 - 1),
        addresses=tuple(addresses),
        ipv4_alloc_cidr=_decode_cidr(doc.get("IPv4AllocCIDR"), "node: IPv4AllocCIDR"),
        ipv6_alloc_cidr=_decode_cidr(doc.get("IPv6AllocCIDR"), "node: IPv6AllocCIDR"),
        ipv4_health_ip=_optional_ip(doc.get("IPv4HealthIP"), "node: IPv4HealthIP"),
        ipv6_health_ip=_optional_ip(doc.get("IPv6HealthIP"), "node: IPv6HealthIP"),
        encryption_key=_uint(doc.get("EncryptionKey", 0), "node: EncryptionKey", 255),
        labels=tuple(sorted(labels.items())),
    )


# -- ipcache entries: Cilium's identity.IPIdentityPair ------------------------------------------


@dataclass(frozen=True, slots=True)
class IPIdentityPair:
    """`cilium/state/ip/v1/default/<ip>`: an address (or prefix) and its security identity,
    with the node that hosts it (`host_ip`, the tunnel endpoint) and the pod it belongs to.
    Immutable."""

    prefix: IPNetwork
    identity: int
    host_ip: str | None = None
    encryption_key: int = 0
    metadata: str = ""
    namespace: str | None = None
    pod_name: str | None = None


def encode_ip_identity(pair: IPIdentityPair) -> bytes:
    net = pair.prefix
    host = net.prefixlen == net.max_prefixlen
    if not 0 < pair.identity < 2**32:
        raise WireError(f"identity {pair.identity} is not a uint32 above 0")
    doc: dict[str, Any] = {
        "IP": str(net.network_address),
        # Go's net.IPMask is a byte slice: base64 in JSON; nil (a host address) is null.
        "Mask": None if host else base64.b64encode(net.netmask.packed).decode(),
        "HostIP": _canonical_ip(pair.host_ip, "HostIP") if pair.host_ip else "",
        "ID": pair.identity,
        "Key": pair.encryption_key,
        "Metadata": pair.metadata,
    }
    if pair.namespace:
        doc["K8sNamespace"] = pair.namespace
    if pair.pod_name:
        doc["K8sPodName"] = pair.pod_name
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_ip_identity(data: bytes) -> IPIdentityPair:
    doc = _json_object(data, "ipcache entry")
    address = _canonical_ip(doc.get("IP"), "ipcache entry: IP")
    mask = doc.get("Mask")
    ip = ipaddress.ip_address(address)
    if mask is None or mask == "":
        prefix = ipaddress.ip_network(ip)
    else:
        if not isinstance(mask, str):
            raise WireError("ipcache entry: Mask must be base64 or null")
        try:
            raw = base64.b64decode(mask, validate=True)
        except (binascii.Error, ValueError):
            raise WireError(f"ipcache entry: Mask {mask!r} is not base64") from None
        try:
            prefix = _network_of(ip, raw)
        except WireError as e:
            raise WireError(f"ipcache entry: {e}") from None
    for field in ("K8sNamespace", "K8sPodName", "Metadata"):
        if not isinstance(doc.get(field, ""), str):
            raise WireError(f"ipcache entry: {field} must be a string")
    return IPIdentityPair(
        prefix=prefix,
        identity=_positive(doc.get("ID"), "ipcache entry: ID"),
        host_ip=_optional_ip(doc.get("HostIP"), "ipcache entry: HostIP"),
        encryption_key=_uint(doc.get("Key", 0), "ipcache entry: Key", 255),
        metadata=doc.get("Metadata", ""),
        namespace=doc.get("K8sNamespace") or None,
        pod_name=doc.get("K8sPodName") or None,
    )


def _network_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, mask: bytes) -> IPNetwork:
    bits = int.from_bytes(mask, "big") if mask else 0
    width = len(mask) * 8
    if width == 16 * 8 and ip.version == 4:  # Go may hold an IPv4 mask in 16 bytes
        bits &= 0xFFFFFFFF
        width = 32
    if width != ip.max_prefixlen:
        raise WireError(f"a {len(mask)}-byte Mask for IPv{ip.version} address {ip}")
    length = bin(bits).count("1")
    if bits != ((1 << width) - 1) ^ ((1 << (width - length)) - 1):
        raise WireError(f"the Mask of {ip} is not contiguous")
    try:
        return ipaddress.ip_network(f"{ip}/{length}", strict=True)
    except ValueError as e:
        raise WireError(str(e)) from None


# -- global services: Cilium's pkg/clustermesh/store.ClusterService -------------------------------


@dataclass(frozen=True, slots=True, order=True)
class L4Addr:
    """One port of a frontend or a backend: Cilium's loadbalancer.L4Addr, which has no JSON tags
    (`{"Protocol":"TCP","Port":8080}`). `protocol` is one of `L4_PROTOCOLS`."""

    protocol: str
    port: int


PortConfiguration = tuple[tuple[str, L4Addr], ...]
"""Cilium's PortConfiguration (port name → L4Addr) as pairs sorted by name, so that it hashes."""


@dataclass(frozen=True, slots=True)
class ClusterService:
    """`cilium/state/services/v1/<cluster>/<ns>/<name>`: a global Service as its cluster offers it
    to the others. `frontends` maps each ClusterIP, and `backends` each ready backend's address,
    to its ports by the Service port's name: a backend's port named "http" is the target of the
    frontend port named "http" (Cilium matches them by name and protocol). Pairs are sorted by
    address, then by port name. Cilium's writer publishes only global, shared Services
    (`include_external` and `shared` true); its reader drops the backends of one that says
    `shared: false`. `hostnames` and `zones` (topology hints) are neither written nor read.
    Immutable; build one from mappings with `of`."""

    cluster: str
    namespace: str
    name: str
    frontends: tuple[tuple[str, PortConfiguration], ...] = ()
    backends: tuple[tuple[str, PortConfiguration], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    selector: tuple[tuple[str, str], ...] = ()
    include_external: bool = True
    shared: bool = True
    cluster_id: int = 0

    @classmethod
    def of(cls, cluster: str, namespace: str, name: str, *,
           frontends: Mapping[str, Mapping[str, L4Addr]] | None = None,
           backends: Mapping[str, Mapping[str, L4Addr]] | None = None,
           labels: Mapping[str, str] | None = None, selector: Mapping[str, str] | None = None,
           include_external: bool = True, shared: bool = True, cluster_id: int = 0) -> ClusterService:
        return cls(cluster, namespace, name, _port_table(frontends or {}), _port_table(backends or {}),
                   tuple(sorted((labels or {}).items())), tuple(sorted((selector or {}).items())),
                   include_external, shared, cluster_id)

    @property
    def ref(self) -> str:
        """`namespace/name`, as the service table names a Service."""
        return f"{self.namespace}/{self.name}"

    def backend_ports(self, port_name: str, protocol: str) -> tuple[tuple[str, int], ...]:
        """(address, port) of every backend that has a port named `port_name` with `protocol`:
        the backends of the frontend port of that name."""
        out: list[tuple[str, int]] = []
        for address, ports in self.backends:
            for name, l4 in ports:
                if name == port_name and l4.protocol == protocol:
                    out.append((address, l4.port))
        return tuple(out)


def _port_table(table: Mapping[str, Mapping[str, L4Addr]]) -> tuple[tuple[str, PortConfiguration], ...]:
    return tuple(sorted((address, tuple(sorted(ports.items()))) for address, ports in table.items()))


def encode_cluster_service(svc: ClusterService) -> bytes:
    """Cilium's JSON: the struct's fields in order, maps with sorted keys (Go's json.Marshal), so
    every agent of a cluster that sees the same Service and pods writes the same bytes."""
    check_cluster_name(svc.cluster)
    _check_segment(svc.namespace, "service namespace")
    _check_segment(svc.name, "service name")
    doc: dict[str, Any] = {
        "cluster": svc.cluster,
        "namespace": svc.namespace,
        "name": svc.name,
        "frontends": _encode_port_table(svc.frontends, "frontends"),
        "backends": _encode_port_table(svc.backends, "backends"),
        "labels": dict(sorted(svc.labels)),
        "selector": dict(sorted(svc.selector)),
        "includeExternal": svc.include_external,
        "shared": svc.shared,
        "clusterID": _uint(svc.cluster_id, "cluster service: clusterID", 2**32 - 1),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _encode_port_table(table: tuple[tuple[str, PortConfiguration], ...], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for address, ports in sorted(table):
        ip = _service_address(address, f"cluster service: {what}")
        config: dict[str, Any] = {}
        for name, l4 in sorted(ports):
            where = f"cluster service: {what}[{ip!r}][{name!r}]"
            if l4.protocol not in L4_PROTOCOLS:
                raise WireError(f"{where}.Protocol must be one of {', '.join(L4_PROTOCOLS)}, got {l4.protocol!r}")
            config[name] = {"Protocol": l4.protocol, "Port": _uint(l4.port, f"{where}.Port", 65535)}
        out[ip] = config
    return out


def decode_cluster_service(data: bytes) -> ClusterService:
    """A ClusterService, checked as Cilium's `validate` does (cluster, namespace and name set;
    addresses without a zone) and as strictly as the other values here (every field's type).
    Unknown fields, `hostnames` and `zones` are ignored. Errors name the field."""
    doc = _json_object(data, "cluster service")
    names: list[str] = []
    for field in ("cluster", "namespace", "name"):
        value = doc.get(field)
        if not isinstance(value, str) or not value:
            raise WireError(f"cluster service: {field} must be a non-empty string, got {value!r}")
        names.append(value)
    cluster, namespace, name = names
    for value, what in ((namespace, "namespace"), (name, "name")):
        if "/" in value:
            raise WireError(f"cluster service: {what} {value!r} holds '/'")
    return ClusterService(
        cluster, namespace, name,
        frontends=_decode_port_table(doc.get("frontends"), "frontends"),
        backends=_decode_port_table(doc.get("backends"), "backends"),
        labels=_string_pairs(doc.get("labels"), "cluster service: labels"),
        selector=_string_pairs(doc.get("selector"), "cluster service: selector"),
        include_external=_bool(doc.get("includeExternal", False), "cluster service: includeExternal"),
        shared=_bool(doc.get("shared", False), "cluster service: shared"),
        cluster_id=_uint(doc.get("clusterID", 0), "cluster service: clusterID", 2**32 - 1),
    )


def _decode_port_table(value: object, what: str) -> tuple[tuple[str, PortConfiguration], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise WireError(f"cluster service: {what} must be an object or null")
    out: dict[str, PortConfiguration] = {}
    for address, ports in value.items():
        ip = _service_address(address, f"cluster service: {what}")
        where = f"cluster service: {what}[{address!r}]"
        if ports is None:
            ports = {}
        if not isinstance(ports, dict):
            raise WireError(f"{where} must be an object of ports by name")
        config: list[tuple[str, L4Addr]] = []
        for port_name, l4 in ports.items():
            at = f"{where}[{port_name!r}]"
            if not isinstance(l4, dict):
                raise WireError(f"{at} must be an object {{Protocol, Port}}")
            protocol = l4.get("Protocol")
            if protocol not in L4_PROTOCOLS:
                raise WireError(f"{at}.Protocol must be one of {', '.join(L4_PROTOCOLS)}, got {protocol!r}")
            config.append((port_name, L4Addr(protocol, _uint(l4.get("Port"), f"{at}.Port", 65535))))
        if ip in out:
            raise WireError(f"{where}: address {ip} is in {what} twice")
        out[ip] = tuple(sorted(config))
    return tuple(sorted(out.items()))


def _service_address(value: object, what: str) -> str:
    # Cilium's validate: netip.ParseAddr, and no IPv6 zone (Python's ipaddress would accept one).
    if isinstance(value, str) and "%" in value:
        raise WireError(f"{what}: unsupported IPv6 zone in address {value!r}")
    return _canonical_ip(value, f"{what}: key")


def _string_pairs(value: object, what: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise WireError(f"{what} must map strings to strings")
    return tuple(sorted(value.items()))


# -- helpers ------------------------------------------------------------------------------------


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError(f"{what}: not JSON: {data[:60]!r}") from None
    if not isinstance(doc, dict):
        raise WireError(f"{what}: not a JSON object")
    return doc


def _uint(value: object, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise WireError(f"{what} must be an integer 0..{maximum}, got {value!r}")
    return value


def _positive(value: object, what: str) -> int:
    number = _uint(value, what, 2**32 - 1)
    if number == 0:
        raise WireError(f"{what} must not be 0")
    return number


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{what} must be true or false, got {value!r}")
    return value


def _canonical_ip(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{what} must be an IP address string, got {value!r}")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise WireError(f"{what}: {value!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # Go prints a 16-byte IPv4 address as dotted quad
    return str(ip)


def _optional_ip(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    return _canonical_ip(value, what)


def _encode_cidr(text: str | None, version: int) -> dict[str, str] | None:
    if text is None:
        return None
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise WireError(f"alloc CIDR {text!r}: {e}") from None
    if net.version != version:
        raise WireError(f"alloc CIDR {text!r} is not IPv{version}")
    # Cilium's cidr.CIDR wraps a net.IPNet: {"IP": "...", "Mask": base64}
    return {"IP": str(net.network_address), "Mask": base64.b64encode(net.netmask.packed).decode()}


def _decode_cidr(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be an object or null")
    ip = ipaddress.ip_address(_canonical_ip(value.get("IP"), f"{what}.IP"))
    mask = value.get("Mask")
    if not isinstance(mask, str):
        raise WireError(f"{what}.Mask must be base64")
    try:
        raw = base64.b64decode(mask, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what}.Mask {mask!r} is not base64") from None
    try:
        return str(_network_of(ip, raw))
    except WireError as e:
        raise WireError(f"{what}: {e}") from None
