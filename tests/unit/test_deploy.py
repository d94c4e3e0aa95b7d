"""Manifests under deploy/ are valid Kubernetes objects, and our CRDs accept Cilium policies.

Every document is checked offline against the Kubernetes OpenAPI schemas bundled with
`kubernetes-validate` (strict: unknown fields are errors). The CRDs (the two policies and
CiliumCIDRGroup) must also be what a Cilium user expects (names, scope, short names) and structural,
and a policy (or CIDR group) written for Cilium
must reach l7gate unchanged: the API server prunes fields a structural schema does not keep,
which would silently drop rules, so that pruning is simulated here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "examples"

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
EXPECTED_CRDS = {
    # kind: (plural, scope, short name)
    "CiliumNetworkPolicy": ("ciliumnetworkpolicies", "Namespaced", "cnp"),
    "CiliumClusterwideNetworkPolicy": ("ciliumclusterwidenetworkpolicies", "Cluster", "ccnp"),
    "CiliumCIDRGroup": ("ciliumcidrgroups", "Cluster", "ccg"),
}
POLICY_CRDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


def _manifest_files() -> list[Path]:
    """YAML files under deploy/ that hold plain Kubernetes objects.

    Helm charts (a folder with Chart.yaml) hold templates, not YAML; kustomization.yaml is
    not an object. Both are left to their own tools.
    """
    charts = [p.parent for p in DEPLOY.rglob("Chart.yaml")]
    files = []
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        if any(chart in path.parents for chart in charts) or path.name == "kustomization.yaml":
            continue
        files.append(path)
    return files


def _documents(paths: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in paths:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return docs


DOCS = _documents(_manifest_files())
CRDS = {
    doc["spec"]["names"]["kind"]: doc
    for _, doc in DOCS
    if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
}


def crd_schema(kind: str) -> dict[str, Any]:
    (version,) = [v for v in CRDS[kind]["spec"]["versions"] if v["storage"]]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_manifest_is_a_valid_kubernetes_object(where: str, doc: Any) -> None:
    assert isinstance(doc, dict), f"{where}: not a mapping"
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], f"{where}: apiVersion"
    assert isinstance(doc.get("kind"), str) and doc["kind"][:1].isupper(), f"{where}: kind"
    name = (doc.get("metadata") or {}).get("name")
    assert isinstance(name, str) and DNS1123_SUBDOMAIN.match(name) and len(name) <= 253, (
        f"{where}: metadata.name {name!r} is not a DNS-1123 subdomain"
    )
    if doc["kind"] in CRDS:
        _validate_custom_resource(doc)
        return
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except jsonschema.ValidationError as e:  # kubernetes_validate's error is a subclass
        field = ".".join(str(p) for p in e.absolute_path) or "(document)"
        pytest.fail(f"{where}: {field}: {e.message}", pytrace=False)


def test_deploy_has_the_crds() -> None:
    assert set(CRDS) == set(EXPECTED_CRDS)


def test_the_cidr_group_crd_serves_both_versions_cilium_serves() -> None:
    """v2alpha1 (every Cilium release with CIDR groups, deprecated from 1.18) and v2 (1.18 on),
    with one schema, so that either apiVersion of a Cilium user's group applies."""
    versions = {v["name"]: v for v in CRDS["CiliumCIDRGroup"]["spec"]["versions"]}
    assert set(versions) == {"v2", "v2alpha1"} and all(v["served"] for v in versions.values())
    assert versions["v2"]["schema"] == versions["v2alpha1"]["schema"]


@pytest.mark.parametrize("kind", sorted(EXPECTED_CRDS))
def test_crd_names_and_scope(kind: str) -> None:
    crd = CRDS[kind]
    plural, scope, short = EXPECTED_CRDS[kind]
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert spec["group"] == "cilium.io"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["names"]["plural"] == plural
    assert spec["names"]["singular"] == kind.lower()
    assert spec["names"]["listKind"] == f"{kind}List"
    assert short in spec["names"]["shortNames"]
    assert spec["scope"] == scope
    versions = spec["versions"]
    assert [v["name"] for v in versions if v["storage"]] == ["v2"], "exactly one storage version"
    assert all(v["served"] for v in versions if v["name"] == "v2")


FORBIDDEN_IN_STRUCTURAL = {"$ref", "definitions", "dependencies", "patternProperties", "id"}


def structural_errors(schema: Any, path: str = "openAPIV3Schema") -> list[str]:
    """The parts of Kubernetes' structural-schema rules that a hand-written schema can break."""
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be a mapping"]
    errors = [f"{path}: {key} is not allowed" for key in FORBIDDEN_IN_STRUCTURAL & set(schema)]
    if not schema.get("type") and not (
        schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    ):
        errors.append(f"{path}: no type")
    for name, sub in (schema.get("properties") or {}).items():
        errors += structural_errors(sub, f"{path}.properties.{name}")
    if "items" in schema:
        errors += structural_errors(schema["items"], f"{path}.items")
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], f"{path}.additionalProperties")
        if "properties" in schema:
            errors.append(f"{path}: properties and additionalProperties are exclusive")
    return errors


@pytest.mark.parametrize("kind", sorted(EXPECTED_CRDS))
def test_crd_schema_is_structural(kind: str) -> None:
    schema = crd_schema(kind)
    assert structural_errors(schema) == []
    metadata = schema["properties"]["metadata"]
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}
    for field in ("spec", "specs") if kind in POLICY_CRDS else ("spec",):
        assert field in schema["properties"], f"{kind} schema has no {field}"


