"""Nodes through the CLI: `policy trace` names a node's address as the enforcing agent sees it (its
Node's labels, `host` from a pod on it) and judges fromNodes/toNodes on them, `policy validate`
warns about a node selector that selects none of the Nodes given, and `endpoint apply`, `node
list` and `node delete` talk to an agent's admin API (a real AgentCore behind the real admin
server, on a unix socket of the test's own directory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.core import AgentCore

from .test_cli_cidrgroup import agent, run  # noqa: F401  (the fixture)

NODES = """\
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {role: app, zone: z1}}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}, {type: Hostname, address: n1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {role: ingress, zone: z1}}
status: {addresses: [{type: InternalIP, address: 192.0.2.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3, labels: {role: worker, zone: z2}}
status: {addresses: [{type: InternalIP, address: 192.0.2.3}]}
"""
PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.10, hostIP: 192.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: web, labels: {app: server}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.11, hostIP: 192.0.2.1}
"""
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: nodes, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toNodes: [{matchLabels: {zone: z1}}]
    toPorts: [{ports: [{port: "7070", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-ingress-nodes, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromNodes: [{matchLabels: {role: ingress}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("nodes", NODES), ("pods", PODS), ("policy", POLICY)):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    return out


def trace(capsys: pytest.CaptureFixture[str], files: dict[str, Path], src: str, dst: str, port: int,
          *, nodes: bool = True) -> dict[str, Any]:
    given = [files["policy"], files["pods"]] + ([files["nodes"]] if nodes else [])
    rc, out, err = run(capsys, "policy", "trace", *[a for f in given for a in ("-f", str(f))], "--from", src,
                       "--to", dst, "--port", str(port), "-o", "json")
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_trace_judges_to_nodes_by_the_nodes_labels(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    got = {ip: trace(capsys, files, "web/client", ip, 7070) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")}
    assert {ip: r["verdict"] for ip, r in got.items()} == {
        "192.0.2.1": "allowed",  # its own node (host), in zone z1
        "192.0.2.2": "allowed",
        "192.0.2.3": "denied"}
    assert got["192.0.2.1"]["to_identity"] == 1 and got["192.0.2.1"]["to"]["labels"]["node:role"] == "app"
    n2 = got["192.0.2.2"]["to"]
    assert n2["name"] == "192.0.2.2 (remote-node, node default/n2)" and n2["identity"] >= 2 << 24
    assert n2["labels"] == {"reserved:remote-node": "", "node:role": "ingress", "node:zone": "z1",
                            "io.cilium.k8s.policy.cluster": "default"}
    # without the Nodes, their labels are unknown: no z1 node but the fact of being a node
    assert trace(capsys, files, "web/client", "192.0.2.1", 7070, nodes=False)["verdict"] == "denied"


def test_trace_judges_from_nodes_and_names_the_node(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert trace(capsys, files, "192.0.2.2", "web/server", 8080)["verdict"] == "allowed"
    assert trace(capsys, files, "192.0.2.3", "web/server", 8080)["verdict"] == "denied"
    # the pod's own node is never judged (allow-localhost)
    assert trace(capsys, files, "192.0.2.1", "web/server", 8080)["verdict"] == "allowed"
    rc, out, _ = run(capsys, "policy", "trace", "-f", str(files["policy"]), "-f", str(files["pods"]), "-f",
                     str(files["nodes"]), "--from", "192.0.2.3", "--to", "web/server", "--port", "8080")
    assert rc == 0
    assert "   from 192.0.2.3 (remote-node, node default/n3): identity " in out, out
    assert "        labels: io.cilium.k8s.policy.cluster=default, node:role=worker, node:zone=z2, reserved:remote-node" in out
    assert "Verdict: DENIED at L3/L4" in out


def test_validate_warns_about_a_node_selector_no_node_has(files: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(files["policy"]), str(files["nodes"]))
    assert rc == 0 and "0 warnings" in err, out + err
    files["policy"].write_text(POLICY.replace("zone: z1", "zone: z9"))
    rc, out, err = run(capsys, "policy", "validate", str(files["policy"]), str(files["nodes"]), "-o", "json")
    assert rc == 0, err
    (w,) = json.loads(out)["warnings"]
    assert (w["resource"], w["path"], w["code"]) == ("CiliumNetworkPolicy/web/nodes", "spec.egress[0].toNodes",
                                                     "node-selector-unmatched")
    assert "selects none of the 3 Nodes given (default/n1, default/n2, default/n3)" in w["message"]
    # without Nodes, node selectors are not checked
    rc, out, err = run(capsys, "policy", "validate", str(files["policy"]))
    assert rc == 0 and "0 warnings" in err, out + err


def test_endpoint_apply_node_list_and_delete(files: dict[str, Path], agent: tuple[str, AgentCore],  # noqa: F811
                                             capsys: pytest.CaptureFixture[str]) -> None:
    admin, core = agent
    rc, out, err = run(capsys, "endpoint", "apply", "--admin", admin, "-f", str(files["nodes"]), "-f", str(files["pods"]))
    assert rc == 0, err
    assert {"node/default/n1 created", "node/default/n3 created", "pod/default/web/client created"} <= set(out.splitlines())
    rc, out, _ = run(capsys, "node", "list", "--admin", admin)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows["default/n1"][:3] == ["192.0.2.1", "1", "(host)"], out
    assert rows["default/n3"][0] == "192.0.2.3" and int(rows["default/n3"][1]) >= 2 << 24
    assert rows["default/n3"][-1] == "role=worker,zone=z2"
    rc, out, _ = run(capsys, "node", "delete", "--admin", admin, "n3", "default/n9")
    assert rc == 1 and out.strip() == "node/n3 deleted"
    rc, out, _ = run(capsys, "node", "list", "--admin", admin, "-o", "json")
    assert [n["node"] for n in json.loads(out)["nodes"]] == ["default/n1", "default/n2"]
