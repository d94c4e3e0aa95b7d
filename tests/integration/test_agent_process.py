"""`l7gate agent` as a process: two side by side, and a clean SIGTERM shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from l7gate.client import AdminClient
from l7gate.testing.wait import eventually

from .loopback import pod, seed_policies, wait_request

pytestmark = pytest.mark.integration

L7GATE = str(Path(sys.executable).parent / "l7gate")


def _start(tmp: Path, cluster: str, cid: int, other: str, oid: int) -> tuple[subprocess.Popen[bytes], AdminClient]:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"node: n1\ncluster: {{name: {cluster}, id: {cid}}}\nclusters: {{{other}: {oid}}}\n"
        f"stateDir: {tmp}/state\nadmin: {{listen: 'unix:{tmp}/admin.sock'}}\n"
        "envoy: {logLevel: warning}\n"
    )
    proc = subprocess.Popen([L7GATE, "agent", "--config", str(cfg)], stderr=open(tmp / "agent.log", "wb"))
    client = AdminClient(f"unix:{tmp}/admin.sock")
    try:
        eventually(lambda: client.get("/v1/status")["envoy"]["state"] == "LIVE", 20,
                   f"the agent in {tmp} to report its Envoy LIVE")
    except AssertionError as exc:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{exc}\n{(tmp / 'agent.log').read_text()}") from exc
    return proc, client


def _envoy_pid(client: AdminClient) -> int:
    pid = client.get("/v1/status")["envoy"]["pid"]
    assert isinstance(pid, int)
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_agents_side_by_side_then_sigterm(tmp_path: Path) -> None:
    from http.server import ThreadingHTTPServer
    import threading

    from .loopback import _Upstream

    pa, ca = _start(tmp_path / "a", "cluster-a", 1, "cluster-b", 2)
    pb, cb = _start(tmp_path / "b", "cluster-b", 2, "cluster-a", 1)
    servers = []
    try:
        fe = {"app": "frontend-service", "team": "web", "env": "prod"}
        bill = {"app": "billing-service", "team": "payments", "env": "prod"}
        # cluster-a hosts billing on 127.65.1.10; cluster-b hosts a frontend-side service on
        # 127.66.1.10 that, under the same seed policy, nobody may call.
        for ip in ("127.65.1.10", "127.66.1.10"):
            srv = ThreadingHTTPServer((ip, 18080), _Upstream)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            servers.append(srv)
        ca.apply_endpoints([pod("billing", "payments", "127.65.1.10", bill, "cluster-a", (8080,)),
                            pod("frontend", "web", "127.65.2.55", fe, "cluster-b")])
        cb.apply_endpoints([pod("cart", "web", "127.66.1.10", {"app": "cart"}, "cluster-b", (8080,)),
                            pod("frontend", "web", "127.66.2.55", fe, "cluster-b")])
        ca.apply_policies(seed_policies())
        cb.apply_policies([seed_policies()[1]])
        # Each Envoy gets its listeners and policy over xDS a moment later: retry until it answers.
        assert wait_request("127.65.2.55", "127.65.1.10", "POST", "/v1/charge", 200, timeout=15) == 200
        assert wait_request("127.65.2.55", "127.65.1.10", "POST", "/v1/refund", 403, timeout=15) == 403
        # cluster-b's agent: no policy selects `cart`, so everything is allowed there
        assert wait_request("127.66.2.55", "127.66.1.10", "POST", "/v1/refund", 200, timeout=15) == 200
        envoys = [_envoy_pid(ca), _envoy_pid(cb)]
        assert envoys[0] != envoys[1]
        for proc in (pa, pb):
            proc.send_signal(signal.SIGTERM)
        for proc in (pa, pb):
            assert proc.wait(timeout=20) == 0
        eventually(lambda: not any(_alive(p) for p in envoys), 5, "Envoy to stop with its agent")
        assert not (tmp_path / "a" / "admin.sock").exists()
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        for proc in (pa, pb):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_agent_refuses_an_emptied_store(tmp_path: Path) -> None:
    """docs/security.md, a lost store: kv.db truncated to 0 bytes is an error, never a fresh start
    with no policies (the agent said "ready" with 0 policies before)."""
    proc, client = _start(tmp_path, "cluster-a", 1, "cluster-b", 2)
    client.apply_policies(seed_policies())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    first_log = (tmp_path / "agent.log").read_text()
    assert "first start: created a new store" in first_log
    db = tmp_path / "state" / "kv.db"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.write_bytes(b"")
    again = subprocess.run([L7GATE, "agent", "--config", str(tmp_path / "agent.yaml")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert "kv.db exists but is empty (0 bytes)" in again.stderr and "ready" not in again.stderr
    assert db.stat().st_size == 0
