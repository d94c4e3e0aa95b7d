"""Envoy access logs over gRPC (ALS): the receiving end.

Envoy streams `StreamAccessLogsMessage`s to the agent's gRPC server (the same one that serves
ADS, through the bootstrap's `l7gate_als` cluster). The entries of each message are handed at
once, as Envoy's own `HTTPAccessLogEntry`s or `TCPAccessLogEntry`s, to the batch sink of their
kind (`set_batch_sink`, `set_tcp_batch_sink`), on the gRPC event loop; flow records are built
from them by the observability layer. The agent's sinks are `ingest.Ingestor.http_access_logs`
and `tcp_access_logs`, which only queue them, so the loop that also serves xDS is never held up
by flow conversion.

A message that cannot be handled is counted and skipped: ingestion never stops on bad input.
Bytes that do not parse as a `StreamAccessLogsMessage` are counted in `malformed` and skipped;
the stream stays open for the next message; a sink that raises costs its batch (counted in
`errors`), not the stream.

`AccessLogReceiver` is thread-safe; its counters are read by the metrics endpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from envoy.config.core.v3 import grpc_service_pb2
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import DecodeError, Message

log = logging.getLogger(__name__)

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
ALS_CLUSTER = "l7gate_als"
HTTP_GRPC_LOGGER = "envoy.access_loggers.http_grpc"

BatchSink = Callable[[Sequence[Message]], None]  # called with each message's entries

# What one Envoy worker buffers before it sends a message (besides every `flush_interval_ms`).
# Envoy's default, 16 KiB, is ~29 entries: at 20k requests/s the agent then receives ~700
# messages/s, and the per-message cost of the gRPC stream (asyncio wake-ups, the hand-over to
# the ingestion thread) was most of what receiving the logs cost it. Measured with the flows'
# bench load on a quiet machine (flows off; the agent's CPU per request / Envoy's): 16 KiB
# 5.3 / 41.5 µs, 64 KiB 2.5 / 42, 128 KiB 2.2 / 42.4, 256 KiB 2.2 / 45, 1 MiB 1.8 / 46 µs —
# past 128 KiB Envoy itself pays more per entry, and Envoy's worker is what limits the rate.
# It is also the most Envoy holds while the stream is backed up before it drops entries
# (`logs_dropped`). Messages stay far below the gRPC server's 64 MiB receive limit.
BUFFER_SIZE_BYTES = 128 << 10


def _common(log_name: str, flush_interval_ms: int) -> Message:
    return als_config_pb2.CommonGrpcAccessLogConfig(
        log_name=log_name,
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=ALS_CLUSTER)
        ),
        transport_api_version=ApiVersion.V3,
        buffer_flush_interval=duration_pb2.Duration(nanos=flush_interval_ms * 1_000_000),
        buffer_size_bytes=wrappers_pb2.UInt32Value(value=BUFFER_SIZE_BYTES),
    )


def _access_log(logger: str, cfg: Message) -> Message:
    from envoy.config.accesslog.v3 import accesslog_pb2
    from google.protobuf import any_pb2

    packed = any_pb2.Any()
    packed.Pack(cfg)
    return accesslog_pb2.AccessLog(name=logger, typed_config=packed)


def http_grpc_access_log(log_name: str = "l7gate", flush_interval_ms: int = 50,
                         request_headers: Sequence[str] = (), min_status: int = 0) -> Any:
    """The HCM `access_log` entry that streams every request to the agent (with the values
    of `request_headers`, beyond the ones Envoy always logs; with `min_status`, only requests
    answered with at least that status)."""
    from envoy.config.accesslog.v3 import accesslog_pb2
    from envoy.config.core.v3 import base_pb2

    out = _access_log(HTTP_GRPC_LOGGER, als_config_pb2.HttpGrpcAccessLogConfig(
        additional_request_headers_to_log=list(request_headers),
        common_config=_common(log_name, flush_interval_ms),
    ))
    if min_status:
        out.filter.status_code_filter.comparison.op = accesslog_pb2.ComparisonFilter.GE
        out.filter.status_code_filter.comparison.value.CopyFrom(
            base_pb2.RuntimeUInt32(default_value=min_status, runtime_key="l7gate.access_log.min_status"))
    return out


TCP_GRPC_LOGGER = "envoy.access_loggers.tcp_grpc"


def tcp_grpc_access_log(log_name: str = "l7gate-tcp", flush_interval_ms: int = 50,
                        failures_only: bool = False, filter_state_objects: Sequence[str] = ()) -> Any:
    """A listener-level (or tcp_proxy) `access_log` entry: one TCPAccessLogEntry per
    connection, when it closes, including connections whose TLS handshake failed (with the
    reason). `failures_only`: only connections Envoy flagged (any response flag: no upstream,
    upstream connection failure, ...)."""
    common = _common(log_name, flush_interval_ms)
    common.filter_state_objects_to_log.extend(filter_state_objects)
    out = _access_log(TCP_GRPC_LOGGER, als_config_pb2.TcpGrpcAccessLogConfig(common_config=common))
    if failures_only:
        out.filter.response_flag_filter.SetInParent()  # no flags listed: any flag
    return out


class AccessLogReceiver:
    def __init__(self) -> None:
        self._batch_sink: BatchSink | None = None
        self._tcp_batch_sink: BatchSink | None = None
        self._lock = threading.Lock()
        self.messages = 0
        self.entries = 0
        self.errors = 0
        self.malformed = 0
        self.streams = 0

    def set_batch_sink(self, sink: BatchSink | None) -> None:
        """Gets each message's HTTP entries at once."""
        self._batch_sink = sink

    def set_tcp_batch_sink(self, sink: BatchSink | None) -> None:
        """Gets each message's TCP (listener-level) entries at once."""
        self._tcp_batch_sink = sink

    def _deserialize(self, data: bytes) -> Any:
        try:
            return als_pb2.StreamAccessLogsMessage.FromString(data)
        except (DecodeError, ValueError, TypeError):
            with self._lock:
                self.malformed += 1
            log.warning("malformed access log message skipped (%d bytes)", len(data))
            return None

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self._serve,
                    request_deserializer=self._deserialize,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )

    async def _serve(self, requests: AsyncIterator[Any], context: Any) -> Any:
        with self._lock:
            self.streams += 1
        try:
            async for msg in requests:
                if msg is not None:
                    self.handle(msg)
        finally:
            with self._lock:
                self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def handle(self, msg: Any) -> None:
        try:
            if msg.WhichOneof("log_entries") == "tcp_logs":
                entries, sink, kind = msg.tcp_logs.log_entry, self._tcp_batch_sink, "TCP access log"
            else:
                entries, sink, kind = msg.http_logs.log_entry, self._batch_sink, "access log"
        except (AttributeError, ValueError):
            with self._lock:
                self.malformed += 1
            return
        with self._lock:
            self.messages += 1
            self.entries += len(entries)
        if sink is None:
            return
        try:
            sink(entries)
        except Exception:  # noqa: BLE001 - a failing sink must not end Envoy's stream
            with self._lock:
                self.errors += len(entries)
            log.exception("%s batch skipped", kind)
