"""Profile the agent's apply path at bench_envoy's BIG size, in-process, without Envoy.

`python bench/profile_apply.py [--quick] [--samples N] [--profile toggle|pod|none]`

Builds the BIG world of bench_envoy through `AgentCore` (loopback mode, a `SnapshotCache` as the
xDS sink, nothing listening on it, the kvstore on /dev/shm when it exists): billing-service
(the one local endpoint) and the client, the seed's 2 policies + 997 group policies, then 9,998
peer pods in one request. Then it times, each over `--samples` calls:

- `core.apply([toggled policy])`: the toggled policy alternates between allowing the client
  `GET /v1/probe` and `GET /v1/other` (bench_envoy phase 3);
- `core.apply([one new pod])`: a remote peer with a new identity in group g1 (phase 4).

Each call is split into the resolver's share (`upsert_policy` / `update_identities`), the xDS
publisher's flush (translation into Envoy resources, owned by xds/) and the rest. With
`--publisher stub`, the agent runs with a stand-in publisher whose flush only reads the
snapshots (`endpoint_policy`) of the endpoints the deltas named: the agent's own cost, whatever
state xds/ is in. With `--profile`, one more batch of calls runs under cProfile and the top
functions are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import l7gate.agent.core as core_module
from l7gate.agent.config import AgentConfig, EnvoySettings
from l7gate.agent.core import AgentCore
from l7gate.kvstore.sqlite import SQLiteKVStore
from l7gate.xds.cache import SnapshotCache

ROOT = Path(__file__).resolve().parent.parent
PORT = 8080
PROBE = {"app": "probe"}
BILLING = {"app": "billing-service", "team": "payments", "env": "prod"}


# The objects bench_envoy (_world.py) builds, repeated here so that this script runs against
# older trees too (for before/after figures: PYTHONPATH=<old tree>/src).


def pod(
    name: str, ns: str, ip: str, labels: dict[str, str], cluster: str, ports: tuple[int, ...] = ()
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": {"l7gate.io/cluster": cluster},
        },
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": p} for p in ports]}]},
        "status": {"podIP": ip},
    }


def allow_http(name: str, from_labels: dict[str, str], method: str, path: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "billing-service"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": from_labels}],
                    "toPorts": [
                        {
                            "ports": [{"port": str(PORT), "protocol": "TCP"}],
                            "rules": {"http": [{"method": method, "path": path}]},
                        }
                    ],
                }
            ],
        },
    }


def agent_config(state: Path, node: str) -> AgentConfig:
    return AgentConfig(
        node=node,
        cluster_name="cluster-a",
        cluster_id=1,
        clusters={"cluster-b": 2},
        state_dir=str(state / "state"),
        admin_listen=f"unix:{state}/admin.sock",
        xds_listen=f"unix:{state}/xds.sock",
        envoy=EnvoySettings(enabled=False),
        upstream_port_offset=10000,
    )


def seed_policies() -> list[dict[str, Any]]:
    import yaml

    docs: list[dict[str, Any]] = []
    for name in ("default-deny-all.yaml", "allow-frontend-to-billing.yaml"):
        docs.extend(yaml.safe_load_all((ROOT / "examples" / "seed" / name).read_text()))
    return docs


def toggle(allow_probe: bool) -> dict[str, Any]:
    return allow_http("bench-toggle", PROBE, "GET", "/v1/probe" if allow_probe else "/v1/other")


def peer(i: int, groups: int) -> dict[str, Any]:
    labels = {"app": "peer", "peer": f"p{i}", "group": f"g{i % groups}"}
    return pod(f"peer-{i}", "web", f"127.100.{i // 250}.{i % 250 + 1}", labels, "cluster-b")


def new_peer(k: int) -> dict[str, Any]:
    labels = {"app": "peer", "peer": f"new{k}", "group": "g1"}
    return pod(f"new-{k}", "web", f"127.101.{k // 250}.{k % 250 + 1}", labels, "cluster-b")


class StubPublisher:
    """Takes what AgentCore gives a publisher; its flush reads the named endpoints' snapshots."""

    def __init__(self, sink: Any, node_id: str, policy_of: Callable[[int], Any],
                 access_logs: Any = ()) -> None:
        self.policy_of = policy_of
        self.access_logs = access_logs
        self.auth_verified = False
        self._dirty: set[int] = set()

    def load_ipcache(self, entries: Any) -> None:
        pass

    def set_ports(self, ports: Any) -> None:
        pass

    def on_policy_delta(self, delta: Any) -> None:
        self._dirty |= set(delta.changes) | delta.removed_endpoints

    def mark_identity(self, identity: int) -> None:
        self._dirty.add(identity)

    def on_ipcache_change(self, change: Any) -> None:
        pass

    def flush(self) -> None:
        for ident in sorted(self._dirty):
            self.policy_of(ident)
        self._dirty.clear()


