"""The agent's netlink work through pyroute2 (issue 11): tc attachments that a restarted agent
replaces in place instead of duplicating (decision 7), detaching only our filters, the policy
routing for the proxy, the pod's host veth from the routing table, and errors that name the
interface. Checked with `tc`, `ip` and `bpftool`, so the kernel state reads as it did when the
agent shelled out to them."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.redirect_bpf.applier import KernelApplier, ensure_policy_routing, host_interface
from l7gate.redirect_bpf.loader import DatapathError, KernelDatapath, NoSuchInterface, Rtnl

pytestmark = pytest.mark.privileged("netns, veth, bcc, tc")

BPF_ROOT = Path("/sys/fs/bpf/l7g")


@dataclass
class World:
    node: Node
    pod: Pod
    other: Pod
    dp: KernelDatapath


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Testbed() as tb:
        node = tb.add_node("nl", node_cidr="10.66.1.0/24")
        pod = tb.add_pod(node, "default", "pod")
        other = tb.add_pod(node, "default", "other")
        dp = KernelDatapath(BPF_ROOT / f"test-netlink-{secrets.token_hex(3)}")
        try:
            dp.open()
            yield World(node, pod, other, dp)
        finally:
            try:
                with node.entered():
                    dp.uninstall()
            finally:
                if dp.bpf is not None:
                    dp.bpf.cleanup()
                shutil.rmtree(dp.pin_dir, ignore_errors=True)
                try:
                    BPF_ROOT.rmdir()
                except OSError:
                    pass  # another run still has pins there


def tc(node: Node, *args: str) -> None:
    """`tc` in the node's network namespace only: `ip netns exec` would hide the host's bpffs."""
    subprocess.run(["nsenter", f"--net={node.path}", "tc", *args], check=True)


def filters(node: Node, ifname: str, hook: str) -> list[dict[str, Any]]:
    """The classifiers on a hook as `tc -j` shows them (the chain header entries left out)."""
    out = node.run(["tc", "-j", "filter", "show", "dev", ifname, hook], check=True).stdout
    return [f for f in json.loads(out or "[]") if "options" in f]


def pinned_id(dp: KernelDatapath, prog: str) -> int:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(dp.pin_dir / f"prog_{prog}")],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["id"])


def ours_only(w: World, ifname: str) -> None:
    """Exactly our filter on each pod hook: pref 1, handle 1, direct-action, the pinned program."""
    for hook, prog in (("ingress", "l7g_from_pod"), ("egress", "l7g_to_pod")):
        got = [(f["pref"], f["kind"], f["options"]["handle"], f["options"]["direct-action"],
                f["options"]["prog"]["id"]) for f in filters(w.node, ifname, hook)]
        assert got == [(1, "bpf", "0x1", True, pinned_id(w.dp, prog))], (hook, got)
    qdiscs = json.loads(w.node.run(["tc", "-j", "qdisc", "show", "dev", ifname], check=True).stdout)
    assert [q["kind"] for q in qdiscs].count("clsact") == 1


def test_reattach_replaces_in_place_also_an_attachment_made_with_tc(world: World) -> None:
    ifname = world.pod.host_ifname
    # What an agent from before pyroute2 left attached: tc by pinned path.
    tc(world.node, "qdisc", "replace", "dev", ifname, "clsact")
    for hook, prog in (("ingress", "l7g_from_pod"), ("egress", "l7g_to_pod")):
        tc(world.node, "filter", "replace", "dev", ifname, hook, "pref", "1", "handle", "1", "bpf", "da",
           "object-pinned", str(world.dp.pin_dir / f"prog_{prog}"))
    with world.node.entered():
        for _ in range(3):  # restarts
            world.dp.attach(ifname, "pod")
            ours_only(world, ifname)
        with Rtnl() as nl:  # one socket for several requests, as the applier does
            world.dp.attach(ifname, "pod", nl)
            world.dp.attach(world.other.host_ifname, "pod", nl)
    ours_only(world, ifname)
    ours_only(world, world.other.host_ifname)


def test_a_restarted_agent_swaps_its_new_programs_in_without_a_second_filter(world: World) -> None:
    ifname = world.pod.host_ifname
    with world.node.entered():
        world.dp.attach(ifname, "pod")
    old_ids = {prog: pinned_id(world.dp, prog) for prog in ("l7g_from_pod", "l7g_to_pod")}
    restarted = KernelDatapath(world.dp.pin_dir)  # the same pinned maps, programs compiled afresh
    restarted.open()
    try:
        assert all(pinned_id(restarted, prog) != old for prog, old in old_ids.items())
        with world.node.entered():
            restarted.attach(ifname, "pod")
        ours_only(world, ifname)  # the new programs, one filter per hook
    finally:
        restarted.bpf.cleanup()  # its fds; the pins and the attachment stay, as after a restart


def test_detach_removes_only_our_filters(world: World) -> None:
    ifname = world.other.host_ifname
    # Someone else's filter on the same hook, at another pref (a bpf one: this kernel has no
    # matchall or u32 module).
    tc(world.node, "qdisc", "replace", "dev", ifname, "clsact")
    tc(world.node, "filter", "add", "dev", ifname, "ingress", "pref", "7", "handle", "1", "bpf", "da",
       "object-pinned", str(world.dp.pin_dir / "prog_l7g_to_pod"))
    with world.node.entered():
        world.dp.attach(ifname, "pod")
        world.dp.detach(ifname)
        world.dp.detach(ifname)  # nothing of ours left: fine
        world.dp.detach("l7gnosuchif0")  # a pod's veth already gone with its pod: fine
    assert [f["pref"] for f in filters(world.node, ifname, "ingress")] == [7]
    assert filters(world.node, ifname, "egress") == []
    tc(world.node, "filter", "del", "dev", ifname, "ingress", "pref", "7")


def test_errors_name_the_interface_or_address(world: World) -> None:
    with world.node.entered():
        with pytest.raises(NoSuchInterface, match="interface l7gnosuchif0: No such device"):
            world.dp.attach("l7gnosuchif0", "pod")
        with pytest.raises(ValueError):
            world.dp.attach(world.pod.host_ifname, "sidecar")
        # The node has routes to its pods and nothing else: no default route.
        with pytest.raises(DatapathError, match=r"no route to pod 192\.0\.2\.1: Network is unreachable"):
            host_interface("192.0.2.1")
        unpinned = KernelDatapath(world.dp.pin_dir.with_name(world.dp.pin_dir.name + "-none"))
        with pytest.raises(DatapathError, match="cannot open the pinned program .*prog_l7g_from_pod: "
                                                "No such file or directory"):
            unpinned.attach(world.pod.host_ifname, "pod")


def test_a_local_pod_gets_the_programs_on_its_host_veth(world: World) -> None:
    with world.node.entered():
        assert host_interface(world.pod.ip) == world.pod.host_ifname
        world.dp.detach(world.pod.host_ifname)
        applier = KernelApplier(world.dp, lambda ep: None)
        assert applier.set_local_pods({world.pod.ip: 70_001}) == 1
        ours_only(world, world.pod.host_ifname)
        restarted = KernelApplier(world.dp, lambda ep: None)  # entry in the map, filters attached
        assert restarted.set_local_pods({world.pod.ip: 70_001}) == 0
    ours_only(world, world.pod.host_ifname)


def test_policy_routing_is_added_once_and_reads_as_with_ip(world: World) -> None:
    node = world.node

    def rules() -> list[str]:
        return [r for r in node.run(["ip", "rule"], check=True).stdout.splitlines() if "2004" in r]

    def table() -> str:
        return str(node.run(["ip", "route", "show", "table", "2004"]).stdout).strip()

    with node.entered():
        assert ensure_policy_routing() == ["ip rule fwmark 0x200/0xf00 lookup 2004",
                                           "ip route local 0.0.0.0/0 dev lo table 2004"]
        assert rules() == ["100:\tfrom all fwmark 0x200/0xf00 lookup 2004"]
        assert table() == "local default dev lo scope host"
        assert ensure_policy_routing() == []
        # What an agent from before pyroute2 added with `ip` is recognised, not added twice.
        node.run(["ip", "rule", "del", "pref", "100"], check=True)
        node.run(["ip", "rule", "add", "fwmark", "0x200/0xf00", "lookup", "2004", "pref", "100"], check=True)
        node.run(["ip", "route", "flush", "table", "2004"], check=True)
        assert ensure_policy_routing() == ["ip route local 0.0.0.0/0 dev lo table 2004"]
        assert len(rules()) == 1 and table() == "local default dev lo scope host"
        node.run(["ip", "rule", "del", "pref", "100"], check=True)
        node.run(["ip", "route", "flush", "table", "2004"], check=True)


def test_rtnl_refuses_a_thread_running_an_event_loop() -> None:
    async def main() -> None:
        Rtnl()

    with pytest.raises(DatapathError, match="asyncio event loop"):
        asyncio.run(main())
