"""`fromNodes` / `toNodes`: parsing (Cilium's exclusivity with the other peer kinds, errors at
their field), and what a node selector selects — node identities only (`host`, `remote-node`),
by the labels of their Node (`node:<key>`), never a pod or `world` — read by the reference
evaluator and by the resolved maps, which must agree."""

from __future__ import annotations

from typing import Any

import pytest

from l7gate.identity.filter import node_labels
from l7gate.policy.evaluate import Flow, Peer, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.mapstate import lookup
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.policy.selector import NodeSelector
from l7gate.policy.types import Direction, Protocol

from .test_policy_cilium_sanitizer import errors_of, only_error, warnings_of
from .test_policy_parse import ccnp, cnp

CLIENT = 1001
POD_WITH_ROLE = 1002
HOST_ID, WORLD_ID, REMOTE_NODE_ID = 1, 2, 6
INGRESS_NODE, WORKER_NODE, OTHER_CLUSTER_NODE = (2 << 24) + 1, (2 << 24) + 2, (2 << 24) + 3

IDENTITIES: dict[int, Labels] = {
    CLIENT: Labels.of({"app": "client", "io.kubernetes.pod.namespace": "payments",
                       "io.cilium.k8s.policy.cluster": "cluster-a"}),
    # a pod whose labels look like a node's: never selected by a node selector
    POD_WITH_ROLE: Labels.of({"role": "ingress", "io.kubernetes.pod.namespace": "payments",
                              "io.cilium.k8s.policy.cluster": "cluster-a"}),
    HOST_ID: node_labels({"role": "app", "zone": "z1"}, cluster="cluster-a", local=True),
    WORLD_ID: Labels.of({"reserved:world": ""}),
    REMOTE_NODE_ID: Labels.of({"reserved:remote-node": ""}),  # a node known only from a pod's hostIP
    INGRESS_NODE: node_labels({"role": "ingress", "zone": "z1"}, cluster="cluster-a", local=False),
    WORKER_NODE: node_labels({"role": "worker", "zone": "z2"}, cluster="cluster-a", local=False),
    OTHER_CLUSTER_NODE: node_labels({"role": "ingress"}, cluster="cluster-b", local=False),
}


def egress_to_nodes(*selectors: dict[str, Any], deny: bool = False) -> dict[str, Any]:
    rules = [{"toNodes": list(selectors), "toPorts": [{"ports": [{"port": "7070", "protocol": "TCP"}]}]}]
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": {"app": "client"}}}
    if deny:
        spec["egress"] = [{"toEntities": ["all"]}]
        spec["egressDeny"] = rules
    else:
        spec["egress"] = rules
    return cnp(spec)


