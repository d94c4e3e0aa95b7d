"""The kvstore contract (kvstore/api.py), one suite run against both backends: the embedded
SQLite store and a real etcd (Debian etcd-server 3.4) started per test on its own loopback ports
and data dir (l7gate.testing.etcd), stopped by PID at the end even on failure.

Then the etcd backend's own pitfalls, each against a real etcd: revisions from 1, the
--max-txn-ops limit, optimistic batch conflicts, listings and replays past gRPC's 4 MiB receive
limit, a killed / frozen / restarted / replaced server under a watch, compaction, whole-second
lease TTLs, and TLS with client certificates.

Time: the SQLite store runs on a fake clock that the tests advance; etcd runs on real time, so
"advance" sleeps there and lease tests use etcd's minimum TTL (2 s). etcd revokes an expired
lease within about 0.5 s, so expiry is awaited through the DELETE events a watcher gets.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l7gate.kvstore import Event, EventType, KVStore, KVStoreError, SQLiteKVStore, Watch
from l7gate.kvstore.etcd import EtcdKVStore
from l7gate.testing.clock import ManualClock
from l7gate.testing.etcd import EtcdServer, TLSFiles, make_tls

ETCD_HINT = "Debian etcd-server: bash scripts/install.sh"



@dataclass
class Backend:
    name: str
    store: Any  # SQLiteKVStore | EtcdKVStore: both satisfy KVStore; tests also use compact()
    initial_revision: int  # of a new, empty store
    advance: Callable[[float], None]  # let this much lease time pass
    another: Callable[[], Any]  # a second store on the same data (another process's view)
    server: EtcdServer | None = None


@pytest.fixture
def etcd_binary(require_binary: Callable[..., str]) -> str:
    return require_binary("etcd", hint=ETCD_HINT)


@pytest.fixture
def etcd_server(etcd_binary: str, tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(etcd_binary, tmp_path / "etcd") as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[Any] = []

    def track(store: Any) -> Any:
        opened.append(store)
        return store

    if request.param == "sqlite":
        clock = ManualClock(start=1000.0)
        path = str(tmp_path / "state.db")
        yield Backend("sqlite", track(SQLiteKVStore(path, clock=clock, poll_interval=0.01)), 0, clock.advance,
                      lambda: track(SQLiteKVStore(path, clock=clock, poll_interval=0.01)))
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")
        yield Backend("etcd", track(EtcdKVStore(server.endpoint)), 1, time.sleep,
                      lambda: track(EtcdKVStore(server.endpoint)), server)
    for store in opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> Any:
    return backend.store


def drain(watch: Watch, quiet: float = 0.3) -> list[Event]:
    """Every event until none arrives for `quiet` seconds (etcd delivers asynchronously)."""
    events = []
    while (event := watch.get(timeout=quiet)) is not None:
        events.append(event)
    return events


def take(watch: Watch, n: int, timeout: float = 10.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    while len(events) < n:
        event = watch.get(timeout=max(0.0, deadline - time.monotonic()))
        if event is None:
            raise AssertionError(f"only {len(events)} of {n} events within {timeout} s: {events}")
        events.append(event)
    return events


# -- the contract, both backends ----------------------------------------------------------------


def test_implements_the_protocols(store: Any) -> None:
    assert isinstance(store, KVStore)
    with store.watch_prefix("a") as w:
        assert isinstance(w, Watch)


def test_put_get_delete_and_revisions(backend: Backend) -> None:
    store = backend.store
    assert store.revision == backend.initial_revision  # 0 for SQLite, 1 for etcd (api.py)
    assert store.get("a") is None
    r1 = store.put("a", b"1")
    assert r1 == backend.initial_revision + 1
    r2 = store.put("a", b"2")
    assert 0 < r1 < r2 == store.revision
    assert store.get("a") == b"2"
    assert store.delete("a") is True
    assert store.revision == r2 + 1
    assert store.get("a") is None
    assert store.delete("a") is False
    assert store.revision == r2 + 1  # a no-op does not bump the revision


def test_put_many_writes_every_key_on_the_lease(store: Any) -> None:
    lease = store.grant_lease(30)
    last = store.put_many(((f"many/{i:03}", str(i).encode()) for i in range(300)), lease=lease)
    assert last == store.revision
    assert store.list_prefix("many/") == [(f"many/{i:03}", str(i).encode()) for i in range(300)]
    store.revoke(lease)
    assert store.list_prefix("many/") == []


def test_create_is_put_if_absent(store: Any) -> None:
    assert store.create("k", b"first") is True
    rev = store.revision
    assert store.create("k", b"second") is False
    assert store.get("k") == b"first"
    assert store.revision == rev
    store.delete("k")
    assert store.create("k", b"third") is True


def test_compare_and_delete(store: Any) -> None:
    store.put("k", b"mine")
    rev = store.revision
    assert store.delete("k", prev_value=b"theirs") is False
    assert store.get("k") == b"mine" and store.revision == rev
    assert store.delete("k", prev_value=b"mine") is True
    assert store.get("k") is None
    assert store.delete("k", prev_value=b"mine") is False


def test_list_prefix_sorted_and_bounded(store: Any) -> None:
    keys = ["b/2", "b/10", "a", "b/1", "b0", "b", "c/\U0010ffff", "b/\U0010ffff/x"]
    for key in keys:
        store.put(key, key.encode())
    assert [k for k, _ in store.list_prefix("b/")] == ["b/1", "b/10", "b/2", "b/\U0010ffff/x"]
    assert [k for k, _ in store.list_prefix("")] == sorted(keys)
    assert store.list_prefix("c/\U0010ffff") == [("c/\U0010ffff", "c/\U0010ffff".encode())]
    items, rev = store.list_prefix_with_revision("b")
    assert rev == store.revision and len(items) == 6


keys = st.text(
    alphabet=st.sampled_from(["a", "b", "/", "\x7f", "\u00e9", "\U0010ffff", "z"]),
    min_size=1,
    max_size=5,
)


def test_list_prefix_matches_a_dict_model(store: Any) -> None:
    """Each example in its own key space (one store serves them all: etcd starts once)."""
    spaces = itertools.count()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.booleans(), keys), max_size=30), keys)
    def check(ops: list[tuple[bool, str]], prefix: str) -> None:
        root = f"m{next(spaces)}/"
        model: dict[str, bytes] = {}
        revision = store.revision
        for i, (is_put, key) in enumerate(ops):
            if is_put:
                store.put(root + key, str(i).encode())
                model[root + key] = str(i).encode()
                revision += 1
            else:
                existed = model.pop(root + key, None) is not None
                assert store.delete(root + key) == existed
                revision += existed
        expected = sorted((k, v) for k, v in model.items() if k.startswith(root + prefix))
        assert store.list_prefix(root + prefix) == expected
        assert store.list_prefix(root) == sorted(model.items())
        assert store.revision == revision

    check()


def test_create_races_have_one_winner_across_instances(backend: Backend) -> None:
    stores = [backend.store, backend.another()]
    wins: list[tuple[int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def contend(worker: int) -> None:
        s = stores[worker % 2]
        barrier.wait()
        for i in range(40):
            if s.create(f"slot/{i}", str(worker).encode()):
                with lock:
                    wins.append((i, worker))

    threads = [threading.Thread(target=contend, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for i, _ in wins) == list(range(40))
    stored = dict(stores[1].list_prefix("slot/"))
    assert all(stored[f"slot/{i}"] == str(w).encode() for i, w in wins)


def test_watch_sees_changes_in_order(store: Any) -> None:
    store.put("app/old", b"before the watch")
    with store.watch_prefix("app/") as w:
        assert w.get(timeout=0) is None
        store.put("app/a", b"1")
        store.put("other", b"x")
        store.put("app/b", b"2")
        store.delete("app/a")
        events = take(w, 3)
        assert drain(w) == []
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "app/a", b"1"),
        (EventType.PUT, "app/b", b"2"),
        (EventType.DELETE, "app/a", b""),
    ]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert events[-1].revision == store.revision


def test_list_then_watch_has_no_gap_and_no_duplicate(store: Any) -> None:
    store.put("p/1", b"a")
    items, rev = store.list_prefix_with_revision("p/")
    store.put("p/2", b"b")  # a change between the list and the watch
    with store.watch_prefix("p/", start_revision=rev + 1) as w:
        store.put("p/3", b"c")
        assert [e.key for e in take(w, 2)] == ["p/2", "p/3"]
        assert drain(w) == []
    assert items == [("p/1", b"a")]


def test_watch_sees_writes_of_another_instance(backend: Backend) -> None:
    other = backend.another()
    with backend.store.watch_prefix("k/") as w:
        other.put("k/remote", b"v")
        event = w.get(timeout=5)
    assert event is not None and (event.key, event.value) == ("k/remote", b"v")


def test_blocked_get_wakes_on_put_and_on_close(store: Any) -> None:
    w = store.watch_prefix("q/")
    got: list[Event | None] = []
    t = threading.Thread(target=lambda: got.append(w.get(timeout=10)))
    t.start()
    store.put("q/x", b"1")
    t.join(5)
    assert got and got[0] is not None and got[0].key == "q/x"

    t = threading.Thread(target=lambda: got.append(w.get(timeout=10)))
    t.start()
    time.sleep(0.05)
    w.close()
    t.join(5)
    assert not t.is_alive() and got[1] is None
    assert w.closed


def test_watch_from_compacted_revision_fails(store: Any) -> None:
    base = store.revision
    for i in range(5):
        store.put("c/k", str(i).encode())  # revisions base+1 .. base+5
    store.compact(base + 3)
    with pytest.raises(KVStoreError, match="compacted"):
        store.watch_prefix("c/", start_revision=base + 2)
    with store.watch_prefix("c/", start_revision=base + 4) as w:
        assert [e.value for e in take(w, 2)] == [b"3", b"4"]
        assert drain(w) == []


def test_lease_expiry_deletes_keys_and_emits_delete(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(2)
    store.put("node/a", b"1", lease=lease)
    store.create("node/b", b"2", lease=lease)
    store.put("node/keep", b"3")
    with store.watch_prefix("node/") as w:
        backend.advance(1)
        assert store.get("node/a") == b"1"
        backend.advance(1)
        events = take(w, 2, timeout=5)  # etcd's leader revokes within ~0.5 s of expiry
        assert store.get("node/a") is None
        assert store.list_prefix("node/") == [("node/keep", b"3")]
        assert drain(w) == []
    assert [(e.type, e.key) for e in events] == [
        (EventType.DELETE, "node/a"),
        (EventType.DELETE, "node/b"),
    ]
    with pytest.raises(KVStoreError, match="not found"):
        store.keepalive(lease)
    with pytest.raises(KVStoreError, match="not found"):
        store.put("node/c", b"x", lease=lease)


def test_keepalive_extends_the_lease(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(2)
    store.put("k", b"v", lease=lease)
    for _ in range(3):
        backend.advance(1.2)
        assert store.keepalive(lease) == 2
    assert store.get("k") == b"v"  # 3.6 s after the grant: alive only through the keepalives
    with store.watch_prefix("k") as w:
        backend.advance(2)
        event = w.get(timeout=5)
    assert event is not None and (event.type, event.key) == (EventType.DELETE, "k")
    assert store.get("k") is None


def test_revoke_deletes_only_its_keys(store: Any) -> None:
    l1, l2 = store.grant_lease(60), store.grant_lease(60)
    assert l1 != l2
    store.put("a", b"1", lease=l1)
    store.put("b", b"2", lease=l2)
    store.put("c", b"3", lease=l1)
    store.put("c", b"3")  # re-put without a lease detaches it from l1
    store.revoke(l1)
    assert store.list_prefix("") == [("b", b"2"), ("c", b"3")]
    with pytest.raises(KVStoreError):
        store.revoke(l1)


def test_errors_are_kvstore_errors(store: Any) -> None:
    with pytest.raises(KVStoreError):
        store.put("", b"x")
    with pytest.raises(KVStoreError):
        store.put("bad\ud800", b"x")
    with pytest.raises(KVStoreError):
        store.put("k", "not bytes")
    with pytest.raises(KVStoreError):
        store.grant_lease(0)
    with pytest.raises(KVStoreError):
        store.watch_prefix(None)
    with pytest.raises(KVStoreError):
        store.put("k", b"v", lease="not a lease")
    with pytest.raises(KVStoreError):
        store.keepalive(2**70)
    with pytest.raises(KVStoreError):
        store.watch_prefix("k", start_revision=2**70)
    store.close()
    with pytest.raises(KVStoreError, match="closed"):
        store.get("k")


def test_batch_commits_once_and_rolls_back_whole(store: Any) -> None:
    watch = store.watch_prefix("b/")
    with store.batch():
        store.put("b/1", b"one")
        assert store.create("b/2", b"two")
        assert store.get("b/1") == b"one"  # reads see the batch's own writes
        assert not store.create("b/1", b"again")
        assert store.list_prefix("b/") == [("b/1", b"one"), ("b/2", b"two")]
    assert store.list_prefix("b/") == [("b/1", b"one"), ("b/2", b"two")]
    assert watch.get(timeout=2) is not None  # watchers still see the writes
    with pytest.raises(RuntimeError):
        with store.batch():
            store.put("b/3", b"three")
            store.delete("b/1")
            raise RuntimeError("refused")
    assert store.list_prefix("b/") == [("b/1", b"one"), ("b/2", b"two")]  # nothing of it stayed
    watch.close()


# -- etcd's own: each against a real etcd -------------------------------------------------------

pytestmark_etcd = pytest.mark.integration


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[EtcdKVStore]:
    with EtcdKVStore(etcd_server.endpoint) as s:
        yield s


@pytestmark_etcd
def test_etcd_revisions_are_etcds_own(etcd: EtcdKVStore) -> None:
    """api.py: a new etcd reports 1 and its first write is 2; a batch is one revision."""
    assert etcd.revision == 1
    assert etcd.put("a", b"1") == 2
    with etcd.batch():
        assert etcd.put("b", b"1") == 0  # not known before the commit
        etcd.put("c", b"1")
    assert etcd.revision == 3
    with etcd.watch_prefix("", start_revision=1) as w:
        assert [(e.key, e.revision) for e in take(w, 3)] == [("a", 2), ("b", 3), ("c", 3)]


@pytestmark_etcd
def test_etcd_batch_over_max_txn_ops_is_refused_whole(etcd: EtcdKVStore) -> None:
    with etcd.batch():  # exactly etcd's default --max-txn-ops: one txn, one revision
        for i in range(128):
            etcd.put(f"ok/{i:03}", b"v")
    assert len(etcd.list_prefix("ok/")) == 128
    rev = etcd.revision
    with pytest.raises(KVStoreError, match="more than 128 writes.*max-txn-ops.*nothing of this batch"):
        with etcd.batch():
            for i in range(129):
                etcd.put(f"big/{i:03}", b"v")
    # a caller that swallows the refusal inside the batch still gets nothing written
    with pytest.raises(KVStoreError, match="max-txn-ops"):
        with etcd.batch():
            for i in range(129):
                try:
                    etcd.put(f"big/{i:03}", b"v")
                except KVStoreError:
                    pass
    assert etcd.list_prefix("big/") == [] and etcd.revision == rev


@pytestmark_etcd
def test_etcd_server_limit_is_the_one_that_counts(etcd_server: EtcdServer) -> None:
    """A store told a higher limit than the server's: etcd refuses the txn, and nothing lands."""
    with EtcdKVStore(etcd_server.endpoint, max_txn_ops=500) as s:
        with pytest.raises(KVStoreError, match="too many operations"):
            with s.batch():
                for i in range(200):
                    s.put(f"k/{i}", b"v")
        assert s.list_prefix("k/") == []


