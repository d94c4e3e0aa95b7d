"""Every `l7gate observe` filter on recorded flows, and every way to get a filter value wrong."""

from __future__ import annotations

import json

import pytest

from l7gate.observe.api import FlowQuery, query_path
from l7gate.observe.filters import FilterError, FlowFilter, parse_duration, parse_since
from l7gate.observe.flow import POLICY_DENIED, Endpoint, Flow, FlowType, Verdict

from .test_observe_data import BILLING_ID, BILLING_IP, FRONTEND_ID, recorded_flows

# The corpus: the recorded entries' flows, in order, plus one L3/L4 drop (the shape a kernel
# drop event takes).
#   0 frontend → billing-xyz   http-request  FORWARDED  POST /v1/charge
#   1 billing-xyz → frontend   http-response FORWARDED  200 (reply)
#   2 frontend → billing-xyz   l7            DROPPED    GET /v1/transactions, 403
#   3 frontend → billing-xyz   l7            ERROR      POST, 400 path_normalization_failed
#   4 world → billing-xyz      l7            DROPPED    POST /v1/charge, 403
#   5 frontend → billing-k2m4p http-request  FORWARDED  POST /v1/charge
#   6 billing-k2m4p → frontend http-response ERROR      503 (reply)
#   7 world → billing-xyz      l3-l4         DROPPED    Policy denied
L34 = Flow(
    time=recorded_flows()[-1].time + 1, verdict=Verdict.DROPPED, type=FlowType.L3_L4,
    source=Endpoint("10.1.2.3", 40000, 2, labels=("reserved:world",)),
    destination=Endpoint(BILLING_IP, 8080, BILLING_ID, "cluster-a", "payments", "billing-service-xyz"),
    drop_reason_desc=POLICY_DENIED, summary=POLICY_DENIED, node_name="cluster-a/node-a1",
)
CORPUS = [*recorded_flows(), L34]
ALL = set(range(len(CORPUS)))
FROM_FRONTEND = {0, 1, 2, 3, 5, 6}


def matching(**flags: list[str]) -> set[int]:
    pred = FlowFilter.parse(**flags).compile()
    return {i for i, f in enumerate(CORPUS) if pred(f)}


def test_corpus_is_what_the_table_says() -> None:
    assert len(CORPUS) == 8
    assert [f.verdict.value for f in CORPUS] == [
        "FORWARDED", "FORWARDED", "DROPPED", "ERROR", "DROPPED", "FORWARDED", "ERROR", "DROPPED",
    ]


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({}, ALL),
        # --from-pod / --to-pod follow the connection: replies match by their request's pods.
        ({"source_pod": ["web/frontend"]}, FROM_FRONTEND),
        ({"source_pod": ["cluster-b/web/frontend-service-abc"]}, FROM_FRONTEND),
        ({"source_pod": ["cluster-a/web/frontend"]}, set()),
        ({"source_pod": ["web/"]}, FROM_FRONTEND),
        ({"destination_pod": ["payments/billing-service-xyz"]}, {0, 1, 2, 3, 4, 7}),
        ({"destination_pod": ["payments/billing"]}, ALL),
        ({"destination_pod": ["payments/billing-service-k2m4p"]}, {5, 6}),
        ({"destination_pod": ["web/frontend"]}, set()),
        ({"destination_pod": ["payments/billing-service-k2m4p", "payments/billing-service-xyz"]}, ALL),
        # --pod: either side, packet direction does not matter.
        ({"pod": ["payments/billing-service-k2m4p"]}, {5, 6}),
        ({"pod": ["web/frontend-service-abc"]}, FROM_FRONTEND),
        ({"pod": ["frontend-service-abc"]}, set()),  # a bare name is in namespace default
        ({"namespace": ["web"]}, FROM_FRONTEND),
        ({"namespace": ["payments"]}, ALL),
        ({"namespace": ["kube-system"]}, set()),
        ({"source_identity": ["world"]}, {4, 7}),
        ({"source_identity": ["2"]}, {4, 7}),
        ({"source_identity": ["reserved:world"]}, {4, 7}),
        ({"source_identity": [str(FRONTEND_ID)]}, FROM_FRONTEND),
        ({"destination_identity": [str(BILLING_ID)]}, ALL),
        ({"destination_identity": [str(FRONTEND_ID)]}, set()),
        ({"verdict": ["DROPPED"]}, {2, 4, 7}),
        ({"verdict": ["forwarded", "error"]}, {0, 1, 3, 5, 6}),
        ({"verdict": ["AUDIT"]}, set()),
        ({"type": ["l7"]}, {0, 1, 2, 3, 4, 5, 6}),
        ({"type": ["l3l4"]}, {7}),
        ({"type": ["L3_L4"]}, {7}),
        ({"type": ["drop"]}, {2, 4, 7}),
        ({"type": ["drop", "l3l4"]}, {2, 4, 7}),
        ({"http_method": ["get"]}, {2}),
        ({"http_method": ["POST"]}, {0, 1, 3, 4, 5, 6}),
        ({"http_path": ["^/v1/charge$"]}, {0, 1, 4, 5, 6}),
        ({"http_path": ["trans"]}, {2}),
        ({"http_path": ["refund", "trans"]}, {2, 3}),  # Envoy logged the 400's path decoded
        ({"http_status_code": ["200"]}, {1}),
        ({"http_status_code": ["4+"]}, {2, 3, 4}),
        ({"http_status_code": ["40+"]}, {2, 3, 4}),
        ({"http_status_code": ["403"]}, {2, 4}),
        ({"http_status_code": ["5+"]}, {6}),
        # Different flags AND.
        ({"destination_pod": ["payments/billing-service-xyz"], "verdict": ["DROPPED"], "type": ["l7"]}, {2, 4}),
        ({"source_pod": ["web/frontend"], "http_status_code": ["5+"]}, {6}),
        ({"namespace": ["web"], "verdict": ["DROPPED"]}, {2}),
    ],
)
def test_filter_on_recorded_flows(flags: dict[str, list[str]], expected: set[int]) -> None:
    assert matching(**flags) == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"http_path": ["("]}, "--http-path '(': invalid regex"),
        ({"verdict": ["ALLOWED"]}, "--verdict 'ALLOWED': expected one of FORWARDED, DROPPED"),
        ({"type": ["trace"]}, "--type 'trace': expected one of l7, l3l4, drop"),
        ({"source_identity": ["frontend"]}, "--from-identity 'frontend': expected an identity number"),
        ({"destination_identity": ["-1"]}, "--to-identity '-1'"),
        ({"source_pod": ["a/b/c/d"]}, "--from-pod 'a/b/c/d': expected [CLUSTER/]NAMESPACE/POD"),
        ({"destination_pod": ["/pod"]}, "--to-pod '/pod': the namespace is empty"),
        ({"pod": [""]}, "--pod ''"),
        ({"namespace": ["a/b"]}, "--namespace 'a/b': expected a namespace name"),
        ({"http_status_code": ["2xx"]}, "--http-status '2xx': expected a status code"),
        ({"http_status_code": ["600"]}, "--http-status '600'"),
        ({"http_method": ["G T"]}, "--http-method 'G T'"),
    ],
)
def test_bad_values_are_named_with_their_flag(flags: dict[str, list[str]], message: str) -> None:
    with pytest.raises(FilterError) as exc:
        FlowFilter.parse(**flags)
    assert any(e.startswith(message) for e in exc.value.errors), exc.value.errors


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(FilterError) as exc:
        FlowFilter.parse(verdict=["nope"], http_path=["["], type=["x"])
    assert len(exc.value.errors) == 3


