"""Named ports through the agent: the pods the agent is told about are what `port: http`
resolves against, and every change of a pod (its ports, its labels, a new replica, a deletion,
a restart) moves the resolved verdicts — in the resolver's maps, the kernel's policy map
entries and the xDS publisher's per-port decisions — through the agent's ordinary apply path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.policy.mapstate import Action, PortView, decide
from l7gate.policy.types import Direction, Protocol
from l7gate.redirect_bpf.compile import DIR_NUMBERS, KAction, compile_endpoint, lookup
from l7gate.xds.cache import SnapshotCache

TCP = Protocol.TCP


def pod(name: str, ip: str, labels: dict[str, str], ports: list[tuple[str, int]] = (),  # type: ignore[assignment]
        *, node: str = "n1", protocol: str = "TCP") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"nodeName": node, "containers": [
            {"name": "app", "ports": [{"name": n, "containerPort": p, "protocol": protocol} for n, p in ports]}]},
        "status": {"podIP": ip, "hostIP": "192.0.2.1" if node == "n1" else "192.0.2.2"},
    }


POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "api", "namespace": "shop"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}],
                     "toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}],
                                  "rules": {"http": [{"method": "GET"}]}}]}],
        "egress": [{"toEndpoints": [{"matchLabels": {"role": "db"}}],
                    "toPorts": [{"ports": [{"port": "postgres", "protocol": "TCP"}]}]}],
    },
}


def make(tmp_path: Path) -> tuple[AgentCore, SQLiteKVStore]:
    cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    return AgentCore(cfg, store, SnapshotCache()), store


@pytest.fixture
def core(tmp_path: Path) -> Any:
    c, store = make(tmp_path)
    yield c
    store.close()


def ident(core: AgentCore, name: str) -> int:
    return core.view().pods[f"cluster-a/shop/{name}"].identity


def ingress(core: AgentCore, port: int) -> Action:
    api, web = ident(core, "api-1"), ident(core, "web-1")
    return decide(core.resolver.endpoint_policy(api), Direction.INGRESS, web, port, TCP).action


def egress(core: AgentCore, peer: str, port: int) -> Action:
    return decide(core.resolver.endpoint_policy(ident(core, "api-1")), Direction.EGRESS, ident(core, peer), port,
                  TCP).action


def kernel(core: AgentCore, port: int) -> KAction | None:
    """What the kernel's policy map says about web → api on `port` (TCP, ingress)."""
    api, web = ident(core, "api-1"), ident(core, "web-1")
    pol = core.resolver.endpoint_policy(api)
    assert pol is not None
    value = lookup(compile_endpoint(pol), api, DIR_NUMBERS[Direction.INGRESS], 6, web, port)
    return None if value is None else value.action


def test_ingress_named_port_follows_the_pods_container_ports(core: AgentCore) -> None:
    core.apply([
        pod("api-1", "10.0.0.10", {"app": "api"}, [("http", 8080)]),
        pod("web-1", "10.0.0.20", {"app": "web"}, node="n2"),
        POLICY,
    ])
    assert (ingress(core, 8080), ingress(core, 8081)) == (Action.HTTP, Action.DENY)
    assert (kernel(core, 8080), kernel(core, 8081)) == (KAction.REDIRECT, KAction.DENY)
    # The port moves (the pod is re-applied with another containerPort): so does the verdict.
    core.apply([pod("api-1", "10.0.0.10", {"app": "api"}, [("http", 8081)])])
    assert (ingress(core, 8080), ingress(core, 8081)) == (Action.DENY, Action.HTTP)
    assert (kernel(core, 8080), kernel(core, 8081)) == (KAction.DENY, KAction.REDIRECT)
    # Envoy's decision for the port (what its RBAC for that listener is built from)
    api, web = ident(core, "api-1"), ident(core, "web-1")
    view = PortView(core.resolver.endpoint_policy(api), Direction.INGRESS, 8081)
    assert view.decide(web).action is Action.HTTP and [str(h) for h in view.decide(web).http] == ["{method=GET}"]
    # A second replica (same labels: same identity) declares http as 8080: the pods of the
    # identity disagree, the name selects nothing (fail closed) until they agree again.
    core.apply([pod("api-2", "10.0.0.11", {"app": "api"}, [("http", 8080)])])
    assert ident(core, "api-2") == api
    assert (ingress(core, 8080), ingress(core, 8081)) == (Action.DENY, Action.DENY)
    core.delete_pod("shop/api-2")
    assert (ingress(core, 8080), ingress(core, 8081)) == (Action.DENY, Action.HTTP)
    # A replica that does not declare http at all: on ingress a name must be every pod's of the
    # identity (Cilium would allow the pods that declare it only; l7gate has one map for both).
    core.apply([pod("api-3", "10.0.0.12", {"app": "api"}, [("metrics", 9090)])])
    assert ingress(core, 8081) is Action.DENY
    core.delete_pod("shop/api-3")
    assert ingress(core, 8081) is Action.HTTP
    # The port's name changes: nothing is named http any more.
    core.apply([pod("api-1", "10.0.0.10", {"app": "api"}, [("web", 8081)])])
    assert ingress(core, 8081) is Action.DENY


