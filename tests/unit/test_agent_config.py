"""The agent's configuration file: defaults, and errors that name the field."""

from __future__ import annotations

import pytest

from l7gate.agent.config import ConfigError, parse_config


def errors(data: object) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, "agent.yaml")
    return {e.path: e.message for e in ei.value.errors}


def test_defaults() -> None:
    c = parse_config({"stateDir": "/tmp/l7g-x"})
    assert c.datapath_mode == "loopback" and c.admin_listen == "127.0.0.1:9876"
    assert c.xds_listen == "unix:/tmp/l7g-x/xds.sock"  # stable across restarts
    assert c.node_id == "l7gate~default~node-1" and c.mtls.enabled is False and c.pin_dir == "/sys/fs/bpf/l7g/node-1"


def test_kernel_mode_with_mtls_and_spire() -> None:
    c = parse_config({
        "node": "a1", "cluster": {"name": "cluster-a", "id": 1}, "clusters": {"cluster-b": 2},
        "datapath": {"mode": "kernel", "links": ["eth1"], "bpf": False},
        "mtls": {"enabled": True, "listen": "10.0.1.1:4250", "spireSocket": "/run/spire/agent.sock"},
    })
    assert c.datapath_mode == "kernel" and c.links == ("eth1",) and c.bpf is False
    assert c.mtls.enabled and c.mtls.spire_socket == "/run/spire/agent.sock" and c.cluster_id_of("cluster-b") == 2
    # Encryption in transit is on with mutual auth unless turned off.
    assert c.mtls.tunnel and c.mtls.tunnel_port == 15443


def test_encryption_settings() -> None:
    base = {"datapath": {"mode": "kernel"}}
    c = parse_config({**base, "mtls": {"enabled": True, "listen": "10.0.1.1:4250", "encryption": "none"}})
    assert c.mtls.enabled and not c.mtls.tunnel
    assert not parse_config({**base, "mtls": {"enabled": False}}).mtls.tunnel
    errs = errors({**base, "mtls": {"enabled": True, "listen": "10.0.1.1:4250", "encryption": "wireguard",
                                    "tunnelPort": 4250}})
    assert "'tunnel' or 'none'" in errs["mtls.encryption"]
    assert "must differ from mtls.port" in errs["mtls.tunnelPort"]


def test_every_error_names_its_field() -> None:
    errs = errors({
        "nodes": 1,
        "cluster": {"id": 300},
        "admin": {"listen": "0.0.0.0:9876"},
        "datapath": {"mode": "ebpf", "pinDir": "/tmp/x", "bpf": "yes"},
        "mtls": {"enabled": True, "spireSocket": "relative.sock"},
        "envoy": {"concurrency": 0},
    })
    assert "unknown field" in errs["nodes"]
    assert "0-255" in errs["cluster.id"]
    assert "set admin.token" in errs["admin.listen"]
    assert "'loopback' or 'kernel'" in errs["datapath.mode"]
    assert "/sys/fs/bpf/l7g/" in errs["datapath.pinDir"]
    assert errs["datapath.bpf"] == "must be true or false"
    assert "is required with mtls.enabled" in errs["mtls.listen"]
    assert "absolute path" in errs["mtls.spireSocket"]
    assert "1-64" in errs["envoy.concurrency"]


def test_exposed_admin_needs_a_real_token() -> None:
    assert "at least 16" in errors({"admin": {"listen": "0.0.0.0:9876", "token": "short"}})["admin.token"]
    c = parse_config({"admin": {"listen": "0.0.0.0:9876", "token": "x" * 32}})
    assert c.admin_token == "x" * 32


def test_duplicate_cluster_ids_refused() -> None:
    assert "unique" in errors({"cluster": {"name": "a", "id": 1}, "clusters": {"b": 1}})["clusters"]
