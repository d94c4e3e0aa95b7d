"""Reserved identities, cluster ranges and the kvstore-backed allocator."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.identity import (
    LOCAL_IDENTITY_FLAG,
    RESERVED,
    WORLD,
    Identity,
    IdentityAllocator,
    IdentityError,
    allocation_range,
    cidr_labels,
    cluster_of,
    decode_labels,
    encode_labels,
    reserved_for_labels,
    reserved_identity,
)
from l7gate.identity.filter import node_labels
from l7gate.kvstore import SQLiteKVStore
from l7gate.policy.labels import Labels
from l7gate.policy.selector import CIDRSelector, Entity, EntitySelector
from l7gate.testing.clock import ManualClock



@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "identities.db")


@pytest.fixture
def store(db_path: str) -> Iterator[SQLiteKVStore]:
    with SQLiteKVStore(db_path) as s:
        yield s


def app(name: str, **extra: str) -> Labels:
    return Labels.of({"app": name, "io.kubernetes.pod.namespace": "default", **extra})


# -- reserved identities and ranges -------------------------------------------------------------


def test_reserved_numbers_follow_cilium() -> None:
    names = {n: i.labels for n, i in RESERVED.items()}
    assert sorted(names) == list(range(1, 11))
    expected = [
        "host", "world", "unmanaged", "health", "init",
        "remote-node", "kube-apiserver", "ingress", "world-ipv4", "world-ipv6",
    ]  # fmt: skip
    for number, name in enumerate(expected, start=1):
        assert f"reserved:{name}" in names[number]
        assert reserved_identity(name).id == number
    with pytest.raises(IdentityError):
        reserved_identity("nope")


def test_policy_world_entity_selects_2_9_10_and_cidrs() -> None:
    world = EntitySelector(Entity.WORLD)
    assert sorted(n for n, i in RESERVED.items() if world.matches(i.labels)) == [2, 9, 10]
    assert world.matches(cidr_labels("10.0.0.0/8"))
    assert world.matches(cidr_labels("2001:db8::/32"))
    assert not world.matches(app("x"))
    # 0.0.0.0/0 is IPv4 world: not the IPv6 one
    v4_all = CIDRSelector(ipaddress.ip_network("0.0.0.0/0"))
    assert sorted(n for n, i in RESERVED.items() if v4_all.matches(i.labels)) == [2, 9]


def test_policy_cidr_selectors_select_allocated_cidr_identities(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store)
    inner = alloc.allocate_cidr("10.1.0.0/16")
    outer = alloc.allocate_cidr("10.0.0.0/8")
    v6 = alloc.allocate_cidr("2001:db8:1::/48")
    sel = CIDRSelector(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.2.0.0/16"),))
    assert sel.matches(inner.labels) and sel.matches(outer.labels) and not sel.matches(v6.labels)
    assert CIDRSelector(ipaddress.ip_network("2001:db8::/32")).matches(v6.labels)
    assert not CIDRSelector(ipaddress.ip_network("10.1.0.0/16")).matches(outer.labels)


def test_reserved_for_labels_is_exact() -> None:
    assert reserved_for_labels(Labels.of({"reserved:host": ""})) == RESERVED[1]
    assert reserved_for_labels(Labels.of({"reserved:world": ""})) == RESERVED[2]
    assert reserved_for_labels(Labels.of({"reserved:host": "", "app": "x"})) is None


def test_allocation_ranges() -> None:
    assert allocation_range(0) == range(256, 65536)
    assert allocation_range(1) == range(65536, 131072)
    assert allocation_range(255) == range(255 << 16, 1 << 24)
    for bad in (-1, 256, True):
        with pytest.raises(IdentityError):
            allocation_range(bad)


def test_cluster_of_boundaries() -> None:
    assert cluster_of(1) is None and cluster_of(255) is None
    assert cluster_of(256) == 0 and cluster_of(65535) == 0
    assert cluster_of(65536) == 1 and cluster_of(131071) == 1 and cluster_of(131072) == 2
    assert cluster_of((255 << 16) | 0xFFFF) == 255
    assert cluster_of(LOCAL_IDENTITY_FLAG | 1) is None
    assert cluster_of((2 << 24) + 7) is None  # another node's identity: node-local as well
    for bad in (0, -5, (3 << 24) + 7):
        with pytest.raises(IdentityError):
            cluster_of(bad)


@given(st.integers(0, 255), st.integers(0, 0xFFFF))
def test_every_number_of_a_range_belongs_to_its_cluster(cluster: int, offset: int) -> None:
    numbers = allocation_range(cluster)
    if offset < len(numbers):
        assert cluster_of(numbers[offset]) == cluster


# -- canonical label encoding -----------------------------------------------------------------


@given(st.dictionaries(st.text(min_size=1).filter(lambda k: ":" not in k), st.text(), max_size=6))
def test_label_encoding_round_trips(pairs: dict[str, str]) -> None:
    labels = Labels.of(pairs)
    assert decode_labels(encode_labels(labels)) == labels


def test_label_encoding_is_unambiguous() -> None:
    a = Labels.of({"a": "b;c=d"})
    b = Labels.of({"a": "b", "c": "d"})
    assert encode_labels(a) != encode_labels(b)
    with pytest.raises(IdentityError):
        decode_labels("no-equals-sign")


# -- allocation ---------------------------------------------------------------------------------


def test_first_numbers_and_stability(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store)
    a = alloc.allocate(app("a"))
    b = alloc.allocate(app("b"))
    assert (a.id, b.id) == (256, 257)
    assert alloc.allocate(app("a")).id == 256
    assert alloc.allocate({"app": "a", "k8s:io.kubernetes.pod.namespace": "default"}) == a


@pytest.mark.parametrize("cluster", [1, 2, 255])
def test_cluster_allocates_inside_its_range(store: SQLiteKVStore, cluster: int) -> None:
    alloc = IdentityAllocator(store, cluster_id=cluster)
    ids = [alloc.allocate(app(f"x{i}")).id for i in range(3)]
    assert ids == [cluster << 16, (cluster << 16) + 1, (cluster << 16) + 2]
    assert {cluster_of(i) for i in ids} == {cluster}


def test_same_labels_keep_their_number_across_restart(db_path: str) -> None:
    with SQLiteKVStore(db_path) as s:
        alloc = IdentityAllocator(s, cluster_id=3)
        before = {name: alloc.allocate(app(name)).id for name in ["a", "b", "c"]}
        cidr = alloc.allocate_cidr("192.0.2.0/24").id
    with SQLiteKVStore(db_path) as s:
        alloc = IdentityAllocator(s, cluster_id=3)
        # reversed order: numbers come from the store, not from allocation order
        after = {name: alloc.allocate(app(name)).id for name in ["c", "b", "a"]}
        assert after == before
        assert alloc.allocate_cidr("192.0.2.0/24").id == cidr
        assert alloc.allocate(app("d")).id == max(before.values()) + 1


@pytest.mark.parametrize("round_", range(4))
def test_racing_allocators_on_one_file_never_share_a_number(db_path: str, round_: int) -> None:
    stores = [SQLiteKVStore(db_path) for _ in range(3)]
    allocators = [IdentityAllocator(s, cluster_id=7, owner=f"node{i}") for i, s in enumerate(stores)]
    label_sets = [app(f"svc{i}") for i in range(40)]
    results: list[tuple[Labels, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(w: int) -> None:
        alloc = allocators[w % 3]
        barrier.wait()
        order = label_sets[w:] + label_sets[:w]  # overlapping sets, different orders
        for labels in order:
            number = alloc.allocate(labels).id
            with lock:
                results.append((labels, number))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    by_labels: dict[Labels, set[int]] = {}
    for labels, number in results:
        by_labels.setdefault(labels, set()).add(number)
    assert all(len(numbers) == 1 for numbers in by_labels.values()), by_labels
    numbers = [next(iter(n)) for n in by_labels.values()]
    assert len(set(numbers)) == len(label_sets)
    assert all(cluster_of(n) == 7 for n in numbers)
    # the store agrees with what the callers were told
    for labels, (number,) in by_labels.items():
        found = allocators[0].lookup_by_labels(labels)
        assert found is not None and found.id == number
    assert len([i for i in allocators[0].all() if not i.reserved]) == len(label_sets)
    for s in stores:
        s.close()


def test_reserved_and_invalid_labels(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store)
    assert alloc.allocate(Labels.of({"reserved:world": ""})).id == WORLD
    assert alloc.release(WORLD) is False
    with pytest.raises(IdentityError):
        alloc.allocate(Labels())
    with pytest.raises(IdentityError, match="reserved"):
        alloc.allocate(Labels.of({"reserved:host": "", "app": "evil"}))
    with pytest.raises(IdentityError):
        alloc.allocate(Labels.of({"cidr:10.0.0.0/8": "", "app": "x"}))
    with pytest.raises(IdentityError):
        IdentityAllocator(store, cluster_id=256)
    with pytest.raises(IdentityError):
        IdentityAllocator(store, owner="a/b")


def test_lookups_and_all(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store, cluster_id=1)
    a = alloc.allocate(app("a"))
    c = alloc.allocate_cidr("10.0.0.0/8")
    assert alloc.lookup_by_id(a.id) == a
    assert alloc.lookup_by_id(c.id) == c
    assert alloc.lookup_by_id(2) == RESERVED[2]
    assert alloc.lookup_by_id(a.id + 1) is None
    assert alloc.lookup_by_labels(app("a")) == a
    assert alloc.lookup_by_labels(app("zzz")) is None
    assert alloc.lookup_by_labels(Labels.of({"reserved:host": ""})) == RESERVED[1]
    everything = alloc.all()
    assert [i.id for i in everything] == sorted(i.id for i in everything)
    assert [i.id for i in everything] == list(range(1, 11)) + [a.id, c.id]
    # a lookup does not allocate
    assert alloc.lookup_by_labels(app("zzz")) is None


def test_other_nodes_get_numbers_in_the_remote_node_scope(db_path: str) -> None:
    """Another node's labels (Cilium's node selector labels) get a node-local number with the
    2<<24 flag, kept across a restart; a node label set with anything else is refused."""
    ingress = node_labels({"role": "ingress"}, cluster="c1", local=False)
    with SQLiteKVStore(db_path) as s:
        alloc = IdentityAllocator(s, cluster_id=1, owner="n1")
        n = alloc.allocate(ingress)
        assert n.id == (2 << 24) + 1 and n.local and cluster_of(n.id) is None
        assert alloc.allocate(node_labels({"role": "worker"}, cluster="c1", local=False)).id == (2 << 24) + 2
        assert alloc.lookup_by_id(n.id) == n and alloc.lookup_by_labels(ingress) == n
        # the CIDR scope is its own
        assert alloc.allocate_cidr("10.0.0.0/8").id == LOCAL_IDENTITY_FLAG + 1
    with SQLiteKVStore(db_path) as s:
        alloc = IdentityAllocator(s, cluster_id=1, owner="n1")
        assert alloc.allocate(ingress).id == n.id
        assert alloc.release(n.id) is True
        assert alloc.lookup_by_id(n.id) is None  # node-local: its last release deletes it
        with pytest.raises(IdentityError, match="reserved"):
            alloc.allocate(Labels.of({**dict(ingress), "app": "evil"}))
        with pytest.raises(IdentityError, match="reserved"):  # this node's labels are `host` (1) itself
            alloc.allocate(node_labels({"role": "x"}, cluster="c1", local=True))


def test_wraps_to_the_start_of_the_range(store: SQLiteKVStore) -> None:
    top = allocation_range(0)[-1]
    store.put(f"l7gate/identities/v1/id/{top}", encode_labels(app("top")).encode())
    alloc = IdentityAllocator(store)
    assert alloc.allocate(app("next")).id == 256
    assert alloc.allocate(app("after")).id == 257


@pytest.mark.slow
def test_exhausted_range_is_an_error(tmp_path: Path) -> None:
    with SQLiteKVStore(str(tmp_path / "full.db"), durable=False) as s:
        numbers = allocation_range(0)
        # one transaction for the 65,279 keys: a commit per put made this test take 12 s
        s.put_many((f"l7gate/identities/v1/id/{n}", b"app=x") for n in numbers[1:])
        alloc = IdentityAllocator(s)
        assert alloc.allocate(app("last")).id == numbers[0]
        with pytest.raises(IdentityError, match="exhausted"):
            alloc.allocate(app("one-too-many"))


# -- references, release, garbage collection ----------------------------------------------------


def test_release_counts_references_and_gc_collects(store: SQLiteKVStore) -> None:
    a_node = IdentityAllocator(store, owner="a")
    b_node = IdentityAllocator(store, owner="b")
    shared = a_node.allocate(app("shared"))
    assert b_node.allocate(app("shared")) == shared
    a_node.allocate(app("shared"))
    assert a_node.held() == {shared.id: 2}

    assert a_node.release(shared) is False
    assert a_node.release(shared) is True
    assert a_node.gc() == []  # node b still references it
    assert b_node.release(shared.id) is True
    assert a_node.gc() == [shared.id]
    assert a_node.lookup_by_id(shared.id) is None
    assert a_node.lookup_by_labels(app("shared")) is None
    with pytest.raises(IdentityError, match="not held"):
        a_node.release(shared)
    # a freed number is not handed out again right away
    assert a_node.allocate(app("shared")).id != shared.id


def test_refs_on_a_lease_vanish_with_the_node(db_path: str) -> None:
    clock = ManualClock(start=0.0)
    with SQLiteKVStore(db_path, clock=clock) as s:
        lease = s.grant_lease(30)
        node = IdentityAllocator(s, owner="n1", lease=lease)
        ident = node.allocate(app("x"))
        collector = IdentityAllocator(s, owner="operator")
        assert collector.gc() == []
        clock.now += 31  # node n1 stopped renewing its lease
        assert collector.gc() == [ident.id]


def test_drop_stale_refs_after_restart(db_path: str) -> None:
    with SQLiteKVStore(db_path) as s:
        old = IdentityAllocator(s, owner="n1")
        kept, gone = old.allocate(app("kept")), old.allocate(app("gone"))
    with SQLiteKVStore(db_path) as s:
        new = IdentityAllocator(s, owner="n1")
        assert new.gc() == []  # the previous run's references still pin both
        assert new.allocate(app("kept")) == kept
        assert new.drop_stale_refs() == [gone.id]
        assert new.gc() == [gone.id]
        assert new.lookup_by_id(kept.id) == kept


def test_heals_an_index_entry_whose_number_was_collected(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store)
    ident = alloc.allocate(app("a"))
    store.delete(f"l7gate/identities/v1/id/{ident.id}")  # e.g. GC raced with this node
    again = IdentityAllocator(store, owner="other").allocate(app("a"))
    assert again == ident
    assert alloc.lookup_by_id(ident.id) == ident


def test_stale_index_entry_never_yields_someone_elses_number(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store)
    taken = alloc.allocate(app("owner"))
    # an index entry claiming that another label set has the same number
    store.put(f"l7gate/identities/v1/value/{encode_labels(app('intruder'))}", str(taken.id).encode())
    assert alloc.lookup_by_labels(app("intruder")) is None
    got = alloc.allocate(app("intruder"))
    assert got.id != taken.id
    assert alloc.lookup_by_id(taken.id) == taken


# -- CIDR (local) identities --------------------------------------------------------------------


def test_cidr_identities_are_local(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store, cluster_id=4, owner="n1")
    net = alloc.allocate_cidr("10.0.0.0/8")
    assert net.id == LOCAL_IDENTITY_FLAG | 1 and net.local and net.cluster is None
    assert net.labels == Labels.of({"cidr:10.0.0.0/8": "", "reserved:world": ""})
    assert alloc.allocate_cidr("10.0.0.0/8") == net
    v6 = alloc.allocate_cidr("2001:0db8:0::/32")
    assert alloc.allocate_cidr("2001:db8::/32") == v6
    assert "cidr:2001:db8::/32" in v6.labels
    # another node numbers its CIDRs independently
    other = IdentityAllocator(store, cluster_id=4, owner="n2")
    assert other.allocate_cidr("192.168.0.0/16").id == LOCAL_IDENTITY_FLAG | 1
    assert other.lookup_by_id(net.id) != net
    with pytest.raises(IdentityError, match="invalid"):
        alloc.allocate_cidr("10.0.0.1/8")


def test_last_release_of_a_cidr_identity_deletes_it(store: SQLiteKVStore) -> None:
    alloc = IdentityAllocator(store)
    net = alloc.allocate_cidr("198.51.100.0/24")
    alloc.allocate_cidr("198.51.100.0/24")
    assert alloc.release(net) is False
    assert alloc.lookup_by_id(net.id) == net
    assert alloc.release(net) is True
    assert alloc.lookup_by_id(net.id) is None
    assert alloc.lookup_by_labels(net.labels) is None


def test_gc_drops_unheld_local_identities(db_path: str) -> None:
    with SQLiteKVStore(db_path) as s:
        IdentityAllocator(s).allocate_cidr("203.0.113.0/24")
    with SQLiteKVStore(db_path) as s:
        alloc = IdentityAllocator(s)
        kept = alloc.allocate_cidr("192.0.2.0/24")
        assert [i.id for i in alloc.all() if i.local] == [LOCAL_IDENTITY_FLAG | 1, kept.id]
        assert alloc.gc() == [LOCAL_IDENTITY_FLAG | 1]
        assert [i for i in alloc.all() if i.local] == [kept]


def test_identity_value() -> None:
    ident = Identity(65536 + 5, app("x"))
    assert ident.cluster == 1 and not ident.reserved and not ident.local
    assert RESERVED[2].reserved and RESERVED[2].cluster is None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=25))
def test_allocate_release_sequences_keep_numbers_unique(names: list[str]) -> None:
    with SQLiteKVStore(":memory:") as s:
        alloc = IdentityAllocator(s)
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            ident = alloc.allocate(app(name))
            stored = alloc.lookup_by_id(ident.id)  # the store agrees, fast path or not
            assert stored is not None and stored.labels == app(name)
            if name in seen:
                assert ident.id == seen[name]
            seen[name] = ident.id
            if i % 3 == 2:
                alloc.release(ident)
                if ident.id not in alloc.held():
                    assert alloc.gc() == [ident.id]
                    seen.pop(name)
        numbers = [i.id for i in alloc.all() if not i.reserved]
        assert len(numbers) == len(set(numbers))
        assert sorted(numbers) == sorted(seen.values())
