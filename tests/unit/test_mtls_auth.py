"""AuthManager scheduling with an injected clock: proactive handshakes, refresh at 2/3 of the
remaining lifetime, re-handshake on SVID rotation, backoff, expiry, deletes, on-demand
requests; and the CLOCK_BOOTTIME conversion for the kernel map.

The handshake itself is replaced by a table of outcomes here (what is under test is *when*
the manager handshakes and what it writes); tests/integration/test_mtls_handshake.py runs the
same manager over real TLS.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from l7gate.mtls.auth import AuthManager, boot_ns_for
from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.handshake import Address, AuthError, AuthResult, Failure
from l7gate.mtls.store import SVIDStore
from l7gate.mtls.svid import Peer, Reason
from l7gate.testing.mtls import ManualClock

A: Address = ("127.0.0.2", 4250)
B: Address = ("127.0.0.3", 4250)


class Peers:
    """Outcome per (local, remote, node): seconds of validity from now, or an AuthError."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.outcomes: dict[tuple[int, int, Address], float | AuthError] = {}
        self.calls: list[tuple[int, int, Address]] = []

    def __call__(self, local: int, remote: int, node: Address) -> AuthResult:
        self.calls.append((local, remote, node))
        outcome = self.outcomes.get((local, remote, node), 90.0)
        if isinstance(outcome, AuthError):
            raise outcome
        expires = self.clock() + outcome
        return AuthResult(local, remote, node, expires, Peer(remote, f"spiffe://x/identity/{remote}", expires))


class Kernel:
    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], float] = {}
        self.log: list[tuple[str, int, int]] = []

    def write(self, local: int, remote: int, expires_at: float) -> None:
        self.entries[(local, remote)] = expires_at
        self.log.append(("write", local, remote))

    def delete(self, local: int, remote: int) -> None:
        self.entries.pop((local, remote), None)
        self.log.append(("delete", local, remote))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture
def peers(clock: ManualClock) -> Peers:
    return Peers(clock)


@pytest.fixture
def kernel() -> Kernel:
    return Kernel()


@pytest.fixture
def manager(peers: Peers, kernel: Kernel, clock: ManualClock) -> AuthManager:
    m = AuthManager(None, kernel.write, kernel.delete, handshake_fn=peers, clock=clock,
                    retry_base=1.0, retry_max=8.0)
    yield m
    m.stop()


# -- boot clock ---------------------------------------------------------------------------------


def test_boot_ns_for_shifts_wall_clock_expiry_onto_the_boot_clock() -> None:
    assert boot_ns_for(1_000.5, now_wall=1_000.0, now_boot_ns=7_000_000_000) == 7_500_000_000
    assert boot_ns_for(900.0, now_wall=1_000.0, now_boot_ns=7_000_000_000) == 0
    expected = time.clock_gettime_ns(time.CLOCK_BOOTTIME) + 30 * 10**9
    assert abs(boot_ns_for(time.time() + 30) - expected) < 50_000_000  # 50 ms


# -- scheduling ---------------------------------------------------------------------------------


def test_new_pairs_are_authenticated_at_once(manager: AuthManager, peers: Peers,
                                             kernel: Kernel, clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A}, (300, 401): {A, B}})
    assert kernel.entries == {}  # nothing is written before a handshake proved it
    manager.tick()
    assert sorted(peers.calls) == [(300, 400, A), (300, 401, A), (300, 401, B)]
    assert kernel.entries == {(300, 400): clock() + 90, (300, 401): clock() + 90}
    rows = manager.status()
    assert [(r.local, r.remote, r.node) for r in rows] == [(300, 400, A), (300, 401, A), (300, 401, B)]
    assert all(r.last_ok == clock() and r.last_error is None and r.attempts == 1 for r in rows)


def test_refresh_at_two_thirds_of_the_remaining_lifetime(manager: AuthManager, peers: Peers,
                                                         kernel: Kernel, clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A}})
    assert manager.tick() == clock() + 60  # 2/3 of 90 s
    clock.advance(59.0)
    manager.tick()
    assert len(peers.calls) == 1
    clock.advance(1.0)
    manager.tick()
    assert len(peers.calls) == 2
    assert kernel.entries[(300, 400)] == clock() + 90  # refreshed before the old one expired


def test_failure_backs_off_and_keeps_a_still_valid_entry_until_it_expires(
    manager: AuthManager, peers: Peers, kernel: Kernel, clock: ManualClock
) -> None:
    manager.set_wanted({(300, 400): {A}})
    manager.tick()
    first_expiry = kernel.entries[(300, 400)]
    peers.outcomes[(300, 400, A)] = AuthError(Reason.EXPIRED, "peer cert", by_peer=False)
    clock.advance(60.0)
    manager.tick()
    (row,) = manager.status()
    assert row.last_error == "expired (peer cert)" and row.failures == 1 and row.attempts == 2
    assert kernel.entries[(300, 400)] == first_expiry  # the earlier proof still holds
    assert row.next_attempt == clock() + 1.0

    clock.set(first_expiry - 0.5)
    manager.tick()
    assert kernel.entries[(300, 400)] == first_expiry
    clock.set(first_expiry + 0.5)
    manager.tick()
    assert kernel.entries == {}
    assert kernel.log[-1] == ("delete", 300, 400)
    (row,) = manager.status()
    assert row.expires_at is None and row.failures >= 2


