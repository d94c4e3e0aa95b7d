"""A bounded HTTP/1.1 server for the admin API: no local user can exhaust the agent through it.

Theory of operation
-------------------
One asyncio event loop, on its own thread, owns every connection; blocking work (the handler,
which takes the core's lock) runs on a small fixed pool of worker threads. So an idle or slow
connection costs a few kilobytes and one descriptor, never a thread, and the number of threads
does not grow with the number of clients. What bounds each resource:

- **connections**: at most `Limits.max_connections` at a time. A new connection beyond that
  closes the connection that has waited longest for its request to arrive (a slowloris holds
  connections without finishing a request; a real client sends its request at once), or — when
  every connection is inside a request — the new one. The limit is kept well below the agent's
  descriptor limit (`descriptor_budget`), so the agent can always open what it needs itself:
  Envoy's restart, the kvstore, BPF maps.
- **time**: the request line and headers must arrive within `header_timeout` of the first byte
  being awaited, the body within `body_timeout`, an idle keep-alive connection is closed after
  `idle_timeout`, and a response that the client does not read within `write_timeout` ends the
  connection. Each is a total, not a per-byte deadline, so trickling bytes does not extend it.
- **memory**: headers up to `max_header_bytes` (else 431), bodies up to `max_body` (else 413),
  no chunked request bodies (501: the admin clients send Content-Length).
- **workers**: `workers` threads answer requests; a streamed response (`Response.body` an
  iterator, e.g. `observe --follow`) has a thread of its own for as long as it lasts, and at
  most `max_streams` of them exist (beyond that, 503).
- **the listen backlog**: `backlog` (1024), so a burst of clients is queued by the kernel
  instead of being refused and retried.

The handler is a plain function `Request -> Response`: what a request may do (tokens, Origin,
Host) is the caller's policy, not this module's. This module only enforces HTTP framing and the
bounds above.

Thread safety: `start` and `stop` may be called from any thread, once each. The handler is
called from the worker threads, concurrently.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import resource
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from l7gate.localhttp import host_port


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    write_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_body: int = 16 * 1024 * 1024
    workers: int = 8
    max_streams: int = 64
    backlog: int = 1024

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.workers < 1 or self.max_streams < 0 or self.backlog < 1:
            raise ValueError("connection, worker and backlog limits must be positive")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str  # "unix" or the client's address
    listener_port: int | None = None  # the TCP port it arrived on; None on a unix socket


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes | Iterator[bytes]  # an iterator is streamed with chunked transfer encoding
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ServerStats:
    connections: int
    max_connections: int
    evicted: int  # connections closed to make room for a new one
    refused: int  # new connections closed because every slot was inside a request
    timed_out: int
    streams: int


Handler = Callable[[Request], Response]

# Descriptors the agent keeps for itself whatever the admin API does: Envoy's restart (log,
# pipes), the kvstore, the xDS and access-log streams, BPF maps and perf buffers.
DESCRIPTOR_RESERVE = 1024


def descriptor_budget(wanted: int, reserve: int = DESCRIPTOR_RESERVE) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, and return (connections the
    admin API may hold, the descriptor limit): `wanted`, or fewer if the limit leaves less than
    `reserve` descriptors for the rest of the agent (never fewer than 16)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(16, min(wanted, soft - reserve)), soft


class _Conn:
    __slots__ = ("transport", "waiting_since", "busy")

    def __init__(self, transport: asyncio.WriteTransport, now: float) -> None:
        self.transport = transport
        self.waiting_since = now  # when it started waiting for a request (idle or partial)
        self.busy = False  # inside a request: being answered or streamed


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, target, version, headers) of a request head (without the final CRLF CRLF).
    Raises _BadRequest naming what is wrong. Strict: obs-fold, whitespace before the colon,
    duplicate Content-Length/Host and non-ASCII are refused."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _BadRequest(400, f"non-ASCII byte in the request head at byte {exc.start}") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS or not parts[1]:
        raise _BadRequest(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, f"unsupported version {version[:16]!r}")
    headers: dict[str, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line or line[0] in " \t":
            raise _BadRequest(400, f"line {n} of the request head: obsolete line folding or empty line")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise _BadRequest(400, f"line {n} of the request head: malformed header {line[:40]!r}")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in ("content-length", "host", "authorization", "content-type", "origin"):
                raise _BadRequest(400, f"duplicate {name} header")
            headers[key] += ", " + value
        else:
            headers[key] = value
    return method, target, version, headers


def _status_line(code: int) -> bytes:
    try:
        reason = HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {code} {reason}\r\n".encode()


class BoundedHTTPServer:
    """Serves `handler` on `listen` (HOST:PORT or unix:/path); see the module docstring.

    A unix socket is created with `unix_mode` (default 0600) and, if `unix_group` is given, that
    group; a stale socket file left by a dead process is replaced, one that still answers is not.
    """

    def __init__(self, listen: str, handler: Handler, limits: Limits = Limits(), *,
                 unix_mode: int = 0o600, unix_group: str | None = None, name: str = "l7gate-admin") -> None:
        self.listen = listen
        self.limits = limits
        self._handler = handler
        self._name = name
        self._unix_mode = unix_mode
        self._unix_group = unix_group
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix=f"{name}-worker")
        self._conns: dict[_Conn, None] = {}  # insertion-ordered: oldest first
        self._streams = 0
        self._evicted = self._refused = self._timed_out = 0
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._sock = self._bind()
        if listen.startswith("unix:"):
            self.address = listen
        else:
            host = listen.rpartition(":")[0]
            self.address = f"{host}:{self._sock.getsockname()[1]}"

    # -- listening socket ------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        if not self.listen.startswith("unix:"):
            host, port = host_port(self.listen)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(self.limits.backlog)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            return sock
        path = self.listen[5:]
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(f"admin socket {path} is in use by another process")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                probe.close()
        gid = -1
        if self._unix_group is not None:
            try:
                gid = grp.getgrnam(self._unix_group).gr_gid
            except KeyError:
                raise OSError(f"admin.group {self._unix_group!r}: no such group") from None
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket file is created by bind() with the umask's mode: no one else may connect in
        # the moment before the chmod below.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, self._unix_mode)
        sock.listen(self.limits.backlog)
        sock.setblocking(False)
        return sock

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def serve() -> None:
                if self.listen.startswith("unix:"):
                    self._server = await asyncio.start_unix_server(
                        self._connection, sock=self._sock, limit=self.limits.max_header_bytes)
                else:
                    self._server = await asyncio.start_server(
                        self._connection, sock=self._sock, limit=self.limits.max_header_bytes)
                ready.set()

            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._thread is None:
            self._sock.close()
            self._pool.shutdown(wait=False)
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.transport.abort()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        except Exception:  # noqa: BLE001 - stopping must go on
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not self._loop.is_running():
            self._loop.close()
        if self.listen.startswith("unix:"):
            try:
                os.unlink(self.listen[5:])
            except FileNotFoundError:
                pass

    def stats(self) -> ServerStats:
        return ServerStats(len(self._conns), self.limits.max_connections, self._evicted, self._refused,
                           self._timed_out, self._streams)

    # -- connections -----------------------------------------------------------------------------

    def _admit(self, conn: _Conn) -> bool:
        """Make room for `conn` (module doc); False if it must be closed instead."""
        if len(self._conns) < self.limits.max_connections:
            self._conns[conn] = None
            return True
        victim = min((c for c in self._conns if not c.busy), key=lambda c: c.waiting_since, default=None)
        if victim is None:
            self._refused += 1
            return False
        self._evicted += 1
        victim.transport.abort()
        del self._conns[victim]
        self._conns[conn] = None
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        transport = writer.transport
        assert isinstance(transport, asyncio.WriteTransport)
        conn = _Conn(transport, loop.time())
        if not self._admit(conn):
            writer.transport.abort()
            return
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) else "unix"
        sockname = writer.get_extra_info("sockname")
        listener_port = int(sockname[1]) if isinstance(sockname, tuple) else None
        limits = self.limits
        try:
            first = True
            while True:
                conn.busy = False
                conn.waiting_since = loop.time()
                wait = limits.header_timeout if first else limits.idle_timeout
                first = False
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
                except asyncio.LimitOverrunError:
                    await self._error(writer, 431, f"request head over {limits.max_header_bytes} bytes")
                    return
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._error(writer, 400, "connection closed inside the request head")
                    return
                except TimeoutError:
                    self._timed_out += 1  # closed without an answer, as nginx does
                    return
                except (ConnectionError, ValueError):
                    # ValueError: the StreamReader's own limit message for an over-long separator search
                    await self._error(writer, 431, f"request head over {limits.max_header_bytes} bytes")
                    return
                conn.busy = True
                try:
                    method, target, version, headers = parse_head(head[:-4])
                    if "transfer-encoding" in headers:
                        raise _BadRequest(501, "Transfer-Encoding in requests is not supported: send Content-Length")
                    raw_length = headers.get("content-length", "0")
                    if not raw_length.isdigit():
                        raise _BadRequest(400, f"invalid Content-Length {raw_length[:20]!r}")
                    length = int(raw_length)
                    if length > limits.max_body:
                        raise _BadRequest(413, f"request body over {limits.max_body} bytes")
                except _BadRequest as exc:
                    await self._error(writer, exc.status, str(exc))
                    return
                body = b""
                if length:
                    try:
                        body = await asyncio.wait_for(reader.readexactly(length), limits.body_timeout)
                    except TimeoutError:
                        self._timed_out += 1
                        await self._error(writer, 408, f"request body not complete within {limits.body_timeout:g} s")
                        return
                    except (asyncio.IncompleteReadError, ConnectionError):
                        return
                keep_alive = (headers.get("connection", "").lower() != "close") if version == "HTTP/1.1" \
                    else (headers.get("connection", "").lower() == "keep-alive")
                request = Request(method, target, headers, body, peer, listener_port)
                try:
                    response = await loop.run_in_executor(self._pool, self._handler, request)
                except Exception as exc:  # noqa: BLE001 - the server must answer whatever broke
                    response = Response(500, _json_error(f"{type(exc).__name__}: {exc}"))
                if isinstance(response.body, (bytes, bytearray)):
                    await self._write(writer, response, bytes(response.body), keep_alive)
                    if not keep_alive:
                        return
                    continue
                await self._stream(writer, response)
                return
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._conns.pop(conn, None)
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close after what was written has left (a response may still be buffered), within
        `write_timeout`; abort otherwise."""
        if writer.transport.is_closing():
            writer.transport.abort()
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self.limits.write_timeout)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _write(self, writer: asyncio.StreamWriter, response: Response, data: bytes, keep_alive: bool) -> None:
        head = [_status_line(response.status),
                f"Content-Type: {response.content_type}\r\nContent-Length: {len(data)}\r\n".encode()]
        head += [f"{k}: {v}\r\n".encode() for k, v in response.headers]
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        writer.write(b"".join(head) + b"\r\n" + data)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout)

    async def _error(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        try:
            await self._write(writer, Response(status, b""), _json_error(message), keep_alive=False)
        except (ConnectionError, TimeoutError):
            pass

    async def _stream(self, writer: asyncio.StreamWriter, response: Response) -> None:
        """Chunked transfer of an iterator, pulled on a thread of its own (it may block waiting
        for flows) and written here with back-pressure."""
        chunks = response.body
        assert isinstance(chunks, Iterator)
        if self._streams >= self.limits.max_streams:
            _close_iterator(chunks)
            await self._error(writer, 503, f"too many streams open ({self.limits.max_streams}); try again later")
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
        gone = threading.Event()

        def pump() -> None:
            try:
                for chunk in chunks:
                    if not chunk:
                        continue
                    while not gone.is_set():
                        try:
                            asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result(1.0)
                            break
                        except TimeoutError:
                            continue
                    if gone.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - end the stream; the client sees it cut short
                _ = exc
            finally:
                _close_iterator(chunks)
                if not gone.is_set():
                    try:
                        asyncio.run_coroutine_threadsafe(queue.put(None), loop).result(5.0)
                    except Exception:  # noqa: BLE001 - the loop is stopping
                        pass

        head = [_status_line(response.status),
                f"Content-Type: {response.content_type}\r\nTransfer-Encoding: chunked\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n".encode()]
        head += [f"{k}: {v}\r\n".encode() for k, v in response.headers]
        writer.write(b"".join(head) + b"\r\n")
        self._streams += 1
        thread = threading.Thread(target=pump, name=f"{self._name}-stream", daemon=True)
        thread.start()
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    writer.write(b"0\r\n\r\n")
                    await asyncio.wait_for(writer.drain(), self.limits.write_timeout)
                    return
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await asyncio.wait_for(writer.drain(), self.limits.write_timeout)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            gone.set()
            self._streams -= 1


def _close_iterator(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - already ending
            pass


def _json_error(message: str) -> bytes:
    return (json.dumps({"error": message}, indent=2) + "\n").encode()
