"""The object store of the API-server DOUBLE: etcd's revisions and the API server's write rules.

Part of `l7gate.testing.apiserver_double` (a test double, not a kube-apiserver).

Theory of operation
-------------------
One global revision counter, as etcd's: every committed write (create, update, patch, delete)
takes the next revision, which becomes the written object's `metadata.resourceVersion`; a write
that changes nothing (an update or patch whose result equals the stored object) commits nothing
and bumps nothing, as on a real server. Each commit appends one `Event` (ADDED, MODIFIED,
DELETED; the object after, and the object before) to one log ordered by revision.

- Reads at the current revision use `_objects`. A read at an older revision N (a list with
  `resourceVersionMatch=Exact`, or with `limit` and an explicit resourceVersion, or a `continue`
  token, which pins its list's revision) starts from the current objects and undoes the log's
  events after N. That needs the log back to N: `compact(C)` forgets revisions up to C as etcd's
  compaction does, so reads at N < C answer "410 Expired", and watches from N < C get an ERROR
  event with a 410 Status ("too old resource version: N (C)", the watch cache's message).
- A list at `resourceVersion=0` (any version) is the one a real API server answers from its
  watch cache; that cache does not page (before Kubernetes 1.33's cache snapshots), so `limit`
  is ignored and the whole list comes in one response, without a continue token, as
  client-go's reflector expects of its first listing.
- A watch is a cursor into the log (a sequence number) with its resource, namespace and
  selectors. `watch_next` blocks on the one condition variable until the log grows past the
  cursor, a deadline passes or the watch is cut, then returns the cursor's events translated
  through its selectors (an object that stops matching a watch's selector is DELETED for it, one
  that starts matching is ADDED, as the watch cache does). Compaction never drops log entries an
  open cursor has not read yet.
- All state is guarded by `cond` (a `threading.Condition`); every method takes it, so the store
  is thread-safe. Stored objects are never mutated after they are stored: every write builds a
  new dict, so objects handed out (in events, lists, gets) are stable snapshots. Callers that
  want to modify one must copy it.
"""

from __future__ import annotations

import base64
import bisect
import copy
import ipaddress
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .apiserver_double_patch import json_patch, merge_patch, strategic_merge_patch
from .apiserver_double_types import (
    MODIFIED_CONFLICT,
    ApiError,
    FieldError,
    Obj,
    ResourceType,
    already_exists,
    bad_request,
    conflict,
    expired,
    fe_forbidden,
    fe_invalid,
    fe_required,
    invalid,
    name_errors,
    not_found,
    prune_and_validate,
    server_timeout,
    unsupported_media_type,
)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects

WAIT_FOR_REVISION = 3.0  # how long a read of a future revision waits, as the watch cache does
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")

PATCH_MERGE = "application/merge-patch+json"
PATCH_JSON = "application/json-patch+json"
PATCH_STRATEGIC = "application/strategic-merge-patch+json"
PATCH_APPLY = "application/apply-patch+yaml"


@dataclass(frozen=True, slots=True)
class Event:
    """One committed write: `obj` is the object after (for DELETED: the object before, with the
    deletion's revision as its resourceVersion), `prev` the object before (None for ADDED)."""

    rev: int
    rt_key: str
    key: Key
    type: str
    obj: Obj
    prev: Obj | None


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

_LABEL_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQ_SET = re.compile(rf"\s*({_LABEL_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*")
_REQ_EQ = re.compile(rf"\s*({_LABEL_KEY})\s*(==|=|!=)\s*({_LABEL_VALUE})\s*")
_REQ_EXISTS = re.compile(rf"\s*(!?)\s*({_LABEL_KEY})\s*")

LabelReq = tuple[str, str, frozenset[str]]  # (key, op, values); op in =, !=, in, notin, exists, !


