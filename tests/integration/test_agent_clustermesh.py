"""The seed's two clusters over a real Cluster Mesh, in loopback mode: two `l7gate agent`
processes (cluster-a, cluster-b), one etcd each. cluster-b's agent knows only cluster-b's pods
and publishes them; cluster-a's agent knows only cluster-a's pods and merges cluster-b's from
cluster-b's etcd. The seed policies, which name no cluster, are applied unchanged in both.

Checked through cluster-a's Envoy: the frontend (cluster-b) may POST /v1/charge, not GET; the
other pod is refused; the flow names cluster-b/web/frontend-service-abc; an etcd frozen and
then killed keeps the known entries in force, a pod deleted meanwhile is gone after the
reconnect; a restarted agent enforces cluster-b's entries before its mesh has resynced
(cilium#26462); `l7gate clustermesh status` says what it has.

Every address is in 127.0.0.0/8; every process is stopped by PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.client import AdminClient
from l7gate.testing.wait import eventually

from l7gate.testing.etcd import EtcdServer
from .loopback import _Upstream, pod, request, seed_policies

pytestmark = pytest.mark.integration

L7GATE = str(Path(sys.executable).parent / "l7gate")
A, B = "127.91", "127.92"
BILLING = f"{A}.1.10"
FRONTEND, OTHER = f"{B}.2.55", f"{B}.2.60"
FE = {"app": "frontend-service", "team": "web", "env": "prod"}
BILL = {"app": "billing-service", "team": "payments", "env": "prod"}
JOB = {"app": "reporting-job", "team": "web", "env": "prod"}


@dataclass
class Agent:
    dir: Path
    config: Path
    client: AdminClient
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([L7GATE, "agent", "--config", str(self.config)],
                                     stderr=open(self.dir / "agent.log", "ab"))
        eventually(lambda: self.client.get("/v1/status")["envoy"]["state"] == "LIVE", 30,
                   f"agent {self.dir.name} and its Envoy", )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")


def make_agent(root: Path, cluster: str, cid: int, etcd: EtcdServer, remote: tuple[str, EtcdServer] | None) -> Agent:
    d = root / cluster
    (d / "mesh").mkdir(parents=True, exist_ok=True)
    if remote is not None:
        (d / "mesh" / remote[0]).write_text(yaml.safe_dump({"endpoints": [remote[1].endpoint]}))
    cfg = d / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": f"{cluster}-n1", "cluster": {"name": cluster, "id": cid}, "stateDir": str(d / "state"),
        "admin": {"listen": f"unix:{d}/admin.sock"}, "envoy": {"logLevel": "warning"},
        "clustermesh": {"etcd": {"endpoints": [etcd.endpoint]}, "configDir": str(d / "mesh"), "leaseTTL": 5},
    }))
    return Agent(d, cfg, AdminClient(f"unix:{d}/admin.sock"))


@dataclass
class World:
    a: Agent
    b: Agent
    etcd_a: EtcdServer
    etcd_b: EtcdServer


def local_pod(name: str, ns: str, ip: str, labels: dict[str, str], cluster: str, node: str,
              ports: tuple[int, ...] = ()) -> dict[str, Any]:
    doc = pod(name, ns, ip, labels, cluster, ports)
    doc["spec"]["nodeName"] = node
    return doc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[World]:
    from tests.conftest import _find_binary, unavailable

    binary = _find_binary("etcd")
    if binary is None:
        unavailable("needs the etcd binary (scripts/install.sh installs etcd-server)")
    root = tmp_path_factory.mktemp("l7g-mesh")
    servers = []
    upstream = ThreadingHTTPServer((BILLING, 18080), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    agents: list[Agent] = []
    try:
        with EtcdServer(binary, root / "etcd-a") as etcd_a, EtcdServer(binary, root / "etcd-b") as etcd_b:
            a = make_agent(root, "cluster-a", 1, etcd_a, ("cluster-b", etcd_b))
            b = make_agent(root, "cluster-b", 2, etcd_b, ("cluster-a", etcd_a))
            agents = [a, b]
            for agent in agents:
                agent.start()
            # Each cluster's agents are told about their own cluster's pods only.
            a.client.apply_endpoints([local_pod("billing-service-xyz", "payments", BILLING, BILL, "cluster-a",
                                                "cluster-a-n1", (8080,))])
            b.client.apply_endpoints([
                local_pod("frontend-service-abc", "web", FRONTEND, FE, "cluster-b", "cluster-b-n1"),
                local_pod("reporting-job-q7x", "web", OTHER, JOB, "cluster-b", "cluster-b-n1"),
            ])
            for agent in agents:
                agent.client.apply_policies(seed_policies())
            yield World(a, b, etcd_a, etcd_b)
    finally:
        for agent in agents:
            agent.stop()
        upstream.shutdown()
        upstream.server_close()
        for s in servers:
            s.stop()


def status(w: World, src: str, method: str, path: str) -> int:
    return request(src, BILLING, 8080, method, path).status


def mesh_status(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([L7GATE, "clustermesh", "status", "--admin", f"unix:{agent.dir}/admin.sock", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_frontend_of_cluster_b_reaches_billing_in_cluster_a_by_labels_alone(world: World) -> None:
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 30,
               "cluster-b's frontend merged into cluster-a and allowed")
    assert status(world, FRONTEND, "GET", "/v1/transactions") == 403
    assert status(world, OTHER, "POST", "/v1/charge") == 403
    # cluster-a's agent was never told about cluster-b's pods: they came from cluster-b's etcd.
    pods = {p["ref"]: p for p in world.a.client.get("/v1/endpoints")["endpoints"]}
    assert "cluster-b/web/frontend-service-abc" in pods and not pods["cluster-b/web/frontend-service-abc"]["local"]
    assert pods["cluster-b/web/frontend-service-abc"]["identity"] >> 16 == 2  # cluster-b's range
    out = subprocess.run([L7GATE, "observe", "--admin", f"unix:{world.a.dir}/admin.sock", "--last", "50",
                          "-o", "compact"], capture_output=True, text=True, timeout=30).stdout
    assert "cluster-b/web/frontend-service-abc" in out, out


def test_clustermesh_status_says_what_is_merged(world: World) -> None:
    r = mesh_status(world.a, "--wait", "--wait-timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1/1 remote clusters ready" in r.stdout and "cluster-b" in r.stdout
    data = json.loads(mesh_status(world.a, "-o", "json").stdout)
    (remote,) = data["remotes"]
    assert remote["name"] == "cluster-b" and remote["ready"] and remote["cluster_id"] == 2
    assert remote["endpoints"] >= 2 and remote["identities"] >= 2
    # etcdctl sees Cilium's layout in cluster-b's etcd.
    got = subprocess.run(["etcdctl", "--endpoints", world.etcd_b.endpoint, "get", "--prefix", "--keys-only",
                          "cilium/state/ip/v1/"], capture_output=True, text=True, timeout=30,
                         env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    assert f"cilium/state/ip/v1/default/{FRONTEND}" in got.stdout, got.stdout + got.stderr


def test_an_outage_keeps_what_is_known_and_reconnect_converges(world: World) -> None:
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 30, "allowed before the outage")
    world.etcd_b.freeze()
    try:
        def lost() -> dict[str, Any] | None:
            (st,) = json.loads(mesh_status(world.a, "-o", "json").stdout)["remotes"]
            return st if not st["connected"] and not st["ready"] else None

        # Once the mesh has noticed (its keepalive, ~7 s), it keeps every entry it had: both of
        # cluster-b's pods, in force.
        st = eventually(lost, 20, "cluster-a's mesh to see cluster-b's frozen etcd as disconnected")
        assert st["endpoints"] >= 2 and st["identities"] >= 2, st
        assert status(world, FRONTEND, "POST", "/v1/charge") == 200  # known entries stay
    finally:
        world.etcd_b.thaw()
    # A pod deleted in cluster-b while cluster-a could not see it is gone after the reconnect.
    world.etcd_b.kill()
    world.b.client.delete_endpoint("cluster-b/web/frontend-service-abc")  # queued by cluster-b's publisher
    assert status(world, FRONTEND, "POST", "/v1/charge") == 200  # cluster-a still has it
    world.etcd_b.restart()
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 403, 45,
               "the deleted frontend removed from cluster-a after cluster-b's etcd came back")
    world.b.client.apply_endpoints([local_pod("frontend-service-abc", "web", FRONTEND, FE, "cluster-b",
                                              "cluster-b-n1")])
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 45, "the frontend back")


def test_a_restarted_agent_enforces_remote_entries_before_the_mesh_resyncs(world: World) -> None:
    """cilium#26462: the restarted agent restores cluster-b's entries from its store and keeps
    them in force until cluster-b's etcd can confirm them, even while that etcd is frozen."""
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 45, "allowed before the restart")
    world.a.stop()
    world.etcd_b.freeze()
    try:
        world.a.start()
        eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 20,
                   "the frontend allowed by restored entries while cluster-b's etcd is frozen")
        assert status(world, OTHER, "POST", "/v1/charge") == 403
    finally:
        world.etcd_b.thaw()
    r = mesh_status(world.a, "--wait", "--wait-timeout", "45")
    assert r.returncode == 0, r.stdout
    assert status(world, FRONTEND, "POST", "/v1/charge") == 200


def test_a_remote_removed_from_the_config_dir_leaves_without_a_restart(world: World) -> None:
    """clustermesh.configDir is re-read when it changes: cluster-b's file removed → its pods
    leave cluster-a (the frontend is refused); put back → merged again. No agent restart."""
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 45, "allowed with cluster-b configured")
    pid = world.a.proc.pid if world.a.proc else None
    remote_file = world.a.dir / "mesh" / "cluster-b"
    saved = remote_file.read_text()
    remote_file.unlink()
    try:
        eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 403, 30,
                   "cluster-b's frontend unknown (world) once cluster-b is no longer a remote")
        assert json.loads(mesh_status(world.a, "-o", "json").stdout)["remotes"] == []
    finally:
        remote_file.write_text(saved)
    eventually(lambda: status(world, FRONTEND, "POST", "/v1/charge") == 200, 45, "merged again")
    assert world.a.proc is not None and world.a.proc.pid == pid and world.a.proc.poll() is None
