"""Helpers for the two-node benches (bench_mtls's tunnel, bench_egress): node A (cluster-a)
runs billing-service, its server a static Envoy; node B (cluster-b) runs frontend-service; one
kernel-mode agent per node (`KernelAgent`; `TunnelAgent` adds encryption in transit). A world
applies policy sets and waits for each path to be in force; runs of wrk come with each
process's CPU, the machine's busy share and the growth of chosen Envoy counters; the two CPU
layouts; a short capture on the inter-node link. bench_mtls's four policy sets are on the same
port (the seed's L7 allow and an L3/L4 allow, each with and without `authentication: {mode:
required}`).

Network hygiene: as in `_datapath_world`. Everything runs in the namespaces of one `Testbed`;
agents, Envoys and tcpdump are started through it (ended by PID at teardown) or stopped here
by PID; the agents' pins are removed by `NodePairWorld.close`.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from _datapath_world import (
    BILLING, FRONTEND, AgentProcess, http_probe, remove_bpf_root_if_empty, seed_policies,
    start_static_upstream, wait_until, wrk,
)
from _world import WrkResult
from run import Result
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


def missing_prerequisites(tools: tuple[str, ...] = ("wrk", "tcpdump")) -> str | None:
    """Why a two-node bench that runs `tools` cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bcc, tc)"
    for tool in tools:
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


class KernelAgent(AgentProcess):
    """A kernel-mode agent in its own cluster, knowing the other one; `extra`: more config
    sections (as `AgentProcess`'s)."""

    def __init__(self, node: Node, work: Path, manifests: list[dict[str, Any]], cluster: str, cid: int,
                 other: str, oid: int, extra: dict[str, Any] | None = None) -> None:
        super().__init__(node, work, True, manifests, extra={
            "cluster": {"name": cluster, "id": cid}, "clusters": {other: oid}, **(extra or {})})

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


class TunnelAgent(KernelAgent):
    """A kernel-mode agent with mTLS and `encryption: tunnel`, in its own cluster."""

    def __init__(self, node: Node, work: Path, manifests: list[dict[str, Any]], cluster: str, cid: int,
                 other: str, oid: int, ca_dir: Path) -> None:
        super().__init__(node, work, manifests, cluster, cid, other, oid, extra={
            "mtls": {"enabled": True, "trustDomain": TD, "caDir": str(ca_dir), "svidTTL": 600,
                     "listen": f"{node.ip}:4250", "encryption": "tunnel", "tunnelPort": TUNNEL_PORT},
        })

    def tunnel(self) -> dict[str, Any]:
        t: dict[str, Any] = self.client.get("/v1/auth")["tunnel"]
        return t


AgentT = TypeVar("AgentT", bound=KernelAgent)


@dataclass
class NodePairWorld(Generic[AgentT]):
    """Node A (cluster-a): billing-service on :8080, its server a static Envoy. Node B
    (cluster-b): frontend-service. One agent per node, kernel mode, of the kind a subclass
    makes (`make_agents`); a subclass also knows its policy sets and when each is in force."""

    tb: Testbed
    na: Node
    nb: Node
    billing: Pod
    frontend: Pod
    a: AgentT
    b: AgentT
    upstream_pid: int

    @classmethod
    def build(cls, tb: Testbed, cgroup: bool = False) -> Self:
        """`cgroup`: each node's pods, agent and Envoy in a cgroup of the node's own, the agent's
        socket programs attached there (socket acceleration and load balancing, as deployed)."""
        na = tb.add_node("a1", cluster="cluster-a", node_cidr="10.65.1.0/24", cgroup=cgroup)
        nb = tb.add_node("b1", cluster="cluster-b", node_cidr="10.65.2.0/24", cgroup=cgroup)
        tb.link(na, nb)
        billing = tb.add_pod(na, "payments", "billing-service-xyz", labels=BILLING, ports=[PORT])
        frontend = tb.add_pod(nb, "web", "frontend-service-abc", labels=FRONTEND)
        upstream = start_static_upstream(billing, billing.ip, PORT, tb.workdir)
        a, b = cls.make_agents(tb, na, nb, tb.to_manifests())
        return cls(tb, na, nb, billing, frontend, a, b, upstream.pid)

    @classmethod
    @contextmanager
    def running(cls, cgroup: bool = False) -> Iterator[Self]:
        """A new `Testbed` with this world built (`build`) and its agents started; at the end,
        even on a failure, the agents are stopped, their pins removed and the testbed torn down."""
        with Testbed() as tb:
            w = cls.build(tb, cgroup)
            try:
                w.start()
                yield w
            finally:
                w.close()

    @classmethod
    def make_agents(cls, tb: Testbed, na: Node, nb: Node, manifests: list[dict[str, Any]]) -> tuple[AgentT, AgentT]:
        raise NotImplementedError

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

    def switch(self, change: Callable[[AgentT], object], in_force: Callable[[], bool], what: str,
               timeout: float = 30.0) -> float:
        """`change` each agent's policies, then wait until `in_force()`; seconds."""
        t0 = time.monotonic()
        for agent in (self.a, self.b):
            change(agent)
        wait_until(in_force, timeout, what, self._describe)
        return time.monotonic() - t0

    def _describe(self) -> str:
        return f"node A log:\n{self.a.log_tail(1500)}\nnode B log:\n{self.b.log_tail(1500)}"

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

    def finish(self) -> None:
        """After the runs: every process on every CPU again, and both agents still alive (one that
        died mid-bench would otherwise pass unnoticed)."""
        self.pin(None)
        self.a.alive()
        self.b.alive()

    def pids(self) -> dict[str, int]:
        assert self.a.proc is not None and self.b.proc is not None
        return {"envoy A": self.a.envoy_pid(), "envoy B": self.b.envoy_pid(),
                "agent A": self.a.proc.pid, "agent B": self.b.proc.pid, "upstream": self.upstream_pid}


