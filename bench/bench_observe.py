"""Flows: does observe keep up with Envoy at full load, and does its memory stay bounded?

1. End to end, in one run on this machine: a real agent (this process) configures its real Envoy
   (loopback mode, concurrency 1) in front of a fast upstream (a raw asyncio HTTP server in a
   child process); `wrk` drives Envoy as hard as it can over keep-alive connections from
   127.0.0.1, which the bench registers as a frontend-service pod, alternating the seed's
   allowed call (POST /v1/charge → a request and a response flow) and a denied one
   (GET /v1/transactions → one DROPPED flow). Envoy streams access logs to the agent (ALS);
   the agent converts them to flows in its ring. The same load runs in five states, one run of
   each per round, the order rotating from round to round (slow drifts of the shared machine
   cancel in the per-round ratios):
   - follow: flows on, and `l7gate observe -f -o jsonpb` (a child process, through the admin
     API; jsonpb is the agent's own stream format, printed as it comes) follows them;
   - on: flows on, no follower (what every node pays);
   - off: flow conversion off (Envoy still logs; the agent still receives and parses the stream);
   - nolog: no access log at all (the listeners carry none): the whole cost of observability;
   - file (diagnostic): Envoy's file access logger instead, a text line of what a flow is made
     of, to tmpfs, nothing reading it: the least any Envoy-side log costs Envoy (issue 16's
     "flows off ÷ no access log" goal asks the access log for under 3% of the rate).
   Counted at every stage of each run: requests Envoy completed (its own stats), access log
   entries it wrote and dropped, entries the agent received, flows published, flows the
   follower printed, and every loss counter on the way; and the CPU each request cost the agent
   (this process), Envoy and the follower, from /proc over the run (wrk, then until the last
   flow is in and printed).
2. The ingestion path alone (convert + count + publish, no Envoy): 1M synthetic ALS entries into
   a ring of 4,096 — entries per second, and memory: the ring's own size under tracemalloc and
   the process RSS after 100k and after 1M entries (bounded: no growth between the two).

The machine has 2 vCPUs shared by wrk, Envoy, the upstream, the agent and the follower, so the
end-to-end rate is what this box does under full load, not what Envoy does alone.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _world import cpu_seconds
from run import Context, Result
from l7gate.l7proxy.supervisor import admin_request

ROOT = Path(__file__).resolve().parents[1]
S = 81  # 127.81.x.x
BILLING = f"127.{S}.1.10"
PORT = 8080
OFFSET = 10000

UPSTREAM = r"""
import asyncio, sys
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(RESP * n)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, sys.argv[1], int(sys.argv[2]), backlog=1024)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""

WRK_SCRIPT = """
local i = 0
request = function()
  i = i + 1
  if i % 2 == 0 then
    return wrk.format("GET", "/v1/transactions", {["Host"] = "billing-service.payments"})
  end
  return wrk.format("POST", "/v1/charge", {["Host"] = "billing-service.payments", ["Content-Length"] = "0"})
end
"""


def _pod(name: str, ns: str, ip: str, labels: dict[str, str], cluster: str, ports: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": {"l7gate.io/cluster": cluster}},
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": p} for p in ports]}]},
        "status": {"podIP": ip},
    }


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _envoy_stats(admin: str) -> dict[str, int]:
    code, body = admin_request(admin, "GET", "/stats?format=json", timeout=10)
    if code != 200:
        raise RuntimeError(f"Envoy admin /stats: HTTP {code}")
    data = json.loads(body)
    out: dict[str, int] = {}
    for s in data.get("stats", []):
        if "name" in s and isinstance(s.get("value"), int):
            out[s["name"]] = s["value"]
    return out


