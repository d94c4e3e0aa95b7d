"""The pure half of the Kubernetes watch (`k8s.reconcile`): the projection of API objects, the
merge of listings and events, the relist diff, ownership, refusals by halves, and the back-off.
The sink here is a fake with the agent's contract (all or nothing, marker-based ownership);
`test_k8s_core_sink.py` runs the same logic against the real core."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from l7gate.k8s.objects import parse_namespace, parse_node, parse_pod, parse_service
from l7gate.k8s.reconcile import (
    CCNPS, CIDRGROUPS, CNPS, MARKER, NAMESPACES, NODES, PODS, RESOURCES, SERVICES, Backoff, ObjectRef, Pending, Reconciler,
    Resource, from_api, project,
)
from l7gate.policy.parse import parse_policy

CLUSTER = "cluster-a"
BY_KIND = {r.kind: r for r in RESOURCES}


def api_pod(name: str, ip: str | None, labels: dict[str, str] | None = None, *, ns: str = "web",
            rv: str = "1", **status: Any) -> dict[str, Any]:
    """A Pod as the API server returns it: with the fields l7gate ignores too."""
    st: dict[str, Any] = {"phase": "Running", "hostIP": "10.0.0.1", "startTime": "2026-01-01T00:00:00Z",
                          "conditions": [{"type": "Initialized", "status": "True"},
                                         {"type": "Ready", "status": "True", "lastProbeTime": None,
                                          "lastTransitionTime": "2026-01-01T00:00:01Z"}],
                          "containerStatuses": [{"name": "app", "restartCount": 3, "ready": True}], **status}
    if ip is not None:
        st["podIP"] = ip
        st["podIPs"] = [{"ip": ip}]
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": rv,
                     "labels": labels or {"app": name}, "generation": 1,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "x"},
                     "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                     "creationTimestamp": "2026-01-01T00:00:00Z", "ownerReferences": [{"kind": "ReplicaSet"}]},
        "spec": {"nodeName": "node-a1", "serviceAccountName": "billing", "serviceAccount": "billing",
                 "restartPolicy": "Always", "volumes": [{"name": "v"}],
                 "containers": [{"name": "app", "image": "x:1", "env": [{"name": "A", "value": "b"}],
                                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": st,
    }


def api_cnp(name: str, ns: str = "payments", *, bad: bool = False, rv: str = "1", port: str = "8080") -> dict[str, Any]:
    rule: dict[str, Any] = {"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}
    if bad:
        rule["toPorts"][0]["rules"] = {"http": [{"method": "GET", "path": "/v1/(unclosed"}]}
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": rv, "generation": 2},
        "spec": {"endpointSelector": {"matchLabels": {"app": "billing"}}, "ingress": [rule]},
        "status": {"nodes": {"other-node": {"ok": True}}},
    }


# -- the projection -----------------------------------------------------------------------------


def test_pod_projection_keeps_what_the_parser_reads_and_nothing_else() -> None:
    raw = api_pod("billing-0", "10.1.0.5", {"app": "billing", "pod-template-hash": "abc"})
    d = project(PODS, raw, CLUSTER)
    assert d.key == "cluster-a/web/billing-0" and d.doc is not None
    assert d.ref == ObjectRef("Pod", "v1", "web", "billing-0", "uid-billing-0", "1")
    full = parse_pod({"apiVersion": "v1", "kind": "Pod", **raw}, default_cluster=CLUSTER)
    trimmed = parse_pod(d.doc, default_cluster=CLUSTER)
    # The same pod for every field l7gate uses; only the annotations differ (the marker is added,
    # kubectl's copy of the whole object dropped).
    assert {f: getattr(trimmed, f) for f in full.__slots__ if f != "annotations"} == \
        {f: getattr(full, f) for f in full.__slots__ if f != "annotations"}
    assert trimmed.named_ports == (("http", 8080, "TCP"),) and trimmed.ready and trimmed.service_account == "billing"
    ann = d.doc["metadata"]["annotations"]
    assert ann == {"team": "x", MARKER: "kubernetes", "l7gate.io/cluster": CLUSTER}
    # A status change that means nothing to l7gate projects onto the same document.
    later = copy.deepcopy(raw)
    later["metadata"]["resourceVersion"] = "9"
    later["status"]["containerStatuses"][0]["restartCount"] = 4
    later["status"]["conditions"][1]["lastProbeTime"] = "2026-01-01T00:10:00Z"
    assert project(PODS, later, CLUSTER).doc == d.doc
    # ...and one that does (readiness) does not.
    later["status"]["conditions"][1]["status"] = "False"
    unready = project(PODS, later, CLUSTER).doc
    assert unready is not None and not parse_pod(unready, default_cluster=CLUSTER).ready


@pytest.mark.parametrize("change", [
    {"ip": None},  # Pending: no address yet
    {"spec": {"hostNetwork": True}},  # the node's address and identity
    {"status": {"phase": "Succeeded"}},  # finished: its address may be another pod's already
    {"status": {"phase": "Failed"}},
])
def test_pods_l7gate_has_no_endpoint_for_are_absent(change: dict[str, Any]) -> None:
    raw = api_pod("job-1", change.get("ip", "10.1.0.9"))
    raw["spec"].update(change.get("spec", {}))
    raw["status"].update(change.get("status", {}))
    d = project(PODS, raw, CLUSTER)
    assert d.doc is None and d.key == "cluster-a/web/job-1"


def api_node(name: str, ip: str, labels: dict[str, str], *, rv: str = "1") -> dict[str, Any]:
    """A Node as the API server returns it: with the fields (and churn) l7gate ignores too."""
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": rv, "labels": labels,
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                     "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
        "spec": {"podCIDR": "10.244.1.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                   "conditions": [{"type": "Ready", "status": "True",
                                   "lastHeartbeatTime": "2026-01-01T00:00:00Z"}],
                   "images": [{"names": ["x:1"], "sizeBytes": 1}], "nodeInfo": {"kubeletVersion": "v1.33.0"}},
    }


def test_node_projection_keeps_labels_and_addresses_only() -> None:
    raw = api_node("worker-2", "192.0.2.2", {"role": "ingress"})
    d = project(NODES, raw, CLUSTER)
    assert d.key == "cluster-a/worker-2" and d.doc is not None
    assert d.ref == ObjectRef("Node", "v1", "", "worker-2", "uid-worker-2", "1")
    node = parse_node(d.doc, default_cluster="x")
    assert (node.cluster, node.name, dict(node.labels), node.addresses) == (
        CLUSTER, "worker-2", {"role": "ingress"}, ("192.0.2.2",))
    assert d.doc["metadata"]["annotations"] == {MARKER: "kubernetes", "l7gate.io/cluster": CLUSTER}
    # a heartbeat, another controller's annotation: the same document
    later = copy.deepcopy(raw)
    later["metadata"]["resourceVersion"] = "2"
    later["metadata"]["annotations"]["csi.volume.kubernetes.io/nodeid"] = "{}"
    later["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:10Z"
    assert project(NODES, later, CLUSTER).doc == d.doc
    # a label is a change
    later["metadata"]["labels"]["role"] = "worker"
    assert project(NODES, later, CLUSTER).doc != d.doc


def test_namespace_service_and_policy_projections() -> None:
    ns = project(NAMESPACES, {"metadata": {"name": "payments", "labels": {"team": "pay"}, "resourceVersion": "3"},
                              "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}, CLUSTER)
    assert ns.key == "cluster-a/payments" and ns.doc is not None
    # From this cluster's API: this cluster's namespace, not one for every cluster.
    assert parse_namespace(ns.doc, default_cluster="x").cluster == CLUSTER
    svc_raw = {"metadata": {"name": "billing", "namespace": "payments"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}],
                        "selector": {"app": "billing"}},
               "status": {"loadBalancer": {}}}
    svc = project(SERVICES, svc_raw, CLUSTER)
    assert svc.key == "cluster-a/payments/billing" and svc.doc is not None and "status" not in svc.doc
    assert parse_service(svc.doc, default_cluster="x").cluster_ip == "10.96.0.10"
    cnp = project(CNPS, api_cnp("allow"), CLUSTER)
    assert cnp.key == "CiliumNetworkPolicy/payments/allow" and cnp.doc is not None
    # Cilium's agents may write status: not l7gate's business, and not a change of the policy.
    assert "status" not in cnp.doc and from_api(cnp.doc)
    assert parse_policy(cnp.doc, cluster_name=CLUSTER).key == cnp.key
    ccnp = project(CCNPS, {"metadata": {"name": "deny"}, "spec": {"endpointSelector": {}}}, CLUSTER)
    assert ccnp.key == "CiliumClusterwideNetworkPolicy/deny" and ccnp.ref.namespace == ""
    assert parse_policy(ccnp.doc, cluster_name=CLUSTER).key == ccnp.key
    gone = project(CNPS, api_cnp("allow"), CLUSTER, deleted=True)
    assert gone.doc is None and gone.key == cnp.key


# -- a fake agent with the sink's contract --------------------------------------------------------


def key_of(doc: Mapping[str, Any]) -> tuple[str, str]:
    meta = doc["metadata"]
    r = BY_KIND[doc["kind"]]
    if r is NAMESPACES:
        return r.kind, f"{CLUSTER}/{meta['name']}"
    if r in (CNPS, CCNPS, CIDRGROUPS):
        return r.kind, f"{r.kind}/{meta['namespace']}/{meta['name']}" if r.namespaced else f"{r.kind}/{meta['name']}"
    return r.kind, f"{CLUSTER}/{meta['namespace']}/{meta['name']}"


class FakeSink:
    """All or nothing; an object is invalid when its spec says `invalid`; pods claim addresses."""

    def __init__(self) -> None:
        self.docs: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail_next = 0
        self.fail_publish = 0
        self._depth = 0

    def apply(self, docs: Sequence[Mapping[str, Any]]) -> list[str]:
        self.calls.append(("apply", [key_of(d)[1] for d in docs]))
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("the store is gone")
        errors = []
        ips: dict[str, str] = {}
        for k, d in self.docs.items():
            if k[0] == "Pod":
                ips[d["status"]["podIP"]] = k[1]
        for d in docs:
            kind, key = key_of(d)
            if "(unclosed" in repr(d.get("spec")):
                errors.append(f"{key}: spec.ingress[0].toPorts[0].rules.http[0].path: invalid regex")
            if kind == "Pod":
                owner = ips.get(d["status"]["podIP"])
                if owner not in (None, key):
                    errors.append(f"Pod {key}: IP {d['status']['podIP']} is already used by {owner}")
                ips[d["status"]["podIP"]] = key
        if errors:
            return errors
        for d in docs:
            self.docs[key_of(d)] = d
        return []

    def delete(self, kind: str, key: str) -> bool:
        self.calls.append(("delete", key))
        doc = self.docs.get((kind, key))
        if doc is None or not from_api(doc):
            return False
        del self.docs[(kind, key)]
        return True

    def owned(self, kind: str) -> set[str]:
        return {k for (kd, k), d in self.docs.items() if kd == kind and from_api(d)}

    def keys(self, kind: str) -> set[str]:
        return {k for (kd, k) in self.docs if kd == kind}

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Nests as the agent's does: only the outermost batch publishes (and may fail to)."""
        self.calls.append(("batch", None))
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.calls.append(("publish", None))
        if self.fail_publish and not self._depth:
            self.fail_publish -= 1
            raise OSError("Envoy's snapshot refused")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[ObjectRef, list[str]]] = []

    def refused(self, ref: ObjectRef, errors: Sequence[str]) -> None:
        self.seen.append((ref, list(errors)))


