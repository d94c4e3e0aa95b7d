"""Python's cyclic garbage collector paused around bulk work, from any number of threads.

Decoding and applying thousands of objects makes hundreds of thousands of long-lived
containers; the collector keeps walking them as they grow (about 40% of decoding and
projecting an API listing of 10,000 pods here). Inside `paused()` it does not run; reference
counting still frees everything but cycles. Sections may overlap across threads (the
Kubernetes listings run side by side with an apply): the collector comes back when the last
one ends, and only if it was on when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
