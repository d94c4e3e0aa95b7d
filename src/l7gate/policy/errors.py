"""Validation findings: every error and warning names the field at fault by its path.

Paths read like the YAML they point into: `spec.ingress[0].toPorts[0].rules.http[1].path`.
A policy with one error is rejected whole; other policies in the same file are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finding:
    """One error or warning. `code` is a stable identifier tests and tools can rely on."""

    path: str
    message: str
    code: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PolicyValidationError(Exception):
    """A policy document that cannot be used. Carries every error found, not just the first."""

    def __init__(self, resource: str, errors: tuple[Finding, ...]) -> None:
        self.resource = resource
        self.errors = errors
        lines = "; ".join(str(e) for e in errors)
        super().__init__(f"{resource}: {lines}" if resource else lines)
