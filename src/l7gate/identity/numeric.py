"""Security identity numbers: reserved identities, cluster ranges, local (CIDR) identities.

The number space follows Cilium, so that numbers mean the same thing in flows, BPF maps and
`hubble observe` output:

    0                      invalid, never allocated
    1 .. 255               reserved identities (1 host, 2 world, ... 10 world-ipv6)
    256 .. 0xFFFF          cluster ID 0: a single cluster without a mesh
    N<<16 .. N<<16|0xFFFF  cluster ID N, 1 <= N <= 255: the number says which cluster made it
    1<<24 | 1 .. 0x1FFFFFF local identities (CIDR peers), meaningful on one node only
    2<<24 | 1 .. 0x2FFFFFF other nodes' identities from their labels (Cilium's remote-node
                           scope), meaningful on one node only as well

Labels of reserved identities are exactly `reserved:<name>`, as in Cilium: world-ipv4 (9) and
world-ipv6 (10) do *not* also carry `reserved:world`. The `world` entity selects all three because
the policy engine's entity selector looks for any of the three keys (Cilium's dual-stack mapping);
keeping them apart lets a `0.0.0.0/0` rule select 2 and 9 but not the IPv6 world 10. CIDR
identities carry `reserved:world` (see `allocator.cidr_labels`), so `world` selects them too.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from l7gate.policy.labels import Labels, reserved


class IdentityError(Exception):
    """Any failure of identity allocation or lookup (bad cluster ID, exhausted range, labels
    that cannot be allocated, corrupt stored data)."""


HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6
KUBE_APISERVER = 7
INGRESS = 8
WORLD_IPV4 = 9
WORLD_IPV6 = 10

MAX_RESERVED = 255
MIN_ALLOCATABLE = 256
CLUSTER_ID_MIN = 1
CLUSTER_ID_MAX = 255
CLUSTER_ID_SHIFT = 16
# Cilium's flag for node-local identities: numbers that never leave the node, so they cannot
# collide with any cluster's range (the highest of which ends at 0xFFFFFF).
LOCAL_IDENTITY_FLAG = 1 << 24
LOCAL_MIN = LOCAL_IDENTITY_FLAG | 1
LOCAL_MAX = LOCAL_IDENTITY_FLAG | 0xFFFFFF
# Cilium's remote-node scope: each other node's identity from its Node's labels (`reserved:
# remote-node` and `node:<key>` labels), allocated by each agent for itself.
REMOTE_NODE_IDENTITY_FLAG = 2 << 24
REMOTE_NODE_MIN = REMOTE_NODE_IDENTITY_FLAG | 1
REMOTE_NODE_MAX = REMOTE_NODE_IDENTITY_FLAG | 0xFFFFFF

RESERVED_NAMES: Mapping[int, str] = MappingProxyType(
    {
        HOST: "host",
        WORLD: "world",
        UNMANAGED: "unmanaged",
        HEALTH: "health",
        INIT: "init",
        REMOTE_NODE: "remote-node",
        KUBE_APISERVER: "kube-apiserver",
        INGRESS: "ingress",
        WORLD_IPV4: "world-ipv4",
        WORLD_IPV6: "world-ipv6",
    }
)


@dataclass(frozen=True, slots=True)
class Identity:
    """A numeric security identity and the labels it stands for. Immutable."""

    id: int
    labels: Labels

    @property
    def reserved(self) -> bool:
        return is_reserved(self.id)

    @property
    def local(self) -> bool:
        return is_local(self.id)

    @property
    def cluster(self) -> int | None:
        return cluster_of(self.id)

    def __str__(self) -> str:
        return f"{self.id} ({self.labels})"


RESERVED: Mapping[int, Identity] = MappingProxyType(
    {n: Identity(n, Labels.of({reserved(RESERVED_NAMES[n]): ""})) for n in sorted(RESERVED_NAMES)}
)
_RESERVED_BY_LABELS: Mapping[Labels, Identity] = MappingProxyType(
    {i.labels: i for i in RESERVED.values()}
)
_RESERVED_BY_NAME: Mapping[str, Identity] = MappingProxyType(
    {RESERVED_NAMES[n]: i for n, i in RESERVED.items()}
)


def reserved_identity(name: str) -> Identity:
    """The reserved identity called `name` ("host", "world", ...)."""
    try:
        return _RESERVED_BY_NAME[name]
    except KeyError:
        raise IdentityError(f"no reserved identity named {name!r}") from None


def reserved_for_labels(labels: Labels) -> Identity | None:
    """The reserved identity whose labels are exactly `labels`, if any."""
    return _RESERVED_BY_LABELS.get(labels)


def is_reserved(number: int) -> bool:
    return 0 < number <= MAX_RESERVED


def is_local(number: int) -> bool:
    """Whether `number` is node-local: a CIDR identity or another node's (remote-node scope)."""
    return LOCAL_MIN <= number <= LOCAL_MAX or is_remote_node_scoped(number)


def is_remote_node_scoped(number: int) -> bool:
    return REMOTE_NODE_MIN <= number <= REMOTE_NODE_MAX


def check_cluster_id(cluster_id: int) -> int:
    if isinstance(cluster_id, bool) or not isinstance(cluster_id, int):
        raise IdentityError(f"cluster ID must be an integer, got {cluster_id!r}")
    if not 0 <= cluster_id <= CLUSTER_ID_MAX:
        raise IdentityError(f"cluster ID {cluster_id} out of range 0..{CLUSTER_ID_MAX}")
    return cluster_id


def allocation_range(cluster_id: int) -> range:
    """The numbers cluster `cluster_id` allocates from: 256..65535 for cluster 0 (no mesh),
    [N<<16, (N+1)<<16 - 1] for cluster N."""
    check_cluster_id(cluster_id)
    if cluster_id == 0:
        return range(MIN_ALLOCATABLE, 1 << CLUSTER_ID_SHIFT)
    return range(cluster_id << CLUSTER_ID_SHIFT, (cluster_id + 1) << CLUSTER_ID_SHIFT)


def cluster_of(number: int) -> int | None:
    """The ID of the cluster whose range holds `number` (0 for the single-cluster range), or
    None for reserved and node-local identities, which belong to no cluster."""
    if isinstance(number, bool) or not isinstance(number, int):
        raise IdentityError(f"identity must be an integer, got {number!r}")
    if is_reserved(number) or is_local(number):
        return None
    if MIN_ALLOCATABLE <= number < LOCAL_IDENTITY_FLAG:
        return number >> CLUSTER_ID_SHIFT
    raise IdentityError(f"{number} is not a valid identity")


@functools.lru_cache(maxsize=65536)
def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`ipaddress.ip_address(text)`, remembered: a pod's address is read from its podIP, its
    podIPs and the ipcache, and a node's from every pod on it; parsing one costs more than
    everything else an initial sync does with it. Raises ValueError as that does."""
    return ipaddress.ip_address(text)
