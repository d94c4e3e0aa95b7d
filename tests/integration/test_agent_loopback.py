"""The seed's rules enforced by the L7 proxy the agent configures (loopback mode): a real Envoy,
and the h11 engine (`proxy.engine: h11`) on the same tests, so both engines are held to the same
answers. Tests of Envoy's own machinery (xDS, NACKs, its crash) run on Envoy only."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from l7gate.agent import views
from l7gate.cli import main as cli_main
from l7gate.client import AdminClient, AdminError
from l7gate.k8s.objects import CLUSTER_ANNOTATION
from l7gate.agent.core import ApplyError
from l7gate.observe.flow import POLICY_DENIED_L7, Verdict
from l7gate.xds.cache import LISTENER as LISTENER_TYPE
from l7gate.xds.cache import ROUTE as ROUTE_TYPE
from l7gate.testing.wait import eventually
from l7gate.xds.server import XdsServer

from .loopback import HttpConn, World, loopback_world, request, seed_policies, wait_conn, wait_request

pytestmark = pytest.mark.integration

S = 61  # this module's 127.61.x.x addresses
BILLING = f"127.{S}.1.10"
BILLING2 = f"127.{S}.1.11"
FRONTEND = f"127.{S}.2.55"
OTHER = f"127.{S}.2.60"


@pytest.fixture(scope="module", params=["envoy", "h11"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          require_envoy: None) -> Iterator[World]:
    with loopback_world(tmp_path_factory.mktemp("l7g-loop"), S, proxy_engine=request.param) as w:
        yield w


# Tests of Envoy's own machinery (xDS, NACKs, its process): the h11 engine has none.
envoy_only = pytest.mark.parametrize("world", ["envoy"], indirect=True)


@pytest.mark.parametrize(
    "src, method, path, status",
    [
        (FRONTEND, "POST", "/v1/charge", 200),
        (FRONTEND, "GET", "/v1/transactions", 403),
        (FRONTEND, "POST", "/v1/refund", 403),
        (OTHER, "POST", "/v1/charge", 403),
        # spellings that must not bypass the rule
        (FRONTEND, "POST", "/v1//refund", 403),
        (FRONTEND, "POST", "/v1/%72efund", 403),
        (FRONTEND, "POST", "/v1/x/../refund", 403),
        (FRONTEND, "POST", "/v1%2Frefund", 400),
        (FRONTEND, "POST", "/V1/charge", 403),
        (FRONTEND, "POST", "/v1/charge#frag", 400),
        # and spellings of the allowed call still reach the upstream, normalized
        (FRONTEND, "POST", "/v1//charge", 200),
        (FRONTEND, "POST", "/v1/x/../charge", 200),
    ],
)
def test_seed_table_through_envoy(world: World, src: str, method: str, path: str, status: int) -> None:
    for dst in (BILLING, BILLING2):
        r = request(src, dst, 8080, method, path)
        assert r.status == status, (dst, r)
        if status == 200:
            assert json.loads(r.body)["path"] == "/v1/charge"  # the upstream saw the normalized path


def test_other_port_is_refused(world: World) -> None:
    assert request(FRONTEND, BILLING, 9090, "POST", "/v1/charge").status == 0


def test_unknown_source_is_world_and_denied(world: World) -> None:
    assert request(f"127.{S}.9.9", BILLING, 8080, "POST", "/v1/charge").status == 403


def test_policy_change_reaches_open_keepalive_connection(world: World) -> None:
    conn = HttpConn(FRONTEND, BILLING, 8080)
    try:
        assert conn.request("GET", "/v1/transactions").status == 403
        changed = copy.deepcopy(seed_policies()[1])
        changed["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"].append(
            {"method": "GET", "path": "/v1/transactions"}
        )
        world.core.apply([changed])
        world.synced()
        # same TCP connection (HttpConn never reconnects): the new rule is in force (RDS, not LDS)
        assert wait_conn(conn, "GET", "/v1/transactions", 200) == 200
        world.core.apply(seed_policies())
        world.synced()
        assert wait_conn(conn, "GET", "/v1/transactions", 403) == 403
        assert conn.request("POST", "/v1/charge").status == 200  # allowed throughout: no retry
    finally:
        conn.close()


def test_invalid_apply_changes_nothing(world: World) -> None:
    client = AdminClient(world.agent.admin.address)
    before_policies = client.get("/v1/policy")
    before_versions = {k: v for k, v in world.agent.cache.get_snapshot(world.agent.config.node_id).versions.items()}  # type: ignore[union-attr]
    good = copy.deepcopy(seed_policies()[1])
    good["metadata"]["name"] = "would-allow-everything"
    good["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"] = [{}]
    bad = copy.deepcopy(seed_policies()[1])
    bad["metadata"]["name"] = "broken"
    bad["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"] = "/v1/(charge"
    with pytest.raises(AdminError) as ei:
        client.apply_policies([good, bad])
    assert ei.value.status == 422
    assert "CiliumClusterwideNetworkPolicy/broken: spec.ingress[0].toPorts[0].rules.http[0].path: invalid RE2 regex" in str(ei.value)
    assert client.get("/v1/policy") == before_policies
    after = world.agent.cache.get_snapshot(world.agent.config.node_id)
    assert after is not None and dict(after.versions) == before_versions
    assert request(FRONTEND, BILLING, 8080, "GET", "/v1/transactions").status == 403


@envoy_only
def test_nack_is_shown_and_last_good_config_stays(world: World) -> None:
    from l7gate.xds import resources

    node = world.agent.config.node_id
    name = resources.route_name(BILLING, 8080)
    good = world.agent.cache.get_snapshot(node).messages(ROUTE_TYPE)[name]  # type: ignore[union-attr]
    bad = copy.deepcopy(good)
    # an RE2 regex Envoy refuses: RDS is NACKed
    pr = bad.virtual_hosts[0].routes[0]
    pr.match.ClearField("prefix")
    pr.match.safe_regex.regex = "(?<=x)"
    pr.match.safe_regex.google_re2.SetInParent()
    world.agent.cache.update(node, ROUTE_TYPE, {name: bad})
    try:
        def rds_nacked() -> Any:
            row = next((r for r in world.agent.xds.status() if r.node_id == node and r.type == "RDS"), None)
            assert row is not None and row.state.value == "NACKED", row
            return row

        row = eventually(rds_nacked, 10, "Envoy to NACK the RDS update")
        assert row.last_nack is not None and "invalid perl operator" in row.last_nack.error
        # the CLI shows it too
        status = AdminClient(world.agent.admin.address).get("/v1/xds/status")
        assert "NACKED" in json.dumps(status)
        # Envoy still enforces the last good config
        assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
        assert request(FRONTEND, BILLING, 8080, "POST", "/v1/refund").status == 403
        # ...which is not what the agent wants: not healthy, and `l7gate status` says why.
        with pytest.raises(AdminError) as caught:
            AdminClient(world.agent.admin.address).get("/healthz")
        assert caught.value.status == 503
        assert any("rejected RDS" in p for p in caught.value.body["problems"])
    finally:
        world.agent.cache.update(node, ROUTE_TYPE, {name: good})
        world.synced()


@envoy_only
def test_a_listener_envoy_cannot_bind_is_nacked_never_synced(world: World) -> None:
    """A listener on an address that is not the node's: Envoy refuses the LDS version; status
    says NACKED (with Envoy's reason) and the agent is unhealthy until it is fixed."""
    node = world.agent.config.node_id
    good = dict(world.agent.cache.get_snapshot(node).messages(LISTENER_TYPE))  # type: ignore[union-attr]
    name, lst = sorted(good.items())[0]
    bad = copy.deepcopy(lst)
    bad.name = "l7g-unbindable"
    bad.address.socket_address.address = "192.0.2.1"  # TEST-NET-1: never an address of this machine
    world.agent.cache.update(node, LISTENER_TYPE, {**good, bad.name: bad})
    try:
        def lds() -> Any:
            return next(r for r in world.agent.xds.status() if r.node_id == node and r.type == "LDS")

        def lds_nacked() -> Any:
            row = lds()
            assert row.state.value == "NACKED", row
            return row

        row = eventually(lds_nacked, 10, "Envoy to NACK the LDS update")
        assert row.last_nack is not None
        assert "cannot bind '192.0.2.1:8080'" in row.last_nack.error
        problems = AdminClient(world.agent.admin.address).get("/v1/status")["health"]["problems"]
        assert any("rejected LDS" in p and "cannot bind" in p for p in problems), problems
    finally:
        world.agent.cache.update(node, LISTENER_TYPE, removed=[bad.name])
        world.synced()


def _probe_loop(stop: threading.Event, results: list[tuple[str, int]]) -> None:
    while not stop.is_set():
        results.append(("allow", request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status))
        results.append(("deny", request(FRONTEND, BILLING, 8080, "POST", "/v1/refund").status))
        results.append(("other", request(OTHER, BILLING, 8080, "POST", "/v1/charge").status))


@envoy_only
def test_xds_server_killed_and_restarted_verdicts_hold(world: World) -> None:
    agent = world.agent
    stop = threading.Event()
    results: list[tuple[str, int]] = []
    prober = threading.Thread(target=_probe_loop, args=(stop, results))
    prober.start()
    try:
        eventually(lambda: len(results) >= 9, 10, "three probe rounds before the xDS server stops")
        address = agent.xds.address
        agent.xds.stop(grace=0)
        during = len(results)
        # Envoy's own time: it notices the stream is gone and keeps retrying on its back-off
        # (up to 1 s), serving the last config all along. No clock of ours runs it.
        time.sleep(1.5)
        eventually(lambda: len(results) > during + 10, 10,
                   "the probe loop to run while the xDS server is down")
        new = XdsServer(agent.cache, address, on_ack=agent.metrics.on_ack, on_nack=agent.metrics.on_nack,
                        extra_handlers=[agent.als.handler()])
        new.start()
        agent.xds = new
        assert new.wait_synced(agent.config.node_id, 10), new.status_json()
        resynced = len(results)
        eventually(lambda: len(results) >= resynced + 9, 10, "three probe rounds after the resync")
    finally:
        stop.set()
        prober.join()
    allow = [s for k, s in results if k == "allow"]
    deny = [s for k, s in results if k in ("deny", "other")]
    assert allow and deny
    assert set(allow) == {200}, allow
    assert set(deny) == {403}, deny


@envoy_only
def test_envoy_crash_is_restarted_and_resynced(world: World) -> None:
    import os
    import signal

    sup = world.agent.envoy
    assert sup is not None
    before = sup.status()
    assert before.pid is not None
    os.kill(before.pid, signal.SIGKILL)
    def restarted() -> bool:
        st = sup.status()
        assert st.pid not in (None, before.pid) and st.state.value == "LIVE", st
        return True

    eventually(restarted, 20, "a new Envoy to be LIVE after the kill")
    assert sup.status().restarts == before.restarts + 1
    world.synced()
    world.wait_listening(BILLING, 8080)
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
    assert request(FRONTEND, BILLING, 8080, "GET", "/v1/transactions").status == 403


def test_admin_api_views(world: World) -> None:
    c = AdminClient(world.agent.admin.address)
    assert c.get("/healthz") == {"status": "ok"}
    pol = c.get("/v1/policy")
    (ep,) = pol["endpoints"]
    assert ep["identity"] == 65536 and ep["ingress"]["default_deny"] is True
    (entry,) = ep["ingress"]["entries"]
    assert entry == {
        "peer": 131072, "protocol": "TCP", "ports": "8080", "action": "proxy", "auth": None,
        "http": ["{method=POST path=/v1/charge}"],
        "derived_from": ["CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api spec.ingress[0]"],
    }
    ids = {i["identity"]: i for i in c.get("/v1/identities")["identities"]}
    # the pods' identities, and the reserved ones an address can have (entities select them:
    # unknown addresses are `world`, node addresses `host` and `remote-node`), as `cilium
    # identity list` shows them
    assert set(ids) == {65536, 131072, 131073, 1, 2, 3, 4, 5, 6, 7, 8}
    assert ids[1]["labels"] == {"reserved:host": ""} and ids[6]["labels"] == {"reserved:remote-node": ""}
    ipc = {e["prefix"]: e["identity"] for e in c.get("/v1/ipcache")["entries"]}
    assert ipc[f"{FRONTEND}/32"] == 131072
    dump = c.get("/v1/xds/config?type=type.googleapis.com/envoy.config.route.v3.RouteConfiguration")
    (node,) = dump["nodes"].values()
    assert len(node["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"]["resources"]) == 2
    metrics = c.get("/metrics")
    assert "l7gate_identities 3.0" in metrics
    status = c.get("/v1/status")
    assert status["datapath"]["mode"] == "loopback"
    if world.agent.engine is None:
        assert "l7gate_xds_acks_total" in metrics
        assert status["envoy"]["state"] == "LIVE" and status["proxy"] == {"engine": "envoy"}
    else:
        proxy = status["proxy"]
        assert status["envoy"] is None and proxy["engine"] == "h11" and proxy["state"] == "LIVE", status
        assert proxy["listeners"] == 2 and proxy["bind_errors"] == {}, proxy


def test_pod_removed_and_readded(world: World) -> None:
    from .loopback import pod

    c = AdminClient(world.agent.admin.address)
    c.delete_endpoint("cluster-b/web/frontend-service-abc")
    world.synced()
    assert wait_request(FRONTEND, BILLING, "POST", "/v1/charge", 403) == 403  # now unknown: world
    c.apply_endpoints([pod("frontend-service-abc", "web", FRONTEND,
                           {"app": "frontend-service", "team": "web", "env": "prod"}, "cluster-b")])
    world.synced()
    assert wait_request(FRONTEND, BILLING, "POST", "/v1/charge", 200) == 200


def test_agent_restart_restores_state(tmp_path: Path, require_envoy: None) -> None:
    """Policies and pods survive an agent restart (kvstore), with the same identities."""
    with loopback_world(tmp_path, 62) as w:
        ids = sorted(i["identity"] for i in views.identities(w.core.view()))
    # a second agent on the same state dir comes back with everything
    from l7gate.agent.daemon import start_agent

    agent = start_agent(w.agent.config)
    try:
        assert sorted(i["identity"] for i in views.identities(agent.core.view())) == ids
        assert len(views.policies(agent.core.view())) == 2
        assert agent.envoy is not None
        agent.envoy.wait_ready(30)
        assert agent.xds.wait_synced(agent.config.node_id, 10)
        w2 = World(agent, tmp_path)
        w2.serve("127.62.1.10", 8080, "billing")
        w2.wait_listening("127.62.1.10", 8080)
        assert request("127.62.2.55", "127.62.1.10", 8080, "POST", "/v1/charge").status == 200
        assert request("127.62.2.55", "127.62.1.10", 8080, "POST", "/v1/refund").status == 403
        for srv in w2.servers:
            srv.shutdown()
            srv.server_close()
    finally:
        agent.stop()


def test_apply_error_lists_every_problem(world: World) -> None:
    from .loopback import pod

    with pytest.raises(ApplyError) as ei:
        world.core.apply([
            pod("x", "web", "not-an-ip", {}, "cluster-b"),
            pod("y", "web", "127.61.3.3", {}, "cluster-z"),
            pod("z", "web", FRONTEND, {}, "cluster-b"),
        ])
    text = "\n".join(ei.value.errors)
    assert "status.podIP" in text and "cluster-z" in text and f"IP {FRONTEND} is already used" in text





def test_access_logs_stream_to_the_agent(world: World) -> None:
    """Envoy's access logs reach the agent over gRPC and, through the sinks the agent wires (the
    ingestor's batch sinks), become its flows: the allowed call answered 200, the other one
    denied by the L7 rule, as Envoy's RBAC filter reported it."""
    since = time.time_ns()
    assert request(FRONTEND, BILLING, 8080, "POST", "/v1/charge").status == 200
    assert request(FRONTEND, BILLING, 8080, "GET", "/v1/transactions").status == 403

    def seen() -> list[tuple[int, str, Verdict, str]]:
        out = [(f.l7.http.code, urlsplit(f.l7.http.url).path, f.verdict, f.drop_reason_desc)
               for f in world.agent.flows.snapshot(since=since) if f.l7 is not None and f.l7.http is not None]
        assert (200, "/v1/charge", Verdict.FORWARDED, "") in out, out
        assert (403, "/v1/transactions", Verdict.DROPPED, POLICY_DENIED_L7) in out, out
        return out

    eventually(seen, 5, "the flows of both requests")


def test_cli_against_the_agent(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from l7gate.cli import main

    admin = ["--admin", world.agent.admin.address]

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main([*argv[:2], *admin, *argv[2:]] if argv[0] in ("policy", "endpoint", "xds", "auth") else [argv[0], *admin, *argv[1:]])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = run("policy", "get")
    assert rc == 0 and "CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api" in out
    rc, out, _ = run("policy", "get", "-o", "yaml")
    assert rc == 0 and "kind: CiliumClusterwideNetworkPolicy" in out
    rc, _, err = run("policy", "delete", "CiliumNetworkPolicy/nope/missing")
    assert rc == 1 and "no policy" in err
    rc, out, _ = run("endpoint", "list")
    assert rc == 0 and "cluster-a/payments/billing-service-xyz" in out and "65536" in out
    rc, out, err = run("xds", "status")
    if world.agent.engine is None:
        assert rc == 0 and "SYNCED" in out and "RDS" in out, out
    else:
        assert rc == 0 and "no Envoy has subscribed" in err, (out, err)
    rc, out, _ = run("xds", "dump", "--type", "rds")
    assert rc == 0 and "RouteConfiguration" in out
    rc, _, err = run("xds", "dump", "--type", "bogus")
    assert rc == 2 and "--type" in err
    rc, out, _ = run("status")
    assert rc == 0 and "loopback" in out and "healthy" in out
    assert "WARNING: datapath loopback is not a secure mode" in out  # pods reachable on port + 10000
    status = json.loads(run("status", "-o", "json")[1])
    # The counts say what they count: `endpoint list` shows every known pod.
    assert status["pods"] == {"known": 4, "local": 2} and "endpoints" not in status
    rc, out, err = run("auth", "status")
    assert rc == 0 and "not enabled" in err
    # an invalid apply through the CLI: exit 1, every error printed, nothing changed
    bad = world.tmp / "bad.yaml"
    bad.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b, namespace: x}\n"
                   "spec: {endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: '99999'}]}]}]}\n")
    rc, _, err = run("policy", "apply", "-f", str(bad))
    assert rc == 1 and "spec.ingress[0].toPorts[0].ports[0].port" in err


