"""`l7gate policy trace` explains toFQDNs and rules.dns verdicts: a DNS query judged by the DNS
rules, and an address destination labelled from a cache snapshot (`--fqdn-cache`) as the agent
labels an address its DNS proxy learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l7gate.cli import main

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-api, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*.example.test"}]}}]
  - toFQDNs: [{matchName: api.example.test}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
status: {podIP: 10.0.1.53}
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    pol = tmp_path / "policy.yaml"
    pol.write_text(POLICY)
    cache = tmp_path / "cache.json"
    # the shape `l7gate fqdn cache list -o json` prints
    cache.write_text(json.dumps({"entries": [
        {"name": "api.example.test.", "ip": "10.99.0.10", "ttl": 60, "expires_in": 50, "sources": [], "identity": 1},
        {"name": "other.example.test.", "ip": "10.99.0.20", "ttl": 60, "expires_in": 50, "sources": [], "identity": None},
    ]}))
    return pol, cache


def trace(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["policy", "trace", *argv, "-o", "json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


# (to, port, extra arguments, verdict, layer): the trace table
CASES = [
    ("kube-system/coredns", "53", ["--protocol", "UDP", "--dns-query", "api.example.test"], "allowed", None),
    ("kube-system/coredns", "53", ["--protocol", "UDP", "--dns-query", "db.example.test"], "allowed", None),
    ("kube-system/coredns", "53", ["--protocol", "UDP", "--dns-query", "evil.com"], "denied", "l7"),
    ("10.99.0.10", "443", ["--fqdn-cache"], "allowed", None),  # learned for api.example.test
    ("10.99.0.20", "443", ["--fqdn-cache"], "denied", "l3l4"),  # learned, but no selector matches
    ("10.99.0.10", "443", [], "denied", "l3l4"),  # no lookup known: world
]


@pytest.mark.parametrize("to, port, extra, verdict, layer", CASES)
def test_trace_table(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], to: str, port: str,
                     extra: list[str], verdict: str, layer: str | None) -> None:
    pol, cache = files
    extra = [*extra, str(cache)] if extra == ["--fqdn-cache"] else extra
    out = trace(capsys, "-f", str(pol), "--from", "web/client", "--to", to, "--port", port, *extra)
    assert (out["verdict"], out["layer"]) == (verdict, layer), out["reasons"]


def test_the_learned_address_carries_its_selector_label(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pol, cache = files
    out = trace(capsys, "-f", str(pol), "--from", "web/client", "--to", "10.99.0.10", "--port", "443",
                "--fqdn-cache", str(cache))
    to = out["to"]
    assert isinstance(to, dict) and "fqdn:matchName=api.example.test." in to["labels"]
    assert main(["policy", "trace", "-f", str(pol), "--from", "web/client", "--to", "kube-system/coredns",
                 "--port", "53", "--protocol", "UDP", "--dns-query", "evil.com"]) == 0
    text = capsys.readouterr().out
    assert "DNS query evil.com." in text and "the DNS proxy answers REFUSED" in text
    bad = pol.parent / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["policy", "trace", "-f", str(pol), "--from", "web/client", "--to", "10.99.0.10", "--port", "443",
                 "--fqdn-cache", str(bad)]) == 2
    assert "--fqdn-cache" in capsys.readouterr().err
