"""The DNS proxy: judges every query a pod sends, forwards the allowed ones, and learns the
addresses of their answers before the pod sees them — Cilium's DNS proxy for ``toFQDNs`` and
``rules.dns``.

Theory of operation
-------------------
Where queries come from. Transparent mode (kernel mode): the datapath marks a pod's UDP and TCP
packets to port 53 and a policy-routing rule delivers them to the node (``ip rule fwmark M
lookup T``, ``ip route add local 0.0.0.0/0 dev lo table T``); they keep their destination, the
resolver the pod asked. The proxy listens on the wildcard address, port 53, with
IP_TRANSPARENT, and learns each query's original destination: UDP from the IP_ORIGDSTADDR
control message, TCP from the accepted socket's own address. It answers from that destination
(UDP: an IP_PKTINFO source on the listening socket; TCP: the accepted socket), so the pod cannot
tell a proxy was there. `sockets` says why these options and not others. The answer leaves
from the listener's port, so the listener must have the port the pods ask (53); a TPROXY-style
redirect to another port is not supported. Forwarding mode (`transparent=False`, loopback tests
and tools): clients send to the proxy's address and everything goes to `upstream`.

Per query (`_serve`), the same for UDP and TCP:

1. Parse (`messages.parse_query`): not a DNS message, a response, zero or several questions,
   over `max_query_size`: counted as malformed and dropped (UDP) or the connection closed (TCP).
   Never an answer: a proxy that answers garbage is a reflector.
2. Over `max_inflight` queries in flight → SERVFAIL at once. A query from one of the proxy's
   own upstream sockets (a pod asked the node's own address, or `upstream` is the proxy) →
   SERVFAIL, instead of forwarding it round and round. An opcode other than QUERY (UPDATE,
   NOTIFY, ...) → NOTIMP; such a message is never forwarded.
3. ``judge(source ip, server ip, qname, qtype)`` in a worker thread: the owner's policy.
   qname follows `messages.normalize_name`: lower case, no trailing dot (``api.example.com``;
   the root is ``.``). server ip is the original destination (forwarding mode: the proxy's
   own address). A judge that raises or does not return within `timeout` denies.
4. Denied → an answer built from the query with the reject rcode (REFUSED, or NXDOMAIN for
   Cilium's ``nameError``); never forwarded.
5. Allowed → forwarded over the same protocol, byte for byte (the client's id kept), to the
   original destination or `upstream`. UDP: a fresh socket per query (a random source port,
   connected, so only the server's datagrams arrive; ones with another id or question are
   ignored, as a stub resolver does). TCP: one upstream connection per client connection,
   queries pipelined and matched by id, closed with the client's.
6. The answer's addresses (`messages.extract_answers`: A/AAAA at the end of the CNAME chain
   from the query name; the name and every CNAME target get them, each with the smallest TTL
   of the chain from it on) go to ``on_answer(source ip, answers)`` in a worker thread, and the
   answer is held until it returns: the owner puts the addresses into its ipcache and kernel
   maps there, so the pod's first packet to them is already allowed. If it raises, or does
   not return within `timeout`, the client gets SERVFAIL (no unlearned address is released);
   with `response_max_delay` set the answer is released after that long regardless (Cilium's
   ``--tofqdns-proxy-response-max-delay``).
7. The upstream's answer is released as it came (TC bit and all). An upstream that fails or
   sends something unreadable → SERVFAIL; one that does not answer within `timeout` → no
   answer, as if the datagram were lost (the client retries), as Cilium does.

Deviations from Cilium: the in-flight limit and upstream failures answer SERVFAIL where Cilium
answers with the reject code (they are not policy decisions); the forwarded query keeps the
client's id where Cilium draws a new one; answers are relayed unchanged where Cilium re-packs
them; the upstream is contacted from the node's address, not the pod's. Not supported: answers
signed with TSIG (unreadable without the key: SERVFAIL; signed queries are forwarded), zone
transfers (only the first message of an AXFR/IXFR answer is relayed).

Events: every judged query gives a ``request`` event with its verdict; an allowed one gives a
``response`` event (rcode, addresses, TTL, CNAMEs, latency) when its answer is released or
fails. `on_event` is called on the proxy's event-loop thread and must return quickly.

Bounds: in-flight queries (`max_inflight`), client TCP connections, queries in flight per
connection (the next one is not read until one is answered), a query's size, each wait (judge,
upstream, on_answer, a client's write), idle TCP connections, the UDP receive buffer. Worker
threads: `DNSLimits.workers`.

Threads: the proxy runs its own event loop (uvloop where it installs) in one thread, judge and
on_answer in a pool of worker threads; `start`, `stop`, `status` and `problems` may be called
from any thread. Sockets are opened in the network namespace of the thread that called `start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import dns.message
import dns.opcode
import dns.rcode

from . import sockets
from .messages import (HEADER_SIZE, MAX_QUERY_SIZE, Malformed, Mismatch, Query, extract_answers,
                       parse_query, parse_response, rcode_text, reject_answer, reject_rcode)
from .types import DNSAnswer, DNSEvent, DNSVerdict

Judge = Callable[[str, str, str, str], DNSVerdict]
OnAnswer = Callable[[str, list[DNSAnswer]], None]
OnEvent = Callable[[DNSEvent], None]
Transport = Literal["udp", "tcp"]
Exchange = Callable[[Query, tuple[str, int]], Awaitable[tuple[bytes, dns.message.Message]]]
_T = TypeVar("_T")

_MAX_MESSAGE = 65535
_TCP_LENGTH = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class DNSLimits:
    max_query_size: int = MAX_QUERY_SIZE
    max_tcp_connections: int = 1000  # client connections; one more is closed at once (counted)
    max_tcp_pipeline: int = 32  # queries in flight on one client connection
    tcp_idle_timeout: float = 10.0  # no query on an open client connection (RFC 7766: seconds)
    udp_rcvbuf: int = 4 << 20  # a burst of queries waits here while the loop is busy
    udp_batch: int = 256  # datagrams read per wake-up before other work gets a turn
    workers: int = 16  # threads running judge and on_answer


@dataclass(slots=True)
class DNSStats:
    queries: int = 0  # well-formed queries received
    allowed: int = 0
    refused: int = 0  # denied by judge (or opcode not proxied): answered with the reject code
    malformed: int = 0
    overloaded: int = 0  # over max_inflight: SERVFAIL
    upstream_errors: int = 0  # SERVFAIL sent
    upstream_timeouts: int = 0  # nothing sent
    upstream_mismatched: int = 0  # upstream datagrams ignored: another id or question
    judge_errors: int = 0
    answers_learned: int = 0  # on_answer calls that returned in time
    answer_errors: int = 0  # on_answer raised: SERVFAIL
    answer_delayed: int = 0  # on_answer too slow: SERVFAIL, or released (response_max_delay)
    reply_errors: int = 0  # an answer could not be sent to the client
    loops: int = 0  # queries the proxy sent to itself: SERVFAIL
    event_errors: int = 0
    inflight: int = 0
    inflight_peak: int = 0
    tcp_active: int = 0
    tcp_total: int = 0
    tcp_refused: int = 0


class _UpstreamError(Exception):
    pass


def _no_event(_ev: DNSEvent) -> None:
    pass


def _endpoint(name: Any) -> tuple[str, int]:
    return str(name[0]), int(name[1])


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: an abandoned worker's error is not logged by asyncio


class DNSProxy:
    """A transparent DNS proxy (see the module docstring). It owns its sockets, event-loop
    thread and worker threads from `start` to `stop`; `judge`, `on_answer` and `on_event` are
    called from those threads and must be thread-safe. Events and answers are immutable and
    belong to the receiver."""

    def __init__(
        self,
        judge: Judge,
        on_answer: OnAnswer,
        on_event: OnEvent | None = None,
        *,
        listen: tuple[str, int] = ("0.0.0.0", 53),
        transparent: bool = True,
        upstream: tuple[str, int] | None = None,
        refused_rcode: str = "REFUSED",
        timeout: float = 5.0,
        max_inflight: int = 10_000,
        response_max_delay: float | None = None,
        mark: int = 0,
        limits: DNSLimits = DNSLimits(),
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        """`judge(source ip, server ip, qname, qtype)` decides; qname is lower case without the
        trailing dot (`normalize_name`), qtype a type name (``A``, ``AAAA``, ``TYPE65534``).
        `on_answer(source ip, answers)` learns; the answer waits for it.
        `upstream`: None forwards each query to its original destination (transparent mode
        only); set, everything goes there. `refused_rcode`: Cilium's
        ``--tofqdns-dns-reject-response-code`` (``refused`` or ``nameError``). `mark`: SO_MARK
        of the sockets towards upstream, so the datapath can tell the proxy's own queries from
        the pods'."""
        if not transparent and upstream is None:
            raise ValueError("forwarding mode (transparent=False) needs an upstream")
        self.judge = judge
        self.on_answer = on_answer
        self.on_event = on_event or _no_event
        self.listen = (listen[0], int(listen[1]))
        self.transparent = transparent
        self.upstream = upstream
        self.reject_rcode = reject_rcode(refused_rcode)
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.response_max_delay = response_max_delay
        self.mark = mark
        self.limits = limits
        self._log = log
        self.stats = DNSStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_kind = "asyncio"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._udp: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._bind_error = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        # Local ends of the proxy's own upstream sockets: a query from one of them is the proxy
        # talking to itself (a pod asked the node's own address; upstream set to the proxy).
        self._own: set[tuple[str, int]] = set()
        self._last: dict[str, str] = {}  # last malformed input, reply error, callback error

    # -- lifecycle (any thread) ----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the event loop and bind (in the calling thread's network namespace). A failed
        bind is in `problems()` and retried every second; `address` is None until it works."""
        if self._thread is not None:
            raise RuntimeError("the DNS proxy is already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="l7g-dns", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the DNS proxy's event loop did not start")

    def _run(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            self._loop_kind = "uvloop"
        except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        # Created here, so its threads start in this thread's network namespace.
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="l7g-dns-worker")
        self._spawn(self._open())
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            self._close_listeners()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=timeout)
            loop.stop()

        with contextlib.suppress(RuntimeError):  # the loop already ended
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop = None
        self._thread = None
        self._pool = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the proxy listens (UDP and TCP), once bound; port 0 in `listen` is resolved."""
        return self._address

    def status(self) -> dict[str, Any]:
        s = self.stats
        addr = self._address
        return {
            "state": "LIVE" if self._loop is not None else "STOPPED",
            "loop": self._loop_kind,
            "mode": "transparent" if self.transparent else "forwarding",
            "listening": [f"{proto} {addr[0]}:{addr[1]}" for proto in ("udp", "tcp")] if addr else [],
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}" if self.upstream else "original destination",
            "reject_rcode": dns.rcode.to_text(self.reject_rcode),
            "queries": s.queries, "allowed": s.allowed, "refused": s.refused, "malformed": s.malformed,
            "overloaded": s.overloaded, "upstream_errors": s.upstream_errors,
            "upstream_timeouts": s.upstream_timeouts, "upstream_mismatched": s.upstream_mismatched,
            "judge_errors": s.judge_errors, "reply_errors": s.reply_errors, "event_errors": s.event_errors,
            "loops": s.loops,
            "inflight": s.inflight, "inflight_peak": s.inflight_peak, "max_inflight": self.max_inflight,
            "answers": {"learned": s.answers_learned, "errors": s.answer_errors, "delayed": s.answer_delayed},
            "tcp": {"active": s.tcp_active, "total": s.tcp_total, "refused": s.tcp_refused,
                    "max": self.limits.max_tcp_connections},
            "last": dict(sorted(dict(self._last).items())),  # a copy first: the loop thread writes it
        }

    def problems(self) -> list[str]:
        """For the owner's health: what keeps the proxy from doing its job."""
        out = []
        if self._bind_error:
            out.append(f"DNS proxy cannot listen on {self.listen[0]}:{self.listen[1]}: {self._bind_error}")
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        needed = self.max_inflight + 2 * self.limits.max_tcp_connections + 64
        if soft != resource.RLIM_INFINITY and soft < needed:
            out.append(f"DNS proxy: the open-file limit {soft} is below the {needed} descriptors "
                       f"max_inflight and max_tcp_connections may need: queries beyond it get SERVFAIL")
        return out

    # -- listeners (loop thread) --------------------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            udp, tcp = sockets.bind_listeners(self.listen[0], self.listen[1], transparent=self.transparent,
                                              rcvbuf=self.limits.udp_rcvbuf)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if why != self._bind_error:
                self._log(f"DNS proxy: cannot listen on {self.listen[0]}:{self.listen[1]}: {why} "
                          f"(retrying every second)")
            self._bind_error = why
            self._ready.set()
            loop.call_later(1.0, lambda: self._spawn(self._open()))
            return
        try:
            self._server = await asyncio.start_server(self._tcp_client, sock=tcp, backlog=1024,
                                                      limit=_MAX_MESSAGE + 2)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        loop.add_reader(udp.fileno(), self._on_udp_readable)
        self._udp = udp
        name = udp.getsockname()
        self._address = (str(name[0]), int(name[1]))
        self._bind_error = ""
        self._ready.set()

    def _close_listeners(self) -> None:
        if self._udp is not None and self._loop is not None:
            self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
        self._udp = None
        if self._server is not None:
            self._server.close()
        self._server = None
        self._address = None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- UDP (loop thread) ----------------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        sock = self._udp
        if sock is None:
            return
        size = self.limits.max_query_size
        for _ in range(self.limits.udp_batch):
            try:
                data, anc, flags, peer = sock.recvmsg(size + 1, sockets.CMSG_BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. a queued ICMP error; the socket itself is fine
                self._last["receive_error"] = exc.strerror or str(exc)
                continue
            src = (str(peer[0]), int(peer[1]))
            dst = sockets.orig_dst(anc) or self._address or self.listen
            if flags & socket.MSG_TRUNC:
                self._malformed(src, "udp", f"datagram over {size} bytes")
                continue
            try:
                q = parse_query(data, size)
            except Malformed as exc:
                self._malformed(src, "udp", str(exc))
                continue
            self.stats.queries += 1
            if self.stats.inflight >= self.max_inflight:
                self.stats.overloaded += 1
                self._udp_send(reject_answer(q, dns.rcode.SERVFAIL), peer, dst)
                continue
            self._admit()
            self._spawn(self._udp_query(q, peer, src, dst))

    async def _udp_query(self, q: Query, peer: Any, src: tuple[str, int], dst: tuple[str, int]) -> None:
        try:
            answer = await self._serve(q, src, dst, "udp", self._udp_exchange)
        finally:
            self.stats.inflight -= 1
        if answer is not None:
            self._udp_send(answer, peer, dst)

    def _udp_send(self, wire: bytes, peer: Any, dst: tuple[str, int]) -> None:
        sock = self._udp
        if sock is None:
            return
        try:
            # From the address the client asked: in transparent mode the resolver's.
            sock.sendmsg([wire], [sockets.source_cmsg(dst[0])], 0, peer)
        except OSError as exc:  # a full send buffer drops it, as the network might
            self.stats.reply_errors += 1
            self._last["reply_error"] = f"to {peer[0]}:{peer[1]} from {dst[0]}: {exc.strerror or exc}"

    async def _udp_exchange(self, q: Query, target: tuple[str, int]) -> tuple[bytes, dns.message.Message]:
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(sockets.family_of(target[0]), socket.SOCK_DGRAM)
        except OSError as exc:
            raise _UpstreamError(f"no socket towards {target[0]}:{target[1]}: {exc.strerror or exc}") from None
        own: tuple[str, int] | None = None
        try:
            sock.setblocking(False)
            sockets.set_mark(sock, self.mark)
            sock.connect(target)
            own = _endpoint(sock.getsockname())
            self._own.add(own)
            async with asyncio.timeout(self.timeout):
                await loop.sock_sendall(sock, q.wire)
                while True:
                    data = await loop.sock_recv(sock, _MAX_MESSAGE)
                    try:
                        return data, parse_response(data, q)
                    except Mismatch:
                        self.stats.upstream_mismatched += 1
        except TimeoutError:
            raise
        except Malformed as exc:
            raise _UpstreamError(f"{target[0]}:{target[1]}: {exc}") from None
        except OSError as exc:
            raise _UpstreamError(f"{target[0]}:{target[1]}: {exc.strerror or exc}") from None
        finally:
            if own is not None:
                self._own.discard(own)
            sock.close()

    # -- TCP (loop thread) ----------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # stop() cancels client connections too
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.stats.tcp_active >= self.limits.max_tcp_connections:
            self.stats.tcp_refused += 1
            writer.close()
            return
        self.stats.tcp_active += 1
        self.stats.tcp_total += 1
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        src, dst = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
        upstream = _TCPUpstream(self.upstream or dst, self.mark, self.timeout, self.stats, self._own)
        slots = asyncio.Semaphore(self.limits.max_tcp_pipeline)
        pending: set[asyncio.Task[None]] = set()
        drain = True  # answer what was asked before the client closed its side
        try:
            while True:
                await slots.acquire()
                q = await self._tcp_read_query(reader, src)
                if q is None:
                    drain = False
                    break
                self.stats.queries += 1
                if self.stats.inflight >= self.max_inflight:
                    self.stats.overloaded += 1
                    await self._tcp_send(writer, reject_answer(q, dns.rcode.SERVFAIL))
                    slots.release()
                    continue
                self._admit()
                t = self._spawn(self._tcp_query(q, src, dst, upstream, writer))
                pending.add(t)
                t.add_done_callback(pending.discard)
                t.add_done_callback(lambda _t: slots.release())
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass  # end of input, idle, or reset
        finally:
            try:
                if pending:
                    if drain:
                        await asyncio.wait(list(pending), timeout=self.timeout + 1.0)
                    for t in pending:
                        t.cancel()
            finally:
                upstream.close()
                self.stats.tcp_active -= 1
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _tcp_read_query(self, reader: asyncio.StreamReader, src: tuple[str, int]) -> Query | None:
        """The next query; None when the connection must close for a malformed one. Raises
        IncompleteReadError at a clean end of input, TimeoutError when idle."""
        try:
            head = await asyncio.wait_for(reader.readexactly(2), self.limits.tcp_idle_timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self._malformed(src, "tcp", "truncated length prefix")
                return None
            raise
        (size,) = _TCP_LENGTH.unpack(head)
        if size > self.limits.max_query_size or size < HEADER_SIZE:
            self._malformed(src, "tcp", f"a {size}-byte message")
            return None
        try:
            body = await asyncio.wait_for(reader.readexactly(size), self.timeout)
        except (asyncio.IncompleteReadError, TimeoutError):
            self._malformed(src, "tcp", f"truncated message (expected {size} bytes)")
            return None
        try:
            return parse_query(body, self.limits.max_query_size)
        except Malformed as exc:
            self._malformed(src, "tcp", str(exc))
            return None

    async def _tcp_query(self, q: Query, src: tuple[str, int], dst: tuple[str, int],
                         upstream: _TCPUpstream, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._serve(q, src, dst, "tcp", upstream.exchange)
        finally:
            self.stats.inflight -= 1
        if answer is not None:
            await self._tcp_send(writer, answer)

    async def _tcp_send(self, writer: asyncio.StreamWriter, wire: bytes) -> None:
        try:
            writer.write(_TCP_LENGTH.pack(len(wire)) + wire)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:  # a client that does not read
            self.stats.reply_errors += 1
            self._last["reply_error"] = f"tcp: {type(exc).__name__}: {exc}"
            writer.close()

    # -- one query ------------------------------------------------------------------------------

    async def _serve(self, q: Query, src: tuple[str, int], dst: tuple[str, int], transport: Transport,
                     exchange: Exchange) -> bytes | None:
        """The answer to send back, or None to send nothing (the upstream did not answer)."""
        start, wall = time.monotonic(), time.time()
        if src in self._own:
            self.stats.loops += 1
            self._last["loop"] = f"{transport} query for {q.qname} came back from the proxy's own {src[0]}:{src[1]}"
            return reject_answer(q, dns.rcode.SERVFAIL)

        def event(kind: Literal["request", "response"], **fields: Any) -> None:
            self._emit(DNSEvent(kind=kind, source=src, server=dst, qname=q.qname, qtype=q.qtype,
                                protocol=transport, time=wall, id=q.id,
                                latency=time.monotonic() - start, **fields))

        rcode: dns.rcode.Rcode
        if q.opcode != dns.opcode.QUERY:
            verdict = DNSVerdict(False, f"opcode {dns.opcode.to_text(q.opcode)} is not proxied")
            rcode = dns.rcode.NOTIMP
        else:
            verdict = await self._judge(src[0], dst[0], q.qname, q.qtype)
            rcode = self.reject_rcode
        if not verdict.allowed:
            self.stats.refused += 1
            event("request", verdict=verdict, rcode=dns.rcode.to_text(rcode))
            return reject_answer(q, rcode)
        self.stats.allowed += 1
        event("request", verdict=verdict)

        target = self.upstream or dst
        try:
            wire, msg = await exchange(q, target)
        except TimeoutError:
            self.stats.upstream_timeouts += 1
            event("response", verdict=verdict,
                  error=f"upstream {target[0]}:{target[1]} did not answer within {self.timeout}s")
            return None
        except _UpstreamError as exc:
            self.stats.upstream_errors += 1
            event("response", verdict=verdict, rcode="SERVFAIL", error=f"upstream: {exc}")
            return reject_answer(q, dns.rcode.SERVFAIL)

        answers, cnames = extract_answers(msg, q.name)
        if answers:
            problem = await self._learn(src[0], answers)
            if problem:
                event("response", verdict=verdict, rcode="SERVFAIL", cnames=cnames, error=problem)
                return reject_answer(q, dns.rcode.SERVFAIL)
        first = answers[0] if answers else None
        event("response", verdict=verdict, rcode=rcode_text(msg), cnames=cnames,
              ips=first.ips if first else (), ttl=first.ttl if first else 0)
        return wire

    async def _judge(self, src_ip: str, server_ip: str, qname: str, qtype: str) -> DNSVerdict:
        try:
            return await self._in_worker(self.timeout, self.judge, src_ip, server_ip, qname, qtype)
        except Exception as exc:  # noqa: BLE001 - fail closed on anything the owner's code does
            self.stats.judge_errors += 1
            why = "did not answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            self._last["judge_error"] = why
            return DNSVerdict(False, f"judge failed: {why}")

    async def _learn(self, src_ip: str, answers: tuple[DNSAnswer, ...]) -> str:
        """Hand the answers to on_answer; '' once it returned (or the max delay passed), else
        why the answer must not be released."""
        limit = self.timeout if self.response_max_delay is None else self.response_max_delay
        try:
            await self._in_worker(limit, self.on_answer, src_ip, list(answers))
        except TimeoutError:
            self.stats.answer_delayed += 1
            if self.response_max_delay is not None:
                return ""
            return f"on_answer did not return within {limit}s"
        except Exception as exc:  # noqa: BLE001 - see _judge
            self.stats.answer_errors += 1
            self._last["answer_error"] = f"{type(exc).__name__}: {exc}"
            return f"on_answer failed: {type(exc).__name__}: {exc}"
        self.stats.answers_learned += 1
        return ""

    async def _in_worker(self, limit: float, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, fn, *args)
        fut.add_done_callback(_retrieve)
        return await asyncio.wait_for(asyncio.shield(fut), limit)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _admit(self) -> None:
        s = self.stats
        s.inflight += 1
        s.inflight_peak = max(s.inflight_peak, s.inflight)

    def _malformed(self, src: tuple[str, int], transport: Transport, why: str) -> None:
        self.stats.malformed += 1
        self._last["malformed"] = f"{transport} from {src[0]}:{src[1]}: {why}"

    def _emit(self, ev: DNSEvent) -> None:
        try:
            self.on_event(ev)
        except Exception as exc:  # noqa: BLE001 - flows must never stop the proxy
            self.stats.event_errors += 1
            if "event_error" not in self._last:
                self._log(f"DNS proxy: on_event failed: {type(exc).__name__}: {exc}")
            self._last["event_error"] = f"{type(exc).__name__}: {exc}"


class _TCPUpstream:
    """The upstream connection of one client TCP connection: opened at the first allowed
    query, queries pipelined on it and their answers matched by id. Loop thread only."""

    def __init__(self, target: tuple[str, int], mark: int, timeout: float, stats: DNSStats,
                 own: set[tuple[str, int]]) -> None:
        self.target = target
        self.mark = mark
        self.timeout = timeout
        self.stats = stats
        self._own = own  # the proxy's set of its own upstream endpoints, kept current
        self._local: tuple[str, int] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: dict[int, tuple[Query, asyncio.Future[tuple[bytes, dns.message.Message]]]] = {}

    async def exchange(self, q: Query, target: tuple[str, int]) -> tuple[bytes, dns.message.Message]:
        if q.id in self._pending:
            raise _UpstreamError(f"query id {q.id} is already in flight on this connection")
        fut: asyncio.Future[tuple[bytes, dns.message.Message]] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._pending[q.id] = (q, fut)
        try:
            async with asyncio.timeout(self.timeout):
                writer = await self._connect()
                writer.write(_TCP_LENGTH.pack(len(q.wire)) + q.wire)
                await writer.drain()
                return await fut
        except TimeoutError:
            raise
        except OSError as exc:
            raise _UpstreamError(f"{self.target[0]}:{self.target[1]}: {exc.strerror or exc}") from None
        finally:
            self._pending.pop(q.id, None)

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            loop = asyncio.get_running_loop()
            sock = socket.socket(sockets.family_of(self.target[0]), socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sockets.set_mark(sock, self.mark)
                await loop.sock_connect(sock, self.target)
                reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_MESSAGE + 2)
            except BaseException:
                sock.close()
                raise
            self._forget()
            self._local = _endpoint(sock.getsockname())
            self._own.add(self._local)
            self._writer = writer
            self._reader_task = loop.create_task(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "the upstream closed the connection"
        try:
            while True:
                (size,) = _TCP_LENGTH.unpack(await reader.readexactly(2))
                data = await reader.readexactly(size)
                entry = self._pending.get(int.from_bytes(data[:2], "big")) if size >= 2 else None
                if entry is None or entry[1].done():
                    self.stats.upstream_mismatched += 1
                    continue
                q, fut = entry
                try:
                    fut.set_result((data, parse_response(data, q)))
                except (Mismatch, Malformed) as exc:
                    fut.set_exception(_UpstreamError(f"{self.target[0]}:{self.target[1]}: {exc}"))
        except asyncio.IncompleteReadError:
            pass
        except OSError as exc:
            why = f"the upstream connection failed: {exc.strerror or exc}"
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
                self._forget()
            for _q, fut in list(self._pending.values()):
                if not fut.done():
                    fut.set_exception(_UpstreamError(why))

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._forget()

    def _forget(self) -> None:
        if self._local is not None:
            self._own.discard(self._local)
            self._local = None
