"""AuthManager scheduling with an injected clock: proactive handshakes, refresh at 2/3 of the
remaining lifetime, re-handshake on SVID rotation, backoff, expiry, deletes, on-demand
requests, one kernel entry per (pair, remote node) as the agent writes them, what a restarted
agent does with the entries the previous one left, batches (a node's due rows proven together,
each recorded as its handshake would be); and the CLOCK_BOOTTIME conversion for the kernel map.

The handshake itself is replaced by a table of outcomes here (what is under test is *when*
the manager handshakes and what it writes); tests/integration/test_mtls_handshake.py runs the
same manager over real TLS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from l7gate.mtls.auth import AuthManager, boot_ns_for
from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.handshake import Address, AuthError, AuthResult, Failure
from l7gate.mtls.store import SVIDStore
from l7gate.mtls.svid import Peer, Reason
from l7gate.testing.mtls import ManualClock
from l7gate.testing.wait import eventually

A: Address = ("127.0.0.2", 4250)
B: Address = ("127.0.0.3", 4250)

Key = tuple[int, int, Address]
"""(local identity, remote identity, remote node): the kernel auth map's key."""


class Peers:
    """Outcome per (local, remote, node): seconds of validity from now, or an AuthError."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.outcomes: dict[Key, float | AuthError] = {}
        self.calls: list[Key] = []

    def __call__(self, local: int, remote: int, node: Address) -> AuthResult:
        self.calls.append((local, remote, node))
        outcome = self.outcomes.get((local, remote, node), 90.0)
        if isinstance(outcome, AuthError):
            raise outcome
        expires = self.clock() + outcome
        return AuthResult(local, remote, node, expires, Peer(remote, f"spiffe://x/identity/{remote}", expires))


class AuthMapRecorder:
    """Stands in for the kernel auth map: the entries the manager's `write`/`delete` left, keyed
    per remote node as the agent's datapath keys them, and the calls in order."""

    def __init__(self) -> None:
        self.entries: dict[Key, float] = {}
        self.log: list[tuple[str, int, int, Address]] = []

    def write(self, local: int, remote: int, node: Address, expires_at: float) -> None:
        self.entries[(local, remote, node)] = expires_at
        self.log.append(("write", local, remote, node))

    def delete(self, local: int, remote: int, node: Address) -> None:
        self.entries.pop((local, remote, node), None)
        self.log.append(("delete", local, remote, node))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture
def peers(clock: ManualClock) -> Peers:
    return Peers(clock)


@pytest.fixture
def auth_map() -> AuthMapRecorder:
    return AuthMapRecorder()


@pytest.fixture
def manager(peers: Peers, auth_map: AuthMapRecorder, clock: ManualClock) -> Iterator[AuthManager]:
    m = AuthManager(None, auth_map.write, auth_map.delete, handshake_fn=peers, clock=clock,
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
                                             auth_map: AuthMapRecorder, clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A}, (300, 401): {A, B}})
    assert auth_map.entries == {}  # nothing is written before a handshake proved it
    manager.tick()
    assert sorted(peers.calls) == [(300, 400, A), (300, 401, A), (300, 401, B)]
    assert auth_map.entries == {
        (300, 400, A): clock() + 90, (300, 401, A): clock() + 90, (300, 401, B): clock() + 90,
    }
    rows = manager.status()
    assert [(r.local, r.remote, r.node) for r in rows] == [(300, 400, A), (300, 401, A), (300, 401, B)]
    assert all(r.last_ok == clock() and r.last_error is None and r.attempts == 1 for r in rows)


def test_refresh_at_two_thirds_of_the_remaining_lifetime(manager: AuthManager, peers: Peers,
                                                         auth_map: AuthMapRecorder, clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A}})
    assert manager.tick() == clock() + 60  # 2/3 of 90 s
    clock.advance(59.0)
    manager.tick()
    assert len(peers.calls) == 1
    clock.advance(1.0)
    manager.tick()
    assert len(peers.calls) == 2
    assert auth_map.entries[(300, 400, A)] == clock() + 90  # refreshed before the old one expired