def test_a_policy_that_only_turns_on_default_deny_is_enforced(world: World) -> None:
    """`ingress: [{}]` changes no map key, only default-deny: Envoy must still follow it."""
    from .loopback import pod

    ledger = f"127.{S}.1.20"
    world.serve(ledger, 8080, "ledger")
    world.core.apply([pod("ledger-abc", "payments", ledger, {"app": "ledger"}, "cluster-a", (8080,))])
    world.synced()
    world.wait_listening(ledger, 8080)
    assert request(OTHER, ledger, 8080, "GET", "/x").status == 200  # no policy selects it
    deny_all = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                "metadata": {"name": "ledger-default-deny"},
                "spec": {"endpointSelector": {"matchLabels": {"app": "ledger"}}, "ingress": [{}]}}
    world.core.apply([deny_all])
    world.synced()
    assert wait_request(OTHER, ledger, "GET", "/x", 403) == 403
    world.core.delete_policy("CiliumClusterwideNetworkPolicy/ledger-default-deny")
    world.synced()
    assert wait_request(OTHER, ledger, "GET", "/x", 200) == 200


@envoy_only
def test_envoy_log_stays_readable(world: World) -> None:
    """The IP matcher's work-in-progress warnings (~1,500 lines per push before) do not drown
    Envoy's log (docs/deviations.md); the log says which Envoy started and little else."""
    log = (Path(world.agent.config.state_dir) / "envoy" / "envoy.log").read_text()
    assert "work-in-progress" not in log
    assert len(log.splitlines()) < 50, log[-3000:]


