"""Service objects -> `l7gate.services.Service`, and what a Service needs of a Pod (named ports,
readiness): every error named by its field path, Cilium's annotations with Cilium's meaning."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from l7gate.k8s import K8sObjectError, parse_object, parse_pod, parse_service, pod_backend
from l7gate.services import BackendPod, Service, ServicePort

BILLING_SVC = """
apiVersion: v1
kind: Service
metadata:
  name: billing-service
  namespace: payments
  annotations:
    io.cilium/global-service: "true"
    l7gate.io/cluster: cluster-a
spec:
  type: ClusterIP
  clusterIP: 10.96.0.20
  ports:
  - port: 8080
    protocol: TCP
  selector:
    app: billing-service
"""


def svc(**spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}], "selector": {"app": "web"}},
    }
    obj["spec"].update(spec)
    return obj


def annotated(annotations: dict[str, Any]) -> dict[str, Any]:
    obj = svc()
    obj["metadata"]["annotations"] = annotations
    return obj


def errors_of(obj: Any) -> list[str]:
    with pytest.raises(K8sObjectError) as info:
        parse_service(obj, default_cluster="local")
    return [str(e) for e in info.value.errors]


def only_error(obj: Any) -> str:
    errors = errors_of(obj)
    assert len(errors) == 1, errors
    return errors[0]


# -- Services ------------------------------------------------------------------------------------


def test_parses_the_seed_service() -> None:
    parsed = parse_object(yaml.safe_load(BILLING_SVC), default_cluster="cluster-b")
    assert parsed == Service(
        cluster="cluster-a", namespace="payments", name="billing-service", cluster_ip="10.96.0.20",
        ports=(ServicePort(name="", port=8080, protocol="TCP", target=8080),),
        selector={"app": "billing-service"}, global_=True, shared=True, affinity="none",
    )
    assert isinstance(parsed, Service) and parsed.ref == "payments/billing-service"
    assert hash(parsed) == hash(parse_service(yaml.safe_load(BILLING_SVC), default_cluster="x"))
    with pytest.raises(TypeError):
        parsed.selector["app"] = "other"  # type: ignore[index]


def test_defaults() -> None:
    s = parse_service({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                       "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}]}}, default_cluster="c")
    assert (s.cluster, s.namespace, s.selector, s.global_, s.shared, s.affinity) == (
        "c", "default", None, False, True, "none")
    assert s.ports == (ServicePort("", 443, "TCP", 443),)


def test_ports_names_protocols_and_targets() -> None:
    s = parse_service(svc(ports=[
        {"name": "http", "port": 80, "targetPort": "web"},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]), default_cluster="c")
    assert s.ports == (
        ServicePort("http", 80, "TCP", "web"),
        ServicePort("dns", 53, "UDP", 5353),
        ServicePort("dns-tcp", 53, "TCP", 53),
    )


@pytest.mark.parametrize("spec, expected", [
    ({"clusterIP": "None"}, None),  # headless
    ({"clusterIP": ""}, None),
    ({"clusterIP": None}, None),  # not allocated, as in a hand-written file: no frontend
])
def test_services_without_a_frontend(spec: dict[str, Any], expected: None) -> None:
    assert parse_service(svc(**spec), default_cluster="c").cluster_ip is expected


def test_headless_service_may_have_no_ports_but_others_must() -> None:
    assert parse_service(svc(clusterIP="None", ports=[]), default_cluster="c").ports == ()
    assert only_error(svc(ports=[])).startswith("spec.ports: at least one port is required")


@pytest.mark.parametrize("selector", [None, {}])
def test_no_selector_and_the_empty_one_are_the_same(selector: Any) -> None:
    """kubernetes/kubernetes#25836: the API server cannot tell `{}` from an absent selector."""
    assert parse_service(svc(selector=selector), default_cluster="c").selector is None


def test_node_port_and_load_balancer_keep_their_cluster_ip() -> None:
    for kind in ("NodePort", "LoadBalancer"):
        s = parse_service(svc(type=kind, ports=[{"port": 80, "nodePort": 30080}]), default_cluster="c")
        assert s.cluster_ip == "10.96.0.10" and s.ports[0].port == 80


@pytest.mark.parametrize("annotations, expected", [
    ({"service.cilium.io/global": "true"}, (True, True, "none")),
    ({"io.cilium/global-service": "true"}, (True, True, "none")),
    ({"service.cilium.io/global": "True", "service.cilium.io/shared": "FALSE"}, (True, False, "none")),
    ({"io.cilium/global-service": "true", "io.cilium/shared-service": "false"}, (True, False, "none")),
    ({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}, (True, True, "local")),
    ({"service.cilium.io/global": "true", "io.cilium/service-affinity": "Remote"}, (True, True, "remote")),
    ({"service.cilium.io/global": "false"}, (False, True, "none")),
    # the newer key wins over the older one, as in Cilium's annotation lookup
    ({"service.cilium.io/global": "false", "io.cilium/global-service": "true"}, (False, True, "none")),
])
def test_cilium_annotations(annotations: dict[str, str], expected: tuple[bool, bool, str]) -> None:
    s = parse_service(annotated(annotations), default_cluster="c")
    assert (s.global_, s.shared, s.affinity) == expected


