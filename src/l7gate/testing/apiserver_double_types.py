"""What the API-server DOUBLE serves: its resource types, the discovery and OpenAPI documents
that describe them, the CRD schema check, and the API server's error `Status` objects.

Part of `l7gate.testing.apiserver_double` (see its docstring: this is a test double, not a
kube-apiserver). Everything here is pure: no sockets, no threads, no clock.

Resource types are the built-ins the agent and `kubectl apply -f examples/seed/` touch (core v1
namespaces, pods, services, events, nodes; apps/v1 deployments; discovery.k8s.io/v1
endpointslices; networking.k8s.io/v1 networkpolicies) plus every CRD read from `deploy/crds/`
(CiliumNetworkPolicy,
CiliumClusterwideNetworkPolicy, CiliumCIDRGroup: one type per served version). A CRD's objects are checked
against its `openAPIV3Schema` the way the apiextensions API server does it (structural pruning of
unknown fields, then type/enum/required checks with kube-openapi's messages); built-in objects get
only the checks listed in `ResourceType` (names, a few invariants in the store), not their full
Go validation.

The messages and Status shapes are the API server's (apimachinery `errors.New*`,
`field.Error.ErrorBody`, kube-openapi `errors/schema.go`), so clients that parse them (kubectl's
"Error from server (Invalid): ...", the Python client's `ApiException.status`) see what they
would see from a real cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Status objects and errors
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An API error as the API server returns it: `status` is the `Status` object (kind Status,
    code, reason, message, details), `code` its HTTP status. Raised by the double's direct
    methods and written as the response body by its HTTP side."""

    def __init__(self, status: Obj, *, retry_after: int | None = None) -> None:
        super().__init__(f"{status['code']} {status.get('reason', '')}: {status.get('message', '')}")
        self.status = status
        self.code = int(status["code"])
        self.reason = str(status.get("reason", ""))
        self.retry_after = retry_after


def status_object(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason}
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


def _details(group: str, kind: str, name: str | None = None) -> Obj:
    out: Obj = {}
    if name:
        out["name"] = name
    if group:
        out["group"] = group
    out["kind"] = kind
    return out


def not_found(group: str, resource: str, name: str) -> ApiError:
    return ApiError(status_object(404, "NotFound", f'{qualified(group, resource)} "{name}" not found',
                                  _details(group, resource, name)))


def already_exists(group: str, resource: str, name: str) -> ApiError:
    return ApiError(status_object(409, "AlreadyExists",
                                  f'{qualified(group, resource)} "{name}" already exists',
                                  _details(group, resource, name)))


def conflict(group: str, resource: str, name: str, why: str) -> ApiError:
    return ApiError(status_object(
        409, "Conflict", f'Operation cannot be fulfilled on {qualified(group, resource)} "{name}": {why}',
        _details(group, resource, name)))


MODIFIED_CONFLICT = "the object has been modified; please apply your changes to the latest version and try again"


def bad_request(message: str) -> ApiError:
    return ApiError(status_object(400, "BadRequest", message))


def expired(message: str) -> ApiError:
    return ApiError(status_object(410, "Expired", message))


def method_not_allowed(group: str, resource: str, action: str) -> ApiError:
    return ApiError(status_object(405, "MethodNotAllowed",
                                  f'{action} is not supported on resources of kind "{qualified(group, resource)}"',
                                  {"group": group, "kind": resource} if group else {"kind": resource}))


def unsupported_media_type(content_type: str, accepted: Sequence[str]) -> ApiError:
    return ApiError(status_object(
        415, "UnsupportedMediaType",
        f'the body of the request was in an unknown format - accepted media types include: {", ".join(accepted)}'
        if content_type else "the body of the request was in an unknown format"))


def server_timeout(message: str) -> ApiError:
    return ApiError(status_object(504, "Timeout", f"Timeout: {message}",
                                  {"causes": [{"reason": "ResourceVersionTooLarge",
                                               "message": "Too large resource version"}],
                                   "retryAfterSeconds": 1}))


def path_not_found() -> ApiError:
    return ApiError(status_object(404, "NotFound", "the server could not find the requested resource",
                                  {}))


def qualified(group: str, resource: str) -> str:
    """`schema.GroupResource.String()`: "pods", "ciliumnetworkpolicies.cilium.io"."""
    return f"{resource}.{group}" if group else resource