def test_a_service_is_listed_with_its_backends_and_not_served_in_loopback_mode(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loopback mode has no load balancer: a Service's frontends and backends are computed and
    shown, and the agent says plainly that its ClusterIP is not served here."""
    c = AdminClient(world.agent.admin.address)
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "billing-service", "namespace": "payments",
                        "annotations": {"io.cilium/global-service": "true"}},
           "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "billing-service"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    result = c.apply_endpoints([svc])
    assert result["created"] == ["service/cluster-a/payments/billing-service"], result
    try:
        data = c.get("/v1/services")
        assert data["datapath"].startswith("not served: loopback mode"), data
        (s,) = data["services"]
        assert s["global"] is True and s["cluster_ip"] == "10.96.0.10"
        (fe,) = s["frontends"]
        assert fe["frontend"] == "10.96.0.10:80/TCP" and fe["port_name"] == "http"
        assert [b["address"] for b in fe["backends"]] == [f"{BILLING}:8080", f"{BILLING2}:8080"]
        assert c.get("/v1/status")["services"]["count"] == 1
        assert cli_main(["service", "list", "--admin", world.agent.admin.address]) == 0
        out = capsys.readouterr()
        assert "payments/billing-service" in out.out and f"{BILLING}:8080" in out.out
        assert "not served: loopback mode" in out.err
        # A Service of another cluster is refused with the reason; nothing changes.
        other = copy.deepcopy(svc)
        other["metadata"]["annotations"][CLUSTER_ANNOTATION] = "cluster-b"
        with pytest.raises(AdminError) as ei:
            c.apply_endpoints([other])
        assert ei.value.status == 422 and "cluster mesh" in str(ei.value)
    finally:
        assert c.delete_service("payments/billing-service") == {"deleted": ["payments/billing-service"]}
    assert c.get("/v1/services")["services"] == []
    with pytest.raises(AdminError) as ei:
        c.delete_service("payments/billing-service")
    assert ei.value.status == 404


def test_cidr_peers_get_cidr_identities(world: World) -> None:
    """A `fromCIDR`/`fromCIDRSet` prefix gets its CIDR identity in the ipcache (an `except` one of
    its own), so an address inside it is selected; a pod inside keeps its own identity; deleting
    the policy removes them. (Before, no CIDR identity existed and such a rule selected nothing.)"""
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "from-cidr"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "billing-service"}},
                    "ingress": [{"fromCIDRSet": [{"cidr": f"127.{S}.8.0/22", "except": [f"127.{S}.9.0/24"]}],
                                 "toPorts": [{"ports": [{"port": "8080"}]}]}]}}
    world.core.apply([doc])
    try:
        world.synced()
        ipc = {e["prefix"]: e["identity"] for e in AdminClient(world.agent.admin.address).get("/v1/ipcache")["entries"]}
        assert ipc[f"127.{S}.8.0/22"] >= 1 << 24 and ipc[f"127.{S}.9.0/24"] >= 1 << 24
        assert wait_request(f"127.{S}.8.9", BILLING, "GET", "/anything", 200) == 200
        assert request(f"127.{S}.10.9", BILLING, 8080, "GET", "/anything").status == 200
        assert request(f"127.{S}.9.9", BILLING, 8080, "GET", "/anything").status == 403  # the except
        assert request(f"127.{S}.12.9", BILLING, 8080, "GET", "/anything").status == 403  # outside
    finally:
        world.core.delete_policy("CiliumClusterwideNetworkPolicy/from-cidr")
    world.synced()
    ipc = {e["prefix"] for e in AdminClient(world.agent.admin.address).get("/v1/ipcache")["entries"]}
    assert f"127.{S}.8.0/22" not in ipc and f"127.{S}.9.0/24" not in ipc
    assert wait_request(f"127.{S}.8.9", BILLING, "GET", "/anything", 403) == 403
