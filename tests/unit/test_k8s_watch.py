"""The list+watch protocol of `k8s.watch` against a scripted API (no sockets): pages, bookmarks,
resuming from the last resourceVersion, "410 Gone" → a new listing, back-off on failures; the
watcher's readiness (only once every first listing is applied, together) and its refusals
(an Event on the policy, once per version). The API-server double is exercised in
tests/integration/test_k8s_watch.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import urllib3

from l7gate.agent.health import EnforcementWatch
from l7gate.k8s.reconcile import CIDRGROUPS, CNPS, NAMESPACES, PODS, Backoff, Resource
from l7gate.k8s.watch import ApiError, KubeConfigError, ResourceWatch, Watcher, _Event, _Listed, load_configuration
from l7gate.testing.wait import eventually

from .test_k8s_reconcile import FakeSink, api_cnp, api_pod


class Stream:
    """A watch response: `lines`, then EOF, or (hold=True) open until shut down."""

    def __init__(self, lines: Sequence[dict[str, Any]], hold: bool = False, cut: bool = False) -> None:
        self._lines = [json.dumps(x).encode() + b"\n" for x in lines]
        self._hold = hold
        self._cut = cut  # end as a cut connection does: no final chunk
        self._shut = threading.Event()
        self.status = 200

    def read1(self, amt: int) -> bytes:
        if self._lines:
            # Split a line in two reads: the reader must join them.
            line = self._lines.pop(0)
            if len(line) > 8:
                self._lines.insert(0, line[8:])
                return line[:8]
            return line
        if self._hold:
            self._shut.wait(10)
        if self._cut:
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead(0 bytes read)")
        return b""

    def shutdown(self) -> None:
        self._shut.set()

    def close(self) -> None:
        self._shut.set()

    def release_conn(self) -> None:
        pass


class ScriptedApi:
    """Answers each request of a path with the next step of its script: a dict (a list page), a
    Stream (a watch), or an exception to raise. Records every request."""

    host = "https://api.test:6443"

    def __init__(self, scripts: Mapping[str, list[Any]], default_hold: bool = True) -> None:
        self.scripts = {p: list(s) for p, s in scripts.items()}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.posted: list[tuple[str, dict[str, Any]]] = []
        self.default_hold = default_hold
        self.lock = threading.Lock()

    def _next(self, method: str, path: str, query: Mapping[str, str] | None) -> Any:
        with self.lock:
            self.requests.append((method, path, dict(query or {})))
            script = self.scripts.get(path, [])
            step = script.pop(0) if script else None
        if isinstance(step, threading.Event):  # a gate: the rest of the script waits for it
            step.wait(5)
            with self.lock:
                step = script.pop(0) if script else None
        if step is None:
            step = (Stream([], hold=self.default_hold) if query and query.get("watch")
                    else {"metadata": {"resourceVersion": "1"}, "items": []})
        if isinstance(step, BaseException):
            raise step
        return step

    def json(self, method: str, path: str, query: Mapping[str, str] | None = None, body: Any = None,
             timeout: Any = None) -> dict[str, Any]:
        if method == "POST":
            self.posted.append((path, body))
            return body  # type: ignore[no-any-return]
        step = self._next(method, path, query)
        assert isinstance(step, dict)
        return step

    def send(self, method: str, path: str, query: Mapping[str, str] | None = None, body: Any = None,
             timeout: Any = None) -> Stream:
        step = self._next(method, path, query)
        assert isinstance(step, Stream), step
        return step

    def close(self) -> None:
        pass

    def watches(self, path: str) -> list[dict[str, str]]:
        return [q for m, p, q in self.requests if p == path and q.get("watch")]

    def lists(self, path: str) -> list[dict[str, str]]:
        return [q for m, p, q in self.requests if p == path and not q.get("watch")]


def obj(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "payments", "resourceVersion": rv},
            "spec": {"endpointSelector": {}}}


def run_watch(api: ScriptedApi, resource: Resource, until: Any, *, backoff: Backoff | None = None) -> list[object]:
    got: list[object] = []
    stopping = threading.Event()
    w = ResourceWatch(resource, api, "cluster-a", got.append, stopping, watch_timeout=60, read_grace=5,  # type: ignore[arg-type]
                      page_size=2, backoff=backoff or Backoff(base=0.001, cap=0.002), rng=lambda: 0.5)
    w.start()
    try:
        eventually(lambda: until(got, w), 5, "the watch to get there")
    finally:
        stopping.set()
        w.abort()
        assert w.thread is not None
        w.thread.join(5)
        assert not w.thread.is_alive()
    return got


def test_pages_bookmarks_resume_and_410_gone() -> None:
    path = CNPS.path
    api = ScriptedApi({path: [
        {"metadata": {"continue": "c1"}, "items": [obj("a", "3"), obj("b", "4")]},
        {"metadata": {"resourceVersion": "10"}, "items": [obj("c", "9")]},
        Stream([{"type": "ADDED", "object": {"kind": "CiliumNetworkPolicy", **obj("d", "11")}},
                {"type": "BOOKMARK", "object": {"kind": "CiliumNetworkPolicy", "metadata": {"resourceVersion": "15"}}}]),
        # the connection is cut (EOF): watch again from the bookmark's version, no listing
        Stream([{"type": "DELETED", "object": {"kind": "CiliumNetworkPolicy", **obj("a", "16")}},
                {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                             "message": "too old resource version: 16 (30)"}}]),
        {"metadata": {"resourceVersion": "30"}, "items": [obj("b", "4")]},
    ]})
    got = run_watch(api, CNPS, lambda got, w: len(api.watches(path)) >= 3)
    assert [q.get("continue") for q in api.lists(path)] == [None, "c1", None]
    # the first listing at any version (a real server: from its watch cache); a continue token
    # carries no version; the relist after 410 reads the current version
    assert [q.get("resourceVersion") for q in api.lists(path)] == ["0", None, None]
    assert [q["resourceVersion"] for q in api.watches(path)] == ["10", "15", "30"]
    first = api.watches(path)[0]
    assert first["allowWatchBookmarks"] == "true" and first["timeoutSeconds"] == "90"  # 60 × (1 + 0.5)
    kinds = [(type(x).__name__, [d.key.rsplit("/", 1)[1] for d in x.items] if isinstance(x, _Listed)
              else (x.desired.key.rsplit("/", 1)[1], x.desired.doc is not None))
             for x in got if isinstance(x, (_Listed, _Event))]
    assert kinds == [("_Listed", ["a", "b", "c"]), ("_Event", ("d", True)), ("_Event", ("a", False)),
                     ("_Listed", ["b"])]


def test_a_watch_cut_mid_stream_resumes_after_the_last_event_it_delivered() -> None:
    """Not from where it started: the server would replay every event since, and the agent would
    apply old versions of objects again (a policy's revision from an hour ago, for a moment)."""
    path = CNPS.path
    api = ScriptedApi({path: [
        {"metadata": {"resourceVersion": "5"}, "items": []},
        Stream([{"type": "ADDED", "object": obj("a", "6")}, {"type": "MODIFIED", "object": obj("a", "7")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}], cut=True),
        Stream([{"type": "MODIFIED", "object": obj("a", "12")}], cut=True),
    ]})
    got = run_watch(api, CNPS, lambda got, w: len(api.watches(path)) >= 3)
    assert [q["resourceVersion"] for q in api.watches(path)] == ["5", "9", "12"]
    assert len(api.lists(path)) == 1
    assert [x.desired.ref.resource_version for x in got if isinstance(x, _Event)] == ["6", "7", "12"]


def test_a_refused_connection_backs_off_and_resumes_from_the_last_version() -> None:
    path = NAMESPACES.path
    down = urllib3.exceptions.MaxRetryError(None, path, urllib3.exceptions.NewConnectionError(None, "refused"))  # type: ignore[arg-type]
    api = ScriptedApi({path: [
        {"metadata": {"resourceVersion": "5"}, "items": []},
        Stream([{"type": "ADDED", "object": {"metadata": {"name": "web", "resourceVersion": "6"}}}]),
        down, down, ApiError(503, "Service Unavailable"), down,
        Stream([{"type": "ADDED", "object": {"metadata": {"name": "ops", "resourceVersion": "7"}}}]),
        down,
    ]})
    waits: list[float] = []

    class Recording(Backoff):
        def next(self) -> float:
            waits.append(super().next())
            return waits[-1]

    run_watch(api, NAMESPACES, lambda got, w: len(api.watches(path)) >= 8,
              backoff=Recording(base=0.001, cap=0.004, rng=lambda: 1.0))
    # One listing; every retry from the last version seen.
    assert len(api.lists(path)) == 1
    assert [q["resourceVersion"] for q in api.watches(path)] == ["5", "6", "6", "6", "6", "6", "7", "7"]
    # Each consecutive failure waits longer, up to the cap; a watch that delivered something
    # starts the next failure's wait from the base again.
    assert waits == pytest.approx([0.001, 0.002, 0.004, 0.004, 0.001])


def test_an_error_event_other_than_410_lists_again_after_a_backoff() -> None:
    path = CNPS.path
    api = ScriptedApi({path: [
        {"metadata": {"resourceVersion": "5"}, "items": []},
        Stream([{"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError",
                                             "message": "etcd leader changed"}}]),
        {"metadata": {"resourceVersion": "8"}, "items": []},
    ]})
    run_watch(api, CNPS, lambda got, w: len(api.watches(path)) >= 2)
    assert [q["resourceVersion"] for q in api.watches(path)] == ["5", "8"] and len(api.lists(path)) == 2