def test_failure_backs_off_and_keeps_a_still_valid_entry_until_it_expires(
    manager: AuthManager, peers: Peers, auth_map: AuthMapRecorder, clock: ManualClock
) -> None:
    manager.set_wanted({(300, 400): {A}})
    manager.tick()
    first_expiry = auth_map.entries[(300, 400, A)]
    peers.outcomes[(300, 400, A)] = AuthError(Reason.EXPIRED, "peer cert", by_peer=False)
    clock.advance(60.0)
    manager.tick()
    (row,) = manager.status()
    assert row.last_error == "expired (peer cert)" and row.failures == 1 and row.attempts == 2
    assert auth_map.entries[(300, 400, A)] == first_expiry  # the earlier proof still holds
    assert row.next_attempt == clock() + 1.0

    clock.set(first_expiry - 0.5)
    manager.tick()
    assert auth_map.entries[(300, 400, A)] == first_expiry
    clock.set(first_expiry + 0.5)
    manager.tick()
    assert auth_map.entries == {}
    assert auth_map.log[-1] == ("delete", 300, 400, A)
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


# -- one entry per remote node ------------------------------------------------------------------


def test_a_node_that_did_not_prove_the_pair_gets_no_entry(manager: AuthManager, peers: Peers,
                                                          auth_map: AuthMapRecorder, clock: ManualClock) -> None:
    """The remote identity runs on A and B; only A proves it. B's pods must not get in on A's
    proof: the kernel finds no entry for B."""
    peers.outcomes[(300, 400, B)] = AuthError(Reason.UNTRUSTED, "another CA", by_peer=False)
    manager.set_wanted({(300, 400): {A, B}})
    manager.tick()
    assert auth_map.entries == {(300, 400, A): clock() + 90}
    assert ("write", 300, 400, B) not in auth_map.log
    rows = {r.node: r for r in manager.status()}
    assert rows[A].expires_at == clock() + 90 and rows[B].expires_at is None
    assert rows[B].last_error is not None and rows[B].failures == 1


def test_each_node_entry_expires_on_its_own(manager: AuthManager, peers: Peers,
                                            auth_map: AuthMapRecorder, clock: ManualClock) -> None:
    """A's proof is shorter than B's; A stops answering. A's entry goes at A's expiry, B's stays
    with B's own expiry (neither is cut to the other's)."""
    peers.outcomes[(300, 400, A)] = 30.0
    peers.outcomes[(300, 400, B)] = 90.0
    manager.set_wanted({(300, 400): {A, B}})
    manager.tick()
    t0 = clock()
    assert auth_map.entries == {(300, 400, A): t0 + 30, (300, 400, B): t0 + 90}
    peers.outcomes[(300, 400, A)] = AuthError(Failure.CONNECT, "refused")
    clock.set(t0 + 30.5)  # A's refresh was due at 20 s: it fails, and A's proof expires
    manager.tick()
    assert auth_map.entries == {(300, 400, B): t0 + 90}
    assert auth_map.log[-1] == ("delete", 300, 400, A)


def test_a_node_no_longer_wanted_loses_its_entry(manager: AuthManager, peers: Peers,
                                                 auth_map: AuthMapRecorder, clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A, B}})
    manager.tick()
    writes = len(auth_map.log)
    # the remote identity's pods left node A
    manager.set_wanted({(300, 400): {B}})
    assert auth_map.entries == {(300, 400, B): clock() + 90}
    assert auth_map.log[writes:] == [("delete", 300, 400, A)]  # B's entry is left as it is
    assert [r.node for r in manager.status()] == [B]
    # and a handshake with A is not tried any more
    clock.advance(61.0)
    manager.tick()
    assert peers.calls.count((300, 400, A)) == 1