@pytestmark_etcd
def test_etcd_batches_are_per_thread(etcd: EtcdKVStore) -> None:
    """Another thread neither joins a batch nor waits for it, nor sees its writes before the
    commit (SQLite: it waits). Both threads' writes land."""
    seen: list[bytes | None] = []

    def other() -> None:
        etcd.put("t/other", b"2")
        seen.append(etcd.get("t/mine"))

    with etcd.batch():
        etcd.put("t/mine", b"1")
        t = threading.Thread(target=other)
        t.start()
        t.join(10)
        assert not t.is_alive() and seen == [None]
        assert etcd.get("t/other") == b"2"
    assert etcd.list_prefix("t/") == [("t/mine", b"1"), ("t/other", b"2")]


def test_etcd_prefix_ranges() -> None:
    from l7gate.kvstore.etcd import _range_of

    assert _range_of("") == (b"\x00", b"\x00")  # every key
    assert _range_of("a/") == (b"a/", b"a0")
    assert _range_of("\U0010ffff") == (b"\xf4\x8f\xbf\xbf", b"\xf4\x8f\xbf\xc0")  # bytes, as etcd orders
    assert _range_of("a\u00e9") == (b"a\xc3\xa9", b"a\xc3\xaa")


@pytestmark_etcd
def test_etcd_put_many_is_split_and_says_so(etcd: EtcdKVStore) -> None:
    base = etcd.revision
    last = etcd.put_many((f"bulk/{i:04}", b"v") for i in range(1000))
    assert len(etcd.list_prefix("bulk/")) == 1000
    assert last == base + math.ceil(1000 / 128)  # one txn (one revision) per 128 keys
    with pytest.raises(KVStoreError, match="not atomic"):
        with etcd.batch():
            etcd.put_many([("x", b"1")])