def test_a_watch_that_ends_at_once_is_not_retried_in_a_tight_loop() -> None:
    path = CNPS.path
    api = ScriptedApi({path: [{"metadata": {"resourceVersion": "5"}, "items": []}]}, default_hold=False)
    slow = Backoff(base=0.05, cap=0.05, rng=lambda: 1.0)
    got = run_watch(api, CNPS, lambda got, w: w.last_error != "", backoff=slow)
    assert len(api.watches(path)) <= 3 and len(got) == 1


def test_a_listing_of_an_unserved_resource_says_what_to_install() -> None:
    path = CNPS.path
    # Unserved it stays: one 404 alone was followed by an empty listing 1-2 ms later, which
    # clears the error, and a busy machine's poll could miss it (seen once under pytest -n 2).
    api = ScriptedApi({path: [ApiError(404, "Not Found", "the server could not find the requested resource")
                              for _ in range(10_000)]})
    got = run_watch(api, CNPS, lambda got, w: w.last_error != "")
    assert got == []


def api_ccg(name: str, rv: str, *cidrs: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": rv},
            "spec": {"externalCIDRs": list(cidrs)}}


def test_a_resource_not_served_in_its_first_version_is_read_in_the_next() -> None:
    """CiliumCIDRGroup: cilium.io/v2 from Cilium 1.18, v2alpha1 before. Where v2 is not served,
    the listing and every watch after it use v2alpha1, and the objects say so."""
    v2alpha1 = "/apis/cilium.io/v2alpha1/ciliumcidrgroups"
    assert CIDRGROUPS.path == "/apis/cilium.io/v2/ciliumcidrgroups"
    api = ScriptedApi({
        CIDRGROUPS.path: [ApiError(404, "Not Found", "the server could not find the requested resource")],
        v2alpha1: [
            {"metadata": {"resourceVersion": "5"}, "items": [api_ccg("partners", "4", "192.0.2.0/24")]},
            Stream([{"type": "MODIFIED", "object": {"kind": "CiliumCIDRGroup", "apiVersion": "cilium.io/v2alpha1",
                                                    **api_ccg("partners", "6", "198.51.100.0/24")}}]),
        ],
    })
    got = run_watch(api, CIDRGROUPS, lambda got, w: len(api.watches(v2alpha1)) >= 2)
    assert len(api.lists(CIDRGROUPS.path)) == 1 and not api.watches(CIDRGROUPS.path)
    assert [q["resourceVersion"] for q in api.watches(v2alpha1)] == ["5", "6"]
    listed = next(x for x in got if isinstance(x, _Listed))
    (d,) = listed.items
    assert d.key == "CiliumCIDRGroup/partners" and d.doc is not None
    assert d.doc["apiVersion"] == "cilium.io/v2alpha1" and d.ref.api_version == "cilium.io/v2alpha1"
    assert "l7gate.io/cluster" not in d.doc["metadata"]["annotations"]  # a group belongs to no cluster
    event = next(x for x in got if isinstance(x, _Event))
    assert event.desired.doc is not None and event.desired.doc["spec"] == {"externalCIDRs": ["198.51.100.0/24"]}


