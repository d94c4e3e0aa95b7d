"""toServices through the CLI: `policy trace` resolves `toServices` with the Services and
EndpointSlices in its files (the trace table), `policy validate` reads them as an inventory,
and `endpoint apply|delete` and `service list` send and show EndpointSlices at an agent (a real
AgentCore behind the real admin server); v1 Endpoints are refused, never skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from l7gate.agent.core import AgentCore

from .test_cli_cidrgroup import agent, run  # noqa: F401 - the fixture

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-ext, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sService: {serviceName: ext, namespace: partners}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-backups, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sServiceSelector: {selector: {matchLabels: {role: backup}}, namespace: partners}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-web, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sService: {serviceName: web, namespace: web}
"""
PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: web, labels: {app: web}}
status: {podIP: 10.0.1.6}
"""
SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: partners}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: https, port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: partners, labels: {role: backup}}
spec:
  ports: [{name: https, port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: web}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"""
SLICES = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: partners, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
endpoints:
- addresses: ["192.0.2.10"]
- addresses: ["192.0.2.11"]
  conditions: {ready: false}
ports: [{name: https, port: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: vault-1, namespace: partners, labels: {kubernetes.io/service-name: vault}}
addressType: IPv4
endpoints: [{addresses: ["198.51.100.7"]}]
ports: [{name: https, port: 443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: web, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: ["192.0.2.99"]}]
ports: [{port: 80}]
"""
ENDPOINTS = """\
apiVersion: v1
kind: Endpoints
metadata: {name: ext, namespace: partners}
subsets: [{addresses: [{ip: 192.0.2.10}], ports: [{name: https, port: 443}]}]
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("policy", POLICY), ("pods", PODS), ("services", SERVICES), ("slices", SLICES),
                       ("endpoints", ENDPOINTS)):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    return out


# (to, port, files beside the policy and pods, verdict, layer): the trace table
CASES = [
    ("192.0.2.10", "443", ("services", "slices"), "allowed", None),  # an endpoint of partners/ext
    ("192.0.2.10", "9999", ("services", "slices"), "allowed", None),  # toServices covers every port
    ("192.0.2.11", "443", ("services", "slices"), "denied", "l3l4"),  # not ready
    ("192.0.2.12", "443", ("services", "slices"), "denied", "l3l4"),  # listed nowhere
    ("198.51.100.7", "443", ("services", "slices"), "allowed", None),  # vault, by its label role=backup
    ("192.0.2.99", "80", ("services", "slices"), "denied", "l3l4"),  # web has a selector: selects nothing
    ("web/web-1", "80", ("services", "slices"), "denied", "l3l4"),  # ... nor its pods
    ("192.0.2.10", "443", ("services",), "denied", "l3l4"),  # no slice given: no endpoint
    ("192.0.2.10", "443", ("slices",), "denied", "l3l4"),  # no Service given: it does not exist
]


@pytest.mark.parametrize("to, port, given, verdict, layer", CASES)
def test_trace_table(files: dict[str, Path], capsys: pytest.CaptureFixture[str], to: str, port: str,
                     given: tuple[str, ...], verdict: str, layer: str | None) -> None:
    args = [a for f in ("policy", "pods", *given) for a in ("-f", str(files[f]))]
    rc, out, err = run(capsys, "policy", "trace", *args, "--from", "web/client", "--to", to, "--port", port,
                       "-o", "json")
    assert rc == 0, err
    result = json.loads(out)
    assert (result["verdict"], result["layer"]) == (verdict, layer), result["reasons"]


def test_trace_says_what_each_entry_selects(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for f in ("policy", "pods", "services", "slices") for a in ("-f", str(files[f]))]
    rc, out, err = run(capsys, "policy", "trace", *args, "--from", "web/client", "--to", "192.0.2.10", "--port", "443")
    assert rc == 0, err
    assert "to   192.0.2.10 (endpoint of Service partners/ext)" in out, out
    assert "toServices k8sService ext (namespace partners) selects Service partners/ext, the addresses 192.0.2.10/32" in out
    assert "toServices k8sService web (namespace web) selects Service web/web has a selector" in out
    assert "Verdict: ALLOWED" in out


