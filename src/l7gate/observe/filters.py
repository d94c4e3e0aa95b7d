"""Flow filters: `l7gate observe`'s flags, validated once, matched in one place.

The CLI validates its flags with `FlowFilter.parse` (a bad value is a usage error, exit 2,
before the agent is asked anything); the filter travels to the agent as `to_json()` in the
`filter` query parameter of `GET /v1/flows`; the agent reads it back with `from_json` (which
validates again: the admin API answers 400) and matches flows with `compile()`. Tests use the
same `compile()` on recorded flows.

Semantics (Hubble's, except where noted):

- Different flags AND; repeated values of one flag OR.
- `--from-pod` / `--to-pod` / `--pod`: `[cluster/]namespace/pod-prefix`; the pod name is a
  prefix (`payments/billing` matches `payments/billing-service-xyz`), an empty one
  (`payments/`) matches the whole namespace, a bare name means namespace `default`, and a
  cluster, when given, must match exactly. `--pod` matches either side.
- `--from-*` / `--to-*` follow the connection, not the packet: a reply (an http-response) is
  matched by who opened the connection and who served it, so `--to-pod payments/billing-…`
  shows billing's answers too, as in the seed article. (Hubble matches a reply's own source
  and destination; this is a listed deviation.)
- `--namespace`: either side is in the namespace.
- `--from-identity` / `--to-identity`: a number or a reserved identity name (`world`, `host`).
- `--verdict`: FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED (case-insensitive).
- `--type`: `l7` (L7 flows), `l3l4` (L3/L4 flows), `drop` (every DROPPED flow, whatever its
  layer; Hubble's `drop` event type covers kernel drops only).
- `--http-method` (case-insensitive), `--http-path` (an RE2 regex searched in the URL's path,
  without the query), `--http-status` (`404`, or a prefix: `4+`, `40+`); flows without HTTP
  data (or without a status code, like a forwarded request) never match them.
- `--since` (`parse_since`): a duration back from now (`5m`, `1h30m`, `90s`, `250ms`) or an
  RFC 3339 time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import re2

from ..identity.numeric import RESERVED_NAMES
from .flow import Endpoint, Flow, FlowType, Verdict, parse_time

Predicate = Callable[[Flow], bool]

TYPES = ("l7", "l3l4", "drop")
VERDICTS = tuple(v.value for v in Verdict if v is not Verdict.VERDICT_UNKNOWN)
_RESERVED_IDS = {name: n for n, name in RESERVED_NAMES.items()}
_METHOD_RE = re.compile(r"^[A-Za-z]{1,20}$")
_STATUS_RE = re.compile(r"^(?:[1-5]\d\d|[1-5]\d?\+)$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}
_RE2_OPTIONS: Any = re2.Options()
_RE2_OPTIONS.log_errors = False


class FilterError(ValueError):
    """Bad filter values; `errors` holds one `--flag 'value': why` line each."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(errors))


@dataclass(frozen=True, slots=True)
class PodRef:
    cluster: str | None
    namespace: str
    pod_prefix: str

    def matches(self, e: Endpoint) -> bool:
        return (
            bool(e.pod_name)
            and e.namespace == self.namespace
            and e.pod_name.startswith(self.pod_prefix)
            and (self.cluster is None or e.cluster_name == self.cluster)
        )


def parse_pod(value: str) -> PodRef:
    parts = value.split("/")
    if any(p.strip() != p for p in parts) or len(parts) > 3 or not value:
        raise ValueError("expected [CLUSTER/]NAMESPACE/POD (POD may be a prefix or empty)")
    if len(parts) == 1:
        return PodRef(None, "default", parts[0])
    if len(parts) == 2:
        if not parts[0]:
            raise ValueError("the namespace is empty")
        return PodRef(None, parts[0], parts[1])
    if not parts[0] or not parts[1]:
        raise ValueError("cluster and namespace must not be empty")
    return PodRef(parts[0], parts[1], parts[2])