@pytestmark_etcd
def test_etcd_batch_conflict_writes_nothing(etcd_server: EtcdServer, etcd: EtcdKVStore) -> None:
    other = EtcdKVStore(etcd_server.endpoint)
    try:
        etcd.put("cfg", b"1")
        with pytest.raises(KVStoreError, match="batch not written: cfg changed.*nothing of the batch"):
            with etcd.batch():
                assert etcd.get("cfg") == b"1"
                other.put("cfg", b"2")  # another writer, between the read and the commit
                etcd.put("derived", b"from 1")
        assert etcd.get("derived") is None
        # a create decided inside a batch loses to one that committed first
        with pytest.raises(KVStoreError, match="slot/7 changed"):
            with etcd.batch():
                assert etcd.create("slot/7", b"mine")
                assert other.create("slot/7", b"theirs")
        assert etcd.get("slot/7") == b"theirs"
        # a listing guards its range against keys created in it meanwhile
        with pytest.raises(KVStoreError, match="under 'pods/'"):
            with etcd.batch():
                assert etcd.list_prefix("pods/") == []
                other.put("pods/a", b"1")
                etcd.put("pods/count", b"0")
        assert etcd.get("pods/count") is None
    finally:
        other.close()


@pytestmark_etcd
def test_etcd_listing_and_replay_beyond_grpc_4mib(etcd_server: EtcdServer) -> None:
    """50k keys, ~6 MB: over gRPC's default 4 MiB receive limit in one range response or one
    replayed watch response. With the store's defaults (64 MiB), the replay comes whole; with the
    limit left at 4 MiB and one page asked for, the listing halves its pages and the watch reopens
    itself fragmented from where it was. All 50k arrive, in order, once, either way."""
    n, value = 50_000, b"x" * 100
    assert n * (len(value) + 9) > 4 * 2**20
    with EtcdKVStore(etcd_server.endpoint) as s, \
            EtcdKVStore(etcd_server.endpoint, max_message_bytes=4 * 2**20, page_size=n) as small:
        base = s.revision
        s.put_many((f"big/{i:05}", value) for i in range(n))
        s.put("big/zz-live", b"after the replay")
        for live, (store, fragmented) in enumerate(((s, False), (small, True))):
            items, rev = store.list_prefix_with_revision("big/")
            assert len(items) == n + 1 and items[0] == ("big/00000", value) and items[-2][0] == f"big/{n - 1:05}"
            with store.watch_prefix("big/", start_revision=base + 1) as w:
                events = take(w, n + 1 + live, timeout=30)  # + the live puts of earlier rounds
                assert [e.key for e in events[:n]] == [k for k, _ in items[:n]]
                assert {e.key: e.value for e in events} == dict(items) and events[-1].revision == rev
                store.put("big/zz-live", b"live %d" % live)  # and then it is live
                assert [(e.key, e.value) for e in take(w, 1)] == [("big/zz-live", b"live %d" % live)]
                assert drain(w, quiet=0.5) == []
                assert w._fragment is fragmented


