"""Lifecycle notifications: the receiver's validated items, acted on by the manager.

- ``subscriptionRemoved``: create a new subscription, then a full delta resync;
- ``missed``: a full delta resync (notifications were dropped);
- ``reauthorizationRequired``: renew with a fresh token (PATCH renews *and* reauthorizes),
  then an incremental delta pass for what changed while notifications were paused; a
  refresh that fails for good sets ``reauthorization_required`` instead.

A message for a subscription we do not know (already replaced, or erased) is acked and
counted. Work that cannot be done now (Graph throttled or down, another manager holding
the account's lease) is handed to the manager's next scan and the message is acked:
lifecycle queues have no retry-delay queues, and waiting is never done by holding a
message. If this process dies before that scan, the periodic Graph check (a missing
subscription is recreated and resynced) and Graph's repeated ``reauthorizationRequired``
cover it. The messages come through the same consumer as every queue's
(:class:`processor.consumer.ShardConsumer`), which settles what :meth:`LifecycleHandler.handle`
decides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import structlog

from handlers.errors import (
    AccountUnavailable,
    PermanentError,
    PublishError,
    ReauthorizationRequired,
    TransientError,
)
from handlers.messages import LIFECYCLE_SCHEMA
from handlers.outcome import Outcome, outcome_for
from handlers.ports import Delivery
from subscriptions.manager import SubscriptionManager
from subscriptions.ports import Repositories

log = structlog.get_logger(__name__)

LIFECYCLE_EVENTS = frozenset({"subscriptionRemoved", "missed", "reauthorizationRequired"})


#: Largest lifecycle message the consumer parses: ours are a few hundred bytes.
MAX_LIFECYCLE_MESSAGE_BYTES = 64 * 1024


def validate_lifecycle(body: Any) -> str | None:
    """Why a lifecycle message is malformed, or None."""
    if not isinstance(body, dict):
        return "body is not an object"
    if body.get("schema") != LIFECYCLE_SCHEMA:
        return f"unknown schema {str(body.get('schema'))[:64]!r}"
    for name in ("account_id", "subscription_hash", "lifecycle_event"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} missing"
    return None


class LifecycleHandler:
    """Decides what one lifecycle message needs and has the manager do it."""

    def __init__(self, *, store: Repositories, manager: SubscriptionManager) -> None:
        self._store = store
        self._manager = manager
        #: Counts by what happened (handled_<event>, unknown, unknown_event, deferred, …).
        self.stats: Counter[str] = Counter()

    async def handle_batch(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Handle one account's lifecycle messages one after another."""
        for delivery in deliveries:
            try:
                delivery.outcome = await self.handle(delivery.body)
            except Exception as exc:  # a bug must not decide for the rest of the batch
                log.exception("lifecycle.failed")
                delivery.outcome = outcome_for(exc)

    async def handle(self, body: dict[str, Any]) -> Outcome:
        """Handle one validated message; returns what to do with it."""
        account_id = str(body["account_id"])
        sub_hash = str(body["subscription_hash"])
        event = str(body["lifecycle_event"])
        if event not in LIFECYCLE_EVENTS:
            self.stats["unknown_event"] += 1
            log.info("lifecycle.unknown_event", account_id=account_id, lifecycle_event=event[:40])
            return Outcome.ack()
        record = await self._store.subscriptions.get_for_account(account_id, sub_hash)
        account = await self._store.accounts.get(account_id)
        if record is None or account is None:
            self.stats["unknown"] += 1
            self._manager.stats["lifecycle_unknown"] += 1
            log.info("lifecycle.unknown_subscription", account_id=account_id, lifecycle_event=event)
            return Outcome.ack()
        log.info(
            "lifecycle.received",
            account_id=account_id,
            lifecycle_event=event,
            subscription=sub_hash,
        )
        try:
            done = await self._act(account_id, sub_hash, event)
        except ReauthorizationRequired as exc:
            try:
                await self._manager.report_reauthorization(account_id, exc.reason)
            except TransientError as publish_failure:
                return outcome_for(publish_failure)
            return outcome_for(exc)
        except PublishError as exc:
            return outcome_for(exc)
        except AccountUnavailable as exc:
            self.stats["unknown"] += 1
            return outcome_for(exc)
        except (TransientError, PermanentError) as exc:
            log.warning("lifecycle.deferred", account_id=account_id, error=str(exc)[:200])
            done = False
        if not done:
            self.stats["deferred"] += 1
            actions = {"renew"} if event == "reauthorizationRequired" else {"check"}
            self._manager.request_repair(account_id, actions)
        self.stats[f"handled_{event}"] += 1
        return Outcome.ack()

    async def _act(self, account_id: str, sub_hash: str, event: str) -> bool:
        if event == "missed":
            await self._manager.publish_resync(account_id, full=True, reason="missed")
            return True
        if event == "subscriptionRemoved":
            return await self._manager.recreate(account_id, sub_hash)
        return await self._manager.reauthorize(account_id, sub_hash)
