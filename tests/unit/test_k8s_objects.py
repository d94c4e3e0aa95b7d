"""Pod, Namespace and Node objects -> typed values, with every error named by its field path."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from l7gate.k8s import K8sObjectError, Namespace, Node, Pod, parse_namespace, parse_node, parse_object, parse_pod
from l7gate.k8s.objects import node_addresses, node_identity_labels

BILLING = """
apiVersion: v1
kind: Pod
metadata:
  name: billing-service-7d9f-abcde
  namespace: payments
  labels:
    app: billing-service
    pod-template-hash: 7d9f
  annotations:
    l7gate.io/cluster: cluster-a
spec:
  serviceAccountName: billing
  nodeName: node-1
status:
  podIP: 10.0.1.5
  podIPs:
  - ip: 10.0.1.5
  - ip: fd00::0005
"""


def errors_of(obj: Any, **kw: Any) -> list[str]:
    with pytest.raises(K8sObjectError) as info:
        parse_object(obj, default_cluster=kw.get("default_cluster", "local"))
    return [str(e) for e in info.value.errors]


def test_parses_a_pod() -> None:
    pod = parse_pod(yaml.safe_load(BILLING), default_cluster="cluster-b")
    assert pod == Pod(
        cluster="cluster-a",
        namespace="payments",
        name="billing-service-7d9f-abcde",
        labels={"app": "billing-service", "pod-template-hash": "7d9f"},
        service_account="billing",
        ip="10.0.1.5",
        annotations={"l7gate.io/cluster": "cluster-a"},
        ips=("10.0.1.5", "fd00::5"),
        node_name="node-1",
    )
    assert pod.ref == "cluster-a/payments/billing-service-7d9f-abcde"
    assert hash(pod) == hash(parse_pod(yaml.safe_load(BILLING), default_cluster="x"))
    with pytest.raises(TypeError):
        pod.labels["app"] = "changed"  # type: ignore[index]


def test_defaults() -> None:
    pod = parse_pod(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1"}},
        default_cluster="cluster-b",
    )
    assert (pod.cluster, pod.namespace, pod.service_account) == ("cluster-b", "default", "default")
    assert (pod.ip, pod.ips, dict(pod.labels), pod.host_network) == (None, (), {}, False)


def test_pod_ips_alone_give_the_ip() -> None:
    obj = yaml.safe_load(BILLING)
    del obj["status"]["podIP"]
    assert parse_pod(obj, default_cluster="c").ip == "10.0.1.5"


def test_parses_a_namespace() -> None:
    ns = parse_namespace(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "payments", "labels": {"kubernetes.io/metadata.name": "payments"}},
        },
        default_cluster="cluster-a",
    )
    assert ns == Namespace("payments", {"kubernetes.io/metadata.name": "payments"}, "cluster-a")
    assert isinstance(parse_object(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}},
        default_cluster="c",
    ), Namespace)  # fmt: skip


def test_every_error_is_reported_with_its_path() -> None:
    bad = {
        "apiVersion": "v2",
        "kind": "Pod",
        "metadata": {
            "name": "Billing_Service",
            "namespace": "pay ments",
            "labels": {"app": 7, "ok": "fine", "bad key!": "x", "tier": "-nope-", "v": True},
            "annotations": {"l7gate.io/cluster": "Cluster A", "note": 3},
        },
        "spec": {"serviceAccountName": 5, "hostNetwork": "yes"},
        "status": {"podIP": "10.0.0.300", "podIPs": [{"ip": "fd00::1"}, "x"]},
    }
    errors = errors_of(bad)
    for expected in [
        'apiVersion: must be "v1"',
        "metadata.name: must be a DNS subdomain",
        "metadata.namespace: must be a DNS label",
        "metadata.labels.app: must be a string",
        "metadata.labels.bad key!: invalid key",
        "metadata.labels.tier: label value must",
        "metadata.labels.v: must be a string",
        "metadata.annotations.l7gate.io/cluster: must be a DNS label",
        "metadata.annotations.note: must be a string",
        "spec.serviceAccountName: must be a string",
        "spec.hostNetwork: must be a boolean",
        "status.podIP: not an IP address",
        "status.podIPs[1]: must be a mapping with an ip",
    ]:
        assert any(e.startswith(expected) for e in errors), (expected, errors)
    assert len(errors) == 13


def test_error_message_names_the_resource() -> None:
    obj = yaml.safe_load(BILLING)
    obj["metadata"]["labels"]["version"] = 1
    with pytest.raises(K8sObjectError, match=r"^Pod payments/billing-service-7d9f-abcde: "
                       r"metadata\.labels\.version: must be a string$"):
        parse_pod(obj, default_cluster="c")


@pytest.mark.parametrize(
    "obj, expected",
    [
        ([], "a Pod must be a mapping"),
        ({"apiVersion": "v1", "kind": "Pod"}, "metadata: is required"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {}}, "metadata.name: is required"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": []}, "metadata: must be a mapping"),
        ({"apiVersion": "v1", "kind": "ConfigMap"}, "kind: must be 'Pod', 'Namespace', 'Service', 'EndpointSlice' or 'Node'"),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": ["a"]}},
            "metadata.labels: must be a mapping",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": {"a/": "b"}}},
            "metadata.labels.a/: invalid key: name must not be empty",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": {"k": "v" * 64}}},
            "metadata.labels.k: label value must be at most 63 characters",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "status": {"podIPs": {}}},
            "status.podIPs: must be a list",
        ),
        (
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}},
            "metadata.name: must be a DNS label",
        ),
    ],
)
def test_bad_objects(obj: Any, expected: str) -> None:
    if isinstance(obj, list):
        with pytest.raises(K8sObjectError) as info:
            parse_pod(obj, default_cluster="c")
        errors = [str(e) for e in info.value.errors]
    else:
        errors = errors_of(obj)
    assert any(e.startswith(expected) for e in errors), errors

def test_name_errors_name_the_character_at_fault() -> None:
    """The same rules, and messages, as a policy's metadata (DNS-1123, as Kubernetes checks)."""
    pod_errors = errors_of({"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": "b/c", "namespace": "Pay"}})
    assert any(e.startswith("metadata.name: must be a DNS subdomain") and "'/' at position 2" in e
               for e in pod_errors), pod_errors
    assert any(e.startswith("metadata.namespace: must be a DNS label") and "'P' at position 1" in e
               for e in pod_errors), pod_errors
    ns_errors = errors_of({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n" * 64}})
    assert any("64 characters long: at most 63" in e for e in ns_errors), ns_errors


@pytest.mark.parametrize(
    "status, path, message",
    [
        ({"podIP": "0.0.0.0"}, "status.podIP", "unspecified address"),
        ({"podIP": "::"}, "status.podIP", "unspecified address"),
        ({"podIP": "224.0.0.1"}, "status.podIP", "multicast address"),
        ({"podIP": "ff02::1"}, "status.podIP", "multicast address"),
        ({"podIP": "255.255.255.255"}, "status.podIP", "broadcast address"),
        ({"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "0.0.0.0"}]}, "status.podIPs[1].ip",
         "unspecified address"),
        ({"podIP": "10.0.0.1", "hostIP": "0.0.0.0"}, "status.hostIP", "unspecified address"),
    ],
)
def test_addresses_no_pod_can_have_are_refused(status: dict[str, Any], path: str, message: str) -> None:
    errors = errors_of({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "status": status})
    assert [e for e in errors if e.startswith(f"{path}: ") and message in e], errors


def test_pod_remembers_which_field_each_address_came_from() -> None:
    pod = parse_pod(yaml.safe_load(BILLING), default_cluster="c")
    assert pod.ip_fields == ("status.podIP", "status.podIPs[1].ip")
    alone = parse_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                       "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]}}, default_cluster="c")
    assert alone.ips == ("10.0.0.1", "10.0.0.2")
    assert alone.ip_fields == ("status.podIPs[0].ip", "status.podIPs[1].ip")


def test_no_cluster_at_all_is_an_error() -> None:
    errors = errors_of(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}, default_cluster=""
    )
    assert errors == [
        "metadata.annotations.l7gate.io/cluster: is required when no default cluster name is given"
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@given(
    st.fixed_dictionaries(
        {"apiVersion": st.sampled_from(["v1", 1]), "kind": st.sampled_from(["Pod", "Namespace", "Node"])},
        optional={
            "metadata": st.fixed_dictionaries(
                {},
                optional={
                    "name": json_values | st.sampled_from(["a", "b-1"]),
                    "namespace": json_values,
                    "labels": json_values | st.dictionaries(st.text(max_size=6), json_values),
                    "annotations": json_values,
                },
            ) | json_values,
            "spec": json_values,
            "status": json_values | st.fixed_dictionaries({}, optional={
                "podIP": json_values, "podIPs": json_values, "addresses": json_values | st.lists(
                    st.fixed_dictionaries({}, optional={"type": st.sampled_from(["InternalIP", "Hostname", "x"])
                                                        | json_values, "address": json_values}), max_size=2)}),
        },
    )
)
def test_parser_either_parses_or_raises_its_error(obj: dict[str, Any]) -> None:
    try:
        parsed = parse_object(obj, default_cluster="c")
    except K8sObjectError as e:
        assert e.errors and all(str(f) for f in e.errors)
    else:
        assert parsed.name


def test_container_ports_are_collected_and_checked() -> None:
    from l7gate.k8s.objects import K8sObjectError, parse_pod

    obj = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
        "spec": {"containers": [
            {"name": "a", "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]},
            {"name": "b", "ports": [{"containerPort": 8080, "protocol": "TCP"}]},
        ]},
    }
    assert parse_pod(obj, default_cluster="c").ports == ((53, "UDP"), (8080, "TCP"))
    obj["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000  # type: ignore[index]
    try:
        parse_pod(obj, default_cluster="c")
    except K8sObjectError as exc:
        assert "spec.containers[0].ports[0].containerPort" in str(exc)
    else:
        raise AssertionError("out-of-range containerPort accepted")


def test_one_definition_of_a_pods_identity_labels() -> None:
    """The agent and `policy trace` both take a pod's identity labels from `pod_identity_labels`
    with `namespace_of`: a Namespace annotated for the pod's cluster wins over one for every
    cluster, and a Namespace of another cluster never applies (trace used to take it)."""
    from l7gate.k8s.objects import ANY_CLUSTER, namespace_of, pod_identity_labels, scoped_namespace

    def ns(name: str, labels: dict[str, str], cluster: str | None) -> Namespace:
        meta: dict[str, object] = {"name": name, "labels": labels}
        if cluster is not None:
            meta["annotations"] = {"l7gate.io/cluster": cluster}
        return scoped_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}, default_cluster="a")

    pod = parse_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "web",
                     "labels": {"app": "x"}, "annotations": {"l7gate.io/cluster": "a"}}}, default_cluster="a")
    everywhere, other, own = ns("web", {"tier": "any"}, None), ns("web", {"tier": "b"}, "b"), ns("web", {"tier": "a"}, "a")
    assert everywhere.cluster == ANY_CLUSTER and other.cluster == "b"
    key = "io.cilium.k8s.namespace.labels.tier"

    def labels(*namespaces: Namespace) -> dict[str, str]:
        return dict(pod_identity_labels(pod, namespace_of(pod, {(n.cluster, n.name): n for n in namespaces})))

    assert key not in labels(other)  # another cluster's namespace never applies
    assert labels(other, everywhere)[key] == "any"
    assert labels(other, everywhere, own)[key] == "a"
    assert labels()["io.kubernetes.pod.namespace"] == "web" and labels()["io.cilium.k8s.policy.cluster"] == "a"


