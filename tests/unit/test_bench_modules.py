"""Every bench module imports: `make bench` is not part of `make test`, so a renamed name it
uses would otherwise be found only by the next full bench run (it happened: a type-URL constant
moved and three modules failed to import)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("module", sorted(p.stem for p in BENCH.glob("*.py")))
def test_bench_module_imports(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    importlib.import_module(module)
    assert module in sys.modules
