"""gRPC through the L7 path (loopback mode): a real grpcio server and client behind an HTTP rule
that allows only some of the service's methods, as Cilium's gRPC guide writes it
(`method: POST`, `path: /package.Service/Method`).

Envoy forwards each request with the protocol it arrived in (h2c stays h2c, HTTP/1.1 stays
HTTP/1.1); a denied call ends with PERMISSION_DENIED and the reason the 403 carries; flows name
the method. Every address is in 127.0.0.0/8: the gRPC client's source is 127.0.0.1 (the kernel
picks it for 127.x), so the client pod is registered there.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from l7gate.client import AdminClient
from l7gate.testing.wait import eventually

from .loopback import OFFSET, World, loopback_world, pod, request

pytestmark = pytest.mark.integration

S = 86
LEDGER = f"127.{S}.1.20"
OTHER = f"127.{S}.2.60"  # reporting-job: no rule for it
PORT = 9090
CLIENT_LABELS = {"app": "grpc-client", "team": "payments"}

POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "ledger-grpc", "namespace": "payments"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "ledger"}},
        "ingress": [{
            "fromEndpoints": [{"matchLabels": {"app": "grpc-client"}}],
            "toPorts": [{
                "ports": [{"port": str(PORT), "protocol": "TCP"}],
                "rules": {"http": [
                    {"method": "POST", "path": "/billing.Billing/Charge"},
                    {"method": "POST", "path": "/billing.Billing/Watch"},
                ]},
            }],
        }],
    },
}


class Ledger:
    """billing.Billing with raw bytes: Charge and Refund (unary), Watch (server-streaming,
    "tick <n>" every 50 ms until the client cancels). `sent[i]` is the last tick the i-th Watch
    call has produced."""

    def __init__(self, ip: str, port: int) -> None:
        self.calls: list[str] = []
        self.sent: list[int] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        ident = lambda b: b  # noqa: E731

        def unary(name: str) -> Any:
            def handler(req: bytes, ctx: grpc.ServicerContext) -> bytes:
                self.calls.append(name)
                return b"ok:" + name.encode() + b":" + req

            return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=ident, response_serializer=ident)

        def watch(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
            self.calls.append("Watch")
            self.sent.append(0)
            mine = len(self.sent) - 1
            n = 0
            while ctx.is_active():
                n += 1
                self.sent[mine] = n  # before it leaves: a tick above sent[i] was produced later
                yield b"tick %d" % n
                time.sleep(0.05)

        handlers = {"Charge": unary("Charge"), "Refund": unary("Refund"),
                    "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=ident,
                                                                    response_serializer=ident)}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("billing.Billing", handlers)])
        assert self.server.add_insecure_port(f"{ip}:{port}") == port
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[tuple[World, Ledger]]:
    with loopback_world(tmp_path_factory.mktemp("l7g-grpc"), S) as w:
        ledger = Ledger(LEDGER, PORT + OFFSET)
        try:
            w.agent.core.apply([
                pod("ledger-0", "payments", LEDGER, {"app": "ledger", "team": "payments"}, "cluster-a", (PORT,)),
                pod("grpc-client-0", "payments", "127.0.0.1", CLIENT_LABELS, "cluster-a"),
            ])
            w.agent.core.apply([POLICY])
            w.synced()
            w.wait_listening(LEDGER, PORT)
            yield w, ledger
        finally:
            ledger.stop()


def channel() -> grpc.Channel:
    return grpc.insecure_channel(f"{LEDGER}:{PORT}", options=[("grpc.enable_http_proxy", 0)])


def call(ch: grpc.Channel, method: str, body: bytes = b"100") -> bytes:
    fn = ch.unary_unary(f"/billing.Billing/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return fn(body, timeout=5)  # type: ignore[no-any-return]


def ticks_after(stream: Iterator[bytes], last_before: int, count: int) -> list[int]:
    """The numbers of the next `count` ticks the server produced after its tick `last_before`.
    Ticks up to `last_before` may already sit in the client's buffer: they are skipped, since
    they say nothing about what the stream carried later. A cut stream raises grpc.RpcError."""
    got: list[int] = []
    for message in stream:
        n = int(message.split()[1])
        if n > last_before:
            got.append(n)
            if len(got) == count:
                return got
    raise AssertionError(f"the stream ended after ticks {got} (wanted {count} after tick {last_before})")


def test_allowed_method_passes_and_others_are_permission_denied(world: tuple[World, Ledger]) -> None:
    _, ledger = world
    with channel() as ch:
        assert call(ch, "Charge") == b"ok:Charge:100"
        with pytest.raises(grpc.RpcError) as denied:
            call(ch, "Refund")
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # The reason is the one an HTTP/1.1 client reads in its 403.
        http_403 = request(f"127.{S}.2.55", f"127.{S}.1.10", 8080, "GET", "/v1/transactions")
        assert http_403.status == 403 and denied.value.details() == http_403.body.decode().strip()
        # The same connection keeps working for allowed calls.
        assert call(ch, "Charge", b"7") == b"ok:Charge:7"
    assert "Refund" not in ledger.calls


def test_a_pod_without_a_rule_is_refused(world: tuple[World, Ledger]) -> None:
    """reporting-job's gRPC request (h2c, content-type application/grpc) from its own address."""
    # No body: Envoy answers the denial at once, and a body still being sent would race its reset.
    out = subprocess.run(
        ["curl", "-s", "-i", "--http2-prior-knowledge", "--interface", OTHER, "--max-time", "5", "-X", "POST",
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://{LEDGER}:{PORT}/billing.Billing/Charge"],
        capture_output=True, timeout=30)
    head = out.stdout.decode(errors="replace").lower()
    assert "grpc-status: 7" in head, (out.returncode, head, out.stderr)


def test_http11_stays_http11(world: tuple[World, Ledger]) -> None:
    """An HTTP/1.1 client to an HTTP/1.1 pod on the same kind of rule still works: the upstream
    protocol follows the downstream one (the seed's billing pods speak HTTP/1.1 only)."""
    w, _ = world
    assert request(f"127.{S}.2.55", f"127.{S}.1.10", 8080, "POST", "/v1/charge").status == 200


def test_server_streaming_and_a_policy_change_on_the_open_connection(world: tuple[World, Ledger]) -> None:
    """A stream open during a policy change is not cut if the new policy still allows it; the
    next call on the same connection gets the new verdict (RDS/ECDS, as for keep-alive)."""
    w, ledger = world
    # Refund becomes allowed, Charge stays allowed: the open stream goes on.
    changed = {**POLICY, "spec": {**POLICY["spec"], "ingress": [{
        **POLICY["spec"]["ingress"][0],
        "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}], "rules": {"http": [
            {"method": "POST", "path": "/billing.Billing/Charge"},
            {"method": "POST", "path": "/billing.Billing/Watch"},
            {"method": "POST", "path": "/billing.Billing/Refund"},
        ]}}],
    }]}}
    with channel() as ch:
        watch = ch.unary_stream("/billing.Billing/Watch", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
        stream = watch(b"", timeout=20)
        try:
            assert next(stream) == b"tick 1"
            mine = len(ledger.sent) - 1  # the only Watch open
            w.agent.core.apply([changed])
            w.synced()
            # Envoy's workers take the acknowledged config a moment later
            assert eventually(lambda: call(ch, "Refund"), 5, "Refund to be allowed") == b"ok:Refund:100"
            # The new policy is in force: ticks produced from now on still arrive, none lost.
            before = ledger.sent[mine]
            assert ticks_after(stream, before, 3) == [before + 1, before + 2, before + 3]
        finally:
            stream.cancel()
            w.agent.core.apply([POLICY])
            w.synced()


def test_flows_name_the_grpc_method(world: tuple[World, Ledger]) -> None:
    w, _ = world
    with channel() as ch:
        call(ch, "Charge")

    def charge_flows() -> list[str]:
        out = subprocess.run([str(Path(__import__("sys").executable).parent / "l7gate"), "observe",
                              "--admin", w.agent.admin.address, "--last", "200", "-o", "compact"],
                             capture_output=True, text=True, timeout=30).stdout
        lines = [ln for ln in out.splitlines() if "/billing.Billing/Charge" in ln]
        assert any("http-request" in ln and "FORWARDED" in ln for ln in lines), lines
        return lines

    lines = eventually(charge_flows, 5, "the Charge call's forwarded request in `l7gate observe`")
    assert any("http-request FORWARDED (POST http://" in ln and "/billing.Billing/Charge)" in ln
               for ln in lines), lines
    _ = AdminClient
    _ = threading


def _curl(*args: str) -> str:
    """'<status> <http version>' of one curl run from 127.0.0.1 (the grpc-client pod)."""
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", "5",
                           *args], capture_output=True, text=True, timeout=30).stdout


