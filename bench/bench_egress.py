"""Egress HTTP rules at the source (issue 17): requests/s from the frontend on node B to billing
on node A with an egress HTTP rule on the frontend (enforced by node B's Envoy) plus the seed's
ingress rule on billing (node A's Envoy), against the seed's ingress rule alone.

Needs root, bcc, wrk and Envoy (skipped with the reason otherwise). bench_mtls's two-node world
(`_tunnel_world.NodePairWorld`) without mTLS: node A (cluster-a) runs billing-service on :8080,
its server a static Envoy answering 200; node B (cluster-b) runs frontend-service; one
kernel-mode agent per node, Envoys at concurrency 1. Two policy sets alternate on the same
agents and pods:
   - ingress: the seed (default deny; billing admits POST /v1/charge on :8080 from the
     frontend). frontend → node B's kernel → the link → node A's kernel redirect → node A's
     Envoy (billing's listener, the seed's HTTP rules) → billing;
   - egress: the same plus `EGRESS_POLICY`, an egress HTTP rule on the frontend: toEndpoints
     billing, port 8080, POST /v1/charge (an equivalent allow). frontend → node B's kernel
     (bpf_sk_assign) → node B's Envoy egress listener (the frontend's egress rules; connects
     from the frontend's own address) → the link → node A's kernel redirect → node A's Envoy
     → billing: every request is parsed, judged and routed by both Envoys.
After each switch the path must be in force: both Envoys synced and a probe POST answered 200,
which node A's billing listener counts (`http.l7g_ep_<billing>_8080.downstream_rq_total`) and
node B's egress listener for :8080 (`http.l7g_egress_8080.downstream_rq_total`) counts in the
egress set and does not in the ingress set. Then a 1 s `wrk` warm-up (also after each change of
CPU layout), then `wrk -t1` POST /v1/charge with keep-alive connections from the frontend, at
32 and at 128 connections (`CONNECTIONS`, the order alternating by round). Rounds alternate the
order (ingress, egress | egress, ingress | ...).

Why two connection counts: requests/s is a capacity only where the busiest node's CPU is
saturated. At 32 connections the ingress path saturates node A's CPU, but the egress path does
not: measured per CPU (/proc/stat) in the per-node layout, node A's CPU was ~79% busy and node
B's ~59% with 32 connections, ~90-95% and ~70% with 128 (ingress: 100% at both), and no TCP
stall (one segment each way per request, no delayed ACK, in every netns: nstat). With each
request crossing two Envoys on two CPUs, 32 requests in flight are too few to keep both
busy: they bunch up at one node while the other idles. So the 32-connection rows measure
latency as much as capacity and are shown as context; the goal is judged at 128 connections,
where node A is the bottleneck in both modes. Each row's notes give each CPU's busy fraction. Checked every run: node
A's counter grows by at least the requests wrk completed in both sets, node B's egress counter
by at least that many in egress runs and not at all in ingress runs (a bench that measured the
wrong path would be worse than none), and no request fails (a request node B sent from its own
address instead of the frontend's would be refused by node A). Both CPU layouts of bench_mtls:
shared (a stress figure: node B's Envoy takes CPU from node A's) and per-node (node A's agent,
Envoy and upstream on CPU 0; node B's agent, Envoy and wrk on CPU 1), where the goal is judged.
Value: median req/s; ratio: median of the per-round paired ratios (egress / ingress). CPU µs
per request of each Envoy and agent (and the upstream) from /proc/<pid>/stat over the wrk runs,
wrk's from getrusage (its children); per node, all that shares the node's CPU in the per-node
layout (A: Envoy, agent, upstream; B: Envoy, agent, wrk). Goal: egress + ingress >= 0.8x
ingress alone, per-node CPUs.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _datapath_world import BILLING, FRONTEND, http_probe, seed_policies, wrk, wrk_script
from _tunnel_world import (
    ACCELERATED_VARIANT, PORT, KernelAgent, NodePairWorld, NodeRun, alternating, load_average, measure_wrk, missing_prerequisites,
    paired_rows, Switcher, usable_variants,
)
from run import Context, Result

from l7gate.client import AdminError
from l7gate.testing.testbed import CGROUP_ROOT, Node, Testbed
from l7gate.xds.egress import EGRESS_LISTENER
from l7gate.xds.resources import listener_name

MODES = ("ingress", "egress")  # baseline first
EGRESS_POLICY: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumClusterwideNetworkPolicy",
    "metadata": {"name": "allow-frontend-egress-to-billing-charge-api"},
    "spec": {
        "endpointSelector": {"matchLabels": FRONTEND},
        "egress": [{
            "toEndpoints": [{"matchLabels": BILLING}],
            "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}],
                         "rules": {"http": [{"method": "POST", "path": "/v1/charge"}]}}],
        }],
    },
}
EGRESS_KEY = f"{EGRESS_POLICY['kind']}/{EGRESS_POLICY['metadata']['name']}"
# Node B's egress listener's HTTP connection manager for :8080 (stat prefix l7g_egress_<port>).
EGRESS_RQ = f"http.{EGRESS_LISTENER}_{PORT}.downstream_rq_total"
CONNECTIONS = (32, 128)
SATURATED = 128  # the connection count the goal is judged at (module doc)


def name(connections: int) -> str:
    return (f"requests/s, wrk -t1 -c{connections} POST /v1/charge node B → node A: egress HTTP rule at the "
            "source (node B's Envoy) + the seed's ingress rule (node A's Envoy)")


NAME = name(SATURATED)
GOAL = "egress + ingress >= 0.8x the ingress rule alone, per-node CPUs"
CPU_NAME = "Envoy CPU per request, both nodes: egress HTTP rule + ingress rule"
WARMUP_S = 1.0


class EgressWorld(NodePairWorld[KernelAgent]):
    """The pair without mTLS; the policy sets `MODES`."""

    @classmethod
    def make_agents(cls, tb: Testbed, na: Node, nb: Node,
                    manifests: list[dict[str, Any]]) -> tuple[KernelAgent, KernelAgent]:
        return (KernelAgent(na, tb.workdir / "agent-a1", manifests, "cluster-a", 1, "cluster-b", 2),
                KernelAgent(nb, tb.workdir / "agent-b1", manifests, "cluster-b", 2, "cluster-a", 1))

    @property
    def ingress_rq(self) -> str:
        """Node A's billing listener's request counter (its stat prefix is the listener's name)."""
        return f"http.{listener_name(self.billing.ip, PORT)}.downstream_rq_total"

    def watch(self) -> dict[str, Callable[[], int]]:
        return {"egress B": partial(self.b.envoy_counter, EGRESS_RQ),
                "ingress A": partial(self.a.envoy_counter, self.ingress_rq)}

    def apply(self, mode: str, timeout: float = 30.0) -> float:
        """Apply one policy set (`MODES`) on both agents and wait until its path is in force;
        seconds."""
        if mode not in MODES:
            raise ValueError(f"no such policy set: {mode!r} (have {', '.join(MODES)})")
        egress = mode == "egress"

        def change(agent: KernelAgent) -> None:
            agent.client.apply_policies([*seed_policies(), *([EGRESS_POLICY] if egress else [])])
            if not egress:
                try:
                    agent.client.delete_policy(EGRESS_KEY)
                except AdminError as exc:
                    if exc.status != 404:  # never applied: nothing to remove
                        raise

        return self.switch(change, partial(self._in_force, egress), f"{mode} path in force", timeout)

    def _in_force(self, egress: bool) -> bool:
        """Both synced; a probe answered 200, counted by node A's billing listener, and by node
        B's egress listener exactly when `egress`."""
        if not (self.a.synced() and self.b.synced()):
            return False
        watch = self.watch()
        before = {k: read() for k, read in watch.items()}
        status, proxied = http_probe(self.frontend, self.billing.ip, PORT, "POST", "/v1/charge")
        grown = {k: read() - before[k] for k, read in watch.items()}
        return status == 200 and proxied and grown["ingress A"] > 0 and (grown["egress B"] > 0) == egress


def run(ctx: Context) -> list[Result]:
    why = missing_prerequisites(tools=("wrk",))
    if why is not None:
        ctx.log(f"SKIPPED: {why}")
        return [Result(name=NAME, value=float("nan"), unit="req/s", goal=GOAL, notes=f"SKIPPED: {why}")]
    try:
        return _requests(ctx)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        ctx.log("FAILED:\n" + traceback.format_exc())
        note = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return [Result(name=NAME, value=float("nan"), unit="req/s", goal=GOAL, goal_met=False, notes=note)]


def _requests(ctx: Context) -> list[Result]:
    rounds, seconds = (2, 3.0) if ctx.quick else (5, 5.0)
    load_before = load_average()
    variants = usable_variants()
    runs: dict[str, dict[int, dict[str, list[NodeRun]]]] = {
        v: {c: {m: [] for m in MODES} for c in CONNECTIONS} for v in variants}
    # The per-node layout once more in a world of its own whose nodes give their pods, agent
    # and Envoy a cgroup (socket acceleration, as deployed), when this machine has cgroup v2.
    worlds: list[tuple[bool, dict[str, dict[str, str] | None]]] = [(False, variants)]
    if "per-node" in variants and (CGROUP_ROOT / "cgroup.procs").exists():
        worlds.append((True, {ACCELERATED_VARIANT: variants["per-node"]}))
        runs[ACCELERATED_VARIANT] = {c: {m: [] for m in MODES} for c in CONNECTIONS}
    notes: dict[str, str] = {}
    for cgroup, layouts in worlds:
        ctx.log("two nodes, two kernel-mode agents, a static upstream" + (", in the nodes' cgroups" if cgroup else ""))
        with EgressWorld.running(cgroup) as w:
            script = wrk_script(w.tb.workdir / "post.lua")
            switcher = Switcher(w.apply)
            for variant, cpus in layouts.items():
                w.pin(cpus)
                wrk_cpus = cpus["B"] if cpus else None
                ctx.log(f"{variant} CPUs: {rounds} rounds x {' / '.join(MODES)} x {seconds:g} s, order alternating")
                warm = True  # a new layout: warm up whatever set is in force
                for r, mode in alternating(rounds, MODES):
                    if switcher.to(mode) or warm:
                        wrk(w.frontend, w.url, WARMUP_S, script, cpus=wrk_cpus)
                        warm = False
                    for c in CONNECTIONS if r % 2 == 0 else CONNECTIONS[::-1]:
                        one = _measure(w, script, seconds, mode, wrk_cpus, c)
                        busy = ", ".join(f"cpu{i} {b:.0%}" for i, b in enumerate(one.cpu_busy))
                        ctx.log(f"{variant} round {r + 1} {mode} -c{c}: {one.wrk.rps:.0f} req/s ({busy})")
                        runs[variant][c][mode].append(one)
                notes[variant] = switcher.note(MODES)
            w.finish()
    load = f"load average {load_before} before, {load_average()} after"
    out: list[Result] = []
    for variant in runs:
        for c in (SATURATED, *(x for x in CONNECTIONS if x != SATURATED)):
            out += _results(variant, runs[variant][c], notes[variant], rounds, seconds, load, c)
    return out


def _measure(w: EgressWorld, script: Path, seconds: float, mode: str, cpus: str | None, connections: int) -> NodeRun:
    one = measure_wrk(w, script, seconds, w.watch(), cpus, connections)
    n, egress, ingress = one.wrk.requests, one.grown["egress B"], one.grown["ingress A"]
    if ingress < n:
        raise RuntimeError(f"{mode} round: node A's {w.ingress_rq} grew by {ingress}, wrk completed {n} "
                           f"requests: they did not all go through node A's Envoy")
    if mode == "egress" and egress < n:
        raise RuntimeError(f"egress round: node B's {EGRESS_RQ} grew by {egress}, wrk completed {n} "
                           f"requests: they did not all go through node B's egress listener")
    # (Removing the egress rule removes the listener's :8080 chain: once drained, its counter is gone.)
    if mode == "ingress" and egress > 0:
        raise RuntimeError(f"ingress round: node B's {EGRESS_RQ} grew by {egress}: the baseline went "
                           f"through node B's egress listener")
    return one


def _results(variant: str, runs: dict[str, list[NodeRun]], switch: str, rounds: int, seconds: float,
             load: str, connections: int) -> list[Result]:
    def counted(mode: str, key: str) -> int:
        return sum(max(0, x.grown[key]) for x in runs[mode])

    requests = sum(x.wrk.requests for x in runs["egress"])
    return paired_rows(
        variant, runs, "egress", "ingress", name=name(connections), judge=connections == SATURATED,
        baseline_name="the seed's ingress rule alone (node A's Envoy)", goal=GOAL,
        cpu_name=f"{CPU_NAME}, wrk -c{connections}", cpu_baseline_name="the ingress rule alone",
        second_envoy="node B's Envoy (the egress rule)", switched="the egress rule added or removed",
        seen={"egress": f"node B's egress listener counted {counted('egress', 'egress B'):,} "
                        f"({counted('egress', 'egress B') / max(1, requests):.4f}x wrk's), node A's billing "
                        f"listener {counted('egress', 'ingress A'):,}",
              "ingress": f"node B's egress listener counted {counted('ingress', 'egress B')}, node A's billing "
                         f"listener {counted('ingress', 'ingress A'):,}"},
        cpu_remark="each node's agent receives the access log of every request its Envoy judged",
        context=(f"switch until in force: {switch}; {load}" if connections == SATURATED else
                 f"context, not judged: at {connections} connections the egress path does not keep node A's CPU "
                 f"busy (see each CPU's busy fraction; module doc), the goal is judged at {SATURATED}; switch "
                 f"until in force: {switch}; {load}"),
        rounds=rounds, seconds=seconds)
