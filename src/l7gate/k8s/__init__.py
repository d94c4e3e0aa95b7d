"""l7gate.k8s: Kubernetes objects as l7gate's typed values (`objects`) and manifest loading."""

from l7gate.k8s.objects import (
    CLUSTER_ANNOTATION,
    K8sObjectError,
    Namespace,
    Node,
    Pod,
    parse_endpoint_slice,
    parse_namespace,
    parse_node,
    parse_object,
    parse_pod,
    parse_service,
    pod_backend,
)

__all__ = [
    "CLUSTER_ANNOTATION",
    "K8sObjectError",
    "Namespace",
    "Node",
    "Pod",
    "parse_endpoint_slice",
    "parse_namespace",
    "parse_node",
    "parse_object",
    "parse_pod",
    "parse_service",
    "pod_backend",
]
