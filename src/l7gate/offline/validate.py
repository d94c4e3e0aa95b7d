"""`l7gate policy validate`: every error and warning in a set of manifest files.

Ordinary Kubernetes objects (Pods, Services, Deployments, ...) are skipped and listed: a folder
of application manifests with policies among them validates as the policies alone. A kind nobody
knows (a misspelled `CiliumNetworkPolicyy`), a policy l7gate would not enforce (an
AdminNetworkPolicy), the same policy twice, an empty file and an input without any policy are errors:
each of them would otherwise leave traffic unpoliced while the check says all is well.

Pods among the input are an inventory: a named port (`port: http`) that no pod a rule applies
to declares, or that the pods of one identity declare with different numbers, selects nothing;
each gets a warning (`named-port-undeclared`, `named-port-conflict`). Without pods in the
input, named ports are not checked (the names are resolved by the agent, per pod).

Nodes among the input are an inventory too: a `fromNodes`/`toNodes` selector that selects none of
the given Nodes gets a warning (`node-selector-unmatched`); without Nodes, node selectors are not
checked (the agent reads the labels of the Nodes it knows).

CiliumCIDRGroups are checked too (an input of groups alone is fine: they are applied on their own).

Services and EndpointSlices among the input are an inventory too (still skipped, not checked as
objects): a `toServices` entry that names only Services of the input that have a selector
selects nothing (`services-selector`: toServices selects Services without one), and one whose
selector-less Services the input's EndpointSlices give no ready address selects nothing yet
(`services-no-endpoints`). A Service or slice that does not parse is named (`inventory`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..identity.numeric import IdentityError
from ..k8s.manifests import Manifest, kind_problem, load, object_name
from ..k8s.objects import (
    K8sObjectError, Namespace, Node, Pod, namespace_of, node_identity_labels, parse_endpoint_slice, parse_node,
    parse_pod, parse_service, pod_identity_labels, scoped_namespace, service_targets_of,
)
from ..policy.cidrgroup import CIDRGroup, parse_cidr_group
from ..policy.errors import PolicyValidationError
from ..policy.labels import Labels
from ..policy.namedports import CONCRETE
from ..policy.parse import KIND_CIDR_GROUP, POLICY_INPUT_KINDS, POLICY_KINDS, parse_policy
from ..policy.selector import NodeSelector, ServicePeer
from ..policy.toservices import named_services
from ..services import EndpointSlice, Service
from ..policy.types import Direction, NamedPort, PeerRule, Policy, Rule


@dataclass(frozen=True, slots=True)
class Item:
    source: str
    line: int
    resource: str
    severity: str  # "error" | "warning"
    path: str
    message: str
    code: str = ""

    def __str__(self) -> str:
        parts = [self.source]
        if self.resource:
            parts.append(self.resource)
        if self.path:
            parts.append(self.path)
        return ": ".join(parts) + f": {self.severity}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "line": self.line,
            "resource": self.resource,
            "severity": self.severity,
            "path": self.path,
            "message": self.message,
            "code": self.code,
        }


@dataclass(slots=True)
class ValidationReport:
    items: list[Item] = field(default_factory=list)
    policies: list[tuple[Manifest, Policy]] = field(default_factory=list)
    groups: list[tuple[Manifest, CIDRGroup]] = field(default_factory=list)
    checked: int = 0
    checked_groups: int = 0  # CiliumCIDRGroups (not counted in `checked`)
    invalid: int = 0
    skipped_objects: list[str] = field(default_factory=list)  # KIND/[NAMESPACE/]NAME, in input order
    usage_errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.skipped_objects)

    @property
    def errors(self) -> list[Item]:
        return [i for i in self.items if i.severity == "error"]

    @property
    def warnings(self) -> list[Item]:
        return [i for i in self.items if i.severity == "warning"]

    def lines(self, include_warnings: bool = True) -> list[str]:
        out = list(self.usage_errors)
        out.extend(str(i) for i in self.items if include_warnings or i.severity == "error")
        return out

    def summary(self) -> str:
        w = len(self.warnings)
        g = self.checked_groups
        groups = f" and {g} CiliumCIDRGroup{'s' if g != 1 else ''}" if g else ""
        s = (
            f"{self.checked} polic{'y' if self.checked == 1 else 'ies'}{groups} checked: "
            f"{self.invalid} invalid, {w} warning{'s' if w != 1 else ''}"
        )
        if self.skipped:
            s += f"; {self.skipped} other object{'s' if self.skipped != 1 else ''} skipped"
        return s

    def skipped_line(self) -> str:
        """`skipped: Deployment/payments/billing-service, Service/...`, or "" when none was."""
        return "skipped: " + ", ".join(self.skipped_objects) if self.skipped_objects else ""

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": not self.invalid and not self.usage_errors and not self.errors,
            "checked": self.checked,
            "checked_cidr_groups": self.checked_groups,
            "invalid": self.invalid,
            "skipped": self.skipped,
            "skipped_objects": self.skipped_objects,
            "errors": [i.to_json() for i in self.errors],
            "warnings": [i.to_json() for i in self.warnings],
            "usage_errors": self.usage_errors,
        }


def check_manifests(
    manifests: Iterable[Manifest],
    report: ValidationReport,
    *,
    default_namespace: str,
    cluster_name: str,
) -> None:
    seen: dict[str, str] = {}
    for m in manifests:
        obj = m.obj
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            report.items.append(
                Item(m.source, m.line, f"document {m.index + 1}", "error", "",
                     "not a Kubernetes object: a mapping with `kind` is expected", "not-an-object")
            )
            report.invalid += 1
            continue
        if obj["kind"] == KIND_CIDR_GROUP:
            _check_group(m, report, seen)
            continue
        if obj["kind"] not in POLICY_KINDS:
            problem = kind_problem(obj, POLICY_INPUT_KINDS)
            if problem is None:
                report.skipped_objects.append(object_name(obj))
            else:
                report.invalid += 1
                report.items.append(
                    Item(m.source, m.line, object_name(obj), "error", "kind", problem, "kind")
                )
            continue
        report.checked += 1
        resource = object_name(obj)
        try:
            policy = parse_policy(obj, default_namespace=default_namespace, cluster_name=cluster_name)
        except PolicyValidationError as exc:
            report.invalid += 1
            for f in exc.errors:
                report.items.append(
                    Item(m.source, m.line, exc.resource or resource, "error", f.path, f.message, f.code)
                )
            continue
        for f in policy.warnings:
            report.items.append(
                Item(m.source, m.line, policy.key, "warning", f.path, f.message, f.code)
            )
        if policy.key in seen:
            # Kubernetes holds one object per kind, namespace and name: one of the two would
            # silently replace the other.
            report.invalid += 1
            report.items.append(
                Item(m.source, m.line, policy.key, "error", "metadata.name",
                     f"{policy.key} is defined twice, at {seen[policy.key]} and at {m.where}: one "
                     f"would replace the other; remove one, or rename it", "duplicate")
            )
            continue
        seen[policy.key] = m.where
        report.policies.append((m, policy))


def _check_group(m: Manifest, report: ValidationReport, seen: dict[str, str]) -> None:
    report.checked_groups += 1
    try:
        group = parse_cidr_group(m.obj)
    except PolicyValidationError as exc:
        report.invalid += 1
        for f in exc.errors:
            report.items.append(Item(m.source, m.line, exc.resource, "error", f.path, f.message, f.code))
        return
    for f in group.warnings:
        report.items.append(Item(m.source, m.line, group.key, "warning", f.path, f.message, f.code))
    if group.key in seen:
        report.invalid += 1
        report.items.append(
            Item(m.source, m.line, group.key, "error", "metadata.name",
                 f"{group.key} is defined twice, at {seen[group.key]} and at {m.where}: one would replace the "
                 "other; remove one, or rename it", "duplicate"))
        return
    seen[group.key] = m.where
    report.groups.append((m, group))


def validate_paths(
    paths: Iterable[str],
    *,
    default_namespace: str = "default",
    cluster_name: str = "default",
    stdin_text: str | None = None,
) -> ValidationReport:
    report = ValidationReport()
    paths = list(paths)
    manifests, load_errors = load(paths, stdin_text)
    for e in load_errors:
        if e.missing:
            report.usage_errors.append(f"{e.source}: {e.message}")
        else:
            report.items.append(Item(e.source, 0, "", "error", "", e.message, "yaml"))
            report.invalid += 1
    for p in paths:
        source = "<stdin>" if p == "-" else p
        if (p == "-" or os.path.isfile(p)) and not any(m.source == source for m in manifests) and not any(
            e.source == source for e in load_errors
        ):
            what = "the input is empty" if p == "-" else "the file is empty"
            report.items.append(
                Item(source, 0, "", "error", "", f"{what}: it holds no Kubernetes object; give the file "
                     "that holds your policies", "empty")
            )
    check_manifests(manifests, report, default_namespace=default_namespace, cluster_name=cluster_name)
    check_named_ports(manifests, report, cluster_name=cluster_name)
    check_services(manifests, report, cluster_name=cluster_name)
    check_node_selectors(manifests, report, cluster_name=cluster_name)
    if not report.checked and not report.checked_groups and not report.errors and not report.usage_errors:
        where = " ".join("<stdin>" if p == "-" else p for p in paths)
        report.items.append(
            Item(where, 0, "", "error", "",
                 f"no CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy in it, so nothing was checked "
                 f"({report.skipped} other object{'s' if report.skipped != 1 else ''} skipped); give the "
                 "files or folders that hold your policies", "no-policy")
        )
    return report


# -- node selectors against the inventory --------------------------------------------------------


def check_node_selectors(manifests: Iterable[Manifest], report: ValidationReport, *, cluster_name: str) -> None:
    """Warn about `fromNodes`/`toNodes` selectors that select none of the input's Nodes (module
    docstring). A Node is selected as the agent of any node sees it: as `host` or as another
    node, with its labels."""
    manifests = list(manifests)
    if not any(m.kind == "Node" for m in manifests):
        return
    nodes: list[Node] = []
    for m in manifests:
        if m.kind != "Node":
            continue
        try:
            nodes.append(parse_node(m.obj, default_cluster=cluster_name))
        except K8sObjectError as exc:
            report.items.append(Item(m.source, m.line, exc.resource, "warning", "", "not used as inventory for node "
                                     f"selectors: {'; '.join(str(e) for e in exc.errors)}", "inventory"))
    seen = {n.ref: (node_identity_labels(n, local=False), node_identity_labels(n, local=True)) for n in nodes}
    for m, policy in report.policies:
        for rule in policy.rules:
            for pr in rule.rules:
                for sel in pr.peers or ():
                    if not isinstance(sel, NodeSelector) or any(
                            sel.matches(remote) or sel.matches(host) for remote, host in seen.values()):
                        continue
                    field = "fromNodes" if pr.direction is Direction.INGRESS else "toNodes"
                    n = len(seen)
                    report.items.append(Item(
                        m.source, m.line, policy.key, "warning", f"{pr.origin.path}.{field}",
                        f"the node selector {sel.selector} selects none of the {n} Node{'s' if n != 1 else ''} given "
                        f"({', '.join(sorted(seen))}): it selects no node there", "node-selector-unmatched"))


# -- named ports against the inventory -----------------------------------------------------------


def _inventory(manifests: Iterable[Manifest], cluster_name: str) -> tuple[list[tuple[Pod, Labels]], list[Item]]:
    """The input's pods with their identity labels; a pod that does not parse is reported."""
    pods: list[tuple[Manifest, Pod]] = []
    namespaces: dict[tuple[str, str], Namespace] = {}
    problems: list[Item] = []
    for m in manifests:
        try:
            if m.kind == "Pod":
                pods.append((m, parse_pod(m.obj, default_cluster=cluster_name)))
            elif m.kind == "Namespace":
                ns = scoped_namespace(m.obj, default_cluster=cluster_name)
                namespaces[(ns.cluster, ns.name)] = ns
        except K8sObjectError as exc:
            problems.append(Item(m.source, m.line, exc.resource, "warning", "", f"not used as inventory for named "
                                 f"ports: {'; '.join(str(e) for e in exc.errors)}", "inventory"))
    out: list[tuple[Pod, Labels]] = []
    for m, pod in pods:
        try:
            out.append((pod, pod_identity_labels(pod, namespace_of(pod, namespaces))))
        except IdentityError as exc:
            problems.append(Item(m.source, m.line, f"Pod/{pod.namespace}/{pod.name}", "warning", "",
                                 f"not used as inventory for named ports: {exc}", "inventory"))
    return out, problems


