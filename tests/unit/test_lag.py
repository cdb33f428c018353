"""Lag tracking: p99 over a window, the oldest held delivery, merging processes' reports."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from processor.lag import PUBLISHED_HEADER, LagTracker, merge_reports, p99, published_ms


class FakeMessage:
    """The two properties the tracker reads of an incoming message."""

    def __init__(self, published: int | None = None, timestamp: datetime | None = None) -> None:
        self.headers: dict[str, Any] = {} if published is None else {PUBLISHED_HEADER: published}
        self.timestamp = timestamp


def test_p99_is_the_nearest_rank_and_none_without_samples() -> None:
    """p99 of 1..100 is 99, of one value that value, of nothing None."""
    assert p99([float(v) for v in range(100, 0, -1)]) == 99.0
    assert p99([3.5]) == 3.5
    assert p99([]) is None


def test_published_time_comes_from_the_header_then_the_amqp_timestamp() -> None:
    """The service's header wins; a message from outside falls back to its AMQP timestamp."""
    assert published_ms(FakeMessage(published=1_700_000_000_123)) == 1_700_000_000_123  # type: ignore[arg-type]
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    assert published_ms(FakeMessage(timestamp=stamp)) == int(stamp.timestamp() * 1000)  # type: ignore[arg-type]
    assert published_ms(FakeMessage()) is None  # type: ignore[arg-type]


def test_tracker_reports_window_p99_and_the_oldest_unsettled_delivery_per_queue() -> None:
    """Settled deliveries are lag samples (old ones leave the window); held ones give each
    queue's oldest message and count, and a handover forgets them."""
    now = [1_000_000]
    tracker = LagTracker(clock_ms=lambda: now[0], window_s=60)
    old = FakeMessage(published=now[0] - 5_000)
    newer = FakeMessage(published=now[0] - 1_000)
    other = FakeMessage(published=now[0] - 2_000)
    for queue, message in (("q.0", old), ("q.0", newer), ("q.1", other)):
        tracker.received(queue, message)  # type: ignore[arg-type]
    report = tracker.report()
    assert report["lag_p99_s"] is None
    assert [(e["queue"], e["count"]) for e in report["oldest_held"]] == [("q.0", 2), ("q.1", 1)]
    assert report["oldest_held"][0]["at"] == datetime.fromtimestamp(995, tz=UTC)

    tracker.settled("q.0", old)  # type: ignore[arg-type]
    report = tracker.report()
    assert report["lag_p99_s"] == 5.0
    assert report["oldest_held"][0]["at"] == datetime.fromtimestamp(999, tz=UTC)

    tracker.forget("q.1")
    assert [e["queue"] for e in tracker.report()["oldest_held"]] == ["q.0"]
    now[0] += 61_000
    assert tracker.report()["lag_samples"] == 0


def test_merging_reports_takes_the_worst_p99_and_the_oldest_message() -> None:
    """Across processes: the highest p99, samples summed, per queue the oldest and the sum held."""
    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    merged = merge_reports(
        [
            {
                "lag_p99_s": 0.4,
                "lag_samples": 10,
                "oldest_held": [{"queue": "q", "at": late, "count": 2}],
            },
            {
                "lag_p99_s": 2.5,
                "lag_samples": 5,
                "oldest_held": [{"queue": "q", "at": early, "count": 1}],
            },
            {"lag_p99_s": None, "lag_samples": 0, "oldest_held": []},
        ]
    )
    assert merged == {
        "lag_p99_s": 2.5,
        "lag_samples": 15,
        "oldest_held": {"q": early},
        "held": {"q": 3},
    }
