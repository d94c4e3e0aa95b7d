"""Prometheus metrics of the agent, read from live state at scrape time where possible.

Counters that must count events (xDS ACKs, NACKs, push→ACK latency) are updated by hooks;
gauges (identities, ipcache entries, endpoints, policies) are collected when scraped. xDS pushes
are read from the server's status rows (`attach_xds`); flow metrics come from
`observe.metrics.FlowCollector`, registered by the daemon.
Each agent has its own registry, so several agents in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ..xds.status import StatusRow
from . import views
from .core import AgentCore


class _StateCollector(Collector):
    def __init__(self, core: AgentCore) -> None:
        self.core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # The state as of the last completed change: a scrape never waits for an apply, nor
        # reads the resolver while one changes it.
        view = self.core.view()
        yield GaugeMetricFamily("l7gate_identities", "Identities allocated (the reserved ones not counted)",
                                value=views.allocated_identities(view))
        yield GaugeMetricFamily("l7gate_ipcache_entries", "Prefixes in the ipcache", value=len(self.core.ipcache))
        yield GaugeMetricFamily("l7gate_endpoints", "Local endpoint identities under policy", value=len(view.endpoints))
        yield GaugeMetricFamily("l7gate_policies", "Policies in force", value=len(view.policy_docs))
        yield GaugeMetricFamily("l7gate_policy_revision", "Policy repository revision", value=view.policy_revision)
        yield GaugeMetricFamily("l7gate_policy_map_entries", "Resolved policy map entries", value=view.map_entries)


class _XdsPushCollector(Collector):
    """xDS responses sent, per resource type (summed over the connected Envoys)."""

    def __init__(self, status: Callable[[], Sequence[StatusRow]]) -> None:
        self.status = status

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("l7gate_xds_pushes", "xDS responses sent to Envoys", labels=["type"])
        per_type: dict[str, int] = {}
        for r in self.status():
            per_type[r.type] = per_type.get(r.type, 0) + r.pushes
        for t, n in sorted(per_type.items()):
            family.add_metric([t], n)
        yield family


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.xds_acks = Counter("l7gate_xds_acks", "xDS responses acknowledged", ["type"], registry=self.registry)
        self.xds_nacks = Counter("l7gate_xds_nacks", "xDS responses rejected by Envoy", ["type"], registry=self.registry)
        self.xds_push_latency = Histogram(
            "l7gate_xds_push_to_ack_seconds", "Time from sending an xDS response to its ACK", ["type"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )

    def attach(self, core: AgentCore) -> None:
        self.registry.register(_StateCollector(core))

    def attach_xds(self, status: Callable[[], Sequence[StatusRow]]) -> None:
        self.registry.register(_XdsPushCollector(status))

    def on_ack(self, node_id: str, type_url: str, version: str, latency: float) -> None:
        t = type_url.rsplit(".", 1)[-1]
        self.xds_acks.labels(t).inc()
        self.xds_push_latency.labels(t).observe(latency)

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        self.xds_nacks.labels(type_url.rsplit(".", 1)[-1]).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


MetricsRender = Callable[[], tuple[bytes, str]]
