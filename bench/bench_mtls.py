"""Mutual-auth handshakes (issue 6): how many per second one core does, against plain TCP.

A `MutualAuthServer` (the agent's, thread per connection) runs in a child process on
127.0.0.1, with a store on the same built-in CA directory as the client (the shared-CA setup
of two clusters). This process runs `handshake()` in a loop from one thread: TCP connect, TLS
1.3 with SNI, both certificates checked by OpenSSL and by `verify_peer`, the server's verdict
line, close — exactly what `AuthManager` does per (pair, node).

Per core: the CPU seconds both processes spent (this one from `time.process_time`, the server
from /proc/<pid>/stat, all threads) are added up, so handshakes per CPU-second is what one core
would do for *both* ends of the handshake. The wall-clock rate of the single client thread
(client and server on 2 vCPUs) is reported too.

Baseline, in the same run and the same way: a plain TCP connect + close against a child that
accepts and closes (the client resets the connection so no TIME_WAIT piles up). Rounds of the
two alternate; values are medians over rounds. The ratio shows what TLS and the SPIFFE checks
cost over the bare connection.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import struct
import time
from multiprocessing.connection import Connection
from pathlib import Path

from run import Context, Result

from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.handshake import MutualAuthServer, handshake
from l7gate.mtls.store import SVIDStore
from l7gate.mtls.svid import verify_peer

CLIENT, SERVER = 100, 200
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


def _mtls_server(ca_dir: str, svid_dir: str, pipe: Connection) -> None:
    store = SVIDStore(BuiltinCA.load_or_create(ca_dir), svid_dir)
    store.set_identities([SERVER])
    with MutualAuthServer(store, ("127.0.0.1", 0)) as server:
        pipe.send(server.address)
        pipe.recv()  # until told to stop


def _tcp_server(pipe: Connection) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        sock.settimeout(0.2)
        pipe.send(sock.getsockname())
        while not pipe.poll():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            conn.close()


def _tcp_connect_close(address: tuple[str, int]) -> None:
    sock = socket.create_connection(address, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _round(fn: object, n: int, server_pid: int) -> tuple[float, float, float]:
    """(wall rate, per-CPU-second rate, server share of the CPU) of n calls of fn()."""
    assert callable(fn)
    cpu0, srv0, t0 = time.process_time(), _cpu_of(server_pid), time.perf_counter()
    for _ in range(n):
        fn()
    wall = time.perf_counter() - t0
    time.sleep(0.05)  # let the server finish its side of the last one
    client_cpu, server_cpu = time.process_time() - cpu0, _cpu_of(server_pid) - srv0
    cpu = client_cpu + server_cpu
    return n / wall, n / cpu, server_cpu / cpu


def run(ctx: Context) -> list[Result]:
    n_tls = 200 if ctx.quick else 1500
    n_tcp = 500 if ctx.quick else 3000
    rounds = 2 if ctx.quick else 3
    mp = multiprocessing.get_context("fork")

    ca_dir = ctx.scratch / "ca"
    ca = BuiltinCA.load_or_create(ca_dir)
    store = SVIDStore(ca, ctx.scratch / "client-svids")
    store.set_identities([CLIENT])

    tls_parent, tls_child = mp.Pipe()
    tls_proc = mp.Process(target=_mtls_server,
                          args=(str(ca_dir), str(ctx.scratch / "server-svids"), tls_child))
    tcp_parent, tcp_child = mp.Pipe()
    tcp_proc = mp.Process(target=_tcp_server, args=(tcp_child,))
    tls_proc.start()
    tcp_proc.start()
    try:
        tls_addr = tls_parent.recv()
        tcp_addr = tcp_parent.recv()
        assert tls_proc.pid is not None and tcp_proc.pid is not None

        def one_handshake() -> None:
            handshake(store, CLIENT, SERVER, tls_addr, timeout=5.0)

        for _ in range(20):  # warm up: contexts built, both sides' caches filled
            one_handshake()
            _tcp_connect_close(tcp_addr)

        tls_rounds, tcp_rounds = [], []
        for i in range(rounds):
            ctx.log(f"round {i + 1}/{rounds}: {n_tls} handshakes, {n_tcp} TCP connects")
            tls_rounds.append(_round(one_handshake, n_tls, tls_proc.pid))
            tcp_rounds.append(_round(lambda: _tcp_connect_close(tcp_addr), n_tcp, tcp_proc.pid))
    finally:
        tls_parent.send("stop")
        tcp_parent.send("stop")
        tls_proc.join(10)
        tcp_proc.join(10)

    def med(rows: list[tuple[float, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    tls_wall, tls_cpu, tls_share = med(tls_rounds, 0), med(tls_rounds, 1), med(tls_rounds, 2)
    tcp_wall, tcp_cpu = med(tcp_rounds, 0), med(tcp_rounds, 1)

    svid = store.svid(CLIENT)
    cert, bundle, td = svid.certificate, list(store.bundle()), store.trust_domain
    verify_s = ctx.median(lambda: [verify_peer(cert, bundle, td, CLIENT, now=time.time())
                                   for _ in range(200)], runs=5) / 200

    spread = ", ".join(f"{r[1]:.0f}" for r in tls_rounds)
    return [
        Result(
            name="mutual-auth handshakes per CPU-second (both ends)",
            value=tls_cpu, unit="/s per core",
            baseline_name="TCP connect + close per CPU-second (both ends)", baseline_value=tcp_cpu,
            notes=f"{rounds} rounds of {n_tls} (per round: {spread}); the server's share of the CPU "
                  f"{tls_share:.0%}: one node answering handshakes does ~{tls_cpu / tls_share:.0f}/s "
                  f"per core",
        ),
        Result(
            name="mutual-auth handshakes per second, one client thread (wall clock)",
            value=tls_wall, unit="/s",
            baseline_name="TCP connect + close, one client thread", baseline_value=tcp_wall,
            notes=f"client and server share 2 vCPUs; {1000 / tls_wall:.2f} ms per handshake",
        ),
        Result(
            name="verify_peer (SPIFFE checks + cryptography signature/validity path check)",
            value=verify_s * 1e6, unit="us",
            notes="per call, on a built-in-CA SVID; part of every handshake, on both ends",
        ),
    ]
