"""Parsing and validation of cilium.io/v2 policies: every field, and every kind of bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.policy.errors import PolicyValidationError
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.selector import CIDRSelector, EntitySelector, LabelSelector
from l7gate.policy.types import (
    ALL_PORTS,
    AuthMode,
    Direction,
    HeaderMatch,
    MismatchAction,
    PortProtocol,
    PortRange,
    Protocol,
)

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed"


def cnp(spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "namespace": "payments"},
    }
    if spec is not None:
        doc["spec"] = spec
    doc.update(extra)
    return doc


def ccnp(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "c"},
        "spec": spec,
    }


def errors_of(doc: Any) -> dict[str, str]:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(doc)
    return {e.path: e.message for e in ei.value.errors}


def pod(**labels: str) -> Labels:
    base = {"io.kubernetes.pod.namespace": "payments", "io.cilium.k8s.policy.cluster": "default"}
    return Labels.of({**base, **labels})


# -- the seed -------------------------------------------------------------------------------


def test_seed_files_parse_unchanged_with_default_deny_warning() -> None:
    deny = yaml.safe_load((SEED / "default-deny-all.yaml").read_text())
    allow = yaml.safe_load((SEED / "allow-frontend-to-billing.yaml").read_text())
    p_deny = parse_policy(deny)
    p_allow = parse_policy(allow)
    codes = {(w.path, w.code) for w in p_deny.warnings}
    assert ("spec.ingress", "empty-direction") in codes
    assert ("spec.egress", "empty-direction") in codes
    assert p_deny.rules[0].default_deny_ingress is False
    assert p_allow.warnings == ()
    rule = p_allow.rules[0]
    assert rule.default_deny_ingress is True and rule.default_deny_egress is False
    (peer_rule,) = rule.rules
    (port_rule,) = peer_rule.port_rules
    assert port_rule.ports == (PortProtocol(PortRange(8080, 8080), Protocol.TCP),)
    assert port_rule.l7 is not None
    (http,) = port_rule.l7.http
    assert (http.method, http.path) == ("POST", "/v1/charge")


# -- selectors and scoping ------------------------------------------------------------------


def test_cnp_endpoint_selector_is_scoped_to_namespace() -> None:
    p = parse_policy(cnp({"endpointSelector": {"matchLabels": {"app": "billing"}}}))
    subject = p.rules[0].subject
    assert subject.matches(pod(app="billing"))
    assert not subject.matches(pod(app="billing").with_labels({"io.kubernetes.pod.namespace": "web"}))


def test_ccnp_endpoint_selector_is_not_scoped() -> None:
    p = parse_policy(ccnp({"endpointSelector": {"matchLabels": {"app": "billing"}}}))
    assert p.rules[0].subject.matches(pod(app="billing").with_labels({"io.kubernetes.pod.namespace": "web"}))


def test_match_expressions_all_operators() -> None:
    sel = {
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "staging"]},
            {"key": "tier", "operator": "NotIn", "values": ["debug"]},
            {"key": "team", "operator": "Exists"},
            {"key": "canary", "operator": "DoesNotExist"},
        ]
    }
    s = parse_policy(ccnp({"endpointSelector": sel})).rules[0].subject
    assert s.matches(pod(env="prod", team="a"))
    assert s.matches(pod(env="staging", team="a", tier="web"))
    assert not s.matches(pod(env="dev", team="a"))
    assert not s.matches(pod(env="prod", team="a", tier="debug"))
    assert not s.matches(pod(env="prod"))
    assert not s.matches(pod(env="prod", team="a", canary="yes"))


def test_source_prefixed_keys_match_plain_labels() -> None:
    s = parse_policy(ccnp({"endpointSelector": {"matchLabels": {"k8s:app": "x", "any:env": "prod"}}}))
    assert s.rules[0].subject.matches(pod(app="x", env="prod"))


def test_cnp_peer_selectors_scoped_unless_namespace_or_reserved_named() -> None:
    spec = {
        "endpointSelector": {},
        "ingress": [
            {"fromEndpoints": [{"matchLabels": {"app": "a"}}]},
            {"fromEndpoints": [{"matchLabels": {"app": "b", "k8s:io.kubernetes.pod.namespace": "web"}}]},
            {"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]},
        ],
    }
    rules = parse_policy(cnp(spec)).rules[0].rules
    a, b, host = (r.peers[0] for r in rules if r.peers)  # type: ignore[index]
    assert a.matches(pod(app="a")) and not a.matches(pod(app="a").with_labels({"io.kubernetes.pod.namespace": "web"}))
    assert b.matches(pod(app="b").with_labels({"io.kubernetes.pod.namespace": "web"}))
    assert host.matches(Labels.of({"reserved:host": ""}))


def test_ccnp_empty_peer_selector_selects_pods_not_reserved() -> None:
    p = parse_policy(ccnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}))
    (sel,) = p.rules[0].rules[0].peers or ()
    assert sel.matches(pod(app="x").with_labels({"io.kubernetes.pod.namespace": "anything"}))
    assert not sel.matches(Labels.of({"reserved:world": ""}))
    assert not sel.matches(Labels.of({"reserved:host": ""}))


def test_peers_in_other_clusters_match_unless_cluster_named() -> None:
    p = parse_policy(
        ccnp(
            {
                "endpointSelector": {},
                "ingress": [
                    {"fromEndpoints": [{"matchLabels": {"app": "fe"}}]},
                    {"fromEndpoints": [{"matchLabels": {"app": "fe", "io.cilium.k8s.policy.cluster": "cluster-a"}}]},
                ],
            }
        )
    )
    anyc, only_a = (r.peers[0] for r in p.rules[0].rules if r.peers)  # type: ignore[index]
    remote = pod(app="fe").with_labels({"io.cilium.k8s.policy.cluster": "cluster-b"})
    assert anyc.matches(remote)
    assert not only_a.matches(remote)
    assert only_a.matches(remote.with_labels({"io.cilium.k8s.policy.cluster": "cluster-a"}))


def test_node_selector_in_ccnp_selects_hosts() -> None:
    p = parse_policy(ccnp({"nodeSelector": {"matchLabels": {"role": "worker"}}, "ingress": [{}]}))
    r = p.rules[0]
    assert r.node_selector
    assert r.subject.matches(Labels.of({"reserved:host": "", "role": "worker"}))
    assert not r.subject.matches(pod(role="worker"))


# -- entities and CIDRs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "entity, labels, selected",
    [
        ("world", {"reserved:world": ""}, True),
        ("world", {"cidr:1.2.3.0/24": "", "reserved:world": ""}, True),
        ("world", {"app": "x", "io.kubernetes.pod.namespace": "ns"}, False),
        ("host", {"reserved:host": ""}, True),
        ("remote-node", {"reserved:remote-node": ""}, True),
        ("kube-apiserver", {"reserved:kube-apiserver": ""}, True),
        ("ingress", {"reserved:ingress": ""}, True),
        ("cluster", {"app": "x", "io.cilium.k8s.policy.cluster": "local"}, True),
        ("cluster", {"app": "x", "io.cilium.k8s.policy.cluster": "other"}, False),
        ("cluster", {"reserved:host": ""}, True),
        ("cluster", {"reserved:world": ""}, False),
        ("all", {"reserved:world": ""}, True),
    ],
)
def test_entities(entity: str, labels: dict[str, str], selected: bool) -> None:
    doc = ccnp({"endpointSelector": {}, "ingress": [{"fromEntities": [entity]}]})
    (sel,) = parse_policy(doc, cluster_name="local").rules[0].rules[0].peers or ()
    assert isinstance(sel, EntitySelector)
    assert sel.matches(Labels.of(labels)) is selected


def test_cidr_and_cidrset_with_except() -> None:
    doc = cnp(
        {
            "endpointSelector": {},
            "egress": [
                {"toCIDR": ["10.0.0.0/8"]},
                {"toCIDRSet": [{"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}]},
            ],
        }
    )
    r1, r2 = parse_policy(doc).rules[0].rules
    c1 = (r1.peers or ())[0]
    c2 = (r2.peers or ())[0]
    assert isinstance(c1, CIDRSelector) and isinstance(c2, CIDRSelector)
    assert r1.direction is Direction.EGRESS
    assert c1.matches(Labels.of({"cidr:10.1.2.3/32": "", "reserved:world": ""}))
    assert not c1.matches(Labels.of({"cidr:11.0.0.0/8": ""}))
    assert c2.matches(Labels.of({"cidr:192.168.2.0/24": ""}))
    assert not c2.matches(Labels.of({"cidr:192.168.1.7/32": ""}))
    # CIDR rules never select pods
    assert not c1.matches(pod(app="x"))


def test_catch_all_cidr_selects_world() -> None:
    doc = cnp({"endpointSelector": {}, "ingress": [{"fromCIDR": ["0.0.0.0/0"]}]})
    sel = (parse_policy(doc).rules[0].rules[0].peers or ())[0]
    assert sel.matches(Labels.of({"reserved:world": ""}))


# -- ports, L7, auth, default deny -------------------------------------------------------------


def test_ports_endport_protocols_and_port_zero() -> None:
    doc = cnp(
        {
            "endpointSelector": {},
            "ingress": [
                {
                    "toPorts": [
                        {
                            "ports": [
                                {"port": "80", "protocol": "TCP"},
                                {"port": 53, "protocol": "UDP"},
                                {"port": "8000", "endPort": 8099, "protocol": "SCTP"},
                                {"port": "0", "protocol": "ANY"},
                                {"port": "443"},
                            ]
                        }
                    ]
                }
            ],
        }
    )
    (pr,) = parse_policy(doc).rules[0].rules
    assert pr.peers is None  # toPorts only: every peer
    ports = set(pr.port_rules[0].ports)
    assert PortProtocol(PortRange(80, 80), Protocol.TCP) in ports
    assert PortProtocol(PortRange(53, 53), Protocol.UDP) in ports
    assert PortProtocol(PortRange(8000, 8099), Protocol.SCTP) in ports
    assert PortProtocol(ALL_PORTS, Protocol.ANY) in ports
    assert PortProtocol(PortRange(443, 443), Protocol.ANY) in ports


def test_http_rules_all_fields() -> None:
    doc = cnp(
        {
            "endpointSelector": {},
            "ingress": [
                {
                    "fromEndpoints": [{}],
                    "toPorts": [
                        {
                            "ports": [{"port": "8080", "protocol": "TCP"}],
                            "rules": {
                                "http": [
                                    {
                                        "method": "GET|HEAD",
                                        "path": "/v1/.*",
                                        "host": "api\\.example\\.com",
                                        "headers": ["X-Env: prod", "X-Trace"],
                                        "headerMatches": [
                                            {"name": "X-Team", "value": "pay"},
                                            {"name": "X-Dbg", "value": "0", "mismatch": "LOG"},
                                        ],
                                    },
                                    {},
                                ]
                            },
                        }
                    ],
                }
            ],
        }
    )
    (pr,) = parse_policy(doc).rules[0].rules
    port_rule = pr.port_rules[0]
    assert port_rule.ports == (PortProtocol(PortRange(8080, 8080), Protocol.TCP),)
    assert port_rule.l7 is not None and port_rule.l7.allows_all
    full = [h for h in port_rule.l7.http if h.method]
    (h,) = full
    assert h.host == "api\\.example\\.com"
    assert set(h.headers) == {
        HeaderMatch("x-env", "prod"),
        HeaderMatch("x-trace", None),
        HeaderMatch("x-team", "pay"),
        HeaderMatch("x-dbg", "0", MismatchAction.LOG),
    }


@pytest.mark.parametrize("mode", ["disabled", "required", "test-always-fail"])
def test_authentication_modes(mode: str) -> None:
    doc = ccnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}], "authentication": {"mode": mode}}]})
    assert parse_policy(doc).rules[0].rules[0].auth is AuthMode(mode)


def test_default_deny_rules() -> None:
    def dd(spec: dict[str, Any]) -> tuple[bool, bool]:
        r = parse_policy(cnp({"endpointSelector": {}, **spec})).rules[0]
        return r.default_deny_ingress, r.default_deny_egress

    assert dd({}) == (False, False)
    assert dd({"ingress": []}) == (False, False)
    assert dd({"ingress": [{}]}) == (True, False)
    assert dd({"ingressDeny": [{"fromEntities": ["world"]}]}) == (True, False)
    assert dd({"egress": [{}]}) == (False, True)
    assert dd({"ingress": [{}], "enableDefaultDeny": {"ingress": False}}) == (False, False)
    assert dd({"enableDefaultDeny": {"egress": True}}) == (False, True)


def test_empty_rule_selects_nothing_and_description_labels_specs() -> None:
    doc = cnp(
        None,
        specs=[
            {
                "endpointSelector": {},
                "ingress": [{}],
                "description": "deny all",
                "labels": [{"key": "owner", "value": "sec", "source": "k8s"}],
            },
            {"endpointSelector": {"matchLabels": {"app": "x"}}, "egress": [{"toEntities": ["world"]}]},
        ],
    )
    p = parse_policy(doc)
    assert len(p.rules) == 2
    assert p.rules[0].rules[0].peers == ()
    assert p.rules[0].description == "deny all"
    assert p.rules[0].labels == Labels.of({"owner": "sec"})
    assert p.rules[1].origin.path == "specs[1]"


def test_spec_and_specs_together() -> None:
    doc = cnp({"endpointSelector": {}}, specs=[{"endpointSelector": {}}])
    assert len(parse_policy(doc).rules) == 2


def test_lint_warnings() -> None:
    doc = cnp(
        {
            "endpointSelector": {},
            "ingress": [
                {
                    "fromEndpoints": [],
                    "toPorts": [{"ports": [{"port": "80"}], "rules": {"http": []}}],
                }
            ],
        }
    )
    codes = {w.code for w in parse_policy(doc).warnings}
    assert {"empty-peer-list", "empty-http"} <= codes


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_field_names_its_path() -> None:
    errs = errors_of(cnp({"endpointSelector": {}, "ingress": [{"fromEndpoint": [{}]}]}))
    assert "spec.ingress[0].fromEndpoint" in errs
    assert "unknown field" in errs["spec.ingress[0].fromEndpoint"]


def test_wrong_types() -> None:
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {"matchLabels": {"app": 5}},
                "ingress": {"fromEndpoints": []},
                "description": ["x"],
            }
        )
    )
    assert errs["spec.endpointSelector.matchLabels.app"] == "must be a string, got integer"
    assert errs["spec.ingress"] == "must be a list, got mapping"
    assert errs["spec.description"] == "must be a string, got list"


def test_bad_regex_names_field_and_reason() -> None:
    http = [{"method": "GET"}, {"path": "/v1/(?<=x)refund"}]
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": http}}]}],
            }
        )
    )
    msg = errs["spec.ingress[0].toPorts[0].rules.http[1].path"]
    assert "invalid RE2 regex" in msg and "(?<=" in msg


def test_regex_too_large_for_envoy() -> None:
    big = "(" + "|".join(f"/v{i}/x" for i in range(40)) + ")"
    errs = errors_of(
        cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"path": big}]}}]}]})
    )
    assert "over Envoy's limit" in errs["spec.ingress[0].toPorts[0].rules.http[0].path"]


@pytest.mark.parametrize(
    "port, message",
    [
        ({"port": "70000"}, "out of range"),
        ({"port": -1}, "out of range"),
        ({"port": "http_alt"}, "or a port name (an IANA service name"),
        ({"port": "http", "endPort": 90}, "endPort needs a port number: port 'http' is a named port"),
        ({"port": "80", "endPort": 79}, "endPort 79 is smaller than port 80"),
        ({"port": "80", "endPort": 70000}, "out of range"),
        ({"port": "80", "protocol": "ICMP"}, "write ICMP rules as `icmps`"),
        ({"port": "80", "protocol": "GRE"}, "not supported by l7gate"),
        ({"port": "80", "protocol": "tcp"}, "must be one of"),
        ({"port": True}, "must be a port number"),
        ({}, "is required"),
    ],
)
def test_bad_ports(port: dict[str, Any], message: str) -> None:
    errs = errors_of(cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [port]}]}]}))
    assert any(message in m for m in errs.values()), errs
    assert all(p.startswith("spec.ingress[0].toPorts[0].ports[0]") for p in errs)


def test_both_selectors_and_neither() -> None:
    both = errors_of(ccnp({"endpointSelector": {}, "nodeSelector": {}}))
    assert "not both" in both["spec"]
    neither = errors_of(ccnp({"ingress": [{}]}))
    assert "is required" in neither["spec"]


def test_deny_rule_with_l7_and_with_auth() -> None:
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {},
                "ingressDeny": [
                    {
                        "fromEntities": ["world"],
                        "toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}],
                        "authentication": {"mode": "required"},
                    }
                ],
            }
        )
    )
    assert "not allowed in deny rules" in errs["spec.ingressDeny[0].toPorts[0].rules"]
    assert "not allowed in deny rules" in errs["spec.ingressDeny[0].authentication"]


def test_l7_rules_refused_on_udp_and_wide_ranges() -> None:
    http = {"http": [{"method": "GET"}]}
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {},
                "ingress": [
                    {"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}], "rules": http}]},
                    {"toPorts": [{"ports": [{"port": "80", "endPort": 1000, "protocol": "TCP"}], "rules": http}]},
                ],
            }
        )
    )
    assert "TCP only" in errs["spec.ingress[0].toPorts[0].ports[0].protocol"]
    assert "at most 128 ports per range" in errs["spec.ingress[1].toPorts[0].ports[0]"]


def test_unsupported_fields_are_named() -> None:
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {},
                "egress": [{"toRequires": [{}]}],
                "ingress": [{"fromRequires": [{}], "toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": []}}]}],
            }
        )
    )
    assert "not supported" in errs["spec.egress[0].toRequires"]
    assert "not supported" in errs["spec.ingress[0].fromRequires"]
    assert "not supported" in errs["spec.ingress[0].toPorts[0].rules.kafka"]


def test_bad_entity_cidr_auth_operator_header() -> None:
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}, {"key": "b", "operator": "In"}]},
                "ingress": [
                    {"fromEntities": ["everyone"]},
                    {"fromCIDR": ["10.0.0.0/33", "10.0.0.1"]},
                    {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}]},
                    {"fromEndpoints": [{}], "authentication": {"mode": "sometimes"}},
                    {"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"headers": ["Bad Header: x"], "headerMatches": [{"name": "x", "secret": {"name": "s"}}]}]}}]},
                ],
            }
        )
    )
    assert "must be one of In, NotIn" in errs["spec.endpointSelector.matchExpressions[0].operator"]
    assert "needs at least one value" in errs["spec.endpointSelector.matchExpressions[1].values"]
    assert "unknown entity 'everyone'" in errs["spec.ingress[0].fromEntities[0]"]
    assert "invalid CIDR" in errs["spec.ingress[1].fromCIDR[0]"]
    assert "prefix length" in errs["spec.ingress[1].fromCIDR[1]"]
    assert "is not inside" in errs["spec.ingress[2].fromCIDRSet[0].except[0]"]
    assert "must be one of" in errs["spec.ingress[3].authentication.mode"]
    assert "invalid HTTP header name" in errs["spec.ingress[4].toPorts[0].rules.http[0].headers[0]"]
    assert "not supported" in errs["spec.ingress[4].toPorts[0].rules.http[0].headerMatches[0].secret"]


def test_all_errors_collected_not_just_the_first() -> None:
    errs = errors_of(
        cnp(
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "x_"}]}]}, {"bogus": 1}],
                "egress": [{"toEntities": ["nowhere"]}],
            }
        )
    )
    assert len(errs) == 3


def test_document_level_errors() -> None:
    assert "kind" in errors_of({"apiVersion": "cilium.io/v2", "kind": "AdminNetworkPolicy", "metadata": {"name": "x"}, "spec": {}})
    # a NetworkPolicy is read with its own apiVersion (l7gate.policy.netpol)
    assert "apiVersion" in errors_of({"apiVersion": "cilium.io/v2", "kind": "NetworkPolicy", "metadata": {"name": "x"}, "spec": {}})
    errs = errors_of({"apiVersion": "cilium.io/v1", "kind": "CiliumNetworkPolicy", "metadata": {}, "spec": {"endpointSelector": {}}})
    assert "apiVersion" in errs and "metadata.name" in errs
    assert "spec" in errors_of({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "x"}})
    with pytest.raises(PolicyValidationError):
        parse_policy(["not", "a", "mapping"])

@pytest.mark.parametrize(
    "meta, path, message",
    [
        # the two that collided on one key, CiliumNetworkPolicy/a/b/c
        ({"name": "c", "namespace": "a/b"}, "metadata.namespace", "'/' at position 2 is not allowed"),
        ({"name": "b/c", "namespace": "a"}, "metadata.name", "'/' at position 2 is not allowed"),
        ({"name": "../../etc/Bad Name", "namespace": "a"}, "metadata.name",
         "'.' at position 1: must start with a lowercase letter or digit"),
        ({"name": "Allow-Web", "namespace": "a"}, "metadata.name", "'A' at position 1 is not allowed (uppercase"),
        ({"name": "allow-web-", "namespace": "a"}, "metadata.name", "'-' at position 10: must end with"),
        ({"name": "a..b", "namespace": "a"}, "metadata.name", "'.' at position 3"),
        ({"name": "p", "namespace": "pay.ments"}, "metadata.namespace", "'.' at position 4 is not allowed"),
        ({"name": "x" * 254, "namespace": "a"}, "metadata.name", "254 characters long: at most 253"),
        ({"name": "p", "namespace": "n" * 64}, "metadata.namespace", "64 characters long: at most 63"),
        ({"name": "p\u00e9", "namespace": "a"}, "metadata.name", "'\u00e9' at position 2 is not allowed"),
        ({"name": "p\n", "namespace": "a"}, "metadata.name", "'\\n' at position 2 is not allowed"),
    ],
)
def test_names_are_kubernetes_names(meta: dict[str, Any], path: str, message: str) -> None:
    errs = errors_of(cnp({"endpointSelector": {}}, metadata=meta))
    assert list(errs) == [path], errs
    assert message in errs[path], errs[path]
    assert "DNS-1123" in errs[path]


def test_longest_kubernetes_names_are_accepted() -> None:
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters, dotted
    p = parse_policy(cnp({"endpointSelector": {}}, metadata={"name": name, "namespace": "n" * 63}))
    assert p.name == name and p.namespace == "n" * 63
    assert parse_policy(ccnp({"endpointSelector": {}}) | {"metadata": {"name": "a.b-1.c"}}).name == "a.b-1.c"
    with pytest.raises(PolicyValidationError, match="metadata.name"):
        parse_policy(ccnp({"endpointSelector": {}}) | {"metadata": {"name": "a_b"}})


def test_nodeselector_refused_in_namespaced_policy() -> None:
    errs = errors_of(cnp({"nodeSelector": {}}))
    assert "only allowed in a CiliumClusterwideNetworkPolicy" in errs["spec.nodeSelector"]


def test_one_bad_spec_rejects_the_whole_policy() -> None:
    doc = cnp(None, specs=[{"endpointSelector": {}}, {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}])
    errs = errors_of(doc)
    assert list(errs) == ["specs[1].ingress[0].toPorts[0].ports[0].port"]


def test_parser_does_not_mutate_input() -> None:
    doc = yaml.safe_load((SEED / "allow-frontend-to-billing.yaml").read_text())
    before = copy.deepcopy(doc)
    parse_policy(doc)
    assert doc == before


def test_error_message_names_resource() -> None:
    with pytest.raises(PolicyValidationError) as ei:
        parse_policy(cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "x_"}]}]}]}))
    assert ei.value.resource == "CiliumNetworkPolicy/payments/p"
    assert str(ei.value).startswith("CiliumNetworkPolicy/payments/p: spec.ingress[0]")


def test_label_selector_key_is_canonical() -> None:
    a = parse_policy(ccnp({"endpointSelector": {"matchLabels": {"app": "x", "env": "p"}}})).rules[0].subject
    b = parse_policy(
        ccnp({"endpointSelector": {"matchExpressions": [{"key": "k8s:env", "operator": "In", "values": ["p"]}], "matchLabels": {"app": "x"}}})
    ).rules[0].subject
    assert isinstance(a, LabelSelector) and a.key == b.key


# -- named ports -------------------------------------------------------------------------------


def _ports(doc: dict[str, Any]) -> tuple[Any, ...]:
    return parse_policy(doc).rules[0].rules[0].port_rules[0].ports


def test_named_ports_parse_as_names_lower_cased_with_their_protocol() -> None:
    from l7gate.policy.types import NamedPort

    doc = cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [
        {"port": "http", "protocol": "TCP"}, {"port": "Metrics"}, {"port": "0x50"}, {"port": "8080"}]}]}]})
    assert set(_ports(doc)) == {PortProtocol(PortRange(8080, 8080), Protocol.ANY), NamedPort("0x50", Protocol.ANY),
                                NamedPort("http", Protocol.TCP), NamedPort("metrics", Protocol.ANY)}


def test_http_rules_on_a_named_port_apply_to_tcp() -> None:
    from l7gate.policy.types import NamedPort

    tcp = cnp({"endpointSelector": {}, "ingress": [{"toPorts": [
        {"ports": [{"port": "http", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]}]})
    assert _ports(tcp) == (NamedPort("http", Protocol.TCP),)
    # without protocol (ANY): refused, as Cilium refuses HTTP rules on anything but TCP
    errs = errors_of(cnp({"endpointSelector": {}, "ingress": [{"toPorts": [
        {"ports": [{"port": "http"}], "rules": {"http": [{"method": "GET"}]}}]}]}))
    assert "Write `protocol: TCP`" in errs["spec.ingress[0].toPorts[0].ports[0]"]
    errs = errors_of(cnp({"endpointSelector": {}, "ingress": [{"toPorts": [
        {"ports": [{"port": "http", "protocol": "UDP"}], "rules": {"http": [{"method": "GET"}]}}]}]}))
    assert "HTTP rules apply to TCP only" in errs["spec.ingress[0].toPorts[0].ports[0].protocol"]
    errs = errors_of(cnp({"endpointSelector": {}, "egress": [{"toPorts": [
        {"ports": [{"port": "dns", "protocol": "UDP"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}]}))
    assert "DNS rules need port 53, not a named port ('dns')" in errs["spec.egress[0].toPorts[0].ports[0].port"]


@pytest.mark.parametrize(
    "raw, problem",
    [
        ("http_alt", "'_' is not allowed"),
        ("a-very-long-port-name", "at most 15 are allowed"),
        ("-http", "must not start or end with '-'"),
        ("ht--tp", "must not contain '--'"),
        ("80-80", "must contain at least one letter"),
        ("ħttp", "only ASCII letters"),
    ],
)
def test_bad_port_names_say_what_a_port_name_is(raw: str, problem: str) -> None:
    errs = errors_of(cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": raw}]}]}]}))
    message = errs["spec.ingress[0].toPorts[0].ports[0].port"]
    assert "a port number 0-65535 or a port name (an IANA service name" in message and problem in message, message
