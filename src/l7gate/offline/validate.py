"""`l7gate policy validate`: every error and warning in a set of manifest files.

Ordinary Kubernetes objects (Pods, Services, Deployments, ...) are skipped and listed: a folder
of application manifests with policies among them validates as the policies alone. A kind nobody
knows (a misspelled `CiliumNetworkPolicyy`), a policy l7gate would not enforce (an
AdminNetworkPolicy), the same policy twice, an empty file and an input without any policy are errors:
each of them would otherwise leave traffic unpoliced while the check says all is well.
CiliumCIDRGroups are checked too (an input of groups alone is fine: they are applied on their own).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..k8s.manifests import Manifest, kind_problem, load, object_name
from ..policy.cidrgroup import CIDRGroup, parse_cidr_group
from ..policy.errors import PolicyValidationError
from ..policy.parse import KIND_CIDR_GROUP, POLICY_INPUT_KINDS, POLICY_KINDS, parse_policy
from ..policy.types import Policy


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
    if not report.checked and not report.checked_groups and not report.errors and not report.usage_errors:
        where = " ".join("<stdin>" if p == "-" else p for p in paths)
        report.items.append(
            Item(where, 0, "", "error", "",
                 f"no CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy in it, so nothing was checked "
                 f"({report.skipped} other object{'s' if report.skipped != 1 else ''} skipped); give the "
                 "files or folders that hold your policies", "no-policy")
        )
    return report
