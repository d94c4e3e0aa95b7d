"""bcc comes from Debian's dist-packages; loading it must not put that directory on sys.path,
where Debian's older pyOpenSSL would shadow the venv's (py-spiffe imports it through `pem`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import unavailable


def test_bcc_then_spiffe_in_one_process() -> None:
    if not Path("/usr/lib/python3/dist-packages/bcc/__init__.py").exists():
        unavailable("python3-bpfcc is not installed (make install)")
    code = (
        "import sys\n"
        "from l7gate.redirect_bpf.loader import import_bcc\n"
        "bcc = import_bcc()\n"
        "assert '/usr/lib/python3/dist-packages' not in sys.path, sys.path\n"
        "import spiffe  # imports pem, which tries OpenSSL\n"
        "import l7gate.agent.daemon\n"
        "print('ok', bcc.__file__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
