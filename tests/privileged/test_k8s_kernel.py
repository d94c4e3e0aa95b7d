"""`kubectl apply -f examples/seed/` enforced through the kernel datapath: the agents of a
cluster's two nodes (network namespaces, BPF on the pods' veths, one Envoy per node) watch the
cluster's API (the API-server DOUBLE: no kube-apiserver can run here) and enforce what the real
`kubectl` 1.37 applies, changes and deletes there. The double listens on node a1's address
inside a1's namespace, where node a2's agent reaches it over the link as a node reaches its
cluster's API server. No controller runs: the test stands in for the Deployment controller, the
scheduler and the kubelet, creating the pods the seed's Deployment asks for with the addresses
the testbed gave them (a kubelet reports a pod's IP through the status subresource)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from l7gate.client import AdminClient
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.testing.wait import eventually

from .test_kernel_datapath import BILLING_LABELS, FRONTEND_LABELS, SEED, AgentProc, stop_agents, url

pytestmark = [pytest.mark.privileged("netns, veth, bcc, tc"), pytest.mark.integration]

CLUSTER = "cluster-a"
ALLOW = "allow-frontend-to-billing-charge-api"


@dataclass
class World:
    tb: Testbed
    api: ApiServerDouble
    a1: AgentProc
    a2: AgentProc
    billing: Pod
    frontend: Pod
    other: Pod

    def kubectl(self, *args: str, input: str | None = None) -> str:
        r = self.api.kubectl(*args, input=input)
        assert r.returncode == 0, f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def verdicts(self) -> tuple[int, int, int]:
        """(POST /v1/charge, GET /v1/transactions) from the frontend, POST /v1/charge from the
        pod with other labels (0: dropped in the kernel)."""
        fe, bill = self.frontend, self.billing
        return (fe.curl(url(bill, 8080, "/v1/charge"), "POST", data='{"amount": 100}', timeout=2)[0],
                fe.curl(url(bill, 8080, "/v1/transactions"), "GET", timeout=2)[0],
                self.other.curl(url(bill, 8080, "/v1/charge"), "POST", timeout=2)[0])

    def wait_verdicts(self, want: tuple[int, int, int], what: str, timeout: float = 20) -> None:
        def now() -> bool:
            got = self.verdicts()
            assert got == want, got
            return True

        eventually(now, timeout, what)

    def policies_in_force(self, agent: AgentProc) -> dict[str, str]:
        """The policies `l7gate policy list` shows, by key, with their rules."""
        return {p["key"]: json.dumps(p["object"].get("spec"), sort_keys=True)
                for p in agent.client.get("/v1/policy")["policies"]}


def kube_agent(tb: Testbed, node: Node, kubeconfig: Path) -> AgentProc:
    work = tb.workdir / f"agent-{node.name}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": node.name,
        "cluster": {"name": CLUSTER, "id": 1},
        "stateDir": str(work / "state"),
        "admin": {"listen": f"unix:{work}/admin.sock"},
        "envoy": {"logLevel": "warning"},
        "datapath": {"mode": "kernel", "pinDir": f"/sys/fs/bpf/l7g/{node.netns}", "links": node.link_ifnames},
        "kubernetes": {"enabled": True, "kubeconfig": str(kubeconfig)},
    }))
    return AgentProc(node, work, cfg, AdminClient(f"unix:{work}/admin.sock"))


def kubelet_reports(api: ApiServerDouble, pod: Pod) -> None:
    """Create `pod` in the API as scheduled to its node, with the address the testbed gave it."""
    manifest = pod.manifest()
    manifest["metadata"]["labels"]["pod-template-hash"] = "7d9f8c6b5"
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    api.create(manifest, with_status=True)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        n1 = tb.add_node("a1", cluster=CLUSTER, node_cidr="10.63.1.0/24")
        n2 = tb.add_node("a2", cluster=CLUSTER, node_cidr="10.63.2.0/24")
        tb.link(n1, n2)
        billing = tb.add_pod(n1, "payments", "billing-service-xyz", labels=BILLING_LABELS, ports=[8080])
        frontend = tb.add_pod(n2, "web", "frontend-service-abc", labels=FRONTEND_LABELS)
        other = tb.add_pod(n2, "web", "reporting-job-q7x", labels={"app": "reporting-job", "team": "web", "env": "prod"})
        billing.serve_http(8080)
        billing.serve_http(9090)
        with ApiServerDouble(host=n1.ip, netns=n1.netns, bookmark_interval=2.0) as api:
            kubeconfig = api.kubeconfig(tb.workdir / "kubeconfig")
            a1, a2 = kube_agent(tb, n1, kubeconfig), kube_agent(tb, n2, kubeconfig)
            w = World(tb, api, a1, a2, billing, frontend, other)
            try:
                for agent in (a1, a2):
                    agent.start(tb)
                # the article's files, as its reader applies them (validation on, the default)
                out = w.kubectl("apply", "-f", str(SEED))
                assert "ciliumclusterwidenetworkpolicy.cilium.io/" + ALLOW + " created" in out, out
                for pod in (billing, frontend, other):
                    kubelet_reports(api, pod)
                for agent in (a1, a2):
                    eventually(lambda: agent.status()["kubernetes"]["synced"], 30,
                               f"the agent on {agent.node.name} to sync with the API")
                    agent.synced()
                yield w
            finally:
                stop_agents(a1, a2)


def test_kubectl_apply_of_the_seed_is_enforced_in_the_kernel_and_envoy(world: World) -> None:
    world.wait_verdicts((200, 403, 0), "the seed's verdicts: 200, 403 at L7, a drop in the kernel")
    assert world.frontend.curl(url(world.billing, 9090, "/v1/charge"), "POST", timeout=2)[0] == 0
    for agent in (world.a1, world.a2):
        st = agent.status()["kubernetes"]
        assert st["connection"] == "connected" and st["synced"] and not st["refused"], st
        assert st["resources"]["ciliumclusterwidenetworkpolicies"]["in_force"] == 2, st
        assert st["resources"]["pods"]["in_force"] == 3, st
    # `kubectl get` by the short names the CRDs declare
    out = world.kubectl("get", "ccnp")
    assert ALLOW in out and "default-deny-all-pods" in out


def test_kubectl_apply_of_a_changed_rule_then_delete_then_reapply(world: World, tmp_path: Path) -> None:
    allow = yaml.safe_load((SEED / "allow-frontend-to-billing.yaml").read_text())
    changed = json.loads(json.dumps(allow))
    changed["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0] = {"method": "GET", "path": "/v1/transactions"}
    f = tmp_path / "allow.yaml"
    f.write_text(yaml.safe_dump(changed))
    try:
        assert "configured" in world.kubectl("apply", "-f", str(f))
        world.wait_verdicts((403, 200, 0), "the changed rule's verdicts")
        world.kubectl("delete", "-f", str(f))
        # lifted, and with it billing's default deny: the seed's default-deny-all-pods has
        # `ingress: []`, which puts no endpoint in default deny (as in Cilium; `policy validate`
        # warns), so billing is selected by no rule that restricts it and every request passes
        world.wait_verdicts((200, 200, 200), "the deleted rule to be lifted")
        assert not any(ALLOW in key for key in world.policies_in_force(world.a1))
    finally:
        world.kubectl("apply", "-f", str(SEED / "allow-frontend-to-billing.yaml"))
    world.wait_verdicts((200, 403, 0), "the seed's verdicts again")


def test_an_invalid_policy_is_refused_and_changes_nothing(world: World, tmp_path: Path) -> None:
    allow = yaml.safe_load((SEED / "allow-frontend-to-billing.yaml").read_text())
    before = world.policies_in_force(world.a1)
    # refused by the CRD's schema (deploy/crds: the shape of spec): kubectl names the field
    bad = json.loads(json.dumps(allow))
    bad["spec"]["enableDefaultDeny"] = {"ingress": "yes"}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    r = world.api.kubectl("apply", "-f", str(f))
    assert r.returncode == 1 and "spec.enableDefaultDeny.ingress" in r.stderr, r.stderr
    # accepted by the schema, refused by the agent (an invalid RE2 path): reported on the object
    # as an Event naming the field, and the rule in force is the one before
    bad = json.loads(json.dumps(allow))
    bad["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"] = "/v1/(charge"
    f.write_text(yaml.safe_dump(bad))
    try:
        assert "configured" in world.kubectl("apply", "-f", str(f))

        def refused() -> str:
            st = world.a1.status()["kubernetes"]
            assert st["refused"], st
            errors = " ".join(e for r in st["refused"] for e in r["errors"])
            assert "rules.http[0].path" in errors, st["refused"]
            return errors

        eventually(refused, 20, "the agent to refuse the invalid rule")
        events = json.loads(world.kubectl("get", "events", "-A", "-o", "json",
                                          "--field-selector", f"involvedObject.name={ALLOW}"))["items"]
        assert {e["reason"] for e in events} == {"PolicyInvalid"}, events
        assert all("rules.http[0].path" in e["message"] for e in events), events
        assert world.policies_in_force(world.a1) == before
        assert world.verdicts() == (200, 403, 0)
    finally:
        world.kubectl("apply", "-f", str(SEED / "allow-frontend-to-billing.yaml"))
    eventually(lambda: not world.a1.status()["kubernetes"]["refused"], 20, "the refusal to clear")
    world.wait_verdicts((200, 403, 0), "the seed's verdicts again")


def test_relabelling_a_pod_through_the_api_changes_its_identity_and_verdicts(world: World) -> None:
    ident = world.a1.client.get("/v1/identities")
    assert ident  # the endpoint's identity is shown
    world.kubectl("label", "pod", "-n", "web", "frontend-service-abc", "app=reporting-job", "--overwrite")
    try:
        world.wait_verdicts((0, 0, 0), "the relabelled frontend to be dropped like the other pod")
    finally:
        world.kubectl("label", "pod", "-n", "web", "frontend-service-abc", "app=frontend-service", "--overwrite")
    world.wait_verdicts((200, 403, 0), "the frontend's verdicts again")
    # a pod deleted through the API: its identity goes, and the kernel drops what it sends
    world.kubectl("delete", "pod", "-n", "web", "reporting-job-q7x", "--wait=false")
    eventually(lambda: "reporting-job-q7x" not in json.dumps(world.a2.client.get("/v1/endpoints")), 20,
               "the deleted pod's endpoint to go")
    assert world.other.curl(url(world.billing, 8080, "/v1/charge"), "POST", timeout=2)[0] == 0
    kubelet_reports(world.api, world.other)
    eventually(lambda: "reporting-job-q7x" in json.dumps(world.a2.client.get("/v1/endpoints")), 20,
               "the re-created pod's endpoint")
    world.wait_verdicts((200, 403, 0), "the seed's verdicts with the pod back")


def test_kubectl_apply_of_network_policies_is_enforced_in_the_kernel(world: World, tmp_path: Path) -> None:
    """Kubernetes NetworkPolicies beside the seed's CCNPs, L3/L4 in the kernel: an ingress allow
    on billing's port 9090 (not proxied) for the reporting job, then an egress default-deny on
    the reporting job's own node."""
    other, billing, frontend = world.other, world.billing, world.frontend

    def to_9090(src: Pod) -> int:
        return src.curl(url(billing, 9090, "/reports"), "GET", timeout=2)[0]

    assert to_9090(other) == 0 and to_9090(frontend) == 0  # billing is in default deny (the CCNP)
    ingress = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "billing-reports", "namespace": "payments"},
        "spec": {"podSelector": {"matchLabels": {"app": "billing-service"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}},
                                        "podSelector": {"matchLabels": {"app": "reporting-job"}}}],
                              "ports": [{"port": 9090}]}]},
    }
    egress_deny = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "reports-no-egress", "namespace": "web"},
        "spec": {"podSelector": {"matchLabels": {"app": "reporting-job"}}, "policyTypes": ["Egress"]},
    }
    f_in, f_out = tmp_path / "ingress.yaml", tmp_path / "egress.yaml"
    f_in.write_text(yaml.safe_dump(ingress))
    f_out.write_text(yaml.safe_dump(egress_deny))
    try:
        assert "networkpolicy.networking.k8s.io/billing-reports created" in world.kubectl("apply", "-f", str(f_in))
        eventually(lambda: to_9090(other) == 200, 20, "the reporting job let in on 9090 (kernel, no proxy)")
        assert to_9090(frontend) == 0  # not a peer of the NetworkPolicy
        world.wait_verdicts((200, 403, 0), "the seed's verdicts unchanged beside it")
        assert "networkpolicy.networking.k8s.io/reports-no-egress created" in world.kubectl("apply", "-f", str(f_out))
        eventually(lambda: to_9090(other) == 0, 20, "the reporting job's egress dropped on its own node")
        for agent in (world.a1, world.a2):
            st = agent.status()["kubernetes"]
            assert st["resources"]["networkpolicies"]["in_force"] == 2 and not st["refused"], st
    finally:
        world.kubectl("delete", "-f", str(f_out), "--ignore-not-found")
        world.kubectl("delete", "-f", str(f_in), "--ignore-not-found")
    eventually(lambda: to_9090(other) == 0 and not any(
        k.startswith("NetworkPolicy/") for k in world.policies_in_force(world.a1)), 20, "both lifted")
    world.wait_verdicts((200, 403, 0), "the seed's verdicts again")
