"""Outbound changes kept, encrypted, while their account cannot write to Outlook (paused
or waiting for its user to reconnect), replayed in order once it can.

Parked changes are bounded per account in number and in age; a change past either bound
is dropped and reported to 1Relation as ``event.rejected``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from handlers.outcome import Outcome
from handlers.ports import Links
from handlers.reports import Reporter

log = structlog.get_logger(__name__)


class Parking:
    """Parks an account's outbound changes within the bounds, and drops the expired ones."""

    def __init__(
        self, *, links: Links, reporter: Reporter, ttl_s: float, max_per_account: int
    ) -> None:
        self._links = links
        self._reporter = reporter
        self._ttl_s = ttl_s
        self._max_per_account = max_per_account

    async def park(
        self, account_id: str, relation_event_id: str, revision: int, body: dict[str, Any]
    ) -> Outcome:
        """Keep the shard message ``body`` for replay; the outcome for its delivery."""
        await self.drop_expired(account_id)
        if await self._links.count_parked(account_id) >= self._max_per_account:
            reason = (
                f"the account cannot write to Outlook until its user reconnects and already "
                f"has {self._max_per_account} changes waiting; this change was dropped: send "
                f"it again once the account is connected"
            )
            log.warning("outbound.parked_full", account_id=account_id)
            await self._reporter.rejected_change(
                account_id, relation_event_id, revision, reason, "parked_full"
            )
            return Outcome.dead_letter(reason)
        await self._links.park(account_id, relation_event_id, revision, body)
        return Outcome.ack()

    async def drop_expired(self, account_id: str) -> None:
        """Drop the account's changes parked longer than the limit, telling 1Relation."""
        before = datetime.now(UTC) - timedelta(seconds=self._ttl_s)
        expired = await self._links.take_expired_parked(account_id, before)
        if not expired:
            return
        days = self._ttl_s / 86400
        reason = (
            f"this change waited more than {days:g} days for the account's user to reconnect "
            f"and was dropped: send it again once the account is connected"
        )
        log.warning("outbound.parked_expired", account_id=account_id, count=len(expired))
        for doc in expired:
            await self._reporter.rejected_change(
                account_id,
                str(doc["relation_event_id"]),
                doc.get("revision"),
                reason,
                "parked_expired",
            )
