"""CiliumCIDRGroup objects, and the policies' references to them. Pure: no I/O.

A CiliumCIDRGroup (cluster-scoped; `cilium.io/v2alpha1`, or `v2` in Cilium 1.18 and later) is a
named list of CIDRs, `spec.externalCIDRs`, with the usual metadata labels. A `fromCIDRSet` or
`toCIDRSet` entry names groups instead of writing a CIDR: `cidrGroupRef: <name>` or
`cidrGroupSelector: <label selector over the groups' labels>`, with optional `except` ranges.

Theory of operation. Parsing leaves such an entry as a `CIDRGroupPeer` (`selector.py`), which
selects nothing by itself. Before a policy is resolved, `references.expand_policy` replaces every
such peer with `group_selectors`: one `CIDRSelector` per CIDR of every group it selects, carrying
the entry's `except` ranges, so the group's CIDRs become CIDR identities, ipcache entries, BPF
map keys and Envoy source ranges exactly as written-out CIDRs do. The agent keeps each policy as
parsed and expands it again whenever a group appears, changes or goes. As in Cilium:

- a reference to a group that does not exist selects nothing (the rule still counts for
  default-deny), until the group appears;
- an `except` range inside a group's CIDR carves it out (the range gets a CIDR identity of its
  own, so the longest-prefix lookup gives its addresses that identity); a group CIDR inside an
  `except` range is left out whole; a range outside the CIDR does nothing to it;
- a group is labelled with its own labels and `io.cilium.policy.cidrgroupname/<name>`, which a
  `cidrGroupSelector` may select on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import Finding, PolicyValidationError
from .labels import Labels
from .labelsyntax import label_key_problem, label_value_problem
from .parse import CIDR_GROUP_API_VERSIONS, KIND_CIDR_GROUP, META_FIELDS, _type_name, _Walker
from .selector import CIDRGroupPeer, CIDRSelector, IPNetwork, cidr_group_name_key


@dataclass(frozen=True, slots=True)
class CIDRGroup:
    """A parsed CiliumCIDRGroup. `labels` are its metadata labels plus its name label; `cidrs`
    are sorted and unique (an empty list is valid: the group selects nothing)."""

    name: str
    labels: Labels
    cidrs: tuple[IPNetwork, ...]
    warnings: tuple[Finding, ...] = ()

    @property
    def key(self) -> str:
        return f"{KIND_CIDR_GROUP}/{self.name}"


def _net_order(n: IPNetwork) -> tuple[int, bytes, int]:
    return (n.version, n.network_address.packed, n.prefixlen)


def parse_cidr_group(doc: object) -> CIDRGroup:
    """Parse one CiliumCIDRGroup document. Raises PolicyValidationError with every error found,
    each naming its field (`spec.externalCIDRs[1]: invalid CIDR ...`)."""
    w = _Walker()
    resource = KIND_CIDR_GROUP
    if not isinstance(doc, Mapping):
        raise PolicyValidationError(
            resource, (Finding("", f"a CiliumCIDRGroup must be a mapping, got {_type_name(doc)}", "type"),)
        )
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if isinstance(name, str) and name:
        resource = f"{KIND_CIDR_GROUP}/{name}"
    top = w.mapping(doc, "", {"apiVersion", "kind", "metadata", "spec"}) or {}
    api = doc.get("apiVersion")
    if api not in CIDR_GROUP_API_VERSIONS:
        w.error("apiVersion", f"must be one of {', '.join(repr(v) for v in CIDR_GROUP_API_VERSIONS)} (the versions "
                              f"Cilium serves CiliumCIDRGroup as), got {api!r}", "api-version")
    if doc.get("kind") != KIND_CIDR_GROUP:
        w.error("kind", f"must be {KIND_CIDR_GROUP!r}, got {doc.get('kind')!r}", "kind")
        raise PolicyValidationError(resource, tuple(w.errors))

    labels: dict[str, str] = {}
    meta_map = w.mapping(meta, "metadata", set(META_FIELDS)) if meta is not None else None
    if meta is None:
        w.error("metadata", "is required (with a name)", "required")
    if meta_map is not None:
        if "name" not in meta_map:
            w.error("metadata.name", "is required", "required")
        else:
            name = w.k8s_name(meta_map["name"], "metadata.name", subdomain=True)
        if "namespace" in meta_map and w.string(meta_map["namespace"], "metadata.namespace") is not None:
            w.warn("metadata.namespace",
                   "a CiliumCIDRGroup is cluster-scoped; the namespace is ignored (a policy of any namespace "
                   "may name the group)", "ignored-namespace")
        if "labels" in meta_map and meta_map["labels"] is not None:
            labels = _metadata_labels(w, meta_map["labels"], "metadata.labels")

    cidrs: list[IPNetwork] = []
    if "spec" not in top:
        w.error("spec", "is required (with externalCIDRs)", "required")
    else:
        spec = w.mapping(top["spec"], "spec", {"externalCIDRs"})
        if spec is not None:
            if "externalCIDRs" not in spec:
                w.error("spec.externalCIDRs", "is required: the group's CIDRs (a list, which may be empty)",
                        "required")
            else:
                items = w.list_of(spec["externalCIDRs"], "spec.externalCIDRs")
                for i, item in enumerate(items or []):
                    net = _cidr(w, item, f"spec.externalCIDRs[{i}]")
                    if net is not None:
                        cidrs.append(net)
                if items == []:
                    w.warn("spec.externalCIDRs", "an empty group selects nothing: the rules naming it allow "
                                                 "(or deny) no address", "empty-group")
    if w.errors or not isinstance(name, str):
        raise PolicyValidationError(resource, tuple(w.errors))
    all_labels = Labels.of({**labels, cidr_group_name_key(name): ""})
    return CIDRGroup(name, all_labels, tuple(sorted(set(cidrs), key=_net_order)), tuple(w.warnings))


def _metadata_labels(w: _Walker, value: object, path: str) -> dict[str, str]:
    """`metadata.labels`, as the API server checks them (keys: a qualified name, no source)."""
    if not isinstance(value, Mapping):
        w.error(path, f"must be a mapping, got {_type_name(value)}", "type")
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        kp = f"{path}.{k}"
        if not isinstance(k, str) or not k:
            w.error(path, f"label keys must be non-empty strings, got {k!r}", "type")
            continue
        problem = "':' is not allowed in a label key" if ":" in k else label_key_problem(k)
        if problem is not None:
            w.error(kp, f"invalid label key {k!r}: {problem}", "label-key")
            continue
        s = w.string(v, kp)
        if s is None:
            continue
        vproblem = label_value_problem(s)
        if vproblem is not None:
            w.error(kp, f"invalid label value {s!r}: {vproblem}", "label-value")
            continue
        out[k] = s
    return out


def _cidr(w: _Walker, value: object, path: str) -> IPNetwork | None:
    """A CIDR as the CRD's `format: cidr` takes it: an address with a prefix length (host bits
    are dropped, `10.0.0.1/8` is 10.0.0.0/8)."""
    s = w.string(value, path, allow_empty=False)
    if s is None:
        return None
    try:
        if "/" not in s:
            raise ValueError("a CIDR needs a prefix length, e.g. 10.0.0.0/8 or 10.1.2.3/32")
        return ipaddress.ip_network(s, strict=False)
    except ValueError as exc:
        w.error(path, f"invalid CIDR {s!r}: {exc}", "cidr")
        return None


# -- references -------------------------------------------------------------------------------------


def selected_groups(peer: CIDRGroupPeer, groups: Mapping[str, CIDRGroup]) -> list[CIDRGroup]:
    """The groups `peer` names, by name order (none when the one it names does not exist)."""
    return [g for _, g in sorted(groups.items()) if peer.selects_group(g.name, g.labels)]


def _inside(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


def group_selectors(peer: CIDRGroupPeer, groups: Mapping[str, CIDRGroup]) -> list[CIDRSelector]:
    """The CIDR selectors `peer` stands for with `groups` in force (module doc): one per CIDR
    of the groups it selects that no `except` range holds whole, with the ranges inside it."""
    out: dict[str, CIDRSelector] = {}
    for group in selected_groups(peer, groups):
        for net in group.cidrs:
            if any(_inside(net, e) for e in peer.excepts):
                continue
            sel = CIDRSelector(net, tuple(e for e in peer.excepts if _inside(e, net)))
            out.setdefault(sel.key, sel)
    return [out[k] for k in sorted(out)]
