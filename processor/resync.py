"""Resync requests: a delta pass asked of the account's shard owner over the broker."""

from __future__ import annotations

import uuid

from handlers.ports import OutgoingMessage, Publisher
from handlers.routing import shard_routing_key
from handlers.timeutil import utcnow
from processor.messages import resync_message
from processor.topology import INBOUND_EXCHANGE


class ResyncPublisher:
    """Publishes ``resync`` messages to the account's shard (implements
    :class:`subscriptions.ports.ResyncRequests`)."""

    def __init__(self, *, publisher: Publisher, shard_count: int, timeout_s: float) -> None:
        self._publisher = publisher
        self._shard_count = shard_count
        self._timeout_s = timeout_s

    async def request(self, account_id: str, *, full: bool, reason: str) -> None:
        """Ask for a delta pass (``full`` drops the stored delta link); raises ``PublishError``."""
        await self._publisher.publish(
            OutgoingMessage(
                exchange=INBOUND_EXCHANGE,
                routing_key=shard_routing_key(account_id, self._shard_count),
                body=resync_message(
                    account_id=account_id, reason=reason, full=full, requested_at=utcnow()
                ),
                message_id=uuid.uuid4().hex,
            ),
            timeout_s=self._timeout_s,
        )