def test_unwanted_pairs_are_deleted(manager: AuthManager, auth_map: AuthMapRecorder) -> None:
    manager.set_wanted({(300, 400): {A, B}, (300, 401): {A}})
    manager.tick()
    manager.set_wanted({(300, 401): {A}})
    assert set(auth_map.entries) == {(300, 401, A)}
    assert {e for e in auth_map.log if e[0] == "delete"} == {("delete", 300, 400, A), ("delete", 300, 400, B)}
    assert [(r.local, r.remote) for r in manager.status()] == [(300, 401)]
    manager.set_wanted({})
    assert auth_map.entries == {} and manager.status() == []


@pytest.mark.parametrize("still_wanted", [{}, {(300, 400): {B}}], ids=["pair-dropped", "node-dropped"])
def test_result_of_a_handshake_for_a_row_dropped_meanwhile_is_not_written(
    peers: Peers, auth_map: AuthMapRecorder, clock: ManualClock,
    still_wanted: dict[tuple[int, int], set[Address]],
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(local: int, remote: int, node: Address) -> AuthResult:
        if node == A:
            started.set()
            release.wait(5)
        return peers(local, remote, node)

    m = AuthManager(None, auth_map.write, auth_map.delete, handshake_fn=slow, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}})
        m.tick(wait=False)
        assert started.wait(5)
        m.set_wanted(still_wanted)
        release.set()
        m.stop()  # waits for the running handshake
        assert peers.calls == [(300, 400, A)]
        assert auth_map.entries == {} and ("write", 300, 400, A) not in auth_map.log
    finally:
        release.set()
        m.stop()


def test_a_running_handshake_is_not_started_again(peers: Peers, auth_map: AuthMapRecorder,
                                                  clock: ManualClock) -> None:
    """A slow peer: neither the worker's next passes nor a burst of drops start a second
    handshake with the same node while the first one runs."""
    started, release = threading.Event(), threading.Event()

    def slow(local: int, remote: int, node: Address) -> AuthResult:
        started.set()
        release.wait(5)
        return peers(local, remote, node)

    m = AuthManager(None, auth_map.write, auth_map.delete, handshake_fn=slow, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}})
        m.tick(wait=False)
        assert started.wait(5)
        clock.advance(5.0)  # past request_interval
        for _ in range(3):
            assert m.request(300, 400)
            m.tick(wait=False)
        release.set()
        m.stop()
        assert peers.calls == [(300, 400, A)]
        assert auth_map.entries == {(300, 400, A): clock() + 90}
    finally:
        release.set()
        m.stop()


def test_request_handshakes_now_but_not_for_every_drop(manager: AuthManager, peers: Peers,
                                                       clock: ManualClock) -> None:
    manager.set_wanted({(300, 400): {A, B}})
    manager.tick()
    assert len(peers.calls) == 2
    assert manager.request(300, 400)
    manager.tick()
    assert len(peers.calls) == 2  # within request_interval of the last attempt
    clock.advance(1.5)
    for _ in range(20):
        manager.request(300, 400)
    manager.tick()
    assert sorted(peers.calls[2:]) == [(300, 400, A), (300, 400, B)]  # each node once
    assert not manager.request(300, 999)


def test_local_svid_rotation_triggers_a_new_handshake(tmp_path: Path, auth_map: AuthMapRecorder,
                                                      clock: ManualClock) -> None:
    ca = BuiltinCA.ephemeral("l7gate.local", clock=clock, svid_ttl=600.0)
    store = SVIDStore(ca, tmp_path, clock=clock)
    store.set_identities([300])
    calls = []

    def fn(local: int, remote: int, node: Address) -> AuthResult:
        own = store.svid(local)
        calls.append(own.serial)
        return AuthResult(local, remote, node, own.not_after, Peer(remote, "", own.not_after + 60))

    m = AuthManager(store, auth_map.write, auth_map.delete, handshake_fn=fn, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}})
        m.tick()
        first = auth_map.entries[(300, 400, A)]
        clock.advance(301.0)  # past 50 %: the store rotates; 2/3 of 600 s is not reached yet
        store.refresh()
        m.tick()
        assert len(calls) == 2 and calls[0] != calls[1]
        assert auth_map.entries[(300, 400, A)] == pytest.approx(first + 301, abs=1)
    finally:
        m.stop()


