"""The agent's flow buffer: a bounded ring of the latest flows, and follow subscriptions.

Theory of operation
-------------------
Ingestion calls `publish(flows)` with each batch it converted. The batch is appended to the
ring, a deque of at most `capacity` flows: when full, the oldest flows fall out and are counted
in `overflow` (a ring that overflows is working as designed — it holds the latest flows — the
counter says how much history was shed). Publishing never blocks on a reader.

A follower (`l7gate observe -f`, through the admin API) holds a `Subscription`: its own bounded
queue that `publish` appends the batch to. A follower that does not keep up loses the oldest
flows of its queue, counted in its `lost` (and in the ring's `follow_lost`); it learns how many
on its next `take`. Ingestion never waits for a follower. `subscribe` hands out the backlog
(matching flows already in the ring) and registers the queue under one lock, so a follower
sees every flow exactly once, without a gap between backlog and live flows.

Filtering is the reader's job (the admin handler's thread), not ingestion's: publishing costs
the same whatever followers ask for.

What the ring and the queues hold are `FlowItem`s: a built `Flow`, or flow `i` of a
`LazyFlows` (an Envoy access log entry decided but not built, `envoy_flows.HTTPLogRecord`).
Every count here is in flows, whatever holds them. `snapshot`, `subscribe` and `take` hand out
built flows; their `_items` variants hand out the items, for readers that can use them as they
are (the admin API's stream writes a record's lines without building its flows).

Thread-safety: every method may be called from any thread. `publish` holds the ring's lock for
the length of two deque appends per subscriber; readers copy what they need under it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .flow import Flow, FlowItem, Materializer, materialize_all

DEFAULT_CAPACITY = 4096
DEFAULT_FOLLOW_BUFFER = 16384


@dataclass(frozen=True, slots=True)
class RingStats:
    capacity: int
    size: int
    published: int
    overflow: int
    followers: int
    follow_lost: int


class Subscription:
    """One follower's queue. `take` returns what arrived since the last call (waiting up to
    `timeout` seconds for something), and how many flows were lost in between."""

    def __init__(self, ring: FlowRing, maxlen: int) -> None:
        self._ring = ring
        self._maxlen = maxlen
        self._queue: deque[FlowItem] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._lost = 0
        self.lost_total = 0
        self.closed = False

    def _offer(self, flows: Sequence[FlowItem]) -> int:
        with self._lock:
            q = self._queue
            excess = len(q) + len(flows) - self._maxlen
            if excess > 0:
                if excess >= len(q):
                    lost_new = excess - len(q)
                    q.clear()
                    q.extend(flows[lost_new:])
                else:
                    for _ in range(excess):
                        q.popleft()
                    q.extend(flows)
                self._lost += excess
                self.lost_total += excess
            else:
                q.extend(flows)
                excess = 0
        self._ready.set()
        return excess

    def take(self, timeout: float | None = None) -> tuple[list[Flow], int]:
        """(flows, lost since the last take). Empty flows after `timeout`, or once closed."""
        items, lost = self.take_items(timeout)
        return materialize_all(items), lost

    def take_items(self, timeout: float | None = None) -> tuple[list[FlowItem], int]:
        """`take`, with the flows as the ring holds them."""
        with self._lock:
            if self._queue or self._lost or self.closed:
                return self._drain()
            # Cleared under the lock: an `_offer` after this sets it again, so no wake-up is lost.
            self._ready.clear()
        self._ready.wait(timeout)
        with self._lock:
            return self._drain()

    def _drain(self) -> tuple[list[FlowItem], int]:
        flows = list(self._queue)
        self._queue.clear()
        lost, self._lost = self._lost, 0
        return flows, lost

    def close(self) -> None:
        """Unsubscribe (idempotent). A `take` waiting returns at once."""
        self._ring._unsubscribe(self)
        self.closed = True
        self._ready.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlowRing:
    """The last `capacity` flows of this agent, and its followers. Thread-safe."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, follow_buffer: int = DEFAULT_FOLLOW_BUFFER) -> None:
        if capacity < 1 or follow_buffer < 1:
            raise ValueError("ring capacity and follow buffer must be >= 1")
        self.capacity = capacity
        self.follow_buffer = follow_buffer
        self._ring: deque[FlowItem] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._published = 0
        self._overflow = 0
        self._follow_lost = 0
        self._closed = False

    def publish(self, flows: Sequence[FlowItem]) -> None:
        if not flows:
            return
        with self._lock:
            ring = self._ring
            over = len(ring) + len(flows) - self.capacity
            if over > 0:
                self._overflow += over
            ring.extend(flows)
            self._published += len(flows)
            for sub in self._subs:
                self._follow_lost += sub._offer(flows)

    def snapshot(
        self, match: Callable[[Flow], bool] | None = None, *, since: int | None = None,
        last: int | None = None,
    ) -> list[Flow]:
        """Flows in the ring, oldest first, that `match` accepts and are not older than `since`
        (ns since the epoch); the newest `last` of them when `last` is given."""
        return materialize_all(self.snapshot_items(match, since=since, last=last))

    def snapshot_items(
        self, match: Callable[[Flow], bool] | None = None, *, since: int | None = None,
        last: int | None = None,
    ) -> list[FlowItem]:
        """`snapshot`, with the flows as the ring holds them."""
        with self._lock:
            items = list(self._ring)
        return _select(items, match, since, last)

    def subscribe(
        self, match: Callable[[Flow], bool] | None = None, *, since: int | None = None,
        last: int | None = None, maxlen: int | None = None,
    ) -> tuple[list[Flow], Subscription]:
        """The backlog (as `snapshot`) and a subscription to every flow published after it.
        Close the subscription when done (it is a context manager)."""
        backlog, sub = self.subscribe_items(match, since=since, last=last, maxlen=maxlen)
        return materialize_all(backlog), sub

    def subscribe_items(
        self, match: Callable[[Flow], bool] | None = None, *, since: int | None = None,
        last: int | None = None, maxlen: int | None = None,
    ) -> tuple[list[FlowItem], Subscription]:
        """`subscribe`, with the backlog as the ring holds it."""
        sub = Subscription(self, maxlen or self.follow_buffer)
        with self._lock:
            items = list(self._ring)
            if self._closed:
                sub.closed = True
                sub._ready.set()
            else:
                self._subs.append(sub)
        return _select(items, match, since, last), sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def close(self) -> None:
        """End every subscription (the agent is stopping); later subscriptions end at once."""
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.closed = True
            sub._ready.set()

    def stats(self) -> RingStats:
        with self._lock:
            return RingStats(
                capacity=self.capacity,
                size=len(self._ring),
                published=self._published,
                overflow=self._overflow,
                followers=len(self._subs),
                follow_lost=self._follow_lost,
            )

    def __len__(self) -> int:
        return len(self._ring)


def _select(
    items: list[FlowItem], match: Callable[[Flow], bool] | None, since: int | None, last: int | None
) -> list[FlowItem]:
    if since is not None or match is not None:
        # Oldest first, so with `last` the newest are found by building from the end.
        picked: list[FlowItem] = []
        want = len(items) if last is None else max(last, 0)
        materialize = Materializer()
        for item in reversed(items):
            if len(picked) >= want:
                break
            f = materialize(item)
            if (since is None or f.time >= since) and (match is None or match(f)):
                picked.append(item)
        picked.reverse()
        return picked
    if last is not None:
        return items[-last:] if last > 0 else []
    return items
