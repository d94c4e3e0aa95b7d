"""toServices through the agent's core (the path `endpoint apply`, `policy apply`, the admin API
and the Kubernetes watch share): a policy naming a selector-less Service selects the addresses
its EndpointSlices list, as CIDR identities in the ipcache and the resolved maps; a slice or a
Service created, changed or deleted updates every policy naming it; a Service with a selector
selects nothing; the slices give the Service its backends too; everything survives a restart;
a bad slice is refused with its field path and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from l7gate.agent import views
from l7gate.agent.core import AgentCore, ApplyError
from l7gate.services import Frontend

from .test_agent_core_cidrgroup import CLIENT_POD, client_id, core, make_core, may_connect  # noqa: F401 - core: the fixture

POLICY_KEY = "CiliumNetworkPolicy/payments/to-ext"
SLICE_KEY = "endpointslice/cluster-a/partners/ext-1"


def policy(entry: dict[str, Any], name: str = "to-ext", *, deny: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": {"app": "client"}},
                            "egressDeny" if deny else "egress": [{"toServices": [entry]}]}
    if deny:
        spec["egress"] = [{"toEntities": ["world"]}]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "payments"}, "spec": spec}


EXT = {"k8sService": {"serviceName": "ext", "namespace": "partners"}}


def service(name: str = "ext", *, selector: dict[str, str] | None = None, labels: dict[str, str] | None = None,
            cluster_ip: str | None = "10.96.0.50") -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": "https", "port": 443}]}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    if selector is not None:
        spec["selector"] = selector
    meta: dict[str, Any] = {"name": name, "namespace": "partners"}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def endpoint_slice(*addresses: str, name: str = "ext-1", service_name: str | None = "ext",
                   ready: bool | None = None) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"addresses": list(addresses)}
    if ready is not None:
        endpoint["conditions"] = {"ready": ready}
    meta: dict[str, Any] = {"name": name, "namespace": "partners"}
    if service_name is not None:
        meta["labels"] = {"kubernetes.io/service-name": service_name}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4",
            "endpoints": [endpoint] if addresses else [], "ports": [{"name": "https", "port": 8443}]}


def host_prefixes(core: AgentCore) -> set[str]:
    """The CIDR identities' prefixes in the ipcache (the client pod's own /32 left out)."""
    return {e.prefix.with_prefixlen for e in core.ipcache.snapshot() if e.identity >= 1 << 24}


def test_a_selector_less_service_and_its_slice_move_the_verdict(core: AgentCore) -> None:
    core.apply([policy(EXT)])
    # no Service yet: the rule selects nothing, and egress is default-deny
    assert not may_connect(core, "192.0.2.10")
    result = core.apply([service(), endpoint_slice("192.0.2.10", "192.0.2.11")]).to_json()
    assert result["created"] == ["service/cluster-a/partners/ext", SLICE_KEY]
    assert host_prefixes(core) == {"192.0.2.10/32", "192.0.2.11/32"}
    assert may_connect(core, "192.0.2.10") and may_connect(core, "192.0.2.11", 8080)  # every port
    assert not may_connect(core, "192.0.2.12")

    # the slice changed: the verdicts follow (the old address's identity is released)
    assert core.apply([endpoint_slice("192.0.2.12")]).to_json()["configured"] == [SLICE_KEY]
    assert host_prefixes(core) == {"192.0.2.12/32"}
    assert not may_connect(core, "192.0.2.10") and may_connect(core, "192.0.2.12")
    # a not-ready endpoint is no longer selected
    core.apply([endpoint_slice("192.0.2.12", ready=False)])
    assert not may_connect(core, "192.0.2.12") and host_prefixes(core) == set()
    core.apply([endpoint_slice("192.0.2.12")])

    # the slice deleted, then the Service: nothing is selected; the policy stays
    assert core.delete_endpoint_slice("partners/ext-1")
    assert not may_connect(core, "192.0.2.12") and host_prefixes(core) == set()
    assert not core.delete_endpoint_slice("partners/ext-1")
    core.apply([endpoint_slice("192.0.2.12")])
    assert may_connect(core, "192.0.2.12")
    assert core.delete_service("partners/ext")
    assert not may_connect(core, "192.0.2.12")
    assert list(core.documents("CiliumNetworkPolicy")) == [POLICY_KEY]


def test_a_service_with_a_selector_selects_nothing(core: AgentCore) -> None:
    core.apply([policy(EXT), service(selector={"app": "ext"}), endpoint_slice("192.0.2.10")])
    assert not may_connect(core, "192.0.2.10") and host_prefixes(core) == set()
    # the same Service without its selector: the slice's address is selected
    core.apply([service()])
    assert may_connect(core, "192.0.2.10")
    core.apply([service(selector={"app": "ext"})])
    assert not may_connect(core, "192.0.2.10")


def test_a_service_selector_follows_the_services_labels(core: AgentCore) -> None:
    by_label = {"k8sServiceSelector": {"selector": {"matchLabels": {"role": "partner"}}}}
    core.apply([policy(by_label), service(labels={"role": "partner"}), endpoint_slice("192.0.2.10"),
                service("other", labels={"role": "other"}), endpoint_slice("198.51.100.7", name="other-1",
                                                                             service_name="other")])
    assert may_connect(core, "192.0.2.10") and not may_connect(core, "198.51.100.7")
    core.apply([service("other", labels={"role": "partner"})])
    assert may_connect(core, "198.51.100.7")
    core.apply([service(labels={})])
    assert not may_connect(core, "192.0.2.10") and may_connect(core, "198.51.100.7")


def test_a_deny_rule_naming_a_service(core: AgentCore) -> None:
    core.apply([policy(EXT, deny=True), service(), endpoint_slice("192.0.2.10")])
    assert not may_connect(core, "192.0.2.10")
    assert may_connect(core, "192.0.2.11")  # world


def test_the_slice_gives_the_service_its_backends_and_the_view_says_what_toservices_selects(
        core: AgentCore) -> None:
    core.apply([service(), endpoint_slice("192.0.2.10", "192.0.2.11")])
    entry = core.services.frontends()[Frontend("10.96.0.50", 443, "TCP")]
    assert [(b.ip, b.port) for b in entry.backends] == [("192.0.2.10", 8443), ("192.0.2.11", 8443)]
    [svc] = views.services(core.view(), core)["services"]
    assert svc["to_services"] == {"selectable": True, "addresses": ["192.0.2.10/32", "192.0.2.11/32"]}
    assert svc["frontends"][0]["backends"][0]["pod"] == "EndpointSlice/partners/ext-1"
    assert list(core.documents("EndpointSlice")) == ["cluster-a/partners/ext-1"]


def test_services_and_slices_survive_a_restart(tmp_path: Path) -> None:
    core, store = make_core(tmp_path)
    core.apply([CLIENT_POD, policy(EXT), service(), endpoint_slice("192.0.2.10")])
    before = client_id(core)
    store.close()
    again, store = make_core(tmp_path)
    try:
        assert client_id(again) == before
        assert may_connect(again, "192.0.2.10") and not may_connect(again, "192.0.2.11")
        assert again.delete_endpoint_slice("cluster-a/partners/ext-1")
        assert not may_connect(again, "192.0.2.10")
    finally:
        store.close()


def test_a_bad_slice_is_refused_with_its_field_and_changes_nothing(core: AgentCore) -> None:
    core.apply([policy(EXT), service(), endpoint_slice("192.0.2.10")])
    bad = endpoint_slice("127.0.0.1")
    with pytest.raises(ApplyError) as ei:
        core.apply([bad, endpoint_slice("192.0.2.20", name="ext-2")])
    assert any("EndpointSlice partners/ext-1: endpoints[0].addresses[0]" in e and "loopback" in e
               for e in ei.value.errors), ei.value.errors
    assert may_connect(core, "192.0.2.10") and not may_connect(core, "192.0.2.20")
    other = endpoint_slice("192.0.2.20", name="ext-2")
    other["metadata"]["annotations"] = {"l7gate.io/cluster": "cluster-b"}
    with pytest.raises(ApplyError, match="its own cluster"):
        core.apply([other])


def test_a_slice_of_no_service_is_applied_with_a_warning(core: AgentCore) -> None:
    result = core.apply([endpoint_slice("192.0.2.10", name="loose", service_name=None)]).to_json()
    assert result["created"] == ["endpointslice/cluster-a/partners/loose"]
    assert any("no kubernetes.io/service-name label" in w for w in result["warnings"])


def test_only_the_policies_naming_services_are_expanded_again(core: AgentCore, monkeypatch: pytest.MonkeyPatch) -> None:
    group_policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                    "metadata": {"name": "to-group", "namespace": "payments"},
                    "spec": {"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidrGroupRef": "g"}]}]}}
    core.apply([policy(EXT), group_policy, service()])
    upserted: list[list[str]] = []
    real = core.resolver.upsert_policies

    def spy(policies: Any) -> Any:
        upserted.append([p.key for p in policies])
        return real(policies)

    monkeypatch.setattr(core.resolver, "upsert_policies", spy)
    core.apply([endpoint_slice("192.0.2.10")])
    assert upserted == [[POLICY_KEY]]
    core.apply([endpoint_slice("192.0.2.10", name="ext-2", service_name="unrelated")])
    assert upserted[-1] == []  # a slice of a Service nobody names changes no expansion


def test_an_ipv6_slice_is_selected_as_host_prefixes_but_balanced_over_by_no_clusterip(core: AgentCore) -> None:
    v6 = endpoint_slice(name="ext-v6")
    v6["addressType"] = "IPv6"
    v6["endpoints"] = [{"addresses": ["2001:db8::10"]}]
    core.apply([policy(EXT), service(), v6])
    assert host_prefixes(core) == {"2001:db8::10/128"}
    assert core.services.frontends()[Frontend("10.96.0.50", 443, "TCP")].backends == ()