def test_egress_named_port_resolves_on_each_peer(core: AgentCore) -> None:
    core.apply([
        pod("api-1", "10.0.0.10", {"app": "api"}),
        pod("web-1", "10.0.0.20", {"app": "web"}, node="n2"),
        pod("pg-1", "10.0.0.30", {"app": "pg", "role": "db"}, [("postgres", 5432)], node="n2"),
        pod("pg-old", "10.0.0.31", {"app": "pg-old", "role": "db"}, [("postgres", 5433)], node="n2"),
        pod("cache-1", "10.0.0.40", {"app": "cache"}, [("postgres", 6379)], node="n2"),
        POLICY,
    ])
    assert egress(core, "pg-1", 5432) is Action.ALLOW and egress(core, "pg-1", 5433) is Action.DENY
    assert egress(core, "pg-old", 5433) is Action.ALLOW and egress(core, "pg-old", 5432) is Action.DENY
    assert egress(core, "cache-1", 6379) is Action.DENY  # declares the name, but is no peer of the rule
    # A replica of pg without the name: on egress the pods that declare it decide (as Cilium).
    core.apply([pod("pg-2", "10.0.0.33", {"app": "pg", "role": "db"}, node="n2")])
    assert ident(core, "pg-2") == ident(core, "pg-1") and egress(core, "pg-1", 5432) is Action.ALLOW
    # Relabelled into the rule's peers: its own port comes with it; out again, it goes.
    core.apply([pod("cache-1", "10.0.0.40", {"app": "cache", "role": "db"}, [("postgres", 6379)], node="n2")])
    assert egress(core, "cache-1", 6379) is Action.ALLOW
    core.apply([pod("cache-1", "10.0.0.40", {"app": "cache"}, [("postgres", 6379)], node="n2")])
    assert egress(core, "cache-1", 6379) is Action.DENY
    # A new pod of a peer identity declaring the name with its own protocol (UDP): not TCP's.
    core.apply([pod("pg-udp", "10.0.0.32", {"app": "pg-udp", "role": "db"}, [("postgres", 5432)], node="n2",
                    protocol="UDP")])
    assert egress(core, "pg-udp", 5432) is Action.DENY


def test_named_ports_are_resolved_again_after_a_restart(tmp_path: Path) -> None:
    core, store = make(tmp_path)
    core.apply([
        pod("api-1", "10.0.0.10", {"app": "api"}, [("http", 8081)]),
        pod("web-1", "10.0.0.20", {"app": "web"}, node="n2"),
        POLICY,
    ])
    before = core.resolver.endpoint_policy(ident(core, "api-1"))
    store.close()
    again, store = make(tmp_path)
    try:
        assert ingress(again, 8081) is Action.HTTP and ingress(again, 8080) is Action.DENY
        after = again.resolver.endpoint_policy(ident(again, "api-1"))
        assert before is not None and after is not None
        assert dict(before.ingress) == dict(after.ingress) and dict(before.egress) == dict(after.egress)
    finally:
        store.close()
