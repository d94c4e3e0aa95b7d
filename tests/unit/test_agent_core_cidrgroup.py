"""CiliumCIDRGroups through the agent's core (the path `policy apply`, the admin API and the
Kubernetes watch share): a policy naming a group selects the group's CIDRs as CIDR identities in
the ipcache and the resolved maps; a group created, changed or deleted updates every policy
naming it; groups are listed with the policies, restored after a restart, deleted by key; a bad
group is refused with its field path and changes nothing."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore, ApplyError
from l7gate.identity.ipcache import parse_prefix
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.policy.mapstate import lookup
from l7gate.policy.types import Direction, Protocol
from l7gate.xds.cache import SnapshotCache

GROUP_KEY = "CiliumCIDRGroup/partners"
POLICY_KEY = "CiliumNetworkPolicy/payments/to-partners"
CLIENT = "cluster-a/payments/client"


def group(name: str = "partners", *cidrs: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumCIDRGroup", "metadata": meta,
            "spec": {"externalCIDRs": list(cidrs)}}


def egress_policy(entry: dict[str, Any], name: str = "to-partners") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "payments"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                     "egress": [{"toCIDRSet": [entry], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}}


CLIENT_POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": "payments", "labels": {"app": "client"}},
    "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.1.10"},
}


def make_core(tmp_path: Path) -> tuple[AgentCore, SQLiteKVStore]:
    cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    return AgentCore(cfg, store, SnapshotCache()), store


@pytest.fixture
def core(tmp_path: Path) -> Iterator[AgentCore]:
    c, store = make_core(tmp_path)
    c.apply([CLIENT_POD])
    yield c
    store.close()


def client_id(core: AgentCore) -> int:
    return next(r.identity for r in core.view().pods.values() if r.pod.ref == CLIENT)


def may_connect(core: AgentCore, address: str, port: int = 443) -> bool:
    """The client's egress verdict for `address`, whose identity the ipcache gives (world when
    no prefix holds it), as the kernel decides it."""
    policy = core.resolver.endpoint_policy(client_id(core))
    return lookup(policy, Direction.EGRESS, core.ipcache.lookup(address), port, Protocol.TCP).allowed


def prefixes(core: AgentCore) -> set[str]:
    return {e.prefix.with_prefixlen for e in core.ipcache.snapshot() if e.prefix.prefixlen < 32}


def test_a_group_created_changed_and_deleted_updates_the_policy_naming_it(core: AgentCore) -> None:
    core.apply([egress_policy({"cidrGroupRef": "partners"})])
    # No such group yet: the reference selects nothing, and the rule still puts egress in default-deny.
    assert not may_connect(core, "192.0.2.10")
    assert prefixes(core) == set()

    assert core.apply([group("partners", "192.0.2.0/24")]).to_json()["created"] == [GROUP_KEY]
    assert prefixes(core) == {"192.0.2.0/24"}
    assert may_connect(core, "192.0.2.10")
    assert not may_connect(core, "192.0.2.10", 80)
    assert not may_connect(core, "198.51.100.7")

    # changed: the old CIDR leaves the ipcache with the policy's selection, the new one comes in
    assert core.apply([group("partners", "198.51.100.0/24")]).to_json()["configured"] == [GROUP_KEY]
    assert prefixes(core) == {"198.51.100.0/24"}
    assert not may_connect(core, "192.0.2.10")
    assert may_connect(core, "198.51.100.7")

    assert core.delete_policy(GROUP_KEY)
    assert prefixes(core) == set()
    assert not may_connect(core, "198.51.100.7")
    assert list(core.documents("CiliumNetworkPolicy")) == [POLICY_KEY]  # the policy stays in force
    assert not core.delete_cidr_group(GROUP_KEY)


def test_a_group_and_the_policy_naming_it_in_one_request_with_except(core: AgentCore) -> None:
    result = core.apply([egress_policy({"cidrGroupRef": "partners", "except": ["192.0.2.128/25"]}),
                         group("partners", "192.0.2.0/24", "203.0.113.0/24")])
    assert sorted(result.to_json()["created"]) == [GROUP_KEY, POLICY_KEY]
    # each CIDR and the except range have a CIDR identity: the range carves the CIDR out
    assert prefixes(core) == {"192.0.2.0/24", "192.0.2.128/25", "203.0.113.0/24"}
    assert may_connect(core, "192.0.2.10")
    assert not may_connect(core, "192.0.2.200")
    assert may_connect(core, "203.0.113.1")


def test_a_group_selector_follows_the_groups_labels(core: AgentCore) -> None:
    core.apply([egress_policy({"cidrGroupSelector": {"matchLabels": {"role": "partner"}}}),
                group("partners", "192.0.2.0/24", labels={"role": "partner"}),
                group("others", "198.51.100.0/24", labels={"role": "other"})])
    assert may_connect(core, "192.0.2.10") and not may_connect(core, "198.51.100.7")
    core.apply([group("others", "198.51.100.0/24", labels={"role": "partner"})])
    assert may_connect(core, "192.0.2.10") and may_connect(core, "198.51.100.7")
    core.apply([group("partners", "192.0.2.0/24", labels={"role": "gone"})])
    assert not may_connect(core, "192.0.2.10") and may_connect(core, "198.51.100.7")


def test_a_deny_rule_naming_a_group_follows_it(core: AgentCore) -> None:
    allow_wide = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                  "metadata": {"name": "allow-192", "namespace": "payments"},
                  "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                           "egress": [{"toCIDR": ["192.0.0.0/8"]}],
                           "egressDeny": [{"toCIDRSet": [{"cidrGroupRef": "blocked"}]}]}}
    core.apply([allow_wide])
    assert may_connect(core, "192.0.2.10")  # the group does not exist: nothing is denied
    core.apply([group("blocked", "192.0.2.0/24")])
    assert not may_connect(core, "192.0.2.10") and may_connect(core, "192.0.3.7")  # deny wins
    core.delete_cidr_group("CiliumCIDRGroup/blocked")
    assert may_connect(core, "192.0.2.10")


def test_groups_are_listed_with_the_policies_restored_and_deleted(tmp_path: Path) -> None:
    core, store = make_core(tmp_path)
    try:
        core.apply([CLIENT_POD, egress_policy({"cidrGroupRef": "partners"}), group("partners", "192.0.2.0/24")])
        assert core.apply([group("partners", "192.0.2.0/24")]).to_json()["unchanged"] == [GROUP_KEY]
        assert [p["key"] for p in views.policies(core.view())] == [GROUP_KEY, POLICY_KEY]
        assert list(core.documents("CiliumCIDRGroup")) == [GROUP_KEY]
        assert core.document("CiliumCIDRGroup", GROUP_KEY) == group("partners", "192.0.2.0/24")
        assert not any(k.startswith("CiliumCIDRGroup/") for k in core.documents("CiliumNetworkPolicy"))
        ident = core.ipcache.get(parse_prefix("192.0.2.0/24"))
    finally:
        store.close()
    core, store = make_core(tmp_path)  # a restarted agent enforces what it restored
    try:
        assert list(core.documents("CiliumCIDRGroup")) == [GROUP_KEY]
        assert core.ipcache.get(parse_prefix("192.0.2.0/24")) == ident
        assert may_connect(core, "192.0.2.10")
        assert core.delete_policy(GROUP_KEY)
        assert not may_connect(core, "192.0.2.10")
    finally:
        store.close()
    core, store = make_core(tmp_path)  # the deletion is persisted too
    try:
        assert not core.documents("CiliumCIDRGroup")
        assert not may_connect(core, "192.0.2.10")
    finally:
        store.close()


def test_a_policy_no_longer_naming_a_group_stops_following_it(core: AgentCore) -> None:
    core.apply([egress_policy({"cidrGroupRef": "partners"}), group("partners", "192.0.2.0/24")])
    core.apply([egress_policy({"cidr": "203.0.113.0/24"})])
    core.apply([group("partners", "198.51.100.0/24")])
    assert may_connect(core, "203.0.113.1") and not may_connect(core, "198.51.100.7")
    assert prefixes(core) == {"203.0.113.0/24"}


def test_an_invalid_group_is_refused_with_its_field_and_changes_nothing(core: AgentCore) -> None:
    core.apply([egress_policy({"cidrGroupRef": "partners"}), group("partners", "192.0.2.0/24")])
    revision = core.view().policy_revision
    bad = group("partners", "198.51.100.0/24", "not-a-cidr")
    with pytest.raises(ApplyError) as ei:
        core.apply([bad])
    assert ei.value.errors == [
        f"{GROUP_KEY}: spec.externalCIDRs[1]: invalid CIDR 'not-a-cidr': a CIDR needs a prefix length, "
        "e.g. 10.0.0.0/8 or 10.1.2.3/32"], ei.value.errors
    twice = [group("partners", "198.51.100.0/24"), copy.deepcopy(group("partners", "198.51.100.0/24"))]
    with pytest.raises(ApplyError, match="CiliumCIDRGroup/partners is also object 1"):
        core.apply(twice)
    assert core.view().policy_revision == revision
    assert may_connect(core, "192.0.2.10") and not may_connect(core, "198.51.100.7")


def test_a_group_change_the_store_refuses_changes_nothing(tmp_path: Path) -> None:
    """A group comes into force with the request's policies, once the store has committed them:
    a failed commit leaves the group in force as it was."""
    from l7gate.kvstore.api import KVStoreError

    from .test_agent_apply_bulk import StoreFailingOn

    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    failing = StoreFailingOn(store, "")
    cfg = AgentConfig(node="n1", cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    core = AgentCore(cfg, failing, SnapshotCache())  # type: ignore[arg-type]
    try:
        core.apply([CLIENT_POD, egress_policy({"cidrGroupRef": "partners"}), group("partners", "192.0.2.0/24")])
        failing.key = "l7gate/v1/policies/CiliumNetworkPolicy/payments/other"
        with pytest.raises(KVStoreError):
            core.apply([group("partners", "198.51.100.0/24"), egress_policy({"cidr": "10.0.0.0/8"}, name="other")])
        assert core.document("CiliumCIDRGroup", GROUP_KEY) == group("partners", "192.0.2.0/24")
        assert may_connect(core, "192.0.2.10") and not may_connect(core, "198.51.100.7")
        failing.key = ""
        core.apply([group("partners", "198.51.100.0/24")])  # and the next change starts from there
        assert not may_connect(core, "192.0.2.10") and may_connect(core, "198.51.100.7")
    finally:
        store.close()
