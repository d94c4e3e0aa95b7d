"""Manifest files → Kubernetes objects (plain dicts), each tagged with where it came from.

The one place YAML text is read. A path may be a file or a folder (searched recursively for
`.yaml`, `.yml` and `.json`, in sorted order). Multi-document files and `kind: List` are
flattened. A syntax error names the file, line and column; it stops that file only.

Which kinds a command reads, skips or refuses is decided here too (`kind_problem`): ordinary
Kubernetes objects are skipped, so that a folder of application manifests with policies among
them works; a kind nobody knows (`CiliumNetworkPolicyy`) and a policy l7gate would not enforce
(an AdminNetworkPolicy) are refused, since skipping them would leave traffic unpoliced without a
word. The policies read are CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes'
NetworkPolicy (`policy.parse.POLICY_KINDS`), with the CiliumCIDRGroups their CIDR rules name
(`policy.parse.POLICY_INPUT_KINDS`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from ..policy.parse import KIND_CIDR_GROUP, POLICY_INPUT_KINDS, POLICY_KINDS

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# Built-in Kubernetes kinds (and the Gateway API's): skipped where they are not what a command
# reads, never refused.
SKIPPED_KINDS = frozenset({
    # core/v1
    "Pod", "Service", "Namespace", "ConfigMap", "Secret", "ServiceAccount", "Endpoints", "Node",
    "PersistentVolume", "PersistentVolumeClaim", "LimitRange", "ResourceQuota", "Event",
    "ReplicationController", "PodTemplate", "Binding", "ComponentStatus",
    # apps, batch, autoscaling, policy
    "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ControllerRevision", "Job", "CronJob",
    "HorizontalPodAutoscaler", "PodDisruptionBudget",
    # networking, discovery, node, scheduling, coordination
    "Ingress", "IngressClass", "IPAddress", "ServiceCIDR", "EndpointSlice", "RuntimeClass",
    "PriorityClass", "Lease",
    # rbac, certificates, admission, API machinery
    "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "CertificateSigningRequest",
    "ClusterTrustBundle", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding", "CustomResourceDefinition", "APIService", "FlowSchema",
    "PriorityLevelConfiguration",
    # storage, dynamic resource allocation
    "StorageClass", "VolumeAttachment", "CSIDriver", "CSINode", "CSIStorageCapacity",
    "VolumeAttributesClass", "ResourceClaim", "ResourceClaimTemplate", "ResourceSlice", "DeviceClass",
    # Gateway API (gateway.networking.k8s.io)
    "Gateway", "GatewayClass", "HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute", "UDPRoute",
    "ReferenceGrant", "BackendTLSPolicy",
})
# Network policies of other APIs: whoever wrote one expects it enforced, and l7gate would not.
OTHER_POLICY_KINDS = {
    "AdminNetworkPolicy": "an AdminNetworkPolicy (policy.networking.k8s.io)",
    "BaselineAdminNetworkPolicy": "a BaselineAdminNetworkPolicy (policy.networking.k8s.io)",
}
# cilium.io kinds other than the two policies and CiliumCIDRGroup: configuration l7gate does not
# act on.
OTHER_CILIUM_KINDS = frozenset({
    "CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig", "CiliumLocalRedirectPolicy",
    "CiliumEgressGatewayPolicy", "CiliumLoadBalancerIPPool",
    "CiliumL2AnnouncementPolicy", "CiliumBGPPeeringPolicy", "CiliumBGPClusterConfig",
    "CiliumBGPPeerConfig", "CiliumBGPAdvertisement", "CiliumBGPNodeConfig",
    "CiliumBGPNodeConfigOverride", "CiliumPodIPPool", "CiliumNodeConfig", "CiliumExternalWorkload",
    "CiliumEndpoint", "CiliumEndpointSlice", "CiliumIdentity", "CiliumNode",
})
#: What a command that reads EndpointSlices says of a v1 Endpoints object, instead of skipping it:
#: its addresses would be dropped without a word.
ENDPOINTS_REFUSED = {
    "Endpoints": "v1 Endpoints are not read by l7gate: write the addresses as an EndpointSlice "
                 "(discovery.k8s.io/v1) labelled kubernetes.io/service-name: <the Service's name>. In a cluster, "
                 "Kubernetes mirrors the Endpoints of a Service without a selector into EndpointSlices, which the "
                 "agent's Kubernetes watch reads",
}
_KNOWN = sorted({*POLICY_INPUT_KINDS, *SKIPPED_KINDS, *OTHER_POLICY_KINDS, *OTHER_CILIUM_KINDS})
_KNOWN_LOWER = {k.lower(): k for k in _KNOWN}


@dataclass(frozen=True, slots=True)
class Manifest:
    source: str  # file path, or "<stdin>"
    index: int  # document index within the source, from 0
    line: int  # 1-based line where the document starts
    obj: Any

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", "")) if isinstance(self.obj, dict) else ""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True)
class LoadError:
    source: str
    message: str
    missing: bool = False  # the path itself is wrong (a usage error), not its content

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


def expand_paths(paths: Iterable[str]) -> tuple[list[str], list[LoadError]]:
    files: list[str] = []
    errors: list[LoadError] = []
    for p in paths:
        if p == "-":
            files.append(p)
        elif os.path.isdir(p):
            found: list[str] = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                found.extend(
                    os.path.join(root, n) for n in sorted(names) if n.endswith(MANIFEST_SUFFIXES)
                )
            if not found:
                errors.append(LoadError(p, "folder holds no .yaml, .yml or .json file", missing=True))
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            errors.append(LoadError(p, "no such file or folder", missing=True))
    return files, errors


# libyaml's parser, where PyYAML was built with it (the wheels are): the same documents, lines
# and errors (worded by libyaml) as the pure-Python one, ~5x faster. A 5 MB file of 10,000
# policies took 10.7 s to read in pure Python, the largest share of a `policy apply` of it.
_SafeLoader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_text(text: str, source: str) -> tuple[list[Manifest], list[LoadError]]:
    out: list[Manifest] = []
    try:
        loader = _SafeLoader(text)
        try:
            index = 0
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    break
                line = node.start_mark.line + 1
                obj = loader.construct_document(node)
                if obj is None:
                    continue  # an empty document (e.g. a trailing `---`)
                if isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
                    for item in obj["items"]:
                        out.append(Manifest(source, index, line, item))
                        index += 1
                else:
                    out.append(Manifest(source, index, line, obj))
                    index += 1
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        return out, [LoadError(source, f"{where}{what}")]
    except yaml.YAMLError as exc:
        return out, [LoadError(source, f"invalid YAML: {exc}")]
    return out, []


def load(paths: Iterable[str], stdin_text: str | None = None) -> tuple[list[Manifest], list[LoadError]]:
    files, errors = expand_paths(paths)
    manifests: list[Manifest] = []
    for f in files:
        if f == "-":
            text = stdin_text or ""
            source = "<stdin>"
        else:
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(LoadError(f, f"cannot read: {exc}"))
                continue
            source = f
        ms, errs = parse_text(text, source)
        manifests.extend(ms)
        errors.extend(errs)
    return manifests, errors


def object_name(obj: Any) -> str:
    """`KIND/[NAMESPACE/]NAME` as given (no default namespace filled in); a clusterwide policy
    and a CiliumCIDRGroup have no namespace."""
    if not isinstance(obj, dict):
        return ""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    ns = meta.get("namespace")
    kind = obj.get("kind", "?")
    prefix = f"{ns}/" if isinstance(ns, str) and ns and kind not in (POLICY_KINDS[1], KIND_CIDR_GROUP) else ""
    return f"{kind}/{prefix}{meta.get('name', '?')}"


def _group(api_version: object) -> str | None:
    """The API group of `apiVersion` ("" for the core group `v1`), None when there is none."""
    if not isinstance(api_version, str) or not api_version:
        return None
    group, slash, _ = api_version.rpartition("/")
    return group if slash else ""


def _nearest(kind: str) -> str | None:
    if kind.lower() in _KNOWN_LOWER:
        return _KNOWN_LOWER[kind.lower()]
    close = difflib.get_close_matches(kind, _KNOWN, n=1, cutoff=0.75)
    return close[0] if close else None


def kind_problem(obj: Any, wanted: Collection[str]) -> str | None:
    """Why an object of this kind is refused by a command that reads the `wanted` kinds; None
    when it is one of them, or a kind that is skipped on purpose: a built-in Kubernetes object,
    a policy where pods are read, a custom resource of another project (its group is neither
    Kubernetes' nor cilium.io, so its kinds cannot be known here)."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind in wanted:
        return None
    reads_policies = any(k in POLICY_KINDS for k in wanted)
    if kind in SKIPPED_KINDS or (kind in POLICY_INPUT_KINDS and not reads_policies):
        return None
    api = obj.get("apiVersion")
    if kind in OTHER_POLICY_KINDS or kind in OTHER_CILIUM_KINDS:
        if not reads_policies:
            return None
        what = OTHER_POLICY_KINDS.get(kind) or f"a {kind} (cilium.io)"
        advice = (
            "write it as a CiliumNetworkPolicy (cilium.io/v2) or a NetworkPolicy (networking.k8s.io/v1), "
            "or remove it from the files given to l7gate"
            if kind in OTHER_POLICY_KINDS
            else "remove it from the files given to l7gate"
        )
        return (
            f"{what} is not supported by l7gate: l7gate enforces CiliumNetworkPolicy, "
            f"CiliumClusterwideNetworkPolicy and NetworkPolicy only, so this object would not be "
            f"enforced; {advice}"
        )
    nearest = _nearest(kind)
    group = _group(api)
    ours = group is None or "." not in group or group.endswith(".k8s.io") or group in ("cilium.io", "k8s.io")
    if not ours and nearest not in POLICY_KINDS:
        return None  # another project's custom resource
    hint = f": did you mean {nearest!r}?" if nearest is not None else "."
    reads = " and ".join(wanted)
    api_note = f" (apiVersion {api})" if isinstance(api, str) and api else ""
    return (
        f"unknown kind {kind!r}{api_note}{hint} This command reads {reads} and skips ordinary "
        f"Kubernetes objects such as Deployment and Service; correct the kind or remove the object"
    )

