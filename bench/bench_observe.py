"""Flows: does observe keep up with Envoy at full load, and does its memory stay bounded?

1. End to end, in one run on this machine: a real agent (this process) configures its real Envoy
   (loopback mode, concurrency 1) in front of a fast upstream (a raw asyncio HTTP server in a
   child process); `wrk` drives Envoy as hard as it can over keep-alive connections from
   127.0.0.1, which the bench registers as a frontend-service pod, alternating the seed's
   allowed call (POST /v1/charge → a request and a response flow) and a denied one
   (GET /v1/transactions → one DROPPED flow). Envoy streams access logs to the agent (ALS);
   the agent converts them to flows in its ring; `l7gate observe -f -o jsonpb` (a child process,
   through the admin API; jsonpb is the agent's own stream format, printed as it comes) follows. Counted at every stage: requests Envoy completed (its own
   stats), access log entries it wrote and dropped, entries the agent received, flows published,
   flows the follower printed, and every loss counter on the way. Then the same load again with
   flow conversion off (Envoy still logs; the agent still receives and parses the stream), to
   show what conversion costs Envoy's request rate on this box.
2. The ingestion path alone (convert + count + publish, no Envoy): 1M synthetic ALS entries into
   a ring of 4,096 — entries per second, and memory: the ring's own size under tracemalloc and
   the process RSS after 100k and after 1M entries (bounded: no growth between the two).

The machine has 2 vCPUs shared by wrk, Envoy, the upstream, the agent and the follower, so the
end-to-end rate is what this box does under full load, not what Envoy does alone.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import yaml
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

    duration = 3 if ctx.quick else 10
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
    follower: subprocess.Popen[bytes] | None = None
    agent = start_agent(cfg)
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
        l7gate = str(Path(sys.executable).parent / "l7gate")
        out_path = work / "follow.ndjson"
        with open(out_path, "wb") as out:
            follower = subprocess.Popen(
                [l7gate, "observe", "--admin", agent.admin.address, "-f", "--last", "0", "-o", "jsonpb"],
                stdout=out, stderr=subprocess.PIPE,
            )
        deadline = time.monotonic() + 10
        while agent.flows.stats().followers == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Warm-up: also checks the verdicts (one allowed, one denied) before the load.
        script = work / "mix.lua"
        script.write_text(WRK_SCRIPT)
        target = f"http://{BILLING}:{PORT}/"
        subprocess.run([wrk, "-t1", "-c2", "-d1s", "-s", str(script), target], capture_output=True, check=True)
        time.sleep(0.5)
        assert agent.ingestor.drain(10)
        admin = env.admin_address or ""
        before_stats = _envoy_stats(admin)
        before_flows = agent.flows.stats()
        before_entries = agent.als.entries
        ingest_before = agent.ingestor.stats()
        warm = agent.flows.snapshot(last=3)
        ctx.log(f"warm-up flows: {[f'{f.verdict.value} {f.summary}' for f in warm]}")
        ctx.log(f"load: wrk -t1 -c{connections} -d{duration}s against Envoy, flows on, one follower")
        t0 = time.monotonic()
        run = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), target],
                             capture_output=True, text=True, check=True)
        load_s = time.monotonic() - t0
        published_during = agent.flows.stats().published - before_flows.published
        # Let the last access logs arrive (Envoy flushes every 50 ms) and the follower catch up.
        settle = time.monotonic()
        last: tuple[int, int] | None = None
        while time.monotonic() - settle < 15:
            time.sleep(0.5)
            now = (agent.flows.stats().published, out_path.stat().st_size)
            if now == last:
                break
            last = now
        after_stats = _envoy_stats(admin)
        after_flows = agent.flows.stats()
        ingest_after = agent.ingestor.stats()
        entries = agent.als.entries - before_entries
        # The same load with flow conversion off (Envoy still logs, the agent still receives and
        # parses the ALS stream): what observe's conversion costs Envoy on this shared box.
        agent.als.set_batch_sink(None)
        ctx.log("load: the same, flows off")
        run_off = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), target],
                                 capture_output=True, text=True, check=True)
    finally:
        agent.stop()  # closes the ring: the follower's stream ends
        if follower is not None:
            try:
                follower.wait(10)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        upstream.kill()
        upstream.wait()
    wrk_requests, rps_on = _wrk(run.stdout)
    _, rps_off = _wrk(run_off.stdout)
    d = {k: after_stats.get(k, 0) - before_stats.get(k, 0) for k in after_stats}
    # Every request Envoy saw, including the few wrk aborts when its time is up.
    rq = _sum(d, r"http\.l7g_.*\.downstream_rq_total")
    rq_2xx = _sum(d, r"http\.l7g_.*\.downstream_rq_2xx")
    logs_written = _sum(d, r"access_logs\.grpc_access_log\.logs_written")
    logs_dropped = _sum(d, r"access_logs\.grpc_access_log\.logs_dropped")
    published = after_flows.published - before_flows.published
    # Envoy's RBAC counters say what the flows must be: a request that passed policy makes two
    # (request, response), a denied one one, one refused before RBAC ran one.
    allowed = _sum(d, r"http\.l7g_.*\.rbac\.allowed")
    denied = _sum(d, r"http\.l7g_.*\.rbac\.denied")
    expected_flows = 2 * allowed + denied + (rq - allowed - denied)
    lost_ingest = sum(ingest_after.lost.values()) - sum(ingest_before.lost.values())
    malformed = sum(ingest_after.malformed.values()) - sum(ingest_before.malformed.values())
    follow_lost = after_flows.follow_lost - before_flows.follow_lost
    # The follower subscribed before the warm-up (--last 0): what it printed beyond the warm-up
    # flows is the load window's.
    printed = sum(1 for ln in out_path.read_bytes().splitlines() if ln.strip())
    followed = printed - before_flows.published
    ctx.log(
        f"envoy: {rq} requests ({rq_2xx} 2xx, RBAC allowed {allowed} denied {denied}), ALS written {logs_written} dropped {logs_dropped}; agent: "
        f"{entries} entries, {published} flows (expected {expected_flows}), ingest lost {lost_ingest}, "
        f"malformed {malformed}; follower printed {followed}, follow lost {follow_lost}"
    )
    lossless = (
        logs_dropped == 0 and logs_written == rq and entries == rq and published == expected_flows
        and lost_ingest == 0 and malformed == 0 and follow_lost == 0 and followed == published
    )
    return [
        Result(
            name=f"flows/s into the ring during full load ({connections} conns, {duration} s)",
            value=published_during / load_s, unit="/s",
            baseline_name="requests/s through Envoy", baseline_value=rps_on,
            notes=f"1.5 flows per request expected (allowed: 2, denied: 1); {published_during} flows "
                  f"while wrk ran {load_s:.1f} s, {published} once the last logs arrived",
        ),
        Result(
            name="flows the follower printed",
            value=followed, unit="flows",
            baseline_name="flows Envoy's requests make (2 per request RBAC allowed, 1 per denied)",
            baseline_value=expected_flows,
            goal="observe keeps up with Envoy at full load, losing nothing",
            goal_met=lossless,
            notes=(f"Envoy completed {rq} requests (wrk counted {wrk_requests}); ALS entries written "
                   f"{logs_written}, dropped by Envoy {logs_dropped}; received by the agent {entries}; "
                   f"flows published {published}; lost in the ingest queue {lost_ingest}; malformed "
                   f"{malformed}; shed by the follower's queue {follow_lost}"),
        ),
        Result(
            name="requests/s through Envoy with flows on (and a follower)",
            value=rps_on, unit="req/s",
            baseline_name="flows off (ALS still streamed and parsed)", baseline_value=rps_off,
            notes="2 vCPUs shared by wrk, Envoy, the upstream, the agent and the follower: the agent's "
                  "conversion competes with Envoy for CPU",
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
    from l7gate.observe.envoy_flows import SOURCE_ALS
    from l7gate.observe.ingest import Ingestor
    from l7gate.observe.ingest_context import IngestContext, PeerInfo
    from l7gate.observe.ring import FlowRing

    total = 200_000 if ctx.quick else 1_000_000
    pool = _synthetic_entries(1000)
    peers = {
        "127.0.2.55": PeerInfo(131072, "cluster-b", "web", "frontend-service-abc",
                               ("k8s:app=frontend-service", "k8s:env=prod", "k8s:team=web")),
        "127.0.1.10": PeerInfo(65536, "cluster-a", "payments", "billing-service-xyz",
                               ("k8s:app=billing-service", "k8s:env=prod", "k8s:team=payments"), local=True),
    }
    ring = FlowRing(4096)
    ing = Ingestor(ring, IngestContext(peers.__getitem__, node_name="cluster-a/node-a1"))
    batch = 100  # about what one ALS message carries at load
    batches = [pool[i : i + batch] for i in range(0, len(pool), batch)]

    def feed(n: int) -> None:
        done = 0
        while done < n:
            for b in batches:
                ing.ingest(SOURCE_ALS, b)
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

    # The ring's own memory: a full ring of distinct flows (every entry differs), under tracemalloc.
    def fill() -> FlowRing:
        r = FlowRing(4096)
        i2 = Ingestor(r, IngestContext(peers.__getitem__, node_name="cluster-a/node-a1"))
        for b in batches:
            i2.ingest(SOURCE_ALS, b)
        for b in batches:
            i2.ingest(SOURCE_ALS, b)
        for b in batches:
            i2.ingest(SOURCE_ALS, b)
        return r

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    full = fill()
    ring_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(full) == 4096
    growth = rss_end - rss_100k
    return [
        Result(
            name="ALS entries ingested/s (convert + count + publish, one thread)", value=rate, unit="entries/s",
            notes=f"{rate * stats.published / max(1, ing.stats().events[SOURCE_ALS]):.0f} flows/s; "
                  f"{total:,} entries in batches of {batch}",
        ),
        Result(
            name=f"RSS growth from 100k to {total // 1000}k entries ingested", value=growth / 2**20, unit="MiB",
            baseline_name="RSS after 100k", baseline_value=rss_100k / 2**20,
            goal="memory stays bounded at 1M flows ingested (growth < 5 MiB)",
            goal_met=growth < 5 * 2**20,
            notes=f"{stats.published:,} flows published, ring holds {stats.size:,}, overflow {stats.overflow:,}",
        ),
        Result(
            name="a full ring of 4,096 flows", value=ring_bytes / 2**20, unit="MiB",
            notes=f"{ring_bytes / 4096:.0f} bytes per flow (tracemalloc)",
        ),
    ]


def run(ctx: Context) -> list[Result]:
    return [*end_to_end(ctx), *ingestion(ctx)]
