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
        for word, n in _shell_commands(p.read_text()):
            found.setdefault(word, f"{p.relative_to(ROOT)}:{n}")
    found.pop("python3", None)  # the interpreter the installer starts from
    return found


def _shell_commands(script: str) -> list[tuple[str, int]]:
    """(program, line number) of each command word in a shell script, shell builtins, the
    script's own functions and assignments left out."""
    text = _shell_code(script)
    functions = set(re.findall(r"^\s*([a-z_][a-z0-9_]*)\(\)\s*\{", text, re.M))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for w in SH_WORD.finditer(line):
            word = w.group(1)
            rest = line[w.end(1):]
            if word in SHELL_WORDS or word in functions or rest.startswith("=") or not word.islower():
                continue
            out.append((word, n))
    return out


# A here-document's delimiter after `<<` or `<<-`: a word, possibly quoted ('EOF', "EOF", \EOF).
HEREDOC = re.compile(r"""<<(-?)[ \t]*((?:'[^'\n]*'|"[^"\n]*"|\\.|[^\s;&|<>()'"\\])+)""")
# What an unquoted here-document runs while it is expanded: $(...) and `...`.
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)|`([^`]*)`")


def _shell_code(text: str) -> str:
    """`text` as the shell reads its commands, one output line per input line: comments removed;
    each quoted string replaced by Q, since code in strings is no command and a quoted command
    ("$L7GATE") still fills its place; a here-document's body blanked, since it is the data a
    command reads (of an unquoted one only the command substitutions, which the shell runs, are
    kept), and the lines after its delimiter read as code again."""
    out: list[str] = []
    quote, escaped, comment, prev = "", False, False, "\n"
    pending: list[tuple[str, bool, bool]] = []  # here-documents opened on this line: (end, -, quoted)
    lines = text.split("\n")
    row = 0
    while row < len(lines):
        line = lines[row]
        row += 1
        i = 0
        while i < len(line):
            ch = line[i]
            if comment:
                pass
            elif quote:
                if escaped:
                    escaped = False
                elif ch == "\\" and quote == '"':
                    escaped = True
                elif ch == quote:
                    quote = ""
            elif ch == "#" and prev in " \t\n;":
                comment = True
            elif ch in "'\"":
                quote = ch
                out.append("Q")
            elif ch == "\\":
                out.append(line[i : i + 2])
                prev = line[i + 1 : i + 2] or ch
                i += 2
                continue
            # `<<<` is a here-string; a delimiter that is no name is arithmetic's shift: $((1 << 3))
            elif (line.startswith("<<", i) and not line.startswith("<<<", i) and (m := HEREDOC.match(line, i))
                  and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", end := re.sub(r"""['"\\]""", "", m.group(2)))):
                pending.append((end, m.group(1) == "-", end != m.group(2)))
                out.append("<<" + end)
                prev = line[m.end() - 1]
                i = m.end()
                continue
            else:
                out.append(ch)
            prev = ch
            i += 1
        if row < len(lines):
            out.append("\n")
        comment, prev = False, "\n"
        if quote:
            continue  # a quoted string goes on; a here-document starts after the command's last line
        for end, dash, quoted in pending:
            while row < len(lines):
                body = lines[row]
                row += 1
                if (body.lstrip("\t") if dash else body) == end:
                    out.append("\n" if row < len(lines) else "")
                    break
                if not quoted:
                    out.append(" ; ".join("(" + _shell_code(a or b) + ")" for a, b in SUBSTITUTION.findall(body)))
                out.append("\n" if row < len(lines) else "")
        pending = []
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


# tee and tr: started only after scripts/demo-loopback.sh's here-document (<<'SPLIT').
@pytest.mark.parametrize("prog", ["tcpdump", "curl", "bpftool", "iptables", "ip", "nft", "ss", "tee", "tr"])
def test_the_scan_sees_the_programs_the_tests_start(prog: str) -> None:
    """The scan above would miss nothing it must see: these are started by tests, demos or benches."""
    assert prog in _programs()


def test_the_scan_reads_past_here_documents() -> None:
    """A here-document's body is data, not commands; the lines after its delimiter are commands
    again, however the delimiter is quoted. Of an unquoted body, the shell runs the substitutions."""
    script = "\n".join([
        "cat > f <<CFG",  # 1
        "name: $(hostname -f)",  # 2
        "import os",  # 3
        "CFG",  # 4
        "\"$PY\" - <<'PYEOF'",  # 5
        "import sys",  # 6
        "print('it's')",  # 7: an apostrophe in a body opens no quote
        "PYEOF",  # 8
        "tee out < f",  # 9
        "\tcat <<-\"END\"",  # 10
        "\tjq . $(not run)",  # 11
        "\tEND",  # 12
        "tr -d x < f | wc -l",  # 13
        "echo $((1 << 3)); sort f",  # 14
    ])
    assert _shell_commands(script) == [("cat", 1), ("hostname", 2), ("tee", 9), ("cat", 10), ("tr", 13), ("wc", 13),
                                       ("sort", 14)]
