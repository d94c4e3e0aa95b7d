"""gRPC unary calls through Envoy with an HTTP rule on the gRPC method vs without any rule
(issue 19): a loopback-mode agent and its Envoy (`--concurrency 1`), the pod's server a static
Envoy answering every call itself (a trailers-only gRPC OK: `grpc-status: 0`), and h2load as the
client: HTTP/2 prior knowledge (h2c), `POST /billing.Billing/Charge` with `content-type:
application/grpc` and a 5-byte framed message, 8 connections x 16 concurrent streams.

The two states alternate round by round on the same agent: the rule in force (a CNP on the
ledger pod allowing the client `POST /billing.Billing/Charge` only) and no policy selecting the
pod (the route allows all). The ratio is the median of the per-round ratios. h2load cannot bind
a source address: the kernel picks 127.0.0.1 for 127.x destinations, so the client pod is
registered at 127.0.0.1 (as in bench_envoy).
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from run import Context, Result

from _world import OFFSET, StaticUpstream, pod, start, synced, wait_listening
from l7gate.l7proxy.supervisor import find_envoy

IP = "127.173.1.20"
PORT = 9090
CLIENT = {"app": "grpc-client", "team": "payments"}
RULE = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "ledger-grpc", "namespace": "payments"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "ledger"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "grpc-client"}}],
                     "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}],
                                  "rules": {"http": [{"method": "POST", "path": "/billing.Billing/Charge"}]}}]}],
    },
}


class GrpcUpstream(StaticUpstream):
    """The static upstream Envoy, answering each call with a trailers-only gRPC OK."""

    @staticmethod
    def bootstrap(ip: str, port: int) -> dict[str, Any]:
        boot = StaticUpstream.bootstrap(ip, port)
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
        route["direct_response"] = {"status": 200}
        route["response_headers_to_add"] = [
            {"header": {"key": "content-type", "value": "application/grpc"}},
            {"header": {"key": "grpc-status", "value": "0"}},
        ]
        return boot


def h2load(seconds: int, body: Path) -> tuple[float, int, int]:
    """(requests/s, 2xx, non-2xx) of one h2load run."""
    out = subprocess.run(
        ["h2load", "-D", str(seconds), "-c", "8", "-m", "16", "-t", "1",
         "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
         f"http://{IP}:{PORT}/billing.Billing/Charge"],
        capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if out.returncode != 0 or rps is None or codes is None:
        raise RuntimeError(f"h2load failed ({out.returncode}):\n{text}\n{out.stderr}")
    ok = int(codes.group(1))
    return float(rps.group(1)), ok, sum(int(codes.group(i)) for i in (2, 3, 4))


def run(ctx: Context) -> list[Result]:
    if shutil.which("h2load") is None:
        raise RuntimeError("h2load is not installed: apt-get install nghttp2-client (scripts/install.sh)")
    seconds = 2 if ctx.quick else 4
    rounds = 2 if ctx.quick else 5
    body = ctx.scratch / "grpc-message.bin"
    body.write_bytes(b"\x00\x00\x00\x00\x03100")  # uncompressed, 3 bytes: a gRPC frame
    upstream = GrpcUpstream(str(find_envoy()), IP, PORT + OFFSET, ctx.scratch / "grpc-upstream")
    agent = start(ctx.scratch / "grpc", "node-grpc")
    try:
        agent.core.apply([pod("ledger-0", "payments", IP, {"app": "ledger"}, "cluster-a", (PORT,)),
                          pod("grpc-client", "payments", "127.0.0.1", CLIENT, "cluster-a")])
        synced(agent)
        wait_listening(IP, PORT)
        results: dict[bool, list[float]] = {True: [], False: []}
        ratios = []
        h2load(1, body)  # warm-up
        for r in range(rounds):
            pair: dict[bool, float] = {}
            for rule in ((True, False) if r % 2 == 0 else (False, True)):
                if rule:
                    agent.core.apply([RULE])
                else:
                    agent.core.delete_policy("CiliumNetworkPolicy/payments/ledger-grpc")
                synced(agent)
                rps, ok, bad = h2load(seconds, body)
                if bad or not ok:
                    raise RuntimeError(f"rule={rule}: {bad} calls were not answered 2xx")
                results[rule].append(rps)
                pair[rule] = rps
            ratios.append(pair[True] / pair[False])
    finally:
        agent.stop()
        upstream.stop()
    ratio = statistics.median(ratios)
    return [Result(
        name="gRPC unary calls/s through Envoy, HTTP rule on the method (POST /billing.Billing/Charge)",
        value=statistics.median(results[True]), unit="calls/s",
        baseline_name="no rule (no policy selecting the pod)", baseline_value=statistics.median(results[False]),
        ratio=ratio, goal=">= 0.9", goal_met=ratio >= 0.9,
        notes=f"h2load -c8 -m16 (h2c), {seconds} s per run, {rounds} interleaved rounds; ratio: median of the "
              f"per-round ratios ({', '.join(f'{x:.2f}' for x in ratios)}); upstream: a static Envoy answering a "
              "trailers-only gRPC OK; every call is also logged to the agent over gRPC",
    )]
