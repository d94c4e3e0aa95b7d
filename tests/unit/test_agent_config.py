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
    # The admin API is a unix socket unless configured otherwise (docs/security.md).
    assert c.datapath_mode == "loopback" and c.admin_listen == "unix:/run/l7gate/admin.sock"
    assert c.admin_token_file == "/tmp/l7g-x/admin.token" and c.admin_group is None
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
        "admin": {"listen": "0.0.0.0:9876", "token": "x" * 64, "group": "l7gate"},
        "datapath": {"mode": "ebpf", "pinDir": "/tmp/x", "bpf": "yes"},
        "mtls": {"enabled": True, "spireSocket": "relative.sock"},
        "envoy": {"concurrency": 0, "adminPort": 9901},
    })
    assert "unknown field" in errs["nodes"]
    assert "0-255" in errs["cluster.id"]
    assert "admin.tokenFile" in errs["admin.token"]
    assert "unix socket only" in errs["admin.group"]
    assert "unix socket" in errs["envoy.adminPort"]
    assert "'loopback' or 'kernel'" in errs["datapath.mode"]
    assert "/sys/fs/bpf/l7g/" in errs["datapath.pinDir"]
    assert errs["datapath.bpf"] == "must be true or false"
    assert "is required with mtls.enabled" in errs["mtls.listen"]
    assert "absolute path" in errs["mtls.spireSocket"]
    assert "1-64" in errs["envoy.concurrency"]


def test_admin_on_tcp_takes_its_token_from_a_file() -> None:
    """A token in the config file is refused (the file is often readable by others); TCP gets its
    token from admin.tokenFile, which the agent checks and generates (test_admin_security)."""
    c = parse_config({"stateDir": "/var/lib/x", "admin": {"listen": "127.0.0.1:9876"}})
    assert c.admin_listen == "127.0.0.1:9876" and c.admin_token_file == "/var/lib/x/admin.token"
    c = parse_config({"admin": {"listen": "0.0.0.0:9876", "tokenFile": "/etc/l7gate/token"}})
    assert c.admin_token_file == "/etc/l7gate/token"
    assert "absolute path" in errors({"admin": {"tokenFile": "token"}})["admin.tokenFile"]
    c = parse_config({"admin": {"group": "l7gate-admins", "maxConnections": 64}})
    assert c.admin_group == "l7gate-admins" and c.admin_max_connections == 64


def test_duplicate_cluster_ids_refused() -> None:
    assert "unique" in errors({"cluster": {"name": "a", "id": 1}, "clusters": {"b": 1}})["clusters"]


def test_proxy_engine_settings() -> None:
    assert parse_config({}).proxy_engine == "envoy"
    c = parse_config({"proxy": {"engine": "h11", "idleTimeout": 60, "headerTimeout": 5, "maxConnections": 100}})
    assert (c.proxy_engine, c.proxy_idle_timeout, c.proxy_header_timeout, c.proxy_max_connections) == ("h11", 60, 5, 100)
    errs = errors({"proxy": {"engine": "nginx"}})
    assert "'envoy' or 'h11'" in errs["proxy.engine"]
    errs = errors({"proxy": {"idleTimeout": 10}})  # Envoy's limits are its own
    assert "h11 only" in errs["proxy.idleTimeout"]
    errs = errors({"proxy": {"engine": "h11", "headerTimeout": 0, "maxConnections": "many"}})
    assert "1-3600" in errs["proxy.headerTimeout"] and "1-1000000" in errs["proxy.maxConnections"]
    # The tunnel runs in Envoy: h11 takes mutual auth only without it.
    kernel = {"datapath": {"mode": "kernel"}, "proxy": {"engine": "h11"}}
    errs = errors({**kernel, "mtls": {"enabled": True, "listen": "10.0.1.1:4250"}})
    assert "cannot carry the mTLS tunnel" in errs["proxy.engine"]
    assert parse_config({**kernel, "mtls": {"enabled": True, "listen": "10.0.1.1:4250", "encryption": "none"}}).mtls.enabled
