"""A clock that moves only when told to: inject it wherever the code takes a `l7gate.clock.Clock`,
instead of sleeping in a test."""

from __future__ import annotations

import threading
import time


class ManualClock:
    """Seconds that move only by `advance` or `set` (thread-safe). Starts at the real wall time
    by default, so certificates it dates are also valid for OpenSSL, which reads the real
    clock; a store's lease test may start it anywhere (`start`)."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        return self()

    @now.setter
    def now(self, value: float) -> None:
        self.set(value)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def set(self, now: float) -> None:
        with self._lock:
            self._now = now