_STEP = re.compile(r"([A-Za-z]+)|\[(\d+)\]")


def _port_path(doc: Any, rule_path: str, port: NamedPort) -> str:
    """The field path of `port` in the document: the rule's path, then the port entry that
    names it (a CNP's `toPorts[i].ports[j].port`, a NetworkPolicy's `ports[j].port`)."""
    node = doc
    for name, index in _STEP.findall(rule_path):
        try:
            node = node[name] if name else node[int(index)]
        except (KeyError, IndexError, TypeError):
            return rule_path
    if not isinstance(node, dict):
        return rule_path
    groups = [(f".toPorts[{i}]", tp.get("ports")) for i, tp in enumerate(node.get("toPorts") or []) if isinstance(tp, dict)]
    if "ports" in node:
        groups.append(("", node.get("ports")))
    for prefix, ports in groups:
        for j, entry in enumerate(ports or []):
            if isinstance(entry, dict) and isinstance(entry.get("port"), str) and entry["port"].lower() == port.name:
                return f"{rule_path}{prefix}.ports[{j}].port"
    return rule_path


def _destinations(rule: Rule, pr: PeerRule, pods: list[tuple[Pod, Labels]]) -> tuple[list[tuple[Pod, Labels]], str]:
    """The inventory pods a named port of `pr` is a container port of (ingress: the pods the
    rule applies to; egress: its peer pods), and how they were chosen, for messages."""
    if pr.direction is Direction.INGRESS:
        return [(p, lab) for p, lab in pods if rule.selects(lab)], "the policy selects"
    if pr.peers is None:
        return list(pods), "of the inventory (the rule names no peer)"
    return [(p, lab) for p, lab in pods if any(s.matches(lab) for s in pr.peers)], "the rule names as peers"


