"""xDS fan-out: one change pushed by one XdsServer to N delta clients, and push→ACK at an Envoy.

Set-up: one `SnapshotCache` whose wildcard snapshot ("*") serves every node (10 clusters, one
route configuration "r" with 10 routes); N simulated Envoys, each its own node id, each on its
own gRPC connection, open a delta ADS stream, subscribe to CDS (wildcard) and RDS ["r"], and
ACK every response, as Envoy does. The clients are grpc.aio streams on one event loop in a
second thread of this process, so they share its 2 vCPUs and the GIL with the server: the
numbers are pessimistic for the server.

Measured:
- fan-out: from `cache.update("*", RDS, {"r": changed})` to the last of the N clients receiving
  the changed route (N = 1,000; `--quick`: 50), against the same change to 1 client. Goal
  (issue 3): <= 2 s for 1,000 clients.
- push→ACK at one real Envoy (delta ADS, when the `envoy` binary is available): from
  `cache.update` of the route to the server's `on_ack` for that version.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import subprocess
import threading
import time
from typing import Any

import grpc
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
from google.protobuf import any_pb2
from run import Context, Result

from l7gate.l7proxy.bootstrap import ApiType, BootstrapConfig, TcpAddress, write_bootstrap
from l7gate.l7proxy.supervisor import admin_request
from l7gate.xds.cache import (
    CLUSTER,
    LISTENER,
    ROUTE,
    WILDCARD_NODE,
    CachedResource,
    SnapshotCache,
)
from l7gate.xds.server import XdsServer

CLUSTERS = 10
ROUTES = 10


def _packed(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _addr(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def _cluster(name: str, port: int) -> Any:
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
                            endpoint=endpoint_components_pb2.Endpoint(address=_addr(port))
                        )
                    ]
                )
            ],
        ),
    )


def _route(revision: int) -> Any:
    vh = route_components_pb2.VirtualHost(name="all", domains=["*"])
    for i in range(ROUTES):
        r = vh.routes.add(match=route_components_pb2.RouteMatch(prefix=f"/svc{i}/"))
        r.route.cluster = f"c{i % CLUSTERS}"
    # The change: a header every response carries, so each revision is new content.
    vh.response_headers_to_add.add(header={"key": "x-revision", "value": str(revision)})
    last = vh.routes.add(match=route_components_pb2.RouteMatch(prefix="/"))
    last.direct_response.status = 403
    return route_pb2.RouteConfiguration(name="r", virtual_hosts=[vh])


def _listener(port: int) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="l",
        rds=hcm_pb2.Rds(
            route_config_name="r",
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name="l",
        address=_addr(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_packed(hcm),
                    )
                ]
            )
        ],
    )


def _snapshot(listen_port: int | None = None) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {
        CLUSTER: {f"c{i}": _cluster(f"c{i}", 20000 + i) for i in range(CLUSTERS)},
        ROUTE: {"r": _route(0)},
    }
    if listen_port is not None:
        res[LISTENER] = {"l": _listener(listen_port)}
    return res


class Fleet:
    """N simulated delta clients on one asyncio loop in a background thread (not the server's)."""

    def __init__(self, address: str, n: int) -> None:
        self.address = address
        self.n = n
        self.loop = _fleet_loop()
        self.lock = threading.Lock()
        self.want: str | None = None  # the route version that counts as "the change"
        self.got: dict[int, float] = {}
        self.done = threading.Event()
        self.calls: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[Any] = []
        ready = asyncio.run_coroutine_threadsafe(self._open_all(), self.loop)
        ready.result(timeout=120)

    async def _open_all(self) -> None:
        firsts = [asyncio.get_running_loop().create_future() for _ in range(self.n)]
        for i in range(self.n):
            # A local subchannel pool gives every client its own TCP connection, like N Envoys.
            ch = grpc.aio.insecure_channel(
                self.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            self.channels.append(ch)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            call = stub.DeltaAggregatedResources()
            self.calls.append(call)
            self.tasks.append(
                asyncio.get_running_loop().create_task(self._client(i, call, firsts[i]))
            )
        await asyncio.gather(*firsts)

    async def _client(self, i: int, call: Any, first: asyncio.Future[None]) -> None:
        node = {"id": f"bench-node-{i}"}
        await call.write(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER))
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                node=node, type_url=ROUTE, resource_names_subscribe=["r"]
            )
        )
        seen_types: set[str] = set()
        try:
            async for resp in call:
                now = time.perf_counter()
                if resp.type_url == ROUTE:
                    for r in resp.resources:
                        if r.version == self.want:
                            with self.lock:
                                self.got[i] = now
                                if len(self.got) == self.n:
                                    self.done.set()
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=resp.type_url, response_nonce=resp.nonce
                    )
                )
                seen_types.add(resp.type_url)
                if not first.done() and seen_types >= {CLUSTER, ROUTE}:
                    first.set_result(None)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass

    def push_and_wait(self, cache: SnapshotCache, revision: int, timeout: float = 60.0) -> float:
        """Change the route; seconds from the update call to the last client receiving it."""
        route = _route(revision)
        version = _version_of_route(route)
        with self.lock:
            self.want, self.got = version, {}
            self.done.clear()
        start = time.perf_counter()
        cache.update(WILDCARD_NODE, ROUTE, {"r": route})
        if not self.done.wait(timeout):
            raise TimeoutError(f"only {len(self.got)} of {self.n} clients got the change")
        return max(self.got.values()) - start

    def close(self) -> None:
        async def shutdown() -> None:
            # Tasks first: cancelling a call under a pending read leaves orphaned grpc futures.
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for call in self.calls:
                call.cancel()
            await asyncio.gather(*(ch.close() for ch in self.channels))

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=60)