@dataclass(frozen=True, slots=True)
class FieldError:
    """One `field.Error`: `cause` is its StatusCause type (FieldValueInvalid, ...), `body` its
    `ErrorBody()` ("Invalid value: \\"x\\": detail")."""

    cause: str
    field: str
    body: str

    def text(self) -> str:
        return f"{self.field}: {self.body}"


def go_value(value: Any) -> str:
    """A bad value as `field.Error.ErrorBody` prints it: strings quoted, scalars bare, the rest
    as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def fe_invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError("FieldValueInvalid", path, f"Invalid value: {go_value(value)}" + (f": {detail}" if detail else ""))


def fe_type_invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError("FieldValueTypeInvalid", path, f"Invalid value: {go_value(value)}: {detail}")


def fe_required(path: str, detail: str = "") -> FieldError:
    return FieldError("FieldValueRequired", path, "Required value" + (f": {detail}" if detail else ""))


def fe_not_supported(path: str, value: Any, supported: Sequence[str]) -> FieldError:
    quoted = ", ".join(json.dumps(s) for s in supported)
    return FieldError("FieldValueNotSupported", path, f"Unsupported value: {go_value(value)}: supported values: {quoted}")


def fe_forbidden(path: str, detail: str) -> FieldError:
    return FieldError("FieldValueForbidden", path, f"Forbidden: {detail}")


def invalid(group: str, kind: str, name: str, errors: Sequence[FieldError]) -> ApiError:
    """`errors.NewInvalid`: 422, reason Invalid, one cause per field error, and the message
    `<Kind>[.<group>] "<name>" is invalid: <error>` (several errors: `[e1, e2]`)."""
    gk = f"{kind}.{group}" if group else kind
    if len(errors) == 1:
        agg = errors[0].text()
    else:
        agg = "[" + ", ".join(e.text() for e in errors) + "]"
    message = f'{gk} "{name}" is invalid: {agg}' if errors else f'{gk} "{name}" is invalid'
    details: Obj = {"name": name} if name else {}
    if group:
        details["group"] = group
    if kind:
        details["kind"] = kind
    details["causes"] = [{"reason": e.cause, "message": e.body, "field": e.field} for e in errors]
    return ApiError(status_object(422, "Invalid", message, details))


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

_DNS1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + "(\\." + _DNS1123_LABEL + ")*"
_DNS1035_LABEL = "[a-z]([-a-z0-9]*[a-z0-9])?"


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    # apimachinery's RegexError, double space before "or" included
    msg += " (e.g. "
    for i, e in enumerate(examples):
        if i > 0:
            msg += " or "
        msg += f"'{e}', "
    return msg + f"regex used for validation is '{fmt}')"


# Per rule: the longest name, the pattern, and the API server's words and examples for it.
_NAME_RULES: dict[str, tuple[int, str, str, tuple[str, ...]]] = {
    "label": (63, _DNS1123_LABEL,
              "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
              "and must start and end with an alphanumeric character", ("my-name", "123-abc")),
    "dns1035": (63, _DNS1035_LABEL,
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
                "an alphabetic character, and end with an alphanumeric character", ("my-name", "abc-123")),
    "subdomain": (253, _DNS1123_SUBDOMAIN,
                  "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
                  "or '.', and must start and end with an alphanumeric character", ("example.com",)),
}


def name_errors(rule: str, name: str) -> list[str]:
    """The API server's name checks: `subdomain` (most kinds, CRs), `label` (namespaces),
    `dns1035` (services)."""
    limit, pattern, words, examples = _NAME_RULES.get(rule, _NAME_RULES["subdomain"])
    errs: list[str] = []
    if len(name) > limit:
        errs.append(f"must be no more than {limit} characters")
    if not re.fullmatch(pattern, name):
        errs.append(_regex_error(words, pattern, *examples))
    return errs


# ---------------------------------------------------------------------------------------------
# Resource types
# ---------------------------------------------------------------------------------------------

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
STATUS_VERBS = ("get", "patch", "update")


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource (a REST collection) and the API server behaviour the double copies
    for it. `schema` is a CRD's openAPIV3Schema (None for built-ins, which are not schema-checked);
    `strategic` says strategic-merge-patch is accepted (built-ins only, as on a real server);
    `patch_keys` are its strategic-merge list keys (path → merge key, "" for a merged list of
    scalars); `generation` whether metadata.generation is kept; `status_subresource` whether
    `/status` exists (and the main resource then ignores status writes)."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = True
    generation: bool = False
    name_rule: str = "subdomain"
    allow_unconditional_update: bool = True
    allow_create_on_update: bool = False
    strategic: bool = True
    schema: Obj | None = None
    patch_keys: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    field_labels: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def base_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified(self) -> str:
        return qualified(self.group, self.plural)

    @property
    def key(self) -> str:
        return self.qualified

    def names(self) -> set[str]:
        """The names `kubectl` and the double's direct methods accept for this type."""
        base = {self.plural, self.singular, self.kind.lower(), *self.short_names}
        return base | {f"{n}.{self.group}" for n in base if self.group}


