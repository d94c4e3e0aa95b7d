"""The flow ring: bounded, overflow counted, followers that never hold ingestion up."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from l7gate.observe.api import FlowQuery, Lost, decode_line, stream
from l7gate.observe.filters import FlowFilter
from l7gate.observe.flow import Flow, Verdict
from l7gate.observe.ring import FlowRing
from l7gate.testing.wait import eventually

from .test_observe_data import recorded_flows

BASE = recorded_flows()[0]


def numbered(n: int, start: int = 0) -> list[Flow]:
    """Flows told apart by time (ns) = their number."""
    return [dataclasses.replace(BASE, time=i) for i in range(start, start + n)]


def test_ring_keeps_the_newest_capacity_flows_and_counts_the_overflow() -> None:
    ring = FlowRing(capacity=100)
    for i in range(0, 1000, 10):
        ring.publish(numbered(10, i))
    assert len(ring) == 100
    assert [f.time for f in ring.snapshot()] == list(range(900, 1000))
    s = ring.stats()
    assert (s.published, s.overflow, s.size, s.capacity) == (1000, 900, 100, 100)


def test_snapshot_since_filter_last() -> None:
    ring = FlowRing(1000)
    ring.publish(numbered(100))
    assert [f.time for f in ring.snapshot(since=95)] == [95, 96, 97, 98, 99]
    assert [f.time for f in ring.snapshot(last=3)] == [97, 98, 99]
    assert ring.snapshot(last=0) == []
    even = ring.snapshot(lambda f: f.time % 2 == 0, since=90, last=2)
    assert [f.time for f in even] == [96, 98]


def test_subscription_gets_backlog_then_every_new_flow_once() -> None:
    ring = FlowRing(1000)
    ring.publish(numbered(10))
    backlog, sub = ring.subscribe(last=3)
    assert [f.time for f in backlog] == [7, 8, 9]
    batches = 700

    def publisher() -> None:
        for b in range(batches):
            ring.publish(numbered(7, 10 + b * 7))

    t = threading.Thread(target=publisher)
    t.start()
    seen: list[int] = []
    lost: list[int] = []

    def all_taken() -> bool:
        flows, n = sub.take(0.5)
        lost.append(n)
        seen.extend(f.time for f in flows)
        return len(seen) >= batches * 7

    eventually(all_taken, 10, f"{batches * 7} flows at the follower")
    t.join()
    sub.close()
    assert sum(lost) == 0
    assert seen == list(range(10, 10 + batches * 7))  # no gap, no duplicate
    assert ring.stats().followers == 0


@pytest.mark.timing
def test_slow_follower_loses_oldest_flows_counted_and_never_blocks_publish() -> None:
    ring = FlowRing(capacity=10, follow_buffer=100)
    _, sub = ring.subscribe()
    t0 = time.monotonic()
    for i in range(0, 100_000, 100):
        ring.publish(numbered(100, i))
    elapsed = time.monotonic() - t0
    flows, lost = sub.take(0)
    assert [f.time for f in flows] == list(range(99_900, 100_000))
    assert lost == 100_000 - 100
    assert ring.stats().follow_lost == lost
    assert elapsed < 2.0  # 1,000 publishes into a full follower: no waiting
    flows, lost = sub.take(0)
    assert (flows, lost) == ([], 0)
    sub.close()


def test_one_batch_larger_than_the_follow_buffer() -> None:
    ring = FlowRing(capacity=1000, follow_buffer=10)
    _, sub = ring.subscribe()
    ring.publish(numbered(25))
    flows, lost = sub.take(0)
    assert [f.time for f in flows] == list(range(15, 25)) and lost == 15


@pytest.mark.timing
def test_take_waits_for_a_flow_and_close_wakes_it() -> None:
    ring = FlowRing(10)
    _, sub = ring.subscribe()
    threading.Timer(0.05, lambda: ring.publish(numbered(1))).start()
    flows, _ = sub.take(5)
    assert len(flows) == 1
    t0 = time.monotonic()
    assert sub.take(0.05) == ([], 0)
    assert time.monotonic() - t0 >= 0.04
    threading.Timer(0.05, ring.close).start()
    t0 = time.monotonic()
    assert sub.take(5) == ([], 0) and sub.closed
    assert time.monotonic() - t0 < 2
    _, late = ring.subscribe()
    assert late.closed  # subscribing to a closed ring ends at once


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        FlowRing(0)
    with pytest.raises(ValueError):
        FlowRing(10, follow_buffer=0)


# -- the /v1/flows stream over a ring ---------------------------------------------------------------


def _decode(chunks: list[bytes]) -> list[object]:
    return [x for c in chunks for line in c.split(b"\n") if (x := decode_line(line)) is not None]


def test_stream_without_follow_is_the_filtered_snapshot() -> None:
    ring = FlowRing(100)
    ring.publish(recorded_flows())
    q = FlowQuery(FlowFilter.parse(verdict=["DROPPED"]))
    items = _decode(list(stream(ring, q)))
    assert items == [f for f in recorded_flows() if f.verdict is Verdict.DROPPED]


def test_follow_stream_sends_backlog_heartbeats_new_flows_lost_notices_and_ends_on_close() -> None:
    ring = FlowRing(100, follow_buffer=5)
    ring.publish(recorded_flows()[:2])
    body = stream(ring, FlowQuery(last=1, follow=True), heartbeat=0.01)
    first = next(body)
    assert _decode([first]) == [recorded_flows()[1]]
    assert next(body) == b"\n"  # nothing new: a heartbeat
    ring.publish(numbered(12))
    items = _decode([next(body)])
    assert items[0] == Lost(7) and [f.time for f in items[1:] if isinstance(f, Flow)] == list(range(7, 12))
    ring.close()
    rest = list(body)
    assert all(c == b"\n" for c in rest)
    assert ring.stats().followers == 0


def test_follow_stream_closed_by_the_client_unsubscribes() -> None:
    ring = FlowRing(100)
    body = stream(ring, FlowQuery(follow=True), heartbeat=0.01)
    next(body)
    assert ring.stats().followers == 1
    body.close()  # what the admin server does when the client goes away
    assert ring.stats().followers == 0


@pytest.mark.parametrize("line", [b"[1]", b'{"x": 1}', b"not json", b'{"flow": {"verdict": "X"}}'])
def test_decode_rejects_what_is_not_a_stream_line(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_line(line)


def test_memory_stays_bounded_however_many_flows_pass() -> None:
    import tracemalloc

    ring = FlowRing(capacity=1000)
    batch = numbered(1000)
    ring.publish(batch)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        ring.publish(numbered(500, 1000 + i * 500))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(ring) == 1000
    # 100,000 more flows went through; what is retained is one ring's worth, not more.
    assert after - before < 1000 * 600
