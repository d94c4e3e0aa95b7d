"""l7gate.identity: security identities.

- `numeric`: reserved identities, cluster-ID ranges, `cluster_of`, the `Identity` value.
- `filter`: which of a pod's labels make up its identity; the labels of a node's identity.
- `allocator`: numbers for label sets, stored in the kvstore; local identities for CIDRs.
- `ipcache`: IP/CIDR -> identity with longest-prefix match.
"""

from l7gate.identity.allocator import (
    IdentityAllocator,
    cidr_labels,
    decode_labels,
    encode_labels,
)
from l7gate.identity.filter import identity_labels, is_identity_relevant
from l7gate.identity.ipcache import IPCache, IPCacheChange, IPCacheEntry
from l7gate.identity.numeric import (
    HEALTH,
    HOST,
    INGRESS,
    INIT,
    KUBE_APISERVER,
    LOCAL_IDENTITY_FLAG,
    MIN_ALLOCATABLE,
    REMOTE_NODE,
    RESERVED,
    UNMANAGED,
    WORLD,
    WORLD_IPV4,
    WORLD_IPV6,
    Identity,
    IdentityError,
    allocation_range,
    cluster_of,
    is_local,
    is_reserved,
    reserved_for_labels,
    reserved_identity,
)

__all__ = [
    "HEALTH",
    "HOST",
    "INGRESS",
    "INIT",
    "IPCache",
    "IPCacheChange",
    "IPCacheEntry",
    "Identity",
    "IdentityAllocator",
    "IdentityError",
    "KUBE_APISERVER",
    "LOCAL_IDENTITY_FLAG",
    "MIN_ALLOCATABLE",
    "REMOTE_NODE",
    "RESERVED",
    "UNMANAGED",
    "WORLD",
    "WORLD_IPV4",
    "WORLD_IPV6",
    "allocation_range",
    "cidr_labels",
    "cluster_of",
    "decode_labels",
    "encode_labels",
    "identity_labels",
    "is_identity_relevant",
    "is_local",
    "is_reserved",
    "reserved_for_labels",
    "reserved_identity",
]