_OWNER_KEYS: dict[tuple[str, ...], str] = {("metadata", "ownerReferences"): "uid", ("metadata", "finalizers"): ""}


def _pod_spec_keys(prefix: tuple[str, ...]) -> dict[tuple[str, ...], str]:
    # The patchMergeKey tags of k8s.io/api core/v1 PodSpec that kubectl's builtin strategic
    # patches use (types.go): containers by name, their ports by containerPort, env by name ...
    keys: dict[tuple[str, ...], str] = {}
    for containers in ("containers", "initContainers", "ephemeralContainers"):
        c = prefix + (containers,)
        keys[c] = "name"
        keys[c + ("ports",)] = "containerPort"
        keys[c + ("env",)] = "name"
        keys[c + ("volumeMounts",)] = "mountPath"
        keys[c + ("volumeDevices",)] = "devicePath"
    for lst, key in (("volumes", "name"), ("imagePullSecrets", "name"), ("hostAliases", "ip"),
                     ("topologySpreadConstraints", "topologyKey"), ("resourceClaims", "name"),
                     ("schedulingGates", "name")):
        keys[prefix + (lst,)] = key
    return keys


def builtin_types() -> list[ResourceType]:
    """The built-in kinds the double serves (see the module docstring)."""
    pod_keys = {**_OWNER_KEYS, **_pod_spec_keys(("spec",)), ("status", "conditions"): "type",
                ("status", "podIPs"): "ip", ("status", "hostIPs"): "ip"}
    return [
        ResourceType("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",),
                     name_rule="label", patch_keys={**_OWNER_KEYS, ("status", "conditions"): "type"},
                     field_labels=("status.phase",)),
        ResourceType("", "v1", "pods", "pod", "Pod", True, ("po",), ("all",), generation=True,
                     patch_keys=pod_keys,
                     field_labels=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                                   "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
                                   "status.podIP", "status.nominatedNodeName")),
        ResourceType("", "v1", "services", "service", "Service", True, ("svc",), ("all",),
                     name_rule="dns1035",
                     patch_keys={**_OWNER_KEYS, ("spec", "ports"): "port", ("status", "conditions"): "type"},
                     field_labels=("spec.clusterIP", "spec.type")),
        ResourceType("", "v1", "events", "event", "Event", True, ("ev",), status_subresource=False,
                     allow_create_on_update=True, patch_keys=dict(_OWNER_KEYS),
                     field_labels=("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                                   "involvedObject.uid", "involvedObject.apiVersion",
                                   "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
                                   "reportingComponent", "source", "type")),
        ResourceType("", "v1", "nodes", "node", "Node", False, ("no",),
                     patch_keys={**_OWNER_KEYS, ("spec", "podCIDRs"): "", ("status", "addresses"): "type",
                                 ("status", "conditions"): "type"},
                     field_labels=("spec.unschedulable",)),
        ResourceType("apps", "v1", "deployments", "deployment", "Deployment", True, ("deploy",), ("all",),
                     generation=True,
                     patch_keys={**_OWNER_KEYS, **_pod_spec_keys(("spec", "template", "spec")),
                                 ("status", "conditions"): "type"}),
        # EndpointSlices: no status subresource; `endpoints` and `ports` carry no patch merge
        # key (a strategic patch replaces them whole).
        ResourceType("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", True,
                     status_subresource=False, generation=True, patch_keys=dict(_OWNER_KEYS)),
        # No status subresource: NetworkPolicyStatus was removed in 1.28. Its lists (ingress,
        # egress, from, to, ports, policyTypes) carry no patch merge key: a strategic patch
        # replaces them whole.
        ResourceType("networking.k8s.io", "v1", "networkpolicies", "networkpolicy", "NetworkPolicy", True,
                     ("netpol",), status_subresource=False, generation=True, patch_keys=dict(_OWNER_KEYS)),
    ]