class TunnelWorld(NodePairWorld[TunnelAgent]):
    """The pair with the mTLS tunnel on, on a shared CA; bench_mtls's policy sets (`MODES`)."""

    @classmethod
    def make_agents(cls, tb: Testbed, na: Node, nb: Node,
                    manifests: list[dict[str, Any]]) -> tuple[TunnelAgent, TunnelAgent]:
        ca = tb.workdir / "shared-ca"
        return (TunnelAgent(na, tb.workdir / "agent-a1", manifests, "cluster-a", 1, "cluster-b", 2, ca),
                TunnelAgent(nb, tb.workdir / "agent-b1", manifests, "cluster-b", 2, "cluster-a", 1, ca))

    def apply(self, mode: str, timeout: float = 30.0) -> float:
        """Apply one policy set (`MODES`) on both agents and wait until its path is in force;
        seconds."""
        docs = policies(mode)
        check = {"plain": self._plain_in_force, "tunnel": self._tunnel_in_force,
                 "tcp-plain": lambda: self._plain_in_force(proxied_wanted=False), "tcp-tunnel": self._tcp_tunnel_in_force}[mode]
        return self.switch(lambda agent: agent.client.apply_policies(docs), check, f"{mode} path in force", timeout)

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
            status = (f"node A tunnel: {json.dumps(self.a.tunnel())}\n"
                      f"node B tunnel: {json.dumps(self.b.tunnel())}\n")
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            status = f"(no tunnel status: {exc})\n"
        return status + super()._describe()


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


# --- measuring -------------------------------------------------------------------------------------

# How the two "nodes" share this machine's CPUs. "shared": every process anywhere (a second
# Envoy on the path comes out of the same CPUs as everything else); "per-node": node A's
# processes (agent, Envoy, upstream) on CPU 0, node B's (agent, Envoy, wrk) on CPU 1, as two
# machines would be.
VARIANTS: dict[str, dict[str, str] | None] = {"shared": None, "per-node": {"A": "0", "B": "1"}}
# The per-node layout again, in a world whose nodes give their pods, agent and Envoy a cgroup
# with the agent's socket programs (`NodePairWorld.build(cgroup=True)`): as deployed, where
# the DaemonSet's pod sits under kubepods with the workloads.
ACCELERATED_VARIANT = "per-node, socket acceleration"
ACCELERATED = ("; each node's pods, agent and Envoy in the node's pods' cgroup (datapath.cgroup: socket "
               "acceleration and the socket load balancer, as a DaemonSet pod under kubepods)")
# The processes whose CPU a `NodeRun` counts (`NodePairWorld.pids`, and wrk), and the node each
# belongs to: the ones that share its CPU in the per-node layout.
NODE_PROCS = {"A": ("envoy A", "agent A", "upstream"), "B": ("envoy B", "agent B", "wrk")}
PROCS = ("envoy A", "envoy B", "agent A", "agent B", "upstream", "wrk")


def usable_variants() -> dict[str, dict[str, str] | None]:
    """The layouts this machine can give (per-node needs two CPUs)."""
    return {k: v for k, v in VARIANTS.items() if v is None or (os.cpu_count() or 1) >= 2}


