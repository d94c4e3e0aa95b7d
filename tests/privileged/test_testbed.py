"""The single-machine testbed: reachability inside and across nodes, isolation, names, and that
nothing is left behind — after a normal run, after a body that raised, after a crashed run."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from l7gate.testing import testbed as tbmod
from l7gate.testing.testbed import (IFNAMSIZ, Pod, Testbed, TestbedError, cleanup_all, list_netns,
                                  select_leftovers)
from l7gate.k8s.objects import parse_namespace, parse_pod

privileged = pytest.mark.privileged("network namespaces and veths")


def _ours(run_id: str) -> list[str]:
    """Namespaces of this run, plus any root-namespace interface carrying its id."""
    netns = [n for n in list_netns() if n.startswith(f"l7g-{run_id}-")]
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    return netns + [lk["ifname"] for lk in links if lk["ifname"].startswith(f"l7g{run_id}")]


def _links(where: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-n", where, "-j", "-s", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return list(json.loads(out))


def _rx_packets(where: str, ifname: str) -> int:
    link = next(lk for lk in _links(where) if lk["ifname"] == ifname)
    stats = link["stats64"]
    assert isinstance(stats, dict)
    return int(stats["rx"]["packets"])


@pytest.fixture
def world() -> Iterator[tuple[Testbed, Pod, Pod, Pod]]:
    """Two linked nodes in two clusters; billing and reporter on node 1, frontend on node 2."""
    with Testbed() as tb:
        n1 = tb.add_node("n1", cluster="cluster-a", node_cidr="10.0.1.0/24")
        n2 = tb.add_node("n2", cluster="cluster-b", node_cidr="10.0.2.0/24")
        tb.link(n1, n2)
        billing = tb.add_pod(n1, "payments", "billing-service-xyz", ip="10.0.1.10",
                             labels={"app": "billing-service"}, ports=(8080,))
        reporter = tb.add_pod(n1, "web", "reporting-job-q7x", labels={"app": "reporting"})
        frontend = tb.add_pod(n2, "web", "frontend-service-abc", labels={"app": "frontend"})
        yield tb, billing, reporter, frontend
    assert _ours(tb.run_id) == []


@privileged
def test_pods_reach_each_other_on_the_same_node_and_across_nodes(world: tuple[Testbed, Pod, Pod, Pod]) -> None:
    tb, billing, reporter, frontend = world
    assert (billing.ip, reporter.ip, frontend.ip) == ("10.0.1.10", "10.0.1.11", "10.0.2.10")
    assert reporter.ping(billing.ip) and frontend.ping(billing.ip) and billing.ping(frontend.ip)
    assert frontend.ping(billing.node.ip)

    billing.serve_http(8080)
    url = f"http://{billing.ip}:8080/v1/charge"
    for client in (reporter, frontend):
        status, body = client.curl(url, method="POST", data='{"amount": 1}')
        assert status == 200, body
        assert json.loads(body) == {"pod": "payments/billing-service-xyz", "method": "POST",
                                    "path": "/v1/charge", "host": "10.0.1.10:8080", "body_bytes": 13,
                                    "peer": client.ip}
    assert frontend.tcp_connect(billing.ip, 8080)
    assert not frontend.tcp_connect(billing.ip, 9090, timeout=1)  # nothing listens: refused
    status, err = frontend.curl(f"http://{billing.ip}:9090/", timeout=2)
    assert status == 0 and "connect" in err.lower()


@privileged
def test_cross_node_traffic_crosses_the_link(world: tuple[Testbed, Pod, Pod, Pod]) -> None:
    tb, billing, reporter, frontend = world
    n1, n2 = billing.node, frontend.node
    link_n1, link_n2 = n1.links["n2"], n2.links["n1"]
    assert (link_n1.peer, link_n2.peer) == ("n2", "n1")
    assert link_n1.ifindex == next(lk["ifindex"] for lk in _links(n1.netns) if lk["ifname"] == link_n1.ifname)

    before = _rx_packets(n1.netns, link_n1.ifname), _rx_packets(n2.netns, link_n2.ifname)
    assert frontend.ping(billing.ip, count=3)
    after = _rx_packets(n1.netns, link_n1.ifname), _rx_packets(n2.netns, link_n2.ifname)
    assert after[0] - before[0] >= 3 and after[1] - before[1] >= 3  # requests in, replies back

    # Same-node traffic stays off the link (a stray ARP probe may cross it, not 5 echoes).
    before = after
    assert reporter.ping(billing.ip, count=5)
    assert _rx_packets(n1.netns, link_n1.ifname) - before[0] < 5
    assert _rx_packets(n2.netns, link_n2.ifname) - before[1] < 5

    # The host-side veth recorded for a pod is the one its packets arrive on in the node.
    rx = _rx_packets(n1.netns, billing.host_ifname)
    assert billing.ping(n1.ip, count=2)
    assert _rx_packets(n1.netns, billing.host_ifname) - rx >= 2


@privileged
def test_pods_see_only_their_eth0_and_lo(world: tuple[Testbed, Pod, Pod, Pod]) -> None:
    tb, billing, reporter, frontend = world
    for pod in (billing, reporter, frontend):
        links = _links(pod.netns)
        assert sorted(str(lk["ifname"]) for lk in links) == ["eth0", "lo"], pod
        assert all("UP" in lk["flags"] for lk in links)  # type: ignore[operator]
        addrs = pod.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True).stdout
        assert f"inet {pod.ip}/32" in addrs
        routes = pod.run(["ip", "route"], check=True).stdout.splitlines()
        assert sorted(r.strip() for r in routes) == sorted(
            [f"default via {pod.node.ip} dev eth0", f"{pod.node.ip} dev eth0 scope link"])


@privileged
def test_interface_names_fit_ifnamsiz_and_host_side_is_recorded(world: tuple[Testbed, Pod, Pod, Pod]) -> None:
    tb, billing, reporter, frontend = world
    for node in tb.nodes.values():
        names = {str(lk["ifname"]): lk["ifindex"] for lk in _links(node.netns)}
        for name in names:
            assert len(name) <= IFNAMSIZ
            assert name == "lo" or name.startswith(f"l7g{tb.run_id}")
        for pod in node.pods:
            assert names[pod.host_ifname] == pod.host_ifindex
        assert set(node.link_ifnames) <= set(names)
    assert billing.host_ifname != reporter.host_ifname
    assert all(len(n) <= 255 and n.startswith(f"l7g-{tb.run_id}-") for n in tbmod.list_netns()
               if tb.run_id in n)


@privileged
def test_node_sysctls(world: tuple[Testbed, Pod, Pod, Pod]) -> None:
    tb, *_ = world
    keys = ["ip_forward", "conf/all/rp_filter", "conf/default/rp_filter", "ip_early_demux"]
    for node in tb.nodes.values():
        out = node.run(["cat", *(f"/proc/sys/net/ipv4/{k}" for k in keys)], check=True).stdout.split()
        assert out == ["1", "0", "0", "0"], node
        assert f"inet {node.ip}/32" in node.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout


@privileged
def test_manifests_describe_every_pod(world: tuple[Testbed, Pod, Pod, Pod]) -> None:
    tb, billing, reporter, frontend = world
    docs = tb.to_manifests()
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace"] * 3 + ["Pod"] * 3  # namespaces first, one per (cluster, ns)
    pods = {p.name: p for p in (parse_pod(d, default_cluster="") for d in docs if d["kind"] == "Pod")}
    assert pods["billing-service-xyz"].ref == "cluster-a/payments/billing-service-xyz"
    assert pods["billing-service-xyz"].ip == "10.0.1.10"
    assert pods["billing-service-xyz"].node_name == "n1"
    assert dict(pods["billing-service-xyz"].labels) == {"app": "billing-service"}
    assert pods["billing-service-xyz"].ports == ((8080, "TCP"),)
    assert pods["frontend-service-abc"].cluster == "cluster-b"
    namespaces = {(n.cluster, n.name) for n in (parse_namespace(d, default_cluster="") for d in docs
                                                if d["kind"] == "Namespace")}
    assert namespaces == {("cluster-a", "payments"), ("cluster-a", "web"), ("cluster-b", "web")}
    assert [d["metadata"]["name"] for d in tb.to_manifests(cluster="cluster-b")] == [
        "web", "frontend-service-abc"]


@privileged
def test_teardown_removes_everything_when_the_body_raises() -> None:
    stray: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed() as tb:
            n1, n2 = tb.add_node("n1"), tb.add_node("n2")
            tb.link(n1, n2)
            pod = tb.add_pod(n1, "default", "server")
            tb.add_pod(n2, "default", "client")
            server = pod.serve_http(8080)
            # A process the testbed did not spawn, left inside one of its namespaces.
            stray = subprocess.Popen(["ip", "netns", "exec", n2.netns, "sleep", "60"])
            assert len(_ours(tb.run_id)) == 4
            raise RuntimeError("boom")
    try:
        assert _ours(tb.run_id) == []
        assert server.poll() is not None
        assert stray is not None and stray.wait(timeout=5) != 0
    finally:
        if stray is not None and stray.poll() is None:
            stray.kill()
            stray.wait()
    assert not tb.workdir.exists()
    assert not (tbmod.LOCK_DIR / f"{tb.run_id}.lock").exists()


@privileged
def test_a_crashed_run_is_cleaned_up_and_a_live_run_is_not() -> None:
    dead = "dead"
    while True:  # a run id no one holds, as a crashed run leaves it
        dead = os.urandom(2).hex()
        if not any(n.startswith(f"l7g-{dead}-") for n in list_netns()):
            break
    crashed_node, crashed_pod = f"l7g-{dead}-n1", f"l7g-{dead}-pod"
    tbmod.LOCK_DIR.mkdir(parents=True, exist_ok=True)
    (tbmod.LOCK_DIR / f"{dead}.lock").write_text("12345\n")  # its lock file, no longer locked
    leftover: subprocess.Popen[bytes] | None = None
    try:
        for ns in (crashed_node, crashed_pod):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", crashed_node, "link", "add", f"l7g{dead}p1", "type", "veth",
                        "peer", "name", "eth0", "netns", crashed_pod], check=True)
        leftover = subprocess.Popen(["ip", "netns", "exec", crashed_pod, "sleep", "60"])
        with Testbed() as live:
            live.add_node("n1")
            # Starting a testbed removed the crashed run, process included ...
            assert not {crashed_node, crashed_pod} & set(list_netns())
            assert leftover.wait(timeout=5) != 0
            assert not (tbmod.LOCK_DIR / f"{dead}.lock").exists()
            # ... and neither a second testbed nor cleanup_all touches a run in progress.
            with Testbed() as other:
                assert other.run_id != live.run_id
                other.add_node("n1")  # same node name, own namespace
                assert cleanup_all(testbed_names_only=True) == []
                assert f"l7g-{live.run_id}-n1" in list_netns()
                assert f"l7g-{other.run_id}-n1" in list_netns()
            subprocess.run(["ip", "netns", "add", crashed_node], check=True)
            assert cleanup_all(testbed_names_only=True) == [f"netns {crashed_node}"]
            assert f"l7g-{live.run_id}-n1" in list_netns()
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for ns in (crashed_node, crashed_pod):
            if ns in list_netns():
                subprocess.run(["ip", "netns", "delete", ns])
        (tbmod.LOCK_DIR / f"{dead}.lock").unlink(missing_ok=True)
    assert _ours(live.run_id) == [] and _ours(dead) == []


def test_cleanup_selects_dead_runs_and_foreign_l7g_names() -> None:
    """What cleanup_all removes (no root needed): the decision, apart from the deleting."""
    names = ["l7g-ab12-n1", "l7g-ab12-billing", "l7g-cd34-n1", "l7g-probe", "other", "cni-1234"]
    links = ["lo", "eth0", "l7gcd34p1", "l7gdummy"]

    def live(run: str) -> bool:
        return run == "ab12"

    assert select_leftovers(names, links, live, testbed_names_only=True) == (["l7g-cd34-n1"], [])
    assert select_leftovers(names, links, live, testbed_names_only=False) == (
        ["l7g-cd34-n1", "l7g-probe"], ["l7gcd34p1", "l7gdummy"])


@privileged
def test_names_and_addresses_are_checked() -> None:
    with Testbed() as tb:
        n1 = tb.add_node("n1", node_cidr="10.1.0.0/24")
        with pytest.raises(ValueError, match="overlaps"):
            tb.add_node("n2", node_cidr="10.0.0.0/8")
        n2 = tb.add_node("n2")  # the first free 10.N.0.0/24
        assert str(n2.cidr) == "10.2.0.0/24" and n2.ip == "10.2.0.1"
        with pytest.raises(ValueError, match="not a host address"):
            tb.add_pod(n1, "default", "p1", ip="10.2.0.10")
        with pytest.raises(ValueError, match="already used"):
            tb.add_pod(n1, "default", "p1", ip="10.1.0.1")
        tb.add_pod(n1, "default", "p1")
        with pytest.raises(ValueError, match="already exists"):
            tb.add_pod(n2, "other", "p1")
    assert _ours(tb.run_id) == []


def test_pod_server_script_exists() -> None:
    assert Path(tbmod.POD_SERVER).is_file()


@privileged
def test_netlink_failures_name_the_namespace_and_the_operation() -> None:
    with Testbed() as tb:
        n1 = tb.add_node("n1", node_cidr="10.1.0.0/24")
        pod = tb.add_pod(n1, "default", "p1")
        with tbmod._Netlink(n1.netns) as nl:
            with pytest.raises(TestbedError, match=rf"^{n1.netns}: adding route {pod.ip}/32 dev "
                                                   rf"{pod.host_ifname} scope link: File exists$"):
                nl.add_route(f"{pod.ip}/32", pod.host_ifindex, pod.host_ifname)
            with pytest.raises(TestbedError, match=rf"^{n1.netns}: interface eth0: No such device$"):
                nl.index("eth0")  # eth0 is the pod's end
        with pytest.raises(TestbedError, match=r"^netlink socket in l7g-nosuch-netns: .*No such file"):
            tbmod._Netlink("l7g-nosuch-netns")
        with pytest.raises(TestbedError, match=rf"^creating netns {pod.netns}: .*File exists"):
            tbmod._create_netns(pod.netns)
    assert _ours(tb.run_id) == []