def default_crd_dir() -> Path | None:
    """`deploy/crds` of the checkout this package runs from (it is installed editable)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "deploy" / "crds"
        if candidate.is_dir():
            return candidate
    return None


def load_crds(paths: Iterable[Path]) -> list[ResourceType]:
    """A `ResourceType` per served version of every CustomResourceDefinition in `paths` (files,
    or directories of *.yaml)."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    out: list[ResourceType] = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            names = spec["names"]
            for v in spec["versions"]:
                if not v.get("served", True):
                    continue
                out.append(ResourceType(
                    group=spec["group"], version=v["name"], plural=names["plural"],
                    singular=names.get("singular", names["kind"].lower()), kind=names["kind"],
                    namespaced=spec["scope"] == "Namespaced", short_names=tuple(names.get("shortNames", ())),
                    categories=tuple(names.get("categories", ())),
                    status_subresource="status" in (v.get("subresources") or {}),
                    generation=True, allow_unconditional_update=False, strategic=False,
                    schema=v["schema"]["openAPIV3Schema"],
                    patch_keys={}))
    return out


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------

AGGREGATED_CONTENT_TYPE = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def group_versions(types: Sequence[ResourceType]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for t in types:
        if (t.group, t.version) not in seen:
            seen.append((t.group, t.version))
    return seen


def api_versions(server_address: str) -> Obj:
    """`GET /api` (unaggregated)."""
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _group_entry(group: str, versions: Sequence[str]) -> Obj:
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": vs, "preferredVersion": vs[0]}


def api_group_list(types: Sequence[ResourceType]) -> Obj:
    """`GET /apis` (unaggregated)."""
    groups: dict[str, list[str]] = {}
    for g, v in group_versions(types):
        if g:
            groups.setdefault(g, []).append(v)
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [_group_entry(g, vs) for g, vs in groups.items()]}


def api_group(types: Sequence[ResourceType], group: str) -> Obj | None:
    """`GET /apis/<group>`."""
    versions = [v for g, v in group_versions(types) if g == group]
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_entry(group, versions)}


def api_resource_list(types: Sequence[ResourceType], group: str, version: str) -> Obj | None:
    """`GET /api/v1`, `GET /apis/<group>/<version>` (unaggregated)."""
    mine = [t for t in types if (t.group, t.version) == (group, version)]
    if not mine:
        return None
    resources: list[Obj] = []
    for t in mine:
        r: Obj = {"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced, "kind": t.kind,
                  "verbs": list(ALL_VERBS)}
        if t.short_names:
            r["shortNames"] = list(t.short_names)
        if t.categories:
            r["categories"] = list(t.categories)
        r["storageVersionHash"] = _storage_hash(t)
        resources.append(r)
        if t.status_subresource:
            resources.append({"name": f"{t.plural}/status", "singularName": "", "namespaced": t.namespaced,
                              "kind": t.kind, "verbs": list(STATUS_VERBS)})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": mine[0].api_version,
            "resources": resources}


def _storage_hash(t: ResourceType) -> str:
    import base64

    return base64.b64encode(hashlib.sha256(f"{t.group}/{t.version}/{t.kind}".encode()).digest()[:8]).decode()


