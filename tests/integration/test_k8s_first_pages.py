"""The first pages of the initial listings, asked for before the agent has started
(`k8s.watch.FirstPages`, what `l7gate agent` does while it imports the rest of the agent),
against the API-server DOUBLE over HTTPS with the real Python client, into the agent's own core:
the watch takes them instead of listing again; what changed in between comes as watch events
(nothing missed, nothing left behind); a page the server refused is asked for again."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.agent.kube import CoreSink
from l7gate.client import AdminClient
from l7gate.k8s.reconcile import RESOURCES
from l7gate.k8s.watch import PAGE_SIZE, ApiConnection, FirstPages, Watcher, load_configuration
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.testing.apiserver_double import ApiServerDouble, RecordedRequest
from l7gate.testing.wait import eventually
from l7gate.xds.cache import SnapshotCache

pytestmark = pytest.mark.integration

NODE = "node-a1"
FIRST = f"limit={PAGE_SIZE}&resourceVersion=0"


def pod(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "web", "labels": {"app": name}},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def policy(name: str) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "web"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "a"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}]}]}}


class World:
    def __init__(self, api: ApiServerDouble, core: AgentCore, kubeconfig: Path) -> None:
        self.api, self.core, self.kubeconfig = api, core, kubeconfig
        self.watchers: list[Watcher] = []

    def connection(self) -> ApiConnection:
        return ApiConnection(load_configuration(str(self.kubeconfig)))

    def watcher(self, first_pages: FirstPages | None) -> Watcher:
        api = first_pages.api if first_pages is not None else self.connection()
        w = Watcher(api, CoreSink(self.core), cluster="cluster-a", node=NODE, log=lambda line: None,
                    watch_timeout=30, first_pages=first_pages)
        self.watchers.append(w)
        return w

    def lists(self, since: int = 0) -> list[RecordedRequest]:
        """The listings (GETs of a collection that are not watches) the double answered."""
        return [r for r in self.api.requests[since:]
                if r.method == "GET" and "watch=" not in r.query and r.status != 0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    core = AgentCore(AgentConfig(node=NODE, cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                                 envoy=EnvoySettings(enabled=False), datapath_mode="kernel"), store, SnapshotCache())
    with ApiServerDouble(bookmark_interval=1.0) as api:
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
        w = World(api, core, api.kubeconfig(tmp_path / "kubeconfig"))
        try:
            yield w
        finally:
            for watcher in w.watchers:
                watcher.stop()
            store.close()


def first_pages_done(w: World, pages: int) -> None:
    eventually(lambda: sum(1 for r in w.lists() if r.query == FIRST) >= pages, 10, "the first pages answered")


def test_the_watch_takes_the_first_pages_and_catches_up_on_what_changed_since(world: World) -> None:
    w = world
    w.api.create(pod("a", "10.8.1.5"), with_status=True)
    w.api.create(policy("p1"))
    fp = FirstPages(w.connection())
    first_pages_done(w, len(RESOURCES))
    # After the first pages, before the watch: a pod created, a policy deleted, another created.
    w.api.create(pod("b", "10.8.1.6"), with_status=True)
    w.api.delete("ciliumnetworkpolicies", "p1", namespace="web")
    w.api.create(policy("p2"))
    before = len(w.api.requests)

    watcher = w.watcher(fp)
    watcher.start()
    assert watcher.wait_ready(20), watcher.problems()
    eventually(lambda: set(w.core.documents("Pod")) == {"cluster-a/web/a", "cluster-a/web/b"}
               and set(w.core.documents("CiliumNetworkPolicy")) == {"CiliumNetworkPolicy/web/p2"}, 10,
               "the changes made after the first pages, from the watch")
    # No listing of its own: every resource's first listing was its first page.
    assert w.lists(before) == [], [(r.path, r.query) for r in w.lists(before)]
    assert all(r["listed_at"] is not None and r["first_page_at_start"] for r in watcher.status()["resources"].values())


def test_a_refused_first_page_is_asked_for_again_by_the_watch(world: World) -> None:
    w = world
    w.api.create(pod("a", "10.8.1.5"), with_status=True)
    w.api.fail_requests(500, 1, method="GET", path_contains="/pods")
    fp = FirstPages(w.connection())
    first_pages_done(w, len(RESOURCES) - 1)
    eventually(lambda: any(r.path == "/api/v1/pods" and r.status == 500 for r in w.api.requests), 10,
               "the pods' first page refused")
    before = len(w.api.requests)

    watcher = w.watcher(fp)
    watcher.start()
    assert watcher.wait_ready(20), watcher.problems()
    assert set(w.core.documents("Pod")) == {"cluster-a/web/a"}
    firsts = {name: r["first_page_at_start"] for name, r in watcher.status()["resources"].items()}
    assert firsts == {r.name: r.name != "pods" for r in RESOURCES}, firsts
    again = w.lists(before)
    assert [(r.path, r.query, r.status) for r in again] == [("/api/v1/pods", FIRST, 200)]


def test_a_page_is_taken_once_for_its_own_query_and_not_while_stopping(world: World) -> None:
    w = world
    fp = FirstPages(w.connection(), RESOURCES[:2])
    first_pages_done(w, 2)
    a, b = (r.path_for(r.versions[0]) for r in RESOURCES[:2])
    never = threading.Event()
    first = {"limit": str(PAGE_SIZE), "resourceVersion": "0"}
    assert fp.take(a, {"limit": str(PAGE_SIZE)}, never) is None  # another query: not this page
    page = fp.take(a, first, never)
    assert page is not None and b'"items"' in page
    assert fp.take(a, first, never) is None  # taken once
    stopping = threading.Event()
    stopping.set()
    assert fp.take(b, first, stopping) is None
    fp.discard()


L7GATE = str(Path(sys.executable).parent / "l7gate")


def _agent_yaml(tmp: Path, kubeconfig: Path) -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(f"node: {NODE}\ncluster: {{name: cluster-a, id: 1}}\nstateDir: {tmp}/state\n"
                   f"admin: {{listen: 'unix:{tmp}/admin.sock'}}\nenvoy: {{enabled: false}}\n"
                   f"kubernetes: {{enabled: true, kubeconfig: '{kubeconfig}'}}\n")
    return cfg


def test_the_agent_process_lists_each_resource_once_through_its_first_pages(world: World, tmp_path: Path) -> None:
    """`l7gate agent` itself: the first pages asked for before the rest of the agent is
    imported are its initial listings (one `resourceVersion=0` listing per resource, no other)."""
    w = world
    w.api.create(pod("a", "127.58.1.5"), with_status=True)
    w.api.create(policy("p1"))
    home = tmp_path / "agent"
    home.mkdir()
    proc = subprocess.Popen([L7GATE, "agent", "--config", str(_agent_yaml(home, w.kubeconfig))],
                            stderr=open(home / "agent.log", "wb"))
    try:
        client = AdminClient(f"unix:{home}/admin.sock")
        eventually(lambda: (home / "admin.sock").exists() and client.get("/v1/status")["kubernetes"]["synced"], 30,
                   "the agent synced with the API")
        st = client.get("/v1/status")["kubernetes"]["resources"]
        assert st["pods"]["in_force"] == 1 and st["ciliumnetworkpolicies"]["in_force"] == 1, st
        assert all(r["first_page_at_start"] for r in st.values()), st
        lists = [(r.path, r.query) for r in w.lists()]
        paths = [r.path_for(r.versions[0]) for r in RESOURCES]
        assert sorted(lists) == sorted((p, FIRST) for p in paths), lists
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, (home / "agent.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_agent_process_with_an_unusable_kubeconfig_stops_and_says_why(world: World, tmp_path: Path) -> None:
    home = tmp_path / "agent"
    home.mkdir()
    missing = tmp_path / "no-such-kubeconfig"
    out = subprocess.run([L7GATE, "agent", "--config", str(_agent_yaml(home, missing))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "failed to start: RuntimeError: kubernetes: cannot use the kubeconfig" in out.stderr, out.stderr
    assert str(missing) in out.stderr and "ready" not in out.stderr
