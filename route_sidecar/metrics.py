"""Prometheus metrics, in a registry of the side-car's own (no global state)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

CLAIM_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class ClaimStats(Collector):
    """Claims by result and their latency, counted in plain ints and turned into metric
    families only when `/metrics` is read: a prometheus_client child takes a lock on
    every `inc`, and the claim path is the one path where that shows."""

    def __init__(self) -> None:
        self.by_result: dict[str, int] = {}
        self.buckets = [0] * (len(CLAIM_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0

    def record(self, result: str, seconds: float) -> None:
        self.by_result[result] = self.by_result.get(result, 0) + 1
        self.buckets[bisect_left(CLAIM_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        claims = CounterMetricFamily(
            "route_sidecar_claims", "Claims answered, by result", labels=["result"]
        )
        for result, count in sorted(self.by_result.items()):
            claims.add_metric([result], count)
        yield claims
        cumulative, counts = 0, []
        for bound, count in zip((*CLAIM_BUCKETS, float("inf")), self.buckets, strict=True):
            cumulative += count
            counts.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "route_sidecar_claim_seconds",
            "Time to answer a claim",
            buckets=counts,
            sum_value=self.seconds,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.commands = Counter(
            "route_sidecar_commands",
            "Chat commands handled",
            ["command", "result"],
            registry=self.registry,
        )
        self.claims = ClaimStats()
        self.registry.register(self.claims)
        self.active_intents = Gauge(
            "route_sidecar_live_intents", "Intents pending or active", registry=self.registry
        )
        self.transactions = Counter(
            "route_sidecar_transactions",
            "Appservice transactions received",
            ["result"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "route_sidecar_duplicate_deliveries",
            "Transactions or events delivered again",
            ["kind"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "route_sidecar_outcomes",
            "Outcomes reported by the dispatcher",
            ["status"],
            registry=self.registry,
        )
        self.room_effects = Counter(
            "route_sidecar_room_events_sent",
            "Replies, edits and reactions sent",
            ["result"],
            registry=self.registry,
        )
