#!/usr/bin/env python3
"""A stand-in for a pod's application in loopback mode: an HTTP server on one address.

Answers every request with 200 and a JSON body naming the pod, the method and the path it
received, so a test can tell that a request really reached the upstream. Stdlib only; runs
until SIGTERM/SIGINT.

    pod_server.py --listen 127.0.1.10:18080 --name payments/billing-service-xyz
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, metavar="IP:PORT")
    ap.add_argument("--name", required=True, help="pod name reported in responses")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    name = args.name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are two writes: with Nagle on, the body waits for the peer's
        # delayed ACK (40 ms per response).
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            data = json.dumps(
                {"pod": name, "method": self.command, "path": self.path,
                 "host": self.headers.get("Host"), "body_bytes": len(body),
                 "peer": self.client_address[0]}
            ).encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

        def log_message(self, format: str, *a: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def server_bind(self) -> None:
            # HTTPServer.server_bind looks up the host's FQDN (a DNS query); a pod in a test
            # namespace must send nothing but the test's own traffic.
            TCPServer.server_bind(self)
            self.server_name, self.server_port = host, int(port)

    server = Server((host, int(port)), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"pod {name} serving on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
