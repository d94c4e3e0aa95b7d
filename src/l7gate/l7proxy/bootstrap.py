"""The Envoy bootstrap: a pure function from `BootstrapConfig` to a JSON-ready dict.

Theory of operation
-------------------
The bootstrap holds only what Envoy needs before it can talk to the agent; everything that
enforces policy (listeners, routes, clusters for workloads, secrets) arrives later over xDS.

- `node`: `id` and `cluster` name this Envoy to the agent's snapshot cache (one snapshot per
  node id), so several Envoys can share one xDS server.
- `dynamic_resources`: one ADS stream (`api_type` DELTA_GRPC by default, GRPC for
  state-of-the-world) carries LDS and CDS, and everything they reference (RDS, EDS, SDS,
  ECDS) through `{"ads": {}}` config sources in the resources themselves. The node is sent on the
  first message only. The stream's retry back-off is 0.1 s to 1 s: Envoy's default took 2-14 s
  to reconnect after the server came back (FIELD-NOTES.md), and while it is away Envoy keeps
  enforcing its last config.
- `initial_fetch_timeout` on LDS and CDS bounds how long Envoy waits for the first answer. Envoy
  reports `/ready` LIVE only after both initial fetches ended (CDS first, then LDS), so with the
  default of 15 s an Envoy started while the agent is down stays un-ready for 30 s, and with 0 it
  never becomes ready. A short timeout is safe here: an Envoy that has received no listener
  accepts no traffic, so "LIVE without config" fails closed. "LIVE" therefore means "the process
  works", not "the policy arrived"; the latter is the xDS server's ACK tracking.
- `static_resources.clusters`: two STATIC HTTP/2 clusters pointing at the agent's gRPC server
  (TCP or unix socket): `XDS_CLUSTER` for ADS and `ALS_CLUSTER` for access-log streaming
  (`envoy.access_loggers.http_grpc`, referenced by listeners the agent sends). They are separate
  so that a burst of access logs never shares HTTP/2 flow control with config delivery.
- `admin` listens on a unix socket only, created with mode 0600 (`admin_socket`; a relative
  path is in Envoy's working directory, the supervisor's state directory, itself 0700). The
  admin API can change Envoy's state (drain every listener, quit, runtime changes) and shows
  all of its configuration, so only the agent's user may open it: a TCP port on 127.0.0.1 is
  open to every local user (docs/security.md). Abstract sockets are refused for the same
  reason: they have no permissions.
- `stats_config`: Envoy keeps no statistics for its ECDS subscriptions
  (`extension_config_discovery.*`: config_reload, config_fail, config_conflict per resource).
  A proxied port has up to 130 of them (`xds/source_slots.py`: 3 for a small table), so a node's
  initial sync could create tens of thousands of counters: measured at 13,000 ECDS resources
  (bench_k8s' size when every port had 128 slots), Envoy took
  ~14% less time from the agent's publication to its ACK without them (medians of 3: 5.53 s
  against 6.39 s). Nothing reads them: the xDS server knows every ACK and NACK itself
  (`l7gate xds status`).
- `layered_runtime`: an empty static layer plus an admin layer, so runtime values can be
  inspected and changed through `/runtime_modify` when debugging; defaults stay Envoy's.

The dict follows the protobuf JSON mapping of `envoy.config.bootstrap.v3.Bootstrap`; the unit
tests parse it with `json_format.ParseDict` to prove every field name. Building it needs no
protobuf import, so this module stays cheap to import.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l7gate.envoy_names import HTTP_PROTOCOL_OPTIONS, TYPE_PREFIX

#: Name of the static cluster that carries the ADS stream.
XDS_CLUSTER = "l7gate_xds"
#: Name of the static cluster for gRPC access-log streaming to the agent (same server as xDS).
ALS_CLUSTER = "l7gate_als"
#: Envoy's admin socket unless configured otherwise: relative to Envoy's working directory.
ADMIN_SOCKET = "admin.sock"
#: The statistics Envoy does not keep: one set per ECDS subscription (see the module doc).
ECDS_STATS_PREFIX = "extension_config_discovery."
#: The admin socket's mode: the agent's user only.
ADMIN_SOCKET_MODE = 0o600

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107


class ApiType(enum.Enum):
    """How the ADS stream is spoken: delta (incremental) or state-of-the-world."""

    DELTA_GRPC = "DELTA_GRPC"
    GRPC = "GRPC"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """The agent's gRPC server on an IP address. A STATIC cluster needs an IP literal, not a
    name, so that Envoy never depends on DNS to reach its control plane."""

    host: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"xDS host must be an IP address, got {self.host!r}") from None
        if not 0 < self.port < 65536:
            raise ValueError(f"xDS port must be in 1..65535, got {self.port}")

    def __str__(self) -> str:
        """The grpc target form, also accepted by `parse_xds_address`."""
        if ipaddress.ip_address(self.host).version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """The agent's gRPC server on a unix socket path (a leading '@' means the abstract
    namespace, as in Envoy's `pipe.path`)."""

    path: str

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("unix socket path must not be empty")
        if len(os.fsencode(self.path)) > _MAX_UNIX_PATH:
            raise ValueError(
                f"unix socket path longer than {_MAX_UNIX_PATH} bytes: {self.path!r}"
            )

    def __str__(self) -> str:
        """The grpc target form (`unix:PATH`), also accepted by `parse_xds_address`."""
        if self.path.startswith("@"):
            return f"unix-abstract:{self.path[1:]}"
        return f"unix:{self.path}"