NODE = """
apiVersion: v1
kind: Node
metadata:
  name: worker-2
  labels:
    role: ingress
    kubernetes.io/hostname: worker-2
  annotations:
    l7gate.io/cluster: cluster-a
spec:
  podCIDR: 10.0.2.0/24
status:
  addresses:
  - {type: InternalIP, address: 192.0.2.2}
  - {type: Hostname, address: worker-2}
  - {type: InternalIP, address: "fd00::2"}
  - {type: ExternalIP, address: 198.51.100.2}
  conditions:
  - {type: Ready, status: "True"}
"""


def test_parses_a_node() -> None:
    node = parse_node(yaml.safe_load(NODE), default_cluster="local")
    assert node == Node(cluster="cluster-a", name="worker-2",
                        labels={"role": "ingress", "kubernetes.io/hostname": "worker-2"},
                        addresses=("192.0.2.2", "fd00::2", "198.51.100.2"))
    assert node.ref == "cluster-a/worker-2" and node.ipv4_addresses == ("192.0.2.2", "198.51.100.2")
    assert node.address_fields == ("status.addresses[0].address", "status.addresses[2].address",
                                   "status.addresses[3].address")
    # every label of the Node, as `node:<key>` (Cilium's default: no filter), and its cluster
    assert dict(node_identity_labels(node, local=False)) == {
        "reserved:remote-node": "", "node:role": "ingress", "node:kubernetes.io/hostname": "worker-2",
        "io.cilium.k8s.policy.cluster": "cluster-a"}
    assert "reserved:host" in node_identity_labels(node, local=True)