class _TimedPublisher:
    """The core's publisher, its flush timed into `split.flush` (Publisher has slots: its method
    cannot be wrapped in place)."""

    def __init__(self, pub: Any, split: Split) -> None:
        self._pub, self._split = pub, split

    def flush(self) -> None:
        t0 = time.perf_counter()
        self._pub.flush()
        self._split.flush += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pub, name)


class Split:
    """Wall time spent inside a few of the core's callees, per timed call."""

    def __init__(self, core: AgentCore) -> None:
        self.resolver = 0.0
        self.flush = 0.0
        r = core.resolver
        for name in ("upsert_policy", "update_identities", "add_endpoint"):
            setattr(r, name, self._wrap(getattr(r, name), "resolver"))
        core.publisher = _TimedPublisher(core.publisher, self)  # type: ignore[assignment]

    def _wrap(self, fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)

        return timed

    def reset(self) -> None:
        self.resolver = 0.0
        self.flush = 0.0


def build(state: Path, identities: int, policies: int, stub: bool) -> tuple[AgentCore, SQLiteKVStore, int]:
    if stub:
        setattr(core_module, "Publisher", StubPublisher)
    cfg = agent_config(state, "node-big")
    state.mkdir(parents=True, exist_ok=True)
    store = SQLiteKVStore(str(state / "kv.db"))
    core = AgentCore(cfg, store, SnapshotCache())
    groups = policies - 3
    t0 = time.perf_counter()
    core.apply(
        [
            pod("billing-service-0", "payments", "127.172.1.10", BILLING, "cluster-a", (PORT,)),
            pod("client", "web", "127.0.0.1", PROBE, "cluster-b"),
        ]
    )
    core.apply(
        [*seed_policies(), *(allow_http(f"bench-group-{g}", {"group": f"g{g}"}, "GET", f"/v1/api/{g}")
                             for g in range(groups))]
    )
    t1 = time.perf_counter()
    core.apply([peer(i, groups) for i in range(identities - 2)])
    t2 = time.perf_counter()
    print(f"build: policies {t1 - t0:.2f} s, {identities - 2} pods {t2 - t1:.2f} s; "
          f"{core.resolver.map_size()} map entries", flush=True)
    core.apply([toggle(False)])
    return core, store, groups


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    rank = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[rank - 1]


def timed_series(core: AgentCore, split: Split, step: Callable[[int], None], n: int) -> None:
    total: list[float] = []
    res: list[float] = []
    fl: list[float] = []
    for k in range(n):
        split.reset()
        t0 = time.perf_counter()
        step(k)
        total.append(time.perf_counter() - t0)
        res.append(split.resolver)
        fl.append(split.flush)
    rest = [t - r - f for t, r, f in zip(total, res, fl)]

    def row(name: str, xs: list[float]) -> str:
        return (f"  {name:<22} median {statistics.median(xs) * 1e3:8.2f} ms   "
                f"p99 {pct(xs, 99) * 1e3:8.2f} ms   max {max(xs) * 1e3:8.2f} ms")

    print(row("total", total))
    print(row("resolver", res))
    print(row("publisher.flush", fl))
    print(row("rest of core.apply", rest), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="500 identities, 50 policies")
    ap.add_argument("--identities", type=int, default=None)
    ap.add_argument("--policies", type=int, default=None)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--profile", choices=("toggle", "pod", "none"), default="none")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--publisher", choices=("real", "stub"), default="real")
    args = ap.parse_args()
    identities = args.identities or (500 if args.quick else 10_000)
    policies = args.policies or (50 if args.quick else 1_000)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    state = Path(tempfile.mkdtemp(prefix="l7gate-profile-", dir=base))
    try:
        core, store, _ = build(state, identities, policies, args.publisher == "stub")
        split = Split(core)
        gc.collect()
        gc.freeze()  # the world is long-lived: keep full collections from timing its heap
        new_pods = iter(range(10**6))

        def toggle_step(k: int) -> None:
            core.apply([toggle(k % 2 == 0)])

        def pod_step(_: int) -> None:
            core.apply([new_peer(next(new_pods))])

        for _ in range(4):
            toggle_step(_)
            pod_step(_)
        print(f"core.apply([toggled policy]) at {policies} policies x {identities} identities, "
              f"{args.samples} samples, {args.publisher} publisher:")
        timed_series(core, split, toggle_step, args.samples)
        print(f"core.apply([one new pod]) (remote peer, new identity, group g1), "
              f"{args.samples} samples:")
        timed_series(core, split, pod_step, args.samples)
        if args.profile != "none":
            step = toggle_step if args.profile == "toggle" else pod_step
            prof = cProfile.Profile()
            prof.enable()
            for k in range(20):
                step(k)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
            print(out.getvalue())
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
            print(out.getvalue())
        store.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
