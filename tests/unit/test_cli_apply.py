"""`l7gate policy apply` of many objects (issue 11): the CLI says what it sends, that it is still
waiting, and how long the agent took; it waits in proportion to the size; and if it gives up,
it says that the apply may still complete and how to check, without a traceback."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate import cli
from l7gate.client import AdminClient


def policies_file(tmp_path: Path, n: int) -> Path:
    docs = [
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": f"p{j}", "namespace": "web"},
         "spec": {"endpointSelector": {"matchLabels": {"app": f"a{j}"}}}}
        for j in range(n)
    ]
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


class _SlowApplyEndpoint(BaseHTTPRequestHandler):
    """The admin API's apply endpoint alone: answers every POST as the agent answers an apply,
    after `delay` seconds."""

    delay = 0.0

    def do_POST(self) -> None:
        objects = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["objects"]
        time.sleep(self.delay)
        body = json.dumps({
            "created": [f"{o['kind']}/{o['metadata']['namespace']}/{o['metadata']['name']}" for o in objects],
            "configured": [], "unchanged": [], "deleted": [], "warnings": [],
            "timing": {"check": 0.31, "persist": 0.04, "publish": 0.23, "resolve": 0.12, "total": 0.7},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"


@pytest.fixture
def slow_apply(tmp_path: Path) -> Iterator[tuple[str, type[_SlowApplyEndpoint]]]:
    handler = type("Handler", (_SlowApplyEndpoint,), {})
    path = str(tmp_path / "agent.sock")
    server = socketserver.ThreadingUnixStreamServer(path, handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"unix:{path}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_long_apply_says_what_it_sends_that_it_waits_and_what_the_agent_took(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, slow_apply: tuple[str, type[_SlowApplyEndpoint]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, handler = slow_apply
    handler.delay = 0.5
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.1, raising=False)
    rc, out, err = run(capsys, "policy", "apply", "-f", str(policies_file(tmp_path, 150)), "--admin", address)
    assert rc == 0
    assert len(out.splitlines()) == 150 and "CiliumNetworkPolicy/web/p149 created" in out
    lines = err.splitlines()
    assert lines[:1] == [f"applying 150 policies to the agent at {address}…"], err
    assert any(line.startswith("still applying 150 policies: ") for line in lines[1:-1]), err
    assert lines[-1].startswith("applied 150 policies in ")
    assert lines[-1].endswith("(agent: check 0.3 s, persist 0.0 s, resolve 0.1 s, publish 0.2 s)"), lines[-1]


def test_a_short_apply_prints_only_its_result(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, slow_apply: tuple[str, type[_SlowApplyEndpoint]],
) -> None:
    address, _ = slow_apply
    rc, out, err = run(capsys, "policy", "apply", "-f", str(policies_file(tmp_path, 3)), "--admin", address)
    assert (rc, out.splitlines(), err) == (0, [f"CiliumNetworkPolicy/web/p{j} created" for j in range(3)], "")


def test_an_apply_waits_for_the_agent_in_proportion_to_its_size(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A successful apply is never reported as a failure: 1,000 objects wait more than the 30 s
    of other requests, unless --timeout says otherwise."""
    waited: list[float] = []

    def apply(self: AdminClient, objects: list[Any]) -> Any:
        waited.append(self.timeout)
        return {"created": []}

    monkeypatch.setattr(AdminClient, "apply_policies", apply)
    path = str(policies_file(tmp_path, 1000))
    run(capsys, "policy", "apply", "-f", path, "--admin", "unix:/nonexistent")
    run(capsys, "policy", "apply", "-f", path, "--admin", "unix:/nonexistent", "--timeout", "5")
    assert waited[0] >= 60 + 1000 * 0.02 and waited[1] == 5


def test_an_apply_the_agent_does_not_answer_in_time_may_still_complete(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)  # accepts (in the kernel), never answers
    try:
        rc, out, err = run(capsys, "policy", "apply", "-f", str(policies_file(tmp_path, 2)),
                           "--admin", f"unix:{tmp_path}/mute.sock", "--timeout", "0.3")
    finally:
        mute.close()
    assert rc == 2 and out == ""
    assert err.startswith(f"l7gate: error: no answer from the agent at unix:{tmp_path}/mute.sock within 0.3 s: "
                          "the apply of 2 policies may still complete"), err
    assert "`l7gate policy get`" in err and "try again" not in err
