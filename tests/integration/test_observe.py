"""Flows from a real Envoy configured by a real agent (loopback mode), read with `l7gate observe`."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2

from l7gate.client import AdminClient
from l7gate.observe.flow import Verdict
from l7gate.testing.wait import eventually

from .loopback import World, loopback_world, request

pytestmark = pytest.mark.integration

S = 71  # this module's 127.71.x.x addresses
BILLING = f"127.{S}.1.10"
FRONTEND = f"127.{S}.2.55"
L7GATE = str(Path(sys.executable).parent / "l7gate")

ARTICLE = [
    f"cluster-b/web/frontend-service-abc ({FRONTEND}) -> payments/billing-service-xyz ({BILLING}) "
    "http-request FORWARDED POST http://billing-service.payments/v1/charge",
    f"payments/billing-service-xyz ({BILLING}) -> cluster-b/web/frontend-service-abc ({FRONTEND}) "
    "http-response FORWARDED 200",
    f"cluster-b/web/frontend-service-abc ({FRONTEND}) -> payments/billing-service-xyz ({BILLING}) "
    "l7 DROPPED Policy denied (L7)",
]


@pytest.fixture(scope="module")
def require_envoy() -> None:
    from l7gate.l7proxy.supervisor import EnvoyNotFound, find_envoy

    try:
        find_envoy()
    except EnvoyNotFound as exc:
        from tests.conftest import unavailable

        unavailable(f"needs the envoy binary: {exc}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[World]:
    with loopback_world(tmp_path_factory.mktemp("l7g-observe"), S) as w:
        yield w


def squash(line: str) -> str:
    return " ".join(line.split())


def observe(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [L7GATE, "observe", "--admin", world.agent.admin.address, *args],
        capture_output=True, text=True, timeout=30,
    )


def wait_flows(world: World, n: int, timeout: float = 5.0) -> None:
    """Wait until the agent has published `n` flows in all."""

    def published() -> bool:
        stats = world.agent.flows.stats()
        assert stats.published >= n, stats
        return True

    eventually(published, timeout, f"{n} flows published")


def calls(world: World) -> int:
    """The article's two calls; returns the flow count to wait for."""
    before = world.agent.flows.stats().published
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
    assert request(FRONTEND, BILLING, 8080, "GET", "/v1/transactions").status == 403
    return before + 3


def test_observe_prints_the_articles_three_lines(world: World) -> None:
    wait_flows(world, calls(world))
    out = observe(world, "--to-pod", "payments/billing-service-xyz", "--last", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert squash(lines[0]) == "TIMESTAMP SOURCE DESTINATION TYPE VERDICT SUMMARY"
    body = [squash(x) for x in lines[1:]]
    assert len(body) == 3
    for got, want in zip(body, ARTICLE):
        assert got.endswith(want), (got, want)  # after the TIMESTAMP column
    flows = world.agent.flows.snapshot(last=3)
    assert [f.verdict for f in flows] == [Verdict.FORWARDED, Verdict.FORWARDED, Verdict.DROPPED]
    assert flows[0].source.identity == world.core.ipcache.lookup(FRONTEND)


def test_path_normalization_and_world_in_json(world: World) -> None:
    before = world.agent.flows.stats().published
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1%2Frefund").status == 400
    assert request("127.0.0.1", BILLING, 8080, "POST", "/v1/charge").status == 403
    wait_flows(world, before + 2)
    out = observe(world, "--verdict", "ERROR", "--last", "1", "-o", "compact")
    assert out.returncode == 0 and out.stdout.rstrip().endswith("l7 ERROR (400 path_normalization_failed)")
    out = observe(world, "--from-identity", "world", "--last", "1", "-o", "json")
    f = json.loads(out.stdout)
    assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "Policy denied"
    assert f["source"]["identity"] == 2 and f["source"]["labels"] == ["reserved:world"]


def test_follow_streams_and_ctrl_c_is_quiet(world: World) -> None:
    proc = subprocess.Popen(
        [L7GATE, "observe", "--admin", world.agent.admin.address, "-f", "--last", "0",
         "--to-pod", "payments/billing-service-xyz"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        eventually(lambda: world.agent.flows.stats().followers > 0, 10, "`l7gate observe -f` to follow")
        calls(world)
        assert proc.stdout is not None
        out = proc.stdout.fileno()
        received = bytearray()

        def four_lines() -> list[str]:
            # Straight from the pipe: lines already in a reader's buffer would not wake select.
            if select.select([out], [], [], 0.2)[0]:
                received.extend(os.read(out, 65536))
            lines = received.decode().splitlines()
            return lines if len(lines) >= 4 else []

        lines = eventually(four_lines, 10, "a header and the three flows from `l7gate observe -f`")
        assert squash(lines[0]) == "TIMESTAMP SOURCE DESTINATION TYPE VERDICT SUMMARY"
        for got, want in zip(lines[1:], ARTICLE):
            assert squash(got).endswith(want)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode in (0, 130)
        assert err == "", err  # no traceback, no KeyboardInterrupt
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    eventually(lambda: world.agent.flows.stats().followers == 0, 5, "the agent to notice the client left")


def test_metrics_count_flows_drops_and_requests(world: World) -> None:
    wait_flows(world, calls(world))
    text = AdminClient(world.agent.admin.address).get("/metrics")
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples['l7gate_flows_total{direction="INGRESS",type="L7",verdict="FORWARDED"}'] >= 2
    assert samples['l7gate_drops_total{reason="Policy denied (L7)"}'] >= 1
    assert samples['l7gate_http_requests_total{code="200",method="POST",verdict="FORWARDED"}'] >= 1
    assert samples['l7gate_http_requests_total{code="403",method="GET",verdict="DROPPED"}'] >= 1
    assert samples["l7gate_flow_ring_capacity"] == 4096
    pushes = {t: samples.get(f'l7gate_xds_pushes_total{{type="{t}"}}', 0) for t in ("CDS", "LDS", "RDS")}
    assert all(n >= 1 for n in pushes.values()), pushes
    for name in ("l7gate_identities", "l7gate_ipcache_entries", "l7gate_flow_ring_overflow_total",
                 "l7gate_access_log_messages_malformed_total"):
        assert name in samples


def test_garbage_on_the_access_log_stream_is_counted_and_skipped(world: World) -> None:
    from tests.unit.test_observe_data import entry

    als = world.agent.als
    malformed = als.malformed
    good = entry("denied_l7")
    good.common_properties.downstream_direct_remote_address.socket_address.address = FRONTEND
    good.common_properties.downstream_local_address.socket_address.address = BILLING
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.append(good)
    msg.http_logs.log_entry.add()  # an entry with nothing in it
    before = world.agent.flows.stats().published
    bad_entries = world.agent.ingestor.stats().malformed.get("als", 0)
    target = world.agent.xds.address
    with grpc.insecure_channel(target) as ch:
        call = ch.stream_unary(
            "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
            request_serializer=lambda b: b,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        call(iter([b"\xff\xff\xff garbage", msg.SerializeToString(), b"\x0a\x05junk!"]), timeout=10)
    wait_flows(world, before + 1)
    assert als.malformed == malformed + 2
    assert world.agent.ingestor.drain(5)
    assert world.agent.ingestor.stats().malformed.get("als", 0) == bad_entries + 1
    # Envoy's own stream is unaffected: the next request is still seen.
    wait_flows(world, calls(world))


def test_agent_keeps_running_after_junk(world: World) -> None:
    assert world.agent.envoy is not None and world.agent.envoy.status().pid
    assert os.path.exists(world.agent.admin.address[5:])
    assert observe(world, "--last", "1").returncode == 0