@pytestmark_etcd
def test_etcd_watch_on_a_killed_server_ends_with_an_error(etcd_server: EtcdServer, etcd: EtcdKVStore) -> None:
    with etcd.watch_prefix("w/") as w:
        etcd.put("w/1", b"1")
        received = take(w, 1)
        etcd_server.kill()
        started = time.monotonic()
        with pytest.raises(KVStoreError, match=f"lost.*before revision {received[0].revision + 1} was delivered"):
            w.get(timeout=15)
        assert time.monotonic() - started < 3
        with pytest.raises(KVStoreError):  # again, until the caller closes it
            w.get(timeout=0)
        assert w.resume_revision == received[0].revision + 1
    with pytest.raises(KVStoreError, match="unreachable"):
        etcd.get("w/1")


@pytestmark_etcd
def test_etcd_watch_on_a_frozen_server_ends_within_keepalive(etcd_server: EtcdServer) -> None:
    """SIGSTOP: the TCP connection stays up and nothing answers. HTTP/2 keepalive pings (5 s,
    2 s answer deadline: the store's defaults) end the stream; no timeout of ours would."""
    with EtcdKVStore(etcd_server.endpoint, timeout=3) as s, s.watch_prefix("f/") as w:
        s.put("f/1", b"1")
        take(w, 1)
        time.sleep(1)  # an idle stream: only a keepalive ping can notice
        etcd_server.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(KVStoreError, match="lost"):
                w.get(timeout=30)
            waited = time.monotonic() - started
            assert waited < 5 + 2 + 3, waited
            started = time.monotonic()
            with pytest.raises(KVStoreError, match="DEADLINE_EXCEEDED|UNAVAILABLE"):
                s.get("f/1")
            assert time.monotonic() - started < 3 + 1
        finally:
            etcd_server.thaw()