def _split_requirements(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_label_selector(s: str) -> tuple[LabelReq, ...]:
    """A `labelSelector` (equality- and set-based, as `labels.Parse`); 400 if it does not parse."""
    reqs: list[LabelReq] = []
    if not s.strip():
        return ()
    for part in _split_requirements(s):
        if m := _REQ_SET.fullmatch(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append((m.group(1), m.group(2), values))
        elif m := _REQ_EQ.fullmatch(part):
            reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", frozenset({m.group(3)})))
        elif m := _REQ_EXISTS.fullmatch(part):
            reqs.append((m.group(2), "!" if m.group(1) else "exists", frozenset()))
        else:
            raise bad_request(f"unable to parse requirement: {part.strip()!r}: invalid label selector")
    return tuple(reqs)


def labels_match(reqs: Sequence[LabelReq], labels: Mapping[str, str]) -> bool:
    for key, op, values in reqs:
        has = key in labels
        v = labels.get(key)
        if op == "=" and not (has and v in values):
            return False
        if op == "!=" and has and v in values:
            return False
        if op == "in" and not (has and v in values):
            return False
        if op == "notin" and has and v in values:
            return False
        if op == "exists" and not has:
            return False
        if op == "!" and has:
            return False
    return True


FieldReq = tuple[str, bool, str]  # (field path, equal?, value)


def parse_field_selector(rt: ResourceType, s: str) -> tuple[FieldReq, ...]:
    """A `fieldSelector` (`a=b`, `a==b`, `a!=b`, comma-separated) over the fields the API server
    supports for `rt` (metadata.name and metadata.namespace for every type, plus its own)."""
    reqs: list[FieldReq] = []
    if not s.strip():
        return ()
    for part in s.split(","):
        m = re.fullmatch(r"\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise bad_request(f"invalid selector: '{s}'; can't understand '{part}'")
        path = m.group(1)
        if path not in ("metadata.name", "metadata.namespace", *rt.field_labels):
            raise bad_request(f"field label not supported: {path}")
        reqs.append((path, m.group(2) != "!=", m.group(3)))
    return tuple(reqs)


def field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


@dataclass(frozen=True, slots=True)
class Selector:
    labels: tuple[LabelReq, ...] = ()
    fields: tuple[FieldReq, ...] = ()

    def matches(self, obj: Obj) -> bool:
        if self.labels and not labels_match(self.labels, obj.get("metadata", {}).get("labels") or {}):
            return False
        return all((field_value(obj, p) == v) == eq for p, eq, v in self.fields)

    @property
    def empty(self) -> bool:
        return not self.labels and not self.fields


# ---------------------------------------------------------------------------------------------
# Watch cursors
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class WatchCursor:
    """An open watch's place in the log. `cut` ends it abruptly (as a broken connection);
    `bookmark` asks for a BOOKMARK at the next wake-up. Owned by the serving thread; `cut` and
    `bookmark` are set by others under the store's condition."""

    rt: ResourceType
    namespace: str
    selector: Selector
    seq: int
    start_rev: int = 0
    cut: bool = False
    bookmark: bool = False
    peer: str = ""
    opened_at: float = field(default_factory=time.monotonic)


def _now_rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _without_rv(obj: Obj) -> Obj:
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta.pop("resourceVersion", None)
    out["metadata"] = meta
    return out


def _content(obj: Obj) -> Obj:
    """What metadata.generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


_POD_MUTABLE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to "
    "existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was "
    "previously negative)"
)


def _dynamic_service_ips() -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Cluster IPs in the real allocator's preference (KEP-3070): above the static band (the
    first 256 addresses of a /12), which is left to Services that name their IP, then the band."""
    base = int(SERVICE_CIDR.network_address)
    for offset in itertools.chain(range(256, SERVICE_CIDR.num_addresses - 1), range(1, 256)):
        yield ipaddress.ip_address(base + offset)


def _pod_spec_fixed(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    out = {k: v for k, v in spec.items()
           if k not in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")}
    for c in ("containers", "initContainers"):
        if isinstance(out.get(c), list):
            out[c] = [{k: v for k, v in x.items() if k != "image"} if isinstance(x, dict) else x for x in out[c]]
    return out


class Store:
    """Objects by resource type, the revision counter and the event log (see the module
    docstring). `now` gives the wall-clock time stamped into creationTimestamp."""

    def __init__(self, types: Sequence[ResourceType], *, now: Callable[[], float] = time.time) -> None:
        self.types = list(types)
        self.cond = threading.Condition()
        self.revision = 0
        self.compacted = 0
        self._now = now
        self._objects: dict[str, dict[Key, Obj]] = {t.key: {} for t in types}
        self._log: list[Event] = []
        self._log_revs: list[int] = []
        self._log_base = 0  # sequence number of _log[0]
        self._cursors: set[WatchCursor] = set()
        self.closed = False

    # -- reads --------------------------------------------------------------------------------

    def get(self, rt: ResourceType, ns: str, name: str) -> Obj:
        with self.cond:
            obj = self._objects[rt.key].get((ns, name))
            if obj is None:
                raise not_found(rt.group, rt.plural, name)
            return obj

    def find(self, rt: ResourceType, ns: str, name: str) -> Obj | None:
        with self.cond:
            return self._objects[rt.key].get((ns, name))

    def _parse_rv(self, rv: str) -> int:
        try:
            n = int(rv)
        except ValueError:
            raise bad_request(f'invalid resource version "{rv}"') from None
        if n < 0:
            raise bad_request(f'invalid resource version "{rv}"')
        return n

    def _wait_for(self, n: int) -> bool:
        deadline = time.monotonic() + WAIT_FOR_REVISION
        while self.revision < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.cond.wait(left)
        return True

    def _state_at(self, rt: ResourceType, rev: int) -> dict[Key, Obj]:
        state = dict(self._objects[rt.key])
        i = len(self._log) - 1
        while i >= 0 and self._log[i].rev > rev:
            e = self._log[i]
            if e.rt_key == rt.key:
                if e.type == "ADDED":
                    state.pop(e.key, None)
                else:
                    assert e.prev is not None
                    state[e.key] = e.prev
            i -= 1
        return state

    def list_objects(self, rt: ResourceType, ns: str, *, rv: str = "", rv_match: str = "", limit: int = 0,
             cont: str = "", selector: Selector = Selector()) -> Obj:
        """A list as `GET <collection>` returns it (see the module docstring for which revision
        it reads)."""
        with self.cond:
            start = ""
            if cont:
                if rv:
                    raise bad_request("specifying resource version is not allowed when using continue")
                read_rev, start = self._decode_continue(cont)
                if read_rev < self.compacted:
                    raise expired("The provided continue parameter is too old to display a consistent list "
                                  "result. You can start a new list without the continue parameter.")
            elif rv in ("", "0"):
                if rv_match == "Exact":
                    raise invalid("meta.k8s.io", "ListOptions", "", [fe_forbidden(
                        "resourceVersionMatch", 'resourceVersionMatch "exact" is forbidden for resourceVersion "0"')])
                read_rev = self.revision
            else:
                n = self._parse_rv(rv)
                if not self._wait_for(n):
                    raise server_timeout(f"Too large resource version: {n}, current: {self.revision}")
                if rv_match == "Exact" or (limit and rv_match != "NotOlderThan"):
                    if n < self.compacted:
                        raise expired("The resourceVersion for the provided list is too old.")
                    read_rev = n
                else:
                    read_rev = self.revision
            state = self._state_at(rt, read_rev)
            keys = sorted(k for k, o in state.items()
                          if (not ns or k[0] == ns) and selector.matches(o) and (not start or f"{k[0]}/{k[1]}" > start))
            if rv == "0" and not cont and rv_match != "Exact":
                limit = 0  # served from the "watch cache", which does not page (module doc)
            page = keys[:limit] if limit else keys
            meta: Obj = {"resourceVersion": str(read_rev)}
            if limit and len(keys) > limit:
                last = page[-1]
                meta["continue"] = self._encode_continue(read_rev, f"{last[0]}/{last[1]}")
                if selector.empty:
                    meta["remainingItemCount"] = len(keys) - limit
            items = [state[k] for k in page]
            if not rt.group or rt.schema is None:  # typed lists carry no per-item kind/apiVersion
                items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
            return {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta, "items": items}

    @staticmethod
    def _encode_continue(rev: int, start: str) -> str:
        token = json.dumps({"v": "meta.k8s.io/v1", "rv": rev, "start": start + "\x00"}, separators=(",", ":"))
        return base64.urlsafe_b64encode(token.encode()).decode()

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, str]:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
            return int(data["rv"]), str(data["start"]).rstrip("\x00")
        except (ValueError, KeyError, TypeError):
            raise bad_request("continue key is not valid: incorrect encoded start resourceVersion "
                              "(version meta.k8s.io/v1)") from None

    # -- writes -------------------------------------------------------------------------------

    def _commit(self, rt: ResourceType, key: Key, type_: str, obj: Obj, prev: Obj | None) -> Obj:
        self.revision += 1
        rev = self.revision
        stored = dict(obj)
        stored["metadata"] = {**stored.get("metadata", {}), "resourceVersion": str(rev)}
        if type_ == "DELETED":
            self._objects[rt.key].pop(key, None)
        else:
            self._objects[rt.key][key] = stored
        self._log.append(Event(rev, rt.key, key, type_, stored, prev))
        self._log_revs.append(rev)
        self.cond.notify_all()
        return stored

    def _decode(self, rt: ResourceType, body: Any, ns: str) -> Obj:
        if not isinstance(body, dict):
            raise bad_request(f"the object provided is unrecognized (must be of type {rt.kind})")
        obj = copy.deepcopy(body)
        api_version = obj.get("apiVersion", rt.api_version)
        kind = obj.get("kind", rt.kind)
        if api_version != rt.api_version:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected "
                              f"API version ({rt.api_version})")
        if kind != rt.kind:
            raise bad_request(f'{kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                              f"no kind \"{kind}\" is registered for version \"{rt.api_version}\"")
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request(f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                              "metadata must be an object")
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        return obj

    def _schema_check(self, rt: ResourceType, obj: Obj, validation: str, *, patch: bool,
                      warnings: list[str]) -> tuple[Obj, list[FieldError]]:
        """Prune unknown fields of a custom resource and collect its schema errors; unknown fields
        are an error under `fieldValidation=Strict` (400 for create/update, 422 for patch, as the
        real handlers answer), a warning under Warn (the default), nothing under Ignore."""
        if rt.schema is None:
            return obj, []
        pruned, unknown, errors = prune_and_validate(rt.schema, obj)
        if unknown:
            causes = ", ".join(f'unknown field "{u}"' for u in unknown)
            if validation == "Strict":
                if patch:
                    raise invalid("", "", "", [fe_invalid("patch", json.dumps(obj, separators=(",", ":")),
                                                          f"strict decoding error: {causes}")])
                raise bad_request(f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                                  f"strict decoding error: {causes}")
            if validation != "Ignore":
                warnings.extend(f'unknown field "{u}"' for u in unknown)
        return pruned, errors

    def _validate(self, rt: ResourceType, obj: Obj, errors: list[FieldError]) -> None:
        name = obj["metadata"].get("name", "")
        errs = [fe_invalid("metadata.name", name, e) for e in name_errors(rt.name_rule, name)] + errors
        if errs:
            raise invalid(rt.group, rt.kind, name, errs)

    def create(self, rt: ResourceType, ns: str, body: Any, *, validation: str = "Warn", dry_run: bool = False,
               warnings: list[str] | None = None) -> Obj:
        """`POST <collection>`: the created object."""
        warns = warnings if warnings is not None else []
        with self.cond:
            obj = self._decode(rt, body, ns)
            # decoding (strict unknown fields) comes before admission (NamespaceLifecycle)
            obj, errors = self._schema_check(rt, obj, validation, patch=False, warnings=warns)
            if rt.namespaced and ("", ns) not in self._objects["namespaces"]:
                raise not_found("", "namespaces", ns)
            meta = obj["metadata"]
            if not meta.get("name"):
                if meta.get("generateName"):
                    meta["name"] = meta["generateName"] + "".join(
                        secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
                else:
                    raise invalid(rt.group, rt.kind, "", [fe_required("metadata.name", "name or generateName is required")])
            name = meta["name"]
            for k in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "selfLink", "generation", "managedFields"):
                meta.pop(k, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now_rfc3339(self._now())
            if rt.generation:
                meta["generation"] = 1
            if rt.status_subresource:
                obj.pop("status", None)
            errors = errors + self._prepare_create(rt, obj)
            self._validate(rt, obj, errors)
            if (ns, name) in self._objects[rt.key]:
                raise already_exists(rt.group, rt.plural, name)
            if dry_run:
                return obj
            return self._commit(rt, (ns if rt.namespaced else "", name), "ADDED", obj, None)

    def _prepare_create(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        """The built-in kinds' create-time defaults the agent relies on."""
        meta = obj["metadata"]
        if rt.key == "namespaces":
            meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta.get("name", "")}
            obj["spec"] = {"finalizers": ["kubernetes"], **(obj.get("spec") or {})}
            obj["status"] = {"phase": "Active"}
        elif rt.key == "pods":
            obj["status"] = {"phase": "Pending"}
        elif rt.key == "services":
            obj["status"] = {"loadBalancer": {}}
            return self._default_service(obj, None)
        elif rt.key in ("nodes", "deployments.apps"):
            obj["status"] = {}
        return []

    def _default_service(self, obj: Obj, old: Obj | None) -> list[FieldError]:
        spec = obj.setdefault("spec", {})
        if not isinstance(spec, dict):
            return [fe_invalid("spec", spec, "must be an object")]
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                p.setdefault("targetPort", p.get("port"))
        if spec["type"] == "ExternalName":
            return []
        old_ip = (old or {}).get("spec", {}).get("clusterIP")
        if old_ip:
            if spec.get("clusterIP") in (None, "", old_ip):
                spec["clusterIP"] = old_ip
                spec["clusterIPs"] = [old_ip]
            else:
                return [fe_invalid("spec.clusterIPs[0]", [spec["clusterIP"]], "may not change once set")]
        elif not spec.get("clusterIP"):
            used = {s.get("spec", {}).get("clusterIP") for s in self._objects["services"].values()}
            ip = next(str(a) for a in _dynamic_service_ips() if str(a) not in used)
            spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
        elif spec["clusterIP"] != "None":
            used = {s.get("spec", {}).get("clusterIP") for s in self._objects["services"].values()}
            if spec["clusterIP"] in used:
                return [fe_invalid("spec.clusterIPs", [spec["clusterIP"]],
                                   f"failed to allocate IP {spec['clusterIP']}: provided IP is already allocated")]
            spec["clusterIPs"] = [spec["clusterIP"]]
        else:
            spec["clusterIPs"] = ["None"]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        return []

    def _prepare_update(self, rt: ResourceType, old: Obj, new: Obj, subresource: str) -> tuple[Obj, list[FieldError]]:
        errors: list[FieldError] = []
        if subresource == "status":
            out = dict(old)
            if "status" in new:
                out["status"] = new["status"]
            else:
                out.pop("status", None)
            return out, errors
        out = dict(new)
        meta = dict(out.get("metadata") or {})
        old_meta = old["metadata"]
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            errors.append(fe_invalid("metadata.uid", meta["uid"], "field is immutable"))
        meta["uid"] = old_meta["uid"]
        meta["creationTimestamp"] = old_meta["creationTimestamp"]  # reset silently, as BeforeUpdate does
        for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            if k in old_meta:
                meta[k] = old_meta[k]
            else:
                meta.pop(k, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        out["metadata"] = meta
        if rt.status_subresource:
            if "status" in old:
                out["status"] = old["status"]
            else:
                out.pop("status", None)
        if rt.key == "pods" and _pod_spec_fixed(out.get("spec")) != _pod_spec_fixed(old.get("spec")):
            errors.append(fe_forbidden("spec", _POD_MUTABLE_MSG))
        elif rt.key == "services":
            out["spec"] = copy.deepcopy(out.get("spec") or {})
            errors.extend(self._default_service(out, old))
        elif rt.key == "namespaces":
            meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta.get("name", "")}
            out["spec"] = old.get("spec", {})
        if rt.generation and _content(out) != _content(old):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        return out, errors

    def _write_update(self, rt: ResourceType, key: Key, old: Obj, new: Obj, subresource: str,
                      errors: list[FieldError], dry_run: bool) -> Obj:
        out, more = self._prepare_update(rt, old, new, subresource)
        self._validate(rt, out, errors + more)
        if _without_rv(out) == _without_rv(old) or dry_run:
            return out if dry_run else old
        return self._commit(rt, key, "MODIFIED", out, old)

    def update(self, rt: ResourceType, ns: str, name: str, body: Any, *, subresource: str = "",
               validation: str = "Warn", dry_run: bool = False, warnings: list[str] | None = None) -> Obj:
        """`PUT <item>[/status]`: the stored object (unchanged if the update changes nothing)."""
        warns = warnings if warnings is not None else []
        with self.cond:
            obj = self._decode(rt, body, ns)
            meta = obj["metadata"]
            if meta.get("name") and meta["name"] != name:
                raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
            meta["name"] = name
            key = (ns if rt.namespaced else "", name)
            old = self._objects[rt.key].get(key)
            if old is None:
                if rt.allow_create_on_update and not subresource:
                    return self.create(rt, ns, obj, validation=validation, dry_run=dry_run, warnings=warns)
                raise not_found(rt.group, rt.plural, name)
            rv = meta.get("resourceVersion")
            if rv:
                if rv != old["metadata"]["resourceVersion"]:
                    raise conflict(rt.group, rt.plural, name, MODIFIED_CONFLICT)
            elif not rt.allow_unconditional_update:
                raise invalid(rt.group, rt.kind, name, [fe_invalid("metadata.resourceVersion", "0x0",
                                                                   "must be specified for an update")])
            obj, errors = self._schema_check(rt, obj, validation, patch=False, warnings=warns)
            return self._write_update(rt, key, old, obj, subresource, errors, dry_run)

    def patch(self, rt: ResourceType, ns: str, name: str, content_type: str, body: Any, *, subresource: str = "",
              validation: str = "Warn", dry_run: bool = False, warnings: list[str] | None = None) -> Obj:
        """`PATCH <item>[/status]` with a merge, JSON or (built-ins only) strategic merge patch."""
        warns = warnings if warnings is not None else []
        with self.cond:
            key = (ns if rt.namespaced else "", name)
            old = self._objects[rt.key].get(key)
            accepted = [PATCH_JSON, PATCH_MERGE] + ([PATCH_STRATEGIC] if rt.strategic else [])
            if content_type not in accepted:
                raise unsupported_media_type(content_type, accepted)
            if old is None:
                raise not_found(rt.group, rt.plural, name)
            if content_type == PATCH_MERGE:
                patched = merge_patch(old, body)
            elif content_type == PATCH_JSON:
                patched = json_patch(old, body)
            else:
                patched = strategic_merge_patch(old, body, rt.patch_keys)
            if not isinstance(patched, dict):
                raise bad_request("the patched object is not a JSON object")
            meta = patched.get("metadata")
            if not isinstance(meta, dict):
                raise bad_request("metadata must be an object")
            rv = meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise conflict(rt.group, rt.plural, name, MODIFIED_CONFLICT)
            patched = {**patched, "metadata": {**meta, "name": name,
                                               "resourceVersion": old["metadata"]["resourceVersion"]}}
            obj = self._decode(rt, patched, ns)
            obj, errors = self._schema_check(rt, obj, validation, patch=True, warnings=warns)
            return self._write_update(rt, key, old, obj, subresource, errors, dry_run)

    def delete(self, rt: ResourceType, ns: str, name: str, options: Obj | None = None, *, dry_run: bool = False) -> Obj:
        """`DELETE <item>`: deleted at once (no graceful deletion, no finalizers); a namespace takes
        its objects with it. Returns the object as it was."""
        with self.cond:
            key = (ns if rt.namespaced else "", name)
            old = self._objects[rt.key].get(key)
            if old is None:
                raise not_found(rt.group, rt.plural, name)
            pre = (options or {}).get("preconditions") or {}
            uid, rv = pre.get("uid"), pre.get("resourceVersion")
            if uid and uid != old["metadata"].get("uid"):
                raise conflict(rt.group, rt.plural, name,
                               f"Precondition failed: UID in precondition: {uid}, UID in object meta: {old['metadata'].get('uid')}")
            if rv and rv != old["metadata"].get("resourceVersion"):
                raise conflict(rt.group, rt.plural, name,
                               f"Precondition failed: ResourceVersion in precondition: {rv}, "
                               f"ResourceVersion in object meta: {old['metadata'].get('resourceVersion')}")
            if dry_run:
                return old
            if rt.key == "namespaces":
                for other in self.types:
                    if other.namespaced:
                        for k in sorted(k for k in self._objects[other.key] if k[0] == name):
                            self._commit(other, k, "DELETED", self._objects[other.key][k], self._objects[other.key][k])
            self._commit(rt, key, "DELETED", old, old)
            return old

    # -- watches ------------------------------------------------------------------------------

    def watch_open(self, rt: ResourceType, ns: str, selector: Selector, rv: str, *,
                   send_initial: bool = False) -> tuple[WatchCursor, list[tuple[str, Obj]], ApiError | None]:
        """Open a cursor: from `rv` (events after it), or with the current objects as ADDED events
        first (no rv, rv "0", or `sendInitialEvents`). A too-old or too-new rv gives an error to
        send as the watch's ERROR event."""
        with self.cond:
            initial: list[tuple[str, Obj]] = []
            error: ApiError | None = None
            seq = self._log_base + len(self._log)
            if rv in ("", "0") or send_initial:
                objs = self._objects[rt.key]
                initial = [("ADDED", objs[k]) for k in sorted(objs)
                           if (not ns or k[0] == ns) and selector.matches(objs[k])]
            else:
                n = self._parse_rv(rv)
                if n < self.compacted:
                    error = expired(f"too old resource version: {n} ({self.compacted})")
                elif not self._wait_for(n):
                    error = server_timeout(f"Too large resource version: {n}, current: {self.revision}")
                else:
                    seq = self._log_base + bisect.bisect_right(self._log_revs, n)
            cursor = WatchCursor(rt, ns, selector, seq, start_rev=self.revision)
            if error is None:
                self._cursors.add(cursor)
            return cursor, initial, error

    def watch_close(self, cursor: WatchCursor) -> None:
        with self.cond:
            self._cursors.discard(cursor)

    def watch_next(self, cursor: WatchCursor, until: float,
                   bookmark_at: float | None = None) -> tuple[list[tuple[str, Obj]], int | None, bool]:
        """Block until the cursor has events, `until` (a `time.monotonic()` deadline) passes, a
        bookmark is due (`bookmark_at`, or asked for with `request_bookmarks`; never when
        `bookmark_at` is None) or the watch is cut. Returns (events, bookmark revision or None,
        cut?). The bookmark's revision is taken with the events, so it never skips one."""
        with self.cond:
            if bookmark_at is None:
                cursor.bookmark = False
            while True:
                if cursor.cut or self.closed:
                    return [], None, True
                end = self._log_base + len(self._log)
                if end > cursor.seq or cursor.bookmark:
                    break
                left = min(until, bookmark_at if bookmark_at is not None else until) - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            if bookmark_at is not None and time.monotonic() >= bookmark_at:
                cursor.bookmark = True
            out: list[tuple[str, Obj]] = []
            for e in self._log[cursor.seq - self._log_base:]:
                translated = self._translate(e, cursor)
                if translated is not None:
                    out.append(translated)
            cursor.seq = self._log_base + len(self._log)
            bookmark = self.revision if cursor.bookmark else None
            cursor.bookmark = False
            return out, bookmark, False

    @staticmethod
    def _translate(e: Event, cursor: WatchCursor) -> tuple[str, Obj] | None:
        if e.rt_key != cursor.rt.key or (cursor.namespace and e.key[0] != cursor.namespace):
            return None
        sel = cursor.selector
        if sel.empty:
            return e.type, e.obj
        now = e.type != "DELETED" and sel.matches(e.obj)
        before = e.prev is not None and sel.matches(e.prev)
        if e.type == "DELETED":
            return ("DELETED", e.obj) if before else None
        if now and before:
            return "MODIFIED", e.obj
        if now:
            return "ADDED", e.obj
        if before:
            return "DELETED", e.obj
        return None

    def request_bookmarks(self) -> int:
        with self.cond:
            for c in self._cursors:
                c.bookmark = True
            self.cond.notify_all()
            return len(self._cursors)

    def cut_watches(self) -> int:
        with self.cond:
            n = len(self._cursors)
            for c in self._cursors:
                c.cut = True
            self._cursors.clear()
            self.cond.notify_all()
            return n

    def open_watches(self, rt: ResourceType | None = None) -> int:
        with self.cond:
            return sum(1 for c in self._cursors if rt is None or c.rt.key == rt.key)

    def compact(self, revision: int | None = None) -> int:
        """Forget revisions up to `revision` (default: the current one); returns the compacted
        revision. Log entries an open watch has not read yet are kept for it."""
        with self.cond:
            rev = self.revision if revision is None else min(revision, self.revision)
            self.compacted = max(self.compacted, rev)
            keep_from = min([c.seq for c in self._cursors], default=self._log_base + len(self._log))
            drop = min(bisect.bisect_right(self._log_revs, self.compacted), keep_from - self._log_base)
            if drop > 0:
                del self._log[:drop]
                del self._log_revs[:drop]
                self._log_base += drop
            return self.compacted

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
