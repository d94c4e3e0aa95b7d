"""The SQLite kvstore: etcd-shaped semantics on a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.kvstore import Event, EventType, KVStore, KVStoreError, SQLiteKVStore, Watch
from l7gate.kvstore.sqlite import prefix_end


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def store(db_path: str, clock: FakeClock) -> Iterator[SQLiteKVStore]:
    with SQLiteKVStore(db_path, clock=clock, poll_interval=0.01) as s:
        yield s


def drain(watch: Watch) -> list[Event]:
    events = []
    while (event := watch.get(timeout=0)) is not None:
        events.append(event)
    return events


def test_implements_the_protocols(store: SQLiteKVStore) -> None:
    assert isinstance(store, KVStore)
    with store.watch_prefix("a") as w:
        assert isinstance(w, Watch)


def test_put_get_delete_and_revisions(store: SQLiteKVStore) -> None:
    assert store.revision == 0
    assert store.get("a") is None
    r1 = store.put("a", b"1")
    r2 = store.put("a", b"2")
    assert 0 < r1 < r2 == store.revision
    assert store.get("a") == b"2"
    assert store.delete("a") is True
    assert store.revision == r2 + 1
    assert store.get("a") is None
    assert store.delete("a") is False
    assert store.revision == r2 + 1  # a no-op does not bump the revision


def test_create_is_put_if_absent(store: SQLiteKVStore) -> None:
    assert store.create("k", b"first") is True
    rev = store.revision
    assert store.create("k", b"second") is False
    assert store.get("k") == b"first"
    assert store.revision == rev
    store.delete("k")
    assert store.create("k", b"third") is True


def test_compare_and_delete(store: SQLiteKVStore) -> None:
    store.put("k", b"mine")
    rev = store.revision
    assert store.delete("k", prev_value=b"theirs") is False
    assert store.get("k") == b"mine" and store.revision == rev
    assert store.delete("k", prev_value=b"mine") is True
    assert store.get("k") is None
    assert store.delete("k", prev_value=b"mine") is False


def test_list_prefix_sorted_and_bounded(store: SQLiteKVStore) -> None:
    for key in ["b/2", "b/10", "a", "b/1", "b0", "b", "c/\U0010ffff", "b/\U0010ffff/x"]:
        store.put(key, key.encode())
    assert [k for k, _ in store.list_prefix("b/")] == ["b/1", "b/10", "b/2", "b/\U0010ffff/x"]
    assert [k for k, _ in store.list_prefix("")] == sorted(
        ["b/2", "b/10", "a", "b/1", "b0", "b", "c/\U0010ffff", "b/\U0010ffff/x"]
    )
    assert store.list_prefix("c/\U0010ffff") == [("c/\U0010ffff", "c/\U0010ffff".encode())]
    items, rev = store.list_prefix_with_revision("b")
    assert rev == store.revision and len(items) == 6


def test_prefix_end() -> None:
    assert prefix_end("a/") == "a0"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\U0010ffff") is None
    assert prefix_end("\ud7ff") == "\ue000"


keys = st.text(
    alphabet=st.sampled_from(["a", "b", "/", "\x7f", "\u00e9", "\U0010ffff", "z"]),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), keys), max_size=30), keys)
def test_list_prefix_matches_a_dict_model(ops: list[tuple[bool, str]], prefix: str) -> None:
    model: dict[str, bytes] = {}
    revision = 0
    with SQLiteKVStore(":memory:") as s:
        for i, (is_put, key) in enumerate(ops):
            if is_put:
                s.put(key, str(i).encode())
                model[key] = str(i).encode()
                revision += 1
            else:
                existed = model.pop(key, None) is not None
                assert s.delete(key) == existed
                revision += existed
        expected = sorted((k, v) for k, v in model.items() if k.startswith(prefix))
        assert s.list_prefix(prefix) == expected
        assert s.revision == revision


def test_durable_across_reopen(db_path: str, clock: FakeClock) -> None:
    with SQLiteKVStore(db_path, clock=clock) as s:
        s.put("x/1", b"one")
        s.put("x/2", b"two")
        s.delete("x/2")
        rev = s.revision
    with SQLiteKVStore(db_path, clock=clock) as s:
        assert s.list_prefix("x/") == [("x/1", b"one")]
        assert s.revision == rev
        assert s.put("x/3", b"three") == rev + 1
        # the history survived too: a watch can replay from before the restart
        with s.watch_prefix("x/", start_revision=1) as w:
            assert [(e.type, e.key) for e in drain(w)] == [
                (EventType.PUT, "x/1"),
                (EventType.PUT, "x/2"),
                (EventType.DELETE, "x/2"),
                (EventType.PUT, "x/3"),
            ]


def test_create_races_have_one_winner_across_instances(db_path: str) -> None:
    stores = [SQLiteKVStore(db_path) for _ in range(2)]
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
    stored = dict(stores[0].list_prefix("slot/"))
    assert all(stored[f"slot/{i}"] == str(w).encode() for i, w in wins)
    for s in stores:
        s.close()


def test_watch_sees_changes_in_order(store: SQLiteKVStore) -> None:
    store.put("app/old", b"before the watch")
    with store.watch_prefix("app/") as w:
        assert w.get(timeout=0) is None
        store.put("app/a", b"1")
        store.put("other", b"x")
        store.put("app/b", b"2")
        store.delete("app/a")
        events = drain(w)
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "app/a", b"1"),
        (EventType.PUT, "app/b", b"2"),
        (EventType.DELETE, "app/a", b""),
    ]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert events[-1].revision == store.revision


def test_list_then_watch_has_no_gap_and_no_duplicate(store: SQLiteKVStore) -> None:
    store.put("p/1", b"a")
    items, rev = store.list_prefix_with_revision("p/")
    store.put("p/2", b"b")  # a change between the list and the watch
    with store.watch_prefix("p/", start_revision=rev + 1) as w:
        store.put("p/3", b"c")
        assert [e.key for e in drain(w)] == ["p/2", "p/3"]
    assert items == [("p/1", b"a")]


def test_watch_sees_writes_of_another_instance(db_path: str, store: SQLiteKVStore) -> None:
    with SQLiteKVStore(db_path) as other, store.watch_prefix("k/") as w:
        other.put("k/remote", b"v")
        event = w.get(timeout=5)
    assert event is not None and (event.key, event.value) == ("k/remote", b"v")


def test_blocked_get_wakes_on_put_and_on_close(store: SQLiteKVStore) -> None:
    w = store.watch_prefix("q/")
    got: list[Event | None] = []
    t = threading.Thread(target=lambda: got.append(w.get(timeout=10)))
    t.start()
    store.put("q/x", b"1")
    t.join(5)
    assert got and got[0] is not None and got[0].key == "q/x"

    t = threading.Thread(target=lambda: got.append(w.get(timeout=10)))
    t.start()
    w.close()
    t.join(5)
    assert not t.is_alive() and got[1] is None
    assert w.closed


def test_watch_from_compacted_revision_fails(db_path: str) -> None:
    with SQLiteKVStore(db_path, history=1) as s:
        for i in range(5):
            s.put("c/k", str(i).encode())
        s.compact(3)
        with pytest.raises(KVStoreError, match="compacted"):
            s.watch_prefix("c/", start_revision=2)
        with s.watch_prefix("c/", start_revision=4) as w:
            assert [e.value for e in drain(w)] == [b"3", b"4"]


def test_lagging_watch_fails_after_compaction(store: SQLiteKVStore) -> None:
    with store.watch_prefix("c/") as w:
        store.put("c/a", b"1")
        store.put("c/b", b"2")
        store.compact(store.revision)
        with pytest.raises(KVStoreError, match="fell behind"):
            w.get(timeout=0)


def test_history_is_trimmed_automatically(db_path: str) -> None:
    with SQLiteKVStore(db_path, history=10, durable=False) as s:
        for i in range(600):
            s.put("h", str(i).encode())
        with pytest.raises(KVStoreError):
            s.watch_prefix("h", start_revision=1)
        with s.watch_prefix("h", start_revision=595) as w:
            assert [e.value for e in drain(w)] == [str(i).encode() for i in range(594, 600)]


def test_lease_expiry_deletes_keys_and_emits_delete(store: SQLiteKVStore, clock: FakeClock) -> None:
    lease = store.grant_lease(10)
    store.put("node/a", b"1", lease=lease)
    store.create("node/b", b"2", lease=lease)
    store.put("node/keep", b"3")
    with store.watch_prefix("node/") as w:
        clock.advance(9.9)
        assert store.get("node/a") == b"1"
        clock.advance(0.1)
        # the read itself must not see an expired key
        assert store.get("node/a") is None
        assert store.list_prefix("node/") == [("node/keep", b"3")]
        events = drain(w)
    assert [(e.type, e.key) for e in events] == [
        (EventType.DELETE, "node/a"),
        (EventType.DELETE, "node/b"),
    ]
    with pytest.raises(KVStoreError, match="not found"):
        store.keepalive(lease)
    with pytest.raises(KVStoreError, match="not found"):
        store.put("node/c", b"x", lease=lease)


def test_expiry_is_noticed_by_a_waiting_watch(store: SQLiteKVStore, clock: FakeClock) -> None:
    lease = store.grant_lease(5)
    store.put("w/a", b"1", lease=lease)
    with store.watch_prefix("w/") as w:
        clock.advance(5)
        event = w.get(timeout=5)
    assert event is not None and (event.type, event.key) == (EventType.DELETE, "w/a")


def test_keepalive_extends_the_lease(store: SQLiteKVStore, clock: FakeClock) -> None:
    lease = store.grant_lease(10)
    store.put("k", b"v", lease=lease)
    for _ in range(5):
        clock.advance(8)
        assert store.keepalive(lease) == 10
    assert store.get("k") == b"v"
    clock.advance(10)
    assert store.get("k") is None


def test_revoke_deletes_only_its_keys(store: SQLiteKVStore) -> None:
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


def test_leases_survive_reopen_with_a_full_ttl(db_path: str) -> None:
    with SQLiteKVStore(db_path, clock=FakeClock(1_000_000.0)) as s:
        lease = s.grant_lease(30)
        s.put("l", b"v", lease=lease)
    # a new process: its monotonic clock has another origin
    clock = FakeClock(5.0)
    with SQLiteKVStore(db_path, clock=clock) as s:
        assert s.get("l") == b"v"
        clock.advance(29)
        assert s.keepalive(lease) == 30
        clock.advance(30)
        assert s.get("l") is None


def test_errors_are_kvstore_errors(store: SQLiteKVStore, tmp_path: Path) -> None:
    with pytest.raises(KVStoreError):
        store.put("", b"x")
    with pytest.raises(KVStoreError):
        store.put("bad\ud800", b"x")
    with pytest.raises(KVStoreError):
        store.put("k", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(KVStoreError):
        store.grant_lease(0)
    with pytest.raises(KVStoreError):
        SQLiteKVStore(str(tmp_path / "missing-dir" / "x.db"))
    store.close()
    with pytest.raises(KVStoreError, match="closed"):
        store.get("k")


def test_memory_store_works(clock: FakeClock) -> None:
    with SQLiteKVStore(":memory:", clock=clock) as s:
        s.put("m", b"1")
        assert s.get("m") == b"1"


def test_batch_commits_once_and_rolls_back_whole(tmp_path: Path) -> None:
    from l7gate.kvstore.sqlite import SQLiteKVStore

    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    watch = store.watch_prefix("b/")
    with store.batch():
        store.put("b/1", b"one")
        assert store.create("b/2", b"two")
        assert store.get("b/1") == b"one"  # reads see the batch's own writes
        assert not store.create("b/1", b"again")
    assert store.list_prefix("b/") == [("b/1", b"one"), ("b/2", b"two")]
    assert watch.get(timeout=2) is not None  # watchers still see the writes
    try:
        with store.batch():
            store.put("b/3", b"three")
            store.delete("b/1")
            raise RuntimeError("refused")
    except RuntimeError:
        pass
    assert store.list_prefix("b/") == [("b/1", b"one"), ("b/2", b"two")]  # nothing of it stayed
    store.close()


# -- a store that existed is never silently replaced by an empty one ---------------------------


def test_first_start_is_recognised_and_marked(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.db")
    s = SQLiteKVStore(path)
    assert s.created
    s.put("a", b"1")
    s.close()
    assert (tmp_path / "kv.db.id").read_text().strip()
    again = SQLiteKVStore(path)
    assert not again.created and again.get("a") is not None
    again.close()


def test_an_emptied_store_is_refused(tmp_path: Path) -> None:
    """Truncated to 0 bytes: SQLite would open it as a new database, and the agent would start
    with no policies and no identities, saying it was ready."""
    path = tmp_path / "kv.db"
    s = SQLiteKVStore(str(path))
    s.put("l7gate/v1/policies/x", b"{}")
    s.close()
    for extra in ("-wal", "-shm"):
        (tmp_path / f"kv.db{extra}").unlink(missing_ok=True)
    path.write_bytes(b"")
    with pytest.raises(KVStoreError, match="empty \\(0 bytes\\)"):
        SQLiteKVStore(str(path))
    assert path.stat().st_size == 0  # refused, not recreated


def test_a_deleted_or_swapped_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.db"
    SQLiteKVStore(str(path)).close()
    other = tmp_path / "other.db"
    SQLiteKVStore(str(other)).close()
    for f in tmp_path.glob("kv.db-*"):
        f.unlink()
    path.unlink()
    with pytest.raises(KVStoreError, match="is missing, but .*kv.db.id says a store was here"):
        SQLiteKVStore(str(path))
    other.rename(path)  # another store put in its place
    with pytest.raises(KVStoreError, match="another store was put in its place"):
        SQLiteKVStore(str(path))


def test_a_store_from_before_ids_gets_one(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "kv.db"
    SQLiteKVStore(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE meta_text")
    db.commit()
    db.close()
    (tmp_path / "kv.db.id").unlink()
    s = SQLiteKVStore(str(path))
    assert not s.created and (tmp_path / "kv.db.id").exists()
    s.close()


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(KVStoreError, match="cannot open kvstore"):
        SQLiteKVStore(str(path))
