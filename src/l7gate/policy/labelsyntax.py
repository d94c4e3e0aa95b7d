"""Label keys and values in selectors, checked as Cilium checks them before it accepts a rule.

A selector key is a Kubernetes qualified name (`app`, `app.kubernetes.io/name`), optionally
behind one source prefix (`k8s:app`, `reserved:host`); a key under
`io.cilium.k8s.namespace.labels.` is checked without that prefix, since it only says the label
is a namespace's. A value is a Kubernetes label value: at most 63 characters of letters,
digits, `-`, `_` and `.`, starting and ending with a letter or digit, or empty. Each check
returns why the text is refused, in words a policy author can act on, or None.
"""

from __future__ import annotations

import re

from .labels import NAMESPACE_LABELS_PREFIX
from .names import subdomain_problem

_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_SOURCE = re.compile(r"[A-Za-z0-9]+")
_NAME_RULE = (
    "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)


def _name_problem(name: str, what: str) -> str | None:
    if not name:
        return f"the {what} is empty"
    if len(name) > 63:
        return f"the {what} is {len(name)} characters long ({_NAME_RULE})"
    if _NAME.fullmatch(name) is None:
        return f"the {what} {name!r} is not a valid name ({_NAME_RULE})"
    return None


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a selector key Cilium accepts, or None."""
    parts = key.split(":")
    if len(parts) > 2:
        return "only one ':' is allowed, between a source and the key (as in k8s:app)"
    if len(parts) == 2:
        source, key = parts
        if _SOURCE.fullmatch(source) is None:
            return f"the source {source!r} before ':' must be letters and digits only"
    if key.startswith(NAMESPACE_LABELS_PREFIX):
        key = key[len(NAMESPACE_LABELS_PREFIX) :]
    prefix, slash, name = key.rpartition("/")
    if slash:
        if "/" in prefix:
            return "at most one '/' is allowed, between a DNS prefix and the name"
        problem = subdomain_problem(prefix)
        if problem is not None:
            return f"the prefix {prefix!r} before '/' is not a DNS subdomain: {problem}"
    return _name_problem(name, "name")


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a label value Cilium accepts in a selector, or None."""
    if value == "":
        return None
    return _name_problem(value, "value")
