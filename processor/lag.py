"""Lag: how long messages wait between being published and being settled by a consumer.

The publisher stamps every message with :data:`PUBLISHED_HEADER` (milliseconds since the
epoch; headers survive the retry queues, so a throttled message's lag includes its waits).
A :class:`LagTracker` per consumer keeps the lags of the last few minutes and the publish
times of the deliveries it holds unsettled. The head of a shard queue is always among the
deliveries of its one active consumer (prefetch), so the oldest of those is the age of the
queue's oldest message. The balancer writes :meth:`LagTracker.report` into the process's
heartbeat, where ``m365sync status`` reads it; Prometheus gets the same lags as a histogram.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Histogram

#: Milliseconds since the epoch at which the service first published the message.
PUBLISHED_HEADER = "x-m365sync-published-ms"
#: Lags older than this leave the p99 window.
WINDOW_S = 300.0
MAX_SAMPLES = 20_000


def now_ms() -> int:
    """Milliseconds since the epoch (the value of :data:`PUBLISHED_HEADER`)."""
    return time.time_ns() // 1_000_000


def published_ms(message: AbstractIncomingMessage) -> int | None:
    """When the message was first published, from the header or the AMQP timestamp."""
    value = (message.headers or {}).get(PUBLISHED_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if message.timestamp is not None:
        stamp = message.timestamp
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return int(stamp.timestamp() * 1000)
    return None


def p99(values: list[float]) -> float | None:
    """The 99th percentile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class LagTracker:
    """Lags of one consumer's settled messages, and the publish times of those it holds."""

    def __init__(
        self,
        *,
        histogram: Histogram | None = None,
        clock_ms: Callable[[], int] = now_ms,
        window_s: float = WINDOW_S,
    ) -> None:
        self._histogram = histogram
        self._clock_ms = clock_ms
        self._window_ms = int(window_s * 1000)
        self._samples: deque[tuple[int, float]] = deque(maxlen=MAX_SAMPLES)
        self._held: dict[str, dict[int, int]] = {}  # queue -> id(message) -> published ms

    def received(self, queue: str, message: AbstractIncomingMessage) -> None:
        """A delivery arrived and is held until :meth:`settled`."""
        published = published_ms(message)
        if published is not None:
            self._held.setdefault(queue, {})[id(message)] = published

    def settled(self, queue: str, message: AbstractIncomingMessage) -> None:
        """A delivery was settled (whatever the outcome): its lag is one sample."""
        held = self._held.get(queue)
        if held is not None:
            held.pop(id(message), None)
        published = published_ms(message)
        if published is None:
            return
        now = self._clock_ms()
        lag_s = max(0.0, (now - published) / 1000)
        self._samples.append((now, lag_s))
        if self._histogram is not None:
            self._histogram.labels(queue=queue).observe(lag_s)

    def forget(self, queue: str) -> None:
        """The deliveries of ``queue`` went back to the broker unsettled (a handover)."""
        self._held.pop(queue, None)

    def report(self) -> dict[str, Any]:
        """The window's lag p99 and sample count, and the oldest held message per queue."""
        now = self._clock_ms()
        while self._samples and self._samples[0][0] < now - self._window_ms:
            self._samples.popleft()
        # A list, not a mapping: queue names hold dots, which MongoDB field names may not.
        oldest = [
            {
                "queue": queue,
                "at": datetime.fromtimestamp(min(held.values()) / 1000, tz=UTC),
                "count": len(held),
            }
            for queue, held in sorted(self._held.items())
            if held
        ]
        return {
            "lag_p99_s": p99([lag for _, lag in self._samples]),
            "lag_samples": len(self._samples),
            "oldest_held": oldest,
            "window_s": self._window_ms / 1000,
        }


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One role's figures from its processes' reports: the worst p99, the oldest message
    per queue (``oldest_held`` becomes a mapping of queue to time) and the deliveries held
    per queue (``held``)."""
    p99s = [float(r["lag_p99_s"]) for r in reports if r.get("lag_p99_s") is not None]
    oldest: dict[str, datetime] = {}
    held: dict[str, int] = {}
    for report in reports:
        for entry in report.get("oldest_held") or []:
            queue, value = str(entry.get("queue")), entry.get("at")
            held[queue] = held.get(queue, 0) + int(entry.get("count") or 0)
            if isinstance(value, datetime):
                stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
                if queue not in oldest or stamp < oldest[queue]:
                    oldest[queue] = stamp
    return {
        "lag_p99_s": max(p99s) if p99s else None,
        "lag_samples": sum(int(r.get("lag_samples") or 0) for r in reports),
        "oldest_held": oldest,
        "held": held,
    }
