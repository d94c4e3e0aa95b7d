"""The Cluster Mesh wire formats (clustermesh/wire.py): Cilium's keys and values, each one
encode/decode pair. Pure: no store, no I/O.

Expected bytes are written out by hand from Cilium's structs (docs/clustermesh.md names them),
so a change of format shows here as a failing literal, not only as a round trip that still
agrees with itself."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7gate.clustermesh import wire
from l7gate.clustermesh.wire import (
    ClusterConfig,
    IPIdentityPair,
    NodeAddress,
    NodeRecord,
    WireError,
    decode_cluster_config,
    decode_ip_identity,
    decode_label_string,
    decode_node,
    decode_synced,
    encode_cluster_config,
    encode_ip_identity,
    encode_label_string,
    encode_node,
    encode_synced,
)
from l7gate.identity import identity_labels
from l7gate.policy.labels import Labels

# -- label strings ---------------------------------------------------------------------------------


def test_label_string_is_ciliums_sorted_list() -> None:
    labels = identity_labels({"app": "x", "app.kubernetes.io/name": "web"}, namespace="y", cluster="c1")
    assert encode_label_string(labels) == (
        "k8s:app=x;k8s:app.kubernetes.io/name=web;k8s:io.cilium.k8s.policy.cluster=c1;"
        "k8s:io.kubernetes.pod.namespace=y;")
    assert decode_label_string(encode_label_string(labels)) == labels


def test_label_string_sorts_by_key_without_source_and_keeps_reserved_sources() -> None:
    labels = Labels.of({"reserved:host": "", "zeta": "1", "alpha": ""})
    # Cilium sorts its map by Label.Key: "alpha" < "host" < "zeta", whatever the source
    assert encode_label_string(labels) == "k8s:alpha=;reserved:host=;k8s:zeta=1;"
    assert decode_label_string("k8s:alpha=;reserved:host=;k8s:zeta=1;") == labels


def test_label_string_reads_what_ciliums_parser_reads() -> None:
    # any/container/unspec sources are dropped like k8s (policy/labels.py); no '=' is value ""
    assert decode_label_string("container:a=1;unspec:b;any:c=x=y;") == Labels.of({"a": "1", "b": "", "c": "x=y"})
    assert decode_label_string("plain=1;") == Labels.of({"plain": "1"})


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("k8s:a=1", "does not end"),
    ("k8s:a=1;;", "empty label"),
    ("k8s:=1;", "empty source or key"),
    (":a=1;", "empty source or key"),
    ("k8s:a=1;any:a=2;", "twice"),
])
def test_label_string_refuses(text: str, why: str) -> None:
    with pytest.raises(WireError, match=why):
        decode_label_string(text)


@pytest.mark.parametrize("labels, why", [
    ({}, "empty label set"),
    ({"a;b": "1"}, "'=' or ';'"),
    ({"a": "x;y"}, "value holds ';'"),
    ({"foo:app": "1", "app": "2"}, "share the key"),
])
def test_label_string_refuses_what_cilium_cannot_carry(labels: dict[str, str], why: str) -> None:
    with pytest.raises(WireError, match=why):
        encode_label_string(labels)


_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._/", min_size=1, max_size=20)
_VALUE = st.text(alphabet=st.characters(blacklist_characters=";", blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEY, _VALUE, min_size=1, max_size=8),
       st.sampled_from(["", "reserved:", "cidr:"]))
def test_label_string_round_trip(pairs: dict[str, str], source: str) -> None:
    labels = Labels.of({(source + k if i == 0 else k): v for i, (k, v) in enumerate(pairs.items())})
    try:
        text = encode_label_string(labels)
    except WireError as e:  # only the one documented refusal: two labels with one Cilium key
        assert "share the key" in str(e)
        return
    assert text.endswith(";")
    assert decode_label_string(text) == labels
    assert encode_label_string(decode_label_string(text)) == text


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("ak8s:=;/x-"), max_size=30) | st.text(max_size=30))
def test_label_string_parser_parses_or_raises_its_error(text: str) -> None:
    """CONVENTIONS 12: any input either parses or raises WireError, nothing else."""
    try:
        labels = decode_label_string(text)
    except WireError:
        return
    assert len(labels) >= 1


# -- keys ---------------------------------------------------------------------------------------------


def test_keys() -> None:
    text = "k8s:app=x;"
    assert wire.cluster_config_key("c1") == "cilium/cluster-config/c1"
    assert wire.synced_key("c1", wire.IP_PATH) == "cilium/synced/c1/cilium/state/ip/v1"
    assert wire.parse_synced_key("c1", "cilium/synced/c1/cilium/state/ip/v1") == wire.IP_PATH
    assert wire.parse_synced_key("c1", "cilium/synced/c10/cilium/state/ip/v1") is None
    assert wire.identity_id_key(65792) == "cilium/state/identities/v1/id/65792"
    assert wire.parse_identity_id_key("cilium/state/identities/v1/id/65792") == 65792
    assert wire.identity_value_key(text, "10.0.0.1") == "cilium/state/identities/v1/value/k8s:app=x;/10.0.0.1"
    # labels may hold '/', the node suffix never does: it is what follows the last '/'
    assert wire.parse_identity_value_key(
        "cilium/state/identities/v1/value/k8s:app.kubernetes.io/name=x;/node-1") == (
        "k8s:app.kubernetes.io/name=x;", "node-1")
    assert wire.node_key("c1", "n1") == "cilium/state/nodes/v1/c1/n1"
    assert wire.parse_node_key("cilium/state/nodes/v1/c1/n1") == ("c1", "n1")
    assert wire.ip_key(ipaddress.ip_network("10.0.0.1/32")) == "cilium/state/ip/v1/default/10.0.0.1"
    assert wire.ip_key(ipaddress.ip_network("10.0.0.0/24")) == "cilium/state/ip/v1/default/10.0.0.0/24"
    assert wire.parse_ip_key("cilium/state/ip/v1/default/fd00::1") == ipaddress.ip_network("fd00::1/128")
    assert wire.parse_ip_key("cilium/state/ip/v1/default/10.0.0.0/24") == ipaddress.ip_network("10.0.0.0/24")


@pytest.mark.parametrize("parse, key", [
    (wire.parse_identity_id_key, "cilium/state/identities/v1/id/007"),
    (wire.parse_identity_id_key, "cilium/state/identities/v1/id/x"),
    (wire.parse_identity_id_key, "cilium/state/identities/v1/id/"),
    (wire.parse_identity_value_key, "cilium/state/identities/v1/value/k8s:a=1;"),
    (wire.parse_node_key, "cilium/state/nodes/v1/c1"),
    (wire.parse_node_key, "cilium/state/nodes/v1/c1/n1/extra"),
    (wire.parse_ip_key, "cilium/state/ip/v1/default/10.0.0.300"),
    (wire.parse_ip_key, "cilium/state/ip/v1/default/10.0.0.1/24"),
])
def test_bad_keys(parse: object, key: str) -> None:
    with pytest.raises(WireError):
        parse(key)  # type: ignore[operator]


@pytest.mark.parametrize("name", ["", "C1", "-c", "c-", "a/b", "x" * 33, "c_1"])
def test_cluster_names(name: str) -> None:
    with pytest.raises(WireError):
        wire.check_cluster_name(name)
    assert wire.check_cluster_name("cluster-1") == "cluster-1"


# -- values -------------------------------------------------------------------------------------------


def test_cluster_config_is_ciliums_json() -> None:
    data = encode_cluster_config(ClusterConfig(id=3))
    assert data == b'{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}'
    assert decode_cluster_config(data) == ClusterConfig(id=3)
    # what an old Cilium writes: no capabilities at all
    assert decode_cluster_config(b'{"id":7}') == ClusterConfig(7, synced_canaries=False, max_connected_clusters=0)
    assert decode_cluster_config(b'{"capabilities":{"cached":true}}').cached


@pytest.mark.parametrize("data", [b"", b"[]", b'{"id":"3"}', b'{"id":-1}', b'{"id":true}',
                                  b'{"id":1,"capabilities":[]}', b'{"id":1,"capabilities":{"syncedCanaries":1}}'])
def test_cluster_config_refuses(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_cluster_config(data)


def test_synced_canary_is_rfc3339() -> None:
    assert encode_synced(1700000000.7) == b"2023-11-14T22:13:20Z"
    assert decode_synced(b"2023-11-14T22:13:20Z") == 1700000000
    assert decode_synced(b"2023-11-14T23:13:20+01:00") == 1700000000  # Go writes the local zone
    for bad in (b"yesterday", b"2023-11-14", b"2023-11-14T22:13:20", b"\xff"):
        with pytest.raises(WireError):
            decode_synced(bad)


def test_ip_identity_pair_is_ciliums_json() -> None:
    pair = IPIdentityPair(ipaddress.ip_network("10.2.0.7/32"), 131073, "192.168.0.2", 0,
                          "cilium-global:c2:n1:default/web", "default", "web")
    data = encode_ip_identity(pair)
    assert data == (b'{"IP":"10.2.0.7","Mask":null,"HostIP":"192.168.0.2","ID":131073,"Key":0,'
                    b'"Metadata":"cilium-global:c2:n1:default/web","K8sNamespace":"default","K8sPodName":"web"}')
    assert decode_ip_identity(data) == pair
    cidr = IPIdentityPair(ipaddress.ip_network("10.2.0.0/16"), 131074)
    data = encode_ip_identity(cidr)
    assert b'"Mask":"//8AAA=="' in data and b'"HostIP":""' in data and b"K8sNamespace" not in data
    assert decode_ip_identity(data) == cidr
    v6 = IPIdentityPair(ipaddress.ip_network("fd00::/64"), 5)
    assert decode_ip_identity(encode_ip_identity(v6)) == v6
    # Go's 16-byte form of an IPv4 mask, as a net.IPMask from a 16-byte IP may be
    assert decode_ip_identity(
        b'{"IP":"10.0.0.0","Mask":"/////////////////wAAAA==","ID":9}').prefix == ipaddress.ip_network("10.0.0.0/8")


@pytest.mark.parametrize("data", [
    b"{}", b'{"IP":"10.0.0.1"}', b'{"IP":"10.0.0.1","ID":0}', b'{"IP":"x","ID":5}',
    b'{"IP":"10.0.0.1","ID":5,"Mask":"!!"}', b'{"IP":"10.0.0.1","ID":5,"Mask":"/wD/AA=="}',
    b'{"IP":"10.0.0.1","ID":5,"Mask":"//8AAA=="}', b'{"IP":"10.0.0.1","ID":5,"HostIP":"h"}',
    b'{"IP":"10.0.0.1","ID":5,"K8sNamespace":3}', b'{"IP":"10.0.0.1","ID":2E9}', b"\x00",
])
def test_ip_identity_pair_refuses(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_ip_identity(data)


def test_node_is_ciliums_json() -> None:
    node = NodeRecord("n1", "c2", 2, (NodeAddress("InternalIP", "192.168.0.2"),), "10.2.0.0/24", None,
                      "10.2.0.9", None, 0, (("topology.kubernetes.io/zone", "a"),))
    data = encode_node(node)
    assert data.startswith(b'{"Name":"n1","Cluster":"c2","IPAddresses":[{"Type":"InternalIP","IP":"192.168.0.2"}],'
                           b'"IPv4AllocCIDR":{"IP":"10.2.0.0","Mask":"////AA=="},"IPv6AllocCIDR":null,'
                           b'"IPv4HealthIP":"10.2.0.9","IPv6HealthIP":"","ClusterID":2,')
    assert decode_node(data) == node
    # Cilium's own documentation example (extra fields ignored, no ClusterID: 0)
    cilium = (b'{"Name":"runtime1","IPAddresses":[{"Type":"InternalIP","IP":"10.0.2.15"}],'
              b'"IPv4AllocCIDR":{"IP":"10.11.0.0","Mask":"//8AAA=="},"IPv6AllocCIDR":{"IP":"f00d::a0f:0:0:0",'
              b'"Mask":"//////////////////8AAA=="},"IPv4HealthIP":"","IPv6HealthIP":"","Source":"kvstore",'
              b'"BootID":"x"}')
    got = decode_node(cilium)
    assert got.ipv4_alloc_cidr == "10.11.0.0/16" and got.ipv6_alloc_cidr == "f00d::a0f:0:0:0/112"
    assert got.ips() == ("10.0.2.15",) and got.cluster_id == 0


@pytest.mark.parametrize("data", [b'{}', b'{"Name":""}', b'{"Name":"n","IPAddresses":{}}',
                                  b'{"Name":"n","IPAddresses":[{"IP":"x"}]}',
                                  b'{"Name":"n","IPv4AllocCIDR":{"IP":"10.0.0.0","Mask":"/wD/AA=="}}',
                                  b'{"Name":"n","Labels":{"a":1}}', b'{"Name":"n","ClusterID":"2"}'])
def test_node_refuses(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_node(data)


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["IP", "Mask", "ID", "HostIP", "Name", "IPAddresses", "id",
                                             "capabilities", "Type", "Key", "Labels"]), inner, max_size=5),
                        max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(_JSONISH)
def test_value_decoders_parse_or_raise_their_error(doc: object) -> None:
    """CONVENTIONS 12: a remote's value never raises anything but WireError in a decoder."""
    import json

    data = json.dumps(doc).encode()
    for decode in (decode_ip_identity, decode_node, decode_cluster_config):
        try:
            decode(data)
        except WireError:
            pass
