"""Kubernetes NetworkPolicies through the agent's core (the path `policy apply`, the admin API and
the Kubernetes watch share): applied, listed under their kind, enforced in the resolved maps,
restored after a restart, deleted; and the namespace labels a namespaceSelector reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore, ApplyError
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.policy.mapstate import lookup
from l7gate.policy.types import Direction, Protocol
from l7gate.xds.cache import SnapshotCache

KEY = "NetworkPolicy/payments/billing-from-team-web"
NETWORK_POLICY: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "billing-from-team-web", "namespace": "payments"},
    "spec": {"podSelector": {"matchLabels": {"app": "billing"}},
             "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                          "ports": [{"port": 8080}]}]},
}


def pod(name: str, ns: str, ip: str, labels: dict[str, str], node: str = "n1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
            "status": {"podIP": ip}}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def make_core(tmp_path: Path) -> tuple[AgentCore, SQLiteKVStore]:
    cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    return AgentCore(cfg, store, SnapshotCache()), store


@pytest.fixture
def core(tmp_path: Path) -> Iterator[AgentCore]:
    c, store = make_core(tmp_path)
    yield c
    store.close()


def identity_of(core: AgentCore, ref: str) -> int:
    return next(r.identity for r in core.view().pods.values() if r.pod.ref == ref)


def allowed(core: AgentCore, src: str, dst: str, port: int = 8080) -> bool:
    policy = core.resolver.endpoint_policy(identity_of(core, dst))
    return lookup(policy, Direction.INGRESS, identity_of(core, src), port, Protocol.TCP).allowed


def test_a_namespace_applied_after_its_pods_gives_them_its_labels(core: AgentCore) -> None:
    core.apply([pod("billing", "payments", "10.0.1.10", {"app": "billing"}),
                pod("frontend", "web", "10.0.2.10", {"app": "frontend"})])
    core.apply([NETWORK_POLICY])
    assert not allowed(core, "cluster-a/web/frontend", "cluster-a/payments/billing")  # web's labels unknown
    core.apply([namespace("web", team="web")])
    labels = next(r.labels for r in core.view().pods.values() if r.pod.ref == "cluster-a/web/frontend")
    assert labels.get("io.cilium.k8s.namespace.labels.team") == "web"
    assert allowed(core, "cluster-a/web/frontend", "cluster-a/payments/billing")
    assert not allowed(core, "cluster-a/web/frontend", "cluster-a/payments/billing", 9090)
    core.apply([namespace("web", team="other")])
    assert not allowed(core, "cluster-a/web/frontend", "cluster-a/payments/billing")


def test_network_policies_are_applied_listed_restored_and_deleted(tmp_path: Path) -> None:
    core, store = make_core(tmp_path)
    try:
        core.apply([namespace("web", team="web"), pod("billing", "payments", "10.0.1.10", {"app": "billing"}),
                    pod("frontend", "web", "10.0.2.10", {"app": "frontend"})])
        result = core.apply([NETWORK_POLICY])
        assert result.to_json()["created"] == [KEY]
        assert core.apply([NETWORK_POLICY]).to_json()["unchanged"] == [KEY]
        assert list(core.documents("NetworkPolicy")) == [KEY]
        assert not core.documents("CiliumNetworkPolicy")  # a kind's documents are its own
        assert [p["key"] for p in views.policies(core.view())] == [KEY]
        assert allowed(core, "cluster-a/web/frontend", "cluster-a/payments/billing")
    finally:
        store.close()
    # a restarted agent enforces what it restored
    core, store = make_core(tmp_path)
    try:
        assert list(core.documents("NetworkPolicy")) == [KEY]
        assert allowed(core, "cluster-a/web/frontend", "cluster-a/payments/billing")
        assert core.delete_policy(KEY)
        assert allowed(core, "cluster-a/payments/billing", "cluster-a/payments/billing", 9090)  # no policy
        assert not core.documents("NetworkPolicy")
    finally:
        store.close()


def test_an_invalid_network_policy_changes_nothing_and_names_the_field(core: AgentCore) -> None:
    bad = {**NETWORK_POLICY, "spec": {**NETWORK_POLICY["spec"], "policyTypes": ["Ingress", "Sideways"]}}
    with pytest.raises(ApplyError) as ei:
        core.apply([bad])
    assert any(e.startswith(f"{KEY}: spec.policyTypes[1]: must be Ingress or Egress") for e in ei.value.errors), \
        ei.value.errors
    assert not core.documents("NetworkPolicy")
