"""Telling 1Relation what changed: the outbox relay for ``onerelation.inbound``.

A reconciled write marks its document as unannounced in the same update; the mark is
cleared only after the broker confirmed the announcement. A crash in between leaves the
mark, and the relay finds it later, so no change goes unannounced. (The price is that a
change may, rarely, be announced twice; 1Relation dedupes on ``message_id``.)
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from handlers.errors import PublishError
from handlers.messages import event_change_body
from handlers.ports import OutgoingMessage, Publisher
from handlers.records import Change
from handlers.routing import ONERELATION_INBOUND, shard_routing_key
from processor.event_store import EventStore
from processor.logs import get_logger
from processor.messages import resync_message
from processor.metrics import Metrics
from processor.topology import INBOUND_EXCHANGE

log = get_logger(__name__)

RelationIds = dict[str, str]


class Announcer:
    """Publishes ``event.upserted``/``event.deleted`` for reconciled changes, with confirms."""

    def __init__(
        self,
        *,
        publisher: Publisher,
        events: EventStore,
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self._publisher = publisher
        self._events = events
        self._metrics = metrics
        self._timeout_s = timeout_s
        #: Accounts whose last flush here failed: their next flush sweeps the outbox, so
        #: what a broker outage left unannounced goes out with the account's next batch
        #: rather than when the relay finds it (marks older than a minute, every 30 s).
        self._unflushed: set[str] = set()

    def message_for(self, change: Change) -> OutgoingMessage:
        """The announcement of one change (its id is stable, so a re-send is recognisable)."""
        return OutgoingMessage(
            exchange=ONERELATION_INBOUND,
            routing_key=f"event.{change.change}",
            body=event_change_body(
                account_id=change.account_id,
                event_key=change.event_key,
                change=change.change,
                origin="microsoft",
                last_modified=change.last_modified_text or change.last_modified,
                relation_event_id=change.relation_event_id,
                sequence=change.seq,
            ),
            message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{change.event_key}:{change.seq}")),
        )

    async def flush(
        self, account_id: str, changes: Sequence[Change], *, sweep_outbox: bool = False
    ) -> int:
        """Announce ``changes`` (plus the account's whole outbox if asked); returns how many."""
        todo = {c.event_key: c for c in changes}
        if sweep_outbox or account_id in self._unflushed:
            for pending in await self._events.pending_announcements(account_id):
                todo.setdefault(pending.event_key, pending)
        announced = 0
        for change in todo.values():
            try:
                await self._publisher.publish(self.message_for(change), timeout_s=self._timeout_s)
            except PublishError:
                log.warning("announce.publish_failed", account_id=account_id, pending=len(todo))
                self._unflushed.add(account_id)
                return announced
            await self._events.clear_announcement(change)
            announced += 1
        self._unflushed.discard(account_id)
        return announced


class OutboxRelay:
    """Finds accounts with stale outbox marks and asks their shard owner to flush them.

    The relay itself never writes event documents: the flush runs in the worker that is
    the single active consumer of the account's shard, keeping one writer per account.
    """

    def __init__(
        self, *, publisher: Publisher, events: EventStore, shard_count: int, timeout_s: float
    ) -> None:
        self._publisher = publisher
        self._events = events
        self._shard_count = shard_count
        self._timeout_s = timeout_s

    async def run_once(self, *, older_than_s: float, now: datetime) -> int:
        """Queue an ``announce`` job per account with marks older than ``older_than_s``."""
        accounts = await self._events.accounts_with_pending_announcements(older_than_s=older_than_s)
        for account_id in accounts:
            body = resync_message(
                account_id=account_id, reason="outbox", full=False, requested_at=now
            )
            body["kind"] = "announce"
            await self._publisher.publish(
                OutgoingMessage(
                    exchange=INBOUND_EXCHANGE,
                    routing_key=shard_routing_key(account_id, self._shard_count),
                    body=body,
                    message_id=uuid.uuid4().hex,
                ),
                timeout_s=self._timeout_s,
            )
        return len(accounts)
