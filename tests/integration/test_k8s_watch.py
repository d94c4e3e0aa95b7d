"""The agent watching the Kubernetes API (the API-server DOUBLE: no kube-apiserver runs here),
enforcing what it finds with a real Envoy in loopback mode: policies and pods created, changed
and deleted in the API change verdicts; an invalid policy is refused with its field path and an
Event on it; a cut watch, "410 Gone" and the API server down for 10 s, under a continuous
probe, leave no missed and no phantom policy, and no wrong verdict meanwhile."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings, KubernetesSettings
from l7gate.agent.daemon import start_agent
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.wait import eventually

from .loopback import OFFSET, SEED, World, request, wait_request

pytestmark = pytest.mark.integration

S = 57  # this module's 127.57.x.x addresses
BILLING = f"127.{S}.1.10"
BILLING2 = f"127.{S}.1.11"
FRONTEND = f"127.{S}.2.55"
OTHER = f"127.{S}.2.60"
NODE = "node-a1"
BILLING_LABELS = {"app": "billing-service", "team": "payments", "env": "prod"}
FRONTEND_LABELS = {"app": "frontend-service", "team": "web", "env": "prod"}
ALLOW = "allow-frontend-to-billing-charge-api"


def api_pod(name: str, ns: str, ip: str, labels: dict[str, str], ports: tuple[int, ...] = (),
            node: str = NODE) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1",
                                                   "ports": [{"containerPort": p} for p in ports]}]},
        # written through the status subresource, as a kubelet does (`with_status`)
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def seed(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((SEED / name).read_text())
    return doc


def allow_get(name: str, path: str) -> dict[str, Any]:
    """A policy the continuous probe does not look at: it allows one more path to billing."""
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "payments"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "billing-service"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend-service",
                                                                     "k8s:io.kubernetes.pod.namespace": "web"}}],
                                  "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                               "rules": {"http": [{"method": "GET", "path": path}]}}]}]}}


@dataclasses.dataclass
class KubeWorld:
    api: ApiServerDouble
    world: World

    @property
    def agent(self) -> Any:
        return self.world.agent

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = views.status(self.agent)["kubernetes"]
        return st

    def cnps(self) -> set[str]:
        return set(self.agent.core.documents("CiliumNetworkPolicy"))


@pytest.fixture(scope="module")
def kw(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[KubeWorld]:
    tmp = tmp_path_factory.mktemp("l7g-k8s")
    with ApiServerDouble(bookmark_interval=1.0) as api:
        kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        for ns in ("payments", "web"):
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        api.create(api_pod("billing-service-xyz", "payments", BILLING, BILLING_LABELS, (8080,)), with_status=True)
        api.create(api_pod("billing-service-k2m4p", "payments", BILLING2, BILLING_LABELS, (8080,)), with_status=True)
        api.create(api_pod("frontend-service-abc", "web", FRONTEND, FRONTEND_LABELS), with_status=True)
        api.create(api_pod("reporting-job-q7x", "web", OTHER, {"app": "reporting-job", "team": "web", "env": "prod"}),
                   with_status=True)
        api.create(api_pod("pending-job", "web", "", {"app": "x"}))  # no address yet: no endpoint
        api.create(seed("default-deny-all.yaml"))
        api.create(seed("allow-frontend-to-billing.yaml"))
        cfg = AgentConfig(
            node=NODE, cluster_name="cluster-a", cluster_id=1, clusters={"cluster-b": 2},
            state_dir=str(tmp / "state"), admin_listen=f"unix:{tmp}/admin.sock", xds_listen=f"unix:{tmp}/xds.sock",
            envoy=EnvoySettings(log_level="warning"), upstream_port_offset=OFFSET,
            kubernetes=KubernetesSettings(enabled=True, kubeconfig=str(kubeconfig), watch_timeout=30),
        )
        agent = start_agent(cfg)
        world = World(agent, tmp)
        try:
            assert agent.envoy is not None
            agent.envoy.wait_ready(30)
            for i, ip in enumerate((BILLING, BILLING2)):
                world.serve(ip, 8080, f"billing-{i}")
            assert agent.kube is not None and agent.kube.wait_ready(20), agent.kube.problems()
            world.synced()
            world.wait_listening(BILLING, 8080)
            yield KubeWorld(api, world)
        finally:
            for srv in world.servers:
                srv.shutdown()
                srv.server_close()
            agent.stop()


def test_objects_from_the_api_are_enforced(kw: KubeWorld) -> None:
    for dst in (BILLING, BILLING2):
        assert wait_request(FRONTEND, dst, "POST", "/v1/charge", 200) == 200
        assert request(FRONTEND, dst, 8080, "GET", "/v1/transactions").status == 403
        assert request(OTHER, dst, 8080, "POST", "/v1/charge").status == 403
    st = kw.status()
    assert st["synced"] and st["connection"] == "connected" and st["server"] == kw.api.url
    assert st["resources"]["pods"]["in_force"] == 4  # the pending pod is not an endpoint yet
    assert st["resources"]["ciliumclusterwidenetworkpolicies"]["in_force"] == 2
    assert st["resources"]["namespaces"]["in_force"] >= 6 and not st["refused"]
    assert kw.agent.watch.problems() == []  # /healthz: ready
    # Every document the watch applied says where it came from (the ownership rule).
    doc = kw.agent.core.document("CiliumClusterwideNetworkPolicy", f"CiliumClusterwideNetworkPolicy/{ALLOW}")
    assert doc["metadata"]["annotations"]["l7gate.io/source"] == "kubernetes"


def test_a_changed_rule_gives_the_new_verdict_and_a_deleted_policy_is_lifted(kw: KubeWorld) -> None:
    api = kw.api
    changed = copy.deepcopy(seed("allow-frontend-to-billing.yaml"))
    changed["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"].append({"method": "GET", "path": "/v1/transactions"})
    current = api.get("ccnp", ALLOW)
    assert current is not None
    changed["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    api.update(changed)
    assert wait_request(FRONTEND, BILLING, "GET", "/v1/transactions", 200) == 200
    api.delete("ccnp", ALLOW)
    # Lifted: nothing is enforced on billing any more (the seed's "default deny", `ingress: []`,
    # denies nothing, as in Cilium: it was the allow that put billing's ingress under policy).
    assert wait_request(OTHER, BILLING, "GET", "/v1/anything", 200) == 200
    api.create(seed("allow-frontend-to-billing.yaml"))
    assert wait_request(OTHER, BILLING, "GET", "/v1/anything", 403) == 403
    assert wait_request(FRONTEND, BILLING, "POST", "/v1/charge", 200) == 200
    assert request(FRONTEND, BILLING, 8080, "GET", "/v1/transactions").status == 403


def test_an_invalid_policy_is_refused_with_its_field_path_and_an_event_and_changes_nothing(kw: KubeWorld) -> None:
    api, core = kw.api, kw.agent.core
    revision = core.view().policy_revision
    bad = allow_get("bad-regex", "/v1/(unclosed")
    api.create(bad)  # the CRD's schema is shallow: the API server takes it

    def event_for(ns: str, name: str) -> dict[str, Any] | None:
        for ev in api.objects("events", namespace=ns):
            if ev["involvedObject"]["name"] == name and ev["reason"] == "PolicyInvalid":
                return ev
        return None

    ev = eventually(lambda: event_for("payments", "bad-regex"), 10, "an Event on the refused policy")
    assert ev["type"] == "Warning" and ev["involvedObject"]["kind"] == "CiliumNetworkPolicy"
    assert ev["involvedObject"]["uid"] == api.get("cnp", "bad-regex", namespace="payments")["metadata"]["uid"]
    assert "spec.ingress[0].toPorts[0].rules.http[0].path" in ev["message"] and NODE in ev["message"]
    assert "CiliumNetworkPolicy/payments/bad-regex" not in kw.cnps()
    assert core.view().policy_revision == revision
    refused = kw.status()["refused"]
    assert [r["object"] for r in refused] == ["CiliumNetworkPolicy payments/bad-regex"]
    assert "spec.ingress[0].toPorts[0].rules.http[0].path" in refused[0]["errors"][0]
    # An invalid revision of a policy in force: refused, the previous revision stays in force.
    current = api.get("ccnp", ALLOW)
    assert current is not None
    broken = copy.deepcopy(current)
    broken["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["method"] = "GET("
    api.update(broken)
    ev = eventually(lambda: event_for("default", ALLOW), 10, "an Event on the cluster-wide policy (in default)")
    assert ev["involvedObject"]["resourceVersion"] == api.get("ccnp", ALLOW)["metadata"]["resourceVersion"]
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
    assert request(FRONTEND, BILLING, 8080, "GET", "/v1/charge").status == 403
    assert core.view().policy_revision == revision
    # Fixed: in force, and off the refused list.
    api.delete("cnp", "bad-regex", namespace="payments")
    fixed = copy.deepcopy(seed("allow-frontend-to-billing.yaml"))
    fixed["metadata"]["resourceVersion"] = api.get("ccnp", ALLOW)["metadata"]["resourceVersion"]
    api.update(fixed)
    eventually(lambda: not kw.status()["refused"], 10, "no refusal left")
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200


def test_pods_created_relabelled_and_deleted_change_identities(kw: KubeWorld) -> None:
    api, core = kw.api, kw.agent.core
    new = f"127.{S}.2.56"
    assert request(new, BILLING, 8080, "POST", "/v1/charge").status == 403  # unknown: world
    api.create(api_pod("frontend-service-new", "web", new, FRONTEND_LABELS), with_status=True)
    assert wait_request(new, BILLING, "POST", "/v1/charge", 200) == 200
    ref = "cluster-a/web/frontend-service-new"
    frontend_id = core.view().pods[ref].identity
    assert core.view().pods["cluster-a/web/frontend-service-abc"].identity == frontend_id
    api.patch("pods", "frontend-service-new", {"metadata": {"labels": {"app": "impostor"}}}, namespace="web")
    assert wait_request(new, BILLING, "POST", "/v1/charge", 403) == 403
    assert core.view().pods[ref].identity != frontend_id
    api.patch("pods", "frontend-service-new", {"metadata": {"labels": {"app": "frontend-service"}}}, namespace="web")
    assert wait_request(new, BILLING, "POST", "/v1/charge", 200) == 200
    assert core.view().pods[ref].identity == frontend_id
    api.delete("pods", "frontend-service-new", namespace="web")
    assert wait_request(new, BILLING, "POST", "/v1/charge", 403) == 403
    assert ref not in core.view().pods
    # A namespace's labels are part of its pods' identities.
    api.patch("namespaces", "web", {"metadata": {"labels": {"zone": "dmz"}}})
    eventually(lambda: core.view().pods["cluster-a/web/frontend-service-abc"].labels.get(
        "io.cilium.k8s.namespace.labels.zone") == "dmz", 10, "the namespace's label on the pod's identity")
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200


class Probe:
    """Requests without pause whose verdicts must never change: every answer that is not the
    expected one is kept."""

    CASES = ((FRONTEND, "POST", "/v1/charge", 200), (FRONTEND, "GET", "/v1/transactions", 403),
             (OTHER, "POST", "/v1/charge", 403))

    def __init__(self) -> None:
        self.wrong: list[tuple[float, str, str, str, int]] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Paced: a fresh connection per request, and a source address has only so many ports
        # (each stays in TIME_WAIT for a minute after the connection closes).
        while not self._stop.wait(0.02):
            for src, method, path, want in self.CASES:
                for dst in (BILLING, BILLING2):
                    got = request(src, dst, 8080, method, path).status
                    self.count += 1
                    if got != want:
                        self.wrong.append((time.monotonic(), src, method, path, got))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def in_force_after(kw: KubeWorld, present: str, absent: str, timeout: float) -> None:
    """`present` is enforced (its path answers 200) and `absent` is not (403, no phantom)."""
    wait_request(FRONTEND, BILLING, "GET", f"/v1/{present}", 200, timeout=timeout)
    wait_request(FRONTEND, BILLING, "GET", f"/v1/{absent}", 403, timeout=5)
    # And what the agent holds from the API is exactly what the API has.
    want = {f"CiliumNetworkPolicy/payments/{o['metadata']['name']}" for o in kw.api.objects("cnp")}
    assert kw.cnps() == want


def test_cut_watch_410_gone_and_api_down_10s_under_a_continuous_probe(kw: KubeWorld) -> None:
    api = kw.api
    for name in ("temp-a", "temp-b", "temp-c"):
        api.create(allow_get(name, f"/v1/{name}"))
    in_force_after(kw, "temp-c", "extra-a", 10)
    cnp = lambda: kw.status()["resources"]["ciliumnetworkpolicies"]  # noqa: E731
    with Probe() as probe:
        # 1. Every watch cut mid-stream: resumed from the last version, no listing; the changes
        #    made meanwhile arrive as events.
        before = cnp()
        api.cut_watches()
        api.delete("cnp", "temp-a", namespace="payments")
        api.create(allow_get("extra-a", "/v1/extra-a"))
        in_force_after(kw, "extra-a", "temp-a", 15)
        after = cnp()
        assert after["relists"] == before["relists"] and after["reconnects"] > before["reconnects"]

        # 2. "410 Gone": the API server goes away, changes happen and its history is compacted
        #    before the watch can resume; the listing that follows deletes what vanished in the gap.
        api.stop()
        api.delete("cnp", "temp-b", namespace="payments")
        api.create(allow_get("extra-b", "/v1/extra-b"))
        api.compact()
        api.start()
        in_force_after(kw, "extra-b", "temp-b", 20)
        assert cnp()["relists"] > after["relists"]

        # 3. The API server down for 10 s: the agent goes on enforcing, stays ready, says it is
        #    disconnected, and catches up when the server is back.
        outage = api.outage(10)
        api.delete("cnp", "temp-c", namespace="payments")
        api.create(allow_get("extra-c", "/v1/extra-c"))
        eventually(lambda: kw.status()["connection"] == "disconnected", 5, "the status to say disconnected")
        assert kw.agent.watch.problems() == []  # still ready: enforcing the last state
        assert request(FRONTEND, BILLING, 8080, "GET", "/v1/temp-c").status == 200  # nothing changes meanwhile
        outage.join(15)
        in_force_after(kw, "extra-c", "temp-c", 40)
        eventually(lambda: kw.status()["connection"] == "connected", 40, "the watches to be open again")
    assert probe.count > 100, probe.count
    assert probe.wrong == [], probe.wrong[:10]
    # Pods too: exactly the API's, after all of it.
    want_pods = {f"cluster-a/{p['metadata']['namespace']}/{p['metadata']['name']}"
                 for p in api.objects("pods") if (p.get("status") or {}).get("podIP")}
    assert set(kw.agent.core.documents("Pod")) == want_pods
