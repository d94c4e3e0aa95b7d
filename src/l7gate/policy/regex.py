"""RE2 regexes as Envoy uses them: whole-value match, no backtracking constructs.

Validating with the same engine means a pattern accepted here is never NACKed by Envoy for its
syntax, and matches exactly the strings Envoy's `safe_regex` matches.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import re2

# Envoy rejects a regex whose compiled program is larger than the runtime value
# `re2.max_program_size.error_level` (100 unless the bootstrap raises it).
MAX_PROGRAM_SIZE = 100

_OPTIONS: Any = re2.Options()
_OPTIONS.log_errors = False  # errors are reported to the user with their field, not on stderr


class RegexError(ValueError):
    pass


@lru_cache(maxsize=65536)
def _compile(pattern: str) -> Any:
    """`pattern` compiled with RE2, whatever its size, or RegexError saying why (RE2's own words)."""
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RegexError(f"regex {pattern!r} is not valid Unicode text: {exc.reason}") from None
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise RegexError(f"invalid RE2 regex {pattern!r}: {detail}") from None


def compile_regex(pattern: str) -> Any:
    """Compile `pattern` with RE2 or raise RegexError saying why (invalid, or over Envoy's
    program-size limit)."""
    compiled = _compile(pattern)
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise RegexError(
            f"regex {pattern!r} compiles to an RE2 program of size {compiled.programsize}, "
            f"over Envoy's limit of {MAX_PROGRAM_SIZE}; simplify it"
        )
    return compiled


def compile_regex_size(pattern: str) -> int:
    """The size of `pattern`'s RE2 program (what Envoy's limit is on); RegexError if invalid."""
    return int(_compile(pattern).programsize)


def full_match(pattern: str, value: str) -> bool:
    """True when `pattern` matches the whole of `value` (Cilium/Envoy semantics)."""
    return compile_regex(pattern).fullmatch(value) is not None
