"""The layer contracts in pyproject.toml hold, and really are enforced (CONVENTIONS.md 1, 2).

`lint-imports` runs on this checkout and must keep every contract. Because a contract that
is misspelt, or that names a module which never imports anything, would also be "kept", the
same contracts are then run on a temporary copy of the package with one forbidden import
planted at a time: each plant must break the contract it violates.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
CONTRACTS: list[dict[str, Any]] = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"][
    "contracts"
]


def _lint_imports_exe() -> str:
    exe = Path(sys.executable).parent / "lint-imports"
    if exe.is_file():
        return str(exe)
    found = shutil.which("lint-imports")
    assert found, "lint-imports not found: run `make install` (import-linter is a dev dependency)"
    return found


def run_lint_imports(root: Path) -> tuple[int, str, dict[str, str]]:
    """Run lint-imports on root/src with root/pyproject.toml; return (rc, output, name→status)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Put this tree's src first so the editable install of another checkout cannot stand in.
    env["PYTHONPATH"] = str(root / "src")
    proc = subprocess.run(
        [_lint_imports_exe(), "--no-cache"],  # reads root/pyproject.toml
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    statuses = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(.+?) (KEPT|BROKEN)$", output, flags=re.MULTILINE)
    }
    return proc.returncode, output, statuses


def layer_modules(contract: dict[str, Any]) -> list[str]:
    names = []
    for layer in contract["layers"]:
        for part in re.split(r"[|:]", layer):
            names.append(part.strip().strip("()"))
    return names


def contract(kind: str, source: str | None = None) -> dict[str, Any]:
    """The contract of `kind` about `source`: the narrowest one naming it (the test
    infrastructure's contract names every product package)."""
    found = [c for c in CONTRACTS
             if c["type"] == kind and (source is None or source in c.get("source_modules", []))]
    if not found:
        raise AssertionError(f"pyproject.toml has no {kind} contract for {source}")
    return min(found, key=lambda c: len(c.get("source_modules", [])))


def test_every_contract_is_kept_on_this_checkout() -> None:
    rc, output, statuses = run_lint_imports(ROOT)
    assert rc == 0, output
    assert statuses == {c["name"]: "KEPT" for c in CONTRACTS}, output


def test_every_package_sits_in_a_layer() -> None:
    """A package outside the layers contract would be free to import anything."""
    layered = set(layer_modules(contract("layers")))
    pkg = ROOT / "src" / "l7gate"
    children = {
        f"l7gate.{p.stem}"
        for p in pkg.iterdir()
        if not p.name.startswith("_")
        and ((p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")
    }
    assert children, "found no packages under src/l7gate"
    assert sorted(children - layered) == [], "add these to the layers contract in pyproject.toml"


@pytest.fixture(scope="module")
def package_copy_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], Path]]:
    """Fresh copies of src/l7gate + pyproject.toml, with every layer module present."""

    def make() -> Path:
        root = tmp_path_factory.mktemp("layers")
        shutil.copytree(
            ROOT / "src" / "l7gate",
            root / "src" / "l7gate",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        shutil.copy(PYPROJECT, root / "pyproject.toml")
        # A layer module another engineer has not written yet would stop lint-imports before it
        # checks anything; stand in an empty module so the plants below are what is tested.
        for name in layer_modules(contract("layers")):
            path = root / "src" / Path(*name.split("."))
            if not path.is_dir() and not path.with_suffix(".py").exists():
                path.with_suffix(".py").write_text("")
        return root

    yield make


def test_copy_keeps_every_contract(package_copy_factory: Callable[[], Path]) -> None:
    rc, output, statuses = run_lint_imports(package_copy_factory())
    assert rc == 0, output
    assert statuses == {c["name"]: "KEPT" for c in CONTRACTS}, output


def _plant(root: Path, module: str, code: str) -> None:
    """A module `module` holding `code`; for a plant "into" a single-file module (l7gate.client),
    the code is appended to that file."""
    path = root / "src" / Path(*module.split(".")).with_suffix(".py")
    if path.parent.with_suffix(".py").is_file():
        with path.parent.with_suffix(".py").open("a") as fh:
            fh.write("\n" + code)
        return
    path.write_text(code)


POLICY_IO = ("forbidden", "l7gate.policy")
PLANTS = [
    # (module to create, its source, contract that must break)
    ("l7gate.policy._plant", "import socket\n", POLICY_IO),
    ("l7gate.policy._plant", "def f() -> None:\n    import asyncio\n", POLICY_IO),
    ("l7gate.policy._plant", "import grpc\n", POLICY_IO),
    ("l7gate.policy._plant", "from subprocess import run\n", POLICY_IO),
    ("l7gate.policy._plant", "from l7gate.kvstore import x\n", POLICY_IO),
    ("l7gate.policy._plant", "import l7gate.xds\n", ("layers", None)),
    ("l7gate.identity._plant", "import l7gate.xds\n", ("layers", None)),
    ("l7gate.xds._plant", "import l7gate.redirect_bpf\n", ("layers", None)),
    ("l7gate.k8s._plant", "import l7gate.agent\n", ("layers", None)),
    ("l7gate.agent._plant", "import l7gate.cli\n", ("layers", None)),
    ("l7gate.kvstore._plant", "import l7gate.policy\n", ("forbidden", "l7gate.kvstore")),
    ("l7gate.l7proxy._plant", "import l7gate.identity\n", ("forbidden", "l7gate.l7proxy")),
    # the test infrastructure is imported by no product package, not even the daemon
    ("l7gate.agent._plant", "import l7gate.testing\n", ("forbidden", "l7gate.agent")),
    ("l7gate.mtls._plant", "from l7gate.testing import mtls\n", ("forbidden", "l7gate.mtls")),
    # the offline tools: no daemon, no backends, no I/O beyond files
    ("l7gate.offline._plant", "import l7gate.agent\n", ("forbidden", "l7gate.offline")),
    ("l7gate.offline._plant", "import l7gate.xds\n", ("forbidden", "l7gate.offline")),
    ("l7gate.offline._plant", "import socket\n", ("forbidden", "l7gate.offline")),
    # the daemon, the offline tools and the client are independent siblings
    ("l7gate.agent._plant", "import l7gate.client\n", ("layers", None)),
    ("l7gate.client._plant", "import l7gate.agent\n", ("layers", None)),
    ("l7gate.agent._plant", "import l7gate.offline\n", ("layers", None)),
]


@pytest.mark.parametrize(
    ("module", "code", "expected"),
    PLANTS,
    ids=[f"{m.split('.')[1]}:{c.strip().splitlines()[-1].strip()}" for m, c, _ in PLANTS],
)
def test_planted_import_breaks_its_contract(
    package_copy_factory: Callable[[], Path],
    module: str,
    code: str,
    expected: tuple[str, str | None],
) -> None:
    root = package_copy_factory()
    _plant(root, module, code)
    rc, output, statuses = run_lint_imports(root)
    name = contract(*expected)["name"]
    assert rc != 0, output
    assert statuses.get(name) == "BROKEN", output
    assert module.removesuffix("._plant") in output, output
