"""The h11 engine (`proxy: {engine: h11}`) against Envoy with one worker (`envoy: {concurrency:
1}`), same policy, same upstream, same load, in one run.

Set-up, the same for both engines: a fresh `l7gate agent` process (loopback mode, a fresh state
folder) per engine per round, configured with `proxy: {engine: h11}` or with its Envoy
(`envoy: {concurrency: 1}`); through its admin API (`AdminClient`) the seed's pods —
billing-service (cluster-a, 127.191.1.10, port 8080) and the frontend (cluster-b) — and the
seed's policies (examples/seed/default-deny-all.yaml + allow-frontend-to-billing.yaml: only
`POST /v1/charge` from the frontend to billing on 8080). Loopback mode: the proxy listens on
127.191.1.10:8080, billing's server on 127.191.1.10:18080 (port + upstreamPortOffset).

The upstream: one static Envoy answering 200 itself (`_world.StaticUpstream`, bench_envoy's:
Python's http.server caps at a few thousand requests/s), started once, serving every run.

The load: `wrk -t1 -c8` (8 keep-alive HTTP/1.1 connections), the same duration for every run.
wrk cannot choose its source address and the kernel picks 127.0.0.1 for a 127.x destination, so
the frontend pod is registered at 127.0.0.1 (as in bench_envoy): every connection comes from
the frontend's address.

Measured, per round and engine, after a 1 s warm-up:
1. requests/s of allowed requests: `POST /v1/charge` with a JSON body → 200 (every one must be
   2xx). Ratio h11 / Envoy; goal >= 0.5.
2. requests/s of denied requests: `GET /v1/transactions` from the frontend → 403 at L7, the
   connection kept (no body: Envoy closes a connection whose denied request has a body unread).
3. CPU per request: utime + stime of every thread (/proc/<pid>/stat) from just before wrk
   starts until the agent has ingested the run's access logs (`l7gate_flow_events_total{source=
   "als"}` (the h11 engine: source="h11") in /metrics has grown by at least the requests wrk completed, plus any counted lost,
   and stopped moving), divided by the requests wrk completed. h11: the agent process (the
   engine is a thread of it, its access logs go straight to the ingestion). Envoy: the Envoy
   process plus the agent process (which receives Envoy's access logs over gRPC and turns them
   into flows); both parts are reported, and the agent's stime apart (its share in the kernel).
4. For context: the upstream directly, no proxy (wrk to 127.191.1.10:18080), once per round.

Rounds alternate which engine goes first (the direct run opens each round); values are medians
over the rounds and each ratio is the median of the per-round ratios, so slow drifts of the
machine's load cancel within a round. The machine has 2 vCPUs: wrk, the proxy, the upstream and
the agent share them, in both sides of every ratio alike.

Every address is in 127.0.0.0/8; every process started here is stopped by its PID (the agent
stops its own Envoy).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _world import (
    BILLING,
    FRONTEND,
    OFFSET,
    KeepAlive,
    StaticUpstream,
    WrkResult,
    cpu_seconds,
    pod,
    wait_listening,
    wrk,
    wrk_script,
)
from bench_policy import L7GATE, stop_agent_process
from run import Context, Result

from l7gate.client import AdminClient
from l7gate.l7proxy.supervisor import find_envoy

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed"
BILLING_IP = "127.191.1.10"
CLIENT_IP = "127.0.0.1"  # the kernel's source for wrk's connections to any 127.x address
PORT = 8080
CONNECTIONS = 8
ALLOWED = ("POST", "/v1/charge", '{"amount": 1}')
DENIED = ("GET", "/v1/transactions", "")
ENGINES = ("envoy", "h11")
TICK = os.sysconf("SC_CLK_TCK")
# Envoy's access log entries arrive as source "als"; the h11 engine's requests as "h11".
EVENTS = re.compile(r'^l7gate_flow_events(_lost)?_total\{source="(?:als|h11)"\} ([0-9.e+]+)$', re.M)


def seed_policies() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((SEED / name).read_text()))
    return docs


def seed_pods() -> list[dict[str, Any]]:
    return [
        pod("billing-service-0", "payments", BILLING_IP, BILLING, "cluster-a", (PORT,)),
        pod("frontend-0", "web", CLIENT_IP, FRONTEND, "cluster-b"),
    ]


def user_system(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of `pid`, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


class EngineAgent:
    """A fresh `l7gate agent` process with one L7 engine, the seed's pods and policies applied
    through its admin API; stopped by its PID."""

    def __init__(self, home: Path, engine: str) -> None:
        home.mkdir(parents=True)
        self.home, self.engine = home, engine
        self.config = home / "agent.yaml"
        proxy = "proxy: {engine: h11}\n" if engine == "h11" else "envoy: {logLevel: warning, concurrency: 1}\n"
        self.config.write_text(
            f"node: n1\ncluster: {{name: cluster-a, id: 1}}\nclusters: {{cluster-b: 2}}\n"
            f"stateDir: {home}/state\nadmin: {{listen: 'unix:{home}/admin.sock'}}\n"
            f"datapath: {{mode: loopback, upstreamPortOffset: {OFFSET}}}\n" + proxy
        )
        self.client = AdminClient(f"unix:{home}/admin.sock", timeout=60)
        self.proc: subprocess.Popen[bytes] | None = None
        self.envoy_pid: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self) -> str:
        try:
            return (self.home / "agent.log").read_text()[-3000:]
        except OSError:
            return "(no log)"

    def _until(self, what: str, probe: Callable[[], bool], timeout: float = 60.0, every: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} agent exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.engine} agent: {what} not within {timeout:g} s; status: "
                                   f"{json.dumps(self.proxy_status())}\n{self.log_tail()}")
            time.sleep(every)

    def status(self) -> dict[str, Any] | None:
        try:
            st: dict[str, Any] = self.client.get("/v1/status")
            return st
        except OSError:
            return None

    def proxy_status(self) -> Any:
        st = self.status()
        return None if st is None else {"proxy": st.get("proxy"), "envoy": st.get("envoy")}

    def start(self) -> None:
        with open(self.home / "agent.log", "ab") as log:
            self.proc = subprocess.Popen([L7GATE, "agent", "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        self._until("the admin API", lambda: self.status() is not None)
        self.client.apply_endpoints(seed_pods())
        self.client.apply_policies(seed_policies())
        if self.engine == "envoy":
            self._until("Envoy ACKing every xDS type", self._xds_synced, every=0.1)
            st = self.status()
            assert st is not None and st["envoy"] is not None
            self.envoy_pid = int(st["envoy"]["pid"])
        else:
            self._until("the h11 engine listening", lambda: (self.status() or {}).get("proxy", {}).get("listeners") == 1)
        wait_listening(BILLING_IP, PORT)
        conn = KeepAlive(BILLING_IP, PORT)
        got: list[int] = []

        def answers(method: str, path: str, want: int) -> bool:
            got.append(conn.status(method, path))
            return got[-1] == want

        try:
            for (method, path, _), want in ((ALLOWED, 200), (DENIED, 403)):
                got.clear()
                self._until(f"{method} {path} from the frontend answered {want}",
                            lambda: answers(method, path, want), timeout=20)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nlast answers: {got[-5:]}") from None
        finally:
            conn.close()

    def _xds_synced(self) -> bool:
        nodes = self.client.get("/v1/xds/status").get("nodes", [])
        rows = [t for n in nodes for t in n["types"].values()]
        return bool(rows) and all(r["state"] == "SYNCED" for r in rows)

    def log_events(self) -> tuple[int, int]:
        """(access log entries the agent has ingested, those it refused with a full queue)."""
        text = self.client.get("/metrics")
        assert isinstance(text, str)
        got = {lost: int(float(v)) for lost, v in EVENTS.findall(text)}
        return got.get("", 0), got.get("_lost", 0)

    def cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far: (the agent's, of which in the kernel, its Envoy's: 0 without one)."""
        user, system = user_system(self.pid)
        return user + system, system, cpu_seconds(self.envoy_pid) if self.envoy_pid is not None else 0.0

    def quiesce(self, expected: int, timeout: float = 60.0) -> float:
        """Wait until at least `expected` access log entries are ingested and the count stays
        still for 0.3 s; seconds waited."""
        t0 = time.monotonic()
        last, still_since = -1, t0
        while True:
            n = sum(self.log_events())
            now = time.monotonic()
            if n != last:
                last, still_since = n, now
            elif n >= expected and now - still_since >= 0.3:
                return now - t0
            if now - t0 > timeout:
                raise RuntimeError(f"{self.engine} agent: {n} access log entries ingested, expected >= {expected}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_agent_process(self.proc)
        self.proc = None


@dataclass
class Runs:
    """wrk runs of one kind against one target, with CPU per request (µs)."""

    rps: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    agent_us: list[float] = field(default_factory=list)
    agent_sys_us: list[float] = field(default_factory=list)  # of agent_us, in the kernel
    envoy_us: list[float] = field(default_factory=list)
    catchup_s: list[float] = field(default_factory=list)
    lost: int = 0

    def add(self, res: WrkResult) -> None:
        self.rps.append(res.rps)
        if res.p99_ms is not None:
            self.p99_ms.append(res.p99_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.rps)

    @property
    def cpu_us(self) -> float:
        """Median over runs of the whole CPU per request (agent + Envoy)."""
        return statistics.median(a + e for a, e in zip(self.agent_us, self.envoy_us, strict=True))

    def describe(self) -> str:
        p99 = f", p99 {statistics.median(self.p99_ms):.2f} ms" if self.p99_ms else ""
        return f"{self.median:.0f} req/s (min {min(self.rps):.0f} max {max(self.rps):.0f}{p99})"

    def describe_cpu(self) -> str:
        parts = (f"agent {statistics.median(self.agent_us):.0f} µs (of which "
                 f"{statistics.median(self.agent_sys_us):.0f} µs in the kernel)")
        if any(self.envoy_us):
            parts = f"Envoy {statistics.median(self.envoy_us):.0f} µs + " + parts
        return (f"{parts}, logs ingested {statistics.median(self.catchup_s):.2f} s after wrk ended"
                + (f", {self.lost} log entries lost to a full queue" if self.lost else ""))


def paired_ratios(num: Runs, den: Runs) -> list[float]:
    """Per round, `num`'s requests/s over `den`'s (the two ran minutes apart in one round)."""
    return [a / b for a, b in zip(num.rps, den.rps, strict=True)]


def paired_ratio(num: Runs, den: Runs) -> float:
    return statistics.median(paired_ratios(num, den))


def spread(ratios: list[float]) -> str:
    return "per-round ratios " + ", ".join(f"{r:.2f}" for r in ratios)


def load(agent: EngineAgent, runs: Runs, url: str, seconds: int, script: Path, denied: bool) -> None:
    ev0, lost0 = agent.log_events()
    a0, s0, e0 = agent.cpu()
    res = wrk(url, seconds, script, connections=CONNECTIONS)
    catchup = agent.quiesce(ev0 + lost0 + res.requests)
    a1, s1, e1 = agent.cpu()
    runs.lost += agent.log_events()[1] - lost0
    ok = res.non_2xx == res.requests if denied else res.non_2xx == 0
    if not ok or res.socket_errors or res.requests == 0:
        raise RuntimeError(f"{agent.engine}: {url} {'denied' if denied else 'allowed'}: {res}; status: "
                           f"{json.dumps(agent.proxy_status())}")
    runs.add(res)
    runs.agent_us.append((a1 - a0) * 1e6 / res.requests)
    runs.agent_sys_us.append((s1 - s0) * 1e6 / res.requests)
    runs.envoy_us.append((e1 - e0) * 1e6 / res.requests)
    runs.catchup_s.append(catchup)


def run(ctx: Context) -> list[Result]:
    rounds, seconds = (3, 2) if ctx.quick else (4, 8)
    upstream = StaticUpstream(str(find_envoy()), BILLING_IP, PORT + OFFSET, ctx.scratch / "h11-upstream")
    allow = wrk_script(ctx.scratch / "h11-allow.lua", ALLOWED[0], ALLOWED[2])
    deny = wrk_script(ctx.scratch / "h11-deny.lua", DENIED[0], DENIED[2])
    allowed = {e: Runs() for e in ENGINES}
    denied = {e: Runs() for e in ENGINES}
    direct = Runs()
    engine_stats: dict[str, Any] = {}
    started: list[float] = []
    try:
        wrk(f"http://{BILLING_IP}:{PORT + OFFSET}{ALLOWED[1]}", 1, allow, connections=CONNECTIONS)
        for r in range(rounds):
            direct.add(wrk(f"http://{BILLING_IP}:{PORT + OFFSET}{ALLOWED[1]}", seconds, allow,
                           connections=CONNECTIONS))
            for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
                agent = EngineAgent(ctx.scratch / f"h11-{engine}-{r}", engine)
                try:
                    t0 = time.monotonic()
                    agent.start()
                    started.append(time.monotonic() - t0)
                    url = f"http://{BILLING_IP}:{PORT}"
                    wrk(url + ALLOWED[1], 1, allow, connections=CONNECTIONS)  # warm-up
                    for runs, script, path, is_denied in ((allowed, allow, ALLOWED[1], False),
                                                          (denied, deny, DENIED[1], True)):
                        load(agent, runs[engine], url + path, seconds, script, is_denied)
                    if engine == "h11":
                        st = agent.proxy_status()
                        engine_stats = st["proxy"] if st else {}
                finally:
                    agent.stop()
            ctx.log(f"round {r + 1}/{rounds}: direct {direct.rps[-1]:.0f}, allowed "
                    + ", ".join(f"{e} {allowed[e].rps[-1]:.0f}" for e in ENGINES) + "; denied "
                    + ", ".join(f"{e} {denied[e].rps[-1]:.0f}" for e in ENGINES) + " req/s")
    finally:
        upstream.stop()

    h, e = "h11", "envoy"
    how = (f"wrk -t1 -c{CONNECTIONS}, {seconds} s per run, {rounds} rounds (engines alternate which goes "
           f"first, a fresh agent process each); values: medians; ratio: median of the per-round ratios")
    ratio_allowed = paired_ratio(allowed[h], allowed[e])
    ratio_denied = paired_ratio(denied[h], denied[e])
    cpu_ratio = {k: statistics.median(
        (ha + he) / (ea + ee) for ha, he, ea, ee in zip(runs[h].agent_us, runs[h].envoy_us, runs[e].agent_us,
                                                          runs[e].envoy_us, strict=True))
        for k, runs in (("allowed", allowed), ("denied", denied))}
    return [
        Result(
            name="requests/s through the h11 engine, allowed (POST /v1/charge from the frontend → 200)",
            value=allowed[h].median, unit="req/s",
            baseline_name="Envoy, concurrency 1, same policy", baseline_value=allowed[e].median,
            ratio=ratio_allowed, goal=">= 0.5", goal_met=ratio_allowed >= 0.5,
            notes=(f"{how}; {spread(paired_ratios(allowed[h], allowed[e]))}; h11 {allowed[h].describe()}; "
                   f"Envoy {allowed[e].describe()}; upstream directly "
                   f"{direct.median:.0f} req/s (h11 {allowed[h].median / direct.median:.2f}x of it, Envoy "
                   f"{allowed[e].median / direct.median:.2f}x); upstream: a static Envoy (direct_response "
                   f"200); agent start to ready (pods, policies, first 200 and 403) median "
                   f"{statistics.median(started):.1f} s"),
        ),
        Result(
            name="requests/s through the h11 engine, denied (GET /v1/transactions from the frontend → 403)",
            value=denied[h].median, unit="req/s",
            baseline_name="Envoy, concurrency 1, same policy", baseline_value=denied[e].median,
            ratio=ratio_denied,
            notes=(f"{how}; {spread(paired_ratios(denied[h], denied[e]))}; h11 {denied[h].describe()}; "
                   f"Envoy {denied[e].describe()}; L7 denial, connection kept"),
        ),
        Result(
            name="CPU per allowed request, h11 engine (agent process)",
            value=allowed[h].cpu_us, unit="µs",
            baseline_name="Envoy + its agent", baseline_value=allowed[e].cpu_us, ratio=cpu_ratio["allowed"],
            notes=(f"utime+stime of all threads from wrk's start until the run's access logs are ingested, / "
                   f"requests; h11: {allowed[h].describe_cpu()}; Envoy: {allowed[e].describe_cpu()}; "
                   "ratio: median of per-round ratios"),
        ),
        Result(
            name="CPU per denied request, h11 engine (agent process)",
            value=denied[h].cpu_us, unit="µs",
            baseline_name="Envoy + its agent", baseline_value=denied[e].cpu_us, ratio=cpu_ratio["denied"],
            notes=f"as above; h11: {denied[h].describe_cpu()}; Envoy: {denied[e].describe_cpu()}",
        ),
        Result(
            name="requests/s, the upstream directly (no proxy), POST /v1/charge",
            value=direct.median, unit="req/s",
            notes=(f"context for the rows above: wrk -t1 -c{CONNECTIONS} to {BILLING_IP}:{PORT + OFFSET}, "
                   f"{direct.describe()}; h11 engine's counters after its last run: "
                   f"{json.dumps(engine_stats.get('requests'))}, decision lookups "
                   f"{engine_stats.get('decision_lookups')}, loop {engine_stats.get('loop')}"),
        ),
    ]
