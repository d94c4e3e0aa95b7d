"""Request-path normalization: the table Envoy's settings imply, and its invariants.

The L7 rules only ever see `normalize_path(raw).path`, so a path that normalizes differently
here than in Envoy is a policy bypass (`/v1/%72efund` slipping past a rule on `/v1/refund`).
Cases Hypothesis has found are kept in `tests/corpus/pathnorm/*.json`:
``{"raw": "...", "normalized": "..." | null}`` (null: rejected), replayed by `test_corpus`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from l7gate.policy.pathnorm import normalize_path

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "pathnorm"
SCALE = int(os.environ.get("L7GATE_PROPERTY_SCALE", "1"))
UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_ESCAPE = re.compile(r"%(..)")


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/v1/refund", "/v1/refund"),
        ("/v1//refund", "/v1/refund"),
        ("//v1///refund", "/v1/refund"),
        ("/v1/%72efund", "/v1/refund"),
        ("/v1/%72%65fund", "/v1/refund"),
        ("/%41%7a%2d%2E%5f%7E", "/Az-._~"),
        ("/v1/x/../refund", "/v1/refund"),
        ("/v1/./refund", "/v1/refund"),
        ("/v1/x/%2e%2E/refund", "/v1/refund"),
        ("/v1/x/.%2e/refund", "/v1/refund"),
        ("/../../v1/refund", "/v1/refund"),
        ("/v1/refund/..", "/v1/"),
        ("/v1/refund/.", "/v1/refund/"),
        ("/v1\\refund", "/v1/refund"),
        ("/v1/x\\..\\refund", "/v1/refund"),
        ("/V1/charge", "/V1/charge"),
        ("/v1/charge?x=1", "/v1/charge?x=1"),
        ("/v1//charge?next=/a//b/../c", "/v1/charge?next=/a//b/../c"),
        ("/v1/charge?to=%2F", "/v1/charge?to=%2F"),
        ("/v1/charge?", "/v1/charge?"),
        ("/a%3ab", "/a%3Ab"),
        ("/a%20b", "/a%20b"),
        ("/%25", "/%25"),
        ("/%2541", "/%2541"),
        ("/", "/"),
        ("/...", "/..."),
    ],
)
def test_normalizes(raw: str, normalized: str) -> None:
    got = normalize_path(raw)
    assert got.rejected is None, f"{raw!r} rejected: {got.rejected}"
    assert got.path == normalized


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/v1%2Frefund", "escaped slash"),
        ("/v1%2frefund", "escaped slash"),
        ("/v1%5Crefund", "escaped slash"),
        ("/v1%5crefund", "escaped slash"),
        ("/v1/charge#frag", "fragment"),
        ("/v1/charge?x=1#frag", "fragment"),
        ("#", "fragment"),
        ("/v1/%zz", "percent"),
        ("/v1/%4", "percent"),
        ("/v1/%", "percent"),
        ("v1/charge", "start with '/'"),
        ("*", "start with '/'"),
        ("", "start with '/'"),
        ("?x=/", "start with '/'"),
    ],
)
def test_rejects(raw: str, why: str) -> None:
    got = normalize_path(raw)
    assert got.rejected is not None, f"{raw!r} accepted as {got.path!r}"
    assert why in got.rejected
    assert got.path == ""


# -- properties -------------------------------------------------------------------------------

# Paths built from the characters that matter: separators, dots, escapes (valid, malformed,
# slash-encoding), backslashes, query and fragment marks.
_PIECES = st.sampled_from((
    "/", "/", "//", ".", "..", "a", "B", "v1", "%41", "%61", "%2e", "%2E", "%2F", "%2f",
    "%5C", "%5c", "%25", "%3a", "%3F", "%20", "%C3%A9", "%", "%4", "%zz", "\\", "?", "#", "~",
    "-", "_", "é", ";", "=", "&",
))
paths = st.lists(_PIECES, max_size=12).map("".join) | st.text(max_size=12)
rooted = st.lists(_PIECES, max_size=12).map(lambda ps: "/" + "".join(ps))
# Path parts with no query, fragment or partial escape, which could swallow what follows them.
_CLEAN = _PIECES.filter(lambda p: p not in ("?", "#", "%", "%4"))
clean_rooted = st.lists(_CLEAN, max_size=10).map(lambda ps: "/" + "".join(ps))


def split(path: str) -> tuple[str, str | None]:
    p, sep, q = path.partition("?")
    return p, (q if sep else None)


def expected_rejection(raw: str) -> bool:
    """Envoy's refusals, stated independently: fragment, relative path, escaped slash or
    backslash in the path part, malformed percent-encoding in the path part."""
    if "#" in raw:
        return True
    path, _ = split(raw)
    if not path.startswith("/"):
        return True
    if re.search(r"%(2f|5c)", path, re.IGNORECASE):
        return True
    return bool(re.search(r"%(?![0-9A-Fa-f]{2})", path))


@examples(600)
@given(paths | rooted)
def test_rejects_exactly_what_envoy_refuses(raw: str) -> None:
    got = normalize_path(raw)
    assert (got.rejected is not None) == expected_rejection(raw), (raw, got)


@examples(600)
@given(rooted)
def test_normalized_path_is_canonical(raw: str) -> None:
    got = normalize_path(raw)
    if got.rejected is not None:
        return
    path, query = split(got.path)
    note(f"{raw!r} -> {got.path!r}")
    assert path.startswith("/")
    assert "//" not in path
    assert "\\" not in path
    segments = path.split("/")[1:]
    assert "." not in segments and ".." not in segments, "dot segment left in the path"
    for hexpair in _ESCAPE.findall(path):
        assert hexpair == hexpair.upper(), f"escape %{hexpair} not upper-cased"
        assert chr(int(hexpair, 16)) not in UNRESERVED, f"escape %{hexpair} of an unreserved character kept"
    assert query == split(raw)[1], "the query string must be kept as it is"
    again = normalize_path(got.path)
    assert again.rejected is None, f"normalized path {got.path!r} is itself rejected: {again.rejected}"
    assert again.path == got.path, "normalization is not idempotent"


@examples(300)
@given(clean_rooted, st.sampled_from(UNRESERVED), rooted, st.booleans())
def test_escaped_unreserved_character_is_the_character(prefix: str, ch: str, suffix: str, lower: bool) -> None:
    """`%72` is `r`: rules written on the plain path also apply to its escaped spelling."""
    escape = f"%{ord(ch):02X}"
    escaped = prefix + (escape.lower() if lower else escape) + suffix
    plain = prefix + ch + suffix
    a, b = normalize_path(escaped), normalize_path(plain)
    note(f"{escaped!r} -> {a}; {plain!r} -> {b}")
    assert a == b


@examples(300)
@given(rooted, st.sampled_from(("%2F", "%2f", "%5C", "%5c", "#")), rooted)
def test_escaped_slash_and_fragment_are_always_rejected(prefix: str, bad: str, suffix: str) -> None:
    raw = prefix + bad + suffix
    if bad != "#" and "?" in prefix:
        return  # in the query string an escaped slash is just data
    assert normalize_path(raw).rejected is not None


# -- corpus replay ----------------------------------------------------------------------------


def corpus_cases() -> list[Any]:
    cases = []
    for path in sorted(CORPUS.glob("*.json")):
        case = json.loads(path.read_text())
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
        cases.append(pytest.param(case, id=path.stem, marks=marks))
    return cases


@pytest.mark.parametrize("case", corpus_cases())
def test_corpus(case: dict[str, Any]) -> None:
    got = normalize_path(case["raw"])
    if case["normalized"] is None:
        assert got.rejected is not None, got
    else:
        assert got.rejected is None, got
        assert got.path == case["normalized"]


@given(paths | rooted)
def test_the_shortcut_for_plain_paths_changes_nothing(raw: str) -> None:
    from l7gate.policy.pathnorm import normalize_path_steps

    assert normalize_path(raw) == normalize_path_steps(raw)
