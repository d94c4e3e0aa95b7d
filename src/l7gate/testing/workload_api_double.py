"""`WorkloadAPITestDouble`: a stand-in SPIRE agent, for tests only.

This is a TEST DOUBLE, not SPIRE: no SPIRE server or agent can run in this project's test
environment, so the `SpireSource` path is tested against this instead. What it shares with a
real SPIRE agent is the wire protocol, so the client code under test is the real one:

- gRPC over a unix socket, service ``SpiffeWorkloadAPI``, method ``FetchX509SVID``
  (server-streaming), with the messages of SPIFFE's ``workload.proto`` (``X509SVIDRequest``,
  ``X509SVIDResponse`` with ``svids`` [``spiffe_id``, ``x509_svid`` (DER chain),
  ``x509_svid_key`` (PKCS#8 DER), ``bundle`` (DER certificates)] and ``federated_bundles``),
  taken from the `spiffe` package's copy of that file;
- a request without the ``workload.spiffe.io: true`` metadata header is refused with
  INVALID_ARGUMENT "security header missing from request", and a workload with no identity
  with PERMISSION_DENIED "no identity issued", as the SPIRE agent does;
- every message on a stream is the complete current set, and a new one is pushed to every open
  stream when the set changes (`rotate`, `set_identities`).

What it does not do: attestation (every caller gets every SVID), JWT-SVIDs, the other
Workload API methods (they answer UNIMPLEMENTED), CRLs. The SVIDs are minted by a `BuiltinCA`
(usually `BuiltinCA.ephemeral`), so they are the same kind of certificate the built-in CA
path uses and the two can be compared in one test.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2

from ..mtls.ca import BuiltinCA
from ..mtls.svid import SVID

SERVICE = "SpiffeWorkloadAPI"
HEADER = ("workload.spiffe.io", "true")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class WorkloadAPITestDouble:
    """A Workload API test double on `socket_path` serving SVIDs minted by `ca` for
    `identities` (see the module docstring: this is not SPIRE).

    `start()` listens; `rotate()` mints new SVIDs and pushes them on every open stream;
    `set_identities()` changes the set (and pushes); `stop()` ends streams and the server.
    `requests` counts FetchX509SVID calls, `refused` the ones refused for the header.
    `extra_svids` are served as they are after the identities' SVIDs (e.g. SVIDs whose SPIFFE
    ID is not an identity's, or of another trust domain); `federated` goes into
    ``federated_bundles``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        ca: BuiltinCA,
        identities: Iterable[int],
        *,
        ttl: float | None = None,
        extra_svids: Sequence[SVID] = (),
        federated: Mapping[str, Sequence[x509.Certificate]] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.ca = ca
        self.ttl = ttl
        self._extra = list(extra_svids)
        self._federated = {td: list(certs) for td, certs in (federated or {}).items()}
        self._cond = threading.Condition()
        self._version = 0
        self._svids: dict[int, SVID] = {}
        self._stopping = False
        self.requests = 0
        self.refused = 0
        self.open_streams = 0
        self._server: Any = None
        self._mint(identities)

    # -- control --------------------------------------------------------------------------------

    def start(self) -> WorkloadAPITestDouble:
        """Listen (again, after `stop`: an agent restart keeps the SVIDs it had)."""
        with self._cond:
            self._stopping = False
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                    self._fetch_x509_svid,
                    request_deserializer=workload_pb2.X509SVIDRequest.FromString,
                    response_serializer=workload_pb2.X509SVIDResponse.SerializeToString,
                )
            },
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers((handler,))
        self.socket_path.unlink(missing_ok=True)
        if self._server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise OSError(f"cannot listen on unix:{self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> WorkloadAPITestDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def svids(self) -> dict[int, SVID]:
        """The SVIDs currently served, by identity."""
        with self._cond:
            return dict(self._svids)

    def rotate(self, identities: Iterable[int] | None = None) -> dict[int, SVID]:
        """Mint new SVIDs for `identities` (default: all served) and push the set."""
        with self._cond:
            self._mint(self._svids if identities is None else identities)
            return dict(self._svids)

    def set_identities(self, identities: Iterable[int]) -> None:
        """Serve exactly `identities` (new ones get fresh SVIDs) and push the set."""
        wanted = set(identities)
        with self._cond:
            for gone in self._svids.keys() - wanted:
                del self._svids[gone]
            self._mint(wanted - self._svids.keys())

    def wait_for_streams(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.open_streams >= count, timeout)

    # -- inside ---------------------------------------------------------------------------------

    def _mint(self, identities: Iterable[int]) -> None:
        with self._cond:
            for identity in sorted(identities):
                self._svids[identity] = self.ca.issue(identity, self.ttl)
            self._version += 1
            self._cond.notify_all()

    def _response(self) -> Any:
        bundle = b"".join(_der(c) for c in self.ca.bundle())
        entries = [s for _, s in sorted(self._svids.items())] + self._extra
        svids = []
        for svid in entries:
            chain = x509.load_pem_x509_certificates(svid.chain_pem)
            key = serialization.load_pem_private_key(svid.key_pem, password=None)
            svids.append(
                workload_pb2.X509SVID(
                    spiffe_id=svid.spiffe_id,
                    x509_svid=b"".join(_der(c) for c in chain),
                    x509_svid_key=key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    bundle=bundle,
                )
            )
        federated = {
            td: b"".join(_der(c) for c in certs) for td, certs in self._federated.items()
        }
        return workload_pb2.X509SVIDResponse(svids=svids, federated_bundles=federated)

    def _fetch_x509_svid(self, request: Any, context: Any) -> Iterator[Any]:
        with self._cond:
            self.requests += 1
        metadata = dict(context.invocation_metadata())
        if metadata.get(HEADER[0]) != HEADER[1]:
            with self._cond:
                self.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        context.add_callback(self._wake)
        with self._cond:
            self.open_streams += 1
            self._cond.notify_all()
        try:
            sent = -1
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._stopping or not context.is_active() or self._version != sent,
                        timeout=1.0,
                    )
                    if self._stopping or not context.is_active():
                        return
                    if self._version == sent:
                        continue
                    if not self._svids and not self._extra:
                        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                    sent = self._version
                    response = self._response()
                yield response
        finally:
            with self._cond:
                self.open_streams -= 1
                self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
