#!/usr/bin/env python3
"""The seed scenario through the real sidecarless path (root only).

Two nodes in network namespaces, one per cluster, each with its own l7gate agent, Envoy and
BPF datapath: billing-service x2 on node a1 (cluster-a), frontend-service and a pod with other
labels on node b1 (cluster-b). The two clusters are joined by Cluster Mesh, as in the article:
one etcd per cluster (inside its node's namespace). Each cluster has its own Kubernetes API (the
API-server DOUBLE, l7gate.testing.apiserver_double: no kube-apiserver can run here), inside its
node's namespace, and the seed's files are applied to it with the real `kubectl apply`, as the
article's reader does; the agent watches its cluster's API and merges the other cluster's pods
from that cluster's etcd. No controller runs: the demo creates the pods the Deployments ask for,
scheduled, with the addresses the testbed gave them (as a kubelet reports them). The frontend runs `curl` as
in the article, by the Service's name: billing-service is a global Service, and cluster-b's
socket load balancer sends each connection straight to one of cluster-a's billing pods (the
names resolve through a hosts file per pod namespace, the testbed's stand-in for cluster DNS). Everything is created under l7g-prefixed names and removed at the end, even on
failure.
Then the article's `authentication: {mode: required}` on the allow rule: the frontend's calls
go Envoy to Envoy over mTLS (a capture on the inter-node link shows no plaintext).
Exits non-zero if any request gets a result other than the article's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from l7gate.client import AdminClient
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.etcd import NodeEtcd
from l7gate.testing.testbed import Testbed

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed"
L7GATE = str(Path(sys.executable).parent / "l7gate")


def seed_policies() -> list[Any]:
    docs: list[Any] = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((SEED / name).read_text()))
    return docs


# What each cluster's reader applies: cluster-a the seed folder (the namespaces, the policies,
# billing-service's Service and Deployment); cluster-b the namespaces, the policies, and its own
# copy of the global Service.
APPLY = {
    "cluster-a": [SEED],
    "cluster-b": [SEED / "00-namespaces.yaml", SEED / "default-deny-all.yaml",
                  SEED / "allow-frontend-to-billing.yaml", SEED / "cluster-b"],
}


def kubectl(api: ApiServerDouble, *args: str) -> int:
    """Run the real kubectl against a cluster's API, show what it printed, return its exit code."""
    shown = " ".join(str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in args)
    print(f"   $ kubectl {shown}")
    r = api.kubectl(*args)
    for line in (r.stdout + r.stderr).splitlines():
        print(f"     {line}")
    return r.returncode


def kubelet_reports(api: ApiServerDouble, pod: Any) -> None:
    """Create `pod` in its cluster's API as scheduled to its node, with its testbed address."""
    manifest = pod.manifest()
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    api.create(manifest, with_status=True)


def seed_service(path: Path) -> dict[str, Any]:
    """The Service object of a seed file (the file may hold other kinds too)."""
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "Service")


ENGINE = os.environ.get("L7G_ENGINE", "envoy")  # the L7 proxy: envoy, or h11 (`make demo ENGINE=h11`)