def check_named_ports(manifests: Iterable[Manifest], report: ValidationReport, *, cluster_name: str) -> None:
    """Warn about named ports that select nothing for the input's pods (module docstring)."""
    manifests = list(manifests)
    named = [(m, policy) for m, policy in report.policies
             if any(isinstance(pp, NamedPort) for r in policy.rules for pr in r.rules
                    for port_rule in pr.port_rules for pp in port_rule.ports)]
    if not named or not any(m.kind == "Pod" for m in manifests):
        return
    pods, problems = _inventory(manifests, cluster_name)
    report.items.extend(problems)
    for m, policy in named:
        seen: set[tuple[str, str]] = set()
        for rule in policy.rules:
            for pr in rule.rules:
                dests, chosen = _destinations(rule, pr, pods)
                for port_rule in pr.port_rules:
                    for pp in port_rule.ports:
                        if not isinstance(pp, NamedPort):
                            continue
                        path = _port_path(m.obj, pr.origin.path, pp)
                        for code, message in _named_port_findings(pp, dests, chosen,
                                                                  pr.direction is Direction.INGRESS):
                            if (path, message) not in seen:
                                seen.add((path, message))
                                report.items.append(Item(m.source, m.line, policy.key, "warning", path, message, code))


def _named_port_findings(port: NamedPort, dests: list[tuple[Pod, Labels]], chosen: str,
                         ingress: bool) -> list[tuple[str, str]]:
    protos = [p for p in CONCRETE if port.protocol.covers(p)]
    declaring = [(pod, lab, proto, n) for pod, lab in dests for name, n, proto in pod.named_ports
                 if name == port.name and proto in {p.value for p in protos}]
    if not declaring:
        if dests:
            others = sorted({f"{name}/{proto}" for pod, _ in dests for name, _, proto in pod.named_ports})
            have = f"they declare: {', '.join(others)}" if others else "they declare no named port"
            n = len(dests)
            who = f"is declared by none of the {n} pod{'s' if n != 1 else ''} {chosen} ({have})"
        else:
            who = "is declared by no pod here: the inventory holds none of the pods it would be a port of"
        return [("named-port-undeclared",
                 f"port name {port.name!r} ({port.protocol.value}) {who}: this port selects nothing there (a "
                 f"named port is a container port the destination pod declares under that name)")]
    out: list[tuple[str, str]] = []
    by_identity: dict[tuple[Labels, str], dict[int, list[str]]] = {}
    for pod, lab, proto, n in declaring:
        by_identity.setdefault((lab, proto), {}).setdefault(n, []).append(pod.ref)
    for (lab, proto), numbers in sorted(by_identity.items(), key=lambda kv: sorted(kv[1].items())):
        if len(numbers) > 1:
            detail = "; ".join(f"{n} by {', '.join(sorted(refs))}" for n, refs in sorted(numbers.items()))
            out.append(("named-port-conflict",
                        f"port name {port.name!r} ({proto}) is declared with different numbers by pods with the "
                        f"same labels (one identity): {detail}. l7gate keeps one policy per identity, so the name "
                        f"selects nothing for them: give the pods one number, or name the port by number"))
            continue
        without = sorted(pod.ref for pod, other in dests if other == lab and not any(
            name == port.name and p == proto for name, _, p in pod.named_ports))
        if ingress and without:
            declaring_refs = sorted(r for refs in numbers.values() for r in refs)
            out.append(("named-port-conflict",
                        f"port name {port.name!r} ({proto}) is declared by {', '.join(declaring_refs)} but not by "
                        f"{', '.join(without)}, pods with the same labels (one identity). l7gate keeps one policy per "
                        f"identity, and on ingress a name must be every pod's: it selects nothing for them"))
    return out