def alternating(rounds: int, modes: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(round, mode): each round runs every mode, the order reversed every other round (a, b |
    b, a | ...), so that a policy set is switched only between rounds' halves that differ and
    neither mode always runs first after a switch."""
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            yield r, mode


class Switcher:
    """Which policy set is in force: `to(mode)` applies another one only when a run wants it and
    keeps how long each switch took until its path was in force. Not thread-safe."""

    def __init__(self, apply: Callable[[str], float]) -> None:
        self.apply = apply  # applies a mode's policy set, waits until in force, returns seconds
        self.current: str | None = None
        self.seconds: dict[str, list[float]] = {}

    def to(self, mode: str) -> bool:
        """Make `mode` the set in force; True if that took a switch."""
        if mode == self.current:
            return False
        self.current = None  # unknown until the switch is in force
        self.seconds.setdefault(mode, []).append(self.apply(mode))
        self.current = mode
        return True

    def note(self, modes: Sequence[str]) -> str:
        return ", ".join(f"to {m} median {statistics.median(self.seconds[m]):.2f} s"
                         for m in modes if self.seconds.get(m))


@dataclass(frozen=True, slots=True)
class NodeRun:
    """One wrk run and what it cost."""

    wrk: WrkResult
    cpu: dict[str, float]  # CPU seconds of each of `PROCS` over the run (all its threads)
    grown: dict[str, int]  # growth of each watched counter over the run (negative if it vanished)
    busy: float  # the machine's CPU busy fraction over the run (/proc/stat)
    cpu_busy: tuple[float, ...] = ()  # each CPU's busy fraction over the run (cpu0, cpu1, ...)


def measure_wrk(w: NodePairWorld[Any], script: Path, seconds: float, watch: Mapping[str, Callable[[], int]],
                cpus: str | None = None, connections: int = 32) -> NodeRun:
    """`wrk` from the frontend to billing for `seconds` with `connections` (on `cpus`, node
    B's, if given), with each process's CPU, each CPU's busy fraction and the growth of every
    `watch` counter over it."""
    pids = w.pids()
    counters0 = {k: read() for k, read in watch.items()}
    cpu0, (whole0, *each0) = {k: cpu_seconds(p) for k, p in pids.items()}, _cpu_ticks()
    children0 = _children_cpu()
    out = wrk(w.frontend, w.url, seconds, script, connections=connections, cpus=cpus)
    cpu, (whole1, *each1) = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}, _cpu_ticks()
    cpu["wrk"] = _children_cpu() - children0  # wrk is the only child this process waits for meanwhile
    grown = {k: read() - counters0[k] for k, read in watch.items()}
    each = tuple(_busy(a, b) for a, b in zip(each0, each1))
    return NodeRun(out, cpu, grown, _busy(whole0, whole1), each)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _cpu_ticks() -> list[tuple[int, int]]:
    """(idle + iowait, total) jiffies of the whole machine, then of each CPU in order."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            ticks = [int(x) for x in line.split()[1:]]
            out.append((ticks[3] + ticks[4], sum(ticks)))
    return out


def _busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The busy fraction between two `_cpu_ticks` readings of one CPU (or the machine)."""
    return 1 - (after[0] - before[0]) / max(1, after[1] - before[1])


def paired(measured: Sequence[NodeRun], baseline: Sequence[NodeRun]) -> tuple[float, str]:
    """(median of the per-round ratios measured/baseline, the rounds spelled out)."""
    pairs = [(m.wrk.rps, b.wrk.rps) for m, b in zip(measured, baseline)]
    ratio = statistics.median(m / b for m, b in pairs)
    per_round = "; ".join(f"r{i + 1} {m:.0f}/{b:.0f} = {m / b:.2f}" for i, (m, b) in enumerate(pairs))
    return ratio, per_round


def median_rps(xs: Sequence[NodeRun]) -> float:
    return statistics.median(x.wrk.rps for x in xs)


def errors_note(xs: Sequence[NodeRun]) -> str:
    return (f"{sum(x.wrk.requests for x in xs):,} requests, {sum(x.wrk.non_2xx for x in xs)} non-2xx, "
            f"{sum(x.wrk.socket_errors for x in xs)} socket errors")


def no_errors(xs: Sequence[NodeRun]) -> bool:
    return all(x.wrk.non_2xx == 0 and x.wrk.socket_errors == 0 for x in xs)


def us_per_request(xs: Sequence[NodeRun], proc: str) -> float:
    """CPU µs of `proc` per request wrk completed, over the runs."""
    return sum(x.cpu[proc] for x in xs) / max(1, sum(x.wrk.requests for x in xs)) * 1e6


def cpu_note(xs: Sequence[NodeRun]) -> str:
    return ", ".join(f"{p} {us_per_request(xs, p):.0f}" for p in PROCS)


def busy_note(runs: Mapping[str, Sequence[NodeRun]]) -> str:
    """The machine's CPU busy fraction per mode (median over its runs), and each CPU's."""
    def each(xs: Sequence[NodeRun]) -> str:
        n = min((len(x.cpu_busy) for x in xs), default=0)
        if not n:
            return ""
        return " (" + ", ".join(f"cpu{i} {statistics.median(x.cpu_busy[i] for x in xs):.0%}" for i in range(n)) + ")"
    return "; ".join(f"{m} {statistics.median(x.busy for x in xs):.0%}{each(xs)}" for m, xs in runs.items())


def paired_rows(variant: str, runs: Mapping[str, Sequence[NodeRun]], measured: str, baseline: str, *,
                name: str, baseline_name: str, goal: str, cpu_name: str, cpu_baseline_name: str,
                second_envoy: str, switched: str, seen: Mapping[str, str], cpu_remark: str, context: str,
                rounds: int, seconds: float, goal_ratio: float = 0.8, judge: bool = True) -> list[Result]:
    """The two rows of an A/B requests/s bench in one CPU layout (`VARIANTS`): the `measured`
    mode's median req/s against the `baseline` mode's, the ratio paired per round, the goal
    (ratio >= `goal_ratio`, no failed request) judged in the per-node layout only; and both
    Envoys' CPU per request. `second_envoy`: what takes CPU from node A's Envoy in the shared
    layout; `switched`: how the modes differ between runs; `seen`: per mode, what its counters
    showed; `cpu_remark`: on the agents' share; `context`: the rest of the notes (switch times,
    load); `judge`: False for rows shown as context, with no goal in any layout."""
    ratio, per_round = paired(runs[measured], runs[baseline])
    ratios = [m.wrk.rps / b.wrk.rps for m, b in zip(runs[measured], runs[baseline])]
    envoys = {m: us_per_request(runs[m], "envoy A") + us_per_request(runs[m], "envoy B") for m in (measured, baseline)}
    node = "; ".join(f"{m} " + ", ".join(f"{n} {sum(us_per_request(runs[m], p) for p in procs):.0f}"
                                         for n, procs in NODE_PROCS.items())
                     for m in (measured, baseline))
    per_node = variant.startswith("per-node")
    judged = per_node and judge
    where = ("per node: node A's agent, Envoy and upstream on CPU 0, node B's agent, Envoy and wrk on CPU 1, "
             "as two machines would be" + (ACCELERATED if variant == ACCELERATED_VARIANT else "") if per_node else
             f"shared: every process on any of the {os.cpu_count()} vCPUs, so {second_envoy} takes CPU from node "
             f"A's Envoy and the upstream; a stress figure, the goal is judged per node")

    def spread(mode: str) -> str:
        rps = [x.wrk.rps for x in runs[mode]]
        return f"{mode} {min(rps):.0f}-{max(rps):.0f}"

    def mode_note(mode: str) -> str:
        return f"{mode}: {errors_note(runs[mode])}, {seen[mode]}"

    return [
        Result(
            name=f"{name} [{variant} CPUs]", value=median_rps(runs[measured]), unit="req/s",
            baseline_name=baseline_name, baseline_value=median_rps(runs[baseline]),
            ratio=ratio, goal=goal if judged else None,
            goal_met=(ratio >= goal_ratio and no_errors(runs[measured]) and no_errors(runs[baseline]))
            if judged else None,
            notes=(f"{where}; median of {rounds} x {seconds:g} s per set, same agents and pods, {switched} between "
                   f"runs, ratio paired per round ({measured}/{baseline}: {per_round}; min {min(ratios):.2f}, max "
                   f"{max(ratios):.2f}); req/s min-max: {spread(measured)}, {spread(baseline)}; "
                   f"{mode_note(measured)}; {mode_note(baseline)}; machine CPU busy during the runs (median): "
                   f"{busy_note({m: runs[m] for m in (measured, baseline)})}; {context}"),
        ),
        Result(
            name=f"{cpu_name} [{variant} CPUs]", value=envoys[measured], unit="µs",
            baseline_name=cpu_baseline_name, baseline_value=envoys[baseline],
            notes=(f"CPU µs per request over the wrk runs, {measured}: {cpu_note(runs[measured])}; {baseline}: "
                   f"{cpu_note(runs[baseline])} ({cpu_remark}); per node (A: Envoy, agent, upstream; B: Envoy, agent, "
                   f"wrk; what shares each node's CPU in the per-node layout): {node}"),
        ),
    ]