@pytest.mark.parametrize("addresses, path, message", [
    ([{"type": "InternalIP", "address": "10.0.0.256"}], "status.addresses[0].address", "not an IP address"),
    ([{"type": "InternalIP", "address": "0.0.0.0"}], "status.addresses[0].address", "unspecified"),
    ([{"type": "ExternalIP", "address": "224.0.0.1"}], "status.addresses[0].address", "multicast"),
    ([{"type": "Internal", "address": "10.0.0.1"}], "status.addresses[0].type", "must be one of InternalIP"),
    ([{"type": "Hostname"}], "status.addresses[0].address", "non-empty string"),
    (["10.0.0.1"], "status.addresses[0]", "mapping"),
    ("10.0.0.1", "status.addresses", "must be a list"),
])
def test_bad_node_addresses_are_errors_at_their_field(addresses: Any, path: str, message: str) -> None:
    obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": addresses}}
    (error,) = errors_of(obj)
    assert error.startswith(f"{path}: ") and message in error, error


def test_node_label_errors_name_the_label() -> None:
    obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "N_1", "labels": {"role": "a b"}}}
    errors = errors_of(obj)
    assert any(e.startswith("metadata.name: ") for e in errors)
    assert any(e.startswith("metadata.labels.role: ") for e in errors)


def test_node_addresses_from_nodes_first_then_the_pods_host_ips() -> None:
    nodes = [Node("c", "n2", {"role": "x"}, ("192.0.2.2", "fd00::2")), Node("c", "n1", {}, ("192.0.2.1", "127.0.0.2"))]
    pods = [Pod("c", "web", "a", host_ip="192.0.2.9", node_name="n1"),  # a hostIP its Node does not list: n1's
            Pod("c", "web", "b", host_ip="192.0.2.2", node_name="n7"),  # a Node's address stays that Node's
            Pod("c", "web", "c", host_ip="192.0.2.3"),  # no node name: a node of unknown name
            Pod("c", "web", "d", host_ip="127.0.0.1", node_name="n1")]  # loopback: never a node address
    assert node_addresses(nodes, pods) == {"192.0.2.1": ("c", "n1"), "192.0.2.2": ("c", "n2"),
                                           "192.0.2.9": ("c", "n1"), "192.0.2.3": ("c", None)}
