"""The PATCH flavours of the API-server DOUBLE: JSON merge patch (RFC 7386), JSON patch
(RFC 6902) and Kubernetes strategic merge patch, on plain JSON values.

Part of `l7gate.testing.apiserver_double` (a test double, not a kube-apiserver). Pure functions;
inputs are never mutated (results share unchanged subtrees with them, which is safe because the
store never mutates a stored object).

Strategic merge patch is the subset `kubectl apply` (client-side, computed from kubectl's
compiled-in Go types) and the Python client produce: maps merge recursively, `null` deletes,
lists listed in the type's `patch_keys` merge by their merge key (or, for lists of scalars, as a
set), every other list is replaced; the directives `$patch: replace|delete` (on maps and on list
items), `$retainKeys`, `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` (the
patch's elements in its order, the server's other elements after them) are honoured.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from .apiserver_double_types import ApiError, bad_request, status_object


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: a patch object merges into an object, `null` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _unprocessable(message: str) -> ApiError:
    return ApiError(status_object(422, "Invalid", message))


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _unprocessable(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise _unprocessable(f"doc is missing path: /{'/'.join(parts)}")
    return cur


def _add(doc: Any, parts: list[str], value: Any, *, replace: bool) -> Any:
    if not parts:
        return copy.deepcopy(value)
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise _unprocessable(f"replace operation does not apply: doc is missing key: /{'/'.join(parts)}")
        parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(copy.deepcopy(value))
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = copy.deepcopy(value)
            else:
                parent.insert(int(last), copy.deepcopy(value))
        else:
            raise _unprocessable(f"invalid index in /{'/'.join(parts)}")
    else:
        raise _unprocessable(f"doc is missing path: /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> tuple[Any, Any]:
    if not parts:
        raise _unprocessable("cannot remove the whole document")
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return doc, parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return doc, parent.pop(int(last))
    raise _unprocessable(f"remove operation does not apply: doc is missing path: /{'/'.join(parts)}")


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 (add, remove, replace, move, copy, test); a failed operation is a 422."""
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op:
            raise bad_request("invalid JSON patch operation")
        kind = op["op"]
        parts = _pointer(str(op.get("path", "")))
        if kind == "add":
            doc = _add(doc, parts, op.get("value"), replace=False)
        elif kind == "replace":
            doc = _add(doc, parts, op.get("value"), replace=True)
        elif kind == "remove":
            doc, _ = _remove(doc, parts)
        elif kind in ("move", "copy"):
            src = _pointer(str(op.get("from", "")))
            if kind == "move":
                doc, value = _remove(doc, src)
            else:
                value = copy.deepcopy(_resolve(doc, src))
            doc = _add(doc, parts, value, replace=False)
        elif kind == "test":
            if _resolve(doc, parts) != op.get("value"):
                raise _unprocessable(f"testing value /{'/'.join(parts)} failed: test failed")
        else:
            raise bad_request(f"Unexpected kind: {kind}")
    return doc


_SET_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"


def _strip(value: Any) -> Any:
    """A value as stored: no `$`-directives left in it."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value if not (isinstance(v, dict) and set(v) == {"$patch"})]
    return value


def strategic_merge_patch(target: Any, patch: Any, keys: Mapping[tuple[str, ...], str]) -> Any:
    """Apply a strategic merge patch; `keys` maps a field path (list items add no path element)
    to its merge key, "" for a list of scalars merged as a set."""
    if not isinstance(patch, dict):
        raise bad_request("strategic merge patch: the patch must be a JSON object")
    result = _smp_map(target if isinstance(target, dict) else {}, patch, (), keys)
    if result is None:
        raise bad_request("strategic merge patch: cannot delete the whole object")
    return result


def _smp_map(orig: dict[str, Any], patch: dict[str, Any], path: tuple[str, ...],
             keys: Mapping[tuple[str, ...], str]) -> dict[str, Any] | None:
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return _strip(patch)  # type: ignore[no-any-return]
    out = dict(orig)
    for k, v in patch.items():
        if k.startswith(_DELETE_PRIMITIVE):
            name = k[len(_DELETE_PRIMITIVE):]
            if isinstance(out.get(name), list) and isinstance(v, list):
                out[name] = [x for x in out[name] if x not in v]
            continue
        if k.startswith("$"):
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            merged = _smp_map(out[k] if isinstance(out.get(k), dict) else {}, v, path + (k,), keys)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        elif isinstance(v, list):
            out[k] = _smp_list(out.get(k), v, path + (k,), keys)
        else:
            out[k] = v
    for k, order in patch.items():
        if k.startswith(_SET_ORDER) and isinstance(order, list) and isinstance(out.get(k[len(_SET_ORDER):]), list):
            name = k[len(_SET_ORDER):]
            out[name] = _ordered(out[name], order, keys.get(path + (name,), ""))
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _ordered(items: list[Any], order: list[Any], merge_key: str) -> list[Any]:
    """`$setElementOrder`: the listed elements in the patch's order, the server's others after."""
    def ident(x: Any) -> Any:
        return x.get(merge_key) if merge_key and isinstance(x, dict) else x

    wanted = [ident(o) for o in order]
    rank = {json.dumps(w, sort_keys=True): i for i, w in enumerate(wanted)}
    return sorted(items, key=lambda x: rank.get(json.dumps(ident(x), sort_keys=True), len(rank)))


def _smp_list(orig: Any, patch: list[Any], path: tuple[str, ...], keys: Mapping[tuple[str, ...], str]) -> list[Any]:
    if path not in keys:
        return _strip(patch)  # type: ignore[no-any-return]
    merge_key = keys[path]
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return [_strip(x) for x in patch if not (isinstance(x, dict) and x.get("$patch") == "replace")]
    current = list(orig) if isinstance(orig, list) else []
    if merge_key == "":
        return current + [x for x in patch if x not in current]
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise bad_request(f"map: {item} does not contain declared merge key: {merge_key}")
        idx = next((i for i, c in enumerate(current)
                    if isinstance(c, dict) and c.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                current.pop(idx)
        elif idx is None:
            current.append(_strip(item))
        else:
            merged = _smp_map(current[idx], item, path, keys)
            if merged is None:
                current.pop(idx)
            else:
                current[idx] = merged
    return current
