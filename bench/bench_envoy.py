"""Policy enforced by a real Envoy that the agent configures (issue 3, "Must show" → bench/).

Set-up: two loopback-mode agents in this process (`start_agent`), each with its own Envoy child
(`--concurrency 1`), side by side:

- SMALL: billing-service (local, 127.171.1.10:8080), a client pod, 8 peer pods: 10 identities;
  the seed's 2 policies + 7 "group" policies + 1 toggled policy: 10 policies.
- BIG: billing-service (127.172.1.10:8080), a client pod, 9,998 peer pods in 127.100.0.0/16:
  10,000 identities; the seed's 2 policies + 997 group policies + 1 toggled policy: 1,000.
  (`--quick`: 500 identities, 50 policies.)

Peer i has its own labels (so its own identity) and `group: g<i mod G>`; group policy g allows
its group `GET /v1/api/g` on billing:8080, so every peer is listed in billing's source-IP trie
and the RBAC matcher holds G distinct HTTP decisions.

The client. wrk cannot bind a source address, and the kernel picks 127.0.0.1 as the source of
a connection to any 127.x address (`ip route get 127.171.1.10` → `src 127.0.0.1`), so the
client pod is registered with IP 127.0.0.1 in both agents. Its labels decide its role: the
seed's frontend (allowed `POST /v1/charge`), then `app: probe` (no rule names it: denied at
L3/L4 like any unlisted source; the toggled policy later allows it one path).

The upstream. Each billing pod's server (pod_ip:18080) is a second, static Envoy answering
200 by `direct_response`: Python's http.server caps at a few thousand requests/s, below what
the proxy forwards. It costs about as much CPU per request as the proxy under test, on the
same 2 vCPUs as wrk; both sides of each ratio pay it alike.

State directories (kvstore) live on /dev/shm when it exists: the kvstore commits every write
in its own synchronous=FULL transaction (~8 per pod), and on this machine's disk that alone
cost 1.4-7 ms per pod in our runs (10,000 pods: 15-70 s), which would swamp the figures. The
cost on disk is measured separately on a sample and reported.

Measured, each against a baseline of the same run. Throughput: wrk runs of the two sides
alternate round by round; the ratio is the median of the per-round ratios (slow drifts of the
machine's load cancel within a pair), the values the medians of each side.
1. wrk requests/s, POST /v1/charge from the frontend, seed policy in force vs no policy
   selecting billing (the seed's two policies deleted: the route allows all). Goal >= 0.9.
2. wrk requests/s of 403s from a denied source (the unlisted client), BIG vs SMALL. Goal >= 0.9.
   Also: an L7 denial of a source listed in the trie (the client once the toggle names it).
   With each throughput figure, the CPU per request of Envoy and of this process (the agents'
   access-log ingestion: every request is logged to the agent over gRPC).
3. `core.apply([policy])` → first request on an open keep-alive connection that gets the new
   verdict, p50 and p99, BIG vs SMALL. The toggled policy alternates between allowing the
   client `GET /v1/probe` and `GET /v1/other`; the poll is `GET /v1/probe` (200 ↔ 403).
   Goal: p99 <= 100 ms at 1,000 policies x 10,000 identities.
4. one peer pod added (new identity, in a group: one ECDS source-address slot changes, plus the
   classifier and every slot when the pod is the first of its /16) → Envoy's ACK of the resulting ECDS version
   (the xDS server's status row: acked_version and last_ack), BIG vs SMALL.
   Goal <= 20 ms.
   SMALL's samples for 3 and 4 are taken before BIG is built: both agents share this process,
   and with BIG's heap one full garbage collection takes long enough to show in SMALL's
   milliseconds (the build result says how long).
4b. issue 16's worst single changes → Envoy's ACK, BIG, each against 4's median (same run): the
   first pod of a new /26 block, an ANY-peer rule added/removed, world's default flipped
   (deny ↔ allow), a policy added/removed whose name sorts first. Goal: max <= 100 ms.
5. Envoy's RSS and peak RSS (VmRSS / VmHWM), BIG vs SMALL.
Also: the time to apply the BIG world (policies, then all pods in one request).

At BIG size each apply takes tens of seconds today (see the notes), so phases 3 and 4 take as
many samples as fit in a time budget, at least 2: with fewer than 100 samples, "p99" is the
largest sample. Between timed steps the agents' access-log ingestion is let to catch up.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _world import (
    BILLING,
    FRONTEND,
    OFFSET,
    KeepAlive,
    StaticUpstream,
    agent_config,
    allow_http,
    apply_timed,
    cpu_seconds,
    envoy_memory,
    find_wrk,
    pod,
    quiesce,
    policy_row,
    policy_shape,
    start,
    synced,
    wait_listening,
    wait_policy_acked,
    wait_status,
    wrk,
    wrk_script,
)
from run import Context, Result

from l7gate.agent.config import EnvoySettings
from l7gate.agent.daemon import Agent, start_agent
from l7gate.l7proxy.supervisor import find_envoy

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed"
CLIENT_IP = "127.0.0.1"
PORT = 8080
PROBE = {"app": "probe"}


def seed_policies() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((SEED / name).read_text()))
    return docs


TOGGLE = "bench-toggle"


def toggle(allow_probe: bool) -> dict[str, Any]:
    return allow_http(TOGGLE, PROBE, "GET", "/v1/probe" if allow_probe else "/v1/other")


@dataclass
class Sizes:
    identities: int
    policies: int

    @property
    def peers(self) -> int:
        return self.identities - 2  # billing and the client are the other two

    @property
    def groups(self) -> int:
        return self.policies - 3  # the seed's two and the toggled one are the others


@dataclass
class World:
    name: str
    agent: Agent
    billing_ip: str
    sizes: Sizes
    peer_ip: Any  # i -> address
    new_ip: Any  # k -> address of the k-th pod added in phase 4
    build: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.billing_ip}:{PORT}"

    def peer(self, i: int) -> dict[str, Any]:
        labels = {"app": "peer", "peer": f"p{i}", "group": f"g{i % self.sizes.groups}"}
        return pod(f"peer-{i}", "web", self.peer_ip(i), labels, "cluster-b")

    def groups(self) -> list[dict[str, Any]]:
        return [
            allow_http(f"bench-group-{g}", {"group": f"g{g}"}, "GET", f"/v1/api/{g}")
            for g in range(self.sizes.groups)
        ]


def _start_world(
    ctx: Context, root: Path, name: str, billing_ip: str, sizes: Sizes, peer_ip: Any, new_ip: Any,
    client_labels: dict[str, str], upstreams: list[StaticUpstream], agents: list[Agent],
    binary: str,
) -> World:
    upstreams.append(StaticUpstream(binary, billing_ip, PORT + OFFSET, root / f"{name}-upstream"))
    agent = start(root / name, f"node-{name}")
    agents.append(agent)
    w = World(name, agent, billing_ip, sizes, peer_ip, new_ip)
    w.build["endpoints"] = apply_timed(
        agent,
        [
            pod("billing-service-0", "payments", billing_ip, BILLING, "cluster-a", (PORT,)),
            pod("client", "web", CLIENT_IP, client_labels, "cluster-b"),
        ],
    )
    synced(agent)
    wait_listening(billing_ip, PORT)
    return w


# -- 1. seed policy vs no policy ---------------------------------------------------------------


def seed_vs_none(ctx: Context, w: World, rounds: int, seconds: int) -> Result:
    agent = w.agent
    keys = [k for k in agent.core.apply(seed_policies()).created]
    synced(agent)
    conn = KeepAlive(w.billing_ip, PORT)
    post = wrk_script(ctx.scratch / "post-charge.lua", "POST", '{"amount": 1}')
    url = f"{w.url}/v1/charge"

    def set_state(seed: bool) -> None:
        if seed:
            agent.core.apply(seed_policies())
        else:
            for k in keys:
                agent.core.delete_policy(k)
        synced(agent)
        # The verdict that tells the two states apart, on an open connection.
        wait_status(conn, "GET", "/v1/transactions", 403 if seed else 200, 10)
        wait_status(conn, "POST", "/v1/charge", 200, 10)

    loads = {True: Load(), False: Load()}
    try:
        wrk(url, 1, post)  # warm-up
        for r in range(rounds):
            for seed in ((True, False) if r % 2 == 0 else (False, True)):
                set_state(seed)
                res = loads[seed].run(w, url, seconds, post)
                if res.non_2xx or res.socket_errors:
                    raise RuntimeError(f"seed={seed}: {res}: every POST /v1/charge must get 2xx")
        set_state(True)
    finally:
        conn.close()
    with_p, none = loads[True].median, loads[False].median
    ratio = paired_ratio(loads[True], loads[False])
    ctx.log(f"seed {loads[True].rps} vs none {loads[False].rps}")
    return Result(
        name="requests/s through Envoy, seed policy (POST /v1/charge from the frontend, allowed)",
        value=with_p,
        unit="req/s",
        baseline_name="no policy selecting the pod (route allows all)",
        baseline_value=none,
        ratio=ratio,
        goal=">= 0.9",
        goal_met=ratio >= 0.9,
        notes=f"wrk -t1 -c32, {seconds:g} s per run, median of {rounds} interleaved runs each; "
        f"ratio: median of the {rounds} per-round ratios (ratio of medians "
        f"{with_p / none:.3g}); "
        f"seed: {loads[True].describe()}; none: {loads[False].describe()}; upstream: a static "
        "Envoy (direct_response 200); every request is also logged to the agent over gRPC",
    )


def _span(xs: list[float]) -> str:
    return f"min {min(xs):.0f} max {max(xs):.0f}"


@dataclass
class Load:
    """wrk runs against one target, with the CPU each request cost Envoy and this process
    (the agents: access-log ingestion, xDS), in microseconds."""

    rps: list[float] = field(default_factory=list)
    envoy_us: list[float] = field(default_factory=list)
    agent_us: list[float] = field(default_factory=list)

    def run(self, w: World, url: str, seconds: int, script: Path) -> Any:
        assert w.agent.envoy is not None
        pid = w.agent.envoy.status().pid
        assert pid is not None
        quiesce(w.agent)
        e0, a0 = cpu_seconds(pid), _self_cpu()
        res = wrk(url, seconds, script)
        quiesce(w.agent)  # the access logs of this run are part of its cost
        e1, a1 = cpu_seconds(pid), _self_cpu()
        self.rps.append(res.rps)
        self.envoy_us.append((e1 - e0) * 1e6 / max(res.requests, 1))
        self.agent_us.append((a1 - a0) * 1e6 / max(res.requests, 1))
        return res

    @property
    def median(self) -> float:
        return statistics.median(self.rps)

    def describe(self) -> str:
        return (
            f"{_span(self.rps)}; CPU per request: Envoy {statistics.median(self.envoy_us):.0f} "
            f"µs, agent {statistics.median(self.agent_us):.0f} µs"
        )


def paired_ratio(num: Load, den: Load) -> float:
    """Median over rounds of num/den, each round's two runs being adjacent in time: slow drifts
    of the machine's load (other tenants) cancel within a pair."""
    return statistics.median(a / b for a, b in zip(num.rps, den.rps, strict=True))


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- 2. deny throughput, BIG vs SMALL --------------------------------------------------------------