def listing(r: Resource, objs: list[dict[str, Any]]) -> Pending:
    p = Pending()
    p.listing(r, [project(r, o, CLUSTER) for o in objs])
    return p


def run(rec: Reconciler, p: Pending) -> None:
    left, failures = rec.run(p)
    assert not left and not failures, failures


def initial(objs: dict[Resource, list[dict[str, Any]]]) -> Pending:
    p = Pending()
    for r in RESOURCES:
        p.listing(r, [project(r, o, CLUSTER) for o in objs.get(r, [])])
    return p


# -- the reconciler -------------------------------------------------------------------------------


def test_initial_sync_is_one_apply_per_resource_in_order() -> None:
    sink, reports = FakeSink(), Recorder()
    rec = Reconciler(sink, reports)
    pods = [api_pod(f"p{i}", f"10.1.{i // 250}.{i % 250}") for i in range(1000)]
    run(rec, initial({
        NAMESPACES: [{"metadata": {"name": "web"}}],
        PODS: pods + [api_pod("pending", None)],
        SERVICES: [{"metadata": {"name": "s", "namespace": "web"}, "spec": {}}],
        CNPS: [api_cnp("a"), api_cnp("b")],
        CCNPS: [{"metadata": {"name": "c"}, "spec": {"endpointSelector": {}}}],
    }))
    applies = [keys for what, keys in sink.calls if what == "apply"]
    # 1,000 pods are one request, not 1,000; namespaces first, then the policies, pods last
    # (a pod is never enforced before the policies that select it)
    assert [len(a) for a in applies] == [1, 2, 1, 1, 1000]
    assert [a[0].split("/")[0] for a in applies] == ["cluster-a", "CiliumNetworkPolicy",
                                                     "CiliumClusterwideNetworkPolicy", "cluster-a", "cluster-a"]
    assert applies[0] == ["cluster-a/web"] and applies[3] == ["cluster-a/web/s"]
    assert "cluster-a/web/pending" not in sink.keys("Pod")
    assert rec.stats["Pod"].in_force == 1000 and rec.stats["Pod"].synced_at is not None
    assert not reports.seen