def test_a_rotation_during_a_handshake_runs_another_after_it(tmp_path: Path, auth_map: AuthMapRecorder,
                                                             clock: ManualClock) -> None:
    """The running handshake presented the old SVID: its result would expire with it, so the
    row handshakes again at once when it answers."""
    ca = BuiltinCA.ephemeral("l7gate.local", clock=clock, svid_ttl=600.0)
    store = SVIDStore(ca, tmp_path, clock=clock)
    store.set_identities([300])
    calls = []
    started, release = threading.Event(), threading.Event()

    def fn(local: int, remote: int, node: Address) -> AuthResult:
        own = store.svid(local)
        calls.append(own.serial)
        if len(calls) == 1:
            started.set()
            release.wait(5)
        return AuthResult(local, remote, node, own.not_after, Peer(remote, "", own.not_after + 600))

    m = AuthManager(store, auth_map.write, auth_map.delete, handshake_fn=fn, clock=clock)
    try:
        m.set_wanted({(300, 400): {A}})
        m.tick(wait=False)
        assert started.wait(5)
        clock.advance(301.0)
        store.refresh()  # rotates while the handshake runs
        release.set()
        eventually(lambda: m.status()[0].last_ok, 5, "the first handshake to answer")
        m.tick()
        assert len(calls) == 2 and calls[0] != calls[1]
        assert auth_map.entries[(300, 400, A)] == store.svid(300).not_after
    finally:
        release.set()
        m.stop()


# -- agent restart ------------------------------------------------------------------------------


def test_entries_left_by_the_previous_agent_stay_until_overwritten_or_expired(
    manager: AuthManager, peers: Peers, auth_map: AuthMapRecorder, clock: ManualClock
) -> None:
    """The kernel map outlives the agent (DESIGN decision 7): a restarted agent's manager finds
    entries it did not write. It must not drop the traffic they let in while its first
    handshakes run, nor on a failed one; it deletes only what it wrote itself."""
    left = clock() + 50
    auth_map.entries = {(300, 400, A): left, (300, 400, B): left, (300, 401, A): left}
    peers.outcomes[(300, 400, A)] = AuthError(Failure.TIMEOUT, "")
    manager.set_wanted({(300, 400): {A, B}})  # (300, 401) is no longer wanted
    assert auth_map.log == []
    manager.tick()
    assert auth_map.entries == {(300, 400, A): left, (300, 400, B): clock() + 90, (300, 401, A): left}
    assert auth_map.log == [("write", 300, 400, B)]
    # B's entry is now the manager's own: deleted when B is no longer wanted; the others are not
    manager.set_wanted({})
    assert auth_map.entries == {(300, 400, A): left, (300, 401, A): left}
    assert auth_map.log[1:] == [("delete", 300, 400, B)]


# -- callbacks ----------------------------------------------------------------------------------


def test_a_failing_write_callback_does_not_stop_the_manager(peers: Peers, clock: ManualClock) -> None:
    written: list[Key] = []
    full = True

    def write(local: int, remote: int, node: Address, expires_at: float) -> None:
        if full and (remote, node) == (400, A):
            raise OSError("map full")
        written.append((local, remote, node))

    m = AuthManager(None, write, lambda local, remote, node: None, handshake_fn=peers, clock=clock)
    try:
        m.set_wanted({(300, 400): {A, B}, (300, 401): {A}})
        m.tick()
        assert sorted(written) == [(300, 400, B), (300, 401, A)]
        # the failed write was not taken for done: the pair's next update writes it
        full = False
        m.set_wanted({(300, 400): {A, B}, (300, 401): {A}})
        assert sorted(written) == [(300, 400, A), (300, 400, B), (300, 401, A)]
    finally:
        m.stop()


# -- batches ------------------------------------------------------------------------------------


