"""`make demo`'s loopback scenario (scripts/demo-loopback.sh: two clusters' agents, their etcds,
the seed's policies, its checks and flows) passes with either L7 engine. The script exits
non-zero on any verdict that differs from the article's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("engine", ["envoy", "h11"])
def test_loopback_demo_passes(engine: str, require_envoy: None) -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo-loopback.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "L7G_ENGINE": engine})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "MISMATCH" not in out
    assert f"requests through the L7 proxy ({engine}" in out
    assert "ERROR      400 path_normalization_failed" in out, out[-3000:]
