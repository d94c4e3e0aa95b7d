"""Services (issue 20): connect latency through a ClusterIP translated by the socket load
balancer (`redirect_bpf/lb.c`) vs straight to the pod, with 10 vs 10,000 services in the
map, and the translation's own cost against an iptables DNAT chain as kube-proxy builds it.

Needs root (network namespaces, cgroup v2, bcc, iptables) and bpffs. One `Testbed`: a node
namespace with a client pod and a server pod (l7g-prefixed, removed at the end even on
failure). The server accepts and closes; the client side is three connect timers
(`_services_world.Connector`), long-lived processes in the client pod, all pinned to one CPU
and the server to the other (on 2 vCPUs the server's wake-up otherwise preempts the client):

- `direct`: outside every l7gate cgroup: no program runs for its sockets;
- `lb10`: in a cgroup of the bench's own where `SocketLB` is attached with 10 services;
- `lb10k`: in another, where a second `SocketLB` (pins of its own) holds 10,000 services.

Every service has two backends (the map holds 10 / 10,000 service entries and 20 / 20,000
backend slots); the dialled one is number n/2 and its two backends are the server pod. Each
sample is one `connect()` (closed with a RST, so no TIME_WAIT piles up), timed in the
connector; a block is n connects after 30 untimed ones and yields its p50.

1. Connect p50, same node, in interleaved blocks (order rotated per round): `direct` to the
   pod; `lb10` and `lb10k` to the ClusterIP; `lb10` to the pod as well (the program runs and
   finds no frontend). Before measuring: a connect to the ClusterIP from `direct` must fail
   (nothing translates it, and the node has no route for it). Value: the median over rounds
   of the block p50s; ratio: the median of the per-round ratios (blocks a few ms apart, so a
   shared machine's load drift cancels out). Goals: ClusterIP ≤ 1.1× straight to the pod, at
   10 and at 10,000 services; 10,000 services ≤ 1.1× 10.
2. The translation's own added cost, in rounds of two blocks (order alternating): in each
   block, connects to the ClusterIP and straight to the pod alternate connect by connect (A B,
   B A, ...) from one connector, and the block's added cost is the median over its pairs of
   (ClusterIP connect − pod connect): both halves of a pair see the same moment of the
   machine. This matters on a shared 2-vCPU machine, where single connects jump between two
   levels ~10 µs apart: a block p50 can land on either, a pair's difference rarely does.
   - socket LB: `lb10k` (its pod connects run the program, which finds no frontend);
   - iptables: `direct`, with kube-proxy's (iptables mode) ruleset for the same 10,000
     services in the node's nat table, l7g-prefixed: L7G-KUBE-SERVICES with one `-d clusterIP
     -p tcp --dport 80` rule per service, in service order (the dialled one in the middle: the
     average walk for a random service), jumping to a per-service chain whose `-m statistic
     --mode random --probability 0.5` rule picks one of two endpoint chains, each DNATing to
     the endpoint. PREROUTING jumps to it during these blocks only, and for the ClusterIP
     range only (kube-proxy jumps for every new connection, so that its connects straight to
     pods walk all 10,000 rules too: not counted here).
   Value: the median over rounds of the socket LB's added µs; baseline: iptables'; ratio:
   iptables' median added cost / the socket LB's, the latter never taken below its connect
   program's own run time per call (BPF run-time statistics, over a separate block): a
   difference below measurement noise would otherwise divide by ~0. Goal: ≥ 50× smaller.
   Whole-connect figures are reported as context only (they move with TCP's base cost).
"""

from __future__ import annotations

import secrets
import statistics
import traceback
from collections.abc import Callable

from _datapath_world import cpus_for_client_and_server, start_accept_server
from _services_world import (
    SVC_PORT, ConnectError, Connector, KubeProxyChains, LoadedLB, bpf_run_time_stats, cluster_ip, prog_run_stats,
    services,
)
from l7gate.testing.testbed import Testbed
from run import Context, Result