def test_relist_deletes_what_vanished_in_the_gap_reapplies_what_changed_and_spares_the_cli() -> None:
    sink, reports = FakeSink(), Recorder()
    rec = Reconciler(sink, reports)
    run(rec, listing(CNPS, [api_cnp("keep"), api_cnp("change"), api_cnp("vanish")]))
    # Applied by hand (`l7gate policy apply`): no marker.
    cli = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "by-hand", "namespace": "payments"}, "spec": {"endpointSelector": {}}}
    assert sink.apply([cli]) == []
    sink.calls.clear()
    # The watch missed events while it was away (410 Gone): a deletion, a change, a creation.
    run(rec, listing(CNPS, [api_cnp("keep"), api_cnp("change", port="9090", rv="7"), api_cnp("new")]))
    assert sink.keys("CiliumNetworkPolicy") == {f"CiliumNetworkPolicy/payments/{n}"
                                                for n in ("keep", "change", "new", "by-hand")}
    assert sink.docs[("CiliumNetworkPolicy", "CiliumNetworkPolicy/payments/change")]["spec"]["ingress"][0][
        "toPorts"][0]["ports"][0]["port"] == "9090"
    # The only deletion asked for is the vanished object: the CLI's is not ours to delete.
    assert [c for c in sink.calls if c[0] == "delete"] == [("delete", "CiliumNetworkPolicy/payments/vanish")]
    assert rec.stats["CiliumNetworkPolicy"].in_force == 3 and rec.stats["CiliumNetworkPolicy"].listings == 2


