"""Large applies (issue 11: 12,310 policies in one request took minutes and blocked every read).

An apply of thousands of policies is all or nothing whatever its size — an invalid object at
the end, or a store that fails to persist it, leaves everything as it was — it takes seconds,
not minutes, and readers answer from the state before it until it completes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import POLICY_PREFIX, AgentCore, ApplyError
from l7gate.kvstore.api import KVStoreError
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.xds.cache import SnapshotCache

N = 4000  # policies: two local endpoints, each selected by 2,000 of them
APPS, PEERS = 2, 20


def pod(name: str, ip: str, labels: dict[str, str], cluster: str, ports: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels,
                     "annotations": {"l7gate.io/cluster": cluster}},
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": p} for p in ports]}]},
        "status": {"podIP": ip},
    }


def pods() -> list[dict[str, Any]]:
    return [
        *(pod(f"api{a}", f"127.0.1.{10 + a}", {"app": f"api{a}"}, "cluster-a", (8080,)) for a in range(APPS)),
        *(pod(f"client{c}", f"127.0.2.{10 + c}", {"app": f"client{c}"}, "cluster-b") for c in range(PEERS)),
    ]


def policy(j: int) -> dict[str, Any]:
    """Policy j lets client j%20 GET /api/j/items/<n> on api j%2."""
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"bulk-{j}", "namespace": "shop"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": f"api{j % APPS}"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": f"client{j % PEERS}"}}],
                "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                             "rules": {"http": [{"method": "GET", "path": f"/api/{j}/items/[0-9]+"}]}}],
            }],
        },
    }


def config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, clusters={"cluster-b": 2},
                       state_dir=str(tmp_path), envoy=EnvoySettings(enabled=False), upstream_port_offset=10000)


class StoreFailingOn:
    """The agent's store, except that writing one key fails, as a full disk would."""

    def __init__(self, store: SQLiteKVStore, key: str) -> None:
        self.store = store
        self.key = key

    def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        if key == self.key:
            raise KVStoreError(f"{key}: database or disk is full")
        return self.store.put(key, value, lease)

    def put_many(self, items: Iterable[tuple[str, bytes]], lease: int | None = None) -> int:
        """Fails, having written nothing, when one of the keys is that one (as SQLite's
        statement would; the caller's batch rolls back what came before)."""
        items = list(items)
        if any(key == self.key for key, _ in items):
            raise KVStoreError(f"{self.key}: database or disk is full")
        return self.store.put_many(items, lease)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteKVStore]:
    s = SQLiteKVStore(str(tmp_path / "kv.db"))
    yield s
    s.close()


def state(core: AgentCore, store: SQLiteKVStore, cache: SnapshotCache) -> Any:
    """Everything an apply may change: what is in force, what is enforced, what is stored."""
    snap = cache.get_snapshot(core.config.node_id)
    return (
        views.policies(core.view()), views.endpoint_policies(core.view()), core.resolver.revision, core.revision,
        store.list_prefix(POLICY_PREFIX), dict(snap.versions) if snap is not None else None,
    )