def _grpc_curl(path: str) -> tuple[str, str | None]:
    """'<status> <http version>' and the grpc-status of a whole unary gRPC request (a message
    "100") to `path` as it is written, sent by curl from 127.0.0.1 (the grpc-client pod)."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code} %{http_version}",
                          "--max-time", "5", "--http2-prior-knowledge", "--path-as-is", "-X", "POST",
                          "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-",
                          f"http://{LEDGER}:{PORT}{path}"],
                         input=b"\x00\x00\x00\x00\x03100", capture_output=True, timeout=30).stdout.decode()
    lines = out.splitlines()
    grpc_status = [ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("grpc-status:")]
    return lines[-1] if lines else "", grpc_status[-1] if grpc_status else None


@pytest.mark.parametrize("path, verdict", [
    # Other spellings of the allowed method reach it only because they are normalized first:
    # the rule's path is matched whole, so none of these paths as written would match it.
    ("/billing.Billing//Charge", "allowed"),          # merged slashes
    ("//billing.Billing/Charge", "allowed"),
    ("/billing.Billing/%43harge", "allowed"),         # %43 is C: decoded
    ("/billing.Billing/x/../Charge", "allowed"),      # dot segments resolved
    ("/billing.Billing/./Charge", "allowed"),
    ("/billing.Billing/Refund/../Charge", "allowed"),
    # Other spellings of a denied method stay denied, one that starts with the allowed path too.
    ("/billing.Billing//Refund", "denied"),
    ("/billing.Billing/%52efund", "denied"),          # %52 is R
    ("/billing.Billing/x/../Refund", "denied"),
    ("/billing.Billing/Charge/../Refund", "denied"),
    ("//billing.Billing/Refund", "denied"),
    # An escaped slash is refused before the rules, whichever method it names.
    ("/billing.Billing%2FRefund", "refused"),
    ("/billing.Billing%2FCharge", "refused"),
])
def test_http2_paths_are_normalized_before_the_rules(world: tuple[World, Ledger], path: str, verdict: str) -> None:
    """The protections HTTP/1.1 has hold for HTTP/2's :path (CONVENTIONS, DESIGN decision 4)."""
    _, ledger = world
    calls = len(ledger.calls)
    if verdict == "allowed":
        # A whole gRPC call: answered by the Charge method, which the normalized path names.
        assert _grpc_curl(path) == ("200 2", "0"), path
        assert ledger.calls[calls:] == ["Charge"], (path, ledger.calls[calls:])
    else:
        # No body: Envoy answers at once, and a body still being sent would race its reset.
        got = _curl("--http2-prior-knowledge", "--path-as-is", "-X", "POST", f"http://{LEDGER}:{PORT}{path}")
        assert got == ("403 2" if verdict == "denied" else "400 2"), (path, got)
        assert ledger.calls[calls:] == [], (path, ledger.calls[calls:])