def test_the_first_listing_after_a_restart_removes_what_was_deleted_while_the_agent_was_down() -> None:
    sink = FakeSink()
    # What the agent restored from its store: two pods from the API of the last run, one by hand.
    for d in (project(PODS, api_pod("stays", "10.1.0.1"), CLUSTER), project(PODS, api_pod("gone", "10.1.0.2"), CLUSTER)):
        assert d.doc is not None and sink.apply([d.doc]) == []
    by_hand = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "manual", "namespace": "web"},
               "status": {"podIP": "10.1.0.3"}}
    assert sink.apply([by_hand]) == []
    rec = Reconciler(sink, Recorder())
    run(rec, listing(PODS, [api_pod("stays", "10.1.0.1")]))
    assert sink.keys("Pod") == {"cluster-a/web/stays", "cluster-a/web/manual"}


def test_an_address_freed_and_reused_in_one_relist_is_deleted_before_it_is_claimed() -> None:
    sink = FakeSink()
    rec = Reconciler(sink, Recorder())
    run(rec, listing(PODS, [api_pod("old", "10.1.0.7")]))
    run(rec, listing(PODS, [api_pod("new", "10.1.0.7")]))
    assert sink.keys("Pod") == {"cluster-a/web/new"}


def test_one_invalid_policy_is_refused_alone_in_a_few_applies_and_the_rest_apply() -> None:
    sink, reports = FakeSink(), Recorder()
    rec = Reconciler(sink, reports)
    run(rec, listing(CNPS, [api_cnp("bad", bad=True)]))  # never valid: never in force
    assert not sink.keys("CiliumNetworkPolicy") and len(reports.seen) == 1
    sink.calls.clear()
    objs = [api_cnp(f"p{i:03}") for i in range(64)]
    objs[37] = api_cnp("p037", bad=True)
    run(rec, listing(CNPS, objs))
    assert sink.keys("CiliumNetworkPolicy") == {f"CiliumNetworkPolicy/payments/p{i:03}" for i in range(64) if i != 37}
    applies = [c for c in sink.calls if c[0] == "apply"]
    # By halves: the whole, then two halves per level down to the one at fault.
    assert len(applies) <= 1 + 2 * math.ceil(math.log2(64))
    ref, errors = reports.seen[-1]
    assert (ref.kind, ref.namespace, ref.name, ref.uid) == ("CiliumNetworkPolicy", "payments", "p037", "uid-p037")
    assert errors == ["CiliumNetworkPolicy/payments/p037: spec.ingress[0].toPorts[0].rules.http[0].path: invalid regex"]
    assert set(rec.refusals["CiliumNetworkPolicy"]) == {"CiliumNetworkPolicy/payments/p037"}
    # "bad" is gone from the listing: its refusal with it.
    assert "CiliumNetworkPolicy/payments/bad" not in rec.refusals["CiliumNetworkPolicy"]


