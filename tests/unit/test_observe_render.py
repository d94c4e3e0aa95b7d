"""Every output format of `l7gate observe`, on recorded flows."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from l7gate.observe.flow import (
    POLICY_DENIED,
    Endpoint,
    Flow,
    FlowDecodeError,
    FlowType,
    Verdict,
    flow_from_json,
    flow_to_json,
)
from l7gate.observe.render import Renderer, compact_line, timestamp, type_label

from .test_observe_data import recorded_flows

UTC = dt.UTC


def squash(line: str) -> str:
    return " ".join(line.split())


def test_timestamp_reads_like_the_article() -> None:
    assert timestamp(1_714_141_210_112_345_678, UTC) == "Apr 26 14:20:10.112"
    assert timestamp(1_709_280_000_005_000_000, UTC) == "Mar  1 08:00:00.005"


def test_text_table_is_the_articles() -> None:
    flows = recorded_flows()
    lines = Renderer("text", UTC).lines(flows)
    assert squash(lines[0]) == "TIMESTAMP SOURCE DESTINATION TYPE VERDICT SUMMARY"
    assert len(lines) == 1 + len(flows)
    ts = [timestamp(f.time, UTC) for f in flows]
    remote, local, local2 = (
        "cluster-b/web/frontend-service-abc (127.77.2.55)",
        "payments/billing-service-xyz (127.77.1.10)",
        "payments/billing-service-k2m4p (127.77.1.11)",
    )
    assert [squash(x) for x in lines[1:]] == [
        f"{ts[0]} {remote} -> {local} http-request FORWARDED POST http://billing-service.payments/v1/charge",
        f"{ts[1]} {local} -> {remote} http-response FORWARDED 200",
        f"{ts[2]} {remote} -> {local} l7 DROPPED Policy denied (L7)",
        f"{ts[3]} {remote} -> {local} l7 ERROR 400 path_normalization_failed",
        f"{ts[4]} 127.0.0.1 (world) -> {local} l7 DROPPED Policy denied",
        f"{ts[5]} {remote} -> {local2} http-request FORWARDED POST http://billing-service.payments/v1/charge",
        f"{ts[6]} {local2} -> {remote} http-response ERROR 503 upstream_reset_before_response_started"
        "{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    ]
    # Aligned columns: every row's TYPE starts where the header's does.
    col = lines[0].index("TYPE")
    assert all(x[col - 2 : col] == "  " and x[col] != " " for x in lines[1:])


def test_text_follow_prints_the_header_once() -> None:
    r = Renderer("text", UTC)
    first = r.lines(recorded_flows()[:1])
    second = r.lines(recorded_flows()[1:2])
    assert first[0].startswith("TIMESTAMP") and len(first) == 2
    assert len(second) == 1 and not second[0].startswith("TIMESTAMP")
    assert r.lines([]) == []


def test_a_peer_of_the_local_cluster_has_no_cluster_prefix() -> None:
    f = recorded_flows()[0]
    as_seen_from_b = dataclasses.replace(f, node_name="cluster-b/node-b1")
    line = squash(Renderer("text", UTC).lines([as_seen_from_b])[1])
    assert "web/frontend-service-abc (127.77.2.55) -> cluster-a/payments/billing-service-xyz (127.77.1.10)" in line


def test_type_labels() -> None:
    req, resp, denied, error = recorded_flows()[:4]
    assert [type_label(f) for f in (req, resp, denied, error)] == ["http-request", "http-response", "l7", "l7"]
    base = dict(time=0, source=Endpoint("10.0.0.1"), destination=Endpoint("10.0.0.2"))
    assert type_label(Flow(verdict=Verdict.DROPPED, type=FlowType.L3_L4, **base)) == "drop"  # type: ignore[arg-type]
    assert type_label(Flow(verdict=Verdict.FORWARDED, type=FlowType.L3_L4, **base)) == "l3-l4"  # type: ignore[arg-type]


def test_compact() -> None:
    f = recorded_flows()[2]
    assert compact_line(f, UTC) == (
        f"{timestamp(f.time, UTC)}: cluster-b/web/frontend-service-abc:{f.source.port} (ID:131328) -> "
        "payments/billing-service-xyz:8080 (ID:65792) l7 DROPPED (Policy denied (L7))"
    )
    world = recorded_flows()[4]
    assert f": 127.0.0.1:{world.source.port} (world) -> " in compact_line(world, UTC)
    assert len(Renderer("compact", UTC).lines(recorded_flows())) == 7


def test_json_lines_are_hubble_flows_that_decode_to_the_same_flow() -> None:
    flows = recorded_flows()
    lines = Renderer("json").lines(flows)
    objs = [json.loads(x) for x in lines]
    assert [flow_from_json(o) for o in objs] == flows
    req = objs[0]
    assert req["verdict"] == "FORWARDED" and req["Type"] == "L7" and req["Summary"] == flows[0].summary
    assert req["IP"] == {"source": "127.77.2.55", "destination": "127.77.1.10", "ipVersion": "IPv4"}
    assert req["l4"]["TCP"]["destination_port"] == 8080
    assert req["source"]["pod_name"] == "frontend-service-abc" and req["source"]["namespace"] == "web"
    assert req["source"]["cluster_name"] == "cluster-b" and req["source"]["identity"] == 131328
    assert "k8s:app=frontend-service" in req["source"]["labels"]
    assert req["l7"]["type"] == "REQUEST" and req["l7"]["http"]["method"] == "POST"
    assert req["traffic_direction"] == "INGRESS" and req["is_reply"] is False
    assert req["auth_type"] == "DISABLED" and req["event_type"] == {"type": 129}
    assert req["time"].endswith("Z") and len(req["time"]) == len("2026-11-26T10:18:45.159491000Z")
    assert objs[1]["l7"]["latency_ns"].isdigit() and objs[1]["is_reply"] is True
    assert objs[2]["drop_reason_desc"] == "Policy denied (L7)"
    assert objs[2]["policy_match"] == ["CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api"]


def test_jsonpb_wraps_each_flow_as_a_get_flows_response() -> None:
    flows = recorded_flows()
    objs = [json.loads(x) for x in Renderer("jsonpb").lines(flows)]
    assert all(set(o) == {"flow", "node_name", "time"} for o in objs)
    assert [flow_from_json(o["flow"]) for o in objs] == flows
    assert objs[0]["node_name"] == "cluster-a/node-a1" and objs[0]["time"] == objs[0]["flow"]["time"]


def test_l3l4_flow_round_trips() -> None:
    f = Flow(
        time=5, verdict=Verdict.DROPPED, type=FlowType.L3_L4, source=Endpoint("::1", 1, 2),
        destination=Endpoint("::2", 80, 300, "c", "ns", "p", ("k8s:a=b",)), drop_reason_desc=POLICY_DENIED,
    )
    obj = flow_to_json(f)
    assert obj["IP"]["ipVersion"] == "IPv6" and "l7" not in obj and obj["event_type"] == {"type": 1}
    assert flow_from_json(json.loads(json.dumps(obj))) == f


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda o: o.pop("time"), "flow.time"),
        (lambda o: o.update(time="yesterday"), "flow.time"),
        (lambda o: o.update(verdict="MAYBE"), "flow.verdict"),
        (lambda o: o.update(verdict=3), "flow.verdict"),
        (lambda o: o["source"].update(identity="x"), "flow.source.identity"),
        (lambda o: o["source"].update(labels="app=x"), "flow.source.labels"),
        (lambda o: o["l4"]["TCP"].update(source_port=[1]), "flow.l4.TCP.source_port"),
        (lambda o: o["l7"]["http"].update(headers={"a": "b"}), "flow.l7.http.headers"),
        (lambda o: o.update(is_reply="no"), "flow.is_reply"),
        (lambda o: o.update(l7=[]), "flow.l7"),
    ],
)
def test_decode_errors_name_the_field(mutate: object, path: str) -> None:
    obj = flow_to_json(recorded_flows()[0])
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(FlowDecodeError, match=path.replace(".", r"\.")):
        flow_from_json(obj)


def test_decoding_drops_sensitive_headers_too() -> None:
    obj = flow_to_json(recorded_flows()[0])
    obj["l7"]["http"]["headers"] = [{"key": "Authorization", "value": "Bearer x"}, {"key": "accept", "value": "*/*"}]
    f = flow_from_json(obj)
    assert f.http is not None and f.http.headers == (("accept", "*/*"),)


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown output format 'yaml'"):
        Renderer("yaml")
