"""`l7gate policy validate` and `l7gate policy trace`, run as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from l7gate.cli import main

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"
FRONTEND = "cluster-b/web/frontend-service-abc"
BILLING = "cluster-a/payments/billing-service-xyz"
OTHER = "cluster-b/web/reporting-job-q7x"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse exits for --help and usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def trace_json(capsys: pytest.CaptureFixture[str], *extra: str, src: str = FRONTEND) -> dict[str, Any]:
    rc, out, err = run(capsys, "policy", "trace", "-f", str(SEED), "--from", src, "--to", BILLING, *extra, "-o", "json")
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


# -- validate ---------------------------------------------------------------------------------


def test_validate_seed_passes_with_default_deny_warning(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(SEED))
    assert rc == 0
    lines = out.splitlines()
    assert any(
        line.startswith(f"{SEED}/default-deny-all.yaml: CiliumClusterwideNetworkPolicy/default-deny-all-pods: spec.ingress: warning:")
        and "ingress: [{}]" in line
        for line in lines
    ), out
    assert "2 policies checked: 0 invalid, 2 warnings" in err


def test_validate_invalid_exits_1_and_names_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = (SEED / "allow-frontend-to-billing.yaml").read_text()
    bad = good.replace('port: "8080"', 'port: "80800"').replace('method: "POST"', 'method: "(POST"')
    f = tmp_path / "bad.yaml"
    f.write_text(good + "---\n" + bad.replace("allow-frontend-to-billing-charge-api", "broken"))
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert f"{f}: CiliumClusterwideNetworkPolicy/broken: spec.ingress[0].toPorts[0].ports[0].port: error: port 80800 is out of range" in out
    assert "spec.ingress[0].toPorts[0].rules.http[0].method: error: invalid RE2 regex '(POST'" in out
    assert "allow-frontend-to-billing-charge-api" not in out  # the good policy has no finding


def test_validate_yaml_syntax_error_names_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x\n")
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert f"{f}: error: line " in out


def test_validate_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "policy", "validate", "/nonexistent/l7g.yaml")[0] == 2
    assert run(capsys, "policy", "validate")[0] == 2
    assert run(capsys, "policy", "validate", "--bogus", str(SEED))[0] == 2


def test_validate_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "validate", str(SEED), "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["valid"] is True and data["checked"] == 2
    assert {w["code"] for w in data["warnings"]} == {"empty-direction"}


def test_validate_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO((SEED / "default-deny-all.yaml").read_text()))
    rc, out, _ = run(capsys, "policy", "validate", "-")
    assert rc == 0 and "<stdin>: CiliumClusterwideNetworkPolicy/default-deny-all-pods: spec.ingress: warning" in out


# -- validate and apply: bad input (issue 11) -------------------------------------------------

CNP_YAML = """\
apiVersion: cilium.io/v2
kind: {kind}
metadata:
  name: {name}
  namespace: {namespace}
spec:
  endpointSelector: {{matchLabels: {{app: billing}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: web}}}}]}}]
