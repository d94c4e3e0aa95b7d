"""Waiting in tests for something another thread or process does: `eventually`, the one poll loop.

A test that waits for a verdict, a restart or a log line polls a predicate until it holds, and
fails with what it waited for and what it last saw, instead of sleeping a guessed time. Waiting
for time itself to pass is not polling: inject a `l7gate.testing.clock.ManualClock` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from l7gate.clock import Clock

T = TypeVar("T")

POLL_INTERVAL = 0.02
"""Seconds between two tries: short next to any timeout, long enough not to spin a CPU."""


def eventually(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `predicate` until it returns a truthy value, and return that value.

    It is called at once, then every `POLL_INTERVAL` seconds until `timeout` seconds have
    passed, the last call at or after that; an exception it raises counts as a falsy answer
    (what is waited for may not answer yet). If no call returned a truthy value, raise
    `AssertionError` naming `what`, the timeout and what the last call returned or raised (the
    exception is also chained as the cause).

    `clock` and `sleep` are for testing this function itself.
    """
    deadline = clock() + timeout
    while True:
        last_error: Exception | None = None
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - reported below if it is the last answer
            last_error = exc
        else:
            if value:
                return value
        if clock() >= deadline:
            last = f"raised {last_error!r}" if last_error is not None else f"returned {value!r}"
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}; the last try {last}"
            ) from last_error
        sleep(POLL_INTERVAL)
