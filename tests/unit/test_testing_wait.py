"""`eventually`, the one poll loop of the tests, against a manual clock: no real time passes."""

from __future__ import annotations

import pytest

from l7gate.testing.clock import ManualClock
from l7gate.testing.wait import POLL_INTERVAL, eventually


def test_returns_the_first_truthy_value_without_waiting_more() -> None:
    clock = ManualClock(start=0.0)
    answers = iter([None, 0, "", [], {"status": 200}, {"status": 403}])
    got = eventually(lambda: next(answers), 1.0, "a verdict", clock=clock, sleep=clock.advance)
    assert got == {"status": 200}
    assert clock() == pytest.approx(4 * POLL_INTERVAL)  # four falsy answers, one poll after each


def test_a_predicate_that_holds_at_once_does_not_sleep() -> None:
    clock = ManualClock(start=0.0)
    slept: list[float] = []
    assert eventually(lambda: 7, 5.0, "seven", clock=clock, sleep=slept.append) == 7
    assert slept == []


def test_fails_after_the_timeout_naming_what_and_the_last_value() -> None:
    clock = ManualClock(start=100.0)
    statuses = iter(range(1000))
    with pytest.raises(AssertionError) as info:
        eventually(lambda: next(statuses) > 10**6, 2.5, "POST /v1/charge to be allowed",
                   clock=clock, sleep=clock.advance)
    message = str(info.value)
    assert message == ("timed out after 2.5 s waiting for POST /v1/charge to be allowed; "
                       "the last try returned False")
    assert clock() >= 102.5  # it kept trying for the whole timeout...
    assert clock() < 102.5 + 2 * POLL_INTERVAL  # ...and not much longer


class Status:
    """A falsy answer that says which try it was."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Status(try {self.n})"


def test_the_last_value_is_the_one_reported() -> None:
    clock = ManualClock(start=0.0)
    tries: list[Status] = []

    def status() -> Status:
        tries.append(Status(len(tries) + 1))
        return tries[-1]

    with pytest.raises(AssertionError) as info:
        eventually(status, 1.0, "status 200", clock=clock, sleep=clock.advance)
    assert len(tries) > 1
    assert str(info.value).endswith(f"the last try returned Status(try {len(tries)})")


def test_an_exception_is_retried_and_the_last_one_reported_as_the_cause() -> None:
    clock = ManualClock(start=0.0)
    calls = 0

    def connect() -> bool:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(111, f"refused #{calls}")

    with pytest.raises(AssertionError) as info:
        eventually(connect, 1.0, "the agent to listen", clock=clock, sleep=clock.advance)
    assert calls > 1
    assert str(info.value) == (f"timed out after 1 s waiting for the agent to listen; "
                               f"the last try raised ConnectionRefusedError(111, 'refused #{calls}')")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_an_exception_then_a_value_returns_the_value() -> None:
    clock = ManualClock(start=0.0)
    answers: list[object] = [OSError("not yet"), OSError("not yet"), "up"]

    def probe() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert eventually(probe, 1.0, "the server", clock=clock, sleep=clock.advance) == "up"


def test_real_clock_default_returns_at_once() -> None:
    assert eventually(lambda: "ready", 0.0, "ready") == "ready"