def _sum(stats: dict[str, int], pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(v for k, v in stats.items() if rx.fullmatch(k))


# -- 1. end to end ---------------------------------------------------------------------------------

# The load's five states, run round-robin (one run of each per round, the order rotating):
MODES = {
    "follow": "flows on, one follower",
    "on": "flows on, no follower",
    "off": "flows off (ALS streamed and parsed, not converted)",
    "nolog": "no access log at all (Envoy logs nothing)",
    "file": "a file access log instead (text, tmpfs, nothing reads it): what Envoy's cheapest logger costs",
}

# The diagnostic state's log line: what a flow is made of (time, addresses, method, authority,
# path, status and its details, the RBAC filter's verdict, the upstream, the latency).
FILE_LOG_FORMAT = (
    "%START_TIME(%s.%9f)% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %REQ(:METHOD)% "
    "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %UPSTREAM_HOST% %RESPONSE_DURATION% "
    "%DYNAMIC_METADATA(envoy.filters.http.rbac)% %REQ(:AUTHORITY)% %REQ(:PATH)%\n"
)


def _file_access_log(path: Path) -> Any:
    from envoy.config.accesslog.v3 import accesslog_pb2
    from envoy.config.core.v3 import substitution_format_string_pb2
    from envoy.extensions.access_loggers.file.v3 import file_pb2
    from google.protobuf import any_pb2

    cfg = file_pb2.FileAccessLog(
        path=str(path),
        log_format=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source={"inline_string": FILE_LOG_FORMAT}),
    )
    packed = any_pb2.Any()
    packed.Pack(cfg)
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=packed)


def _size(path: Path) -> int:
    # what the settle loop watches: a stat, not a read (it runs inside the agent's CPU window)
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


@dataclass
class Run:
    """One wrk run in one mode: its rate, the CPU each request cost, and the flow accounting."""

    mode: str
    rps: float
    requests: int  # Envoy's count (every request it saw)
    wrk_requests: int
    load_s: float
    agent_us: float  # this process (the agent) per request
    envoy_us: float
    follower_us: float  # the `l7gate observe` process per request (follow mode)
    rest_us: float  # wrk and the upstream per request
    published_during: int
    counts: dict[str, int]

    @property
    def box_us(self) -> float:
        """CPU per request of every process of the run: what the request rate is inversely
        proportional to when they saturate the box, whoever else runs there."""
        return self.agent_us + self.envoy_us + self.follower_us + self.rest_us

    @property
    def lossless(self) -> bool:
        c = self.counts
        if self.mode == "nolog":
            return c["logs_written"] == 0
        if self.mode == "file":
            return c["file_lines"] == c["rq"]
        if self.mode == "off":
            return c["logs_dropped"] == 0 and c["entries"] == c["rq"] and c["published"] == 0
        ok = (c["logs_dropped"] == 0 and c["logs_written"] == c["rq"] and c["entries"] == c["rq"]
              and c["published"] == c["expected"] and c["lost_ingest"] == 0 and c["malformed"] == 0)
        if self.mode == "follow":
            ok = ok and c["follow_lost"] == 0 and c["printed"] == c["published"]
        return ok


def _set_access_log(agent: Any, logs: Any) -> None:
    """Put Envoy's access log on the proxied listeners (`logs`) or take it off (`()`), and wait
    until Envoy has the new listeners."""
    pub = agent.core.publisher
    if tuple(pub.access_logs) == tuple(logs):
        return
    pub.access_logs = logs
    for p in pub.ports:
        pub.mark_identity(p.identity)
    pub.flush()
    if not agent.xds.wait_synced(agent.config.node_id, 20):
        raise RuntimeError("Envoy did not take the listener change")


def _probe(target_ip: str) -> None:
    import http.client

    c = http.client.HTTPConnection(target_ip, PORT, timeout=5)
    try:
        c.request("POST", "/v1/charge", body=b"", headers={"Host": "billing-service.payments"})
        c.getresponse().read()
    finally:
        c.close()