@pytestmark_etcd
def test_etcd_watch_resumes_after_a_restart_with_no_gap(etcd_server: EtcdServer, etcd: EtcdKVStore) -> None:
    """The caller's reconnect: a new watch from `resume_revision` on the same store, once etcd
    is back, gets exactly what it had not delivered."""
    with etcd.watch_prefix("r/") as w:
        etcd.put("r/1", b"1")
        take(w, 1)
        etcd_server.kill()
        with pytest.raises(KVStoreError):
            w.get(timeout=15)
        resume = w.resume_revision
    etcd_server.restart()
    deadline = time.monotonic() + 10
    while True:  # the channel reconnects on its own (back-off capped at 1 s)
        try:
            etcd.put("r/2", b"2")
            break
        except KVStoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    etcd.put("r/3", b"3")
    with etcd.watch_prefix("r/", start_revision=resume) as w:
        assert [e.key for e in take(w, 2)] == ["r/2", "r/3"]
        assert drain(w) == []


@pytestmark_etcd
def test_etcd_replaced_behind_the_address_is_refused(etcd_server: EtcdServer, etcd: EtcdKVStore) -> None:
    """cilium#32005: a store must not carry its revisions over to another etcd cluster."""
    etcd.put("x", b"1")
    first = etcd.cluster_id
    etcd_server.restart_fresh()
    deadline = time.monotonic() + 10
    while True:
        try:
            etcd.get("x")
        except KVStoreError as e:
            if "now answers as cluster" in str(e):
                break
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        else:
            raise AssertionError("a store read from a different etcd cluster")
    assert etcd.cluster_id == first
    with EtcdKVStore(etcd_server.endpoint) as fresh:
        assert fresh.get("x") is None and fresh.cluster_id != first