_loop: asyncio.AbstractEventLoop | None = None


def _fleet_loop() -> asyncio.AbstractEventLoop:
    # One loop for every fleet, never closed: grpc.aio keeps dispatching to every loop that
    # ever used it, and a closed one makes it log "Event loop is closed" (see xds/server.py).
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="fleet", daemon=True).start()
    return _loop


def _version_of_route(route: Any) -> str:
    return CachedResource.build(ROUTE, "r", route).version


def fanout(ctx: Context, n: int, runs: int) -> tuple[float, str]:
    cache = SnapshotCache()
    cache.set_snapshot(WILDCARD_NODE, _snapshot())
    server = XdsServer(cache)
    server.start()
    ctx.log(f"opening {n} delta streams")
    t0 = time.perf_counter()
    fleet = Fleet(server.address, n)
    ctx.log(f"{n} streams up in {time.perf_counter() - t0:.2f} s")
    try:
        fleet.push_and_wait(cache, 1)  # warm-up
        samples = []
        for revision in range(2, runs + 2):
            gc.collect()
            samples.append(fleet.push_and_wait(cache, revision))
        samples.sort()
    finally:
        fleet.close()
        server.stop(grace=0.5)
    med = samples[len(samples) // 2]
    return med, f"median of {runs}, min {samples[0]:.4g} s, max {samples[-1]:.4g} s"


# -- one real Envoy -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find_envoy() -> str | None:
    try:
        from l7gate.l7proxy.supervisor import find_envoy

        return str(find_envoy())
    except Exception:  # noqa: BLE001 - no Envoy: the figure is skipped, not the bench
        return None


def envoy_push_to_ack(ctx: Context, runs: int) -> tuple[float, str] | None:
    binary = _find_envoy()
    if binary is None:
        ctx.log("no envoy binary: push→ACK skipped")
        return None
    acks: dict[str, float] = {}
    acked = threading.Condition()

    def on_ack(node: str, type_url: str, version: str, latency: float) -> None:
        if type_url == ROUTE:
            with acked:
                acks[version] = time.perf_counter()
                acked.notify_all()

    cache = SnapshotCache()
    listen = _free_port()
    cache.set_snapshot("bench-envoy", _snapshot(listen))
    server = XdsServer(cache, on_ack=on_ack)
    server.start()
    assert server.port is not None
    work = ctx.scratch / "envoy"
    work.mkdir(exist_ok=True)
    boot = write_bootstrap(
        work / "bootstrap.json",
        BootstrapConfig(
            node_id="bench-envoy",
            xds=TcpAddress("127.0.0.1", server.port),
            api_type=ApiType.DELTA_GRPC,
            admin_socket=str(work / "admin.sock"),
        ),
    )
    proc = subprocess.Popen(
        [binary, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
         "--log-path", str(work / "envoy.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not server.wait_synced("bench-envoy", 20, types=(CLUSTER, LISTENER, ROUTE)):
            raise RuntimeError(f"Envoy did not sync; see {work / 'envoy.log'}")
        samples = []
        for revision in range(1, runs + 2):
            start = time.perf_counter()
            # The snapshot's only route is "r", so the RDS type version is what Envoy ACKs.
            cache_version = cache.update("bench-envoy", ROUTE, {"r": _route(revision)})
            with acked:
                if not acked.wait_for(lambda: cache_version in acks, timeout=10):
                    raise RuntimeError("no ACK from Envoy within 10 s")
                end = acks[cache_version]
            if revision > 1:  # the first is a warm-up
                samples.append(end - start)
        _check_served(f"unix:{work / 'admin.sock'}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        server.stop(grace=0.2)
    samples.sort()
    return (
        samples[len(samples) // 2],
        f"median of {runs}, min {samples[0]:.4g} s, max {samples[-1]:.4g} s",
    )


def _check_served(admin: str) -> None:
    # A sanity check that the ACKed routes are really in Envoy, not just acknowledged.
    code, body = admin_request(admin, "GET", "/config_dump?resource=dynamic_route_configs")
    doc = json.loads(body) if code == 200 else {}
    if not doc.get("configs"):
        raise RuntimeError("Envoy's config dump has no dynamic route configs")


def run(ctx: Context) -> list[Result]:
    n = 50 if ctx.quick else 1_000
    runs = 3 if ctx.quick else 5
    one, one_notes = fanout(ctx, 1, runs=runs * 3)
    many, many_notes = fanout(ctx, n, runs=runs)
    results = [
        Result(
            name=f"one route change fanned out to {n} delta clients (update → last receipt)",
            value=many,
            unit="s",
            baseline_name="the same change to 1 client",
            baseline_value=one,
            goal="<= 2 s for 1,000 clients" if n == 1_000 else f"<= {2 * n / 1000:.2g} s "
            f"for {n} clients (2 s per 1,000, pro rata)",
            goal_met=many <= 2.0 * n / 1000,
            notes=f"{many_notes}; baseline {one_notes}; clients share this process and its GIL",
        )
    ]
    ack = envoy_push_to_ack(ctx, runs=11 if not ctx.quick else 5)
    if ack is not None:
        results.append(
            Result(
                name=f"push→ACK at one real Envoy (delta, {ROUTES + 1}-route configuration)",
                value=ack[0],
                unit="s",
                notes=ack[1],
            )
        )
    return results