def aggregated_discovery(types: Sequence[ResourceType], *, core: bool) -> Obj:
    """`GET /api` or `GET /apis` in the aggregated form (`apidiscovery.k8s.io/v2`
    `APIGroupDiscoveryList`), which kubectl asks for first."""
    items: list[Obj] = []
    by_group: dict[str, list[str]] = {}
    for g, v in group_versions(types):
        if (g == "") == core:
            by_group.setdefault(g, []).append(v)
    for g, versions in by_group.items():
        vlist: list[Obj] = []
        for v in versions:
            resources: list[Obj] = []
            for t in types:
                if (t.group, t.version) != (g, v):
                    continue
                gvk = {"group": t.group, "version": t.version, "kind": t.kind}
                r: Obj = {"resource": t.plural, "responseKind": gvk,
                          "scope": "Namespaced" if t.namespaced else "Cluster",
                          "singularResource": t.singular, "verbs": list(ALL_VERBS)}
                if t.short_names:
                    r["shortNames"] = list(t.short_names)
                if t.categories:
                    r["categories"] = list(t.categories)
                if t.status_subresource:
                    r["subresources"] = [{"subresource": "status", "responseKind": gvk, "verbs": list(STATUS_VERBS)}]
                resources.append(r)
            vlist.append({"version": v, "resources": resources, "freshness": "Current"})
        meta: Obj = {"creationTimestamp": None}
        if g:
            meta["name"] = g
        items.append({"metadata": meta, "versions": vlist})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
            "items": items}


# ---------------------------------------------------------------------------------------------
# OpenAPI v3
# ---------------------------------------------------------------------------------------------


def gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _schema_name(t: ResourceType) -> str:
    if t.schema is not None:  # a CRD: the reversed group, as the apiextensions server names it
        return f"{'.'.join(reversed(t.group.split('.')))}.{t.version}.{t.kind}"
    return f"io.k8s.api.{t.group or 'core'}.{t.version}.{t.kind}"


def _param(name: str, description: str) -> Obj:
    return {"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": True}}


_WRITE_PARAMS = (
    _param("dryRun", "When present, indicates that modifications should not be persisted."),
    _param("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."),
    _param("fieldValidation", "fieldValidation instructs the server on how to handle objects in the request "
                              "containing unknown or duplicate fields. Valid values are: Ignore, Warn, Strict."),
)


def openapi_v3_gv(types: Sequence[ResourceType], group: str, version: str) -> Obj | None:
    """The OpenAPI v3 document of one group/version, as much of it as kubectl reads: per resource
    the item path's GET/PUT/PATCH/DELETE operations with `x-kubernetes-group-version-kind` and
    the `dryRun`/`fieldManager`/`fieldValidation` parameters (kubectl's query-param verifier
    looks for `fieldValidation` on the PATCH operation before it sends `fieldValidation=Strict`),
    the PATCH request content types this server takes, and the kinds' schemas (a CRD's own; an
    opaque object for built-ins). Built-in PATCH operations do not list strategic-merge-patch, so
    kubectl computes its strategic patch from its compiled-in types instead of from a schema."""
    mine = [t for t in types if (t.group, t.version) == (group, version)]
    if not mine:
        return None
    paths: dict[str, Obj] = {}
    schemas: dict[str, Obj] = {}
    for t in mine:
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        ref = {"$ref": f"#/components/schemas/{_schema_name(t)}"}
        ok = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}
        patch_types = ["application/json-patch+json", "application/merge-patch+json"]
        item = (f"/{gv_path(group, version)}/namespaces/{{namespace}}/{t.plural}/{{name}}" if t.namespaced
                else f"/{gv_path(group, version)}/{t.plural}/{{name}}")
        ops: Obj = {}
        for method, action in (("get", "get"), ("put", "put"), ("patch", "patch"), ("delete", "delete")):
            op: Obj = {"operationId": f"{method}{t.kind}", "responses": ok,
                       "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk}
            if method in ("put", "patch"):
                op["parameters"] = list(_WRITE_PARAMS) + (
                    [_param("force", "Force is going to \"force\" Apply requests.")] if method == "patch" else [])
                content = patch_types if method == "patch" else ["application/json"]
                op["requestBody"] = {"content": {ct: {"schema": {"type": "object"}} for ct in content},
                                     "required": True}
            ops[method] = op
        paths[item] = ops
        coll = item.rsplit("/", 1)[0]
        paths[coll] = {"post": {"operationId": f"create{t.kind}", "responses": ok, "x-kubernetes-action": "post",
                                "x-kubernetes-group-version-kind": gvk, "parameters": list(_WRITE_PARAMS),
                                "requestBody": {"content": {"application/json": {"schema": ref}}, "required": True}},
                       "get": {"operationId": f"list{t.kind}", "x-kubernetes-action": "list",
                               "x-kubernetes-group-version-kind": gvk,
                               "responses": {"200": {"description": "OK"}}}}
        schema = dict(t.schema) if t.schema is not None else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        schema["x-kubernetes-group-version-kind"] = [gvk]
        schemas[_schema_name(t)] = schema
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes API-server double", "version": "v1.37.0"},
            "paths": paths, "components": {"schemas": schemas}}