@pytestmark_etcd
def test_etcd_compacted_watch_names_compact_revision(etcd: EtcdKVStore) -> None:
    for i in range(6):
        etcd.put("c", str(i).encode())  # revisions 2..7
    etcd.compact(6)
    with pytest.raises(KVStoreError, match=r"needs revision 3.*up to revision 6 \(compact_revision\)"):
        etcd.watch_prefix("c", start_revision=3)
    with etcd.watch_prefix("c", start_revision=6) as w:  # etcd keeps the compaction revision itself
        assert [e.value for e in take(w, 2)] == [b"4", b"5"]


@pytestmark_etcd
def test_etcd_lease_ttls_are_whole_seconds_at_least_two(etcd: EtcdKVStore) -> None:
    assert etcd.keepalive(etcd.grant_lease(0.2)) == 2  # etcd's minimum
    assert etcd.keepalive(etcd.grant_lease(2.2)) == 3  # rounded up, never down
    assert etcd.keepalive(etcd.grant_lease(7)) == 7
    with pytest.raises(KVStoreError, match="not found"):
        etcd.keepalive(123456789)


@pytestmark_etcd
def test_etcd_unreachable_is_a_kvstore_error(etcd_binary: str, tmp_path: Path) -> None:
    server = EtcdServer(etcd_binary, tmp_path / "gone")  # never started: nothing listens there
    with EtcdKVStore(server.endpoint, timeout=2) as s:
        for op in (lambda: s.get("k"), lambda: s.put("k", b"v"), lambda: s.grant_lease(5),
                   lambda: s.keepalive(1), lambda: s.watch_prefix("k"), lambda: s.revision):
            with pytest.raises(KVStoreError, match="unreachable|DEADLINE"):
                op()
    with pytest.raises(KVStoreError, match="cert_file and key_file go together"):
        EtcdKVStore("https://127.0.0.1:1", cert_file="c.pem")
    with pytest.raises(KVStoreError, match="CA file .*missing"):
        EtcdKVStore("https://127.0.0.1:1", ca_file=str(tmp_path / "missing"))


