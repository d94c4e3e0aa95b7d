"""The watch's reconcile logic against the real core (`agent.kube.CoreSink`): the keys the
watch computes are the core's, ownership survives a restart of the agent, an invalid policy is
refused with its field path and changes nothing in force, and a namespace can be deleted."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.agent.kube import CoreSink
from l7gate.k8s.reconcile import CNPS, NAMESPACES, NODES, PODS, RESOURCES, ObjectRef, Pending, Reconciler, Resource, project
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.xds.cache import EXTENSION_CONFIG, SnapshotCache

from .test_k8s_reconcile import api_cnp, api_node, api_pod, listing, run

CLUSTER = "cluster-a"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[ObjectRef, list[str]]] = []

    def refused(self, ref: ObjectRef, errors: Sequence[str]) -> None:
        self.seen.append((ref, list(errors)))


def open_core(tmp: Path) -> tuple[AgentCore, SQLiteKVStore]:
    cfg = AgentConfig(node="node-a1", cluster_name=CLUSTER, cluster_id=1, state_dir=str(tmp),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    store = SQLiteKVStore(str(tmp / "kv.db"))
    return AgentCore(cfg, store, SnapshotCache()), store


@pytest.fixture
def core(tmp_path: Path) -> Iterator[AgentCore]:
    c, store = open_core(tmp_path)
    yield c
    store.close()


def sync(rec: Reconciler, objs: dict[Resource, list[dict[str, Any]]]) -> None:
    p = Pending()
    for r in RESOURCES:
        p.listing(r, [project(r, o, CLUSTER) for o in objs.get(r, [])])
    run(rec, p)


def cli_policy(name: str) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "payments"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "billing"}}, "ingress": [{}]}}


def port_of(core: AgentCore, key: str) -> str:
    return str(core.view().policy_docs[key]["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"])


def test_the_watch_keys_are_the_cores_and_a_relist_spares_what_the_cli_applied(core: AgentCore) -> None:
    sink = CoreSink(core)
    rec = Reconciler(sink, Recorder())
    sync(rec, {
        NAMESPACES: [{"metadata": {"name": "web", "labels": {"tier": "front"}}}],
        PODS: [api_pod("a", "10.1.0.1"), api_pod("b", "10.1.0.2")],
        CNPS: [api_cnp("one"), api_cnp("two")],
    })
    assert sink.owned("Pod") == {"cluster-a/web/a", "cluster-a/web/b"}
    assert sink.owned("Namespace") == {"cluster-a/web"}
    assert sink.owned("CiliumNetworkPolicy") == {"CiliumNetworkPolicy/payments/one", "CiliumNetworkPolicy/payments/two"}
    # The namespace's labels are in the pod's identity: the API's namespace is this cluster's.
    assert core.view().pods["cluster-a/web/a"].labels.get("io.cilium.k8s.namespace.labels.tier") == "front"
    core.apply([cli_policy("by-hand")])
    # The CLI re-applies an object the watch applied: it is the CLI's now (the last writer owns it).
    core.apply([{**cli_policy("two")}])
    assert sink.owned("CiliumNetworkPolicy") == {"CiliumNetworkPolicy/payments/one"}
    run(rec, listing(CNPS, []))
    assert set(core.view().policy_docs) == {"CiliumNetworkPolicy/payments/by-hand", "CiliumNetworkPolicy/payments/two"}
    # A DELETED event of a key the CLI holds deletes nothing either.
    p = Pending()
    p.event(CNPS, project(CNPS, api_cnp("two"), CLUSTER, deleted=True))
    run(rec, p)
    assert "CiliumNetworkPolicy/payments/two" in core.view().policy_docs


def test_ownership_survives_an_agent_restart(tmp_path: Path) -> None:
    core, store = open_core(tmp_path)
    sync(Reconciler(CoreSink(core), Recorder()), {
        PODS: [api_pod("a", "10.1.0.1"), api_pod("b", "10.1.0.2")], CNPS: [api_cnp("one"), api_cnp("two")]})
    core.apply([cli_policy("by-hand")])
    store.close()
    # The agent was down while pod b and policy two were deleted from the API.
    core, store = open_core(tmp_path)
    try:
        assert set(core.view().policy_docs) == {f"CiliumNetworkPolicy/payments/{n}" for n in ("one", "two", "by-hand")}
        sync(Reconciler(CoreSink(core), Recorder()), {PODS: [api_pod("a", "10.1.0.1")], CNPS: [api_cnp("one")]})
        assert set(core.view().policy_docs) == {"CiliumNetworkPolicy/payments/one", "CiliumNetworkPolicy/payments/by-hand"}
        assert set(core.view().pods) == {"cluster-a/web/a"}
    finally:
        store.close()


def test_an_invalid_policy_is_refused_with_its_field_path_and_changes_nothing(core: AgentCore) -> None:
    reports = Recorder()
    rec = Reconciler(CoreSink(core), reports)
    sync(rec, {CNPS: [api_cnp("p", port="80")]})
    revision = core.view().policy_revision
    p = Pending()
    p.event(CNPS, project(CNPS, api_cnp("p", bad=True, rv="2"), CLUSTER))
    p.event(CNPS, project(CNPS, api_cnp("q", port="81"), CLUSTER))
    run(rec, p)
    ref, errors = reports.seen[-1]
    assert (ref.name, ref.resource_version) == ("p", "2")
    assert any("spec.ingress[0].toPorts[0].rules.http[0].path" in e for e in errors), errors
    # The old revision of p is in force, untouched; q, in the same batch, is applied.
    assert port_of(core, "CiliumNetworkPolicy/payments/p") == "80"
    assert port_of(core, "CiliumNetworkPolicy/payments/q") == "81"
    assert core.view().policy_revision > revision


def test_a_namespace_deleted_from_the_api_leaves_its_pods_identities(core: AgentCore) -> None:
    sink = CoreSink(core)
    rec = Reconciler(sink, Recorder())
    sync(rec, {NAMESPACES: [{"metadata": {"name": "web", "labels": {"tier": "front"}}}],
               PODS: [api_pod("a", "10.1.0.1")]})
    labelled = core.view().pods["cluster-a/web/a"].identity
    p = Pending()
    p.event(NAMESPACES, project(NAMESPACES, {"metadata": {"name": "web"}}, CLUSTER, deleted=True))
    run(rec, p)
    rec_a = core.view().pods["cluster-a/web/a"]
    assert "io.cilium.k8s.namespace.labels.tier" not in rec_a.labels and rec_a.identity != labelled
    assert sink.owned("Namespace") == set() and core.documents("Namespace") == {}
    assert core.delete_namespace("cluster-a/web") is False


def api_slice(name: str, *addresses: str, service: str = "ext", managed_by: str = "", rv: str = "1") -> dict[str, Any]:
    """An EndpointSlice as the API lists it (no kind, no apiVersion; node and zone fields)."""
    labels = {"kubernetes.io/service-name": service}
    if managed_by:
        labels["endpointslice.kubernetes.io/managed-by"] = managed_by
    return {"metadata": {"name": name, "namespace": "partners", "labels": labels, "resourceVersion": rv},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "nodeName": "n1", "zone": "z", "conditions": {"ready": True}}
                          for a in addresses],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}


def test_endpoint_slices_from_the_api_move_a_toservices_rule(core: AgentCore) -> None:
    from l7gate.k8s.reconcile import ENDPOINTSLICES, SERVICES
    from l7gate.policy.mapstate import lookup
    from l7gate.policy.types import Direction, Protocol

    sink = CoreSink(core)
    rec = Reconciler(sink, Recorder())
    client = {"metadata": {"name": "client", "namespace": "web", "labels": {"app": "client"}},
              "spec": {"nodeName": "node-a1"}, "status": {"podIP": "10.1.0.9"}}
    policy = {"metadata": {"name": "to-ext", "namespace": "web"},
              "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                       "egress": [{"toServices": [{"k8sService": {"serviceName": "ext", "namespace": "partners"}}]}]}}
    service = {"metadata": {"name": "ext", "namespace": "partners"}, "spec": {"ports": [{"name": "https", "port": 443}]}}

    def may_connect(address: str) -> bool:
        ident = core.view().pods["cluster-a/web/client"].identity
        return lookup(core.resolver.endpoint_policy(ident), Direction.EGRESS, core.ipcache.lookup(address), 443,
                      Protocol.TCP).allowed

    sync(rec, {PODS: [client], CNPS: [policy], SERVICES: [service],
               ENDPOINTSLICES: [api_slice("ext-1", "192.0.2.10"),
                                # the endpoint slice controller's: a Service with a selector; never applied
                                api_slice("web-x", "192.0.2.20", service="web",
                                          managed_by="endpointslice-controller.k8s.io")]})
    assert sink.owned("EndpointSlice") == {"cluster-a/partners/ext-1"}
    doc = core.document("EndpointSlice", "cluster-a/partners/ext-1")
    assert doc["endpoints"] == [{"addresses": ["192.0.2.10"], "conditions": {"ready": True}}]  # no node, no zone
    assert may_connect("192.0.2.10") and not may_connect("192.0.2.11")

    p = Pending()
    p.event(ENDPOINTSLICES, project(ENDPOINTSLICES, api_slice("ext-1", "192.0.2.11", rv="2"), CLUSTER))
    run(rec, p)
    assert may_connect("192.0.2.11") and not may_connect("192.0.2.10")
    p = Pending()
    p.event(ENDPOINTSLICES, project(ENDPOINTSLICES, api_slice("ext-1"), CLUSTER, deleted=True))
    run(rec, p)
    assert not may_connect("192.0.2.11") and sink.owned("EndpointSlice") == set()


def test_nodes_from_the_api_label_their_addresses_and_go_with_them(core: AgentCore) -> None:
    sink = CoreSink(core)
    rec = Reconciler(sink, Recorder())
    sync(rec, {NODES: [api_node("node-a1", "192.0.2.1", {"role": "app"}), api_node("node-a2", "192.0.2.2", {"role": "x"})],
               PODS: [api_pod("a", "10.1.0.1")]})
    assert sink.owned("Node") == {"cluster-a/node-a1", "cluster-a/node-a2"}
    nodes = {n.node.name: n for n in core.view().nodes.values()}
    assert nodes["node-a1"].identity == 1 and nodes["node-a1"].local
    assert core.resolver.identities[1]["node:role"] == "app"
    other = nodes["node-a2"].identity
    assert other is not None and core.resolver.identities[other]["node:role"] == "x"
    # relabelled in the API: a new identity for its address
    p = Pending()
    p.event(NODES, project(NODES, api_node("node-a2", "192.0.2.2", {"role": "y"}, rv="2"), CLUSTER))
    run(rec, p)
    relabelled = core.view().nodes["cluster-a/node-a2"].identity
    assert relabelled not in (None, other) and core.resolver.identities[relabelled]["node:role"] == "y"
    # deleted from the API
    run(rec, listing(NODES, [api_node("node-a1", "192.0.2.1", {"role": "app"})]))
    assert set(core.view().nodes) == {"cluster-a/node-a1"}


def l7_cnp(name: str) -> dict[str, Any]:
    doc = api_cnp(name)
    doc["spec"]["ingress"][0]["toPorts"][0]["rules"] = {"http": [{"method": "GET", "path": "/v1/ok"}]}
    return doc


def test_a_sync_is_published_once_with_its_policies_and_readers_never_wait_for_it(core: AgentCore) -> None:
    """The initial sync's namespaces, pods and policies reach the publisher in one flush: Envoy
    and the kernel never get the pods without the policies listed with them, and the agent
    renders once. Meanwhile readers answer at once, from the state before the sync."""
    flushes: list[tuple[int, int]] = []
    seen_by_reader: list[int] = []

    class Counting:
        def __init__(self, pub: Any) -> None:
            self._pub = pub

        def flush(self) -> None:
            # A reader in another thread, while the batch holds the core's lock: not blocked,
            # and it sees the state before the sync (no pod yet).
            t = threading.Thread(target=lambda: seen_by_reader.append(len(core.view().pods)))
            t.start()
            t.join(5)
            assert not t.is_alive()
            flushes.append((len(core._pods), len(core._policy_docs)))
            self._pub.flush()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._pub, name)

    core.publisher = Counting(core.publisher)  # type: ignore[assignment]
    rec = Reconciler(CoreSink(core), Recorder())
    with core.batch():
        pass  # an empty batch publishes nothing
    assert flushes == []
    sync(rec, {
        NAMESPACES: [{"metadata": {"name": "payments"}}],
        PODS: [api_pod("billing-0", "10.1.0.5", {"app": "billing"}, ns="payments")],
        CNPS: [l7_cnp("billing-get")],
    })
    assert flushes == [(1, 1)] and seen_by_reader == [0]
    # After the batch, readers see all of it, and Envoy's resources hold the policy's rule.
    assert len(core.view().pods) == 1 and len(core.view().policy_docs) == 1
    snap = core.publisher._pub.sink.get_snapshot(core.config.node_id)  # type: ignore[attr-defined]
    assert snap is not None and any(b"/v1/ok" in r.packed.value for r in snap.resources[EXTENSION_CONFIG].values())
