"""Pinned maps: reused across agents without a flush, and refused when foreign or corrupt."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from l7gate.redirect_bpf.compile import KAction, PolicyKey, PolicyValue
from l7gate.redirect_bpf.loader import KernelDatapath, check_pins

pytestmark = pytest.mark.privileged("bcc and bpffs")


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    d = Path(f"/sys/fs/bpf/l7g/test-{secrets.token_hex(3)}")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        try:
            d.parent.rmdir()
        except OSError:
            pass


def test_second_open_reuses_maps_and_writes_only_the_difference(pin_dir: Path) -> None:
    want = {
        PolicyKey(65536, 0, 6, 0, 0, 0): PolicyValue(KAction.DENY),
        PolicyKey(65536, 0, 6, 131072, 8080, 16): PolicyValue(KAction.REDIRECT),
    }
    a = KernelDatapath(pin_dir)
    a.open()
    assert a.set_policy(want) == 2
    assert a.set_ipcache({ipaddress.ip_network("10.9.0.5/32"): 131072}) == 1
    a.close()
    b = KernelDatapath(pin_dir)  # a restarted agent
    b.open()
    assert b.replaced == []
    assert b.policy_entries() == 2  # read back from the pinned map, not flushed
    assert b.set_policy(want) == 0
    assert b.set_ipcache({ipaddress.ip_network("10.9.0.5/32"): 131072}) == 0
    want2 = dict(want)
    del want2[PolicyKey(65536, 0, 6, 131072, 8080, 16)]
    assert b.set_policy(want2) == 1
    b.close()


def test_foreign_pinned_map_is_detected_and_replaced(pin_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    pin_dir.mkdir(parents=True)
    # Somebody else's map where our policy map belongs: a plain hash with other sizes.
    subprocess.run(["bpftool", "map", "create", str(pin_dir / "policy"), "type", "hash", "key", "4",
                    "value", "4", "entries", "16", "name", "foreign"], check=True)
    problems = check_pins(pin_dir)
    assert any("policy" in p and "expected lpm_trie" in p for p in problems), problems
    dp = KernelDatapath(pin_dir)
    with caplog.at_level("WARNING"):
        dp.open()
    assert dp.replaced and "pinned map refused" in caplog.text
    assert check_pins(pin_dir) == []
    assert dp.set_policy({PolicyKey(1, 0, 6, 0, 0, 0): PolicyValue(KAction.ALLOW)}) == 1
    dp.close()


def test_maps_without_our_magic_are_not_trusted(pin_dir: Path) -> None:
    dp = KernelDatapath(pin_dir)
    dp.open()
    dp.close()
    # Corrupt the meta map: wrong magic.
    subprocess.run(["bpftool", "map", "update", "pinned", str(pin_dir / "meta"), "key", "0", "0", "0", "0",
                    "value", *(["1"] + ["0"] * 15)], check=True)
    problems = check_pins(pin_dir)
    assert problems and "magic" in problems[0]
    again = KernelDatapath(pin_dir)
    again.open()
    assert again.replaced and check_pins(pin_dir) == []
    again.close()


def test_pinned_maps_are_roots_alone(pin_dir: Path) -> None:
    """docs/security.md, pinned maps: the policy, ipcache and auth maps a local user could
    rewrite to let traffic through are root's alone."""
    import os
    import stat as st

    dp = KernelDatapath(pin_dir)
    dp.open()
    try:
        pins = [p for p in pin_dir.iterdir() if p.is_file()]
        assert {"policy", "ipcache", "auth"} <= {p.name for p in pins}
        for p in pins:
            s = p.stat()
            assert s.st_uid == 0 and st.S_IMODE(s.st_mode) & 0o077 == 0, (p, oct(s.st_mode))
        assert not os.stat(pin_dir).st_mode & 0o022  # nobody else may replace a pin
        r = subprocess.run(["cat", str(pin_dir / "policy")], user=65534, group=65534, extra_groups=[],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
    finally:
        dp.close()
