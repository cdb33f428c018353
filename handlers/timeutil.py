"""Time at the edges: Graph's timestamps in, aware UTC datetimes inside."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_FRACTION = re.compile(r"\.(\d+)")


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """A datetime read back from the database as aware UTC (the driver may return naive)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_graph_datetime(value: str) -> datetime:
    """Parse Graph's ISO timestamps (7 fractional digits, ``Z`` or offset) to aware UTC.

    Python's parser accepts at most 6 fractional digits, so the fraction is cut to
    microseconds first. A value without an offset is taken as UTC, as Graph means it.
    Raises ``ValueError`` for text that is no timestamp, or one outside datetime's range
    once in UTC (``9999-12-31T23:59:59-12:00``).
    """
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"timestamp out of range in UTC: {value[:40]!r}") from None


def isoformat_z(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix and second precision."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_millis(value: datetime) -> int:
    """Milliseconds since the epoch (BSON datetimes keep this precision)."""
    return int(value.timestamp() * 1000)