def test_an_invalid_revision_leaves_the_previous_one_in_force_until_fixed() -> None:
    sink, reports = FakeSink(), Recorder()
    rec = Reconciler(sink, reports)
    run(rec, listing(CNPS, [api_cnp("p", port="80")]))
    p = Pending()
    p.event(CNPS, project(CNPS, api_cnp("p", bad=True, rv="2"), CLUSTER))
    run(rec, p)
    key = "CiliumNetworkPolicy/payments/p"
    assert sink.docs[("CiliumNetworkPolicy", key)]["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] == "80"
    assert key in rec.refusals["CiliumNetworkPolicy"] and rec.stats["CiliumNetworkPolicy"].in_force == 1
    # A relist still sees the object: the previous revision is not deleted as a phantom.
    run(rec, listing(CNPS, [api_cnp("p", bad=True, rv="2")]))
    assert ("CiliumNetworkPolicy", key) in sink.docs
    p = Pending()
    p.event(CNPS, project(CNPS, api_cnp("p", port="81", rv="3"), CLUSTER))
    run(rec, p)
    assert sink.docs[("CiliumNetworkPolicy", key)]["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] == "81"
    assert not rec.refusals["CiliumNetworkPolicy"]


def test_events_are_merged_per_object_and_deletions_spare_the_cli() -> None:
    sink = FakeSink()
    rec = Reconciler(sink, Recorder())
    cli = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "manual", "namespace": "web"},
           "status": {"podIP": "10.1.0.3"}}
    assert sink.apply([cli]) == []
    sink.calls.clear()
    p = Pending()
    for i in range(10):
        p.event(PODS, project(PODS, api_pod("a", f"10.1.1.{i}", rv=str(i)), CLUSTER))
    p.event(PODS, project(PODS, api_pod("b", "10.1.2.1"), CLUSTER))
    p.event(PODS, project(PODS, api_pod("b", "10.1.2.1"), CLUSTER, deleted=True))
    p.event(PODS, project(PODS, api_pod("manual", "10.1.0.3"), CLUSTER, deleted=True))
    run(rec, p)
    # Twelve events, one apply: pod a at its last address; b created and deleted; the CLI's pod stays.
    assert [c for c in sink.calls if c[0] == "apply"] == [("apply", ["cluster-a/web/a"])]
    assert sink.docs[("Pod", "cluster-a/web/a")]["status"]["podIP"] == "10.1.1.9"
    assert sink.keys("Pod") == {"cluster-a/web/a", "cluster-a/web/manual"}


def test_a_listing_supersedes_earlier_events_and_absorbs_later_ones() -> None:
    p = Pending()
    p.event(CNPS, project(CNPS, api_cnp("before"), CLUSTER))
    p.listing(CNPS, [project(CNPS, api_cnp("listed"), CLUSTER)])
    p.event(CNPS, project(CNPS, api_cnp("after"), CLUSTER))
    p.event(CNPS, project(CNPS, api_cnp("listed"), CLUSTER, deleted=True))
    slot = p.slots[CNPS]
    assert slot.full is not None and not slot.delta
    assert {k: d.doc is not None for k, d in slot.full.items()} == {
        "CiliumNetworkPolicy/payments/listed": False, "CiliumNetworkPolicy/payments/after": True}
    later = Pending()
    later.event(CNPS, project(CNPS, api_cnp("later"), CLUSTER))
    later.listing(PODS, [])
    p.absorb(later)
    assert "CiliumNetworkPolicy/payments/later" in (p.slots[CNPS].full or {}) and p.listed(PODS)


