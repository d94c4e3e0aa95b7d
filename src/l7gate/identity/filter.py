"""Identity-relevant labels: which of a pod's labels decide its security identity.

Every distinct label set is a distinct identity, so a label that differs between replicas of one
workload (a hash, a generation, a pod name, a job UID) would give each pod its own identity:
more identities to allocate, more policy state, and policies that no longer group the replicas.
Such labels are dropped. What remains is the user's labels plus facts the agent knows and the pod
cannot forge: its namespace, its cluster, its service account, and its namespace's labels.

The rules, learned from Cilium's default label filter and tightened where a label is per-pod or
can be forged:

- Keys in the Kubernetes-owned domains are dropped: `kubernetes.io`, `k8s.io` and any subdomain
  of either (`statefulset.kubernetes.io/pod-name`, `batch.kubernetes.io/job-name`, ...), except
  `app.kubernetes.io/*`, the recommended application labels, which users select on. Cilium drops
  `kubernetes.io/*`, `k8s.io/*`, `*beta.kubernetes.io/*` and a few named subdomain keys; dropping
  the whole owned domains is stricter and covers new controller labels too.
- Controller bookkeeping without a domain is dropped: `pod-template-hash`,
  `pod-template-generation`, `controller-revision-hash`, `controller-uid`, `job-name`, and
  Cilium's `etcd_node`.
- `io.kubernetes.*`, `io.cilium.k8s.*` and `annotation.*` keys are dropped from the pod's own
  labels: the first two are the namespace, cluster, service account and namespace-label keys the
  agent sets itself (a pod must not claim another namespace or cluster); the last is Cilium's
  source for annotations.
- Keys holding `:` are dropped: Kubernetes never allows them, and `reserved:host` or
  `cidr:0.0.0.0/0` on a pod would impersonate a reserved or CIDR identity.

Namespace labels are all kept (as `io.cilium.k8s.namespace.labels.<key>`), like Cilium, so
that `kubernetes.io/metadata.name` can be selected on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from l7gate.identity.numeric import IdentityError
from l7gate.policy.labels import (
    CLUSTER_KEY,
    NAMESPACE_KEY,
    NAMESPACE_LABELS_PREFIX,
    NODE_SOURCE,
    SERVICE_ACCOUNT_KEY,
    Labels,
    node_label,
    reserved,
)

DROPPED_KEYS = frozenset(
    {
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "job-name",
        "etcd_node",
    }
)
_OWNED_DOMAINS = ("kubernetes.io", "k8s.io")
_KEPT_DOMAINS = frozenset({"app.kubernetes.io"})
_AGENT_KEY_PREFIXES = ("io.kubernetes.", "io.cilium.k8s.", "annotation.")


def _in_owned_domain(key: str) -> bool:
    domain, slash, _ = key.partition("/")
    if not slash or domain in _KEPT_DOMAINS:
        return False
    return any(domain == d or domain.endswith("." + d) for d in _OWNED_DOMAINS)


@functools.lru_cache(maxsize=8192)  # the same few keys, on every pod
def is_identity_relevant(key: str) -> bool:
    """Whether a pod label with this key takes part in the pod's identity."""
    return not (
        key in DROPPED_KEYS
        or ":" in key
        or key.startswith(_AGENT_KEY_PREFIXES)
        or _in_owned_domain(key)
    )


def identity_labels(
    pod_labels: Mapping[str, str],
    *,
    namespace: str,
    cluster: str,
    service_account: str | None = None,
    namespace_labels: Mapping[str, str] | None = None,
) -> Labels:
    """The labels that make up a pod's identity (see the module docstring for the rules)."""
    if not namespace:
        raise IdentityError("a pod's namespace must not be empty")
    if not cluster:
        raise IdentityError("a pod's cluster name must not be empty")
    result = {k: v for k, v in pod_labels.items() if is_identity_relevant(k)}
    for key, value in (namespace_labels or {}).items():
        if ":" not in key:
            result[NAMESPACE_LABELS_PREFIX + key] = value
    result[NAMESPACE_KEY] = namespace
    result[CLUSTER_KEY] = cluster
    if service_account:
        result[SERVICE_ACCOUNT_KEY] = service_account
    return Labels.of(result)


# -- node identities ----------------------------------------------------------------------------

_NODE_KEY_PREFIX = NODE_SOURCE + ":"


def node_labels(labels: Mapping[str, str], *, cluster: str, local: bool) -> Labels:
    """The labels of a node's identity, as Cilium gives them with node selector labels: this
    node's (`local`) is `reserved:host`, any other's `reserved:remote-node`, with every label of
    its Node as `node:<key>` and its cluster as `io.cilium.k8s.policy.cluster`. Another node's
    labels get a number in the remote-node scope (`IdentityAllocator.allocate`); this node's are
    the labels of the reserved identity `host` (1)."""
    out = {node_label(k): v for k, v in labels.items()}
    out[CLUSTER_KEY] = cluster
    out[reserved("host" if local else "remote-node")] = ""
    return Labels.of(out)


def is_node_labels(labels: Labels) -> bool:
    """Labels `node_labels` gives another node: `reserved:remote-node` with the node's labels and
    its cluster, nothing else."""
    return (reserved("remote-node") in labels and CLUSTER_KEY in labels
            and all(k.startswith(_NODE_KEY_PREFIX) or k in (CLUSTER_KEY, reserved("remote-node")) for k in labels))
