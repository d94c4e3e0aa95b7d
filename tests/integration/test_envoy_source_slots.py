"""Source-address slots on a real Envoy: a slot change reaches the next request of an open
connection and re-sends one ECDS resource, a slot Envoy does not have fails closed, and a
fromCIDR prefix spanning several slots keeps longest-prefix decisions (a pod inside it keeps its
own identity's decision, other addresses inside get the prefix's, addresses outside world's).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from xds.type.matcher.v3 import ip_pb2

from l7gate.identity.ipcache import IPCacheChange
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.testing.wait import eventually
from l7gate.xds import cache as cache_mod
from l7gate.xds import resources, source_slots
from l7gate.xds.cache import EXTENSION_CONFIG, LISTENER, ROUTE
from l7gate.xds.publisher import Publisher

from .loopback import HttpConn, World, loopback_world, request, wait_conn, wait_request

pytestmark = pytest.mark.integration

S = 74  # this module's 127.74.x.x addresses
BILLING = f"127.{S}.1.10"
BILLING_2 = f"127.{S}.1.11"
FRONTEND = f"127.{S}.2.55"
OTHER = f"127.{S}.2.60"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with loopback_world(tmp_path_factory.mktemp("l7g-slots"), S) as w:
        yield w


def versions(world: World, type_url: str) -> dict[str, str]:
    snap = world.agent.cache.get_snapshot(world.agent.config.node_id)
    assert snap is not None
    return {n: r.version for n, r in snap.resources[type_url].items()}


def wait_fresh(src: str, method: str, path: str, want: int, timeout: float = 5.0) -> int:
    return wait_request(src, BILLING, method, path, want, timeout)


def reporting_policy(path: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "slots-reporting"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "billing-service"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": "reporting-job"}}],
                "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                             "rules": {"http": [{"method": "POST", "path": path}]}}],
            }],
        },
    }


def test_slot_change_reaches_open_connection_and_sends_one_resource(world: World) -> None:
    core = world.core
    core.apply([reporting_policy("/v1/none")])  # a new policy on billing: every slot changes
    world.synced()
    conn = HttpConn(OTHER, BILLING, 8080)
    try:
        assert conn.request("POST", "/v1/charge").status == 403
        before = {t: versions(world, t) for t in (EXTENSION_CONFIG, LISTENER, ROUTE)}
        core.apply([reporting_policy("/v1/charge")])
        after = {t: versions(world, t) for t in (EXTENSION_CONFIG, LISTENER, ROUTE)}
        assert after[LISTENER] == before[LISTENER] and after[ROUTE] == before[ROUTE]
        changed = [n for n, v in after[EXTENSION_CONFIG].items() if before[EXTENSION_CONFIG].get(n) != v]
        block = source_slots.block_of(ipaddress.ip_network(OTHER))
        assert block is not None
        # one slot per billing pod (both are proxied here)
        assert sorted(changed) == sorted(core.publisher.slot_deciding(ip, 8080, block) for ip in (BILLING, BILLING_2))
        # the same connection, next requests: the new verdict
        assert wait_conn(conn, "POST", "/v1/charge", 200) == 200
        assert conn.request("POST", "/v1/refund").status == 403
        core.apply([reporting_policy("/v1/none")])
        assert wait_conn(conn, "POST", "/v1/charge", 403) == 403
    finally:
        conn.close()
        core.delete_policy("CiliumClusterwideNetworkPolicy/slots-reporting")
        world.synced()


def test_envoy_keeps_no_statistics_per_ecds_subscription(world: World) -> None:
    """The bootstrap's stats matcher (l7proxy/bootstrap.py): 130 subscriptions per proxied port
    make no counters, yet Envoy still counts what it decides."""
    world.synced()
    assert wait_fresh(OTHER, "POST", "/v1/charge", 403) == 403
    envoy = world.agent.envoy
    assert envoy is not None
    stats = envoy.admin_get("/stats").decode()
    assert "rbac.denied" in stats  # the slots' RBAC filters count their verdicts
    assert "extension_config_discovery" not in stats
    snap = world.agent.cache.get_snapshot(world.agent.config.node_id)
    assert snap is not None and len(snap.resources[EXTENSION_CONFIG]) >= 6  # 2 ports: classifier, slot, rest


def test_slot_envoy_does_not_have_fails_closed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    node = world.agent.config.node_id
    c = world.agent.cache
    block = source_slots.block_of(ipaddress.ip_network(FRONTEND))
    assert block is not None
    slot = world.core.publisher.slot_deciding(BILLING, 8080, block)
    cls_name = source_slots.classifier_name(BILLING, 8080, 0, world.core.publisher.split_of(BILLING, 8080))
    snap = c.get_snapshot(node)
    assert snap is not None
    good_slot, good_cls = snap.messages(EXTENSION_CONFIG)[slot], snap.messages(EXTENSION_CONFIG)[cls_name]
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
    # The cache refuses a classifier naming a missing slot; let one through to see what Envoy does.
    monkeypatch.setattr(cache_mod, "_extension_refs", lambda name, ext: iter(()))
    c.update(node, EXTENSION_CONFIG, {cls_name: copy.deepcopy(good_cls)})  # same bytes, no refs
    try:
        # 1. a slot removed: Envoy falls back to the slot's default config, deny-all
        c.update(node, EXTENSION_CONFIG, {}, [slot])
        assert wait_fresh(FRONTEND, "POST", "/v1/charge", 403) == 403
        assert request(f"127.{S}.3.1", BILLING, 8080, "GET", "/").status == 403  # world, via the rest
        c.update(node, EXTENSION_CONFIG, {slot: good_slot})
        assert wait_fresh(FRONTEND, "POST", "/v1/charge", 200) == 200
        # 2. a slot name Envoy never received (a new subscription): the frontend's own address
        # is sent there (longer than its block's range), and is denied until it arrives
        wrapper = extension_matcher_pb2.ExtensionWithMatcher()
        good_cls.typed_config.Unpack(wrapper)
        ipm = ip_pb2.IPMatcher()
        wrapper.xds_matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
        extra = ipm.range_matchers.add()
        extra.CopyFrom(ipm.range_matchers[0])
        del extra.ranges[:]
        extra.ranges.add(address_prefix=FRONTEND).prefix_len.value = 32
        act = composite_pb2.ExecuteFilterAction()
        extra.on_match.action.typed_config.Unpack(act)
        act.dynamic_config.name = slot + "_never_sent"
        extra.on_match.action.typed_config.Pack(act)
        wrapper.xds_matcher.matcher_tree.custom_match.typed_config.Pack(ipm)
        bad_cls = copy.deepcopy(good_cls)
        bad_cls.typed_config.Pack(wrapper)
        c.update(node, EXTENSION_CONFIG, {cls_name: bad_cls})
        assert wait_fresh(FRONTEND, "POST", "/v1/charge", 403) == 403
        # ... and for good: Envoy subscribes to a classifier's slots only while it builds the
        # listener, never to a name a classifier update brings (why a port's split is in its
        # listener, `source_slots.classifier_name`). Served now, the slot is never asked for.
        late = copy.deepcopy(good_slot)
        late.name = slot + "_never_sent"
        c.update(node, EXTENSION_CONFIG, {late.name: late})
        time.sleep(1.0)
        assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 403
        track = world.agent.xds._tracks[(node, EXTENSION_CONFIG)]
        assert track.names is not None and late.name not in track.names and slot in track.names
    finally:
        c.update(node, EXTENSION_CONFIG, {slot: good_slot, cls_name: good_cls}, [slot + "_never_sent"])
    assert wait_fresh(FRONTEND, "POST", "/v1/charge", 200) == 200
    world.synced()


def test_pod_in_a_new_block_is_decided_at_once(world: World) -> None:
    from .loopback import pod

    core = world.core
    new_ip = f"127.{S}.12.7"
    labels = {"app": "frontend-service", "team": "web", "env": "prod"}
    before = versions(world, EXTENSION_CONFIG)
    core.apply([pod("frontend-new-block", "web", new_ip, labels, "cluster-b")])
    try:
        world.synced()
        after = versions(world, EXTENSION_CONFIG)
        changed = {n for n, v in after.items() if before.get(n) != v}
        block = source_slots.block_of(ipaddress.ip_network(new_ip))
        assert block is not None
        # The classifier lists every block of 127.74.0.0/16 already: only the block's slot.
        assert changed == {core.publisher.slot_deciding(ip, 8080, block) for ip in (BILLING, BILLING_2)}
        # Every slot name was subscribed with the listener: no new subscription to wait for,
        # only the moment Envoy's worker takes the config the main thread ACKed.
        assert wait_fresh(new_ip, "POST", "/v1/charge", 200, timeout=5.0) == 200
        assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
        assert request(new_ip, BILLING, 8080, "POST", "/v1/refund").status == 403
    finally:
        core.delete_pod("cluster-b/web/frontend-new-block")
        world.synced()
    assert wait_fresh(new_ip, "POST", "/v1/charge", 403, timeout=5.0) == 403  # unknown: world
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200


def test_pod_in_a_new_group_is_decided_at_once(world: World) -> None:
    """The first pod of a /16 no pod was in: the classifier lists the group's blocks (and
    every slot decides its new blocks); the last one gone, they go back to the rest."""
    from .loopback import pod

    core = world.core
    new_ip = f"127.{S + 1}.3.9"
    labels = {"app": "frontend-service", "team": "web", "env": "prod"}
    before = versions(world, EXTENSION_CONFIG)
    core.apply([pod("frontend-new-group", "web", new_ip, labels, "cluster-b")])
    try:
        world.synced()
        after = versions(world, EXTENSION_CONFIG)
        changed = {n for n, v in after.items() if before.get(n) != v}
        assert {source_slots.classifier_name(ip, 8080, 0, core.publisher.split_of(ip, 8080))
                for ip in (BILLING, BILLING_2)} <= changed
        assert wait_fresh(new_ip, "POST", "/v1/charge", 200, timeout=5.0) == 200
        assert request(new_ip, BILLING, 8080, "POST", "/v1/refund").status == 403
        assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
    finally:
        core.delete_pod("cluster-b/web/frontend-new-group")
        world.synced()
    assert wait_fresh(new_ip, "POST", "/v1/charge", 403, timeout=5.0) == 403  # unknown: world
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200


def test_a_port_whose_slot_outgrew_its_split_moves_without_a_wrong_verdict(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot past 4x `slot_target` (made tiny here) moves the port to a new incarnation of its
    listener, split more ways, while a keep-alive connection and fresh ones probe it. Envoy
    warms the new listener until every slot has arrived (the old one serving), then drains the
    old one; its names go once Envoy no longer subscribes to them. No request meets a slot
    Envoy lacks: the allowed frontend never gets a 403 or a 500, the other pod never a 200."""
    core = world.core
    pub = core.publisher
    world.synced()
    before = pub.split_of(BILLING, 8080)
    results: list[tuple[str, int]] = []
    closed = 0
    stop = threading.Event()

    def probe() -> None:
        nonlocal closed
        conn = HttpConn(FRONTEND, BILLING, 8080)
        while not stop.is_set():
            try:
                r = conn.request("POST", "/v1/charge")
            except (ConnectionError, OSError):  # the drained listener closed it: not a verdict
                closed += 1
                conn.close()
                conn = HttpConn(FRONTEND, BILLING, 8080)
                continue
            results.append(("frontend", r.status))
            results.append(("other", request(OTHER, BILLING, 8080, "POST", "/v1/charge").status))
        conn.close()

    assert wait_fresh(FRONTEND, "POST", "/v1/charge", 200) == 200
    monkeypatch.setattr(pub, "slot_target", 128)
    t = threading.Thread(target=probe, name="l7g-probe")
    t.start()
    try:
        time.sleep(0.3)
        core.apply([reporting_policy("/v1/none")])  # every slot of billing's ports re-rendered
        deadline = time.monotonic() + 20
        while (pub.retiring or pub.split_of(BILLING, 8080) == before) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = pub.split_of(BILLING, 8080)
        assert after > before and not pub.retiring, (before, after, pub.retiring)
        world.synced()
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
        core.delete_policy("CiliumClusterwideNetworkPolicy/slots-reporting")
        world.synced()
    seen = {who: sorted({st for w, st in results if w == who}) for who in ("frontend", "other")}
    assert len(results) > 20 and seen == {"frontend": [200], "other": [403]}, (len(results), seen, closed)
    names = set(versions(world, EXTENSION_CONFIG))
    assert source_slots.classifier_name(BILLING, 8080, 0, before) not in names
    gen = pub._ports[(BILLING, 8080)].gen
    assert set(source_slots.slot_names(BILLING, 8080, gen, after)) <= names


