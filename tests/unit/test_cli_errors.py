"""Every CLI error is one line that says what to do: no tracebacks for a bad --admin, an agent
that is not there, one that does not answer in time."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from l7gate import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("address", ["foo", "unix:", "127.0.0.1:notaport", "host:99999"])
def test_a_bad_admin_address_is_a_usage_error(capsys: pytest.CaptureFixture[str], address: str) -> None:
    rc, err = run(capsys, "status", "--admin", address)
    assert rc == 2 and err.startswith("l7gate: error: --admin:") and "unix:/run/l7gate/admin.sock" in err


def test_no_agent_says_where_it_looked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, err = run(capsys, "policy", "get", "--admin", f"unix:{tmp_path}/none.sock")
    assert rc == 2 and "cannot reach the agent" in err and "is `l7gate agent` running?" in err


def test_an_agent_that_does_not_answer_in_time(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)  # accepts (in the kernel), never answers
    try:
        rc, err = run(capsys, "status", "--admin", f"unix:{tmp_path}/mute.sock", "--timeout", "0.3")
    finally:
        mute.close()
    assert rc == 2 and "did not answer in time" in err


def test_an_unreadable_token_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, err = run(capsys, "status", "--admin", "127.0.0.1:9", "--token-file", str(tmp_path / "nope"))
    assert rc == 2 and "--token-file" in err and "No such file" in err