def end_to_end(ctx: Context) -> list[Result]:
    wrk = shutil.which("wrk")
    if wrk is None:
        ctx.log("no wrk: the end-to-end figure is skipped")
        return []
    try:
        from l7gate.l7proxy.supervisor import find_envoy

        find_envoy()
    except Exception:  # noqa: BLE001 - no Envoy: skipped, not failed
        ctx.log("no envoy binary: the end-to-end figure is skipped")
        return []
    from l7gate.agent.config import AgentConfig, EnvoySettings, ObserveSettings
    from l7gate.agent.daemon import start_agent

    duration = 2 if ctx.quick else 6
    rounds = 1 if ctx.quick else 3
    connections = 16
    work = ctx.scratch / "observe"
    work.mkdir()
    cfg = AgentConfig(
        node="node-a1", cluster_name="cluster-a", cluster_id=1, clusters={"cluster-b": 2},
        state_dir=str(work / "state"), admin_listen=f"unix:{work}/admin.sock", xds_listen=f"unix:{work}/xds.sock",
        envoy=EnvoySettings(log_level="warning"), upstream_port_offset=OFFSET,
        observe=ObserveSettings(ring_size=4096, follow_buffer=65536),
    )
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, BILLING, str(PORT + OFFSET)],
                                stdout=subprocess.PIPE, text=True)
    runs: list[Run] = []
    agent = start_agent(cfg)
    me = os.getpid()
    try:
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        assert agent.envoy is not None
        env = agent.envoy.wait_ready(30)
        frontend = {"app": "frontend-service", "team": "web", "env": "prod"}
        agent.core.apply([
            _pod("billing-service-xyz", "payments", BILLING,
                 {"app": "billing-service", "team": "payments", "env": "prod"}, "cluster-a", (PORT,)),
            # wrk cannot choose its source address: the kernel picks 127.0.0.1 for 127.81.x.x.
            _pod("frontend-service-bench", "web", "127.0.0.1", frontend, "cluster-b"),
        ])
        docs = [d for n in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml")
                for d in yaml.safe_load_all((ROOT / "examples" / "seed" / n).read_text())]
        agent.core.apply(docs)
        if not agent.xds.wait_synced(cfg.node_id, 20):
            raise RuntimeError("Envoy did not sync")
        access_logs = tuple(agent.core.publisher.access_logs)
        shm = Path("/dev/shm")
        file_log_path = (shm if shm.is_dir() else work) / f"l7g-bench-observe-{me}.log"
        file_log = _file_access_log(file_log_path)
        l7gate = str(Path(sys.executable).parent / "l7gate")
        envoy_pid = agent.envoy.status().pid
        assert envoy_pid is not None
        admin = env.admin_address or ""
        # Warm-up: also checks the verdicts (one allowed, one denied) before the load.
        script = work / "mix.lua"
        script.write_text(WRK_SCRIPT)
        target = f"http://{BILLING}:{PORT}/"
        subprocess.run([wrk, "-t1", "-c2", "-d1s", "-s", str(script), target], capture_output=True, check=True)
        time.sleep(0.5)
        assert agent.ingestor.drain(10)
        warm = agent.flows.snapshot(last=3)
        ctx.log(f"warm-up flows: {[f'{f.verdict.value} {f.summary}' for f in warm]}")

        def one(mode: str, n: int) -> Run:
            grpc_log = mode not in ("nolog", "file")
            _set_access_log(agent, access_logs if grpc_log else (file_log,) if mode == "file" else ())
            agent.als.set_batch_sink(None if mode == "off" else agent.ingestor.http_access_logs)
            # The listener change reached Envoy: one request shows whether it is logged.
            e0, l0 = agent.als.entries, _lines(file_log_path)
            _probe(BILLING)
            deadline = time.monotonic() + (5 if grpc_log or mode == "file" else 0.5)
            while ((agent.als.entries == e0 and _lines(file_log_path) == l0)
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            if ((agent.als.entries != e0) != grpc_log) or ((_lines(file_log_path) != l0) != (mode == "file")):
                raise RuntimeError(f"{mode}: the access log is not in the state asked for")
            assert agent.ingestor.drain(10)
            follower: subprocess.Popen[bytes] | None = None
            out_path = work / f"follow-{n}.ndjson"
            if mode == "follow":
                with open(out_path, "wb") as out:
                    follower = subprocess.Popen(
                        [l7gate, "observe", "--admin", agent.admin.address, "-f", "--last", "0", "-o", "jsonpb"],
                        stdout=out, stderr=subprocess.DEVNULL,
                    )
                deadline = time.monotonic() + 10
                while agent.flows.stats().followers == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
            time.sleep(0.3)
            try:
                before_stats = _envoy_stats(admin)
                before_flows = agent.flows.stats()
                before_entries = agent.als.entries
                lines_before = _lines(file_log_path)
                ingest_before = agent.ingestor.stats()
                f0 = cpu_seconds(follower.pid) if follower is not None else 0.0
                a0, v0 = cpu_seconds(me), cpu_seconds(envoy_pid)
                u0, w0 = cpu_seconds(upstream.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.monotonic()
                res = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), target],
                                     capture_output=True, text=True, check=True)
                load_s = time.monotonic() - t0
                w1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, the one child waited for
                published_during = agent.flows.stats().published - before_flows.published
                # Let the last access logs arrive and the follower catch up: their cost is the run's.
                settle = time.monotonic()
                last: tuple[int, int, int, int] | None = None
                while time.monotonic() - settle < 15:
                    time.sleep(0.25)
                    agent.ingestor.drain(10)
                    now = (agent.als.entries, agent.flows.stats().published,
                           out_path.stat().st_size if follower is not None else 0, _size(file_log_path))
                    if now == last:
                        break
                    last = now
                a1, v1, u1 = cpu_seconds(me), cpu_seconds(envoy_pid), cpu_seconds(upstream.pid)
                f1 = cpu_seconds(follower.pid) if follower is not None else 0.0
                after_stats = _envoy_stats(admin)
                after_flows = agent.flows.stats()
                ingest_after = agent.ingestor.stats()
            finally:
                if follower is not None:
                    follower.send_signal(signal.SIGINT)
                    try:
                        follower.wait(10)
                    except subprocess.TimeoutExpired:
                        follower.kill()
                        follower.wait()
            d = {k: after_stats.get(k, 0) - before_stats.get(k, 0) for k in after_stats}
            rq = _sum(d, r"http\.l7g_.*\.downstream_rq_total")
            allowed = _sum(d, r"http\.l7g_.*\.rbac\.allowed")
            denied = _sum(d, r"http\.l7g_.*\.rbac\.denied")
            printed = (sum(1 for ln in out_path.read_bytes().splitlines() if ln.strip())
                       if mode == "follow" else 0)
            counts = {
                "rq": rq, "allowed": allowed, "denied": denied,
                # Envoy's RBAC counters say what the flows must be: a request that passed policy
                # makes two (request, response), a denied one one, one refused before RBAC one.
                "expected": 2 * allowed + denied + (rq - allowed - denied),
                "logs_written": _sum(d, r"access_logs\.grpc_access_log\.logs_written"),
                "logs_dropped": _sum(d, r"access_logs\.grpc_access_log\.logs_dropped"),
                "entries": agent.als.entries - before_entries,
                "published": after_flows.published - before_flows.published,
                "lost_ingest": sum(ingest_after.lost.values()) - sum(ingest_before.lost.values()),
                "malformed": sum(ingest_after.malformed.values()) - sum(ingest_before.malformed.values()),
                "follow_lost": after_flows.follow_lost - before_flows.follow_lost,
                "printed": printed,
                "file_lines": _lines(file_log_path) - lines_before,
            }
            wrk_requests, rps = _wrk(res.stdout)
            n_rq = max(rq, 1)
            wrk_s = (w1.ru_utime + w1.ru_stime) - (w0.ru_utime + w0.ru_stime)
            run = Run(mode, rps, rq, wrk_requests, load_s, (a1 - a0) * 1e6 / n_rq, (v1 - v0) * 1e6 / n_rq,
                      (f1 - f0) * 1e6 / n_rq, ((u1 - u0) + wrk_s) * 1e6 / n_rq, published_during, counts)
            ctx.log(f"{mode}: {rps:.0f} req/s; CPU per request: agent {run.agent_us:.1f} µs, Envoy "
                    f"{run.envoy_us:.1f} µs, follower {run.follower_us:.1f} µs, wrk + upstream {run.rest_us:.1f} µs; "
                    f"{counts}")
            return run

        order = list(MODES)
        n = 0
        for r in range(rounds):
            ctx.log(f"round {r + 1}/{rounds}: wrk -t1 -c{connections} -d{duration}s per state")
            for mode in order[r % len(order):] + order[: r % len(order)]:
                runs.append(one(mode, n))
                n += 1
        _set_access_log(agent, access_logs)
        agent.als.set_batch_sink(agent.ingestor.http_access_logs)
    finally:
        agent.stop()
        upstream.kill()
        upstream.wait()
        Path(f"/dev/shm/l7g-bench-observe-{me}.log").unlink(missing_ok=True)
    return _end_to_end_results(runs, rounds, duration, connections)


