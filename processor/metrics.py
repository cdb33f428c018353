"""Prometheus metrics of one process, in a registry of their own (no global registry).

Each :class:`Metrics` owns a :class:`CollectorRegistry`, so tests can build many apps side
by side. To add a metric, add an attribute in ``__init__`` made with :meth:`Metrics.counter`,
:meth:`Metrics.histogram` or :meth:`Metrics.gauge`; names get the ``m365sync_`` prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "PREFIX", "Metrics"]

PREFIX = "m365sync_"
#: The Content-Type of :meth:`Metrics.render`'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Latency buckets for the webhook: Graph counts > 2.9 s as slow and gives up at 3 s.
_WEBHOOK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.9, 5.0, 10.0)


class Metrics:
    """The service's counters and histograms, registered in a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

        # Receiver (Graph webhooks).
        self.notifications_received = self.counter(
            "notifications_received_total", "Notification items received in well-formed bodies."
        )
        self.notifications_accepted = self.counter(
            "notifications_accepted_total",
            "Notification items that passed every check and were confirmed by the broker.",
        )
        self.notifications_rejected = self.counter(
            "notifications_rejected_total",
            "Notification items dropped, by reason (counted when decided).",
            ("reason",),
        )
        self.webhook_malformed = self.counter(
            "webhook_malformed_total",
            "Webhook requests refused before any item was checked, by route and reason "
            "(body_too_large, body_read_timeout, invalid_json, not_an_object, missing_value, "
            "too_many_items).",
            ("route", "reason"),
        )
        self.webhook_requests = self.counter(
            "webhook_requests_total",
            "Webhook requests by route and HTTP status.",
            ("route", "status"),
        )
        self.publish_failures = self.counter(
            "publish_failures_total", "Webhook requests answered 503 because publishing failed."
        )
        self.webhook_duration = self.histogram(
            "webhook_duration_seconds",
            "Time to answer a webhook request (Graph's deadline is 3 s).",
            buckets=_WEBHOOK_BUCKETS_S,
        )

        # Every HTTP route (webhooks, connect, consent, /api/v1, health).
        self.http_responses = self.counter(
            "http_responses_total",
            "HTTP answers by route template and status (401 on /api/v1 is a missing or "
            "wrong bearer token, 400/403 on /connect a refused link).",
            ("route", "status"),
        )

        # Consumers, Graph client and reconciliation.
        self.messages_processed = self.counter(
            "messages_processed_total",
            "Messages handled by consumers, by queue and outcome "
            "(ack, retry, requeue, dead_letter).",
            ("queue", "outcome"),
        )
        self.graph_requests = self.counter(
            "graph_requests_total", "Requests to Microsoft Graph by outcome.", ("outcome",)
        )
        self.events_reconciled = self.counter(
            "events_reconciled_total", "Events reconciled into the store, by change.", ("change",)
        )
        self.data_key_unreadable = self.counter(
            "data_key_unreadable_total",
            "Reads of an account's data key that no master key in the key ring unwraps "
            "(alert on any: a master key is missing; the work waits, nothing is dropped).",
        )
        self.echoes_suppressed = self.counter(
            "echoes_suppressed_total",
            "Notifications of the service's own writes recognised and not echoed to 1Relation.",
        )

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter named ``m365sync_<name>`` in this registry."""
        return Counter(PREFIX + name, documentation, labelnames, registry=self.registry)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge named ``m365sync_<name>`` in this registry."""
        return Gauge(PREFIX + name, documentation, labelnames, registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> Histogram:
        """A histogram named ``m365sync_<name>`` in this registry."""
        return Histogram(
            PREFIX + name, documentation, labelnames, registry=self.registry, buckets=buckets
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
