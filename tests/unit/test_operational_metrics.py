"""The metrics the alerts and the dashboard read: lag, subscription expiry, callback families."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from handlers.messages import INBOUND_SCHEMA
from processor.consumer import inbound_lag_s
from processor.metrics import Metrics
from subscriptions.schedule import expiry_summary

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_callback_families_are_read_at_each_scrape():
    """A counter or gauge family fed by a mapping shows its current values under the m365sync_ prefix."""
    metrics = Metrics()
    stats: Counter[str] = Counter()
    depths: dict[str, int] = {}
    metrics.counts("graph_calls_total", "doc", "outcome", lambda: stats)
    metrics.gauges("queue_messages", "doc", "queue", lambda: depths)
    stats["requests"] += 3
    stats["throttled"] += 1
    depths["m365sync.dead-letters"] = 7
    samples = _samples(metrics)
    assert samples[("m365sync_graph_calls_total", (("outcome", "requests"),))] == 3
    assert samples[("m365sync_graph_calls_total", (("outcome", "throttled"),))] == 1
    assert samples[("m365sync_queue_messages", (("queue", "m365sync.dead-letters"),))] == 7
    stats["requests"] += 1
    assert _samples(metrics)[("m365sync_graph_calls_total", (("outcome", "requests"),))] == 4


def test_inbound_lag_counts_only_change_notifications_with_a_usable_timestamp():
    """Lag is now minus received_at for inbound change messages; resyncs, other schemas, garbage and future stamps give none."""
    change = {"schema": INBOUND_SCHEMA, "kind": "change", "received_at": "2026-12-03T11:59:30Z"}
    assert inbound_lag_s(change, NOW) == 30.0
    assert inbound_lag_s({**change, "kind": "resync"}, NOW) is None
    assert inbound_lag_s({**change, "schema": "m365sync.outbound.v1"}, NOW) is None
    assert inbound_lag_s({**change, "received_at": "yesterday"}, NOW) is None
    assert inbound_lag_s({**change, "received_at": 12}, NOW) is None
    assert inbound_lag_s({**change, "received_at": "2026-12-03T11:59:30"}, NOW) is None  # naive
    assert inbound_lag_s({**change, "received_at": "2026-12-03T12:00:05Z"}, NOW) is None


def test_expiry_summary_counts_each_account_by_its_latest_live_subscription():
    """An account counts once by the subscription that expires last; expired-only or no records count as none; the horizons are cumulative."""

    def rec(hours: float) -> dict[str, datetime]:
        return {
            "expires_at": (NOW + timedelta(hours=hours)).replace(tzinfo=None)
        }  # naive, as read back

    summary = expiry_summary(
        [
            [rec(0.5)],  # within 1 h (and 6 h, 24 h)
            [rec(0.5), rec(40)],  # a renewed one exists: fine
            [rec(5)],  # within 6 h and 24 h
            [rec(-1)],  # expired only
            [],  # never had one
            [rec(72)],
        ],
        NOW,
    )
    assert summary == {"within_1h": 1, "within_6h": 2, "within_24h": 2, "none": 2}


def test_registering_a_callback_family_again_reads_the_newest_source():
    """A role started twice in one process replaces the family's source instead of failing on a duplicate."""
    metrics = Metrics()
    metrics.gauges("subscriptions_expiring", "doc", "horizon", lambda: {"none": 1})
    metrics.gauges("subscriptions_expiring", "doc", "horizon", lambda: {"none": 5})
    assert _samples(metrics)[("m365sync_subscriptions_expiring", (("horizon", "none"),))] == 5
