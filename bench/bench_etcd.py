"""The kvstore's etcd backend (issue 13) against the embedded SQLite store, same run, same
workload, both through the `KVStore` interface.

One etcd (Debian etcd-server 3.4) is started for the run by `l7gate.testing.etcd`: free
loopback ports, a data dir in the scratch folder, stopped by PID at the end even on failure (it
never touches port 2379 or a system service). SQLite is a file in the scratch folder with the
agent's settings (durable: one fsync per commit) and a history long enough to replay 50k events.

1. Publish: 50,000 ipcache-shaped keys (`cilium/state/ip/v1/default/10.x.y.z`, ~100-byte JSON
   values) in `batch()`es of 128 writes: 391 etcd transactions (etcd's --max-txn-ops is 128),
   391 SQLite transactions.
2. Replay: `watch_prefix(prefix, start_revision=<before the publish>)` until all 50,000 PUT
   events are out of `get()`: what a cluster mesh reader does on (re)connect.
3. List: `list_prefix_with_revision` of the 50,000 keys (etcd: paged, one snapshot revision).

Rounds interleave (SQLite, etcd, alternating which goes first), so both see the same machine
load; each round writes its own prefix. Value: etcd's median; baseline: SQLite's median.
Goals: the figures measured by the prototype (FIELD-NOTES: 1.1–1.3 s and 0.16–0.24 s), with
2x head room for a loaded machine.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l7gate.kvstore import EtcdKVStore, KVStore, SQLiteKVStore
from run import Context, Result, fmt


def _etcd_helper() -> Any:
    """The test infrastructure's etcd launcher (l7gate.testing.etcd)."""
    from l7gate.testing import etcd

    return etcd


def _items(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
         b'{"IP":"10.%d.%d.%d","ID":%d,"HostIP":"192.168.0.1","Key":0,"Metadata":"bench"}'
         % (i >> 16 & 255, i >> 8 & 255, i & 255, 256 + i % 60000))
        for i in range(n)
    ]


def _publish(store: KVStore, items: list[tuple[str, bytes]], per_batch: int) -> None:
    for start in range(0, len(items), per_batch):
        with store.batch():
            for key, value in items[start:start + per_batch]:
                store.put(key, value)


def _replay(store: KVStore, prefix: str, start_revision: int, n: int) -> None:
    with store.watch_prefix(prefix, start_revision=start_revision) as watch:
        for _ in range(n):
            if watch.get(timeout=30) is None:
                raise RuntimeError(f"replay of {prefix!r} stalled")


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(ctx: Context) -> list[Result]:
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("needs the etcd binary (Debian etcd-server): bash scripts/install.sh")
    n = 5_000 if ctx.quick else 50_000
    rounds = 3
    per_batch = 128
    helper = _etcd_helper()
    sqlite = SQLiteKVStore(str(ctx.scratch / "bench.db"), history=rounds * n + 10)
    server = helper.EtcdServer(binary, Path(ctx.scratch) / "etcd")
    server.start()
    times: dict[str, dict[str, list[float]]] = {
        what: {"etcd": [], "sqlite": []} for what in ("publish", "replay", "list")}
    try:
        ctx.log(f"etcd {server.endpoint} (pid {server.pid}) healthy in {server.started_in:.2f} s")
        with EtcdKVStore(server.endpoint) as etcd:
            stores: dict[str, KVStore] = {"etcd": etcd, "sqlite": sqlite}
            # warm-up: connections, pages, the SQLite file
            for name, store in stores.items():
                _publish(store, _items(f"warm/{name}/", 1024), per_batch)
            written: list[tuple[str, str, int]] = []
            for r in range(rounds):
                order = ["sqlite", "etcd"] if r % 2 == 0 else ["etcd", "sqlite"]
                for name in order:
                    store = stores[name]
                    prefix = f"cilium/state/ip/v1/r{r}/"
                    items = _items(prefix, n)
                    before = store.revision
                    times["publish"][name].append(_timed(lambda: _publish(store, items, per_batch)))
                    written.append((name, prefix, before + 1))
            ctx.log("published; replaying")
            for r in range(rounds):
                order = ["sqlite", "etcd"] if r % 2 == 0 else ["etcd", "sqlite"]
                for name in order:
                    store = stores[name]
                    _, prefix, start = next(w for w in written if w[0] == name and w[1].endswith(f"/r{r}/"))
                    times["replay"][name].append(_timed(lambda: _replay(store, prefix, start, n)))
                    listed: list[int] = []
                    times["list"][name].append(_timed(
                        lambda: listed.append(len(store.list_prefix_with_revision(prefix)[0]))))
                    if listed != [n]:
                        raise RuntimeError(f"{name}: listed {listed} keys under {prefix}, wrote {n}")
    finally:
        sqlite.close()
        server.stop()

    def med(what: str, name: str) -> float:
        return statistics.median(times[what][name])

    def notes(what: str) -> str:
        return "; ".join(f"{name}: " + ", ".join(fmt(t) for t in times[what][name]) + " s"
                         for name in ("etcd", "sqlite")) + f" ({rounds} interleaved rounds)"

    batches = -(-n // per_batch)
    publish_goal = 2.6 * n / 50_000
    replay_goal = 0.1 + 0.4 * n / 50_000  # etcd starts a replay at its next sync tick (<= 100 ms)
    return [
        Result(name=f"publish {n} keys in {batches} batch()es of {per_batch}: etcd", value=med("publish", "etcd"),
               unit="s", baseline_name="SQLite (durable)", baseline_value=med("publish", "sqlite"),
               goal=f"<= {fmt(publish_goal)} s (prototype: 1.1-1.3 s for 50k)",
               goal_met=med("publish", "etcd") <= publish_goal, notes=notes("publish")),
        Result(name=f"replayed prefix watch, {n} events: etcd", value=med("replay", "etcd"), unit="s",
               baseline_name="SQLite", baseline_value=med("replay", "sqlite"),
               goal=f"<= {fmt(replay_goal)} s (prototype: 0.16-0.24 s for 50k)",
               goal_met=med("replay", "etcd") <= replay_goal, notes=notes("replay")),
        Result(name=f"list {n} keys with revision: etcd (paged, one snapshot)", value=med("list", "etcd"), unit="s",
               baseline_name="SQLite", baseline_value=med("list", "sqlite"), notes=notes("list")),
    ]