def _end_to_end_results(runs: list[Run], rounds: int, duration: int, connections: int) -> list[Result]:
    by = {m: [r for r in runs if r.mode == m] for m in MODES}

    def med(mode: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in by[mode])

    def each(mode: str, attr: str, fmt: str = ".0f") -> str:
        return ", ".join(format(getattr(r, attr), fmt) for r in by[mode])

    def paired(num: str, den: str) -> float:
        # Runs of one round are adjacent in time: slow drifts of the shared machine cancel.
        return statistics.median(a.rps / b.rps for a, b in zip(by[num], by[den], strict=True))

    def box(num: str, den: str) -> float:
        # What the throughput ratio is where these processes have the box to themselves: the
        # inverse ratio of their CPU per request (other tenants' load cancels out of it).
        return statistics.median(b.box_us / a.box_us for a, b in zip(by[num], by[den], strict=True))

    total = {k: sum(r.counts[k] for r in by["follow"]) for k in by["follow"][0].counts}
    lossless = all(r.lossless for r in runs if r.mode != "file")  # the diagnostic's file is not the flows
    on_ratio, off_ratio = paired("follow", "off"), paired("off", "nolog")
    bare_ratio = paired("on", "off")
    cpu_note = (f"CPU per request, medians: agent {med('follow', 'agent_us'):.1f} µs with a follower "
                f"(+ the follower process {med('follow', 'follower_us'):.1f} µs), {med('on', 'agent_us'):.1f} µs "
                f"without, {med('off', 'agent_us'):.1f} µs flows off, {med('nolog', 'agent_us'):.1f} µs "
                f"no access log; Envoy {med('follow', 'envoy_us'):.0f} / {med('on', 'envoy_us'):.0f} / "
                f"{med('off', 'envoy_us'):.0f} / {med('nolog', 'envoy_us'):.0f} µs; every process of the run "
                f"(agent, Envoy, follower, upstream, wrk) {med('follow', 'box_us'):.0f} / {med('on', 'box_us'):.0f} / "
                f"{med('off', 'box_us'):.0f} / {med('nolog', 'box_us'):.0f} µs")
    runs_note = f"wrk -t1 -c{connections}, {duration} s per run, {rounds} rounds of the five states (order rotating)"
    pub = sum(r.published_during for r in by["follow"])
    load = sum(r.load_s for r in by["follow"])
    wrk_rate = sum(r.wrk_requests for r in by["follow"]) / load
    return [
        Result(
            name=f"flows/s into the ring during full load ({connections} conns, flows on, one follower)",
            value=pub / load, unit="/s",
            baseline_name="requests/s through Envoy", baseline_value=wrk_rate,
            notes=f"1.5 flows per request expected (allowed: 2, denied: 1); {pub} flows while wrk ran "
                  f"{load:.1f} s in {rounds} runs, {total['published']} once the last logs arrived",
        ),
        Result(
            name="flows the follower printed",
            value=total["printed"], unit="flows",
            baseline_name="flows Envoy's requests make (2 per request RBAC allowed, 1 per denied)",
            baseline_value=total["expected"],
            goal="observe keeps up with Envoy at full load, losing nothing",
            goal_met=lossless,
            notes=(f"{rounds} runs with a follower (one `l7gate observe -f -o jsonpb` each): Envoy completed "
                   f"{total['rq']} requests (wrk counted {sum(r.wrk_requests for r in by['follow'])}); ALS "
                   f"entries written {total['logs_written']}, dropped by Envoy {total['logs_dropped']}; received "
                   f"by the agent {total['entries']}; flows published {total['published']}; lost in the ingest "
                   f"queue {total['lost_ingest']}; malformed {total['malformed']}; shed by the follower's queue "
                   f"{total['follow_lost']}; the runs without a follower lost nothing either: "
                   f"{all(r.lossless for r in by['on'])}"),
        ),
        Result(
            name="agent CPU per request through Envoy, flows on (access log → flow, no follower)",
            value=med("on", "agent_us"), unit="µs",
            baseline_name="Envoy's own CPU per request (same runs)", baseline_value=med("on", "envoy_us"),
            goal="<= 10 µs", goal_met=med("on", "agent_us") <= 10,
            notes=f"this process's utime+stime over each run (wrk, then until the last flow is in), "
                  f"÷ Envoy's request count; per run: {each('on', 'agent_us', '.1f')}; flows off: "
                  f"{each('off', 'agent_us', '.1f')}; no access log: {each('nolog', 'agent_us', '.1f')}",
        ),
        Result(
            name="agent CPU per request, flows on with one follower (`observe -f -o jsonpb`)",
            value=med("follow", "agent_us"), unit="µs",
            baseline_name="Envoy's own CPU per request (same runs)", baseline_value=med("follow", "envoy_us"),
            notes=f"per run: {each('follow', 'agent_us', '.1f')}; the follower process besides: "
                  f"{each('follow', 'follower_us', '.1f')} µs",
        ),
        Result(
            name="requests/s through Envoy with flows on (and a follower)",
            value=med("follow", "rps"), unit="req/s",
            baseline_name="flows off (ALS still streamed and parsed)", baseline_value=med("off", "rps"),
            ratio=on_ratio, goal=">= 0.97", goal_met=on_ratio >= 0.97,
            notes=f"{runs_note}; ratio: median of the per-round ratios; per run: flows on {each('follow', 'rps')}, "
                  f"off {each('off', 'rps')}; flows on without a follower {each('on', 'rps')} "
                  f"(÷ off: {bare_ratio:.3f}); from CPU per request (off ÷ on, the ratio without other "
                  f"tenants): with a follower {box('follow', 'off'):.3f}, without {box('on', 'off'):.3f}; "
                  f"{cpu_note}. 2 vCPUs shared by wrk, Envoy, the upstream, the agent, the follower (and "
                  f"whatever else runs on the machine)",
        ),
        Result(
            name="requests/s through Envoy with flows off (access log streamed and parsed)",
            value=med("off", "rps"), unit="req/s",
            baseline_name="no access log at all", baseline_value=med("nolog", "rps"),
            ratio=off_ratio, goal=">= 0.97", goal_met=off_ratio >= 0.97,
            notes=f"{runs_note}; ratio: median of the per-round ratios; per run: no access log "
                  f"{each('nolog', 'rps')}; flows on, a follower ÷ no access log: "
                  f"{statistics.median(a.rps / b.rps for a, b in zip(by['follow'], by['nolog'], strict=True)):.3f}; "
                  f"from CPU per request: {box('off', 'nolog'):.3f} (Envoy {med('off', 'envoy_us'):.0f} µs "
                  f"with the access log, {med('nolog', 'envoy_us'):.0f} µs without; the agent "
                  f"{med('off', 'agent_us'):.1f} µs), flows on ÷ no access log {box('on', 'nolog'):.3f}, with a "
                  f"follower {box('follow', 'nolog'):.3f}",
        ),
        Result(
            name="requests/s through Envoy with a file access log instead (text, tmpfs; diagnostic)",
            value=med("file", "rps"), unit="req/s",
            baseline_name="no access log at all", baseline_value=med("nolog", "rps"),
            ratio=paired("file", "nolog"),
            notes=f"{runs_note}; what Envoy's cheapest logger costs it, for the same fields a flow is made "
                  f"of (FILE_LOG_FORMAT), nothing reading the file: Envoy {med('file', 'envoy_us'):.0f} µs "
                  f"per request against {med('nolog', 'envoy_us'):.0f} µs without a log and "
                  f"{med('off', 'envoy_us'):.0f} µs with the gRPC access log (flows off); from CPU per "
                  f"request: {box('file', 'nolog'):.3f}; per run: {each('file', 'rps')}; lines in the file when "
                  f"each run was counted: {sum(r.counts['file_lines'] for r in by['file'])} of "
                  f"{sum(r.requests for r in by['file'])} requests (Envoy writes its file buffer out every "
                  f"10 s by default: the rest were still in it)",
        ),
    ]


