"""The ipcache: longest-prefix match, world for unknown addresses, ordered change events."""

from __future__ import annotations

import ipaddress
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.identity import WORLD, IdentityError, IPCache, IPCacheChange
from l7gate.identity.ipcache import IPNetwork


def test_unknown_addresses_are_world() -> None:
    cache = IPCache()
    assert cache.lookup("10.1.2.3") == WORLD
    assert cache.lookup("2001:db8::1") == WORLD
    assert cache.lookup_entry("10.1.2.3") is None


def test_longest_prefix_wins() -> None:
    cache = IPCache()
    cache.upsert("10.0.0.0/8", 1000)
    cache.upsert("10.1.0.0/16", 1001)
    cache.upsert("10.1.2.3", 1002)  # a bare address is a host prefix
    assert cache.lookup("10.1.2.3") == 1002
    assert cache.lookup("10.1.2.4") == 1001
    assert cache.lookup("10.2.0.1") == 1000
    assert cache.lookup("11.0.0.1") == WORLD
    entry = cache.lookup_entry("10.1.9.9")
    assert entry is not None and str(entry.prefix) == "10.1.0.0/16" and entry.identity == 1001
    cache.delete("10.1.0.0/16")
    assert cache.lookup("10.1.2.4") == 1000


def test_ipv6_and_mapped_ipv4() -> None:
    cache = IPCache()
    cache.upsert("2001:db8::/32", 300)
    cache.upsert("2001:db8::42/128", 301)
    cache.upsert("192.0.2.7", 302)
    assert cache.lookup("2001:db8::42") == 301
    assert cache.lookup("2001:db8:1::1") == 300
    assert cache.lookup("::ffff:192.0.2.7") == 302
    # families never mix: 0.0.0.0/0 does not cover IPv6
    cache.upsert("0.0.0.0/0", 303)
    assert cache.lookup("2001:db9::1") == WORLD
    assert cache.lookup("8.8.8.8") == 303


def test_upsert_and_delete_report_changes() -> None:
    cache = IPCache()
    assert cache.upsert("10.0.0.1", 500) is True
    assert cache.upsert("10.0.0.1/32", 500) is False
    assert cache.upsert("10.0.0.1", 501) is True
    assert cache.get("10.0.0.1") == 501
    assert cache.delete("10.0.0.1") is True
    assert cache.delete("10.0.0.1") is False
    assert cache.revision == 3


def test_invalid_input() -> None:
    cache = IPCache()
    for bad in ["10.0.0.1/8", "not-an-ip", "10.0.0.0/33", ""]:
        with pytest.raises(IdentityError):
            cache.upsert(bad, 500)
    with pytest.raises(IdentityError):
        cache.upsert("10.0.0.0/8", 0)
    with pytest.raises(IdentityError):
        cache.lookup("10.0.0.0/8")


def test_snapshot_is_sorted_and_reverse_index() -> None:
    cache = IPCache()
    for prefix, ident in [
        ("2001:db8::/32", 7),
        ("10.0.0.2", 600),
        ("10.0.0.0/8", 7),
        ("9.0.0.0/8", 600),
        ("10.0.0.0/16", 601),
    ]:
        cache.upsert(prefix, ident)
    assert [str(e.prefix) for e in cache.snapshot()] == [
        "9.0.0.0/8",
        "10.0.0.0/8",
        "10.0.0.0/16",
        "10.0.0.2/32",
        "2001:db8::/32",
    ]
    assert [str(p) for p in cache.prefixes_of(600)] == ["9.0.0.0/8", "10.0.0.2/32"]
    cache.upsert("10.0.0.2", 601)
    assert [str(p) for p in cache.prefixes_of(600)] == ["9.0.0.0/8"]
    cache.delete("9.0.0.0/8")
    assert cache.prefixes_of(600) == ()
    assert len(cache) == 4 and list(cache) == list(cache.snapshot())