def test_cidr_prefix_spanning_slots_on_envoy(world: World) -> None:
    """A second port, fed by its own resolver and publisher into the agent's cache."""
    node = world.agent.config.node_id
    port = 8081
    world.serve(BILLING, port, "billing-8081")
    r = Resolver()
    pub = Publisher(world.agent.cache, node, r.endpoint_policy)
    ns = "io.kubernetes.pod.namespace"
    rev = 0

    def ipc(prefix: str, old: int | None, new: int | None) -> None:
        nonlocal rev
        rev += 1
        pub.on_ipcache_change(IPCacheChange(ipaddress.ip_network(prefix), old, new, rev))

    bill, pod_in, pod_out, cidr = 70_001, 70_002, 70_003, 70_004
    pub.on_policy_delta(r.update_identities({
        bill: Labels.of({"app": "b8081", ns: "payments"}),
        pod_in: Labels.of({"app": "g0", ns: "web"}),
        pod_out: Labels.of({"app": "g0", ns: "web"}),
        cidr: Labels.of({f"cidr:127.{S}.4.0/22": ""}),
    }))
    pub.on_policy_delta(r.add_endpoint(bill))
    doc = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "b8081"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "b8081"}}, "ingress": [
            {"fromEndpoints": [{"matchLabels": {"app": "g0"}}],
             "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}], "rules": {"http": [{"method": "GET", "path": "/g0"}]}}]},
            {"fromCIDR": [f"127.{S}.4.0/22"], "toPorts": [{"ports": [{"port": str(port)}]}]},
        ]},
    }
    pub.on_policy_delta(r.upsert_policy(parse_policy(doc, cluster_name="cluster-a")))
    for prefix, ident in ((f"{BILLING}/32", bill), (f"127.{S}.5.1/32", pod_in), (f"127.{S}.9.1/32", pod_out),
                          (f"127.{S}.4.0/22", cidr)):
        ipc(prefix, None, ident)
    pub.set_ports([resources.ProxiedPort(bill, BILLING, port, BILLING, port + 10000)])
    try:
        pub.flush()
        world.synced()
        world.wait_listening(BILLING, port)
        # The prefix is broader than a block: its pod's block has a slot, the rest of it is
        # decided by the rest slot, and no slot holds it whole.
        assert source_slots.block_of(ipaddress.ip_network(f"127.{S}.4.0/22")) is None

        def status(src: str, method: str, path: str) -> int:
            return request(src, BILLING, port, method, path).status

        cases = [
            (f"127.{S}.5.1", "GET", "/g0", 200), (f"127.{S}.5.1", "POST", "/x", 403),  # its own decision
            (f"127.{S}.5.2", "POST", "/x", 200), (f"127.{S}.7.250", "DELETE", "/", 200),  # the prefix's
            (f"127.{S}.9.1", "GET", "/g0", 200), (f"127.{S}.9.1", "POST", "/x", 403),
            (f"127.{S}.8.1", "GET", "/g0", 403), (f"127.{S}.3.255", "GET", "/", 403),  # world
        ]
        for src, method, path, want in cases:
            assert status(src, method, path) == want, (src, method, path)
        # The prefix goes away: its addresses are world's, the pod inside keeps its decision.
        ipc(f"127.{S}.4.0/22", cidr, None)
        pub.flush()
        world.synced()
        wait_request(f"127.{S}.5.2", BILLING, "POST", "/x", 403, timeout=5, port=port)
        assert status(f"127.{S}.5.2", "POST", "/x") == 403
        assert status(f"127.{S}.5.1", "GET", "/g0") == 200
    finally:
        pub.set_ports([])
        pub.flush()
        world.synced()