def test_a_resource_served_in_no_version_it_names_is_retried() -> None:
    v2alpha1 = "/apis/cilium.io/v2alpha1/ciliumcidrgroups"
    gone = ApiError(404, "Not Found", "the server could not find the requested resource")
    api = ScriptedApi({CIDRGROUPS.path: [gone, gone, gone], v2alpha1: [gone, gone, gone]})
    got = run_watch(api, CIDRGROUPS, lambda got, w: len(api.lists(v2alpha1)) >= 2,
                    backoff=Backoff(base=0.2, cap=0.2, rng=lambda: 1.0))
    assert got == []
    # each version once per listing, the first first; then a back-off, and a new listing
    paths = [p for _, p, _ in api.requests]
    assert paths[:4] == [CIDRGROUPS.path, v2alpha1, CIDRGROUPS.path, v2alpha1], paths


# -- the watcher: readiness, one request per resource, Events ----------------------------------------


def make_watcher(api: ScriptedApi, sink: FakeSink) -> tuple[Watcher, list[str]]:
    logs: list[str] = []
    w = Watcher(api, sink, cluster="cluster-a", node="node-a1", log=logs.append,  # type: ignore[arg-type]
                watch_timeout=60, read_grace=5, backoff=lambda: Backoff(base=0.001, cap=0.002))
    return w, logs