def parse_identity(value: str) -> int:
    v = value.strip()
    if v in _RESERVED_IDS:
        return _RESERVED_IDS[v]
    if v.startswith("reserved:") and v[9:] in _RESERVED_IDS:
        return _RESERVED_IDS[v[9:]]
    if not v.isdigit() or int(v) >= 2**32:
        raise ValueError(
            f"expected an identity number or one of {', '.join(sorted(_RESERVED_IDS))}"
        )
    return int(v)


def parse_verdict(value: str) -> str:
    v = value.strip().upper()
    if v not in VERDICTS:
        raise ValueError(f"expected one of {', '.join(VERDICTS)}")
    return v


def parse_type(value: str) -> str:
    v = value.strip().lower().replace("_", "").replace("-", "")
    if v not in TYPES:
        raise ValueError(f"expected one of {', '.join(TYPES)}")
    return v


def parse_method(value: str) -> str:
    if not _METHOD_RE.match(value.strip()):
        raise ValueError("expected an HTTP method such as GET or POST")
    return value.strip().upper()


def compile_path(value: str) -> Any:
    try:
        return re2.compile(value, options=_RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ValueError(f"invalid regex: {detail}") from None


def parse_status(value: str) -> str:
    v = value.strip()
    if not _STATUS_RE.match(v):
        raise ValueError("expected a status code (404) or a prefix with + (4+, 40+)")
    return v


def parse_duration(text: str) -> int:
    """`5m`, `1h30m`, `90s`, `250ms`, `1.5h` → nanoseconds."""
    t = text.strip()
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise ValueError("expected a duration (5m, 1h30m, 90s, 250ms) or an RFC 3339 time")
    return int(total)


def parse_since(value: str, now_ns: int | None = None) -> int:
    """`--since` → nanoseconds since the epoch: a duration back from `now_ns`, or a time."""
    v = value.strip()
    if v and v[0].isdigit() and ("T" in v or (len(v) >= 10 and v[4:5] == "-")):
        if "T" not in v:
            raise ValueError("expected an RFC 3339 time such as 2024-04-26T14:20:00Z")
        return parse_time(v)
    now = time.time_ns() if now_ns is None else now_ns
    return now - parse_duration(v)


# -- the filter ----------------------------------------------------------------------------------


def _namespace(v: str) -> str:
    if not v or "/" in v or v.strip() != v:
        raise ValueError("expected a namespace name")
    return v


# field name → (CLI flag, value checker)
_FIELDS: dict[str, tuple[str, Callable[[str], object]]] = {
    "source_pod": ("--from-pod", parse_pod),
    "destination_pod": ("--to-pod", parse_pod),
    "pod": ("--pod", parse_pod),
    "namespace": ("--namespace", _namespace),
    "source_identity": ("--from-identity", parse_identity),
    "destination_identity": ("--to-identity", parse_identity),
    "verdict": ("--verdict", parse_verdict),
    "type": ("--type", parse_type),
    "http_method": ("--http-method", parse_method),
    "http_path": ("--http-path", compile_path),
    "http_status_code": ("--http-status", parse_status),
}



@dataclass(frozen=True, slots=True)
class FlowFilter:
    """A validated filter; the values are the flags' strings (normalised). Build it with
    `parse` or `from_json`, match with `compile()`. Field names follow Hubble's FlowFilter."""

    source_pod: tuple[str, ...] = ()
    destination_pod: tuple[str, ...] = ()
    pod: tuple[str, ...] = ()
    namespace: tuple[str, ...] = ()
    source_identity: tuple[str, ...] = ()
    destination_identity: tuple[str, ...] = ()
    verdict: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    http_method: tuple[str, ...] = ()
    http_path: tuple[str, ...] = ()
    http_status_code: tuple[str, ...] = ()

    @classmethod
    def parse(cls, **values: Iterable[str] | None) -> FlowFilter:
        """Validate flag values (field name → strings); FilterError lists every bad one."""
        errors: list[str] = []
        out: dict[str, tuple[str, ...]] = {}
        for name, raw in values.items():
            if name not in _FIELDS:
                errors.append(f"unknown filter {name!r}")
                continue
            flag, check = _FIELDS[name]
            if raw is None:
                continue
            if isinstance(raw, str) or not all(isinstance(v, str) for v in raw):
                errors.append(f"{flag}: expected a list of strings")
                continue
            kept = []
            for v in raw:
                try:
                    check(v)
                except ValueError as exc:
                    errors.append(f"{flag} {v!r}: {exc}")
                    continue
                kept.append(_normalise(name, v))
            out[name] = tuple(kept)
        if errors:
            raise FilterError(errors)
        return cls(**out)

    def to_json(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_json(cls, obj: object) -> FlowFilter:
        if not isinstance(obj, Mapping):
            raise FilterError(["filter: expected a JSON object"])
        return cls.parse(**{str(k): v for k, v in obj.items()})

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def compile(self) -> Predicate:
        """The predicate: every flag set must hold (values of one flag: any may hold)."""
        tests: list[Predicate] = []
        if self.source_pod:
            refs = [parse_pod(v) for v in self.source_pod]
            tests.append(lambda f: any(r.matches(_initiator(f)) for r in refs))
        if self.destination_pod:
            drefs = [parse_pod(v) for v in self.destination_pod]
            tests.append(lambda f: any(r.matches(_responder(f)) for r in drefs))
        if self.pod:
            prefs = [parse_pod(v) for v in self.pod]
            tests.append(lambda f: any(r.matches(f.source) or r.matches(f.destination) for r in prefs))
        if self.namespace:
            nss = frozenset(self.namespace)
            tests.append(lambda f: f.source.namespace in nss or f.destination.namespace in nss)
        if self.source_identity:
            sids = frozenset(parse_identity(v) for v in self.source_identity)
            tests.append(lambda f: _initiator(f).identity in sids)
        if self.destination_identity:
            dids = frozenset(parse_identity(v) for v in self.destination_identity)
            tests.append(lambda f: _responder(f).identity in dids)
        if self.verdict:
            vs = frozenset(Verdict(v) for v in self.verdict)
            tests.append(lambda f: f.verdict in vs)
        if self.type:
            types = [_TYPE_TESTS[t] for t in self.type]
            tests.append(lambda f: any(t(f) for t in types))
        if self.http_method:
            ms = frozenset(self.http_method)
            tests.append(lambda f: f.http is not None and f.http.method in ms)
        if self.http_path:
            rxs = [compile_path(v) for v in self.http_path]
            tests.append(lambda f: f.http is not None and any(r.search(f.http.path) for r in rxs))
        if self.http_status_code:
            sts = list(self.http_status_code)
            tests.append(lambda f: f.http is not None and f.http.code > 0
                         and any(_status_matches(s, f.http.code) for s in sts))
        if not tests:
            return lambda f: True
        if len(tests) == 1:
            return tests[0]
        return lambda f: all(t(f) for t in tests)


def _normalise(name: str, v: str) -> str:
    if name == "verdict":
        return parse_verdict(v)
    if name == "type":
        return parse_type(v)
    if name == "http_method":
        return parse_method(v)
    return v.strip() if name not in ("http_path",) else v


def _initiator(f: Flow) -> Endpoint:
    return f.destination if f.is_reply else f.source


def _responder(f: Flow) -> Endpoint:
    return f.source if f.is_reply else f.destination


def _status_matches(spec: str, code: int) -> bool:
    if spec.endswith("+"):
        return str(code).startswith(spec[:-1])
    return str(code) == spec


_TYPE_TESTS: dict[str, Predicate] = {
    "l7": lambda f: f.type is FlowType.L7,
    "l3l4": lambda f: f.type is FlowType.L3_L4,
    "drop": lambda f: f.verdict is Verdict.DROPPED,
}
