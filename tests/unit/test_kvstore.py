"""The SQLite kvstore's own behaviour, on a real SQLite file: durability, several instances on one
file, history trimming, exact lease expiry on a fake clock, file identity.

The contract both backends share (SQLite and etcd) is tests/integration/test_kvstore_contract.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.kvstore import Event, EventType, KVStoreError, SQLiteKVStore, Watch
from l7gate.kvstore.sqlite import prefix_end
from l7gate.testing.clock import ManualClock



@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def store(db_path: str, clock: ManualClock) -> Iterator[SQLiteKVStore]:
    with SQLiteKVStore(db_path, clock=clock, poll_interval=0.01) as s:
        yield s


def drain(watch: Watch) -> list[Event]:
    events = []
    while (event := watch.get(timeout=0)) is not None:
        events.append(event)
    return events


def test_prefix_end() -> None:
    assert prefix_end("a/") == "a0"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\U0010ffff") is None
    assert prefix_end("\ud7ff") == "\ue000"


def test_durable_across_reopen(db_path: str, clock: ManualClock) -> None:
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


def test_compaction_drops_its_own_revision(db_path: str) -> None:
    """SQLite's compact(r) drops r too (etcd's keeps r: the shared suite tests the common part)."""
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


def test_lease_expiry_is_exact(store: SQLiteKVStore, clock: ManualClock) -> None:
    """Not a moment early or late: every read reaps first (etcd's leader reaps within ~0.5 s)."""
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


def test_leases_survive_reopen_with_a_full_ttl(db_path: str) -> None:
    with SQLiteKVStore(db_path, clock=ManualClock(1_000_000.0)) as s:
        lease = s.grant_lease(30)
        s.put("l", b"v", lease=lease)
    # a new process: its monotonic clock has another origin
    clock = ManualClock(5.0)
    with SQLiteKVStore(db_path, clock=clock) as s:
        assert s.get("l") == b"v"
        clock.advance(29)
        assert s.keepalive(lease) == 30
        clock.advance(30)
        assert s.get("l") is None


def test_an_unopenable_file_is_a_kvstore_error(tmp_path: Path) -> None:
    with pytest.raises(KVStoreError, match="cannot open kvstore"):
        SQLiteKVStore(str(tmp_path / "missing-dir" / "x.db"))


def test_memory_store_works(clock: ManualClock) -> None:
    with SQLiteKVStore(":memory:", clock=clock) as s:
        s.put("m", b"1")
        assert s.get("m") == b"1"


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


_KEYS = st.sampled_from([f"k/{i}" for i in range(6)])
_ITEMS = st.lists(st.tuples(_KEYS, st.binary(max_size=4)), max_size=12)


def _tables(s: SQLiteKVStore) -> tuple[list[object], list[object], list[object]]:
    db = s._db  # the raw rows: put_many must leave exactly what one put after another leaves
    return (db.execute("SELECT * FROM kv ORDER BY key").fetchall(),
            db.execute("SELECT * FROM events ORDER BY revision").fetchall(),
            db.execute("SELECT * FROM meta ORDER BY name").fetchall())


@settings(max_examples=60, deadline=None)
@given(before=_ITEMS, many=_ITEMS, after=_ITEMS, in_batch=st.booleans(), lease=st.booleans())
def test_put_many_writes_what_one_put_after_another_writes(
    before: list[tuple[str, bytes]], many: list[tuple[str, bytes]], after: list[tuple[str, bytes]],
    in_batch: bool, lease: bool,
) -> None:
    """Same rows, revisions, events (and so watches), history trimming and lease as `put` one
    by one, inside a batch or not; keys repeated within the call: the last one wins."""
    stores = [SQLiteKVStore(":memory:", history=5, clock=ManualClock(start=1000.0)) for _ in range(2)]
    revs = []
    for bulk, s in zip((False, True), stores):
        for k, v in before:
            s.put(k, v)
        lid = s.grant_lease(60.0) if lease else None
        with s.batch() if in_batch else contextlib.nullcontext():
            if bulk:
                rev = s.put_many(many, lease=lid)
            else:
                rev = 0
                for k, v in many:
                    rev = s.put(k, v, lease=lid)
            for k, v in after:
                s.put(k, v)
        revs.append((rev, s.revision))
    assert revs[0] == revs[1]
    assert _tables(stores[0]) == _tables(stores[1])
    for s in stores:
        s.close()


def test_put_many_refuses_a_bad_key_and_writes_nothing(store: SQLiteKVStore) -> None:
    store.put("a", b"1")
    rev = store.revision
    with pytest.raises(KVStoreError):
        store.put_many([("b", b"2"), ("", b"3")])
    with pytest.raises(KVStoreError, match="lease"):
        store.put_many([("b", b"2")], lease=12345)
    assert store.revision == rev and store.get("b") is None


@pytest.mark.parametrize("n", [1, 6, 300, 600])
def test_put_many_trims_the_history_as_puts_do(n: int) -> None:
    """Across a multiple of the trimming period: the same events kept, the same compaction
    point (the period is 256 revisions; 250 are written first)."""
    stores = [SQLiteKVStore(":memory:", history=5) for _ in range(2)]
    items = [(f"t/{i % 7}", str(i).encode()) for i in range(n)]
    for bulk, s in zip((False, True), stores):
        s.put_many([(f"p/{i}", b"") for i in range(250)]) if bulk else [s.put(f"p/{i}", b"") for i in range(250)]
        if bulk:
            s.put_many(items)
        else:
            for k, v in items:
                s.put(k, v)
    tables = [_tables(s) for s in stores]
    compacted = [dict(t[2])["compacted"] for t in tables]
    assert tables[0][0] == tables[1][0] and stores[0].revision == stores[1].revision
    # one put after another trims at each multiple it reaches; one put_many once, at its end,
    # to the last `history` events: never less trimmed, never a kept event that differs
    assert compacted[1] >= compacted[0]
    assert (compacted[1] > 0) == (250 + n >= 256)
    assert set(tables[1][1]) <= set(tables[0][1])
    assert [r[0] for r in tables[1][1]][-5:] == list(range(stores[1].revision - 4, stores[1].revision + 1))
    if compacted[1]:
        assert min(r[0] for r in tables[1][1]) == compacted[1] + 1
    for s in stores:
        s.close()
