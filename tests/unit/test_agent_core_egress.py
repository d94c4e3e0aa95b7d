"""The agent core's side of egress HTTP rules (docs/egress-http.md) where no egress proxy runs."""

from __future__ import annotations

from l7gate.agent.core import AgentCore

from .test_agent_core_apply import core  # noqa: F401  (the fixture)


def test_egress_http_rules_without_the_egress_proxy_are_warned_about(core: AgentCore) -> None:  # noqa: F811
    policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
              "metadata": {"name": "client-egress", "namespace": "web"},
              "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                       "egress": [{"toEntities": ["world"], "toPorts": [{
                           "ports": [{"port": "80", "protocol": "TCP"}],
                           "rules": {"http": [{"method": "GET"}]}}]}]}}
    result = core.apply([policy])
    assert any("spec.egress[0]: egress HTTP rules are not enforced by the iptables fallback" in w
               for w in result.warnings), result.warnings


def test_server_names_without_the_egress_proxy_are_warned_about(core: AgentCore) -> None:  # noqa: F811
    policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
              "metadata": {"name": "client-sni", "namespace": "web"},
              "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                       "egress": [{"toEntities": ["world"], "toPorts": [{
                           "ports": [{"port": "443", "protocol": "TCP"}], "serverNames": ["a.example.test"]}]}]}}
    result = core.apply([policy])
    assert any("spec.egress[0]: egress serverNames are not enforced by the iptables fallback" in w
               for w in result.warnings), result.warnings
