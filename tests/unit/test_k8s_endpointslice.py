"""EndpointSlice objects (discovery.k8s.io/v1) -> `l7gate.services.EndpointSlice`: what is read
(the Service it belongs to, its endpoints' addresses and conditions, its ports), the API server's
checks, every error named by its field path; the parser on junk; a Service's metadata labels;
and what a `toServices` rule reads of a Service (`service_target`)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from l7gate.k8s import K8sObjectError, parse_endpoint_slice, parse_object
from l7gate.k8s.objects import parse_service, service_target
from l7gate.services import EndpointSlice, SliceEndpoint, SlicePort

EXT = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-1
  namespace: partners
  labels: {kubernetes.io/service-name: ext, endpointslice.kubernetes.io/managed-by: someone}
addressType: IPv4
endpoints:
- addresses: ["192.0.2.10"]
- addresses: ["192.0.2.11"]
  conditions: {ready: false}
- addresses: ["192.0.2.12"]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n1
  targetRef: {kind: Pod, name: x}
ports:
- {name: https, port: 443, protocol: TCP}
- {name: dns, port: 53, protocol: UDP, appProtocol: dns}
"""


def slice_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXT)
    doc.update(over)
    return doc


def errors_of(obj: Any) -> dict[str, str]:
    with pytest.raises(K8sObjectError) as ei:
        parse_endpoint_slice(obj, default_cluster="c")
    return {f.path: f.message for f in ei.value.errors}


def test_what_is_read_of_a_slice() -> None:
    es = parse_endpoint_slice(slice_doc(), default_cluster="cluster-a")
    assert es == EndpointSlice(
        "cluster-a", "partners", "ext-1", "ext", "IPv4",
        (SliceEndpoint(("192.0.2.10",), True, True), SliceEndpoint(("192.0.2.11",), False, False),
         SliceEndpoint(("192.0.2.12",), False, True)),
        (SlicePort("dns", 53, "UDP"), SlicePort("https", 443, "TCP")))
    assert es.ref == "partners/ext-1" and es.service_ref == "partners/ext"
    assert parse_object(slice_doc(), default_cluster="c") == parse_endpoint_slice(slice_doc(), default_cluster="c")


def test_defaults_and_a_slice_of_no_service() -> None:
    doc = slice_doc(metadata={"name": "loose"}, endpoints=None, ports=[{"name": "", "port": 80}, {"name": "all"}])
    es = parse_endpoint_slice(doc, default_cluster="c")
    # default namespace; no service-name label: it belongs to no Service; a port without a
    # number (every port) gives no backend port; TCP by default
    assert (es.namespace, es.service, es.endpoints, es.ports) == ("default", None, (), (SlicePort("", 80, "TCP"),))
    v6 = parse_endpoint_slice(slice_doc(addressType="IPv6", endpoints=[{"addresses": ["2001:db8::1"]}]),
                              default_cluster="c")
    assert v6.endpoints[0].addresses == ("2001:db8::1",)
    fqdn = parse_endpoint_slice(slice_doc(addressType="FQDN", endpoints=[{"addresses": ["db.example.com"]}]),
                                default_cluster="c")
    assert fqdn.address_type == "FQDN"


