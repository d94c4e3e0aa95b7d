"""Helpers for bench_mtls's tunnel bench: two kernel-mode agents with encryption in transit,
four policy sets on the same port (the seed's L7 allow and an L3/L4 allow, each with and
without `authentication: {mode: required}`), waiting for each path to be in force, Envoy admin
counters and CPU, and a short capture on the inter-node link.

Network hygiene: as in `_datapath_world`. Everything runs in the namespaces of one `Testbed`;
agents, Envoys and tcpdump are started through it (ended by PID at teardown) or stopped here
by PID; the agents' pins are removed by `TunnelWorld.close`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _datapath_world import (
    BILLING, FRONTEND, AgentProcess, http_probe, remove_bpf_root_if_empty, seed_policies,
    start_static_upstream, wait_until,
)
from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.l7proxy.supervisor import admin_request

PORT = 8080
TUNNEL_PORT = 15443
TD = "l7gate.local"
# Node A's tunnel listener's HTTP connection manager (stat prefix = listener name l7g_tunnel_in):
# one per tunnelled HTTP request, one per CONNECT stream (the TCP variant: one per connection).
TUNNEL_RQ = "http.l7g_tunnel_in.downstream_rq_total"
# Bytes node A's tunnel listener relayed to the pod (its ORIGINAL_DST cluster): in the TCP
# variant, every byte the client sent inside the CONNECT streams.
TUNNEL_TX_BYTES = "cluster.l7g_tunnel_origdst.upstream_cx_tx_bytes_total"
# The policy sets `TunnelWorld.apply` knows: the seed's L7 allow (HTTP rules on :8080) without
# and with auth, and the same allow as an L3/L4 allow (no `rules`) without and with auth.
MODES = ("plain", "tunnel", "tcp-plain", "tcp-tunnel")
TICK = os.sysconf("SC_CLK_TCK")


def missing_prerequisites() -> str | None:
    """Why the tunnel bench cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bcc, tc)"
    for tool in ("wrk", "tcpdump"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    return kernel_agent_missing()


def kernel_agent_missing() -> str | None:
    """Why a kernel-mode agent cannot run here (bcc, an Envoy binary), or None."""
    from l7gate.redirect_bpf.loader import DatapathError, import_bcc

    try:
        import_bcc()
    except DatapathError as exc:
        return str(exc)
    from l7gate.l7proxy.supervisor import find_envoy

    try:
        find_envoy()
    except Exception as exc:  # noqa: BLE001 - whatever it raises, the reason is printed
        return f"no Envoy binary: {exc}"
    return None


def auth_policies() -> list[dict[str, Any]]:
    """The seed, its allow rule with mutual authentication required (same policy names, so
    applying one set replaces the other)."""
    docs = seed_policies()
    allow = copy.deepcopy(docs[1])
    allow["spec"]["ingress"][0]["authentication"] = {"mode": "required"}
    return [docs[0], allow]


def l4_policies(auth: bool) -> list[dict[str, Any]]:
    """The seed with its allow rule an L3/L4 allow: the same port, without `rules: {http: ...}`,
    so the frontend may open any TCP connection to billing:8080. `auth`: with mutual
    authentication required, which makes it the tunnel's TCP variant (each connection an HTTP/2
    CONNECT stream). Same policy names as the seed: applying one set replaces the other."""
    docs = seed_policies()
    allow = copy.deepcopy(docs[1])
    rule = allow["spec"]["ingress"][0]
    for to_ports in rule["toPorts"]:
        to_ports.pop("rules", None)
    if auth:
        rule["authentication"] = {"mode": "required"}
    return [docs[0], allow]


def policies(mode: str) -> list[dict[str, Any]]:
    """The policy set of one of `MODES`."""
    if mode == "plain":
        return seed_policies()
    if mode == "tunnel":
        return auth_policies()
    if mode in ("tcp-plain", "tcp-tunnel"):
        return l4_policies(auth=mode == "tcp-tunnel")
    raise ValueError(f"no such policy set: {mode!r} (have {', '.join(MODES)})")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


class TunnelAgent(AgentProcess):
    """A kernel-mode agent with mTLS and `encryption: tunnel`, in its own cluster."""

    def __init__(self, node: Node, work: Path, manifests: list[dict[str, Any]], cluster: str, cid: int,
                 other: str, oid: int, ca_dir: Path) -> None:
        super().__init__(node, work, True, manifests, extra={
            "cluster": {"name": cluster, "id": cid},
            "clusters": {other: oid},
            "mtls": {"enabled": True, "trustDomain": TD, "caDir": str(ca_dir), "svidTTL": 600,
                     "listen": f"{node.ip}:4250", "encryption": "tunnel", "tunnelPort": TUNNEL_PORT},
        })

    def start(self, timeout: float = 60.0) -> None:
        """Spawn; return once Envoy is LIVE."""
        self.spawn()
        deadline = time.monotonic() + timeout
        self.wait_admin(deadline)
        while True:
            env = self.client.get("/v1/status")["envoy"]
            if env and env["state"] == "LIVE":
                return
            self.alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy of the agent on {self.node.name} not LIVE:\n{self.log_tail()}")
            time.sleep(0.05)

    def tunnel(self) -> dict[str, Any]:
        t: dict[str, Any] = self.client.get("/v1/auth")["tunnel"]
        return t

    def synced(self) -> bool:
        """Envoy has acknowledged every resource type the agent sent it."""
        data = self.client.get("/v1/xds/status")
        types = {t["type"]: t for n in data["nodes"] for t in n["types"].values()}
        # RDS is never sent to a node without proxied ports (nothing asks for a route).
        return {"LDS", "CDS"} <= types.keys() and all(
            t["state"] == "SYNCED" or (t["state"] == "NOT SENT" and t["resources"] == 0)
            for t in types.values())

    def envoy_pid(self) -> int:
        pid: int = self.client.get("/v1/status")["envoy"]["pid"]
        return pid

    def envoy_counter(self, name: str) -> int:
        """A counter from this node's Envoy admin API (0 while it does not exist)."""
        admin = self.client.get("/v1/status")["envoy"]["admin"]  # a unix socket: no netns to enter
        _, body = admin_request(admin, "GET", f"/stats?format=json&filter=^{name.replace('.', '[.]')}$")
        for stat in json.loads(body).get("stats", []):
            if stat.get("name") == name:
                return int(stat["value"])
        return 0


@dataclass
class TunnelWorld:
    """Node A (cluster-a): billing-service on :8080, its server a static Envoy. Node B
    (cluster-b): frontend-service. One agent per node, kernel mode, mTLS tunnel on."""

    tb: Testbed
    na: Node
    nb: Node
    billing: Pod
    frontend: Pod
    a: TunnelAgent
    b: TunnelAgent
    upstream_pid: int

    @classmethod
    def build(cls, tb: Testbed) -> TunnelWorld:
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.65.1.0/24")
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.65.2.0/24")
        tb.link(na, nb)
        billing = tb.add_pod(na, "payments", "billing-service-xyz", labels=BILLING, ports=[PORT])
        frontend = tb.add_pod(nb, "web", "frontend-service-abc", labels=FRONTEND)
        upstream = start_static_upstream(billing, billing.ip, PORT, tb.workdir)
        ca = tb.workdir / "shared-ca"
        manifests = tb.to_manifests()
        a = TunnelAgent(na, tb.workdir / "agent-a1", manifests, "cluster-a", 1, "cluster-b", 2, ca)
        b = TunnelAgent(nb, tb.workdir / "agent-b1", manifests, "cluster-b", 2, "cluster-a", 1, ca)
        return cls(tb, na, nb, billing, frontend, a, b, upstream.pid)

    def start(self) -> None:
        for agent in (self.a, self.b):
            agent.forget([])  # a first start: no state, no pins (fresh namespaces: nothing attached)
            agent.start()
            agent.client.apply_endpoints(agent.manifests)

    def close(self) -> None:
        """Stop both agents by PID, then remove their pins (the datapath outlives an agent)."""
        for agent in (self.a, self.b):
            agent.stop()
        for agent in (self.a, self.b):
            shutil.rmtree(agent.pin_dir, ignore_errors=True)
        remove_bpf_root_if_empty()

    @property
    def url(self) -> str:
        return f"http://{self.billing.ip}:{PORT}/v1/charge"

    def apply(self, mode: str, timeout: float = 30.0) -> float:
        """Apply one policy set (`MODES`) on both agents and wait until its path is in force;
        seconds."""
        t0 = time.monotonic()
        docs = policies(mode)
        for agent in (self.a, self.b):
            agent.client.apply_policies(docs)
        check = {"plain": self._plain_in_force, "tunnel": self._tunnel_in_force,
                 "tcp-plain": lambda: self._plain_in_force(proxied_wanted=False), "tcp-tunnel": self._tcp_tunnel_in_force}[mode]
        wait_until(check, timeout, f"{mode} path in force", self._describe)
        return time.monotonic() - t0

    def _tunnel_in_force(self) -> bool:
        ta, tb_ = self.a.tunnel(), self.b.tunnel()
        if not (ta["ingress"] and tb_["egress"] and all(e["ready"] for e in tb_["egress"])):
            return False
        if not (self.a.synced() and self.b.synced()):
            return False
        before = self.a.envoy_counter(TUNNEL_RQ)
        status, proxied = http_probe(self.frontend, self.billing.ip, PORT, "POST", "/v1/charge")
        return status == 200 and proxied and self.a.envoy_counter(TUNNEL_RQ) > before

    def _plain_in_force(self, proxied_wanted: bool = True) -> bool:
        """No tunnel state left anywhere; the probe answered 200, through node A's Envoy (the
        seed's HTTP rules) or, `proxied_wanted=False`, by the upstream itself (an L3/L4 allow:
        kernel only, no Envoy on the path)."""
        ta, tb_ = self.a.tunnel(), self.b.tunnel()
        if ta["ingress"] or tb_["egress"] or tb_["kernel"]:
            return False
        if not (self.a.synced() and self.b.synced()):
            return False
        status, proxied = http_probe(self.frontend, self.billing.ip, PORT, "POST", "/v1/charge")
        return status == 200 and proxied == proxied_wanted

    def _tcp_tunnel_in_force(self) -> bool:
        """Node B's egress to billing:8080 carries the frontend as TCP (CONNECT), ready in the
        kernel; node A terminates it; the probe is answered 200 by the upstream itself (no
        Envoy router in the HTTP path: its bytes are relayed raw) while node A's tunnel listener
        counts a CONNECT stream."""
        dst = f"{self.billing.ip}:{PORT}"
        ta, tb_ = self.a.tunnel(), self.b.tunnel()
        egress = [e for e in tb_["egress"] if e["destination"] == dst]
        if not (egress and all(e["ready"] and e["tcp_sources"] and e["tcp_sources"] == e["sources"]
                               for e in egress)):
            return False
        if dst not in [i["endpoint"] for i in ta["ingress"]]:
            return False
        if not (self.a.synced() and self.b.synced()):
            return False
        before = self.a.envoy_counter(TUNNEL_RQ)
        status, proxied = http_probe(self.frontend, self.billing.ip, PORT, "POST", "/v1/charge")
        return status == 200 and not proxied and self.a.envoy_counter(TUNNEL_RQ) > before

    def _describe(self) -> str:
        try:
            return (f"node A tunnel: {json.dumps(self.a.tunnel())}\nnode B tunnel: {json.dumps(self.b.tunnel())}\n"
                    f"node A log:\n{self.a.log_tail(1500)}\nnode B log:\n{self.b.log_tail(1500)}")
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            return f"(no tunnel status: {exc})"

    def pin(self, node_cpus: dict[str, str] | None) -> None:
        """Restrict each node's processes (agent, its Envoy; node A: the upstream too) to that
        node's CPUs, as if each node were a machine of its own (`{"A": "0", "B": "1"}`); None:
        every process may run on every CPU again. Threads started later inherit it."""
        every = f"0-{(os.cpu_count() or 1) - 1}"
        for name, pid in self.pids().items():
            cpus = every if node_cpus is None else node_cpus[name[-1] if name != "upstream" else "A"]
            out = subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"taskset {name} (pid {pid}) to CPUs {cpus}: {out.stderr.strip()}")

    def pids(self) -> dict[str, int]:
        assert self.a.proc is not None and self.b.proc is not None
        return {"envoy A": self.a.envoy_pid(), "envoy B": self.b.envoy_pid(),
                "agent A": self.a.proc.pid, "agent B": self.b.proc.pid, "upstream": self.upstream_pid}


class LinkCapture:
    """tcpdump on node B's end of the link (headers only, ports 8080 and 15443), started and
    stopped by PID; `count()` tells how many packets went to or came from each port."""

    def __init__(self, w: TunnelWorld, name: str) -> None:
        self.w = w
        self.pcap = w.tb.workdir / f"{name}.pcap"
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> LinkCapture:
        link = self.w.nb.link_ifnames[0]
        self.proc = self.w.nb.spawn(
            ["tcpdump", "-i", link, "--immediate-mode", "-U", "-n", "-s", "64", "-w", str(self.pcap),
             f"tcp and (port {PORT} or port {TUNNEL_PORT})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if b"listening on" not in line:
            raise RuntimeError(f"tcpdump did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.2)
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(10)

    def count(self) -> dict[int, int]:
        out = subprocess.run(["tcpdump", "-r", str(self.pcap), "-n", "-nn", "-q"], capture_output=True,
                             text=True, timeout=60).stdout
        counts = {PORT: 0, TUNNEL_PORT: 0}
        for line in out.splitlines():
            for port in counts:
                if f".{port} >" in line or f".{port}:" in line:
                    counts[port] += 1
        return counts