XdsAddress = TcpAddress | UnixSocket


def parse_xds_address(text: str) -> XdsAddress:
    """Parse `HOST:PORT`, `[V6]:PORT`, `unix:PATH`, `unix-abstract:NAME` or a bare absolute
    path. Raises ValueError with the offending text."""
    if text.startswith("unix-abstract:"):
        return UnixSocket("@" + text.removeprefix("unix-abstract:"))
    if text.startswith("unix:"):
        return UnixSocket(text.removeprefix("unix:"))
    if text.startswith("/"):
        return UnixSocket(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"xDS address must be HOST:PORT or unix:PATH, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return TcpAddress(host, int(port))


@dataclass(frozen=True, slots=True)
class BootstrapConfig:
    """Everything the bootstrap depends on. Durations are in seconds."""

    node_id: str
    xds: XdsAddress
    cluster: str = "l7gate"
    api_type: ApiType = ApiType.DELTA_GRPC
    admin_socket: str = ADMIN_SOCKET
    initial_fetch_timeout: float = 2.0
    retry_base_interval: float = 0.1
    retry_max_interval: float = 1.0
    connect_timeout: float = 1.0

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if not self.cluster:
            raise ValueError("cluster must not be empty")
        if not self.admin_socket or self.admin_socket.startswith("@"):
            raise ValueError(
                f"admin_socket must be a filesystem path (abstract sockets have no permissions), got {self.admin_socket!r}")
        if len(os.fsencode(self.admin_socket)) > _MAX_UNIX_PATH:
            raise ValueError(f"admin_socket longer than {_MAX_UNIX_PATH} bytes: {self.admin_socket!r}")
        if self.initial_fetch_timeout <= 0:
            # 0 means "wait forever" to Envoy: an Envoy started while the agent is down would
            # never report ready, and the supervisor could not tell it from a hung one.
            raise ValueError("initial_fetch_timeout must be > 0")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        if not 0 < self.retry_base_interval <= self.retry_max_interval:
            raise ValueError("need 0 < retry_base_interval <= retry_max_interval")


def duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.1s", "2s"), to the nanosecond."""
    if seconds < 0:
        raise ValueError(f"negative duration: {seconds}")
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _address(addr: XdsAddress) -> dict[str, Any]:
    if isinstance(addr, UnixSocket):
        return {"pipe": {"path": addr.path}}
    return {"socket_address": {"address": addr.host, "port_value": addr.port}}


def _grpc_cluster(name: str, cfg: BootstrapConfig) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": duration(cfg.connect_timeout),
        # gRPC needs HTTP/2 to the upstream; Envoy's default upstream protocol is HTTP/1.1.
        "typed_extension_protocol_options": {
            HTTP_PROTOCOL_OPTIONS: {
                "@type": TYPE_PREFIX + HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(cfg.xds)}}]}],
        },
    }


def _ads_source(cfg: BootstrapConfig) -> dict[str, Any]:
    return {
        "ads": {},
        "resource_api_version": "V3",
        "initial_fetch_timeout": duration(cfg.initial_fetch_timeout),
    }


def build_bootstrap(cfg: BootstrapConfig) -> dict[str, Any]:
    """The bootstrap for `cfg`, as the protobuf JSON mapping of
    `envoy.config.bootstrap.v3.Bootstrap`. Pure and deterministic; the caller owns the dict."""
    return {
        "node": {"id": cfg.node_id, "cluster": cfg.cluster},
        "dynamic_resources": {
            "ads_config": {
                "api_type": cfg.api_type.value,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": duration(cfg.retry_base_interval),
                                    "max_interval": duration(cfg.retry_max_interval),
                                }
                            },
                        }
                    }
                ],
            },
            "lds_config": _ads_source(cfg),
            "cds_config": _ads_source(cfg),
        },
        "static_resources": {
            "clusters": [_grpc_cluster(XDS_CLUSTER, cfg), _grpc_cluster(ALS_CLUSTER, cfg)],
        },
        "admin": {
            "address": {"pipe": {"path": cfg.admin_socket, "mode": ADMIN_SOCKET_MODE}}
        },
        "stats_config": {
            "stats_matcher": {"exclusion_list": {"patterns": [{"prefix": ECDS_STATS_PREFIX}]}}
        },
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": {}},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }


def write_bootstrap(path: Path, cfg: BootstrapConfig) -> Path:
    """Write the bootstrap for `cfg` to `path` as JSON, atomically (a crash never leaves a
    half-written file for the next Envoy start). Returns `path`."""
    text = json.dumps(build_bootstrap(cfg), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
