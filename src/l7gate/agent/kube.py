"""The agent's side of the Kubernetes watch: `CoreSink`, the `k8s.reconcile.ObjectSink` over
the core's own apply and delete (the path `l7gate policy apply` takes: one reconcile path), and
`open_watcher`, which builds the watch from the agent's configuration."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ..k8s.reconcile import CIDRGROUPS, POLICY_KINDS, from_api
from ..k8s.watch import ApiConnection, FirstPages, Watcher, load_configuration
from .config import AgentConfig
from .core import AgentCore, ApplyError


class CoreSink:
    """`ObjectSink` over an `AgentCore`. Called by the watch's applier thread; the core
    serializes it with the admin API's requests."""

    def __init__(self, core: AgentCore) -> None:
        self.core = core
        self._deleters: dict[str, Callable[[str], bool]] = {
            "Pod": core.delete_pod, "Service": core.delete_service, "Namespace": core.delete_namespace,
            "EndpointSlice": core.delete_endpoint_slice,
            "Node": core.delete_node,
            **{kind: core.delete_policy for kind in POLICY_KINDS},
            CIDRGROUPS.kind: core.delete_cidr_group,
        }

    def apply(self, docs: Sequence[Mapping[str, Any]]) -> list[str]:
        try:
            self.core.apply(docs)
        except ApplyError as exc:
            return list(exc.errors)
        return []

    def delete(self, kind: str, key: str) -> bool:
        def delete_if_ours() -> bool:
            # Under the core's lock: a `policy apply` of the same key cannot slip in between.
            doc = self.core.document(kind, key)
            return doc is not None and from_api(doc) and self._deleters[kind](key)

        return self.core.exclusive(delete_if_ours)

    def owned(self, kind: str) -> set[str]:
        return {key for key, doc in self.core.documents(kind).items() if from_api(doc)}

    def batch(self) -> AbstractContextManager[object]:
        return self.core.batch()


def open_watcher(config: AgentConfig, core: AgentCore, log: Callable[[str], None],
                 first_pages: FirstPages | None = None) -> Watcher:
    """The watch of `config.kubernetes`, not started; with `first_pages` (asked for by
    `ask_first_pages` earlier in the start-up), over their connection, taking them. Raises
    KubeConfigError when there is no usable client configuration (a bad kubeconfig, or no
    service account outside a pod)."""
    api = first_pages.api if first_pages is not None else ApiConnection(load_configuration(config.kubernetes.kubeconfig))
    return Watcher(api, CoreSink(core), cluster=config.cluster_name, node=config.node, log=log,
                   watch_timeout=config.kubernetes.watch_timeout, first_pages=first_pages)