@pytest.mark.timing
def test_a_bad_object_at_the_end_of_a_large_batch_changes_nothing(tmp_path: Path, store: SQLiteKVStore) -> None:
    cache = SnapshotCache()
    core = AgentCore(config(tmp_path), store, cache)
    core.apply(pods())
    docs = [policy(j) for j in range(N)]
    core.apply(docs[:10])
    before = state(core, store, cache)
    bad = policy(N)
    bad["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"] = "/api/(unclosed"
    with pytest.raises(ApplyError) as ei:
        core.apply([*docs, bad])
    (error,) = ei.value.errors
    assert error.startswith(f"CiliumNetworkPolicy/shop/bulk-{N}: spec.ingress[0].toPorts[0].rules.http[0].path: "
                            "invalid RE2 regex"), error
    assert state(core, store, cache) == before
    # Without it, the same request is applied as a whole, in seconds (it took ~7 s when every
    # policy was resolved on its own, ~0.7 s as one change).
    t0 = time.monotonic()
    result = core.apply(docs)
    took = time.monotonic() - t0
    assert (len(result.created), len(result.unchanged)) == (N - 10, 10)
    assert took <= 3.0, f"{N} policies took {took:.1f} s ({getattr(result, 'timing', '')})"
    assert len(views.policies(core.view())) == N and len(store.list_prefix(POLICY_PREFIX)) == N
    # What is enforced is what one policy at a time gave: client 3 may GET /api/<j>/items/<n>
    # on api1 for every j = 3 (mod 20), and nothing else.
    api1 = next(p for p in views.pods(core.view()) if p["ref"] == "cluster-a/shop/api1")["identity"]
    client3 = next(p for p in views.pods(core.view()) if p["ref"] == "cluster-b/shop/client3")["identity"]
    (ep,) = [e for e in views.endpoint_policies(core.view()) if e["identity"] == api1]
    (entry,) = [e for e in ep["ingress"]["entries"] if e["peer"] == client3]
    assert entry["action"] == "proxy"
    assert sorted(entry["http"]) == sorted(f"{{method=GET path=/api/{j}/items/[0-9]+}}" for j in range(3, N, PEERS))


def test_a_store_failure_at_the_end_of_a_large_batch_changes_nothing(tmp_path: Path, store: SQLiteKVStore) -> None:
    """The request's writes are one transaction; no policy of it is in force before that is
    committed. (A failure to persist the last policy left the others in force, unpersisted.)"""
    cache = SnapshotCache()
    failing = StoreFailingOn(store, POLICY_PREFIX + f"CiliumNetworkPolicy/shop/bulk-{N - 1}")
    core = AgentCore(config(tmp_path), failing, cache)  # type: ignore[arg-type]
    core.apply(pods())
    docs = [policy(j) for j in range(N)]
    core.apply(docs[:10])
    before = state(core, store, cache)
    with pytest.raises(KVStoreError):
        core.apply(docs)
    assert state(core, store, cache) == before
    failing.key = ""
    assert len(core.apply(docs).created) == N - 10


@pytest.mark.timing
def test_readers_answer_from_the_state_before_a_long_apply(tmp_path: Path, store: SQLiteKVStore) -> None:
    """`policy get`, `endpoint list`, identities and status counts do not wait for an apply in
    progress: they answer at once, from the state in force before it, until it completes."""
    core = AgentCore(config(tmp_path), store, SnapshotCache())
    core.apply(pods())
    docs = [policy(j) for j in range(N)]
    core.apply(docs[:5])
    before = (views.policies(core.view()), views.endpoint_policies(core.view()), views.pods(core.view()), views.identities(core.view()))
    publishing = threading.Event()
    release = threading.Event()
    flush = core._flush

    def held_flush() -> None:  # the apply, holding the core's lock, waits here
        publishing.set()
        release.wait(10)
        flush()

    core._flush = held_flush  # type: ignore[method-assign]
    applier = threading.Thread(target=core.apply, args=(docs,))
    applier.start()
    timer = threading.Timer(3.0, release.set)  # so that a reader that waits is not stuck for long
    try:
        assert publishing.wait(60)
        timer.start()
        t0 = time.monotonic()
        during = (views.policies(core.view()), views.endpoint_policies(core.view()), views.pods(core.view()), views.identities(core.view()))
        counts = views.pod_counts(core.view())
        took = time.monotonic() - t0
        still_applying = applier.is_alive() and not release.is_set()
    finally:
        release.set()
        timer.cancel()
        applier.join(60)
    assert took < 1.0 and still_applying, f"the reads waited {took:.1f} s for the apply"
    assert during == before
    assert counts == {"known": APPS + PEERS, "local": APPS}
    assert len(views.policies(core.view())) == N  # and the apply's result once it completed
