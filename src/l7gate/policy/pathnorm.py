"""Request-path normalization, the same in the reference evaluator, the h11 engine and Envoy.

Envoy is configured with `normalize_path: true`, `merge_slashes: true` and
`path_with_escaped_slashes_action: REJECT_REQUEST`. This module reproduces what that does to a
`:path` before any rule sees it, so that `/v1//refund`, `/v1/%72efund` and `/v1/x/../refund` all
become `/v1/refund`, and `/v1%2Frefund` or a `#fragment` is refused outright:

1. A `#` anywhere is refused (Envoy answers 400).
2. The query string is split off and kept as it is; only the path part is normalized.
3. An escaped slash or backslash (`%2F`, `%5C`, any case) is refused.
4. Percent-encoded unreserved characters (A-Z a-z 0-9 - . _ ~) are decoded; other escapes are
   upper-cased (RFC 3986 6.2.2).
5. A backslash is a slash (Envoy's URL canonicalizer treats them alike).
6. Dot segments are removed (RFC 3986 5.2.4), then runs of slashes are merged.

The rules match against the result: path and query, as Cilium matches the whole `:path`.
"""

from __future__ import annotations

from dataclasses import dataclass

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    path: str  # normalized path + "?" + query when there is one; "" when rejected
    rejected: str | None = None  # why the request is refused (Envoy: 400), or None


def _decode_unreserved(path: str) -> str | None:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c == "%":
            h = path[i + 1 : i + 3]
            if len(h) != 2 or not all(x in _HEX for x in h):
                return None
            ch = chr(int(h, 16))
            out.append(ch if ch in _UNRESERVED else "%" + h.upper())
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4, on a path that starts with "/".
    output: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                output.append("")
        elif seg == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(seg)
    return "/" + "/".join(output)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def _plain(path: str) -> bool:
    """A path normalization leaves as it is: no escape, backslash, dot segment or repeated
    slash (most requests); the full steps below give the same answer for it."""
    return not ("%" in path or "\\" in path or "//" in path or "/." in path)


def normalize_path(raw: str) -> NormalizedPath:
    if "#" not in raw and raw.startswith("/") and _plain(raw.partition("?")[0]):
        return NormalizedPath(raw)
    return normalize_path_steps(raw)


def normalize_path_steps(raw: str) -> NormalizedPath:
    """`normalize_path` without its shortcut for plain paths: every step, always."""
    if "#" in raw:
        return NormalizedPath("", "fragment (#) in the request target")
    path, sep, query = raw.partition("?")
    if not path.startswith("/"):
        return NormalizedPath("", "the request path must start with '/'")
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered:
        return NormalizedPath("", "escaped slash (%2F or %5C) in the path")
    decoded = _decode_unreserved(path)
    if decoded is None:
        return NormalizedPath("", "malformed percent-encoding in the path")
    decoded = decoded.replace("\\", "/")
    normalized = _merge_slashes(_remove_dot_segments(decoded))
    return NormalizedPath(normalized + (sep + query if sep else ""))
