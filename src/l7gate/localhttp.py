"""HTTP to the local endpoints l7gate talks to: the agent's admin API (the CLI, the tests) and
Envoy's admin (the supervisor). Both live at `unix:/path` or `HOST:PORT` (`[V6]:PORT`). Below
every package that uses them; no state."""

from __future__ import annotations

import http.client
import socket


def host_port(address: str) -> tuple[str, int]:
    """(host, port) of a `HOST:PORT` or `[V6]:PORT` address the caller has checked."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection over a unix stream socket at `path`."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def http_connection(address: str, timeout: float) -> http.client.HTTPConnection:
    """A connection (not yet connected) to `unix:/path` or `HOST:PORT`."""
    if address.startswith("unix:"):
        return UnixHTTPConnection(address[5:], timeout)
    host, port = host_port(address)
    return http.client.HTTPConnection(host, port, timeout=timeout)
