"""The admin endpoint: the agent's state, in JSON, over HTTP on loopback or a unix socket.

    GET    /healthz                      liveness (no token needed)
    GET    /v1/status                    node, cluster, datapath, Envoy and xDS summary
    GET    /v1/policy                    policies in force + per endpoint the resolved map
    POST   /v1/policy                    {"objects": [...CNP/CCNP...]}: all or nothing
    DELETE /v1/policy/<Kind>/[<ns>/]<name>
    GET    /v1/endpoints                 pods known to the agent, with identities
    POST   /v1/endpoints                 {"objects": [...Pod/Namespace...]}
    DELETE /v1/endpoints/[<cluster>/]<ns>/<name>
    GET    /v1/identities, /v1/ipcache
    GET    /v1/auth                      mutual-auth entries: pair, node, expiry, last error;
                                         the mTLS tunnel (encryption in transit)
    GET    /v1/xds/status                per Envoy and type: sent/acked versions, NACKs, state
    GET    /v1/xds/config?node=ID&type=T the resources served, as JSON
    GET    /metrics                      Prometheus text format
    GET    /v1/flows?filter=&since=&last=&follow=1
                                         flows as NDJSON, chunked; follow streams (observe.api)

With a token configured, every path but /healthz needs `Authorization: Bearer <token>`.
Validation failures answer 422 with {"errors": [...]} and change nothing.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..policy.parse import POLICY_KINDS
from .core import AgentCore, ApplyError

MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdminHooks:
    status: Callable[[], dict[str, Any]]
    xds_status: Callable[[], Any]
    xds_config: Callable[[str | None, str | None], Any]
    metrics: Callable[[], tuple[bytes, str]]
    # GET /v1/flows: validates the query (ValueError → 400) and returns the NDJSON chunks.
    flows: Callable[[dict[str, str]], Iterator[bytes]] | None = None
    # GET /v1/auth: mutual-auth entries (None: mutual auth is not enabled on this agent).
    auth: Callable[[], list[dict[str, Any]]] | None = None
    # Part of GET /v1/auth: encryption in transit (None: off).
    tunnel: Callable[[], dict[str, Any]] | None = None


class _Handler(BaseHTTPRequestHandler):
    server_version = "l7gate-admin"
    protocol_version = "HTTP/1.1"
    app: AdminApp  # set on the subclass the server creates

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the agent logs what matters; per-request lines would drown it

    def address_string(self) -> str:
        return "unix" if isinstance(self.client_address, (str, bytes)) else str(self.client_address[0])

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        if isinstance(body, Iterator):
            self._stream(code, body, content_type)
            return
        data = body if isinstance(body, bytes) else (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, code: int, chunks: Iterator[bytes], content_type: str) -> None:
        """Chunked transfer, each chunk written as it is produced (GET /v1/flows?follow=1)."""
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _authorized(self) -> bool:
        token = self.app.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError(f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON at byte {exc.pos}: {exc.msg}") from None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if path != "/healthz" and not self._authorized():
            self._send(401, {"error": "missing or wrong bearer token"})
            return
        try:
            code, body, ctype = self.app.route(method, path, query, self._body if method == "POST" else None)
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
            return
        except ApplyError as exc:
            self._send(422, {"errors": exc.errors})
            return
        except Exception as exc:  # the admin API must answer, whatever broke
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._send(code, body, ctype)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class AdminApp:
    def __init__(self, core: AgentCore, hooks: AdminHooks, token: str | None = None) -> None:
        self.core = core
        self.hooks = hooks
        self.token = token

    def route(
        self, method: str, path: str, query: dict[str, str], body: Callable[[], Any] | None
    ) -> tuple[int, Any, str]:
        core = self.core
        j = "application/json"
        if method == "GET":
            if path == "/healthz":
                return 200, {"status": "ok"}, j
            if path == "/v1/status":
                return 200, self.hooks.status(), j
            if path == "/v1/policy":
                return 200, {"revision": core.resolver.revision, "policies": core.policies(),
                             "endpoints": core.endpoint_policies()}, j
            if path == "/v1/endpoints":
                return 200, {"endpoints": core.pods()}, j
            if path == "/v1/identities":
                return 200, {"identities": core.identities()}, j
            if path == "/v1/ipcache":
                return 200, {"entries": core.ipcache_entries()}, j
            if path == "/v1/auth":
                if self.hooks.auth is None:
                    return 200, {"enabled": False, "entries": [], "tunnel": None}, j
                tunnel = self.hooks.tunnel() if self.hooks.tunnel is not None else None
                return 200, {"enabled": True, "entries": self.hooks.auth(), "tunnel": tunnel}, j
            if path == "/v1/xds/status":
                return 200, self.hooks.xds_status(), j
            if path == "/v1/xds/config":
                return 200, self.hooks.xds_config(query.get("node"), query.get("type")), j
            if path == "/metrics":
                data, ctype = self.hooks.metrics()
                return 200, data, ctype
            if path == "/v1/flows" and self.hooks.flows is not None:
                return 200, self.hooks.flows(query), "application/x-ndjson"
        if method == "POST" and body is not None and path in ("/v1/policy", "/v1/endpoints"):
            payload = body()
            objects = payload.get("objects") if isinstance(payload, dict) else None
            if not isinstance(objects, list) or not objects:
                raise ValueError('expected {"objects": [...]} with at least one object')
            allowed = POLICY_KINDS if path == "/v1/policy" else ("Pod", "Namespace")
            wrong = [
                f"object {i + 1}: kind {o.get('kind') if isinstance(o, dict) else None!r} does not belong "
                f"here (expected {', '.join(allowed)})"
                for i, o in enumerate(objects)
                if not isinstance(o, dict) or o.get("kind") not in allowed
            ]
            if wrong:
                raise ApplyError(wrong)
            return 200, core.apply(objects).to_json(), j
        if method == "DELETE" and path.startswith("/v1/policy/"):
            key = path[len("/v1/policy/") :]
            if core.delete_policy(key):
                return 200, {"deleted": [key]}, j
            return 404, {"error": f"no policy {key!r}"}, j
        if method == "DELETE" and path.startswith("/v1/endpoints/"):
            ref = path[len("/v1/endpoints/") :]
            if core.delete_pod(ref):
                return 200, {"deleted": [ref]}, j
            return 404, {"error": f"no pod {ref!r}"}, j
        return 404, {"error": f"no such endpoint: {method} {path}"}, j


class AdminServer:
    """Serves an AdminApp on `listen` (HOST:PORT or unix:/path) from a background thread."""

    def __init__(self, app: AdminApp, listen: str) -> None:
        handler = type("Handler", (_Handler,), {"app": app})
        self.listen = listen
        self._server: socketserver.BaseServer
        if listen.startswith("unix:"):
            path = listen[5:]
            if os.path.exists(path):
                # A stale socket from a previous run; refuse if something still answers on it.
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                    probe.close()
                    raise OSError(f"admin socket {path} is in use by another process")
                except ConnectionRefusedError:
                    os.unlink(path)
                finally:
                    probe.close()
            self._server = _UnixServer(path, handler)
            os.chmod(path, 0o600)
            self.address = listen
        else:
            host, _, port = listen.rpartition(":")
            srv = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
            srv.daemon_threads = True
            self._server = srv
            self.address = f"{host}:{srv.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="l7gate-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.listen.startswith("unix:"):
            try:
                os.unlink(self.listen[5:])
            except FileNotFoundError:
                pass
