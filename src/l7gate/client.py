"""The client side of the admin API (used by the CLI and the tests)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import quote

from l7gate.localhttp import http_connection

# A decoded JSON document of the admin API (agent/views.py builds each route's). Kept
# as Any: callers index it as documented, and a wrong key fails loudly at run time.
JSON = Any


class AdminError(Exception):
    def __init__(self, status: int, body: JSON) -> None:
        self.status = status
        self.body = body
        if isinstance(body, dict) and "errors" in body:
            text = "\n".join(str(e) for e in body["errors"])
        elif isinstance(body, dict) and "error" in body:
            text = str(body["error"])
        else:
            text = str(body)
        super().__init__(text)


def check_address(address: str) -> str | None:
    """Why `address` is not an admin endpoint address (unix:/path or HOST:PORT), or None."""
    if address.startswith("unix:"):
        return None if len(address) > 5 else "unix: needs a socket path, e.g. unix:/run/l7gate/admin.sock"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{address!r} is not unix:/path or HOST:PORT (e.g. unix:/run/l7gate/admin.sock, 127.0.0.1:9876)"
    return None


def read_token_file(path: str) -> str:
    """The token in `path` (the agent's admin.tokenFile); OSError names the file."""
    with open(path, encoding="utf-8") as fh:
        return fh.read(4096).strip()


class AdminClient:
    """One admin API client (the CLI's, the tests'). Raises ValueError at construction for an
    address that is neither unix:/path nor HOST:PORT."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0) -> None:
        problem = check_address(address)
        if problem is not None:
            raise ValueError(problem)
        self.address = address
        self.token = token
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        return http_connection(self.address, self.timeout)

    def open_stream(self, path: str) -> http.client.HTTPResponse:
        """GET `path` and return the response, its body still to read line by line."""
        conn = self._conn()
        headers = {"Accept": "application/x-ndjson"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            try:
                body: JSON = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            raise AdminError(resp.status, body)
        return resp

    def request(self, method: str, path: str, body: JSON = None) -> JSON:
        conn = self._conn()
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        parsed: JSON = json.loads(raw) if "json" in ctype and raw else raw.decode("utf-8", "replace")
        if resp.status >= 400:
            raise AdminError(resp.status, parsed)
        return parsed

    def get(self, path: str) -> JSON:
        return self.request("GET", path)

    def apply_policies(self, objects: list[JSON]) -> JSON:
        return self.request("POST", "/v1/policy", {"objects": objects})

    def delete_policy(self, key: str) -> JSON:
        return self.request("DELETE", "/v1/policy/" + quote(key))

    def apply_endpoints(self, objects: list[JSON]) -> JSON:
        return self.request("POST", "/v1/endpoints", {"objects": objects})

    def delete_service(self, ref: str) -> JSON:
        return self.request("DELETE", "/v1/services/" + quote(ref))

    def delete_endpoint(self, ref: str) -> JSON:
        return self.request("DELETE", "/v1/endpoints/" + quote(ref))

    def delete_endpoint_slice(self, ref: str) -> JSON:
        return self.request("DELETE", "/v1/endpointslices/" + quote(ref))

    def delete_node(self, ref: str) -> JSON:
        return self.request("DELETE", "/v1/nodes/" + quote(ref))
