"""The client side of the admin API (used by the CLI and the tests)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote


class AdminError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        if isinstance(body, dict) and "errors" in body:
            text = "\n".join(str(e) for e in body["errors"])
        elif isinstance(body, dict) and "error" in body:
            text = str(body["error"])
        else:
            text = str(body)
        super().__init__(text)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class AdminClient:
    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        if self.address.startswith("unix:"):
            return _UnixConnection(self.address[5:], self.timeout)
        host, _, port = self.address.rpartition(":")
        return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
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
        parsed: Any = json.loads(raw) if "json" in ctype and raw else raw.decode("utf-8", "replace")
        if resp.status >= 400:
            raise AdminError(resp.status, parsed)
        return parsed

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def apply_policies(self, objects: list[Any]) -> Any:
        return self.request("POST", "/v1/policy", {"objects": objects})

    def delete_policy(self, key: str) -> Any:
        return self.request("DELETE", "/v1/policy/" + quote(key))

    def apply_endpoints(self, objects: list[Any]) -> Any:
        return self.request("POST", "/v1/endpoints", {"objects": objects})

    def delete_endpoint(self, ref: str) -> Any:
        return self.request("DELETE", "/v1/endpoints/" + quote(ref))