def test_a_new_listener_warms_until_its_slots_arrive_while_the_old_one_serves(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why a move (a new listener incarnation) meets no slot Envoy lacks: a slot's
    `dynamic_config` does not apply its deny-all default without warming, so Envoy keeps the new
    listener warming until every slot it names has arrived, and the old listener serves. Here a
    port of its own moves while one slot of the new incarnation is held back from the cache."""
    node = world.agent.config.node_id
    port = 8082
    world.serve(BILLING, port, "billing-8082")
    r = Resolver()
    held_back: set[str] = set()

    class Sink:
        """The agent's cache, minus the slots held back (their references are not checked)."""

        def apply(self, node_id: str, delta: cache_mod.SnapshotDelta) -> object:
            for name in held_back:
                delta.upserted.get(EXTENSION_CONFIG, {}).pop(name, None)
            return world.agent.cache.apply(node_id, delta)

    pub = Publisher(Sink(), node, r.endpoint_policy)
    bill, peer = 70_101, 70_102
    pub.on_policy_delta(r.update_identities({bill: Labels.of({"app": "b8082", "io.kubernetes.pod.namespace": "payments"}),
                                             peer: Labels.of({"app": "frontend-service", "io.kubernetes.pod.namespace": "web"})}))
    pub.on_policy_delta(r.add_endpoint(bill))
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "b8082"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "b8082"}}, "ingress": [
               {"fromEndpoints": [{"matchLabels": {"app": "frontend-service"}}],
                "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}],
                             "rules": {"http": [{"method": "POST", "path": "/v1/charge"}]}}]}]}}
    pub.on_policy_delta(r.upsert_policy(parse_policy(doc, cluster_name="cluster-a")))
    for rev, (prefix, ident) in enumerate(((f"{BILLING}/32", bill), (f"{FRONTEND}/32", peer)), start=1):
        pub.on_ipcache_change(IPCacheChange(ipaddress.ip_network(prefix), None, ident, rev))
    lname = resources.listener_name(BILLING, port)
    pub.set_ports([resources.ProxiedPort(bill, BILLING, port, BILLING, port + 10000)])

    def listener_state() -> dict[str, Any]:
        dump = json.loads(world.agent.envoy.admin_get("/config_dump?resource=dynamic_listeners"))  # type: ignore[union-attr]
        (mine,) = [c for c in dump["configs"] if c.get("name") == lname]
        return dict(mine)

    try:
        pub.flush()
        world.synced()
        world.wait_listening(BILLING, port)
        assert request(FRONTEND, BILLING, port, "POST", "/v1/charge").status == 200
        before = pub.split_of(BILLING, port)
        # the move: a slot past SLOT_MOVE_FACTOR x a tiny target; one new slot held back
        monkeypatch.setattr(pub, "slot_target", 64)
        monkeypatch.setattr(cache_mod, "_extension_refs", lambda name, ext: iter(()))
        held_back.add(source_slots.slot_name(BILLING, port, source_slots.REST, 1,
                                             pub._want_split(pub._ports[(BILLING, port)], None)))
        pub.on_policy_delta(r.upsert_policy(parse_policy({**doc, "metadata": {"name": "b8082-2"}}, cluster_name="cluster-a")))
        pub.flush()
        after = pub.split_of(BILLING, port)
        new_cls = source_slots.classifier_name(BILLING, port, 1, after)
        assert after > before and held_back <= set(source_slots.slot_names(BILLING, port, 1, after)), (before, after)
        eventually(lambda: new_cls in json.dumps(listener_state().get("warming_state", {})), 10, "the new listener warming")
        for _ in range(10):  # the old listener serves meanwhile, with its own slots
            assert request(FRONTEND, BILLING, port, "POST", "/v1/charge").status == 200
            assert request(OTHER, BILLING, port, "POST", "/v1/charge").status == 403
            time.sleep(0.1)
        state = listener_state()
        assert "warming_state" in state and new_cls not in json.dumps(state.get("active_state", {}))
        held_back.clear()
        pub.mark_identity(bill)  # every slot rendered again, the held-back one included
        pub.flush()
        eventually(lambda: new_cls in json.dumps(listener_state().get("active_state", {}))
                   and "warming_state" not in listener_state(), 10, "the new listener active")
        assert request(FRONTEND, BILLING, port, "POST", "/v1/charge").status == 200
        assert request(OTHER, BILLING, port, "POST", "/v1/charge").status == 403
    finally:
        held_back.clear()
        pub.set_ports([])
        pub.flush()
        world.synced()