def deny_rps(
    ctx: Context, small: World, big: World, rounds: int, seconds: int, method: str, path: str,
    expect: int,
) -> tuple[float, float, float, str]:
    # No body: Envoy answers a denied request before reading a body and then closes the
    # connection, so with a body every request would pay a new TCP connection.
    script = wrk_script(ctx.scratch / f"deny-{method}.lua", method, "")
    for w in (small, big):
        conn = KeepAlive(w.billing_ip, PORT)
        try:
            got = conn.status(method, path)
        finally:
            conn.close()
        if got != expect:
            raise RuntimeError(f"{w.name}: {method} {path} from the client got {got}, not {expect}")
        wrk(f"{w.url}{path}", 1, script)  # warm-up
    loads = {small.name: Load(), big.name: Load()}
    for r in range(rounds):
        for w in ((small, big) if r % 2 == 0 else (big, small)):
            res = loads[w.name].run(w, f"{w.url}{path}", seconds, script)
            if res.non_2xx != res.requests or res.socket_errors:
                raise RuntimeError(f"{w.name}: {res}: every request must be denied")
    ctx.log(f"deny {method} {path}: { {k: v.rps for k, v in loads.items()} }")
    b, s = loads[big.name].median, loads[small.name].median
    ratio = paired_ratio(loads[big.name], loads[small.name])
    notes = (
        f"wrk -t1 -c32, {seconds:g} s per run, median of {rounds} interleaved runs each; "
        f"ratio: median of the per-round ratios (ratio of medians {b / s:.3g}); "
        f"{big.sizes.identities} ids: {loads[big.name].describe()}; "
        f"{small.sizes.identities} ids: {loads[small.name].describe()}"
    )
    return b, s, ratio, notes