def main() -> int:
    failed = 0
    with Testbed() as tb:
        # Each node's pods run in a cgroup of their own, where its agent attaches the socket
        # load balancer (datapath.cgroup).
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.71.1.0/24", cgroup=True)
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.71.2.0/24", cgroup=True)
        tb.link(na, nb)
        billing = [
            tb.add_pod(na, "payments", name, labels={"app": "billing-service", "team": "payments", "env": "prod"},
                       ports=[8080])
            for name in ("billing-service-xyz", "billing-service-k2m4p")
        ]
        fe = tb.add_pod(nb, "web", "frontend-service-abc", labels={"app": "frontend-service", "team": "web", "env": "prod"})
        other = tb.add_pod(nb, "web", "reporting-job-q7x", labels={"app": "reporting-job", "team": "web", "env": "prod"})
        for b in billing:
            b.serve_http(8080)
        # The seed's billing-service in each cluster (cluster-b's: examples/seed/cluster-b/).
        for cluster, path in (("cluster-a", SEED / "billing-service.yaml"),
                              ("cluster-b", SEED / "cluster-b" / "billing-service.yaml")):
            svc = seed_service(path)
            meta, spec = svc["metadata"], svc["spec"]
            tb.add_service(meta["namespace"], meta["name"], spec["clusterIP"], spec["ports"], spec.get("selector"),
                           cluster=cluster, annotations=meta.get("annotations"))
        etcd_binary = shutil.which("etcd")
        if etcd_binary is None:
            print("etcd is not installed: run `make install` (scripts/install.sh installs etcd-server)")
            return 1
        etcds = {"cluster-a": NodeEtcd(na, etcd_binary, tb.workdir / "etcd-a").start(),
                 "cluster-b": NodeEtcd(nb, etcd_binary, tb.workdir / "etcd-b").start()}
        print(f"== cluster mesh: cluster-a's etcd at {etcds['cluster-a'].endpoint}, "
              f"cluster-b's at {etcds['cluster-b'].endpoint}")
        agents = []
        apis: dict[str, ApiServerDouble] = {}
        try:
            for node, cluster, cid, peer in ((na, "cluster-a", 1, "cluster-b"), (nb, "cluster-b", 2, "cluster-a")):
                work = tb.workdir / f"agent-{node.name}"
                work.mkdir()
                api = apis[cluster] = ApiServerDouble(netns=node.netns).start()
                print(f"\n== {cluster}: the Kubernetes API (the API-server double) at {api.url} in node "
                      f"{node.name}'s namespace; kubectl apply, as in the article")
                for path in APPLY[cluster]:
                    failed |= kubectl(api, "apply", "-f", str(path))
                pods = [p for p in tb.pods.values() if p.cluster == cluster]
                print(f"   (the demo creates the pods the Deployments ask for, as scheduled: "
                      f"{', '.join(p.ref for p in pods)})")
                for pod in pods:
                    kubelet_reports(api, pod)
                (work / "mesh").mkdir()
                # One file per remote cluster, as Cilium's clustermesh configuration.
                (work / "mesh" / peer).write_text(yaml.safe_dump({"endpoints": [etcds[peer].endpoint]}))
                cfg = work / "agent.yaml"
                cfg.write_text(yaml.safe_dump({
                    "node": node.name, "cluster": {"name": cluster, "id": cid},
                    "stateDir": str(work / "state"), "admin": {"listen": f"unix:{work}/admin.sock"},
                    "envoy": {"logLevel": "warning"},
                    "datapath": {"mode": "kernel", "pinDir": f"/sys/fs/bpf/l7g/{node.netns}", "links": node.link_ifnames,
                                 "cgroup": str(node.cgroup)},
                    "mtls": {"enabled": True, "caDir": str(tb.workdir / "shared-ca"), "listen": f"{node.ip}:4250",
                             # The tunnel runs in Envoy: with the h11 engine, mutual auth without it.
                             "encryption": "tunnel" if ENGINE == "envoy" else "none"},
                    "proxy": {"engine": ENGINE},
                    "clustermesh": {"etcd": {"endpoints": [etcds[cluster].endpoint]}, "configDir": str(work / "mesh"),
                                    "nodeAddress": node.ip},
                    "kubernetes": {"enabled": True, "kubeconfig": str(api.kubeconfig(work / "kubeconfig"))},
                }))
                print(f"== node {node.name} ({cluster}): l7gate agent --config {cfg}")
                proc = node.spawn([L7GATE, "agent", "--config", str(cfg)], net_only=True)
                client = AdminClient(f"unix:{work}/admin.sock")
                agents.append((node, proc, client, work))
                deadline = time.monotonic() + 30
                while True:
                    try:
                        st = client.get("/v1/status")
                        if ((st["envoy"] or {}).get("state") == "LIVE" if ENGINE == "envoy"
                                else st["proxy"].get("state") == "LIVE"):
                            break
                    except OSError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        print(tb.log_path(proc).read_text()[-3000:])
                        return 1
                    time.sleep(0.1)
                while not client.get("/v1/status")["kubernetes"]["synced"]:
                    if time.monotonic() > deadline + 30 or proc.poll() is not None:
                        print(f"   the agent did not sync with its API: {client.get('/v1/status')['kubernetes']}")
                        return 1
                    time.sleep(0.1)
                st = client.get("/v1/status")
                counts = {k: v["in_force"] for k, v in st["kubernetes"]["resources"].items()}
                print(f"   synced with the API in {st['kubernetes']['sync_seconds']} s: {counts}")
                print(f"   datapath: {st['datapath']['mode']} — {st['datapath']['description']}")
            for node, _, _, work in agents:
                print(f"\n== node {node.name}: l7gate clustermesh status --wait (as `cilium clustermesh status`)")
                r = subprocess.run([L7GATE, "clustermesh", "status", "--wait", "--wait-timeout", "60",
                                    "--admin", f"unix:{work}/admin.sock"], check=False)
                failed |= r.returncode
            _, _, client_b, work_b = agents[1]
            print("\n== node b1: l7gate service list (billing-service balances over cluster-a's pods)")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # cluster-a's backends arrive over the mesh
                fes = client_b.get("/v1/services")["services"][0]["frontends"]
                if fes and len(fes[0]["backends"]) == len(billing):
                    break
                time.sleep(0.2)
            subprocess.run([L7GATE, "service", "list", "--admin", f"unix:{work_b}/admin.sock"], check=False)
            print("\n== from the frontend-service pod (cluster-b), as in the article: by the Service's name")
            target = billing[0]
            name = "billing-service.payments"
            for who, pod, method, url, want in (
                ("frontend-service", fe, "POST", f"http://{name}:8080/v1/charge", 200),
                ("frontend-service", fe, "GET", f"http://{name}:8080/v1/transactions", 403),
                ("frontend-service", fe, "POST", f"http://{name}:8080/v1/refund", 403),
                # port 9090 is no port of the Service: the pod itself, which no rule opens
                ("frontend-service", fe, "POST", f"http://{target.ip}:9090/v1/charge", 0),
                ("reporting-job (other labels)", other, "POST", f"http://{name}:8080/v1/charge", 0),
            ):
                status, body = pod.curl(url, method, data='{"amount": 100}', timeout=2)
                shown = status if status else "no answer (dropped in the kernel)"
                answered = ""
                if status == 200:
                    answered = f"(answered by {json.loads(body)['pod']})"
                print(f"   {who}: curl -X {method} {url} -> {shown} {answered}")
                if status != want:
                    print(f"   ^ MISMATCH: expected {want or 'a drop'}")
                    failed = 1
            by_pod: dict[str, int] = {}
            for _ in range(20):
                status, body = fe.curl(f"http://{name}:8080/v1/charge", "POST", data='{"amount": 100}', timeout=2)
                who = json.loads(body)["pod"] if status == 200 else f"status {status}"
                by_pod[who] = by_pod.get(who, 0) + 1
            print(f"   20 more POSTs to {name}: answered by {by_pod}")
            if len(by_pod) != len(billing) or any(k.startswith("status") for k in by_pod):
                print("   ^ MISMATCH: expected both billing pods, every request answered")
                failed = 1
            failed |= authenticated_and_encrypted(tb, agents, apis, fe, target)
            _, _, client_a, work_a = agents[0]
            print("\n== node a1: l7gate status (datapath)")
            print(json.dumps(client_a.get("/v1/status")["datapath"], indent=2))
            print("\n== node a1: l7gate xds status")
            subprocess.run([L7GATE, "xds", "status", "--admin", f"unix:{work_a}/admin.sock"], check=False)
            has_observe = subprocess.run([L7GATE, "observe", "--help"], capture_output=True).returncode == 0
            if has_observe:
                print("\n== node a1: l7gate observe --last 20")
                subprocess.run([L7GATE, "observe", "--last", "20", "--admin", f"unix:{work_a}/admin.sock"], check=False)
        finally:
            for node, proc, _, _ in agents:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=20)
            for etcd in etcds.values():
                etcd.stop()
            for api in apis.values():
                api.close()
            for n in (na, nb):
                subprocess.run(["rm", "-rf", f"/sys/fs/bpf/l7g/{n.netns}"], check=False)
            try:
                Path("/sys/fs/bpf/l7g").rmdir()
            except OSError:
                pass
    return failed


