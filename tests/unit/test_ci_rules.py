"""The rules that keep CI honest (README, tests/conftest.py), checked on the project's own files:

- no test skips itself directly: a missing tool or privilege goes through `unavailable()` or the
  tier markers, which skip locally and fail under CI=true, so a green CI never hides a test that
  did not run;
- every program the code, tests, demos and benches start is installed by scripts/install.sh
  (a Debian package in APT_PACKAGES) or comes with the venv: a fresh machine runs `make demo`
  and `make test` with nothing installed by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# (A strict xfail still runs and fails when it passes: it hides nothing.)
SKIPS = re.compile(r"pytest\.skip\(|pytest\.importorskip\(|mark\.skip\b|mark\.skipif\b|unittest\.skip|pytest\.xfail\(")

# Programs started from Python: subprocess.run with a literal argv, Popen, check_output, node.run,
# the testbed's pod.run and friends: the first string literal of an argv list names the program.
PY_STARTS = re.compile(
    r"""(?:subprocess\.(?:run|Popen|check_output|check_call|call)|\.run|\.popen|\.spawn|_run|_sh|run_in|exec_in)\(\s*\[\s*["']([A-Za-z0-9_.+-]+)["']""")
# Programs run by name in the shell scripts: the first word of a command.
SH_WORD = re.compile(r"(?:^|[;&|(]|\bthen\b|\bdo\b|&&|\|\|)\s*([A-Za-z][A-Za-z0-9_.+-]*)")
# Always present on Debian (Essential: yes, or the base system the installer itself needs).
BASE_PACKAGES = {"coreutils", "util-linux", "procps", "bash", "dash", "mount", "kmod", "libc-bin", "sed", "grep",
                 "findutils", "debianutils", "diffutils", "gzip", "tar", "passwd", "login", "hostname",
                 "ncurses-bin", "sysvinit-utils", "bsdutils", "dpkg", "apt", "gawk", "mawk"}
SHELL_WORDS = {"set", "cd", "echo", "printf", "local", "shift", "exit", "return", "for", "while", "if", "then",
               "else", "fi", "do", "done", "case", "esac", "trap", "export", "wait", "kill", "read", "eval",
               "exec", "true", "false", "test", "command", "declare", "unset", "in", "function", "row",
               "cleanup", "say", "need_root", "pick_python", "make_venv", "install_project", "elif",
               "install_apt_packages", "setup_datapath_host", "source", "break", "continue", "pids"}


def _sources() -> list[Path]:
    out = []
    for top in ("src", "tests", "scripts", "bench"):
        out += [p for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts]
    return out


def test_no_test_skips_itself_directly() -> None:
    found = []
    for p in (ROOT / "tests").rglob("*.py"):
        if p.name == "conftest.py" or p == Path(__file__):
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if SKIPS.search(line):
                found.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, ("tests must not skip themselves (use tests.conftest.unavailable, which fails under "
                       "CI=true):\n" + "\n".join(found))


def _apt_packages() -> set[str]:
    text = (ROOT / "scripts" / "install.sh").read_text()
    block = text[text.index("APT_PACKAGES=("):]
    block = block[: block.index("\n)")]
    return {line.split("#")[0].strip() for line in block.splitlines()[1:] if line.split("#")[0].strip()}


def _programs() -> dict[str, str]:
    """program → one place that starts it."""
    found: dict[str, str] = {}
    for p in _sources():
        if p == Path(__file__):
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            for m in PY_STARTS.finditer(line):
                found.setdefault(m.group(1), f"{p.relative_to(ROOT)}:{n}")
    for p in sorted((ROOT / "scripts").glob("*.sh")):
        if p.name == "install.sh":
            continue  # the installer itself runs before anything is installed
        text = _strip_heredocs(_strip_quotes(p.read_text()))
        functions = set(re.findall(r"^\s*([a-z_][a-z0-9_]*)\(\)\s*\{", text, re.M))
        for n, line in enumerate(text.splitlines(), 1):
            code = line
            for w in SH_WORD.finditer(code):
                word = w.group(1)
                rest = code[w.end(1):]
                if word in SHELL_WORDS or word in functions or rest.startswith("=") or not word.islower():
                    continue
                found.setdefault(word, f"{p.relative_to(ROOT)}:{n}")
    found.pop("python3", None)  # the interpreter the installer starts from
    return found


def _strip_heredocs(text: str) -> str:
    out, end = [], None
    for line in text.splitlines():
        if end is not None:
            out.append("")
            end = None if line.strip() == end else end
            continue
        m = re.search(r"<<-?\s*([A-Z]+)", line)
        end = m.group(1) if m else None
        out.append(line)
    return "\n".join(out)


def _strip_quotes(text: str) -> str:
    """`text` without comments, each quoted string replaced by Q (newlines kept): code in strings
    is no command, and a quoted command ("$L7GATE") still fills its place."""
    out: list[str] = []
    quote, escaped, comment, prev = "", False, False, "\n"
    for ch in text:
        if comment:
            if ch == "\n":
                comment = False
                out.append(ch)
            prev = ch
            continue
        if quote:
            if ch == "\n":
                out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
            prev = ch
            continue
        if ch == "#" and prev in " \t\n;":
            comment = True
        elif ch in "'\"":
            quote = ch
            out.append("Q")
        else:
            out.append(ch)
        prev = ch
    return "".join(out)


def _package_of(path: str) -> str | None:
    name = Path(path).name
    # merged /usr: dpkg knows /bin/ls, /sbin/ip, not /usr/bin/ls
    for candidate in (str(Path(path).resolve()), path, f"/bin/{name}", f"/sbin/{name}", f"/usr/bin/{name}",
                      f"/usr/sbin/{name}"):
        out = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.split(":")[0].strip()
    return None


def test_every_program_started_is_installed_by_the_project() -> None:
    if shutil.which("dpkg") is None:
        from tests.conftest import unavailable

        unavailable("needs dpkg (a Debian machine) to map programs to packages")
    venv_bin = Path(sys.executable).parent
    apt = _apt_packages()
    problems = []
    for prog, where in sorted(_programs().items()):
        if (venv_bin / prog).exists():
            continue
        path = shutil.which(prog)
        if path is None:
            problems.append(f"{prog} (started at {where}) is not installed here: add its package to scripts/install.sh")
            continue
        pkg = _package_of(path)
        if pkg is None:
            problems.append(f"{prog} ({path}, started at {where}) belongs to no Debian package: install it from "
                            "scripts/install.sh or the venv")
        elif (pkg not in apt and pkg not in BASE_PACKAGES and not pkg.startswith("python3")
              and not any(pkg.startswith(a + "-") for a in apt)):  # clang → clang-14, gcc → gcc-12
            problems.append(f"{prog} (started at {where}) comes from the Debian package {pkg}, which "
                            "scripts/install.sh does not install")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("prog", ["tcpdump", "curl", "bpftool", "iptables", "ip", "nft", "ss"])
def test_the_scan_sees_the_programs_the_tests_start(prog: str) -> None:
    """The scan above would miss nothing it must see: these are started by tests, demos or benches."""
    assert prog in _programs()