# -- 3. policy apply → first request with the new verdict -----------------------------------------


@dataclass
class ApplySamples:
    seen: list[float] = field(default_factory=list)  # apply start → first new verdict
    applied: list[float] = field(default_factory=list)  # apply start → apply returned
    polls: list[int] = field(default_factory=list)


def policy_to_verdict(ctx: Context, w: World, n_max: int, budget: float) -> ApplySamples:
    """Apply the toggled policy, alternately allowing the client GET /v1/probe and GET
    /v1/other; time from just before `core.apply` to the first request on an open keep-alive
    connection that gets the new verdict (polled after apply returns: Envoy cannot see a change
    before the cache holds it). The first sample lists the client (403 at L3/L4 → 200). An even
    number of samples, at least 2, then more while within `budget` seconds: the toggle ends
    allowing /v1/other, so GET /v1/probe is denied at L7 afterwards."""
    agent = w.agent
    conn = KeepAlive(w.billing_ip, PORT)
    out = ApplySamples()
    try:
        quiesce(agent)
        synced(agent, 600)
        wait_status(conn, "GET", "/v1/probe", 403, 10)
        started = time.monotonic()
        k = 0
        while k < n_max:
            if k >= 2 and k % 2 == 0 and time.monotonic() - started > budget:
                break
            allow = k % 2 == 0
            t0 = time.perf_counter()
            agent.core.apply([toggle(allow)])
            t1 = time.perf_counter()
            polls = wait_status(conn, "GET", "/v1/probe", 200 if allow else 403, 120)
            t2 = time.perf_counter()
            out.seen.append(t2 - t0)
            out.applied.append(t1 - t0)
            out.polls.append(polls)
            synced(agent, 600)
            quiesce(agent)
            k += 1
    finally:
        conn.close()
    ctx.log(f"{w.name}: policy→verdict {[round(x, 4) for x in out.seen]}")
    return out


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile: with fewer than 100 samples, p99 is the largest."""
    s = sorted(xs)
    rank = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[rank - 1]


# -- 4. one pod added → ACK ----------------------------------------------------------------------


@dataclass
class AckSamples:
    ack: list[float] = field(default_factory=list)  # apply start → ACK of the new ECDS version
    applied: list[float] = field(default_factory=list)
    envoy: list[float] = field(default_factory=list)  # response sent → ACK (server's view)
    sent: list[float] = field(default_factory=list)  # apply start → response sent


def pod_to_ack(ctx: Context, w: World, n_max: int, budget: float) -> AckSamples:
    """Add a pod to group g1 (a new identity the group's policy selects), time from just before
    `core.apply` to Envoy's ACK of the ECDS version that holds it. The xDS server's row for ECDS
    says what Envoy acknowledged of what it subscribed to; every slot name is subscribed with
    the listener, so the version the cache serves right after the apply is the one to wait for."""
    agent = w.agent
    out = AckSamples()
    quiesce(agent)
    started = time.monotonic()
    k = 0
    while k < n_max:
        if k >= 2 and time.monotonic() - started > budget:
            break
        before = policy_row(agent).acked_version
        labels = {"app": "peer", "peer": f"new{k}", "group": "g1"}
        doc = pod(f"new-{k}", "web", w.new_ip(k), labels, "cluster-b")
        t0w, t0 = time.time(), time.perf_counter()
        agent.core.apply([doc])
        t1 = time.perf_counter()
        target = policy_row(agent).cache_version
        if target == before:
            raise RuntimeError(f"{w.name}: adding a pod to a group did not change ECDS")
        row = wait_policy_acked(agent, target, w.name)
        out.ack.append(row.last_ack - t0w)
        out.applied.append(t1 - t0)
        out.envoy.append(row.ack_latency or 0.0)
        out.sent.append(row.last_sent - t0w if row.last_sent else 0.0)
        synced(agent, 600)
        k += 1
    ctx.log(f"{w.name}: pod→ACK {[round(x, 4) for x in out.ack]}")
    return out


# -- 4b. the worst single changes → ACK (issue 16) -------------------------------------------


def any_peer_policy() -> dict[str, Any]:
    """A CCNP on billing naming every endpoint of the cluster (`fromEndpoints: [{}]`): an
    ANY-peer rule, whose HTTP rule every peer's decision takes."""
    doc = allow_http("bench-any-peer", {}, "GET", "/v1/any")
    doc["spec"]["ingress"][0]["fromEndpoints"] = [{}]
    return doc


def world_policy() -> dict[str, Any]:
    """A CCNP on billing allowing `world` on 8080 at L3/L4: world's decision, the default of
    every address no identity holds, flips from the default deny to allow."""
    doc = allow_http("bench-world-allowed", {}, "GET", "/")
    doc["spec"]["ingress"] = [{"fromEntities": ["world"],
                               "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]
    return doc


FIRST_NAME = "aaa-bench-first"  # sorts before every other policy on billing


def first_name_policy() -> dict[str, Any]:
    """A CCNP on billing whose name sorts first among the endpoint's policies, naming one peer
    (p5): the endpoint's policy list changes at its head (world's default deny names the first
    few)."""
    return allow_http(FIRST_NAME, {"peer": "p5"}, "GET", "/v1/first")


def change_to_ack(ctx: Context, w: World, what: str, change: Any, n: int) -> list[tuple[float, float]]:
    """`change(k)` applied n times (the k-th change; alternating ones undo each other); each
    timed from just before it to Envoy's ACK of the resulting ECDS version (0 if it changed no
    ECDS resource: nothing to send), with the agent's share: `change(k)` itself (resolve,
    render, hand to the xDS server), the rest being the send and Envoy's work until its ACK."""
    agent = w.agent
    out: list[tuple[float, float]] = []
    quiesce(agent)
    for k in range(n):
        before = policy_row(agent).acked_version
        t0w = time.time()
        change(k)
        applied = time.time() - t0w
        target = policy_row(agent).cache_version
        if target == before:
            out.append((0.0, applied))
            continue
        out.append((wait_policy_acked(agent, target, f"{w.name}: {what}").last_ack - t0w, applied))
        synced(agent, 600)
        quiesce(agent)
    ctx.log(f"{w.name}: {what} → ACK {[round(x, 4) for x, _ in out]}, of which the agent's apply "
            f"{[round(a, 4) for _, a in out]}")
    return out


def worst_cases(ctx: Context, w: World, n: int) -> dict[str, list[tuple[float, float]]]:
    """Issue 16's worst single changes, in one run with the one-pod baseline (`pod_to_ack`,
    measured just before): the first pod of a new /26 block (inside the /16 the peers are
    in), an ANY-peer rule added or removed, world's default flipped (deny ↔ allow), and a
    policy added or removed whose name sorts first on the endpoint."""
    agent = w.agent
    out: dict[str, list[tuple[float, float]]] = {}

    def new_block_pod(k: int) -> None:
        labels = {"app": "peer", "peer": f"blk{k}", "group": "g1"}
        agent.core.apply([pod(f"blk-{k}", "web", f"127.100.{200 + k}.1", labels, "cluster-b")])

    out["first pod of a new /26 block"] = change_to_ack(ctx, w, "new /26", new_block_pod, n)
    for k in range(n):
        agent.core.delete_pod(f"cluster-b/web/blk-{k}")
    synced(agent, 600)

    def toggled(doc: dict[str, Any]) -> Any:
        key = f"CiliumClusterwideNetworkPolicy/{doc['metadata']['name']}"

        def change(k: int) -> None:
            if k % 2 == 0:
                agent.core.apply([doc])
            else:
                agent.core.delete_policy(key)
        return change

    n_even = n + (n % 2)  # ends with the policy removed
    out["an ANY-peer rule added or removed"] = change_to_ack(
        ctx, w, "ANY-peer rule", toggled(any_peer_policy()), n_even)
    out["world's default flipped (deny ↔ allow at L3/L4)"] = change_to_ack(
        ctx, w, "world flipped", toggled(world_policy()), n_even)
    out["a policy added or removed whose name sorts first"] = change_to_ack(
        ctx, w, "first name", toggled(first_name_policy()), n_even)
    return out


# -- the disk-backed kvstore cost --------------------------------------------------------------


def disk_pod_cost(ctx: Context, root: Path, n: int) -> tuple[float, float]:
    """Seconds per pod for one apply of `n` pods (no Envoy), kvstore on tmpfs vs on disk."""
    out = []
    for base in (root, ctx.scratch):
        d = Path(tempfile.mkdtemp(prefix="disk-", dir=base))
        cfg = dataclasses.replace(agent_config(d, "node-disk"), envoy=EnvoySettings(enabled=False))
        agent = start_agent(cfg)
        try:
            docs = [
                pod(f"d-{i}", "web", f"127.103.{i // 250}.{i % 250 + 1}", {"peer": f"p{i}"},
                    "cluster-b")
                for i in range(n)
            ]
            out.append(apply_timed(agent, docs) / n)
        finally:
            agent.stop()
            shutil.rmtree(d, ignore_errors=True)
    return out[0], out[1]


# -- run -----------------------------------------------------------------------------------------


def run(ctx: Context) -> list[Result]:
    quick = ctx.quick
    small_sizes = Sizes(identities=10, policies=10)
    big_sizes = Sizes(identities=500, policies=50) if quick else Sizes(10_000, 1_000)
    # wrk takes whole seconds only
    rounds, seconds, deny_seconds = (2, 1, 1) if quick else (5, 3, 2)
    # The deny rows compare two ~2 s wrk runs on a noisy 2-vCPU machine (single runs range
    # ±20%): more pairs for a steadier median of the per-round ratios.
    deny_rounds = 2 if quick else 9
    budget = 10.0 if quick else 30.0
    n_toggle, n_pods = (6, 4) if quick else (20, 11)
    binary = str(find_envoy())
    find_wrk()
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="l7gate-bench-envoy-", dir=shm if shm.is_dir() else None))
    upstreams: list[StaticUpstream] = []
    agents: list[Agent] = []
    results: list[Result] = []
    size = f"{big_sizes.policies} policies x {big_sizes.identities} identities"
    base = f"{small_sizes.policies} policies x {small_sizes.identities} identities"
    try:
        # SMALL, with the client as the seed's frontend.
        small = _start_world(
            ctx, root, "small", "127.171.1.10", small_sizes,
            lambda i: f"127.171.3.{i + 1}", lambda k: f"127.171.4.{k + 1}",
            FRONTEND, upstreams, agents, binary,
        )
        small.agent.core.apply([small.peer(i) for i in range(small_sizes.peers)])
        ctx.log("1. seed policy vs no policy")
        results.append(seed_vs_none(ctx, small, rounds, seconds))
        small.agent.core.apply(
            [pod("client", "web", CLIENT_IP, PROBE, "cluster-b"), *small.groups()]
        )
        synced(small.agent)

        # SMALL's latency baselines come first, before BIG exists: both agents share this
        # process, and BIG's heap makes each full garbage collection take long enough to
        # show up in SMALL's milliseconds (measured below).
        ctx.log("3, 4. SMALL baselines: policy apply → verdict, pod → ACK")
        ps = policy_to_verdict(ctx, small, n_toggle, budget)
        small.agent.core.delete_policy(f"CiliumClusterwideNetworkPolicy/{TOGGLE}")
        acs = pod_to_ack(ctx, small, n_pods, budget)
        for k in range(len(acs.ack)):
            small.agent.core.delete_pod(f"cluster-b/web/new-{k}")
        synced(small.agent)

        # BIG: policies first, then every pod in one request (that order is the faster one).
        big = _start_world(
            ctx, root, "big", "127.172.1.10", big_sizes,
            lambda i: f"127.100.{i // 250}.{i % 250 + 1}", lambda k: f"127.101.0.{k + 1}",
            PROBE, upstreams, agents, binary,
        )
        ctx.log(f"big: applying {big_sizes.policies - 1} policies")
        big.build["policies"] = apply_timed(big.agent, [*seed_policies(), *big.groups()])
        ctx.log(f"big: {big.build['policies']:.1f} s; applying {big_sizes.peers} pods")
        big.build["pods"] = apply_timed(big.agent, [big.peer(i) for i in range(big_sizes.peers)])
        t0 = time.perf_counter()
        synced(big.agent, 600)
        big.build["sync"] = time.perf_counter() - t0
        ctx.log(f"big: pods {big.build['pods']:.1f} s, Envoy synced {big.build['sync']:.2f} s later")
        t0 = time.perf_counter()
        gc.collect()
        full_gc = time.perf_counter() - t0
        results.append(
            Result(
                name=f"build BIG: {big_sizes.policies - 1} policies, then {big_sizes.peers} pods "
                "in one apply",
                value=big.build["policies"] + big.build["pods"],
                unit="s",
                notes=f"policies {big.build['policies']:.2f} s, pods {big.build['pods']:.2f} s, "
                f"then Envoy synced in {big.build['sync']:.2f} s; kvstore on tmpfs; a full "
                f"gc.collect() in the agent process then takes {full_gc * 1e3:.0f} ms",
            )
        )

        ctx.log("2. deny path")
        b, s, r, notes = deny_rps(ctx, small, big, deny_rounds, deny_seconds, "POST", "/v1/charge", 403)
        shape = policy_shape(big.agent)
        results.append(
            Result(
                name=f"403s/s from a denied source (unlisted, L3/L4 deny), "
                f"{big_sizes.identities} identities",
                value=b,
                unit="req/s",
                baseline_name=f"{small_sizes.identities} identities",
                baseline_value=s,
                ratio=r,
                goal=">= 0.9",
                goal_met=r >= 0.9,
                notes=f"{notes}; BIG {shape}",
            )
        )

        ctx.log("3. policy apply → first request with the new verdict")
        pb = policy_to_verdict(ctx, big, n_toggle, budget)
        apply_note = (
            f"{len(pb.seen)} samples (vs {len(ps.seen)}); apply() alone: median "
            f"{statistics.median(pb.applied) * 1e3:.1f} ms (vs "
            f"{statistics.median(ps.applied) * 1e3:.2f} ms); polls to see it: median "
            f"{statistics.median(pb.polls):.0f}; SMALL measured before BIG was built"
        )
        p99b = _pct(pb.seen, 99)
        results.append(
            Result(
                name=f"policy apply → first request with the new verdict, p99, {size}",
                value=p99b,
                unit="s",
                baseline_name=base,
                baseline_value=_pct(ps.seen, 99),
                goal="p99 <= 100 ms",
                goal_met=p99b <= 0.1,
                notes=apply_note + "; p99 is nearest-rank (the largest sample below 100)",
            )
        )
        results.append(
            Result(
                name=f"policy apply → first request with the new verdict, p50, {size}",
                value=_pct(pb.seen, 50),
                unit="s",
                baseline_name=base,
                baseline_value=_pct(ps.seen, 50),
                notes=f"min {min(pb.seen):.4g} s, max {max(pb.seen):.4g} s",
            )
        )

        ctx.log("2b. L7 deny of a listed source")
        small.agent.core.apply([toggle(False)])  # BIG's toggle ended there too
        synced(small.agent)
        b7, s7, r7, notes7 = deny_rps(
            ctx, small, big, deny_rounds, deny_seconds, "GET", "/v1/probe", 403
        )
        results.append(
            Result(
                name=f"403s/s from a listed source (L7 deny), {big_sizes.identities} identities",
                value=b7,
                unit="req/s",
                baseline_name=f"{small_sizes.identities} identities",
                baseline_value=s7,
                ratio=r7,
                goal=">= 0.9",
                goal_met=r7 >= 0.9,
                notes=notes7,
            )
        )

        ctx.log("4. one pod added → ACK")
        acb = pod_to_ack(ctx, big, n_pods, budget)
        med_b = statistics.median(acb.ack)
        results.append(
            Result(
                name=f"one pod added → Envoy ACK of the new ECDS version, {size}",
                value=med_b,
                unit="s",
                baseline_name=base,
                baseline_value=statistics.median(acs.ack),
                goal="<= 20 ms",
                goal_met=med_b <= 0.02,
                notes=f"median of {len(acb.ack)} (vs {len(acs.ack)}), max {max(acb.ack):.4g} s; "
                f"apply() alone: median {statistics.median(acb.applied) * 1e3:.1f} ms (vs "
                f"{statistics.median(acs.applied) * 1e3:.2f} ms); apply start → sent: median "
                f"{statistics.median(acb.sent) * 1e3:.1f} ms; server send → ACK: median "
                f"{statistics.median(acb.envoy) * 1e3:.1f} ms (vs "
                f"{statistics.median(acs.envoy) * 1e3:.2f} ms); SMALL measured before BIG was "
                f"built; BIG {shape}",
            )
        )

        ctx.log("5. Envoy memory")
        rss_b, hwm_b = envoy_memory(big.agent)
        rss_s, hwm_s = envoy_memory(small.agent)
        results.append(
            Result(
                name=f"Envoy peak RSS (VmHWM), {big_sizes.identities} identities",
                value=hwm_b / 2**20,
                unit="MiB",
                baseline_name=f"{small_sizes.identities} identities",
                baseline_value=hwm_s / 2**20,
                notes=f"RSS now {rss_b / 2**20:.1f} MiB vs {rss_s / 2**20:.1f} MiB",
            )
        )

        # After the memory row: an ANY-peer rule re-sends every slot, and Envoy's peak RSS
        # would show that transient, not the BIG world at rest.
        ctx.log("4b. worst single changes → ACK")
        # The previous figures: the same rows at fbc9b2c (before issue 16's shape), one full
        # run of this module (its one-pod median: 19.6 ms), on a machine shared with others.
        previous = {
            "first pod of a new /26 block": "median 0.323 s, max 0.355 s (classifier + every slot)",
            "an ANY-peer rule added or removed": "median 1.39 s, max 2.21 s (every slot)",
            "world's default flipped (deny ↔ allow at L3/L4)": "median 0.873 s, max 0.958 s (every slot)",
            "a policy added or removed whose name sorts first": "median 0.870 s, max 0.955 s (every slot)",
        }
        for what, samples in worst_cases(ctx, big, 4 if quick else 6).items():
            xs = [x for x, _ in samples]
            m = statistics.median(xs)
            agent_s = statistics.median(a for _, a in samples)
            envoy_s = statistics.median(x - a for x, a in samples)
            results.append(
                Result(
                    name=f"{what} → Envoy ACK, {size}",
                    value=m,
                    unit="s",
                    baseline_name="one pod added (same run)",
                    baseline_value=med_b,
                    goal="<= 100 ms",
                    goal_met=max(xs) <= 0.1,
                    notes=f"median of {len(xs)}, max {max(xs):.4g} s (goal on the max); "
                    f"samples {[round(x, 4) for x in xs]}; split, medians: the agent's apply (resolve, "
                    f"render, hand to the xDS server) {agent_s:.4g} s, then the send and Envoy's work "
                    f"until its ACK {envoy_s:.4g} s; before issue 16: {previous[what]}",
                )
            )

        ctx.log("kvstore on disk vs tmpfs")
        n_disk = 50 if quick else 300
        tmpfs, disk = disk_pod_cost(ctx, root, n_disk)
        results.append(
            Result(
                name=f"apply of {n_disk} pods, per pod, kvstore on disk",
                value=disk,
                unit="s",
                baseline_name="kvstore on tmpfs",
                baseline_value=tmpfs,
                notes=f"10,000 pods on disk would take ~{disk * 10_000:.0f} s "
                f"(~{tmpfs * 10_000:.0f} s on tmpfs): one fsync'd transaction per kvstore write",
            )
        )
    finally:
        for u in upstreams:
            u.stop()
        for a in agents:
            a.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results