def test_json_round_trip_and_validation() -> None:
    flt = FlowFilter.parse(destination_pod=["payments/billing"], verdict=["dropped"], http_path=["^/v1/.*"])
    assert flt.verdict == ("DROPPED",)
    assert FlowFilter.from_json(json.loads(json.dumps(flt.to_json()))) == flt
    assert not FlowFilter() and flt
    with pytest.raises(FilterError, match="unknown filter 'colour'"):
        FlowFilter.from_json({"colour": ["red"]})
    with pytest.raises(FilterError, match="expected a JSON object"):
        FlowFilter.from_json(["verdict"])
    with pytest.raises(FilterError, match="expected a list of strings"):
        FlowFilter.from_json({"verdict": "DROPPED"})


NOW = 1_714_141_200_000_000_000  # 2024-04-26T14:20:00Z


@pytest.mark.parametrize(
    "value, expected",
    [
        ("5m", NOW - 300 * 10**9),
        ("1h30m", NOW - 5400 * 10**9),
        ("90s", NOW - 90 * 10**9),
        ("250ms", NOW - 250 * 10**6),
        ("1.5h", NOW - 5400 * 10**9),
        ("2024-04-26T14:20:00Z", NOW),
        ("2024-04-26T16:20:00.5+02:00", NOW + 500_000_000),
        ("2024-04-26T14:20:00.123456789Z", NOW + 123_456_789),
    ],
)
def test_since(value: str, expected: int) -> None:
    assert parse_since(value, NOW) == expected


@pytest.mark.parametrize("value", ["", "5", "5x", "m5", "yesterday", "2024-04-26", "2024-04-26T14:20:00", "5m ago"])
def test_bad_since(value: str) -> None:
    with pytest.raises(ValueError):
        parse_since(value, NOW)


def test_duration() -> None:
    assert parse_duration("1d") == 86_400 * 10**9
    assert parse_duration("2m30s") == 150 * 10**9


def test_query_round_trip_and_errors() -> None:
    from urllib.parse import parse_qs, urlsplit

    flt = FlowFilter.parse(source_pod=["web/frontend"], http_status_code=["4+"])
    path = query_path(flt, since="5m", last=20, follow=True)
    url = urlsplit(path)
    assert url.path == "/v1/flows"
    q = {k: v[-1] for k, v in parse_qs(url.query).items()}
    fq = FlowQuery.from_query(q, now_ns=NOW)
    assert fq == FlowQuery(flt, NOW - 300 * 10**9, 20, True)
    with pytest.raises(FilterError) as exc:
        FlowQuery.from_query({"filter": "{", "last": "x", "since": "5y", "colour": "red"})
    errs = " | ".join(exc.value.errors)
    assert "filter: invalid JSON" in errs and "--last 'x'" in errs
    assert "--since '5y'" in errs and "unknown query parameter(s): colour" in errs
    with pytest.raises(FilterError, match="--verdict"):
        FlowQuery.from_query({"filter": '{"verdict": ["MAYBE"]}'})
