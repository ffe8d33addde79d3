"""Prometheus metrics, in a registry of the side-car's own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.commands = Counter(
            "route_sidecar_commands",
            "Chat commands handled",
            ["command", "result"],
            registry=self.registry,
        )
        self.claims = Counter(
            "route_sidecar_claims",
            "Claims answered, by result",
            ["result"],
            registry=self.registry,
        )
        self.claim_seconds = Histogram(
            "route_sidecar_claim_seconds",
            "Time to answer a claim",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=self.registry,
        )
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
