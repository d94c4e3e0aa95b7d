"""The DNS proxy's import contracts are real: it sits among the backends (no daemon, no sibling
backend) and uses nothing of ours but `policy` — the agent wires it through callbacks. A
planted import breaks the contract it violates (the method of test_layers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.test_layers import (CONTRACTS, _plant, contract, layer_modules, package_copy_factory,
                                   run_lint_imports)

__all__ = ["package_copy_factory"]  # the fixture, used by name below

OWN = contract("forbidden", "l7gate.dnsproxy")["name"]
LAYERS = contract("layers")["name"]
NO_TESTING = "No product package imports the test infrastructure"
PLANTS = [
    ("import l7gate.identity\n", OWN),
    ("from l7gate.kvstore import api\n", OWN),
    ("import l7gate.services\n", OWN),
    ("import l7gate.agent\n", LAYERS),
    ("import l7gate.l7proxy\n", LAYERS),  # backends are independent siblings
    ("import l7gate.testing\n", NO_TESTING),
]


def test_dnsproxy_sits_among_the_backends() -> None:
    assert "l7gate.dnsproxy" in layer_modules(contract("layers"))
    backends = next(layer for layer in contract("layers")["layers"] if "l7gate.l7proxy" in layer)
    assert "l7gate.dnsproxy" in backends
    no_testing = next(c for c in CONTRACTS if c["name"] == NO_TESTING)
    assert "l7gate.dnsproxy" in no_testing["source_modules"]


@pytest.mark.parametrize(("code", "expected"), PLANTS, ids=[c.strip() for c, _ in PLANTS])
def test_planted_import_in_dnsproxy_breaks_its_contract(
    package_copy_factory: Callable[[], Path], code: str, expected: str
) -> None:
    root = package_copy_factory()
    _plant(root, "l7gate.dnsproxy._plant", code)
    rc, output, statuses = run_lint_imports(root)
    assert rc != 0, output
    assert statuses.get(expected) == "BROKEN", output
    assert "l7gate.dnsproxy" in output, output
