"""l7gate benchmark harness: `python bench/run.py [--only NAME]... [--quick]`.

Theory of operation: every `bench/bench_*.py` module is a benchmark. It exposes
`run(ctx: Context) -> list[Result]`; each Result is one measured number, usually set against a
baseline (the full recompute for an incremental update, 10 identities for 10,000, ...), with the
goal it is held to. The harness imports the modules in name order, runs them one after another
in this process, prints one ratio line per result and writes `bench/RESULTS.md`: the command
line, the date, the commit, the machine, then one table per module. A module that raises is
reported with its traceback and makes the exit status 1; the others still run.

Bench modules import the types from this file: `from run import Context, Result` (this script
registers itself as the module `run`, so those are the very classes the harness checks).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Result:
    """One measured number.

    `ratio` defaults to value / baseline_value (so 0.01 means "a hundredth of the baseline");
    pass it explicitly when another ratio reads better. `goal` is the sentence the number is held
    to ("incremental update >= 100x cheaper than full recompute") and `goal_met` whether it was.
    """

    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str | None = None
    goal_met: bool | None = None
    notes: str = ""

    def effective_ratio(self) -> float | None:
        if self.ratio is not None:
            return self.ratio
        if self.baseline_value:
            return self.value / self.baseline_value
        return None


@dataclass(frozen=True, slots=True)
class Timing:
    """Wall-clock seconds of `runs` calls, after `warmup` untimed calls."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def spread(self) -> str:
        return f"median of {len(self.samples)}, min {fmt(self.min)} s, max {fmt(self.max)} s"


@dataclass
class Context:
    """What a bench module gets: timing and memory helpers, a scratch folder, and options.

    Not thread-safe; one Context is shared by all modules of a run.
    """

    scratch: Path  # an empty folder for files, removed when the run ends
    quick: bool = False

    def measure(self, fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> Timing:
        """Time `fn()` `runs` times (after `warmup` calls), collecting garbage before each."""
        if runs < 1:
            raise ValueError("runs must be >= 1")
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(runs):
            gc.collect()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return Timing(tuple(samples))

    def median(self, fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> float:
        """Median wall-clock seconds of `fn()` over `runs` calls."""
        return self.measure(fn, runs=runs, warmup=warmup).median

    def peak_memory(self, fn: Callable[[], T]) -> tuple[T, int]:
        """Run `fn()` once under tracemalloc; return its result and the peak bytes it allocated.

        Counts Python allocations only (not C libraries' own), and runs several times slower:
        never time the same call.
        """
        gc.collect()
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        try:
            value = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if not was_tracing:
                tracemalloc.stop()
        return value, peak - before

    def log(self, message: str) -> None:
        print(f"  .. {message}", flush=True)


# Bench modules write `from run import Context, Result`: make that this very module.
sys.modules.setdefault("run", sys.modules[__name__])


def fmt(x: float) -> str:
    return f"{x:.4g}"


def fmt_ratio(r: float) -> str:
    if r != 0 and abs(r) < 1:
        return f"{r:.3g} (1/{1 / r:.3g})"
    return f"{r:.3g}"


def ratio_line(r: Result) -> str:
    line = f"{r.name}: {fmt(r.value)} {r.unit}"
    if r.baseline_name is not None and r.baseline_value is not None:
        line += f" vs {r.baseline_name}: {fmt(r.baseline_value)} {r.unit}"
    ratio = r.effective_ratio()
    if ratio is not None:
        line += f" -> ratio {fmt_ratio(ratio)}"
    if r.goal:
        verdict = {True: "met", False: "MISSED", None: "not judged"}[r.goal_met]
        line += f" [goal {verdict}: {r.goal}]"
    return line


def _run_text(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except (OSError, ValueError):
        pass
    u = platform.uname()
    commit = _run_text(["git", "rev-parse", "--short", "HEAD"])
    if _run_text(["git", "status", "--porcelain", "--untracked-files=no"]) != "?":
        commit += " (with uncommitted changes)"
    return {
        "uname": f"{u.system} {u.release} {u.version} {u.machine}",
        "cpu": cpu,
        "nproc": f"{os.cpu_count()} (usable here: {len(os.sched_getaffinity(0))})",
        "memory": mem,
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "commit": commit,
    }


def discover() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class ModuleOutcome:
    name: str
    seconds: float
    results: list[Result]
    error: str | None = None


def run_module(name: str, path: Path, ctx: Context) -> ModuleOutcome:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        module = load(name, path)
        run = getattr(module, "run", None)
        if not callable(run):
            raise TypeError(f"{path.name} has no run(ctx) function")
        results = run(ctx)
        if not isinstance(results, list) or not all(isinstance(r, Result) for r in results):
            raise TypeError(f"{name}.run(ctx) must return list[Result], got {results!r:.200}")
    except Exception:
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        return ModuleOutcome(name, time.perf_counter() - start, [], error)
    for r in results:
        print(f"  {ratio_line(r)}", flush=True)
    return ModuleOutcome(name, time.perf_counter() - start, results)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(outcomes: list[ModuleOutcome], argv: list[str], started: _dt.datetime) -> str:
    info = machine_info()
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/run.py`; do not edit by hand.",
        "",
        f"- command: `{shlex.join(argv)}`",
        f"- date: {started.isoformat(timespec='seconds')}",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
    ]
    for o in outcomes:
        lines += [f"## {o.name}", "", f"Ran in {o.seconds:.1f} s.", ""]
        if o.error is not None:
            lines += ["**FAILED:**", "", "```", o.error.rstrip(), "```", ""]
            continue
        lines += [
            "| result | value | baseline | ratio | goal | notes |",
            "|---|---|---|---|---|---|",
        ]
        for r in o.results:
            baseline = (
                f"{r.baseline_name}: {fmt(r.baseline_value)} {r.unit}"
                if r.baseline_name is not None and r.baseline_value is not None
                else ""
            )
            ratio = r.effective_ratio()
            goal = ""
            if r.goal:
                goal = {True: "met: ", False: "**MISSED**: ", None: ""}[r.goal_met] + r.goal
            lines.append(
                "| "
                + " | ".join(
                    _cell(c)
                    for c in (
                        r.name,
                        f"{fmt(r.value)} {r.unit}",
                        baseline,
                        fmt_ratio(ratio) if ratio is not None else "",
                        goal,
                        r.notes,
                    )
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this module (bench_NAME.py; the bench_ prefix is optional); repeatable",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCH_DIR / "RESULTS.md",
        help="where to write the results (default: bench/RESULTS.md)",
    )
    args = parser.parse_args(argv)

    modules = discover()
    if not modules:
        print(f"bench: no benchmark modules (bench/bench_*.py) in {BENCH_DIR}; nothing to run")
        return 0
    if args.only:
        wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in args.only]
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            parser.error(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(modules)})")
        modules = {n: modules[n] for n in modules if n in wanted}

    started = _dt.datetime.now(_dt.timezone.utc)
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # so bench modules can share helper modules
    with tempfile.TemporaryDirectory(prefix="l7gate-bench-") as scratch:
        ctx = Context(scratch=Path(scratch), quick=args.quick)
        outcomes = [run_module(name, path, ctx) for name, path in modules.items()]

    command = ["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]
    args.output.write_text(render(outcomes, command, started))
    failed = [o.name for o in outcomes if o.error is not None]
    missed = [r.name for o in outcomes for r in o.results if r.goal_met is False]
    print(f"bench: wrote {args.output}")
    if missed:
        print(f"bench: goals missed: {', '.join(missed)}")
    if failed:
        print(f"bench: FAILED modules: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