@pytest.mark.parametrize("spec, expected", [
    ({"type": "ExternalName", "externalName": "db.example.com"},
     "spec.type: ExternalName Services are not supported by l7gate"),
    ({"type": "Ingress"}, "spec.type: must be ClusterIP, NodePort, LoadBalancer or ExternalName, got 'Ingress'"),
    ({"clusterIP": "10.96.0.300"}, "spec.clusterIP: must be an IPv4 address or \"None\" (headless), got '10.96.0.300'"),
    ({"clusterIP": "fd00::10"}, "spec.clusterIP: l7gate supports IPv4 ClusterIPs only, got 'fd00::10'"),
    ({"clusterIP": "127.0.0.1"}, "spec.clusterIP: 127.0.0.1 is a loopback address, which cannot be a Service's address"),
    ({"clusterIP": "169.254.169.254"}, "spec.clusterIP: 169.254.169.254 is a link-local address"),
    ({"clusterIP": "0.0.0.0"}, "spec.clusterIP: 0.0.0.0 is the unspecified address"),
    ({"clusterIP": 10}, "spec.clusterIP: must be a string"),
    ({"ports": {"port": 80}}, "spec.ports: must be a list"),
    ({"ports": ["80"]}, "spec.ports[0]: must be a mapping"),
    ({"ports": [{"port": 0}]}, "spec.ports[0].port: must be a port number 1-65535, got 0"),
    ({"ports": [{"port": 65536}]}, "spec.ports[0].port: must be a port number 1-65535, got 65536"),
    ({"ports": [{"port": True}]}, "spec.ports[0].port: must be a port number 1-65535, got True"),
    ({"ports": [{}]}, "spec.ports[0].port: must be a port number 1-65535, got None"),
    ({"ports": [{"port": 80, "protocol": "tcp"}]}, "spec.ports[0].protocol: must be TCP, UDP or SCTP, got 'tcp'"),
    ({"ports": [{"port": 80, "targetPort": 0}]}, "spec.ports[0].targetPort: must be a port number 1-65535, got 0"),
    ({"ports": [{"port": 80, "targetPort": "8080"}]},
     "spec.ports[0].targetPort: must be a port number 1-65535 or a container port's name;"),
    ({"ports": [{"port": 80, "targetPort": "8080"}]}, "(a number: write it without quotes)"),
    ({"ports": [{"port": 80, "targetPort": "http--alt"}]}, "spec.ports[0].targetPort: must be a port number"),
    ({"ports": [{"port": 80, "targetPort": "a-very-long-port-name"}]}, "at most 15 are allowed"),
    ({"ports": [{"port": 80}, {"port": 81, "name": "b"}]},
     "spec.ports[0].name: is required when a Service has more than one port"),
    ({"ports": [{"port": 80, "name": "Web"}]}, "spec.ports[0].name: must be a DNS label"),
    ({"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]},
     "spec.ports[1].name: duplicate port name 'a' (also spec.ports[0])"),
    ({"ports": [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]},
     "spec.ports[1]: duplicate port 80/TCP (also spec.ports[0])"),
    ({"selector": ["app"]}, "spec.selector: must be a mapping"),
    ({"selector": {"app": 1}}, "spec.selector.app: must be a string"),
    ({"selector": {"app": "a b"}}, "spec.selector.app: label value must consist of"),
])
def test_bad_specs_name_their_field(spec: dict[str, Any], expected: str) -> None:
    assert expected in only_error(svc(**spec))


def test_the_same_port_number_over_two_protocols_is_fine() -> None:
    s = parse_service(svc(ports=[{"port": 53, "name": "u", "protocol": "UDP"}, {"port": 53, "name": "t"}]),
                      default_cluster="c")
    assert [(p.port, p.protocol) for p in s.ports] == [(53, "UDP"), (53, "TCP")]


@pytest.mark.parametrize("annotations, expected", [
    ({"service.cilium.io/global": "yes"},
     "metadata.annotations.service.cilium.io/global: must be \"true\", \"false\", got 'yes'"),
    ({"io.cilium/global-service": "1"}, "metadata.annotations.io.cilium/global-service: must be"),
    ({"service.cilium.io/shared": "no"}, "metadata.annotations.service.cilium.io/shared: must be"),
    ({"service.cilium.io/affinity": "nearest"},
     "metadata.annotations.service.cilium.io/affinity: must be \"local\", \"remote\", \"none\", got 'nearest'"),
    ({"io.cilium/service-affinity": "far"}, "metadata.annotations.io.cilium/service-affinity: must be"),
    ({"service.cilium.io/global": True}, "metadata.annotations.service.cilium.io/global: must be a string"),
])
def test_bad_annotations_name_the_annotation(annotations: dict[str, Any], expected: str) -> None:
    assert expected in only_error(annotated(annotations))


@pytest.mark.parametrize("name, expected", [
    ("1web", "must start with a lowercase letter"),  # a DNS-1035 label, stricter than a pod's name
    ("web.shop", "'.' at position 4 is not allowed"),
    ("Web", "'W' at position 1 is not allowed (uppercase: write 'w')"),
    ("w" * 64, "at most 63 are allowed"),
    ("", "metadata.name: is required"),
    (7, "metadata.name: must be a string"),
])
def test_service_names_are_dns_1035_labels(name: Any, expected: str) -> None:
    obj = svc()
    obj["metadata"]["name"] = name
    error = only_error(obj)
    assert error.startswith("metadata.name: ") and expected in error


def test_every_error_is_reported_with_the_service_named() -> None:
    obj = svc(type="ExternalName", clusterIP="x", ports=[{"port": 0}, {"port": 81, "protocol": "ICMP"}])
    obj["metadata"]["annotations"] = {"service.cilium.io/affinity": "near"}
    with pytest.raises(K8sObjectError) as info:
        parse_service(obj, default_cluster="c")
    assert info.value.resource == "Service shop/web"
    assert [e.path for e in info.value.errors] == [
        "metadata.annotations.service.cilium.io/affinity", "spec.type", "spec.clusterIP",
        "spec.ports[0].port", "spec.ports[0].name", "spec.ports[1].protocol", "spec.ports[1].name",
    ]


def test_cluster_annotation_as_for_pods() -> None:
    obj = svc()
    assert parse_service(obj, default_cluster="b").cluster == "b"
    with pytest.raises(K8sObjectError) as info:
        parse_service(svc(), default_cluster="")
    assert [str(e) for e in info.value.errors] == [
        "metadata.annotations.l7gate.io/cluster: is required when no default cluster name is given"
    ]


@pytest.mark.parametrize("obj, expected", [
    ([], "a Service must be a mapping"),
    ({"apiVersion": "v2", "kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "None"}},
     "apiVersion: must be \"v1\", got 'v2'"),
    ({"apiVersion": "v1", "kind": "Service", "spec": {"clusterIP": "None"}}, "metadata: is required"),
])
def test_bad_headers(obj: Any, expected: str) -> None:
    assert expected in errors_of(obj)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
port_values = st.fixed_dictionaries({}, optional={
    "port": st.integers(-1, 70000) | json_values, "name": st.sampled_from(["", "a", "b", "A"]) | json_values,
    "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "tcp"]) | json_values,
    "targetPort": st.integers(-1, 70000) | st.sampled_from(["http", "8080", "--"]) | json_values,
})


@given(st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["v1", 1]), "kind": st.just("Service")},
    optional={
        "metadata": st.fixed_dictionaries({}, optional={
            "name": json_values | st.sampled_from(["a", "b-1", "1b"]),
            "namespace": json_values,
            "annotations": json_values | st.dictionaries(
                st.sampled_from(["service.cilium.io/global", "service.cilium.io/shared",
                                 "service.cilium.io/affinity", "io.cilium/global-service"]),
                st.sampled_from(["true", "false", "local", "remote", "none", "x"]) | json_values),
        }) | json_values,
        "spec": st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["ClusterIP", "NodePort", "ExternalName"]) | json_values,
            "clusterIP": st.sampled_from(["10.0.0.1", "None", "", "::1"]) | json_values,
            "ports": st.lists(port_values, max_size=3) | json_values,
            "selector": json_values,
        }) | json_values,
    },
))
def test_parser_either_parses_or_raises_its_error(obj: dict[str, Any]) -> None:
    try:
        parsed = parse_object(obj, default_cluster="c")
    except K8sObjectError as e:
        assert e.errors and all(str(f) for f in e.errors)
    else:
        assert isinstance(parsed, Service) and parsed.name