def openapi_v3_hash(doc: Obj) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()


# ---------------------------------------------------------------------------------------------
# CRD schema: pruning and validation (apiextensions' structural schema semantics)
# ---------------------------------------------------------------------------------------------

OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields",
})


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_ok(want: str, value: Any) -> bool:
    have = json_type(value)
    return have == want or (want == "number" and have == "integer")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def prune_and_validate(schema: Obj, obj: Obj) -> tuple[Obj, list[str], list[FieldError]]:
    """Check a custom resource against its structural schema, as the apiextensions API server
    does: drop fields the schema does not declare (unless `x-kubernetes-preserve-unknown-fields`)
    and nulls the schema does not allow, returning the pruned object and the dropped paths
    ("spec.foo", "spec.ingress[0].bar"), then validate types, enums, required fields, string
    lengths and patterns, numeric bounds and item counts with kube-openapi's messages.
    `apiVersion`, `kind` and `metadata` are the caller's (ObjectMeta is not schema-checked)."""
    unknown: list[str] = []
    errors: list[FieldError] = []
    out: Obj = {}
    props = schema.get("properties", {})
    for k, v in obj.items():
        if k in ("apiVersion", "kind"):
            out[k] = v
        elif k == "metadata":
            if isinstance(v, dict):
                for mk in v:
                    if mk not in OBJECT_META_FIELDS:
                        unknown.append(f"metadata.{mk}")
                out[k] = {mk: mv for mk, mv in v.items() if mk in OBJECT_META_FIELDS}
            else:
                out[k] = v
        elif k in props:
            if v is None and not props[k].get("nullable", False):
                continue
            out[k] = _check(props[k], v, k, unknown, errors)
        elif schema.get("x-kubernetes-preserve-unknown-fields"):
            out[k] = v
        else:
            unknown.append(k)
    for r in schema.get("required", ()):
        if r not in out:
            errors.append(fe_required(r))
    return out, unknown, errors


def _check(schema: Obj, value: Any, path: str, unknown: list[str], errors: list[FieldError]) -> Any:
    if value is None:
        if not schema.get("nullable", False):
            errors.append(fe_type_invalid(path, "null", f'{path} in body must be of type {schema.get("type", "object")}: "null"'))
        return value
    want = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            errors.append(fe_type_invalid(path, json_type(value),
                                          f'{path} in body must be of type integer,string: "{json_type(value)}"'))
            return value
    elif want and not _type_ok(want, value):
        have = json_type(value)
        errors.append(fe_type_invalid(path, have, f'{path} in body must be of type {want}: "{have}"'))
        return value
    if "enum" in schema and value not in schema["enum"]:
        errors.append(fe_not_supported(path, value, [v if isinstance(v, str) else json.dumps(v) for v in schema["enum"]]))
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError("FieldValueTooLong", path, f"Too long: may not be more than {schema['maxLength']} bytes"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(fe_invalid(path, value, f"{path} in body should be at least {schema['minLength']} chars long"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(fe_invalid(path, value, f"{path} in body should match '{schema['pattern']}'"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(fe_invalid(path, value, f"{path} in body should be greater than or equal to {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(fe_invalid(path, value, f"{path} in body should be less than or equal to {schema['maximum']}"))
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError("FieldValueTooMany", path,
                                     f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(fe_invalid(path, len(value), f"{path} in body should have at least {schema['minItems']} items"))
        items = schema.get("items")
        if isinstance(items, dict):
            return [_check(items, v, f"{path}[{i}]", unknown, errors) for i, v in enumerate(value)]
        return value
    if isinstance(value, dict):
        props: Obj = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        out: Obj = {}
        for k, v in value.items():
            sub = props.get(k)
            if sub is None and isinstance(additional, dict):
                sub = additional
            if sub is not None:
                if v is None and not sub.get("nullable", False):
                    continue
                out[k] = _check(sub, v, _join(path, k), unknown, errors)
            elif preserve or additional is True:
                out[k] = v
            else:
                unknown.append(_join(path, k))
        for r in schema.get("required", ()):
            if r not in out:
                errors.append(fe_required(_join(path, r)))
        return out
    return value
