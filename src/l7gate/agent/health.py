"""Whether what is enforced is what the agent wants, in words: the agent's health.

Theory of operation
-------------------
The agent is healthy only when its Envoy runs what the agent sent it. `problems()` answers from
three sources, each read when asked:

- the supervisor: Envoy is LIVE (not starting, restarting or stopped), with its last error;
- the xDS server's rows for this node: the Envoy is connected; no type is NACKED; none has been
  STALE (sent, not acknowledged) for longer than `stale_after` seconds;
- Envoy's own listeners, checked by `check()` every `period` seconds on a thread of its own:
  every listener the agent serves is one Envoy has (`/listeners`), and Envoy has not stopped its
  listeners (`listener_manager.listener_stopped`, which `POST /drain_listeners` raises: the
  listeners stay in Envoy's configuration and `/ready` still says LIVE, yet nothing is accepted
  any more, for good).

Other sources of readiness add their own checks (`add_check`): the Kubernetes watch is not
ready until its initial lists are applied.

It also repairs what only a new Envoy can repair: stopped listeners, or listeners missing while
LDS is acknowledged, restart Envoy (at most once per `repair_every` seconds); Envoy then fetches
everything again over ADS. Problems are what `/healthz` answers 503 with, and what makes
`l7gate status` exit non-zero.

Thread safety: `problems()` may be called from any thread; `start`/`stop` once each.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from ..clock import Clock
from ..l7proxy.supervisor import EnvoyAdminError, EnvoyState, EnvoySupervisor
from ..xds.cache import LISTENER
from ..xds.server import StatusRow, SyncState

log = logging.getLogger(__name__)

STOPPED_STAT = "listener_manager.listener_stopped"


class EnforcementWatch:
    def __init__(self, envoy: EnvoySupervisor | None, xds_rows: Callable[[], list[StatusRow]],
                 served_listeners: Callable[[], frozenset[str]], node_id: str, *,
                 period: float = 1.0, stale_after: float = 10.0, repair_every: float = 10.0,
                 clock: Clock = time.monotonic, lds_rows: Callable[[], list[StatusRow]] | None = None) -> None:
        self._envoy = envoy
        self._rows = xds_rows
        # The LDS rows alone, for the check every `period` (the whole status costs a pass over
        # every subscription: 13,000 ECDS names on a node with 100 proxied ports).
        self._lds_rows = lds_rows or (lambda: [r for r in xds_rows() if r.type_url == LISTENER])
        self._served = served_listeners
        self._node_id = node_id
        self._period = period
        self._stale_after = stale_after
        self._repair_every = repair_every
        self._clock = clock
        self._lock = threading.Lock()
        self._listener_problem: str | None = None
        self._missing_since: float | None = None
        self._last_repair = float("-inf")
        self.repairs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checks: list[Callable[[], list[str]]] = []

    def add_check(self, check: Callable[[], list[str]]) -> None:
        """Another source of problems, asked by every `problems()` (the Kubernetes watch: not
        ready until its initial lists are applied). Call before `start`."""
        self._checks.append(check)

    def start(self) -> None:
        if self._envoy is None:
            return
        self._thread = threading.Thread(target=self._run, name="l7g-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must go on
                log.exception("enforcement check failed")

    def problems(self) -> list[str]:
        out: list[str] = [p for check in self._checks for p in check()]
        envoy = self._envoy
        if envoy is None:
            return out
        st = envoy.status()
        if st.state is not EnvoyState.LIVE:
            out.append(f"Envoy is {st.state.value}" + (f": {st.error}" if st.error else ""))
        rows = [r for r in self._rows() if r.node_id == self._node_id]
        if not any(r.connected for r in rows):
            out.append("Envoy is not connected to the agent's xDS server")
        now = time.time()
        for r in rows:
            if r.state is SyncState.NACKED and r.last_nack is not None:
                out.append(f"Envoy rejected {r.type} version {r.last_nack.version}: {r.last_nack.error[:300]}")
            elif (r.state is SyncState.STALE and r.connected and r.last_sent is not None
                  and now - r.last_sent > self._stale_after):
                out.append(f"Envoy has not acknowledged {r.type} version {r.sent_version} "
                           f"for {now - r.last_sent:.0f}s")
        with self._lock:
            if self._listener_problem is not None and st.state is EnvoyState.LIVE:
                out.append(self._listener_problem)
        return out

    def check(self) -> None:
        """One look at Envoy's listeners, and a repair when they are gone (module doc)."""
        envoy = self._envoy
        if envoy is None or envoy.status().state is not EnvoyState.LIVE:
            with self._lock:
                self._listener_problem, self._missing_since = None, None
            return
        problem: str | None = None
        repair = False
        stopped = envoy.admin_stat(STOPPED_STAT)
        if stopped:
            problem = f"Envoy stopped its listeners ({STOPPED_STAT} = {stopped}): nothing is accepted"
            repair = True
        else:
            missing = self._missing(envoy)
            now = self._clock()
            if missing:
                if self._missing_since is None:
                    self._missing_since = now
                shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                problem = f"Envoy lacks {len(missing)} listener(s) the agent serves: {shown}"
                repair = now - self._missing_since >= 2 * self._period
            else:
                self._missing_since = None
        with self._lock:
            self._listener_problem = problem
        if repair and self._clock() - self._last_repair >= self._repair_every:
            self._last_repair = self._clock()
            self.repairs += 1
            log.warning("%s; restarting Envoy", problem)
            envoy.restart(problem or "listeners missing")

    def _missing(self, envoy: EnvoySupervisor) -> frozenset[str]:
        """Listeners the agent serves and Envoy acknowledged, but Envoy does not have."""
        lds = [r for r in self._lds_rows() if r.node_id == self._node_id and r.type_url == LISTENER]
        if not lds or lds[0].state is not SyncState.SYNCED:
            return frozenset()  # in flight or rejected: the xDS rows say so
        try:
            data = json.loads(envoy.admin_get("/listeners?format=json", timeout=2.0))
        except (EnvoyAdminError, ValueError):
            return frozenset()
        have = {str(s.get("name")) for s in data.get("listener_statuses", [])}
        return frozenset(self._served() - have)