def authenticated_and_encrypted(tb: Testbed, agents: list[Any], apis: dict[str, ApiServerDouble], fe: Any,
                                target: Any) -> int:
    docs = seed_policies()
    allow = copy.deepcopy(docs[-1])
    allow["spec"]["ingress"][0]["authentication"] = {"mode": "required"}
    changed = tb.workdir / "allow-frontend-to-billing.yaml"
    changed.write_text(yaml.safe_dump(allow, sort_keys=False))
    print("\n== the article's `authentication: {mode: required}` on the allow rule (both clusters)")
    for api in apis.values():
        if kubectl(api, "apply", "-f", str(changed)):
            return 1
    (na, _, client_a, _), (nb, _, client_b, work_b) = agents
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ENGINE != "envoy":  # no tunnel: the handshake's auth entries let the call through
            if fe.curl("http://billing-service.payments:8080/v1/charge", "POST", data="{}", timeout=2)[0] == 200:
                break
            time.sleep(0.2)
            continue
        t = client_b.get("/v1/auth")["tunnel"]
        if t and t["egress"] and all(e["ready"] for e in t["egress"]) and client_a.get("/v1/auth")["tunnel"]["ingress"]:
            break
        time.sleep(0.1)
    link = nb.link_ifnames[0]
    pcap = tb.workdir / "link.pcap"
    cap = nb.spawn(["tcpdump", "-i", link, "--immediate-mode", "-U", "-n", "-s", "0", "-w", str(pcap), "tcp"], stderr=subprocess.PIPE)
    assert cap.stderr is not None
    cap.stderr.readline()  # "listening on ..."
    status, body = fe.curl("http://billing-service.payments:8080/v1/charge", "POST", data='{"amount": 100}', timeout=3)
    time.sleep(0.3)
    cap.send_signal(signal.SIGINT)
    cap.wait(10)
    print(f"   frontend-service: curl -X POST http://billing-service.payments:8080/v1/charge -> {status or 'no answer'}")
    raw = pcap.read_bytes() if pcap.exists() else b""
    text = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-nn"], capture_output=True, text=True).stdout
    to_tunnel = sum(1 for line in text.splitlines() if f"{na.ip}.15443" in line)
    plain = raw.count(b"/v1/charge")
    print(f"   capture on the link {link}: {to_tunnel} packets of the mTLS tunnel ({na.ip}:15443), "
          f"{plain} containing '/v1/charge'")
    print("\n== node b1: l7gate auth status")
    subprocess.run([L7GATE, "auth", "status", "--admin", f"unix:{work_b}/admin.sock"], check=False)
    if ENGINE != "envoy":
        ok = status == 200
        print("   (the h11 engine: mutual authentication without the tunnel, which runs in Envoy; the request "
              "crosses the link in plain text)")
        if not ok:
            print("   ^ MISMATCH: expected 200 once both nodes authenticated")
        return 0 if ok else 1
    ok = status == 200 and to_tunnel > 0 and plain == 0
    if not ok:
        print("   ^ MISMATCH: expected 200 through the tunnel and no plaintext on the link")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