# -- what a Service needs of a Pod ------------------------------------------------------------


def pod(**parts: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": "http"}]}]},
        "status": {"podIP": "10.0.0.5"},
    }
    for key, value in parts.items():
        obj[key] = value
    return obj


def pod_errors(obj: Any) -> list[str]:
    with pytest.raises(K8sObjectError) as info:
        parse_pod(obj, default_cluster="c")
    return [str(e) for e in info.value.errors]


def test_named_ports_keep_the_spec_order() -> None:
    p = parse_pod(pod(spec={"containers": [
        {"name": "a", "ports": [{"containerPort": 9090, "name": "metrics"}, {"containerPort": 8080}]},
        {"name": "b", "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"},
                                {"containerPort": 8443, "name": "metrics"}]},
    ]}), default_cluster="c")
    assert p.named_ports == (("metrics", 9090, "TCP"), ("dns", 53, "UDP"), ("metrics", 8443, "TCP"))
    assert p.ports == ((53, "UDP"), (8080, "TCP"), (8443, "TCP"), (9090, "TCP"))


@pytest.mark.parametrize("name, expected", [
    ("http-alternative", "is 16 characters long: at most 15 are allowed"),
    ("HTTP", "'H' is not allowed (lowercase letters, digits and '-' only)"),
    ("8080", "must contain at least one letter"),
    ("-http", "must not start or end with '-'"),
    ("http-", "must not start or end with '-'"),
    ("h--t", "must not contain '--'"),
    ("h_t", "'_' is not allowed"),
    (8080, "must be a string"),
])
def test_container_port_names_are_iana_service_names(name: Any, expected: str) -> None:
    obj = pod(spec={"containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": name}]}]})
    errors = pod_errors(obj)
    assert len(errors) == 1 and errors[0].startswith("spec.containers[0].ports[0].name: ")
    assert expected in errors[0]


