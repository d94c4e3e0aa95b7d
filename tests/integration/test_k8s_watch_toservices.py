"""EndpointSlices from the API server reach the agent through its watch (the API-server DOUBLE,
the real `kubectl`, the agent's own core and watch; no Envoy needed): a selector-less Service
and its EndpointSlice written with `kubectl apply` make a policy's `toServices` rule select the
slice's address; the slice changed and deleted with `kubectl` moves the verdict; a slice the
endpoint slice controller manages (a Service with a selector) is never applied. Verdicts are the
core's resolved egress map, as the kernel reads it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.agent.kube import CoreSink
from l7gate.k8s.watch import ApiConnection, Watcher, load_configuration
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.policy.mapstate import lookup
from l7gate.policy.types import Direction, Protocol
from l7gate.testing.apiserver_double import ApiServerDouble
from l7gate.testing.wait import eventually
from l7gate.xds.cache import SnapshotCache

from .test_apiserver_double import kubectl_ok  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

NODE = "node-a1"
MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: partners}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-ext, namespace: web}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sService: {serviceName: ext, namespace: partners}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: partners}
spec:
  ports: [{name: https, port: 443}]
"""


def endpoint_slice(address: str, *, name: str = "ext-1", service: str = "ext", managed_by: str = "") -> str:
    labels: dict[str, str] = {"kubernetes.io/service-name": service}
    if managed_by:
        labels["endpointslice.kubernetes.io/managed-by"] = managed_by
    return yaml.safe_dump({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "partners", "labels": labels},
        "addressType": "IPv4", "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": 443, "protocol": "TCP"}],
    })


CLIENT: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "client", "namespace": "web", "labels": {"app": "client"}},
    "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]},
    "status": {"phase": "Running", "podIP": "10.8.1.5", "podIPs": [{"ip": "10.8.1.5"}],
               "conditions": [{"type": "Ready", "status": "True"}]},
}


class World:
    def __init__(self, api: ApiServerDouble, core: AgentCore, watcher: Watcher, tmp: Path) -> None:
        self.api, self.core, self.watcher, self.tmp = api, core, watcher, tmp

    def kubectl(self, *args: str, text: str | None = None) -> str:
        if text is not None:
            f = self.tmp / "manifest.yaml"
            f.write_text(text)
            args = (*args, "-f", str(f))
        out = self.api.kubectl(*args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def may_connect(self, address: str) -> bool:
        rec = self.core.view().pods.get("cluster-a/web/client")
        if rec is None:
            return False
        return lookup(self.core.resolver.endpoint_policy(rec.identity), Direction.EGRESS,
                      self.core.ipcache.lookup(address), 443, Protocol.TCP).allowed


@pytest.fixture
def world(tmp_path: Path, kubectl_ok: str) -> Iterator[World]:
    store = SQLiteKVStore(str(tmp_path / "kv.db"))
    core = AgentCore(AgentConfig(node=NODE, cluster_name="cluster-a", cluster_id=1, state_dir=str(tmp_path),
                                 envoy=EnvoySettings(enabled=False), datapath_mode="kernel"), store, SnapshotCache())
    with ApiServerDouble(bookmark_interval=1.0) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
        api.create(CLIENT, with_status=True)
        watcher = Watcher(ApiConnection(load_configuration(str(kubeconfig))), CoreSink(core), cluster="cluster-a",
                          node=NODE, log=lambda line: None, watch_timeout=30)
        watcher.start()
        try:
            assert watcher.wait_ready(20), watcher.problems()
            yield World(api, core, watcher, tmp_path)
        finally:
            watcher.stop()
            store.close()


def test_a_slice_written_with_kubectl_moves_a_toservices_rule(world: World) -> None:
    w = world
    st = w.watcher.status()["resources"]["endpointslices"]
    assert st["api_version"] == "discovery.k8s.io/v1" and st["state"] == "watching", st
    out = w.kubectl("apply", text=MANIFESTS)
    assert "service/ext created" in out and "ciliumnetworkpolicy.cilium.io/to-ext created" in out, out
    eventually(lambda: "CiliumNetworkPolicy/web/to-ext" in w.core.documents("CiliumNetworkPolicy"), 10, "the policy")
    assert not w.may_connect("192.0.2.10")  # the Service has no endpoint yet: the rule selects nothing

    out = w.kubectl("apply", text=endpoint_slice("192.0.2.10"))
    assert "endpointslice.discovery.k8s.io/ext-1 created" in out, out
    eventually(lambda: w.may_connect("192.0.2.10"), 10, "the slice's address selected")
    doc = w.core.document("EndpointSlice", "cluster-a/partners/ext-1")
    assert doc is not None and doc["metadata"]["annotations"]["l7gate.io/source"] == "kubernetes"

    w.kubectl("apply", text=endpoint_slice("192.0.2.11"))
    eventually(lambda: w.may_connect("192.0.2.11") and not w.may_connect("192.0.2.10"), 10, "the slice changed")

    # the endpoint slice controller's slice of some Service with a selector: not applied
    w.kubectl("apply", text=endpoint_slice("192.0.2.12", name="web-abc", service="web",
                                           managed_by="endpointslice-controller.k8s.io"))
    eventually(lambda: w.watcher.status()["resources"]["endpointslices"]["events"] >= 3, 10, "the event seen")
    assert set(w.core.documents("EndpointSlice")) == {"cluster-a/partners/ext-1"}

    w.kubectl("delete", "endpointslice", "ext-1", "-n", "partners")
    eventually(lambda: not w.may_connect("192.0.2.11"), 10, "the slice deleted")
    assert w.core.documents("EndpointSlice") == {}
