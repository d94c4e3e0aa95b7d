"""CiliumCIDRGroups through the CLI: `policy validate` checks them, `policy trace` resolves
`cidrGroupRef`/`cidrGroupSelector` with the groups in its files, and `policy apply|get|delete`
send them to an agent's admin API (a real AgentCore behind the real admin server, on a unix
socket of the test's own directory) as they send policies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.admin import AdminApp, AdminHooks, AdminServer
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.cli import main
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.xds.cache import SnapshotCache

GROUP = """\
apiVersion: cilium.io/v2alpha1
kind: CiliumCIDRGroup
metadata: {name: partners, labels: {role: partner}}
spec:
  externalCIDRs: ["192.0.2.0/24", "203.0.113.0/24"]
"""
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-partners, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet:
    - cidrGroupRef: partners
      except: ["203.0.113.128/25"]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toCIDRSet:
    - cidrGroupSelector: {matchLabels: {role: backup}}
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"""
PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
status: {podIP: 10.0.1.5}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("group", GROUP), ("policy", POLICY), ("pods", PODS)):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    return out


# -- validate ----------------------------------------------------------------------------------------


def test_validate_checks_groups_beside_policies_and_groups_alone(files: dict[str, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(files["group"]), str(files["policy"]))
    assert rc == 0, out + err
    assert "1 policy and 1 CiliumCIDRGroup checked: 0 invalid" in err
    rc, out, err = run(capsys, "policy", "validate", str(files["group"]))
    assert rc == 0 and "0 policies and 1 CiliumCIDRGroup checked" in err, out + err


def test_validate_names_the_field_of_a_bad_group_and_a_group_twice(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(GROUP.replace('"203.0.113.0/24"', '"203.0.113.7"') + "---\n" + GROUP)
    rc, out, _ = run(capsys, "policy", "validate", str(f), "-o", "json")
    assert rc == 1
    report = json.loads(out)
    errors = {(e["resource"], e["path"], e["code"]) for e in report["errors"]}
    assert errors == {("CiliumCIDRGroup/partners", "spec.externalCIDRs[1]", "cidr")}, report
    f.write_text(GROUP + "---\n" + GROUP)
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1 and "CiliumCIDRGroup/partners is defined twice" in out, out


def test_validate_refuses_a_cidr_rule_with_two_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY.replace("- cidrGroupRef: partners", "- cidr: 10.0.0.0/8\n      cidrGroupRef: partners"))
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert ("spec.egress[0].toCIDRSet[0].cidrGroupRef: error: Cilium refuses a CIDR rule that sets both `cidr` "
            "and `cidrGroupRef`") in out, out


# -- trace -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to, port, with_group, verdict",
    [
        ("192.0.2.10", "443", True, "allowed"),
        ("203.0.113.7", "443", True, "allowed"),
        ("203.0.113.200", "443", True, "denied"),  # in the except range
        ("198.51.100.7", "443", True, "denied"),  # in no group
        ("192.0.2.10", "80", True, "denied"),
        ("192.0.2.10", "443", False, "denied"),  # the group is not given: the reference selects nothing
        ("192.0.2.10", "22", True, "denied"),  # no group has role=backup
    ],
)
def test_trace_resolves_group_references_with_the_groups_given(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], to: str, port: str, with_group: bool, verdict: str
) -> None:
    given = [files["policy"], files["pods"]] + ([files["group"]] if with_group else [])
    args = [a for f in given for a in ("-f", str(f))]
    rc, out, err = run(capsys, "policy", "trace", *args, "--from", "web/client", "--to", to, "--port", port,
                       "-o", "json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["verdict"] == verdict, result["reasons"]


def test_trace_names_the_groups_holding_an_address(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "trace", "-f", str(files["policy"]), "-f", str(files["pods"]),
                       "-f", str(files["group"]), "--from", "web/client", "--to", "203.0.113.200", "--port", "443")
    assert rc == 0, err
    assert "to   203.0.113.200 (in CiliumCIDRGroup partners)" in out, out  # held by it, though excepted
    assert "Verdict: DENIED at L3/L4" in out


def test_trace_refuses_an_invalid_group(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    files["group"].write_text(GROUP.replace("192.0.2.0/24", "192.0.2.0/99"))
    rc, _, err = run(capsys, "policy", "trace", "-f", str(files["policy"]), "-f", str(files["pods"]),
                     "-f", str(files["group"]), "--from", "web/client", "--to", "192.0.2.10", "--port", "443")
    assert rc == 1 and "CiliumCIDRGroup/partners" in err and "spec.externalCIDRs[0]" in err, err


# -- apply, get, delete against an agent --------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, AgentCore]]:
    cfg = AgentConfig(node="n1", cluster_name="default", cluster_id=1, state_dir=str(tmp_path),
                      envoy=EnvoySettings(enabled=False), datapath_mode="kernel")
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    core = AgentCore(cfg, store, SnapshotCache())
    hooks = AdminHooks(status=lambda: {}, xds_status=lambda: {}, xds_config=lambda n, t: {},
                       metrics=lambda: (b"", "text/plain"))
    server = AdminServer(AdminApp(core, hooks), f"unix:{tmp_path}/l7g-admin.sock")
    server.start()
    try:
        yield f"unix:{tmp_path}/l7g-admin.sock", core
    finally:
        server.stop()
        store.close()


def test_apply_get_and_delete_a_group(files: dict[str, Path], agent: tuple[str, AgentCore],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    admin, core = agent
    rc, out, err = run(capsys, "policy", "apply", "--admin", admin, "-f", str(files["policy"]), "-f", str(files["group"]))
    assert rc == 0, err
    assert set(out.splitlines()) == {"CiliumNetworkPolicy/web/to-partners created", "CiliumCIDRGroup/partners created"}
    assert list(core.documents("CiliumCIDRGroup")) == ["CiliumCIDRGroup/partners"]

    rc, out, _ = run(capsys, "policy", "get", "--admin", admin)
    rows = [line.split(None, 1) for line in out.splitlines()[1:]]
    assert rows == [["CiliumCIDRGroup/partners", "192.0.2.0/24, 203.0.113.0/24"],
                    ["CiliumNetworkPolicy/web/to-partners"]], out
    rc, out, _ = run(capsys, "policy", "get", "--admin", admin, "-o", "json")
    data: dict[str, Any] = json.loads(out)
    assert [p["key"] for p in data["policies"]] == ["CiliumCIDRGroup/partners", "CiliumNetworkPolicy/web/to-partners"]

    rc, out, _ = run(capsys, "policy", "delete", "--admin", admin, "-f", str(files["group"]))
    assert rc == 0 and out.strip() == "CiliumCIDRGroup/partners deleted"
    assert not core.documents("CiliumCIDRGroup")
    rc, _, err = run(capsys, "policy", "delete", "--admin", admin, "CiliumCIDRGroup/partners")
    assert rc == 1 and "no policy 'CiliumCIDRGroup/partners'" in err, err


def test_apply_refuses_a_group_twice_before_calling_the_agent(files: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    twice = files["group"].parent / "twice.yaml"
    twice.write_text(GROUP + "---\n" + GROUP)
    rc, _, err = run(capsys, "policy", "apply", "--admin", "unix:/nonexistent/l7g.sock", "-f", str(twice))
    assert rc == 1 and "CiliumCIDRGroup/partners is defined twice" in err, err


def test_endpoint_apply_skips_groups(files: dict[str, Path], agent: tuple[str, AgentCore],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    admin, core = agent
    rc, out, err = run(capsys, "endpoint", "apply", "--admin", admin, "-f", str(files["pods"]), "-f", str(files["group"]))
    assert rc == 0, err
    assert "(1 other object skipped)" in err and not core.documents("CiliumCIDRGroup")