@pytest.mark.parametrize("over, path, words", [
    ({"apiVersion": "discovery.k8s.io/v1beta1"}, "apiVersion", 'must be "discovery.k8s.io/v1"'),
    ({"addressType": None}, "addressType", "is required"),
    ({"addressType": "IPv5"}, "addressType", "IPv4, IPv6 or FQDN"),
    ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses", "is required"),
    ({"endpoints": [{}]}, "endpoints[0].addresses", "is required"),
    ({"endpoints": [{"addresses": ["2001:db8::1"]}]}, "endpoints[0].addresses[0]", "must be an IPv4 address"),
    ({"endpoints": [{"addresses": ["10.1.2"]}]}, "endpoints[0].addresses[0]", "must be an IPv4 address"),
    ({"endpoints": [{"addresses": ["127.0.0.1"]}]}, "endpoints[0].addresses[0]", "loopback"),
    ({"endpoints": [{"addresses": ["0.0.0.0"]}]}, "endpoints[0].addresses[0]", "unspecified"),
    ({"endpoints": [{"addresses": ["169.254.1.1"]}]}, "endpoints[0].addresses[0]", "link-local"),
    ({"endpoints": [{"addresses": ["224.0.0.5"]}]}, "endpoints[0].addresses[0]", "link-local"),
    ({"endpoints": [{"addresses": [f"10.0.0.{i}" for i in range(101)]}]}, "endpoints[0].addresses",
     "at most 100"),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "true"}}]},
     "endpoints[0].conditions.ready", "without quotes"),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "conditions": []}]}, "endpoints[0].conditions", "mapping"),
    ({"endpoints": "x"}, "endpoints", "must be a list"),
    ({"ports": [{"name": "https", "port": 0}]}, "ports[0].port", "1-65535"),
    ({"ports": [{"name": "https", "port": 443, "protocol": "ICMP"}]}, "ports[0].protocol", "TCP, UDP or SCTP"),
    ({"ports": [{"name": "Https", "port": 443}]}, "ports[0].name", "DNS label"),
    ({"ports": [{"name": "a", "port": 1}, {"name": "a", "port": 2}]}, "ports[1].name", "duplicate"),
    ({"metadata": {"namespace": "x"}}, "metadata.name", "is required"),
    ({"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "a b"}}},
     "metadata.labels.kubernetes.io/service-name", "label value"),
])
def test_bad_slices_name_their_field(over: dict[str, Any], path: str, words: str) -> None:
    errs = errors_of(slice_doc(**over))
    assert path in errs, errs
    assert words in errs[path], errs[path]


def test_every_error_at_once() -> None:
    errs = errors_of(slice_doc(addressType="IPv6", ports=[{"port": 70000}]))
    assert {"endpoints[0].addresses[0]", "endpoints[1].addresses[0]", "endpoints[2].addresses[0]",
            "ports[0].port"} <= set(errs)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.sampled_from(["", "x", "10.0.0.1", "::1", "IPv4"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "addresses", "port"]), inner,
                                                                  max_size=3),
    max_leaves=8,
)


@given(st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["discovery.k8s.io/v1", "v1"]), "kind": st.just("EndpointSlice")},
    optional={
        "metadata": st.fixed_dictionaries({}, optional={
            "name": json_values | st.sampled_from(["a", "ext-1"]),
            "labels": json_values | st.just({"kubernetes.io/service-name": "ext"}),
        }) | json_values,
        "addressType": st.sampled_from(["IPv4", "IPv6", "FQDN"]) | json_values,
        "endpoints": st.lists(st.fixed_dictionaries({}, optional={
            "addresses": st.lists(st.sampled_from(["10.0.0.1", "::1", "2001:db8::1", "x"]) | json_values, max_size=3),
            "conditions": st.dictionaries(st.sampled_from(["ready", "serving", "terminating"]),
                                          st.booleans() | json_values, max_size=3) | json_values,
        }) | json_values, max_size=3) | json_values,
        "ports": st.lists(st.fixed_dictionaries({}, optional={
            "name": st.sampled_from(["", "https", "A"]) | json_values,
            "port": st.integers(-1, 70000) | json_values,
            "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "ICMP"]) | json_values,
        }) | json_values, max_size=3) | json_values,
    },
))
def test_parser_either_parses_or_raises_its_error(obj: dict[str, Any]) -> None:
    try:
        parsed = parse_endpoint_slice(copy.deepcopy(obj), default_cluster="c")
    except K8sObjectError as e:
        assert e.errors and all(str(f) and f.path is not None for f in e.errors)
    else:
        assert isinstance(parsed, EndpointSlice) and parsed.name


def test_what_to_services_reads_of_a_service() -> None:
    ext = parse_service({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "ext", "namespace": "partners", "labels": {"role": "partner"}},
                         "spec": {"ports": [{"port": 443}]}}, default_cluster="c")
    assert dict(ext.labels) == {"role": "partner"}
    t = service_target(ext, ["192.0.2.11", "192.0.2.10", "192.0.2.10"])
    assert (t.key, t.selectable, [a.with_prefixlen for a in t.addresses]) == (
        "partners/ext", True, ["192.0.2.10/32", "192.0.2.11/32"])
    assert t.labels.get("role") == "partner"
    pods = parse_service({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                          "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}}, default_cluster="c")
    # a Service with a selector is not selectable and keeps no addresses
    t = service_target(pods, ["10.0.0.1"])
    assert not t.selectable and t.addresses == ()
    with pytest.raises(K8sObjectError, match="metadata.labels.role"):
        parse_service({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "labels": {"role": 1}},
                       "spec": {"ports": [{"port": 1}]}}, default_cluster="c")
