"""Identity-relevant label filtering: replicas of one workload share one identity."""

from __future__ import annotations

import pytest

from l7gate.identity import IdentityError, identity_labels, is_identity_relevant
from l7gate.policy.labels import Labels


def replica(pod_hash: str, pod_name: str, **extra: str) -> dict[str, str]:
    return {
        "app": "billing-service",
        "app.kubernetes.io/name": "billing",
        "pod-template-hash": pod_hash,
        "controller-revision-hash": f"rev-{pod_hash}",
        "pod-template-generation": "3",
        "statefulset.kubernetes.io/pod-name": pod_name,
        "apps.kubernetes.io/pod-index": pod_name[-1],
        **extra,
    }


def test_replicas_get_the_same_labels() -> None:
    a = identity_labels(replica("7d9f", "billing-0"), namespace="payments", cluster="cluster-a")
    b = identity_labels(replica("5c2e", "billing-1"), namespace="payments", cluster="cluster-a")
    assert a == b
    assert a == Labels.of(
        {
            "app": "billing-service",
            "app.kubernetes.io/name": "billing",
            "io.kubernetes.pod.namespace": "payments",
            "io.cilium.k8s.policy.cluster": "cluster-a",
        }
    )


@pytest.mark.parametrize(
    "key",
    [
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "job-name",
        "etcd_node",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-name",
        "batch.kubernetes.io/controller-uid",
        "batch.kubernetes.io/job-completion-index",
        "kubernetes.io/anything",
        "k8s.io/thing",
        "node.k8s.io/foo",
        "beta.kubernetes.io/arch",
        "io.kubernetes.container.name",
        "io.kubernetes.pod.namespace",
        "io.cilium.k8s.policy.cluster",
        "io.cilium.k8s.policy.serviceaccount",
        "io.cilium.k8s.namespace.labels.team",
        "annotation.foo",
        "reserved:host",
        "cidr:0.0.0.0/0",
    ],
)
def test_noise_and_forgeable_keys_are_dropped(key: str) -> None:
    assert not is_identity_relevant(key)


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "tier",
        "version",
        "app.kubernetes.io/name",
        "app.kubernetes.io/component",
        "example.com/team",
        "mykubernetes.io/x",  # only the owned domain and its subdomains are Kubernetes'
        "job",
        "controller",
        "io.cilium/whatever",
    ],
)
def test_user_keys_are_kept(key: str) -> None:
    assert is_identity_relevant(key)


def test_agent_facts_win_over_pod_labels() -> None:
    labels = identity_labels(
        {
            "app": "x",
            "io.kubernetes.pod.namespace": "kube-system",
            "io.cilium.k8s.policy.cluster": "other",
            "io.cilium.k8s.policy.serviceaccount": "admin",
            "io.cilium.k8s.namespace.labels.team": "root",
        },
        namespace="web",
        cluster="cluster-b",
        service_account="frontend",
        namespace_labels={"team": "web", "kubernetes.io/metadata.name": "web"},
    )
    assert labels == Labels.of(
        {
            "app": "x",
            "io.kubernetes.pod.namespace": "web",
            "io.cilium.k8s.policy.cluster": "cluster-b",
            "io.cilium.k8s.policy.serviceaccount": "frontend",
            "io.cilium.k8s.namespace.labels.team": "web",
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "web",
        }
    )
    assert labels.namespace == "web" and labels.cluster == "cluster-b"


def test_pods_cannot_claim_reserved_labels() -> None:
    labels = identity_labels(
        {"reserved:host": "", "app": "x"}, namespace="default", cluster="c"
    )
    assert not labels.is_reserved()


def test_no_service_account_no_label() -> None:
    labels = identity_labels({"app": "x"}, namespace="default", cluster="c")
    assert "io.cilium.k8s.policy.serviceaccount" not in labels


def test_namespace_and_cluster_are_required() -> None:
    with pytest.raises(IdentityError):
        identity_labels({}, namespace="", cluster="c")
    with pytest.raises(IdentityError):
        identity_labels({}, namespace="ns", cluster="")