def test_structural_check_can_fail() -> None:
    bad = {"type": "object", "properties": {"spec": {"properties": {"x": {"$ref": "#/y"}}}}}
    assert structural_errors(bad) == [
        "openAPIV3Schema.properties.spec: no type",
        "openAPIV3Schema.properties.spec.properties.x: $ref is not allowed",
        "openAPIV3Schema.properties.spec.properties.x: no type",
    ]


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """What the API server stores: fields unknown to a structural schema are dropped."""
    if isinstance(value, dict) and schema.get("type") in ("object", None):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields", False)
        out = {}
        for key, sub in value.items():
            if key in props:
                out[key] = prune(sub, props[key])
            elif isinstance(extra, dict):
                out[key] = prune(sub, extra)
            elif keep_unknown or extra is True:
                out[key] = sub
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def _validate_custom_resource(doc: dict[str, Any]) -> None:
    schema = crd_schema(doc["kind"])
    jsonschema.validate(doc, schema)
    body = {k: v for k, v in doc.items() if k != "metadata"}
    pruned = prune(copy.deepcopy(body), schema)
    assert pruned == body, "the API server would drop fields of this policy"


RULE = {
    "description": "every top-level field the CRD declares",
    "endpointSelector": {
        "matchLabels": {"app": "billing-service"},
        "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}],
    },
    "ingress": [
        {
            "fromEndpoints": [{"matchLabels": {"io.cilium.k8s.policy.cluster": "cluster-b"}}],
            "toPorts": [
                {
                    "ports": [{"port": "8080", "endPort": 8090, "protocol": "TCP"}],
                    "rules": {
                        "http": [
                            {
                                "method": "POST",
                                "path": "/v1/charge",
                                "headers": ["X-Team: web"],
                                "headerMatches": [{"name": "x-env", "value": "prod"}],
                            }
                        ]
                    },
                }
            ],
            "authentication": {"mode": "required"},
        },
        {"fromEntities": ["cluster"], "fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]},
    ],
    "ingressDeny": [{"fromCIDR": ["192.0.2.0/24"]}],
    "egress": [{"toEntities": ["kube-apiserver"]}, {}],
    "egressDeny": [{"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "25"}]}]}],
    "enableDefaultDeny": {"ingress": True, "egress": False},
    "labels": [{"key": "owner", "value": "payments", "source": "k8s"}],
}
GOOD = [
    {"kind": "CiliumNetworkPolicy", "spec": RULE},
    {"kind": "CiliumNetworkPolicy", "specs": [RULE, {"nodeSelector": {}, "ingress": []}]},
    {"kind": "CiliumClusterwideNetworkPolicy", "spec": {"endpointSelector": {}, "ingress": []}},
    {"kind": "CiliumNetworkPolicy", "spec": {"endpointSelector": {}, "egress": [
        {"toCIDRSet": [{"cidrGroupRef": "partners", "except": ["192.0.2.128/25"]},
                       {"cidrGroupSelector": {"matchLabels": {"role": "vpn"}}}]}]}},
    {"kind": "CiliumCIDRGroup", "spec": {"externalCIDRs": ["192.0.2.0/24", "2001:db8::/32"]}},
    {"kind": "CiliumCIDRGroup", "spec": {"externalCIDRs": []}},
]
BAD = [
    ("spec is a string", {"kind": "CiliumNetworkPolicy", "spec": "allow all"}),
    ("specs is a mapping", {"kind": "CiliumNetworkPolicy", "specs": RULE}),
    ("ingress is a mapping", {"kind": "CiliumNetworkPolicy", "spec": {"ingress": {}}}),
    ("ingress items are strings", {"kind": "CiliumClusterwideNetworkPolicy", "spec": {"ingress": ["x"]}}),
    ("default deny is a string", {"kind": "CiliumNetworkPolicy", "spec": {"enableDefaultDeny": {"ingress": "yes"}}}),
    ("a group without externalCIDRs", {"kind": "CiliumCIDRGroup", "spec": {}}),
    ("a group without spec", {"kind": "CiliumCIDRGroup"}),
    ("externalCIDRs is a string", {"kind": "CiliumCIDRGroup", "spec": {"externalCIDRs": "10.0.0.0/8"}}),
]


def _as_object(body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "metadata": {"name": "p"}, **body}


@pytest.mark.parametrize("body", GOOD, ids=lambda b: f"{b['kind']}:{'specs' if 'specs' in b else 'spec'}")
def test_crd_keeps_a_cilium_policy_unchanged(body: dict[str, Any]) -> None:
    _validate_custom_resource(_as_object(body))


@pytest.mark.parametrize(("why", "body"), BAD, ids=[why for why, _ in BAD])
def test_crd_rejects_wrong_shapes(why: str, body: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_as_object(body), crd_schema(body["kind"]))


def test_prune_drops_undeclared_fields() -> None:
    """The pruning simulation can fail: a typo inside enableDefaultDeny is dropped."""
    doc = _as_object({"kind": "CiliumNetworkPolicy", "spec": {"enableDefaultDeny": {"ingres": True}}})
    schema = crd_schema("CiliumNetworkPolicy")
    assert prune(doc, schema)["spec"]["enableDefaultDeny"] == {}


EXAMPLE_POLICIES = [
    (where, doc)
    for where, doc in _documents(sorted(EXAMPLES.rglob("*.yaml")))
    if isinstance(doc, dict) and doc.get("kind") in EXPECTED_CRDS
]


@pytest.mark.parametrize(("where", "doc"), EXAMPLE_POLICIES, ids=[w for w, _ in EXAMPLE_POLICIES])
def test_example_policies_fit_the_crds(where: str, doc: dict[str, Any]) -> None:
    _validate_custom_resource(doc)