def test_listeners_see_every_change_in_order() -> None:
    cache = IPCache()
    cache.upsert("10.0.0.1", 500)
    seen: list[IPCacheChange] = []
    unsubscribe = cache.subscribe(seen.append, replay=True)
    cache.upsert("10.0.0.1", 501)
    cache.upsert("10.0.0.1", 501)  # no change, no event
    cache.delete("10.0.0.1")
    unsubscribe()
    cache.upsert("10.0.0.9", 502)
    assert [(str(c.prefix), c.old, c.new) for c in seen] == [
        ("10.0.0.1/32", None, 500),
        ("10.0.0.1/32", 500, 501),
        ("10.0.0.1/32", 501, None),
    ]
    assert [c.revision for c in seen[1:]] == [2, 3]


def test_a_replaying_mirror_stays_identical_under_concurrent_writes() -> None:
    cache = IPCache()
    mirror: dict[IPNetwork, int] = {}

    def apply(change: IPCacheChange) -> None:
        if change.new is None:
            del mirror[change.prefix]
        else:
            mirror[change.prefix] = change.new

    def writer(base: int) -> None:
        for i in range(200):
            prefix = f"10.{base}.{i % 50}.0/24"
            if i % 3 == 2:
                cache.delete(prefix)
            else:
                cache.upsert(prefix, 1000 + i)

    threads = [threading.Thread(target=writer, args=(b,)) for b in range(4)]
    threads[0].start()
    cache.subscribe(apply, replay=True)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert mirror == {e.prefix: e.identity for e in cache.snapshot()}


# -- property: the LPM agrees with a brute-force search ----------------------------------------


def _v4_prefixes() -> st.SearchStrategy[IPNetwork]:
    # a narrow address space so that generated prefixes overlap and nest
    return st.builds(
        lambda addr, length: ipaddress.ip_network((addr << 24 | addr, length), strict=False),
        st.integers(0, 3),
        st.integers(0, 32),
    )


def _v6_prefixes() -> st.SearchStrategy[IPNetwork]:
    return st.builds(
        lambda addr, length: ipaddress.ip_network((addr << 120 | addr, length), strict=False),
        st.integers(0, 3),
        st.sampled_from([0, 1, 8, 64, 120, 126, 127, 128]),
    )


def _brute_force(entries: dict[IPNetwork, int], address: str) -> int:
    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # the cache looks up a dual-stack socket's ::ffff:a.b.c.d as IPv4
    best: tuple[int, int] | None = None
    for net, ident in entries.items():
        if net.version == addr.version and addr in net:
            if best is None or net.prefixlen > best[0]:
                best = (net.prefixlen, ident)
    return WORLD if best is None else best[1]


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.one_of(_v4_prefixes(), _v6_prefixes()), st.integers(256, 260)),
        max_size=40,
    ),
    probes=st.lists(
        st.one_of(
            st.integers(0, 3).map(lambda a: str(ipaddress.IPv4Address(a << 24 | a))),
            st.integers(0, 2**32 - 1).map(lambda a: str(ipaddress.IPv4Address(a))),
            st.integers(0, 3).map(lambda a: str(ipaddress.IPv6Address(a << 120 | a))),
            st.integers(0, 2**128 - 1).map(lambda a: str(ipaddress.IPv6Address(a))),
            st.integers(0, 2**32 - 1).map(lambda a: f"::ffff:{ipaddress.IPv4Address(a)}"),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_lookup_matches_brute_force(
    ops: list[tuple[bool, IPNetwork, int]], probes: list[str]
) -> None:
    cache = IPCache()
    model: dict[IPNetwork, int] = {}
    for is_upsert, net, ident in ops:
        if is_upsert:
            assert cache.upsert(net, ident) == (model.get(net) != ident)
            model[net] = ident
        else:
            assert cache.delete(net) == (net in model)
            model.pop(net, None)
    for address in probes:
        assert cache.lookup(address) == _brute_force(model, address)
    assert [(e.prefix, e.identity) for e in cache.snapshot()] == sorted(
        model.items(), key=lambda kv: (kv[0].version, int(kv[0].network_address), kv[0].prefixlen)
    )