# -- TLS with client certificates, as Cilium's clustermesh runs it -------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return make_tls(tmp_path / "pki")


@pytest.fixture
def tls_server(etcd_binary: str, tmp_path: Path, tls: TLSFiles) -> Iterator[EtcdServer]:
    with EtcdServer(etcd_binary, tmp_path / "etcd-tls", tls=tls) as server:
        yield server


@pytestmark_etcd
def test_etcd_tls_with_a_client_certificate(tls_server: EtcdServer, tls: TLSFiles) -> None:
    assert tls_server.endpoint.startswith("https://127.0.0.1:")
    with EtcdKVStore(tls_server.endpoint, ca_file=str(tls.ca), cert_file=str(tls.client_cert),
                     key_file=str(tls.client_key)) as s:
        lease = s.grant_lease(10)
        assert s.create("cilium/state/nodes/v1/c1/n1", b"{}", lease=lease)
        with s.watch_prefix("cilium/", start_revision=1) as w:
            assert take(w, 1)[0].key == "cilium/state/nodes/v1/c1/n1"
        assert s.keepalive(lease) == 10


@pytestmark_etcd
@pytest.mark.parametrize("who", ["no client certificate", "a certificate from another CA"])
def test_etcd_tls_refuses_a_client_without_a_valid_certificate(
        tls_server: EtcdServer, tls: TLSFiles, who: str) -> None:
    cert = {"no client certificate": None, "a certificate from another CA": tls.rogue_cert}[who]
    key = {"no client certificate": None, "a certificate from another CA": tls.rogue_key}[who]
    with EtcdKVStore(tls_server.endpoint, ca_file=str(tls.ca), cert_file=str(cert) if cert else None,
                     key_file=str(key) if key else None, timeout=5) as s:
        with pytest.raises(KVStoreError, match="TLS handshake with etcd failed: etcd refused this client; "
                                               "it requires a client certificate"):
            s.put("k", b"v")
        with pytest.raises(KVStoreError, match="etcd refused this client"):
            s.watch_prefix("k")


@pytestmark_etcd
def test_etcd_tls_refuses_a_server_the_ca_does_not_trust(tls_server: EtcdServer, tls: TLSFiles,
                                                         tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other-pki")
    with EtcdKVStore(tls_server.endpoint, ca_file=str(other.ca), cert_file=str(tls.client_cert),
                     key_file=str(tls.client_key), timeout=5) as s:
        with pytest.raises(KVStoreError, match="TLS handshake with etcd failed: etcd's server certificate "
                                               "was not accepted"):
            s.get("k")


@pytestmark_etcd
def test_etcd_plaintext_client_against_tls_server_fails_clearly(tls_server: EtcdServer) -> None:
    plain = "http://" + tls_server.endpoint.removeprefix("https://")
    with EtcdKVStore(plain, timeout=3) as s:
        with pytest.raises(KVStoreError, match=f"etcd {plain}: get"):
            s.get("k")



def test_sqlite_batch_revisions_are_one_per_write_and_read_back_inside_and_after(tmp_path: Path) -> None:
    """The batch keeps its revision counter in memory and writes it once: every write still
    gets its own revision, reads inside the batch (and a compaction) see the counter, a
    rolled-back batch leaves it as it was, and watchers get each write's revision."""
    with SQLiteKVStore(str(tmp_path / "kv.db"), poll_interval=0.01) as s:
        start = s.put("a", b"0")
        with s.watch_prefix("r/", start_revision=start + 1) as w:
            with s.batch():
                revs = [s.put(f"r/{i}", b"x") for i in range(5)]
                assert revs == list(range(start + 1, start + 6))
                assert s.revision == start + 5
                assert s.list_prefix_with_revision("r/")[1] == start + 5
                assert s.put("r/5", b"x") == start + 6
                s.compact(start)
            assert s.revision == start + 6
            assert [e.revision for e in take(w, 6)] == list(range(start + 1, start + 7))
        with pytest.raises(RuntimeError):
            with s.batch():
                s.put("r/9", b"y")
                raise RuntimeError("refused")
        assert s.revision == start + 6
        assert s.put("b", b"1") == start + 7
    with SQLiteKVStore(str(tmp_path / "kv.db")) as again:
        assert again.revision == start + 7
