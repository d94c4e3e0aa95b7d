"""The `kubernetes:` section of the agent's configuration: the node's name from the environment
(one ConfigMap for every node of a DaemonSet), and errors that name their field."""

from __future__ import annotations

import pytest

from l7gate.agent.config import ConfigError, parse_config


def errors(data: object, environ: dict[str, str]) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, "agent.yaml", environ)
    return {e.path: e.message for e in ei.value.errors}


def test_off_by_default_and_the_environment_is_not_read() -> None:
    c = parse_config({"node": "n1"}, environ={"NODE_NAME": "other"})
    assert not c.kubernetes.enabled and c.node == "n1"


def test_the_node_comes_from_the_environment_in_a_daemonset() -> None:
    c = parse_config({"kubernetes": {"enabled": True}}, environ={"NODE_NAME": "worker-7"})
    assert c.kubernetes.enabled and c.kubernetes.kubeconfig == "" and c.node == "worker-7"
    # Everything derived from the node follows it.
    assert c.node_id == "l7gate~default~worker-7" and c.pin_dir == "/sys/fs/bpf/l7g/worker-7"
    c = parse_config({"kubernetes": {"enabled": True, "nodeNameEnv": "MY_NODE", "kubeconfig": "/etc/kube.conf",
                                     "watchTimeout": 60}}, environ={"MY_NODE": "w2"})
    assert (c.node, c.kubernetes.kubeconfig, c.kubernetes.watch_timeout) == ("w2", "/etc/kube.conf", 60)
    # Outside a cluster (a developer's machine): the file's `node`, the variable unset.
    assert parse_config({"node": "dev", "kubernetes": {"enabled": True}}, environ={}).node == "dev"
    # Both, agreeing.
    assert parse_config({"node": "w3", "kubernetes": {"enabled": True}}, environ={"NODE_NAME": "w3"}).node == "w3"


def test_every_error_names_its_field() -> None:
    errs = errors({"kubernetes": {"enabled": True}}, {})
    assert "$NODE_NAME is not set" in errs["kubernetes.nodeNameEnv"]
    errs = errors({"node": "a", "kubernetes": {"enabled": True}}, {"NODE_NAME": "b"})
    assert "$NODE_NAME says 'b'" in errs["node"]
    errs = errors({"kubernetes": {"enabled": "yes", "kubeconfig": "kube.conf", "nodeNameEnv": "1-bad",
                                  "watchTimeout": 5, "context": "x"}}, {})
    assert errs["kubernetes.enabled"] == "must be true or false"
    assert "absolute path" in errs["kubernetes.kubeconfig"]
    assert "environment variable" in errs["kubernetes.nodeNameEnv"]
    assert "10-3600" in errs["kubernetes.watchTimeout"]
    assert "unknown field" in errs["kubernetes.context"]
    errs = errors({"kubernetes": {"enabled": True}}, {"NODE_NAME": "a/b"})
    assert "'/'" in errs["node"]