def ingress_from_nodes(*selectors: dict[str, Any]) -> dict[str, Any]:
    return cnp({"endpointSelector": {"matchLabels": {"app": "client"}},
                "ingress": [{"fromNodes": list(selectors), "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]})


def reached(doc: dict[str, Any], direction: Direction) -> dict[int, bool]:
    """Per identity: whether the client may talk to it (egress, port 7070) or hear from it
    (ingress, port 8080), by the reference evaluator; the resolved map must say the same."""
    rules = list(parse_policy(doc, cluster_name="cluster-a").rules)
    r = Resolver()
    r.update_identities(IDENTITIES)
    r.upsert_policy(parse_policy(doc, cluster_name="cluster-a"))
    r.add_endpoint(CLIENT)
    port = 7070 if direction is Direction.EGRESS else 8080
    out: dict[int, bool] = {}
    for ident, labels in IDENTITIES.items():
        if ident == CLIENT:
            continue
        me, other = Peer(CLIENT, IDENTITIES[CLIENT], True), Peer(ident, labels, False)
        flow = Flow(me, other, port) if direction is Direction.EGRESS else Flow(other, me, port)
        ref = evaluate(rules, flow).allowed
        fast = lookup(r.endpoint_policy(CLIENT), direction, ident, port, Protocol.TCP).allowed
        assert fast == ref, (ident, ref, fast)
        out[ident] = ref
    return out


# -- what a node selector selects -----------------------------------------------------------------


def test_to_nodes_by_label_reaches_only_the_labelled_nodes() -> None:
    got = reached(egress_to_nodes({"matchLabels": {"role": "ingress"}}), Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {INGRESS_NODE, OTHER_CLUSTER_NODE}


def test_a_node_selector_reads_this_nodes_labels_on_host() -> None:
    got = reached(egress_to_nodes({"matchLabels": {"zone": "z1"}}), Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {HOST_ID, INGRESS_NODE}


def test_the_cluster_label_and_the_reserved_ones_select_as_written() -> None:
    got = reached(egress_to_nodes({"matchLabels": {"role": "ingress", "io.cilium.k8s.policy.cluster": "cluster-b"}}),
                  Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {OTHER_CLUSTER_NODE}
    got = reached(egress_to_nodes({"matchLabels": {"reserved:remote-node": ""}}), Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {REMOTE_NODE_ID, INGRESS_NODE, WORKER_NODE, OTHER_CLUSTER_NODE}


def test_an_empty_node_selector_selects_every_node_and_nothing_else() -> None:
    got = reached(egress_to_nodes({}), Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {HOST_ID, REMOTE_NODE_ID, INGRESS_NODE, WORKER_NODE,
                                                   OTHER_CLUSTER_NODE}


def test_a_node_whose_labels_are_unknown_has_none() -> None:
    """A node known from a pod's hostIP alone (identity 6) has no node labels: NotIn and
    DoesNotExist select it, In and Exists do not (docs/deviations.md, Entities)."""
    got = reached(egress_to_nodes({"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["ingress"]}]}),
                  Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {HOST_ID, REMOTE_NODE_ID, WORKER_NODE}
    got = reached(egress_to_nodes({"matchExpressions": [{"key": "role", "operator": "Exists"}]}), Direction.EGRESS)
    assert {i for i, ok in got.items() if ok} == {HOST_ID, INGRESS_NODE, WORKER_NODE, OTHER_CLUSTER_NODE}


def test_from_nodes_admits_only_the_labelled_nodes() -> None:
    got = reached(ingress_from_nodes({"matchLabels": {"role": "worker"}}), Direction.INGRESS)
    assert {i for i, ok in got.items() if ok} == {WORKER_NODE}


def test_a_deny_to_nodes_wins_over_an_allow() -> None:
    got = reached(egress_to_nodes({"matchLabels": {"role": "ingress"}}, deny=True), Direction.EGRESS)
    assert {i for i, ok in got.items() if not ok} == {INGRESS_NODE, OTHER_CLUSTER_NODE}


def test_the_entities_still_select_labelled_nodes() -> None:
    for entity, want in (("remote-node", {REMOTE_NODE_ID, INGRESS_NODE, WORKER_NODE, OTHER_CLUSTER_NODE}),
                         ("host", {HOST_ID}), ("world", {WORLD_ID})):
        doc = cnp({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [{"toEntities": [entity]}]})
        got = reached(doc, Direction.EGRESS)
        assert {i for i, ok in got.items() if ok} == want, entity
    doc = cnp({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [{"toCIDR": ["0.0.0.0/0"]}]})
    assert {i for i, ok in reached(doc, Direction.EGRESS).items() if ok} == {WORLD_ID}


# -- parsing -----------------------------------------------------------------------------------------


def test_node_selector_keys_read_the_nodes_labels() -> None:
    doc = egress_to_nodes({"matchLabels": {"k8s:role": "ingress", "io.cilium.k8s.policy.cluster": "cluster-a"},
                           "matchExpressions": [{"key": "node:zone", "operator": "In", "values": ["z1"]}]})
    (sel,) = parse_policy(doc).rules[0].rules[0].peers or ()
    assert isinstance(sel, NodeSelector)
    # never scoped to the policy's namespace; a key without a source is the node's own label
    assert sel.key == "nodessel{io.cilium.k8s.policy.cluster In (cluster-a);node:role In (ingress);node:zone In (z1)}"


@pytest.mark.parametrize("field", ["fromNodes", "toNodes"])
def test_a_node_selector_beside_another_peer_kind_is_refused(field: str) -> None:
    direction, other = ("ingress", "fromEndpoints") if field == "fromNodes" else ("egress", "toEndpoints")
    doc = cnp({"endpointSelector": {}, direction: [{other: [{}], field: [{}]}]})
    errs = errors_of(doc)
    (path,) = errs
    assert path in (f"spec.{direction}[0].{field}", f"spec.{direction}[0].{other}")
    assert errs[path].code == "peer-kinds" and "Cilium refuses a rule that combines" in errs[path].message


def test_a_bad_node_selector_is_an_error_at_its_field() -> None:
    only_error(egress_to_nodes({"matchLabels": {"role": "in gress"}}), "spec.egress[0].toNodes[0].matchLabels.role",
               "label-value")
    only_error(egress_to_nodes({"matchExpressions": [{"key": "role", "operator": "Near"}]}),
               "spec.egress[0].toNodes[0].matchExpressions[0].operator", "operator")
    only_error(ccnp({"endpointSelector": {}, "ingress": [{"fromNodes": "role=x"}]}), "spec.ingress[0].fromNodes", "type")


def test_an_empty_node_list_selects_nothing_with_a_warning() -> None:
    doc = cnp({"endpointSelector": {}, "ingress": [{"fromNodes": [], "toPorts": [{"ports": [{"port": "80"}]}]}]})
    assert warnings_of(doc)["spec.ingress[0].fromNodes"].code == "empty-peer-list"
    assert parse_policy(doc).rules[0].rules[0].peers == ()
