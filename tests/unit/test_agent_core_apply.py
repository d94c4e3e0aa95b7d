"""AgentCore's apply path keeps per-change indexes (pod IPs, local pods, auth-required entries)
instead of passing over every pod or every map entry per request: these tests check that what
it answers from them is what a pass over everything gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings, MTLSSettings
from l7gate.agent.core import AgentCore, ApplyError
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.policy.types import AuthMode, Direction
from l7gate.xds.cache import SnapshotCache


def pod(name: str, ip: str, labels: dict[str, str], *, cluster: str = "cluster-a",
        node: str | None = None, host_ip: str | None = None, ports: tuple[int, ...] = ()) -> dict[str, Any]:
    status: dict[str, Any] = {"podIP": ip}
    if host_ip:
        status["hostIP"] = host_ip
    spec: dict[str, Any] = {"containers": [{"name": "app", "ports": [{"containerPort": p} for p in ports]}]}
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "web", "labels": labels,
                     "annotations": {"l7gate.io/cluster": cluster}},
        "spec": spec, "status": status,
    }


def auth_policy(name: str, peers: list[dict[str, Any]] | None, port: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}],
                            "authentication": {"mode": "required"}}
    if peers is not None:
        rule["fromEndpoints"] = peers
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"endpointSelector": {"matchLabels": {"app": "billing"}}, "ingress": [rule]},
    }


@pytest.fixture
def core(tmp_path: Path) -> Any:
    # kernel mode: pods on 10.x addresses, as on a real pod network (loopback mode wants 127.x)
    cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, clusters={"cluster-b": 2},
                      state_dir=str(tmp_path), envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    c = AgentCore(cfg, store, SnapshotCache())
    yield c
    store.close()


def auth_wanted_by_full_pass(core: AgentCore, port: int) -> dict[tuple[int, int], set[tuple[str, int]]]:
    """What `auth_wanted` answered before it had an index: every entry of every map."""
    workloads = [i for i in core.resolver.identities if i >= 256]
    out: dict[tuple[int, int], set[tuple[str, int]]] = {}
    for ep in core.resolver.endpoints():
        pol = core.resolver.endpoint_policy(ep)
        assert pol is not None
        for d in Direction:
            for key, entry in pol.entries(d).items():
                if entry.deny or entry.auth is not AuthMode.REQUIRED:
                    continue
                for remote in ([key.peer] if key.peer != 0 else workloads):
                    nodes = {(p["hostIP"], port) for p in _pods_of(core, remote) if p.get("hostIP")}
                    if nodes:
                        out.setdefault((ep, remote), set()).update(nodes)
    return out


def _pods_of(core: AgentCore, identity: int) -> list[dict[str, Any]]:
    return [{"hostIP": r.pod.host_ip} for r in core.view().pods.values() if r.identity == identity]


def test_auth_wanted_follows_policy_and_pod_changes(core: AgentCore) -> None:
    core.apply([
        pod("billing", "10.0.0.10", {"app": "billing"}, node="n1", host_ip="192.0.2.1", ports=(8080,)),
        pod("front-1", "10.0.1.1", {"app": "front"}, cluster="cluster-b", host_ip="192.0.2.2"),
        pod("front-2", "10.0.1.2", {"app": "front"}, cluster="cluster-b", host_ip="192.0.2.3"),
        pod("db", "10.0.1.3", {"app": "db"}, cluster="cluster-b", host_ip="192.0.2.4"),
    ])
    assert core.auth_wanted(4250) == {}
    core.apply([auth_policy("auth-front", [{"matchLabels": {"app": "front"}}], "8080")])
    front = core.auth_wanted(4250)
    assert front and front == auth_wanted_by_full_pass(core, 4250)
    assert {nodes for v in front.values() for nodes in v} == {("192.0.2.2", 4250), ("192.0.2.3", 4250)}
    core.apply([auth_policy("auth-any", None, "9090")])  # every peer: the ANY key
    assert core.auth_wanted(4250) == auth_wanted_by_full_pass(core, 4250)
    assert any(("192.0.2.4", 4250) in v for v in core.auth_wanted(4250).values())
    core.apply([pod("front-3", "10.0.1.4", {"app": "front"}, cluster="cluster-b", host_ip="192.0.2.5")])
    assert core.auth_wanted(4250) == auth_wanted_by_full_pass(core, 4250)
    core.delete_policy("CiliumClusterwideNetworkPolicy/auth-any")
    core.delete_pod("cluster-b/web/front-1")
    assert core.auth_wanted(4250) == auth_wanted_by_full_pass(core, 4250)
    assert all(("192.0.2.4", 4250) not in v for v in core.auth_wanted(4250).values())


def test_pod_ip_conflicts_follow_the_pods_in_force(core: AgentCore) -> None:
    core.apply([pod("a", "10.0.0.1", {"app": "a"})])
    with pytest.raises(ApplyError, match="10.0.0.1 is already used by cluster-a/web/a"):
        core.apply([pod("b", "10.0.0.1", {"app": "b"})])
    with pytest.raises(ApplyError, match="already used by cluster-a/web/c"):
        core.apply([pod("c", "10.0.0.2", {"app": "c"}), pod("d", "10.0.0.2", {"app": "d"})])
    core.apply([pod("a", "10.0.0.3", {"app": "a"})])  # a moves: its old address is free
    core.apply([pod("b", "10.0.0.1", {"app": "b"})])
    with pytest.raises(ApplyError, match="already used by cluster-a/web/a"):
        core.apply([pod("e", "10.0.0.3", {"app": "e"})])
    core.delete_pod("web/a")
    core.apply([pod("e", "10.0.0.3", {"app": "e"})])


def test_local_pods_and_ports(core: AgentCore) -> None:
    core.apply([
        pod("billing", "10.0.0.10", {"app": "billing"}, node="n1", ports=(8080,)),
        pod("other-node", "10.0.0.11", {"app": "billing"}, node="n2", ports=(8081,)),
        pod("remote", "10.0.1.1", {"app": "front"}, cluster="cluster-b", ports=(8082,)),
    ])
    billing = core.view().pods["cluster-a/web/billing"].identity
    assert core.local_identities() == {billing}
    assert [(p.ip, p.port) for p in core.publisher.ports] == [("10.0.0.10", 8080)]
    assert [i["endpoint"] for i in views.identities(core.view()) if i["identity"] == billing] == [True]
    core.delete_pod("web/billing")
    assert core.local_identities() == set()
    assert core.publisher.ports == []


# -- bad input (issue 11) ---------------------------------------------------------------------


@pytest.fixture
def make_core(tmp_path: Path) -> Any:
    """AgentCores with AgentConfig fields overridden (the datapath mode, mutual auth)."""
    stores: list[SQLiteKVStore] = []

    def make(**overrides: Any) -> AgentCore:
        d = tmp_path / str(len(stores))
        d.mkdir()
        cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, clusters={"cluster-b": 2},
                          state_dir=str(d), envoy=EnvoySettings(enabled=False))
        stores.append(SQLiteKVStore(str(d / "kv.db")))
        return AgentCore(dataclasses.replace(cfg, **overrides), stores[-1], SnapshotCache())

    yield make
    for s in stores:
        s.close()


def cnp(name: str, namespace: str | None, app: str) -> dict[str, Any]:
    meta = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": meta,
        "spec": {"endpointSelector": {"matchLabels": {"app": app}}, "ingress": [{}]},
    }


def test_the_same_policy_twice_in_one_request_is_refused(core: AgentCore) -> None:
    core.apply([cnp("p", "web", "a")])
    before = views.policies(core.view())
    # "default" spelled out and left to the default name the same policy
    with pytest.raises(ApplyError) as ei:
        core.apply([cnp("q", None, "a"), pod("x", "10.0.0.1", {"app": "x"}), cnp("q", "default", "b")])
    assert ei.value.errors == [
        "object 3: CiliumNetworkPolicy/default/q is also object 1 of this request: a request may hold "
        "each policy once (same kind, namespace and name); remove or rename one"
    ]
    with pytest.raises(ApplyError, match="object 2: CiliumNetworkPolicy/web/p is also object 1"):
        core.apply([cnp("p", "web", "b"), cnp("p", "web", "a")])
    with pytest.raises(ApplyError, match="object 2: pod/cluster-a/web/x is also object 1"):
        core.apply([pod("x", "10.0.0.1", {"app": "x"}), pod("x", "10.0.0.2", {"app": "x"})])
    assert views.policies(core.view()) == before and views.pods(core.view()) == []


def test_pod_addresses_the_loopback_datapath_cannot_serve_are_refused(make_core: Any) -> None:
    core = make_core(datapath_mode="loopback")
    with pytest.raises(ApplyError) as ei:
        core.apply([pod("billing", "10.0.0.10", {"app": "billing"}, node="n1", ports=(8080,))])
    [err] = ei.value.errors
    assert err.startswith("Pod cluster-a/web/billing: status.podIP: 10.0.0.10 is outside 127.0.0.0/8")
    assert "datapath.mode: loopback" in err
    with pytest.raises(ApplyError, match=r"status\.podIPs\[1\]\.ip: fd00::1 is an IPv6 address: .*not supported by l7gate"):
        doc = pod("dual", "127.0.0.20", {"app": "dual"})
        doc["status"]["podIPs"] = [{"ip": "127.0.0.20"}, {"ip": "fd00::1"}]
        core.apply([doc])
    with pytest.raises(ApplyError, match=r"status\.podIP: 0\.0\.0\.0 is the unspecified address"):
        core.apply([pod("any", "0.0.0.0", {"app": "any"}, node="n1", ports=(8080,))])
    assert views.pods(core.view()) == [] and core.publisher.ports == []
    # pods this node does not serve may have any (IPv4 unicast) address; local ones 127.x
    core.apply([
        pod("billing", "127.0.0.10", {"app": "billing"}, node="n1", ports=(8080,)),
        pod("elsewhere", "10.0.0.11", {"app": "billing"}, node="n2", ports=(8080,)),
        pod("remote", "10.0.1.1", {"app": "front"}, cluster="cluster-b"),
    ])
    assert [(p.ip, p.port) for p in core.publisher.ports] == [("127.0.0.10", 8080)]


def test_loopback_pod_addresses_are_refused_in_kernel_mode(make_core: Any) -> None:
    core = make_core(datapath_mode="kernel")
    for doc in (pod("local", "127.0.0.10", {"app": "a"}, node="n1"),
                pod("remote", "127.0.1.1", {"app": "b"}, cluster="cluster-b")):
        with pytest.raises(ApplyError, match=r"status\.podIP: 127\.0\.\d\.\d+ is a loopback address"):
            core.apply([doc])
    with pytest.raises(ApplyError, match=r"status\.podIP: fd00::5 is an IPv6 address"):
        core.apply([pod("v6", "fd00::5", {"app": "c"}, cluster="cluster-b")])
    core.apply([pod("local", "10.0.0.10", {"app": "a"}, node="n1")])
    assert [p["ips"] for p in views.pods(core.view())] == [["10.0.0.10"]]


def test_auth_required_without_mutual_auth_is_applied_with_a_warning(make_core: Any) -> None:
    core = make_core()
    doc = auth_policy("auth-front", [{"matchLabels": {"app": "front"}}], "8080")
    doc["spec"]["ingress"].insert(0, {"fromEndpoints": [{"matchLabels": {"app": "x"}}]})
    result = core.apply([doc, cnp("plain", "web", "a")])
    assert result.created == ["CiliumClusterwideNetworkPolicy/auth-front", "CiliumNetworkPolicy/web/plain"]
    [warning] = result.warnings
    assert warning.startswith("CiliumClusterwideNetworkPolicy/auth-front: spec.ingress[1].authentication: ")
    assert "mtls.enabled" in warning and "dropped" in warning
    data = result.to_json()
    assert {"created", "configured", "unchanged", "deleted", "warnings"} <= set(data)  # keys kept, one added
    assert data["warnings"] == [warning]
    assert core.apply([doc]).warnings == [warning]  # unchanged, and still not in force as written
    enabled = make_core(mtls=MTLSSettings(enabled=True, listen="127.0.0.1:4250"))
    assert enabled.apply([doc]).warnings == []
