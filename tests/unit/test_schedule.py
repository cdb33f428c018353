"""The subscription manager's renewal rule, without a database, broker or Graph."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from subscriptions.schedule import ManagerSettings, renewal_due

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SETTINGS = ManagerSettings(public_url="https://sync.example")


def _record(*, granted_ago: timedelta, lifetime: timedelta) -> dict[str, object]:
    granted_at = NOW - granted_ago
    return {"_id": "h", "granted_at": granted_at, "expires_at": granted_at + lifetime}


def test_fresh_subscription_is_not_due() -> None:
    """A subscription granted a moment ago for three days is not renewed yet."""
    record = _record(granted_ago=timedelta(minutes=1), lifetime=timedelta(days=3))
    assert not renewal_due("acc-1", record, NOW, SETTINGS)


def test_subscription_past_its_margin_is_due() -> None:
    """Less than a day (the margin) of a three-day lifetime left: renew."""
    record = _record(granted_ago=timedelta(days=2, hours=1), lifetime=timedelta(days=3))
    assert renewal_due("acc-1", record, NOW, SETTINGS)


@given(
    account=st.text(min_size=1, max_size=20),
    lifetime_min=st.integers(min_value=2, max_value=10_080),
    left_share=st.floats(min_value=0.0, max_value=1.0),
)
def test_renewal_never_waits_past_a_quarter_of_the_lifetime(
    account: str, lifetime_min: int, left_share: float
) -> None:
    """Whatever the account's jitter, a subscription with at most a quarter of its lifetime
    left is due, and one with all of it left is not."""
    lifetime = timedelta(minutes=lifetime_min)
    left = lifetime * left_share
    record = _record(granted_ago=lifetime - left, lifetime=lifetime)
    if left_share <= 0.25:
        assert renewal_due(account, record, NOW, SETTINGS)
    if left_share == 1.0:
        assert not renewal_due(account, record, NOW, SETTINGS)