class Batches:
    """A batch_fn over the same outcome table as `Peers`: records each call's (node, pairs);
    `omit` pairs get no outcome, `raise_for` nodes make the whole call raise."""

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self.calls: list[tuple[Address, list[tuple[int, int]]]] = []
        self.omit: set[tuple[int, int]] = set()
        self.raise_for: set[Address] = set()
        self.during: list[object] = []  # callables run inside the call (while rows are running)

    def __call__(self, node: Address, pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], AuthResult | AuthError]:
        self.calls.append((node, list(pairs)))
        for hook in self.during:
            assert callable(hook)
            hook()
        if node in self.raise_for:
            raise RuntimeError("the batch client broke")
        out: dict[tuple[int, int], AuthResult | AuthError] = {}
        for local, remote in pairs:
            if (local, remote) in self.omit:
                continue
            try:
                out[(local, remote)] = self.peers(local, remote, node)
            except AuthError as exc:
                out[(local, remote)] = exc
        self.peers.calls.clear()  # what a batch proved is not a handshake
        return out


@pytest.fixture
def batches(peers: Peers) -> Batches:
    return Batches(peers)


@pytest.fixture
def batching(peers: Peers, batches: Batches, auth_map: AuthMapRecorder, clock: ManualClock) -> Iterator[AuthManager]:
    m = AuthManager(None, auth_map.write, auth_map.delete, handshake_fn=peers, batch_fn=batches, clock=clock,
                    retry_base=1.0, retry_max=8.0)
    yield m
    m.stop()


def test_due_rows_of_one_node_go_in_one_batch_and_a_lone_row_in_a_handshake(
    batching: AuthManager, peers: Peers, batches: Batches, auth_map: AuthMapRecorder, clock: ManualClock
) -> None:
    peers.outcomes[(301, 400, A)] = AuthError(Reason.EXPIRED, "expired at ...", by_peer=True)
    batching.set_wanted({(300, 400): {A, B}, (301, 400): {A}, (300, 401): {A}})
    batching.tick()
    assert batches.calls == [(A, [(300, 400), (300, 401), (301, 400)])]
    assert peers.calls == [(300, 400, B)]  # B has one due row: a handshake
    assert auth_map.entries == {(300, 400, A): clock() + 90, (300, 401, A): clock() + 90,
                                (300, 400, B): clock() + 90}
    rows = {(r.local, r.remote, r.node): r for r in batching.status()}
    failed = rows[(301, 400, A)]
    assert failed.failures == 1 and failed.next_attempt == clock() + 1.0  # its own back-off
    assert failed.last_error == "peer refused our certificate: expired (expired at ...)"
    assert rows[(300, 400, A)].next_attempt == clock() + 60  # refresh at 2/3, as after a handshake


def test_a_pair_the_batch_did_not_answer_fails_closed(
    batching: AuthManager, batches: Batches, auth_map: AuthMapRecorder
) -> None:
    batches.omit = {(300, 401)}
    batching.set_wanted({(300, 400): {A}, (300, 401): {A}})
    batching.tick()
    assert set(auth_map.entries) == {(300, 400, A)}
    row = {(r.local, r.remote): r for r in batching.status()}[(300, 401)]
    assert row.failures == 1 and row.last_error is not None and "no outcome" in row.last_error


def test_a_batch_that_raises_fails_its_rows_and_keeps_valid_entries(
    batching: AuthManager, batches: Batches, auth_map: AuthMapRecorder, clock: ManualClock
) -> None:
    batching.set_wanted({(300, 400): {A}, (300, 401): {A}})
    batching.tick()
    before = dict(auth_map.entries)
    clock.advance(60.0)
    batches.raise_for = {A}
    batching.tick()
    assert len(batches.calls) == 2
    assert auth_map.entries == before  # still valid for 30 s: kept, as after a failed handshake
    assert all(r.failures == 1 for r in batching.status())
    clock.advance(31.0)
    batching.tick()
    assert auth_map.entries == {}  # expired, and the retries failed too


def test_a_row_dropped_while_its_batch_ran_is_not_written(
    batching: AuthManager, batches: Batches, auth_map: AuthMapRecorder
) -> None:
    batches.during = [lambda: batching.set_wanted({(300, 400): {A}})]
    batching.set_wanted({(300, 400): {A}, (300, 401): {A}})
    batching.tick()
    assert set(auth_map.entries) == {(300, 400, A)}
