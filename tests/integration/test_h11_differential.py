"""Differential conformance of the two L7 engines (issue: the h11 engine): the same policies and
the same requests given to a real Envoy and to the h11 engine, each configured by its own agent
(loopback mode, the seed's pods, different 127.x subnets), must get the same answers, and the
reference evaluator's where it has one.

- Generated policies x generated HTTP/1.1 requests: h11 status == Envoy status == evaluator.
- Generated raw requests, malformed ones included (methods, targets, versions, header lines,
  framing, line endings), under the seed policy: the engines answer with the same status, except
  in the divergences docs/h11-engine.md lists, where the h11 engine refuses what Envoy lets
  through and never the other way round.

Every new divergence is written to tests/corpus/h11/new-failure.json and fails the test; a
file renamed there is replayed forever (fixed, or a documented divergence)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l7gate.agent import views
from l7gate.testing.wait import eventually

from .loopback import World, loopback_world
from .test_envoy_differential import METHODS, PATHS, docs_of, expected_status, spec

pytestmark = pytest.mark.integration

ENVOY_S, H11_S = 68, 69
CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "h11"
SOURCES = {"frontend": "2.55", "other": "2.60", "unknown": "9.9"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, require_envoy: None) -> Iterator[dict[str, World]]:
    with loopback_world(tmp_path_factory.mktemp("l7g-h11d-envoy"), ENVOY_S) as envoy:
        with loopback_world(tmp_path_factory.mktemp("l7g-h11d-h11"), H11_S, proxy_engine="h11") as h11:
            yield {"envoy": envoy, "h11": h11}


def _subnet(world: World) -> int:
    return H11_S if world.agent.engine is not None else ENVOY_S


def send_raw(world: World, src: str, data: bytes) -> int:
    """The status of the first response to `data` (0: no response, the connection closed)."""
    s = _subnet(world)
    try:
        sock = socket.create_connection((f"127.{s}.1.10", 8080), timeout=3, source_address=(f"127.{s}.{SOURCES[src]}", 0))
    except OSError:
        return 0
    buf = b""
    try:
        sock.sendall(data)
        deadline = time.monotonic() + 3
        while b"\r\n" not in buf and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
            while buf.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in buf:  # 100 Continue: the next one
                buf = buf.split(b"\r\n\r\n", 1)[1]
    except OSError:
        pass
    finally:
        sock.close()
    parts = buf.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0


def _apply(world: World, docs: list[dict[str, Any]]) -> None:
    core = world.core
    for p in views.policies(core.view()):
        core.delete_policy(p["key"])
    if docs:
        core.apply(docs)
    world.synced()


def _record(case: dict[str, Any], message: str) -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    (CORPUS / "new-failure.json").write_text(json.dumps(case, indent=2, sort_keys=True) + "\n")
    raise AssertionError(message)


def _request_bytes(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: billing-service.payments\r\nContent-Length: 0\r\n\r\n".encode()


def check_policies(worlds: dict[str, World], specs: list[dict[str, Any]], reqs: list[tuple[str, str, str]]) -> None:
    docs = docs_of(specs)
    for w in worlds.values():
        _apply(w, docs)
    for src, method, path in reqs:
        want = expected_status(worlds["h11"], docs, src, method, path, subnet=H11_S)
        got: dict[str, int] = {}

        def agree() -> bool:
            for name, w in worlds.items():
                got[name] = send_raw(w, src, _request_bytes(method, path))
            return got == {"envoy": want, "h11": want}

        try:  # Envoy's workers take an ACKed config a moment later: a divergence must persist
            eventually(agree, 5.0, "both engines to agree with the evaluator")
        except AssertionError:
            _record({"specs": specs, "requests": [[src, method, path]]},
                    f"{src} {method} {path}: evaluator {want}, {got}\n{json.dumps(docs, indent=1)}")


http_requests = st.lists(st.tuples(st.sampled_from(sorted(SOURCES)), st.sampled_from(METHODS), st.sampled_from(PATHS)),
                         min_size=3, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(spec, min_size=0, max_size=3), reqs=http_requests)
def test_engines_agree_with_the_evaluator(worlds: dict[str, World], specs: list[dict[str, Any]],
                                          reqs: list[tuple[str, str, str]]) -> None:
    check_policies(worlds, specs, reqs)


# -- raw requests under the seed policy ------------------------------------------------------------

RAW_METHODS = [b"POST", b"GET", b"post", b"M-SEARCH", b"FOO", b"CONNECT", b"OPTIONS", b"HEAD"]
RAW_TARGETS = [b"/v1/charge", b"/v1/refund", b"/v1//charge", b"/v1/x/../charge", b"/v1%2Fcharge", b"/v1/charge#x",
               b"*", b"/v1/caf\xc3\xa9", b"v1/charge", b"/v1/charge?a=1", b"/v1/%63harge", b"/v1/charge\\..\\refund",
               b"http://a/v1/charge", b"a:443"]
RAW_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"]
RAW_HEADERS = [
    b"Host: a", b"Host: b", b"Content-Length: 0", b"Content-Length: 3", b"Content-Length: 3, 3", b"Content-Length: +3",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: Chunked", b"X-A: b\r\n c", b"X : b", b"X: a\tb", b"X: caf\xc3\xa9", b"Expect: 100-continue",
    b"Connection: close", b"Connection: Upgrade\r\nUpgrade: h2c", b"X-Forwarded-For: 10.0.0.1", b"X: a\rb",
    b"Content-Length: 99999999999999999999",
]
RAW_BODIES = [b"", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n"]


@st.composite
def raw_request(draw: st.DrawFn) -> bytes:
    line = b" ".join([draw(st.sampled_from(RAW_METHODS)), draw(st.sampled_from(RAW_TARGETS)),
                      draw(st.sampled_from(RAW_VERSIONS))])
    headers = draw(st.lists(st.sampled_from(RAW_HEADERS), max_size=4))
    if draw(st.booleans()):
        headers = [b"Host: a", *headers]
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    return eol.join([line, *headers]) + eol + eol + draw(st.sampled_from(RAW_BODIES))


# Where the engines answer differently on purpose (docs/h11-engine.md, "Divergences"): each
# predicate names the case; in each, the h11 engine refuses (4xx) what Envoy answers otherwise.
def _headers_of(data: bytes) -> list[bytes]:
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return head.split(b"\n")[1:]


DIVERGENCES = {
    "several Host headers (RFC 9112 3.2: 400; Envoy keeps the first)":
        lambda d: sum(1 for h in _headers_of(d) if h.lower().startswith(b"host:")) > 1,
    "a CR inside a header line (h11 refuses the byte; Envoy's codec takes it)":
        lambda d: any(b"\r" in h for h in _headers_of(d.replace(b"\r\n", b"\n"))),
    "an absolute-form target (h11 engine: 400; Envoy: judged as its path)":
        lambda d: d.split(b" ", 2)[1:2] == [b"http://a/v1/charge"],
}


def divergence(data: bytes) -> str | None:
    return next((name for name, pred in DIVERGENCES.items() if pred(data)), None)


def check_raw(worlds: dict[str, World], data: bytes, src: str = "frontend") -> None:
    got = {name: send_raw(w, src, data) for name, w in worlds.items()}
    if got["h11"] == got["envoy"]:
        return
    why = divergence(data)
    if why is not None and 400 <= got["h11"] < 500:
        return
    _record({"raw": data.decode("latin-1"), "source": src},
            f"{data!r}: Envoy {got['envoy']}, h11 {got['h11']}" + (f" (a known divergence: {why})" if why else ""))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=raw_request())
def test_engines_agree_on_raw_requests(worlds: dict[str, World], data: bytes) -> None:
    _seed(worlds)
    check_raw(worlds, data)


def _seed(worlds: dict[str, World]) -> None:
    """The seed policy on both worlds (the policy test replaces it)."""
    from .loopback import seed_policies

    keys = {f"{d['kind']}/{d['metadata']['name']}" for d in seed_policies()}
    if all({p["key"] for p in views.policies(w.core.view())} == keys for w in worlds.values()):
        return
    for w in worlds.values():
        _apply(w, seed_policies())
    eventually(lambda: all(send_raw(w, "frontend", _request_bytes("POST", "/v1/charge")) == 200
                           for w in worlds.values()), 10, "the seed policy in force on both engines")


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.json")) if CORPUS.exists() else [], ids=lambda p: p.stem)
def test_corpus(worlds: dict[str, World], case: Path) -> None:
    data = json.loads(case.read_text())
    if "raw" in data:
        _seed(worlds)
        check_raw(worlds, data["raw"].encode("latin-1"), data.get("source", "frontend"))
    else:
        check_policies(worlds, data["specs"], [tuple(r) for r in data["requests"]])  # type: ignore[misc]