PORT = 8080
US = 1e6


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _spread(values: list[float], scale: float = US, unit: str = " µs") -> str:
    return f"median of {len(values)}, min {min(values) * scale:.4g}{unit}, max {max(values) * scale:.4g}{unit}"


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of b/a."""
    return statistics.median(y / x for x, y in zip(a, b))


def run(ctx: Context) -> list[Result]:
    rounds = 8 if ctx.quick else 30
    n = 100 if ctx.quick else 250
    ipt_rounds = 4 if ctx.quick else 15
    n_ipt = 60 if ctx.quick else 120
    small, big = 10, 10_000
    measured_small, measured_big = small // 2, big // 2
    load_before = _load()
    tag = secrets.token_hex(3)
    with Testbed() as tb:
        node = tb.add_node("svc")
        client = tb.add_pod(node, "bench", "client")
        server = tb.add_pod(node, "bench", "server", ports=[PORT])
        client_cpu, server_cpu = cpus_for_client_and_server()
        start_accept_server(server, PORT, server_cpu)
        backend = (server.ip, PORT)
        lbs: list[LoadedLB] = []
        connectors: list[Connector] = []
        chains = KubeProxyChains(node)
        try:
            ctx.log("loading the socket LB twice (bcc): 10 and 10,000 services")
            lb_small = LoadedLB(f"{tag}-10", small, measured_small, backend)
            lbs.append(lb_small)
            lb_big = LoadedLB(f"{tag}-10k", big, measured_big, backend)
            lbs.append(lb_big)
            direct = Connector(client, None, client_cpu, "direct")
            connectors.append(direct)
            c_small = Connector(client, lb_small.cgroup, client_cpu, "lb10")
            connectors.append(c_small)
            c_big = Connector(client, lb_big.cgroup, client_cpu, "lb10k")
            connectors.append(c_big)
            vip_small, vip_big = cluster_ip(measured_small), cluster_ip(measured_big)
            try:
                direct.samples(vip_big, SVC_PORT, 1, warmup=0)
                raise RuntimeError("a connect to the ClusterIP from outside the LB's cgroups succeeded: "
                                   "the check that translation is what makes it work is void")
            except ConnectError:
                pass

            blocks: dict[str, Callable[[], float]] = {
                "direct": lambda: statistics.median(direct.samples(server.ip, PORT, n)),
                "lb10": lambda: statistics.median(c_small.samples(vip_small, SVC_PORT, n)),
                "lb10k": lambda: statistics.median(c_big.samples(vip_big, SVC_PORT, n)),
                "lb10_pod": lambda: statistics.median(c_small.samples(server.ip, PORT, n)),
            }
            names = list(blocks)
            p50s: dict[str, list[float]] = {name: [] for name in names}
            ctx.log(f"connect p50: {rounds} rounds x {len(names)} configurations x {n} connects")
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    p50s[name].append(blocks[name]())

            ctx.log("the connect program's own run time (BPF run-time statistics)")
            prog_ns = _prog_run_time(lb_big, c_big, vip_big, 2000)

            ctx.log(f"iptables: kube-proxy's nat rules for {big:,} services")
            restore_s = chains.load(services(big, measured_big, backend))
            sep_a, sep_b = f"L7G-SEP-{measured_big:05d}A", f"L7G-SEP-{measured_big:05d}B"

            vip, pod = (vip_big, SVC_PORT), (server.ip, PORT)

            def lb_pair() -> tuple[list[float], list[float]]:
                return c_big.paired(vip, pod, n)

            def ipt_pair() -> tuple[list[float], list[float]]:
                with chains.enabled():
                    return direct.paired(vip, pod, n_ipt, warmup=10)

            # per block: (median of the pairwise differences, ClusterIP p50, pod p50)
            pairs: dict[str, list[tuple[float, float, float]]] = {"lb10k": [], "iptables": []}
            steps: dict[str, Callable[[], tuple[list[float], list[float]]]] = {"lb10k": lb_pair, "iptables": ipt_pair}
            order = list(steps)
            ctx.log(f"translation cost: {ipt_rounds} rounds x 2 configurations, ClusterIP and pod connects alternating")
            for r in range(ipt_rounds):
                for name in order[r % 2:] + order[:r % 2]:
                    to_vip, to_pod = steps[name]()
                    pairs[name].append((statistics.median(v - p for v, p in zip(to_vip, to_pod)),
                                        statistics.median(to_vip), statistics.median(to_pod)))
            walked = chains.packets(sep_a) + chains.packets(sep_b)
            if walked < ipt_rounds * n_ipt:
                raise RuntimeError(f"the dialled service's endpoint chains saw {walked} packets, expected "
                                   f">= {ipt_rounds * n_ipt}: connects did not go through the DNAT rules")
            load = f"load average {load_before} before, {_load()} after"
            writes = f"set_services wrote 10 services in {lb_small.write_s:.3f} s, 10,000 in {lb_big.write_s:.2f} s"
        finally:
            errors = []
            for c in connectors:
                c.close()
            for cleanup in (chains.remove, *(lb.remove for lb in lbs)):
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - keep cleaning up
                    errors.append(traceback.format_exc())
            if errors:
                raise RuntimeError("cleanup failed:\n" + "\n".join(errors))

    out = []
    direct_p50 = statistics.median(p50s["direct"])
    for name, count in (("lb10", small), ("lb10k", big)):
        ratio = _paired(p50s["direct"], p50s[name])
        out.append(Result(
            name=f"connect p50, same node, to a ClusterIP via the socket LB, {count:,} services",
            value=statistics.median(p50s[name]) * US, unit="µs",
            baseline_name="straight to the pod", baseline_value=direct_p50 * US, ratio=ratio,
            goal="ClusterIP <= 1.1x straight to the pod", goal_met=ratio <= 1.1,
            notes=(f"ratio: median of {rounds} per-round ratios; {_spread(p50s[name])} block p50s of {n} "
                   f"connects; straight to the pod {_spread(p50s['direct'])}; {load}"),
        ))
    ratio = _paired(p50s["lb10"], p50s["lb10k"])
    out.append(Result(
        name=f"connect p50 to a ClusterIP, {big:,} services in the map",
        value=statistics.median(p50s["lb10k"]) * US, unit="µs",
        baseline_name=f"{small} services", baseline_value=statistics.median(p50s["lb10"]) * US, ratio=ratio,
        goal="10,000 services <= 1.1x 10", goal_met=ratio <= 1.1,
        notes=(f"ratio: median of {rounds} per-round ratios; {writes}; a pod address dialled from the "
               f"LB's cgroup (program runs, no frontend): {statistics.median(p50s['lb10_pod']) * US:.4g} µs, "
               f"{_paired(p50s['direct'], p50s['lb10_pod']):.3g}x straight; {load}"),
    ))

    lb_cost = [d for d, _, _ in pairs["lb10k"]]
    ipt_cost = [d for d, _, _ in pairs["iptables"]]
    lb_added, ipt_added = statistics.median(lb_cost), statistics.median(ipt_cost)
    floor = prog_ns / 1e9 if prog_ns is not None else 0.0
    used = max(lb_added, floor)
    ratio = ipt_added / used if used > 0 else float("inf")

    def whole(name: str, k: int) -> float:
        return statistics.median(v[k + 1] for v in pairs[name]) * US

    out.append(Result(
        name=f"translation's added connect cost, socket LB ({big:,} services)",
        value=lb_added * US, unit="µs",
        baseline_name=f"iptables DNAT, kube-proxy's chains for {big:,} services", baseline_value=ipt_added * US,
        ratio=ratio, goal="socket LB's added cost >= 50x smaller than iptables'", goal_met=ratio >= 50,
        notes=(f"added cost of a block = the median over its pairs of (ClusterIP connect - pod connect), the "
               f"two alternating connect by connect; ratio: iptables' median / the LB's (taken as {used * US:.3g} µs: the "
               f"measured difference, floored at the connect program's own run time, "
               f"{'%.0f ns per call' % prog_ns if prog_ns is not None else 'unavailable'}); per round: LB "
               f"{_spread(lb_cost)}, iptables {_spread(ipt_cost)}; context, whole connect p50: LB "
               f"{whole('lb10k', 0):.4g} µs vs {whole('lb10k', 1):.4g} µs to the pod (program runs, no "
               f"frontend), iptables {whole('iptables', 0):.4g} µs vs {whole('iptables', 1):.4g} µs to the pod "
               f"(no program), {whole('iptables', 0) / whole('lb10k', 0):.3g}x the LB's; {ipt_rounds} rounds of "
               f"{n} (LB) / {n_ipt} (iptables) pairs; the dialled service is in the middle of "
               f"L7G-KUBE-SERVICES; iptables-restore of the ruleset took {restore_s:.1f} s; {load}"),
    ))
    return out


def _prog_run_time(lb: LoadedLB, connector: Connector, vip: str, n: int) -> float | None:
    """Nanoseconds per run of the LB's connect program over `n` connects through it."""
    fd = lb.connect_prog_fd()
    with bpf_run_time_stats() as on:
        if not on:
            return None
        t0, c0 = prog_run_stats(fd)
        connector.samples(vip, SVC_PORT, n, warmup=0)
        t1, c1 = prog_run_stats(fd)
    if c1 - c0 < n:
        return None
    return (t1 - t0) / (c1 - c0)
