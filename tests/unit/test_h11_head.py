"""The h11 engine's framing checks and verdicts, pure: the answers Envoy's HTTP/1 codec gives,
as measured on the Envoy this project runs (tests/integration/test_h11_differential.py checks
the engine against it live), and `policy.httpverdict.request_verdict`."""

from __future__ import annotations

import pytest

from l7gate.l7proxy.h11engine import EngineLimits, _head_problem
from l7gate.policy.httpverdict import named_policies, request_verdict
from l7gate.policy.mapstate import Action, Decision
from l7gate.policy.types import AuthMode, HTTPRequest, HTTPRule, Origin

H = b"Host: a"


@pytest.mark.parametrize("head, status", [
    (b"POST /v1/charge HTTP/1.1\r\n" + H, None),
    (b"POST /v1/charge HTTP/1.0\r\n" + H, 426),
    (b"POST /v1/charge HTTP/2.0\r\n" + H, 426),
    (b"POST /v1/charge", 426),  # HTTP/0.9
    (b"POST /v1/charge HTTP/1.1x\r\n" + H, 400),
    (b"post /v1/charge HTTP/1.1\r\n" + H, 400),
    (b"M-SEARCH /v1/charge HTTP/1.1\r\n" + H, 400),
    (b"QUERY /v1/charge HTTP/1.1\r\n" + H, 400),
    (b"PROPFIND /v1/charge HTTP/1.1\r\n" + H, None),
    (b"POST /v1/caf\xc3\xa9 HTTP/1.1\r\n" + H, 400),
    (b"POST v1/charge HTTP/1.0\r\n" + H, 400),  # the target's form before the version
    (b"POST * HTTP/1.1\r\n" + H, 400),
    (b"OPTIONS * HTTP/1.1\r\n" + H, None),
    (b"OPTIONS * HTTP/1.0\r\n" + H, 426),
    (b"CONNECT a:443 HTTP/1.1\r\n" + H, None),
    (b"CONNECT /x HTTP/1.1\r\n" + H, 400),
    (b"CONNECT a:443 HTTP/1.1\r\n" + H + b"\r\nTransfer-Encoding: chunked", 501),
    (b"CONNECT a:443 HTTP/1.1\r\n" + H + b"\r\nContent-Length: 3", 400),
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nX : b", 400),
    (b"POST /v1/charge HTTP/1.0\r\nX : b", 400),  # header syntax before the version
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", 400),
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nContent-Length: 3\r\nContent-Length: 3", 400),
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nContent-Length: 3, 3", 400),
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nContent-Length: +3", 400),
    (b"POST /v1/charge HTTP/1.0\r\nContent-Length: 99999999999999999999", 400),
    (b"POST /v1/charge HTTP/1.0\r\nTransfer-Encoding: gzip", 501),  # framing before the version
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nTransfer-Encoding: gzip, chunked", 501),
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nTransfer-Encoding: Chunked", None),
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"\r\nX-A: b\r\n c", None),  # obs-fold
    (b"POST /v1/charge HTTP/1.1\n" + H, None),  # bare LF
    (b"POST /v1/charge HTTP/1.1\r\n" + H + b"".join(b"\r\nX%d: a" % i for i in range(100)), 431),
])
def test_head_checks_answer_as_envoy(head: bytes, status: int | None) -> None:
    got = _head_problem(head, EngineLimits())
    assert (got.status if got else None) == status


POST_CHARGE = HTTPRule(method="POST", path="/v1/charge")


def req(method: str, path: str) -> HTTPRequest:
    return HTTPRequest(method, path, "a", {})


@pytest.mark.parametrize("d, r, auth_verified, allowed, action", [
    # A default deny (no rule states it: no origins) names no policy (`named_policies`).
    (Decision(Action.DENY, policies=("p",)), req("POST", "/v1/charge"), False, False, "deny-l3l4|"),
    (Decision(Action.ALLOW, policies=("p",)), req("GET", "/x"), False, True, "allow|p"),
    (Decision(Action.HTTP, http=(POST_CHARGE,), policies=("p",)), req("POST", "/v1/charge"), False, True, "allow|p"),
    (Decision(Action.HTTP, http=(POST_CHARGE,), policies=("p",)), req("GET", "/v1/charge"), False, False, "deny-l7|p"),
    (Decision(Action.AUTH_FAIL, policies=("p",)), req("POST", "/v1/charge"), True, False, "deny-auth|p"),
    # auth required: allowed only where the kernel verified it (kernel mode), fail closed otherwise
    (Decision(Action.ALLOW, auth=AuthMode.REQUIRED, policies=("p",)), req("GET", "/"), False, False, "deny-auth|p"),
    (Decision(Action.ALLOW, auth=AuthMode.REQUIRED, policies=("p",)), req("GET", "/"), True, True, "allow|p"),
])
def test_request_verdicts(d: Decision, r: HTTPRequest, auth_verified: bool, allowed: bool, action: str) -> None:
    v = request_verdict(d, r, r.path, auth_verified=auth_verified)
    assert (v.allowed, v.action) == (allowed, action)


def test_action_names_list_at_most_three_policies() -> None:
    o = (Origin("CiliumNetworkPolicy", "ns", "a", "spec.ingressDeny[0]"),)
    assert named_policies(Decision(Action.DENY, origins=o, policies=("a", "b", "c", "d"))) == "a,b,c,+more"
    assert named_policies(Decision(Action.ALLOW, origins=o, policies=("a", "b", "c"))) == "a,b,c"


def test_a_default_deny_names_no_policy() -> None:
    # World's decision and that of every peer no rule names: its leaf is in every source slot.
    assert named_policies(Decision(Action.DENY, policies=("a", "b", "c", "d"))) == ""


def _parsed(data: bytes) -> tuple[object, bytearray] | None:
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        ev = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return (ev, bytearray(data)) if isinstance(ev, h11.Request) else None


def test_the_shortcut_never_passes_what_the_full_check_refuses() -> None:
    from hypothesis import given, settings

    from l7gate.l7proxy.h11engine import _plainly_fine, _split_head

    from ..integration.test_h11_differential import raw_request

    @settings(max_examples=3000, deadline=None)
    @given(raw_request())
    def check(data: bytes) -> None:
        got = _parsed(data)
        if got is None:
            return
        req, raw = got
        if _plainly_fine(req, raw, EngineLimits()):  # type: ignore[arg-type]
            assert _head_problem(_split_head(bytes(raw)), EngineLimits()) is None, data

    check()
