"""`gcpause.paused`: sections that overlap (two threads, ends in any order) leave the collector
as it was before the first began, and off while any of them runs."""

from __future__ import annotations

import gc
import threading

from l7gate.agent.heap import collector_paused
from l7gate.gcpause import paused


def test_overlapping_pauses_end_with_the_collector_as_it_was() -> None:
    assert gc.isenabled()
    a, b = paused(), collector_paused()  # the agent's apply and a listing, say
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first to begin ends first: the other still runs
    assert not gc.isenabled()
    b.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with paused():
            with paused():
                pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_many_threads_pausing_at_once() -> None:
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(200):
            with paused():
                assert not gc.isenabled()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.isenabled()
