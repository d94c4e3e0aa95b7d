"""Netlink through pyroute2 (issue 11): the agent's per-pod set-up in kernel mode through
pyroute2 (the product path) and through the `ip`/`tc` shell-outs it replaced, which live on
here only, so that both figures come from the same run.

Needs root, bcc and bpffs. One `Testbed` with a node namespace and its pods (l7g-prefixed,
removed at the end even on failure); the project's tc programs loaded with `KernelDatapath`
into their own pin dir (`/sys/fs/bpf/l7g/<node netns>-netlink`, removed at the end). The bench
thread enters the node's netns for the agent rows, as the agent runs in it; the bench process
holds the loaded programs (bcc), so a shell-out forks a process of the agent's size.

1. Per-pod set-up, a pod appears: `KernelApplier.set_local_pods` of a new applier (as the
   agent's) with one pod — its endpoint map entry, then its host-side veth from the routing
   table, the clsact qdisc, `l7g_from_pod` at ingress and `l7g_to_pod` at egress (pref 1,
   handle 1, direct-action, the pinned programs). The pod's map entry and the veth's clsact
   qdisc are removed (untimed) before each sample.
   - before: the same map write, then `ip -j route get`, `tc qdisc replace`,
     2 × `tc filter replace ... object-pinned` (the agent's code before issue 11);
   - after: `set_local_pods` (pyroute2, one netlink socket for the batch).
2. The same after an agent restart (decision 7: the entry is in the map and the programs are
   still attached): a new applier's `set_local_pods` re-attaches. After every sample of 1 and 2
   the veth must hold exactly one filter per hook (no duplicate, no leftover).
3. Policy routing at agent start (`ensure_policy_routing`, once per start, not per pod): the
   fwmark rule and `local 0.0.0.0/0 dev lo table 2004`, from nothing (both removed untimed
   before each sample).
4. Testbed pod (tests and `l7gate demo`, not the agent): `Testbed.add_pod` — pod netns,
   sysctls, veth pair, addresses, routes — vs the same set-up through `ip`.

Samples of the two paths interleave (one of each per round, the order alternating), so both
see the same machine load. Value: median of the pyroute2 path; baseline: median of the
shell-outs; ratio: median over rounds of the paired ratio (pyroute2 / shell-outs). Goal: the
pyroute2 path is no slower.
"""

from __future__ import annotations

import gc
import json
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from _datapath_world import BPF_ROOT, remove_bpf_root_if_empty
from l7gate.testing import testbed as tbmod
from l7gate.testing.testbed import Node, Pod, Testbed
from l7gate.redirect_bpf import applier
from l7gate.redirect_bpf.applier import KernelApplier
from l7gate.redirect_bpf.loader import KernelDatapath
from run import Context, Result

PODS = 8
MS = 1e3
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3


# --- the shell-out path, as the agent and the testbed had it before issue 11 -------------------


def _sh(argv: list[str], stdin: str | None = None) -> str:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def old_host_interface(pod_ip: str) -> str:
    routes = json.loads(_sh(["ip", "-j", "route", "get", pod_ip]))
    return str(routes[0]["dev"])


def old_attach_pod(pin_dir: Path, ifname: str) -> None:
    _sh(["tc", "qdisc", "replace", "dev", ifname, "clsact"])
    for hook, prog in (("ingress", "prog_l7g_from_pod"), ("egress", "prog_l7g_to_pod")):
        _sh(["tc", "filter", "replace", "dev", ifname, hook, "pref", "1", "handle", "1", "bpf", "da",
             "object-pinned", str(pin_dir / prog)])


def old_policy_routing() -> None:
    table = str(applier.ROUTE_TABLE)
    rules = json.loads(_sh(["ip", "-j", "rule", "show"]) or "[]")
    if not any(r.get("table") == table and r.get("fwmark") == "0x200" for r in rules):
        _sh(["ip", "rule", "add", "fwmark", applier.REDIRECT_MARK, "lookup", table, "pref", "100"])
    routes = subprocess.run(["ip", "-j", "route", "show", "table", table],
                            capture_output=True, text=True, check=False)  # no table yet: an error
    if "local" not in routes.stdout:
        _sh(["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", table])


