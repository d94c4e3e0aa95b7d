"""Kubernetes object names, checked as the API server checks them (DNS-1123), and port names
(IANA service names).

A policy's `metadata.name` and a Pod's are DNS-1123 subdomains (at most 253 characters); a
namespace name is a DNS-1123 label (at most 63, no dots). l7gate keys objects by
`kind/namespace/name`, so a `/` in either would make two objects one key: they are refused, like
everything Kubernetes itself would refuse. A problem names the character at fault and its
1-based position.
"""

from __future__ import annotations

import functools

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_LABEL_CHARS = _ALNUM | {"-"}
_SUBDOMAIN_CHARS = _LABEL_CHARS | {"."}

SUBDOMAIN_RULE = (
    "must be a DNS subdomain, as Kubernetes requires (DNS-1123: lowercase letters, digits, '-' and "
    "'.', each dot-separated part starting and ending with a letter or digit, at most 253 characters)"
)
LABEL_RULE = (
    "must be a DNS label, as Kubernetes requires (DNS-1123: lowercase letters, digits and '-', "
    "starting and ending with a letter or digit, at most 63 characters)"
)


def _char_problem(c: str, i: int, dots: bool) -> str:
    if c.isascii() and c.isupper():
        return f"{c!r} at position {i} is not allowed (uppercase: write {c.lower()!r})"
    if c == "." and not dots:
        return f"{c!r} at position {i} is not allowed (a DNS label has no dots)"
    return f"{c!r} at position {i} is not allowed"


def _problem(value: str, limit: int, dots: bool) -> str | None:
    """The first problem, scanning left to right (positions are 1-based), then the length."""
    if not value:
        return "must not be empty"
    allowed = _SUBDOMAIN_CHARS if dots else _LABEL_CHARS
    last = len(value) - 1
    for i, c in enumerate(value):
        if c not in allowed:
            return _char_problem(c, i + 1, dots)
        if c in _ALNUM:
            continue
        # '-' and '.' are never first or last, and each dot-separated part starts and ends
        # with a letter or digit
        if i == 0 or (c == "-" and value[i - 1] == "."):
            return f"{c!r} at position {i + 1}: must start with a lowercase letter or digit"
        if i == last or (c == "-" and value[i + 1] == "."):
            return f"{c!r} at position {i + 1}: must end with a lowercase letter or digit"
        if c == "." and value[i + 1] == ".":
            return f"'.' at position {i + 2}: empty part between dots"
    if len(value) > limit:
        return f"is {len(value)} characters long: at most {limit} are allowed"
    return None


def subdomain_problem(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain (a Pod's or a policy's name), or None."""
    return _problem(value, 253, dots=True)


def label_problem(value: str) -> str | None:
    """Why `value` is not a DNS-1123 label (a namespace's name), or None."""
    return _problem(value, 63, dots=False)


@functools.lru_cache(maxsize=16384)  # the same namespaces and service accounts, on every pod
def name_error(value: str, *, subdomain: bool) -> str | None:
    """The whole message for a bad name: the rule, what is wrong, and the value; or None."""
    problem = subdomain_problem(value) if subdomain else label_problem(value)
    if problem is None:
        return None
    rule = SUBDOMAIN_RULE if subdomain else LABEL_RULE
    return f"{rule}: {problem}; got {value!r}"


SERVICE_NAME_RULE = (
    "must be a DNS-1035 label, as Kubernetes requires of a Service name (lowercase letters, digits "
    "and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"
)


def service_name_error(value: str) -> str | None:
    """The whole message for a name no Service can have (a DNS-1035 label), or None."""
    problem = label_problem(value)
    if problem is None and not "a" <= value[0] <= "z":
        problem = f"{value[0]!r} at position 1: must start with a lowercase letter"
    if problem is None:
        return None
    return f"{SERVICE_NAME_RULE}: {problem}; got {value!r}"


PORT_NAME_RULE = (
    "must be an IANA service name, as Kubernetes requires (at most 15 lowercase letters, digits "
    "and '-', at least one letter, no '-' first, last or twice in a row)"
)


def port_name_problem(value: str) -> str | None:
    """Why `value` is not an IANA service name (a container port's name, a Service's named
    `targetPort`, a policy's named port), as Kubernetes checks it (`IsValidPortName`); or None."""
    if not value:
        return "must not be empty"
    if len(value) > 15:
        return f"is {len(value)} characters long: at most 15 are allowed"
    bad = next((c for c in value if c not in _LABEL_CHARS), None)
    if bad is not None:
        return f"{bad!r} is not allowed (lowercase letters, digits and '-' only)"
    if not any("a" <= c <= "z" for c in value):
        return "must contain at least one letter"
    if value.startswith("-") or value.endswith("-"):
        return "must not start or end with '-'"
    if "--" in value:
        return "must not contain '--'"
    return None