def test_backoff_is_exponential_and_capped(manager: AuthManager, peers: Peers,
                                           clock: ManualClock) -> None:
    peers.outcomes[(300, 400, A)] = AuthError(Failure.CONNECT, "refused")
    manager.set_wanted({(300, 400): {A}})
    waits = []
    for _ in range(6):
        manager.tick()
        (row,) = manager.status()
        waits.append(row.next_attempt - clock())
        clock.set(row.next_attempt)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_entry_is_the_earliest_valid_expiry_of_its_nodes(manager: AuthManager, peers: Peers,
                                                         kernel: Kernel, clock: ManualClock) -> None:
    peers.outcomes[(300, 400, A)] = 30.0
    peers.outcomes[(300, 400, B)] = 90.0
    manager.set_wanted({(300, 400): {A, B}})
    manager.tick()
    assert kernel.entries[(300, 400)] == clock() + 30
    # node A leaves: the entry is B's
    manager.set_wanted({(300, 400): {B}})
    assert kernel.entries[(300, 400)] == clock() + 90


def test_unwanted_pairs_are_deleted(manager: AuthManager, kernel: Kernel) -> None:
    manager.set_wanted({(300, 400): {A}, (300, 401): {A}})
    manager.tick()
    manager.set_wanted({(300, 401): {A}})
    assert set(kernel.entries) == {(300, 401)}
    assert ("delete", 300, 400) in kernel.log
    assert [(r.local, r.remote) for r in manager.status()] == [(300, 401)]
    manager.set_wanted({})
    assert kernel.entries == {} and manager.status() == []


def test_result_of_a_handshake_for_a_pair_dropped_meanwhile_is_not_written(
    peers: Peers, kernel: Kernel, clock: ManualClock
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(local: int, remote: int, node: Address) -> AuthResult:
        started.set()
        release.wait(5)
        return peers(local, remote, node)

    m = AuthManager(None, kernel.write, kernel.delete, handshake_fn=slow, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}})
        m.tick(wait=False)
        assert started.wait(5)
        m.set_wanted({})
        release.set()
        m.stop()
        assert kernel.entries == {} and ("write", 300, 400) not in kernel.log
    finally:
        release.set()
        m.stop()


def test_request_handshakes_now_but_not_for_every_drop(manager: AuthManager, peers: Peers,
                                                       clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A}})
    manager.tick()
    assert manager.request(300, 400)
    manager.tick()
    assert len(peers.calls) == 1  # within request_interval of the last attempt
    clock.advance(1.5)
    for _ in range(20):
        manager.request(300, 400)
    manager.tick()
    assert len(peers.calls) == 2
    assert not manager.request(300, 999)


def test_local_svid_rotation_triggers_a_new_handshake(tmp_path: Path, kernel: Kernel,
                                                      clock: ManualClock) -> None:
    ca = BuiltinCA.ephemeral("l7gate.local", clock=clock, svid_ttl=600.0)
    store = SVIDStore(ca, tmp_path, clock=clock)
    store.set_identities([300])
    calls = []

    def fn(local: int, remote: int, node: Address) -> AuthResult:
        own = store.svid(local)
        calls.append(own.serial)
        return AuthResult(local, remote, node, own.not_after, Peer(remote, "", own.not_after + 60))

    m = AuthManager(store, kernel.write, kernel.delete, handshake_fn=fn, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}})
        m.tick()
        first = kernel.entries[(300, 400)]
        clock.advance(301.0)  # past 50 %: the store rotates; 2/3 of 600 s is not reached yet
        store.refresh()
        m.tick()
        assert len(calls) == 2 and calls[0] != calls[1]
        assert kernel.entries[(300, 400)] == pytest.approx(first + 301, abs=1)
    finally:
        m.stop()


def test_adopted_entries(manager: AuthManager, peers: Peers, kernel: Kernel,
                         clock: ManualClock) -> None:
    kernel.entries = {(300, 400): clock() + 50, (300, 401): clock() + 50}
    manager.adopt(dict(kernel.entries))
    peers.outcomes[(300, 400, A)] = AuthError(Failure.TIMEOUT, "")
    manager.set_wanted({(300, 400): {A}})
    assert (300, 401) not in kernel.entries  # no longer wanted
    assert (300, 400) in kernel.entries  # kept until its first handshake answers
    manager.tick()
    assert (300, 400) not in kernel.entries  # which failed


def test_a_failing_write_callback_does_not_stop_the_manager(peers: Peers, clock: ManualClock) -> None:
    written: list[tuple[int, int]] = []

    def write(local: int, remote: int, expires_at: float) -> None:
        if remote == 400:
            raise OSError("map full")
        written.append((local, remote))

    m = AuthManager(None, write, lambda l, r: None, handshake_fn=peers, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}, (300, 401): {A}})
        m.tick()
        assert written == [(300, 401)]
    finally:
        m.stop()