def test_a_failing_sink_loses_nothing() -> None:
    sink = FakeSink()
    rec = Reconciler(sink, Recorder())
    sink.fail_next = 1
    left, failures = rec.run(initial({NAMESPACES: [{"metadata": {"name": "web"}}], CNPS: [api_cnp("a")]}))
    assert failures and "OSError" in failures[0] and left.listed(NAMESPACES)
    # What came after the failure folds in; the retry applies everything.
    later = Pending()
    later.event(CNPS, project(CNPS, api_cnp("b"), CLUSTER))
    left.absorb(later)
    run(rec, left)
    assert sink.keys("Namespace") == {"cluster-a/web"}
    assert sink.keys("CiliumNetworkPolicy") == {"CiliumNetworkPolicy/payments/a", "CiliumNetworkPolicy/payments/b"}


def test_one_run_is_one_publication_and_a_failed_publication_is_retried_whole() -> None:
    sink = FakeSink()
    rec = Reconciler(sink, Recorder())
    objs = {NAMESPACES: [{"metadata": {"name": "web"}}], PODS: [api_pod("a", "10.1.0.1")], CNPS: [api_cnp("a")]}
    run(rec, initial(objs))
    # Every resource's apply inside one batch: the agent publishes once, after the policies.
    assert [c[0] for c in sink.calls] == ["batch", "apply", "apply", "apply", "publish"]
    sink.calls.clear()
    sink.fail_publish = 1
    later = Pending()
    later.event(CNPS, project(CNPS, api_cnp("b"), CLUSTER))
    left, failures = rec.run(later)
    assert failures == ["publishing: OSError: Envoy's snapshot refused"]
    # Applied but not published: all of it comes back, and the retry publishes it.
    assert left.slots[CNPS].delta.keys() == later.slots[CNPS].delta.keys()
    run(rec, left)
    assert [c[0] for c in sink.calls] == ["batch", "apply", "publish", "batch", "apply", "publish"]
    assert sink.keys("CiliumNetworkPolicy") == {"CiliumNetworkPolicy/payments/a", "CiliumNetworkPolicy/payments/b"}


def test_random_event_streams_end_where_a_listing_of_the_final_state_ends() -> None:
    """Whatever the order events are merged in, the result is the API's final state: the same
    state a fresh agent reaches from one listing of it."""
    rng = random.Random(7)
    for _ in range(30):
        sink, fresh = FakeSink(), FakeSink()
        rec = Reconciler(sink, Recorder())
        state: dict[str, dict[str, Any]] = {}
        run(rec, listing(CNPS, []))
        for _batch in range(rng.randint(1, 6)):
            p = Pending()
            for _ev in range(rng.randint(1, 15)):
                name = f"p{rng.randint(0, 7)}"
                if rng.random() < 0.3:
                    state.pop(name, None)
                    p.event(CNPS, project(CNPS, api_cnp(name), CLUSTER, deleted=True))
                else:
                    state[name] = api_cnp(name, port=str(rng.randint(1, 3)))
                    p.event(CNPS, project(CNPS, state[name], CLUSTER))
            if rng.random() < 0.2:
                p.listing(CNPS, [project(CNPS, o, CLUSTER) for o in state.values()])
            run(rec, p)
        run(Reconciler(fresh, Recorder()), listing(CNPS, list(state.values())))
        assert sink.docs == fresh.docs


# -- the back-off ----------------------------------------------------------------------------------


def test_backoff_grows_is_bounded_jittered_and_resets() -> None:
    lo = Backoff(base=0.2, cap=30.0, rng=lambda: 0.0)
    hi = Backoff(base=0.2, cap=30.0, rng=lambda: 0.999999)
    lows = [lo.next() for _ in range(40)]
    highs = [hi.next() for _ in range(40)]
    assert lows[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8]) and highs[:3] == pytest.approx([0.2, 0.4, 0.8], rel=1e-5)
    # Never more than the cap, never less than half of it once there, however many failures.
    assert max(highs) <= 30.0 and min(lows[10:]) == pytest.approx(15.0)
    real = Backoff(base=1.0, cap=8.0, rng=random.Random(1).random)
    waits = [real.next() for _ in range(200)]
    assert len({round(w, 6) for w in waits[5:]}) > 100  # jittered: agents do not come back in step
    assert all(4.0 <= w <= 8.0 for w in waits[5:])
    lo.reset()
    assert lo.next() == pytest.approx(0.1)