def publications(sink: FakeSink) -> int:
    """How many outermost batches the sink saw end (nested ones publish nothing in the agent)."""
    depth = n = 0
    for call, _ in sink.calls:
        if call == "batch":
            depth += 1
        elif call == "publish":
            depth -= 1
            n += depth == 0
    return n


def late(api: ScriptedApi, path: str, gate: threading.Event) -> None:
    """The listing of `path` waits for `gate`."""
    orig = api.json

    def json_(method: str, p: str, query: Any = None, body: Any = None, timeout: Any = None) -> dict[str, Any]:
        if p == path and method == "GET":
            gate.wait(10)
        return orig(method, p, query, body, timeout)

    api.json = json_  # type: ignore[method-assign]


def policy_then_late_pod() -> tuple[ScriptedApi, threading.Event]:
    """One policy listed at once, one pod whose listing waits for the returned gate."""
    gate = threading.Event()
    api = ScriptedApi({CNPS.path: [{"metadata": {"resourceVersion": "3"}, "items": [api_cnp("a")]}],
                       PODS.path: [{"metadata": {"resourceVersion": "4"}, "items": [api_pod("p1", "10.0.0.5")]}]})
    late(api, PODS.path, gate)
    return api, gate


def test_the_first_listings_are_applied_while_a_later_one_is_on_its_way_and_published_once() -> None:
    """Policies are applied while the pods' listing is still coming, inside the batch the pods
    then join: one publication, pods after policies, ready only after the pods."""
    api, gate = policy_then_late_pod()
    sink = FakeSink()
    w, _ = make_watcher(api, sink)
    w.start()
    try:
        eventually(lambda: any(c[0] == "apply" for c in sink.calls), 5, "the policies applied")
        assert [c for c in sink.calls if c[0] == "apply"] == [("apply", ["CiliumNetworkPolicy/payments/a"])]
        assert publications(sink) == 0 and not w.ready  # held open for the pods
        gate.set()
        assert w.wait_ready(5)
        assert [c[1] for c in sink.calls if c[0] == "apply"] == [["CiliumNetworkPolicy/payments/a"],
                                                                 ["cluster-a/web/p1"]]
        assert publications(sink) == 1 and sink.calls[-1] == ("publish", None)
    finally:
        gate.set()
        w.stop()