def test_a_port_name_twice_in_one_container_is_refused() -> None:
    obj = pod(spec={"containers": [{"name": "c", "ports": [
        {"containerPort": 80, "name": "http"}, {"containerPort": 81, "name": "http"}]}]})
    assert pod_errors(obj) == [
        "spec.containers[0].ports[1].name: duplicate port name 'http' in this container "
        "(also spec.containers[0].ports[0])"
    ]


@pytest.mark.parametrize("meta, status, ready", [
    ({}, {"podIP": "10.0.0.5"}, True),  # a hand-written pod: no word about readiness
    ({}, {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}, True),
    ({}, {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}, False),
    ({}, {"conditions": [{"type": "Ready", "status": "Unknown"}]}, False),  # IsPodReady wants True
    ({}, {"conditions": [{"type": "PodScheduled", "status": "False"}]}, True),
    ({}, {"phase": "Pending"}, True),
    ({}, {"phase": "Failed"}, False),
    ({}, {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True"}]}, False),
    ({"deletionTimestamp": "2024-05-01T10:00:00Z"}, {"phase": "Running"}, False),
])
def test_readiness(meta: dict[str, Any], status: dict[str, Any], ready: bool) -> None:
    obj = pod(status=status)
    obj["metadata"].update(meta)
    assert parse_pod(obj, default_cluster="c").ready is ready


def test_readiness_survives_yaml_timestamps() -> None:
    obj = yaml.safe_load("""
apiVersion: v1
kind: Pod
metadata: {name: web-1, deletionTimestamp: 2024-05-01T10:00:00Z}
""")
    assert parse_pod(obj, default_cluster="c").ready is False


@pytest.mark.parametrize("status, expected", [
    ({"phase": "running"}, "status.phase: must be one of Pending, Running, Succeeded, Failed, Unknown, got 'running'"),
    ({"conditions": {"Ready": "True"}}, "status.conditions: must be a list"),
    ({"conditions": ["Ready"]}, "status.conditions[0]: must be a mapping"),
    ({"conditions": [{"status": "True"}]}, "status.conditions[0].type: must be a string"),
    ({"conditions": [{"type": "Ready", "status": False}]},
     'status.conditions[0].status: must be "True", "False" or "Unknown" (a string: quote it in YAML), got False'),
])
def test_bad_status_names_its_field(status: dict[str, Any], expected: str) -> None:
    assert pod_errors(pod(status=status)) == [expected]


def test_pod_backend_is_the_tables_view_of_a_pod() -> None:
    obj = pod(status={"podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}],
                      "conditions": [{"type": "Ready", "status": "False"}]})
    obj["metadata"]["annotations"] = {"l7gate.io/cluster": "a"}
    assert pod_backend(parse_pod(obj, default_cluster="c")) == BackendPod(
        ref="a/shop/web-1", cluster="a", namespace="shop", ip="10.0.0.5", labels={"app": "web"},
        ready=False, named_ports=(("http", 8080, "TCP"),),
    )
    no_v4 = copy.deepcopy(obj)
    no_v4["status"]["podIPs"] = [{"ip": "fd00::5"}]
    assert pod_backend(parse_pod(no_v4, default_cluster="c")) is None