def test_trace_refuses_v1_endpoints(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "policy", "trace", "-f", str(files["policy"]), "-f", str(files["pods"]),
                     "-f", str(files["services"]), "-f", str(files["endpoints"]),
                     "--from", "web/client", "--to", "192.0.2.10", "--port", "443")
    assert rc == 1 and "v1 Endpoints are not read by l7gate: write the addresses as an EndpointSlice" in err, err


def test_trace_names_the_field_of_a_bad_slice(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    files["slices"].write_text(SLICES.replace('"192.0.2.10"', '"192.0.2.300"'))
    rc, _, err = run(capsys, "policy", "trace", "-f", str(files["policy"]), "-f", str(files["pods"]),
                     "-f", str(files["slices"]), "--from", "web/client", "--to", "192.0.2.10", "--port", "443")
    assert rc == 1 and "EndpointSlice partners/ext-1: endpoints[0].addresses[0]" in err, err


def test_validate_reads_services_as_an_inventory(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "policy", "validate", str(files["policy"]), str(files["services"]), "-o", "json")
    assert rc == 0, out + err
    warnings = {(w["resource"], w["path"], w["code"]) for w in json.loads(out)["warnings"]}
    assert warnings == {
        ("CiliumNetworkPolicy/web/to-web", "spec.egress[0].toServices", "services-selector"),
        ("CiliumNetworkPolicy/web/to-ext", "spec.egress[0].toServices", "services-no-endpoints"),
        ("CiliumNetworkPolicy/web/to-backups", "spec.egress[0].toServices", "services-no-endpoints"),
    }, warnings
    rc, out, err = run(capsys, "policy", "validate", str(files["policy"]), str(files["services"]),
                       str(files["slices"]), "-o", "json")
    codes = {w["code"] for w in json.loads(out)["warnings"]}
    assert rc == 0 and codes == {"services-selector"}, out
    # without Services in the input, nothing is said of them
    rc, out, err = run(capsys, "policy", "validate", str(files["policy"]), "-o", "json")
    assert rc == 0 and json.loads(out)["warnings"] == [], out


def test_validate_refuses_toservices_beside_toports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY.split("---")[0] + "    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n")
    rc, out, _ = run(capsys, "policy", "validate", str(f))
    assert rc == 1
    assert ("spec.egress[0].toServices: error: Cilium refuses toServices beside toPorts (\"Combining ToServices "
            "and ToPorts is not supported yet\")") in out, out


def test_endpoint_apply_list_and_delete_slices(files: dict[str, Path], agent: tuple[str, AgentCore],  # noqa: F811
                                               capsys: pytest.CaptureFixture[str]) -> None:
    admin, core = agent
    rc, out, err = run(capsys, "endpoint", "apply", "--admin", admin, "-f", str(files["services"]),
                       "-f", str(files["slices"]))
    assert rc == 0, err
    assert "endpointslice/default/partners/ext-1 created" in out.splitlines(), out
    rc, out, err = run(capsys, "service", "list", "--admin", admin)
    assert "10.96.0.50:443/TCP" in out and "192.0.2.10:8443 (EndpointSlice/partners/ext-1)" in out, out
    rc, out, _ = run(capsys, "service", "list", "--admin", admin, "-o", "json")
    ext: dict[str, Any] = next(s for s in json.loads(out)["services"] if s["service"] == "partners/ext")
    assert ext["to_services"] == {"selectable": True, "addresses": ["192.0.2.10/32"]}

    rc, out, err = run(capsys, "endpoint", "delete", "--admin", admin, "EndpointSlice/partners/ext-1")
    assert rc == 0 and out.strip() == "endpointslice/partners/ext-1 deleted", out + err
    assert "default/partners/ext-1" not in core.documents("EndpointSlice")
    rc, _, err = run(capsys, "endpoint", "delete", "--admin", admin, "EndpointSlice/partners/ext-1")
    assert rc == 1 and "no EndpointSlice 'partners/ext-1'" in err, err


def test_endpoint_apply_refuses_v1_endpoints_before_calling_the_agent(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "endpoint", "apply", "--admin", "unix:/nonexistent/l7g.sock", "-f", str(files["services"]),
                     "-f", str(files["endpoints"]))
    assert rc == 1 and "Endpoints/partners/ext" in err and "v1 Endpoints are not read by l7gate" in err, err