def test_a_listing_that_does_not_come_lets_the_ones_before_it_be_published_after_the_hold() -> None:
    api, gate = policy_then_late_pod()
    sink = FakeSink()
    logs: list[str] = []
    w = Watcher(api, sink, cluster="cluster-a", node="node-a1", log=logs.append,  # type: ignore[arg-type]
                watch_timeout=60, read_grace=5, backoff=lambda: Backoff(base=0.001, cap=0.002), early_hold=0.3)
    w.start()
    try:
        eventually(lambda: publications(sink) == 1, 5, "the policies published after the hold")
        assert not w.ready and "pods" in " ".join(w.problems())
        assert any("no first listing of pods" in line for line in logs), logs
        assert ("CiliumNetworkPolicy", "CiliumNetworkPolicy/payments/a") in sink.docs
        gate.set()
        assert w.wait_ready(5)
        assert ("Pod", "cluster-a/web/p1") in sink.docs and publications(sink) == 2
    finally:
        gate.set()
        w.stop()


def test_a_failed_publication_of_the_held_batch_applies_the_whole_initial_sync_again() -> None:
    api, gate = policy_then_late_pod()
    sink = FakeSink()
    w, logs = make_watcher(api, sink)
    w.start()
    try:
        eventually(lambda: any(c[0] == "apply" for c in sink.calls), 5, "the policies applied")
        sink.fail_publish = 1
        gate.set()
        assert w.wait_ready(5)
        applies = [c[1] for c in sink.calls if c[0] == "apply"]
        # the policies again (the listing applied ahead is not lost), then the pods again
        assert applies.count(["CiliumNetworkPolicy/payments/a"]) == 2 and applies[-1] == ["cluster-a/web/p1"], applies
        assert any("publishing: OSError" in line for line in logs), logs
        assert ("CiliumNetworkPolicy", "CiliumNetworkPolicy/payments/a") in sink.docs
    finally:
        gate.set()
        w.stop()


def test_stopping_during_the_hold_publishes_what_was_applied() -> None:
    gate = threading.Event()
    api = ScriptedApi({CNPS.path: [{"metadata": {"resourceVersion": "3"}, "items": [api_cnp("a")]}]})
    late(api, PODS.path, gate)
    sink = FakeSink()
    w, _ = make_watcher(api, sink)
    w.start()
    stopper = threading.Thread(target=w.stop)
    try:
        eventually(lambda: any(c[0] == "apply" for c in sink.calls), 5, "the policies applied")
        assert publications(sink) == 0
        stopper.start()  # while the pods' listing is still on its way
        eventually(lambda: publications(sink) == 1, 5, "the held batch ended by the stop")
        assert not w.ready
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(10)
    assert not w.ready and publications(sink) == 1


def test_ready_only_once_every_first_listing_is_applied_together() -> None:
    gate = threading.Event()

    api = ScriptedApi({CNPS.path: [{"metadata": {"resourceVersion": "3"}, "items": [api_cnp("a"), api_cnp("b")]}]})
    orig = api.json

    def json_(method: str, path: str, query: Any = None, body: Any = None, timeout: Any = None) -> dict[str, Any]:
        if path == CNPS.path and method == "GET":
            gate.wait(5)  # the policies' listing is late
        return orig(method, path, query, body, timeout)

    api.json = json_  # type: ignore[method-assign]
    sink = FakeSink()
    w, logs = make_watcher(api, sink)
    health = EnforcementWatch(None, lambda: [], frozenset, "node")  # what /healthz answers from
    health.add_check(w.problems)
    w.start()
    try:
        eventually(lambda: all(x.listed_at for x in w.watches if x.resource is not CNPS), 5, "the other listings")
        assert not w.ready and "ciliumnetworkpolicies" in w.problems()[0]
        assert health.problems() == w.problems()
        # Nothing after the late listing is applied before it: never pods without policies;
        # and nothing is published (the batch the listings before it went into is open).
        assert [c for c in sink.calls if c[0] == "apply"] == [] and publications(sink) == 0
        gate.set()
        assert w.wait_ready(5)
        assert w.problems() == [] and health.problems() == []
        applies = [c for c in sink.calls if c[0] == "apply"]
        assert applies == [("apply", ["CiliumNetworkPolicy/payments/a", "CiliumNetworkPolicy/payments/b"])]
        assert publications(sink) == 1 and sink.calls[-1] == ("publish", None)
        st = w.status()
        assert st["synced"] and st["resources"]["ciliumnetworkpolicies"]["in_force"] == 2
        assert st["connection"] in ("connected", "disconnected") and st["server"] == api.host
        assert any("initial sync applied" in line for line in logs)
    finally:
        gate.set()
        w.stop()
    assert all(x.thread is not None and not x.thread.is_alive() for x in w.watches)


