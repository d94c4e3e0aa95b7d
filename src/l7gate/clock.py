"""The one clock type: a function returning seconds. Code that measures time takes one (default
`time.monotonic` or `time.time`, as the use needs), so tests inject `l7gate.testing.clock`'s
`ManualClock` instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