def test_upgrades_do_not_bypass_the_rules(world: tuple[World, Ledger]) -> None:
    url = f"http://{LEDGER}:{PORT}"
    # h2c upgrade from HTTP/1.1: Envoy does not upgrade; the request is judged as HTTP/1.1.
    assert _curl("--http2", "-X", "POST", url + "/billing.Billing/Refund") == "403 1.1"
    # WebSocket: only where the rules allow the request that asks for it.
    ws = ["-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
          "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-X", "POST"]
    assert _curl(*ws, url + "/billing.Billing/Refund") == "403 1.1"
    allowed = _curl(*ws, "--interface", f"127.{S}.2.55", f"http://127.{S}.1.10:8080/v1/charge")
    assert allowed == "200 1.1", allowed  # forwarded: the billing pod answers (it does not upgrade)
    # CONNECT through a port with HTTP rules is refused.
    connect = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_connect}", "--max-time", "5", "-p",
                              "-x", url, "http://192.0.2.1:80/"], capture_output=True, text=True, timeout=30).stdout
    assert connect == "403", connect


def test_a_stream_open_when_policy_denies_its_method_runs_to_its_end(world: tuple[World, Ledger]) -> None:
    """What happens, documented in docs/deviations.md (gRPC): Envoy judges a stream when it
    starts, so a server-streaming call open when a change denies its method goes on until it
    ends; the next call of that method is PERMISSION_DENIED. Cilium's proxy behaves the same."""
    w, ledger = world
    without_watch = {**POLICY, "spec": {**POLICY["spec"], "ingress": [{
        **POLICY["spec"]["ingress"][0],
        "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}], "rules": {"http": [
            {"method": "POST", "path": "/billing.Billing/Charge"}]}}],
    }]}}
    with channel() as ch:
        watch = ch.unary_stream("/billing.Billing/Watch", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
        stream = watch(b"", timeout=20)
        try:
            assert next(stream) == b"tick 1"
            mine = len(ledger.sent) - 1  # the only Watch open (probes let through below come later)
            w.agent.core.apply([without_watch])
            w.synced()

            def a_new_watch_is_refused() -> bool:
                probe = watch(b"", timeout=5)
                try:
                    next(probe)
                except grpc.RpcError as exc:
                    return exc.code() is grpc.StatusCode.PERMISSION_DENIED
                finally:
                    probe.cancel()
                return False

            # once Envoy's workers have the change
            eventually(a_new_watch_is_refused, 5, "a new Watch to be PERMISSION_DENIED")
            # The open stream still delivers what the server produces from now on.
            before = ledger.sent[mine]
            assert ticks_after(stream, before, 3) == [before + 1, before + 2, before + 3]
        finally:
            stream.cancel()
            w.agent.core.apply([POLICY])
            w.synced()
