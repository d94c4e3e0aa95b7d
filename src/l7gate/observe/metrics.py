"""Prometheus metrics of flows, read from the ingestor's, ring's and receiver's counters when
scraped (nothing on the ingestion path touches prometheus_client).

    l7gate_flows_total{verdict,type,direction}        flows ingested
    l7gate_drops_total{reason}                        DROPPED flows by drop_reason_desc
    l7gate_http_requests_total{method,code,verdict}   L7 requests, counted once each, by outcome
    l7gate_flow_events_total{source}                  events received per source (als, ...)
    l7gate_flow_events_malformed_total{source}        events skipped: unreadable
    l7gate_flow_events_lost_total{source}             events refused: ingestion queue full
    l7gate_access_log_messages_malformed_total        ALS messages that did not even parse
    l7gate_flow_ring_overflow_total                   flows pushed out of the full ring
    l7gate_flow_ring_size / _capacity                 flows held, and the ring's size
    l7gate_flow_followers                             open `observe --follow` streams
    l7gate_flow_follow_lost_total                     flows shed by followers too slow to keep up

Method labels are bounded (unknown methods count as OTHER) so a client cannot grow the series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .ingest import Ingestor
from .ring import FlowRing


class FlowCollector(Collector):
    def __init__(
        self, ingestor: Ingestor, ring: FlowRing, malformed_messages: Callable[[], int] = lambda: 0
    ) -> None:
        self.ingestor = ingestor
        self.ring = ring
        self.malformed_messages = malformed_messages

    def collect(self) -> Iterator[Metric]:
        s = self.ingestor.stats()
        r = self.ring.stats()
        flows = CounterMetricFamily("l7gate_flows", "Flows ingested", labels=["verdict", "type", "direction"])
        for (v, t, d), n in sorted(s.flows.items()):
            flows.add_metric([v, t, d], n)
        yield flows
        drops = CounterMetricFamily("l7gate_drops", "Dropped flows by reason", labels=["reason"])
        for reason, n in sorted(s.drops.items()):
            drops.add_metric([reason], n)
        yield drops
        http = CounterMetricFamily(
            "l7gate_http_requests", "L7 HTTP requests by method, status code and verdict",
            labels=["method", "code", "verdict"],
        )
        for (m, c, v), n in sorted(s.http.items()):
            http.add_metric([m, c, v], n)
        yield http
        for name, doc, data in (
            ("l7gate_flow_events", "Datapath events received, by source", s.events),
            ("l7gate_flow_events_malformed", "Events skipped as unreadable, by source", s.malformed),
            ("l7gate_flow_events_lost", "Events refused because the ingestion queue was full", s.lost),
        ):
            fam = CounterMetricFamily(name, doc, labels=["source"])
            for src, n in sorted(data.items()):
                fam.add_metric([src], n)
            yield fam
        yield CounterMetricFamily(
            "l7gate_access_log_messages_malformed", "Access log messages that did not parse",
            value=self.malformed_messages(),
        )
        yield CounterMetricFamily("l7gate_flow_ring_overflow", "Flows pushed out of the full ring", value=r.overflow)
        yield GaugeMetricFamily("l7gate_flow_ring_size", "Flows held in the ring", value=r.size)
        yield GaugeMetricFamily("l7gate_flow_ring_capacity", "Capacity of the flow ring", value=r.capacity)
        yield GaugeMetricFamily("l7gate_flow_followers", "Open follow streams", value=r.followers)
        yield CounterMetricFamily(
            "l7gate_flow_follow_lost", "Flows shed by followers that fell behind", value=r.follow_lost
        )