def test_a_refused_policy_gets_one_event_per_version_with_its_field_path() -> None:
    bad = api_cnp("bad", bad=True, rv="4")
    synced = threading.Event()
    api = ScriptedApi({CNPS.path: [
        {"metadata": {"resourceVersion": "5"}, "items": [bad, api_cnp("good")]},
        synced,
        Stream([{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}]),
        # the same version again in the new listing: not reported again
        {"metadata": {"resourceVersion": "9"}, "items": [bad, api_cnp("good")]},
        Stream([{"type": "MODIFIED", "object": api_cnp("bad", bad=True, rv="10")}], hold=True),
    ]})
    sink = FakeSink()
    w, logs = make_watcher(api, sink)
    w.start()
    try:
        assert w.wait_ready(5)
        eventually(lambda: w.events.posted == 1, 5, "an Event")
        synced.set()
        eventually(lambda: len(api.watches(CNPS.path)) >= 2 and w.events.posted >= 2, 5, "two Events")
        # still two, after the relist of the same version
        assert len(api.posted) == 2
    finally:
        w.stop()
    path, body = api.posted[0]
    assert path == "/api/v1/namespaces/payments/events"
    assert body["reason"] == "PolicyInvalid" and body["type"] == "Warning"
    assert body["involvedObject"] == {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "name": "bad",
                                      "namespace": "payments", "uid": "uid-bad", "resourceVersion": "4"}
    assert "spec.ingress[0].toPorts[0].rules.http[0].path: invalid regex" in body["message"]
    assert body["source"] == {"component": "l7gate-agent", "host": "node-a1"}
    assert api.posted[1][1]["involvedObject"]["resourceVersion"] == "10"
    assert sink.keys("CiliumNetworkPolicy") == {"CiliumNetworkPolicy/payments/good"}
    assert sum("refused" in line for line in logs) == 2
    st = w.status()
    assert st["refused"] and st["refused"][0]["object"] == "CiliumNetworkPolicy payments/bad"


def test_in_cluster_configuration(tmp_path: Any) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token-1")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    c = load_configuration("", environ=env, token_file=str(token), ca_file=str(ca))
    assert c.host == "https://10.96.0.1:443" and c.ssl_ca_cert == str(ca)
    assert c.auth_settings()["BearerToken"]["value"].lower() == "bearer sa-token-1"
    with pytest.raises(KubeConfigError, match="outside a pod, set kubernetes.kubeconfig"):
        load_configuration("", environ={}, token_file=str(token), ca_file=str(ca))


def test_kubeconfig_configuration(tmp_path: Any) -> None:
    kc = tmp_path / "kubeconfig"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "double", "context": {"cluster": "c", "user": "u"}}],
    }))
    c = load_configuration(str(kc))
    assert c.host == "http://127.0.0.1:6443" and c.auth_settings()["BearerToken"]["value"] == "Bearer t0ken"
    with pytest.raises(KubeConfigError, match="kubeconfig /nonexistent"):
        load_configuration("/nonexistent")



def test_a_refused_cidr_group_gets_an_event_in_the_default_namespace() -> None:
    bad = api_ccg("partners", "4", "(unclosed")
    api = ScriptedApi({CIDRGROUPS.path: [{"metadata": {"resourceVersion": "5"}, "items": [bad]}]})
    sink = FakeSink()
    w, logs = make_watcher(api, sink)
    w.start()
    try:
        assert w.wait_ready(5)
        eventually(lambda: w.events.posted == 1, 5, "an Event")
    finally:
        w.stop()
    path, body = api.posted[0]
    assert path == "/api/v1/namespaces/default/events"  # a cluster-scoped object's
    assert body["reason"] == "CIDRGroupInvalid"
    assert body["involvedObject"]["kind"] == "CiliumCIDRGroup" and body["involvedObject"]["name"] == "partners"
    assert "refused this CIDR group" in body["message"]