"""


def cnp_yaml(name: str = "allow-web", namespace: str = "payments", kind: str = "CiliumNetworkPolicy") -> str:
    return CNP_YAML.format(kind=kind, name=name, namespace=namespace)


NETWORK_POLICY_YAML = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: payments}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""
ADMIN_NETWORK_POLICY_YAML = """\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: cluster-wide}
spec: {priority: 10, subject: {namespaces: {}}}
"""

# Nothing listens here: a test that reaches the agent fails with exit 2 "cannot reach".
NO_AGENT = "unix:/nonexistent/l7gate-admin.sock"


def test_validate_misspelled_kind_is_an_error_with_a_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "typo.yaml"
    f.write_text(cnp_yaml(kind="CiliumNetworkPolicyy"))
    rc, out, err = run(capsys, "policy", "validate", str(f))
    assert rc == 1, (out, err)
    assert f"{f}: CiliumNetworkPolicyy/payments/allow-web: kind: error: " in out
    assert "did you mean 'CiliumNetworkPolicy'?" in out
    assert "Traceback" not in out + err


def test_validate_unknown_kind_without_a_near_one_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "odd.yaml"
    f.write_text(cnp_yaml() + "---\napiVersion: v1\nkind: Zebra\nmetadata: {name: z}\n")
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert f"{f}: Zebra/z: kind: error: unknown kind 'Zebra'" in out
    assert "did you mean" not in out


def test_validate_empty_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    f = tmp_path / "empty.yaml"
    f.write_text("")
    rc, out, err = run(capsys, "policy", "validate", str(f))
    assert rc == 1, (out, err)
    assert f"{f}: error: the file is empty" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("---\n"))
    rc, out, _ = run(capsys, "policy", "validate", "-")
    assert rc == 1 and "<stdin>: error: the input is empty" in out


def test_validate_input_without_any_policy_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(SEED / "billing-service.yaml"))
    assert rc == 1, (out, err)
    assert "error: no CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy" in out
    assert "skipped: Service/payments/billing-service, Deployment/payments/billing-service" in err


def test_validate_checks_a_kubernetes_network_policy_beside_cilium_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "np.yaml"
    f.write_text(cnp_yaml() + "---\n" + NETWORK_POLICY_YAML)
    rc, out, err = run(capsys, "policy", "validate", str(f))
    assert rc == 0, (out, err)
    assert "2 policies checked: 0 invalid" in out + err
    f.write_text(NETWORK_POLICY_YAML.replace("podSelector: {}", "podSelector: {matchLabels: {'k8s:app': x}}"))
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert f"{f}: NetworkPolicy/payments/deny-all: spec.podSelector.matchLabels.k8s:app: error: " in out


def test_validate_admin_network_policy_is_not_supported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "anp.yaml"
    f.write_text(cnp_yaml() + "---\n" + ADMIN_NETWORK_POLICY_YAML)
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert f"{f}: AdminNetworkPolicy/cluster-wide: kind: error: " in out
    assert "is not supported by l7gate" in out and "NetworkPolicy (networking.k8s.io/v1)" in out


def test_validate_lists_skipped_objects_by_kind_and_name(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(SEED))
    assert rc == 0, (out, err)
    assert ("skipped: Namespace/payments, Namespace/web, Service/payments/billing-service, "
            "Deployment/payments/billing-service, Service/payments/billing-service, "
            "Pod/payments/billing-service-xyz") in err
    rc, out, _ = run(capsys, "policy", "validate", str(SEED), "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["skipped"] == 9  # with cluster-b's billing-service (cluster-b/billing-service.yaml)
    assert data["skipped_objects"][:3] == ["Namespace/payments", "Namespace/web", "Service/payments/billing-service"]


def test_validate_duplicate_policy_is_an_error_naming_both_places(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(cnp_yaml())
    b.write_text("# again\n" + cnp_yaml().replace("app: web", "app: other"))
    rc, out, _ = run(capsys, "policy", "validate", str(a), str(b))
    assert rc == 1, out
    assert f"{b}: CiliumNetworkPolicy/payments/allow-web: metadata.name: error: " in out
    assert f"{a}:1" in out and f"{b}:2" in out


@pytest.mark.parametrize(
    "name, namespace, path, message",
    [
        ("c", "a/b", "metadata.namespace", "'/' at position 2"),
        ("b/c", "a", "metadata.name", "'/' at position 2"),
        ("../../etc/Bad Name", "payments", "metadata.name", "'.' at position 1"),
    ],
)
def test_validate_refuses_names_kubernetes_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, namespace: str, path: str, message: str
) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(cnp_yaml(name=f'"{name}"', namespace=f'"{namespace}"'))
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1, out
    assert f": {path}: error: " in out and message in out, out


def test_validate_namespace_flag_must_be_a_namespace_name(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "policy", "validate", "--namespace", "a/b", str(SEED))
    assert rc == 2 and "--namespace" in err and "'/' at position 2" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (cnp_yaml(kind="CiliumNetworkPolicyy"), "did you mean 'CiliumNetworkPolicy'?"),
        (ADMIN_NETWORK_POLICY_YAML, "is not supported by l7gate"),
    ],
)
def test_apply_refuses_unknown_and_unsupported_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, message: str
) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(cnp_yaml(name="good") + "---\n" + extra)
    rc, _, err = run(capsys, "policy", "apply", "--admin", NO_AGENT, "-f", str(f))
    assert rc == 1, err  # refused before the agent is contacted
    assert f"{f}:" in err and message in err and "Traceback" not in err


def test_apply_still_skips_ordinary_kubernetes_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "policy", "apply", "--admin", NO_AGENT, "-f", str(SEED))
    assert rc == 2 and "cannot reach the agent" in err  # got as far as the agent


def test_apply_refuses_the_same_policy_twice_naming_both_places(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(cnp_yaml())
    b.write_text(cnp_yaml(name="other") + "---\n" + cnp_yaml())
    rc, _, err = run(capsys, "policy", "apply", "--admin", NO_AGENT, "-f", str(a), "-f", str(b))
    assert rc == 1, err
    assert "CiliumNetworkPolicy/payments/allow-web" in err and f"{a}:1" in err and f"{b}:10" in err


# -- trace ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, src, verdict, layer",
    [
        (("--port", "8080", "--method", "POST", "--path", "/v1/charge"), FRONTEND, "allowed", None),
        (("--port", "8080", "--method", "GET", "--path", "/v1/transactions"), FRONTEND, "denied", "l7"),
        (("--port", "8080", "--method", "POST", "--path", "/v1/refund"), FRONTEND, "denied", "l7"),
        (("--port", "9090"), FRONTEND, "denied", "l3l4"),
        (("--port", "8080", "--method", "POST", "--path", "/v1/charge"), OTHER, "denied", "l3l4"),
    ],
)
def test_trace_seed_table(capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], src: str, verdict: str, layer: str | None) -> None:
    d = trace_json(capsys, *extra, src=src)
    assert (d["verdict"], d["layer"]) == (verdict, layer), d["reasons"]
    assert d["reasons"]
    assert d["from_identity"] >> 16 == 2  # cluster-b is cluster 2 (clusters numbered by name)
    assert d["to_identity"] >> 16 == 1
    if verdict == "allowed":
        assert d["policies"] == ["CiliumClusterwideNetworkPolicy/allow-frontend-to-billing-charge-api"]


def test_trace_identities_are_stable_and_replicas_share_one(capsys: pytest.CaptureFixture[str]) -> None:
    a = trace_json(capsys, "--port", "8080")
    rc, out, _ = run(capsys, "policy", "trace", "-f", str(SEED), "--from", FRONTEND, "--to",
                     "cluster-a/payments/billing-service-k2m4p", "--port", "8080", "-o", "json")
    b = json.loads(out)
    assert rc == 0 and a["to_identity"] == b["to_identity"]  # pod-template-hash is not identity-relevant
    assert a == trace_json(capsys, "--port", "8080")


def test_trace_text_explains_steps(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "trace", "-f", str(SEED), "--from", FRONTEND, "--to", BILLING,
                     "--port", "8080", "--method", "GET", "--path", "/v1/transactions")
    assert rc == 0
    assert "1. Identities" in out and "identity 131072" in out
    assert "Ingress policy of cluster-a/payments/billing-service-xyz" in out
    assert "Policy denied (L7): GET /v1/transactions matches none" in out
    assert "Verdict: DENIED at L7" in out


def test_trace_from_world_and_headers(capsys: pytest.CaptureFixture[str]) -> None:
    d = trace_json(capsys, "--port", "8080", "--method", "POST", "--path", "/v1/charge", "--header", "X-A: 1", src="world")
    assert (d["verdict"], d["layer"], d["from_identity"]) == ("denied", "l3l4", 2)
    assert d["http"]["headers"] == {"x-a": "1"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--from", "web/nope", "--to", BILLING, "--port", "80"), "no pod 'web/nope'"),
        (("--from", "a/b/c/d", "--to", BILLING, "--port", "80"), "expected [CLUSTER/]NAMESPACE/POD"),
        (("--from", FRONTEND, "--to", BILLING, "--port", "0"), "out of range"),
        (("--from", FRONTEND, "--to", BILLING, "--port", "x_"), "not a port number or a port name"),
        (("--from", FRONTEND, "--to", BILLING, "--port", "http"), "declares no container port named 'http' for TCP"),
        (("--from", FRONTEND, "--to", BILLING, "--port", "80", "--header", "novalue"), "expected NAME:VALUE"),
        (("--from", FRONTEND, "--to", BILLING), "--port"),
    ],
)
def test_trace_usage_errors(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    rc, _, err = run(capsys, "policy", "trace", "-f", str(SEED), *argv)
    assert rc == 2
    assert message in err


def test_trace_refuses_invalid_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(SEED, tmp_path, dirs_exist_ok=True)
    p = tmp_path / "allow-frontend-to-billing.yaml"
    p.write_text(p.read_text().replace('path: "/v1/charge"', 'path: "/v1/(charge"'))
    rc, _, err = run(capsys, "policy", "trace", "-f", str(tmp_path), "--from", FRONTEND, "--to", BILLING, "--port", "8080")
    assert rc == 1
    assert "invalid policies" in err and "rules.http[0].path" in err


def test_trace_ambiguous_pod_needs_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = (SEED / "00-namespaces.yaml").read_text() + "---\n" + (SEED / "inventory" / "pods.yaml").read_text()
    (tmp_path / "inv.yaml").write_text(inv + "---\n" + inv.split("---\n")[2].replace("cluster-a", "cluster-c"))
    rc, _, err = run(capsys, "policy", "trace", "-f", str(tmp_path), "--from", FRONTEND, "--to",
                     "payments/billing-service-xyz", "--port", "8080")
    assert rc == 2 and "ambiguous" in err


@pytest.mark.parametrize("argv", [(), ("policy",), ("policy", "validate"), ("policy", "trace")])
def test_every_subcommand_has_help(argv: tuple[str, ...]) -> None:
    proc = subprocess.run([sys.executable, "-m", "l7gate.cli", *argv, "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "l7gate"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("l7gate ")


# -- named ports (examples/named-ports) ------------------------------------------------------------

NAMED = ROOT / "examples" / "named-ports"
WEB, MONITORING = "web/web-5d8", "web/monitoring-1"
SHOP, DB, CACHE = "shop/shop-api-7f9c", "shop/db-0", "shop/cache-0"


def named_trace(capsys: pytest.CaptureFixture[str], src: str, dst: str, *extra: str,
                folder: Path = NAMED) -> dict[str, Any]:
    rc, out, err = run(capsys, "policy", "trace", "-f", str(folder), "--from", src, "--to", dst, *extra, "-o", "json")
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize(
    "src, dst, extra, verdict, layer, port",
    [
        # ingress: the port named http of shop-api (8080), HTTP rules on it
        (WEB, SHOP, ("--port", "http", "--method", "GET", "--path", "/v1/items"), "allowed", None, 8080),
        (WEB, SHOP, ("--port", "8080", "--method", "POST", "--path", "/v1/items"), "denied", "l7", 8080),
        (WEB, SHOP, ("--port", "metrics"), "denied", "l3l4", 9090),  # metrics is for monitoring
        (MONITORING, SHOP, ("--port", "9090"), "allowed", None, 9090),
        (MONITORING, SHOP, ("--port", "8080"), "denied", "l3l4", 8080),
        # egress: the port named postgres of the peer (db declares 5432; cache declares no such name)
        (SHOP, DB, ("--port", "postgres"), "allowed", None, 5432),
        (SHOP, DB, ("--port", "5433"), "denied", "l3l4", 5433),
        (SHOP, CACHE, ("--port", "6379"), "denied", "l3l4", 6379),
        (SHOP, DB, ("--port", "postgres", "--protocol", "UDP"), "usage", None, 0),  # declared for TCP only
    ],
)
def test_trace_named_ports_table(capsys: pytest.CaptureFixture[str], src: str, dst: str, extra: tuple[str, ...],
                                 verdict: str, layer: str | None, port: int) -> None:
    if verdict == "usage":
        rc, _, err = run(capsys, "policy", "trace", "-f", str(NAMED), "--from", src, "--to", dst, *extra)
        assert rc == 2 and "declares no container port named 'postgres' for UDP" in err, err
        return
    d = named_trace(capsys, src, dst, *extra)
    assert (d["verdict"], d["layer"], d["port"]) == (verdict, layer, port), d["reasons"]
    named_rule_seen = [r for r in d["reasons"] if "port name" in r]
    if verdict == "allowed":
        assert named_rule_seen, d["reasons"]  # the verdict says what the name resolved to
    if extra[1].isalpha():
        assert d["port_name"] == extra[1]


def test_trace_says_which_pods_declare_the_named_port(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "policy", "trace", "-f", str(NAMED), "--from", WEB, "--to", SHOP,
                     "--port", "http", "--method", "GET", "--path", "/v1/items")
    assert rc == 0
    assert "on 8080/TCP (port 'http' of default/shop/shop-api-7f9c)" in out
    assert "http=8080/TCP (default/shop/shop-api-7f9c, default/shop/shop-api-x2b4)" in out
    assert "port name 'http' is 8080/TCP (CiliumNetworkPolicy/shop/shop-api-ingress spec.ingress[0])" in out
    d = named_trace(capsys, WEB, SHOP, "--port", "http")
    assert {"name": "http", "port": 8080, "protocol": "TCP",
            "pods": ["default/shop/shop-api-7f9c", "default/shop/shop-api-x2b4"]} in d["to"]["named_ports"]


def test_trace_a_named_port_the_pods_of_one_identity_disagree_on_selects_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(NAMED, tmp_path, dirs_exist_ok=True)
    pods = tmp_path / "pods.yaml"
    # The second replica moved http to 8081 (a rollout in progress): the same identity, two numbers.
    text = pods.read_text()
    second = text.index("name: shop-api-x2b4")
    pods.write_text(text[:second] + text[second:].replace("containerPort: 8080", "containerPort: 8081", 1))
    d = named_trace(capsys, WEB, SHOP, "--port", "http", "--method", "GET", "--path", "/v1/items", folder=tmp_path)
    assert (d["verdict"], d["layer"], d["port"]) == ("denied", "l3l4", 8080), d["reasons"]
    assert any("declared as 8080, 8081 for TCP by pods of one identity: it selects nothing" in r for r in d["reasons"])
    rc, out, _ = run(capsys, "policy", "validate", str(tmp_path))
    assert rc == 0
    assert ("spec.ingress[0].toPorts[0].ports[0].port: warning: port name 'http' (TCP) is declared with different "
            "numbers by pods with the same labels (one identity): 8080 by default/shop/shop-api-7f9c; 8081 by "
            "default/shop/shop-api-x2b4") in out, out


def test_trace_a_named_port_only_some_pods_of_one_identity_declare_selects_nothing_on_ingress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(NAMED, tmp_path, dirs_exist_ok=True)
    pods = tmp_path / "pods.yaml"
    text = pods.read_text()
    second = text.index("name: shop-api-x2b4")
    pods.write_text(text[:second] + text[second:].replace("- name: http\n", "- name: web\n", 1))
    d = named_trace(capsys, WEB, SHOP, "--port", "http", "--method", "GET", "--path", "/v1/items", folder=tmp_path)
    assert (d["verdict"], d["layer"]) == ("denied", "l3l4"), d["reasons"]
    assert any("declared for TCP by some pods of the identity only" in r for r in d["reasons"]), d["reasons"]
    rc, out, _ = run(capsys, "policy", "validate", str(tmp_path))
    assert rc == 0 and ("warning: port name 'http' (TCP) is declared by default/shop/shop-api-7f9c but not by "
                        "default/shop/shop-api-x2b4") in out, out


def test_validate_warns_about_named_ports_no_pod_of_the_inventory_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(NAMED))
    assert rc == 0 and "0 warnings" in err, out + err
    shutil.copytree(NAMED, tmp_path, dirs_exist_ok=True)
    p = tmp_path / "policies.yaml"
    p.write_text(p.read_text().replace("port: metrics", "port: metrcs").replace("port: postgres", "port: pg"))
    rc, out, err = run(capsys, "policy", "validate", str(tmp_path))
    assert rc == 0, out  # warnings: the policies are valid, they select nothing there
    assert (f"{p}: CiliumNetworkPolicy/shop/shop-api-ingress: spec.ingress[1].toPorts[0].ports[0].port: warning: "
            "port name 'metrcs' (TCP) is declared by none of the 2 pods the policy selects (they declare: "
            "http/TCP, metrics/TCP)") in out, out
    assert ("CiliumNetworkPolicy/shop/shop-api-egress: spec.egress[0].toPorts[0].ports[0].port: warning: port name "
            "'pg' (TCP) is declared by none of the 1 pod the rule names as peers (they declare: postgres/TCP)") in out, out
    rc, out, _ = run(capsys, "policy", "validate", str(p), "-o", "json")
    assert rc == 0 and not json.loads(out)["warnings"]  # no pods given: no inventory, no check
