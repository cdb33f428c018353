"""When the subscription manager acts: its settings, the renewal rule, write pacing and
the expiry summary for the metrics (pure, apart from the token bucket's clock)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from handlers.timeutil import as_utc
from subscriptions.ports import Record
from subscriptions.registration import MAX_EVENT_SUBSCRIPTION_MINUTES

#: Lifetime assumed for a record that does not say when it was granted.
DEFAULT_LIFETIME_S = (MAX_EVENT_SUBSCRIPTION_MINUTES - 5) * 60.0


@dataclass(frozen=True)
class ManagerSettings:
    """Every interval and limit of the manager (seconds unless the name says otherwise)."""

    public_url: str
    #: Shards and publish timeout of the resync requests the runtime wires in.
    shard_count: int = 8
    scan_interval_s: float = 30.0
    #: Renew when less than this share of the granted lifetime remains ...
    renew_fraction: float = 0.5
    #: ... or less than this (capped at 3/4 of the lifetime, for short-lived grants).
    renew_margin_s: float = 86_400.0
    #: Each account renews up to this share of the lifetime earlier (stable per account).
    renew_jitter_fraction: float = 0.1
    check_interval_s: float = 6 * 3600.0
    resync_interval_s: float = 3600.0
    lease_ttl_s: float = 120.0
    max_concurrency: int = 16
    #: Subscription writes per second and burst, per manager process. Graph allows 1,000
    #: per 20 s per app and tenant; 10/s leaves room for several copies and the connect flow.
    writes_per_s: float = 10.0
    write_burst: int = 20
    startup_delay_max_s: float = 5.0
    #: Wait after a failed account action before trying that account again.
    retry_after_failure_s: float = 60.0
    publish_timeout_s: float = 2.5
    #: Due accounts whose leases are taken together and decided from one read of the
    #: subscription records. Capped so that a batch's writes take at most about
    #: ``batch_hold_s`` at ``writes_per_s``: the leases of a batch are held until each of
    #: its accounts is done (an erasure waits 10 s for them).
    batch_size: int = 64
    batch_hold_s: float = 5.0


class TokenBucket:
    """At most ``rate_per_s`` takes per second on average, ``burst`` at once (monotonic time)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(max(1, burst))
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        """Wait for a token."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


def stable_fraction(*parts: str) -> float:
    """A stable number in [0, 1) per key: spreads accounts over intervals and jitter."""
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def renewal_due(account_id: str, record: Record, now: datetime, settings: ManagerSettings) -> bool:
    """Whether the record is due for renewal: less than ``renew_fraction`` of its granted
    lifetime (or ``renew_margin_s``) left, each account a stable jitter earlier."""
    expires_at = as_utc(record["expires_at"])
    granted_at = record.get("granted_at")
    lifetime_s = (
        (expires_at - as_utc(granted_at)).total_seconds()
        if isinstance(granted_at, datetime)
        else DEFAULT_LIFETIME_S
    )
    lifetime_s = max(lifetime_s, 60.0)
    threshold_s = max(
        lifetime_s * settings.renew_fraction, min(settings.renew_margin_s, 0.75 * lifetime_s)
    )
    jitter = stable_fraction("renew", account_id) * settings.renew_jitter_fraction
    threshold_s += jitter * lifetime_s
    return (expires_at - now).total_seconds() < threshold_s


#: The horizons of :func:`expiry_summary`, in seconds.
EXPIRY_HORIZONS_S: dict[str, float] = {"1h": 3600.0, "6h": 21600.0, "24h": 86400.0}


def expiry_summary(records_by_account: Iterable[list[Record]], now: datetime) -> dict[str, int]:
    """Count accounts by how soon their latest subscription expires.

    For each account, its live subscription that expires last decides: ``within_1h``,
    ``within_6h``, ``within_24h`` (cumulative: an account within 1 h is counted in all three)
    and ``none`` (no live subscription at all: it receives no notifications). Renewal starts
    when half of a lifetime of days is left, so a count above zero within hours means
    renewals are failing.
    """
    summary = {f"within_{name}": 0 for name in EXPIRY_HORIZONS_S} | {"none": 0}
    for records in records_by_account:
        expiries = [as_utc(r["expires_at"]) for r in records if "expires_at" in r]
        latest = max(expiries, default=None)
        if latest is None or latest <= now:
            summary["none"] += 1
            continue
        left_s = (latest - now).total_seconds()
        for name, horizon_s in EXPIRY_HORIZONS_S.items():
            if left_s <= horizon_s:
                summary[f"within_{name}"] += 1
    return summary
