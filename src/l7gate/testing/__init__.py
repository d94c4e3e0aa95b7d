"""Test infrastructure, named for what it is: the netns testbed (`testbed`), forged SVIDs and a
fake clock for the mTLS tests (`mtls`), a SPIFFE Workload API double (`workload_api_double`),
a Kubernetes API-server double (`apiserver_double`: no kube-apiserver runs here; the real
kubectl and the `kubernetes` client talk to it), the etcd launchers (`etcd`), the manual clock
(`clock`) and the one poll loop of the tests (`wait.eventually`).

Tests, benches and the demo scripts import it; no product package does (an import contract in
pyproject.toml, checked by tests/unit/test_layers.py).
"""
