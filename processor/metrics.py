"""Prometheus metrics of one process, in a registry of their own (no global registry).

Each :class:`Metrics` owns a :class:`CollectorRegistry`, so tests can build many apps side
by side. To add a metric, add an attribute in ``__init__`` made with :meth:`Metrics.counter`,
:meth:`Metrics.histogram` or :meth:`Metrics.gauge`; names get the ``m365sync_`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "PREFIX", "Metrics"]

PREFIX = "m365sync_"
#: The Content-Type of :meth:`Metrics.render`'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Lag buckets: seconds to minutes; the alert's threshold (60 s) is a bucket bound.
_LAG_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

#: Latency buckets for the webhook: Graph counts > 2.9 s as slow and gives up at 3 s.
_WEBHOOK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.9, 5.0, 10.0)


class Metrics:
    """The service's counters and histograms, registered in a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._callbacks: dict[str, _Callback] = {}

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
        self.fetches_skipped = self.counter(
            "fetches_skipped_total",
            "Notifications settled without a Graph fetch (their version was already known).",
        )
        self.burst_passes = self.counter(
            "burst_delta_passes_total",
            "Delta passes run instead of per-event fetches for a burst on one mailbox.",
        )
        self.inbound_lag = self.histogram(
            "inbound_lag_seconds",
            "From the receiver accepting a change notification to the worker settling it "
            "(event fetched and stored, or the message parked or dead-lettered).",
            buckets=_LAG_BUCKETS_S,
        )

        # Accounts.
        self.account_status_changes = self.counter(
            "account_status_changes_total",
            "Account status changes, by the new status (a burst of reauthorization_required "
            "is a reauthorization wave).",
            ("status",),
        )

        self.message_lag = self.histogram(
            "message_lag_seconds",
            "Time from a message's first publish to its settlement by a consumer, by queue "
            "(includes waits in the retry queues).",
            ("queue",),
            buckets=_LAG_BUCKETS_S,
        )

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter named ``m365sync_<name>`` in this registry."""
        return Counter(PREFIX + name, documentation, labelnames, registry=self.registry)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge named ``m365sync_<name>`` in this registry."""
        return Gauge(PREFIX + name, documentation, labelnames, registry=self.registry)

    def counts(
        self,
        name: str,
        documentation: str,
        label: str,
        source: Callable[[], Mapping[str, float]],
    ) -> None:
        """A counter family ``m365sync_<name>_total`` read from ``source`` at each scrape.

        For components that keep their own tallies (a :class:`collections.Counter`) and
        must not depend on this module.
        """
        self._callback(PREFIX + name, documentation, label, source, "counter")

    def gauges(
        self,
        name: str,
        documentation: str,
        label: str,
        source: Callable[[], Mapping[str, float]],
    ) -> None:
        """A gauge family ``m365sync_<name>`` read from ``source`` at each scrape."""
        self._callback(PREFIX + name, documentation, label, source, "gauge")

    def _callback(
        self,
        name: str,
        documentation: str,
        label: str,
        source: Callable[[], Mapping[str, float]],
        kind: str,
    ) -> None:
        # A role started again in the same process (tests run two managers in one) reads
        # from its newest source instead of registering the family twice.
        existing = self._callbacks.get(name)
        if existing is not None:
            existing.source = source
            return
        collector = _Callback(name, documentation, label, source, kind)
        self.registry.register(collector)
        self._callbacks[name] = collector

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


class _Callback(Collector):
    """One metric family whose samples are read from a mapping when scraped."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        source: Callable[[], Mapping[str, float]],
        kind: str,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self.source = source
        self._kind = kind

    def describe(self) -> Iterator[Metric]:
        yield from self._family({})

    def collect(self) -> Iterator[Metric]:
        yield from self._family(self.source())

    def _family(self, values: Mapping[str, float]) -> Iterator[Metric]:
        family: CounterMetricFamily | GaugeMetricFamily
        if self._kind == "counter":
            family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        else:
            family = GaugeMetricFamily(self._name, self._documentation, labels=[self._label])
        for key, value in sorted(values.items()):
            family.add_metric([key], float(value))
        yield family
