"""`l7gate policy validate`: every error and warning in a set of manifest files.

Non-policy objects (Pods, Services, Deployments, ...) are skipped: a folder of application
manifests with policies among them validates as the policies alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..k8s.manifests import Manifest, load
from ..policy.errors import PolicyValidationError
from ..policy.parse import POLICY_KINDS, parse_policy
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
    checked: int = 0
    invalid: int = 0
    skipped: int = 0
    usage_errors: list[str] = field(default_factory=list)

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
        s = (
            f"{self.checked} polic{'y' if self.checked == 1 else 'ies'} checked: "
            f"{self.invalid} invalid, {w} warning{'s' if w != 1 else ''}"
        )
        if self.skipped:
            s += f"; {self.skipped} other object{'s' if self.skipped != 1 else ''} skipped"
        return s

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": not self.invalid and not self.usage_errors and not self.errors,
            "checked": self.checked,
            "invalid": self.invalid,
            "skipped": self.skipped,
            "errors": [i.to_json() for i in self.errors],
            "warnings": [i.to_json() for i in self.warnings],
            "usage_errors": self.usage_errors,
        }


def _resource_name(obj: object) -> str:
    if not isinstance(obj, dict):
        return ""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    kind = obj.get("kind", "?")
    return f"{kind}/{ns + '/' if isinstance(ns, str) and kind != POLICY_KINDS[1] else ''}{name}"


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
        if obj["kind"] not in POLICY_KINDS:
            report.skipped += 1
            continue
        report.checked += 1
        resource = _resource_name(obj)
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
            report.items.append(
                Item(m.source, m.line, policy.key, "warning", "metadata.name",
                     f"defined again (first in {seen[policy.key]}); the later definition wins",
                     "duplicate")
            )
        seen[policy.key] = m.where
        report.policies.append((m, policy))


def validate_paths(
    paths: Iterable[str],
    *,
    default_namespace: str = "default",
    cluster_name: str = "default",
    stdin_text: str | None = None,
) -> ValidationReport:
    report = ValidationReport()
    manifests, load_errors = load(paths, stdin_text)
    for e in load_errors:
        if e.missing:
            report.usage_errors.append(f"{e.source}: {e.message}")
        else:
            report.items.append(Item(e.source, 0, "", "error", "", e.message, "yaml"))
            report.invalid += 1
    check_manifests(manifests, report, default_namespace=default_namespace, cluster_name=cluster_name)
    return report