# -- toServices against the inventory -------------------------------------------------------------


def check_services(manifests: Iterable[Manifest], report: ValidationReport, *, cluster_name: str) -> None:
    """Warn about `toServices` entries that select nothing for the input's Services and
    EndpointSlices (module docstring)."""
    manifests = list(manifests)
    naming = [(m, policy) for m, policy in report.policies
              if any(isinstance(p, ServicePeer) for r in policy.rules for pr in r.rules for p in pr.peers or ())]
    if not naming or not any(m.kind == "Service" for m in manifests):
        return
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    for m in manifests:
        try:
            if m.kind == "Service":
                services.append(parse_service(m.obj, default_cluster=cluster_name))
            elif m.kind == "EndpointSlice":
                slices.append(parse_endpoint_slice(m.obj, default_cluster=cluster_name))
        except K8sObjectError as exc:
            report.items.append(Item(m.source, m.line, exc.resource, "warning", "", "not used as inventory for "
                                     f"toServices: {'; '.join(str(e) for e in exc.errors)}", "inventory"))
    targets = service_targets_of(services, slices).get(cluster_name, {})
    for m, policy in naming:
        seen: set[tuple[str, str]] = set()
        for rule in policy.rules:
            for pr in rule.rules:
                for peer in pr.peers or ():
                    if not isinstance(peer, ServicePeer):
                        continue
                    named = named_services(peer, targets)
                    selectable = [t for t in named if t.selectable]
                    if named and not selectable:
                        code, message = "services-selector", (
                            f"{peer} names {', '.join('Service ' + t.key for t in named)} of the input, which "
                            f"{'has' if len(named) == 1 else 'have'} a selector: toServices selects only Services "
                            "without one (whose endpoints someone else manages), so this entry selects nothing. "
                            "For the pods behind a Service, write toEndpoints with its selector")
                    elif selectable and not any(t.addresses for t in selectable):
                        code, message = "services-no-endpoints", (
                            f"{peer} names {', '.join('Service ' + t.key for t in selectable)} of the input, but no "
                            "EndpointSlice of the input gives it a ready endpoint: it selects nothing until one "
                            "does")
                    else:
                        continue
                    path = f"{pr.origin.path}.toServices"
                    if (path, message) not in seen:
                        seen.add((path, message))
                        report.items.append(Item(m.source, m.line, policy.key, "warning", path, message, code))
