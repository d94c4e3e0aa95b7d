"""The admin endpoint: the agent's state, in JSON, over HTTP on a unix socket (or TCP).

    GET    /healthz                      health: 200 when what is enforced is what the agent
                                         wants (Envoy live, connected, synced, listeners up),
                                         503 with the problems otherwise (no token needed)
    GET    /v1/status                    node, cluster, datapath, Envoy and xDS summary, health
    GET    /v1/policy                    policies (and CIDR groups) in force + per endpoint the resolved map
    POST   /v1/policy                    {"objects": [...CNP/CCNP/NetworkPolicy/CiliumCIDRGroup...]}:
                                         all or nothing
    DELETE /v1/policy/<Kind>/[<ns>/]<name> (CiliumCIDRGroup/<name> too)
    GET    /v1/endpoints                 pods known to the agent, with identities
    POST   /v1/endpoints                 {"objects": [...Pod/Namespace/Service/EndpointSlice/Node...]}
    DELETE /v1/endpoints/[<cluster>/]<ns>/<name>
    GET    /v1/nodes                     Nodes: labels, addresses, the identity of their addresses
    DELETE /v1/nodes/[<cluster>/]<name>
    GET    /v1/services                  Services: frontends, backends, whether the datapath serves them
    DELETE /v1/services/[<cluster>/]<ns>/<name>
    DELETE /v1/endpointslices/[<cluster>/]<ns>/<name>
    GET    /v1/identities, /v1/ipcache
    GET    /v1/fqdn/cache                what the DNS proxy learned: name, address, TTL left,
                                         who looked it up, the address's identity (toFQDNs)
    GET    /v1/auth                      mutual-auth entries: pair, node, expiry, last error;
                                         the mTLS tunnel (encryption in transit)
    GET    /v1/clustermesh               the remote clusters: ready, connected, counts, errors
    GET    /v1/xds/status                per Envoy and type: sent/acked versions, NACKs, state
    GET    /v1/xds/config?node=ID&type=T the resources served, as JSON
    GET    /metrics                      Prometheus text format
    GET    /v1/flows?filter=&since=&last=&follow=1
                                         flows as NDJSON, chunked; follow streams (observe.api)

Who may call it (docs/security.md). The default listener is a unix socket that only the agent's
user (root) may open, as Cilium's agent API is; `admin.group` lets one group in. Over TCP, which
must be configured, every path but /healthz needs `Authorization: Bearer <token>`, the token
being at least 32 random bytes read from a file only the agent's user can read
(`load_token_file`). On every listener, requests that a web page could make are refused: any
`Origin` (or `Sec-Fetch-*`) header, a write whose Content-Type is not application/json, and, on
TCP, a Host that is not an IP literal or localhost with the listener's port (DNS rebinding).
Validation failures answer 422 with {"errors": [...]} and change nothing. The transport is
`httpd.BoundedHTTPServer`: a bounded number of connections, timeouts, no thread per client.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..k8s.objects import ENDPOINT_KINDS
from ..policy.parse import POLICY_INPUT_KINDS
from . import views
from .core import AgentCore, ApplyError
from .httpd import BoundedHTTPServer, Limits, Request, Response

MIN_TOKEN_CHARS = 32
MIN_TOKEN_BITS = 128  # estimated from the token's own characters (`token_weakness`)
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class TokenError(Exception):
    """The admin token file cannot be used; the message says why and what to do."""


def token_weakness(token: str) -> str | None:
    """Why `token` is too weak to guard the admin API, or None. The estimate is the length of
    the token's repeating unit (the whole token, unless it repeats) times the Shannon entropy of
    that unit's characters: a random token of 32 bytes, hex or base64, estimates at 200-256
    bits; a repeated or short one far below the bar."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"it has {len(token)} characters; at least {MIN_TOKEN_CHARS} are needed"
    if any(c.isspace() or not c.isprintable() for c in token):
        return "it contains whitespace or unprintable characters"
    # A repeated pattern carries only its first period's information.
    period = next(p for p in range(1, len(token) + 1) if token == (token[:p] * (len(token) // p + 1))[:len(token)])
    unit = token[:period]
    counts = Counter(unit)
    bits = -sum(n * math.log2(n / len(unit)) for n in counts.values())
    if bits < MIN_TOKEN_BITS:
        return f"it is too predictable (about {bits:.0f} bits of entropy, at least {MIN_TOKEN_BITS} are needed)"
    return None


def load_token_file(path: Path, *, create: bool) -> str:
    """The admin token in `path`. With `create`, a missing file is made with 32 random bytes
    (URL-safe base64), mode 0600. Refused (TokenError): a file other users can read or that
    another user owns, a symlink, and a weak token."""
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise TokenError(f"admin token file {path} does not exist") from None
    except OSError as exc:
        raise TokenError(f"admin token file {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TokenError(f"admin token file {path} is not a regular file")
    with os.fdopen(fd) as fh:
        if st.st_uid != os.geteuid():
            raise TokenError(f"admin token file {path} is owned by uid {st.st_uid}, not by the agent's user ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise TokenError(
                f"admin token file {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users can read it "
                f"(chmod 600 {path})")
        token = fh.read(4096).strip()
    weak = token_weakness(token)
    if weak is not None:
        raise TokenError(
            f"admin token in {path} is refused: {weak}. Remove the file to let the agent generate one, "
            "or write 32 random bytes (e.g. `openssl rand -hex 32`)")
    return token


def _host_ok(host: str, port: int) -> bool:
    """A Host header a browser at a DNS name cannot send: an IP literal or localhost, with the
    listener's port."""
    name, sep, p = host.rpartition(":")
    if not sep or p != str(port):
        return False
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return True


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
    # GET /healthz: what is wrong with enforcement now, in words (empty: healthy).
    health: Callable[[], list[str]] | None = None
    # GET /v1/clustermesh: the remote clusters (None: not in a cluster mesh).
    clustermesh: Callable[[], dict[str, Any]] | None = None
    # Part of GET /v1/fqdn/cache: the DNS proxy's counters (None: no DNS proxy on this node).
    dns: Callable[[], dict[str, Any]] | None = None


class AdminApp:
    """The admin API's routes and who may call them (module doc). Thread-safe: called from the
    server's worker threads."""

    def __init__(self, core: AgentCore, hooks: AdminHooks, token: str | None = None) -> None:
        self.core = core
        self.hooks = hooks
        self.token = token

    def handle(self, req: Request) -> Response:
        refused = self._refusal(req)
        if refused is not None:
            return refused
        url = urlsplit(req.target)
        path = unquote(url.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}

        def body() -> Any:
            try:
                return json.loads(req.body or b"{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON at byte {exc.pos}: {exc.msg}") from None
            except UnicodeDecodeError as exc:
                raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None

        try:
            code, result, ctype = self.route(req.method, path, query, body if req.method == "POST" else None)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        except ApplyError as exc:
            return _json(422, {"errors": exc.errors})
        except Exception as exc:  # noqa: BLE001 - the admin API must answer, whatever broke
            return _json(500, {"error": f"{type(exc).__name__}: {exc}"})
        if isinstance(result, (Iterator, bytes)):
            return Response(code, result, ctype)
        return _json(code, result, ctype)

    def _refusal(self, req: Request) -> Response | None:
        h = req.headers
        if "origin" in h or any(k.startswith("sec-fetch-") for k in h):
            return _json(403, {"error": "requests from web pages are refused (the request has an Origin or "
                                        "Sec-Fetch header); use the l7gate CLI or curl"})
        port = req.listener_port
        if port is not None and not _host_ok(h.get("host", ""), port):
            return _json(403, {"error": f"Host {h.get('host', '')!r} is not this listener: use an IP address "
                                        f"or localhost with port {port}"})
        path = urlsplit(req.target).path
        if self.token is not None and path.rstrip("/") != "/healthz":
            got = h.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                return Response(401, _dump({"error": "missing or wrong bearer token"}),
                                headers=(("WWW-Authenticate", "Bearer"),))
        if req.method in _WRITE_METHODS and (req.body or req.method != "DELETE"):
            ctype = h.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _json(415, {"error": f"Content-Type must be application/json, got {ctype or 'none'!r}"})
        return None

    def route(
        self, method: str, path: str, query: dict[str, str], body: Callable[[], Any] | None
    ) -> tuple[int, Any, str]:
        core = self.core
        j = "application/json"
        if method == "GET":
            if path == "/healthz":
                problems = self.hooks.health() if self.hooks.health is not None else []
                if problems:
                    return 503, {"status": "unhealthy", "problems": problems}, j
                return 200, {"status": "ok"}, j
            if path == "/v1/status":
                return 200, self.hooks.status(), j
            if path == "/v1/policy":
                view = core.view()  # one state for all three, and no wait for an apply under way
                return 200, {"revision": view.policy_revision, "policies": views.policies(view),
                             "endpoints": views.endpoint_policies(view)}, j
            if path == "/v1/endpoints":
                return 200, {"endpoints": views.pods(core.view())}, j
            if path == "/v1/services":
                return 200, views.services(core.view(), core), j
            if path == "/v1/nodes":
                return 200, {"nodes": views.nodes(core.view())}, j
            if path == "/v1/identities":
                return 200, {"identities": views.identities(core.view())}, j
            if path == "/v1/ipcache":
                return 200, {"entries": views.ipcache_entries(core.ipcache)}, j
            if path == "/v1/fqdn/cache":
                return 200, {"entries": core.fqdn_rows(), "dns_proxy": self.hooks.dns() if self.hooks.dns else None}, j
            if path == "/v1/auth":
                if self.hooks.auth is None:
                    return 200, {"enabled": False, "entries": [], "tunnel": None}, j
                tunnel = self.hooks.tunnel() if self.hooks.tunnel is not None else None
                return 200, {"enabled": True, "entries": self.hooks.auth(), "tunnel": tunnel}, j
            if path == "/v1/clustermesh":
                if self.hooks.clustermesh is None:
                    return 200, {"enabled": False, "remotes": []}, j
                return 200, self.hooks.clustermesh(), j
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
            allowed = POLICY_INPUT_KINDS if path == "/v1/policy" else ENDPOINT_KINDS
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
        if method == "DELETE" and path.startswith("/v1/services/"):
            key = path[len("/v1/services/") :]
            if core.delete_service(key):
                return 200, {"deleted": [key]}, j
            return 404, {"error": f"no Service {key!r}"}, j
        if method == "DELETE" and path.startswith("/v1/endpointslices/"):
            key = path[len("/v1/endpointslices/") :]
            if core.delete_endpoint_slice(key):
                return 200, {"deleted": [key]}, j
            return 404, {"error": f"no EndpointSlice {key!r}"}, j
        if method == "DELETE" and path.startswith("/v1/nodes/"):
            key = path[len("/v1/nodes/") :]
            if core.delete_node(key):
                return 200, {"deleted": [key]}, j
            return 404, {"error": f"no Node {key!r}"}, j
        if method == "DELETE" and path.startswith("/v1/endpoints/"):
            ref = path[len("/v1/endpoints/") :]
            if core.delete_pod(ref):
                return 200, {"deleted": [ref]}, j
            return 404, {"error": f"no pod {ref!r}"}, j
        return 404, {"error": f"no such endpoint: {method} {path}"}, j


def _dump(body: Any) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def _json(code: int, body: Any, ctype: str = "application/json") -> Response:
    return Response(code, _dump(body), ctype)


class AdminServer:
    """Serves an AdminApp on `listen` (unix:/path or HOST:PORT) from a background thread, with
    the bounds of `httpd` (module doc there). `group`: a unix socket's group (mode 0660), else
    the socket is 0600."""

    def __init__(self, app: AdminApp, listen: str, *, group: str | None = None,
                 limits: Limits = Limits()) -> None:
        self.listen = listen
        self.app = app
        self._server = BoundedHTTPServer(listen, app.handle, limits,
                                         unix_mode=0o660 if group else 0o600, unix_group=group)
        self.address = self._server.address

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def stats(self) -> dict[str, int]:
        return dataclasses.asdict(self._server.stats())