def old_testbed_pod(tb: Testbed, node: Node, name: str, pod_ip: str, host_if: str) -> int:
    """The pre-pyroute2 `Testbed.add_pod` set-up; returns the host veth's ifindex. The netns is
    registered with the testbed at once, so its teardown removes it."""
    netns = tb._netns_name(name)
    _sh(["ip", "netns", "add", netns])
    tb._netns.append(netns)
    tbmod._write_sysctls(netns, tbmod._POD_SYSCTLS)
    _sh(["ip", "-n", node.netns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns])
    _sh(["ip", "-n", netns, "-batch", "-"], stdin="\n".join([
        "link set lo up", f"addr add {pod_ip}/32 dev eth0", "link set eth0 up",
        f"route add {node.ip}/32 dev eth0 scope link", f"route add default via {node.ip} dev eth0"]) + "\n")
    _sh(["ip", "-n", node.netns, "-batch", "-"],
        stdin=f"link set {host_if} up\nroute add {pod_ip}/32 dev {host_if}\n")
    return int(json.loads(_sh(["ip", "-n", node.netns, "-j", "link", "show", "dev", host_if]))[0]["ifindex"])


# --- untimed set-up and checks (pyroute2, in the calling thread's netns) -----------------------


def remove_clsact(ifname: str) -> None:
    with IPRoute(groups=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        try:
            ipr.tc("del", "clsact", index)
        except NetlinkError:
            pass  # none there yet


def our_filters(ifname: str) -> dict[int, list[tuple[int, int, str]]]:
    """Per hook: (pref, handle, kind) of every classifier on `ifname`."""
    out: dict[int, list[tuple[int, int, str]]] = {}
    with IPRoute(groups=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for parent in (TC_INGRESS, TC_EGRESS):
            out[parent] = [(m["info"] >> 16, m["handle"], str(m.get("kind")))
                           for m in ipr.get_filters(index=index, parent=parent) if m["handle"]]
    return out


def check_attached(ifname: str) -> None:
    got = our_filters(ifname)
    want = {TC_INGRESS: [(1, 1, "bpf")], TC_EGRESS: [(1, 1, "bpf")]}
    if got != want:
        raise RuntimeError(f"{ifname}: filters {got}, expected exactly one per hook: {want}")


def remove_policy_routing() -> None:
    table = applier.ROUTE_TABLE
    with IPRoute(groups=0) as ipr:
        for rule in ipr.get_rules(family=socket.AF_INET):
            if rule.get("FRA_TABLE") == table:
                ipr.rule("del", family=socket.AF_INET, table=table, priority=rule.get("FRA_PRIORITY"),
                         fwmark=rule.get("FRA_FWMARK"), fwmask=rule.get("FRA_FWMASK"))
        try:
            ipr.flush_routes(table=table, family=socket.AF_INET)
        except NetlinkError:
            pass


def check_policy_routing() -> None:
    table = applier.ROUTE_TABLE
    with IPRoute(groups=0) as ipr:
        rules = [r for r in ipr.get_rules(family=socket.AF_INET) if r.get("FRA_TABLE") == table]
        routes = [r for r in ipr.route("dump", family=socket.AF_INET, table=table)]
    if len(rules) != 1 or len(routes) != 1 or routes[0]["type"] != 2:  # RTN_LOCAL
        raise RuntimeError(f"policy routing: {len(rules)} rules, {len(routes)} routes in table {table}")


# --- measurement -----------------------------------------------------------------------------


def _interleaved(rounds: int, before: Callable[[int], object], after: Callable[[int], object],
                 prepare: Callable[[int], object], check: Callable[[int], object]) -> tuple[list[float], list[float]]:
    """Seconds per sample of each path, one sample of each per round (the order alternates);
    `prepare(i)` runs untimed before a sample, then a garbage collection, and `check(i)` after."""
    samples: dict[str, list[float]] = {"before": [], "after": []}
    paths = [("before", before), ("after", after)]
    i = 0
    for r in range(rounds):
        for name, fn in paths if r % 2 == 0 else paths[::-1]:
            prepare(i)
            gc.collect()
            t0 = time.perf_counter()
            fn(i)
            samples[name].append(time.perf_counter() - t0)
            check(i)
            i += 1
    return samples["before"], samples["after"]


def _spread(values: list[float]) -> str:
    return f"median of {len(values)}, min {min(values) * MS:.3g} ms, max {max(values) * MS:.3g} ms"


def _result(name: str, before: list[float], after: list[float], what: str) -> Result:
    """Value and baseline: medians; ratio: the median of the per-round ratios (the two samples
    of a round are a few ms apart, so a shared machine's load drift cancels out)."""
    b, a = statistics.median(before), statistics.median(after)
    paired = statistics.median(x / y for x, y in zip(after, before))
    return Result(
        name=name, value=a * MS, unit="ms", baseline_name=f"ip/tc shell-outs ({what})",
        baseline_value=b * MS, ratio=paired, goal="pyroute2 no slower than the shell-outs it replaces",
        goal_met=paired <= 1.0,
        notes=f"pyroute2: {_spread(after)}; shell-outs: {_spread(before)}; ratio: median of per-round "
              f"pairs (ratio of medians {a / b:.3g})",
    )


def run(ctx: Context) -> list[Result]:
    rounds = 6 if ctx.quick else 50
    tb_rounds = 4 if ctx.quick else 20
    results: list[Result] = []
    with Testbed() as tb:
        node = tb.add_node("nl")
        pods = [tb.add_pod(node, "bench", f"p{i}") for i in range(PODS)]
        pin_dir = BPF_ROOT / f"{node.netns}-netlink"
        dp = KernelDatapath(pin_dir)
        try:
            ctx.log("loading the tc programs (bcc)")
            dp.open()
            with node.entered():
                results += _agent_rows(ctx, dp, pin_dir, pods, rounds)
        finally:
            try:
                with node.entered():
                    dp.uninstall()
            finally:
                if dp.bpf is not None:
                    dp.bpf.cleanup()
                    dp.bpf = None
                shutil.rmtree(pin_dir, ignore_errors=True)
                remove_bpf_root_if_empty()
        results.append(_testbed_row(ctx, tb, tb_rounds))
    return results


def _agent_rows(ctx: Context, dp: KernelDatapath, pin_dir: Path, pods: list[Pod], rounds: int) -> list[Result]:
    ident = 70_000

    def pod(i: int) -> Pod:
        return pods[i % len(pods)]

    def old(i: int) -> None:
        dp.set_endpoints({pod(i).ip: ident})
        old_attach_pod(pin_dir, old_host_interface(pod(i).ip))

    appliers: dict[int, KernelApplier] = {}

    def new(i: int) -> None:
        appliers.pop(i).set_local_pods({pod(i).ip: ident})

    def first_start(i: int) -> None:
        """Nothing of this pod in the kernel; a new applier, as the agent's."""
        dp.set_endpoints({})
        remove_clsact(pod(i).host_ifname)
        appliers[i] = KernelApplier(dp, lambda ep: None)

    def restart(i: int) -> None:
        """The pod's entry and filters are in the kernel; a new applier, as a restarted agent's."""
        check_attached(pod(i).host_ifname)
        dp.set_endpoints({pod(i).ip: ident})
        appliers[i] = KernelApplier(dp, lambda ep: None)

    def attached(i: int) -> None:
        check_attached(pod(i).host_ifname)

    ctx.log(f"per-pod set-up, a pod appears: {rounds} rounds x 2 paths")
    before, after = _interleaved(rounds, old, new, first_start, attached)
    out = [_result("per-pod set-up when a local pod appears (endpoint entry, route lookup, clsact, "
                   "2 bpf filters)", before, after, "ip route get + 3 tc")]

    ctx.log(f"per-pod set-up after an agent restart: {rounds} rounds x 2 paths")
    before, after = _interleaved(rounds, old, new, restart, attached)
    out.append(_result("per-pod re-attach after an agent restart (entry and filters already there)",
                       before, after, "ip route get + 3 tc"))

    ctx.log(f"policy routing at agent start: {rounds} rounds x 2 paths")
    before, after = _interleaved(rounds, lambda i: old_policy_routing(),
                                 lambda i: applier.ensure_policy_routing(),
                                 lambda i: remove_policy_routing(), lambda i: check_policy_routing())
    out.append(_result("policy routing at agent start (fwmark rule + local route), once per start",
                       before, after, "4 ip"))
    return out


def _testbed_row(ctx: Context, tb: Testbed, rounds: int) -> Result:
    node = tb.add_node("tbpods")
    ctx.log(f"testbed pods: {rounds} rounds x 2 paths")

    def old(i: int) -> None:
        # Old-path pods take .100 upwards; `add_pod` allocates from .10, and is given fewer.
        ip = str(node.cidr.network_address + 100 + i)
        old_testbed_pod(tb, node, f"old{i}", ip, tbmod._ifname(tb.run_id, "o", str(i)))

    def new(i: int) -> None:
        tb.add_pod(node, "bench", f"new{i}")

    before, after = _interleaved(rounds, old, new, lambda i: None, lambda i: None)
    return _result("testbed pod (netns, sysctls, veth pair, addresses, routes)", before, after,
                   "ip netns add + 4 ip")