def _wrk(stdout: str) -> tuple[int, float]:
    m = re.search(r"(\d+) requests in", stdout)
    r = re.search(r"Requests/sec:\s+([\d.]+)", stdout)
    return (int(m.group(1)) if m else 0), (float(r.group(1)) if r else 0.0)


# -- 2. ingestion alone, and memory ----------------------------------------------------------------


def _synthetic_entries(n: int) -> list[Any]:
    from envoy.data.accesslog.v3 import accesslog_pb2

    out = []
    for i in range(n):
        e = accesslog_pb2.HTTPAccessLogEntry()
        cp = e.common_properties
        cp.downstream_direct_remote_address.socket_address.address = "127.0.2.55"
        cp.downstream_direct_remote_address.socket_address.port_value = 30000 + i
        cp.downstream_local_address.socket_address.address = "127.0.1.10"
        cp.downstream_local_address.socket_address.port_value = 8080
        cp.start_time.seconds = 1_714_141_200 + i
        e.protocol_version = 2
        e.request.request_method = 3 if i % 2 == 0 else 1
        e.request.scheme = "http"
        e.request.authority = "billing-service.payments"
        e.request.request_id = f"{i:08x}-0000-4000-8000-000000000000"
        if i % 2 == 0:
            e.request.path = f"/v1/charge?n={i}"
            cp.upstream_remote_address.socket_address.address = "127.0.1.10"
            cp.time_to_first_upstream_rx_byte.nanos = 3_000_000
            rb = cp.metadata.filter_metadata["envoy.filters.http.rbac"]
            rb.fields["enforced_effective_policy_id"].string_value = "allow|CiliumClusterwideNetworkPolicy/allow"
            e.response.response_code.value = 200
            e.response.response_code_details = "via_upstream"
        else:
            e.request.path = f"/v1/transactions/{i}"
            e.response.response_code.value = 403
            e.response.response_code_details = "rbac_access_denied_matched_policy[deny-l7|P]"
        out.append(e)
    return out


