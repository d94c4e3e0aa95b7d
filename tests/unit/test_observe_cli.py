"""`l7gate observe` against the real admin server (GET /v1/flows) over a ring of recorded flows."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate import cli
from l7gate.agent.admin import AdminApp, AdminHooks, AdminServer
from l7gate.client import AdminClient, AdminError
from l7gate.observe.api import FlowQuery, stream
from l7gate.observe.flow import flow_from_json
from l7gate.observe.ring import FlowRing
from l7gate.testing.wait import eventually

from .test_observe_data import recorded_flows


class FlowAdmin:
    """The agent's real admin server with only its flow hooks wired (status, xDS and metrics
    answer empty), streaming from a ring of recorded flows: what `l7gate observe` talks to."""

    def __init__(self, tmp: Path) -> None:
        self.ring = FlowRing(100)
        self.ring.publish(recorded_flows())
        hooks = AdminHooks(
            status=lambda: {}, xds_status=lambda: {}, xds_config=lambda n, t: {},
            metrics=lambda: (b"", "text/plain"),
            flows=lambda q: stream(self.ring, FlowQuery.from_query(q), heartbeat=0.05),
        )
        self.server = AdminServer(AdminApp(None, hooks), f"unix:{tmp}/admin.sock")  # type: ignore[arg-type]
        self.server.start()
        self.address = self.server.address


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FlowAdmin]:
    a = FlowAdmin(tmp_path)
    yield a
    a.ring.close()
    a.server.stop()


def run(admin: FlowAdmin, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    rc = cli.main(["observe", "--admin", admin.address, *args])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def squash(line: str) -> str:
    return " ".join(line.split())


def test_text_table_with_the_articles_lines(admin: FlowAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, err = run(admin, capsys, "--to-pod", "payments/billing-service-xyz")
    assert rc == 0 and err == ""
    assert squash(lines[0]) == "TIMESTAMP SOURCE DESTINATION TYPE VERDICT SUMMARY"
    body = [squash(x) for x in lines[1:]]
    assert len(body) == 5
    assert body[0].endswith(
        "cluster-b/web/frontend-service-abc (127.77.2.55) -> payments/billing-service-xyz (127.77.1.10) "
        "http-request FORWARDED POST http://billing-service.payments/v1/charge"
    )
    assert body[1].endswith(
        "payments/billing-service-xyz (127.77.1.10) -> cluster-b/web/frontend-service-abc (127.77.2.55) "
        "http-response FORWARDED 200"
    )
    assert body[2].endswith("l7 DROPPED Policy denied (L7)")


@pytest.mark.parametrize("fmt", ["json", "jsonpb"])
def test_json_formats(admin: FlowAdmin, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    rc, lines, _ = run(admin, capsys, "-o", fmt, "--verdict", "dropped")
    assert rc == 0
    objs = [json.loads(x) for x in lines]
    flows = [flow_from_json(o["flow"] if fmt == "jsonpb" else o) for o in objs]
    assert flows == [f for f in recorded_flows() if f.verdict.value == "DROPPED"]


def test_compact_and_last(admin: FlowAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, _ = run(admin, capsys, "-o", "compact", "--last", "2")
    assert rc == 0 and len(lines) == 2
    assert lines[0].endswith("http-request FORWARDED (POST http://billing-service.payments/v1/charge)")
    assert "http-response ERROR (503 " in lines[1]


def test_filters_travel_to_the_agent(admin: FlowAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, _ = run(admin, capsys, "-o", "compact", "--from-identity", "world", "--http-method", "POST")
    assert rc == 0 and len(lines) == 1 and "(world)" in lines[0]
    rc, lines, _ = run(admin, capsys, "--http-status", "5+", "--since", "1000d")
    assert rc == 0 and len(lines) == 2 and "503" in lines[1]
    rc, lines, _ = run(admin, capsys, "--since", "1m")  # recorded long ago
    assert rc == 0 and lines == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--http-path", "("], "--http-path '(': invalid regex"),
        (["--verdict", "ALLOW"], "--verdict 'ALLOW': expected one of"),
        (["--since", "5 minutes"], "--since '5 minutes': expected a duration"),
        (["--type", "http"], "--type 'http': expected one of l7, l3l4, drop"),
        (["--to-pod", "a/b/c/d"], "--to-pod 'a/b/c/d'"),
        (["--from-identity", "frontend"], "--from-identity 'frontend'"),
    ],
)
def test_bad_values_exit_2_before_asking_the_agent(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rc = cli.main(["observe", "--admin", "unix:/nonexistent/admin.sock", *args])
    err = capsys.readouterr().err
    assert rc == 2 and f"l7gate: error: {message}" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--colour", "red"], "unrecognized arguments: --colour red"),
        (["--last", "many"], "argument --last: not a count: 'many'"),
        (["-o", "yaml"], "argument -o/--output: invalid choice: 'yaml'"),
    ],
)
def test_unknown_flags_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["observe", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err and "--help`" in err


def test_the_agent_refuses_a_bad_query_with_400(admin: FlowAdmin) -> None:
    client = AdminClient(admin.address)
    with pytest.raises(AdminError) as exc:
        client.get("/v1/flows?filter=%7B%22verdict%22%3A%5B%22MAYBE%22%5D%7D")
    assert exc.value.status == 400 and "--verdict 'MAYBE'" in str(exc.value)


def test_follow_streams_new_flows_and_ends_when_the_agent_stops(
    admin: FlowAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    result: dict[str, Any] = {}

    def follow() -> None:
        result["rc"] = cli.main(["observe", "--admin", admin.address, "-f", "-o", "compact", "--last", "1"])

    t = threading.Thread(target=follow)
    t.start()
    eventually(lambda: admin.ring.stats().followers == 1, 5, "`l7gate observe -f` to follow")
    admin.ring.publish(recorded_flows()[2:3])
    admin.ring.close()  # what was published before is still sent, then the stream ends
    t.join(5)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    assert "http-response ERROR" in lines[0] and lines[1].endswith("l7 DROPPED (Policy denied (L7))")
    assert result["rc"] == 1 and "the agent ended the flow stream" in err


def test_unreachable_agent(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = cli.main(["observe", "--admin", f"unix:{tmp_path}/none.sock"])
    assert rc == 2 and "cannot reach the agent" in capsys.readouterr().err


def test_config_observe_section() -> None:
    from l7gate.agent.config import ConfigError, parse_config

    cfg = parse_config({"observe": {"ringSize": 100, "followBuffer": 50}})
    assert (cfg.observe.ring_size, cfg.observe.follow_buffer) == (100, 50)
    assert parse_config({}).observe.ring_size == 4096
    with pytest.raises(ConfigError) as exc:
        parse_config({"observe": {"ringSize": 0, "colour": 1}})
    text = str(exc.value)
    assert "observe.ringSize: must be an integer 1-1048576, got 0" in text and "observe.colour: unknown field" in text
