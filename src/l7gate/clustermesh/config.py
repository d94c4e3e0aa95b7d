"""Remote clusters from a directory, as Cilium reads them: one file per remote cluster, named
after the cluster, holding an etcd client configuration (the `clustermesh-secrets` layout)::

    /var/lib/l7gate/clustermesh/cluster-b:
        endpoints:
        - https://10.0.2.100:2379
        trusted-ca-file: /var/lib/l7gate/clustermesh/cluster-b.etcd-client-ca.crt
        cert-file: /var/lib/l7gate/clustermesh/cluster-b.etcd-client.crt
        key-file: /var/lib/l7gate/clustermesh/cluster-b.etcd-client.key

Files whose name is not a cluster name (dotted names such as the certificates above, hidden
files) are not remotes. A relative file path is relative to the directory. `load_remotes`
reads them all; `RemotesWatch` tells when the directory changed, so the agent reconfigures
its mesh without a restart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .types import MeshError, RemoteConfig
from .wire import WireError, check_cluster_name


@dataclass(frozen=True, slots=True)
class RemotesFound:
    remotes: tuple[RemoteConfig, ...]
    errors: tuple[str, ...]  # one line per file that could not be used, naming it and the field


def load_remotes(directory: str | Path, *, local_cluster: str) -> RemotesFound:
    """Every remote cluster configured in `directory` (module doc); a file naming the local
    cluster is skipped (an agent does not watch its own cluster as a remote)."""
    root = Path(directory)
    remotes: list[RemoteConfig] = []
    errors: list[str] = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return RemotesFound((), (f"{root}: no such directory",))
    except OSError as exc:
        return RemotesFound((), (f"{root}: {exc.strerror}",))
    for name in names:
        path = root / name
        if name.startswith(".") or "." in name or not path.is_file():
            continue
        try:
            check_cluster_name(name)
        except WireError:
            continue
        if name == local_cluster:
            continue
        try:
            remotes.append(_parse(path, name))
        except (MeshError, OSError, yaml.YAMLError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
    return RemotesFound(tuple(remotes), tuple(errors))


def _parse(path: Path, name: str) -> RemoteConfig:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("must be a mapping with `endpoints` (an etcd client configuration)")
    unknown = sorted(set(data) - {"endpoints", "trusted-ca-file", "cert-file", "key-file"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (expected endpoints, trusted-ca-file, "
                         "cert-file, key-file)")
    endpoints = data.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) and e for e in endpoints):
        raise ValueError("endpoints: must be a non-empty list of URLs (https://host:2379)")

    def file(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key}: must be a file path")
        return str(value if os.path.isabs(value) else path.parent / value)

    return RemoteConfig(name, tuple(endpoints), ca_file=file("trusted-ca-file"), cert_file=file("cert-file"),
                        key_file=file("key-file"))


class RemotesWatch:
    """Whether the directory's remote files changed since the last `changed()` that said so
    (names, sizes and modification times). Not thread-safe: one poller owns it."""

    def __init__(self, directory: str | Path) -> None:
        self._root = Path(directory)
        self._seen: tuple[tuple[str, int, int], ...] | None = None

    def _state(self) -> tuple[tuple[str, int, int], ...]:
        out: list[tuple[str, int, int]] = []
        try:
            for entry in sorted(os.scandir(self._root), key=lambda e: e.name):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                out.append((entry.name, st.st_size, st.st_mtime_ns))
        except OSError:
            pass
        return tuple(out)

    def changed(self) -> bool:
        state = self._state()
        if state == self._seen:
            return False
        self._seen = state
        return True


def describe(remotes: Sequence[RemoteConfig]) -> str:
    return ", ".join(f"{r.name} ({', '.join(r.endpoints)})" for r in remotes) or "none"