def ingestion(ctx: Context) -> list[Result]:
    from envoy.service.accesslog.v3 import als_pb2

    from l7gate.observe.envoy_flows import SOURCE_ALS
    from l7gate.observe.ingest import Ingestor
    from l7gate.observe.ingest_context import IngestContext, PeerInfo
    from l7gate.observe.ring import FlowRing

    total = 200_000 if ctx.quick else 1_000_000
    peers = {
        "127.0.2.55": PeerInfo(131072, "cluster-b", "web", "frontend-service-abc",
                               ("k8s:app=frontend-service", "k8s:env=prod", "k8s:team=web")),
        "127.0.1.10": PeerInfo(65536, "cluster-a", "payments", "billing-service-xyz",
                               ("k8s:app=billing-service", "k8s:env=prod", "k8s:team=payments"), local=True),
    }
    batch = 100  # entries per ALS message
    # As the agent gets them: messages of `batch` entries, parsed from the wire (an entry's
    # memory is its message's: the ring keeps messages alive through the entries it holds).
    pool = _synthetic_entries(1000)
    wire = []
    for i in range(0, len(pool), batch):
        msg = als_pb2.StreamAccessLogsMessage()
        msg.http_logs.log_entry.extend(pool[i : i + batch])
        wire.append(msg.SerializeToString())
    messages = [als_pb2.StreamAccessLogsMessage.FromString(w).http_logs.log_entry for w in wire]
    ring = FlowRing(4096)
    ing = Ingestor(ring, IngestContext(peers.__getitem__, node_name="cluster-a/node-a1"))

    def feed(n: int) -> None:
        done = 0
        while done < n:
            for m in messages:
                ing.ingest_items(SOURCE_ALS, m)  # what the ingestion thread does
            done += len(pool)

    feed(100_000)
    gc.collect()
    rss_100k = _rss()
    t0 = time.perf_counter()
    feed(total - 100_000)
    elapsed = time.perf_counter() - t0
    gc.collect()
    rss_end = _rss()
    rate = (total - 100_000) / elapsed
    stats = ring.stats()
    ctx.log(f"{total} entries → {stats.published} flows; ring {stats.size}/{stats.capacity}, overflow {stats.overflow}")
    del messages, ring, ing

    # A full ring's memory: 3,000 distinct entries (4,500 flows) parsed from the wire and
    # ingested; the ring keeps the newest 4,096 flows, and nothing else keeps anything. Python's
    # heap under tracemalloc; with the protobuf runtime's own (C) memory, from RSS over 8 rings.
    def fill() -> FlowRing:
        r = FlowRing(4096)
        i2 = Ingestor(r, IngestContext(peers.__getitem__, node_name="cluster-a/node-a1"))
        for _ in range(3):
            for w in wire:
                i2.ingest_items(SOURCE_ALS, als_pb2.StreamAccessLogsMessage.FromString(w).http_logs.log_entry)
        return r

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    full = fill()
    ring_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(full) == 4096
    del full
    gc.collect()
    rss0 = _rss()
    rings = [fill() for _ in range(8)]
    gc.collect()
    ring_rss = (_rss() - rss0) / len(rings)
    del rings
    growth = rss_end - rss_100k
    return [
        Result(
            name="ALS entries ingested/s (convert + count + publish, one thread)", value=rate, unit="entries/s",
            notes=f"{rate * stats.published / total:.0f} flows/s; "
                  f"{total:,} entries in messages of {batch}, parsed once (the ingestion thread's path: "
                  f"flows are built when read)",
        ),
        Result(
            name=f"RSS growth from 100k to {total // 1000}k entries ingested", value=growth / 2**20, unit="MiB",
            baseline_name="RSS after 100k", baseline_value=rss_100k / 2**20,
            goal="memory stays bounded at 1M flows ingested (growth < 5 MiB)",
            goal_met=growth < 5 * 2**20,
            notes=f"{stats.published:,} flows published, ring holds {stats.size:,}, overflow {stats.overflow:,}",
        ),
        Result(
            name="a full ring of 4,096 flows", value=ring_rss / 2**20, unit="MiB",
            notes=f"{ring_rss / 4096:.0f} bytes per flow (RSS, 8 rings, the entries' protobuf memory "
                  f"included); Python's heap alone: {ring_bytes / 2**20:.2f} MiB, {ring_bytes / 4096:.0f} "
                  f"bytes per flow (tracemalloc)",
        ),
    ]


def run(ctx: Context) -> list[Result]:
    return [*end_to_end(ctx), *ingestion(ctx)]
